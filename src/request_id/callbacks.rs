//! What the log layer records, in tower-http's style: small callback types
//! with sensible defaults, swappable one at a time.

use std::fmt;
use std::time::Duration;

use http::{Method, StatusCode, Uri};
use tracing::field::Empty;
use tracing::{Level, Span};

use crate::classify::Class;
use crate::headers::RequestId;
use crate::model::Model;

/// What the span of a call is made from (no headers, no body: nothing secret).
#[derive(Debug, Clone, Copy)]
pub struct CallInfo<'a> {
    /// The method.
    pub method: &'a Method,
    /// The URI; only its path is recorded by default (a query may hold a key).
    pub uri: &'a Uri,
    /// The model, when known.
    pub model: Option<&'a Model>,
    /// The client-side correlation id sent with the call.
    pub correlation_id: &'a str,
}

/// Makes the span of a call.
pub trait MakeSpan {
    /// The span for `call`.
    fn make_span(&self, call: &CallInfo<'_>) -> Span;
}

/// An INFO span `llm_call` with OpenTelemetry's GenAI and HTTP attribute
/// names: `gen_ai.operation.name` (`chat`), `gen_ai.provider.name`
/// (`anthropic`), `gen_ai.request.model`, `server.address`,
/// `http.request.method`, `url.path` and `correlation_id`; filled when the
/// call ends: `gen_ai.response.model` (the model that answered),
/// `http.response.status_code`, `error.type` (the failure's class) and
/// `tower_overload.time_to_response_head_ms`; with the `metrics` feature,
/// when the body is read: `tower_overload.time_to_first_chunk_ms` (a
/// stream's first content event), `gen_ai.usage.input_tokens` and
/// `gen_ai.usage.output_tokens`.
///
/// ```
/// use tower_overload::request_id::{CallInfo, DefaultMakeSpan, MakeSpan};
/// let uri: http::Uri = "https://api.anthropic.com/v1/messages".parse().unwrap();
/// let call = CallInfo { method: &http::Method::POST, uri: &uri, model: None, correlation_id: "cli_1" };
/// let _span = DefaultMakeSpan.make_span(&call);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultMakeSpan;

impl MakeSpan for DefaultMakeSpan {
    fn make_span(&self, call: &CallInfo<'_>) -> Span {
        tracing::info_span!(
            target: "tower_overload",
            "llm_call",
            gen_ai.operation.name = "chat",
            gen_ai.provider.name = "anthropic",
            gen_ai.request.model = %OrDash(call.model),
            gen_ai.response.model = Empty,
            server.address = %OrDash(call.uri.host()),
            http.request.method = %call.method,
            url.path = %call.uri.path(),
            correlation_id = %call.correlation_id,
            http.response.status_code = Empty,
            error.type = Empty,
            tower_overload.time_to_response_head_ms = Empty,
            tower_overload.time_to_first_chunk_ms = Empty,
            gen_ai.usage.input_tokens = Empty,
            gen_ai.usage.output_tokens = Empty,
        )
    }
}

/// One outcome the layer reports: an attempt, or the call's final answer.
#[derive(Clone)]
pub struct Outcome<'a> {
    /// How it was classified.
    pub class: Class,
    /// Its status, when a response came.
    pub status: Option<StatusCode>,
    /// The API's request id, when the response had one.
    pub request_id: Option<&'a RequestId>,
    /// The client-side correlation id of the call.
    pub correlation_id: &'a str,
    /// The model that answered (or was asked), when known.
    pub model: Option<&'a Model>,
    /// Attempt number (1-based) and the most allowed, when the retry layer said.
    pub attempt: Option<(u32, u32)>,
    /// From the call to the response headers (the final outcome only).
    pub latency: Option<Duration>,
    /// The wait before the next attempt, or the server's requested delay.
    pub delay: Option<Duration>,
    /// Whether this is the call's final outcome (not an earlier attempt).
    pub is_final: bool,
    /// Whether retries were spent on it (the final outcome of a retried call).
    pub exhausted: bool,
    /// The error's message, for an outcome with no response.
    pub error: Option<&'a dyn fmt::Display>,
    /// The health verdict the failure carries (feature `health`): an
    /// incident on the status page, local pressure, or a capacity event.
    pub verdict: Option<&'a dyn fmt::Display>,
}

impl fmt::Debug for Outcome<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outcome")
            .field("class", &self.class)
            .field("status", &self.status)
            .field("request_id", &self.request_id)
            .field("correlation_id", &self.correlation_id)
            .field("model", &self.model)
            .field("attempt", &self.attempt)
            .field("latency", &self.latency)
            .field("delay", &self.delay)
            .field("is_final", &self.is_final)
            .field("exhausted", &self.exhausted)
            .field("error", &self.error.map(ToString::to_string))
            .field("verdict", &self.verdict.map(ToString::to_string))
            .finish()
    }
}

/// A model of a fallback chain that a call skipped without trying it.
#[derive(Debug, Clone, Copy)]
pub struct Skip<'a> {
    /// The model skipped.
    pub model: &'a Model,
    /// Why: `breaker_open` (cooling down, or being probed by another call).
    pub reason: &'static str,
    /// The model the call moves on to, if any.
    pub next: Option<&'a Model>,
    /// The client-side correlation id of the call.
    pub correlation_id: &'a str,
}

