//! An outsider's adversarial pass over the retry presets and the per-model
//! concurrency layer: hostile upstreams, hostile clients, cancellation at
//! random points, clocks that run for days and `Duration::MAX` settings.
//!
//! Every test runs on tokio's paused clock against the loopback mock through
//! a real hyper-util client (or, for the 100,000-name flood, an in-process
//! service), with seeded randomness.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use tower_overload::backoff::{Backoff, Jitter};
use tower_overload::budget::RetryQuota;
use tower_overload::concurrency::ConcurrencyPerModelLayer;
use tower_overload::retry::{
    ClassPolicy, OverloadRetryLayer, RetryPolicy, RetryReport, StreamGuard,
};
use tower_overload::{ErrorKind, Model};

use support::{MockUpstream, Reply, client, messages_request};

const DAY: Duration = Duration::from_secs(86_400);

/// SplitMix64: a small seeded generator, so the tests do not depend on rand's API.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

// ===== hostile upstream =====

/// Finding 1: `idle_timeout` (120 s in both presets) is documented, and
/// promised by `foreground()`'s docs ("a body silent for 120 s between
/// frames is a Timeout"), but nothing reads it: an upstream that sends a 200
/// head and then stalls leaves the caller's body pending for ever.
#[tokio::test(start_paused = true)]
async fn breaker_a_stalled_body_after_the_head_is_ended_by_the_idle_timeout() {
    let mock = MockUpstream::start().await;
    mock.set_default(Reply::slow_body(&["{\"type\":", "\"message\"}"], DAY));
    let service = ServiceBuilder::new()
        .layer(OverloadRetryLayer::new(RetryPolicy::foreground().seed(1)))
        .service(client());
    let response = service
        .oneshot(messages_request(&mock, "claude-opus-4-6"))
        .await
        .expect("the head arrives at once");
    assert_eq!(response.status(), 200);
    let read = tokio::time::timeout(Duration::from_secs(600), response.into_body().collect()).await;
    assert!(
        matches!(read, Ok(Err(_))),
        "the body should end with an error after 120 s of silence, not hang (still pending after 600 s)"
    );
}

/// Finding 2a: the deadline is "the hard bound on one call, from the first
/// attempt to the response head", but it is not watched while the layer
/// reads a failed response's body to classify it: a 500 whose body stalls
/// holds the call for the whole `sniff_timeout` (5 s) past a 2 s deadline,
/// and then the call even returns the 500 instead of `DeadlineExceeded`.
#[tokio::test(start_paused = true)]
async fn breaker_the_deadline_bounds_the_sniff_of_a_stalled_error_body() {
    let mock = MockUpstream::start().await;
    mock.set_default(Reply::api_error().chunk_interval(DAY));
    let deadline = Duration::from_secs(2);
    let service = ServiceBuilder::new()
        .layer(OverloadRetryLayer::new(
            RetryPolicy::foreground().deadline(Some(deadline)).seed(2),
        ))
        .service(client());
    let started = Instant::now();
    let result = service
        .oneshot(messages_request(&mock, "claude-opus-4-6"))
        .await;
    let elapsed = started.elapsed();
    assert!(
        elapsed <= deadline + Duration::from_millis(100),
        "the call took {elapsed:?} with a {deadline:?} deadline"
    );
    let error = result.expect_err("a call cut by its deadline is a typed error");
    assert_eq!(error.kind(), ErrorKind::DeadlineExceeded);
    assert_eq!(error.attempts(), 1);
    assert!(
        error.request_id().is_some(),
        "the attempt's request id is named: {error}"
    );
}

/// Finding 2b: the same hole with the stream guard, whose peek may last 30 s:
/// a stream that sends its head and then nothing is handed to the caller at
/// 30 s, far past a 5 s deadline.
#[tokio::test(start_paused = true)]
async fn breaker_the_deadline_bounds_the_stream_guard_peek() {
    let mock = MockUpstream::start().await;
    mock.set_default(Reply::sse_message().chunk_interval(DAY));
    let deadline = Duration::from_secs(5);
    let service = ServiceBuilder::new()
        .layer(OverloadRetryLayer::new(
            RetryPolicy::foreground()
                .stream_guard(Some(StreamGuard::default()))
                .deadline(Some(deadline))
                .seed(3),
        ))
        .service(client());
    let started = Instant::now();
    let result = service
        .oneshot(messages_request(&mock, "claude-opus-4-6"))
        .await;
    let elapsed = started.elapsed();
    assert!(
        elapsed <= deadline + Duration::from_millis(100),
        "the call took {elapsed:?} with a {deadline:?} deadline"
    );
    let error = result.expect_err("a call cut by its deadline is a typed error");
    assert_eq!(error.kind(), ErrorKind::DeadlineExceeded);
}

