//! Holding the whole stack to its promises: load with random faults and
//! cancellations, hostile upstreams, secrets.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use support::{MockUpstream, Reply, client, messages_request};
use tower::{Layer, ServiceBuilder, ServiceExt};
use tower_overload::ErrorKind;
use tower_overload::backoff::{Backoff, Jitter};
use tower_overload::budget::RetryQuota;
use tower_overload::concurrency::{Aimd, ConcurrencyPerModelLayer};
use tower_overload::fallback::ModelFallbackLayer;
use tower_overload::retry::{ClassPolicy, OverloadRetryLayer, RetryPolicy};
use tower_overload::stack::OverloadStack;

const MODELS: [&str; 3] = ["claude-opus-4-6", "claude-sonnet-4-6", "claude-haiku-4-5"];

/// Millisecond backoffs, so that real time stays short under load.
fn quick_policy(seed: u64) -> RetryPolicy {
    let quick = ClassPolicy::new(
        3,
        Backoff::new(
            Duration::from_millis(1),
            Duration::from_millis(5),
            Jitter::Full,
        ),
    );
    RetryPolicy::foreground()
        .overloaded(quick)
        .rate_limited(quick)
        .server_error(quick)
        .timeout(quick)
        .transport(quick)
        .deadline(Some(Duration::from_secs(10)))
        .max_server_delay(Duration::from_millis(50))
        .retry_quota(Some(RetryQuota::new(5_000, 5, 10)))
        .seed(seed)
}

/// How one call of the load test ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum End {
    Answered(u16),
    Failed(Option<ErrorKind>),
    Cancelled,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_with_faults_and_cancellations_nothing_is_lost_or_leaked() {
    let calls: usize = std::env::var("RELIABILITY_CALLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    let mock = MockUpstream::start().await;
    mock.set_chaos(
        42,
        vec![
            (70, Reply::ok()),
            (10, Reply::overloaded()),
            (6, Reply::rate_limited().header("retry-after-ms", "2")),
            (6, Reply::api_error()),
            (3, Reply::sse_message()),
            (
                3,
                Reply::slow_body(&["a", "b", "c"], Duration::from_millis(2)),
            ),
            (2, Reply::drop_connection()),
        ],
    );
    let concurrency = ConcurrencyPerModelLayer::new(16)
        .max_queued(calls)
        .queue_timeout(Some(Duration::from_secs(30)))
        .adaptive(Aimd::default());
    let service = OverloadStack::new()
        .retry(quick_policy(1))
        .concurrency(concurrency.clone())
        .fallback(ModelFallbackLayer::new(MODELS))
        .layer(client());

    let ends = Arc::new(Mutex::new(std::collections::HashMap::<End, usize>::new()));
    let mut tasks = tokio::task::JoinSet::new();
    let mut rng = SmallRng::seed_from_u64(7);
    for i in 0..calls {
        let service = service.clone();
        let request = messages_request(&mock, MODELS[i % 3]);
        let ends = Arc::clone(&ends);
        // 0-59: read the whole body; 60-74: drop the body unread; 75-84: read one frame
        // and drop; 85-99: drop the call itself after a moment.
        let fate: u8 = rng.random_range(0..100);
        let cancel_after = Duration::from_micros(rng.random_range(0..3_000));
        tasks.spawn(async move {
            let call = async move {
                match service.oneshot(request).await {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let mut body = response.into_body();
                        match fate {
                            0..60 => {
                                let _ = body.collect().await;
                            }
                            60..75 => drop(body),
                            _ => {
                                let _ = body.frame().await;
                            }
                        }
                        End::Answered(status)
                    }
                    Err(error) => End::Failed(Some(error.kind())),
                }
            };
            let end = if fate >= 85 {
                tokio::time::timeout(cancel_after, call)
                    .await
                    .unwrap_or(End::Cancelled)
            } else {
                call.await
            };
            *ends.lock().unwrap().entry(end).or_default() += 1;
        });
        if tasks.len() >= 512 {
            tasks
                .join_next()
                .await
                .expect("a task")
                .expect("no call panicked");
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("no call panicked");
    }

    let ends = ends.lock().unwrap().clone();
    let total: usize = ends.values().sum();
    println!(
        "{calls} calls, upstream requests {}, ends {ends:?}",
        mock.request_count()
    );
    assert_eq!(total, calls, "every call ended exactly once");
    assert!(ends.get(&End::Answered(200)).copied().unwrap_or(0) > calls / 2);
    // Connections wind down: bodies dropped mid-stream are noticed by the server on its next write.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for key in concurrency.snapshot() {
        assert_eq!(
            (key.in_flight, key.queued),
            (0, 0),
            "a permit or queue slot leaked: {key:?}"
        );
    }
    for model in MODELS {
        assert_eq!(
            mock.in_flight(model),
            0,
            "{model} still busy at the upstream"
        );
        // The server counts a call until it has written the last byte or noticed the
        // client went away (on its next write), which can trail the client's release of
        // an abandoned body by a moment: a little slack, not a second cap.
        assert!(
            mock.peak_in_flight(model) <= 16 + 2,
            "{model} over its cap: {}",
            mock.peak_in_flight(model)
        );
    }
}