/// Records an outcome.
pub trait OnOutcome {
    /// Records `outcome` (inside the call's span). Attempts are recorded as
    /// each ends (`is_final` false), the call's answer when it comes.
    fn on_outcome(&self, outcome: &Outcome<'_>);

    /// Records a model the call skipped (inside the call's span). Records
    /// nothing unless implemented.
    fn on_skip(&self, skip: &Skip<'_>) {
        let _ = skip;
    }
}

/// Events at a level chosen by class: DEBUG for a success, WARN for an
/// overload, rate limit, server error, timeout, conflict or transport
/// failure, ERROR for a client error or a failure whose retries were spent.
///
/// ```
/// use tracing::Level;
/// use tower_overload::classify::Class;
/// use tower_overload::request_id::DefaultOnOutcome;
///
/// let quiet = DefaultOnOutcome::default().success_level(Level::TRACE).level_for(Class::RateLimited, Level::INFO);
/// ```
#[derive(Debug, Clone)]
pub struct DefaultOnOutcome {
    success: Level,
    overrides: Vec<(Class, Level)>,
}

impl Default for DefaultOnOutcome {
    fn default() -> Self {
        Self {
            success: Level::DEBUG,
            overrides: Vec::new(),
        }
    }
}

impl DefaultOnOutcome {
    /// The level of successes (default DEBUG).
    ///
    /// ```
    /// # use tower_overload::request_id::DefaultOnOutcome;
    /// let on_outcome = DefaultOnOutcome::default().success_level(tracing::Level::INFO);
    /// ```
    pub fn success_level(mut self, level: Level) -> Self {
        self.success = level;
        self
    }

    /// The level of one class, whatever else applies.
    ///
    /// ```
    /// # use tower_overload::{classify::Class, request_id::DefaultOnOutcome};
    /// let on_outcome = DefaultOnOutcome::default().level_for(Class::Overloaded, tracing::Level::ERROR);
    /// ```
    pub fn level_for(mut self, class: Class, level: Level) -> Self {
        self.overrides.push((class, level));
        self
    }

    /// The level an outcome is recorded at.
    ///
    /// ```
    /// # use tower_overload::{classify::{Class, ClientKind}, request_id::DefaultOnOutcome};
    /// # use tracing::Level;
    /// let levels = DefaultOnOutcome::default();
    /// assert_eq!(levels.level(Class::Overloaded, false), Level::WARN);
    /// assert_eq!(levels.level(Class::Overloaded, true), Level::ERROR);
    /// assert_eq!(levels.level(Class::Client(ClientKind::NotFound), false), Level::ERROR);
    /// ```
    pub fn level(&self, class: Class, exhausted: bool) -> Level {
        if let Some((_, level)) = self.overrides.iter().rev().find(|(c, _)| *c == class) {
            return *level;
        }
        match class {
            Class::Success => self.success,
            Class::Client(_) => Level::ERROR,
            _ if exhausted => Level::ERROR,
            _ => Level::WARN,
        }
    }
}

/// Shows `-` for a missing value, so every event has every field.
struct OrDash<T>(Option<T>);

impl<T: fmt::Display> fmt::Display for OrDash<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(value) => value.fmt(f),
            None => f.write_str("-"),
        }
    }
}

struct Millis(Option<Duration>);

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(d) => write!(f, "{}", d.as_millis()),
            None => f.write_str("-"),
        }
    }
}

macro_rules! event_at {
    ($level:expr, $($rest:tt)+) => {
        match $level {
            Level::ERROR => tracing::error!($($rest)+),
            Level::WARN => tracing::warn!($($rest)+),
            Level::INFO => tracing::info!($($rest)+),
            Level::DEBUG => tracing::debug!($($rest)+),
            _ => tracing::trace!($($rest)+),
        }
    };
}

impl OnOutcome for DefaultOnOutcome {
    fn on_outcome(&self, outcome: &Outcome<'_>) {
        let level = self.level(outcome.class, outcome.exhausted);
        let (attempt, of) = match outcome.attempt {
            Some((attempt, of)) => (Some(attempt), Some(of)),
            None => (None, None),
        };
        let message = match (outcome.is_final, outcome.class.is_failure()) {
            (true, false) => "llm call succeeded",
            (true, true) => "llm call failed",
            (false, true) => "llm attempt failed",
            (false, false) => "llm attempt succeeded",
        };
        event_at!(
            level,
            target: "tower_overload",
            status = %OrDash(outcome.status.map(|s| s.as_u16())),
            class = outcome.class.as_str(),
            request_id = %OrDash(outcome.request_id),
            correlation_id = %outcome.correlation_id,
            model = %OrDash(outcome.model),
            attempt = %OrDash(attempt),
            of = %OrDash(of),
            latency_ms = %Millis(outcome.latency),
            delay_ms = %Millis(outcome.delay),
            error = %OrDash(outcome.error),
            verdict = %OrDash(outcome.verdict),
            "{message}"
        );
    }

    fn on_skip(&self, skip: &Skip<'_>) {
        tracing::warn!(
            target: "tower_overload",
            model = %skip.model,
            reason = %skip.reason,
            next = %OrDash(skip.next),
            correlation_id = %skip.correlation_id,
            "llm model skipped"
        );
    }
}
