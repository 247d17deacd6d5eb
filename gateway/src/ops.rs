//! Operations: `/healthz`, `/readyz`, `/metrics`, and the per-call record
//! (counters, latency, one log event).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tower_overload::classify::Class;
use tower_overload::{Error, ErrorKind};

use crate::names::ModelLabels;
use crate::proxy::{GatewayBody, full, millis};

/// Calls the gateway answered, by model label and status.
pub const REQUESTS_TOTAL: &str = "gateway_requests_total";
/// Seconds from a request's arrival to its response head, by model label.
pub const REQUEST_DURATION: &str = "gateway_request_duration_seconds";
/// Calls in the gateway now (streams included until their head is sent).
pub const IN_FLIGHT: &str = "gateway_requests_in_flight";

/// A failed connection to the upstream keeps the gateway unready this long
/// unless an answer comes first.
const UNREACHABLE_FOR: Duration = Duration::from_secs(10);

/// The process's Prometheus recorder, installed the first time a gateway
/// starts (one per process: `metrics` has one global recorder). `None` if
/// something else installed a recorder first.
pub(crate) fn prometheus() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0, 120.0, 300.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.to_owned()), &buckets)
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            metrics::describe_counter!(
                REQUESTS_TOTAL,
                "Calls the gateway answered, by model and status."
            );
            metrics::describe_histogram!(
                REQUEST_DURATION,
                metrics::Unit::Seconds,
                "Time to the response head, retries and queueing included."
            );
            metrics::describe_gauge!(IN_FLIGHT, "Calls in the gateway now.");
            Some(handle)
        })
        .as_ref()
}

/// Drains the histograms' sample buffers into their buckets every few
/// seconds: the recorder keeps every sample until then, which grew the
/// gateway by about 1 MB per 100,000 calls between scrapes (and forever
/// without one).
fn start_upkeep() {
    static STARTED: AtomicBool = AtomicBool::new(false);
    if STARTED.swap(true, Ordering::Relaxed) {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        STARTED.store(false, Ordering::Relaxed);
        return;
    };
    runtime.spawn(async {
        let mut every = tokio::time::interval(UPKEEP_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            if let Some(handle) = prometheus() {
                handle.run_upkeep();
            }
        }
    });
}

/// How often the histograms' samples are folded into their buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(1);

/// One call in the gateway, counted in [`IN_FLIGHT`] until dropped.
#[derive(Debug)]
pub(crate) struct InFlight(());

impl InFlight {
    pub(crate) fn new() -> Self {
        metrics::gauge!(IN_FLIGHT).increment(1.0);
        Self(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(IN_FLIGHT).decrement(1.0);
    }
}

/// The gateway's own state for health and metrics.
#[derive(Debug)]
pub(crate) struct Ops {
    labels: ModelLabels,
    started: Instant,
    shutting_down: AtomicBool,
    /// Milliseconds since `started` of the last connection failure (0: none).
    unreachable_at: AtomicU64,
    /// Milliseconds since `started` of the last answer from the upstream.
    answered_at: AtomicU64,
}

impl Ops {
    pub(crate) fn new() -> Self {
        if prometheus().is_some() {
            start_upkeep();
        }
        Self {
            labels: ModelLabels::default(),
            started: Instant::now(),
            shutting_down: AtomicBool::new(false),
            unreachable_at: AtomicU64::new(0),
            answered_at: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        (self.started.elapsed().as_millis() as u64).max(1)
    }

    pub(crate) fn shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    pub(crate) fn upstream_answered(&self) {
        self.answered_at.store(self.now_ms(), Ordering::Relaxed);
    }

    pub(crate) fn upstream_outcome(&self, error: &Error) {
        let unreachable = matches!(error.kind(), ErrorKind::Transport | ErrorKind::Timeout)
            || matches!(error.class(), Some(Class::Transport | Class::Timeout));
        if unreachable {
            self.unreachable_at.store(self.now_ms(), Ordering::Relaxed);
        } else {
            self.upstream_answered();
        }
    }

    /// Counts a finished call and logs it (failures at info, the rest at debug).
    pub(crate) fn record(
        &self,
        model: Option<&str>,
        response: &Response<GatewayBody>,
        elapsed: Duration,
    ) {
        let label = self.labels.label(model);
        let status = response.status().as_u16();
        metrics::counter!(REQUESTS_TOTAL, "model" => label.clone(), "status" => status.to_string())
            .increment(1);
        metrics::histogram!(REQUEST_DURATION, "model" => label.clone())
            .record(elapsed.as_secs_f64());
        let request_id = response
            .headers()
            .get("request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|id| id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()))
            .unwrap_or("-");
        let served_by = response
            .headers()
            .get(crate::proxy::SERVED_BY_MODEL)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        if status >= 400 {
            tracing::info!(
                model = %label,
                status,
                ms = millis(elapsed),
                request_id,
                served_by,
                "call failed"
            );
        } else {
            tracing::debug!(
                model = %label,
                status,
                ms = millis(elapsed),
                request_id,
                served_by,
                "call"
            );
        }
    }

    /// Alive: the process answers.
    pub(crate) fn healthz(&self) -> Response<GatewayBody> {
        json(StatusCode::OK, serde_json::json!({"status": "ok"}))
    }

    /// Ready for traffic: not shutting down, and the upstream was not
    /// found unreachable more recently than it last answered (within 10 s).
    /// Also names the models of the fallback chains that are resting after
    /// overloads (their calls go to the next model: still ready).
    pub(crate) fn readyz(&self, cooling_down: &[&str]) -> Response<GatewayBody> {
        let now = self.now_ms();
        let unreachable_at = self.unreachable_at.load(Ordering::Relaxed);
        let answered_at = self.answered_at.load(Ordering::Relaxed);
        let unreachable = unreachable_at > answered_at
            && now.saturating_sub(unreachable_at) < UNREACHABLE_FOR.as_millis() as u64;
        let shutting_down = self.shutting_down.load(Ordering::Relaxed);
        let upstream = if unreachable {
            "unreachable"
        } else if answered_at > 0 {
            "ok"
        } else {
            "unknown"
        };
        let ready = !unreachable && !shutting_down;
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        json(
            status,
            serde_json::json!({
                "ready": ready,
                "upstream": upstream,
                "shutting_down": shutting_down,
                "cooling_down": cooling_down,
            }),
        )
    }

    /// Everything the process's recorder holds, in Prometheus text.
    pub(crate) fn metrics(&self) -> Response<GatewayBody> {
        let Some(handle) = prometheus() else {
            return json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"type": "error", "error": {"type": "not_found_error",
                    "message": "another metrics recorder was installed in this process"}}),
            );
        };
        handle.run_upkeep();
        let mut response = Response::new(full(handle.render().into()));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        response
    }
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<GatewayBody> {
    let mut response = Response::new(full(value.to_string().into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
