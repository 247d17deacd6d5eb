//! Metrics through the [`metrics`](https://docs.rs/metrics) facade: the
//! OpenTelemetry GenAI client metrics, and the retry, fallback and overload
//! signals nobody else exports (feature `metrics`).
//!
//! Every layer records on its own once the feature is on; the application
//! installs a recorder (`metrics-exporter-prometheus`, an OpenTelemetry
//! bridge, StatsD) and reads them. Each layer has a runtime switch,
//! `.metrics(false)`, that skips recording altogether (the
//! [`OverloadStack`](crate::stack::OverloadStack) one switches every layer).
//!
//! Handles are registered once per model and layer, the first time a model
//! is seen, and reused: a call allocates nothing for metric keys. Model names
//! come from clients, so they are checked before they become label values:
//! at most [`MAX_LABEL_LEN`] bytes of `A-Z a-z 0-9 . _ - : / @`, and at most
//! [`MAX_MODELS`] distinct names per layer; any other name is counted under
//! [`OTHER`]. Units follow OpenTelemetry: seconds for durations, `{token}`
//! for token counts.
//!
//! | name | type | unit | labels | meaning |
//! |---|---|---|---|---|
//! | `gen_ai.client.operation.duration` | histogram | s | `gen_ai.provider.name`, `gen_ai.operation.name`, `gen_ai.request.model`, `gen_ai.response.model`, `server.address` (the host of the layer's first call), `error.type` (failures only: the [class](crate::classify::Class)) | a whole call, retries and fallbacks included, to its response head or error (log layer) |
//! | `gen_ai.client.operation.time_to_first_chunk` | histogram | s | `gen_ai.provider.name`, `gen_ai.operation.name`, `gen_ai.request.model` | a stream's first content event, from the first attempt on the model that answered (retry layer) |
//! | `gen_ai.client.token.usage` | histogram | `{token}` | `gen_ai.provider.name`, `gen_ai.operation.name`, `gen_ai.request.model`, `gen_ai.token.type` (`input`, `output`) | tokens per call, from the response's `usage` (retry layer) |
//! | `tower_overload.time_to_response_head` | histogram | s | `gen_ai.request.model` | every call that got a response head: from the call to the head (log layer) |
//! | `tower_overload.tokens` | counter | `{token}` | `gen_ai.request.model`, `gen_ai.token.type` (`input`, `output`, `cache_read`, `cache_write`) | tokens used, prompt cache included (retry layer) |
//! | `tower_overload.cost` | counter | micro-USD | `gen_ai.request.model` | usage priced by a [`PriceTable`], in millionths of a dollar (retry layer) |
//! | `tower_overload.attempts` | counter | `{attempt}` | `gen_ai.request.model`, `class`, `outcome` (`retried`, `final`) | every attempt, by how it was classified and whether a retry followed (retry layer; a first try that succeeded, or a call with no retry layer inside, is counted by the log layer) |
//! | `tower_overload.retries` | counter | `{retry}` | `gen_ai.request.model`, `class` | retries granted, by the class of the failure retried (retry layer) |
//! | `tower_overload.retry_wait` | histogram | s | `gen_ai.request.model`, `class` | each backoff before a retry (retry layer) |
//! | `tower_overload.fallbacks` | counter | `{fallback}` | `from`, `to` | calls moved from one model to the next (fallback layer) |
//! | `tower_overload.skipped` | counter | `{call}` | `gen_ai.request.model`, `reason` (`breaker_open`: cooling down, or probed by another call) | calls that skipped a model without trying it (fallback layer) |
//! | `tower_overload.breaker_state` | gauge | 1 | `gen_ai.request.model` | the model's breaker: 0 closed, 1 open, 2 half-open (fallback layer) |
//! | `tower_overload.in_flight` | gauge | `{call}` | `gen_ai.request.model` | attempts holding a permit (concurrency layer) |
//! | `tower_overload.limit` | gauge | `{call}` | `gen_ai.request.model` | the model's concurrency limit, adaptive or fixed (concurrency layer) |
//! | `tower_overload.queued` | gauge | `{call}` | `gen_ai.request.model` | attempts waiting for a permit (concurrency layer) |
//! | `tower_overload.queue_wait` | histogram | s | `gen_ai.request.model` | the wait for a permit of each attempt that queued (concurrency layer) |
//! | `tower_overload.pacing_wait` | histogram | s | `gen_ai.request.model` | the wait for rate-limit budget of each attempt that waited (pacing layer) |
//! | `tower_overload.bucket_fill` | gauge | 1 | `gen_ai.request.model`, `bucket` (`requests`, `input_tokens`, `output_tokens`) | what is left of a rate-limit bucket, 0 to 1 (pacing layer) |
//! | `tower_overload.overload_rate` | gauge | 1 | `gen_ai.request.model` (`all` for all traffic) | 529s over outcomes in the last 60 s ([`OverloadStats`](crate::stats::OverloadStats)) |
//! | `tower_overload.rate_limit_rate` | gauge | 1 | `gen_ai.request.model` (`all` for all traffic) | 429s over outcomes in the last 60 s ([`OverloadStats`](crate::stats::OverloadStats)) |
//! | `tower_overload.overload_alert` | gauge | 1 | `gen_ai.request.model` (`all` for all traffic) | 1 while the 2% overload alert is raised, 0 once cleared below half of it ([`OverloadStats`](crate::stats::OverloadStats)) |
//! | `tower_overload.health.incidents` | gauge | `{incident}` | none | incidents the status page declared at its last read (feature `health`) |
//! | `tower_overload.health.last_check` | gauge | s | `result` (`ok`, `error`) | Unix time of the last status page read (feature `health`) |
//!
//! The GenAI metrics also carry `gen_ai.provider.name="anthropic"` and
//! `gen_ai.operation.name="chat"`.
//!
//! ```
//! use metrics_util::debugging::DebuggingRecorder;
//! use tower_overload::metrics::{PriceTable, Prices, names};
//!
//! let recorder = DebuggingRecorder::new();
//! let snapshotter = recorder.snapshotter();
//! metrics::with_local_recorder(&recorder, || {
//!     // What the layers do: record through the facade under these names.
//!     metrics::counter!(names::ATTEMPTS, "class" => "overloaded").increment(1);
//! });
//! assert_eq!(snapshotter.snapshot().into_vec().len(), 1);
//!
//! let prices = PriceTable::new().price("claude-opus-4-6", Prices::per_million(5.0, 25.0, 0.5, 6.25));
//! assert!(prices.get("claude-opus-4-6").is_some());
//! ```

