//! The layers composed in the recommended order against the loopback mock.

mod support;

use std::time::Duration;

use http_body_util::BodyExt;
use support::{MockUpstream, Reply, client, messages_request};
use tower::{ServiceBuilder, ServiceExt};
use tower_overload::ErrorKind;
use tower_overload::concurrency::{Aimd, ConcurrencyPerModelLayer};
use tower_overload::retry::{OverloadRetryLayer, RetryPolicy, RetryReport};

#[tokio::test(start_paused = true)]
async fn retry_over_per_model_concurrency_rides_out_a_storm_within_the_cap() {
    let mock = MockUpstream::start().await;
    mock.set_latency(Duration::from_millis(500));
    mock.push_for_model(
        "claude-opus-4-6",
        std::iter::repeat_n(Reply::overloaded(), 30),
    );
    let concurrency = ConcurrencyPerModelLayer::new(4)
        .adaptive(Aimd::default())
        .queue_timeout(None);
    let service = ServiceBuilder::new()
        .layer(OverloadRetryLayer::new(
            RetryPolicy::foreground()
                .budget(None)
                .deadline(None)
                .seed(3),
        ))
        .layer(concurrency.clone())
        .service(client());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let service = service.clone();
        let request = messages_request(&mock, "claude-opus-4-6");
        tasks.spawn(async move {
            let response = service.oneshot(request).await.unwrap();
            let attempts = response
                .extensions()
                .get::<RetryReport>()
                .unwrap()
                .attempts
                .len();
            let status = response.status().as_u16();
            response.into_body().collect().await.unwrap();
            (status, attempts)
        });
    }
    let mut outcomes = Vec::new();
    while let Some(outcome) = tasks.join_next().await {
        outcomes.push(outcome.unwrap());
    }
    assert!(
        outcomes.iter().all(|(status, _)| *status == 200),
        "{outcomes:?}"
    );
    assert_eq!(mock.request_count(), 50, "30 overloads and 20 successes");
    assert!(mock.peak_in_flight("claude-opus-4-6") <= 4);
    // Sleeping between attempts holds no permit.
    assert_eq!(concurrency.snapshot()[0].in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_surfaces_as_itself_through_the_retry_layer() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::slow_body(&["a"], Duration::from_secs(10))]);
    let service = ServiceBuilder::new()
        .layer(OverloadRetryLayer::new(RetryPolicy::foreground()))
        .layer(ConcurrencyPerModelLayer::new(1).max_queued(0))
        .service(client());
    let _holder = service
        .clone()
        .oneshot(messages_request(&mock, "m"))
        .await
        .unwrap();
    let error = service
        .oneshot(messages_request(&mock, "m"))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::QueueFull);
    assert_eq!(mock.request_count(), 1);
}
