//! The full stack riding out a scripted storm on an embedded loopback mock
//! of the Messages API: no API key, no network, well under a minute.
//!
//! `cargo run --example demo` (add `-- --logs` to see the layer's WARN/ERROR events)
//!
//! The mock answers 529 for every claude-opus-4-6 call for the first 8
//! seconds, sends a few 429s with `retry-after: 1` and a few 500s, and takes
//! 200 ms per call. 300 calls arrive over 6 seconds through
//! log -> fallback (opus -> sonnet -> haiku) -> retry (foreground preset) ->
//! per-model concurrency (opus 4, sonnet 8, haiku 16, adaptive) -> a
//! hyper-util client. Progress is printed live, then a summary table.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use support::{MockUpstream, Reply, client, messages_request};
use tower::{Layer, ServiceExt};
use tower_overload::RequestId;
use tower_overload::backoff::{Backoff, Jitter};
use tower_overload::concurrency::{Aimd, ConcurrencyPerModelLayer};
use tower_overload::fallback::{ModelFallbackLayer, ServedBy};
use tower_overload::request_id::OverloadStats;
use tower_overload::retry::{ClassPolicy, RetryPolicy, RetryReport};
use tower_overload::stack::OverloadStack;

const OPUS: &str = "claude-opus-4-6";
const SONNET: &str = "claude-sonnet-4-6";
const HAIKU: &str = "claude-haiku-4-5";
const CALLS: usize = 300;

/// What one call came back with.
struct Done {
    latency: Duration,
    status: Option<u16>,
    served: Option<String>,
    fell_back: bool,
    request_id: Option<RequestId>,
    attempts: usize,
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--logs") {
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .init();
    }
    let mock = MockUpstream::start().await;
    mock.set_latency(Duration::from_millis(200));
    mock.storm(OPUS, Duration::from_secs(8), Reply::overloaded());
    mock.push((0..6).map(|_| Reply::rate_limited().retry_after("1")));
    mock.push((0..6).map(|_| Reply::api_error()));

    let stats = OverloadStats::new().min_samples(20).on_alert(|alert| {
        println!(
            "  ALERT {:?}: 529 rate {:.0}% for {} over the last minute",
            alert.state,
            alert.rate * 100.0,
            alert.model.as_ref().map_or("all traffic", |m| m.as_str())
        );
    });
    let concurrency = ConcurrencyPerModelLayer::new(16)
        .limit_for(OPUS, 4)
        .limit_for(SONNET, 8)
        // A short queue: past it, calls move on to the next model at once.
        .max_queued(8)
        .queue_timeout(Some(Duration::from_secs(5)))
        .adaptive(Aimd::default());
    let overload_backoff = Backoff::new(
        Duration::from_secs(1),
        Duration::from_secs(60),
        Jitter::Full,
    );
    let service = OverloadStack::new()
        // With a fallback chain, give a model up after two overloaded attempts:
        // the next model answers sooner than a third backoff would end.
        .retry(
            RetryPolicy::foreground()
                .overloaded(ClassPolicy::new(2, overload_backoff))
                .seed(2026),
        )
        .concurrency(concurrency.clone())
        .fallback(ModelFallbackLayer::new([OPUS, SONNET, HAIKU]))
        .stats(stats.clone())
        .layer(client());

    println!(
        "mock Messages API on http://{}: opus answers 529 for 8 s",
        mock.addr()
    );
    println!(
        "sending {CALLS} calls for {OPUS} over 6 s through log -> fallback -> retry -> per-model concurrency\n"
    );
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CALLS {
        let service = service.clone();
        let request = messages_request(&mock, OPUS);
        tasks.spawn(async move {
            tokio::time::sleep(Duration::from_millis(20 * i as u64)).await;
            let sent = Instant::now();
            match service.oneshot(request).await {
                Ok(response) => {
                    let served = response.extensions().get::<ServedBy>().cloned();
                    let attempts = response
                        .extensions()
                        .get::<RetryReport>()
                        .map_or(1, |r| r.attempts.len())
                        + served
                            .as_ref()
                            .map_or(0, |s| s.fallbacks.iter().map(|f| f.request_ids.len()).sum());
                    let done = Done {
                        latency: sent.elapsed(),
                        status: Some(response.status().as_u16()),
                        served: served.as_ref().map(|s| s.served.to_string()),
                        fell_back: served.as_ref().is_some_and(ServedBy::fell_back),
                        request_id: RequestId::from_headers(response.headers()),
                        attempts,
                    };
                    let _ = response.into_body().collect().await;
                    done
                }
                Err(_) => Done {
                    latency: sent.elapsed(),
                    status: None,
                    served: None,
                    fell_back: false,
                    request_id: None,
                    attempts: 0,
                },
            }
        });
    }

    let mut results = Vec::with_capacity(CALLS);
    let mut ticker = tokio::time::interval(Duration::from_millis(1000));
    ticker.tick().await;
    while results.len() < CALLS {
        tokio::select! {
            done = tasks.join_next() => match done {
                Some(Ok(done)) => results.push(done),
                Some(Err(error)) => panic!("a call panicked: {error}"),
                None => break,
            },
            _ = ticker.tick() => {
                let in_flight: Vec<String> = concurrency
                    .snapshot()
                    .iter()
                    .map(|k| format!("{} {}/{}", short(k.key.as_str()), k.in_flight, k.limit))
                    .collect();
                println!(
                    "  t={:>4.1}s  done {:>3}/{CALLS}  in flight [{}]  529 rate (60 s) {:>5.1}%",
                    start.elapsed().as_secs_f64(),
                    results.len(),
                    in_flight.join(", "),
                    stats.overload_rate() * 100.0
                );
            }
        }
    }
    summary(&results, &mock, &stats, start.elapsed());
}

