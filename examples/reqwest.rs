//! The full stack on reqwest.
//!
//! `reqwest::Client` is a `tower::Service<reqwest::Request>`; the layers
//! serve `http::Request`s. The adapter below (a dozen lines) converts both
//! ways: an `http::Request<Full<Bytes>>` becomes a `reqwest::Request`, and a
//! `reqwest::Response` becomes an `http::Response<reqwest::Body>` (which is
//! an `http_body::Body`). Then the stack wraps it like any other client.
//!
//! With `ANTHROPIC_API_KEY` set, one real call to `https://api.anthropic.com`
//! (rustls); without it, the embedded loopback mock, which answers 529 once
//! and then 429 with `retry-after: 1` first.
//!
//! `cargo run --example reqwest`

#[path = "../tests/support/mod.rs"]
mod support;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};
use tower_overload::BoxError;
use tower_overload::retry::{RetryPolicy, RetryReport};
use tower_overload::stack::OverloadStack;

/// `reqwest::Client` as a `Service<http::Request<Full<Bytes>>>`.
#[derive(Clone)]
struct Reqwest(reqwest::Client);

impl Service<Request<Full<Bytes>>> for Reqwest {
    type Response = http::Response<reqwest::Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Full<Bytes>>) -> Self::Future {
        let client = self.0.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            // A Full body is already in memory: collecting it is a reference-count clone.
            let body = body.collect().await?.to_bytes();
            let request = reqwest::Request::try_from(Request::from_parts(parts, body))?;
            Ok(http::Response::from(client.execute(request).await?))
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| "a rustls crypto provider was already installed")?;
    let key = std::env::var("ANTHROPIC_API_KEY")
        .ok()
        .filter(|k| !k.is_empty());
    let mock = match key {
        Some(_) => None,
        None => {
            let mock = support::MockUpstream::start().await;
            mock.push([
                support::Reply::overloaded(),
                support::Reply::rate_limited().retry_after("1"),
            ]);
            Some(mock)
        }
    };
    let url = match &mock {
        Some(mock) => mock.url("/v1/messages").to_string(),
        None => "https://api.anthropic.com/v1/messages".to_owned(),
    };
    println!(
        "calling {url}{}",
        if mock.is_some() {
            " (no ANTHROPIC_API_KEY: the embedded mock)"
        } else {
            ""
        }
    );

    let service = OverloadStack::new()
        .retry(RetryPolicy::foreground())
        .layer(Reqwest(reqwest::Client::new()));

    let body = serde_json::json!({
        "model": "claude-haiku-4-5",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Say hello in five words."}],
    });
    let request = Request::post(url)
        .header("content-type", "application/json")
        .header("anthropic-version", "2023-06-01")
        .header("x-api-key", key.as_deref().unwrap_or("sk-ant-mock"))
        .body(Full::new(Bytes::from(body.to_string())))?;

    let response = service.oneshot(request).await?;
    println!("status: {}", response.status());
    if let Some(report) = response.extensions().get::<RetryReport>() {
        println!(
            "{} attempts, waited {:?}",
            report.attempts.len(),
            report.waited
        );
        for id in report.request_ids() {
            println!("  request-id {id}");
        }
    }
    let text = response.into_body().collect().await?.to_bytes();
    println!("{}", String::from_utf8_lossy(&text));
    Ok(())
}
