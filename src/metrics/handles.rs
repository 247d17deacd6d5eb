//! The handles each layer records with, made once per model (or pair of
//! models) and kept.

use std::sync::{Arc, OnceLock};

use ::metrics::{Counter, Gauge, Histogram, Label};

use super::*;

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
        let (class, outcome) = (class.index(), usize::from(!retried));
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
        let class = class.index();
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
        let index = class.index();
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
