//! The policy core at work against an embedded loopback mock of the Messages API.
//!
//! `cargo run --example demo`: no API key, no network. A scripted storm (529s,
//! a 429 with retry-after, a 500 that says "Overloaded", a spend-limit 429, a
//! 400, a 200 stream whose first event is an overload) is sent through a real
//! hyper-util client; each answer is classified by the crate's core, and the
//! backoff schedule and retry budget show what a retry loop would do with it.
//! The layers that act on these verdicts arrive with their own issues.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, SystemTime};

use http_body_util::BodyExt;
use rand::{SeedableRng, rngs::SmallRng};
use support::{MockUpstream, Reply, client, messages_request};
use tower_overload::backoff::{Backoff, Jitter};
use tower_overload::budget::RetryBudget;
use tower_overload::classify::{classify, error_type};
use tower_overload::headers;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mock = MockUpstream::start().await;
    println!("mock Messages API on http://{}\n", mock.addr());
    mock.push([
        Reply::overloaded(),
        Reply::overloaded().should_retry(false),
        Reply::rate_limited().retry_after("2"),
        Reply::rate_limited().header("retry-after-ms", "1250.5"),
        Reply::error(500, "api_error", "Overloaded"),
        Reply::api_error(),
        Reply::error(504, "timeout_error", "Request timed out"),
        Reply::error(429, "rate_limit_error", "enforced_spend_limit_reached"),
        Reply::error(400, "invalid_request_error", "max_tokens: field required"),
        Reply::sse_overloaded(),
        Reply::ok(),
    ]);

    let client = client();
    println!(
        "{:<4} {:<6} {:<26} {:<9} {:<12} {:<22} request-id",
        "#", "status", "class", "retry?", "server wait", "error.type"
    );
    for call in 1..=11 {
        let response = client
            .request(messages_request(&mock, "claude-opus-4-6"))
            .await
            .expect("the mock answers");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("a whole body").to_bytes();
        let verdict = classify(parts.status, &parts.headers, Some(&body));
        let wait = headers::server_delay(&parts.headers, SystemTime::now())
            .map_or_else(|| "-".to_owned(), |d| format!("{d:?}"));
        let request_id =
            headers::request_id(&parts.headers).map_or_else(|| "-".to_owned(), |id| id.to_string());
        println!(
            "{:<4} {:<6} {:<26} {:<9} {:<12} {:<22} {}",
            call,
            parts.status.as_u16(),
            verdict.class.as_str(),
            if verdict.retryable { "yes" } else { "no" },
            wait,
            error_type(&body).unwrap_or("-"),
            request_id,
        );
    }

    println!(
        "\ncall 10 is a 200 stream whose first event is an overload: the status says success,\n\
         the body says otherwise; catching that before the caller sees a byte is the stream guard's job."
    );

    println!("\nfull-jitter backoff for 529s (base 1 s, cap 60 s, seed 7):");
    let backoff = Backoff::new(
        Duration::from_secs(1),
        Duration::from_secs(60),
        Jitter::Full,
    );
    let mut rng = SmallRng::seed_from_u64(7);
    for retry in 0..8 {
        let delay = backoff.delay(retry, backoff.base(), &mut rng);
        println!(
            "  retry {retry}: window 0..={:>2} s, drew {:>6.2} s",
            backoff.ceiling(retry).as_secs(),
            delay.as_secs_f64()
        );
    }

    println!("\nretry budget in a full outage (20% of traffic, 10 s window):");
    let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.2);
    let (calls, mut attempts) = (1000u32, 0u32);
    for _ in 0..calls {
        budget.deposit();
        attempts += 1;
        // Every call fails and would like 10 retries.
        attempts += (0..10).take_while(|_| budget.withdraw()).count() as u32;
    }
    println!(
        "  {calls} calls wanting 10 retries each sent {attempts} attempts: {:.2}x amplification instead of 11x",
        f64::from(attempts) / f64::from(calls)
    );
}
