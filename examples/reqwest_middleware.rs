//! The full stack as a `reqwest_middleware::Middleware`.
//!
//! Many Rust LLM clients take a `reqwest_middleware::ClientWithMiddleware`;
//! `OverloadMiddleware` puts the crate's layers into one, and the response
//! comes back as a `reqwest::Response` with the `RetryReport` in its
//! extensions (and, with a fallback chain, the `ServedBy`).
//!
//! With `ANTHROPIC_API_KEY` set, one real call to `https://api.anthropic.com`
//! (rustls); without it, the embedded loopback mock, which answers 529 once
//! and then 429 with `retry-after: 1` first.
//!
//! `cargo run --example reqwest_middleware --features reqwest-middleware`

#[path = "../tests/support/mod.rs"]
mod support;

use reqwest_middleware::ClientBuilder;
use tower_overload::BoxError;
use tower_overload::reqwest_middleware::OverloadMiddleware;
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

    // Register it first, so that it is the one retry loop and every other
    // middleware runs once per attempt.
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(OverloadMiddleware::new(
            OverloadStack::new().retry(RetryPolicy::foreground()),
        ))
        .build();

    let body = serde_json::json!({
        "model": "claude-haiku-4-5",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Say hello in five words."}],
    });
    // An in-memory body (bytes, a String, `.json(..)`): retried by reference count.
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .header("anthropic-version", "2023-06-01")
        .header("x-api-key", key.as_deref().unwrap_or("sk-ant-mock"))
        .body(body.to_string())
        .send()
        .await?;
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
    println!("{}", response.text().await?);
    Ok(())
}
