//! The gateway example between a plain hyper client and the loopback mock.

mod support;

#[path = "../examples/gateway.rs"]
mod gateway;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::{MockUpstream, Reply, client, messages_body};

async fn start(config: gateway::Config) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(gateway::serve(config, listener));
    address
}

fn config_for(mock: &MockUpstream) -> gateway::Config {
    gateway::Config {
        upstream: format!("http://{}", mock.addr()).parse().unwrap(),
        ..gateway::Config::default()
    }
}

fn call(gateway: SocketAddr, model: &str) -> Request<Full<Bytes>> {
    Request::post(format!("http://{gateway}/v1/messages?beta=true"))
        .header("content-type", "application/json")
        .header("anthropic-version", "2023-06-01")
        .header("anthropic-beta", "prompt-caching-2024-07-31")
        .header("x-api-key", "sk-ant-gateway-secret")
        .header("connection", "keep-alive")
        .body(Full::new(messages_body(model)))
        .unwrap()
}

async fn json(response: http::Response<hyper::body::Incoming>) -> serde_json::Value {
    serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_storm_is_absorbed_with_headers_and_body_forwarded_and_no_key_logged() {
    let (captured, _guard) = support::capture_logs();

    let mock = MockUpstream::start().await;
    mock.push([
        Reply::overloaded(),
        Reply::overloaded(),
        Reply::overloaded(),
        Reply::ok(),
    ]);
    let gateway = start(config_for(&mock)).await;
    let response = client()
        .request(call(gateway, "claude-opus-4-6"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["request-id"],
        "req_mock_000004",
        "the answering attempt's id"
    );
    assert!(
        response.headers().get("x-served-by-model").is_none(),
        "no fallback happened"
    );
    assert_eq!(json(response).await["model"], "claude-opus-4-6");

    let requests = mock.requests();
    assert_eq!(requests.len(), 4);
    for forwarded in &requests {
        assert_eq!(forwarded.uri.path(), "/v1/messages");
        assert_eq!(forwarded.uri.query(), Some("beta=true"));
        assert_eq!(forwarded.headers["x-api-key"], "sk-ant-gateway-secret");
        assert_eq!(forwarded.headers["anthropic-version"], "2023-06-01");
        assert_eq!(
            forwarded.headers["anthropic-beta"],
            "prompt-caching-2024-07-31"
        );
        assert_eq!(
            forwarded.body,
            messages_body("claude-opus-4-6"),
            "byte for byte"
        );
        // Issue 16: the log layer only observes; the correlation id is opt-in.
        assert!(forwarded.headers.get("x-client-request-id").is_none());
    }
    let logs = captured.text();
    assert!(
        logs.contains("req_mock_000001"),
        "attempts are logged with their ids"
    );
    assert!(
        !logs.contains("sk-ant-gateway-secret"),
        "the api key reached the logs"
    );
}

#[tokio::test(start_paused = true)]
async fn streams_pass_through_chunk_by_chunk() {
    let mock = MockUpstream::start().await;
    mock.push([Reply::sse_message().chunk_interval(Duration::from_secs(3))]);
    let gateway = start(config_for(&mock)).await;
    let start = tokio::time::Instant::now();
    let response = client()
        .request(call(gateway, "claude-sonnet-4-6"))
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"event: message_start"));
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(3),
        "the first event arrives on its own"
    );
    let rest = body.collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&rest)
            .ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n")
    );
    assert_eq!(start.elapsed(), Duration::from_secs(12));
}

