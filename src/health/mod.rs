//! Incident or local pressure? A [`HealthMonitor`] that tells which.
//!
//! The guides' first two steps for a 529: check the status page (is the API
//! component degraded, is there an incident for this model?), then send one
//! small controlled request, same key, same model, `max_tokens: 1`. If it
//! succeeds while your bursts fail, the problem is your traffic and the fix
//! is less concurrency; if it is overloaded too, it is a broader capacity
//! event. A rising 529 rate often comes minutes before an incident is posted.
//!
//! The monitor does both, for you, only when it matters:
//! - it counts each model's 529 rate over a sliding window (fed by the
//!   [retry layer](crate::retry::RetryPolicy::health) with every attempt, or
//!   by you with [`HealthMonitor::record`]);
//! - while a model's rate is raised (default: 2% of at least 20 attempts in
//!   60 s) it reads the Statuspage `summary.json` (default the Claude status
//!   page) at most every 30 s, and otherwise never (or at most every
//!   [idle interval](HealthConfig::idle_poll_interval));
//! - with the [probe](HealthConfig::probe) on (off by default: it spends
//!   tokens), it sends one minimal request per model at most once a minute;
//! - it gives a [`Verdict`]: [`Incident`](Verdict::Incident) (the page
//!   declares one: wait, do not hammer, switch models if continuity matters),
//!   [`LocalPressure`](Verdict::LocalPressure) (the probe succeeded: lower
//!   your concurrency), [`CapacityEvent`](Verdict::CapacityEvent) (the probe
//!   was overloaded too, nothing declared yet: wait or switch models) or
//!   [`Unknown`](Verdict::Unknown).
//!
//! The retry layer attaches the verdict to the [`Error`](crate::Error) it
//! returns, whose message then says it.
//!
//! **Never on a caller's path.** Reads and probes go through the client you
//! give (so your TLS stack, proxies and timeouts apply), each in one spawned
//! tokio task when due, single-flight across clones: a thousand failing calls
//! start one read and one probe, and no call waits for either. Each read is
//! bounded (10 s, 1 MiB); a slow, huge or malformed page is recorded as the
//! check's outcome ([`HealthMonitor::last_check`]), never a panic. Memory is
//! bounded: 64 models get a rate of their own, every other name shares one.
//!
//! The pure core is usable alone: [`StatusSummary::parse`], [`page_verdict`],
//! [`decide`], [`OverloadRate`].
//!
//! ```
//! # #[cfg(feature = "retry")]
//! # fn main() {
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper_util::client::legacy::{Client, connect::HttpConnector};
//! use hyper_util::rt::TokioExecutor;
//! use tower::Layer;
//! use tower_overload::health::{HealthConfig, HealthMonitor, Probe};
//! use tower_overload::retry::{FinalFailure, OverloadRetryLayer, RetryPolicy};
//!
//! let client = Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(HttpConnector::new());
//! // The monitor talks through the bare client: its probe is never one of a caller's attempts.
//! let monitor = HealthMonitor::new(
//!     client.clone(),
//!     HealthConfig::default()
//!         .idle_poll_interval(Some(Duration::from_secs(60)))
//!         .probe(Some(Probe::default())), // spends one output token per probe
//! );
//! let service = OverloadRetryLayer::new(
//!     RetryPolicy::foreground()
//!         .final_failure(FinalFailure::Error)
//!         .health(monitor.clone()),
//! )
//! .layer(client);
//! # let _ = service;
//!
//! // Later, in an error handler or a concurrency controller:
//! match monitor.verdict_for("claude-opus-4-6") {
//!     tower_overload::health::Verdict::LocalPressure { .. } => { /* fewer calls in flight */ }
//!     tower_overload::health::Verdict::Incident { .. } => { /* wait, or another model */ }
//!     _ => {}
//! }
//! # }
//! # #[cfg(not(feature = "retry"))]
//! # fn main() {}
//! ```

mod config;
mod monitor;
mod schedule;
mod status;
mod transport;
mod verdict;

pub use self::config::{DEFAULT_STATUS_PAGE, HealthConfig, Probe};
pub use self::monitor::HealthMonitor;
pub use self::schedule::OverloadRate;
pub use self::status::{
    ActiveIncident, Component, HealthError, MAX_ENTRIES, MAX_TEXT_LEN, StatusCheck, StatusSummary,
};
pub use self::verdict::{ProbeOutcome, ProbeRecord, Verdict, decide, page_verdict};
