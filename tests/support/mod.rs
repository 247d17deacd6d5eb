//! A scriptable mock of the Anthropic Messages API on a real hyper server at
//! 127.0.0.1:0, and a real hyper-util client to talk to it.
//!
//! Replies are scripted per request (a global queue, a queue per model, then a
//! default), can carry any status, headers and body (JSON errors, SSE streams,
//! slow chunked bodies) or drop the connection. Every request is recorded
//! (virtual time, headers, body, model), and the server counts requests in
//! flight per model, from arrival until the response body ends or is dropped.
//! A capacity mode answers 529 when a model already has N requests in flight.
//!
//! The mock reads the model with serde_json, not with the crate's own
//! `model::extract`, so tests never grade the crate with itself.

// Each integration test crate uses a different part of this module.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, Sleep};

/// What the mock sends back for one request.
#[derive(Clone, Debug)]
pub struct Reply {
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: ReplyBody,
    delay: Duration,
    chunk_interval: Duration,
    drop_connection: bool,
}

#[derive(Clone, Debug)]
enum ReplyBody {
    /// A Messages API success whose `model` echoes the request's.
    Message(String),
    Chunks(Vec<Bytes>),
}

impl Reply {
    /// 200 with a Messages API response saying `text`.
    pub fn message(text: &str) -> Self {
        Self::with_body(StatusCode::OK, ReplyBody::Message(text.to_owned()))
            .header("content-type", "application/json")
    }

    /// 200 with the default text.
    pub fn ok() -> Self {
        Self::message("Hello from the mock.")
    }

    /// An error response in the API's JSON shape.
    pub fn error(status: u16, error_type: &str, message: &str) -> Self {
        let body = serde_json::json!({
            "type": "error",
            "error": {"type": error_type, "message": message},
        });
        Self::with_body(
            StatusCode::from_u16(status).expect("a valid status"),
            ReplyBody::Chunks(vec![Bytes::from(body.to_string())]),
        )
        .header("content-type", "application/json")
    }

    /// 529 `overloaded_error`.
    pub fn overloaded() -> Self {
        Self::error(529, "overloaded_error", "Overloaded")
    }

    /// 429 `rate_limit_error` (add `retry_after` as needed).
    pub fn rate_limited() -> Self {
        Self::error(
            429,
            "rate_limit_error",
            "Number of request tokens has exceeded your per-minute rate limit",
        )
    }

    /// 500 `api_error`.
    pub fn api_error() -> Self {
        Self::error(500, "api_error", "Internal server error")
    }

    /// Any status with a raw body.
    pub fn raw(status: u16, body: impl Into<Bytes>) -> Self {
        Self::with_body(
            StatusCode::from_u16(status).expect("a valid status"),
            ReplyBody::Chunks(vec![body.into()]),
        )
    }

    /// A 200 `text/event-stream` of `(event, data)` pairs, one chunk per event.
    pub fn sse(events: &[(&str, &str)]) -> Self {
        let chunks = events
            .iter()
            .map(|(event, data)| Bytes::from(format!("event: {event}\ndata: {data}\n\n")))
            .collect();
        Self::with_body(StatusCode::OK, ReplyBody::Chunks(chunks))
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-cache")
    }

    /// A normal streamed message: start, two text deltas, stop.
    pub fn sse_message() -> Self {
        Self::sse(&[
            (
                "message_start",
                r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[]}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" world"}}"#,
            ),
            ("message_stop", r#"{"type":"message_stop"}"#),
        ])
    }

    /// A 200 stream whose first event is an overloaded error.
    pub fn sse_overloaded() -> Self {
        Self::sse(&[(
            "error",
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        )])
    }

    /// Closes the connection without answering.
    pub fn drop_connection() -> Self {
        let mut reply = Self::raw(500, Bytes::new());
        reply.drop_connection = true;
        reply
    }

    /// A 200 body sent as `chunks`, `interval` apart (before each chunk).
    pub fn slow_body(chunks: &[&str], interval: Duration) -> Self {
        let chunks = chunks
            .iter()
            .map(|c| Bytes::copy_from_slice(c.as_bytes()))
            .collect();
        Self::with_body(StatusCode::OK, ReplyBody::Chunks(chunks)).chunk_interval(interval)
    }

    fn with_body(status: StatusCode, body: ReplyBody) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body,
            delay: Duration::ZERO,
            chunk_interval: Duration::ZERO,
            drop_connection: false,
        }
    }

    /// Adds a response header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((
            HeaderName::from_bytes(name.as_bytes()).expect("a valid header name"),
            HeaderValue::from_str(value).expect("a valid header value"),
        ));
        self
    }

    /// `retry-after: value`.
    pub fn retry_after(self, value: &str) -> Self {
        self.header("retry-after", value)
    }

    /// `x-should-retry: value`.
    pub fn should_retry(self, value: bool) -> Self {
        self.header("x-should-retry", if value { "true" } else { "false" })
    }

    /// Waits `delay` (virtual time) before sending the status line.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Waits `interval` before each body chunk.
    pub fn chunk_interval(mut self, interval: Duration) -> Self {
        self.chunk_interval = interval;
        self
    }
}

