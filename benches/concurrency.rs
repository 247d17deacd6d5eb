//! ConcurrencyPerModel beside tower's ConcurrencyLimit on the same no-op
//! service: the uncontended success path, and contended throughput over
//! three keys.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::hint::black_box;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use futures::FutureExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::limit::ConcurrencyLimit;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_overload::Model;
use tower_overload::concurrency::ConcurrencyPerModelLayer;

type Body = Full<Bytes>;

const MODELS: [&str; 3] = ["claude-opus-4-6", "claude-sonnet-4-6", "claude-haiku-4-5"];

fn no_op(_request: Request<Body>) -> Ready<Result<Response<Body>, Infallible>> {
    ready(Ok(Response::new(Full::new(Bytes::new()))))
}

/// A Messages body of about 2 KB with `model` after the messages.
fn body(model: &str) -> Bytes {
    let text = "Summarise the \"report\" below.\n".repeat(60);
    Bytes::from(format!(
        r#"{{"max_tokens":1024,"messages":[{{"role":"user","content":"{}"}}],"model":"{model}"}}"#,
        text.replace('\n', "\\n").replace('"', "\\\"")
    ))
}

fn request(body: &Bytes, model: Option<&Model>) -> Request<Body> {
    let mut request = Request::post("https://api.anthropic.com/v1/messages")
        .body(Full::new(body.clone()))
        .unwrap();
    if let Some(model) = model {
        request.extensions_mut().insert(model.clone());
    }
    request
}

fn bench_uncontended(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let body = body(MODELS[0]);
    let model = Model::new(MODELS[0]);

    let mut group = c.benchmark_group("concurrency_uncontended");
    let mut ours = ConcurrencyPerModelLayer::new(64).layer(service_fn(no_op));
    group.bench_function("tower_overload/model_extension", |b| {
        b.iter(|| {
            let response = ours.call(request(black_box(&body), Some(&model)));
            drop(response.now_or_never().unwrap().unwrap());
        })
    });
    group.bench_function("tower_overload/model_from_2KB_body", |b| {
        b.iter(|| {
            let response = ours.call(request(black_box(&body), None));
            drop(response.now_or_never().unwrap().unwrap());
        })
    });
    let mut tower = ConcurrencyLimit::new(service_fn(no_op), 64);
    group.bench_function("anchor/tower_concurrency_limit", |b| {
        b.iter(|| {
            tower.ready().now_or_never().unwrap().unwrap();
            let response = tower.call(request(black_box(&body), Some(&model)));
            drop(response.now_or_never().unwrap().unwrap());
        })
    });
    group.finish();
}

/// An upstream that yields once before answering, so permits are held while
/// other calls arrive.
async fn yielding(_request: Request<Body>) -> Result<Response<Body>, Infallible> {
    tokio::task::yield_now().await;
    Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
}

/// `calls` calls at once over the models in turn, each body read to the end.
async fn all_calls<S, R>(service: &S, calls: usize, body: &Bytes, models: &[Model])
where
    S: tower::Service<Request<Body>, Response = Response<R>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
    R: http_body::Body + Send + 'static,
    R::Data: Send,
    R::Error: std::fmt::Debug,
{
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..calls {
        let service = service.clone();
        let request = request(body, Some(&models[i % models.len()]));
        tasks.spawn(async move {
            let response = service.oneshot(request).await.unwrap();
            response.into_body().collect().await.unwrap();
        });
    }
    while tasks.join_next().await.is_some() {}
}

fn bench_contended(c: &mut Criterion) {
    const CALLS: usize = 300;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let models: Vec<Model> = MODELS.iter().map(|m| Model::new(*m)).collect();
    let body = Bytes::from_static(b"{}");

    let mut group = c.benchmark_group("concurrency_contended");
    group.throughput(criterion::Throughput::Elements(CALLS as u64));
    group.bench_function(BenchmarkId::new("tower_overload", "3_keys_x4"), |b| {
        let service = runtime.block_on(async {
            ConcurrencyPerModelLayer::new(4)
                .max_queued(CALLS)
                .layer(service_fn(yielding))
        });
        b.iter(|| runtime.block_on(all_calls(&service, CALLS, &body, &models)))
    });
    group.bench_function(
        BenchmarkId::new("anchor/tower_concurrency_limit", "3_keys_x4"),
        |b| {
            // tower's limit cannot tell keys apart: one limit of 12 across all.
            let service = ConcurrencyLimit::new(service_fn(yielding), 12);
            b.iter(|| runtime.block_on(all_calls(&service, CALLS, &body, &models)))
        },
    );
    group.finish();
}

criterion_group!(benches, bench_uncontended, bench_contended);
criterion_main!(benches);
