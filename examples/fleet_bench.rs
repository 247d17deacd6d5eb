//! The fleet's cost, measured: four `fleet_worker` processes calling a fast
//! loopback upstream through a redis-server, against the same four with
//! local state, in alternating rounds of one run; prints calls per second
//! (median of the rounds), the ratio, and store round trips per call.
//!
//! ```text
//! cargo run --release --features redis --example fleet_bench
//! ```
//!
//! It builds `fleet_worker` (same profile) and starts `redis-server` (or
//! `$REDIS_SERVER`) on a free port itself, as the tests do.

use std::convert::Infallible;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

// The tests' redis-server starter: a free port, a PING until it answers.
#[path = "../tests/support/redis.rs"]
mod redis_server;

const WORKERS: usize = 4;
const CALLS_PER_WORKER: usize = 3000;
const ROUNDS: usize = 3;

/// A fast upstream: 200 with a small message, at once.
async fn upstream() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|_request| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                        br#"{"type":"message","content":[],"usage":{"input_tokens":3,"output_tokens":1}}"#,
                    ))))
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

fn worker_binary() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let release = !cfg!(debug_assertions);
    let mut build = Command::new(cargo);
    build.args([
        "build",
        "--quiet",
        "--features",
        "redis",
        "--example",
        "fleet_worker",
    ]);
    if release {
        build.arg("--release");
    }
    assert!(
        build.status().expect("cargo").success(),
        "fleet_worker builds"
    );
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .join("fleet_worker")
}

/// One round of four workers; calls per second and the summary lines.
fn round(binary: &PathBuf, redis: u16, upstream: u16, local: bool) -> (f64, Vec<String>) {
    let started = Instant::now();
    let children: Vec<_> = (0..WORKERS)
        .map(|_| {
            let mut command = Command::new(binary);
            command
                .env("FLEET_REDIS", format!("redis://127.0.0.1:{redis}/"))
                .env("FLEET_UPSTREAM", format!("http://127.0.0.1:{upstream}"))
                .env("FLEET_CALLS", CALLS_PER_WORKER.to_string())
                .env("FLEET_PARALLEL", "16")
                // A cap that does not bind: the cost of sharing is measured, not the cap.
                .env("FLEET_CAP", "256")
                .stdout(Stdio::piped());
            if local {
                command.env("FLEET_LOCAL", "1");
            }
            command.spawn().expect("fleet_worker")
        })
        .collect();
    let lines: Vec<String> = children
        .into_iter()
        .map(|child| {
            String::from_utf8_lossy(&child.wait_with_output().unwrap().stdout)
                .trim()
                .to_owned()
        })
        .collect();
    let seconds = started.elapsed().as_secs_f64();
    ((WORKERS * CALLS_PER_WORKER) as f64 / seconds, lines)
}

fn field(line: &str, name: &str) -> f64 {
    line.split_whitespace()
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
        .unwrap_or(0.0)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let binary = worker_binary();
    let Some(redis) = redis_server::RedisServer::start_or_skip() else {
        return;
    };
    let redis_port = redis.port();
    let upstream_port = upstream().await;
    let (mut fleet, mut local, mut trips) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let (shared_rate, lines) =
            tokio::task::block_in_place(|| round(&binary, redis_port, upstream_port, false));
        fleet.push(shared_rate);
        let acquires: f64 = lines.iter().map(|line| field(line, "acquires")).sum();
        let shared: f64 = lines.iter().map(|line| field(line, "shared")).sum();
        trips.push(acquires / shared.max(1.0));
        let (local_rate, _) =
            tokio::task::block_in_place(|| round(&binary, redis_port, upstream_port, true));
        local.push(local_rate);
    }
    drop(redis);
    let (fleet, local) = (median(fleet), median(local));
    println!("{WORKERS} workers x {CALLS_PER_WORKER} calls, median of {ROUNDS} alternating rounds");
    println!("local state (anchor)    {local:>9.0} calls/s");
    println!(
        "fleet through Redis     {fleet:>9.0} calls/s  ({:.2}x the anchor)",
        fleet / local
    );
    println!("store round trips/call  {:>9.3}", median(trips));
}
