//! The success path through OverloadRetryLayer on a no-op service, beside
//! tower's own `Retry` with an equivalent trivial policy, in the same group.
//! Also prints the heap allocations per call of each (counted once, not timed).

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::future::{Ready, ready};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use futures::FutureExt;
use http::{Request, Response};
use http_body_util::Full;
use tower::retry::{Policy, Retry};
use tower::{Service, ServiceExt, service_fn};
use tower_overload::retry::{OverloadRetry, RetryPolicy};

/// Counts heap allocations, to report allocations per call.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: defers every call to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

type Body = Full<Bytes>;

fn request(body: &Bytes) -> Request<Body> {
    Request::post("https://api.anthropic.com/v1/messages")
        .header("content-type", "application/json")
        .header("anthropic-version", "2023-06-01")
        .header("x-api-key", "sk-ant-bench")
        .body(Full::new(body.clone()))
        .unwrap()
}

fn no_op(_request: Request<Body>) -> Ready<Result<Response<Body>, Infallible>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    response
        .headers_mut()
        .insert("request-id", http::HeaderValue::from_static("req_bench"));
    ready(Ok(response))
}

/// tower's Retry with the least a retry policy for this API must do: keep a
/// copy of the request (as ours does) and look at the status.
#[derive(Clone)]
struct RetryServerErrors;

impl Policy<Request<Body>, Response<Body>, Infallible> for RetryServerErrors {
    type Future = Ready<()>;

    fn retry(
        &mut self,
        _request: &mut Request<Body>,
        result: &mut Result<Response<Body>, Infallible>,
    ) -> Option<Self::Future> {
        match result {
            Ok(response) if response.status().is_server_error() => Some(ready(())),
            _ => None,
        }
    }

    fn clone_request(&mut self, request: &Request<Body>) -> Option<Request<Body>> {
        let mut copy = Request::new(request.body().clone());
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.version_mut() = request.version();
        *copy.headers_mut() = request.headers().clone();
        *copy.extensions_mut() = request.extensions().clone();
        Some(copy)
    }
}

fn allocations_per_call<S>(mut service: S, body: &Bytes) -> f64
where
    S: Service<Request<Body>>,
    S::Error: std::fmt::Debug,
{
    const CALLS: usize = 1000;
    let requests: Vec<_> = (0..CALLS).map(|_| request(body)).collect();
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for request in requests {
        let response = service
            .ready()
            .now_or_never()
            .unwrap()
            .unwrap()
            .call(request);
        drop(response.now_or_never().unwrap().unwrap());
    }
    (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / CALLS as f64
}

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
