//! Classification through the retry layer over loopback (issue 13): what the
//! body and headers of a real response make of a call, with the presets as
//! shipped.

mod support;

use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use flate2::Compression;
use flate2::write::{GzEncoder, ZlibEncoder};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use support::{MockUpstream, Reply, capture_logs, client, messages_request};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_overload::body::PeekedBody;
use tower_overload::classify::{Class, ClientKind};
use tower_overload::retry::{
    FinalFailure, OverloadRetryLayer, RetryPolicy, RetryReport, StopReason,
};
use tower_overload::stack::OverloadStack;
use tower_overload::{ErrorKind, Model};

type Response = http::Response<PeekedBody<hyper::body::Incoming>>;

const API_ERROR_OVERLOADED: &str =
    r#"{"type":"error","error":{"type":"api_error","message":"Overloaded"}}"#;
const SPEND_LIMIT: &str = r#"{"type":"error","error":{"type":"rate_limit_error","message":"enforced_spend_limit_reached: raise your limit"}}"#;

fn retrying(
    policy: RetryPolicy,
) -> impl Service<Request<Full<Bytes>>, Response = Response, Error = tower_overload::Error, Future: Send>
+ Clone {
    ServiceBuilder::new()
        .layer(OverloadRetryLayer::new(policy))
        .service(client())
}

fn report(response: &Response) -> &RetryReport {
    response
        .extensions()
        .get::<RetryReport>()
        .expect("a report")
}

fn gzip(text: &str) -> Bytes {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(text.as_bytes()).unwrap();
    Bytes::from(encoder.finish().unwrap())
}

fn deflate(text: &str) -> Bytes {
    let mut encoder = ZlibEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(text.as_bytes()).unwrap();
    Bytes::from(encoder.finish().unwrap())
}

// ===== defect 6: x-should-retry does not turn off reading the body =====

