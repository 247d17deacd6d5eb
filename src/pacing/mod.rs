//! [`RateLimitPacingLayer`]: stay under the organisation's RPM, input-TPM and
//! output-TPM limits by waiting for budget, instead of collecting 429s.
//!
//! The API limits each organisation per model class in requests (RPM),
//! input tokens (ITPM) and output tokens (OTPM) per minute, each a token
//! bucket that refills continuously. A client that only reacts to 429s
//! learns the limit by hitting it, every caller on its own. This layer keeps
//! a copy of the three buckets per model ([`TokenBucket`](crate::bucket::TokenBucket))
//! and sends a call only when it fits.
//!
//! - **Before sending**, a call reserves 1 request, its input tokens
//!   (estimated from the body's size with a bytes-per-token ratio
//!   calibrated per model on the usage the responses report, or counted by
//!   your [`count_tokens`](RateLimitPacingLayer::count_tokens) hook) and
//!   its `max_tokens` (which the API itself reserves at the start). When
//!   every bucket has room and nobody waits, it goes straight on.
//! - **Waiting.** Otherwise it waits in its key's bounded first-come,
//!   first-served queue: only the head computes when its buckets will have
//!   refilled and sleeps until then, the others sleep until the head leaves.
//!   No task is spawned and nothing polls. A full queue fails at once with
//!   [`ErrorKind::PacingQueueFull`](crate::ErrorKind::PacingQueueFull), a
//!   wait past `queue_timeout` with
//!   [`ErrorKind::PacingTimeout`](crate::ErrorKind::PacingTimeout), a call
//!   larger than a whole bucket with
//!   [`ErrorKind::PacingTooLarge`](crate::ErrorKind::PacingTooLarge) (an
//!   estimate that says so is looked at again with its base64 media counted
//!   per item, [`estimate::without_media`](crate::estimate::without_media),
//!   since a 200 KB image is a few thousand tokens, not 60,000); each
//!   names the bucket ([`Error::bucket`](crate::Error::bucket)) and the
//!   expected wait ([`Error::wait`](crate::Error::wait)); nothing is sent.
//!   Dropping a waiting call leaves the queue.
//! - **The headers are the truth.** Every response's
//!   `anthropic-ratelimit-{requests,input-tokens,output-tokens}-*` windows
//!   correct the buckets (creating them the first time a limit is seen):
//!   other clients of the organisation spend from the same budget. A 429
//!   with `retry-after` (or an exhausted window with its reset) pauses all
//!   the key's buckets until then (the key itself when it has none yet), so
//!   every clone waits instead of each collecting its own 429.
//! - **Reconciliation.** The response body ([`PacedBody`]) reads the usage
//!   the response reports (the JSON `usage`, or a stream's `message_start`
//!   and `message_delta`) and, at its end, gives the unused input and output
//!   tokens back (or charges what was used beyond the reservation). Cache
//!   reads are not charged, as the API does not count them toward ITPM. A
//!   call that failed before a response, or got an error response, gives
//!   its token reservations back; a body dropped before its usage arrived
//!   keeps them (the safe side).
//! - **Bounded keys**, as in the concurrency layer: configured models and
//!   groups ([`share`](RateLimitPacingLayer::share)) keep their own
//!   buckets; at most `max_keys` (64) names are learned; the rest share one
//!   `<other>` key.
//! - **Observability.** [`RateLimitPacingLayer::snapshot`] gives per key
//!   each bucket's fill, the tokens reserved by calls in flight, the queue
//!   length, the waits and the estimate's error; a call that waited longer
//!   than a second emits an `info` tracing event.
//!
//! ## Where it goes in a stack
//!
//! Between the retry layer and the concurrency layer (outside to inside:
//! log, fallback, retry, **pacing**, concurrency, client). Inside retry, so
//! every attempt is paced and a retry after a 429 waits for the budget the
//! pause left; outside concurrency, so a call waiting for budget holds no
//! concurrency permit (calls that could go are not blocked behind it) and
//! spends no retry (a wait is not a failure). `OverloadStack` does not add
//! it yet; stack it yourself as below.
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_overload::pacing::{PacingLimits, RateLimitPacingLayer};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let pacing = RateLimitPacingLayer::new().limits_for(
//!     "claude-sonnet-4-6",
//!     PacingLimits {
//!         requests_per_minute: Some(50),
//!         input_tokens_per_minute: Some(30_000),
//!         output_tokens_per_minute: Some(8_000),
//!     },
//! );
//! let upstream = service_fn(|_: Request<Full<Bytes>>| async {
//!     let body = r#"{"type":"message","content":[],"usage":{"input_tokens":12,"output_tokens":30}}"#;
//!     Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(body.as_bytes()))))
//! });
//! let client = ServiceBuilder::new().layer(pacing.clone()).service(upstream);
//! let body = r#"{"model":"claude-sonnet-4-6","max_tokens":1024,"messages":[]}"#;
//! let response = client.oneshot(Request::new(Full::new(Bytes::from_static(body.as_bytes())))).await.unwrap();
//! assert_eq!(pacing.snapshot()[0].reserved_output_tokens, 1024, "reserved until the body ends");
//! drop(response); // the usage was not read: the reservation is kept
//! # }
//! ```
//!
//! In a full stack (the retry layer outside, concurrency inside):
//!
//! ```
//! # #[cfg(all(feature = "retry", feature = "concurrency"))]
//! # fn main() {
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tower::{ServiceBuilder, service_fn};
//! use tower_overload::{ConcurrencyPerModelLayer, OverloadRetryLayer, RateLimitPacingLayer, RetryPolicy};
//!
//! let upstream = service_fn(|_: Request<Full<Bytes>>| async {
//!     Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::new())))
//! });
//! let client = ServiceBuilder::new()
//!     .layer(OverloadRetryLayer::new(RetryPolicy::foreground()))
//!     .layer(RateLimitPacingLayer::new())
//!     .layer(ConcurrencyPerModelLayer::new(16))
//!     .service(upstream);
//! # let _ = client;
//! # }
//! # #[cfg(not(all(feature = "retry", feature = "concurrency")))]
//! # fn main() {}
//! ```

mod body;
pub mod future;
mod layer;
mod state;

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

pub use self::body::PacedBody;
pub use self::layer::RateLimitPacingLayer;

use self::state::Pacer;
use crate::body::ReplayableBody;
use crate::model::Model;
use crate::{BoxError, Error};

/// An organisation's per-minute limits for one model (or group of models);
/// `None` for a limit not known up front (learned from the headers, or not
/// paced).
///
/// ```
/// use tower_overload::pacing::PacingLimits;
///
/// let tier_1_sonnet = PacingLimits {
///     requests_per_minute: Some(50),
///     input_tokens_per_minute: Some(30_000),
///     output_tokens_per_minute: Some(8_000),
/// };
/// assert_eq!(PacingLimits::default().requests_per_minute, None);
/// # let _ = tier_1_sonnet;
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacingLimits {
    /// Requests per minute (RPM).
    pub requests_per_minute: Option<u64>,
    /// Input tokens per minute (ITPM); cache reads do not count.
    pub input_tokens_per_minute: Option<u64>,
    /// Output tokens per minute (OTPM).
    pub output_tokens_per_minute: Option<u64>,
}

/// One bucket's size and fill.
///
/// ```
/// use tower_overload::pacing::BucketSnapshot;
/// let bucket = BucketSnapshot { capacity: 50, available: 12.5 };
/// assert!(bucket.available < bucket.capacity as f64);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketSnapshot {
    /// What the bucket holds when full: the per-minute limit.
    pub capacity: u64,
    /// What it holds now (negative while a debt is paid, 0 while paused).
    pub available: f64,
}

