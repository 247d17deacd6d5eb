//! The retry layer's stream guard against the loopback mock: an overload in
//! the first event of a 200 stream is retried before the caller sees a byte;
//! a later one passes through and is counted.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use support::{MockUpstream, Reply, client, messages_request};
use tower::{Layer, ServiceBuilder, ServiceExt};
use tower_overload::classify::Class;
use tower_overload::concurrency::ConcurrencyPerModelLayer;
use tower_overload::fallback::{ModelFallbackLayer, ServedBy};
use tower_overload::retry::{OverloadRetryLayer, RetryPolicy, RetryReport, Silence, StreamGuard};
use tower_overload::sse::MidStreamErrors;

const OVERLOADED: &str =
    r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
const START: &str = r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[]}}"#;
const DELTA: &str =
    r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#;
const STOP: &str = r#"{"type":"message_stop"}"#;

fn guarded(guard: StreamGuard) -> RetryPolicy {
    RetryPolicy::foreground()
        .budget(None)
        .seed(5)
        .stream_guard(Some(guard))
}

fn classes(report: &RetryReport) -> Vec<Class> {
    report.attempts.iter().map(|a| a.class).collect()
}

/// What the mock sends for `reply`, as one byte string.
async fn raw(reply: Reply) -> Bytes {
    let mock = MockUpstream::start().await;
    mock.push([reply]);
    let response = client()
        .request(messages_request(&mock, "m"))
        .await
        .unwrap();
    response.into_body().collect().await.unwrap().to_bytes()
}

#[tokio::test(start_paused = true)]
async fn a_first_event_overload_is_retried_before_the_caller_sees_a_byte() {
    let mock = MockUpstream::start().await;
    mock.push([
        Reply::sse_overloaded(),
        Reply::sse(&[("message_start", START), ("error", OVERLOADED)]),
        Reply::sse_message(),
    ]);
    let service = OverloadRetryLayer::new(guarded(StreamGuard::default())).layer(client());
    let response = service.oneshot(messages_request(&mock, "m")).await.unwrap();
    assert_eq!(response.status(), 200);
    let report = response.extensions().get::<RetryReport>().unwrap().clone();
    assert_eq!(
        classes(&report),
        [Class::Overloaded, Class::Overloaded, Class::Success]
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        body,
        raw(Reply::sse_message()).await,
        "the good stream, byte for byte, and nothing else"
    );
    assert_eq!(mock.request_count(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_later_overload_passes_through_and_is_counted() {
    let mock = MockUpstream::start().await;
    let broken = || {
        Reply::sse(&[
            ("message_start", START),
            ("content_block_delta", DELTA),
            ("error", OVERLOADED),
        ])
    };
    mock.push([broken()]);
    let service = OverloadRetryLayer::new(guarded(StreamGuard::default())).layer(client());
    let response = service.oneshot(messages_request(&mock, "m")).await.unwrap();
    let errors = response
        .extensions()
        .get::<MidStreamErrors>()
        .unwrap()
        .clone();
    assert!(
        response.extensions().get::<RetryReport>().is_none(),
        "a first-try success leaves no report"
    );
    assert_eq!(errors.count(), 0, "nothing read yet");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, raw(broken()).await, "passed through untouched");
    assert_eq!(errors.count(), 1);
    assert_eq!(mock.request_count(), 1, "never silently retried");
}

#[tokio::test(start_paused = true)]
async fn a_normal_stream_is_byte_identical_and_delayed_only_to_its_first_event() {
    let mock = MockUpstream::start().await;
    let slow = || {
        Reply::sse(&[
            ("message_start", START),
            ("content_block_delta", DELTA),
            ("message_stop", STOP),
        ])
        .chunk_interval(Duration::from_secs(2))
    };
    mock.push([slow()]);
    let service = OverloadRetryLayer::new(guarded(StreamGuard::default())).layer(client());
    let start = tokio::time::Instant::now();
    let response = service.oneshot(messages_request(&mock, "m")).await.unwrap();
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(4),
        "held until the first delta, no longer"
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(start.elapsed(), Duration::from_secs(6));
    assert_eq!(body, raw(slow()).await);
}

#[tokio::test(start_paused = true)]
async fn a_silent_stream_is_passed_through_or_retried_as_configured() {
    let mock = MockUpstream::start().await;
    let silent =
        || Reply::sse(&[("content_block_delta", DELTA)]).chunk_interval(Duration::from_secs(60));
    mock.push([silent()]);
    let quick = StreamGuard {
        peek_timeout: Duration::from_secs(5),
        ..StreamGuard::default()
    };
    let service = OverloadRetryLayer::new(guarded(quick)).layer(client());
    let start = tokio::time::Instant::now();
    let response = service.oneshot(messages_request(&mock, "m")).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert!(
        response.extensions().get::<RetryReport>().is_none(),
        "a first-try success leaves no report"
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        body,
        raw(Reply::sse(&[("content_block_delta", DELTA)])).await
    );

    mock.push([silent(), Reply::sse_message()]);
    let retrying = StreamGuard {
        on_silence: Silence::Retry,
        ..quick
    };
    let service = OverloadRetryLayer::new(guarded(retrying)).layer(client());
    let response = service.oneshot(messages_request(&mock, "m")).await.unwrap();
    assert_eq!(
        classes(response.extensions().get::<RetryReport>().unwrap()),
        [Class::Timeout, Class::Success]
    );
}

#[tokio::test(start_paused = true)]
async fn a_model_that_keeps_overloading_mid_stream_falls_back_and_keeps_its_permit() {
    let mock = MockUpstream::start().await;
    mock.push_for_model(
        "claude-opus-4-6",
        std::iter::repeat_n(Reply::sse_overloaded(), 5),
    );
    mock.push_for_model(
        "claude-sonnet-4-6",
        [Reply::sse_message().chunk_interval(Duration::from_secs(1))],
    );
    let concurrency = ConcurrencyPerModelLayer::new(2);
    let service = ServiceBuilder::new()
        .layer(ModelFallbackLayer::new([
            "claude-opus-4-6",
            "claude-sonnet-4-6",
        ]))
        .layer(OverloadRetryLayer::new(guarded(StreamGuard::default())))
        .layer(concurrency.clone())
        .service(client());
    let response = service
        .oneshot(messages_request(&mock, "claude-opus-4-6"))
        .await
        .unwrap();
    assert_eq!(
        response
            .extensions()
            .get::<ServedBy>()
            .unwrap()
            .served
            .as_str(),
        "claude-sonnet-4-6"
    );
    let sonnet = |layer: &ConcurrencyPerModelLayer| {
        layer
            .snapshot()
            .into_iter()
            .find(|k| k.key.as_str() == "claude-sonnet-4-6")
            .unwrap()
            .in_flight
    };
    assert_eq!(sonnet(&concurrency), 1, "the stream holds its permit");
    response.into_body().collect().await.unwrap();
    assert_eq!(sonnet(&concurrency), 0);
}