/// One request the mock received.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// When it arrived (tokio time, so virtual under a paused clock).
    pub at: Instant,
    /// The method.
    pub method: Method,
    /// The path and query.
    pub uri: Uri,
    /// The request headers.
    pub headers: HeaderMap,
    /// The whole request body.
    pub body: Bytes,
    /// The top-level `model` of the body, read with serde_json.
    pub model: Option<String>,
}

#[derive(Default)]
struct Script {
    queue: VecDeque<Reply>,
    per_model: HashMap<String, VecDeque<Reply>>,
    /// Until when a model answers with a storm reply.
    storms: HashMap<String, (Instant, Reply)>,
    /// Weighted replies drawn for every request, with the generator's state.
    chaos: Option<(u64, Vec<(u32, Reply)>)>,
    default: Option<Reply>,
    capacity: Option<usize>,
    latency: Duration,
}

#[derive(Default)]
struct Counts {
    in_flight: HashMap<String, usize>,
    peak: HashMap<String, usize>,
}

#[derive(Default)]
struct State {
    script: Mutex<Script>,
    recorded: Mutex<Vec<Recorded>>,
    counts: Mutex<Counts>,
    next_id: AtomicU64,
}

/// The running mock; dropping it stops the server and its connections.
pub struct MockUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    server: JoinHandle<()>,
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

const NO_MODEL: &str = "<none>";

impl MockUpstream {
    /// Starts a mock on 127.0.0.1 with a free port.
    pub async fn start() -> Self {
        install_log_capture();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(State::default());
        let server_state = Arc::clone(&state);
        let server = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                // Without it, Nagle holds a reused connection's small writes
                // until a delayed ACK: tens of real milliseconds, in which a
                // paused clock jumps to the next timer (a stream guard's peek
                // or an idle timeout then fired with the data on its way).
                let _ = stream.set_nodelay(true);
                let state = Arc::clone(&server_state);
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        handle(Arc::clone(&state), request)
                    });
                    // Errors here are the scripted dropped connections and clients going away.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Self {
            addr,
            state,
            server,
        }
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> Uri {
        format!("http://{}{}", self.addr, path)
            .parse()
            .expect("a valid uri")
    }

    /// Queues replies for the next requests, whatever their model.
    pub fn push(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.script.lock().unwrap().queue.extend(replies);
    }

    /// Queues replies for the next requests for `model` (used before the global queue).
    pub fn push_for_model(&self, model: &str, replies: impl IntoIterator<Item = Reply>) {
        let mut script = self.state.script.lock().unwrap();
        script
            .per_model
            .entry(model.to_owned())
            .or_default()
            .extend(replies);
    }

    /// For `duration` from now, requests for `model` get `reply` (before any queue).
    pub fn storm(&self, model: &str, duration: Duration, reply: Reply) {
        let until = Instant::now() + duration;
        self.state
            .script
            .lock()
            .unwrap()
            .storms
            .insert(model.to_owned(), (until, reply));
    }

    /// Every request draws its reply from `replies` by weight (a seeded
    /// generator), before any queue: random faults for load tests.
    pub fn set_chaos(&self, seed: u64, replies: Vec<(u32, Reply)>) {
        self.state.script.lock().unwrap().chaos = Some((seed, replies));
    }

    /// The reply when nothing is queued (initially 200 [`Reply::ok`]).
    pub fn set_default(&self, reply: Reply) {
        self.state.script.lock().unwrap().default = Some(reply);
    }

    /// Answers 529 to a request when its model already has `capacity` in flight.
    pub fn set_capacity(&self, capacity: usize) {
        self.state.script.lock().unwrap().capacity = Some(capacity);
    }

    /// Service time added before every reply's own delay.
    pub fn set_latency(&self, latency: Duration) {
        self.state.script.lock().unwrap().latency = latency;
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.recorded.lock().unwrap().clone()
    }

    /// How many requests were received.
    pub fn request_count(&self) -> usize {
        self.state.recorded.lock().unwrap().len()
    }

    /// The most requests for `model` that were in flight at once.
    pub fn peak_in_flight(&self, model: &str) -> usize {
        self.state
            .counts
            .lock()
            .unwrap()
            .peak
            .get(model)
            .copied()
            .unwrap_or(0)
    }

    /// Requests for `model` in flight now.
    pub fn in_flight(&self, model: &str) -> usize {
        self.state
            .counts
            .lock()
            .unwrap()
            .in_flight
            .get(model)
            .copied()
            .unwrap_or(0)
    }
}

