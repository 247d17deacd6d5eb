//! [`HealthMonitor`]: the shell that feeds the pure core and does the I/O,
//! one spawned task per poll or probe, never on a caller's path.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, header};
use http_body::Body;
use http_body_util::Full;
use tokio::time::Instant;
use tower_service::Service;

use super::config::{COPIED_HEADERS, HealthConfig};
use super::schedule::{Flight, OverloadRate, RateWindow, poll_due, probe_due};
use super::status::{HealthError, StatusCheck, StatusSummary};
use super::transport::{ServiceTransport, Transport};
use super::verdict::{ProbeOutcome, ProbeRecord, Verdict, decide, page_verdict};
use crate::BoxError;
use crate::classify::{self, Class};
use crate::model::{MAX_KEY_LEN, Model};
use crate::sync::lock;

/// The most bytes of a probe's answer that are read: one token's message.
const PROBE_MAX_BODY: usize = 64 * 1024;

/// Watches the 529 rate of each model, reads the status page and probes a
/// model when its rate is raised, and says what is behind the overloads:
/// a [`Verdict`]. See the [module docs](super).
///
/// Cloning is a reference-count bump; clones share everything.
#[derive(Clone)]
pub struct HealthMonitor {
    shared: Arc<Shared>,
}

struct Shared {
    config: HealthConfig,
    transport: Box<dyn Transport>,
    state: Mutex<State>,
}

#[derive(Default)]
struct Slot {
    window: Option<RateWindow>,
    probe: Flight,
    last_probe: Option<(Instant, ProbeRecord)>,
}

impl Slot {
    fn window(&mut self) -> &mut RateWindow {
        self.window.get_or_insert_with(RateWindow::new)
    }

    fn rate(&self, now: Instant, config: &HealthConfig) -> OverloadRate {
        self.window
            .as_ref()
            .map_or_else(OverloadRate::default, |window| {
                window.rate(now, config.window)
            })
    }
}

#[derive(Default)]
struct State {
    /// One slot per model, up to `max_models`; never evicted.
    slots: HashMap<Model, Slot>,
    /// Every other model, and calls whose model is unknown: a rate, no probe.
    other: Slot,
    poll: Flight,
    last_check: Option<StatusCheck>,
    /// The last page read, kept when a later read fails.
    last_page: Option<(Instant, Arc<StatusSummary>)>,
}

/// What an attempt's outcome set off, started once the lock is released.
struct Jobs {
    poll: bool,
    probe: Option<(Model, Request<Full<Bytes>>)>,
}

/// Ends a flight when its task ends, is dropped unspawned, or its runtime
/// shuts down: a flight never stays "in flight" for good.
struct FlightGuard {
    shared: Arc<Shared>,
    /// `None`: the page poll; else the model probed.
    model: Option<Model>,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        let mut state = lock(&self.shared.state);
        match &self.model {
            None => state.poll.finish(),
            Some(model) => {
                if let Some(slot) = state.slots.get_mut(model.as_str()) {
                    slot.probe.finish();
                }
            }
        }
    }
}

fn spawn(task: impl std::future::Future<Output = ()> + Send + 'static) -> bool {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            drop(handle.spawn(task));
            true
        }
        Err(_) => false,
    }
}

/// The probe's request: `POST` to `uri` with `headers`, the model, one
/// output token and a one-word prompt.
fn probe_request(uri: &Uri, headers: &HeaderMap, model: &Model) -> Request<Full<Bytes>> {
    let body = serde_json::json!({
        "model": model.as_str(),
        "max_tokens": 1,
        "messages": [{"role": "user", "content": "ping"}],
    });
    let mut request = Request::new(Full::new(Bytes::from(body.to_string())));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = uri.clone();
    *request.headers_mut() = headers.clone();
    request.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    request
}

/// The headers a probe copies from a caller's request, marked sensitive.
fn copied_headers(headers: &HeaderMap) -> HeaderMap {
    let mut copied = HeaderMap::new();
    for name in &COPIED_HEADERS {
        if let Some(value) = headers.get(name) {
            let mut value = value.clone();
            value.set_sensitive(true);
            copied.insert(name.clone(), value);
        }
    }
    copied
}