// Each layer uses its own part; a build without some layers leaves theirs unused.
#![cfg_attr(
    not(all(
        feature = "retry",
        feature = "request-id",
        feature = "fallback",
        feature = "concurrency",
        feature = "pacing"
    )),
    allow(dead_code, unused_imports)
)]

use std::sync::Arc;

use ::metrics::{Label, Unit};

use crate::classify::Class;
use crate::model::Model;
use crate::table::Table;

/// The label value of every model past the cap, or with a name that is not clean.
pub const OTHER: &str = "other";

/// The most distinct models a layer gives label values of their own.
pub const MAX_MODELS: usize = 64;

/// The longest model name kept as a label value.
pub const MAX_LABEL_LEN: usize = 128;

/// The metric names, as recorded (see the [module docs](self) for their types and labels).
pub mod names {
    /// Histogram, seconds: a whole call (OpenTelemetry GenAI).
    pub const OPERATION_DURATION: &str = "gen_ai.client.operation.duration";
    /// Histogram, seconds: a stream's first content event (OpenTelemetry GenAI).
    pub const TIME_TO_FIRST_CHUNK: &str = "gen_ai.client.operation.time_to_first_chunk";
    /// Histogram, tokens per call by `gen_ai.token.type` (OpenTelemetry GenAI).
    pub const TOKEN_USAGE: &str = "gen_ai.client.token.usage";
    /// Histogram, seconds: to the response head.
    pub const TIME_TO_RESPONSE_HEAD: &str = "tower_overload.time_to_response_head";
    /// Counter, tokens by type, the prompt cache's included.
    pub const TOKENS: &str = "tower_overload.tokens";
    /// Counter, millionths of a dollar.
    pub const COST: &str = "tower_overload.cost";
    /// Counter, attempts by class and outcome.
    pub const ATTEMPTS: &str = "tower_overload.attempts";
    /// Counter, retries by class.
    pub const RETRIES: &str = "tower_overload.retries";
    /// Histogram, seconds of backoff.
    pub const RETRY_WAIT: &str = "tower_overload.retry_wait";
    /// Counter, fallbacks from one model to another.
    pub const FALLBACKS: &str = "tower_overload.fallbacks";
    /// Counter, calls that skipped a model.
    pub const SKIPPED: &str = "tower_overload.skipped";
    /// Gauge, a model's breaker: 0 closed, 1 open, 2 half-open.
    pub const BREAKER_STATE: &str = "tower_overload.breaker_state";
    /// Gauge, attempts holding a permit.
    pub const IN_FLIGHT: &str = "tower_overload.in_flight";
    /// Gauge, the concurrency limit.
    pub const LIMIT: &str = "tower_overload.limit";
    /// Gauge, attempts waiting for a permit.
    pub const QUEUED: &str = "tower_overload.queued";
    /// Histogram, seconds waited for a permit.
    pub const QUEUE_WAIT: &str = "tower_overload.queue_wait";
    /// Histogram, seconds waited for rate-limit budget.
    pub const PACING_WAIT: &str = "tower_overload.pacing_wait";
    /// Gauge, what is left of a rate-limit bucket (0 to 1).
    pub const BUCKET_FILL: &str = "tower_overload.bucket_fill";
    /// Gauge, 529s over outcomes in the last 60 s.
    pub const OVERLOAD_RATE: &str = "tower_overload.overload_rate";
    /// Gauge, 429s over outcomes in the last 60 s.
    pub const RATE_LIMIT_RATE: &str = "tower_overload.rate_limit_rate";
    /// Gauge, 1 while the overload alert is raised.
    pub const OVERLOAD_ALERT: &str = "tower_overload.overload_alert";
    /// Gauge, incidents the status page declares (feature `health`).
    pub const HEALTH_INCIDENTS: &str = "tower_overload.health.incidents";
    /// Gauge, Unix time of the last status page read, and whether it was readable.
    pub const HEALTH_LAST_CHECK: &str = "tower_overload.health.last_check";
}

