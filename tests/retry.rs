//! OverloadRetryLayer against the loopback mock upstream, through a real
//! hyper-util client, on a paused clock.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use support::{MockUpstream, Reply, client, messages_request};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_overload::backoff::{Backoff, Jitter};
use tower_overload::body::{PeekedBody, ReplayBody};
use tower_overload::budget::RetryBudget;
use tower_overload::classify::{Class, ClientKind};
use tower_overload::retry::{
    ClassPolicy, FinalFailure, OverloadRetryLayer, RetryPolicy, RetryReport, StopReason,
};
use tower_overload::{ErrorKind, Model};

type Response = http::Response<PeekedBody<hyper::body::Incoming>>;

fn policy() -> RetryPolicy {
    RetryPolicy::foreground().budget(None).seed(11)
}

fn retrying(
    policy: RetryPolicy,
) -> impl Service<Request<Full<Bytes>>, Response = Response, Error = tower_overload::Error, Future: Send>
+ Clone {
    ServiceBuilder::new()
        .layer(OverloadRetryLayer::new(policy))
        .service(client())
}

fn report(response: &Response) -> &RetryReport {
    response
        .extensions()
        .get::<RetryReport>()
        .expect("a report")
}

fn gaps(mock: &MockUpstream) -> Vec<Duration> {
    let requests = mock.requests();
    requests.windows(2).map(|w| w[1].at - w[0].at).collect()
}

#[tokio::test(start_paused = true)]
async fn a_storm_of_529s_then_success() {
    let mock = MockUpstream::start().await;
    mock.push([
        Reply::overloaded(),
        Reply::overloaded(),
        Reply::overloaded(),
        Reply::overloaded(),
        Reply::ok(),
    ]);
    let response = retrying(policy())
        .oneshot(messages_request(&mock, "claude-opus-4-6"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let report = report(&response).clone();
    assert_eq!(report.attempts.len(), 5);
    assert_eq!(report.stop, StopReason::Success);
    let classes: Vec<Class> = report.attempts.iter().map(|a| a.class).collect();
    assert_eq!(classes[..4], [Class::Overloaded; 4]);
    assert_eq!(report.request_ids().count(), 5);
    // Full jitter: each wait lies in its window [0, 2^n s], and the upstream saw exactly those waits.
    let gaps = gaps(&mock);
    // (The timer wheel rounds a wait up to the next millisecond.)
    for (n, gap) in gaps.iter().enumerate() {
        let waited = report.attempts[n].wait_after.unwrap();
        assert!(
            waited <= Duration::from_secs(1 << n),
            "retry {n} waited {waited:?}"
        );
        assert!(
            *gap >= waited && *gap < waited + Duration::from_millis(1),
            "{gap:?} vs {waited:?}"
        );
    }
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(body.starts_with(b"{"), "the success body arrives whole");
}

#[tokio::test(start_paused = true)]
async fn a_429_with_retry_after_waits_exactly_that() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::rate_limited().retry_after("3"), Reply::ok()]);
    let response = retrying(policy())
        .oneshot(messages_request(&mock, "claude-sonnet-4-6"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(gaps(&mock), [Duration::from_secs(3)]);
    assert_eq!(report(&response).attempts[0].class, Class::RateLimited);
}

#[tokio::test(start_paused = true)]
async fn a_server_delay_beyond_the_deadline_is_an_immediate_typed_error() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::rate_limited().retry_after("61")]);
    let start = tokio::time::Instant::now();
    let error = retrying(policy().deadline(Some(Duration::from_secs(30))))
        .oneshot(messages_request(&mock, "claude-opus-4-6"))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::ServerDelayTooLong);
    assert_eq!(error.server_delay(), Some(Duration::from_secs(61)));
    assert_eq!(error.status(), Some(StatusCode::TOO_MANY_REQUESTS));
    assert_eq!(error.class(), Some(Class::RateLimited));
    assert_eq!(error.model(), Some(&Model::new("claude-opus-4-6")));
    assert!(error.request_id().is_some());
    assert_eq!(start.elapsed(), Duration::ZERO, "no waiting at all");
    assert_eq!(mock.request_count(), 1);
    assert!(error.to_string().contains("61 s"), "{error}");

    // Within max_server_delay but beyond what the deadline leaves.
    mock.push([Reply::rate_limited().retry_after("45")]);
    let error = retrying(policy().deadline(Some(Duration::from_secs(30))))
        .oneshot(messages_request(&mock, "m"))
        .await
        .unwrap_err();
    assert_eq!(error.server_delay(), Some(Duration::from_secs(45)));
}