#[tokio::test(start_paused = true)]
async fn defect_6_a_500_overloaded_with_x_should_retry_is_retried_as_an_overload() {
    let mock = MockUpstream::start().await;
    mock.push([
        Reply::raw(500, API_ERROR_OVERLOADED)
            .header("content-type", "application/json")
            .should_retry(true),
        Reply::ok(),
    ]);
    let response = retrying(RetryPolicy::foreground().seed(6))
        .oneshot(messages_request(&mock, "claude-opus-4-6"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let report = report(&response);
    assert_eq!(report.attempts.len(), 2);
    assert_eq!(report.attempts[0].class, Class::Overloaded);
    assert_eq!(
        report.attempts[0].status,
        Some(StatusCode::INTERNAL_SERVER_ERROR)
    );
    // The overload policy's full jitter (first window 1 s), not the server-error one (equal jitter from 0.5 s).
    assert!(report.attempts[0].wait_after.unwrap() <= Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn defect_6_the_server_saying_no_still_leaves_the_class_to_the_body() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::raw(500, API_ERROR_OVERLOADED).should_retry(false)]);
    let response = retrying(RetryPolicy::foreground().seed(6))
        .oneshot(messages_request(&mock, "claude-opus-4-6"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let report = report(&response);
    assert_eq!(report.attempts.len(), 1);
    assert_eq!(report.attempts[0].class, Class::Overloaded);
    assert_eq!(report.stop, StopReason::NotRetryable);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        body,
        API_ERROR_OVERLOADED.as_bytes(),
        "the sniffed body arrives whole"
    );
}

// ===== defect 7: compressed error bodies =====

#[tokio::test(start_paused = true)]
async fn defect_7_a_gzipped_500_overloaded_is_an_overload() {
    let mock = MockUpstream::start().await;
    mock.push([
        Reply::raw(500, gzip(API_ERROR_OVERLOADED))
            .header("content-type", "application/json")
            .header("content-encoding", "gzip"),
        Reply::ok(),
    ]);
    let response = retrying(RetryPolicy::foreground().seed(7))
        .oneshot(messages_request(&mock, "claude-opus-4-6"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(report(&response).attempts[0].class, Class::Overloaded);
}

#[tokio::test(start_paused = true)]
async fn defect_7_the_caller_gets_the_compressed_bytes_exactly() {
    for (encoding, compressed) in [
        ("gzip", gzip(API_ERROR_OVERLOADED)),
        ("deflate", deflate(API_ERROR_OVERLOADED)),
    ] {
        let mock = MockUpstream::start().await;
        mock.push([Reply::raw(500, compressed.clone())
            .header("content-type", "application/json")
            .header("content-encoding", encoding)
            .should_retry(false)]);
        let response = retrying(RetryPolicy::foreground().seed(7))
            .oneshot(messages_request(&mock, "claude-opus-4-6"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            report(&response).attempts[0].class,
            Class::Overloaded,
            "{encoding}"
        );
        assert_eq!(response.headers()["content-encoding"], encoding);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, compressed, "{encoding}: byte for byte as it came");
    }
}

#[tokio::test(start_paused = true)]
async fn defect_7_a_gzipped_spend_limit_429_is_not_retried() {
    let mock = MockUpstream::start().await;
    let compressed = gzip(SPEND_LIMIT);
    mock.push([
        Reply::raw(429, compressed.clone())
            .header("content-type", "application/json")
            .header("content-encoding", "gzip"),
        Reply::ok(),
    ]);
    let response = retrying(RetryPolicy::foreground().seed(7))
        .oneshot(messages_request(&mock, "claude-opus-4-6"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(mock.request_count(), 1);
    let report = report(&response);
    assert_eq!(
        report.attempts[0].class,
        Class::Client(ClientKind::SpendLimit)
    );
    assert_eq!(report.stop, StopReason::NotRetryable);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, compressed);
}

#[tokio::test(start_paused = true)]
async fn defect_7_a_broken_gzip_stream_is_classed_by_its_status() {
    let mock = MockUpstream::start().await;
    let mut broken = gzip(API_ERROR_OVERLOADED).to_vec();
    broken[12] ^= 0xff;
    broken.truncate(broken.len() - 4);
    mock.push([
        Reply::raw(500, broken.clone()).header("content-encoding", "gzip"),
        Reply::ok(),
    ]);
    let response = retrying(RetryPolicy::foreground().seed(7))
        .oneshot(messages_request(&mock, "claude-opus-4-6"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(report(&response).attempts[0].class, Class::ServerError);
}

// ===== defect 9: absurd server waits stop the call =====

#[tokio::test(start_paused = true)]
async fn defect_9_an_absurd_retry_after_stops_with_server_delay_too_long() {
    let cases = [
        ("retry-after", "99999999999999999999"),
        ("retry-after", "1e300"),
        ("retry-after", "inf"),
        ("retry-after", "Infinity"),
        ("retry-after-ms", "1e300"),
        ("retry-after", "3600"),
        ("retry-after", "1e3"),
    ];
    for (name, value) in cases {
        let mock = MockUpstream::start().await;
        mock.push([Reply::overloaded().header(name, value), Reply::ok()]);
        let error = retrying(RetryPolicy::foreground().seed(9))
            .oneshot(messages_request(&mock, "claude-opus-4-6"))
            .await
            .expect_err(value);
        assert_eq!(
            error.kind(),
            ErrorKind::ServerDelayTooLong,
            "{name}: {value}"
        );
        assert!(
            error
                .server_delay()
                .is_some_and(|d| d > Duration::from_secs(60)),
            "{name}: {value}: {:?}",
            error.server_delay()
        );
        assert_eq!(mock.request_count(), 1, "{name}: {value}: no retry");
    }
}

#[tokio::test(start_paused = true)]
async fn defect_9_python_float_forms_are_waited() {
    for (value, wait) in [
        ("+2", 2000),
        (".5", 500),
        ("5.", 5000),
        (" 7 ", 7000),
        ("1_0", 10_000),
    ] {
        let mock = MockUpstream::start().await;
        mock.push([Reply::rate_limited().retry_after(value), Reply::ok()]);
        let response = retrying(RetryPolicy::foreground().seed(9))
            .oneshot(messages_request(&mock, "claude-opus-4-6"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{value:?}");
        let requests = mock.requests();
        let gap = requests[1].at - requests[0].at;
        // The server's delay is a floor under the policy's own (at most 1 s here).
        let wait = Duration::from_millis(wait);
        assert!(
            gap >= wait && gap <= wait.max(Duration::from_secs(1)) + Duration::from_millis(1),
            "{value:?}: {gap:?}"
        );
    }
}

// ===== defect 11: OpenAI-style overloads and reset durations =====

#[tokio::test(start_paused = true)]
async fn defect_11_an_openai_engine_overloaded_503_is_an_overload() {
    let mock = MockUpstream::start().await;
    let body = r#"{"error":{"message":"The engine is currently overloaded, please try again later","type":"server_error","param":null,"code":null}}"#;
    mock.push([
        Reply::raw(503, body).header("content-type", "application/json"),
        Reply::ok(),
    ]);
    let response = retrying(RetryPolicy::foreground().seed(11))
        .oneshot(messages_request(&mock, "gpt-4o"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(report(&response).attempts[0].class, Class::Overloaded);
}

#[tokio::test(start_paused = true)]
async fn defect_11_an_openai_reset_duration_is_the_429_wait() {
    let mock = MockUpstream::start().await;
    mock.push([
        Reply::rate_limited()
            .header("x-ratelimit-limit-requests", "60")
            .header("x-ratelimit-remaining-requests", "0")
            .header("x-ratelimit-reset-requests", "0m45s")
            .header("x-ratelimit-remaining-tokens", "0")
            .header("x-ratelimit-reset-tokens", "6.5s"),
        Reply::ok(),
    ]);
    let response = retrying(
        RetryPolicy::foreground()
            .max_server_delay(Duration::from_secs(120))
            .seed(11),
    )
    .oneshot(messages_request(&mock, "gpt-4o"))
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let requests = mock.requests();
    let gap = requests[1].at - requests[0].at;
    assert!(
        gap >= Duration::from_secs(45) && gap < Duration::from_secs(46),
        "{gap:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn defect_11_a_model_name_cannot_forge_log_lines() {
    let (logs, _guard) = capture_logs();
    let mock = MockUpstream::start().await;
    mock.push([Reply::error(400, "invalid_request_error", "bad model")]);
    let forged = "x\nINFO forged\r\u{1b}[31m";
    let service = OverloadStack::new()
        .retry(
            RetryPolicy::foreground()
                .final_failure(FinalFailure::Error)
                .seed(11),
        )
        .layer(client());
    let error = service
        .oneshot(messages_request(&mock, forged))
        .await
        .expect_err("a 400 is final");
    assert_eq!(
        error.model().map(Model::as_str),
        Some(forged),
        "the raw name is kept"
    );
    let display = error.to_string();
    assert!(!display.contains(['\n', '\r', '\u{1b}']), "{display:?}");
    assert!(display.contains(r"x\nINFO forged"), "{display:?}");
    let text = logs.text();
    assert!(text.contains("llm call failed"), "{text}");
    assert!(!text.contains("\nINFO forged"), "{text}");
    assert!(!text.contains('\r') && !text.contains('\u{1b}'), "{text:?}");

    // A long name is cut, with a marker, wherever it is shown.
    let long = Model::new("m".repeat(10_000));
    let shown = long.to_string();
    assert!(shown.len() < 200 && shown.ends_with('…'), "{shown}");
}
