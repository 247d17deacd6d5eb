//! The official Python SDK through the gateway, when `.ci/run` has
//! installed it: `SDK_PYTHON` names a Python with the `anthropic` package
//! (else `target/sdk-venv` of the workspace).
//! Without it, the test fails when `CI` is set, and elsewhere says it was
//! skipped.

#[path = "../../tests/support/mod.rs"]
mod support;

use tower_overload_gateway as gateway;

use std::time::Duration;

use support::{MockUpstream, Reply};

/// A complete Messages stream, as the SDK's accumulator expects it.
fn full_stream() -> Reply {
    Reply::sse(&[
        ("message_start", r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-6","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":5,"output_tokens":1}}}"#),
        ("content_block_start", r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#),
        ("ping", r#"{"type":"ping"}"#),
        ("content_block_delta", r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#),
        ("content_block_delta", r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" world"}}"#),
        ("content_block_stop", r#"{"type":"content_block_stop","index":0}"#),
        ("message_delta", r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":2}}"#),
        ("message_stop", r#"{"type":"message_stop"}"#),
    ])
    .chunk_interval(Duration::from_millis(20))
}

#[tokio::test]
async fn the_official_python_sdk_through_the_gateway() {
    let venv =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/sdk-venv/bin/python");
    let python = std::env::var_os("SDK_PYTHON").or_else(|| venv.exists().then(|| venv.into()));
    let Some(python) = python else {
        // In CI a missing SDK is a failure, never a silent pass.
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but SDK_PYTHON is not: .ci/run could not install the anthropic Python SDK"
        );
        eprintln!(
            "SKIPPED: SDK_PYTHON is not set, the Python SDK check did not run (.ci/run sets it)"
        );
        return;
    };
    let mock = MockUpstream::start().await;
    mock.push_for_model(
        "claude-opus-4-6",
        [Reply::overloaded(), Reply::overloaded(), Reply::ok()],
    );
    mock.push_for_model("claude-sonnet-4-6", [full_stream()]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let config = gateway::Config {
        upstream: format!("http://{}", mock.addr()).parse().unwrap(),
        ..gateway::Config::default()
    };
    tokio::spawn(gateway::serve(config, listener));

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/sdk_through_gateway.py"
    );
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(python)
            .arg(script)
            .arg(format!("http://{address}"))
            .output(),
    )
    .await
    .expect("the SDK script finished within two minutes")
    .expect("python ran");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the SDK script failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("sdk ok"), "{stdout}");
    assert_eq!(
        mock.request_count(),
        4,
        "a storm of two 529s absorbed, then a stream"
    );
    let sdk = &mock.requests()[0];
    let key_forwarded = sdk
        .headers
        .get("x-api-key")
        .is_some_and(|v| v == "sk-ant-sdk-secret")
        || sdk
            .headers
            .get("authorization")
            .is_some_and(|v| v == "Bearer sk-ant-sdk-secret");
    assert!(
        key_forwarded,
        "the SDK's key reaches the upstream: {:?}",
        sdk.headers.keys().collect::<Vec<_>>()
    );
    assert!(
        sdk.headers
            .get("user-agent")
            .is_some_and(|ua| ua.to_str().unwrap_or("").contains("Anthropic"))
    );
}