/// Attribute names.
pub(crate) const MODEL: &str = "gen_ai.request.model";
const RESPONSE_MODEL: &str = "gen_ai.response.model";
const PROVIDER: &str = "gen_ai.provider.name";
const OPERATION: &str = "gen_ai.operation.name";
const TOKEN_TYPE: &str = "gen_ai.token.type";
#[cfg(feature = "request-id")]
const SERVER: &str = "server.address";
#[cfg(feature = "request-id")]
const ERROR_TYPE: &str = "error.type";

/// The label value of a model name: the name when it is clean (see the
/// [module docs](self)), else `None` (the caller counts it under [`OTHER`]).
///
/// ```
/// use tower_overload::metrics::clean_label;
/// assert_eq!(clean_label("claude-opus-4-6"), Some("claude-opus-4-6"));
/// assert_eq!(clean_label("claude\"} 1\n"), None);
/// assert_eq!(clean_label(&"x".repeat(500)), None);
/// assert_eq!(clean_label(""), None);
/// ```
pub fn clean_label(name: &str) -> Option<&str> {
    let clean = !name.is_empty()
        && name.len() <= MAX_LABEL_LEN
        && name != OTHER
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:/@".contains(&b));
    clean.then_some(name)
}

fn model_label(model: &str) -> Label {
    Label::new(MODEL, model.to_owned())
}

fn genai_labels(model: &str) -> Vec<Label> {
    vec![
        Label::new(PROVIDER, "anthropic"),
        Label::new(OPERATION, "chat"),
        model_label(model),
    ]
}

/// The `class` label of each [`Class::index`] (every client error is `client`:
/// a bounded label set).
const CLASSES: [&str; Class::COUNT] = [
    "success",
    "overloaded",
    "rate_limited",
    "server_error",
    "timeout",
    "conflict",
    "client",
    "transport",
];

