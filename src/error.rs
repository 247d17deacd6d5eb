//! The crate's one error type: what happened, with everything a person needs to act on it.
//!
//! ```
//! use std::time::Duration;
//! use http::StatusCode;
//! use tower_overload::{Error, ErrorKind, Model, RequestId, classify::Class};
//!
//! let error = Error::new(ErrorKind::RetriesExhausted)
//!     .with_class(Class::Overloaded)
//!     .with_status(StatusCode::from_u16(529).unwrap())
//!     .with_model(Model::new("claude-opus-4-6"))
//!     .with_request_id(RequestId::new(http::HeaderValue::from_static("req_011CSHoE")).unwrap())
//!     .with_attempts(5)
//!     .with_elapsed(Duration::from_secs(62));
//! assert_eq!(
//!     error.to_string(),
//!     "Claude API overloaded (529) for claude-opus-4-6 after 5 attempts over 62 s; \
//!      request-id req_011CSHoE; the model is at capacity for everyone: retry later, \
//!      lower concurrency or fall back to another model (see status.claude.com)"
//! );
//! ```

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use http::StatusCode;

use crate::classify::{Class, ClientKind};
use crate::headers::RequestId;
use crate::model::Model;

/// A boxed error from an inner service or a body.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Why a call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Every allowed attempt failed with a retryable class.
    RetriesExhausted,
    /// The outcome is not retryable (a client error, or the server said
    /// `x-should-retry: false`).
    NotRetryable,
    /// The server asked to wait longer than the policy allows or than the
    /// deadline leaves; [`Error::server_delay`] says how long, so a job queue
    /// can reschedule.
    ServerDelayTooLong,
    /// The call's total time budget ran out.
    DeadlineExceeded,
    /// The shared retry budget refused another retry (a retry storm is being damped).
    BudgetExhausted,
    /// The request body could not be kept for another attempt (too large, or
    /// it failed while being read).
    BodyNotReplayable,
    /// The per-model queue was full; nothing was sent upstream.
    QueueFull,
    /// The wait for a per-model slot timed out; nothing was sent upstream.
    QueueTimeout,
    /// The inner service failed before any response (connection refused or
    /// reset, a client-side timeout); see [`Error::source`](StdError::source).
    Transport,
    /// No response head, or no body frame, arrived within the time allowed
    /// (the retry policy's attempt or idle timeout). Before anything reached
    /// the caller this is retried like a 504; a body that goes silent after
    /// it was handed on ends with this error instead of hanging.
    Timeout,
    /// The rate-limit pacing queue of the call's model was full; nothing was
    /// sent upstream. [`Error::bucket`] names the bucket the queue waits on
    /// and [`Error::wait`] how long it expected to wait.
    PacingQueueFull,
    /// The wait for rate-limit budget timed out; nothing was sent upstream.
    /// [`Error::bucket`] and [`Error::wait`] say which bucket was short and
    /// how much longer it expected to wait.
    PacingTimeout,
    /// The call alone is larger than a whole rate-limit bucket (say, a prompt
    /// of more input tokens than the per-minute limit): it can never be
    /// sent. [`Error::bucket`] names the bucket.
    PacingTooLarge,
}

/// The crate's error: a kind plus the context of the call.
///
/// Built with [`Error::new`] and the `with_*` methods; read with the
/// accessors. [`Display`](fmt::Display) gives one line a person can act on.
///
/// **One convention for the whole stack.** Every layer that can fail a call
/// on its own (retry, concurrency, fallback) returns this `Error`, so a
/// caller matches on [`Error::kind`] without downcasting, whichever layers it
/// stacked. An error of the service inside that is not already one of ours
/// is wrapped as [`ErrorKind::Transport`] with the original as its
/// [`source`](std::error::Error::source) (so `is_connect()` and friends stay
/// reachable, and the retry layer's classifier still walks to them); one
/// that is ours passes through unchanged ([`Error::from_inner`]), so an inner
/// layer's verdict (a full queue, say) reaches the caller as it was given.
/// The log layer adds no failure of its own and passes its inner service's
/// error through. The typed error was chosen over tower's `BoxError` because
/// it is what this crate adds: class, status, model, attempts and request
/// ids, in every failure, with no downcast to forget.
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    class: Option<Class>,
    status: Option<StatusCode>,
    request_id: Option<RequestId>,
    earlier_request_ids: Vec<RequestId>,
    model: Option<Model>,
    attempts: u32,
    elapsed: Duration,
    server_delay: Option<Duration>,
    bucket: Option<&'static str>,
    wait: Option<Duration>,
    source: Option<BoxError>,
    #[cfg(feature = "health")]
    verdict: Option<crate::health::Verdict>,
    /// Made by [`Error::from_inner`] around a foreign error, with no
    /// context of its own: a layer outside may unwrap it again.
    wrapper: bool,
}

