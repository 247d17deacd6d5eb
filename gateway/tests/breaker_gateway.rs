//! An outsider's pass at the gateway with its shipped defaults
//! (`Config::default()`, the foreground preset), driven by the official
//! Python SDK at its own default retries over real loopback HTTP.
//!
//! These run in real time (the SDK is another process): each test stays
//! under about 20 s but the two storm tests, which take 30 to 40 s and run
//! in parallel with the rest. The SDK is found as in
//! `tests/sdk.rs`: `SDK_PYTHON`, else `target/sdk-venv/bin/python` of the workspace
//! checkout (where `.ci/run` installs it); with neither, a test says it was skipped, and fails when `CI` is set.

#[path = "../../tests/support/mod.rs"]
mod support;

use tower_overload_gateway as gateway;

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{MockUpstream, Reply};

const OPUS: &str = "claude-opus-4-6";
const SONNET: &str = "claude-sonnet-4-6";

fn sdk_python() -> Option<OsString> {
    if let Some(python) = std::env::var_os("SDK_PYTHON") {
        return Some(python);
    }
    let fallback =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/sdk-venv/bin/python");
    if fallback.exists() {
        return Some(fallback.into());
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI is set but SDK_PYTHON is not: .ci/run could not install the anthropic Python SDK"
    );
    eprintln!("SKIPPED: no SDK_PYTHON and no sdk-venv, the Python SDK checks did not run");
    None
}

/// Shared by every script: argv[1] is the gateway, argv[2] a JSON argument.
const PRELUDE: &str = r#"
import json, sys, threading, time
import anthropic
BASE = sys.argv[1]
ARG = json.loads(sys.argv[2])
MSG = [{"role": "user", "content": "Say hello."}]
def client(**kw):
    return anthropic.Anthropic(base_url=BASE, api_key="sk-ant-breaker", **kw)
def emit(**kw):
    print(json.dumps(kw), flush=True)
def outcome(fn):
    start = time.monotonic()
    try:
        value = fn()
        return {"ok": True, "value": value, "secs": time.monotonic() - start}
    except anthropic.APIStatusError as e:
        return {"ok": False, "error": type(e).__name__, "status": e.status_code,
                "message": str(e)[:400], "headers": dict(e.response.headers),
                "secs": time.monotonic() - start}
    except Exception as e:
        return {"ok": False, "error": type(e).__name__, "status": None,
                "message": str(e)[:400], "secs": time.monotonic() - start}
def create(c, model, tag, **kw):
    raw = c.messages.with_raw_response.create(model=model, max_tokens=16, messages=MSG,
                                              metadata={"user_id": tag}, **kw)
    message = raw.parse()
    return {"text": message.content[0].text, "model": message.model,
            "served": raw.headers.get("x-served-by-model")}
"#;

/// Runs `script` (after the prelude) against the gateway; returns its JSON lines.
async fn run_sdk(python: &OsString, gateway: SocketAddr, script: &str, arg: Value) -> Vec<Value> {
    let output = tokio::time::timeout(
        Duration::from_secs(150),
        tokio::process::Command::new(python)
            .arg("-c")
            .arg(format!("{PRELUDE}\n{script}"))
            .arg(format!("http://{gateway}"))
            .arg(arg.to_string())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the SDK script ended (no call hung)")
    .expect("python ran");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the SDK script failed:\n{stdout}\n{stderr}"
    );
    stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
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

/// Upstream attempts per SDK call, by the `metadata.user_id` tag of its body.
fn attempts_by_tag(mock: &MockUpstream) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for request in mock.requests() {
        let tag = serde_json::from_slice::<Value>(&request.body)
            .ok()
            .and_then(|v| v["metadata"]["user_id"].as_str().map(str::to_owned))
            .unwrap_or_default();
        *counts.entry(tag).or_insert(0) += 1;
    }
    counts
}

async fn wait_until_idle(mock: &MockUpstream, model: &str, within: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        if mock.in_flight(model) == 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    mock.in_flight(model) == 0
}

fn text_event(text: &str) -> String {
    format!(
        r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":"{text}"}}}}"#
    )
}

const MESSAGE_START: &str = r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-opus-4-6","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":5,"output_tokens":1}}}"#;
const BLOCK_START: &str =
    r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#;
const OVERLOADED_EVENT: &str =
    r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;

