//! The stack's metrics in Prometheus' text format, after a short storm on an
//! embedded loopback mock of the Messages API: no API key, no network.
//!
//! `cargo run --example metrics_prometheus --features metrics`
//!
//! The mock answers 529 for every claude-opus-4-6 call for the first 2
//! seconds, sends a few 429s with `retry-after: 1`, takes 50 ms per call and
//! streams some answers. 60 calls go through log -> fallback (opus ->
//! sonnet) -> retry -> per-model concurrency -> a hyper-util client, with
//! `metrics-exporter-prometheus` installed as the recorder; then what a
//! Prometheus scrape would read is printed. The alert rules for these
//! metrics are in the README's "Monitoring" section.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use http_body_util::BodyExt;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use support::{MockUpstream, Reply, client, messages_request};
use tower::{Layer, ServiceExt};
use tower_overload::fallback::ModelFallbackLayer;
use tower_overload::metrics::{PriceTable, Prices, names};
use tower_overload::retry::RetryPolicy;
use tower_overload::stack::OverloadStack;
use tower_overload::stats::OverloadStats;

const OPUS: &str = "claude-opus-4-6";
const SONNET: &str = "claude-sonnet-4-6";

/// A stream with its usage, one event every 100 ms.
fn stream() -> Reply {
    Reply::sse(&[
        (
            "message_start",
            r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"usage":{"input_tokens":1200,"cache_read_input_tokens":4000,"output_tokens":1}}}"#,
        ),
        (
            "content_block_delta",
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#,
        ),
        (
            "message_delta",
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":180}}"#,
        ),
        ("message_stop", r#"{"type":"message_stop"}"#),
    ])
    .chunk_interval(Duration::from_millis(100))
}

#[tokio::main]
async fn main() {
    // Histograms as buckets, so that Prometheus can take quantiles across
    // instances (the README's TTFT alert uses `histogram_quantile`).
    let seconds = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0];
    let tokens = [10.0, 100.0, 1_000.0, 10_000.0, 100_000.0];
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Prefix("gen_ai.client.token".into()), &tokens)
        .and_then(|b| b.set_buckets(&seconds))
        .expect("valid buckets")
        .install_recorder()
        .expect("no other recorder installed");

    let mock = MockUpstream::start().await;
    mock.set_latency(Duration::from_millis(50));
    mock.storm(OPUS, Duration::from_secs(2), Reply::overloaded());
    mock.push((0..3).map(|_| Reply::rate_limited().retry_after("1")));
    mock.push((0..10).map(|_| stream()));

    let prices = PriceTable::new()
        .price(OPUS, Prices::per_million(5.0, 25.0, 0.5, 6.25))
        .price(SONNET, Prices::per_million(3.0, 15.0, 0.3, 3.75));
    let service = OverloadStack::new()
        .fallback(ModelFallbackLayer::new([OPUS, SONNET]))
        .retry(RetryPolicy::foreground().seed(1))
        .stats(OverloadStats::new().min_samples(10))
        .prices(prices)
        .layer(client());

    let mut calls = tokio::task::JoinSet::new();
    for i in 0..60 {
        let service = service.clone();
        let request = messages_request(&mock, if i % 3 == 0 { SONNET } else { OPUS });
        calls.spawn(async move {
            tokio::time::sleep(Duration::from_millis(50 * i)).await;
            match service.oneshot(request).await {
                // Read to the end: usage and a stream's first chunk are
                // recorded as the body passes.
                Ok(response) => response.into_body().collect().await.is_ok(),
                Err(_) => false,
            }
        });
    }
    let ok = calls.join_all().await.into_iter().filter(|ok| *ok).count();
    eprintln!("{ok} of 60 calls answered; the metrics a scrape reads:\n");

    let text = prometheus.render();
    println!("{text}");
    // The names a dashboard and the README's alert rules use.
    for name in [
        names::OPERATION_DURATION,
        names::ATTEMPTS,
        names::FALLBACKS,
        names::OVERLOAD_RATE,
        names::TOKENS,
    ] {
        let exported = name.replace('.', "_");
        assert!(text.contains(&exported), "{exported} missing");
    }
}
