//! What to retry, how long to wait, and when to stop: the pure part of the retry layer.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::HeaderName;
use rand::{SeedableRng, rngs::SmallRng};

use crate::backoff::{Backoff, Jitter};
use crate::budget::{RetryBudget, RetryQuota};
use crate::classify::{Class, Classification};
use crate::retry::classify_error::{ClassifyError, DefaultErrorClassifier};
use crate::retry::stream_guard::StreamGuard;

/// Attempts and backoff for one [`Class`] of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassPolicy {
    /// Most attempts that may end in this class; 1 means never retried.
    pub max_attempts: u32,
    /// The wait before each retry of this class.
    pub backoff: Backoff,
}

impl ClassPolicy {
    /// `max_attempts` attempts (counting the first) with `backoff` between them.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_overload::backoff::{Backoff, Jitter};
    /// use tower_overload::retry::ClassPolicy;
    ///
    /// let policy = ClassPolicy::new(3, Backoff::new(Duration::from_millis(500), Duration::from_secs(8), Jitter::Equal));
    /// assert_eq!(policy.max_attempts, 3);
    /// ```
    pub const fn new(max_attempts: u32, backoff: Backoff) -> Self {
        Self {
            max_attempts,
            backoff,
        }
    }

    /// Never retried.
    ///
    /// ```
    /// use tower_overload::retry::ClassPolicy;
    /// assert_eq!(ClassPolicy::never().max_attempts, 1);
    /// ```
    pub const fn never() -> Self {
        Self::new(
            1,
            Backoff::new(Duration::ZERO, Duration::ZERO, Jitter::None),
        )
    }
}

/// What the layer returns when the last attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FinalFailure {
    /// The last upstream response, as it came, with a
    /// [`RetryReport`](crate::retry::RetryReport) extension.
    #[default]
    Response,
    /// The crate's typed [`Error`](crate::Error); the response is dropped.
    Error,
}

/// Settings of [`OverloadRetryLayer`](crate::retry::OverloadRetryLayer).
///
/// Start from a preset, [`foreground`](Self::foreground) for a person
/// waiting or [`background`](Self::background) for a job that can ride out a
/// storm, and adjust. Clones share one retry quota (or budget).
///
/// ```
/// use std::time::Duration;
/// use tower_overload::retry::{FinalFailure, RetryPolicy};
///
/// let policy = RetryPolicy::foreground()
///     .deadline(Some(Duration::from_secs(20)))
///     .final_failure(FinalFailure::Error)
///     .seed(42);
/// assert_eq!(policy.get_deadline(), Some(Duration::from_secs(20)));
/// ```
#[derive(Clone)]
pub struct RetryPolicy {
    pub(crate) overloaded: ClassPolicy,
    pub(crate) rate_limited: ClassPolicy,
    pub(crate) server_error: ClassPolicy,
    pub(crate) timeout: ClassPolicy,
    pub(crate) conflict: ClassPolicy,
    pub(crate) transport: ClassPolicy,
    pub(crate) max_attempts: u32,
    pub(crate) deadline: Option<Duration>,
    pub(crate) retry_window: Option<Duration>,
    pub(crate) attempt_timeout: Option<Duration>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) max_server_delay: Duration,
    pub(crate) rationing: Option<Rationing>,
    pub(crate) final_failure: FinalFailure,
    pub(crate) retry_count_header: Option<HeaderName>,
    pub(crate) sniff_timeout: Duration,
    pub(crate) stream_guard: Option<StreamGuard>,
    pub(crate) error_classifier: Arc<dyn ClassifyError>,
    pub(crate) seeds: Arc<SeedSource>,
}

/// How retries are rationed across the calls of every clone.
#[derive(Debug, Clone)]
pub(crate) enum Rationing {
    /// A fraction of traffic plus a floor (Finagle's / tower's budget).
    Budget(RetryBudget),
    /// A bucket of tokens that successes refill (the AWS SDKs' quota).
    Quota(RetryQuota),
}

impl Rationing {
    fn try_retry(&self, class: Class) -> bool {
        match self {
            Rationing::Budget(budget) => budget.withdraw(),
            Rationing::Quota(quota) => quota.try_retry(class),
        }
    }
}

/// Seeds one RNG per call: reproducible when seeded, different for every call.
pub(crate) struct SeedSource {
    seed: u64,
    calls: AtomicU64,
}

impl SeedSource {
    fn new(seed: u64) -> Self {
        Self {
            seed,
            calls: AtomicU64::new(0),
        }
    }

    fn from_entropy() -> Self {
        // std's RandomState is seeded from the OS once per thread and varied per instance.
        Self::new(
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish(),
        )
    }