#[tokio::test(start_paused = true)]
async fn no_call_hangs_past_its_deadline_whatever_the_upstream_does() {
    let deadline = Duration::from_secs(20);
    let policy = || {
        RetryPolicy::foreground()
            .deadline(Some(deadline))
            .retry_quota(None)
            .seed(3)
    };
    let with_attempt_timeout = |policy: RetryPolicy| {
        ServiceBuilder::new()
            .layer(OverloadRetryLayer::new(policy))
            .timeout(Duration::from_secs(5))
            .service(client())
    };

    // An upstream that never answers: each attempt times out, the call ends by the deadline.
    let hanging = MockUpstream::start().await;
    hanging.set_default(Reply::ok().delay(Duration::from_secs(3600)));
    let start = tokio::time::Instant::now();
    let error = with_attempt_timeout(policy())
        .oneshot(messages_request(&hanging, "m"))
        .await
        .unwrap_err();
    assert!(
        start.elapsed() <= deadline + Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        error.class(),
        Some(tower_overload::classify::Class::Timeout),
        "{error}"
    );

    // 529 forever with a huge retry-after: an immediate typed error with the delay and the request id.
    let stubborn = MockUpstream::start().await;
    stubborn.set_default(Reply::overloaded().retry_after("86400"));
    let start = tokio::time::Instant::now();
    let error = with_attempt_timeout(policy())
        .oneshot(messages_request(&stubborn, "m"))
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(error.kind(), ErrorKind::ServerDelayTooLong);
    assert_eq!(error.server_delay(), Some(Duration::from_secs(86400)));
    assert!(error.request_id().is_some());

    // A slowloris body on an error response: the sniff gives up in bounded time and the status decides.
    let slow = MockUpstream::start().await;
    slow.push([
        Reply::raw(500, "x").chunk_interval(Duration::from_secs(600)),
        Reply::ok(),
    ]);
    let start = tokio::time::Instant::now();
    let response = with_attempt_timeout(policy())
        .oneshot(messages_request(&slow, "m"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );

    // Reset mid-body after a 200: the caller gets the error from the body, typed by hyper, not a hang.
    let resetting = MockUpstream::start().await;
    resetting.push([Reply::slow_body(&["partial"], Duration::from_secs(1))]);
    let response = with_attempt_timeout(policy())
        .oneshot(messages_request(&resetting, "m"))
        .await
        .unwrap();
    drop(resetting);
    let outcome =
        tokio::time::timeout(Duration::from_secs(30), response.into_body().collect()).await;
    assert!(
        outcome.is_ok(),
        "the body ended, one way or the other, without hanging"
    );
}

#[tokio::test(start_paused = true)]
async fn secrets_never_reach_the_logs_in_a_storm_with_fallback() {
    let (captured, _guard) = support::capture_logs();

    let mock = MockUpstream::start().await;
    mock.push_for_model(MODELS[0], std::iter::repeat_n(Reply::overloaded(), 50));
    let service = OverloadStack::new()
        .retry(RetryPolicy::foreground().seed(4))
        .fallback(ModelFallbackLayer::new(MODELS))
        .layer(client());
    for _ in 0..5 {
        let request = Request::post(mock.url("/v1/messages?key=query-secret"))
            .header("x-api-key", "sk-ant-api03-SECRET-KEY")
            .header("authorization", "Bearer sk-ant-BEARER-SECRET")
            .header("cookie", "session=COOKIE-SECRET")
            .body(Full::new(support::messages_body(MODELS[0])))
            .unwrap();
        let response = service.clone().oneshot(request).await.unwrap();
        response.into_body().collect().await.unwrap();
    }
    let logs = captured.text();
    assert!(logs.contains("falling back"), "the storm was logged");
    for secret in [
        "SECRET-KEY",
        "BEARER-SECRET",
        "COOKIE-SECRET",
        "query-secret",
        "Hello, \\\"mock\\\"",
    ] {
        assert!(!logs.contains(secret), "{secret} reached the logs");
    }
}

#[test]
fn a_body_over_the_replay_cap_is_refused_a_copy_before_anything_is_sent() {
    use tower_overload::body::{ReplayBody, ReplayError, ReplayableBody};
    let body = ReplayBody::new(Full::new(Bytes::from(vec![b'x'; 1024])), 512);
    assert_eq!(body.replayable(), Err(ReplayError::TooLarge));
    assert!(body.try_clone_body().is_none());
}
