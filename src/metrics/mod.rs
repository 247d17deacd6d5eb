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

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use ::metrics::{Counter, Gauge, Histogram, Label, Unit};

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

/// Index of a class in the per-class handle arrays.
pub(crate) fn class_index(class: Class) -> usize {
    match class {
        Class::Success => 0,
        Class::Overloaded => 1,
        Class::RateLimited => 2,
        Class::ServerError => 3,
        Class::Timeout => 4,
        Class::Conflict => 5,
        Class::Client(_) => 6,
        Class::Transport => 7,
    }
}

const CLASSES: [&str; 8] = [
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
        self.table.with(
            name,
            |name| {
                let clean = clean_label(name)?;
                describe();
                Some((Model::new(clean), make(clean)))
            },
            || {
                describe();
                make(OTHER)
            },
            use_it,
        )
    }
}

impl<V> ModelTable<V> {
    /// The handles of `model`, kept (for a response body that records later).
    #[cfg_attr(not(feature = "retry"), allow(dead_code))]
    pub(crate) fn arc(&self, model: Option<&Model>) -> Arc<V> {
        let make = self.make;
        let name = model.map_or(OTHER, Model::as_str);
        self.table.arc(
            name,
            |name| {
                let clean = clean_label(name)?;
                describe();
                Some((Model::new(clean), make(clean)))
            },
            || {
                describe();
                make(OTHER)
            },
        )
    }
}

// ===== the retry layer's handles =====

/// What the retry layer records per model.
#[cfg(feature = "retry")]
#[derive(Debug)]
pub(crate) struct AttemptMeters {
    model: String,
    /// By class, then outcome (retried, final); each registered at its
    /// first use, so an exporter shows only the classes that happened.
    attempts: [[OnceLock<Counter>; 2]; 8],
    retries: [OnceLock<Counter>; 8],
    retry_wait: [OnceLock<Histogram>; 8],
    pub(crate) first_chunk: Histogram,
    /// Input, output.
    token_usage: [Histogram; 2],
    /// Input, output, cache read, cache write.
    tokens: [Counter; 4],
    cost: Counter,
}

#[cfg(feature = "retry")]
impl AttemptMeters {
    pub(crate) fn new(model: &str) -> Self {
        let genai = genai_labels(model);
        let token_usage = |kind: &'static str| {
            let mut labels = genai.clone();
            labels.push(Label::new(TOKEN_TYPE, kind));
            ::metrics::histogram!(names::TOKEN_USAGE, labels)
        };
        let tokens = |kind: &'static str| {
            ::metrics::counter!(
                names::TOKENS,
                vec![model_label(model), Label::new(TOKEN_TYPE, kind)]
            )
        };
        Self {
            model: model.to_owned(),
            attempts: Default::default(),
            retries: Default::default(),
            retry_wait: Default::default(),
            first_chunk: ::metrics::histogram!(names::TIME_TO_FIRST_CHUNK, genai.clone()),
            token_usage: [token_usage("input"), token_usage("output")],
            tokens: [
                tokens("input"),
                tokens("output"),
                tokens("cache_read"),
                tokens("cache_write"),
            ],
            cost: ::metrics::counter!(names::COST, vec![model_label(model)]),
        }
    }

    fn class_labels(&self, class: usize) -> Vec<Label> {
        vec![
            model_label(&self.model),
            Label::new("class", CLASSES[class]),
        ]
    }

    /// An attempt ended with `class`; `retried` when a retry follows.
    pub(crate) fn attempt(&self, class: Class, retried: bool) {
        let (class, outcome) = (class_index(class), usize::from(!retried));
        self.attempts[class][outcome]
            .get_or_init(|| {
                let mut labels = self.class_labels(class);
                labels.push(Label::new("outcome", ["retried", "final"][outcome]));
                ::metrics::counter!(names::ATTEMPTS, labels)
            })
            .increment(1);
    }

    /// A retry after a failure of `class`, in `wait`.
    pub(crate) fn retry(&self, class: Class, wait: std::time::Duration) {
        let class = class_index(class);
        self.retries[class]
            .get_or_init(|| ::metrics::counter!(names::RETRIES, self.class_labels(class)))
            .increment(1);
        self.retry_wait[class]
            .get_or_init(|| ::metrics::histogram!(names::RETRY_WAIT, self.class_labels(class)))
            .record(wait.as_secs_f64());
    }

    /// The usage a response reported, priced when a price is known.
    pub(crate) fn usage(&self, usage: &crate::usage::Usage, prices: Option<&Prices>) {
        let input = usage.input_tokens.unwrap_or(0)
            + usage.cache_read_input_tokens.unwrap_or(0)
            + usage.cache_creation_input_tokens.unwrap_or(0);
        if usage.input_tokens.is_some() {
            self.token_usage[0].record(input as f64);
        }
        if let Some(output) = usage.output_tokens {
            self.token_usage[1].record(output as f64);
        }
        let counts = [
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_read_input_tokens,
            usage.cache_creation_input_tokens,
        ];
        for (counter, count) in self.tokens.iter().zip(counts) {
            if let Some(count) = count {
                counter.increment(count);
            }
        }
        if let Some(prices) = prices {
            self.cost.increment(prices.micro_usd(usage));
        }
    }
}

