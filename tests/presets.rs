//! The presets and the default stack as shipped, over loopback, for hours of
//! virtual time: nothing here configures a default away (no `budget(None)`,
//! no custom backoff, no shorter deadline), so what passes here is what a
//! user of `RetryPolicy::foreground()` or `OverloadStack::new()` gets.

mod support;

use std::time::Duration;

use http_body_util::BodyExt;
use support::{MockUpstream, Reply, client, messages_request};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};
use tower_overload::ErrorKind;
use tower_overload::classify::Class;
use tower_overload::retry::{OverloadRetryLayer, RetryPolicy, RetryReport};
use tower_overload::stack::OverloadStack;

const OPUS: &str = "claude-opus-4-6";

fn attempts(response: &http::Response<impl Sized>) -> usize {
    response
        .extensions()
        .get::<RetryReport>()
        .map_or(1, |report| report.attempts.len())
}

/// Defect 1: the quota was never refilled, so after about 100 retries in
/// the life of a process the presets never retried again.
#[tokio::test(start_paused = true)]
async fn foreground_retries_every_transient_529_for_an_hour_of_calls() {
    let mock = MockUpstream::start().await;
    let service = OverloadRetryLayer::new(RetryPolicy::foreground().seed(1)).layer(client());
    let mut failed = 0;
    for call in 0..3_600 {
        let started = Instant::now();
        mock.push_for_model(OPUS, [Reply::overloaded(), Reply::ok()]);
        let response = service
            .clone()
            .oneshot(messages_request(&mock, OPUS))
            .await
            .unwrap();
        if response.status() != 200 {
            failed += 1;
            assert!(failed < 5, "call {call} failed: {}", response.status());
        } else {
            assert_eq!(attempts(&response), 2, "call {call}");
        }
        response.into_body().collect().await.unwrap();
        tokio::time::sleep_until(started + Duration::from_secs(1)).await;
    }
    assert_eq!(failed, 0);
    assert_eq!(mock.request_count(), 7_200);
}

/// The same for the background preset, whose backoff is measured in
/// minutes: one call every 2 minutes for 4 hours, each meeting one 529.
#[tokio::test(start_paused = true)]
async fn background_retries_every_transient_529_for_four_hours() {
    let mock = MockUpstream::start().await;
    let service = OverloadRetryLayer::new(RetryPolicy::background().seed(2)).layer(client());
    for call in 0..120 {
        let started = Instant::now();
        mock.push_for_model(OPUS, [Reply::overloaded(), Reply::ok()]);
        let response = service
            .clone()
            .oneshot(messages_request(&mock, OPUS))
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "call {call}");
        assert_eq!(attempts(&response), 2, "call {call}");
        response.into_body().collect().await.unwrap();
        tokio::time::sleep_until(started + Duration::from_secs(120)).await;
    }
}

#[derive(Default, Debug)]
struct Phase {
    calls: usize,
    succeeded: usize,
    retried: usize,
    attempts: usize,
}