impl Error {
    /// An error of `kind` with no context yet.
    ///
    /// ```
    /// use tower_overload::{Error, ErrorKind};
    /// let error = Error::new(ErrorKind::QueueFull);
    /// assert_eq!(error.kind(), ErrorKind::QueueFull);
    /// assert_eq!(error.attempts(), 0);
    /// ```
    pub fn new(kind: ErrorKind) -> Self {
        Self {
            inner: Box::new(Inner {
                kind,
                class: None,
                status: None,
                request_id: None,
                earlier_request_ids: Vec::new(),
                model: None,
                attempts: 0,
                elapsed: Duration::ZERO,
                server_delay: None,
                bucket: None,
                wait: None,
                source: None,
                #[cfg(feature = "health")]
                verdict: None,
                wrapper: false,
            }),
        }
    }

    /// Sets the class of the last outcome.
    ///
    /// ```
    /// # use tower_overload::{Error, ErrorKind, classify::Class};
    /// assert_eq!(Error::new(ErrorKind::NotRetryable).with_class(Class::Conflict).class(), Some(Class::Conflict));
    /// ```
    pub fn with_class(mut self, class: Class) -> Self {
        self.inner.class = Some(class);
        self
    }

    /// Sets the last upstream status.
    ///
    /// ```
    /// # use tower_overload::{Error, ErrorKind};
    /// # use http::StatusCode;
    /// assert_eq!(Error::new(ErrorKind::NotRetryable).with_status(StatusCode::NOT_FOUND).status(), Some(StatusCode::NOT_FOUND));
    /// ```
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.inner.status = Some(status);
        self
    }

    /// Sets the request id of the last attempt.
    ///
    /// ```
    /// # use tower_overload::{Error, ErrorKind, RequestId};
    /// let id = RequestId::new(http::HeaderValue::from_static("req_1")).unwrap();
    /// assert_eq!(Error::new(ErrorKind::NotRetryable).with_request_id(id).request_id().unwrap().as_str(), "req_1");
    /// ```
    pub fn with_request_id(mut self, request_id: RequestId) -> Self {
        self.inner.request_id = Some(request_id);
        self
    }

    /// Sets the request ids of the attempts before the last one, oldest
    /// first: what support needs to trace a whole retried call.
    ///
    /// ```
    /// # use tower_overload::{Error, ErrorKind, RequestId};
    /// let id = |s: &'static str| RequestId::new(http::HeaderValue::from_static(s)).unwrap();
    /// let error = Error::new(ErrorKind::DeadlineExceeded)
    ///     .with_earlier_request_ids(vec![id("req_1"), id("req_2")])
    ///     .with_request_id(id("req_3"));
    /// assert_eq!(error.earlier_request_ids().len(), 2);
    /// assert!(error.to_string().contains("request-id req_3 (earlier: req_1, req_2)"));
    /// ```
    pub fn with_earlier_request_ids(mut self, ids: Vec<RequestId>) -> Self {
        self.inner.earlier_request_ids = ids;
        self
    }

    /// The request ids of the attempts before the last one, oldest first.
    ///
    /// ```
    /// # use tower_overload::{Error, ErrorKind};
    /// assert!(Error::new(ErrorKind::QueueFull).earlier_request_ids().is_empty());
    /// ```
    pub fn earlier_request_ids(&self) -> &[RequestId] {
        &self.inner.earlier_request_ids
    }

    /// Sets the model the call was for.
    ///
    /// ```
    /// # use tower_overload::{Error, ErrorKind, Model};
    /// assert_eq!(Error::new(ErrorKind::QueueFull).with_model(Model::new("m")).model().unwrap().as_str(), "m");
    /// ```
    pub fn with_model(mut self, model: Model) -> Self {
        self.inner.model = Some(model);
        self
    }

    /// Sets how many attempts were sent upstream.
    ///
    /// ```
    /// # use tower_overload::{Error, ErrorKind};
    /// assert_eq!(Error::new(ErrorKind::RetriesExhausted).with_attempts(3).attempts(), 3);
    /// ```
    pub fn with_attempts(mut self, attempts: u32) -> Self {
        self.inner.attempts = attempts;
        self
    }

    /// Sets the time from the call's start to the failure.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::{Error, ErrorKind};
    /// assert_eq!(Error::new(ErrorKind::DeadlineExceeded).with_elapsed(Duration::from_secs(30)).elapsed(), Duration::from_secs(30));
    /// ```
    pub fn with_elapsed(mut self, elapsed: Duration) -> Self {
        self.inner.elapsed = elapsed;
        self
    }

    /// Sets the delay the server asked for.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::{Error, ErrorKind};
    /// let error = Error::new(ErrorKind::ServerDelayTooLong).with_server_delay(Duration::from_secs(61));
    /// assert_eq!(error.server_delay(), Some(Duration::from_secs(61)));
    /// ```
    pub fn with_server_delay(mut self, delay: Duration) -> Self {
        self.inner.server_delay = Some(delay);
        self
    }

    /// Sets the rate-limit bucket (`"requests"`, `"input-tokens"` or
    /// `"output-tokens"`) a paced call was refused or timed out on, and the
    /// wait it still expected for that bucket.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::{Error, ErrorKind};
    /// let error = Error::new(ErrorKind::PacingTimeout).with_wait("input-tokens", Duration::from_secs(12));
    /// assert_eq!(error.bucket(), Some("input-tokens"));
    /// assert_eq!(error.wait(), Some(Duration::from_secs(12)));
    /// assert!(error.to_string().contains("the input-tokens bucket expected 12 s more"));
    /// ```
    pub fn with_wait(mut self, bucket: &'static str, wait: Duration) -> Self {
        self.inner.bucket = Some(bucket);
        self.inner.wait = Some(wait);
        self
    }

    /// Sets the rate-limit bucket a paced call was refused on, with no wait
    /// (a call larger than the whole bucket never fits).
    ///
    /// ```
    /// # use tower_overload::{Error, ErrorKind};
    /// let error = Error::new(ErrorKind::PacingTooLarge).with_bucket("output-tokens");
    /// assert_eq!((error.bucket(), error.wait()), (Some("output-tokens"), None));
    /// ```
    pub fn with_bucket(mut self, bucket: &'static str) -> Self {
        self.inner.bucket = Some(bucket);
        self
    }

    /// The rate-limit bucket a paced call was refused or timed out on.
    ///
    /// ```
    /// # use tower_overload::{Error, ErrorKind};
    /// assert_eq!(Error::new(ErrorKind::QueueFull).bucket(), None);
    /// ```
    pub fn bucket(&self) -> Option<&'static str> {
        self.inner.bucket
    }

    /// How much longer a paced call expected to wait for its bucket when it
    /// was refused or timed out: when to try again.
    ///
    /// ```
    /// # use tower_overload::{Error, ErrorKind};
    /// assert_eq!(Error::new(ErrorKind::QueueFull).wait(), None);
    /// ```
    pub fn wait(&self) -> Option<Duration> {
        self.inner.wait
    }

    /// Sets what the [health monitor](crate::health) says is behind the
    /// failure; the message then says it too. An
    /// [`Unknown`](crate::health::Verdict::Unknown) verdict is not kept.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use tower_overload::{Error, ErrorKind, classify::Class, health::Verdict};
    ///
    /// let at = SystemTime::UNIX_EPOCH + Duration::from_secs(12 * 3600 + 5 * 60 + 10);
    /// let error = Error::new(ErrorKind::RetriesExhausted)
    ///     .with_class(Class::Overloaded)
    ///     .with_verdict(Verdict::LocalPressure { probe_at: at });
    /// assert!(error.verdict().is_some());
    /// assert_eq!(
    ///     error.to_string(),
    ///     "Claude API overloaded; a minimal probe to the same model succeeded at 12:05:10Z: \
    ///      this looks like local pressure, lower your concurrency"
    /// );
    /// ```
    #[cfg(feature = "health")]
    #[cfg_attr(docsrs, doc(cfg(feature = "health")))]
    pub fn with_verdict(mut self, verdict: crate::health::Verdict) -> Self {
        self.inner.verdict = (!verdict.is_unknown()).then_some(verdict);
        if self.inner.verdict.is_some() {
            // Context was added: a layer outside must not unwrap it away.
            self.inner.wrapper = false;
        }
        self
    }

    /// What the [health monitor](crate::health) said was behind the
    /// failure, when one was set and knew.
    ///
    /// ```
    /// # use tower_overload::{Error, ErrorKind};
    /// assert!(Error::new(ErrorKind::QueueFull).verdict().is_none());
    /// ```
    #[cfg(feature = "health")]
    #[cfg_attr(docsrs, doc(cfg(feature = "health")))]
    pub fn verdict(&self) -> Option<&crate::health::Verdict> {
        self.inner.verdict.as_ref()
    }

    /// Sets the underlying error.
    ///
    /// ```
    /// # use std::error::Error as _;
    /// # use tower_overload::{Error, ErrorKind};
    /// let io = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
    /// let error = Error::new(ErrorKind::Transport).with_source(io);
    /// assert!(error.source().is_some());
    /// ```
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.inner.source = Some(source.into());
        self
    }

    /// The error of a service inside a layer: itself when it is already
    /// this crate's error (boxed or not), otherwise a
    /// [`Transport`](ErrorKind::Transport) error with it as the source.
    ///
    /// ```
    /// # use std::error::Error as _;
    /// # use tower_overload::{BoxError, Error, ErrorKind};
    /// let ours: BoxError = Box::new(Error::new(ErrorKind::QueueFull));
    /// assert_eq!(Error::from_inner(ours).kind(), ErrorKind::QueueFull);
    /// let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
    /// let wrapped = Error::from_inner(reset);
    /// assert_eq!(wrapped.kind(), ErrorKind::Transport);
    /// assert!(wrapped.source().unwrap().is::<std::io::Error>());
    /// ```
    pub fn from_inner(error: impl Into<BoxError>) -> Self {
        match error.into().downcast::<Error>() {
            Ok(ours) => *ours,
            Err(other) => {
                let mut error = Error::new(ErrorKind::Transport).with_source(other);
                error.inner.wrapper = true;
                error
            }
        }
    }

    /// The foreign error inside, when this error only wraps one
    /// ([`from_inner`](Self::from_inner), nothing added since); else itself.
    /// How a layer outside (the retry layer's own error, the
    /// reqwest-middleware adapter) sees through a layer inside.
    #[cfg_attr(not(feature = "retry"), allow(dead_code))]
    pub(crate) fn into_foreign(mut self) -> Result<BoxError, Error> {
        match (self.inner.wrapper, self.inner.source.take()) {
            (true, Some(source)) => Ok(source),
            (_, source) => {
                self.inner.source = source;
                Err(self)
            }
        }
    }

    /// Why the call failed.
    ///
    /// ```
    /// # use tower_overload::{Error, ErrorKind};
    /// assert_eq!(Error::new(ErrorKind::QueueTimeout).kind(), ErrorKind::QueueTimeout);
    /// ```
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The class of the last outcome, if there was one.
    ///
    /// ```
    /// # use tower_overload::{Error, ErrorKind};
    /// assert_eq!(Error::new(ErrorKind::QueueFull).class(), None);
    /// ```
    pub fn class(&self) -> Option<Class> {
        self.inner.class
    }

    /// The last upstream status, if any response came.
    ///
    /// ```
    /// # use tower_overload::{Error, ErrorKind};
    /// assert_eq!(Error::new(ErrorKind::Transport).status(), None);
    /// ```
    pub fn status(&self) -> Option<StatusCode> {
        self.inner.status
    }

    /// The API's request id for the last attempt: quote it to support.
    ///
    /// ```
    /// # use tower_overload::{Error, ErrorKind};
    /// assert!(Error::new(ErrorKind::Transport).request_id().is_none());
    /// ```
    pub fn request_id(&self) -> Option<&RequestId> {
        self.inner.request_id.as_ref()
    }

    /// The model the call was for, if known.
    ///
    /// ```
    /// # use tower_overload::{Error, ErrorKind};
    /// assert!(Error::new(ErrorKind::Transport).model().is_none());
    /// ```
    pub fn model(&self) -> Option<&Model> {
        self.inner.model.as_ref()
    }

    /// How many attempts were sent upstream.
    ///
    /// ```
    /// # use tower_overload::{Error, ErrorKind};
    /// assert_eq!(Error::new(ErrorKind::QueueFull).attempts(), 0);
    /// ```
    pub fn attempts(&self) -> u32 {
        self.inner.attempts
    }

    /// Time from the call's start to the failure.
    ///
    /// ```
    /// # use tower_overload::{Error, ErrorKind};
    /// assert_eq!(Error::new(ErrorKind::QueueFull).elapsed(), std::time::Duration::ZERO);
    /// ```
    pub fn elapsed(&self) -> Duration {
        self.inner.elapsed
    }

    /// The delay the server asked for, if it asked.
    ///
    /// ```
    /// # use tower_overload::{Error, ErrorKind};
    /// assert_eq!(Error::new(ErrorKind::QueueFull).server_delay(), None);
    /// ```
    pub fn server_delay(&self) -> Option<Duration> {
        self.inner.server_delay
    }

    /// Whether trying the same call again later could succeed.
    ///
    /// ```
    /// # use tower_overload::{Error, ErrorKind, classify::{Class, ClientKind}};
    /// assert!(Error::new(ErrorKind::RetriesExhausted).with_class(Class::Overloaded).is_transient());
    /// assert!(!Error::new(ErrorKind::NotRetryable).with_class(Class::Client(ClientKind::Authentication)).is_transient());
    /// ```
    pub fn is_transient(&self) -> bool {
        match self.inner.kind {
            ErrorKind::NotRetryable | ErrorKind::PacingTooLarge => false,
            ErrorKind::BodyNotReplayable => {
                self.inner.class.is_some_and(Class::is_retryable_by_default)
            }
            _ => self.inner.class.is_none_or(Class::is_retryable_by_default),
        }
    }

    fn headline(&self) -> &'static str {
        match (self.inner.kind, self.inner.class) {
            (ErrorKind::QueueFull, _) => "per-model queue full",
            (ErrorKind::QueueTimeout, _) => "timed out waiting for a per-model slot",
            (ErrorKind::PacingQueueFull, _) => "rate-limit pacing queue full",
            (ErrorKind::PacingTimeout, _) => "timed out waiting for rate-limit budget",
            (ErrorKind::PacingTooLarge, _) => "call larger than a whole rate-limit bucket",
            (ErrorKind::DeadlineExceeded, _) => "deadline exceeded",
            (ErrorKind::BudgetExhausted, _) => "retry budget exhausted",
            (ErrorKind::BodyNotReplayable, None) => "request body cannot be replayed",
            (ErrorKind::ServerDelayTooLong, _) => "server asked to wait too long",
            (ErrorKind::Timeout, None) => "timed out waiting for the upstream",
            (_, Some(class)) => class_headline(class),
            (ErrorKind::Transport, None) => "transport error",
            (_, None) => "request failed",
        }
    }

    fn advice(&self) -> Option<&'static str> {
        #[cfg(feature = "health")]
        if let Some(verdict) = &self.inner.verdict
            && self.inner.class == Some(Class::Overloaded)
        {
            // The verdict says which of the generic advice's remedies applies.
            return match verdict {
                crate::health::Verdict::LocalPressure { .. } => None,
                other => other.advice(),
            };
        }
        Some(match (self.inner.kind, self.inner.class) {
            (ErrorKind::QueueFull | ErrorKind::QueueTimeout, _) => {
                "nothing was sent; shed the call or queue it durably"
            }
            (ErrorKind::PacingQueueFull | ErrorKind::PacingTimeout, _) => {
                "nothing was sent; shed the call, retry it after the wait or raise the rate limit"
            }
            (ErrorKind::PacingTooLarge, _) => {
                "nothing was sent; shorten the prompt, lower max_tokens or raise the rate limit: it can never fit"
            }
            (ErrorKind::ServerDelayTooLong, _) => "reschedule the call after the server's delay",
            (ErrorKind::BudgetExhausted, _) => {
                "most recent calls are failing; retries are paused to avoid a retry storm"
            }
            (ErrorKind::BodyNotReplayable, _) => {
                "the body was streamed or too large to keep, so it was sent once; buffer it to allow retries"
            }
            (_, Some(Class::Overloaded)) => {
                "the model is at capacity for everyone: retry later, lower concurrency or fall back to another model (see status.claude.com)"
            }
            (_, Some(Class::RateLimited)) => {
                "your organisation's rate limit: wait for the reset or raise the limit"
            }
            (_, Some(Class::Client(ClientKind::SpendLimit))) => {
                "the spend limit is reached: raise it in the console; retrying will not help"
            }
            (_, Some(Class::Client(ClientKind::Authentication))) => "check the API key",
            (_, Some(Class::Client(ClientKind::Billing))) => "check billing in the console",
            (_, Some(Class::Client(ClientKind::Permission))) => {
                "the API key lacks permission for this resource"
            }
            (_, Some(Class::Client(ClientKind::RequestTooLarge))) => {
                "the request exceeds the API's size limit"
            }
            (_, Some(Class::Client(_))) => "fix the request; retrying will not help",
            _ => return None,
        })
    }
}

