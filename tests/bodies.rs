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

// ===== Retried bodies, byte for byte, for every body kind =====
//
// Each kind goes through `OverloadRetryLayer(RetryPolicy::foreground())` as
// shipped (seeded), over loopback, with (i) an upstream that answers 529
// before it read the whole body, then 200, and (ii) an upstream that reads
// the whole body, answers 529, then 200. A `ReplayBody` over a real hyper
// `Incoming` is also uploaded slowly (chunks seconds apart) to a front
// server that forwards it without its content-length, so the client frames
// every attempt from the body's own size hint (defect 2).

mod retried {
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use bytes::Bytes;
    use http::{HeaderMap, Request, Response, StatusCode, Uri};
    use http_body::Frame;
    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::body::Incoming;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::net::TcpListener;
    use tower::{Layer, Service, ServiceExt};
    use tower_overload::BoxError;
    use tower_overload::body::{DEFAULT_REPLAY_CAP, ReplayBody, ReplayableBody};
    use tower_overload::retry::{OverloadRetryLayer, RetryPolicy, RetryReport};

    use super::HANG;
    use crate::support::{MockUpstream, Reply};

    /// One request as an upstream saw it.
    #[derive(Clone, Debug)]
    struct Seen {
        headers: HeaderMap,
        /// What the upstream read: all of it, or only the first frame when it answered early.
        body: Bytes,
        early: bool,
    }

    /// An upstream that answers its first `early` requests with 529 after
    /// reading only their first frame (as the API may when it sheds load),
    /// then reads each whole body and answers 200.
    struct EarlyUpstream {
        addr: SocketAddr,
        seen: Arc<Mutex<Vec<Seen>>>,
        server: tokio::task::JoinHandle<()>,
    }

    impl Drop for EarlyUpstream {
        fn drop(&mut self) {
            self.server.abort();
        }
    }

    impl EarlyUpstream {
        async fn start(early: usize) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let seen = Arc::new(Mutex::new(Vec::new()));
            let early = Arc::new(AtomicUsize::new(early));
            let record = Arc::clone(&seen);
            let server = tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let (seen, early) = (Arc::clone(&record), Arc::clone(&early));
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            answer(Arc::clone(&seen), Arc::clone(&early), request)
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            Self { addr, seen, server }
        }

