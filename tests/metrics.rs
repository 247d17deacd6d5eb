//! What the layers record through the `metrics` facade (feature `metrics`),
//! read with `metrics-util`'s debugging recorder, one local recorder per
//! test, against the loopback mock on a paused clock.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashSet;
use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use support::{MockUpstream, Reply, capture_logs, client, messages_request};
use tower::{Layer, ServiceExt, service_fn};
use tower_overload::fallback::{ModelFallbackLayer, ServedBy};
use tower_overload::metrics::{MAX_MODELS, PriceTable, Prices, names};
use tower_overload::retry::{OverloadRetryLayer, RetryPolicy};
use tower_overload::stack::OverloadStack;
use tower_overload::stats::OverloadStats;

const OPUS: &str = "claude-opus-4-6";
const SONNET: &str = "claude-sonnet-4-6";

// ===== reading the recorder =====

type Entry = (
    metrics_util::CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    DebugValue,
);

fn entries(snapshotter: &Snapshotter) -> Vec<Entry> {
    snapshotter.snapshot().into_vec()
}

/// The entries named `name` whose labels include every one of `labels`.
fn matching<'a>(
    entries: &'a [Entry],
    name: &'a str,
    labels: &'a [(&'a str, &'a str)],
) -> impl Iterator<Item = &'a Entry> + 'a {
    entries.iter().filter(move |(key, ..)| {
        key.key().name() == name
            && labels.iter().all(|(k, v)| {
                key.key()
                    .labels()
                    .any(|label| label.key() == *k && label.value() == *v)
            })
    })
}

fn counter(entries: &[Entry], name: &str, labels: &[(&str, &str)]) -> u64 {
    matching(entries, name, labels)
        .map(|(.., value)| match value {
            DebugValue::Counter(n) => *n,
            other => panic!("{name} is not a counter: {other:?}"),
        })
        .sum()
}

fn histogram(entries: &[Entry], name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    matching(entries, name, labels)
        .flat_map(|(.., value)| match value {
            DebugValue::Histogram(values) => values.iter().map(|v| v.0).collect::<Vec<_>>(),
            other => panic!("{name} is not a histogram: {other:?}"),
        })
        .collect()
}

fn gauge(entries: &[Entry], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    matching(entries, name, labels)
        .map(|(.., value)| match value {
            DebugValue::Gauge(value) => value.0,
            other => panic!("{name} is not a gauge: {other:?}"),
        })
        .next()
}

fn labels_of(entry: &Entry) -> Vec<(String, String)> {
    entry
        .0
        .key()
        .labels()
        .map(|l| (l.key().to_owned(), l.value().to_owned()))
        .collect()
}

fn model_of(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body).unwrap()["model"]
        .as_str()
        .unwrap()
        .to_owned()
}

// ===== the tests =====

