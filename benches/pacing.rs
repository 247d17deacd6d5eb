//! The pacing layer's hot path when the budget is there, beside the bare
//! service and tower's `RateLimit` in one group (figure: <= 150 ns per call
//! over the bare service); plus the allocations per call of each.

mod common;

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use common::{Counting, allocations_per_call, no_op, request};
use criterion::{Criterion, criterion_group, criterion_main};
use futures::FutureExt;
use http_body_util::BodyExt;
use tower::limit::RateLimit;
use tower::limit::rate::Rate;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_overload::pacing::{PacingLimits, RateLimitPacingLayer};

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Limits no bench run can exhaust: the budget is always there.
const PLENTY: PacingLimits = PacingLimits {
    requests_per_minute: Some(1 << 50),
    input_tokens_per_minute: Some(1 << 60),
    output_tokens_per_minute: Some(1 << 60),
};

fn bench_hot_path(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let body = Bytes::from(format!(
        r#"{{"max_tokens":1024,"messages":[{{"role":"user","content":"{}"}}],"model":"claude-opus-4-6"}}"#,
        "x".repeat(1900)
    ));
    let ours = RateLimitPacingLayer::new()
        .limits_for("claude-opus-4-6", PLENTY)
        .layer(service_fn(no_op));
    // RateLimit is not Clone: one for the count, one for the bench.
    let tower = || {
        RateLimit::new(
            service_fn(no_op),
            Rate::new(1 << 40, Duration::from_secs(1)),
        )
    };
    println!(
        "allocations per call: pacing {:.1}, anchor tower RateLimit {:.1}, anchor bare service {:.1}",
        allocations_per_call(ours.clone(), &body),
        allocations_per_call(tower(), &body),
        allocations_per_call(service_fn(no_op), &body),
    );

    let mut group = c.benchmark_group("pacing_hot_path");
    group.bench_function("tower_overload/pacing", |b| {
        let mut service = ours.clone();
        b.iter(|| {
            service.ready().now_or_never().unwrap().unwrap();
            let response = service.call(request(black_box(&body)));
            response.now_or_never().unwrap().unwrap()
        })
    });
    // The body read to its end too: the reconciliation a real call pays.
    group.bench_function("tower_overload/pacing_body_read", |b| {
        let mut service = ours.clone();
        b.iter(|| {
            service.ready().now_or_never().unwrap().unwrap();
            let response = service.call(request(black_box(&body)));
            let response = response.now_or_never().unwrap().unwrap();
            response
                .into_body()
                .collect()
                .now_or_never()
                .unwrap()
                .unwrap()
        })
    });
    group.bench_function("anchor/tower_rate_limit", |b| {
        let mut service = tower();
        b.iter(|| {
            service.ready().now_or_never().unwrap().unwrap();
            let response = service.call(request(black_box(&body)));
            response.now_or_never().unwrap().unwrap()
        })
    });
    group.bench_function("anchor/bare_service", |b| {
        let mut service = service_fn(no_op);
        b.iter(|| {
            service.ready().now_or_never().unwrap().unwrap();
            let response = service.call(request(black_box(&body)));
            response.now_or_never().unwrap().unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench_hot_path);
criterion_main!(benches);