/// A complete Messages stream saying "Hello world" in `deltas` pieces.
fn full_stream(deltas: usize) -> Reply {
    let texts: Vec<String> = (0..deltas)
        .map(|i| {
            text_event(if i == 0 {
                "Hello"
            } else if i == 1 {
                " world"
            } else {
                ""
            })
        })
        .collect();
    let mut events: Vec<(&str, &str)> = vec![
        ("message_start", MESSAGE_START),
        ("content_block_start", BLOCK_START),
    ];
    for text in &texts {
        events.push(("content_block_delta", text));
    }
    events.extend([
        ("content_block_stop", r#"{"type":"content_block_stop","index":0}"#),
        (
            "message_delta",
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":2}}"#,
        ),
        ("message_stop", r#"{"type":"message_stop"}"#),
    ]);
    Reply::sse(&events)
}

const STREAM_SCRIPT: &str = r#"
c = client(**ARG.get("client", {}))
def run():
    with c.messages.stream(model=ARG["model"], max_tokens=16, messages=MSG) as stream:
        return "".join(stream.text_stream)
emit(**outcome(run))
"#;

// ---------------------------------------------------------------- storms

/// `calls` SDK calls (default retries) start together into a storm on opus;
/// then (at once with `during`, else once the storm is over) `after` more
/// calls one by one, half a second apart.
const STORM_SCRIPT: &str = r#"
c = client()
results = []
def one(tag):
    r = outcome(lambda: create(c, ARG["model"], tag))
    r["tag"] = tag
    results.append(r)
threads = [threading.Thread(target=one, args=(f"storm-{i}",)) for i in range(ARG["calls"])]
for t in threads: t.start()
for t in threads: t.join()
for r in results: emit(**r)
if not ARG["during"]:
    time.sleep(max(0.0, ARG["storm_secs"] - (time.monotonic() - START)))
for i in range(ARG["after"]):
    r = outcome(lambda: create(c, ARG["model"], f"after-{i}"))
    r["tag"] = f"after-{i}"
    r["at"] = time.monotonic() - START
    emit(**r)
    time.sleep(ARG.get("gap", 0.5))
"#;

struct StormRun {
    results: Vec<Value>,
    attempts: HashMap<String, usize>,
    wall: Duration,
    /// From the storm's end to the first request the primary received after it.
    primary_back_after: Option<Duration>,
}

async fn storm(
    storm_secs: u64,
    calls: usize,
    after: usize,
    fallback: bool,
) -> Option<(MockUpstream, StormRun)> {
    let python = sdk_python()?;
    let mock = MockUpstream::start().await;
    mock.storm(OPUS, Duration::from_secs(storm_secs), Reply::overloaded());
    let storm_end = tokio::time::Instant::now() + Duration::from_secs(storm_secs);
    let gateway = start_gateway(&mock, |config| {
        if fallback {
            config.fallback = vec![vec![OPUS.into(), SONNET.into()]];
        }
    })
    .await;
    let start = Instant::now();
    let script = format!("START = time.monotonic()\n{STORM_SCRIPT}");
    let results = run_sdk(
        &python,
        gateway,
        &script,
        serde_json::json!({
            "model": OPUS, "calls": calls, "after": after,
            "storm_secs": storm_secs, "during": fallback,
        }),
    )
    .await;
    let wall = start.elapsed();
    let attempts = attempts_by_tag(&mock);
    let primary_back_after = mock
        .requests()
        .iter()
        .find(|r| r.model.as_deref() == Some(OPUS) && r.at >= storm_end)
        .map(|r| r.at - storm_end);
    eprintln!("primary back after {primary_back_after:?}");
    eprintln!("wall {wall:?}; attempts per call {attempts:?}");
    for r in &results {
        eprintln!("{r}");
    }
    Some((
        mock,
        StormRun {
            results,
            attempts,
            wall,
            primary_back_after,
        },
    ))
}

/// The gateway already ran the preset's retry loop (5 overloaded attempts);
/// the SDK's two retries of the 529 it returns must not start it twice more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_storm_costs_at_most_the_gateways_attempts_per_sdk_call() {
    let Some((_mock, run)) = storm(6, 4, 0, false).await else {
        return;
    };
    for r in &run.results {
        let tag = r["tag"].as_str().unwrap();
        let attempts = run.attempts[tag];
        assert!(
            attempts <= 5,
            "{tag}: {attempts} upstream attempts for one SDK call (the SDK's retries multiply the gateway's): {r}"
        );
    }
    assert!(run.wall < Duration::from_secs(40), "{:?}", run.wall);
}

/// A 25 s storm with no fallback: every SDK call ends, attempts stay
/// bounded, and calls after the storm reach the primary at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_25s_storm_without_fallback_then_recovery() {
    let Some((_mock, run)) = storm(25, 6, 3, false).await else {
        return;
    };
    for r in &run.results {
        let tag = r["tag"].as_str().unwrap();
        assert!(run.attempts[tag] <= 5, "{tag}: {}", run.attempts[tag]);
        if tag.starts_with("after") {
            assert_eq!(r["ok"], true, "after the storm: {r}");
        }
    }
}

