//! One call through the gateway: checks on what the client sent, the
//! stack, and the answer in the API's shape with the retry contract.

use std::io::Read as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::{Layer, Service, ServiceExt};
use tower_overload::concurrency::{Aimd, ConcurrencyPerModelLayer};
use tower_overload::fallback::{ModelFallbackLayer, ServedBy};
use tower_overload::fleet::{Fleet, FleetConfig, RedisStore};
use tower_overload::pacing::RateLimitPacingLayer;
use tower_overload::retry::{RetryPolicy, RetryReport, StopReason, StreamGuard};
use tower_overload::stack::{OverloadService, OverloadStack};
use tower_overload::{BoxError, Error, ErrorKind, headers};

use crate::config::{Config, RetryPreset};
use crate::ops::Ops;

/// The body of every answer the gateway gives.
pub(crate) type GatewayBody = UnsyncBoxBody<Bytes, BoxError>;

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The full stack over a pooled hyper-util client that speaks http, and
/// https with rustls (HTTP/2 when the upstream offers it by ALPN).
pub(crate) type Upstream = OverloadService<Client<Connector, Full<Bytes>>>;

/// The response header naming the model that answered after a fallback.
pub const SERVED_BY_MODEL: HeaderName = HeaderName::from_static("x-served-by-model");

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

/// Headers a request may carry at most: hyper's own limit on HTTP/1.1
/// (its refusal is rewritten in the API's shape); checked here for HTTP/2.
pub(crate) const MAX_HEADERS: usize = 100;

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(HeaderName::from_static("proxy-connection"));
}

/// The retry policy, concurrency, pacing and fallback layers as configured.
pub(crate) fn upstream_service(config: &Config) -> Upstream {
    // Nagle's algorithm would hold back small writes on a reused
    // connection until the peer's delayed ACK (tens of milliseconds).
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))
        .map(|builder| {
            builder
                .https_or_http()
                .enable_all_versions()
                .wrap_connector(http)
        })
        .expect("ring offers TLS 1.2 and 1.3");
    let client = Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(https);
    let mut retry = match config.retry {
        RetryPreset::Foreground => RetryPolicy::foreground(),
        RetryPreset::Background => RetryPolicy::background(),
    };
    if let Some(deadline) = config.deadline {
        retry = retry.deadline(Some(deadline));
    }
    // SDK users cannot reach the policy, so the guard is on unless told off.
    retry = retry.stream_guard(config.stream_guard.then(StreamGuard::default));
    let mut concurrency = ConcurrencyPerModelLayer::new(config.max_per_model)
        .max_queued(config.max_queued)
        .queue_timeout(Some(config.queue_timeout))
        .adaptive(Aimd::default());
    for (model, limit) in &config.limits {
        concurrency = concurrency.limit_for(model.as_str(), *limit);
    }
    let mut pacing = RateLimitPacingLayer::new();
    for (model, limits) in &config.pacing {
        pacing = pacing.limits_for(model.as_str(), *limits);
    }
    let mut chains = config.fallback.iter();
    let mut fallback = ModelFallbackLayer::new(
        chains
            .next()
            .map(|chain| chain.iter().map(String::as_str).collect::<Vec<_>>())
            .unwrap_or_default(),
    );
    for chain in chains {
        fallback = fallback.chain(chain.iter().map(String::as_str));
    }
    // Several gateways share their state through Redis when told to; a
    // Redis that is down never fails a call (each falls back to its share).
    if let Some(url) = &config.redis {
        match RedisStore::open(url) {
            Ok(store) => {
                let fleet = Fleet::new(store, FleetConfig::default().share(config.fleet_share));
                concurrency = concurrency.fleet(fleet.clone());
                retry = retry.fleet(&fleet);
                pacing = pacing.fleet(fleet.clone());
                fallback = fallback.fleet(fleet);
            }
            Err(error) => {
                tracing::error!(%error, "--redis: not a usable URL; each gateway runs alone")
            }
        }
    }
    OverloadStack::new()
        .retry(retry)
        .concurrency(concurrency)
        .pacing(pacing)
        .fallback(fallback)
        .layer(client)
}

/// What every connection shares.
pub(crate) struct Shared {
    pub(crate) upstream: Upstream,
    pub(crate) base: String,
    pub(crate) config: Config,
    pub(crate) ops: Ops,
}

/// One request, whatever it is.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Response<GatewayBody> {
    match request.uri().path() {
        "/healthz" => return shared.ops.healthz(),
        "/readyz" => {
            let fallback = shared.upstream.get_ref();
            let resting: Vec<&str> = shared
                .config
                .fallback
                .iter()
                .flatten()
                .map(String::as_str)
                .filter(|model| fallback.is_cooling_down(model))
                .collect();
            return shared.ops.readyz(&resting);
        }
        "/metrics" => return shared.ops.metrics(),
        _ => {}
    }
    let start = Instant::now();
    // Dropped with the call, also when the client leaves before the answer.
    let _in_flight = crate::ops::InFlight::new();
    let (response, model) = forward(shared.clone(), request).await;
    shared
        .ops
        .record(model.as_deref(), &response, start.elapsed());
    response
}

