//! The stack as a local proxy that any SDK or tool can use.
//!
//! `cargo run --example gateway -- [--listen 127.0.0.1:8787] [--upstream https://api.anthropic.com]
//!     [--max-per-model 16] [--max-queued 1024] [--limit claude-opus-4-6=4 ...] [--fallback opus,sonnet,haiku]
//!     [--retry foreground|background] [--deadline SECS]`
//!
//! Then point a client at it: `ANTHROPIC_BASE_URL=http://127.0.0.1:8787` (the official
//! SDKs' `base_url`, curl, any tool). Every `/v1/*` call goes through per-model concurrency,
//! overload retry, optional model fallback and request-id logs (`RUST_LOG=tower_overload=debug`).
//! Streams pass through chunk by chunk; bodies are forwarded byte for byte (but for a
//! fallback's model); the upstream's `request-id` comes back, and `x-served-by-model`
//! says which model answered when a fallback happened. The gateway's own failures answer
//! in the API's error shape: a full queue is a 529 `overloaded_error` with `retry-after`,
//! a spent deadline a 504 `timeout_error`, an unreachable upstream a 502.
//!
//! The gateway is the one retry loop. A failure it hands back after that loop
//! (the upstream's last answer, a 502 or a 504) says `x-should-retry: false`,
//! which the official SDKs obey: their own default retries (2) would
//! otherwise run the gateway's whole loop three times per call in a storm, and
//! resend a spend-limit 429 that only a person can clear. Only a full queue
//! (nothing was sent) leaves the SDK free to retry.

// The tests include this file for `serve`; `main` is theirs to ignore.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tower::{Layer, Service, ServiceExt};
use tower_overload::concurrency::{Aimd, ConcurrencyPerModelLayer};
use tower_overload::fallback::{ModelFallbackLayer, ServedBy};
use tower_overload::retry::{RetryPolicy, RetryReport, StopReason};
use tower_overload::stack::{OverloadService, OverloadStack};
use tower_overload::{BoxError, Error, ErrorKind, headers};

/// The API's own request limit: a larger body is refused before anything is sent.
const MAX_BODY: usize = 32 * 1024 * 1024;

/// What the gateway is told on its command line.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub upstream: Uri,
    pub max_per_model: usize,
    pub max_queued: usize,
    pub limits: Vec<(String, usize)>,
    pub fallback: Vec<String>,
    pub background: bool,
    pub deadline: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8787".parse().expect("a socket address"),
            upstream: Uri::from_static("https://api.anthropic.com"),
            max_per_model: 16,
            max_queued: 1024,
            limits: Vec::new(),
            fallback: Vec::new(),
            background: false,
            deadline: None,
        }
    }
}

impl Config {
    /// Parses the flags above; a bad flag is a message for the person.
    pub fn from_args(mut args: impl Iterator<Item = String>) -> Result<Self, String> {
        let mut config = Config::default();
        while let Some(flag) = args.next() {
            let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
            match flag.as_str() {
                "--listen" => {
                    config.listen = value("--listen")?
                        .parse()
                        .map_err(|e| format!("--listen: {e}"))?
                }
                "--upstream" => {
                    config.upstream = value("--upstream")?
                        .parse()
                        .map_err(|e| format!("--upstream: {e}"))?
                }
                "--max-per-model" => {
                    config.max_per_model = value("--max-per-model")?
                        .parse()
                        .map_err(|e| format!("--max-per-model: {e}"))?
                }
                "--max-queued" => {
                    config.max_queued = value("--max-queued")?
                        .parse()
                        .map_err(|e| format!("--max-queued: {e}"))?
                }
                "--limit" => {
                    let spec = value("--limit")?;
                    let (model, limit) = spec.split_once('=').ok_or("--limit takes MODEL=N")?;
                    let limit = limit.parse().map_err(|e| format!("--limit {spec}: {e}"))?;
                    config.limits.push((model.to_owned(), limit));
                }
                "--fallback" => {
                    config.fallback = value("--fallback")?.split(',').map(str::to_owned).collect()
                }
                "--retry" => {
                    config.background = match value("--retry")?.as_str() {
                        "foreground" => false,
                        "background" => true,
                        other => {
                            return Err(format!(
                                "--retry is foreground or background, not {other}"
                            ));
                        }
                    }
                }
                "--deadline" => {
                    let secs: u64 = value("--deadline")?
                        .parse()
                        .map_err(|e| format!("--deadline: {e}"))?;
                    config.deadline = Some(Duration::from_secs(secs));
                }
                other => return Err(format!("unknown flag {other}")),
            }
        }
        Ok(config)
    }
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;
type Upstream = OverloadService<Client<Connector, Full<Bytes>>>;

/// The full stack on a hyper-util client that speaks http and https.
pub fn upstream_service(config: &Config) -> Upstream {
    // Nagle's algorithm would hold back small writes on a reused
    // connection until the peer's delayed ACK (tens of milliseconds).
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let client = Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(https);
    let mut retry = if config.background {
        RetryPolicy::background()
    } else {
        RetryPolicy::foreground()
    };
    if let Some(deadline) = config.deadline {
        retry = retry.deadline(Some(deadline));
    }
    let mut concurrency = ConcurrencyPerModelLayer::new(config.max_per_model)
        .max_queued(config.max_queued)
        .queue_timeout(Some(Duration::from_secs(60)))
        .adaptive(Aimd::default());
    for (model, limit) in &config.limits {
        concurrency = concurrency.limit_for(model.as_str(), *limit);
    }
    OverloadStack::new()
        .retry(retry)
        .concurrency(concurrency)
        .fallback(ModelFallbackLayer::new(
            config.fallback.iter().map(String::as_str),
        ))
        .layer(client)
}

/// Serves the gateway on `listener` until the task is dropped.
pub async fn serve(config: Config, listener: TcpListener) {
    let upstream = upstream_service(&config);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // Streamed events go out as they come, not when an ACK lets Nagle flush.
        let _ = stream.set_nodelay(true);
        let upstream = upstream.clone();
        let base = config.upstream.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let upstream = upstream.clone();
                let base = base.clone();
                async move { Ok::<_, Infallible>(forward(upstream, &base, request).await) }
            });
            // A client that goes away mid-call ends its connection; nothing to report.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type GatewayBody = UnsyncBoxBody<Bytes, BoxError>;