impl HealthMonitor {
    /// A monitor that reads the page and sends probes through `client`: any
    /// `tower::Service` taking `http::Request<Full<Bytes>>` (hyper-util's
    /// client, your TLS stack), used under none of this crate's layers.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use hyper_util::client::legacy::{Client, connect::HttpConnector};
    /// use hyper_util::rt::TokioExecutor;
    /// use tower_overload::health::{HealthConfig, HealthMonitor};
    ///
    /// let client = Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(HttpConnector::new());
    /// let monitor = HealthMonitor::new(client, HealthConfig::default());
    /// assert!(monitor.verdict_for("claude-opus-4-6").is_unknown());
    /// ```
    pub fn new<S, R>(client: S, config: HealthConfig) -> Self
    where
        S: Service<Request<Full<Bytes>>, Response = Response<R>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        R: Body + Send + 'static,
        R::Data: Buf + Send,
        R::Error: Into<BoxError>,
    {
        Self {
            shared: Arc::new(Shared {
                config,
                transport: Box::new(ServiceTransport(Mutex::new(client))),
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// The settings.
    ///
    /// ```
    /// # use tower_overload::health::{HealthConfig, HealthMonitor};
    /// # let client = tower::service_fn(|_r: http::Request<http_body_util::Full<bytes::Bytes>>| async {
    /// #     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::new())))
    /// # });
    /// let monitor = HealthMonitor::new(client, HealthConfig::default());
    /// assert!(monitor.config().get_probe().is_none());
    /// ```
    pub fn config(&self) -> &HealthConfig {
        &self.shared.config
    }

    /// Counts one attempt's outcome for `model` (the retry layer does this
    /// for every attempt when the monitor is set on its policy), and starts
    /// a poll of the page or a probe when one is due. Never waits.
    ///
    /// Without the request's head a probe can only use the
    /// [`template`](super::Probe::template).
    ///
    /// ```
    /// # use tower_overload::health::{HealthConfig, HealthMonitor};
    /// # use tower_overload::{Model, classify::Class};
    /// # let client = tower::service_fn(|_r: http::Request<http_body_util::Full<bytes::Bytes>>| async {
    /// #     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::new())))
    /// # });
    /// let monitor = HealthMonitor::new(client, HealthConfig::default().status_page(None));
    /// monitor.record(&Model::new("claude-opus-4-6"), Class::Overloaded);
    /// assert_eq!(monitor.overload_rate("claude-opus-4-6").unwrap().rate(), 1.0);
    /// ```
    pub fn record(&self, model: &Model, class: Class) {
        self.observe(Some(model), class, None);
    }

    /// [`record`](Self::record) with the head of the request, which a probe copies.
    pub(crate) fn observe(
        &self,
        model: Option<&Model>,
        class: Class,
        head: Option<(&Uri, &HeaderMap)>,
    ) {
        let jobs = self.plan(model, class, head, Instant::now());
        if jobs.poll {
            self.spawn_poll();
        }
        if let Some((model, request)) = jobs.probe {
            self.spawn_probe(model, request);
        }
    }

    fn plan(
        &self,
        model: Option<&Model>,
        class: Class,
        head: Option<(&Uri, &HeaderMap)>,
        now: Instant,
    ) -> Jobs {
        let config = &self.shared.config;
        let mut jobs = Jobs {
            poll: false,
            probe: None,
        };
        let mut guard = lock(&self.shared.state);
        let State {
            slots,
            other,
            poll,
            last_page,
            ..
        } = &mut *guard;
        let named = model.filter(|model| {
            slots.contains_key(model.as_str())
                || (slots.len() < config.max_models && model.as_str().len() <= MAX_KEY_LEN)
        });
        let slot = match named {
            Some(model) => slots.entry(model.clone()).or_default(),
            None => other,
        };
        slot.window()
            .record(now, config.window, class == Class::Overloaded);
        let raised = slot
            .rate(now, config)
            .is_raised(config.threshold, config.min_samples);
        if config.status_page.is_some()
            && poll_due(
                poll,
                raised,
                config.poll_interval,
                config.idle_poll_interval,
                now,
            )
        {
            poll.start(now);
            jobs.poll = true;
        }
        let (Some(probe), Some(model)) = (&config.probe, named) else {
            return jobs;
        };
        if !probe_due(&slot.probe, raised, false, probe.interval, now) {
            return jobs;
        }
        // Under a declared incident a probe tells nothing new and adds load.
        let incident = last_page.as_ref().is_some_and(|(at, page)| {
            now.saturating_duration_since(*at) <= config.verdict_ttl
                && page_verdict(model.as_str(), page).is_some()
        });
        if incident {
            return jobs;
        }
        let request = match (&probe.template, head) {
            (Some((uri, headers)), _) => probe_request(uri, headers, model),
            (None, Some((uri, headers))) => probe_request(uri, &copied_headers(headers), model),
            (None, None) => {
                // Counted as a probe, so the missing template is not
                // looked for again on every call.
                slot.probe.start(now);
                slot.probe.finish();
                let record = ProbeRecord {
                    at: SystemTime::now(),
                    outcome: ProbeOutcome::Failed(HealthError::NoTemplate),
                };
                slot.last_probe = Some((now, record));
                return jobs;
            }
        };
        slot.probe.start(now);
        jobs.probe = Some((model.clone(), request));
        jobs
    }

    fn spawn_poll(&self) {
        let guard = FlightGuard {
            shared: Arc::clone(&self.shared),
            model: None,
        };
        let monitor = self.clone();
        let task = async move {
            let _guard = guard;
            monitor.check_now().await;
        };
        if !spawn(task) {
            self.store_check(StatusCheck {
                checked_at: SystemTime::now(),
                result: Err(HealthError::NoRuntime),
            });
        }
    }

    fn spawn_probe(&self, model: Model, request: Request<Full<Bytes>>) {
        let guard = FlightGuard {
            shared: Arc::clone(&self.shared),
            model: Some(model.clone()),
        };
        let monitor = self.clone();
        let probed = model.clone();
        let task = async move {
            let (_guard, model) = (guard, probed);
            let record = monitor.run_probe(request).await;
            tracing::info!(
                target: "tower_overload::health",
                model = %model,
                outcome = ?record.outcome,
                "probe answered"
            );
            monitor.store_probe(&model, record);
        };
        if !spawn(task) {
            let record = ProbeRecord {
                at: SystemTime::now(),
                outcome: ProbeOutcome::Failed(HealthError::NoRuntime),
            };
            self.store_probe(&model, record);
        }
    }

    async fn run_probe(&self, request: Request<Full<Bytes>>) -> ProbeRecord {
        let timeout = self
            .shared
            .config
            .probe
            .as_ref()
            .map_or(super::config::Probe::default().timeout, |probe| {
                probe.timeout
            });
        let sent = self.shared.transport.send(request, PROBE_MAX_BODY);
        let outcome = match tokio::time::timeout(timeout, sent).await {
            Err(_) => ProbeOutcome::Failed(HealthError::Timeout(timeout)),
            Ok(Err(error)) => ProbeOutcome::Failed(error),
            Ok(Ok(reply)) => {
                match classify::classify_body(reply.status, &reply.headers, &reply.body).class {
                    Class::Success => ProbeOutcome::Succeeded,
                    Class::Overloaded => ProbeOutcome::Overloaded,
                    _ => ProbeOutcome::Failed(HealthError::Status(reply.status.as_u16())),
                }
            }
        };
        ProbeRecord {
            at: SystemTime::now(),
            outcome,
        }
    }

    fn store_probe(&self, model: &Model, record: ProbeRecord) {
        let mut state = lock(&self.shared.state);
        if let Some(slot) = state.slots.get_mut(model.as_str()) {
            slot.last_probe = Some((Instant::now(), record));
        }
    }

    /// Reads the status page now, whatever the schedule, records the
    /// outcome as the last check and returns it. Bounded by the poll
    /// timeout and the body cap; never fails, never panics: a page that
    /// cannot be read is an `Err` in the check.
    ///
    /// ```no_run
    /// # use tower_overload::health::{HealthConfig, HealthMonitor};
    /// # async fn run(monitor: HealthMonitor) {
    /// let check = monitor.check_now().await;
    /// match &check.result {
    ///     Ok(page) => println!("{} at {:?}", page.description, check.checked_at),
    ///     Err(error) => println!("status page unreadable: {error}"),
    /// }
    /// # }
    /// ```
    pub async fn check_now(&self) -> StatusCheck {
        let config = &self.shared.config;
        let result = match &config.status_page {
            None => Err(HealthError::NoStatusPage),
            Some(uri) => {
                let mut request = Request::new(Full::new(Bytes::new()));
                *request.uri_mut() = uri.clone();
                request
                    .headers_mut()
                    .insert(header::ACCEPT, HeaderValue::from_static("application/json"));
                let sent = self.shared.transport.send(request, config.max_body);
                match tokio::time::timeout(config.poll_timeout, sent).await {
                    Err(_) => Err(HealthError::Timeout(config.poll_timeout)),
                    Ok(Err(error)) => Err(error),
                    Ok(Ok(reply)) if !reply.status.is_success() => {
                        Err(HealthError::Status(reply.status.as_u16()))
                    }
                    Ok(Ok(reply)) => {
                        StatusSummary::parse(&reply.body, SystemTime::now()).map(Arc::new)
                    }
                }
            }
        };
        let check = StatusCheck {
            checked_at: SystemTime::now(),
            result,
        };
        self.store_check(check.clone());
        check
    }

    fn store_check(&self, check: StatusCheck) {
        match &check.result {
            Ok(page) => {
                let degraded: Vec<String> = page
                    .components
                    .iter()
                    .filter(|component| !component.is_operational())
                    .map(|component| format!("{}: {}", component.name, component.status))
                    .collect();
                let incidents: Vec<&str> = page
                    .incidents
                    .iter()
                    .map(|incident| incident.name.as_str())
                    .collect();
                tracing::info!(
                    target: "tower_overload::health",
                    checked_at = ?check.checked_at,
                    indicator = %page.indicator,
                    ?degraded,
                    ?incidents,
                    "status page checked"
                );
            }
            Err(error) => tracing::warn!(
                target: "tower_overload::health",
                checked_at = ?check.checked_at,
                %error,
                "status page unreadable"
            ),
        }
        #[cfg(feature = "metrics")]
        {
            use crate::metrics::names;
            let at = check
                .checked_at
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |since| since.as_secs_f64());
            let result = if check.result.is_ok() { "ok" } else { "error" };
            metrics::gauge!(names::HEALTH_LAST_CHECK, "result" => result).set(at);
            if let Ok(page) = &check.result {
                metrics::gauge!(names::HEALTH_INCIDENTS).set(page.incidents.len() as f64);
            }
        }
        let mut state = lock(&self.shared.state);
        if let Ok(page) = &check.result {
            state.last_page = Some((Instant::now(), Arc::clone(page)));
        }
        state.last_check = Some(check);
    }

    /// What is behind `model`'s overloads, from the last page read and the
    /// model's last probe, each if newer than the verdict's time to live.
    /// What an adaptive concurrency limit or a router asks.
    ///
    /// ```
    /// # use tower_overload::health::{HealthConfig, HealthMonitor, Verdict};
    /// # let client = tower::service_fn(|_r: http::Request<http_body_util::Full<bytes::Bytes>>| async {
    /// #     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::new())))
    /// # });
    /// let monitor = HealthMonitor::new(client, HealthConfig::default());
    /// assert_eq!(monitor.verdict_for("claude-opus-4-6"), Verdict::Unknown);
    /// ```
    pub fn verdict_for(&self, model: &str) -> Verdict {
        let now = Instant::now();
        let ttl = self.shared.config.verdict_ttl;
        let fresh = |at: &Instant| now.saturating_duration_since(*at) <= ttl;
        let state = lock(&self.shared.state);
        let page = state
            .last_page
            .as_ref()
            .filter(|(at, _)| fresh(at))
            .map(|(_, page)| &**page);
        let probe = state
            .slots
            .get(model)
            .and_then(|slot| slot.last_probe.as_ref())
            .filter(|(at, _)| fresh(at))
            .map(|(_, record)| record);
        decide(model, page, probe)
    }

    /// The outcome of the last read of the page, if any: when, and what it
    /// found or why it failed.
    ///
    /// ```
    /// # use tower_overload::health::{HealthConfig, HealthMonitor};
    /// # let client = tower::service_fn(|_r: http::Request<http_body_util::Full<bytes::Bytes>>| async {
    /// #     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::new())))
    /// # });
    /// let monitor = HealthMonitor::new(client, HealthConfig::default());
    /// assert!(monitor.last_check().is_none());
    /// ```
    pub fn last_check(&self) -> Option<StatusCheck> {
        lock(&self.shared.state).last_check.clone()
    }

    /// The last probe of `model`, if any.
    ///
    /// ```
    /// # use tower_overload::health::{HealthConfig, HealthMonitor};
    /// # let client = tower::service_fn(|_r: http::Request<http_body_util::Full<bytes::Bytes>>| async {
    /// #     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::new())))
    /// # });
    /// let monitor = HealthMonitor::new(client, HealthConfig::default());
    /// assert!(monitor.last_probe("claude-opus-4-6").is_none());
    /// ```
    pub fn last_probe(&self, model: &str) -> Option<ProbeRecord> {
        let state = lock(&self.shared.state);
        let (_, record) = state.slots.get(model)?.last_probe.as_ref()?;
        Some(record.clone())
    }

    /// `model`'s 529 rate over the window, if it is tracked on its own
    /// (else it is counted with the other models, [`other_rate`](Self::other_rate)).
    ///
    /// ```
    /// # use tower_overload::health::{HealthConfig, HealthMonitor};
    /// # let client = tower::service_fn(|_r: http::Request<http_body_util::Full<bytes::Bytes>>| async {
    /// #     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::new())))
    /// # });
    /// let monitor = HealthMonitor::new(client, HealthConfig::default());
    /// assert!(monitor.overload_rate("claude-opus-4-6").is_none());
    /// ```
    pub fn overload_rate(&self, model: &str) -> Option<OverloadRate> {
        let now = Instant::now();
        let state = lock(&self.shared.state);
        Some(state.slots.get(model)?.rate(now, &self.shared.config))
    }

    /// The 529 rate of the models not tracked on their own, and of calls
    /// whose model is unknown.
    ///
    /// ```
    /// # use tower_overload::health::{HealthConfig, HealthMonitor};
    /// # let client = tower::service_fn(|_r: http::Request<http_body_util::Full<bytes::Bytes>>| async {
    /// #     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::new())))
    /// # });
    /// let monitor = HealthMonitor::new(client, HealthConfig::default());
    /// assert_eq!(monitor.other_rate().samples, 0.0);
    /// ```
    pub fn other_rate(&self) -> OverloadRate {
        let now = Instant::now();
        lock(&self.shared.state)
            .other
            .rate(now, &self.shared.config)
    }

    /// How many models have a rate of their own (at most
    /// [`max_models`](HealthConfig::max_models)).
    ///
    /// ```
    /// # use tower_overload::health::{HealthConfig, HealthMonitor};
    /// # let client = tower::service_fn(|_r: http::Request<http_body_util::Full<bytes::Bytes>>| async {
    /// #     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::new())))
    /// # });
    /// let monitor = HealthMonitor::new(client, HealthConfig::default());
    /// assert_eq!(monitor.tracked_models(), 0);
    /// ```
    pub fn tracked_models(&self) -> usize {
        lock(&self.shared.state).slots.len()
    }
}

impl fmt::Debug for HealthMonitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthMonitor")
            .field("config", &self.shared.config)
            .field("tracked_models", &self.tracked_models())
            .finish_non_exhaustive()
    }
}
