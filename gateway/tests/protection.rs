//! What the gateway does with clients that are slow, large, odd or leaving,
//! and what it shows operators. Real sockets on 127.0.0.1, paused clock.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use support::{MockUpstream, Reply, client, messages_body};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower_overload_gateway as gateway;

fn config_for(mock: &MockUpstream) -> gateway::Config {
    gateway::Config {
        upstream: format!("http://{}", mock.addr()).parse().unwrap(),
        ..gateway::Config::default()
    }
}

async fn start(config: gateway::Config) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(gateway::serve(config, listener));
    address
}

fn call(gateway: SocketAddr, model: &str) -> Request<Full<Bytes>> {
    Request::post(format!("http://{gateway}/v1/messages"))
        .header("content-type", "application/json")
        .header("x-api-key", "sk-ant-protection")
        .body(Full::new(messages_body(model)))
        .unwrap()
}

/// Sends `raw` on a fresh connection and reads until the gateway closes it
/// (or `within` passes): the raw answer.
async fn raw_exchange(gateway: SocketAddr, raw: &[u8], within: Duration) -> String {
    let mut stream = TcpStream::connect(gateway).await.unwrap();
    stream.write_all(raw).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(within, stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// The status and the JSON body of a raw HTTP/1.1 answer.
fn parse_answer(answer: &str) -> (u16, serde_json::Value) {
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((answer, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"));
    let json = serde_json::from_str(body).unwrap_or_else(|_| panic!("no JSON body in {answer:?}"));
    (status, json)
}

// ---------------------------------------------------------------- slow clients

/// A slowloris client that never finishes its headers loses its connection
/// at the header read timeout (30 s by default), not never.
#[tokio::test(start_paused = true)]
async fn headers_that_never_end_are_cut_off_at_the_header_read_timeout() {
    let mock = MockUpstream::start().await;
    let gateway = start(config_for(&mock)).await;
    let mut stream = TcpStream::connect(gateway).await.unwrap();
    stream
        .write_all(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-slow: 1")
        .await
        .unwrap();
    let start = tokio::time::Instant::now();
    let mut buf = [0u8; 256];
    let still_open = tokio::time::timeout(Duration::from_secs(29), stream.read(&mut buf)).await;
    assert!(still_open.is_err(), "closed early: {still_open:?}");
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the connection is still open after {:?}",
        start.elapsed()
    );
    assert_eq!(mock.request_count(), 0);
}

/// A body that stops arriving: 408 in the API's shape at the body read
/// timeout (60 s by default); nothing is sent upstream.
#[tokio::test(start_paused = true)]
async fn a_body_that_stops_arriving_is_a_408_at_the_body_read_timeout() {
    let mock = MockUpstream::start().await;
    let gateway = start(config_for(&mock)).await;
    let start = tokio::time::Instant::now();
    let answer = raw_exchange(
        gateway,
        b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"model\":",
        Duration::from_secs(120),
    )
    .await;
    let (status, json) = parse_answer(&answer);
    assert_eq!(status, 408, "{answer}");
    assert_eq!(json["type"], "error");
    assert_eq!(json["error"]["type"], "timeout_error");
    assert!(start.elapsed() >= Duration::from_secs(60));
    assert!(start.elapsed() < Duration::from_secs(61));
    assert_eq!(mock.request_count(), 0);
}

// ---------------------------------------------------------------- large and odd requests

/// Headers over the gateway's limit (64 KiB): 431 in the API's shape.
#[tokio::test(start_paused = true)]
async fn large_headers_are_a_431_in_the_api_error_shape() {
    let mock = MockUpstream::start().await;
    let gateway = start(config_for(&mock)).await;
    let request = Request::post(format!("http://{gateway}/v1/messages"))
        .header("x-big", "a".repeat(70 * 1024))
        .body(Full::new(messages_body("m")))
        .unwrap();
    let response = client().request(request).await.unwrap();
    assert_eq!(response.status(), 431);
    assert_eq!(response.headers()["x-should-retry"], "false");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"]["type"], "invalid_request_error");
    assert_eq!(mock.request_count(), 0);
}

/// Past hyper's own buffer, and on a request hyper cannot parse, hyper
/// refuses before the gateway sees anything; the refusal still carries the
/// API's error body (it was empty).
#[tokio::test(start_paused = true)]
async fn hypers_own_refusals_carry_the_api_error_shape() {
    let mock = MockUpstream::start().await;
    let gateway = start(config_for(&mock)).await;

    let mut huge = b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-huge: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 600 * 1024));
    huge.extend_from_slice(b"\r\n\r\n");
    let answer = raw_exchange(gateway, &huge, Duration::from_secs(5)).await;
    let (status, json) = parse_answer(&answer);
    assert_eq!(status, 431, "{answer}");
    assert_eq!(json["error"]["type"], "invalid_request_error", "{answer}");

    let mut many = b"POST /v1/messages HTTP/1.1\r\nhost: x\r\n".to_vec();
    for i in 0..150 {
        many.extend_from_slice(format!("x-h{i}: 1\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let answer = raw_exchange(gateway, &many, Duration::from_secs(5)).await;
    let (status, json) = parse_answer(&answer);
    assert_eq!(status, 431, "{answer}");
    assert_eq!(json["error"]["type"], "invalid_request_error", "{answer}");

    let answer = raw_exchange(
        gateway,
        b"POST /v1/messages HTTP/1.1\r\nbad header\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let (status, json) = parse_answer(&answer);
    assert_eq!(status, 400, "{answer}");
    assert_eq!(json["type"], "error", "{answer}");
    assert!(answer.contains("x-should-retry: false"), "{answer}");
    assert_eq!(mock.request_count(), 0);
}

/// `/v1/../x` and its encoded forms are not forwarded; `/v1/./messages`
/// goes out normalised.
#[tokio::test(start_paused = true)]
async fn paths_cannot_escape_v1() {
    let mock = MockUpstream::start().await;
    let gateway = start(config_for(&mock)).await;
    for path in [
        "/v1/../admin",
        "/v1/%2e%2e/admin",
        "/v1/..%2fadmin",
        "/v1/messages/../../x",
    ] {
        let raw = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        let answer = raw_exchange(gateway, raw.as_bytes(), Duration::from_secs(5)).await;
        let (status, json) = parse_answer(&answer);
        assert!(status == 404 || status == 400, "{path}: {answer}");
        assert_eq!(json["type"], "error", "{path}: {answer}");
    }
    assert_eq!(mock.request_count(), 0, "nothing forwarded");

    let body = messages_body("claude-opus-4-6");
    let raw = format!(
        "POST /v1/./x/../messages?beta=true HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let mut raw = raw.into_bytes();
    raw.extend_from_slice(&body);
    let answer = raw_exchange(gateway, &raw, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let forwarded = &mock.requests()[0];
    assert_eq!(forwarded.uri.path(), "/v1/messages");
    assert_eq!(forwarded.uri.query(), Some("beta=true"));
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

const SPEND_LIMIT: &str = r#"{"type":"error","error":{"type":"rate_limit_error","message":"You have reached your specified workspace API usage limits (spend limit)."}}"#;

/// The upstream is asked only for codings the gateway decodes and the
/// client reads; a gzipped error is classified by its decoded text (a spend
/// limit is not retried), and the client gets gzip only if it asked for it.
#[tokio::test(start_paused = true)]
async fn compressed_errors_are_classified_and_reach_each_client_as_it_asked() {
    let gzipped = || {
        Reply::raw(429, gzip(SPEND_LIMIT.as_bytes()))
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
    };
    for (accept, upstream_sees, client_gets_gzip) in [
        (None, None, false),
        (Some("gzip, deflate, br"), Some("gzip, deflate"), true),
        (Some("br, zstd"), None, false),
    ] {
        let mock = MockUpstream::start().await;
        mock.set_default(gzipped());
        let gateway = start(config_for(&mock)).await;
        let mut request = call(gateway, "claude-opus-4-6");
        if let Some(accept) = accept {
            request
                .headers_mut()
                .insert("accept-encoding", accept.parse().unwrap());
        }
        let response = client().request(request).await.unwrap();
        assert_eq!(response.status(), 429);
        assert_eq!(
            mock.request_count(),
            1,
            "{accept:?}: a spend limit is sent once"
        );
        let sent = mock.requests()[0].headers.get("accept-encoding").cloned();
        assert_eq!(
            sent.as_ref().map(|v| v.to_str().unwrap()),
            upstream_sees,
            "{accept:?}"
        );
        let encoding = response.headers().get("content-encoding").cloned();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        if client_gets_gzip {
            assert_eq!(encoding.unwrap(), "gzip");
            assert_eq!(
                body,
                gzip(SPEND_LIMIT.as_bytes()),
                "{accept:?}: byte for byte"
            );
        } else {
            assert!(encoding.is_none(), "{accept:?}");
            assert_eq!(
                body,
                SPEND_LIMIT.as_bytes(),
                "{accept:?}: decoded for the client"
            );
        }
    }
}

/// A model name from the body cannot forge a log line or a metric label.
#[tokio::test(start_paused = true)]
async fn model_names_are_checked_before_logs_and_metrics() {
    let (captured, _guard) = support::capture_logs();
    let mock = MockUpstream::start().await;
    mock.set_default(Reply::error(400, "invalid_request_error", "no such model"));
    let gateway = start(config_for(&mock)).await;
    let forged = "claude\nERROR forged=1 \"x\"";
    let response = client().request(call(gateway, forged)).await.unwrap();
    assert_eq!(response.status(), 400);
    let logs = captured.text();
    assert!(logs.contains("call failed"), "{logs}");
    assert!(!logs.contains("\nERROR forged"), "a forged line: {logs}");
    let metrics = client()
        .request(
            Request::get(format!("http://{gateway}/metrics"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let text = String::from_utf8(
        metrics
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(text.contains("model=\"invalid\""), "{text}");
    assert!(!text.contains("forged"), "{text}");
}

// ---------------------------------------------------------------- protocols

/// h2c (HTTP/2 with prior knowledge) on the same port as HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cleartext_is_served_on_the_same_port() {
    let mock = MockUpstream::start().await;
    let gateway = start(config_for(&mock)).await;
    let h2: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new());
    let response = h2.request(call(gateway, "claude-opus-4-6")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["model"], "claude-opus-4-6");
    assert_eq!(mock.requests()[0].body, messages_body("claude-opus-4-6"));
}

// ---------------------------------------------------------------- defaults

/// Defaults must not throttle a healthy upstream: 256 concurrent calls on
/// one model, 500 ms each, all end within about 500 ms (with the old
/// default of 16 per model they queued for 8 s). Real time: with a paused
/// clock, time jumps 500 ms while the loopback connects are still in
/// flight, and the test would measure itself (half the calls, direct to
/// the mock, then end at 1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_defaults_do_not_throttle_a_healthy_upstream() {
    let mock = MockUpstream::start().await;
    mock.set_latency(Duration::from_millis(500));
    let gateway = start(config_for(&mock)).await;
    let client = client();
    let start = std::time::Instant::now();
    let calls = (0..256).map(|_| {
        let client = client.clone();
        async move {
            let response = client
                .request(call(gateway, "claude-opus-4-6"))
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            response.into_body().collect().await.unwrap();
            start.elapsed()
        }
    });
    let took = futures::future::join_all(calls).await;
    let slowest = took.into_iter().max().unwrap();
    assert!(
        slowest < Duration::from_millis(2500),
        "the slowest of 256 calls took {slowest:?}"
    );
    // Well above the old default of 16 (how many are in flight at once
    // also depends on how fast a loaded machine sets up 256 connections).
    let peak = mock.peak_in_flight("claude-opus-4-6");
    assert!(peak > 32, "peak in flight {peak}");
}

// ---------------------------------------------------------------- operations

async fn get(gateway: SocketAddr, path: &str) -> (u16, String) {
    let response = client()
        .request(
            Request::get(format!("http://{gateway}{path}"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// `/healthz` is alive; `/readyz` turns 503 while the upstream is
/// unreachable; `/metrics` has the gateway's counters and histogram.
#[tokio::test(start_paused = true)]
async fn health_readiness_and_metrics() {
    let mock = MockUpstream::start().await;
    let gateway = start(config_for(&mock)).await;
    assert_eq!(get(gateway, "/healthz").await.0, 200);
    let (status, body) = get(gateway, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    let response = client()
        .request(call(gateway, "claude-opus-4-6"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (status, body) = get(gateway, "/readyz").await;
    assert_eq!(
        (status, body.contains("\"upstream\":\"ok\"")),
        (200, true),
        "{body}"
    );
    let (status, text) = get(gateway, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        text.contains("gateway_requests_total{model=\"claude-opus-4-6\",status=\"200\"}"),
        "{text}"
    );
    assert!(
        text.contains("gateway_request_duration_seconds_bucket"),
        "{text}"
    );

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = closed.local_addr().unwrap();
    drop(closed);
    let gateway = start(gateway::Config {
        upstream: format!("http://{nowhere}").parse().unwrap(),
        ..gateway::Config::default()
    })
    .await;
    let response = client().request(call(gateway, "m")).await.unwrap();
    assert_eq!(response.status(), 502);
    let (status, body) = get(gateway, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("unreachable"), "{body}");
    assert_eq!(get(gateway, "/healthz").await.0, 200, "alive all the same");
}

/// `/readyz` names a primary that rests after a storm (its calls go to the
/// fallback: still ready).
#[tokio::test(start_paused = true)]
async fn readiness_names_a_resting_primary() {
    let mock = MockUpstream::start().await;
    mock.storm(
        "claude-opus-4-6",
        Duration::from_secs(60),
        Reply::overloaded(),
    );
    let gateway = start(gateway::Config {
        fallback: vec![vec!["claude-opus-4-6".into(), "claude-sonnet-4-6".into()]],
        ..config_for(&mock)
    })
    .await;
    let (_, body) = get(gateway, "/readyz").await;
    assert!(body.contains("\"cooling_down\":[]"), "{body}");
    for _ in 0..8 {
        let response = client()
            .request(call(gateway, "claude-opus-4-6"))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-served-by-model"], "claude-sonnet-4-6");
    }
    let (status, body) = get(gateway, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"cooling_down\":[\"claude-opus-4-6\"]"),
        "{body}"
    );
}

/// On the signal: no new connections, /readyz would say so, and a stream in
/// flight finishes whole within the grace period; past the grace period
/// what is left is dropped and `serve_with_shutdown` returns.
#[tokio::test(start_paused = true)]
async fn shutdown_lets_streams_finish_within_the_grace_period() {
    for (grace, stream_whole) in [
        (Duration::from_secs(30), true),
        (Duration::from_secs(5), false),
    ] {
        let mock = MockUpstream::start().await;
        mock.push([Reply::sse_message().chunk_interval(Duration::from_secs(3))]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gateway = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let config = gateway::Config {
            shutdown_grace: grace,
            ..config_for(&mock)
        };
        let server = tokio::spawn(gateway::serve_with_shutdown(config, listener, async {
            let _ = stopped.await;
        }));
        let start = tokio::time::Instant::now();
        let response = client().request(call(gateway, "m")).await.unwrap();
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.is_data());
        stop.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            TcpStream::connect(gateway).await.is_err(),
            "a new connection was accepted after the signal"
        );
        let rest = body.collect().await.map(|c| c.to_bytes());
        let ended = start.elapsed();
        server.await.unwrap();
        let returned = start.elapsed();
        if stream_whole {
            let rest = rest.unwrap();
            assert!(String::from_utf8_lossy(&rest).contains("message_stop"));
            assert_eq!(ended, Duration::from_secs(12));
            assert!(returned < Duration::from_secs(13), "{returned:?}");
        } else {
            assert!(rest.is_err(), "the stream was cut at the grace period");
            assert!(
                returned >= Duration::from_secs(11) && returned < Duration::from_secs(12),
                "returned at {returned:?}"
            );
        }
    }
}

/// Calls one after another reuse one upstream connection (a TLS handshake
/// per call would cost the API's users tens of milliseconds).
#[tokio::test(start_paused = true)]
async fn upstream_connections_are_reused() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let accepted = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let counter = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_request| async {
                    let body = Full::new(Bytes::from_static(br#"{"type":"message"}"#));
                    Ok::<_, std::convert::Infallible>(http::Response::new(body))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let gateway = start(gateway::Config {
        upstream: format!("http://{upstream}").parse().unwrap(),
        ..gateway::Config::default()
    })
    .await;
    for _ in 0..5 {
        // A new client each time: five connections to the gateway, one upstream.
        let response = client()
            .request(call(gateway, "claude-opus-4-6"))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}
