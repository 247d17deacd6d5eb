//! An outsider's attempts to break the reqwest and reqwest-middleware paths:
//! hostile upstreams, streaming bodies, cancellation, other middleware around
//! `OverloadMiddleware`, many tasks on one client.

mod support;

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Extensions;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, StreamBody};
use rand::{RngExt, SeedableRng, rngs::SmallRng};
use reqwest_middleware::{ClientBuilder, Middleware, Next};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tower::{Layer, ServiceExt};
use tower_overload::body::ReplayBody;
use tower_overload::concurrency::ConcurrencyPerModelLayer;
use tower_overload::fallback::{ModelFallbackLayer, ServedBy};
use tower_overload::reqwest::ReqwestService;
use tower_overload::reqwest_middleware::OverloadMiddleware;
use tower_overload::retry::{RetryPolicy, RetryReport, StopReason};
use tower_overload::stack::OverloadStack;

use support::{MockUpstream, Reply, messages_body};

fn install_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn reqwest_client() -> reqwest::Client {
    install_tls();
    reqwest::Client::builder().build().expect("a client")
}

// ===== a hostile upstream: raw bytes on a socket =====

/// What the hostile server does after writing its bytes.
#[derive(Clone, Copy)]
enum After {
    Close,
    Stall,
}

/// Serves one scripted raw answer per connection, in order; counts connections.
async fn hostile(answers: Vec<(Vec<u8>, After)>) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&count);
    tokio::spawn(async move {
        let mut answers = answers.into_iter();
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            seen.fetch_add(1, Ordering::SeqCst);
            let answer = answers.next();
            tokio::spawn(async move {
                read_request(&mut socket).await;
                let (bytes, after) = answer.unwrap_or_else(|| (ok_json(), After::Close));
                let _ = socket.write_all(&bytes).await;
                let _ = socket.flush().await;
                if let After::Stall = after {
                    std::future::pending::<()>().await;
                }
            });
        }
    });
    (addr, count)
}