    pub(crate) fn next_rng(&self) -> SmallRng {
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        SmallRng::seed_from_u64(self.seed ^ call.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }
}

/// The official SDKs' default timeout of a request. A non-streaming answer
/// sends its head only once the whole message is generated, so a shorter
/// wait for the head would kill long generations that would have succeeded.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(600);

/// Silence between two frames of a response body. A stream sends `ping`
/// events every few seconds while the model thinks, and a non-streaming
/// body follows its head at once, so two minutes of nothing is a dead
/// connection, not a slow model.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// A person waiting gets the official SDKs' bound on one call, so no
/// generation the SDK would let finish is cut short by this preset.
const FOREGROUND_DEADLINE: Duration = ATTEMPT_TIMEOUT;

const fn backoff(base_ms: u64, cap_ms: u64, jitter: Jitter) -> Backoff {
    Backoff::new(
        Duration::from_millis(base_ms),
        Duration::from_millis(cap_ms),
        jitter,
    )
}

impl RetryPolicy {
    /// For a person waiting: overloads get up to 5 attempts with full jitter
    /// (base 1 s, cap 60 s); rate limits wait what the server says (up to 60 s,
    /// 3 attempts); server errors, timeouts, conflicts and connection failures
    /// get 3 attempts (equal jitter, 0.5 s to 8 s, as the official SDKs); at
    /// most 6 attempts in all, and no retry is started after 60 s (the
    /// [retry window](Self::retry_window)).
    ///
    /// No call stays pending forever: an attempt without a response head
    /// after 600 s (the official SDKs' timeout; a non-streaming answer sends
    /// its head only when the whole message is generated) or a body silent
    /// for 120 s between frames is a [`Class::Timeout`], and the whole call
    /// ends at its [deadline](Self::deadline) of 600 s, the attempt in flight
    /// included.
    ///
    /// Retries are rationed by a [`RetryQuota`] shared by every clone, as
    /// the AWS SDKs' standard mode does: 500 tokens, 5 a retry, 10 after a
    /// timeout; a success gives back what its retry cost, or 1 token on a
    /// first try. In a full outage, about 100 retries, then one attempt per
    /// call; as calls succeed again, retries come back with them.
    ///
    /// ```
    /// use tower_overload::retry::RetryPolicy;
    /// let policy = RetryPolicy::foreground();
    /// assert_eq!(policy.get_max_attempts(), 6);
    /// ```
    pub fn foreground() -> Self {
        let quick = ClassPolicy::new(3, backoff(500, 8_000, Jitter::Equal));
        Self {
            overloaded: ClassPolicy::new(5, backoff(1_000, 60_000, Jitter::Full)),
            rate_limited: ClassPolicy::new(3, backoff(1_000, 60_000, Jitter::Full)),
            server_error: quick,
            timeout: quick,
            conflict: quick,
            transport: quick,
            max_attempts: 6,
            deadline: Some(FOREGROUND_DEADLINE),
            retry_window: Some(Duration::from_secs(60)),
            attempt_timeout: Some(ATTEMPT_TIMEOUT),
            idle_timeout: Some(IDLE_TIMEOUT),
            max_server_delay: Duration::from_secs(60),
            rationing: Some(Rationing::Quota(RetryQuota::default())),
            final_failure: FinalFailure::Response,
            retry_count_header: None,
            sniff_timeout: Duration::from_secs(5),
            stream_guard: None,
            error_classifier: Arc::new(DefaultErrorClassifier),
            seeds: Arc::new(SeedSource::from_entropy()),
        }
    }

    /// For a job that can wait: rides out multi-minute storms. Overloads get
    /// 12 attempts with full jitter (base 30 s, cap 300 s); rate limits wait
    /// what the server says up to 300 s (8 attempts); other transient
    /// failures get 6 attempts (equal jitter, 5 s to 120 s); at most 16
    /// attempts; no retry is started after 30 minutes, and the call ends at
    /// 40 minutes (room for a last attempt's long generation). Same attempt
    /// and idle timeouts and the same quota as [`foreground`](Self::foreground).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_overload::retry::RetryPolicy;
    /// let policy = RetryPolicy::background();
    /// assert_eq!(policy.get_retry_window(), Some(Duration::from_secs(30 * 60)));
    /// assert_eq!(policy.get_deadline(), Some(Duration::from_secs(40 * 60)));
    /// ```
    pub fn background() -> Self {
        let patient = ClassPolicy::new(6, backoff(5_000, 120_000, Jitter::Equal));
        Self {
            overloaded: ClassPolicy::new(12, backoff(30_000, 300_000, Jitter::Full)),
            rate_limited: ClassPolicy::new(8, backoff(5_000, 300_000, Jitter::Full)),
            server_error: patient,
            timeout: patient,
            conflict: patient,
            transport: patient,
            max_attempts: 16,
            deadline: Some(Duration::from_secs(40 * 60)),
            retry_window: Some(Duration::from_secs(30 * 60)),
            max_server_delay: Duration::from_secs(300),
            ..Self::foreground()
        }
    }