fn class_headline(class: Class) -> &'static str {
    match class {
        Class::Success => "unexpected success",
        Class::Overloaded => "Claude API overloaded",
        Class::RateLimited => "rate limited",
        Class::ServerError => "API server error",
        Class::Timeout => "API timeout",
        Class::Conflict => "API conflict",
        Class::Transport => "transport error",
        Class::Client(ClientKind::InvalidRequest) => "invalid request",
        Class::Client(ClientKind::Authentication) => "authentication failed",
        Class::Client(ClientKind::Billing) => "billing error",
        Class::Client(ClientKind::Permission) => "permission denied",
        Class::Client(ClientKind::NotFound) => "not found",
        Class::Client(ClientKind::RequestTooLarge) => "request too large",
        Class::Client(ClientKind::SpendLimit) => "spend limit reached",
        Class::Client(ClientKind::Other) => "client error",
    }
}

/// `62 s`, `1.5 s`, `850 ms`: short, and exact enough for a person.
struct HumanDuration(Duration);

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let millis = self.0.as_millis();
        if millis < 1000 {
            write!(f, "{millis} ms")
        } else if millis < 10_000 && !millis.is_multiple_of(1000) {
            write!(f, "{:.1} s", self.0.as_secs_f64())
        } else {
            write!(f, "{} s", self.0.as_secs())
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.inner;
        f.write_str(self.headline())?;
        if let Some(status) = inner.status {
            write!(f, " ({})", status.as_u16())?;
        }
        if let Some(model) = &inner.model {
            write!(f, " for {model}")?;
        }
        match inner.attempts {
            0 => {}
            1 => write!(f, " after 1 attempt")?,
            n => write!(f, " after {n} attempts")?,
        }
        if !inner.elapsed.is_zero() {
            let joiner = if inner.attempts == 0 {
                " after"
            } else {
                " over"
            };
            write!(f, "{joiner} {}", HumanDuration(inner.elapsed))?;
        }
        if let Some(delay) = inner.server_delay {
            write!(f, "; server asked to wait {}", HumanDuration(delay))?;
        }
        match (inner.bucket, inner.wait) {
            (Some(bucket), Some(wait)) => write!(
                f,
                "; the {bucket} bucket expected {} more",
                HumanDuration(wait)
            )?,
            (Some(bucket), None) => write!(f, "; exceeds the whole {bucket} bucket")?,
            _ => {}
        }
        #[cfg(feature = "health")]
        if let Some(verdict) = &inner.verdict {
            write!(f, "; {verdict}")?;
        }
        if let Some(id) = &inner.request_id {
            write!(f, "; request-id {id}")?;
        }
        if let Some((first, rest)) = inner.earlier_request_ids.split_first() {
            let lead = if inner.request_id.is_some() {
                " (earlier: "
            } else {
                "; request-ids of earlier attempts: "
            };
            write!(f, "{lead}{first}")?;
            for id in rest {
                write!(f, ", {id}")?;
            }
            if inner.request_id.is_some() {
                f.write_str(")")?;
            }
        }
        if let Some(source) = &inner.source {
            write!(f, ": {source}")?;
        }
        if let Some(advice) = self.advice() {
            write!(f, "; {advice}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.inner;
        let mut debug = f.debug_struct("Error");
        debug.field("kind", &inner.kind);
        if let Some(class) = inner.class {
            debug.field("class", &class);
        }
        if let Some(status) = inner.status {
            debug.field("status", &status);
        }
        if let Some(model) = &inner.model {
            debug.field("model", model);
        }
        if let Some(id) = &inner.request_id {
            debug.field("request_id", id);
        }
        if !inner.earlier_request_ids.is_empty() {
            debug.field("earlier_request_ids", &inner.earlier_request_ids);
        }
        debug
            .field("attempts", &inner.attempts)
            .field("elapsed", &inner.elapsed);
        if let Some(delay) = inner.server_delay {
            debug.field("server_delay", &delay);
        }
        if let Some(bucket) = inner.bucket {
            debug.field("bucket", &bucket);
        }
        if let Some(wait) = inner.wait {
            debug.field("wait", &wait);
        }
        if let Some(source) = &inner.source {
            debug.field("source", source);
        }
        #[cfg(feature = "health")]
        if let Some(verdict) = &inner.verdict {
            debug.field("verdict", verdict);
        }
        debug.finish()
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|source| source as &(dyn StdError + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(value: &'static str) -> RequestId {
        RequestId::new(http::HeaderValue::from_static(value)).unwrap()
    }

    #[test]
    fn messages_a_person_can_act_on() {
        let rate_limited = Error::new(ErrorKind::ServerDelayTooLong)
            .with_class(Class::RateLimited)
            .with_status(StatusCode::TOO_MANY_REQUESTS)
            .with_attempts(1)
            .with_elapsed(Duration::from_millis(120))
            .with_server_delay(Duration::from_secs(61))
            .with_request_id(id("req_9"));
        assert_eq!(
            rate_limited.to_string(),
            "server asked to wait too long (429) after 1 attempt over 120 ms; server asked to wait 61 s; \
             request-id req_9; reschedule the call after the server's delay"
        );

        let queue = Error::new(ErrorKind::QueueTimeout)
            .with_model(Model::new("claude-opus-4-6"))
            .with_elapsed(Duration::from_millis(2500));
        assert_eq!(
            queue.to_string(),
            "timed out waiting for a per-model slot for claude-opus-4-6 after 2.5 s; \
             nothing was sent; shed the call or queue it durably"
        );

        let auth = Error::new(ErrorKind::NotRetryable)
            .with_class(Class::Client(ClientKind::Authentication))
            .with_status(StatusCode::UNAUTHORIZED)
            .with_attempts(1)
            .with_request_id(id("req_2"));
        assert_eq!(
            auth.to_string(),
            "authentication failed (401) after 1 attempt; request-id req_2; check the API key"
        );

        let transport = Error::new(ErrorKind::Transport)
            .with_source(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(transport.to_string(), "transport error: connection refused");
        assert!(transport.is_transient());
        assert!(StdError::source(&transport).is_some());
    }

    #[test]
    fn pacing_errors_name_the_bucket_and_the_wait() {
        let timeout = Error::new(ErrorKind::PacingTimeout)
            .with_model(Model::new("claude-sonnet-4-6"))
            .with_elapsed(Duration::from_secs(60))
            .with_wait("output-tokens", Duration::from_millis(1500));
        assert_eq!(
            timeout.to_string(),
            "timed out waiting for rate-limit budget for claude-sonnet-4-6 after 60 s; \
             the output-tokens bucket expected 1.5 s more; nothing was sent; shed the call, \
             retry it after the wait or raise the rate limit"
        );
        assert!(timeout.is_transient());
        let too_large = Error::new(ErrorKind::PacingTooLarge).with_bucket("input-tokens");
        assert_eq!(
            too_large.to_string(),
            "call larger than a whole rate-limit bucket; exceeds the whole input-tokens bucket; \
             nothing was sent; shorten the prompt, lower max_tokens or raise the rate limit: it can never fit"
        );
        assert!(!too_large.is_transient());
    }

    #[test]
    fn error_is_small_and_thread_safe() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<Error>();
        assert_eq!(std::mem::size_of::<Error>(), std::mem::size_of::<usize>());
    }

    #[test]
    fn debug_shows_context_without_noise() {
        let error = Error::new(ErrorKind::QueueFull).with_model(Model::new("m"));
        assert_eq!(
            format!("{error:?}"),
            r#"Error { kind: QueueFull, model: Model("m"), attempts: 0, elapsed: 0ns }"#
        );
    }
}
