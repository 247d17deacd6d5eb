//! The health monitor (issue 18) against a scripted status page and the
//! loopback mock upstream, each a real hyper server on 127.0.0.1, through a
//! real hyper-util client, on a paused clock.

mod support;

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::{MockUpstream, Reply, client, messages_request};
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_overload::body::PeekedBody;
use tower_overload::classify::Class;
use tower_overload::health::{
    HealthConfig, HealthError, HealthMonitor, Probe, ProbeOutcome, Verdict,
};
use tower_overload::retry::{ClassPolicy, FinalFailure, OverloadRetryLayer, RetryPolicy};
use tower_overload::{Error, ErrorKind, Model, RequestId};

const OPUS: &str = "claude-opus-4-6";
const SONNET: &str = "claude-sonnet-4-6";

type Response = http::Response<PeekedBody<hyper::body::Incoming>>;

/// A Statuspage summary with these components and incidents (JSON arrays' insides).
fn page(components: &str, incidents: &str) -> String {
    format!(
        r#"{{"page":{{"id":"p","name":"Claude","url":"https://status.claude.com","time_zone":"Etc/UTC","updated_at":"2026-11-23T12:05:00.000Z"}},
"components":[{components}],"incidents":[{incidents}],"scheduled_maintenances":[],
"status":{{"indicator":"none","description":"All Systems Operational"}}}}"#
    )
}

fn component(name: &str, status: &str) -> String {
    format!(
        r#"{{"id":"c","name":"{name}","status":"{status}","created_at":"2023-01-01T00:00:00.000Z","updated_at":"2026-11-23T12:03:00.000Z","position":1,"description":null,"showcase":true,"start_date":null,"group_id":null,"page_id":"p","group":false,"only_show_if_degraded":false}}"#
    )
}

fn operational() -> String {
    page(
        &[
            component("Claude API (api.anthropic.com)", "operational"),
            component("Claude Opus 4.6", "operational"),
            component("claude.ai", "operational"),
        ]
        .join(","),
        "",
    )
}

fn at(hours: u64, minutes: u64, seconds: u64) -> SystemTime {
    // 2026-11-23 is day 20,780 since the epoch.
    UNIX_EPOCH + Duration::from_secs(20_780 * 86_400 + hours * 3600 + minutes * 60 + seconds)
}

/// A monitor reading `status`'s page through a real client.
fn monitor(status: &MockUpstream, config: HealthConfig) -> HealthMonitor {
    HealthMonitor::new(
        client(),
        config.status_page(Some(status.url("/api/v2/summary.json"))),
    )
}

/// One attempt per call (so each call is one sample), typed errors.
fn one_attempt(monitor: &HealthMonitor) -> RetryPolicy {
    RetryPolicy::foreground()
        .budget(None)
        .seed(18)
        .overloaded(ClassPolicy::never())
        .final_failure(FinalFailure::Error)
        .health(monitor.clone())
}

fn retrying(
    policy: RetryPolicy,
) -> impl Service<Request<Full<Bytes>>, Response = Response, Error = Error, Future: Send> + Clone {
    ServiceBuilder::new()
        .layer(OverloadRetryLayer::new(policy))
        .service(client())
}

/// Lets spawned tasks and loopback I/O run until `done` (a bounded number of
/// 1 ms virtual steps: real sockets answer between them).
async fn settle(mut done: impl FnMut() -> bool) {
    for _ in 0..3000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("never settled");
}

/// The probes the upstream received: requests with `max_tokens: 1`.
fn probes(upstream: &MockUpstream) -> Vec<support::Recorded> {
    upstream
        .requests()
        .into_iter()
        .filter(|request| {
            serde_json::from_slice::<serde_json::Value>(&request.body)
                .is_ok_and(|body| body["max_tokens"] == 1)
        })
        .collect()
}

async fn calls<S, F>(service: &S, count: usize, request: impl Fn() -> Request<Full<Bytes>>)
where
    S: Service<Request<Full<Bytes>>, Response = Response, Error = Error, Future = F> + Clone,
    F: Future<Output = Result<Response, Error>>,
{
    let all = (0..count).map(|_| service.clone().oneshot(request()));
    futures::future::join_all(all).await;
}