    /// Settings for [`Class::Overloaded`] (529, or a 5xx that says overloaded).
    ///
    /// ```
    /// # use tower_overload::retry::{ClassPolicy, RetryPolicy};
    /// let policy = RetryPolicy::foreground().overloaded(ClassPolicy::never());
    /// ```
    pub fn overloaded(mut self, policy: ClassPolicy) -> Self {
        self.overloaded = policy;
        self
    }

    /// Settings for [`Class::RateLimited`] (429). The server's delay, or the
    /// reset of an exhausted `anthropic-ratelimit-*` window, is waited when given.
    ///
    /// ```
    /// # use tower_overload::retry::{ClassPolicy, RetryPolicy};
    /// let policy = RetryPolicy::foreground().rate_limited(ClassPolicy::never());
    /// ```
    pub fn rate_limited(mut self, policy: ClassPolicy) -> Self {
        self.rate_limited = policy;
        self
    }

    /// Settings for [`Class::ServerError`] (500, 502, 503, other 5xx).
    ///
    /// ```
    /// # use tower_overload::retry::{ClassPolicy, RetryPolicy};
    /// let policy = RetryPolicy::foreground().server_error(ClassPolicy::never());
    /// ```
    pub fn server_error(mut self, policy: ClassPolicy) -> Self {
        self.server_error = policy;
        self
    }

    /// Settings for [`Class::Timeout`] (504, 408).
    ///
    /// ```
    /// # use tower_overload::retry::{ClassPolicy, RetryPolicy};
    /// let policy = RetryPolicy::foreground().timeout(ClassPolicy::never());
    /// ```
    pub fn timeout(mut self, policy: ClassPolicy) -> Self {
        self.timeout = policy;
        self
    }

    /// Settings for [`Class::Conflict`] (409).
    ///
    /// ```
    /// # use tower_overload::retry::{ClassPolicy, RetryPolicy};
    /// let policy = RetryPolicy::foreground().conflict(ClassPolicy::never());
    /// ```
    pub fn conflict(mut self, policy: ClassPolicy) -> Self {
        self.conflict = policy;
        self
    }

    /// Settings for [`Class::Transport`]: errors of the inner service, as
    /// judged retryable by the [error classifier](Self::error_classifier).
    ///
    /// ```
    /// # use tower_overload::retry::{ClassPolicy, RetryPolicy};
    /// let policy = RetryPolicy::foreground().transport(ClassPolicy::never());
    /// ```
    pub fn transport(mut self, policy: ClassPolicy) -> Self {
        self.transport = policy;
        self
    }

    /// The most attempts of one call, whatever their classes.
    ///
    /// ```
    /// # use tower_overload::retry::RetryPolicy;
    /// assert_eq!(RetryPolicy::foreground().max_attempts(3).get_max_attempts(), 3);
    /// ```
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The most attempts of one call.
    ///
    /// ```
    /// # use tower_overload::retry::RetryPolicy;
    /// assert_eq!(RetryPolicy::background().get_max_attempts(), 16);
    /// ```
    pub fn get_max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The hard bound on one call, from the first attempt to the response
    /// head: an attempt still in flight when it passes is cancelled and the
    /// call ends with [`ErrorKind::DeadlineExceeded`](crate::ErrorKind::DeadlineExceeded),
    /// naming the attempts and their request ids; no retry is scheduled whose
    /// wait would end past it. A body already handed to the caller is not cut
    /// (the [idle timeout](Self::idle_timeout) bounds its silences). `None`:
    /// no bound but the per-attempt timeouts.
    ///
    /// ```
    /// # use tower_overload::retry::RetryPolicy;
    /// assert_eq!(RetryPolicy::foreground().deadline(None).get_deadline(), None);
    /// ```
    pub fn deadline(mut self, deadline: Option<Duration>) -> Self {
        self.deadline = deadline;
        self
    }

    /// The hard bound on one call.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::retry::RetryPolicy;
    /// assert_eq!(RetryPolicy::foreground().get_deadline(), Some(Duration::from_secs(600)));
    /// ```
    pub fn get_deadline(&self) -> Option<Duration> {
        self.deadline
    }

