//! What the benches share: a counting allocator, a no-op upstream, and the
//! trivial retry policy tower's `Retry` is measured with.

// Each bench uses a part of this module.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use futures::FutureExt;
use http::{Request, Response};
use http_body_util::Full;
use tower::retry::Policy;
use tower::{Service, ServiceExt};

/// Counts heap allocations, to report allocations per call.
pub struct Counting;

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

pub type Body = Full<Bytes>;

/// A Messages API call with the headers a real client sends.
pub fn request(body: &Bytes) -> Request<Body> {
    Request::post("https://api.anthropic.com/v1/messages")
        .header("content-type", "application/json")
        .header("anthropic-version", "2023-06-01")
        .header("x-api-key", "sk-ant-bench")
        .body(Full::new(body.clone()))
        .unwrap()
}

/// Answers 200 at once, with a request id.
pub fn no_op(_request: Request<Body>) -> Ready<Result<Response<Body>, Infallible>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    response
        .headers_mut()
        .insert("request-id", http::HeaderValue::from_static("req_bench"));
    ready(Ok(response))
}

/// Heap allocations per call of `service`, counted over 1000 calls (not timed).
pub fn allocations_per_call<S, R>(mut service: S, body: &Bytes) -> f64
where
    S: Service<Request<Body>, Response = Response<R>>,
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

/// tower's Retry with the least a retry policy for this API must do: keep a
/// copy of the request (as ours does) and look at the status.
#[derive(Clone)]
pub struct RetryServerErrors;

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