/// A 25 s storm with opus -> sonnet and a call every half second through
/// it: calls are served by sonnet during the storm, and opus gets traffic
/// back within seconds once it is healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_25s_storm_with_fallback_then_the_primary_comes_back() {
    let Some((_mock, run)) = storm(25, 6, 70, true).await else {
        return;
    };
    for r in &run.results {
        assert_eq!(r["ok"], true, "with a fallback every call succeeds: {r}");
        let tag = r["tag"].as_str().unwrap();
        assert!(run.attempts[tag] <= 6, "{tag}: {}", run.attempts[tag]);
    }
    let back = run
        .primary_back_after
        .expect("opus got traffic again after the storm");
    assert!(
        back < Duration::from_secs(7),
        "opus back only {back:?} after the storm"
    );
}

// ---------------------------------------------------------------- streams

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mid_stream_error_reaches_the_sdk_once_and_frees_the_permit() {
    let Some(python) = sdk_python() else { return };
    let mock = MockUpstream::start().await;
    let hello = text_event("Hello");
    mock.push_for_model(
        OPUS,
        [Reply::sse(&[
            ("message_start", MESSAGE_START),
            ("content_block_start", BLOCK_START),
            ("content_block_delta", &hello),
            ("error", OVERLOADED_EVENT),
        ])],
    );
    let gateway = start_gateway(&mock, |_| {}).await;
    let results = run_sdk(
        &python,
        gateway,
        STREAM_SCRIPT,
        serde_json::json!({"model": OPUS}),
    )
    .await;
    assert_eq!(results[0]["ok"], false, "{results:?}");
    assert_eq!(
        mock.request_count(),
        1,
        "content reached the caller: no retry"
    );
    assert!(wait_until_idle(&mock, OPUS, Duration::from_secs(3)).await);
}

/// A stream that stalls before any content: the SDK's own 2 s timeout (and
/// its retries) end the call; the gateway must then let go of the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_the_sdk_gives_up_on_frees_the_upstream() {
    let Some(python) = sdk_python() else { return };
    let mock = MockUpstream::start().await;
    mock.set_default(full_stream(2).chunk_interval(Duration::from_secs(60)));
    let gateway = start_gateway(&mock, |config| {
        config.limits = vec![(OPUS.into(), 1)];
    })
    .await;
    let results = run_sdk(
        &python,
        gateway,
        STREAM_SCRIPT,
        serde_json::json!({"model": OPUS, "client": {"timeout": 2.0, "max_retries": 0}}),
    )
    .await;
    assert_eq!(results[0]["ok"], false, "{results:?}");
    assert!(
        wait_until_idle(&mock, OPUS, Duration::from_secs(3)).await,
        "the gateway still holds {} upstream stream(s) of a client that left",
        mock.in_flight(OPUS)
    );
}

/// The SDK reads two events and closes the stream: the upstream stream is
/// dropped and the per-model permit (limit 1) serves the next call at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_stream_frees_the_permit() {
    let Some(python) = sdk_python() else { return };
    let mock = MockUpstream::start().await;
    mock.push_for_model(
        OPUS,
        [full_stream(40).chunk_interval(Duration::from_millis(200))],
    );
    let gateway = start_gateway(&mock, |config| {
        config.limits = vec![(OPUS.into(), 1)];
    })
    .await;
    let script = r#"
