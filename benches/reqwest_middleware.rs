//! The per-call cost of `OverloadMiddleware` (the full `OverloadStack`,
//! built around `Next` for every call) beside a bare `ClientWithMiddleware`
//! and a bare `reqwest::Client`, in one group, against a loopback hyper
//! server that answers a small 200 at once.

use std::convert::Infallible;
use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use tokio::net::TcpListener;
use tower_overload::reqwest_middleware::OverloadMiddleware;
use tower_overload::stack::OverloadStack;

async fn ok(_request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut response = Response::new(Full::new(Bytes::from_static(
        br#"{"type":"message","content":[]}"#,
    )));
    response
        .headers_mut()
        .insert("request-id", http::HeaderValue::from_static("req_bench"));
    Ok(response)
}

/// A keep-alive HTTP/1 server on 127.0.0.1; its URL.
async fn serve() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), hyper::service::service_fn(ok))
                    .await;
            });
        }
    });
    format!("http://{addr}/v1/messages")
}

fn bench_reqwest_middleware(c: &mut Criterion) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // One thread: the server and the client share it, as in the other benches.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = runtime.block_on(serve());
    let body = Bytes::from(format!(
        r#"{{"max_tokens":1024,"messages":[{{"role":"user","content":"{}"}}],"model":"claude-opus-4-6"}}"#,
        "x".repeat(1900)
    ));

    let bare_reqwest = reqwest::Client::new();
    let bare: ClientWithMiddleware = ClientBuilder::new(reqwest::Client::new()).build();
    let ours = ClientBuilder::new(reqwest::Client::new())
        .with(OverloadMiddleware::new(OverloadStack::new()))
        .build();

    // No layers: what the conversions to and from http types cost alone.
    let conversions = ClientBuilder::new(reqwest::Client::new())
        .with(OverloadMiddleware::new(tower::ServiceBuilder::new()))
        .build();

    let mut group = c.benchmark_group("reqwest_middleware_call");
    group.bench_function("reqwest/client", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let response = bare_reqwest
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(black_box(body.clone()))
                    .send()
                    .await
                    .unwrap();
                response.bytes().await.unwrap()
            })
        })
    });
    group.bench_function("reqwest_middleware/no_middleware", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let response = bare
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(black_box(body.clone()))
                    .send()
                    .await
                    .unwrap();
                response.bytes().await.unwrap()
            })
        })
    });
    group.bench_function("tower_overload/overload_middleware", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let response = ours
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(black_box(body.clone()))
                    .send()
                    .await
                    .unwrap();
                response.bytes().await.unwrap()
            })
        })
    });
    group.bench_function("tower_overload/overload_middleware_no_layers", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let response = conversions
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(black_box(body.clone()))
                    .send()
                    .await
                    .unwrap();
                response.bytes().await.unwrap()
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench_reqwest_middleware);
criterion_main!(benches);