/// Headers that belong to one connection, never forwarded.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("keep-alive"),
];

fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(HeaderName::from_static("proxy-connection"));
}

async fn forward(
    mut upstream: Upstream,
    base: &Uri,
    request: Request<Incoming>,
) -> Response<GatewayBody> {
    if !request.uri().path().starts_with("/v1/") {
        return api_error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "the gateway forwards /v1/* only",
            None,
        );
    }
    let (mut parts, body) = request.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            return api_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                "request body exceeds 32 MiB",
                None,
            );
        }
        Err(error) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &format!("reading the request body failed: {error}"),
                None,
            );
        }
    };
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let target = format!(
        "{}{}",
        base.to_string().trim_end_matches('/'),
        path_and_query
    );
    parts.uri = match target.parse() {
        Ok(uri) => uri,
        Err(_) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "bad request path",
                None,
            );
        }
    };
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);
    parts.headers.remove(header::CONTENT_LENGTH);
    let request = Request::from_parts(parts, Full::new(body));

    let ready = match upstream.ready().await {
        Ok(ready) => ready,
        Err(error) => return error_response(&error),
    };
    match ready.call(request).await {
        Ok(response) => {
            let report = response.extensions().get::<RetryReport>();
            if let Some(report) = report.filter(|r| r.stop == StopReason::DeadlineExceeded) {
                let ids: Vec<&str> = report.request_ids().map(|id| id.as_str()).collect();
                let message = format!(
                    "the gateway's deadline passed after {} attempts; request ids: {}",
                    report.attempts.len(),
                    ids.join(", ")
                );
                return final_answer(api_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout_error",
                    &message,
                    None,
                ));
            }
            let fell_back = response
                .extensions()
                .get::<ServedBy>()
                .filter(|served| served.fell_back())
                .map(|served| served.served.to_string());
            let failed_here = report.is_some_and(|report| report.stop != StopReason::Success);
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            if let Some(model) = fell_back.and_then(|m| HeaderValue::from_str(&m).ok()) {
                parts
                    .headers
                    .insert(HeaderName::from_static("x-served-by-model"), model);
            }
            let response = Response::from_parts(parts, body.map_err(Into::into).boxed_unsync());
            if failed_here {
                final_answer(response)
            } else {
                response
            }
        }
        Err(error) => error_response(&error),
    }
}

/// The gateway's own failure, in the API's error shape; final (see the
/// module docs) but for a full queue.
fn error_response(error: &Error) -> Response<GatewayBody> {
    let response = gateway_failure(error);
    let nothing_sent = matches!(error.kind(), ErrorKind::QueueFull | ErrorKind::QueueTimeout);
    if nothing_sent {
        response
    } else {
        final_answer(response)
    }
}

/// Tells the SDK not to run the gateway's retry loop again.
fn final_answer(mut response: Response<GatewayBody>) -> Response<GatewayBody> {
    response
        .headers_mut()
        .insert(headers::X_SHOULD_RETRY, HeaderValue::from_static("false"));
    response
}

fn gateway_failure(error: &Error) -> Response<GatewayBody> {
    let message = error.to_string();
    match error.kind() {
        ErrorKind::QueueFull | ErrorKind::QueueTimeout => api_error(
            StatusCode::from_u16(529).expect("529"),
            "overloaded_error",
            &message,
            Some(5),
        ),
        ErrorKind::DeadlineExceeded => {
            api_error(StatusCode::GATEWAY_TIMEOUT, "timeout_error", &message, None)
        }
        ErrorKind::ServerDelayTooLong => {
            let wait = error.server_delay().map(|d| d.as_secs().max(1));
            api_error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                &message,
                wait,
            )
        }
        _ => api_error(
            StatusCode::BAD_GATEWAY,
            "api_error",
            &format!("upstream unreachable: {message}"),
            None,
        ),
    }
}

fn api_error(
    status: StatusCode,
    kind: &str,
    message: &str,
    retry_after: Option<u64>,
) -> Response<GatewayBody> {
    let body = serde_json::json!({"type": "error", "error": {"type": kind, "message": message}});
    let mut response = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

#[tokio::main]
async fn main() {
    let config = match Config::from_args(std::env::args().skip(1)) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("gateway: {message}");
            std::process::exit(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "tower_overload=info".into()),
        )
        .init();
    let listener = match TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("gateway: cannot listen on {}: {error}", config.listen);
            std::process::exit(1);
        }
    };
    println!(
        "forwarding http://{}/v1/* to {} through the overload stack",
        config.listen, config.upstream
    );
    serve(config, listener).await;
}