        fn url(&self) -> Uri {
            format!("http://{}/v1/messages", self.addr).parse().unwrap()
        }

        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }
    }

    async fn answer(
        seen: Arc<Mutex<Vec<Seen>>>,
        early: Arc<AtomicUsize>,
        request: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let (parts, mut body) = request.into_parts();
        let answer_early = early
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let read = if answer_early {
            match body.frame().await {
                Some(Ok(frame)) => frame.into_data().unwrap_or_default(),
                _ => Bytes::new(),
            }
        } else {
            body.collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default()
        };
        seen.lock().unwrap().push(Seen {
            headers: parts.headers,
            body: read,
            early: answer_early,
        });
        let (status, text) = if answer_early {
            (
                529,
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            )
        } else {
            (200, r#"{"type":"message","content":[]}"#)
        };
        let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
        Ok(response)
    }

    /// A Messages API body of about `size` bytes.
    fn big_body(size: usize) -> Bytes {
        let text: String = (0..size)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let body = serde_json::json!({
            "model": "claude-opus-4-6",
            "max_tokens": 256,
            "messages": [{"role": "user", "content": text}],
        });
        Bytes::from(body.to_string())
    }

    fn policy(seed: u64) -> RetryPolicy {
        RetryPolicy::foreground().seed(seed)
    }

    /// Sends `body` to `url` through the retry layer over a hyper-util client.
    async fn send<B>(url: Uri, body: B, seed: u64) -> Response<Bytes>
    where
        B: ReplayableBody + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let client = Client::builder(TokioExecutor::new()).build_http::<B>();
        let service = OverloadRetryLayer::new(policy(seed)).layer(client);
        let request = Request::post(url)
            .header("content-type", "application/json")
            .body(body)
            .unwrap();
        let response = tokio::time::timeout(HANG, service.oneshot(request))
            .await
            .expect("the call must not hang")
            .expect("the retry succeeds");
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        Response::from_parts(parts, bytes)
    }

    fn content_length(headers: &HeaderMap) -> Option<usize> {
        headers
            .get(http::header::CONTENT_LENGTH)?
            .to_str()
            .ok()?
            .parse()
            .ok()
    }

    /// Every attempt was framed with the whole length; every attempt the
    /// upstream read whole carried exactly the original bytes.
    fn assert_every_attempt_whole(seen: &[(HeaderMap, Option<Bytes>)], expected: &[u8]) {
        assert!(
            seen.len() >= 2,
            "the 529 was retried: {} attempts",
            seen.len()
        );
        for (n, (headers, body)) in seen.iter().enumerate() {
            assert_eq!(
                content_length(headers),
                Some(expected.len()),
                "attempt {n} framed with {headers:?}"
            );
            if let Some(body) = body {
                assert_eq!(body.len(), expected.len(), "attempt {n} length");
                assert!(body.as_ref() == expected, "attempt {n} bytes differ");
            }
        }
    }

    fn early_seen(upstream: &EarlyUpstream) -> Vec<(HeaderMap, Option<Bytes>)> {
        upstream
            .seen()
            .into_iter()
            .map(|s| (s.headers, (!s.early).then_some(s.body)))
            .collect()
    }

    fn mock_seen(mock: &MockUpstream) -> Vec<(HeaderMap, Option<Bytes>)> {
        mock.requests()
            .into_iter()
            .map(|r| (r.headers, Some(r.body)))
            .collect()
    }

    fn assert_report(response: &Response<Bytes>, attempts: usize) {
        assert_eq!(response.status(), 200);
        let report = response
            .extensions()
            .get::<RetryReport>()
            .expect("a report");
        assert_eq!(report.attempts.len(), attempts);
    }

    // (i) An early 529, then 200: Full, String.

    #[tokio::test(start_paused = true)]
    async fn a_full_body_is_sent_whole_after_an_early_529() {
        let upstream = EarlyUpstream::start(1).await;
        let body = big_body(256 * 1024);
        let response = send(upstream.url(), Full::new(body.clone()), 21).await;
        assert_report(&response, 2);
        let seen = early_seen(&upstream);
        assert!(seen[0].1.is_none(), "the first attempt was answered early");
        assert_every_attempt_whole(&seen, &body);
    }

    #[tokio::test(start_paused = true)]
    async fn a_string_body_is_sent_whole_after_an_early_529() {
        let upstream = EarlyUpstream::start(1).await;
        let body = big_body(256 * 1024);
        let text = String::from_utf8(body.to_vec()).unwrap();
        let response = send(upstream.url(), text, 22).await;
        assert_report(&response, 2);
        assert_every_attempt_whole(&early_seen(&upstream), &body);
    }

    // (ii) The whole body read, 529, then 200: Full, String.

    #[tokio::test(start_paused = true)]
    async fn a_full_body_is_sent_whole_after_a_529() {
        let mock = MockUpstream::start().await;
        mock.push([Reply::overloaded(), Reply::ok()]);
        let body = big_body(300);
        let response = send(mock.url("/v1/messages"), Full::new(body.clone()), 23).await;
        assert_report(&response, 2);
        assert_every_attempt_whole(&mock_seen(&mock), &body);
    }

    #[tokio::test(start_paused = true)]
    async fn a_string_body_is_sent_whole_after_a_529() {
        let mock = MockUpstream::start().await;
        mock.push([Reply::overloaded(), Reply::ok()]);
        let body = big_body(300);
        let text = String::from_utf8(body.to_vec()).unwrap();
        let response = send(mock.url("/v1/messages"), text, 24).await;
        assert_report(&response, 2);
        assert_every_attempt_whole(&mock_seen(&mock), &body);
    }

    // ReplayBody over hyper's Incoming, behind a front server.

    /// A front server on loopback: each request's `Incoming` body, wrapped
    /// in a `ReplayBody`, goes through the retry layer to `upstream`. The
    /// caller's content-length is not forwarded: the client frames each
    /// attempt from the body's size hint.
    async fn front(upstream: Uri, seed: u64) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Incoming>>();
        let service = OverloadRetryLayer::new(policy(seed)).layer(client);
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (service, upstream) = (service.clone(), upstream.clone());
                tokio::spawn(async move {
                    let handler = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let (mut service, upstream) = (service.clone(), upstream.clone());
                        async move {
                            let forwarded = Request::post(upstream)
                                .header("content-type", "application/json")
                                .body(ReplayBody::new(request.into_body(), DEFAULT_REPLAY_CAP))
                                .unwrap();
                            Ok::<_, Infallible>(forward(&mut service, forwarded).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), handler)
                        .await;
                });
            }
        });
        (addr, server)
    }

    /// The upstream's answer, with the attempts it took; a 502 saying why
    /// when the call failed.
    async fn forward<S>(
        service: &mut S,
        request: Request<ReplayBody<Incoming>>,
    ) -> Response<Full<Bytes>>
    where
        S: Service<
                Request<ReplayBody<Incoming>>,
                Response = Response<tower_overload::body::PeekedBody<Incoming>>,
                Error = tower_overload::Error,
            >,
    {
        let response = match service.ready().await {
            Ok(ready) => ready.call(request).await,
            Err(error) => Err(error),
        };
        let failed = |error: String| {
            let mut response = Response::new(Full::new(Bytes::from(error)));
            *response.status_mut() = StatusCode::BAD_GATEWAY;
            response
        };
        let response = match response {
            Ok(response) => response,
            Err(error) => return failed(error.to_string()),
        };
        let attempts = response
            .extensions()
            .get::<RetryReport>()
            .map_or(0, |r| r.attempts.len());
        let (mut parts, body) = response.into_parts();
        match body.collect().await {
            Ok(collected) => {
                parts.headers.insert("x-attempts", attempts.into());
                Response::from_parts(parts, Full::new(collected.to_bytes()))
            }
            Err(error) => failed(error.to_string()),
        }
    }

    /// `body` in `parts` chunks, `gap` apart, with a content-length.
    async fn upload(
        front: SocketAddr,
        body: &Bytes,
        parts: usize,
        gap: Duration,
    ) -> Response<Bytes> {
        let size = body.len().div_ceil(parts);
        let chunks: Vec<Bytes> = (0..body.len())
            .step_by(size)
            .map(|at| body.slice(at..(at + size).min(body.len())))
            .collect();
        let frames = futures::stream::unfold(chunks.into_iter(), move |mut chunks| async move {
            let chunk = chunks.next()?;
            tokio::time::sleep(gap).await;
            Some((Ok::<_, Infallible>(Frame::data(chunk)), chunks))
        });
        let slow = StreamBody::new(Box::pin(frames));
        let client = Client::builder(TokioExecutor::new()).build_http();
        let request = Request::post(format!("http://{front}/v1/messages"))
            .header("content-type", "application/json")
            .header("content-length", body.len())
            .body(slow)
            .unwrap();
        let response = tokio::time::timeout(HANG, client.request(request))
            .await
            .expect("the upload must not hang")
            .unwrap();
        let (parts, body) = response.into_parts();
        Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    }

    fn attempts(response: &Response<Bytes>) -> usize {
        response.headers()["x-attempts"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn an_incoming_body_is_sent_whole_after_an_early_529_mid_upload() {
        let upstream = EarlyUpstream::start(1).await;
        let (front, _server) = front(upstream.url(), 31).await;
        let body = big_body(300);
        let response = upload(front, &body, 3, Duration::from_secs(2)).await;
        assert_eq!(response.status(), 200, "{:?}", response.body());
        assert_eq!(attempts(&response), 2);
        let seen = early_seen(&upstream);
        assert!(seen[0].1.is_none(), "the first attempt was answered early");
        assert_every_attempt_whole(&seen, &body);
    }

    #[tokio::test(start_paused = true)]
    async fn an_incoming_body_is_sent_whole_after_an_early_529() {
        let upstream = EarlyUpstream::start(1).await;
        let (front, _server) = front(upstream.url(), 32).await;
        let body = big_body(256 * 1024);
        let response = upload(front, &body, 1, Duration::ZERO).await;
        assert_eq!(response.status(), 200, "{:?}", response.body());
        assert_eq!(attempts(&response), 2);
        assert_every_attempt_whole(&early_seen(&upstream), &body);
    }

    #[tokio::test(start_paused = true)]
    async fn an_incoming_body_uploaded_slowly_is_sent_whole_after_a_529() {
        let mock = MockUpstream::start().await;
        mock.push([Reply::overloaded(), Reply::ok()]);
        let (front, _server) = front(mock.url("/v1/messages"), 33).await;
        let body = big_body(300);
        let response = upload(front, &body, 3, Duration::from_secs(2)).await;
        assert_eq!(response.status(), 200, "{:?}", response.body());
        assert_eq!(attempts(&response), 2);
        assert_every_attempt_whole(&mock_seen(&mock), &body);
    }
}

// Defect 11 (a): String content replays by reference count once it is a
// `Full<Bytes>` (taking the String's buffer, no copy): every attempt is
// handed the very same bytes, not a copy. (A `String` body type cannot
// share its buffer; see `body::ReplayableBody for String`.)
#[tokio::test(start_paused = true)]
async fn defect_11_string_content_replays_by_reference_count() {
    use http_body_util::BodyExt;
    use std::sync::{Arc, Mutex};
    use tower_overload::retry::{OverloadRetryLayer, RetryPolicy};

    let text = String::from_utf8(messages_body(LONG).to_vec()).unwrap();
    let original = text.as_ptr() as usize;
    let body = Full::new(bytes::Bytes::from(text));
    let handed: Arc<Mutex<Vec<usize>>> = Arc::default();
    let seen = Arc::clone(&handed);
    let upstream = tower::service_fn(move |request: Request<Full<bytes::Bytes>>| {
        let seen = Arc::clone(&seen);
        async move {
            let data = request.into_body().collect().await.unwrap().to_bytes();
            let mut seen = seen.lock().unwrap();
            seen.push(data.as_ptr() as usize);
            let status = if seen.len() < 3 { 529 } else { 200 };
            Ok::<_, std::io::Error>(
                http::Response::builder()
                    .status(status)
                    .body(Full::new(bytes::Bytes::new()))
                    .unwrap(),
            )
        }
    });
    let service = OverloadRetryLayer::new(RetryPolicy::foreground().seed(5)).layer(upstream);
    let request = Request::post("http://upstream/v1/messages")
        .body(body)
        .unwrap();
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        *handed.lock().unwrap(),
        [original; 3],
        "the same buffer, three times"
    );
}