/// An upstream that accepts and never answers, with the presets as shipped:
/// foreground ends at its 600 s deadline, background within its 40 minutes,
/// both with a typed error naming the attempts.
#[tokio::test(start_paused = true)]
async fn breaker_an_upstream_that_never_answers_ends_at_the_presets_deadlines() {
    let mock = MockUpstream::start().await;
    mock.set_default(Reply::ok().delay(DAY * 365));
    for (policy, deadline) in [
        (RetryPolicy::foreground(), Duration::from_secs(600)),
        (RetryPolicy::background(), Duration::from_secs(40 * 60)),
    ] {
        let service = ServiceBuilder::new()
            .layer(OverloadRetryLayer::new(policy.seed(4)))
            .service(client());
        let started = Instant::now();
        let error = service
            .oneshot(messages_request(&mock, "claude-opus-4-6"))
            .await
            .expect_err("no answer is an error");
        assert!(started.elapsed() <= deadline + Duration::from_millis(100));
        assert!(
            matches!(
                error.kind(),
                ErrorKind::DeadlineExceeded | ErrorKind::Timeout
            ),
            "{error}"
        );
        assert!(error.attempts() >= 1);
    }
}

/// Dropped connections, absurd headers and garbage statuses in a seeded mix,
/// through the foreground preset: every call ends (no hang, no panic).
#[tokio::test(start_paused = true)]
async fn breaker_a_chaotic_upstream_never_hangs_or_panics_a_call() {
    let mock = MockUpstream::start().await;
    let huge = "9".repeat(4000);
    mock.set_chaos(
        11,
        vec![
            (3, Reply::ok()),
            (2, Reply::drop_connection()),
            (
                1,
                Reply::overloaded().retry_after("99999999999999999999999"),
            ),
            (1, Reply::overloaded().retry_after("-1")),
            (1, Reply::overloaded().header("retry-after-ms", "NaN")),
            (
                1,
                Reply::rate_limited()
                    .header("anthropic-ratelimit-requests-reset", "0000-13-45T99:99:99Z"),
            ),
            (1, Reply::raw(599, Bytes::from_static(b"\xff\xfe not json"))),
            (1, Reply::raw(503, Bytes::from(huge.clone()))),
            (
                1,
                Reply::api_error().header("request-id", &"r".repeat(2000)),
            ),
            (1, Reply::overloaded().header("x-should-retry", "maybe")),
        ],
    );
    let policy = RetryPolicy::foreground().seed(5);
    let service = ServiceBuilder::new()
        .layer(OverloadRetryLayer::new(policy))
        .service(client());
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..60 {
        let service = service.clone();
        let request = messages_request(&mock, "claude-opus-4-6");
        calls.spawn(async move {
            match service.oneshot(request).await {
                Ok(response) => {
                    let _ = response.into_body().collect().await;
                }
                Err(error) => {
                    let _ = error.to_string();
                }
            }
        });
    }
    let all = tokio::time::timeout(Duration::from_secs(700), async {
        while let Some(joined) = calls.join_next().await {
            joined.expect("no call panics");
        }
    })
    .await;
    assert!(all.is_ok(), "every call ends within the deadline");
}

// ===== settings at their extremes =====