/// The retry layer's handles per model, and its prices.
#[cfg(feature = "retry")]
#[derive(Debug)]
pub(crate) struct RetryMeters {
    pub(crate) table: ModelTable<AttemptMeters>,
    pub(crate) prices: Option<PriceTable>,
}

#[cfg(feature = "retry")]
impl RetryMeters {
    pub(crate) fn new(prices: Option<PriceTable>) -> Self {
        Self {
            table: ModelTable::new(AttemptMeters::new),
            prices,
        }
    }
}

/// Watches a response body as the caller reads it: the time to a stream's
/// first content event, and the usage the body reports, recorded when the
/// body ends or is dropped. On the call's span too, when its fields exist
/// (the log layer's default span has them).
#[cfg(feature = "retry")]
pub(crate) struct BodyMeter {
    meters: Arc<AttemptMeters>,
    prices: Option<Prices>,
    started: tokio::time::Instant,
    span: tracing::Span,
    reader: crate::usage::UsageReader,
    first_chunk_seen: bool,
}

#[cfg(feature = "retry")]
impl std::fmt::Debug for BodyMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyMeter").finish_non_exhaustive()
    }
}

#[cfg(feature = "retry")]
impl BodyMeter {
    /// Whether a response's body is measured: a success that is JSON
    /// (`Some(false)`) or an event stream (`Some(true)`).
    pub(crate) fn measured(status: http::StatusCode, headers: &http::HeaderMap) -> Option<bool> {
        if !status.is_success() {
            return None;
        }
        let content_type = headers.get(http::header::CONTENT_TYPE)?.as_bytes();
        if content_type.starts_with(b"text/event-stream") {
            Some(true)
        } else {
            content_type
                .starts_with(b"application/json")
                .then_some(false)
        }
    }

    /// The meter of a measured response's body.
    pub(crate) fn new(
        meters: &RetryMeters,
        model: Option<&Model>,
        stream: bool,
        started: tokio::time::Instant,
    ) -> Self {
        Self {
            meters: meters.table.arc(model),
            prices: model
                .zip(meters.prices.as_ref())
                .and_then(|(model, prices)| prices.get(model.as_str()).copied()),
            started,
            span: tracing::Span::current(),
            reader: crate::usage::UsageReader::new(stream),
            first_chunk_seen: false,
        }
    }

    pub(crate) fn see(&mut self, chunk: &[u8]) {
        self.reader.feed(chunk);
        if !self.first_chunk_seen && self.reader.content_started() {
            self.first_chunk_seen = true;
            let elapsed = self.started.elapsed();
            self.meters.first_chunk.record(elapsed.as_secs_f64());
            self.span.record(TTFC_FIELD, elapsed.as_millis() as u64);
        }
    }

    pub(crate) fn end(&mut self) {
        self.reader.end();
    }
}

/// The span field of a stream's time to its first content event.
pub(crate) const TTFC_FIELD: &str = "tower_overload.time_to_first_chunk_ms";

#[cfg(feature = "retry")]
impl Drop for BodyMeter {
    fn drop(&mut self) {
        // A body dropped before its end reported no usage worth counting
        // (a JSON body's usage is at its end; a stream's output is partial).
        if !self.reader.ended() {
            return;
        }
        if let Some(usage) = self.reader.usage() {
            self.meters.usage(&usage, self.prices.as_ref());
            if let Some(input) = usage.input_tokens {
                self.span.record("gen_ai.usage.input_tokens", input);
            }
            if let Some(output) = usage.output_tokens {
                self.span.record("gen_ai.usage.output_tokens", output);
            }
        }
    }
}

