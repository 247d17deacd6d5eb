//! Tower middleware that keeps HTTP clients of LLM APIs working when the API
//! is overloaded or rate-limited.
//!
//! Claude's API sheds load with HTTP 529 `overloaded_error` (capacity full
//! for everyone, per model), which is not 429 `rate_limit_error` (your own
//! quota), nor 500 `api_error`, nor 504 `timeout_error`; each needs a
//! different repair. This crate is built in two levels:
//!
//! 1. **A policy core** with no tower, no I/O and no clock reads of its own:
//!    - [`classify`]: status + headers (+ a bounded body prefix) to a
//!      [`Class`](classify::Class) and a retry verdict;
//!      [`classify::error_type`] sniffs `error.type` from JSON or SSE bytes.
//!    - [`headers`]: `retry-after-ms`, `retry-after` (seconds or HTTP-date),
//!      `x-should-retry`, `request-id`, `anthropic-ratelimit-*`.
//!    - [`backoff`]: capped exponential backoff with full, equal or
//!      decorrelated jitter from a seedable RNG.
//!    - [`budget`]: a retry budget shared by clones, so retries stay a
//!      bounded fraction of traffic.
//!    - [`model`]: the top-level `"model"` of a JSON body, read and
//!      rewritten without a full parse.
//!    - [`Error`]: one error type with the class, status, request id,
//!      attempts and elapsed time, and a message a person can act on.
//! 2. **Layers**, thin shells over the core, one per cargo feature:
//!    - [`retry`]: `OverloadRetryLayer`, the one retry loop;
//!    - [`concurrency`]: `ConcurrencyPerModelLayer`, per-model caps held
//!      until the response body ends;
//!    - [`fallback`]: `ModelFallbackLayer`, opt-in model chains with cooldowns;
//!    - [`request_id`]: `RequestIdLogLayer`, tracing with request ids and
//!      the 529-rate health signal;
//!    - `pacing` (opt-in feature): `RateLimitPacingLayer`, pacing under the
//!      organisation's RPM, input-TPM and output-TPM limits;
//!    - `health` (opt-in feature): `HealthMonitor`, which reads the status
//!      page and probes a model when its 529 rate rises, and tells an
//!      incident from local pressure in every error;
//!    - [`stack`]: all four in the recommended order (log, fallback, retry,
//!      concurrency, client) and a `ServiceBuilderExt`.
//!
//! ```
//! use http::{HeaderMap, StatusCode};
//! use tower_overload::classify::{classify, Class};
//!
//! let verdict = classify(StatusCode::from_u16(529).unwrap(), &HeaderMap::new(), None);
//! assert_eq!(verdict.class, Class::Overloaded);
//! assert!(verdict.retryable);
//! ```

//! ## On your HTTP client
//!
//! Any `tower::Service<http::Request<B>>` works. With hyper-util's client:
//!
//! ```
//! # #[cfg(all(feature = "retry", feature = "concurrency", feature = "fallback", feature = "request-id"))]
//! # fn main() {
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper_util::client::legacy::{Client, connect::HttpConnector};
//! use hyper_util::rt::TokioExecutor;
//! use tower::Layer;
//! use tower_overload::{ModelFallbackLayer, OverloadStack, RetryPolicy};
//!
//! let mut connector = HttpConnector::new();
//! connector.set_nodelay(true); // streamed events go out as they come
//! let client = Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(connector);
//! let client = OverloadStack::new()
//!     .retry(RetryPolicy::foreground())
//!     .fallback(ModelFallbackLayer::new(["claude-opus-4-6", "claude-sonnet-4-6"]))
//!     .layer(client);
//! # let _ = client;
//! # }
//! # #[cfg(not(all(feature = "retry", feature = "concurrency", feature = "fallback", feature = "request-id")))]
//! # fn main() {}
//! ```
//!
//! With reqwest (feature `reqwest`), `tower_overload::reqwest::ReqwestService`
//! is the client under the layers; a reqwest timeout is a retried `Timeout`:
//!
//! ```no_run
//! # #[cfg(all(feature = "reqwest", feature = "concurrency", feature = "fallback", feature = "request-id"))]
//! # fn main() -> Result<(), tower_overload::BoxError> {
//! use tower::Layer;
//! use tower_overload::reqwest::ReqwestService;
//! use tower_overload::{OverloadStack, RetryPolicy};
//!
//! let client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(600)).build()?;
//! let client: ReqwestService = ReqwestService::new(client);
//! let service = OverloadStack::new().retry(RetryPolicy::foreground()).layer(client);
//! # let _ = service;
//! # Ok(()) }
//! # #[cfg(not(all(feature = "reqwest", feature = "concurrency", feature = "fallback", feature = "request-id")))]
//! # fn main() {}
//! ```
//!
//! With reqwest-middleware (feature `reqwest-middleware`), the same layers
//! run inside any `ClientWithMiddleware`, and `RetryReport` and `ServedBy`
//! are on the `reqwest::Response`'s extensions:
//!
//! ```no_run
//! # #[cfg(all(feature = "reqwest-middleware", feature = "concurrency", feature = "fallback", feature = "request-id"))]
//! # fn main() {
//! use reqwest_middleware::ClientBuilder;
//! use tower_overload::reqwest_middleware::OverloadMiddleware;
//! use tower_overload::{OverloadStack, RetryPolicy};
//!
//! let client = ClientBuilder::new(reqwest::Client::new())
//!     .with(OverloadMiddleware::new(OverloadStack::new().retry(RetryPolicy::foreground())))
//!     .build();
//! # let _ = client;
//! # }
//! # #[cfg(not(all(feature = "reqwest-middleware", feature = "concurrency", feature = "fallback", feature = "request-id")))]
//! # fn main() {}
//! ```
//!
//! ## Cargo features
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `retry` | yes | [`OverloadRetryLayer`], [`RetryPolicy`], the stream guard |
//! | `concurrency` | yes | [`ConcurrencyPerModelLayer`] |
//! | `fallback` | yes | [`ModelFallbackLayer`] |
//! | `request-id` | yes | [`RequestIdLogLayer`], `stats::OverloadStats` |
//! | `pacing` | no | `RateLimitPacingLayer`: waits for rate-limit budget instead of collecting 429s |
//! | `health` | no | `health::HealthMonitor`: status page poller, controlled probe, incident-or-local-pressure verdict in errors |
//! | `redis` | no | `fleet`: per-model caps and the retry quota shared by many workers through Redis or Valkey |
//! | `metrics` | no | every layer records through the `metrics` facade: OpenTelemetry GenAI names, TTFT, token usage and cost, retries, fallbacks, overload (see `metrics`) |
//! | `hyper-util` | no | precise classification of hyper-util's client errors |
//! | `reqwest` | no | a `tower::Service` over `reqwest::Client`, and a classifier of reqwest's errors |
//! | `reqwest-middleware` | no | the crate's layers as a `reqwest_middleware::Middleware` |
//!
//! The policy core is always built; [`stack`] needs the four default layer
//! features. On docs.rs every item says which feature it needs.