/// One key's state: its buckets, queue and counters.
///
/// ```
/// # use tower_overload::pacing::RateLimitPacingLayer;
/// for key in RateLimitPacingLayer::new().snapshot() {
///     println!("{}: {} queued, {} waits", key.key, key.queued, key.waits);
/// }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct PacingSnapshot {
    /// The model, group, or `<other>`.
    pub key: Model,
    /// The requests-per-minute bucket, if its limit is known.
    pub requests: Option<BucketSnapshot>,
    /// The input-tokens-per-minute bucket, if its limit is known.
    pub input_tokens: Option<BucketSnapshot>,
    /// The output-tokens-per-minute bucket, if its limit is known.
    pub output_tokens: Option<BucketSnapshot>,
    /// Input tokens reserved by calls not settled yet.
    pub reserved_input_tokens: u64,
    /// Output tokens (`max_tokens`) reserved by calls not settled yet.
    pub reserved_output_tokens: u64,
    /// Calls waiting now.
    pub queued: usize,
    /// Calls sent upstream.
    pub requests_sent: u64,
    /// Calls that waited, then went on.
    pub waits: u64,
    /// Their total wait.
    pub waited: Duration,
    /// The longest of their waits.
    pub longest_wait: Duration,
    /// Calls refused because the queue was full.
    pub rejected: u64,
    /// Calls whose wait timed out.
    pub timed_out: u64,
    /// Calls refused as larger than a whole bucket.
    pub too_large: u64,
    /// The estimator's bytes-per-token ratio.
    pub bytes_per_token: f64,
    /// Sum of the estimated input tokens of settled calls.
    pub estimated_input_tokens: u64,
    /// Sum of the input tokens those calls reported (cache reads included).
    pub reported_input_tokens: u64,
    /// (estimated - reported) / reported of the last settled call.
    pub last_estimate_error: Option<f64>,
}