#[tokio::test(start_paused = true)]
async fn the_server_saying_no_retry_is_obeyed() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::overloaded().should_retry(false)]);
    let response = retrying(policy())
        .oneshot(messages_request(&mock, "m"))
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 529);
    assert_eq!(report(&response).stop, StopReason::NotRetryable);
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn client_errors_are_never_retried() {
    let mock = MockUpstream::start().await;
    let service = retrying(policy());
    for (status, kind) in [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
    ] {
        mock.push([Reply::error(status, kind, "no")]);
        let before = mock.request_count();
        let response = service
            .clone()
            .oneshot(messages_request(&mock, "m"))
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status);
        assert_eq!(mock.request_count(), before + 1, "{status} sent once");
        assert_eq!(report(&response).stop, StopReason::NotRetryable);
    }
}

#[tokio::test(start_paused = true)]
async fn a_spend_limit_429_is_not_retried_and_its_body_survives() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::error(
        429,
        "rate_limit_error",
        "enforced_spend_limit_reached",
    )]);
    let response = retrying(policy())
        .oneshot(messages_request(&mock, "m"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        report(&response).attempts[0].class,
        Class::Client(ClientKind::SpendLimit)
    );
    assert_eq!(mock.request_count(), 1);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"]["message"], "enforced_spend_limit_reached");
}

#[tokio::test(start_paused = true)]
async fn a_500_that_says_overloaded_is_treated_as_an_overload() {
    let mock = MockUpstream::start().await;
    mock.push([
        Reply::error(500, "api_error", "Overloaded"),
        Reply::api_error(),
        Reply::ok(),
    ]);
    let response = retrying(policy())
        .oneshot(messages_request(&mock, "m"))
        .await
        .unwrap();
    let classes: Vec<Class> = report(&response).attempts.iter().map(|a| a.class).collect();
    assert_eq!(
        classes,
        [Class::Overloaded, Class::ServerError, Class::Success]
    );
}