    /// How long after the call started a retry may still be started: no
    /// retry is scheduled whose wait would end past it, and a server delay
    /// beyond it ends the call with
    /// [`ErrorKind::ServerDelayTooLong`](crate::ErrorKind::ServerDelayTooLong).
    /// The attempt in flight is not cut by it (that is the
    /// [deadline](Self::deadline)). `None`: only the deadline limits retries.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::retry::RetryPolicy;
    /// let policy = RetryPolicy::foreground().retry_window(Some(Duration::from_secs(20)));
    /// assert_eq!(policy.get_retry_window(), Some(Duration::from_secs(20)));
    /// ```
    pub fn retry_window(mut self, window: Option<Duration>) -> Self {
        self.retry_window = window;
        self
    }

    /// How long after the call started a retry may still be started.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::retry::RetryPolicy;
    /// assert_eq!(RetryPolicy::foreground().get_retry_window(), Some(Duration::from_secs(60)));
    /// ```
    pub fn get_retry_window(&self) -> Option<Duration> {
        self.retry_window
    }

    /// The longest wait for one attempt's response head. When it passes the
    /// attempt is dropped, counted as a [`Class::Timeout`] and retried as the
    /// timeout settings allow (nothing has reached the caller yet). Presets:
    /// 600 s, the official SDKs' timeout, because a non-streaming answer
    /// sends its head only when the whole message is generated.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::retry::RetryPolicy;
    /// let policy = RetryPolicy::foreground().attempt_timeout(Some(Duration::from_secs(120)));
    /// assert_eq!(policy.get_attempt_timeout(), Some(Duration::from_secs(120)));
    /// ```
    pub fn attempt_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// The longest wait for one attempt's response head.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::retry::RetryPolicy;
    /// assert_eq!(RetryPolicy::background().get_attempt_timeout(), Some(Duration::from_secs(600)));
    /// ```
    pub fn get_attempt_timeout(&self) -> Option<Duration> {
        self.attempt_timeout
    }

    /// The longest silence between two frames of a response body. While
    /// the layer itself reads the body (to classify an error, or the stream
    /// guard's peek) a silence this long is a [`Class::Timeout`] and is
    /// retried; once the body is the caller's, it ends the body with
    /// [`ErrorKind::Timeout`](crate::ErrorKind::Timeout) instead of hanging.
    /// Presets: 120 s (streams send `ping` events every few seconds).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::retry::RetryPolicy;
    /// let policy = RetryPolicy::foreground().idle_timeout(Some(Duration::from_secs(30)));
    /// assert_eq!(policy.get_idle_timeout(), Some(Duration::from_secs(30)));
    /// ```
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// The longest silence between two frames of a response body.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::retry::RetryPolicy;
    /// assert_eq!(RetryPolicy::foreground().get_idle_timeout(), Some(Duration::from_secs(120)));
    /// ```
    pub fn get_idle_timeout(&self) -> Option<Duration> {
        self.idle_timeout
    }

    /// The longest server-requested delay that is waited. A longer one ends
    /// the call at once with [`ErrorKind::ServerDelayTooLong`](crate::ErrorKind::ServerDelayTooLong),
    /// carrying the delay, so a job queue can reschedule.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::retry::RetryPolicy;
    /// let policy = RetryPolicy::foreground().max_server_delay(Duration::from_secs(10));
    /// ```
    pub fn max_server_delay(mut self, delay: Duration) -> Self {
        self.max_server_delay = delay;
        self
    }

    /// Rations retries with a [`RetryBudget`] (a fraction of traffic plus a
    /// floor) shared by every clone, or not at all with `None`. Replaces the
    /// preset's quota.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::{budget::RetryBudget, retry::RetryPolicy};
    /// let shared = RetryBudget::new(Duration::from_secs(10), 0, 0.1);
    /// let policy = RetryPolicy::foreground().budget(Some(shared.clone()));
    /// ```
    pub fn budget(mut self, budget: Option<RetryBudget>) -> Self {
        self.rationing = budget.map(Rationing::Budget);
        self
    }

    /// Rations retries with a [`RetryQuota`] shared by every clone (the
    /// presets' choice), or not at all with `None`. Replaces any budget.
    ///
    /// ```
    /// # use tower_overload::{budget::RetryQuota, retry::RetryPolicy};
    /// let policy = RetryPolicy::background().retry_quota(Some(RetryQuota::new(1000, 5, 10)));
    /// ```
    pub fn retry_quota(mut self, quota: Option<RetryQuota>) -> Self {
        self.rationing = quota.map(Rationing::Quota);
        self
    }

    /// What a call whose last attempt failed returns: the response (default) or a typed error.
    ///
    /// ```
    /// # use tower_overload::retry::{FinalFailure, RetryPolicy};
    /// let policy = RetryPolicy::foreground().final_failure(FinalFailure::Error);
    /// ```
    pub fn final_failure(mut self, mode: FinalFailure) -> Self {
        self.final_failure = mode;
        self
    }

