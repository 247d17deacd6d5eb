//! The record the retry layer leaves in requests and responses.

use std::time::Duration;

use http::StatusCode;

use crate::classify::Class;
use crate::headers::RequestId;
use crate::retry::StopReason;

/// Which attempt a request is: set in the extensions of every retry the
/// retry layer sends, so inner layers (logging, concurrency) can see it.
/// The first attempt carries none (absence means attempt 1), which keeps the
/// common path free of allocations.
///
/// ```
/// use tower_overload::retry::Attempt;
/// let attempt = Attempt { number: 2, max: 6 };
/// assert!(attempt.is_retry());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Attempt {
    /// 1 for the first attempt.
    pub number: u32,
    /// The most attempts the policy allows for the call.
    pub max: u32,
}

impl Attempt {
    /// Whether this attempt is a retry.
    ///
    /// ```
    /// # use tower_overload::retry::Attempt;
    /// assert!(!Attempt { number: 1, max: 3 }.is_retry());
    /// ```
    pub fn is_retry(&self) -> bool {
        self.number > 1
    }
}

/// One attempt of a call, as the retry layer saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    /// How it was classified.
    pub class: Class,
    /// Its status, when a response came.
    pub status: Option<StatusCode>,
    /// Its `request-id`, when the response had one.
    pub request_id: Option<RequestId>,
    /// The wait before the next attempt, when there was one.
    pub wait_after: Option<Duration>,
}

/// The whole story of a call: inserted into the extensions of the response
/// the retry layer returns, unless the first attempt succeeded. No report
/// means one attempt, a success: the common path pays for no record.
///
/// ```
/// use tower_overload::retry::{RetryReport, StopReason};
/// # let response = {
/// #     let mut r = http::Response::new(());
/// #     r.extensions_mut().insert(RetryReport { attempts: Vec::new(), waited: std::time::Duration::ZERO, elapsed: std::time::Duration::ZERO, stop: StopReason::Success, max_attempts: 1 });
/// #     r
/// # };
/// let report = response.extensions().get::<RetryReport>().unwrap();
/// println!("{} attempts, waited {:?}, stopped: {:?}", report.attempts.len(), report.waited, report.stop);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryReport {
    /// Every attempt, in order.
    pub attempts: Vec<AttemptRecord>,
    /// Total time spent waiting between attempts.
    pub waited: Duration,
    /// Time from the call's start to its last outcome.
    pub elapsed: Duration,
    /// Why the call ended where it did.
    pub stop: StopReason,
    /// The most attempts the policy allowed.
    pub max_attempts: u32,
}

impl RetryReport {
    /// Attempts that were retries.
    ///
    /// ```
    /// # use tower_overload::retry::{RetryReport, StopReason};
    /// let report = RetryReport { attempts: Vec::new(), waited: Default::default(), elapsed: Default::default(), stop: StopReason::Success, max_attempts: 1 };
    /// assert_eq!(report.retries(), 0);
    /// ```
    pub fn retries(&self) -> usize {
        self.attempts.len().saturating_sub(1)
    }

    /// The request id of every attempt that had one, in order.
    ///
    /// ```
    /// # use tower_overload::retry::{RetryReport, StopReason};
    /// # let report = RetryReport { attempts: Vec::new(), waited: Default::default(), elapsed: Default::default(), stop: StopReason::Success, max_attempts: 1 };
    /// for id in report.request_ids() {
    ///     println!("{id}");
    /// }
    /// ```
    pub fn request_ids(&self) -> impl Iterator<Item = &RequestId> {
        self.attempts.iter().filter_map(|a| a.request_id.as_ref())
    }
}