/// `Duration::MAX` for every duration setting, a backoff of `Duration::MAX`
/// and a server asking for 30 years: no `Instant` overflow panics, and the
/// call still ends (the clock is paused, so 30 years pass at once).
#[tokio::test(start_paused = true)]
async fn breaker_duration_max_everywhere_does_not_panic() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::overloaded().retry_after("946080000"), Reply::ok()]);
    let max = Duration::MAX;
    let policy = RetryPolicy::foreground()
        .deadline(Some(max))
        .retry_window(Some(max))
        .attempt_timeout(Some(max))
        .idle_timeout(Some(max))
        .sniff_timeout(max)
        .max_server_delay(max)
        .stream_guard(Some(StreamGuard {
            peek_timeout: max,
            max_peek_bytes: usize::MAX,
            ..StreamGuard::default()
        }))
        .overloaded(ClassPolicy::new(
            u32::MAX,
            Backoff::new(Duration::from_secs(1), max, Jitter::Decorrelated),
        ))
        .seed(6);
    let service = ServiceBuilder::new()
        .layer(OverloadRetryLayer::new(policy))
        .layer(
            ConcurrencyPerModelLayer::new(4)
                .queue_timeout(Some(max))
                .max_queued(usize::MAX),
        )
        .service(client());
    let response = service
        .oneshot(messages_request(&mock, "claude-opus-4-6"))
        .await
        .expect("the retry after 30 years succeeds");
    assert_eq!(response.status(), 200);
    let report = response.extensions().get::<RetryReport>().unwrap();
    assert_eq!(report.attempts.len(), 2);
    assert!(report.waited >= Duration::from_secs(946_080_000));
    let _ = response.into_body().collect().await.unwrap();
}

/// Finding 3: "no limit" spelled `usize::MAX` (as a limit, an override or
/// a global cap) panicked in tokio's semaphore (at most `usize::MAX >> 3`
/// permits) on the first call. Limits past tokio's maximum are clamped.
#[tokio::test(start_paused = true)]
async fn breaker_usize_max_limits_do_not_panic() {
    let mock = MockUpstream::start().await;
    let layer = ConcurrencyPerModelLayer::new(usize::MAX)
        .limit_for("claude-opus-4-6", usize::MAX)
        .global_limit(Some(usize::MAX))
        .max_queued(usize::MAX)
        .queue_timeout(Some(Duration::MAX))
        .max_keys(usize::MAX);
    let service = ServiceBuilder::new()
        .layer(OverloadRetryLayer::new(RetryPolicy::foreground().seed(10)))
        .layer(layer.clone())
        .service(client());
    for model in ["claude-opus-4-6", "claude-haiku-4-5"] {
        let response = service
            .clone()
            .oneshot(messages_request(&mock, model))
            .await
            .expect("served");
        assert_eq!(response.status(), 200);
        let _ = response.into_body().collect().await.unwrap();
    }
    assert_eq!(layer.snapshot().len(), 2);
}

/// Backoffs of `Duration::MAX` for every class: the next wait is past any
/// deadline, so the call stops at once instead of sleeping for ever or panicking.
#[tokio::test(start_paused = true)]
async fn breaker_duration_max_backoff_stops_instead_of_sleeping_for_ever() {
    let mock = MockUpstream::start().await;
    mock.set_default(Reply::overloaded());
    let huge = ClassPolicy::new(
        10,
        Backoff::new(Duration::MAX, Duration::MAX, Jitter::Equal),
    );
    let policy = RetryPolicy::foreground()
        .overloaded(huge)
        .server_error(huge)
        .seed(7);
    let service = ServiceBuilder::new()
        .layer(OverloadRetryLayer::new(policy))
        .service(client());
    let started = Instant::now();
    let response = tokio::time::timeout(
        Duration::from_secs(1),
        service.oneshot(messages_request(&mock, "claude-opus-4-6")),
    )
    .await
    .expect("the call ends at once")
    .expect("the 529 comes back");
    assert_eq!(response.status(), 529);
    assert!(started.elapsed() < Duration::from_secs(1));
}

// ===== the quota, for days, shared by many clones =====