    /// Sends the number of retries so far on every attempt in this header
    /// (0 on the first), as the official SDKs do with `x-stainless-retry-count`.
    /// Off by default.
    ///
    /// ```
    /// # use tower_overload::retry::RetryPolicy;
    /// let policy = RetryPolicy::foreground()
    ///     .retry_count_header(http::HeaderName::from_static("x-stainless-retry-count"));
    /// ```
    pub fn retry_count_header(mut self, name: HeaderName) -> Self {
        self.retry_count_header = Some(name);
        self
    }

    /// How long the layer may spend reading the first bytes of a failed
    /// response's body, to tell a 500 that says "Overloaded" or a spend-limit
    /// 429 from the rest. Default 5 s; when it passes, the status alone decides.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::retry::RetryPolicy;
    /// let policy = RetryPolicy::foreground().sniff_timeout(Duration::from_secs(1));
    /// ```
    pub fn sniff_timeout(mut self, timeout: Duration) -> Self {
        self.sniff_timeout = timeout;
        self
    }

    /// Checks the start of streamed successes for an error event (off by
    /// default); see [`StreamGuard`].
    ///
    /// ```
    /// # use tower_overload::retry::{RetryPolicy, StreamGuard};
    /// let policy = RetryPolicy::foreground().stream_guard(Some(StreamGuard::default()));
    /// ```
    pub fn stream_guard(mut self, guard: Option<StreamGuard>) -> Self {
        self.stream_guard = guard;
        self
    }

    /// How errors of the inner service are judged; see [`ClassifyError`].
    ///
    /// ```
    /// use tower_overload::retry::{ClassifyError, DefaultErrorClassifier, RetryPolicy};
    /// use tower_overload::classify::Classification;
    ///
    /// #[derive(Debug)]
    /// struct NeverRetry;
    /// impl ClassifyError for NeverRetry {
    ///     fn classify_error(&self, _: &(dyn std::error::Error + 'static)) -> Classification {
    ///         Classification::transport(false)
    ///     }
    /// }
    /// let policy = RetryPolicy::foreground().error_classifier(NeverRetry);
    /// ```
    pub fn error_classifier(mut self, classifier: impl ClassifyError + 'static) -> Self {
        self.error_classifier = Arc::new(classifier);
        self
    }

    /// Seeds the jitter so that a run reproduces: call `n` of every clone
    /// draws from a generator seeded by `seed` and `n`.
    ///
    /// ```
    /// # use tower_overload::retry::RetryPolicy;
    /// let policy = RetryPolicy::foreground().seed(7);
    /// ```
    pub fn seed(mut self, seed: u64) -> Self {
        self.seeds = Arc::new(SeedSource::new(seed));
        self
    }

    /// The settings for `class`; `None` for a success or a client error.
    ///
    /// ```
    /// # use tower_overload::{classify::Class, retry::RetryPolicy};
    /// assert_eq!(RetryPolicy::foreground().class_policy(Class::Overloaded).unwrap().max_attempts, 5);
    /// assert!(RetryPolicy::foreground().class_policy(Class::Success).is_none());
    /// ```
    pub fn class_policy(&self, class: Class) -> Option<&ClassPolicy> {
        Some(match class {
            Class::Overloaded => &self.overloaded,
            Class::RateLimited => &self.rate_limited,
            Class::ServerError => &self.server_error,
            Class::Timeout => &self.timeout,
            Class::Conflict => &self.conflict,
            Class::Transport => &self.transport,
            Class::Success | Class::Client(_) => return None,
        })
    }

