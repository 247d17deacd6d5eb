//! The success path through OverloadRetryLayer on a no-op service, beside
//! tower's own `Retry` with an equivalent trivial policy, in the same group.
//! Also prints the heap allocations per call of each (counted once, not timed).

mod common;

use std::hint::black_box;

use bytes::Bytes;
use common::{Counting, RetryServerErrors, allocations_per_call, no_op, request};
use criterion::{Criterion, criterion_group, criterion_main};
use futures::FutureExt;
use tower::retry::Retry;
use tower::{Service, service_fn};
use tower_overload::retry::{OverloadRetry, RetryPolicy};

#[global_allocator]
static GLOBAL: Counting = Counting;

fn bench_success_path(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let body = Bytes::from(vec![b'x'; 2048]);

    let ours = OverloadRetry::new(service_fn(no_op), RetryPolicy::foreground().seed(1));
    let tower = Retry::new(RetryServerErrors, service_fn(no_op));
    println!(
        "allocations per call: tower_overload {:.1}, anchor tower::retry::Retry {:.1}",
        allocations_per_call(ours.clone(), &body),
        allocations_per_call(tower.clone(), &body),
    );

    let mut group = c.benchmark_group("retry_success_path");
    group.bench_function("tower_overload/OverloadRetry", |b| {
        let mut service = ours.clone();
        b.iter(|| {
            let response = service.call(request(black_box(&body)));
            response.now_or_never().unwrap().unwrap()
        })
    });
    group.bench_function("anchor/tower_retry", |b| {
        let mut service = tower.clone();
        b.iter(|| {
            let response = service.call(request(black_box(&body)));
            response.now_or_never().unwrap().unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench_success_path);
criterion_main!(benches);