c = client()
with c.messages.stream(model=ARG["model"], max_tokens=16, messages=MSG) as stream:
    for i, text in enumerate(stream.text_stream):
        if i == 1:
            break
time.sleep(1.5)
emit(**outcome(lambda: create(c, ARG["model"], "next", timeout=5.0)))
"#;
    let results = run_sdk(&python, gateway, script, serde_json::json!({"model": OPUS})).await;
    assert_eq!(results[0]["ok"], true, "{results:?}");
    assert!(results[0]["secs"].as_f64().unwrap() < 2.0, "{results:?}");
    assert!(wait_until_idle(&mock, OPUS, Duration::from_secs(3)).await);
}

// ---------------------------------------------------------------- 429s, gzip

const CREATE_SCRIPT: &str = r#"
c = client(**ARG.get("client", {}))
emit(**outcome(lambda: create(c, ARG["model"], "one")))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_is_waited_out_by_the_gateway() {
    let Some(python) = sdk_python() else { return };
    let mock = MockUpstream::start().await;
    mock.push_for_model(OPUS, [Reply::rate_limited().retry_after("2"), Reply::ok()]);
    let gateway = start_gateway(&mock, |_| {}).await;
    let results = run_sdk(
        &python,
        gateway,
        CREATE_SCRIPT,
        serde_json::json!({"model": OPUS}),
    )
    .await;
    assert_eq!(results[0]["ok"], true, "{results:?}");
    let secs = results[0]["secs"].as_f64().unwrap();
    assert!((1.9..6.0).contains(&secs), "{secs}");
    assert_eq!(mock.request_count(), 2);
}