#[tokio::test(start_paused = true)]
async fn a_529_storm_with_fallback_is_recorded_with_genai_names_and_labels() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let mock = MockUpstream::start().await;
    mock.storm(OPUS, Duration::from_secs(3600), Reply::overloaded());
    let stats = OverloadStats::new();
    let service = OverloadStack::new()
        .fallback(ModelFallbackLayer::new([OPUS, SONNET]))
        .retry(RetryPolicy::foreground().budget(None).seed(7))
        .stats(stats.clone())
        .layer(client());
    let response = service
        .oneshot(messages_request(&mock, OPUS))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .extensions()
            .get::<ServedBy>()
            .unwrap()
            .served
            .as_str(),
        SONNET
    );
    response.into_body().collect().await.unwrap();

    let sent_to_opus = mock
        .requests()
        .iter()
        .filter(|r| model_of(&r.body) == OPUS)
        .count() as u64;
    assert!(
        sent_to_opus >= 2,
        "the storm was retried before falling back"
    );
    let all = entries(&snapshotter);

    // Every attempt, by class and outcome: the last one on opus gave up.
    let opus = ("gen_ai.request.model", OPUS);
    assert_eq!(
        counter(&all, names::ATTEMPTS, &[opus, ("class", "overloaded")]),
        sent_to_opus
    );
    assert_eq!(
        counter(
            &all,
            names::ATTEMPTS,
            &[opus, ("class", "overloaded"), ("outcome", "final")]
        ),
        1
    );
    let retried = counter(
        &all,
        names::ATTEMPTS,
        &[opus, ("class", "overloaded"), ("outcome", "retried")],
    );
    assert_eq!(retried, sent_to_opus - 1);
    assert_eq!(
        counter(&all, names::RETRIES, &[opus, ("class", "overloaded")]),
        retried
    );
    let waits = histogram(&all, names::RETRY_WAIT, &[opus, ("class", "overloaded")]);
    assert_eq!(waits.len() as u64, retried);
    assert!(waits.iter().all(|w| *w >= 0.0 && *w <= 60.0), "{waits:?}");
    assert_eq!(
        counter(
            &all,
            names::ATTEMPTS,
            &[
                ("gen_ai.request.model", SONNET),
                ("class", "success"),
                ("outcome", "final")
            ]
        ),
        1
    );

    // The fallback, from and to.
    assert_eq!(
        counter(&all, names::FALLBACKS, &[("from", OPUS), ("to", SONNET)]),
        1
    );

    // One GenAI operation: asked opus, answered by sonnet, no error.type.
    let opus_only = [opus];
    let durations = matching(&all, names::OPERATION_DURATION, &opus_only)
        .filter(|(.., value)| matches!(value, DebugValue::Histogram(h) if !h.is_empty()))
        .collect::<Vec<_>>();
    assert_eq!(durations.len(), 1, "one series recorded");
    let labels = labels_of(durations[0]);
    for expected in [
        ("gen_ai.provider.name", "anthropic"),
        ("gen_ai.operation.name", "chat"),
        ("gen_ai.request.model", OPUS),
        ("gen_ai.response.model", SONNET),
        ("server.address", "127.0.0.1"),
    ] {
        assert!(
            labels
                .iter()
                .any(|(k, v)| k == expected.0 && v.starts_with(expected.1)),
            "{expected:?} missing from {labels:?}"
        );
    }
    assert!(!labels.iter().any(|(k, _)| k == "error.type"));
    let duration = histogram(&all, names::OPERATION_DURATION, &[opus]);
    assert_eq!(duration.len(), 1);
    assert!(duration[0] > 0.0, "retries took virtual time: {duration:?}");
    assert_eq!(durations[0].1, Some(metrics::Unit::Seconds));

    // The 529 rate of all traffic and of opus, from the stats.
    let rate = gauge(
        &all,
        names::OVERLOAD_RATE,
        &[("gen_ai.request.model", "all")],
    )
    .unwrap();
    assert!(
        (rate - stats.overload_rate()).abs() < 1e-9 && rate > 0.5,
        "{rate}"
    );
    assert_eq!(gauge(&all, names::OVERLOAD_RATE, &[opus]), Some(1.0));
    // The breaker of opus was seen closed, in flight went back to zero.
    assert!(gauge(&all, names::BREAKER_STATE, &[opus]).is_some());
    assert_eq!(
        gauge(&all, names::IN_FLIGHT, &[("gen_ai.request.model", SONNET)]),
        Some(0.0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_429_wait_is_recorded_as_a_rate_limited_retry() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let mock = MockUpstream::start().await;
    mock.push([Reply::rate_limited().retry_after("2"), Reply::ok()]);
    let stats = OverloadStats::new();
    let service = OverloadStack::new()
        .retry(RetryPolicy::foreground().seed(1))
        .stats(stats.clone())
        .layer(client());
    let started = tokio::time::Instant::now();
    let response = service
        .oneshot(messages_request(&mock, OPUS))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(started.elapsed() >= Duration::from_secs(2));
    response.into_body().collect().await.unwrap();

    let all = entries(&snapshotter);
    let opus = ("gen_ai.request.model", OPUS);
    let waits = histogram(&all, names::RETRY_WAIT, &[opus, ("class", "rate_limited")]);
    assert_eq!(waits.len(), 1, "{waits:?}");
    assert!(
        (2.0..=3.0).contains(&waits[0]),
        "waited what the server said: {waits:?}"
    );
    assert_eq!(
        counter(&all, names::RETRIES, &[opus, ("class", "rate_limited")]),
        1
    );
    assert_eq!(
        counter(
            &all,
            names::ATTEMPTS,
            &[opus, ("class", "rate_limited"), ("outcome", "retried")]
        ),
        1
    );
    assert_eq!(
        gauge(
            &all,
            names::RATE_LIMIT_RATE,
            &[("gen_ai.request.model", "all")]
        ),
        Some(0.5)
    );
    // The call succeeded: its duration has no error.type, and covers the wait.
    let duration = histogram(&all, names::OPERATION_DURATION, &[opus]);
    assert_eq!(duration.len(), 1);
    assert!(duration[0] >= 2.0, "{duration:?}");
    assert!(
        matching(
            &all,
            names::OPERATION_DURATION,
            &[("error.type", "rate_limited")]
        )
        .all(|(.., v)| matches!(v, DebugValue::Histogram(h) if h.is_empty())),
        "the call did not fail"
    );
}

/// A stream with usage in `message_start` and `message_delta`, its head
/// after 200 ms, one event every 300 ms.
fn usage_stream() -> Reply {
    Reply::sse(&[
        (
            "message_start",
            r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"usage":{"input_tokens":25,"cache_creation_input_tokens":10,"cache_read_input_tokens":100,"output_tokens":1}}}"#,
        ),
        (
            "content_block_start",
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        ),
        (
            "content_block_delta",
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#,
        ),
        (
            "message_delta",
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":15}}"#,
        ),
        ("message_stop", r#"{"type":"message_stop"}"#),
    ])
    .delay(Duration::from_millis(200))
    .chunk_interval(Duration::from_millis(300))
}

