//! The mock upstream works as the other tests rely on: through a real
//! hyper-util client over loopback, on a paused clock.

mod support;

use std::time::Duration;

use http::StatusCode;
use http_body_util::BodyExt;
use support::{MockUpstream, Reply, client, messages_request};
use tower_overload::classify::{Class, classify, error_type};
use tower_overload::headers;

async fn body_bytes(response: http::Response<hyper::body::Incoming>) -> bytes::Bytes {
    response.into_body().collect().await.unwrap().to_bytes()
}

#[tokio::test(start_paused = true)]
async fn scripted_replies_arrive_in_order_and_requests_are_recorded() {
    let mock = MockUpstream::start().await;
    mock.push([
        Reply::overloaded(),
        Reply::rate_limited().retry_after("3"),
        Reply::api_error().should_retry(false),
    ]);
    let client = client();

    let first = client
        .request(messages_request(&mock, "claude-opus-4-6"))
        .await
        .unwrap();
    assert_eq!(first.status().as_u16(), 529);
    let id = headers::request_id(first.headers()).expect("a request id");
    assert!(id.as_str().starts_with("req_mock_"));
    let verdict = classify(first.status(), first.headers(), None);
    assert_eq!(verdict.class, Class::Overloaded);
    assert_eq!(
        error_type(&body_bytes(first).await),
        Some("overloaded_error")
    );

    let second = client
        .request(messages_request(&mock, "claude-opus-4-6"))
        .await
        .unwrap();
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        headers::server_delay(second.headers(), std::time::SystemTime::now()),
        Some(Duration::from_secs(3))
    );
    let second_id = headers::request_id(second.headers()).unwrap();
    assert_ne!(second_id, id, "every reply has its own request id");

    let third = client
        .request(messages_request(&mock, "claude-opus-4-6"))
        .await
        .unwrap();
    assert_eq!(third.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!classify(third.status(), third.headers(), None).retryable);

    let fourth = client
        .request(messages_request(&mock, "claude-opus-4-6"))
        .await
        .unwrap();
    assert_eq!(
        fourth.status(),
        StatusCode::OK,
        "the default once the queue is empty"
    );
    let json: serde_json::Value = serde_json::from_slice(&body_bytes(fourth).await).unwrap();
    assert_eq!(json["model"], "claude-opus-4-6");

    let recorded = mock.requests();
    assert_eq!(recorded.len(), 4);
    assert!(
        recorded
            .iter()
            .all(|r| r.model.as_deref() == Some("claude-opus-4-6"))
    );
    assert_eq!(recorded[0].uri.path(), "/v1/messages");
    assert_eq!(recorded[0].headers["anthropic-version"], "2023-06-01");
    assert_eq!(recorded[0].body, support::messages_body("claude-opus-4-6"));
}

#[tokio::test(start_paused = true)]
async fn per_model_scripts_come_before_the_global_queue() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::api_error()]);
    mock.push_for_model("claude-haiku-4-5", [Reply::overloaded()]);
    let client = client();
    let haiku = client
        .request(messages_request(&mock, "claude-haiku-4-5"))
        .await
        .unwrap();
    assert_eq!(haiku.status().as_u16(), 529);
    let sonnet = client
        .request(messages_request(&mock, "claude-sonnet-4-6"))
        .await
        .unwrap();
    assert_eq!(sonnet.status().as_u16(), 500);
    let haiku = client
        .request(messages_request(&mock, "claude-haiku-4-5"))
        .await
        .unwrap();
    assert_eq!(haiku.status().as_u16(), 200);
}

#[tokio::test(start_paused = true)]
async fn capacity_mode_sheds_with_529_and_records_the_peak() {
    let mock = MockUpstream::start().await;
    mock.set_capacity(2);
    mock.set_latency(Duration::from_secs(1));
    let client = client();
    let calls = (0..5).map(|_| {
        let client = client.clone();
        let request = messages_request(&mock, "claude-opus-4-6");
        async move { client.request(request).await.unwrap().status().as_u16() }
    });
    let mut statuses = futures::future::join_all(calls).await;
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 529, 529, 529]);
    assert_eq!(
        mock.peak_in_flight("claude-opus-4-6"),
        5,
        "the peak counts every arrival"
    );
    assert_eq!(
        mock.in_flight("claude-opus-4-6"),
        0,
        "all bodies have ended"
    );
    assert_eq!(mock.peak_in_flight("claude-haiku-4-5"), 0);
}

#[tokio::test(start_paused = true)]
async fn sse_stream_with_an_overloaded_first_event() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::sse_overloaded(), Reply::sse_message()]);
    let client = client();

    let overloaded = client
        .request(messages_request(&mock, "claude-sonnet-4-6"))
        .await
        .unwrap();
    assert_eq!(
        overloaded.status(),
        StatusCode::OK,
        "the status hides the overload"
    );
    assert_eq!(overloaded.headers()["content-type"], "text/event-stream");
    assert_eq!(
        error_type(&body_bytes(overloaded).await),
        Some("overloaded_error")
    );

    let normal = client
        .request(messages_request(&mock, "claude-sonnet-4-6"))
        .await
        .unwrap();
    let text = body_bytes(normal).await;
    assert_eq!(error_type(&text), None);
    assert!(String::from_utf8_lossy(&text).contains("event: message_stop"));
}

#[tokio::test(start_paused = true)]
async fn slow_bodies_hold_the_request_in_flight_in_virtual_time() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::slow_body(&["a", "b", "c"], Duration::from_secs(10))]);
    let client = client();
    let start = tokio::time::Instant::now();
    let response = client.request(messages_request(&mock, "m")).await.unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "a");
    assert_eq!(mock.in_flight("m"), 1, "the stream keeps the upstream busy");
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "bc");
    assert!(start.elapsed() >= Duration::from_secs(30));
    assert_eq!(mock.in_flight("m"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_body_ends_the_request_in_flight() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::slow_body(&["a", "b"], Duration::from_secs(5))]);
    let client = client();
    let response = client.request(messages_request(&mock, "m")).await.unwrap();
    assert_eq!(mock.in_flight("m"), 1);
    drop(response);
    // The server notices the closed connection on its next write.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(mock.in_flight("m"), 0);
}

#[tokio::test(start_paused = true)]
async fn dropped_connections_surface_as_client_errors() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::drop_connection()]);
    let client = client();
    let error = client
        .request(messages_request(&mock, "m"))
        .await
        .unwrap_err();
    assert!(
        !error.is_connect(),
        "the connection was made, then dropped: {error:?}"
    );
    let ok = client.request(messages_request(&mock, "m")).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK, "the next connection works");
    assert_eq!(mock.request_count(), 2);
}

#[tokio::test(start_paused = true)]
async fn requests_without_a_model_are_recorded_as_such() {
    let mock = MockUpstream::start().await;
    let request = http::Request::get(mock.url("/v1/models"))
        .body(support::TestBody::default())
        .unwrap();
    let response = client().request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(mock.requests()[0].model, None);
    assert_eq!(mock.peak_in_flight("<none>"), 1);
}
