//! The full stack on reqwest, through the shipped adapter.
//!
//! [`ReqwestService`] makes a `reqwest::Client` a
//! `tower::Service<http::Request<B>>` answering `http::Response<reqwest::Body>`
//! (an `http_body::Body`); the stack wraps it like any other client, and
//! reqwest's own timeouts are classified and retried like hyper-util's.
//!
//! With `ANTHROPIC_API_KEY` set, one real call to `https://api.anthropic.com`
//! (rustls); without it, the embedded loopback mock, which answers 529 once
//! and then 429 with `retry-after: 1` first.
//!
//! `cargo run --example reqwest --features reqwest`

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt};
use tower_overload::BoxError;
use tower_overload::reqwest::ReqwestService;
use tower_overload::retry::{RetryPolicy, RetryReport};
use tower_overload::stack::OverloadStack;

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
        .layer(ReqwestService::new(
            // reqwest's timeout bounds each attempt; the retry layer retries it.
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(600))
                .build()?,
        ));

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