#[tokio::test(start_paused = true)]
async fn a_streams_time_to_first_chunk_and_token_usage_are_recorded() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let mock = MockUpstream::start().await;
    mock.push([usage_stream()]);
    let prices = PriceTable::new().price(OPUS, Prices::per_million(5.0, 25.0, 0.5, 6.25));
    let service = OverloadStack::new().prices(prices).layer(client());
    let response = service
        .oneshot(messages_request(&mock, OPUS))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let opus = ("gen_ai.request.model", OPUS);
    // The head came: nothing of the body was read yet, no first chunk, no usage.
    // (A snapshot drains histograms: each value is read once.)
    let all = entries(&snapshotter);
    assert!(histogram(&all, names::TIME_TO_FIRST_CHUNK, &[]).is_empty());
    assert_eq!(counter(&all, names::TOKENS, &[]), 0);
    let head = histogram(&all, names::TIME_TO_RESPONSE_HEAD, &[opus]);
    assert_eq!(head.len(), 1);
    assert!((0.2..0.3).contains(&head[0]), "{head:?}");

    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(body.starts_with(b"event: message_start"), "passed through");
    let all = entries(&snapshotter);
    let first = histogram(
        &all,
        names::TIME_TO_FIRST_CHUNK,
        &[opus, ("gen_ai.provider.name", "anthropic")],
    );
    assert_eq!(first.len(), 1);
    // The delta is the third event: two intervals after the head at least.
    assert!(
        first[0] >= head[0] + 0.6 && first[0] < head[0] + 1.0,
        "{first:?} after a head at {head:?}"
    );

    let input = histogram(
        &all,
        names::TOKEN_USAGE,
        &[opus, ("gen_ai.token.type", "input")],
    );
    let output = histogram(
        &all,
        names::TOKEN_USAGE,
        &[opus, ("gen_ai.token.type", "output")],
    );
    assert_eq!(input, [135.0], "input, cache writes and reads");
    assert_eq!(output, [15.0], "the last running total");
    for (kind, n) in [
        ("input", 25),
        ("output", 15),
        ("cache_read", 100),
        ("cache_write", 10),
    ] {
        assert_eq!(
            counter(&all, names::TOKENS, &[opus, ("gen_ai.token.type", kind)]),
            n,
            "{kind}"
        );
    }
    // 25×5 + 15×25 + 100×0.5 + 10×6.25 micro-dollars.
    assert_eq!(counter(&all, names::COST, &[opus]), 125 + 375 + 50 + 63);
}

#[tokio::test(start_paused = true)]
async fn a_json_responses_usage_is_read_as_it_passes() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let mock = MockUpstream::start().await;
    mock.push([Reply::raw(
        200,
        r#"{"type":"message","model":"claude-opus-4-6","content":[{"type":"text","text":"{\"usage\":{\"input_tokens\":9}}"}],"usage":{"input_tokens":12,"output_tokens":30}}"#,
    )
    .header("content-type", "application/json")]);
    let service = OverloadRetryLayer::new(RetryPolicy::foreground()).layer(client());
    let response = service
        .oneshot(messages_request(&mock, OPUS))
        .await
        .unwrap();
    response.into_body().collect().await.unwrap();
    let all = entries(&snapshotter);
    let opus = ("gen_ai.request.model", OPUS);
    assert_eq!(
        counter(&all, names::TOKENS, &[opus, ("gen_ai.token.type", "input")]),
        12,
        "the top-level usage, not one quoted in the content"
    );
    assert_eq!(
        counter(
            &all,
            names::TOKENS,
            &[opus, ("gen_ai.token.type", "output")]
        ),
        30
    );
    assert!(
        histogram(&all, names::TIME_TO_FIRST_CHUNK, &[]).is_empty(),
        "not a stream"
    );
}

