//! Hot paths of the policy core, each beside an anchor measured in the same group.
//!
//! Anchors are named `anchor/...`; `scripts/bench-report` prints each
//! benchmark's median and its ratio to its group's anchor. Figures to reach
//! are in shared/DESIGN.md section 3.

use std::borrow::Cow;
use std::hint::black_box;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, StatusCode};
use rand::{Rng, RngExt, SeedableRng, rngs::SmallRng};
use serde::Deserialize;
use tower::retry::budget::Budget as _;
use tower_overload::backoff::{Backoff, Jitter};
use tower_overload::budget::RetryBudget;
use tower_overload::classify::{classify, error_type};
use tower_overload::{headers, model};

/// The headers of a real 529 from the API (values shortened).
fn overloaded_headers() -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in [
        ("date", "Mon, 23 Nov 2026 07:00:00 GMT"),
        ("content-type", "application/json"),
        ("content-length", "105"),
        ("connection", "keep-alive"),
        ("request-id", "req_011CSHoEeqs5C35K2UUqR7Fy"),
        ("x-should-retry", "true"),
        (
            "anthropic-organization-id",
            "3f7c1a52-5ad8-4b5c-9a53-2b8b5d3b2f11",
        ),
        ("via", "1.1 google"),
        ("cf-cache-status", "DYNAMIC"),
        ("x-robots-tag", "none"),
        ("server", "cloudflare"),
        ("cf-ray", "8f2c1b1a2b3c4d5e-AMS"),
    ] {
        map.insert(name, HeaderValue::from_static(value));
    }
    map
}

fn bench_classify(c: &mut Criterion) {
    let headers = overloaded_headers();
    let overloaded = StatusCode::from_u16(529).unwrap();
    let mut group = c.benchmark_group("classify");
    group.bench_function("tower_overload/529", |b| {
        b.iter(|| classify(black_box(overloaded), black_box(&headers), None))
    });
    // The worst case for the scan: no verdict among a full set of rate-limit headers.
    let mut many = overloaded_headers();
    many.remove("x-should-retry");
    for kind in ["requests", "tokens", "input-tokens", "output-tokens"] {
        for (part, value) in [
            ("limit", "4000"),
            ("remaining", "0"),
            ("reset", "2026-11-23T07:00:30Z"),
        ] {
            let name = http::HeaderName::from_bytes(
                format!("anthropic-ratelimit-{kind}-{part}").as_bytes(),
            )
            .unwrap();
            many.insert(name, HeaderValue::from_static(value));
        }
    }
    group.bench_function("tower_overload/529_no_verdict_23_headers", |b| {
        b.iter(|| classify(black_box(overloaded), black_box(&many), None))
    });
    group.bench_function("tower_overload/200", |b| {
        b.iter(|| classify(black_box(StatusCode::OK), black_box(&headers), None))
    });
    // The floor: one header lookup, which any classification that honours
    // x-should-retry must pay.
    group.bench_function("anchor/one_header_lookup", |b| {
        static NAME: http::HeaderName = headers::X_SHOULD_RETRY;
        b.iter(|| black_box(&headers).get(&NAME).is_some())
    });
    group.finish();
}

const ERROR_BODY: &[u8] = br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_011CSHoEeqs5C35K2UUqR7Fy"}"#;

fn bench_error_type(c: &mut Criterion) {
    let mut group = c.benchmark_group("error_type");
    group.throughput(Throughput::Bytes(ERROR_BODY.len() as u64));
    group.bench_function("tower_overload", |b| {
        b.iter(|| error_type(black_box(ERROR_BODY)).map(str::len))
    });
    group.bench_function("anchor/serde_json_value", |b| {
        b.iter(|| {
            let value: serde_json::Value = serde_json::from_slice(black_box(ERROR_BODY)).unwrap();
            value["error"]["type"].as_str().map(str::len)
        })
    });
    group.finish();
}

fn bench_server_delay(c: &mut Criterion) {
    let now = UNIX_EPOCH + Duration::from_secs(1_795_417_200);
    let mut integer = HeaderMap::new();
    integer.insert("retry-after", HeaderValue::from_static("30"));
    let mut date = HeaderMap::new();
    date.insert(
        "retry-after",
        HeaderValue::from_static("Mon, 23 Nov 2026 07:00:30 GMT"),
    );

    let mut group = c.benchmark_group("server_delay");
    group.bench_function("tower_overload/integer", |b| {
        b.iter(|| headers::server_delay(black_box(&integer), now))
    });
    group.bench_function("anchor/str_parse/integer", |b| {
        b.iter(|| {
            let value = black_box(&integer).get("retry-after")?;
            let secs: u64 = value.to_str().ok()?.parse().ok()?;
            Some(Duration::from_secs(secs))
        })
    });
    group.bench_function("tower_overload/http_date", |b| {
        b.iter(|| headers::server_delay(black_box(&date), now))
    });
    group.bench_function("anchor/httpdate/http_date", |b| {
        b.iter(|| {
            let value = black_box(&date).get("retry-after")?;
            let at: SystemTime = httpdate::parse_http_date(value.to_str().ok()?).ok()?;
            Some(at.duration_since(now).unwrap_or_default())
        })
    });
    group.finish();
}