// ===== the log layer's handles =====

/// What the log layer records per (asked, served) pair of models.
#[cfg(feature = "request-id")]
#[derive(Debug)]
pub(crate) struct CallMeters {
    labels: Vec<Label>,
    served: String,
    /// By class: success (no `error.type`), then each failure class; each
    /// registered at its first use.
    duration: [OnceLock<Histogram>; 8],
    head: Histogram,
    /// The final attempts no retry layer inside counted (a first try that
    /// succeeded, or no retry layer at all), by class.
    attempts: [OnceLock<Counter>; 8],
}

#[cfg(feature = "request-id")]
impl CallMeters {
    pub(crate) fn new(asked: &str, served: &str, server: Option<&str>) -> Self {
        let mut labels = genai_labels(asked);
        labels.push(Label::new(RESPONSE_MODEL, served.to_owned()));
        if let Some(server) = server {
            labels.push(Label::new(SERVER, server.to_owned()));
        }
        Self {
            labels,
            served: served.to_owned(),
            duration: Default::default(),
            head: ::metrics::histogram!(names::TIME_TO_RESPONSE_HEAD, vec![model_label(asked)]),
            attempts: Default::default(),
        }
    }

    fn call(&self, class: Class, duration: std::time::Duration, count_attempt: bool) {
        let index = class_index(class);
        let seconds = duration.as_secs_f64();
        self.duration[index]
            .get_or_init(|| {
                let mut labels = self.labels.clone();
                if index > 0 {
                    labels.push(Label::new(ERROR_TYPE, CLASSES[index]));
                }
                ::metrics::histogram!(names::OPERATION_DURATION, labels)
            })
            .record(seconds);
        self.head.record(seconds);
        if count_attempt {
            self.attempts[index]
                .get_or_init(|| {
                    ::metrics::counter!(
                        names::ATTEMPTS,
                        vec![
                            model_label(&self.served),
                            Label::new("class", CLASSES[index]),
                            Label::new("outcome", "final"),
                        ]
                    )
                })
                .increment(1);
        }
    }
}

/// The log layer's tables: bounded, by model when the model asked for
/// answered (the common case: one string hashed per call), by pair when a
/// fallback answered.
#[cfg(feature = "request-id")]
#[derive(Debug)]
pub(crate) struct CallTable {
    same: Table<Model, CallMeters>,
    pairs: Table<(Model, Model), CallMeters>,
    /// `server.address`: the host of the layer's first call (a client
    /// talks to one API; read with one load per call, never hashed).
    server: OnceLock<Option<String>>,
}

#[cfg(feature = "request-id")]
impl CallTable {
    pub(crate) fn new() -> Self {
        Self {
            same: Table::new(MAX_MODELS),
            pairs: Table::new(MAX_MODELS),
            server: OnceLock::new(),
        }
    }

    /// Notes the server of a call (the first one's is kept).
    pub(crate) fn server(&self, uri: &http::Uri) {
        if self.server.get().is_none() {
            // OpenTelemetry's `server.address` is the host; the port is apart.
            let host = uri.host().and_then(clean_label).map(str::to_owned);
            let _ = self.server.set(host);
        }
    }

    fn server_label(&self) -> Option<&str> {
        self.server.get().and_then(Option::as_deref)
    }

    /// A call's end: its duration (to its response head or error) and,
    /// when no retry layer inside counted it, its final attempt.
    pub(crate) fn record(
        &self,
        asked: &Model,
        served: &Model,
        class: Class,
        duration: std::time::Duration,
        count_attempt: bool,
    ) {
        let use_it = |meters: &CallMeters| meters.call(class, duration, count_attempt);
        let other = || CallMeters::new(OTHER, OTHER, self.server_label());
        if asked == served {
            self.same.with(
                asked.as_str(),
                |name| {
                    let label = clean_label(name)?;
                    describe();
                    Some((
                        asked.clone(),
                        CallMeters::new(label, label, self.server_label()),
                    ))
                },
                other,
                use_it,
            );
            return;
        }
        self.pairs.with(
            &(asked.clone(), served.clone()),
            |(asked, served)| {
                let asked_label = clean_label(asked.as_str())?;
                let served_label = clean_label(served.as_str())?;
                describe();
                Some((
                    (asked.clone(), served.clone()),
                    CallMeters::new(asked_label, served_label, self.server_label()),
                ))
            },
            other,
            use_it,
        );
    }
}

