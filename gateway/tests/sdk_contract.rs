//! The retry contract with the official SDKs, each at its default retries,
//! through the gateway against the loopback mock: the Python SDK
//! (`anthropic`) and the TypeScript SDK (`@anthropic-ai/sdk`, run by node).
//!
//! `.ci/run` installs both under `target/` and sets `SDK_PYTHON` and
//! `SDK_NODE_MODULES`; without them the tests look in `target/sdk-venv` and
//! `target/sdk-node`, then fail when `CI` is set and elsewhere say they were
//! skipped. Real time: the SDKs are other processes.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use support::{MockUpstream, Reply};
use tower_overload::classify::Class;
use tower_overload::retry::RetryPolicy;
use tower_overload_gateway as gateway;

const OPUS: &str = "claude-opus-4-6";
const SONNET: &str = "claude-sonnet-4-6";

/// One official SDK and how to run a scenario script with it.
struct Sdk {
    program: OsString,
    script: PathBuf,
    env: Vec<(&'static str, OsString)>,
}

fn workspace_target() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target")
}

fn missing(what: &str) -> Option<Sdk> {
    assert!(
        std::env::var_os("CI").is_none(),
        "CI is set but {what}: .ci/run could not install it"
    );
    eprintln!("SKIPPED: {what}; the SDK contract check did not run (.ci/run installs it)");
    None
}

impl Sdk {
    fn python() -> Option<Self> {
        let python = std::env::var_os("SDK_PYTHON").or_else(|| {
            let venv = workspace_target().join("sdk-venv/bin/python");
            venv.exists().then(|| venv.into())
        });
        let Some(program) = python else {
            return missing("the anthropic Python SDK is not installed (SDK_PYTHON)");
        };
        Some(Self {
            program,
            script: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/contract.py"),
            env: Vec::new(),
        })
    }

    fn typescript() -> Option<Self> {
        let modules = std::env::var_os("SDK_NODE_MODULES").or_else(|| {
            let modules = workspace_target().join("sdk-node/node_modules");
            modules
                .join("@anthropic-ai/sdk")
                .exists()
                .then(|| modules.into())
        });
        let Some(modules) = modules else {
            return missing(
                "the @anthropic-ai/sdk npm package is not installed (SDK_NODE_MODULES)",
            );
        };
        let node_runs = std::process::Command::new("node")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !node_runs {
            return missing("node is not on PATH");
        }
        Some(Self {
            program: "node".into(),
            script: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/contract.cjs"),
            env: vec![("NODE_PATH", modules)],
        })
    }

    /// Runs `scenario` against `gateway`; its one JSON line.
    async fn run(&self, gateway: SocketAddr, scenario: &str) -> Value {
        let mut command = tokio::process::Command::new(&self.program);
        command
            .arg(&self.script)
            .arg(format!("http://{gateway}"))
            .arg(scenario)
            .kill_on_drop(true);
        for (name, value) in &self.env {
            command.env(name, value);
        }
        let output = tokio::time::timeout(Duration::from_secs(120), command.output())
            .await
            .expect("the SDK script ended within two minutes")
            .expect("the SDK's interpreter ran");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "the SDK script failed:\n{stdout}\n{stderr}"
        );
        let line = stdout
            .lines()
            .rfind(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("no JSON line:\n{stdout}\n{stderr}"));
        let result: Value = serde_json::from_str(line).unwrap();
        eprintln!("{scenario}: {result}");
        result
    }
}

async fn start_gateway(mock: &MockUpstream, edit: impl FnOnce(&mut gateway::Config)) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let mut config = gateway::Config {
        upstream: format!("http://{}", mock.addr()).parse().unwrap(),
        ..gateway::Config::default()
    };
    edit(&mut config);
    tokio::spawn(gateway::serve(config, listener));
    address
}

fn text_event(text: &str) -> String {
    format!(
        r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":"{text}"}}}}"#
    )
}

const MESSAGE_START: &str = r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-6","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":5,"output_tokens":1}}}"#;
const BLOCK_START: &str =
    r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#;
const OVERLOADED_EVENT: &str =
    r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;