    /// Decides what follows one failed attempt. Pure but for the retry
    /// budget or quota, which it draws from only when it answers [`Decision::Retry`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_overload::classify::{Class, Classification};
    /// use tower_overload::retry::{AttemptLog, Decision, Outcome, RetryPolicy, StopReason};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let policy = RetryPolicy::foreground().budget(None).seed(1);
    /// let mut log = AttemptLog::default();
    /// let overloaded = Classification { class: Class::Overloaded, retryable: true, server_verdict: None };
    /// log.record(overloaded.class);
    /// let outcome = Outcome { verdict: overloaded, server_delay: None, elapsed: Duration::ZERO, body_replayable: true };
    /// let mut rng = policy.rng();
    /// assert!(matches!(policy.decide(&log, &outcome, &mut rng), Decision::Retry(d) if d <= Duration::from_secs(1)));
    ///
    /// let client_error = Outcome { verdict: Classification { retryable: false, ..overloaded }, ..outcome };
    /// assert_eq!(policy.decide(&log, &client_error, &mut rng), Decision::Stop(StopReason::NotRetryable));
    /// # }
    /// ```
    pub fn decide(&self, log: &AttemptLog, outcome: &Outcome, rng: &mut SmallRng) -> Decision {
        let verdict = outcome.verdict;
        if !verdict.class.is_failure() {
            return Decision::Stop(StopReason::Success);
        }
        if !verdict.retryable {
            return Decision::Stop(StopReason::NotRetryable);
        }
        // A class the policy has no settings for (a client error the server
        // said to retry) gets the server-error settings.
        let class_policy = self
            .class_policy(verdict.class)
            .unwrap_or(&self.server_error);
        let class_attempts = log.count(verdict.class);
        if class_attempts >= class_policy.max_attempts || log.attempts >= self.max_attempts {
            return Decision::Stop(StopReason::AttemptsExhausted);
        }
        if let Some(delay) = outcome.server_delay
            && delay > self.max_server_delay
        {
            return Decision::Stop(StopReason::ServerDelayTooLong(delay));
        }
        let retry_index = class_attempts.saturating_sub(1);
        let previous = log.last_delay.max(class_policy.backoff.base());
        let computed = class_policy.backoff.delay(retry_index, previous, rng);
        // The server's delay is a floor on ours, never a reason to hurry.
        let delay = outcome
            .server_delay
            .map_or(computed, |server| server.max(computed));
        if let Some(window) = self.retry_limit() {
            let remaining = window.saturating_sub(outcome.elapsed);
            if let Some(server) = outcome.server_delay
                && server > remaining
            {
                return Decision::Stop(StopReason::ServerDelayTooLong(server));
            }
            if delay > remaining {
                return Decision::Stop(StopReason::DeadlineExceeded);
            }
        }
        if !outcome.body_replayable {
            return Decision::Stop(StopReason::BodyNotReplayable);
        }
        if let Some(rationing) = &self.rationing
            && !rationing.try_retry(verdict.class)
        {
            return Decision::Stop(StopReason::BudgetExhausted);
        }
        Decision::Retry(delay)
    }

    /// The time after the call's start past which no retry may be started:
    /// the retry window, or the deadline if that is sooner.
    fn retry_limit(&self) -> Option<Duration> {
        match (self.retry_window, self.deadline) {
            (Some(window), Some(deadline)) => Some(window.min(deadline)),
            (window, deadline) => window.or(deadline),
        }
    }

    /// A generator for one call's jitter (see [`seed`](Self::seed)).
    ///
    /// ```
    /// # use tower_overload::retry::RetryPolicy;
    /// let policy = RetryPolicy::foreground().seed(3);
    /// let _rng = policy.rng();
    /// ```
    pub fn rng(&self) -> SmallRng {
        self.seeds.next_rng()
    }
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("overloaded", &self.overloaded)
            .field("rate_limited", &self.rate_limited)
            .field("server_error", &self.server_error)
            .field("timeout", &self.timeout)
            .field("conflict", &self.conflict)
            .field("transport", &self.transport)
            .field("max_attempts", &self.max_attempts)
            .field("deadline", &self.deadline)
            .field("retry_window", &self.retry_window)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_server_delay", &self.max_server_delay)
            .field("rationing", &self.rationing)
            .field("final_failure", &self.final_failure)
            .field("retry_count_header", &self.retry_count_header)
            .field("sniff_timeout", &self.sniff_timeout)
            .field("stream_guard", &self.stream_guard)
            .field("error_classifier", &self.error_classifier)
            .finish_non_exhaustive()
    }
}

/// The facts about one failed attempt that [`RetryPolicy::decide`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The attempt's classification.
    pub verdict: Classification,
    /// The delay the server asked for, or the reset of an exhausted rate-limit window.
    pub server_delay: Option<Duration>,
    /// Time since the call started.
    pub elapsed: Duration,
    /// Whether the request body can be sent again.
    pub body_replayable: bool,
}

/// Attempts made so far in one call, by class.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttemptLog {
    /// Attempts sent.
    pub attempts: u32,
    counts: [u32; 7],
    /// The last wait before a retry.
    pub last_delay: Duration,
}

impl AttemptLog {
    /// Records an attempt that ended in `class`.
    ///
    /// ```
    /// # use tower_overload::{classify::Class, retry::AttemptLog};
    /// let mut log = AttemptLog::default();
    /// log.record(Class::Overloaded);
    /// log.record(Class::Overloaded);
    /// assert_eq!((log.attempts, log.count(Class::Overloaded)), (2, 2));
    /// ```
    pub fn record(&mut self, class: Class) {
        self.attempts += 1;
        self.counts[Self::slot(class)] += 1;
    }

