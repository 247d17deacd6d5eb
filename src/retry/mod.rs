//! [`OverloadRetryLayer`]: the one retry loop a client of an overloaded API needs.
//!
//! Every outcome is [classified](crate::classify): a 529 is retried slowly
//! with full jitter, a 429 waits what the server says, a 500 or 504 gets a
//! few quick retries, a client error is never retried, and the server's
//! `x-should-retry` overrides all of that. Each class has its own attempts
//! and backoff ([`ClassPolicy`]); a shared [retry budget](crate::budget)
//! keeps retries a bounded fraction of traffic in a storm; a deadline bounds
//! the whole call; a server delay longer than the policy allows ends the call
//! at once with a typed error carrying the delay, so a job queue can
//! reschedule.
//!
//! The layer wraps any `Service<http::Request<B>, Response = http::Response<R>>`
//! (hyper-util's client, a reqwest adapter, a gateway). Request bodies are
//! replayed through [`ReplayableBody`]:
//! `Full<Bytes>` by reference count; any other body wrapped in a
//! [`ReplayBody`](crate::body::ReplayBody), which keeps what the first
//! attempt streams up to a cap, past which the request is sent once and the
//! [`RetryReport`] says why. A failed response's first bytes may be read to
//! classify it (a 500 that says "Overloaded"), and are handed back to the
//! caller in a [`PeekedBody`], so no byte is lost.
//!
//! By default the last upstream response is returned as it came, with a
//! [`RetryReport`] extension when it took more than one attempt or is a
//! failure (none on a first-try success); [`FinalFailure::Error`] turns a final failure
//! into the crate's [`Error`]. Errors of the inner service are
//! judged by a [`ClassifyError`] and always surface as [`Error`].
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_overload::retry::{OverloadRetryLayer, RetryPolicy, RetryReport};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! // An upstream that is overloaded twice, then answers.
//! let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
//! let upstream = service_fn(move |_request: Request<Full<Bytes>>| {
//!     let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
//!     async move {
//!         let status = if n < 2 { 529 } else { 200 };
//!         let response = Response::builder().status(status).body(Full::new(Bytes::new())).unwrap();
//!         Ok::<_, std::convert::Infallible>(response)
//!     }
//! });
//! let client = ServiceBuilder::new()
//!     .layer(OverloadRetryLayer::new(RetryPolicy::foreground().seed(1)))
//!     .service(upstream);
//!
//! let request = Request::post("https://api.anthropic.com/v1/messages")
//!     .body(Full::new(Bytes::from_static(br#"{"model":"claude-opus-4-6"}"#)))
//!     .unwrap();
//! let response = client.oneshot(request).await.unwrap();
//! assert_eq!(response.status(), 200);
//! let report = response.extensions().get::<RetryReport>().unwrap();
//! assert_eq!(report.attempts.len(), 3);
//! # }
//! ```

mod classify_error;
mod decide;
pub mod future;
mod layer;
mod policy;
mod report;
mod stream_guard;

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Buf;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

pub use self::classify_error::{ClassifyError, DefaultErrorClassifier};
pub use self::decide::{AttemptLog, Decision, Outcome, StopReason};
pub use self::layer::OverloadRetryLayer;
pub use self::policy::{ClassPolicy, FinalFailure, RetryPolicy};
pub use self::report::{Attempt, AttemptRecord, RetryReport};
pub use self::stream_guard::{Silence, StreamGuard};

use crate::body::{PeekedBody, ReplayableBody};
use crate::{BoxError, Error, ErrorKind};

/// Retries a service's failed calls as its [`RetryPolicy`] says; made by [`OverloadRetryLayer`].
///
/// The inner service must be `Clone`: each call takes the service that was
/// made ready and leaves a clone in its place (tower's clone-and-swap), so
/// readiness is respected for the first attempt and awaited for each retry.
#[derive(Debug, Clone)]
pub struct OverloadRetry<S> {
    inner: S,
    policy: Arc<RetryPolicy>,
}

// ===== impl OverloadRetry =====

impl<S> OverloadRetry<S> {
    /// Wraps `inner`.
    ///
    /// ```
    /// use tower_overload::retry::{OverloadRetry, RetryPolicy};
    /// let service = OverloadRetry::new(tower::service_fn(|r: http::Request<String>| async move {
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(r.into_body()))
    /// }), RetryPolicy::foreground());
    /// ```
    pub fn new(inner: S, policy: RetryPolicy) -> Self {
        Self::from_shared(inner, Arc::new(policy))
    }

    pub(crate) fn from_shared(inner: S, policy: Arc<RetryPolicy>) -> Self {
        Self { inner, policy }
    }

    /// The inner service.
    ///
    /// ```
    /// # use tower_overload::retry::{OverloadRetry, RetryPolicy};
    /// let service = OverloadRetry::new(7u8, RetryPolicy::foreground());
    /// assert_eq!(*service.get_ref(), 7);
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    ///
    /// ```
    /// # use tower_overload::retry::{OverloadRetry, RetryPolicy};
    /// let mut service = OverloadRetry::new(7u8, RetryPolicy::foreground());
    /// *service.get_mut() = 8;
    /// ```
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    ///
    /// ```
    /// # use tower_overload::retry::{OverloadRetry, RetryPolicy};
    /// assert_eq!(OverloadRetry::new(7u8, RetryPolicy::foreground()).into_inner(), 7);
    /// ```
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The policy.
    ///
    /// ```
    /// # use tower_overload::retry::{OverloadRetry, RetryPolicy};
    /// let service = OverloadRetry::new((), RetryPolicy::foreground().max_attempts(3));
    /// assert_eq!(service.policy().get_max_attempts(), 3);
    /// ```
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }
}

impl<S, B, R> Service<Request<B>> for OverloadRetry<S>
where
    S: Service<Request<B>, Response = Response<R>> + Clone,
    S::Error: Into<BoxError>,
    B: ReplayableBody,
    R: Body + Unpin,
    R::Data: Buf,
{
    type Response = Response<PeekedBody<R>>;
    type Error = Error;
    type Future = future::ResponseFuture<S, B, R>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|error| Error::new(ErrorKind::Transport).with_source(error))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        future::ResponseFuture::new(ready, request, Arc::clone(&self.policy))
    }
}