async fn forward(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> (Response<GatewayBody>, Option<String>) {
    let max_body_bytes = shared.config.max_body_bytes;
    let body_read_timeout = shared.config.body_read_timeout;
    if let Some(refusal) = check_headers(request.headers(), shared.config.max_header_bytes) {
        return (refusal, None);
    }
    let path = match normalize_path(request.uri().path()) {
        Ok(path) => path,
        Err(PathRefusal::Outside) => {
            return (
                refusal(
                    StatusCode::NOT_FOUND,
                    "not_found_error",
                    "the gateway forwards /v1/* only",
                ),
                None,
            );
        }
        Err(PathRefusal::Encoded) => {
            return (
                refusal(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "the request path has an encoded slash, backslash or NUL",
                ),
                None,
            );
        }
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max_body_bytes as u64) {
        return (too_large(max_body_bytes), None);
    }
    let (mut parts, body) = request.into_parts();
    let read = Limited::new(body, max_body_bytes).collect();
    let body = match tokio::time::timeout(body_read_timeout, read).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => {
            return (too_large(max_body_bytes), None);
        }
        Ok(Err(error)) => {
            return (
                refusal(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    &format!("reading the request body failed: {error}"),
                ),
                None,
            );
        }
        Err(_) => {
            // A client that sends its body this slowly holds a connection
            // and a task; 408 lets an SDK try again on a fresh connection.
            return (
                api_error(
                    StatusCode::REQUEST_TIMEOUT,
                    "timeout_error",
                    &format!(
                        "the request body did not arrive within {} s",
                        body_read_timeout.as_secs_f64()
                    ),
                    None,
                ),
                None,
            );
        }
    };
    let model = tower_overload::model::extract(&body).map(|m| m.into_owned());
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    parts.uri = match format!("{}{path}{query}", shared.base).parse::<Uri>() {
        Ok(uri) => uri,
        Err(_) => {
            return (
                refusal(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "bad request path",
                ),
                model,
            );
        }
    };
    let accepts = Accepts::from_headers(&parts.headers);
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);
    parts.headers.remove(header::CONTENT_LENGTH);
    // Ask the upstream only for codings the classifier decodes and the
    // client reads: a br error body would be misread as no body at all.
    match accepts.upstream_value() {
        Some(value) => parts.headers.insert(header::ACCEPT_ENCODING, value),
        None => parts.headers.remove(header::ACCEPT_ENCODING),
    };
    // HTTP/2 clients send no version the upstream's HTTP/1.1 would take.
    parts.version = http::Version::HTTP_11;
    let request = Request::from_parts(parts, Full::new(body));

    let mut upstream = shared.upstream.clone();
    let ready = match upstream.ready().await {
        Ok(ready) => ready,
        Err(error) => return (error_response(&error), model),
    };
    let response = match ready.call(request).await {
        Ok(response) => response,
        Err(error) => {
            shared.ops.upstream_outcome(&error);
            return (error_response(&error), model);
        }
    };
    shared.ops.upstream_answered();
    let report = response.extensions().get::<RetryReport>();
    if let Some(report) = report.filter(|r| r.stop == StopReason::DeadlineExceeded) {
        let ids: Vec<&str> = report.request_ids().map(|id| id.as_str()).collect();
        let message = format!(
            "the gateway's deadline passed after {} attempts; request ids: {}",
            report.attempts.len(),
            ids.join(", ")
        );
        let answer = final_answer(api_error(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout_error",
            &message,
            None,
        ));
        return (answer, model);
    }
    let fell_back = response
        .extensions()
        .get::<ServedBy>()
        .filter(|served| served.fell_back())
        .map(|served| served.served.to_string());
    let failed_here = report.is_some_and(|report| report.stop != StopReason::Success);
    let (mut head, body) = response.into_parts();
    strip_hop_by_hop(&mut head.headers);
    if let Some(served) = fell_back.and_then(|m| HeaderValue::from_str(&m).ok()) {
        head.headers.insert(SERVED_BY_MODEL, served);
    }
    let mut body = body.boxed_unsync();
    if let Some(coding) = accepts.unreadable(&head.headers) {
        // The upstream compressed in a way this client did not ask for
        // (some proxies ignore accept-encoding): decode it here.
        match decode_whole(body, coding).await {
            Ok(decoded) => {
                head.headers.remove(header::CONTENT_ENCODING);
                head.headers.remove(header::CONTENT_LENGTH);
                body = full(decoded);
            }
            Err(message) => {
                let answer = final_answer(api_error(
                    StatusCode::BAD_GATEWAY,
                    "api_error",
                    &message,
                    None,
                ));
                return (answer, model);
            }
        }
    }
    let response = Response::from_parts(head, body);
    let response = if failed_here {
        final_answer(response)
    } else {
        response
    };
    (response, model)
}

