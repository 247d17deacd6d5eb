//! One worker of a fleet: calls an upstream through the per-model cap and
//! retry quota shared through Redis, then prints what it did on one line.
//! tests/fleet_processes.rs runs four of these as real processes.
//!
//! ```text
//! FLEET_REDIS=redis://127.0.0.1:6379/ FLEET_UPSTREAM=http://127.0.0.1:8080 \
//!   cargo run --example fleet_worker --features redis
//! ```
//!
//! Settings (environment): `FLEET_REDIS`, `FLEET_UPSTREAM` (required),
//! `FLEET_CALLS` (200), `FLEET_PARALLEL` (8), `FLEET_CAP` (8),
//! `FLEET_SHARE` (0.25), `FLEET_LEASE_MS` (10000), `FLEET_MODEL`
//! (claude-opus-4-6), `FLEET_OP_TIMEOUT_MS` (100), `FLEET_LOCAL=1` to use each
//! worker's own state instead of the fleet's (the comparison run).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{ServiceBuilder, ServiceExt};
use tower_overload::backoff::{Backoff, Jitter};
use tower_overload::budget::RetryQuota;
use tower_overload::concurrency::ConcurrencyPerModelLayer;
use tower_overload::fleet::{Fleet, FleetConfig, RedisStore};
use tower_overload::retry::{ClassPolicy, FinalFailure, OverloadRetryLayer, RetryPolicy};

fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let redis = std::env::var("FLEET_REDIS").expect("FLEET_REDIS names the Redis server");
    let upstream = std::env::var("FLEET_UPSTREAM").expect("FLEET_UPSTREAM names the upstream");
    let calls: usize = setting("FLEET_CALLS", 200);
    let parallel: usize = setting("FLEET_PARALLEL", 8);
    let cap: usize = setting("FLEET_CAP", 8);
    let share: f64 = setting("FLEET_SHARE", 0.25);
    let lease = Duration::from_millis(setting("FLEET_LEASE_MS", 10_000));
    let model: String = setting("FLEET_MODEL", "claude-opus-4-6".to_owned());
    let local = std::env::var_os("FLEET_LOCAL").is_some();
    let op_timeout = Duration::from_millis(setting("FLEET_OP_TIMEOUT_MS", 100));

    let fleet = Fleet::new(
        RedisStore::open(&redis).expect("a Redis URL"),
        FleetConfig::default()
            .share(share)
            .lease(lease)
            .op_timeout(op_timeout),
    );
    // Fast retries: what is shared (the quota) is what this worker shows.
    let policy = RetryPolicy::foreground()
        .overloaded(ClassPolicy::new(
            5,
            Backoff::new(
                Duration::from_millis(1),
                Duration::from_millis(5),
                Jitter::Full,
            ),
        ))
        .retry_quota(Some(RetryQuota::new(50, 5, 10)))
        .final_failure(FinalFailure::Error)
        .deadline(None);
    let mut concurrency = ConcurrencyPerModelLayer::new(cap).queue_timeout(None);
    let policy = if local {
        policy
    } else {
        concurrency = concurrency.fleet(fleet.clone());
        policy.fleet(&fleet)
    };
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let service = ServiceBuilder::new()
        .layer(OverloadRetryLayer::new(policy))
        .layer(concurrency)
        .service(client);

    let body = Bytes::from(format!(
        r#"{{"model":"{model}","max_tokens":16,"messages":[{{"role":"user","content":"hi"}}]}}"#
    ));
    let started = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..parallel {
        let service = service.clone();
        let next = next.clone();
        let (upstream, body) = (upstream.clone(), body.clone());
        tasks.spawn(async move {
            let (mut ok, mut failed) = (0usize, 0usize);
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < calls {
                let request = Request::post(format!("{upstream}/v1/messages"))
                    .header("content-type", "application/json")
                    .header("anthropic-version", "2023-06-01")
                    .body(Full::new(body.clone()))
                    .expect("a request");
                match service.clone().oneshot(request).await {
                    Ok(response) if response.status().is_success() => {
                        match response.into_body().collect().await {
                            Ok(_) => ok += 1,
                            Err(_) => failed += 1,
                        }
                    }
                    _ => failed += 1,
                }
            }
            (ok, failed)
        });
    }
    let (mut ok, mut failed) = (0, 0);
    while let Some(counts) = tasks.join_next().await {
        let (o, f) = counts.expect("a worker task");
        ok += o;
        failed += f;
    }
    let snapshot = fleet.snapshot();
    println!(
        "calls={calls} ok={ok} failed={failed} shared={} local={} waits={} acquires={} episodes={} elapsed_ms={}",
        snapshot.shared_calls,
        snapshot.local_calls,
        snapshot.waits,
        snapshot.acquires,
        snapshot.episodes,
        started.elapsed().as_millis()
    );
}
