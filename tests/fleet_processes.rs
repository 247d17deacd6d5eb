//! Four worker processes (examples/fleet_worker.rs, real processes, not
//! tasks) sharing one Redis: 2,000 streamed calls under a fleet cap of 8, a
//! worker killed mid-stream whose slots come back within one lease, and an
//! outage that costs the fleet one retry quota; plus the throughput of the
//! fleet against the same workers with local state.
//!
//! Processes run on the real clock, so these tests take real seconds.
#![cfg(all(feature = "redis", feature = "concurrency", feature = "retry"))]

#[path = "support/redis.rs"]
mod redis_server;
mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis_server::RedisServer;
use support::{MockUpstream, Reply};
use tokio::time::Instant;

const MODEL: &str = "claude-opus-4-6";

/// The worker binary cargo built beside this test (examples are built with
/// the tests).
fn worker_binary() -> PathBuf {
    let test = std::env::current_exe().expect("the test's path");
    let profile = test
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let binary = profile.join("examples").join("fleet_worker");
    assert!(
        binary.exists(),
        "{} is missing: run the tests with the `redis` feature so cargo builds the example",
        binary.display()
    );
    binary
}

struct Run {
    calls: usize,
    parallel: usize,
    lease_ms: u64,
    local: bool,
}

fn spawn(redis: &RedisServer, mock: &MockUpstream, run: &Run) -> Child {
    let mut command = Command::new(worker_binary());
    command
        .env("FLEET_REDIS", redis.url())
        .env("FLEET_UPSTREAM", format!("http://{}", mock.addr()))
        .env("FLEET_CALLS", run.calls.to_string())
        .env("FLEET_PARALLEL", run.parallel.to_string())
        .env("FLEET_CAP", "8")
        .env("FLEET_SHARE", "0.25")
        .env("FLEET_LEASE_MS", run.lease_ms.to_string())
        .env("FLEET_MODEL", MODEL)
        // Generous: four processes, Redis and the mock share a loaded CI
        // machine, and a timed-out store call would send a worker to its
        // local share (tested in tests/fleet.rs), not what is measured here.
        .env("FLEET_OP_TIMEOUT_MS", "2000")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if run.local {
        command.env("FLEET_LOCAL", "1");
    }
    command.spawn().expect("a worker process")
}

/// Waits for a worker and reads its summary line into (name, value) pairs.
async fn finish(child: Child) -> Vec<(String, u64)> {
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .expect("the worker's output");
    assert!(output.status.success(), "a worker failed: {output:?}");
    let line = String::from_utf8_lossy(&output.stdout).to_string();
    line.split_whitespace()
        .filter_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn field(summary: &[(String, u64)], name: &str) -> u64 {
    summary
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| *value)
        .unwrap_or_else(|| panic!("no {name} in {summary:?}"))
}

fn streamed() -> Reply {
    Reply::slow_body(
        &["event: ping\ndata: {}\n\n", "event: ping\ndata: {}\n\n"],
        Duration::from_millis(3),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_never_put_more_than_eight_in_flight() {
    let Some(redis) = RedisServer::start_or_skip() else {
        return;
    };
    let mock = MockUpstream::start().await;
    mock.set_default(streamed());
    let run = Run {
        calls: 500,
        parallel: 8,
        lease_ms: 10_000,
        local: false,
    };
    let workers: Vec<Child> = (0..4).map(|_| spawn(&redis, &mock, &run)).collect();
    let mut ok = 0;
    for worker in workers {
        let summary = finish(worker).await;
        ok += field(&summary, "ok");
        assert_eq!(field(&summary, "failed"), 0, "{summary:?}");
        assert_eq!(field(&summary, "local"), 0, "{summary:?}");
    }
    assert_eq!(ok, 2000);
    assert_eq!(mock.request_count(), 2000, "each call sent once");
    let peak = mock.peak_in_flight(MODEL);
    assert!(
        peak <= 8,
        "four processes under a fleet cap of 8 put {peak} in flight"
    );
    assert!(peak >= 6, "the cap was used: {peak}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_frees_its_slots_within_one_lease() {
    let Some(redis) = RedisServer::start_or_skip() else {
        return;
    };
    let lease = Duration::from_millis(1500);
    let mock = MockUpstream::start().await;
    // Streams that last far longer than the test: slots stay held.
    mock.set_default(Reply::slow_body(
        &["data: {}\n\n"; 400],
        Duration::from_millis(50),
    ));
    let run = Run {
        calls: 1000,
        parallel: 4,
        lease_ms: lease.as_millis() as u64,
        local: false,
    };
    let mut victim = spawn(&redis, &mock, &run);
    let started = Instant::now();
    while mock.in_flight(MODEL) < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the first worker started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let others: Vec<Child> = (0..3).map(|_| spawn(&redis, &mock, &run)).collect();
    while mock.in_flight(MODEL) < 8 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the cap filled"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Killed mid-stream: no release, no renewal; its connections close.
    victim.kill().unwrap();
    let killed = Instant::now();
    victim.wait().unwrap();
    let mut refilled = None;
    while killed.elapsed() < lease * 3 {
        let in_flight = mock.in_flight(MODEL);
        assert!(in_flight <= 8, "{in_flight} in flight");
        if refilled.is_none() && in_flight == 8 && killed.elapsed() > Duration::from_millis(100) {
            refilled = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refilled = refilled.expect("the killed worker's slots came back");
    assert!(
        refilled <= lease + Duration::from_millis(500),
        "its slots came back after {refilled:?}; the lease is {lease:?}"
    );
    assert!(mock.peak_in_flight(MODEL) <= 8);
    for mut other in others {
        other.kill().unwrap();
        other.wait().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_costs_four_processes_one_quota() {
    let Some(redis) = RedisServer::start_or_skip() else {
        return;
    };
    let mock = MockUpstream::start().await;
    mock.set_default(Reply::overloaded());
    let run = Run {
        calls: 500,
        parallel: 2,
        lease_ms: 10_000,
        local: false,
    };
    let workers: Vec<Child> = (0..4).map(|_| spawn(&redis, &mock, &run)).collect();
    for worker in workers {
        let summary = finish(worker).await;
        assert_eq!(field(&summary, "failed"), 500, "{summary:?}");
    }
    let attempts = mock.request_count();
    let per_call = attempts as f64 / 2000.0;
    // A fleet quota of 50 at 5 a retry: about 10 retries for the fleet.
    assert!(
        per_call <= 1.1,
        "fleet-wide attempts per call {per_call} ({attempts})"
    );
}