/// Paces calls under per-model rate limits; made by [`RateLimitPacingLayer`].
#[derive(Debug, Clone)]
pub struct RateLimitPacing<S> {
    inner: S,
    pacer: Arc<Pacer>,
}

impl<S> RateLimitPacing<S> {
    pub(crate) fn from_parts(inner: S, pacer: Arc<Pacer>) -> Self {
        Self { inner, pacer }
    }

    /// Every key's buckets, queue and counters.
    ///
    /// ```
    /// # use tower_overload::pacing::RateLimitPacingLayer;
    /// # use tower::Layer;
    /// let service = RateLimitPacingLayer::new().layer(());
    /// assert!(service.snapshot().is_empty(), "keys appear on first use");
    /// ```
    pub fn snapshot(&self) -> Vec<PacingSnapshot> {
        self.pacer.snapshot()
    }

    /// The inner service.
    ///
    /// ```
    /// # use tower_overload::pacing::RateLimitPacingLayer;
    /// # use tower::Layer;
    /// assert_eq!(*RateLimitPacingLayer::new().layer(7u8).get_ref(), 7);
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    ///
    /// ```
    /// # use tower_overload::pacing::RateLimitPacingLayer;
    /// # use tower::Layer;
    /// let mut service = RateLimitPacingLayer::new().layer(7u8);
    /// *service.get_mut() = 8;
    /// ```
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    ///
    /// ```
    /// # use tower_overload::pacing::RateLimitPacingLayer;
    /// # use tower::Layer;
    /// assert_eq!(RateLimitPacingLayer::new().layer(7u8).into_inner(), 7);
    /// ```
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, R> Service<Request<B>> for RateLimitPacing<S>
where
    S: Service<Request<B>, Response = Response<R>> + Clone,
    S::Error: Into<BoxError>,
    B: ReplayableBody,
    R: Body,
{
    type Response = Response<PacedBody<R>>;
    type Error = Error;
    type Future = future::ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Error::from_inner)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        future::ResponseFuture::new(&mut self.inner, request, Arc::clone(&self.pacer))
    }
}
