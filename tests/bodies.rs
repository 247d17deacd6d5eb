//! Request and response bodies through the layers, checked byte for byte at
//! the loopback mock upstream, through a real hyper-util client, on a
//! paused clock.

mod support;

use std::time::Duration;

use http::Request;
use http_body_util::Full;
use support::{MockUpstream, Reply, client, messages_body};
use tower::{Layer, ServiceExt};
use tower_overload::fallback::ModelFallbackLayer;

const SHORT: &str = "claude-x";
const LONG: &str = "claude-opus-4-6";

/// No call in these tests may hang: a stale framing header makes the
/// upstream wait for bytes that never come.
const HANG: Duration = Duration::from_secs(600);

fn assert_framed(recorded: &support::Recorded, expected: &[u8]) {
    assert_eq!(
        recorded.body.as_ref(),
        expected,
        "upstream got {:?}",
        String::from_utf8_lossy(&recorded.body)
    );
    let length = recorded
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    assert_eq!(
        length,
        Some(expected.len()),
        "content-length on {:?}",
        recorded.headers
    );
}

// Defect 3: after the model was rewritten, the caller's content-length
// still framed the request: the upstream got JSON cut short, or waited
// for bytes that never came.
async fn falls_back_with_fresh_framing(from: &str, to: &str) {
    let mock = MockUpstream::start().await;
    mock.push_for_model(from, [Reply::overloaded()]);
    let body = messages_body(from);
    let request = Request::post(mock.url("/v1/messages"))
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(Full::new(body))
        .unwrap();
    let service = ModelFallbackLayer::new([from, to]).layer(client());
    let response = tokio::time::timeout(HANG, service.oneshot(request))
        .await
        .expect("the fallback attempt must not hang")
        .unwrap();
    assert_eq!(response.status(), 200);
    let requests = mock.requests();
    assert_eq!(requests.len(), 2);
    assert_framed(&requests[0], &messages_body(from));
    assert_framed(&requests[1], &messages_body(to));
    assert_eq!(
        requests[1].model.as_deref(),
        Some(to),
        "valid JSON for the new model"
    );
}

#[tokio::test(start_paused = true)]
async fn defect_3_fallback_to_a_longer_model_name_fixes_content_length() {
    falls_back_with_fresh_framing(SHORT, LONG).await;
}

#[tokio::test(start_paused = true)]
async fn defect_3_fallback_to_a_shorter_model_name_fixes_content_length() {
    falls_back_with_fresh_framing(LONG, SHORT).await;
}

// Defect 3: a caller that sent its body chunked keeps chunked framing, and
// no content-length is added or left behind.
#[tokio::test(start_paused = true)]
async fn defect_3_a_chunked_request_stays_chunked_after_the_rewrite() {
    let mock = MockUpstream::start().await;
    mock.push_for_model(LONG, [Reply::overloaded()]);
    let request = Request::post(mock.url("/v1/messages"))
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(Full::new(messages_body(LONG)))
        .unwrap();
    let service = ModelFallbackLayer::new([LONG, SHORT]).layer(client());
    let response = tokio::time::timeout(HANG, service.oneshot(request))
        .await
        .expect("the fallback attempt must not hang")
        .unwrap();
    assert_eq!(response.status(), 200);
    let requests = mock.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[1].body, messages_body(SHORT));
    assert!(
        !requests[1]
            .headers
            .contains_key(http::header::CONTENT_LENGTH)
    );
    assert_eq!(
        requests[1]
            .headers
            .get(http::header::TRANSFER_ENCODING)
            .unwrap(),
        "chunked"
    );
}

// Defect 11 (b): the sniffer read a failed response's frames and dropped
// every one that was not data, so the caller lost the trailers.
#[tokio::test(start_paused = true)]
async fn defect_11_the_sniffer_hands_on_trailers_in_order() {
    use http_body::Frame;
    use http_body_util::{BodyExt, StreamBody};
    use tower_overload::retry::{OverloadRetryLayer, RetryPolicy};

    let upstream = tower::service_fn(|_: Request<Full<bytes::Bytes>>| async {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-checksum", http::HeaderValue::from_static("abc"));
        let frames: Vec<Result<Frame<bytes::Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(bytes::Bytes::from_static(
                b"{\"type\":\"error\",",
            ))),
            Ok(Frame::data(bytes::Bytes::from_static(
                b"\"error\":{\"type\":\"api_error\",\"message\":\"boom\"}}",
            ))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = StreamBody::new(futures::stream::iter(frames));
        Ok::<_, std::io::Error>(http::Response::builder().status(500).body(body).unwrap())
    });
    let service = OverloadRetryLayer::new(RetryPolicy::foreground().seed(13)).layer(upstream);
    let request = Request::post("http://upstream/v1/messages")
        .body(Full::new(messages_body(LONG)))
        .unwrap();
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 500);
    let mut body = response.into_body();
    let mut kinds = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        kinds.push(match frame.trailers_ref() {
            Some(trailers) => format!("trailers {:?}", trailers.get("x-checksum")),
            None => format!("data {}", frame.data_ref().map_or(0, |d| d.len())),
        });
    }
    assert_eq!(
        kinds,
        ["data 16", "data 46", "trailers Some(\"abc\")"],
        "every frame, in order"
    );
}