fn too_large(max_body_bytes: usize) -> Response<GatewayBody> {
    refusal(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request_too_large",
        &format!("request body exceeds {max_body_bytes} bytes"),
    )
}

/// The client's request headers over the limits: 431 in the API's shape.
fn check_headers(headers: &HeaderMap, max_bytes: usize) -> Option<Response<GatewayBody>> {
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if bytes > max_bytes || headers.len() > MAX_HEADERS {
        return Some(refusal(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "invalid_request_error",
            &format!(
                "request headers too large: {} headers, {bytes} bytes (limits {MAX_HEADERS} and {max_bytes})",
                headers.len()
            ),
        ));
    }
    None
}

/// Why a path is not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathRefusal {
    /// Outside `/v1/` once its dot segments are resolved.
    Outside,
    /// An encoded `/`, `\` or NUL, which some servers decode after routing.
    Encoded,
}

/// The path with `.` and `..` segments (plain or percent-encoded) resolved
/// and empty segments dropped, when it stays under `/v1/`.
pub(crate) fn normalize_path(path: &str) -> Result<String, PathRefusal> {
    let lower = path.to_ascii_lowercase();
    if path.contains('\\') || ["%2f", "%5c", "%00"].iter().any(|e| lower.contains(e)) {
        return Err(PathRefusal::Encoded);
    }
    let mut kept: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        match decoded.as_str() {
            "" | "." => {}
            ".." => {
                if kept.pop().is_none() {
                    return Err(PathRefusal::Outside);
                }
            }
            _ => kept.push(segment),
        }
    }
    if kept.len() < 2 || kept[0] != "v1" {
        return Err(PathRefusal::Outside);
    }
    let mut normal = String::with_capacity(path.len());
    for segment in kept {
        normal.push('/');
        normal.push_str(segment);
    }
    if path.ends_with('/') {
        normal.push('/');
    }
    Ok(normal)
}

/// Which content codings the client reads (identity always).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Accepts {
    gzip: bool,
    deflate: bool,
}

impl Accepts {
    pub(crate) fn from_headers(headers: &HeaderMap) -> Self {
        let mut accepts = Self::default();
        for value in headers.get_all(header::ACCEPT_ENCODING) {
            let Ok(value) = value.to_str() else { continue };
            for item in value.split(',') {
                let mut params = item.split(';');
                let coding = params.next().unwrap_or("").trim().to_ascii_lowercase();
                let refused = params.any(|p| {
                    p.trim()
                        .strip_prefix("q=")
                        .and_then(|q| q.trim().parse::<f32>().ok())
                        .is_some_and(|q| q <= 0.0)
                });
                if refused {
                    continue;
                }
                match coding.as_str() {
                    "gzip" | "x-gzip" => accepts.gzip = true,
                    "deflate" => accepts.deflate = true,
                    "*" => {
                        accepts.gzip = true;
                        accepts.deflate = true;
                    }
                    _ => {}
                }
            }
        }
        accepts
    }

    /// What to ask the upstream for: the codings both sides read.
    pub(crate) fn upstream_value(self) -> Option<HeaderValue> {
        match (self.gzip, self.deflate) {
            (true, true) => Some(HeaderValue::from_static("gzip, deflate")),
            (true, false) => Some(HeaderValue::from_static("gzip")),
            (false, true) => Some(HeaderValue::from_static("deflate")),
            (false, false) => None,
        }
    }

    /// The upstream's coding when the client cannot read it and the gateway can decode it.
    fn unreadable(self, headers: &HeaderMap) -> Option<Coding> {
        let coding = headers.get(header::CONTENT_ENCODING)?.to_str().ok()?.trim();
        if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            (!self.gzip).then_some(Coding::Gzip)
        } else if coding.eq_ignore_ascii_case("deflate") {
            (!self.deflate).then_some(Coding::Deflate)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Coding {
    Gzip,
    Deflate,
}

/// A decoded body may be at most this large (a bomb stops here).
const MAX_DECODED: u64 = 64 * 1024 * 1024;

async fn decode_whole(mut body: GatewayBody, coding: Coding) -> Result<Bytes, String> {
    let mut raw = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| format!("reading the upstream's compressed body failed: {e}"))?;
        if let Ok(data) = frame.into_data() {
            raw.extend_from_slice(&data);
        }
        if raw.len() > 2 * crate::config::API_MAX_BODY {
            return Err("the upstream's compressed body is too large".to_owned());
        }
    }
    let mut decoded = Vec::new();
    let result = match coding {
        Coding::Gzip => flate2::read::GzDecoder::new(&raw[..])
            .take(MAX_DECODED)
            .read_to_end(&mut decoded),
        Coding::Deflate => flate2::read::ZlibDecoder::new(&raw[..])
            .take(MAX_DECODED)
            .read_to_end(&mut decoded)
            .or_else(|_| {
                decoded.clear();
                flate2::read::DeflateDecoder::new(&raw[..])
                    .take(MAX_DECODED)
                    .read_to_end(&mut decoded)
            }),
    };
    result.map_err(|e| format!("the upstream's compressed body could not be decoded: {e}"))?;
    Ok(Bytes::from(decoded))
}