/// Reads one request head and its `content-length` body (the client sends them whole).
async fn read_request(socket: &mut tokio::net::TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return;
            }
        }
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn raw(status: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\n").into_bytes();
    for (name, value) in headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

fn ok_json() -> Vec<u8> {
    let body = br#"{"type":"message","content":[]}"#;
    raw(
        "200 OK",
        &[
            ("content-type", "application/json"),
            ("content-length", &body.len().to_string()),
            ("connection", "close"),
        ],
        body,
    )
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn http_request(addr: SocketAddr, model: &str) -> http::Request<Full<Bytes>> {
    http::Request::post(format!("http://{addr}/v1/messages"))
        .header("content-type", "application/json")
        .body(Full::new(messages_body(model)))
        .unwrap()
}

fn in_flight(layer: &ConcurrencyPerModelLayer) -> usize {
    layer.snapshot().iter().map(|k| k.in_flight).sum()
}

/// A fast retry policy so that paused-clock tests stay short.
fn policy() -> RetryPolicy {
    RetryPolicy::foreground().seed(7)
}

// ===== ReqwestService under OverloadStack =====

#[tokio::test(start_paused = true)]
async fn stack_a_529_cut_mid_body_is_retried_and_frees_its_permit() {
    let truncated = raw(
        "529 Site Overloaded",
        &[
            ("content-type", "application/json"),
            ("content-length", "200"),
        ],
        br#"{"type":"error","err"#,
    );
    let (addr, connections) =
        hostile(vec![(truncated, After::Close), (ok_json(), After::Close)]).await;
    let limits = ConcurrencyPerModelLayer::new(1);
    let service = OverloadStack::new()
        .retry(policy())
        .concurrency(limits.clone())
        .layer(ReqwestService::new(reqwest_client()));
    let response = service
        .clone()
        .oneshot(http_request(addr, "m"))
        .await
        .expect("retried after the cut body");
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(body.starts_with(b"{\"type\":\"message\""));
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    assert_eq!(in_flight(&limits), 0);
}

#[tokio::test(start_paused = true)]
async fn stack_a_200_cut_mid_body_is_a_body_error_and_frees_its_permit() {
    let truncated = raw(
        "200 OK",
        &[
            ("content-type", "application/json"),
            ("content-length", "100"),
        ],
        b"{\"type\":\"mess",
    );
    let (addr, _) = hostile(vec![(truncated, After::Close)]).await;
    let limits = ConcurrencyPerModelLayer::new(1);
    let service = OverloadStack::new()
        .retry(policy())
        .concurrency(limits.clone())
        .layer(ReqwestService::new(reqwest_client()));
    let response = service.oneshot(http_request(addr, "m")).await.unwrap();
    assert_eq!(in_flight(&limits), 1, "the body holds the permit");
    let error = response.into_body().collect().await.unwrap_err();
    let error: tower_overload::BoxError = error;
    assert!(
        std::iter::successors(Some(&*error as &(dyn std::error::Error + 'static)), |e| e
            .source())
        .any(|e| e.downcast_ref::<reqwest::Error>().is_some()),
        "the reqwest error is in the chain: {error:?}"
    );
    assert_eq!(in_flight(&limits), 0);
}

#[tokio::test(start_paused = true)]
async fn stack_a_stall_after_the_head_ends_and_the_dropped_body_frees_its_permit() {
    // A 200 head, then nothing: the caller gets the head, drops the body.
    let head = raw(
        "200 OK",
        &[
            ("content-type", "application/json"),
            ("content-length", "50"),
        ],
        b"",
    );
    // A 500 head, then nothing: the retry layer sniffs its body; it must give up in time.
    let error_head = raw(
        "500 Internal Server Error",
        &[
            ("content-type", "application/json"),
            ("content-length", "50"),
        ],
        b"",
    );
    let (addr, connections) = hostile(vec![
        (head, After::Stall),
        (error_head, After::Stall),
        (ok_json(), After::Close),
    ])
    .await;
    let limits = ConcurrencyPerModelLayer::new(1);
    let service = OverloadStack::new()
        .retry(policy())
        .concurrency(limits.clone())
        .layer(ReqwestService::new(reqwest_client()));
    let response = service
        .clone()
        .oneshot(http_request(addr, "m"))
        .await
        .unwrap();
    drop(response);
    assert_eq!(in_flight(&limits), 0);
    let second = tokio::time::timeout(
        Duration::from_secs(600),
        service.oneshot(http_request(addr, "m")),
    )
    .await
    .expect("a stalled error body does not hang the call");
    let second = second.expect("the stalled 500 is retried");
    assert_eq!(second.status(), 200);
    assert_eq!(connections.load(Ordering::SeqCst), 3);
    drop(second);
    assert_eq!(in_flight(&limits), 0);
}

#[tokio::test(start_paused = true)]
async fn stack_absurd_headers_neither_panic_nor_wait_forever() {
    let huge = "x".repeat(60 * 1024);
    let answers = vec![
        (
            raw(
                "529 Site Overloaded",
                &[
                    ("retry-after", "18446744073709551616999"),
                    ("retry-after-ms", "-5"),
                    ("x-should-retry", "maybe"),
                    ("request-id", "\u{7f}bad"),
                    ("content-length", "0"),
                ],
                b"",
            ),
            After::Close,
        ),
        (
            raw(
                "429 Too Many Requests",
                &[
                    ("retry-after", "Wed, 21 Oct 2999 07:28:00 GMT"),
                    ("x-junk", &huge),
                    ("content-length", "0"),
                ],
                b"",
            ),
            After::Close,
        ),
        (ok_json(), After::Close),
    ];
    let (addr, _) = hostile(answers).await;
    let service = OverloadStack::new()
        .retry(policy())
        .layer(ReqwestService::new(reqwest_client()));
    let started = tokio::time::Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(3600),
        service.oneshot(http_request(addr, "m")),
    )
    .await
    .expect("an absurd retry-after is capped, not obeyed");
    // Either the call is retried to the 200, or it stops and says so: never a panic or an hour's wait.
    match result {
        Ok(response) => {
            let report = response.extensions().get::<RetryReport>().unwrap().clone();
            assert!(started.elapsed() < Duration::from_secs(600), "{report:?}");
        }
        Err(error) => assert!(started.elapsed() < Duration::from_secs(600), "{error:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn stack_gzip_error_bodies_are_read_and_corrupt_ones_do_no_harm() {
    let overloaded =
        gzip(br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#);
    let answers = vec![
        (
            raw(
                "500 Internal Server Error",
                &[
                    ("content-type", "application/json"),
                    ("content-encoding", "gzip"),
                    ("content-length", &overloaded.len().to_string()),
                ],
                &overloaded,
            ),
            After::Close,
        ),
        (
            raw(
                "500 Internal Server Error",
                &[
                    ("content-type", "application/json"),
                    ("content-encoding", "gzip"),
                    ("content-length", "9"),
                ],
                b"\x1f\x8b\x08garbage"[..9].as_ref(),
            ),
            After::Close,
        ),
        (ok_json(), After::Close),
    ];
    let (addr, _) = hostile(answers).await;
    let service = OverloadStack::new()
        .retry(policy())
        .layer(ReqwestService::new(reqwest_client()));
    let response = service.oneshot(http_request(addr, "m")).await.unwrap();
    assert_eq!(response.status(), 200);
    let report = response.extensions().get::<RetryReport>().unwrap();
    assert_eq!(report.attempts.len(), 3, "{report:?}");
    assert_eq!(
        report.attempts[0].class,
        tower_overload::classify::Class::Overloaded,
        "the gzip body said overloaded"
    );
}

/// A streaming body (unknown length) that yields `chunks`, then optionally fails.
struct Chunks {
    chunks: Vec<Bytes>,
    fail_after: bool,
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if !self.chunks.is_empty() {
            let chunk = self.chunks.remove(0);
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if self.fail_after {
            self.fail_after = false;
            return Poll::Ready(Some(Err(std::io::Error::other("disk gone mid-upload"))));
        }
        Poll::Ready(None)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

fn split_body(model: &str) -> Vec<Bytes> {
    let body = messages_body(model);
    let mid = body.len() / 2;
    vec![body.slice(..mid), body.slice(mid..)]
}

#[tokio::test(start_paused = true)]
async fn stack_a_streamed_request_body_is_sent_whole_on_every_attempt() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::overloaded(), Reply::ok()]);
    let service = OverloadStack::new()
        .retry(policy())
        .layer(ReqwestService::<ReplayBody<Chunks>>::new(reqwest_client()));
    let body = ReplayBody::new(
        Chunks {
            chunks: split_body("claude-haiku-4-5"),
            fail_after: false,
        },
        1 << 20,
    );
    let request = http::Request::post(mock.url("/v1/messages").to_string())
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let recorded = mock.requests();
    assert_eq!(recorded.len(), 2);
    for request in recorded {
        assert_eq!(request.body, messages_body("claude-haiku-4-5"));
    }
}

#[tokio::test(start_paused = true)]
async fn stack_a_body_error_mid_upload_is_an_error_and_never_a_short_request() {
    let mock = MockUpstream::start().await;
    let limits = ConcurrencyPerModelLayer::new(1);
    let service = OverloadStack::new()
        .retry(policy())
        .concurrency(limits.clone())
        .layer(ReqwestService::<ReplayBody<Chunks>>::new(reqwest_client()));
    let body = ReplayBody::new(
        Chunks {
            chunks: split_body("claude-haiku-4-5")[..1].to_vec(),
            fail_after: true,
        },
        1 << 20,
    );
    let request = http::Request::post(mock.url("/v1/messages").to_string())
        .body(body)
        .unwrap();
    let result = service.oneshot(request).await;
    assert!(result.is_err(), "a failed upload cannot succeed");
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The mock records a request whose body it could not read whole as empty;
    // a short body it could read would be a request sent short.
    for request in mock.requests() {
        assert!(
            request.body.is_empty() || request.body == messages_body("claude-haiku-4-5"),
            "sent short: {:?}",
            request.body
        );
    }
    assert!(mock.request_count() <= 1, "a failed body is not sent again");
    assert_eq!(in_flight(&limits), 0);
}

#[derive(Clone, Debug, PartialEq)]
struct Marker(u32);

#[tokio::test(start_paused = true)]
async fn stack_request_extensions_survive_onto_the_response() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::overloaded(), Reply::ok()]);
    let service = OverloadStack::new()
        .retry(policy())
        .layer(ReqwestService::new(reqwest_client()));
    let mut request = http_request(mock.addr(), "claude-haiku-4-5");
    request.extensions_mut().insert(Marker(7));
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.extensions().get::<Marker>(), Some(&Marker(7)));
    assert_eq!(
        response
            .extensions()
            .get::<RetryReport>()
            .unwrap()
            .attempts
            .len(),
        2
    );
}

#[tokio::test(start_paused = true)]
async fn stack_cancelled_calls_give_back_every_permit() {
    let mock = MockUpstream::start().await;
    mock.set_default(
        Reply::slow_body(&["{\"a\":", "1", "}"], Duration::from_millis(40))
            .delay(Duration::from_millis(30)),
    );
    let limits = ConcurrencyPerModelLayer::new(2);
    let service = OverloadStack::new()
        .retry(policy())
        .concurrency(limits.clone())
        .layer(ReqwestService::new(reqwest_client()));
    let mut rng = SmallRng::seed_from_u64(0xB4EA_4E52);
    for round in 0..30 {
        let cut = Duration::from_millis(rng.random_range(0..150));
        let read_some = rng.random_bool(0.5);
        let service = service.clone();
        let request = http_request(mock.addr(), "claude-haiku-4-5");
        let call = async move {
            let response = service.oneshot(request).await?;
            let mut body = response.into_body();
            if read_some {
                let _ = body.frame().await;
            }
            std::future::pending::<()>().await;
            Ok::<_, tower_overload::BoxError>(())
        };
        let _ = tokio::time::timeout(cut, call).await;
        assert_eq!(in_flight(&limits), 0, "round {round}: a permit leaked");
    }
    // The limit still admits its two calls at once.
    let (a, b) = tokio::join!(
        service
            .clone()
            .oneshot(http_request(mock.addr(), "claude-haiku-4-5")),
        service
            .clone()
            .oneshot(http_request(mock.addr(), "claude-haiku-4-5")),
    );
    assert_eq!(a.unwrap().status(), 200);
    assert_eq!(b.unwrap().status(), 200);
}

#[tokio::test(start_paused = true)]
async fn stack_a_huge_in_memory_body_goes_out_whole_and_is_replayed_by_reference() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::overloaded(), Reply::ok()]);
    let mut body = messages_body("claude-haiku-4-5").to_vec();
    // 8 MiB of padding in a JSON string the mock does not read.
    body.pop();
    body.extend_from_slice(b",\"pad\":\"");
    body.extend(std::iter::repeat_n(b'x', 8 << 20));
    body.extend_from_slice(b"\"}");
    let body = Bytes::from(body);
    let service = OverloadStack::new()
        .retry(policy())
        .layer(ReqwestService::new(reqwest_client()));
    let request = http::Request::post(mock.url("/v1/messages").to_string())
        .body(Full::new(body.clone()))
        .unwrap();
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let recorded = mock.requests();
    assert_eq!(recorded.len(), 2);
    assert!(recorded.iter().all(|r| r.body == body));
    assert!(
        recorded
            .iter()
            .all(|r| r.model.as_deref() == Some("claude-haiku-4-5"))
    );
}