#[tokio::test(start_paused = true)]
async fn exhausted_retries_return_the_last_response_or_a_typed_error() {
    let mock = MockUpstream::start().await;
    mock.set_default(Reply::overloaded());
    let response = retrying(policy())
        .oneshot(messages_request(&mock, "claude-opus-4-6"))
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 529);
    assert_eq!(report(&response).attempts.len(), 5);
    assert_eq!(report(&response).stop, StopReason::AttemptsExhausted);
    let last_id = report(&response).attempts[4].request_id.clone().unwrap();
    assert_eq!(
        response.headers()["request-id"],
        last_id.as_str(),
        "the response is the last attempt's"
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        tower_overload::classify::error_type(&body),
        Some("overloaded_error")
    );

    let error = retrying(policy().final_failure(FinalFailure::Error))
        .oneshot(messages_request(&mock, "claude-opus-4-6"))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::RetriesExhausted);
    assert_eq!(error.class(), Some(Class::Overloaded));
    assert_eq!(error.attempts(), 5);
    assert_eq!(error.status().map(|s| s.as_u16()), Some(529));
    assert!(
        error
            .to_string()
            .starts_with("Claude API overloaded (529) for claude-opus-4-6 after 5 attempts"),
        "{error}"
    );
    assert_eq!(mock.request_count(), 10);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_is_never_slept_past() {
    let mock = MockUpstream::start().await;
    mock.set_default(Reply::overloaded());
    let steady = Backoff::new(Duration::from_secs(4), Duration::from_secs(4), Jitter::None);
    let policy = policy()
        .deadline(Some(Duration::from_secs(10)))
        .overloaded(ClassPolicy::new(10, steady))
        .max_attempts(10);
    let start = tokio::time::Instant::now();
    let response = retrying(policy)
        .oneshot(messages_request(&mock, "m"))
        .await
        .unwrap();
    assert_eq!(report(&response).stop, StopReason::DeadlineExceeded);
    assert_eq!(
        mock.request_count(),
        3,
        "at 0 s, 4 s and 8 s; 12 s would pass the deadline"
    );
    assert!(start.elapsed() <= Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn attempts_carry_their_number_and_the_retry_count_header() {
    let mock = MockUpstream::start().await;
    mock.push([
        Reply::api_error(),
        Reply::error(504, "timeout_error", "slow"),
        Reply::ok(),
    ]);
    let policy =
        policy().retry_count_header(http::HeaderName::from_static("x-stainless-retry-count"));
    retrying(policy)
        .oneshot(messages_request(&mock, "m"))
        .await
        .unwrap();
    let counts: Vec<String> = mock
        .requests()
        .iter()
        .map(|r| {
            r.headers["x-stainless-retry-count"]
                .to_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(counts, ["0", "1", "2"]);
    let bodies: Vec<Bytes> = mock.requests().into_iter().map(|r| r.body).collect();
    assert!(
        bodies.iter().all(|b| *b == bodies[0]),
        "every attempt sends the same body"
    );
}

#[tokio::test(start_paused = true)]
async fn many_callers_in_a_long_storm_stay_within_the_budget() {
    let mock = MockUpstream::start().await;
    mock.set_default(Reply::overloaded());
    let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.2);
    let service = retrying(policy().budget(Some(budget)).deadline(None));
    let calls = 100;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..calls {
        let service = service.clone();
        let request = messages_request(&mock, "claude-opus-4-6");
        tasks.spawn(async move {
            // Callers arrive over two minutes of storm.
            tokio::time::sleep(Duration::from_millis(1200 * i)).await;
            let response = service.oneshot(request).await.unwrap();
            report(&response).stop
        });
    }
    let mut stops = Vec::new();
    while let Some(stop) = tasks.join_next().await {
        stops.push(stop.unwrap());
    }
    let attempts = mock.request_count() as f64 / calls as f64;
    println!("attempts per call in the storm: {attempts:.3}");
    assert!(attempts <= 1.2 + 0.05, "amplification {attempts}");
    assert!(attempts > 1.0, "some retries were allowed: {attempts}");
    assert!(stops.contains(&StopReason::BudgetExhausted));
}

type Chunk = Result<Frame<Bytes>, std::io::Error>;
type StreamedBody = ReplayBody<StreamBody<futures::stream::Iter<std::vec::IntoIter<Chunk>>>>;

fn streamed(mock: &MockUpstream, cap: usize) -> Request<StreamedBody> {
    let body = String::from_utf8(support::messages_body("claude-haiku-4-5").to_vec()).unwrap();
    let (head, tail) = body.split_at(body.len() / 2);
    let chunks: Vec<Chunk> = vec![
        Ok(Frame::data(Bytes::from(head.to_owned()))),
        Ok(Frame::data(Bytes::from(tail.to_owned()))),
    ];
    Request::post(mock.url("/v1/messages"))
        .header("content-type", "application/json")
        .body(ReplayBody::new(
            StreamBody::new(futures::stream::iter(chunks)),
            cap,
        ))
        .unwrap()
}

fn streaming_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    StreamedBody,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

#[tokio::test(start_paused = true)]
async fn a_streamed_body_within_the_cap_is_replayed() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::overloaded(), Reply::ok()]);
    let service = ServiceBuilder::new()
        .layer(OverloadRetryLayer::new(policy()))
        .service(streaming_client());
    let response = service.oneshot(streamed(&mock, 1 << 20)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let requests = mock.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].body, support::messages_body("claude-haiku-4-5"));
    assert_eq!(requests[1].body, requests[0].body);
}

