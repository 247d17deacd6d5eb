//! tower-overload as a local proxy that any SDK, in any language, can use.
//!
//! Point a client's base URL at it (`ANTHROPIC_BASE_URL=http://127.0.0.1:8787`
//! for the official SDKs, curl, any tool): every `/v1/*` call goes through
//! per-model concurrency (adaptive, permissive until the upstream says it is
//! overloaded), rate-limit pacing, the one overload retry loop with the
//! stream guard on, optional model fallback, and request-id logs. Streams
//! pass through chunk by chunk; bodies are forwarded byte for byte (but for
//! a fallback's model); the upstream's `request-id` comes back, and
//! `x-served-by-model` names the model that answered after a fallback.
//!
//! # The retry contract with the SDK behind it
//!
//! The gateway is the one retry loop. Every failure it hands back (the
//! upstream's last answer after its retries, a 502 for an unreachable
//! upstream, a 504 for a spent deadline, a 529 for a full queue, a refusal
//! of the request itself) carries `x-should-retry: false`, which the
//! official SDKs obey over the status: their default 2 retries would
//! otherwise run the gateway's whole loop three times per call in a storm.
//! When coming back later is welcome (a full queue, a rate limit whose wait
//! is longer than the gateway's), the answer also has `retry-after` in
//! seconds, for a job queue to reschedule by.
//!
//! # Protection
//!
//! Header and body read timeouts, a header size limit, the API's 32 MiB body
//! limit, path normalisation (nothing outside `/v1/` is forwarded, however
//! encoded), `accept-encoding` narrowed to what the classifier decodes and the
//! client reads, model names checked before they reach logs and metric labels,
//! and a graceful shutdown. Each refusal is in the API's error shape.
//!
//! ```no_run
//! use clap::Parser;
//! use tower_overload_gateway::{Args, serve_with_shutdown};
//!
//! # #[tokio::main] async fn main() {
//! let config = Args::parse().resolve().unwrap_or_else(|e| panic!("{e}"));
//! let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
//! serve_with_shutdown(config, listener, async { let _ = tokio::signal::ctrl_c().await; }).await;
//! # }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![warn(missing_debug_implementations, rust_2018_idioms, unreachable_pub)]

mod config;
mod names;
mod ops;
mod proxy;
mod server;

pub use config::{API_MAX_BODY, Args, Config, ConfigError, LogFormat, RetryPreset};
pub use names::valid_model_name;
pub use ops::{IN_FLIGHT, REQUEST_DURATION, REQUESTS_TOTAL};
pub use proxy::SERVED_BY_MODEL;
pub use server::{serve, serve_with_shutdown};

/// Installs the global `tracing` subscriber the binary logs with: `RUST_LOG`
/// or `tower_overload=info,tower_overload_gateway=info`, as text or JSON.
///
/// ```no_run
/// tower_overload_gateway::init_logs(tower_overload_gateway::LogFormat::Json);
/// ```
pub fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "tower_overload=info,tower_overload_gateway=info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