    /// Attempts that ended in `class`.
    ///
    /// ```
    /// # use tower_overload::{classify::Class, retry::AttemptLog};
    /// assert_eq!(AttemptLog::default().count(Class::Timeout), 0);
    /// ```
    pub fn count(&self, class: Class) -> u32 {
        self.counts[Self::slot(class)]
    }

    fn slot(class: Class) -> usize {
        match class {
            Class::Overloaded => 0,
            Class::RateLimited => 1,
            Class::ServerError => 2,
            Class::Timeout => 3,
            Class::Conflict => 4,
            Class::Transport => 5,
            Class::Success | Class::Client(_) => 6,
        }
    }
}

/// What follows a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Wait this long, then send the next attempt.
    Retry(Duration),
    /// Stop and return the last outcome.
    Stop(StopReason),
}

/// Why a call ended where it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StopReason {
    /// The last attempt succeeded.
    Success,
    /// The last outcome is not retryable (a client error, or `x-should-retry: false`).
    NotRetryable,
    /// The class's or the call's attempts are spent.
    AttemptsExhausted,
    /// The next wait would pass the deadline.
    DeadlineExceeded,
    /// The server asked for a longer wait than the policy or the deadline allows.
    ServerDelayTooLong(Duration),
    /// The shared retry budget refused a retry.
    BudgetExhausted,
    /// The request body cannot be sent again.
    BodyNotReplayable,
    /// The model's circuit breaker opened while the call was retrying it
    /// (a [`BreakerSignal`](crate::breaker_signal::BreakerSignal) from the
    /// fallback layer outside said so): the call stops so that the next
    /// model of its chain can answer, instead of finishing its retry loop.
    /// When the backoff had already begun, the call ends with an
    /// [`Error`](crate::Error) of kind
    /// [`RetriesExhausted`](crate::ErrorKind::RetriesExhausted) and the last
    /// attempt's class, which the fallback layer falls back on like the
    /// response it stands for.
    ModelUnavailable,
}