/// Sixteen tasks share clones of one foreground policy for a simulated day
/// (one call per task every 90 s) against an upstream that answers 529 to a
/// seeded 30% of attempts, with a full 20-minute outage in the middle. After
/// the outage the quota must come back: retries are granted again and calls
/// succeed as before.
#[tokio::test(start_paused = true)]
async fn breaker_a_day_of_sixteen_clones_keeps_retrying_after_an_outage() {
    let mock = MockUpstream::start().await;
    mock.set_chaos(21, vec![(7, Reply::ok()), (3, Reply::overloaded())]);
    let quota = RetryQuota::default();
    let policy = RetryPolicy::foreground()
        .retry_quota(Some(quota.clone()))
        .seed(8);
    let service = ServiceBuilder::new()
        .layer(OverloadRetryLayer::new(policy))
        .service(client());
    let start = Instant::now();
    let outage = (
        Duration::from_secs(6 * 3600),
        Duration::from_secs(6 * 3600 + 1200),
    );
    let late_ok = Arc::new(AtomicUsize::new(0));
    let late_calls = Arc::new(AtomicUsize::new(0));
    let late_retries = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..16u64 {
        let service = service.clone();
        let mock_url = mock.url("/v1/messages");
        let (late_ok, late_calls, late_retries) =
            (late_ok.clone(), late_calls.clone(), late_retries.clone());
        tasks.spawn(async move {
            tokio::time::sleep(Duration::from_millis(task * 5_000)).await;
            while start.elapsed() < Duration::from_secs(12 * 3600) {
                let request = Request::post(mock_url.clone())
                    .header("content-type", "application/json")
                    .body(Full::new(support::messages_body("claude-opus-4-6")))
                    .unwrap();
                let result = service.clone().oneshot(request).await;
                let late = start.elapsed() > Duration::from_secs(9 * 3600);
                if let Ok(response) = result {
                    let ok = response.status() == 200;
                    let retries = response
                        .extensions()
                        .get::<RetryReport>()
                        .map_or(0, |r| r.attempts.len() - 1);
                    let _ = response.into_body().collect().await;
                    if late {
                        late_calls.fetch_add(1, Ordering::Relaxed);
                        late_retries.fetch_add(retries, Ordering::Relaxed);
                        if ok {
                            late_ok.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_secs(90)).await;
            }
        });
    }
    // The outage: every attempt fails while it lasts.
    tokio::time::sleep(outage.0).await;
    mock.set_chaos(22, vec![(1, Reply::overloaded())]);
    tokio::time::sleep(outage.1 - outage.0).await;
    let drained = quota.available();
    mock.set_chaos(23, vec![(7, Reply::ok()), (3, Reply::overloaded())]);
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap();
    }
    let (ok, calls, retries) = (
        late_ok.load(Ordering::Relaxed),
        late_calls.load(Ordering::Relaxed),
        late_retries.load(Ordering::Relaxed),
    );
    assert!(
        drained < 100,
        "the outage drained the quota ({drained} left)"
    );
    assert!(calls > 1000, "{calls}");
    assert!(
        retries > calls / 5,
        "retries came back after the outage: {retries} in {calls} calls"
    );
    assert!(
        ok * 100 >= calls * 99,
        "{ok} of {calls} late calls succeeded"
    );
}

// ===== hostile clients: names and cancellation =====

/// 100,000 distinct invented model names (some huge, some odd) against a
/// layer with a configured opus limit: opus keeps its own key and limit, the
/// table stays bounded, and when the flood is over nothing is left in
/// flight or queued anywhere.
#[tokio::test(start_paused = true)]
async fn breaker_a_hundred_thousand_invented_names_never_touch_the_configured_model() {
    let opus_in_flight = Arc::new(AtomicUsize::new(0));
    let opus_peak = Arc::new(AtomicUsize::new(0));
    let upstream = {
        let (now, peak) = (opus_in_flight.clone(), opus_peak.clone());
        service_fn(move |request: Request<Full<Bytes>>| {
            let (now, peak) = (now.clone(), peak.clone());
            async move {
                let is_opus = request.extensions().get::<Model>().map(Model::as_str)
                    == Some("claude-opus-4-6");
                if is_opus {
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(n, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                if is_opus {
                    now.fetch_sub(1, Ordering::SeqCst);
                }
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                    b"ok",
                ))))
            }
        })
    };
    let layer = ConcurrencyPerModelLayer::new(2)
        .limit_for("claude-opus-4-6", 3)
        .max_queued(8)
        .queue_timeout(Some(Duration::from_secs(1)));
    let service = ServiceBuilder::new().layer(layer.clone()).service(upstream);
    let mut rng = Rng(0xB4EA_4E45);
    let mut tasks = tokio::task::JoinSet::new();
    let opus_ok = Arc::new(AtomicUsize::new(0));
    for i in 0..100_000u32 {
        let name = match rng.below(6) {
            0 => format!("claude-opus-4-6{}", "x".repeat(rng.below(600) as usize)),
            1 => format!("m\u{0}\n\"{i}"),
            2 => "\u{1F600}".repeat(1 + rng.below(80) as usize) + &i.to_string(),
            _ => format!("invented-{i}"),
        };
        let model = if i % 100 == 0 {
            "claude-opus-4-6".to_owned()
        } else {
            name
        };
        let mut request = Request::new(Full::new(Bytes::new()));
        request.extensions_mut().insert(Model::new(model.as_str()));
        let service = service.clone();
        let opus_ok = opus_ok.clone();
        let cancel_after = rng.below(80);
        tasks.spawn(async move {
            let is_opus = model == "claude-opus-4-6";
            let call = service.oneshot(request);
            if is_opus {
                if call.await.is_ok() {
                    opus_ok.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                // Cancel at a random point: queued, in flight, or with the body held.
                if let Ok(Ok(response)) =
                    tokio::time::timeout(Duration::from_millis(cancel_after), call).await
                {
                    tokio::time::sleep(Duration::from_millis(cancel_after)).await;
                    drop(response);
                }
            }
        });
        if i % 500 == 499 {
            assert!(
                layer.snapshot().len() <= 64 + 2 + 1,
                "bounded table: {}",
                layer.snapshot().len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap();
    }
    let snapshot = layer.snapshot();
    assert!(snapshot.len() <= 64 + 2 + 1, "{}", snapshot.len());
    let opus = snapshot
        .iter()
        .find(|k| k.key.as_str() == "claude-opus-4-6")
        .expect("opus keeps its key");
    assert_eq!(opus.limit, 3);
    assert!(opus_peak.load(Ordering::SeqCst) <= 3);
    for key in &snapshot {
        assert_eq!((key.in_flight, key.queued), (0, 0), "{key:?}");
    }
    // Every permit came back: opus can again run 3 at once.
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..3 {
        let mut request = Request::new(Full::new(Bytes::new()));
        request
            .extensions_mut()
            .insert(Model::new("claude-opus-4-6"));
        let mut service = service.clone();
        burst.spawn(async move {
            let response = service.ready().await.unwrap().call(request).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(response);
        });
    }
    tokio::time::sleep(Duration::from_millis(60)).await;
    let opus = layer
        .snapshot()
        .into_iter()
        .find(|k| k.key.as_str() == "claude-opus-4-6")
        .unwrap();
    assert_eq!((opus.in_flight, opus.queued), (3, 0));
    while burst.join_next().await.is_some() {}
}

/// The whole retry-over-concurrency stack on the foreground preset over
/// loopback, with calls dropped at random points (waiting for a permit,
/// in flight, backing off, sniffing a stalled error body) and bodies dropped
/// half read: afterwards no permit, queue slot or upstream connection is
/// still held, and the quota is where the successes left it.
#[tokio::test(start_paused = true)]
async fn breaker_random_cancellation_gives_every_permit_and_slot_back() {
    let mock = MockUpstream::start().await;
    mock.set_chaos(
        31,
        vec![
            (4, Reply::ok()),
            (2, Reply::overloaded()),
            (1, Reply::api_error().chunk_interval(Duration::from_secs(3))),
            (
                1,
                Reply::sse_message().chunk_interval(Duration::from_millis(700)),
            ),
            (1, Reply::ok().delay(Duration::from_secs(4))),
            (1, Reply::drop_connection()),
        ],
    );
    let quota = RetryQuota::default();
    let layer = ConcurrencyPerModelLayer::new(3)
        .limit_for("claude-opus-4-6", 2)
        .max_queued(16);
    let service = ServiceBuilder::new()
        .layer(OverloadRetryLayer::new(
            RetryPolicy::foreground()
                .retry_quota(Some(quota.clone()))
                .stream_guard(Some(StreamGuard::default()))
                .seed(9),
        ))
        .layer(layer.clone())
        .service(client());
    let mut rng = Rng(0xCA9CE1);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..300u64 {
        let model = ["claude-opus-4-6", "claude-sonnet-4-6", "claude-haiku-4-5"][(i % 3) as usize];
        let request = messages_request(&mock, model);
        let service = service.clone();
        let cancel_call = Duration::from_millis(rng.below(12_000));
        let cancel_body = Duration::from_millis(rng.below(3_000));
        tasks.spawn(async move {
            if let Ok(Ok(response)) =
                tokio::time::timeout(cancel_call, service.oneshot(request)).await
            {
                let mut body = response.into_body();
                let _ = tokio::time::timeout(cancel_body, async {
                    while let Some(frame) = body.frame().await {
                        if frame.is_err() {
                            break;
                        }
                    }
                })
                .await;
            }
        });
        tokio::time::sleep(Duration::from_millis(rng.below(200))).await;
    }
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    for key in layer.snapshot() {
        assert_eq!((key.in_flight, key.queued), (0, 0), "{key:?}");
    }
    for model in ["claude-opus-4-6", "claude-sonnet-4-6", "claude-haiku-4-5"] {
        assert_eq!(
            mock.in_flight(model),
            0,
            "{model} still busy at the upstream"
        );
        assert!(mock.peak_in_flight(model) <= 3, "{model}");
    }
    assert!(quota.available() <= 500);
}

/// Finding 4: the stream guard re-parses everything it has read before each
/// frame, so a hostile (or merely byte-at-a-time) upstream that trickles
/// `ping` events one byte per frame up to `max_peek_bytes` (64 KiB) costs
/// quadratic CPU: about 2^31 bytes scanned for one call's first event.
#[tokio::test(start_paused = true)]
async fn breaker_a_byte_at_a_time_stream_costs_the_guard_linear_time() {
    let ping = b"event: ping\ndata: {\"type\": \"ping\"}\n\n";
    let bytes: Vec<u8> = ping.iter().copied().cycle().take(64 * 1024).collect();
    let upstream = service_fn(move |_: Request<Full<Bytes>>| {
        let frames: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> = bytes
            .iter()
            .map(|&b| Ok(http_body::Frame::data(Bytes::copy_from_slice(&[b]))))
            .collect();
        async move {
            let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
            let response = Response::builder()
                .header("content-type", "text/event-stream")
                .body(body)
                .unwrap();
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let service = ServiceBuilder::new()
        .layer(OverloadRetryLayer::new(
            RetryPolicy::foreground()
                .stream_guard(Some(StreamGuard::default()))
                .seed(12),
        ))
        .service(upstream);
    let started = std::time::Instant::now();
    let request = Request::new(Full::new(support::messages_body("claude-opus-4-6")));
    let response = service.oneshot(request).await.expect("handed on");
    let cpu = started.elapsed();
    assert_eq!(response.status(), 200);
    assert!(
        cpu < Duration::from_millis(300),
        "the guard spent {cpu:?} on 64 KiB"
    );
}

/// The linear-time guard still sees an overloaded error event cut into
/// single bytes with CRLF line ends after a `ping`, and retries it.
#[tokio::test(start_paused = true)]
async fn breaker_a_byte_at_a_time_crlf_error_event_is_still_retried() {
    let error = "event: ping\r\ndata: {\"type\": \"ping\"}\r\n\r\nevent: error\r\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\r\n\r\n";
    let content = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\"}\n\n";
    let calls = Arc::new(AtomicUsize::new(0));
    let upstream = service_fn(move |_: Request<Full<Bytes>>| {
        let text = if calls.fetch_add(1, Ordering::SeqCst) == 0 {
            error
        } else {
            content
        };
        let frames: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> = text
            .bytes()
            .map(|b| Ok(http_body::Frame::data(Bytes::copy_from_slice(&[b]))))
            .collect();
        async move {
            let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
            let response = Response::builder()
                .header("content-type", "text/event-stream")
                .body(body)
                .unwrap();
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let service = ServiceBuilder::new()
        .layer(OverloadRetryLayer::new(
            RetryPolicy::foreground()
                .stream_guard(Some(StreamGuard::default()))
                .seed(13),
        ))
        .service(upstream);
    let request = Request::new(Full::new(support::messages_body("claude-opus-4-6")));
    let response = service.oneshot(request).await.expect("handed on");
    let report = response.extensions().get::<RetryReport>().unwrap().clone();
    assert_eq!(report.attempts.len(), 2, "{report:?}");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], content.as_bytes());
}