// ===== the fallback layer's handles =====

/// What the fallback layer records per model.
#[cfg(feature = "fallback")]
#[derive(Debug)]
pub(crate) struct ModelStateMeters {
    pub(crate) breaker_state: Gauge,
    skipped: Counter,
}

#[cfg(feature = "fallback")]
impl ModelStateMeters {
    pub(crate) fn new(model: &str) -> Self {
        Self {
            breaker_state: ::metrics::gauge!(names::BREAKER_STATE, vec![model_label(model)]),
            skipped: ::metrics::counter!(
                names::SKIPPED,
                vec![model_label(model), Label::new("reason", "breaker_open")]
            ),
        }
    }

    pub(crate) fn skipped(&self) {
        self.skipped.increment(1);
    }
}

/// The fallback layer's pair table: `from` and `to`, bounded.
#[cfg(feature = "fallback")]
#[derive(Debug)]
pub(crate) struct FallbackTable(Table<(Model, Model), Counter>);

#[cfg(feature = "fallback")]
impl FallbackTable {
    pub(crate) fn new() -> Self {
        Self(Table::new(MAX_MODELS))
    }

    pub(crate) fn fallback(&self, from: &Model, to: &Model) {
        let make = |from: &str, to: &str| {
            ::metrics::counter!(
                names::FALLBACKS,
                vec![
                    Label::new("from", from.to_owned()),
                    Label::new("to", to.to_owned())
                ]
            )
        };
        self.0.with(
            &(from.clone(), to.clone()),
            |(from, to)| {
                let counter = make(clean_label(from.as_str())?, clean_label(to.as_str())?);
                Some(((from.clone(), to.clone()), counter))
            },
            || make(OTHER, OTHER),
            |counter| counter.increment(1),
        );
    }
}

// ===== the concurrency and pacing layers' handles, kept in their key states =====

/// A key's concurrency gauges (kept in its state: the layer's own key table
/// bounds them).
#[cfg(feature = "concurrency")]
#[derive(Debug)]
pub(crate) struct ConcurrencyMeters {
    pub(crate) in_flight: Gauge,
    pub(crate) limit: Gauge,
    pub(crate) queued: Gauge,
    pub(crate) queue_wait: Histogram,
}

#[cfg(feature = "concurrency")]
impl ConcurrencyMeters {
    pub(crate) fn new(key: &str) -> Self {
        let key = clean_label(key).unwrap_or(OTHER);
        Self {
            in_flight: ::metrics::gauge!(names::IN_FLIGHT, vec![model_label(key)]),
            limit: ::metrics::gauge!(names::LIMIT, vec![model_label(key)]),
            queued: ::metrics::gauge!(names::QUEUED, vec![model_label(key)]),
            queue_wait: ::metrics::histogram!(names::QUEUE_WAIT, vec![model_label(key)]),
        }
    }
}

/// A key's pacing handles (kept in its state).
#[cfg(feature = "pacing")]
#[derive(Debug)]
pub(crate) struct PacingMeters {
    pub(crate) wait: Histogram,
    /// Requests, input tokens, output tokens.
    pub(crate) fill: [Gauge; 3],
}

#[cfg(feature = "pacing")]
impl PacingMeters {
    pub(crate) fn new(key: &str) -> Self {
        let key = clean_label(key).unwrap_or(OTHER);
        let fill = |bucket: &'static str| {
            ::metrics::gauge!(
                names::BUCKET_FILL,
                vec![model_label(key), Label::new("bucket", bucket)]
            )
        };
        Self {
            wait: ::metrics::histogram!(names::PACING_WAIT, vec![model_label(key)]),
            fill: [
                fill("requests"),
                fill("input_tokens"),
                fill("output_tokens"),
            ],
        }
    }
}