#[tokio::test(start_paused = true)]
async fn an_operational_page_declares_nothing() {
    let status = MockUpstream::start().await;
    status.set_default(Reply::raw(200, operational()));
    let monitor = monitor(&status, HealthConfig::default());
    let check = monitor.check_now().await;
    let summary = check.result.as_ref().expect("a page");
    assert_eq!(summary.components.len(), 3);
    assert!(summary.components.iter().all(|c| c.is_operational()));
    assert!(summary.incidents.is_empty());
    assert_eq!(summary.checked_at, check.checked_at.min(summary.checked_at));
    assert_eq!(monitor.last_check(), Some(check));
    assert_eq!(monitor.verdict_for(OPUS), Verdict::Unknown);
    assert_eq!(status.requests()[0].uri.path(), "/api/v2/summary.json");
}

#[tokio::test(start_paused = true)]
async fn a_degraded_api_component_covers_every_model() {
    let status = MockUpstream::start().await;
    status.set_default(Reply::raw(
        200,
        page(
            &[
                component("Claude API (api.anthropic.com)", "degraded_performance"),
                component("claude.ai", "operational"),
            ]
            .join(","),
            "",
        ),
    ));
    let monitor = monitor(&status, HealthConfig::default());
    let checked_at = monitor.check_now().await.result.unwrap().checked_at;
    let expected = Verdict::Incident {
        component: "Claude API (api.anthropic.com)".into(),
        status: "degraded_performance".into(),
        since: Some(at(12, 3, 0)),
        checked_at,
    };
    assert_eq!(monitor.verdict_for(OPUS), expected);
    assert!(monitor.verdict_for("claude-haiku-4-5").is_incident());
}

#[tokio::test(start_paused = true)]
async fn a_major_outage_with_an_incident_names_the_incident_for_its_model_only() {
    let status = MockUpstream::start().await;
    let incident = r#"{"id":"i","name":"Elevated errors on Claude Opus 4.6","status":"investigating","impact":"major",
        "created_at":"2026-11-23T12:04:00.000Z","started_at":"2026-11-23T12:03:00.000Z","resolved_at":null,
        "shortlink":"https://stspg.io/x","page_id":"p","incident_updates":[{"status":"investigating","body":"We are investigating."}],
        "components":[{"id":"o","name":"Claude Opus 4.6","status":"major_outage"}]}"#;
    status.set_default(Reply::raw(
        200,
        page(
            &[
                component("Claude API (api.anthropic.com)", "operational"),
                component("Claude Opus 4.6", "major_outage"),
            ]
            .join(","),
            incident,
        ),
    ));
    let monitor = monitor(&status, HealthConfig::default());
    let checked_at = monitor.check_now().await.checked_at;
    let Verdict::Incident {
        component,
        status: state,
        since,
        checked_at: seen,
    } = monitor.verdict_for(OPUS)
    else {
        panic!("an incident for opus");
    };
    assert_eq!(component, "Elevated errors on Claude Opus 4.6");
    assert_eq!(state, "investigating");
    assert_eq!(since, Some(at(12, 3, 0)));
    assert!(seen <= checked_at);
    assert_eq!(
        monitor.verdict_for(SONNET),
        Verdict::Unknown,
        "another family"
    );
}