impl StopReason {
    /// The error kind a failure stopped for this reason turns into.
    pub(crate) fn error_kind(self) -> crate::ErrorKind {
        use crate::ErrorKind;
        match self {
            StopReason::Success | StopReason::NotRetryable => ErrorKind::NotRetryable,
            StopReason::AttemptsExhausted | StopReason::ModelUnavailable => {
                ErrorKind::RetriesExhausted
            }
            StopReason::DeadlineExceeded => ErrorKind::DeadlineExceeded,
            StopReason::ServerDelayTooLong(_) => ErrorKind::ServerDelayTooLong,
            StopReason::BudgetExhausted => ErrorKind::BudgetExhausted,
            StopReason::BodyNotReplayable => ErrorKind::BodyNotReplayable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::ClientKind;

    fn failed(class: Class) -> Outcome {
        Outcome {
            verdict: Classification {
                class,
                retryable: class.is_retryable_by_default(),
                server_verdict: None,
            },
            server_delay: None,
            elapsed: Duration::ZERO,
            body_replayable: true,
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy::foreground().budget(None).seed(9)
    }

    fn run(policy: &RetryPolicy, class: Class) -> (u32, StopReason) {
        let mut log = AttemptLog::default();
        let mut rng = policy.rng();
        loop {
            log.record(class);
            match policy.decide(&log, &failed(class), &mut rng) {
                Decision::Retry(delay) => log.last_delay = delay,
                Decision::Stop(reason) => return (log.attempts, reason),
            }
        }
    }

    #[test]
    fn attempts_per_class_follow_the_preset() {
        let policy = policy();
        assert_eq!(
            run(&policy, Class::Overloaded),
            (5, StopReason::AttemptsExhausted)
        );
        assert_eq!(
            run(&policy, Class::RateLimited),
            (3, StopReason::AttemptsExhausted)
        );
        assert_eq!(
            run(&policy, Class::ServerError),
            (3, StopReason::AttemptsExhausted)
        );
        assert_eq!(
            run(&policy, Class::Transport),
            (3, StopReason::AttemptsExhausted)
        );
        assert_eq!(
            run(&policy, Class::Client(ClientKind::Authentication)),
            (1, StopReason::NotRetryable)
        );
        assert_eq!(run(&policy, Class::Success), (1, StopReason::Success));
    }

    #[test]
    fn classes_have_separate_counts_under_one_total() {
        let policy = policy();
        let mut log = AttemptLog::default();
        let mut rng = policy.rng();
        for class in [
            Class::Overloaded,
            Class::Overloaded,
            Class::ServerError,
            Class::ServerError,
        ] {
            log.record(class);
            assert!(matches!(
                policy.decide(&log, &failed(class), &mut rng),
                Decision::Retry(_)
            ));
        }
        log.record(Class::Timeout);
        assert!(matches!(
            policy.decide(&log, &failed(Class::Timeout), &mut rng),
            Decision::Retry(_)
        ));
        log.record(Class::Overloaded);
        assert_eq!(
            policy.decide(&log, &failed(Class::Overloaded), &mut rng),
            Decision::Stop(StopReason::AttemptsExhausted),
            "six attempts in all"
        );
    }

    #[test]
    fn server_delay_is_a_floor_and_bounded() {
        let policy = policy();
        let mut log = AttemptLog::default();
        log.record(Class::RateLimited);
        let mut rng = policy.rng();
        let mut outcome = failed(Class::RateLimited);
        outcome.server_delay = Some(Duration::from_secs(3));
        for _ in 0..100 {
            match policy.decide(&log, &outcome, &mut rng) {
                Decision::Retry(delay) => assert_eq!(delay, Duration::from_secs(3)),
                other => panic!("{other:?}"),
            }
        }
        outcome.server_delay = Some(Duration::from_secs(61));
        assert_eq!(
            policy.decide(&log, &outcome, &mut rng),
            Decision::Stop(StopReason::ServerDelayTooLong(Duration::from_secs(61)))
        );
        let short = policy.clone().deadline(Some(Duration::from_secs(30)));
        outcome.server_delay = Some(Duration::from_secs(31));
        assert_eq!(
            short.decide(&log, &outcome, &mut rng),
            Decision::Stop(StopReason::ServerDelayTooLong(Duration::from_secs(31)))
        );
    }

    #[test]
    fn deadline_stops_a_wait_that_would_pass_it() {
        let policy = policy()
            .deadline(Some(Duration::from_secs(10)))
            .overloaded(ClassPolicy::new(5, backoff(4_000, 4_000, Jitter::None)));
        let mut log = AttemptLog::default();
        log.record(Class::Overloaded);
        let mut rng = policy.rng();
        let mut outcome = failed(Class::Overloaded);
        outcome.elapsed = Duration::from_secs(6);
        assert_eq!(
            policy.decide(&log, &outcome, &mut rng),
            Decision::Retry(Duration::from_secs(4))
        );
        outcome.elapsed = Duration::from_millis(6_001);
        assert_eq!(
            policy.decide(&log, &outcome, &mut rng),
            Decision::Stop(StopReason::DeadlineExceeded)
        );
    }

    #[test]
    fn server_verdict_and_body_and_budget_stop_retries() {
        let mut rng = policy().rng();
        let mut log = AttemptLog::default();
        log.record(Class::Overloaded);
        let mut outcome = failed(Class::Overloaded);
        outcome.verdict.retryable = false;
        assert_eq!(
            policy().decide(&log, &outcome, &mut rng),
            Decision::Stop(StopReason::NotRetryable)
        );
        let mut outcome = failed(Class::Overloaded);
        outcome.body_replayable = false;
        assert_eq!(
            policy().decide(&log, &outcome, &mut rng),
            Decision::Stop(StopReason::BodyNotReplayable)
        );
        let empty = RetryBudget::new(Duration::from_secs(10), 0, 0.0);
        let budgeted = policy().budget(Some(empty));
        assert_eq!(
            budgeted.decide(&log, &failed(Class::Overloaded), &mut rng),
            Decision::Stop(StopReason::BudgetExhausted)
        );
    }

    #[test]
    fn client_error_the_server_says_to_retry_uses_server_error_settings() {
        let policy = policy();
        let mut outcome = failed(Class::Client(ClientKind::InvalidRequest));
        outcome.verdict.retryable = true;
        let mut log = AttemptLog::default();
        let mut rng = policy.rng();
        log.record(outcome.verdict.class);
        assert!(matches!(
            policy.decide(&log, &outcome, &mut rng),
            Decision::Retry(_)
        ));
        log.record(outcome.verdict.class);
        log.record(outcome.verdict.class);
        assert_eq!(
            policy.decide(&log, &outcome, &mut rng),
            Decision::Stop(StopReason::AttemptsExhausted)
        );
    }

    #[test]
    fn seeded_calls_reproduce_and_differ_from_each_other() {
        let delays = |policy: &RetryPolicy| {
            let mut rng = policy.rng();
            let backoff = policy.overloaded.backoff;
            (0..4)
                .map(|n| backoff.delay(n, backoff.base(), &mut rng))
                .collect::<Vec<_>>()
        };
        let a = RetryPolicy::foreground().seed(5);
        let b = RetryPolicy::foreground().seed(5);
        let (a1, a2) = (delays(&a), delays(&a));
        assert_eq!((delays(&b), delays(&b)), (a1.clone(), a2.clone()));
        assert_ne!(a1, a2, "two calls draw different jitter");
    }
}
