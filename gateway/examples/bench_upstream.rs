//! A fast mock of the Messages API for `scripts/gateway-bench`: answers every
//! `POST /v1/*` with a small message, after `--latency-ms`, and with
//! `--storm MODEL:SECS` answers 529 to MODEL for SECS from its first request.
//! `GET /stats` reports what the storm cost: requests and distinct calls (by
//! `x-client-request-id`) during it, and when MODEL was next asked after it.
//!
//! `cargo run --release -p tower-overload-gateway --example bench_upstream -- --listen 127.0.0.1:18081`

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

#[derive(Default)]
struct Storm {
    model: String,
    length: Duration,
    started: Option<Instant>,
    requests_in_storm: u64,
    by_model_in_storm: HashMap<String, u64>,
    calls_in_storm: HashSet<String>,
    first_after_ms: Option<f64>,
}

struct Mock {
    latency: Duration,
    storm: Option<Mutex<Storm>>,
}

const OK: &[u8] = br#"{"id":"msg_bench","type":"message","role":"assistant","model":"claude-opus-4-6","content":[{"type":"text","text":"Hello from the bench mock."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12,"output_tokens":7}}"#;
const OVERLOADED: &[u8] =
    br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;

fn reply(status: StatusCode, body: &'static [u8]) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert("content-type", "application/json".parse().unwrap());
    headers.insert("request-id", "req_bench".parse().unwrap());
    response
}

async fn handle(mock: Arc<Mock>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if request.uri().path() == "/stats" {
        let text = match &mock.storm {
            Some(storm) => {
                let storm = storm.lock().unwrap();
                serde_json::json!({
                    "requests_in_storm": storm.requests_in_storm,
                    "by_model_in_storm": storm.by_model_in_storm,
                    "calls_in_storm": storm.calls_in_storm.len(),
                    "storm_model_back_after_ms": storm.first_after_ms,
                })
                .to_string()
            }
            None => "{}".to_owned(),
        };
        return Response::new(Full::new(Bytes::from(text)));
    }
    let call = request
        .headers()
        .get("x-client-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut overloaded = false;
    if let Some(storm) = &mock.storm {
        let model = tower_overload::model::extract(&body)
            .map(|m| m.into_owned())
            .unwrap_or_default();
        let mut storm = storm.lock().unwrap();
        let now = Instant::now();
        if model == storm.model && storm.started.is_none() {
            storm.started = Some(now);
        }
        if let Some(started) = storm.started {
            let end = started + storm.length;
            if now < end {
                storm.requests_in_storm += 1;
                *storm.by_model_in_storm.entry(model.clone()).or_insert(0) += 1;
                if let Some(call) = call {
                    storm.calls_in_storm.insert(call);
                }
                overloaded = model == storm.model;
            } else if model == storm.model && storm.first_after_ms.is_none() {
                storm.first_after_ms = Some((now - end).as_secs_f64() * 1000.0);
            }
        }
    }
    if !mock.latency.is_zero() {
        tokio::time::sleep(mock.latency).await;
    }
    if overloaded {
        reply(StatusCode::from_u16(529).unwrap(), OVERLOADED)
    } else {
        reply(StatusCode::OK, OK)
    }
}

#[tokio::main]
async fn main() {
    let mut listen: SocketAddr = "127.0.0.1:18081".parse().unwrap();
    let mut latency = Duration::ZERO;
    let mut storm = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = value.parse().expect("--listen ADDR"),
            "--latency-ms" => {
                latency = Duration::from_millis(value.parse().expect("--latency-ms N"))
            }
            "--storm" => {
                let (model, secs) = value.split_once(':').expect("--storm MODEL:SECS");
                storm = Some(Mutex::new(Storm {
                    model: model.to_owned(),
                    length: Duration::from_secs(secs.parse().expect("--storm MODEL:SECS")),
                    ..Storm::default()
                }));
            }
            other => panic!("unknown flag {other}"),
        }
    }
    let mock = Arc::new(Mock { latency, storm });
    let listener = tokio::net::TcpListener::bind(listen).await.expect("bind");
    println!("bench upstream on http://{listen}");
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mock = mock.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let mock = mock.clone();
                async move { Ok::<_, Infallible>(handle(mock, request).await) }
            });
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