#[tokio::test(start_paused = true)]
async fn a_malformed_page_is_a_recorded_error_and_calls_go_on() {
    let status = MockUpstream::start().await;
    status.set_default(Reply::raw(200, "<html>maintenance</html>"));
    let upstream = MockUpstream::start().await;
    upstream.set_default(Reply::overloaded());
    let monitor = monitor(&status, HealthConfig::default().threshold(0.02, 1));
    let service = retrying(one_attempt(&monitor));
    let error = service
        .clone()
        .oneshot(messages_request(&upstream, OPUS))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::RetriesExhausted);
    settle(|| monitor.last_check().is_some()).await;
    assert!(matches!(
        monitor.last_check().unwrap().result,
        Err(HealthError::Malformed(_))
    ));
    assert_eq!(monitor.verdict_for(OPUS), Verdict::Unknown);
    let error = service
        .oneshot(messages_request(&upstream, OPUS))
        .await
        .unwrap_err();
    assert!(error.verdict().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_slow_page_is_bounded_by_the_timeout_and_never_blocks_a_call() {
    let status = MockUpstream::start().await;
    status.set_default(Reply::raw(200, operational()).delay(Duration::from_secs(3600)));
    let upstream = MockUpstream::start().await;
    upstream.push([Reply::overloaded()]);
    let timeout = Duration::from_secs(5);
    let monitor = monitor(
        &status,
        HealthConfig::default()
            .threshold(0.02, 1)
            .poll_timeout(timeout),
    );
    let policy = RetryPolicy::foreground()
        .budget(None)
        .seed(18)
        .health(monitor.clone());
    let started = Instant::now();
    let response = retrying(policy)
        .oneshot(messages_request(&upstream, OPUS))
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "retried past the 529");
    assert!(started.elapsed() < timeout, "{:?}", started.elapsed());
    settle(|| status.request_count() == 1).await;
    assert_eq!(monitor.last_check(), None, "the read is still waiting");
    tokio::time::sleep(timeout).await;
    settle(|| monitor.last_check().is_some()).await;
    assert_eq!(
        monitor.last_check().unwrap().result,
        Err(HealthError::Timeout(timeout))
    );
}

