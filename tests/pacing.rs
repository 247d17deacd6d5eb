//! RateLimitPacingLayer over the loopback mock, on a paused clock: header
//! learning, calibration, reconciliation (JSON and SSE), queue bound and
//! timeout, cancellation, a 429 pausing every clone, cache reads.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use support::{MockUpstream, Reply, TestBody, client};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};
use tower_overload::pacing::{PacingLimits, PacingSnapshot, RateLimitPacing, RateLimitPacingLayer};
use tower_overload::{Error, ErrorKind};

type Paced = RateLimitPacing<Client<HttpConnector, TestBody>>;

const MODEL: &str = "claude-sonnet-4-6";

fn limits(rpm: Option<u64>, itpm: Option<u64>, otpm: Option<u64>) -> PacingLimits {
    PacingLimits {
        requests_per_minute: rpm,
        input_tokens_per_minute: itpm,
        output_tokens_per_minute: otpm,
    }
}

/// A Messages request of `content` bytes of text and `max_tokens`; returns
/// it with its body's length.
fn request(mock: &MockUpstream, content: usize, max_tokens: u64) -> (Request<TestBody>, usize) {
    let body = serde_json::json!({
        "model": MODEL,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "x".repeat(content)}],
    })
    .to_string();
    let len = body.len();
    let request = Request::post(mock.url("/v1/messages"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    (request, len)
}

/// A 200 JSON message reporting this usage.
fn usage_reply(input: u64, cache_read: u64, cache_write: u64, output: u64) -> Reply {
    let body = serde_json::json!({
        "id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
        "content": [{"type": "text", "text": "x".repeat(6000)}],
        "stop_reason": "end_turn",
        "usage": {
            "input_tokens": input,
            "cache_creation_input_tokens": cache_write,
            "cache_read_input_tokens": cache_read,
            "output_tokens": output,
        },
    });
    Reply::raw(200, body.to_string()).header("content-type", "application/json")
}

/// Sends one call and reads its body to the end.
async fn call(service: &Paced, request: Request<TestBody>) -> Result<u16, Error> {
    let response = service.clone().oneshot(request).await?;
    let status = response.status().as_u16();
    response.into_body().collect().await.expect("the body");
    Ok(status)
}

fn key(service: &Paced) -> PacingSnapshot {
    let snapshot = service.snapshot();
    snapshot
        .into_iter()
        .find(|key| key.key.as_str() == MODEL)
        .expect("the model's key")
}

fn gap(mock: &MockUpstream, from: usize, to: usize) -> Duration {
    let requests = mock.requests();
    requests[to].at - requests[from].at
}

#[tokio::test(start_paused = true)]
async fn limits_learned_from_headers_make_the_next_calls_wait() {
    let mock = MockUpstream::start().await;
    mock.set_default(
        Reply::ok()
            .header("anthropic-ratelimit-requests-limit", "2")
            .header("anthropic-ratelimit-requests-remaining", "1"),
    );
    let service = RateLimitPacingLayer::new().layer(client());
    for _ in 0..3 {
        call(&service, request(&mock, 10, 100).0).await.unwrap();
    }
    let requests = key(&service).requests.expect("learned from the headers");
    assert_eq!(requests.capacity, 2);
    // One left after the first call, taken by the second; the third waits
    // for the refill of 1 request every 30 s.
    assert!(gap(&mock, 0, 1) < Duration::from_secs(1));
    let waited = gap(&mock, 1, 2);
    assert!(waited >= Duration::from_secs(29), "sent after {waited:?}");
    assert!(waited <= Duration::from_secs(31), "sent after {waited:?}");
}

#[tokio::test(start_paused = true)]
async fn headers_correct_a_configured_limit() {
    let mock = MockUpstream::start().await;
    mock.set_default(
        Reply::ok()
            .header("anthropic-ratelimit-requests-limit", "2")
            .header("anthropic-ratelimit-requests-remaining", "1"),
    );
    let service = RateLimitPacingLayer::new()
        .limits_for(MODEL, limits(Some(1_000), None, None))
        .layer(client());
    for _ in 0..3 {
        call(&service, request(&mock, 10, 100).0).await.unwrap();
    }
    assert_eq!(key(&service).requests.unwrap().capacity, 2);
    assert!(gap(&mock, 1, 2) >= Duration::from_secs(29));
}

#[tokio::test(start_paused = true)]
async fn the_estimate_converges_on_a_skewed_ratio() {
    let mock = MockUpstream::start().await;
    let service = RateLimitPacingLayer::new().layer(client());
    let mut first_error = None;
    for i in 0..25u64 {
        let (request, len) = request(&mock, 2_000 + 1_500 * i as usize, 100);
        // The API reads 2 bytes a token; the default estimate assumes 3.
        mock.push([usage_reply(len as u64 / 2, 0, 0, 10)]);
        call(&service, request).await.unwrap();
        first_error.get_or_insert(key(&service).last_estimate_error.unwrap());
    }
    let snapshot = key(&service);
    assert!(first_error.unwrap() < -0.3, "the default underestimates");
    assert!(
        (snapshot.bytes_per_token - 2.0).abs() < 0.02,
        "{}",
        snapshot.bytes_per_token
    );
    assert!(snapshot.last_estimate_error.unwrap().abs() < 0.02);
}

/// Output reserved from `max_tokens` (500 of 600) comes back when the body
/// reports 100 generated: the next call with the same reservation goes at
/// once instead of waiting 40 s for the refill.
async fn check_reconciliation(reply: Reply) {
    let mock = MockUpstream::start().await;
    mock.push([reply]);
    let service = RateLimitPacingLayer::new()
        .limits_for(MODEL, limits(None, Some(100_000), Some(600)))
        .layer(client());
    let response = service
        .clone()
        .oneshot(request(&mock, 10, 500).0)
        .await
        .unwrap();
    assert_eq!(key(&service).reserved_output_tokens, 500);
    assert!(key(&service).output_tokens.unwrap().available <= 110.0);
    response.into_body().collect().await.unwrap();
    let snapshot = key(&service);
    assert_eq!(snapshot.reserved_output_tokens, 0);
    let available = snapshot.output_tokens.unwrap().available;
    assert!((495.0..560.0).contains(&available), "{available}");
    call(&service, request(&mock, 10, 500).0).await.unwrap();
    assert!(gap(&mock, 0, 1) < Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn a_json_usage_gives_back_the_unused_output() {
    check_reconciliation(usage_reply(30, 0, 0, 100)).await;
}

#[tokio::test(start_paused = true)]
async fn a_streamed_usage_gives_back_the_unused_output() {
    check_reconciliation(Reply::sse(&[
        (
            "message_start",
            r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"usage":{"input_tokens":30,"output_tokens":1}}}"#,
        ),
        (
            "content_block_delta",
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#,
        ),
        (
            "message_delta",
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":100}}"#,
        ),
        ("message_stop", r#"{"type":"message_stop"}"#),
    ]))
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_and_a_long_wait_fail_with_the_bucket_and_the_wait() {
    let mock = MockUpstream::start().await;
    let service = RateLimitPacingLayer::new()
        .limits_for(MODEL, limits(Some(1), Some(1_000), None))
        .max_queued(1)
        .queue_timeout(Some(Duration::from_secs(5)))
        .layer(client());
    call(&service, request(&mock, 10, 100).0).await.unwrap();
    let start = Instant::now();
    let queued = tokio::spawn(service.clone().oneshot(request(&mock, 10, 100).0));
    tokio::task::yield_now().await;
    assert_eq!(key(&service).queued, 1);

    let full = call(&service, request(&mock, 10, 100).0).await.unwrap_err();
    assert_eq!(full.kind(), ErrorKind::PacingQueueFull);
    assert_eq!(full.bucket(), Some("requests"));
    assert!(full.wait().unwrap() > Duration::from_secs(50));

    let timeout = queued.await.unwrap().unwrap_err();
    assert_eq!(timeout.kind(), ErrorKind::PacingTimeout);
    assert_eq!(timeout.bucket(), Some("requests"));
    let left = timeout.wait().unwrap();
    assert!(
        left > Duration::from_secs(50) && left < Duration::from_secs(56),
        "{left:?}"
    );
    assert!(start.elapsed() >= Duration::from_secs(5) && start.elapsed() < Duration::from_secs(6));

    // 10,000 bytes are about 3,300 tokens: more than the 1,000 a minute.
    let too_large = call(&service, request(&mock, 10_000, 100).0)
        .await
        .unwrap_err();
    assert_eq!(too_large.kind(), ErrorKind::PacingTooLarge);
    assert_eq!(too_large.bucket(), Some("input-tokens"));
    assert_eq!(mock.request_count(), 1, "nothing else was sent");
    let snapshot = key(&service);
    assert_eq!(
        (snapshot.rejected, snapshot.timed_out, snapshot.too_large),
        (1, 1, 1)
    );
    assert_eq!(snapshot.queued, 0);
}

#[tokio::test(start_paused = true)]
async fn cancelled_calls_give_back_their_reservations() {
    let mock = MockUpstream::start().await;
    mock.set_default(Reply::ok().delay(Duration::from_secs(10)));
    let service = RateLimitPacingLayer::new()
        .limits_for(MODEL, limits(Some(1), None, Some(1_000)))
        .layer(client());
    // In flight: cancelled before its response.
    let cancelled = tokio::time::timeout(
        Duration::from_secs(1),
        service.clone().oneshot(request(&mock, 10, 800).0),
    )
    .await;
    assert!(cancelled.is_err());
    let snapshot = key(&service);
    assert_eq!(snapshot.reserved_output_tokens, 0);
    assert!(snapshot.output_tokens.unwrap().available >= 990.0);

    // Queued (the one request a minute is spent): cancelled while waiting.
    let waiting = tokio::time::timeout(
        Duration::from_secs(1),
        service.clone().oneshot(request(&mock, 10, 800).0),
    )
    .await;
    assert!(waiting.is_err());
    let snapshot = key(&service);
    assert_eq!(snapshot.queued, 0);
    assert!(snapshot.output_tokens.unwrap().available >= 990.0);
    // The next caller is not stuck behind the cancelled one: it goes when
    // the request bucket refills, a minute after the first call.
    let start = Instant::now();
    call(&service, request(&mock, 10, 800).0).await.unwrap();
    let sent = mock.requests()[1].at - start;
    assert!(sent < Duration::from_secs(59), "{sent:?}");
}

#[tokio::test(start_paused = true)]
async fn a_429_with_retry_after_pauses_every_clone() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::rate_limited().retry_after("20")]);
    let layer = RateLimitPacingLayer::new().limits_for(MODEL, limits(Some(600), None, None));
    let first = layer.layer(client());
    let second = layer.layer(client());
    assert_eq!(call(&first, request(&mock, 10, 100).0).await.unwrap(), 429);
    assert_eq!(call(&second, request(&mock, 10, 100).0).await.unwrap(), 200);
    let waited = gap(&mock, 0, 1);
    assert!(waited >= Duration::from_secs(20), "sent after {waited:?}");
    assert!(waited < Duration::from_secs(22), "sent after {waited:?}");
}