/// What the no-op upstreams answer.
type Answer = std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>;

/// A no-op upstream answering a JSON message with its usage.
fn json_upstream() -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = Answer,
> + Clone {
    service_fn(|_request: Request<Full<Bytes>>| {
        std::future::ready(Ok(Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(
                br#"{"type":"message","usage":{"input_tokens":3,"output_tokens":4}}"#,
            )))
            .unwrap()))
    })
}

fn request_for(model: &str) -> Request<Full<Bytes>> {
    let body = format!(
        r#"{{"model":{},"max_tokens":16,"messages":[]}}"#,
        serde_json::json!(model)
    );
    Request::post("http://api.invalid/v1/messages")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn label_cardinality_stays_bounded_under_100000_model_names() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let service = OverloadStack::new()
        .stats(OverloadStats::new())
        .layer(json_upstream());
    for i in 0..100_000u32 {
        // Some names are not fit to be labels at all.
        let model = match i % 4 {
            0 => format!("claude-{i}\"}} 1\n"),
            1 => "x".repeat(300 + i as usize % 7),
            _ => format!("claude-{i}"),
        };
        let response = service.clone().oneshot(request_for(&model)).await.unwrap();
        response.into_body().collect().await.unwrap();
    }
    let all = entries(&snapshotter);
    let mut per_metric: std::collections::HashMap<String, HashSet<String>> = Default::default();
    for entry in &all {
        for (key, value) in labels_of(entry) {
            if key.starts_with("gen_ai.") && key.ends_with("model") {
                per_metric
                    .entry(format!("{} {key}", entry.0.key().name()))
                    .or_default()
                    .insert(value);
            }
        }
    }
    assert!(per_metric.contains_key(&format!("{} gen_ai.request.model", names::ATTEMPTS)));
    for (metric, values) in &per_metric {
        // The cap, `other`, and the stats' `all`.
        assert!(
            values.len() <= MAX_MODELS + 2,
            "{metric}: {} label values",
            values.len()
        );
        for value in values {
            assert!(
                tower_overload::metrics::clean_label(value).is_some() || value == "other",
                "{metric}: {value:?} is not a clean label"
            );
        }
    }
    assert!(all.len() < 10_000, "{} series", all.len());
    // Everything past the cap was still counted, under `other`.
    assert_eq!(
        counter(&all, names::ATTEMPTS, &[("class", "success")]),
        100_000
    );
}

// ===== allocations =====

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; counting touches a
// const-initialised thread-local `Cell`, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's pointer and layout, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// An upstream answering with no body worth measuring (no content type):
/// what a call costs besides the body's reader.
fn bare_upstream() -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = Answer,
> + Clone {
    service_fn(|_request: Request<Full<Bytes>>| {
        std::future::ready(Ok(Response::new(Full::new(Bytes::new()))))
    })
}

/// Counts registrations and hands out no-op handles: what a call costs
/// for its metric keys, apart from what a recorder does with a value.
#[derive(Default)]
struct RegistrationCounter(std::sync::atomic::AtomicUsize);

impl metrics::Recorder for RegistrationCounter {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics::Counter::noop()
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics::Histogram::noop()
    }
}

#[test]
fn no_metric_keys_are_allocated_per_call() {
    let recorder = RegistrationCounter::default();
    let _local = metrics::set_default_local_recorder(&recorder);
    let registered = || recorder.0.load(std::sync::atomic::Ordering::Relaxed);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let per_call = |stack: OverloadStack| {
        let service = stack.layer(bare_upstream());
        runtime.block_on(async {
            // The first calls register the handles; the rest reuse them.
            for _ in 0..10 {
                let response = service.clone().oneshot(request_for(OPUS)).await.unwrap();
                response.into_body().collect().await.unwrap();
            }
            let (before, keys) = (allocations(), registered());
            for _ in 0..1_000 {
                let response = service.clone().oneshot(request_for(OPUS)).await.unwrap();
                response.into_body().collect().await.unwrap();
            }
            assert_eq!(
                registered(),
                keys,
                "no handle registered after the first calls"
            );
            (allocations() - before) as f64 / 1_000.0
        })
    };
    let with_metrics = per_call(OverloadStack::new());
    assert!(registered() > 0, "the stack registered its handles");
    let without = per_call(OverloadStack::new().metrics(false));
    // Equal but for the runtime's own occasional allocations (far below one per call).
    assert!(
        (with_metrics - without).abs() < 0.01,
        "allocations per call: {with_metrics} recording, {without} not"
    );
}