/// Counts one request in flight until dropped.
struct InFlight {
    state: Arc<State>,
    model: String,
}

impl InFlight {
    fn enter(state: &Arc<State>, model: &str) -> (Self, usize) {
        let mut counts = state.counts.lock().unwrap();
        let now = counts.in_flight.entry(model.to_owned()).or_default();
        let before = *now;
        *now += 1;
        let now = *now;
        let peak = counts.peak.entry(model.to_owned()).or_default();
        *peak = (*peak).max(now);
        (
            Self {
                state: Arc::clone(state),
                model: model.to_owned(),
            },
            before,
        )
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut counts = self.state.counts.lock().unwrap();
        if let Some(n) = counts.in_flight.get_mut(&self.model) {
            *n -= 1;
        }
    }
}

/// The scripted response body; holds the in-flight count until it ends or is dropped.
struct MockBody {
    chunks: VecDeque<Bytes>,
    interval: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    in_flight: Option<InFlight>,
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.chunks.is_empty() {
            self.in_flight = None;
            return Poll::Ready(None);
        }
        if !self.interval.is_zero() {
            let interval = self.interval;
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(interval)));
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.sleep = None;
        }
        let chunk = self.chunks.pop_front().expect("checked above");
        if self.chunks.is_empty() {
            self.in_flight = None;
        }
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }
}

#[derive(Debug)]
struct DroppedConnection;

impl std::fmt::Display for DroppedConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("scripted dropped connection")
    }
}

impl std::error::Error for DroppedConnection {}

async fn handle(
    state: Arc<State>,
    request: Request<Incoming>,
) -> Result<Response<MockBody>, DroppedConnection> {
    let at = Instant::now();
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let model = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("model")?.as_str().map(str::to_owned));
    let model_key = model.clone().unwrap_or_else(|| NO_MODEL.to_owned());
    state.recorded.lock().unwrap().push(Recorded {
        at,
        method: parts.method,
        uri: parts.uri,
        headers: parts.headers,
        body,
        model: model.clone(),
    });
    let (in_flight, before) = InFlight::enter(&state, &model_key);
    let (reply, latency) = {
        let mut script = state.script.lock().unwrap();
        let over_capacity = script.capacity.is_some_and(|cap| before >= cap);
        let storm = script
            .storms
            .get(&model_key)
            .filter(|(until, _)| at < *until)
            .map(|(_, reply)| reply.clone());
        let drawn = script.chaos.as_mut().map(|(state, replies)| {
            // SplitMix64: a small, seeded, well-mixed sequence.
            *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = *state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let total: u64 = replies.iter().map(|(w, _)| u64::from(*w)).sum();
            let mut pick = z % total.max(1);
            replies
                .iter()
                .find(|(w, _)| {
                    let hit = pick < u64::from(*w);
                    pick = pick.saturating_sub(u64::from(*w));
                    hit
                })
                .map(|(_, reply)| reply.clone())
                .unwrap_or_else(Reply::ok)
        });
        let reply = if over_capacity {
            Reply::overloaded()
        } else if let Some(reply) = drawn {
            reply
        } else if let Some(reply) = storm {
            reply
        } else {
            script
                .per_model
                .get_mut(&model_key)
                .and_then(VecDeque::pop_front)
                .or_else(|| script.queue.pop_front())
                .or_else(|| script.default.clone())
                .unwrap_or_else(Reply::ok)
        };
        (reply, script.latency)
    };
    let wait = latency + reply.delay;
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    if reply.drop_connection {
        return Err(DroppedConnection);
    }
    let id = state.next_id.fetch_add(1, Ordering::Relaxed) + 1;
    let chunks = match reply.body {
        ReplyBody::Message(text) => {
            let body = serde_json::json!({
                "id": format!("msg_mock_{id}"),
                "type": "message",
                "role": "assistant",
                "model": model.as_deref().unwrap_or("unknown"),
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn",
            });
            VecDeque::from([Bytes::from(body.to_string())])
        }
        ReplyBody::Chunks(chunks) => chunks.into_iter().collect(),
    };
    let mut response = Response::new(MockBody {
        chunks,
        interval: reply.chunk_interval,
        sleep: None,
        in_flight: Some(in_flight),
    });
    *response.status_mut() = reply.status;
    let headers = response.headers_mut();
    headers.insert(
        "request-id",
        HeaderValue::from_str(&format!("req_mock_{id:06}")).expect("ascii"),
    );
    for (name, value) in reply.headers {
        headers.insert(name, value);
    }
    Ok(response)
}