#[tokio::test(start_paused = true)]
async fn a_huge_page_is_capped() {
    let status = MockUpstream::start().await;
    let huge = format!(
        r#"{{"components":[],"padding":"{}"}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    status.set_default(Reply::raw(200, huge));
    let monitor = monitor(&status, HealthConfig::default());
    let check = monitor.check_now().await;
    assert_eq!(check.result, Err(HealthError::BodyTooLarge(1024 * 1024)));
    let roomy = HealthMonitor::new(
        client(),
        HealthConfig::default()
            .status_page(Some(status.url("/api/v2/summary.json")))
            .max_body(4 * 1024 * 1024),
    );
    assert!(
        roomy.check_now().await.result.is_ok(),
        "the cap is the only reason"
    );
}

#[tokio::test(start_paused = true)]
async fn a_probe_that_succeeds_says_local_pressure() {
    let status = MockUpstream::start().await;
    status.set_default(Reply::raw(200, operational()));
    let upstream = MockUpstream::start().await;
    // Twenty calls are overloaded; the probe after them is answered.
    upstream.push((0..20).map(|_| Reply::overloaded()));
    let monitor = monitor(
        &status,
        HealthConfig::default().probe(Some(Probe::default())),
    );
    let service = retrying(one_attempt(&monitor));
    for _ in 0..20 {
        let _ = service
            .clone()
            .oneshot(messages_request(&upstream, OPUS))
            .await;
    }
    settle(|| monitor.last_probe(OPUS).is_some()).await;
    assert_eq!(
        monitor.last_probe(OPUS).unwrap().outcome,
        ProbeOutcome::Succeeded
    );
    let Verdict::LocalPressure { probe_at } = monitor.verdict_for(OPUS) else {
        panic!("local pressure, got {:?}", monitor.verdict_for(OPUS));
    };
    // The probe: same endpoint, key and version as the calls, the model,
    // one output token; sent once, outside the retry loop.
    let sent = probes(&upstream);
    assert_eq!(sent.len(), 1);
    let probe = &sent[0];
    assert_eq!(probe.method, http::Method::POST);
    assert_eq!(probe.uri.path(), "/v1/messages");
    assert_eq!(probe.model.as_deref(), Some(OPUS));
    assert_eq!(probe.headers["x-api-key"], "sk-ant-test-secret");
    assert_eq!(probe.headers["anthropic-version"], "2023-06-01");
    assert_eq!(upstream.request_count(), 21);
    // The next overloaded call says so.
    upstream.push([Reply::overloaded()]);
    let error = service
        .oneshot(messages_request(&upstream, OPUS))
        .await
        .unwrap_err();
    assert_eq!(error.verdict(), Some(&Verdict::LocalPressure { probe_at }));
    assert!(
        error
            .to_string()
            .contains("; a minimal probe to the same model succeeded at ")
            && error
                .to_string()
                .contains(": this looks like local pressure, lower your concurrency"),
        "{error}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_probe_overloaded_too_says_capacity_event() {
    let status = MockUpstream::start().await;
    status.set_default(Reply::raw(200, operational()));
    let upstream = MockUpstream::start().await;
    upstream.set_default(Reply::overloaded());
    let monitor = monitor(
        &status,
        HealthConfig::default().probe(Some(Probe::default())),
    );
    let service = retrying(one_attempt(&monitor));
    for _ in 0..20 {
        let _ = service
            .clone()
            .oneshot(messages_request(&upstream, OPUS))
            .await;
    }
    settle(|| monitor.last_probe(OPUS).is_some()).await;
    assert_eq!(
        monitor.last_probe(OPUS).unwrap().outcome,
        ProbeOutcome::Overloaded
    );
    assert!(matches!(
        monitor.verdict_for(OPUS),
        Verdict::CapacityEvent { .. }
    ));
    let error = service
        .oneshot(messages_request(&upstream, OPUS))
        .await
        .unwrap_err();
    assert!(matches!(
        error.verdict(),
        Some(Verdict::CapacityEvent { .. })
    ));
    assert!(
        error.to_string().contains("was overloaded too at "),
        "{error}"
    );
    // A failure returned as a response carries the verdict as an extension.
    let policy = one_attempt(&monitor).final_failure(FinalFailure::Response);
    let response = retrying(policy)
        .oneshot(messages_request(&upstream, OPUS))
        .await
        .unwrap();
    assert_eq!(response.status(), 529);
    assert!(matches!(
        response.extensions().get::<Verdict>(),
        Some(Verdict::CapacityEvent { .. })
    ));
    assert_eq!(probes(&upstream).len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_declared_incident_stops_the_probes_of_its_model() {
    let status = MockUpstream::start().await;
    let incident = r#"{"name":"Elevated errors on Claude Opus 4.6","status":"identified","started_at":"2026-11-23T12:03:00Z"}"#;
    status.set_default(Reply::raw(200, page("", incident)));
    let upstream = MockUpstream::start().await;
    upstream.set_default(Reply::overloaded());
    let monitor = monitor(
        &status,
        HealthConfig::default().probe(Some(Probe::default())),
    );
    let service = retrying(one_attempt(&monitor));
    // The first raise reads the page and probes at once (nothing is known yet).
    calls(&service, 20, || messages_request(&upstream, OPUS)).await;
    settle(|| monitor.last_check().is_some() && monitor.last_probe(OPUS).is_some()).await;
    assert!(
        monitor.verdict_for(OPUS).is_incident(),
        "the page wins over the probe"
    );
    // Intervals later, the incident is still declared: no more probes.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(61)).await;
        calls(&service, 20, || messages_request(&upstream, OPUS)).await;
    }
    settle(|| status.request_count() == 6).await;
    assert_eq!(probes(&upstream).len(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_probe_is_off_by_default() {
    let status = MockUpstream::start().await;
    status.set_default(Reply::raw(200, operational()));
    let upstream = MockUpstream::start().await;
    upstream.set_default(Reply::overloaded());
    let monitor = monitor(&status, HealthConfig::default());
    let service = retrying(one_attempt(&monitor));
    calls(&service, 200, || messages_request(&upstream, OPUS)).await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    calls(&service, 200, || messages_request(&upstream, OPUS)).await;
    settle(|| status.request_count() == 2).await;
    assert_eq!(probes(&upstream).len(), 0);
    assert_eq!(upstream.request_count(), 400, "only the callers' attempts");
    assert_eq!(monitor.last_probe(OPUS), None);
}

#[tokio::test(start_paused = true)]
async fn one_probe_and_one_read_per_interval_under_a_thousand_concurrent_failing_calls() {
    let status = MockUpstream::start().await;
    status.set_default(Reply::raw(200, operational()));
    let upstream = MockUpstream::start().await;
    upstream.set_default(Reply::overloaded());
    let interval = Duration::from_secs(60);
    let monitor = monitor(
        &status,
        HealthConfig::default()
            .poll_interval(interval)
            .probe(Some(Probe::default().interval(interval))),
    );
    let service = retrying(one_attempt(&monitor));
    calls(&service, 1000, || messages_request(&upstream, OPUS)).await;
    settle(|| monitor.last_probe(OPUS).is_some()).await;
    assert_eq!(probes(&upstream).len(), 1);
    assert_eq!(status.request_count(), 1);
    // Within the interval: nothing more, however many calls fail.
    calls(&service, 1000, || messages_request(&upstream, OPUS)).await;
    assert_eq!(probes(&upstream).len(), 1);
    assert_eq!(status.request_count(), 1);
    // The next interval: exactly one more of each.
    tokio::time::sleep(interval).await;
    calls(&service, 1000, || messages_request(&upstream, OPUS)).await;
    settle(|| probes(&upstream).len() == 2 && status.request_count() == 2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(probes(&upstream).len(), 2);
    assert_eq!(status.request_count(), 2);
    // Every call was sent (a loopback connection reset under load may add a
    // transport retry; the probes are counted exactly above).
    assert!(upstream.request_count() >= 3000 + 2);
}

#[tokio::test(start_paused = true)]
async fn no_reading_while_the_rate_is_low_beyond_the_idle_setting() {
    let status = MockUpstream::start().await;
    status.set_default(Reply::raw(200, operational()));
    let upstream = MockUpstream::start().await;
    upstream.set_default(Reply::ok());
    // The default reads nothing while all is well; once a minute reads once a minute.
    let configs = [
        (HealthConfig::default(), 0),
        (
            HealthConfig::default().idle_poll_interval(Some(Duration::from_secs(60))),
            5,
        ),
    ];
    for (config, expected) in configs {
        let reads_before = status.request_count();
        let idle = config.clone();
        let monitor = monitor(&status, config);
        let service = retrying(one_attempt(&monitor));
        // A call every 10 s for 5 minutes, all successes.
        for _ in 0..30 {
            service
                .clone()
                .oneshot(messages_request(&upstream, OPUS))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        assert_eq!(status.request_count() - reads_before, expected, "{idle:?}");
    }
}

#[test]
fn the_error_says_each_verdict() {
    let id = RequestId::new(http::HeaderValue::from_static("req_011CSHoE")).unwrap();
    let base = || {
        Error::new(ErrorKind::RetriesExhausted)
            .with_class(Class::Overloaded)
            .with_status(http::StatusCode::from_u16(529).unwrap())
            .with_model(Model::new(OPUS))
            .with_attempts(5)
            .with_elapsed(Duration::from_secs(62))
            .with_request_id(id.clone())
    };
    let incident = base().with_verdict(Verdict::Incident {
        component: "Elevated errors on Claude Opus".into(),
        status: "investigating".into(),
        since: Some(at(12, 3, 0)),
        checked_at: at(12, 5, 10),
    });
    assert_eq!(
        incident.to_string(),
        "Claude API overloaded (529) for claude-opus-4-6 after 5 attempts over 62 s; \
         status page: 'Elevated errors on Claude Opus' (investigating) since 12:03Z (checked 12:05:10Z); \
         request-id req_011CSHoE; wait and do not hammer the API, or fall back to another model \
         if continuity matters"
    );
    let component = base().with_verdict(Verdict::Incident {
        component: "Claude API".into(),
        status: "degraded_performance".into(),
        since: None,
        checked_at: at(12, 5, 10),
    });
    assert!(
        component
            .to_string()
            .contains("; status page: 'Claude API' (degraded performance) (checked 12:05:10Z);")
    );
    let local = base().with_verdict(Verdict::LocalPressure {
        probe_at: at(12, 5, 10),
    });
    assert_eq!(
        local.to_string(),
        "Claude API overloaded (529) for claude-opus-4-6 after 5 attempts over 62 s; \
         a minimal probe to the same model succeeded at 12:05:10Z: this looks like local pressure, \
         lower your concurrency; request-id req_011CSHoE"
    );
    let capacity = base().with_verdict(Verdict::CapacityEvent {
        probe_at: at(12, 5, 10),
    });
    assert_eq!(
        capacity.to_string(),
        "Claude API overloaded (529) for claude-opus-4-6 after 5 attempts over 62 s; \
         a minimal probe to the same model was overloaded too at 12:05:10Z: this looks like a \
         capacity event beyond your traffic; request-id req_011CSHoE; wait and do not hammer the \
         API, or fall back to another model if continuity matters"
    );
    let unknown = base().with_verdict(Verdict::Unknown);
    assert_eq!(unknown.verdict(), None);
    assert_eq!(unknown.to_string(), base().to_string());
    assert!(unknown.to_string().ends_with(
        "the model is at capacity for everyone: retry later, lower concurrency or fall back to \
         another model (see status.claude.com)"
    ));
}

#[tokio::test(start_paused = true)]
async fn a_hundred_thousand_model_names_do_not_grow_memory() {
    let monitor = HealthMonitor::new(
        client(),
        HealthConfig::default()
            .status_page(None)
            .probe(Some(Probe::default())),
    );
    for _ in 0..20 {
        monitor.record(&Model::new("claude-opus-0"), Class::Overloaded);
    }
    for i in 0..100_000 {
        monitor.record(&Model::new(format!("claude-opus-{i}")), Class::Overloaded);
    }
    assert_eq!(monitor.tracked_models(), 64);
    assert!(monitor.overload_rate("claude-opus-0").is_some());
    assert!(monitor.overload_rate("claude-opus-99999").is_none());
    assert_eq!(monitor.other_rate().samples, (100_000 - 64) as f64);
    // The folded names are never probed; the tracked ones have no request
    // to copy (`record` gives no head, no template was set).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(monitor.last_probe("claude-opus-99999"), None);
    assert!(matches!(
        monitor.last_probe("claude-opus-0").unwrap().outcome,
        ProbeOutcome::Failed(HealthError::NoTemplate)
    ));
}

/// A concurrency layer that adapts (limit `max`), with or without the monitor.
fn adaptive(
    max: usize,
    monitor: Option<&HealthMonitor>,
) -> tower_overload::concurrency::ConcurrencyPerModelLayer {
    let layer = tower_overload::concurrency::ConcurrencyPerModelLayer::new(max)
        .adaptive(tower_overload::concurrency::Aimd::default());
    match monitor {
        Some(monitor) => layer.health(monitor.clone()),
        None => layer,
    }
}

/// One call through `layer` to `upstream` answering `reply`, body read.
async fn one_call(
    layer: &tower_overload::concurrency::ConcurrencyPerModelLayer,
    upstream: &MockUpstream,
    reply: Reply,
) {
    use http_body_util::BodyExt;
    use tower::Layer;
    upstream.push([reply]);
    let response = layer
        .layer(client())
        .oneshot(messages_request(upstream, OPUS))
        .await
        .unwrap();
    response.into_body().collect().await.unwrap();
}

fn limit_of(layer: &tower_overload::concurrency::ConcurrencyPerModelLayer) -> usize {
    layer.snapshot()[0].limit
}

#[tokio::test(start_paused = true)]
async fn under_local_pressure_the_adaptive_limit_shrinks_harder() {
    let status = MockUpstream::start().await;
    status.set_default(Reply::raw(200, operational()));
    let upstream = MockUpstream::start().await;
    upstream.push((0..20).map(|_| Reply::overloaded()));
    let monitor = monitor(
        &status,
        HealthConfig::default().probe(Some(Probe::default())),
    );
    let service = retrying(one_attempt(&monitor));
    calls(&service, 20, || messages_request(&upstream, OPUS)).await;
    settle(|| monitor.last_probe(OPUS).is_some()).await;
    assert!(matches!(
        monitor.verdict_for(OPUS),
        Verdict::LocalPressure { .. }
    ));
    let told = adaptive(16, Some(&monitor));
    let untold = adaptive(16, None);
    for layer in [&told, &untold] {
        one_call(layer, &upstream, Reply::overloaded()).await;
    }
    assert_eq!(
        limit_of(&untold),
        14,
        "one shrink by 0.9, at least one permit"
    );
    assert_eq!(
        limit_of(&told),
        12,
        "two shrinks: lowering concurrency is the fix"
    );
}

#[tokio::test(start_paused = true)]
async fn during_a_declared_incident_the_adaptive_limit_does_not_grow_back() {
    let status = MockUpstream::start().await;
    let incident = r#"{"id":"i","name":"Elevated errors on Claude Opus 4.6","status":"investigating","impact":"major",
        "created_at":"2026-11-23T12:04:00.000Z","started_at":"2026-11-23T12:03:00.000Z","resolved_at":null,
        "shortlink":"https://stspg.io/x","page_id":"p","incident_updates":[],
        "components":[{"id":"o","name":"Claude Opus 4.6","status":"major_outage"}]}"#;
    status.set_default(Reply::raw(
        200,
        page(&component("Claude Opus 4.6", "major_outage"), incident),
    ));
    let upstream = MockUpstream::start().await;
    let monitor = monitor(&status, HealthConfig::default());
    monitor.check_now().await;
    assert!(matches!(
        monitor.verdict_for(OPUS),
        Verdict::Incident { .. }
    ));
    let told = adaptive(2, Some(&monitor));
    let untold = adaptive(2, None);
    for layer in [&told, &untold] {
        one_call(layer, &upstream, Reply::overloaded()).await;
        assert_eq!(limit_of(layer), 1);
        one_call(layer, &upstream, Reply::ok()).await;
    }
    assert_eq!(limit_of(&untold), 2, "a success grows the limit back");
    assert_eq!(limit_of(&told), 1, "not into a declared incident");
    // Once the page clears, the limit grows again.
    status.set_default(Reply::raw(200, operational()));
    monitor.check_now().await;
    one_call(&told, &upstream, Reply::ok()).await;
    assert_eq!(limit_of(&told), 2);
}

#[tokio::test(start_paused = true)]
async fn the_log_layer_writes_the_verdict_on_a_failed_call() {
    let status = MockUpstream::start().await;
    status.set_default(Reply::raw(200, operational()));
    let upstream = MockUpstream::start().await;
    upstream.push((0..20).map(|_| Reply::overloaded()));
    let monitor = monitor(
        &status,
        HealthConfig::default().probe(Some(Probe::default())),
    );
    let service = retrying(one_attempt(&monitor));
    calls(&service, 20, || messages_request(&upstream, OPUS)).await;
    settle(|| monitor.last_probe(OPUS).is_some()).await;
    // A call that fails now is logged with the verdict beside the error.
    let (logs, _guard) = support::capture_logs();
    upstream.push([Reply::overloaded()]);
    let logged = ServiceBuilder::new()
        .layer(tower_overload::request_id::RequestIdLogLayer::new())
        .layer(OverloadRetryLayer::new(one_attempt(&monitor)))
        .service(client());
    let _ = logged
        .oneshot(messages_request(&upstream, OPUS))
        .await
        .unwrap_err();
    let text = logs.text();
    let line = text
        .lines()
        .find(|line| line.contains("llm call failed"))
        .unwrap_or_else(|| panic!("no final line in {text}"));
    assert!(
        line.contains("verdict=a minimal probe to the same model succeeded at "),
        "{line}"
    );
}

#[cfg(feature = "metrics")]
#[tokio::test(start_paused = true)]
async fn the_last_check_and_the_incidents_are_gauges() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let status = MockUpstream::start().await;
    let incident = r#"{"id":"i","name":"Elevated errors on Claude Opus 4.6","status":"investigating","impact":"major",
        "created_at":"2026-11-23T12:04:00.000Z","started_at":"2026-11-23T12:03:00.000Z","resolved_at":null,
        "shortlink":"https://stspg.io/x","page_id":"p","incident_updates":[],
        "components":[{"id":"o","name":"Claude Opus 4.6","status":"major_outage"}]}"#;
    status.set_default(Reply::raw(
        200,
        page(&component("Claude Opus 4.6", "major_outage"), incident),
    ));
    let monitor = monitor(&status, HealthConfig::default());
    let checked = monitor.check_now().await.checked_at;
    let gauges: Vec<(String, Vec<String>, f64)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| match value {
            DebugValue::Gauge(value) => Some((
                key.key().name().to_owned(),
                key.key()
                    .labels()
                    .map(|label| format!("{}={}", label.key(), label.value()))
                    .collect(),
                value.into_inner(),
            )),
            _ => None,
        })
        .collect();
    let find = |name: &str| gauges.iter().find(|(n, _, _)| n == name).cloned();
    let (_, _, incidents) = find("tower_overload.health.incidents").expect("an incidents gauge");
    assert_eq!(incidents, 1.0);
    let (_, labels, at) = find("tower_overload.health.last_check").expect("a last check gauge");
    assert_eq!(labels, ["result=ok"]);
    let expected = checked
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((at - expected).abs() < 1.0, "{at} vs {expected}");
}
