//! What recording metrics costs a call: the stack with the `metrics`
//! feature and a no-op recorder installed, beside the same stack with
//! recording switched off (`OverloadStack::metrics(false)`), on a no-op
//! service, success path, in one group; plus the allocations per call of each.
//! The figure to reach: at most 50 ns per call over.

mod common;

use std::hint::black_box;

use bytes::Bytes;
use common::{Counting, allocations_per_call, no_op, request};
use criterion::{Criterion, criterion_group, criterion_main};
use futures::FutureExt;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_overload::retry::RetryPolicy;
use tower_overload::stack::OverloadStack;

#[global_allocator]
static GLOBAL: Counting = Counting;

fn bench_metrics(c: &mut Criterion) {
    // What an application without an exporter has: every handle is a no-op.
    metrics::set_global_recorder(metrics::NoopRecorder).expect("the first recorder");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let body = Bytes::from(format!(
        r#"{{"max_tokens":1024,"messages":[{{"role":"user","content":"{}"}}],"model":"claude-opus-4-6"}}"#,
        "x".repeat(1900)
    ));

    let recording = OverloadStack::new()
        .retry(RetryPolicy::foreground().seed(1))
        .layer(service_fn(no_op));
    let silent = OverloadStack::new()
        .retry(RetryPolicy::foreground().seed(1))
        .metrics(false)
        .layer(service_fn(no_op));
    println!(
        "allocations per call: recording {:.2}, not recording {:.2}",
        allocations_per_call(recording.clone(), &body),
        allocations_per_call(silent.clone(), &body),
    );

    let mut group = c.benchmark_group("metrics_overhead");
    group.bench_function("tower_overload/stack_metrics_noop_recorder", |b| {
        let mut service = recording.clone();
        b.iter(|| {
            service.ready().now_or_never().unwrap().unwrap();
            let response = service.call(request(black_box(&body)));
            response.now_or_never().unwrap().unwrap()
        })
    });
    group.bench_function("tower_overload/stack_metrics_off", |b| {
        let mut service = silent.clone();
        b.iter(|| {
            service.ready().now_or_never().unwrap().unwrap();
            let response = service.call(request(black_box(&body)));
            response.now_or_never().unwrap().unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench_metrics);
criterion_main!(benches);