// ===== OverloadMiddleware in a ClientWithMiddleware =====

/// Counts its calls; optionally writes an extension for the outside to see.
#[derive(Clone, Default)]
struct Counting {
    calls: Arc<AtomicUsize>,
    mark: Option<u32>,
}

type BoxFuture<'a, T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

impl Middleware for Counting {
    fn handle<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        request: reqwest::Request,
        extensions: &'life1 mut Extensions,
        next: Next<'life2>,
    ) -> BoxFuture<'async_trait, reqwest_middleware::Result<reqwest::Response>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            if let Some(mark) = self.mark {
                extensions.insert(Marker(mark * 100 + n as u32));
            }
            next.run(request, extensions).await
        })
    }
}

/// An inner middleware that fails every call with its own error.
#[derive(Debug)]
struct Refused;

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("refused by policy")
    }
}

impl std::error::Error for Refused {}

struct Refuse;

impl Middleware for Refuse {
    fn handle<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        _: reqwest::Request,
        _: &'life1 mut Extensions,
        _: Next<'life2>,
    ) -> BoxFuture<'async_trait, reqwest_middleware::Result<reqwest::Response>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move { Err(reqwest_middleware::Error::middleware(Refused)) })
    }
}

#[derive(serde::Serialize)]
struct Messages<'a> {
    model: &'a str,
    max_tokens: u32,
}