/// The second stream on a kept-alive connection (client to gateway and
/// gateway to upstream) is as live as the first: with Nagle's algorithm on,
/// its small event writes waited for the peer's delayed ACK.
#[tokio::test(start_paused = true)]
async fn a_second_stream_on_a_reused_connection_is_not_held_back() {
    let mock = MockUpstream::start().await;
    mock.push([
        Reply::sse_message().chunk_interval(Duration::from_secs(3)),
        Reply::sse_message().chunk_interval(Duration::from_secs(3)),
    ]);
    let gateway = start(config_for(&mock)).await;
    let client = client();
    for round in 0..2 {
        let start = tokio::time::Instant::now();
        let response = client
            .request(call(gateway, "claude-sonnet-4-6"))
            .await
            .unwrap();
        let mut body = response.into_body();
        let mut arrivals = Vec::new();
        while let Some(frame) = body.frame().await {
            if frame.unwrap().is_data() {
                arrivals.push(start.elapsed().as_secs());
            }
        }
        assert_eq!(
            arrivals,
            [3, 6, 9, 12],
            "round {round}: one event every 3 s"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_fallback_names_the_model_that_served() {
    let mock = MockUpstream::start().await;
    mock.push_for_model(
        "claude-opus-4-6",
        std::iter::repeat_n(Reply::overloaded(), 5),
    );
    let config = gateway::Config {
        fallback: vec!["claude-opus-4-6".into(), "claude-haiku-4-5".into()],
        ..config_for(&mock)
    };
    let gateway = start(config).await;
    let response = client()
        .request(call(gateway, "claude-opus-4-6"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-served-by-model"], "claude-haiku-4-5");
    assert_eq!(json(response).await["model"], "claude-haiku-4-5");
}

#[tokio::test(start_paused = true)]
async fn its_own_failures_answer_in_the_api_error_shape() {
    // A full queue: 529 overloaded_error with retry-after, nothing sent.
    let mock = MockUpstream::start().await;
    mock.push([Reply::slow_body(&["a"], Duration::from_secs(30))]);
    let config = gateway::Config {
        max_per_model: 1,
        max_queued: 0,
        ..config_for(&mock)
    };
    let gateway = start(config).await;
    let _holder = client().request(call(gateway, "m")).await.unwrap();
    let response = client().request(call(gateway, "m")).await.unwrap();
    assert_eq!(response.status().as_u16(), 529);
    assert_eq!(response.headers()["retry-after"], "5");
    assert_eq!(json(response).await["error"]["type"], "overloaded_error");
    assert_eq!(mock.request_count(), 1);

    // An unreachable upstream: 502 with a clear message.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = closed.local_addr().unwrap();
    drop(closed);
    let config = gateway::Config {
        upstream: format!("http://{nowhere}").parse().unwrap(),
        ..gateway::Config::default()
    };
    let gateway = start(config).await;
    let response = client().request(call(gateway, "m")).await.unwrap();
    assert_eq!(response.status(), 502);
    let error = json(response).await;
    assert_eq!(error["error"]["type"], "api_error");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("upstream unreachable"),
        "{error}"
    );

    // A spent deadline: 504 timeout_error naming the attempts. Each answer
    // takes 2 s, so the second attempt is in flight when the 3 s deadline
    // passes, whatever the jitter (with instant answers, five quick
    // attempts could all fit in 3 s and end as a plain 529).
    let mock = MockUpstream::start().await;
    mock.set_default(Reply::overloaded());
    mock.set_latency(Duration::from_secs(2));
    let config = gateway::Config {
        deadline: Some(Duration::from_secs(3)),
        ..config_for(&mock)
    };
    let gateway = start(config).await;
    let response = client().request(call(gateway, "m")).await.unwrap();
    assert_eq!(response.status(), 504);
    let error = json(response).await;
    assert_eq!(error["error"]["type"], "timeout_error");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("req_mock_"),
        "{error}"
    );

    // Not an API path.
    let request = Request::get(format!("http://{gateway}/admin"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(client().request(request).await.unwrap().status(), 404);
}

#[test]
fn flags_parse_and_bad_ones_say_why() {
    let args = "--listen 127.0.0.1:9000 --upstream http://127.0.0.1:1 --max-per-model 8 --limit claude-opus-4-6=2 --fallback a,b --retry background --deadline 30";
    let config = gateway::Config::from_args(args.split(' ').map(str::to_owned)).unwrap();
    assert_eq!(config.listen.port(), 9000);
    assert_eq!(config.limits, [("claude-opus-4-6".to_owned(), 2)]);
    assert_eq!(config.fallback, ["a", "b"]);
    assert!(config.background);
    assert_eq!(config.deadline, Some(Duration::from_secs(30)));
    for (bad, says) in [
        ("--retry sometimes", "foreground or background"),
        ("--limit opus", "MODEL=N"),
        ("--max-per-model", "needs a value"),
        ("--colour", "unknown flag"),
    ] {
        let error = gateway::Config::from_args(bad.split(' ').map(str::to_owned)).unwrap_err();
        assert!(error.contains(says), "{bad}: {error}");
    }
}