/// Gives every metric its unit and description, once per table (the
/// recorder in force when a table makes its first handles).
fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(
        names::OPERATION_DURATION,
        Unit::Seconds,
        "GenAI operation duration: a whole call, retries and fallbacks included"
    );
    describe_histogram!(
        names::TIME_TO_FIRST_CHUNK,
        Unit::Seconds,
        "Time to a stream's first content event"
    );
    describe_histogram!(
        names::TOKEN_USAGE,
        "Tokens used per call, by gen_ai.token.type"
    );
    describe_histogram!(
        names::TIME_TO_RESPONSE_HEAD,
        Unit::Seconds,
        "Time to the response head"
    );
    describe_counter!(
        names::TOKENS,
        "Tokens used, by type (input, output, cache_read, cache_write)"
    );
    describe_counter!(names::COST, "Usage priced by the price table, in micro-USD");
    describe_counter!(names::ATTEMPTS, "Attempts by class and outcome");
    describe_counter!(names::RETRIES, "Retries granted, by class");
    describe_histogram!(names::RETRY_WAIT, Unit::Seconds, "Backoff before a retry");
    describe_counter!(names::FALLBACKS, "Calls moved from one model to another");
    describe_counter!(names::SKIPPED, "Calls that skipped a model");
    describe_gauge!(
        names::BREAKER_STATE,
        "A model's breaker: 0 closed, 1 open, 2 half-open"
    );
    describe_gauge!(names::IN_FLIGHT, "Attempts holding a concurrency permit");
    describe_gauge!(names::LIMIT, "The concurrency limit");
    describe_gauge!(names::QUEUED, "Attempts waiting for a permit");
    describe_histogram!(names::QUEUE_WAIT, Unit::Seconds, "Wait for a permit");
    describe_histogram!(
        names::PACING_WAIT,
        Unit::Seconds,
        "Wait for rate-limit budget"
    );
    describe_gauge!(
        names::BUCKET_FILL,
        "What is left of a rate-limit bucket (0 to 1)"
    );
    describe_gauge!(names::OVERLOAD_RATE, "529s over outcomes in the last 60 s");
    describe_gauge!(
        names::RATE_LIMIT_RATE,
        "429s over outcomes in the last 60 s"
    );
    describe_gauge!(
        names::OVERLOAD_ALERT,
        "1 while the overload alert is raised"
    );
    describe_gauge!(
        names::HEALTH_INCIDENTS,
        "Incidents the status page declared at its last read"
    );
    describe_gauge!(
        names::HEALTH_LAST_CHECK,
        Unit::Seconds,
        "Unix time of the last status page read"
    );
}

/// A table entry for a client's model name: its handles under the cleaned
/// name, or `None` when the name cannot be a label (counted as [`OTHER`]).
fn entry<V>(make: fn(&str) -> V, name: &str) -> Option<(Model, V)> {
    let clean = clean_label(name)?;
    describe();
    Some((Model::new(clean), make(clean)))
}

/// The handles every name the table cannot hold shares.
fn other<V>(make: fn(&str) -> V) -> V {
    describe();
    make(OTHER)
}

/// A bounded table keyed by model name, each entry's labels made from it.
pub(crate) struct ModelTable<V> {
    table: Table<Model, V>,
    make: fn(&str) -> V,
}

impl<V> std::fmt::Debug for ModelTable<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.table.fmt(f)
    }
}

impl<V> ModelTable<V> {
    pub(crate) fn new(make: fn(&str) -> V) -> Self {
        Self {
            table: Table::new(MAX_MODELS),
            make,
        }
    }

    /// Runs `use_it` with the handles of `model` (`None`: counted as [`OTHER`]).
    pub(crate) fn with<T>(&self, model: Option<&Model>, use_it: impl FnOnce(&V) -> T) -> T {
        let make = self.make;
        let name = model.map_or(OTHER, Model::as_str);
        self.table
            .with(name, |name| entry(make, name), || other(make), use_it)
    }
}

impl<V> ModelTable<V> {
    /// The handles of `model`, kept (for a response body that records later).
    #[cfg_attr(not(feature = "retry"), allow(dead_code))]
    pub(crate) fn arc(&self, model: Option<&Model>) -> Arc<V> {
        let make = self.make;
        let name = model.map_or(OTHER, Model::as_str);
        self.table
            .arc(name, |name| entry(make, name), || other(make))
    }
}

mod handles;
mod price;

pub(crate) use self::handles::*;
pub use self::price::{PriceTable, Prices};
