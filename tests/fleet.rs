//! Workers sharing a fleet through a real redis-server on 127.0.0.1: one
//! per-model cap for all, slots of a lost worker freed within one lease,
//! one retry quota for all, and a store that dies and comes back without a
//! call hanging, failing or being sent twice.
//!
//! Each worker here is a `Fleet` with its own connection (and, for the
//! crash, its own runtime); tests/fleet_processes.rs runs real processes.
//! The server is another process, so these tests run on the real clock.
#![cfg(all(feature = "redis", feature = "concurrency", feature = "retry"))]

#[path = "support/redis.rs"]
mod redis_server;
mod support;

use std::time::Duration;

use http_body_util::BodyExt;
use redis_server::RedisServer;
use support::{MockUpstream, Reply, client, messages_request};
use tower::{Layer, ServiceBuilder, ServiceExt};
use tower_overload::backoff::{Backoff, Jitter};
use tower_overload::concurrency::ConcurrencyPerModelLayer;
use tower_overload::fleet::{Fleet, FleetConfig, RedisStore};
use tower_overload::retry::{ClassPolicy, OverloadRetryLayer, RetryPolicy};

const MODEL: &str = "claude-opus-4-6";

fn worker(redis: &RedisServer, config: FleetConfig) -> Fleet {
    Fleet::new(RedisStore::open(&redis.url()).unwrap(), config)
}