fn spend_limit() -> Reply {
    Reply::error(
        429,
        "rate_limit_error",
        "You have reached your specified workspace API usage limits (spend limit).",
    )
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn gzipped_error(status: u16, error_type: &str, message: &str) -> Reply {
    let body =
        serde_json::json!({"type": "error", "error": {"type": error_type, "message": message}});
    Reply::raw(status, gzip(body.to_string().as_bytes()))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
}

/// A spend limit needs a person: one upstream attempt, whoever retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spend_limit_429_is_sent_once_even_with_the_sdks_retries() {
    let Some(python) = sdk_python() else { return };
    let mock = MockUpstream::start().await;
    mock.set_default(spend_limit());
    let gateway = start_gateway(&mock, |_| {}).await;
    let results = run_sdk(
        &python,
        gateway,
        CREATE_SCRIPT,
        serde_json::json!({"model": OPUS}),
    )
    .await;
    assert_eq!(results[0]["status"], 429, "{results:?}");
    assert!(
        results[0]["message"]
            .as_str()
            .unwrap()
            .contains("spend limit")
    );
    assert_eq!(mock.request_count(), 1, "{results:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzipped_spend_limit_is_not_retried_and_reaches_the_sdk_readable() {
    let Some(python) = sdk_python() else { return };
    let mock = MockUpstream::start().await;
    mock.set_default(gzipped_error(
        429,
        "rate_limit_error",
        "You have reached your specified workspace API usage limits (spend limit).",
    ));
    let gateway = start_gateway(&mock, |_| {}).await;
    let results = run_sdk(
        &python,
        gateway,
        CREATE_SCRIPT,
        serde_json::json!({"model": OPUS, "client": {"max_retries": 0}}),
    )
    .await;
    assert_eq!(results[0]["status"], 429, "{results:?}");
    assert!(
        results[0]["message"]
            .as_str()
            .unwrap()
            .contains("spend limit"),
        "{results:?}"
    );
    assert_eq!(mock.request_count(), 1, "{results:?}");
    let sent = &mock.requests()[0].headers;
    eprintln!(
        "accept-encoding upstream: {:?}",
        sent.get("accept-encoding")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzipped_overloaded_500_is_retried_as_an_overload() {
    let Some(python) = sdk_python() else { return };
    let mock = MockUpstream::start().await;
    mock.push_for_model(
        OPUS,
        [gzipped_error(500, "api_error", "Overloaded"), Reply::ok()],
    );
    let gateway = start_gateway(&mock, |_| {}).await;
    let results = run_sdk(
        &python,
        gateway,
        CREATE_SCRIPT,
        serde_json::json!({"model": OPUS, "client": {"max_retries": 0}}),
    )
    .await;
    assert_eq!(results[0]["ok"], true, "{results:?}");
    assert_eq!(mock.request_count(), 2);
}

// ---------------------------------------------------------------- bodies, names

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_just_under_32_mib_arrives_whole() {
    let Some(python) = sdk_python() else { return };
    let mock = MockUpstream::start().await;
    let gateway = start_gateway(&mock, |_| {}).await;
    let script = r#"
c = client()
big = "x" * ARG["size"]
def run():
    m = c.messages.create(model=ARG["model"], max_tokens=16,
                          messages=[{"role": "user", "content": big}])
    return m.content[0].text
emit(**outcome(run))
"#;
    let size = 32 * 1024 * 1024 - 4096;
    let results = run_sdk(
        &python,
        gateway,
        script,
        serde_json::json!({"model": OPUS, "size": size}),
    )
    .await;
    assert_eq!(results[0]["ok"], true, "{results:?}");
    let requests = mock.requests();
    assert_eq!(requests.len(), 1);
    let body: Value = serde_json::from_slice(&requests[0].body).unwrap();
    assert_eq!(body["messages"][0]["content"].as_str().unwrap().len(), size);
}

/// Over the limit: a clean 413 the SDK does not retry, nothing sent upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_32_mib_is_a_clean_413() {
    let Some(python) = sdk_python() else { return };
    let mock = MockUpstream::start().await;
    let gateway = start_gateway(&mock, |_| {}).await;
    let script = r#"
c = client()
big = "x" * ARG["size"]
emit(**outcome(lambda: c.messages.create(model=ARG["model"], max_tokens=16,
                                          messages=[{"role": "user", "content": big}]).id))
"#;
    let size = 33 * 1024 * 1024;
    let results = run_sdk(
        &python,
        gateway,
        script,
        serde_json::json!({"model": OPUS, "size": size}),
    )
    .await;
    assert_eq!(results[0]["status"], 413, "{results:?}");
    assert_eq!(mock.request_count(), 0);
}

/// `{"model": "claude-x", ..., "model": "claude-opus-4-6"}` is served as opus
/// (the last key wins at the API), so it falls back like opus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_model_keys_are_routed_as_the_api_reads_them() {
    let Some(python) = sdk_python() else { return };
    let mock = MockUpstream::start().await;
    mock.storm(OPUS, Duration::from_secs(60), Reply::overloaded());
    let gateway = start_gateway(&mock, |config| {
        config.fallback = vec![vec![OPUS.into(), SONNET.into()]];
    })
    .await;
    let script = r#"
c = client(max_retries=0)
raw = b'{"model":"claude-x","max_tokens":16,"messages":[{"role":"user","content":"hi"}],"model":"claude-opus-4-6"}'
def run():
    r = c.post("/v1/messages", cast_to=object, content=raw,
               options={"headers": {"content-type": "application/json"}})
    return r["model"]
emit(**outcome(run))
"#;
    let results = run_sdk(&python, gateway, script, serde_json::json!({})).await;
    assert_eq!(results[0]["value"], SONNET, "{results:?}");
    let last = mock.requests().last().unwrap().clone();
    assert_eq!(last.model.as_deref(), Some(SONNET));
    let body = String::from_utf8_lossy(&last.body);
    assert!(
        !body.contains("claude-x") && !body.contains(OPUS),
        "no stale model value left: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_model_names_pass_through_and_end() {
    let Some(python) = sdk_python() else { return };
    let mock = MockUpstream::start().await;
    let gateway = start_gateway(&mock, |config| {
        config.fallback = vec![vec![OPUS.into(), SONNET.into()]];
    })
    .await;
    let script = r#"
c = client()
for name in ["claude\nopus\r\nx-injected: 1", "m" * 10240, "", "claude-opus-4-6\u0000", "\u00e9\u202e"]:
    r = outcome(lambda: create(c, name, "odd"))
    r["name_len"] = len(name)
    emit(**r)
"#;
    let results = run_sdk(&python, gateway, script, serde_json::json!({})).await;
    assert_eq!(results.len(), 5);
    for r in &results {
        assert!(r["ok"] == true || r["status"].is_u64(), "{r}");
        assert!(r["secs"].as_f64().unwrap() < 5.0, "{r}");
    }
    assert_eq!(
        results[1]["value"]["model"].as_str().map(str::len),
        Some(10240)
    );
}