#[tokio::test(start_paused = true)]
async fn middleware_json_body_retried_with_response_parts_of_the_answer() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::overloaded(), Reply::ok().header("x-final", "yes")]);
    let outer = Counting::default();
    let inner = Counting {
        calls: Arc::default(),
        mark: Some(1),
    };
    let client = ClientBuilder::new(reqwest_client())
        .with(outer.clone())
        .with(OverloadMiddleware::new(
            OverloadStack::new().retry(policy()),
        ))
        .with(inner.clone())
        .build();
    let url = format!("{}?beta=true", mock.url("/v1/messages"));
    let body = serde_json::to_vec(&Messages {
        model: "claude-haiku-4-5",
        max_tokens: 8,
    })
    .unwrap();
    let response = client
        .post(&url)
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.url().as_str(), url);
    assert_eq!(response.headers()["x-final"], "yes");
    assert_eq!(response.headers()["request-id"], "req_mock_000002");
    let report = response.extensions().get::<RetryReport>().unwrap();
    assert_eq!(report.attempts.len(), 2);
    assert_eq!(
        outer.calls.load(Ordering::SeqCst),
        1,
        "outside: once per call"
    );
    assert_eq!(
        inner.calls.load(Ordering::SeqCst),
        2,
        "inside: once per attempt"
    );
    let recorded = mock.requests();
    assert!(recorded.iter().all(|r| r.body == body));
    let bytes = response.bytes().await.unwrap();
    assert!(bytes.starts_with(b"{"));
}