/// The overload signal's gauges for one model (or `all`).
#[derive(Debug)]
pub(crate) struct RateMeters {
    pub(crate) overload_rate: Gauge,
    pub(crate) rate_limit_rate: Gauge,
    pub(crate) alert: Gauge,
}

impl RateMeters {
    pub(crate) fn new(model: &str) -> Self {
        Self {
            overload_rate: ::metrics::gauge!(names::OVERLOAD_RATE, vec![model_label(model)]),
            rate_limit_rate: ::metrics::gauge!(names::RATE_LIMIT_RATE, vec![model_label(model)]),
            alert: ::metrics::gauge!(names::OVERLOAD_ALERT, vec![model_label(model)]),
        }
    }
}

// ===== prices =====

/// Dollars per million tokens of one model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prices {
    /// Input not read from or written to the prompt cache.
    pub input: f64,
    /// Output.
    pub output: f64,
    /// Input read from the prompt cache.
    pub cache_read: f64,
    /// Input written to the prompt cache.
    pub cache_write: f64,
}

impl Prices {
    /// Prices in dollars per million tokens.
    ///
    /// ```
    /// # use tower_overload::metrics::Prices;
    /// let opus = Prices::per_million(5.0, 25.0, 0.5, 6.25);
    /// assert_eq!(opus.output, 25.0);
    /// ```
    pub const fn per_million(input: f64, output: f64, cache_read: f64, cache_write: f64) -> Self {
        Self {
            input,
            output,
            cache_read,
            cache_write,
        }
    }

    /// What `usage` costs, in millionths of a dollar (rounded).
    ///
    /// ```
    /// # use tower_overload::{metrics::Prices, usage::Usage};
    /// let usage = Usage { input_tokens: Some(1_000), output_tokens: Some(100), ..Default::default() };
    /// // 1,000 × $5/M + 100 × $25/M = $0.0075
    /// assert_eq!(Prices::per_million(5.0, 25.0, 0.5, 6.25).micro_usd(&usage), 7_500);
    /// ```
    pub fn micro_usd(&self, usage: &crate::usage::Usage) -> u64 {
        // Dollars per million tokens are micro-dollars per token.
        let cost = usage.input_tokens.unwrap_or(0) as f64 * self.input
            + usage.output_tokens.unwrap_or(0) as f64 * self.output
            + usage.cache_read_input_tokens.unwrap_or(0) as f64 * self.cache_read
            + usage.cache_creation_input_tokens.unwrap_or(0) as f64 * self.cache_write;
        if cost.is_finite() && cost > 0.0 {
            cost.round() as u64
        } else {
            0
        }
    }
}

/// Prices per model, to turn token usage into the `tower_overload.cost`
/// counter. A model without a price costs nothing in the counter.
///
/// ```
/// use tower_overload::metrics::{PriceTable, Prices};
/// let prices = PriceTable::new()
///     .price("claude-opus-4-6", Prices::per_million(5.0, 25.0, 0.5, 6.25))
///     .price("claude-haiku-4-5", Prices::per_million(1.0, 5.0, 0.1, 1.25));
/// assert_eq!(prices.get("claude-haiku-4-5").unwrap().input, 1.0);
/// assert!(prices.get("gpt").is_none());
/// ```
#[derive(Debug, Clone, Default)]
pub struct PriceTable {
    prices: Arc<HashMap<String, Prices>>,
}

impl PriceTable {
    /// No prices.
    ///
    /// ```
    /// # use tower_overload::metrics::PriceTable;
    /// assert!(PriceTable::new().get("claude-opus-4-6").is_none());
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the prices of `model`.
    ///
    /// ```
    /// # use tower_overload::metrics::{PriceTable, Prices};
    /// let prices = PriceTable::new().price("claude-sonnet-4-6", Prices::per_million(3.0, 15.0, 0.3, 3.75));
    /// ```
    pub fn price(mut self, model: impl Into<String>, prices: Prices) -> Self {
        Arc::make_mut(&mut self.prices).insert(model.into(), prices);
        self
    }

    /// The prices of `model`, if set.
    ///
    /// ```
    /// # use tower_overload::metrics::{PriceTable, Prices};
    /// assert!(PriceTable::new().get("claude-opus-4-6").is_none());
    /// ```
    pub fn get(&self, model: &str) -> Option<&Prices> {
        self.prices.get(model)
    }
}