#[tokio::test(start_paused = true)]
async fn cache_reads_are_not_charged_to_input_tokens() {
    let mock = MockUpstream::start().await;
    mock.push([usage_reply(10, 50_000, 20, 5)]);
    let service = RateLimitPacingLayer::new()
        .limits_for(MODEL, limits(None, Some(1_000), None))
        .layer(client());
    call(&service, request(&mock, 10, 100).0).await.unwrap();
    let snapshot = key(&service);
    let available = snapshot.input_tokens.unwrap().available;
    // 30 charged (input and cache writes), not 50,030.
    assert!((960.0..=1_000.0).contains(&available), "{available}");
    assert_eq!(
        snapshot.reported_input_tokens, 50_030,
        "calibration sees all input"
    );
}

#[tokio::test(start_paused = true)]
async fn queued_calls_go_in_order_as_the_bucket_refills() {
    let mock = MockUpstream::start().await;
    let service = RateLimitPacingLayer::new()
        .limits_for(MODEL, limits(Some(60), None, None))
        .layer(client());
    // The bucket's 60 requests go at once; the next 4 wait a second each.
    let mut calls = Vec::new();
    for i in 0..64 {
        calls.push(tokio::spawn(
            service.clone().oneshot(request(&mock, i, 100).0),
        ));
        tokio::task::yield_now().await;
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let requests = mock.requests();
    let first = requests[0].at;
    let late: Vec<Duration> = requests[60..].iter().map(|r| r.at - first).collect();
    for (i, at) in late.iter().enumerate() {
        let expected = Duration::from_secs(i as u64 + 1);
        assert!(
            *at >= expected && *at < expected + Duration::from_millis(200),
            "{late:?}"
        );
    }
    // First come, first served: the waiting calls go in the order they
    // came (their bodies grow with their rank), after every earlier one.
    let sizes: Vec<usize> = requests.iter().map(|r| r.body.len()).collect();
    let earliest = sizes[..60].iter().max().unwrap();
    assert!(sizes[60..].windows(2).all(|w| w[0] < w[1]), "{sizes:?}");
    assert!(sizes[60] > *earliest, "{sizes:?}");
    assert_eq!(key(&service).waits, 4);
}

/// Only the head of a queue is woken when the buckets change: waiting
/// calls behind it are polled when they become the head, not at every
/// event, so a long queue costs one wake-up per event, not one per waiter.
#[tokio::test(start_paused = true)]
async fn only_the_head_of_the_queue_is_woken() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const CALLS: usize = 40;
    let mock = MockUpstream::start().await;
    // 60 a minute: one call a second, so the queue drains one by one.
    let service = RateLimitPacingLayer::new()
        .limits_for(MODEL, limits(Some(60), None, None))
        .queue_timeout(None)
        .layer(client());
    for _ in 0..60 {
        call(&service, request(&mock, 10, 10).0).await.unwrap();
    }
    let polls = Arc::new(AtomicUsize::new(0));
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..CALLS {
        let mut future = Box::pin(service.clone().oneshot(request(&mock, 10, 10).0));
        let polls = Arc::clone(&polls);
        calls.spawn(std::future::poll_fn(move |cx| {
            polls.fetch_add(1, Ordering::Relaxed);
            future.as_mut().poll(cx)
        }));
        tokio::task::yield_now().await;
    }
    while let Some(done) = calls.join_next().await {
        let response = done.unwrap().unwrap();
        response.into_body().collect().await.unwrap();
    }
    let polls = polls.load(Ordering::Relaxed);
    // Each call: its first poll, a wake-up when it becomes the head, one
    // when its refill is due, and the response's own polls over loopback.
    // About 5 a call here; waking every waiter at every event made it ~43.
    assert!(polls < CALLS * 8, "{polls} polls for {CALLS} queued calls");
}
