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

mod full_stack {
    use http_body_util::BodyExt;
    use tower::{Layer, ServiceExt};
    use tower_overload::RequestId;
    use tower_overload::concurrency::ConcurrencyPerModelLayer;
    use tower_overload::fallback::{ModelFallbackLayer, ServedBy};
    use tower_overload::request_id::OverloadStats;
    use tower_overload::retry::RetryPolicy;
    use tower_overload::stack::OverloadStack;

    use crate::support::{MockUpstream, Reply, capture_logs, client, messages_request};

    const OPUS: &str = "claude-opus-4-6";
    const SONNET: &str = "claude-sonnet-4-6";

    #[tokio::test(start_paused = true)]
    async fn a_storm_with_fallback_on_is_served_by_the_next_model_and_fully_logged() {
        let (logs, _guard) = capture_logs();
        let mock = MockUpstream::start().await;
        mock.push_for_model(OPUS, std::iter::repeat_n(Reply::overloaded(), 100));
        let stats = OverloadStats::new();
        let service = OverloadStack::new()
            .retry(RetryPolicy::foreground().budget(None).seed(8))
            .concurrency(ConcurrencyPerModelLayer::new(4))
            .fallback(ModelFallbackLayer::new([OPUS, SONNET]))
            .stats(stats.clone())
            .layer(client());
        for _ in 0..5 {
            let response = service
                .clone()
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
            assert!(RequestId::from_headers(response.headers()).is_some());
            response.into_body().collect().await.unwrap();
        }
        let text = logs.text();
        let upstream_ids = (1..=mock.request_count()).map(|n| format!("req_mock_{n:06}"));
        for id in upstream_ids {
            assert!(
                text.contains(&id),
                "request id {id} missing from the logs:\n{text}"
            );
        }
        assert!(
            !text.contains("sk-ant-test-secret"),
            "a secret reached the logs"
        );
        assert!(text.contains("falling back"));
        assert!(stats.counts().overloaded >= 2);
        assert_eq!(stats.counts().success, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_storm_with_fallback_off_is_ridden_out_by_retries() {
        let (logs, _guard) = capture_logs();
        let mock = MockUpstream::start().await;
        mock.push_for_model(OPUS, std::iter::repeat_n(Reply::overloaded(), 3));
        let service = OverloadStack::new()
            .retry(RetryPolicy::foreground().budget(None).seed(9))
            .layer(client());
        let response = service
            .oneshot(messages_request(&mock, OPUS))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.extensions().get::<ServedBy>().is_none());
        assert_eq!(mock.request_count(), 4);
        let text = logs.text();
        assert_eq!(text.matches("llm attempt failed").count(), 3, "{text}");
        assert!(text.contains("llm call succeeded"));
        assert!(!text.contains("sk-ant-test-secret"));
        println!("{text}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_saturated_model_queue_moves_the_call_to_the_next_model() {
    use tower_overload::fallback::{ModelFallbackLayer, ServedBy};
    let mock = MockUpstream::start().await;
    mock.push_for_model(
        "claude-opus-4-6",
        [Reply::slow_body(&["a"], Duration::from_secs(10))],
    );
    let service = ServiceBuilder::new()
        .layer(ModelFallbackLayer::new([
            "claude-opus-4-6",
            "claude-sonnet-4-6",
        ]))
        .layer(OverloadRetryLayer::new(RetryPolicy::foreground()))
        .layer(ConcurrencyPerModelLayer::new(1).max_queued(0))
        .service(client());
    let _holder = service
        .clone()
        .oneshot(messages_request(&mock, "claude-opus-4-6"))
        .await
        .unwrap();
    let response = service
        .oneshot(messages_request(&mock, "claude-opus-4-6"))
        .await
        .unwrap();
    let served = response.extensions().get::<ServedBy>().unwrap();
    assert_eq!(served.served.as_str(), "claude-sonnet-4-6");
    assert_eq!(
        served.fallbacks[0].class, None,
        "refused here, not by the upstream"
    );
    assert_eq!(mock.request_count(), 2);
}