/// Seventy minutes of one call a second through `OverloadStack::new()` as
/// shipped: 10 healthy, 30 of full outage, 10 of recovery, 20 of
/// intermittent 529s. In the outage the quota keeps the load near one
/// attempt per call; after it, retries are granted again and rescue the
/// intermittent failures.
#[tokio::test(start_paused = true)]
async fn the_default_stack_recovers_its_retries_after_a_long_outage() {
    let mock = MockUpstream::start().await;
    let service = OverloadStack::new().layer(client());
    let start = Instant::now();
    let minute = |m: u64| start + Duration::from_secs(60 * m);
    let mut tasks = tokio::task::JoinSet::new();
    let mut second = 0u64;
    let mut outage_set = false;
    let mut chaos_set = false;
    while second < 70 * 60 {
        let now = start + Duration::from_secs(second);
        tokio::time::sleep_until(now).await;
        if !outage_set && now >= minute(10) {
            mock.storm(OPUS, Duration::from_secs(30 * 60), Reply::overloaded());
            outage_set = true;
        }
        if !chaos_set && now >= minute(50) {
            mock.set_chaos(7, vec![(3, Reply::overloaded()), (7, Reply::ok())]);
            chaos_set = true;
        }
        let phase = match second / 60 {
            0..10 => 0,
            10..40 => 1,
            40..50 => 2,
            _ => 3,
        };
        let request = messages_request(&mock, OPUS);
        let service = service.clone();
        tasks.spawn(async move {
            let response = service.oneshot(request).await;
            let (ok, attempts) = match response {
                Ok(response) => {
                    let tried = attempts(&response);
                    let ok = response.status() == 200;
                    response.into_body().collect().await.unwrap();
                    (ok, tried)
                }
                Err(error) => {
                    let attempts = error.attempts().max(1);
                    (false, attempts as usize)
                }
            };
            (phase, ok, attempts)
        });
        second += 1;
    }
    let mut phases: [Phase; 4] = Default::default();
    while let Some(outcome) = tasks.join_next().await {
        let (phase, ok, tried) = outcome.unwrap();
        let phase = &mut phases[phase];
        phase.calls += 1;
        phase.succeeded += usize::from(ok);
        phase.retried += usize::from(tried > 1);
        phase.attempts += tried;
    }
    let [healthy, outage, recovery, intermittent] = &phases;
    assert_eq!(healthy.succeeded, healthy.calls, "{phases:?}");
    assert_eq!(outage.succeeded, 0, "{phases:?}");
    let outage_ratio = outage.attempts as f64 / outage.calls as f64;
    assert!(
        outage_ratio <= 1.1,
        "an outage costs about one attempt per call: {outage_ratio} ({phases:?})"
    );
    assert_eq!(recovery.succeeded, recovery.calls, "{phases:?}");
    // 30% of attempts fail at random: without retries about 70% would
    // succeed; with them, nearly all.
    let rate = intermittent.succeeded as f64 / intermittent.calls as f64;
    assert!(
        rate >= 0.98,
        "retries rescue intermittent 529s: {rate} ({phases:?})"
    );
    assert!(
        intermittent.retried as f64 >= 0.25 * intermittent.calls as f64,
        "retries are granted again after the outage: {phases:?}"
    );
}

/// Defect 8a: an upstream that accepts and never answers. With the preset
/// as shipped the call still ends, with a typed error, at the deadline.
#[tokio::test(start_paused = true)]
async fn a_silent_upstream_never_leaves_a_preset_call_pending() {
    let mock = MockUpstream::start().await;
    mock.set_default(Reply::ok().delay(Duration::from_secs(10 * 24 * 3600)));
    let policy = RetryPolicy::foreground().seed(3);
    let deadline = policy.get_deadline().unwrap();
    let service = OverloadRetryLayer::new(policy).layer(client());
    let started = Instant::now();
    let error = service
        .oneshot(messages_request(&mock, OPUS))
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert_eq!(error.kind(), ErrorKind::DeadlineExceeded, "{error}");
    assert!(elapsed <= deadline, "{elapsed:?} > {deadline:?}");
    assert!(elapsed >= deadline - Duration::from_secs(1), "{elapsed:?}");
    assert_eq!(error.attempts(), 1, "600 s to the head: one attempt fits");
}

/// Defect 8a: the per-attempt timeout to the response head is a `Timeout`
/// and is retried; the second attempt answers.
#[tokio::test(start_paused = true)]
async fn an_attempt_without_a_head_times_out_and_is_retried() {
    let mock = MockUpstream::start().await;
    mock.push_for_model(
        OPUS,
        [
            Reply::ok().delay(Duration::from_secs(24 * 3600)),
            Reply::ok(),
        ],
    );
    let policy = RetryPolicy::foreground()
        .attempt_timeout(Some(Duration::from_secs(30)))
        .seed(4);
    let service = OverloadRetryLayer::new(policy).layer(client());
    let started = Instant::now();
    let response = service
        .oneshot(messages_request(&mock, OPUS))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let report = response.extensions().get::<RetryReport>().unwrap();
    assert_eq!(report.attempts.len(), 2);
    assert_eq!(report.attempts[0].class, Class::Timeout);
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "{:?}",
        started.elapsed()
    );
}