#[tokio::test(start_paused = true)]
async fn a_streamed_body_past_the_cap_is_sent_once_and_flagged() {
    let mock = MockUpstream::start().await;
    mock.set_default(Reply::overloaded());
    let service = ServiceBuilder::new()
        .layer(OverloadRetryLayer::new(policy()))
        .service(streaming_client());
    let response = service.oneshot(streamed(&mock, 16)).await.unwrap();
    assert_eq!(response.status().as_u16(), 529);
    assert_eq!(report(&response).stop, StopReason::BodyNotReplayable);
    assert_eq!(mock.request_count(), 1);
    assert_eq!(
        mock.requests()[0].body,
        support::messages_body("claude-haiku-4-5"),
        "sent whole, once"
    );

    let typed = ServiceBuilder::new()
        .layer(OverloadRetryLayer::new(
            policy().final_failure(FinalFailure::Error),
        ))
        .service(streaming_client());
    let error = typed.oneshot(streamed(&mock, 16)).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::BodyNotReplayable);
}

// A dropped connection is a hyper "incomplete message" error, which the
// default classifier recognises with the hyper-util feature.
#[cfg(feature = "hyper-util")]
#[tokio::test(start_paused = true)]
async fn connection_failures_are_retried_then_surface_typed() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::drop_connection(), Reply::ok()]);
    let response = retrying(policy())
        .oneshot(messages_request(&mock, "m"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(report(&response).attempts[0].class, Class::Transport);

    // Nothing listens on this port: connection refused, every time.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = closed.local_addr().unwrap();
    drop(closed);
    let request = Request::post(format!("http://{address}/v1/messages"))
        .body(Full::new(support::messages_body("claude-opus-4-6")))
        .unwrap();
    let error = retrying(policy()).oneshot(request).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::RetriesExhausted);
    assert_eq!(error.class(), Some(Class::Transport));
    assert_eq!(error.attempts(), 3);
    assert!(std::error::Error::source(&error).is_some());
}

#[tokio::test(start_paused = true)]
async fn dropping_the_call_mid_wait_sends_nothing_more() {
    let mock = MockUpstream::start().await;
    mock.set_default(Reply::overloaded());
    let steady = Backoff::new(Duration::from_secs(5), Duration::from_secs(5), Jitter::None);
    let service = retrying(policy().overloaded(ClassPolicy::new(5, steady)));
    let call = service.oneshot(messages_request(&mock, "m"));
    let outcome = tokio::time::timeout(Duration::from_secs(7), call).await;
    assert!(outcome.is_err(), "still waiting for its third attempt");
    assert_eq!(mock.request_count(), 2);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        mock.request_count(),
        2,
        "the dropped call left nothing running"
    );
}

#[tokio::test(start_paused = true)]
async fn a_bare_429_waits_for_the_exhausted_window_to_reset() {
    let mock = MockUpstream::start().await;
    let reset = rfc3339_utc(std::time::SystemTime::now() + Duration::from_secs(20));
    mock.push([
        Reply::rate_limited()
            .header("anthropic-ratelimit-requests-remaining", "0")
            .header("anthropic-ratelimit-requests-reset", &reset),
        Reply::ok(),
    ]);
    retrying(policy())
        .oneshot(messages_request(&mock, "m"))
        .await
        .unwrap();
    let gap = gaps(&mock)[0];
    // The reset is whole seconds on the wall clock: between 19 and 20 s away.
    assert!(
        gap > Duration::from_secs(18) && gap <= Duration::from_secs(21),
        "{gap:?}"
    );
}

/// `YYYY-MM-DDTHH:MM:SSZ` for `at`, computed here so the test does not lean on the crate's parser.
fn rfc3339_utc(at: std::time::SystemTime) -> String {
    let secs = at.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since the epoch (proleptic Gregorian).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}