// ===== the log layer =====

#[tokio::test(start_paused = true)]
async fn each_attempt_is_logged_when_it_ends_with_every_field() {
    let (logs, _guard) = capture_logs();
    let mock = MockUpstream::start().await;
    mock.push([
        Reply::overloaded(),
        Reply::overloaded(),
        Reply::ok().delay(Duration::from_secs(30)),
    ]);
    let service = OverloadStack::new()
        .retry(RetryPolicy::foreground().budget(None).seed(3))
        .layer(client());
    let call = tokio::spawn(service.oneshot(messages_request(&mock, OPUS)));
    // Until the second attempt failed: the call is still on (its third
    // attempt takes 30 s), and both failures are in the log already.
    let mut waited = Duration::ZERO;
    while logs.text().matches("llm attempt failed").count() < 2 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += Duration::from_millis(50);
        assert!(waited < Duration::from_secs(120), "{}", logs.text());
    }
    assert!(!call.is_finished(), "logged before the call ended");
    assert!(!logs.text().contains("llm call"), "{}", logs.text());
    let response = call.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    let text = logs.text();
    let attempts: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("llm attempt"))
        .collect();
    assert_eq!(attempts.len(), 3, "{text}");
    for (n, line) in attempts.iter().enumerate() {
        assert!(line.contains(&format!("attempt={} of=6", n + 1)), "{line}");
        for field in [
            "status",
            "request_id",
            "model",
            "attempt",
            "of",
            "latency_ms",
            "delay_ms",
        ] {
            assert!(
                !line.contains(&format!(" {field}=-")),
                "every field filled: {line}"
            );
        }
        assert!(line.contains("request_id=req_mock_"), "{line}");
        assert!(line.contains("llm_call{"), "inside the call's span: {line}");
        assert!(
            line.contains(&format!("gen_ai.request.model={OPUS}")),
            "{line}"
        );
    }
    assert!(attempts[2].contains("latency_ms=30000"), "{}", attempts[2]);
    assert!(text.contains("llm call succeeded"));
}

#[tokio::test(start_paused = true)]
async fn a_call_skipped_past_an_open_breaker_is_logged() {
    let (logs, _guard) = capture_logs();
    let mock = MockUpstream::start().await;
    mock.storm(OPUS, Duration::from_secs(3600), Reply::overloaded());
    let service = OverloadStack::new()
        .fallback(ModelFallbackLayer::new([OPUS, SONNET]))
        .retry(RetryPolicy::foreground().budget(None).seed(5))
        .layer(client());
    for _ in 0..20 {
        let response = service
            .clone()
            .oneshot(messages_request(&mock, OPUS))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
    }
    let text = logs.text();
    let skipped = text
        .lines()
        .filter(|line| line.contains("llm model skipped"))
        .count();
    let sent_to_opus = mock
        .requests()
        .iter()
        .filter(|r| model_of(&r.body) == OPUS)
        .count();
    assert!(skipped > 0, "{text}");
    assert!(
        text.lines()
            .filter(|line| line.contains("llm model skipped"))
            .all(|line| line.contains("reason=breaker_open")
                && line.contains(&format!("model={OPUS}"))
                && line.contains(&format!("next={SONNET}"))),
        "{text}"
    );
    println!("{skipped} skips, {sent_to_opus} attempts on {OPUS}");
}

#[tokio::test(start_paused = true)]
async fn the_correlation_header_is_sent_only_when_asked() {
    use tower_overload::request_id::RequestIdLogLayer;
    let mock = MockUpstream::start().await;
    mock.push([Reply::ok(), Reply::ok()]);
    let quiet = OverloadStack::new().layer(client());
    quiet.oneshot(messages_request(&mock, OPUS)).await.unwrap();
    let sending = OverloadStack::new()
        .log(RequestIdLogLayer::new().send_correlation_header(true))
        .layer(client());
    sending
        .oneshot(messages_request(&mock, OPUS))
        .await
        .unwrap();
    let requests = mock.requests();
    assert!(requests[0].headers.get("x-client-request-id").is_none());
    assert!(
        requests[1]
            .headers
            .get("x-client-request-id")
            .is_some_and(|id| id.as_bytes().starts_with(b"cli_"))
    );
}
