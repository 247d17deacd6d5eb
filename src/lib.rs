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
pub mod budget;
pub mod classify;
#[cfg(feature = "concurrency")]
pub mod concurrency;
mod error;
#[cfg(feature = "fallback")]
pub mod fallback;
pub mod headers;
mod json;
pub mod model;
#[cfg(feature = "request-id")]
pub mod request_id;
#[cfg(feature = "reqwest-middleware")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest-middleware")))]
pub mod reqwest_middleware;
#[cfg(feature = "retry")]
pub mod retry;
pub mod sse;
#[cfg(all(
    feature = "retry",
    feature = "concurrency",
    feature = "fallback",
    feature = "request-id"
))]
pub mod stack;
#[cfg(any(feature = "retry", feature = "fallback"))]
mod template;
mod time;

pub use error::{BoxError, Error, ErrorKind};
pub use headers::RequestId;
pub use model::Model;