#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]
#![warn(
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms,
    clippy::all
)]
#![forbid(unsafe_code)]

pub mod backoff;
pub mod body;
pub mod breaker_signal;
pub mod bucket;
pub mod budget;
pub mod classify;
#[cfg(feature = "concurrency")]
#[cfg_attr(docsrs, doc(cfg(feature = "concurrency")))]
pub mod concurrency;
mod error;
pub mod estimate;
#[cfg(feature = "fallback")]
#[cfg_attr(docsrs, doc(cfg(feature = "fallback")))]
pub mod fallback;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod fleet;
pub mod headers;
#[cfg(feature = "health")]
#[cfg_attr(docsrs, doc(cfg(feature = "health")))]
pub mod health;
mod json;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
pub mod model;
mod observe;
#[cfg(feature = "pacing")]
#[cfg_attr(docsrs, doc(cfg(feature = "pacing")))]
pub mod pacing;
#[cfg(feature = "request-id")]
#[cfg_attr(docsrs, doc(cfg(feature = "request-id")))]
pub mod request_id;
#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub mod reqwest;
#[cfg(feature = "reqwest-middleware")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest-middleware")))]
pub mod reqwest_middleware;
#[cfg(feature = "retry")]
#[cfg_attr(docsrs, doc(cfg(feature = "retry")))]
pub mod retry;
pub mod sse;
pub mod usage;
// Built with any layer: `ServiceBuilderExt` has one method per layer, each
// behind that layer's feature; `OverloadStack` needs all four.
#[cfg(any(
    feature = "retry",
    feature = "concurrency",
    feature = "fallback",
    feature = "request-id"
))]
#[cfg_attr(
    docsrs,
    doc(cfg(any(
        feature = "retry",
        feature = "concurrency",
        feature = "fallback",
        feature = "request-id"
    )))
)]
pub mod stack;
#[cfg(feature = "request-id")]
#[cfg_attr(docsrs, doc(cfg(feature = "request-id")))]
pub mod stats;
mod sync;
#[cfg(any(feature = "request-id", feature = "metrics"))]
mod table;
#[cfg(any(feature = "retry", feature = "fallback"))]
mod template;
mod time;

pub use error::{BoxError, Error, ErrorKind};
pub use headers::RequestId;
pub use model::Model;

#[cfg(feature = "concurrency")]
#[cfg_attr(docsrs, doc(cfg(feature = "concurrency")))]
pub use concurrency::ConcurrencyPerModelLayer;
#[cfg(feature = "fallback")]
#[cfg_attr(docsrs, doc(cfg(feature = "fallback")))]
pub use fallback::ModelFallbackLayer;
#[cfg(feature = "pacing")]
#[cfg_attr(docsrs, doc(cfg(feature = "pacing")))]
pub use pacing::RateLimitPacingLayer;
#[cfg(feature = "request-id")]
#[cfg_attr(docsrs, doc(cfg(feature = "request-id")))]
pub use request_id::RequestIdLogLayer;
#[cfg(feature = "retry")]
#[cfg_attr(docsrs, doc(cfg(feature = "retry")))]
pub use retry::{OverloadRetryLayer, RetryPolicy};
#[cfg(all(
    feature = "retry",
    feature = "concurrency",
    feature = "fallback",
    feature = "request-id"
))]
#[cfg_attr(
    docsrs,
    doc(cfg(all(
        feature = "retry",
        feature = "concurrency",
        feature = "fallback",
        feature = "request-id"
    )))
)]
pub use stack::OverloadStack;
#[cfg(any(
    feature = "retry",
    feature = "concurrency",
    feature = "fallback",
    feature = "request-id"
))]
#[cfg_attr(
    docsrs,
    doc(cfg(any(
        feature = "retry",
        feature = "concurrency",
        feature = "fallback",
        feature = "request-id"
    )))
)]
pub use stack::ServiceBuilderExt;

/// The README's Rust snippets, compiled as doctests so that what it shows
/// works (with every feature they use: the README's test command).
#[cfg(all(
    doctest,
    feature = "retry",
    feature = "concurrency",
    feature = "fallback",
    feature = "request-id",
    feature = "health",
    feature = "redis",
    feature = "pacing"
))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
