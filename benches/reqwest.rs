//! The per-call overhead of the reqwest adapter, alone and under the whole
//! stack, beside a bare `reqwest::Client` call, in one group. The upstream is
//! a hyper server on loopback (its own thread and runtime) answering a small
//! 200; every call sends the same Messages API body and reads the whole
//! answer, over a kept-alive connection.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tower::{Layer, Service, ServiceExt};
use tower_overload::reqwest::ReqwestService;
use tower_overload::retry::RetryPolicy;
use tower_overload::stack::OverloadStack;

const ANSWER: &[u8] = br#"{"type":"message","content":[{"type":"text","text":"hi"}]}"#;

/// Starts the upstream on its own thread; returns its address.
fn upstream() -> SocketAddr {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            sender.send(listener.local_addr().unwrap()).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(|request: Request<Incoming>| async move {
                            // Read the whole request, as a real server would.
                            let _ = request.into_body().collect().await;
                            let response = Response::builder()
                                .header("content-type", "application/json")
                                .header("request-id", "req_bench")
                                .body(Full::new(Bytes::from_static(ANSWER)))
                                .unwrap();
                            Ok::<_, Infallible>(response)
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    receiver.recv().unwrap()
}

fn body() -> Bytes {
    Bytes::from_static(
        br#"{"model":"claude-opus-4-6","max_tokens":64,"messages":[{"role":"user","content":"Say hello in five words."}]}"#,
    )
}

fn request(url: &str, body: &Bytes) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("content-type", "application/json")
        .header("anthropic-version", "2023-06-01")
        .header("x-api-key", "sk-ant-bench")
        .body(Full::new(body.clone()))
        .unwrap()
}

fn bench_reqwest(c: &mut Criterion) {
    // The dev build of reqwest carries rustls without a provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = format!("http://{}/v1/messages", upstream());
    let body = body();
    let client = reqwest::Client::builder().build().unwrap();

    let mut group = c.benchmark_group("reqwest");
    group.bench_function("anchor/reqwest_client", |b| {
        let client = client.clone();
        b.iter(|| {
            runtime.block_on(async {
                let response = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("anthropic-version", "2023-06-01")
                    .header("x-api-key", "sk-ant-bench")
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                response.bytes().await.unwrap()
            })
        })
    });
    group.bench_function("tower_overload/adapter", |b| {
        let mut service = ReqwestService::new(client.clone());
        b.iter(|| {
            runtime.block_on(async {
                let ready = service.ready().await.unwrap();
                let response = ready.call(request(&url, &body)).await.unwrap();
                assert_eq!(response.status(), 200);
                response.into_body().collect().await.unwrap().to_bytes()
            })
        })
    });
    group.bench_function("tower_overload/stack_on_adapter", |b| {
        // The guard enters the runtime: the stack's layers read tokio's clock.
        let _guard = runtime.enter();
        let mut service = OverloadStack::new()
            .retry(RetryPolicy::foreground().seed(1))
            .layer(ReqwestService::new(client.clone()));
        b.iter(|| {
            runtime.block_on(async {
                let ready = service.ready().await.unwrap();
                let response = ready.call(request(&url, &body)).await.unwrap();
                assert_eq!(response.status(), 200);
                response.into_body().collect().await.unwrap().to_bytes()
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench_reqwest);
criterion_main!(benches);
