//! The full four-layer stack on a no-op service, success path, beside
//! tower's own Retry + ConcurrencyLimit + tower-http's TraceLayer on the same
//! service, in one group; plus the allocations per call of each.

mod common;

use std::hint::black_box;

use bytes::Bytes;
use common::{Counting, RetryServerErrors, allocations_per_call, no_op, request};
use criterion::{Criterion, criterion_group, criterion_main};
use futures::FutureExt;
use http::Request;
use tower::limit::ConcurrencyLimitLayer;
use tower::retry::RetryLayer;
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};
use tower_http::trace::TraceLayer;
use tower_overload::fallback::ModelFallbackLayer;
use tower_overload::retry::RetryPolicy;
use tower_overload::stack::OverloadStack;

#[global_allocator]
static GLOBAL: Counting = Counting;

fn bench_stack(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let body = Bytes::from(format!(
        r#"{{"max_tokens":1024,"messages":[{{"role":"user","content":"{}"}}],"model":"claude-opus-4-6"}}"#,
        "x".repeat(1900)
    ));

    let ours = OverloadStack::new()
        .retry(RetryPolicy::foreground().seed(1))
        .layer(service_fn(no_op));
    let with_chain = OverloadStack::new()
        .retry(RetryPolicy::foreground().seed(1))
        .fallback(ModelFallbackLayer::new([
            "claude-opus-4-6",
            "claude-sonnet-4-6",
        ]))
        .layer(service_fn(no_op));
    let tower = ServiceBuilder::new()
        .layer(TraceLayer::new_for_http())
        .layer(RetryLayer::new(RetryServerErrors))
        .layer(ConcurrencyLimitLayer::new(64))
        .service(service_fn(no_op));
    println!(
        "allocations per call: stack {:.1}, stack with a fallback chain {:.1}, anchor tower Retry+ConcurrencyLimit+TraceLayer {:.1}",
        allocations_per_call(ours.clone(), &body),
        allocations_per_call(with_chain.clone(), &body),
        allocations_per_call(tower.clone(), &body),
    );

    let mut group = c.benchmark_group("stack_success_path");
    group.bench_function("tower_overload/stack", |b| {
        let mut service = ours.clone();
        b.iter(|| {
            service.ready().now_or_never().unwrap().unwrap();
            let response = service.call(request(black_box(&body)));
            response.now_or_never().unwrap().unwrap()
        })
    });
    // The caller names the model: no layer has to read the body for it.
    let model = tower_overload::Model::new("claude-opus-4-6");
    group.bench_function("tower_overload/stack_model_extension", |b| {
        let mut service = ours.clone();
        b.iter(|| {
            service.ready().now_or_never().unwrap().unwrap();
            let mut request = request(black_box(&body));
            request.extensions_mut().insert(model.clone());
            let response = service.call(request);
            response.now_or_never().unwrap().unwrap()
        })
    });
    group.bench_function("tower_overload/stack_with_fallback_chain", |b| {
        let mut service = with_chain.clone();
        b.iter(|| {
            service.ready().now_or_never().unwrap().unwrap();
            let response = service.call(request(black_box(&body)));
            response.now_or_never().unwrap().unwrap()
        })
    });
    group.bench_function("anchor/tower_retry_limit_trace", |b| {
        let mut service = tower.clone();
        b.iter(|| {
            service.ready().now_or_never().unwrap().unwrap();
            let response = service.call(request(black_box(&body)));
            response.now_or_never().unwrap().unwrap()
        })
    });
    group.finish();
}

/// Runs `iters` calls split over two threads (this machine's cores), each
/// with its own clone of `service` (so the clones share only what the
/// service itself shares: key tables, semaphores, quotas), over three models.
fn two_threads<S, R>(service: &S, bodies: &[Bytes], iters: u64) -> std::time::Duration
where
    S: Service<Request<common::Body>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let handle = runtime.handle();
    let start = std::time::Instant::now();
    std::thread::scope(|scope| {
        for thread in 0..2 {
            let mut service = service.clone();
            scope.spawn(move || {
                let _guard = handle.enter();
                for i in 0..iters / 2 {
                    let body = &bodies[(i as usize + thread) % bodies.len()];
                    service.ready().now_or_never().unwrap().unwrap();
                    let response = service.call(request(black_box(body)));
                    black_box(response.now_or_never().unwrap().unwrap());
                }
            });
        }
    });
    start.elapsed()
}

fn bench_contended(c: &mut Criterion) {
    let bodies: Vec<Bytes> = ["claude-opus-4-6", "claude-sonnet-4-6", "claude-haiku-4-5"]
        .iter()
        .map(|model| {
            Bytes::from(format!(
                r#"{{"max_tokens":1024,"messages":[{{"role":"user","content":"{}"}}],"model":"{model}"}}"#,
                "x".repeat(1900)
            ))
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let ours = OverloadStack::new()
        .retry(RetryPolicy::foreground().seed(1))
        .layer(service_fn(no_op));
    let tower = ServiceBuilder::new()
        .layer(TraceLayer::new_for_http())
        .layer(RetryLayer::new(RetryServerErrors))
        .layer(ConcurrencyLimitLayer::new(64))
        .service(service_fn(no_op));
    let mut group = c.benchmark_group("stack_contended_2_threads");
    group.throughput(criterion::Throughput::Elements(1));
    group.bench_function("tower_overload/stack_3_models", |b| {
        b.iter_custom(|iters| two_threads(&ours, &bodies, iters))
    });
    group.bench_function("anchor/tower_retry_limit_trace", |b| {
        b.iter_custom(|iters| two_threads(&tower, &bodies, iters))
    });
    group.finish();
}

criterion_group!(benches, bench_stack, bench_contended);
criterion_main!(benches);