/// The gateway's own failure, in the API's error shape, final (see
/// [`final_answer`]); a refusal of the queue also says when to come back.
fn error_response(error: &Error) -> Response<GatewayBody> {
    let message = error.to_string();
    let response = match error.kind() {
        ErrorKind::QueueFull | ErrorKind::QueueTimeout => api_error(
            StatusCode::from_u16(529).expect("529 is a status"),
            "overloaded_error",
            &message,
            Some(5),
        ),
        ErrorKind::DeadlineExceeded => {
            api_error(StatusCode::GATEWAY_TIMEOUT, "timeout_error", &message, None)
        }
        ErrorKind::PacingQueueFull | ErrorKind::PacingTimeout => api_error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            &message,
            Some(5),
        ),
        ErrorKind::PacingTooLarge => api_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &message,
            None,
        ),
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
    };
    final_answer(response)
}

/// Tells the SDK not to run the gateway's retry loop again: the official
/// SDKs honour `x-should-retry: false` over the status.
pub(crate) fn final_answer(mut response: Response<GatewayBody>) -> Response<GatewayBody> {
    response
        .headers_mut()
        .insert(headers::X_SHOULD_RETRY, HeaderValue::from_static("false"));
    response
}

/// A request the gateway will not forward: final, as the same request
/// would be refused again.
pub(crate) fn refusal(status: StatusCode, kind: &str, message: &str) -> Response<GatewayBody> {
    final_answer(api_error(status, kind, message, None))
}

pub(crate) fn full(bytes: Bytes) -> GatewayBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// The API's error body: `{"type":"error","error":{"type":..,"message":..}}`.
pub(crate) fn api_error_body(kind: &str, message: &str) -> Bytes {
    let body = serde_json::json!({"type": "error", "error": {"type": kind, "message": message}});
    Bytes::from(body.to_string())
}

pub(crate) fn api_error(
    status: StatusCode,
    kind: &str,
    message: &str,
    retry_after: Option<u64>,
) -> Response<GatewayBody> {
    let mut response = Response::new(full(api_error_body(kind, message)));
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

/// How long the gateway waited, for logs.
pub(crate) fn millis(elapsed: Duration) -> f64 {
    elapsed.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_cannot_leave_v1() {
        for (path, expected) in [
            ("/v1/messages", Ok("/v1/messages")),
            ("/v1/./messages", Ok("/v1/messages")),
            ("/v1//messages", Ok("/v1/messages")),
            ("/v1/x/../messages", Ok("/v1/messages")),
            ("/v1/models/", Ok("/v1/models/")),
            ("/v1/../x", Err(PathRefusal::Outside)),
            ("/v1/%2e%2e/x", Err(PathRefusal::Outside)),
            ("/v1/.%2E/admin", Err(PathRefusal::Outside)),
            ("/v1/../../etc/passwd", Err(PathRefusal::Outside)),
            ("/v1", Err(PathRefusal::Outside)),
            ("/v1/", Err(PathRefusal::Outside)),
            ("/v2/messages", Err(PathRefusal::Outside)),
            ("/v1/..%2fadmin", Err(PathRefusal::Encoded)),
            ("/v1/a%5c..%5cb", Err(PathRefusal::Encoded)),
            ("/v1/messages%00", Err(PathRefusal::Encoded)),
        ] {
            assert_eq!(
                normalize_path(path).as_deref().map_err(|e| *e),
                expected,
                "{path}"
            );
        }
    }

    #[test]
    fn accept_encoding_keeps_what_both_sides_read() {
        let accepts = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_str(value).unwrap(),
            );
            Accepts::from_headers(&headers).upstream_value()
        };
        assert_eq!(accepts("gzip, deflate, br, zstd").unwrap(), "gzip, deflate");
        assert_eq!(accepts("br").as_ref(), None);
        assert_eq!(accepts("gzip;q=0, deflate").unwrap(), "deflate");
        assert_eq!(accepts("identity").as_ref(), None);
        assert_eq!(accepts("*").unwrap(), "gzip, deflate");
        assert_eq!(
            Accepts::from_headers(&HeaderMap::new()).upstream_value(),
            None
        );
    }
}