/// Defect 8b: the deadline is a real bound. Before, it only stopped new
/// retries and a `TimeoutLayer` inside let a 60 s deadline end at 76 s.
/// The attempt in flight at the deadline is cancelled; the error names the
/// attempts and every request id seen.
#[tokio::test(start_paused = true)]
async fn the_deadline_cancels_the_attempt_in_flight() {
    let mock = MockUpstream::start().await;
    mock.push_for_model(
        OPUS,
        [
            Reply::overloaded().header("request-id", "req_first"),
            Reply::overloaded().header("request-id", "req_second"),
            Reply::ok().delay(Duration::from_secs(3600)),
        ],
    );
    let policy = RetryPolicy::foreground()
        .deadline(Some(Duration::from_secs(20)))
        .seed(5);
    let service = OverloadRetryLayer::new(policy).layer(client());
    let started = Instant::now();
    let error = service
        .oneshot(messages_request(&mock, OPUS))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::DeadlineExceeded, "{error}");
    assert_eq!(started.elapsed(), Duration::from_secs(20));
    assert_eq!(error.attempts(), 3);
    let text = error.to_string();
    assert!(
        text.contains("req_first") && text.contains("req_second"),
        "{text}"
    );
    assert_eq!(mock.request_count(), 3);
}

/// Defect 8a: a body that goes silent after its head was handed on ends
/// with a typed timeout after the preset's idle timeout, not never.
#[tokio::test(start_paused = true)]
async fn a_body_that_goes_silent_ends_with_a_timeout() {
    let mock = MockUpstream::start().await;
    mock.push_for_model(
        OPUS,
        [Reply::slow_body(
            &["data: one\n\n", "data: two\n\n"],
            Duration::from_secs(10 * 24 * 3600),
        )],
    );
    let policy = RetryPolicy::foreground().seed(6);
    let idle = policy.get_idle_timeout().unwrap();
    let service = OverloadRetryLayer::new(policy).layer(client());
    let response = service
        .oneshot(messages_request(&mock, OPUS))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let started = Instant::now();
    let error = response.into_body().collect().await.unwrap_err();
    let elapsed = started.elapsed();
    let ours = error
        .downcast_ref::<tower_overload::Error>()
        .unwrap_or_else(|| panic!("not the crate's error: {error}"));
    assert_eq!(ours.kind(), ErrorKind::Timeout);
    assert!(
        elapsed >= idle && elapsed <= idle + Duration::from_secs(1),
        "{elapsed:?}"
    );
}

/// A retry granted by the quota but abandoned during its backoff (the
/// model's breaker opened meanwhile) gives its tokens back.
#[tokio::test(start_paused = true)]
async fn a_retry_abandoned_during_its_backoff_refunds_the_quota() {
    use std::sync::atomic::{AtomicU32, Ordering};
    use tower_overload::breaker_signal::{BreakerSignal, ModelBreaker};
    use tower_overload::budget::RetryQuota;

    /// Closed when the retry is decided, open when its backoff ends.
    struct OpensDuringTheWait(AtomicU32);
    impl ModelBreaker for OpensDuringTheWait {
        fn on_failure(&self, _: Class) {}
        fn should_stop(&self, _: Class) -> bool {
            self.0.fetch_add(1, Ordering::SeqCst) > 0
        }
    }

    let mock = MockUpstream::start().await;
    mock.push_for_model(OPUS, [Reply::overloaded(), Reply::ok()]);
    let quota = RetryQuota::default();
    let policy = RetryPolicy::foreground()
        .retry_quota(Some(quota.clone()))
        .seed(8);
    let service = OverloadRetryLayer::new(policy).layer(client());
    let mut request = messages_request(&mock, OPUS);
    request
        .extensions_mut()
        .insert(BreakerSignal::new(OpensDuringTheWait(AtomicU32::new(0))));
    let error = service.oneshot(request).await.unwrap_err();
    assert_eq!(error.class(), Some(Class::Overloaded), "{error}");
    assert_eq!(mock.request_count(), 1, "the abandoned retry is not sent");
    assert_eq!(quota.available(), 500, "its 5 tokens came back");
}