/// A complete Messages stream saying "Hello world".
fn full_stream() -> Reply {
    let hello = text_event("Hello");
    let world = text_event(" world");
    Reply::sse(&[
        ("message_start", MESSAGE_START),
        ("content_block_start", BLOCK_START),
        ("ping", r#"{"type":"ping"}"#),
        ("content_block_delta", &hello),
        ("content_block_delta", &world),
        (
            "content_block_stop",
            r#"{"type":"content_block_stop","index":0}"#,
        ),
        (
            "message_delta",
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":2}}"#,
        ),
        ("message_stop", r#"{"type":"message_stop"}"#),
    ])
}

// ---------------------------------------------------------------- scenarios

/// Two 529s then a success: the gateway absorbs them, the SDK sees one 200.
async fn a_529_storm_is_absorbed(sdk: Sdk) {
    let mock = MockUpstream::start().await;
    mock.push_for_model(
        OPUS,
        [Reply::overloaded(), Reply::overloaded(), Reply::ok()],
    );
    let gateway = start_gateway(&mock, |_| {}).await;
    let result = sdk.run(gateway, "storm").await;
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["text"], "Hello from the mock.", "{result}");
    assert_eq!(mock.request_count(), 3);
}

/// An overload that outlasts the gateway's loop: the SDK gets the last 529
/// with `x-should-retry: false` and does not run the loop again (its own 2
/// retries would triple the attempts).
async fn a_final_failure_is_not_retried_by_the_sdk(sdk: Sdk) {
    let mock = MockUpstream::start().await;
    mock.set_default(Reply::overloaded());
    let gateway = start_gateway(&mock, |_| {}).await;
    let result = sdk.run(gateway, "final_failure").await;
    assert_eq!(result["ok"], false, "{result}");
    assert_eq!(result["status"], 529, "{result}");
    assert_eq!(result["should_retry"], "false", "{result}");
    let one_loop = RetryPolicy::foreground()
        .class_policy(Class::Overloaded)
        .unwrap()
        .max_attempts as usize;
    let attempts = mock.request_count();
    assert!(
        (1..=one_loop).contains(&attempts),
        "{attempts} upstream attempts for one SDK call; the gateway's loop allows {one_loop}"
    );
}

/// With opus in a storm and opus -> sonnet configured, the answer is
/// sonnet's and `x-served-by-model` says so.
async fn a_fallback_is_visible_in_x_served_by_model(sdk: Sdk) {
    let mock = MockUpstream::start().await;
    mock.storm(OPUS, Duration::from_secs(60), Reply::overloaded());
    let gateway = start_gateway(&mock, |config| {
        config.fallback = vec![vec![OPUS.into(), SONNET.into()]];
    })
    .await;
    let result = sdk.run(gateway, "fallback").await;
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["served"], SONNET, "{result}");
    assert_eq!(result["model"], SONNET, "{result}");
}

/// A 200 stream whose first event is an overload: the stream guard (on by
/// default) retries it before the SDK sees a byte; the SDK reads one clean
/// stream.
async fn a_stream_opening_with_an_overload_is_retried_cleanly(sdk: Sdk) {
    let mock = MockUpstream::start().await;
    mock.push_for_model(SONNET, [Reply::sse_overloaded(), full_stream()]);
    let gateway = start_gateway(&mock, |_| {}).await;
    let result = sdk.run(gateway, "first_event_overload").await;
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["text"], "Hello world", "{result}");
    assert_eq!(mock.request_count(), 2);
}

/// An error event after content: passed through as it came (a retry would
/// show the text twice), once, and the SDK reports it.
async fn a_mid_stream_error_is_passed_through(sdk: Sdk) {
    let mock = MockUpstream::start().await;
    let hello = text_event("Hello");
    mock.push_for_model(
        SONNET,
        [Reply::sse(&[
            ("message_start", MESSAGE_START),
            ("content_block_start", BLOCK_START),
            ("content_block_delta", &hello),
            ("error", OVERLOADED_EVENT),
        ])],
    );
    let gateway = start_gateway(&mock, |_| {}).await;
    let result = sdk.run(gateway, "mid_stream_error").await;
    assert_eq!(result["ok"], false, "{result}");
    assert!(
        result["message"]
            .as_str()
            .unwrap_or_default()
            .contains("verloaded"),
        "the SDK names the overload: {result}"
    );
    assert_eq!(mock.request_count(), 1, "content reached the SDK: no retry");
}

/// A body over the API's 32 MiB: a 413 from the gateway, nothing sent, no retry.
async fn a_huge_body_is_a_413(sdk: Sdk) {
    let mock = MockUpstream::start().await;
    let gateway = start_gateway(&mock, |_| {}).await;
    let result = sdk.run(gateway, "huge_body").await;
    assert_eq!(result["status"], 413, "{result}");
    assert_eq!(mock.request_count(), 0);
}

macro_rules! for_each_sdk {
    ($($scenario:ident),* $(,)?) => {
        mod python {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    if let Some(sdk) = super::Sdk::python() {
                        super::$scenario(sdk).await;
                    }
                }
            )*
        }
        mod typescript {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    if let Some(sdk) = super::Sdk::typescript() {
                        super::$scenario(sdk).await;
                    }
                }
            )*
        }
    };
}

for_each_sdk!(
    a_529_storm_is_absorbed,
    a_final_failure_is_not_retried_by_the_sdk,
    a_fallback_is_visible_in_x_served_by_model,
    a_stream_opening_with_an_overload_is_retried_cleanly,
    a_mid_stream_error_is_passed_through,
    a_huge_body_is_a_413,
);
