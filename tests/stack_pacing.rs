//! The pacing layer inside `OverloadStack` (feature `pacing`), over the
//! loopback mock on a paused clock: the stack as shipped paces from learned
//! headers and lets one 429 pause every clone; a call waiting for budget
//! holds no concurrency permit and spends no retry; a pacing timeout or the
//! call's deadline ends the wait without sending anything.
#![cfg(all(
    feature = "pacing",
    feature = "retry",
    feature = "concurrency",
    feature = "fallback",
    feature = "request-id"
))]

mod support;

use std::time::Duration;

use http_body_util::BodyExt;
use support::{MockUpstream, Reply, client, messages_request};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};
use tower_overload::ErrorKind;
use tower_overload::concurrency::ConcurrencyPerModelLayer;
use tower_overload::pacing::{PacingLimits, RateLimitPacingLayer};
use tower_overload::retry::{RetryPolicy, RetryReport};
use tower_overload::stack::OverloadStack;

const MODEL: &str = "claude-opus-4-6";

/// One request a minute for `MODEL`: the second call of a minute waits.
fn one_a_minute() -> RateLimitPacingLayer {
    RateLimitPacingLayer::new().limits_for(
        MODEL,
        PacingLimits {
            requests_per_minute: Some(1),
            ..PacingLimits::default()
        },
    )
}

#[tokio::test(start_paused = true)]
async fn the_stack_as_shipped_lets_one_429_pause_every_clone() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::rate_limited().retry_after("20")]);
    let service = OverloadStack::new().layer(client());
    let start = Instant::now();
    let first = tokio::spawn(service.clone().oneshot(messages_request(&mock, MODEL)));
    // The first call has its 429 and sleeps out the retry-after; five more
    // calls come in meanwhile.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(mock.request_count(), 1);
    let mut others = tokio::task::JoinSet::new();
    for _ in 0..5 {
        let call = service.clone().oneshot(messages_request(&mock, MODEL));
        others.spawn(async move {
            let response = call.await.unwrap();
            let status = response.status().as_u16();
            response.into_body().collect().await.unwrap();
            status
        });
    }
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), 200);
    while let Some(status) = others.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    let requests = mock.requests();
    assert_eq!(requests.len(), 7, "one 429, its retry, five calls");
    // Nobody else collected a 429 of their own: the five waited for the
    // pause the first 429 set instead of reaching the upstream before it ended.
    for request in &requests[1..] {
        assert!(
            request.at.duration_since(start) >= Duration::from_secs(20),
            "sent {:?} after the start, inside the pause",
            request.at.duration_since(start)
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_call_waiting_for_budget_holds_no_permit_and_spends_no_retry() {
    let mock = MockUpstream::start().await;
    let pacing = one_a_minute();
    let concurrency = ConcurrencyPerModelLayer::new(1);
    let service = OverloadStack::new()
        .pacing(pacing.clone())
        .concurrency(concurrency.clone())
        .layer(client());
    let first = service
        .clone()
        .oneshot(messages_request(&mock, MODEL))
        .await
        .unwrap();
    first.into_body().collect().await.unwrap();
    let start = Instant::now();
    let second = tokio::spawn(service.clone().oneshot(messages_request(&mock, MODEL)));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let paced = pacing.snapshot();
    assert_eq!(paced[0].queued, 1, "{paced:?}");
    let capped = concurrency.snapshot();
    assert!(
        capped
            .iter()
            .all(|key| key.in_flight == 0 && key.queued == 0),
        "the waiting call holds or waits for no permit: {capped:?}"
    );
    let second = second.await.unwrap().unwrap();
    assert_eq!(second.status(), 200);
    // Sent once the minute's request had refilled, as its first attempt:
    // a first-try success carries no retry report.
    assert!(second.extensions().get::<RetryReport>().is_none());
    assert!(
        start.elapsed() >= Duration::from_secs(59),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(mock.request_count(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_pacing_timeout_ends_the_call_without_a_retry_or_a_request() {
    let mock = MockUpstream::start().await;
    let pacing = one_a_minute().queue_timeout(Some(Duration::from_secs(5)));
    let service = OverloadStack::new().pacing(pacing.clone()).layer(client());
    let first = service
        .clone()
        .oneshot(messages_request(&mock, MODEL))
        .await
        .unwrap();
    first.into_body().collect().await.unwrap();
    let start = Instant::now();
    let error = service
        .oneshot(messages_request(&mock, MODEL))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::PacingTimeout, "{error}");
    assert_eq!(error.bucket(), Some("requests"));
    // One wait of the queue's timeout, not one per attempt of the preset.
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert_eq!(mock.request_count(), 1);
    assert_eq!(pacing.snapshot()[0].queued, 0);
    assert_eq!(pacing.snapshot()[0].timed_out, 1);
}

#[tokio::test(start_paused = true)]
async fn the_calls_deadline_ends_a_wait_for_budget_and_leaves_the_queue() {
    let mock = MockUpstream::start().await;
    let pacing = one_a_minute();
    let service = OverloadStack::new()
        .retry(RetryPolicy::foreground().deadline(Some(Duration::from_secs(3))))
        .pacing(pacing.clone())
        .layer(client());
    let first = service
        .clone()
        .oneshot(messages_request(&mock, MODEL))
        .await
        .unwrap();
    first.into_body().collect().await.unwrap();
    let start = Instant::now();
    let error = service
        .oneshot(messages_request(&mock, MODEL))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::DeadlineExceeded, "{error}");
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    assert_eq!(mock.request_count(), 1);
    let paced = pacing.snapshot();
    assert_eq!(paced[0].queued, 0, "the cancelled wait left the queue");
    // Its reservation went back: the next minute's request is not spent.
    assert_eq!(paced[0].requests_sent, 1);
}