fn bench_backoff(c: &mut Criterion) {
    let backoff = Backoff::new(
        Duration::from_secs(1),
        Duration::from_secs(60),
        Jitter::Full,
    );
    let decorrelated = Backoff::new(
        Duration::from_secs(1),
        Duration::from_secs(60),
        Jitter::Decorrelated,
    );
    let mut rng = SmallRng::seed_from_u64(1);
    let mut group = c.benchmark_group("backoff");
    group.bench_function("tower_overload/full", |b| {
        b.iter(|| backoff.delay(black_box(4), Duration::ZERO, &mut rng))
    });
    group.bench_function("tower_overload/decorrelated", |b| {
        b.iter(|| decorrelated.delay(black_box(4), Duration::from_secs(3), &mut rng))
    });
    // Full jitter as commonly hand-written: float maths on a Duration.
    group.bench_function("anchor/naive_f64_full_jitter", |b| {
        b.iter(|| {
            let n = black_box(4u32);
            let ceiling = Duration::from_secs(1)
                .saturating_mul(2u32.saturating_pow(n))
                .min(Duration::from_secs(60));
            ceiling.mul_f64(rng.random::<f64>())
        })
    });
    group.bench_function("anchor/rng_next_u64", |b| b.iter(|| rng.next_u64()));
    group.finish();
}

fn bench_budget(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let ours = RetryBudget::new(Duration::from_secs(10), 10, 0.2);
    let tower = tower::retry::budget::TpsBudget::new(Duration::from_secs(10), 10, 0.2);
    let mut group = c.benchmark_group("budget");
    group.bench_function("tower_overload/deposit_withdraw", |b| {
        b.iter(|| {
            ours.deposit();
            ours.withdraw()
        })
    });
    group.bench_function("anchor/tower_tps_budget", |b| {
        b.iter(|| {
            tower.deposit();
            tower.withdraw()
        })
    });
    group.finish();
}

/// A Messages API request of about `target` bytes whose `model` comes after
/// a long `messages` array of realistic content: quotes, escapes, unicode,
/// nested tool calls whose inputs hold `model` keys of their own.
fn messages_body(target: usize) -> Vec<u8> {
    let mut messages = Vec::new();
    let mut turn = 0;
    loop {
        messages.push(serde_json::json!({
            "role": "user",
            "content": [{
                "type": "text",
                "text": format!("Turn {turn}: can you \"summarise\" this?\nLine two\twith a tab — and naïve café 日本語 😀. {}", "Lorem ipsum dolor sit amet. ".repeat(4)),
            }],
        }));
        messages.push(serde_json::json!({
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Sure: here is what I found, with a path C:\\temp\\notes.txt and a \\u escape."},
                {"type": "tool_use", "id": format!("toolu_{turn:04}"), "name": "lookup",
                 "input": {"model": "not-this-one", "query": {"terms": ["a", "b", {"nested": [1, 2.5, null, true]}]}}},
            ],
        }));
        turn += 1;
        let body = serde_json::json!({
            "max_tokens": 1024,
            "system": "You are terse.",
            "messages": messages,
            "model": "claude-opus-4-6",
            "stream": true,
        });
        let bytes = serde_json::to_vec(&body).unwrap();
        if bytes.len() >= target {
            return bytes;
        }
    }
}

#[derive(Deserialize)]
struct OnlyModel<'a> {
    #[serde(borrow)]
    model: Cow<'a, str>,
}

fn bench_model(c: &mut Criterion) {
    let mut group = c.benchmark_group("model_extract");
    for (label, size) in [("2KB", 2 * 1024), ("100KB", 100 * 1024)] {
        let body = messages_body(size);
        assert_eq!(model::extract(&body).as_deref(), Some("claude-opus-4-6"));
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("tower_overload", label),
            &body,
            |b, body| b.iter(|| model::extract(black_box(body)).map(|m| m.len())),
        );
        group.bench_with_input(
            BenchmarkId::new("anchor/serde_json_struct", label),
            &body,
            |b, body| {
                b.iter(|| {
                    let only: OnlyModel<'_> = serde_json::from_slice(black_box(body)).unwrap();
                    only.model.len()
                })
            },
        );
    }
    group.finish();

    let mut group = c.benchmark_group("model_rewrite");
    let body = messages_body(100 * 1024);
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("tower_overload/100KB", |b| {
        b.iter(|| model::rewrite(black_box(&body), "claude-sonnet-4-6").map(|b| b.len()))
    });
    group.bench_function("anchor/serde_json_value_roundtrip/100KB", |b| {
        b.iter(|| {
            let mut value: serde_json::Value = serde_json::from_slice(black_box(&body)).unwrap();
            value["model"] = "claude-sonnet-4-6".into();
            serde_json::to_vec(&value).unwrap().len()
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_classify,
    bench_error_type,
    bench_server_delay,
    bench_backoff,
    bench_budget,
    bench_model
);
criterion_main!(benches);