#[tokio::test(start_paused = true)]
async fn middleware_extensions_written_inside_reach_the_middleware_outside() {
    // An outer middleware that reads what the inner one wrote, after the call.
    struct Reader(Arc<std::sync::Mutex<Option<Marker>>>);
    impl Middleware for Reader {
        fn handle<'life0, 'life1, 'life2, 'async_trait>(
            &'life0 self,
            request: reqwest::Request,
            extensions: &'life1 mut Extensions,
            next: Next<'life2>,
        ) -> BoxFuture<'async_trait, reqwest_middleware::Result<reqwest::Response>>
        where
            'life0: 'async_trait,
            'life1: 'async_trait,
            'life2: 'async_trait,
            Self: 'async_trait,
        {
            Box::pin(async move {
                let result = next.run(request, extensions).await;
                *self.0.lock().unwrap() = extensions.get::<Marker>().cloned();
                result
            })
        }
    }
    let mock = MockUpstream::start().await;
    mock.push([Reply::overloaded(), Reply::ok()]);
    let seen = Arc::new(std::sync::Mutex::new(None));
    let client = ClientBuilder::new(reqwest_client())
        .with(Reader(Arc::clone(&seen)))
        .with(OverloadMiddleware::new(
            OverloadStack::new().retry(policy()),
        ))
        .with(Counting {
            calls: Arc::default(),
            mark: Some(3),
        })
        .build();
    let response = client
        .post(mock.url("/v1/messages").to_string())
        .body(messages_body("claude-haiku-4-5"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The answering (second) attempt's extensions.
    assert_eq!(*seen.lock().unwrap(), Some(Marker(302)));
}

#[tokio::test(start_paused = true)]
async fn middleware_a_streamed_body_is_sent_once_and_the_529_handed_back() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::overloaded(), Reply::ok()]);
    let client = ClientBuilder::new(reqwest_client())
        .with(OverloadMiddleware::new(
            OverloadStack::new().retry(policy()),
        ))
        .build();
    let chunks = split_body("claude-haiku-4-5")
        .into_iter()
        .map(|c| Ok::<_, Infallible>(Frame::data(c)));
    let body = reqwest::Body::wrap(StreamBody::new(futures::stream::iter(chunks)));
    let response = client
        .post(mock.url("/v1/messages").to_string())
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 529);
    let report = response.extensions().get::<RetryReport>().unwrap();
    assert_eq!(report.stop, StopReason::BodyNotReplayable);
    assert_eq!(mock.request_count(), 1);
    assert_eq!(mock.requests()[0].body, messages_body("claude-haiku-4-5"));
}