/// A streamed body: the upstream is busy until its last chunk.
fn streamed() -> Reply {
    Reply::slow_body(
        &["data: a\n\n", "data: b\n\n", "data: c\n\n"],
        Duration::from_millis(5),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_workers_share_one_cap_of_eight() {
    let Some(redis) = RedisServer::start_or_skip() else {
        return;
    };
    let mock = MockUpstream::start().await;
    mock.set_default(streamed());
    let workers: Vec<Fleet> = (0..4)
        .map(|_| worker(&redis, FleetConfig::default().share(0.25)))
        .collect();
    let services: Vec<_> = workers
        .iter()
        .map(|fleet| {
            ConcurrencyPerModelLayer::new(8)
                .fleet(fleet.clone())
                .layer(client())
        })
        .collect();
    let mut calls = tokio::task::JoinSet::new();
    for call in 0..240 {
        let service = services[call % 4].clone();
        let request = messages_request(&mock, MODEL);
        calls.spawn(async move {
            let response = service.oneshot(request).await.unwrap();
            assert_eq!(response.status(), 200);
            response.into_body().collect().await.unwrap().to_bytes()
        });
    }
    while let Some(body) = calls.join_next().await {
        assert_eq!(&body.unwrap()[..], b"data: a\n\ndata: b\n\ndata: c\n\n");
    }
    assert_eq!(mock.request_count(), 240);
    let peak = mock.peak_in_flight(MODEL);
    assert!(peak <= 8, "the fleet's cap is 8, the upstream saw {peak}");
    assert!(peak >= 6, "the cap was used: {peak}");
    // Slots kept for a next call that never came go back within a tick.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for fleet in &workers {
        let snapshot = fleet.snapshot();
        assert!(!snapshot.degraded, "{snapshot:?}");
        assert_eq!(snapshot.local_calls, 0, "{snapshot:?}");
        assert_eq!(
            snapshot.leases_held, 0,
            "every lease was released: {snapshot:?}"
        );
    }
    let shared: u64 = workers
        .iter()
        .map(|fleet| fleet.snapshot().shared_calls)
        .sum();
    assert_eq!(shared, 240);
}

#[test]
fn a_lost_worker_frees_its_slots_within_one_lease() {
    let Some(redis) = RedisServer::start_or_skip() else {
        return;
    };
    let lease = Duration::from_secs(1);
    let config = FleetConfig::default().lease(lease).share(0.5);
    let survivor_runtime = tokio::runtime::Runtime::new().unwrap();
    let mock = survivor_runtime.block_on(MockUpstream::start());
    // A worker holding all 4 slots with bodies that never end, on a runtime
    // of its own that is then torn down: a crash, as far as the store can tell.
    let lost_runtime = tokio::runtime::Runtime::new().unwrap();
    lost_runtime.block_on(async {
        mock.set_default(Reply::slow_body(&["x"; 1000], Duration::from_secs(1)));
        let fleet = worker(&redis, config.clone());
        let service = ConcurrencyPerModelLayer::new(4)
            .fleet(fleet.clone())
            .layer(client());
        let mut bodies = Vec::new();
        for _ in 0..4 {
            let response = service
                .clone()
                .oneshot(messages_request(&mock, MODEL))
                .await
                .unwrap();
            bodies.push(response.into_body());
        }
        assert_eq!(fleet.snapshot().leases_held, 4);
        // Neither released nor renewed again: the process "died".
        std::mem::forget(bodies);
    });
    lost_runtime.shutdown_background();
    survivor_runtime.block_on(async {
        mock.set_default(Reply::ok());
        let fleet = worker(&redis, config);
        let service = ConcurrencyPerModelLayer::new(4)
            .queue_timeout(Some(Duration::from_secs(5)))
            .fleet(fleet.clone())
            .layer(client());
        let started = tokio::time::Instant::now();
        let response = service
            .oneshot(messages_request(&mock, MODEL))
            .await
            .unwrap();
        response.into_body().collect().await.unwrap();
        let waited = started.elapsed();
        assert!(
            waited <= lease + Duration::from_millis(300),
            "the slots came back after {waited:?}, the lease is {lease:?}"
        );
        assert!(fleet.snapshot().waits >= 1, "it had to wait for them");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_store_falls_back_to_the_local_share_and_back_again() {
    let Some(mut redis) = RedisServer::start_or_skip() else {
        return;
    };
    let mock = MockUpstream::start().await;
    mock.set_default(streamed());
    let fleet = worker(
        &redis,
        FleetConfig::default()
            .share(0.5)
            .recheck(Duration::from_millis(100)),
    );
    let service = ConcurrencyPerModelLayer::new(4)
        .fleet(fleet.clone())
        .layer(client());
    let run = |count: usize| {
        let service = service.clone();
        let mock = &mock;
        let requests: Vec<_> = (0..count).map(|_| messages_request(mock, MODEL)).collect();
        async move {
            let mut calls = tokio::task::JoinSet::new();
            for request in requests {
                let service = service.clone();
                calls.spawn(async move {
                    let response = service.oneshot(request).await.unwrap();
                    response.into_body().collect().await.unwrap();
                });
            }
            while let Some(done) = calls.join_next().await {
                done.unwrap();
            }
        }
    };
    run(20).await;
    assert_eq!(fleet.snapshot().shared_calls, 20);
    assert!(mock.peak_in_flight(MODEL) <= 4);

    redis.kill();
    // The slots kept from the last calls go back (and find the store gone)
    // within a tick; calls meanwhile may still use them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), run(20))
        .await
        .expect("no call hangs on a dead store");
    let down = fleet.snapshot();
    assert!(down.degraded, "{down:?}");
    assert_eq!(
        down.episodes, 1,
        "one episode, however many calls: {down:?}"
    );
    assert_eq!(down.local_calls, 20, "{down:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(mock.request_count(), 40, "every call sent exactly once");

    redis.restart();
    let back = tokio::time::Instant::now();
    while fleet.snapshot().degraded {
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "the store is used again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    run(20).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = fleet.snapshot();
    assert_eq!(after.shared_calls, 40, "{after:?}");
    assert_eq!(after.episodes, 1);
    assert_eq!(after.leases_held, 0, "{after:?}");
    assert_eq!(mock.request_count(), 60);
}

/// A policy that retries overloads fast (the quota is what is tested).
fn fast_retries() -> RetryPolicy {
    RetryPolicy::foreground()
        .overloaded(ClassPolicy::new(
            5,
            Backoff::new(
                Duration::from_millis(1),
                Duration::from_millis(5),
                Jitter::Full,
            ),
        ))
        .retry_quota(Some(tower_overload::budget::RetryQuota::new(50, 5, 10)))
        .deadline(None)
        .seed(20)
}

/// Attempts the upstream saw for `calls` calls spread over four retry
/// layers in a full outage.
async fn outage_attempts(policies: Vec<RetryPolicy>, calls: usize) -> usize {
    let mock = MockUpstream::start().await;
    mock.set_default(Reply::overloaded());
    let services: Vec<_> = policies
        .into_iter()
        .map(|policy| {
            ServiceBuilder::new()
                .layer(OverloadRetryLayer::new(policy))
                .service(client())
        })
        .collect();
    for round in 0..calls / 4 {
        let mut batch = tokio::task::JoinSet::new();
        for service in &services {
            let call = service.clone().oneshot(messages_request(&mock, MODEL));
            batch.spawn(async move {
                let response = call.await.unwrap();
                response.into_body().collect().await.unwrap();
            });
        }
        while batch.join_next().await.is_some() {}
        if round % 10 == 0 {
            // Let the background syncs run between bursts, as calls spread over time would.
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
    mock.request_count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_costs_the_fleet_one_quota_not_one_per_worker() {
    let Some(redis) = RedisServer::start_or_skip() else {
        return;
    };
    let calls = 400;
    let fleets: Vec<Fleet> = (0..4)
        .map(|_| worker(&redis, FleetConfig::default().share(0.25)))
        .collect();
    let shared = outage_attempts(
        fleets
            .iter()
            .map(|fleet| fast_retries().fleet(fleet))
            .collect(),
        calls,
    )
    .await;
    let alone = outage_attempts((0..4).map(|_| fast_retries()).collect(), calls).await;
    // A quota of 50 at 5 a retry: 10 retries for the fleet, 40 for four alone.
    let ratio = shared as f64 / calls as f64;
    assert!(
        ratio <= 1.1,
        "fleet-wide attempts per call {ratio}: {shared} for {calls}"
    );
    assert!(shared <= calls + 16, "{shared}");
    assert!(alone >= calls + 40, "four quotas of their own: {alone}");
}

#[cfg(feature = "fallback")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_probes_a_resting_model_for_the_whole_fleet() {
    use tower_overload::fallback::{Cooldown, ModelFallbackLayer};
    let Some(redis) = RedisServer::start_or_skip() else {
        return;
    };
    const SONNET: &str = "claude-sonnet-4-6";
    let rest = Duration::from_millis(600);
    let mock = MockUpstream::start().await;
    mock.storm(MODEL, Duration::from_secs(3600), Reply::overloaded());
    let workers: Vec<Fleet> = (0..4)
        .map(|_| worker(&redis, FleetConfig::default().share(0.25)))
        .collect();
    let services: Vec<_> = workers
        .iter()
        .map(|fleet| {
            ModelFallbackLayer::new([MODEL, SONNET])
                .cooldown(Cooldown {
                    overloads: 2,
                    window: Duration::from_secs(60),
                    cooldown: rest,
                    max_cooldown: rest,
                })
                .fleet(fleet.clone())
                .layer(client())
        })
        .collect();
    let call = |worker: usize| {
        let call = services[worker]
            .clone()
            .oneshot(messages_request(&mock, MODEL));
        async move {
            let response = call.await.unwrap();
            assert_eq!(response.status(), 200);
            response.into_body().collect().await.unwrap();
        }
    };
    // Worker 0 meets the storm and its breaker opens; the fleet hears of it.
    call(0).await;
    call(0).await;
    let opened = mock.requests().len();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let opus = |mock: &MockUpstream| {
        mock.requests()
            .iter()
            .filter(|request| request.model.as_deref() == Some(MODEL))
            .map(|request| request.at)
            .collect::<Vec<_>>()
    };
    let before = opus(&mock).len();
    assert_eq!(before, 2, "{opened} requests");
    // Every worker calls every 10 ms for 3 s while the storm goes on.
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        futures::future::join_all((0..4).map(call)).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let probes = opus(&mock).split_off(before);
    // One probe per rest for the fleet (a rest of 0.6 s plus up to a sync
    // or two of delay), never two at once; four workers alone would probe
    // four times as often.
    assert!(
        (2..=5).contains(&probes.len()),
        "{} probes in 3 s of storm: {probes:?}",
        probes.len()
    );
    for pair in probes.windows(2) {
        let gap = pair[1].duration_since(pair[0]);
        assert!(
            gap >= rest - Duration::from_millis(50),
            "two probes {gap:?} apart"
        );
    }
    // The storm ends: the next probe succeeds and every worker is back on opus.
    mock.storm(MODEL, Duration::ZERO, Reply::overloaded());
    let ended = tokio::time::Instant::now();
    loop {
        let served = opus(&mock).len();
        futures::future::join_all((0..4).map(call)).await;
        if opus(&mock).len() >= served + 4 {
            break;
        }
        assert!(
            ended.elapsed() < Duration::from_secs(3),
            "opus never came back for all"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(feature = "pacing")]
mod pacing {
    use super::*;
    use tower_overload::pacing::{PacingLimits, RateLimitPacingLayer};

    fn paced(fleet: &Fleet, rpm: u64) -> RateLimitPacingLayer {
        RateLimitPacingLayer::new()
            .limits_for(
                MODEL,
                PacingLimits {
                    requests_per_minute: Some(rpm),
                    ..PacingLimits::default()
                },
            )
            .queue_timeout(None)
            .fleet(fleet.clone())
    }

    /// Four workers calling as fast as pacing lets them for `seconds`; the
    /// times the upstream saw their requests.
    async fn hammer(
        mock: &MockUpstream,
        layers: &[RateLimitPacingLayer],
        seconds: u64,
    ) -> Vec<tokio::time::Instant> {
        let stop = tokio::time::Instant::now() + Duration::from_secs(seconds);
        let mut tasks = tokio::task::JoinSet::new();
        for layer in layers {
            for _ in 0..4 {
                let service = layer.layer(client());
                let request = {
                    let mock_url = mock.url("/v1/messages");
                    move || {
                        http::Request::post(mock_url.clone())
                            .header("content-type", "application/json")
                            .body(http_body_util::Full::new(bytes::Bytes::from(format!(
                                r#"{{"model":"{MODEL}","max_tokens":8,"messages":[{{"role":"user","content":"hi"}}]}}"#
                            ))))
                            .unwrap()
                    }
                };
                tasks.spawn(async move {
                    loop {
                        let call = service.clone().oneshot(request());
                        match tokio::time::timeout_at(stop, call).await {
                            Ok(Ok(response)) => {
                                let _ = response.into_body().collect().await;
                            }
                            Ok(Err(error)) => panic!("{error}"),
                            Err(_) => return,
                        }
                    }
                });
            }
        }
        while tasks.join_next().await.is_some() {}
        mock.requests().iter().map(|request| request.at).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn four_workers_pace_under_one_organisation_limit() {
        let Some(redis) = RedisServer::start_or_skip() else {
            return;
        };
        let mock = MockUpstream::start().await;
        let rpm = 120; // two a second, a bucket of 120
        let fleets: Vec<Fleet> = (0..4)
            .map(|_| worker(&redis, FleetConfig::default().share(0.25)))
            .collect();
        let layers: Vec<_> = fleets.iter().map(|fleet| paced(fleet, rpm)).collect();
        let sent = hammer(&mock, &layers, 4).await;
        // The whole bucket, plus 4 s of refill at 2 a second: 128. Four
        // workers pacing alone would send four buckets.
        assert!(
            sent.len() <= 128 + 16,
            "{} requests under a fleet RPM of {rpm} in 4 s",
            sent.len()
        );
        assert!(sent.len() >= 100, "the budget was used: {}", sent.len());
        // Still flowing after the burst: the refill is served.
        let late = sent
            .iter()
            .filter(|at| at.duration_since(sent[0]) >= Duration::from_secs(2))
            .count();
        assert!(late >= 2, "{late} requests after the burst");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_workers_429_pauses_the_fleet() {
        let Some(redis) = RedisServer::start_or_skip() else {
            return;
        };
        let mock = MockUpstream::start().await;
        let fleets: Vec<Fleet> = (0..4)
            .map(|_| worker(&redis, FleetConfig::default().share(0.25)))
            .collect();
        let layers: Vec<_> = fleets.iter().map(|fleet| paced(fleet, 100_000)).collect();
        // The workers are up (their buckets exist and sync).
        for layer in &layers {
            let _ = layer.layer(client());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        // Worker 0 gets a 429 asking for 2 s.
        mock.push([Reply::rate_limited().retry_after("2")]);
        let response = layers[0]
            .layer(client())
            .oneshot(messages_request(&mock, MODEL))
            .await
            .unwrap();
        assert_eq!(response.status(), 429);
        let paused_at = tokio::time::Instant::now();
        // Two syncs later every worker has heard.
        tokio::time::sleep(Duration::from_millis(250)).await;
        let sent = hammer(&mock, &layers[1..], 3).await;
        let early = sent
            .iter()
            .skip(1)
            .filter(|at| at.duration_since(paused_at) < Duration::from_millis(1800))
            .count();
        assert_eq!(early, 0, "requests sent by other workers inside the pause");
        assert!(
            sent.len() > 10,
            "they went on once it ended: {}",
            sent.len()
        );
    }
}

/// A store whose acquire answers late: the slot is taken in Redis at once,
/// the answer arrives after `delay`.
#[derive(Debug)]
struct LateAnswers {
    inner: RedisStore,
    delay: Duration,
}

impl tower_overload::fleet::SharedStore for LateAnswers {
    fn acquire<'a>(
        &'a self,
        key: &'a str,
        cap: u32,
        lease: Duration,
        holder: &'a str,
    ) -> tower_overload::fleet::StoreFuture<'a, tower_overload::fleet::Acquired> {
        Box::pin(async move {
            let answer = self.inner.acquire(key, cap, lease, holder).await;
            tokio::time::sleep(self.delay).await;
            answer
        })
    }
    fn renew<'a>(
        &'a self,
        key: &'a str,
        holders: &'a [String],
        lease: Duration,
    ) -> tower_overload::fleet::StoreFuture<'a, u32> {
        self.inner.renew(key, holders, lease)
    }
    fn release<'a>(
        &'a self,
        key: &'a str,
        holders: &'a [String],
    ) -> tower_overload::fleet::StoreFuture<'a, ()> {
        self.inner.release(key, holders)
    }
    fn add_tokens<'a>(
        &'a self,
        key: &'a str,
        capacity: u32,
        delta: i64,
    ) -> tower_overload::fleet::StoreFuture<'a, u32> {
        self.inner.add_tokens(key, capacity, delta)
    }
    fn sync_breaker<'a>(
        &'a self,
        key: &'a str,
        probe_key: &'a str,
        holder: &'a str,
        event: Option<tower_overload::fleet::BreakerEvent>,
        wants_probe: bool,
        probe_ttl: Duration,
    ) -> tower_overload::fleet::StoreFuture<'a, tower_overload::fleet::BreakerState> {
        self.inner
            .sync_breaker(key, probe_key, holder, event, wants_probe, probe_ttl)
    }
    fn sync_buckets<'a>(
        &'a self,
        key: &'a str,
        needs_key: &'a str,
        holder: &'a str,
        sync: &'a tower_overload::fleet::BucketsSync,
    ) -> tower_overload::fleet::StoreFuture<'a, tower_overload::fleet::BucketsView> {
        self.inner.sync_buckets(key, needs_key, holder, sync)
    }
    fn ping(&self) -> tower_overload::fleet::StoreFuture<'_, ()> {
        self.inner.ping()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_cancelled_while_the_store_answers_leaks_no_slot() {
    let Some(redis) = RedisServer::start_or_skip() else {
        return;
    };
    let mock = MockUpstream::start().await;
    let late = Fleet::new(
        LateAnswers {
            inner: RedisStore::open(&redis.url()).unwrap(),
            delay: Duration::from_millis(300),
        },
        FleetConfig::default().op_timeout(Duration::from_secs(2)),
    );
    let service = ConcurrencyPerModelLayer::new(1)
        .fleet(late.clone())
        .layer(client());
    // Cancelled after the store took the slot, before its answer came.
    let cancelled = tokio::time::timeout(
        Duration::from_millis(100),
        service.oneshot(messages_request(&mock, MODEL)),
    )
    .await;
    assert!(cancelled.is_err(), "the call was cancelled mid-acquire");
    // Another worker gets the one slot at once, not after the 10 s lease.
    let other = worker(&redis, FleetConfig::default());
    let started = tokio::time::Instant::now();
    let response = ConcurrencyPerModelLayer::new(1)
        .queue_timeout(Some(Duration::from_secs(5)))
        .fleet(other)
        .layer(client())
        .oneshot(messages_request(&mock, MODEL))
        .await
        .unwrap();
    response.into_body().collect().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the slot came back after {:?}",
        started.elapsed()
    );
    assert_eq!(mock.request_count(), 1);
}