/// Everything a `tracing` fmt subscriber wrote, for assertions on logs.
#[derive(Clone, Default)]
pub struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLogs {
    /// The text written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

thread_local! {
    static CAPTURE: std::cell::RefCell<Option<CapturedLogs>> =
        const { std::cell::RefCell::new(None) };
}

fn capturing() -> bool {
    CAPTURE.with(|capture| capture.borrow().is_some())
}

/// Stops capturing on this thread when dropped.
pub struct CaptureGuard(Option<CapturedLogs>);

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        let previous = self.0.take();
        CAPTURE.with(|capture| *capture.borrow_mut() = previous);
    }
}

/// Installs, once per test binary, the global subscriber that
/// [`capture_logs`] routes to the capturing thread. [`MockUpstream::start`]
/// calls it, so it is in place before any test can emit an event. With
/// per-thread `set_default` subscribers, or a filter whose answer `tracing`
/// caches per callsite, a callsite first reached by a test that does not
/// capture stays disabled for the tests that do (the gateway's log test
/// failed whenever another test ran first).
pub fn install_log_capture() {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(|| {
                CAPTURE
                    .with(|capture| capture.borrow().clone())
                    .unwrap_or_default()
            })
            .with_filter(
                // Decided per event, never cached per callsite: whether a
                // thread captures changes from test to test.
                tracing_subscriber::filter::DynFilterFn::new(|_, _| capturing())
                    .with_callsite_filter(|_| tracing::subscriber::Interest::sometimes()),
            );
        // Only fails if the binary set its own global subscriber first.
        let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer));
    });
}

/// Captures every `tracing` event and span (TRACE and up, no colours) on
/// this thread until the guard is dropped.
pub fn capture_logs() -> (CapturedLogs, CaptureGuard) {
    install_log_capture();
    let captured = CapturedLogs::default();
    let previous = CAPTURE.with(|capture| capture.borrow_mut().replace(captured.clone()));
    (captured, CaptureGuard(previous))
}

/// The request body type the tests send.
pub type TestBody = Full<Bytes>;

/// A real hyper-util client over plain HTTP/1.
pub fn client() -> Client<HttpConnector, TestBody> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// A Messages API request body for `model`.
pub fn messages_body(model: &str) -> Bytes {
    let body = serde_json::json!({
        "model": model,
        "max_tokens": 256,
        "messages": [{"role": "user", "content": "Hello, \"mock\"!"}],
    });
    Bytes::from(body.to_string())
}

/// A POST to `/v1/messages` on `mock` for `model`, with the headers a real client sends.
pub fn messages_request(mock: &MockUpstream, model: &str) -> Request<TestBody> {
    Request::post(mock.url("/v1/messages"))
        .header("content-type", "application/json")
        .header("anthropic-version", "2023-06-01")
        .header("x-api-key", "sk-ant-test-secret")
        .body(Full::new(messages_body(model)))
        .expect("a valid request")
}