#[tokio::test(start_paused = true)]
async fn middleware_per_model_caps_hold_across_many_tasks_on_one_client() {
    let mock = MockUpstream::start().await;
    mock.set_latency(Duration::from_millis(100));
    let client = ClientBuilder::new(reqwest_client())
        .with(OverloadMiddleware::new(
            OverloadStack::new()
                .retry(policy())
                .concurrency(ConcurrencyPerModelLayer::new(2).max_queued(1000)),
        ))
        .build();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40 {
        let client = client.clone();
        let url = mock.url("/v1/messages").to_string();
        let model = if i % 2 == 0 { "model-a" } else { "model-b" };
        tasks.spawn(async move {
            let response = client
                .post(url)
                .body(messages_body(model))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            response.bytes().await.unwrap();
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    assert_eq!(mock.request_count(), 40);
    assert!(
        mock.peak_in_flight("model-a") <= 2,
        "{}",
        mock.peak_in_flight("model-a")
    );
    assert!(
        mock.peak_in_flight("model-b") <= 2,
        "{}",
        mock.peak_in_flight("model-b")
    );
}

#[tokio::test(start_paused = true)]
async fn middleware_errors_keep_their_types() {
    // An inner middleware's own error: its type is reachable.
    let mock = MockUpstream::start().await;
    let client = ClientBuilder::new(reqwest_client())
        .with(OverloadMiddleware::new(
            OverloadStack::new().retry(policy()),
        ))
        .with(Refuse)
        .build();
    let error = client
        .post(mock.url("/v1/messages").to_string())
        .body(messages_body("claude-haiku-4-5"))
        .send()
        .await
        .unwrap_err();
    match &error {
        reqwest_middleware::Error::Middleware(error) => assert!(
            error.chain().any(|e| e.downcast_ref::<Refused>().is_some()),
            "{error:?}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(mock.request_count(), 0);

    // A refused connection after the retries: the crate's error, the reqwest error inside.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let client = ClientBuilder::new(reqwest_client())
        .with(OverloadMiddleware::new(
            OverloadStack::new().retry(policy()),
        ))
        .build();
    let error = client
        .post(format!("http://{addr}/v1/messages"))
        .body(messages_body("claude-haiku-4-5"))
        .send()
        .await
        .unwrap_err();
    match &error {
        reqwest_middleware::Error::Middleware(error) => {
            let ours = error.downcast_ref::<tower_overload::Error>().expect("ours");
            assert!(ours.attempts() > 1, "{ours:?}");
            assert!(
                error.chain().any(|e| e
                    .downcast_ref::<reqwest::Error>()
                    .is_some_and(reqwest::Error::is_connect)),
                "{error:?}"
            );
        }
        reqwest_middleware::Error::Reqwest(error) => panic!("not wrapped: {error:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn middleware_fallback_answer_has_the_right_url_status_and_served_by() {
    let mock = MockUpstream::start().await;
    mock.storm("model-a", Duration::from_secs(3600), Reply::overloaded());
    let client = ClientBuilder::new(reqwest_client())
        .with(OverloadMiddleware::new(
            OverloadStack::new()
                .retry(policy().max_attempts(2))
                .fallback(ModelFallbackLayer::new(["model-a", "model-b"])),
        ))
        .build();
    let url = mock.url("/v1/messages").to_string();
    let response = client
        .post(&url)
        .header("content-type", "application/json")
        .body(messages_body("model-a"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.url().as_str(), url);
    let served = response.extensions().get::<ServedBy>().expect("served by");
    assert_eq!(served.served.as_str(), "model-b");
    let last = mock.requests().last().unwrap().clone();
    assert_eq!(last.model.as_deref(), Some("model-b"));
    let text = response.text().await.unwrap();
    assert!(text.contains("\"model\":\"model-b\""), "{text}");
}

#[tokio::test(start_paused = true)]
async fn middleware_content_length_of_the_answer_survives() {
    let answers = vec![(ok_json(), After::Close), (ok_json(), After::Close)];
    let (addr, _) = hostile(answers).await;
    let url = format!("http://{addr}/v1/messages");
    let bare = reqwest_client()
        .post(&url)
        .body(messages_body("m"))
        .send()
        .await
        .unwrap();
    let expected = bare.content_length();
    assert!(expected.is_some());
    let client = ClientBuilder::new(reqwest_client())
        .with(OverloadMiddleware::new(
            OverloadStack::new().retry(policy()),
        ))
        .build();
    let response = client
        .post(&url)
        .body(messages_body("m"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.content_length(), expected, "as bare reqwest says");
}

#[tokio::test(start_paused = true)]
async fn middleware_a_get_without_body_goes_out_as_bare_reqwest_sends_it() {
    let mock = MockUpstream::start().await;
    let url = mock.url("/v1/models").to_string();
    let bare = reqwest_client().get(&url).send().await.unwrap();
    assert_eq!(bare.status(), 200);
    let client = ClientBuilder::new(reqwest_client())
        .with(OverloadMiddleware::new(
            OverloadStack::new().retry(policy()),
        ))
        .build();
    let response = client.get(&url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.remote_addr().is_some(),
        "reqwest's HttpInfo survives"
    );
    let recorded = mock.requests();
    assert_eq!(
        recorded[0].headers.get("content-length"),
        recorded[1].headers.get("content-length"),
        "the same framing as bare reqwest"
    );
    assert_eq!(
        recorded[0].headers.get("transfer-encoding"),
        recorded[1].headers.get("transfer-encoding"),
    );
}

#[tokio::test(start_paused = true)]
async fn middleware_a_per_request_timeout_bounds_each_attempt() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::ok().delay(Duration::from_secs(30)), Reply::ok()]);
    let client = ClientBuilder::new(reqwest_client())
        .with(OverloadMiddleware::new(
            OverloadStack::new().retry(policy()),
        ))
        .build();
    let started = tokio::time::Instant::now();
    let response = client
        .post(mock.url("/v1/messages").to_string())
        .body(messages_body("claude-haiku-4-5"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    let report = response.extensions().get::<RetryReport>().unwrap();
    assert_eq!(report.attempts.len(), 2);
    assert_eq!(
        report.attempts[0].class,
        tower_overload::classify::Class::Timeout
    );
}

#[tokio::test(start_paused = true)]
async fn middleware_an_overloaded_sse_stream_is_retried_and_the_next_read_whole() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::sse_overloaded(), Reply::sse_message()]);
    // The stream guard is opt-in.
    let guarded = policy().stream_guard(Some(tower_overload::retry::StreamGuard::default()));
    let client = ClientBuilder::new(reqwest_client())
        .with(OverloadMiddleware::new(OverloadStack::new().retry(guarded)))
        .build();
    let response = client
        .post(mock.url("/v1/messages").to_string())
        .body(messages_body("claude-haiku-4-5"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .extensions()
            .get::<RetryReport>()
            .unwrap()
            .attempts
            .len(),
        2
    );
    let text = response.text().await.unwrap();
    assert!(text.starts_with("event: message_start"), "{text}");
    assert!(
        text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn middleware_a_streamed_body_is_never_sent_to_a_fallback_model() {
    let mock = MockUpstream::start().await;
    mock.storm("model-a", Duration::from_secs(3600), Reply::overloaded());
    let client = ClientBuilder::new(reqwest_client())
        .with(OverloadMiddleware::new(
            OverloadStack::new()
                .retry(policy().max_attempts(2))
                .fallback(ModelFallbackLayer::new(["model-a", "model-b"])),
        ))
        .build();
    let chunks = split_body("model-a")
        .into_iter()
        .map(|c| Ok::<_, Infallible>(Frame::data(c)));
    let result = client
        .post(mock.url("/v1/messages").to_string())
        .body(reqwest::Body::wrap(StreamBody::new(futures::stream::iter(
            chunks,
        ))))
        .send()
        .await;
    assert_eq!(mock.request_count(), 1, "a stream goes out once");
    assert_eq!(mock.requests()[0].body, messages_body("model-a"));
    if let Ok(response) = result {
        assert_eq!(response.status(), 529);
    }
}

#[tokio::test(start_paused = true)]
async fn middleware_cancelled_sends_give_back_every_permit() {
    let mock = MockUpstream::start().await;
    mock.set_default(
        Reply::slow_body(&["{\"a\":", "1", "}"], Duration::from_millis(40))
            .delay(Duration::from_millis(30)),
    );
    let limits = ConcurrencyPerModelLayer::new(1);
    let client = ClientBuilder::new(reqwest_client())
        .with(OverloadMiddleware::new(
            OverloadStack::new()
                .retry(policy())
                .concurrency(limits.clone()),
        ))
        .build();
    let mut rng = SmallRng::seed_from_u64(0x5EED);
    for round in 0..30 {
        let cut = Duration::from_millis(rng.random_range(0..150));
        let read_some = rng.random_bool(0.5);
        let request = client
            .post(mock.url("/v1/messages").to_string())
            .body(messages_body("claude-haiku-4-5"));
        let call = async move {
            let mut response = request.send().await?;
            if read_some {
                let _ = response.chunk().await;
            }
            std::future::pending::<()>().await;
            Ok::<_, tower_overload::BoxError>(())
        };
        let _ = tokio::time::timeout(cut, call).await;
        assert_eq!(in_flight(&limits), 0, "round {round}: a permit leaked");
    }
}
