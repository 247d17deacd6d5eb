//! The gateway example between a plain hyper client and the loopback mock.

#[path = "../../tests/support/mod.rs"]
mod support;

use tower_overload_gateway as gateway;

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
    // The stream guard (on by default) holds message_start until the first
    // event with content, 3 s later, then hands both on at once.
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(6),
        "the first events arrive with the first content, not at the end"
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
        // message_start waits for the first content event (the stream
        // guard), then one event every 3 s.
        assert_eq!(
            arrivals,
            [6, 6, 9, 12],
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
        fallback: vec![vec!["claude-opus-4-6".into(), "claude-haiku-4-5".into()]],
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
    assert_eq!(
        response.headers()["x-should-retry"],
        "false",
        "the SDK must not retry a refusal of the queue at once"
    );
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
    use clap::Parser;
    let parse = |args: &str| {
        gateway::Args::try_parse_from(std::iter::once("gw").chain(args.split(' ')))
            .map_err(|e| e.to_string())
            .and_then(|args| args.resolve().map_err(|e| e.to_string()))
    };
    let config = parse("--listen 127.0.0.1:9000 --upstream http://127.0.0.1:1 --max-per-model 8 --limit claude-opus-4-6=2 --fallback a,b --fallback c,d --retry background --deadline 30 --stream-guard false --pace claude-opus-4-6=50/-/8000").unwrap();
    assert_eq!(config.listen.port(), 9000);
    assert_eq!(config.max_per_model, 8);
    assert_eq!(config.limits, [("claude-opus-4-6".to_owned(), 2)]);
    assert_eq!(config.fallback, [["a", "b"], ["c", "d"]]);
    assert_eq!(config.retry, gateway::RetryPreset::Background);
    assert_eq!(config.deadline, Some(Duration::from_secs(30)));
    assert!(!config.stream_guard);
    assert_eq!(config.pacing[0].1.requests_per_minute, Some(50));
    assert_eq!(config.pacing[0].1.input_tokens_per_minute, None);
    assert_eq!(config.pacing[0].1.output_tokens_per_minute, Some(8000));
    for (bad, says) in [
        (
            "--retry sometimes",
            "possible values: foreground, background",
        ),
        ("--limit opus", "MODEL=N"),
        ("--limit opus=0", "at least 1"),
        ("--max-per-model", "a value is required"),
        ("--colour", "unexpected argument"),
        ("--upstream ftp://x", "http:// or https://"),
        ("--upstream https://api.anthropic.com/v1", "origin only"),
        ("--fallback claude-opus-4-6", "at least two models"),
        ("--deadline 0", "seconds"),
        ("--listen localhost", "127.0.0.1:8787"),
        ("--pace m=1/2/3/4", "MODEL=RPM/ITPM/OTPM"),
        ("--max-header-bytes 10", "1024..=1048576"),
    ] {
        let error = parse(bad).unwrap_err();
        assert!(error.contains(says), "{bad}: {error}");
    }
}

/// The file gives what the flags do not; a flag wins over the file; an
/// unknown key is named.
#[test]
fn a_toml_file_fills_in_and_flags_win() {
    use clap::Parser;
    let dir = std::env::temp_dir().join(format!("gw-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        r#"
upstream = "http://127.0.0.1:7"
max_per_model = 64
fallback = [["claude-opus-4-6", "claude-sonnet-4-6"]]
stream_guard = false
log_format = "json"
[limits]
"claude-opus-4-6" = 4
[pacing.claude-opus-4-6]
requests_per_minute = 50
"#,
    )
    .unwrap();
    let file = path.to_str().unwrap();
    let config = gateway::Args::try_parse_from(["gw", "--config", file, "--max-per-model", "32"])
        .unwrap()
        .resolve()
        .unwrap();
    assert_eq!(config.upstream.to_string(), "http://127.0.0.1:7/");
    assert_eq!(config.max_per_model, 32, "the flag wins");
    assert_eq!(config.limits, [("claude-opus-4-6".to_owned(), 4)]);
    assert_eq!(config.fallback, [["claude-opus-4-6", "claude-sonnet-4-6"]]);
    assert!(!config.stream_guard);
    assert_eq!(config.log_format, gateway::LogFormat::Json);
    assert_eq!(config.pacing[0].1.requests_per_minute, Some(50));

    std::fs::write(
        &path,
        "upstream = \"http://127.0.0.1:7\"\nmax_per_modle = 3\n",
    )
    .unwrap();
    let error = gateway::Args::try_parse_from(["gw", "--config", file])
        .unwrap()
        .resolve()
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("max_per_modle") && error.contains(file),
        "{error}"
    );
    let error = gateway::Args::try_parse_from(["gw", "--config", "/nonexistent/gw.toml"])
        .unwrap()
        .resolve()
        .unwrap_err()
        .to_string();
    assert!(error.contains("cannot read"), "{error}");
    std::fs::remove_dir_all(dir).unwrap();
}