fn short(model: &str) -> &str {
    model.trim_start_matches("claude-")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn summary(results: &[Done], mock: &MockUpstream, stats: &OverloadStats, total: Duration) {
    let successes = results.iter().filter(|d| d.status == Some(200)).count();
    let mut latencies: Vec<Duration> = results.iter().map(|d| d.latency).collect();
    latencies.sort();
    let mut served: BTreeMap<&str, usize> = BTreeMap::new();
    for done in results {
        *served
            .entry(done.served.as_deref().unwrap_or("-"))
            .or_default() += 1;
    }
    let counts = stats.counts();
    let attempts = mock.request_count();
    let row = |name: &str, value: String| println!("  {name:<34} {value}");

    println!("\nsummary after {:.1} s", total.as_secs_f64());
    row("calls", results.len().to_string());
    row(
        "successes",
        format!(
            "{successes} ({:.1}%)",
            100.0 * successes as f64 / results.len() as f64
        ),
    );
    row(
        "failures returned to the caller",
        (results.len() - successes).to_string(),
    );
    row(
        "upstream attempts",
        format!(
            "{attempts} ({:.2} per call)",
            attempts as f64 / results.len() as f64
        ),
    );
    row(
        "attempts logged with a request id",
        results
            .iter()
            .map(|d| d.attempts)
            .sum::<usize>()
            .to_string(),
    );
    row(
        "failed attempts by class",
        format!(
            "overloaded {}, rate limited {}, server error {}",
            counts.overloaded, counts.rate_limited, counts.server_error
        ),
    );
    row(
        "calls that fell back",
        results.iter().filter(|d| d.fell_back).count().to_string(),
    );
    row(
        "served by",
        served
            .iter()
            .map(|(m, n)| format!("{} {n}", short(m)))
            .collect::<Vec<_>>()
            .join(", "),
    );
    row(
        "latency p50 / p99",
        format!(
            "{:.2?} / {:.2?}",
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99)
        ),
    );
    row(
        "peak in flight at the upstream",
        [OPUS, SONNET, HAIKU]
            .iter()
            .map(|m| format!("{} {}", short(m), mock.peak_in_flight(m)))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let samples: Vec<String> = results
        .iter()
        .filter_map(|d| d.request_id.as_ref())
        .step_by(97)
        .map(ToString::to_string)
        .collect();
    row("sample request ids", samples.join(", "));
}
