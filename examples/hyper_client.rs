//! The full stack on hyper-util's client.
//!
//! With `ANTHROPIC_API_KEY` set, one real call to `https://api.anthropic.com`
//! (rustls, webpki roots); without it, the same call against the embedded
//! loopback mock, which answers 529 twice first. Either way it prints the
//! status, who answered, every attempt with its request id, and the text.
//!
//! `cargo run --example hyper_client`

#[path = "../tests/support/mod.rs"]
mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{Layer, ServiceExt};
use tower_overload::BoxError;
use tower_overload::fallback::{ModelFallbackLayer, ServedBy};
use tower_overload::retry::{RetryPolicy, RetryReport};
use tower_overload::stack::OverloadStack;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let key = std::env::var("ANTHROPIC_API_KEY")
        .ok()
        .filter(|k| !k.is_empty());
    let mock = match key {
        Some(_) => None,
        None => {
            let mock = support::MockUpstream::start().await;
            mock.push([support::Reply::overloaded(), support::Reply::overloaded()]);
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

    // hyper-util leaves Nagle's algorithm on; small writes on a reused
    // connection would wait for a delayed ACK.
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let client = Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(https);
    let service = OverloadStack::new()
        .retry(RetryPolicy::foreground())
        .fallback(ModelFallbackLayer::new([
            "claude-opus-4-6",
            "claude-sonnet-4-6",
            "claude-haiku-4-5",
        ]))
        .layer(client);

    let body = serde_json::json!({
        "model": "claude-opus-4-6",
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
    if let Some(served) = response.extensions().get::<ServedBy>() {
        println!(
            "asked for {}, answered by {}",
            served.requested, served.served
        );
    }
    if let Some(report) = response.extensions().get::<RetryReport>() {
        for (n, attempt) in report.attempts.iter().enumerate() {
            println!(
                "attempt {}: {} {} request-id {}",
                n + 1,
                attempt
                    .status
                    .map_or("-".into(), |s| s.as_u16().to_string()),
                attempt.class,
                attempt.request_id.as_ref().map_or("-", |id| id.as_str())
            );
        }
    }
    let text = response.into_body().collect().await?.to_bytes();
    println!("{}", String::from_utf8_lossy(&text));
    Ok(())
}
