//! What an outcome means, and whether it is worth another attempt.
//!
//! [`classify`] turns a status, the response headers and, optionally, a
//! bounded prefix of the body into a [`Classification`]: the [`Class`] that
//! decides which repair applies (a 529 is not a 429 is not a 500) and the
//! retry verdict after the server's own `x-should-retry` has had its say.
//! Tracing, retrying, concurrency and fallback all read the same verdict.
//!
//! ```
//! use http::{HeaderMap, StatusCode};
//! use tower_overload::classify::{classify, Class};
//!
//! let headers = HeaderMap::new();
//! let verdict = classify(StatusCode::from_u16(529).unwrap(), &headers, None);
//! assert_eq!(verdict.class, Class::Overloaded);
//! assert!(verdict.retryable);
//!
//! // A gateway's 500 whose body says the API is overloaded is an overload.
//! let body = br#"{"type":"error","error":{"type":"api_error","message":"Overloaded"}}"#;
//! let verdict = classify(StatusCode::INTERNAL_SERVER_ERROR, &headers, Some(body));
//! assert_eq!(verdict.class, Class::Overloaded);
//! ```

use std::borrow::Cow;
use std::fmt;
use std::io::Read;
use std::time::{Duration, SystemTime};

use http::header::{CONTENT_ENCODING, RETRY_AFTER};
use http::{HeaderMap, StatusCode};

use crate::headers::{self, RETRY_AFTER_MS, RateLimits, RequestId};
use crate::json;

/// The most body bytes [`error_type`] and [`classify`] look at. Error bodies
/// are a few hundred bytes; anything past this is not an error body worth reading.
pub const MAX_SNIFF_BYTES: usize = 64 * 1024;

/// Which repair an outcome needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Class {
    /// A success (2xx), or any status that is not an error (1xx, 3xx).
    Success,
    /// The platform is at capacity for this model, for everyone (529
    /// `overloaded_error`, or a 5xx whose body says overloaded). Retry slowly
    /// with full jitter, lower concurrency, maybe fall back to another model.
    Overloaded,
    /// Your organisation's quota (429 `rate_limit_error`). Wait what the server says.
    RateLimited,
    /// The server failed (500 `api_error`, 502, 503 and other 5xx). Retry a few times.
    ServerError,
    /// The request timed out (504 `timeout_error`, 408). Retry with backoff.
    Timeout,
    /// A conflict (409). The official SDKs retry it.
    Conflict,
    /// The request itself is wrong or not allowed. Never retried by default.
    Client(ClientKind),
    /// The inner service failed before any response (connection refused or
    /// reset, a client-side timeout): see the retry layer's error classifier.
    Transport,
}

/// What kind of client error a response is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ClientKind {
    /// 400 `invalid_request_error`.
    InvalidRequest,
    /// 401 `authentication_error`.
    Authentication,
    /// 402 `billing_error`.
    Billing,
    /// 403 `permission_error`.
    Permission,
    /// 404 `not_found_error`.
    NotFound,
    /// 413 `request_too_large`.
    RequestTooLarge,
    /// A 429 without `retry-after` whose body says a spend, credit or billing
    /// limit was reached: waiting will not help, a person must act.
    SpendLimit,
    /// Any other 4xx.
    Other,
}

impl Class {
    /// How many [`index`](Self::index) values there are: the length of an
    /// array with one entry per class.
    ///
    /// ```
    /// use tower_overload::classify::Class;
    /// let counts = [0u32; Class::COUNT];
    /// assert_eq!(counts.len(), 8);
    /// ```
    pub const COUNT: usize = 8;

    /// This class's place in an array of [`COUNT`](Self::COUNT) entries, one
    /// per class (every client error shares one): the crate's one table
    /// from classes to slots.
    ///
    /// ```
    /// use tower_overload::classify::{Class, ClientKind};
    /// assert_eq!(Class::Success.index(), 0);
    /// assert_eq!(
    ///     Class::Client(ClientKind::NotFound).index(),
    ///     Class::Client(ClientKind::Billing).index()
    /// );
    /// assert!(Class::Transport.index() < Class::COUNT);
    /// ```
    pub const fn index(self) -> usize {
        match self {
            Class::Success => 0,
            Class::Overloaded => 1,
            Class::RateLimited => 2,
            Class::ServerError => 3,
            Class::Timeout => 4,
            Class::Conflict => 5,
            Class::Client(_) => 6,
            Class::Transport => 7,
        }
    }

    /// Whether this class is retried when the server gives no verdict.
    ///
    /// ```
    /// use tower_overload::classify::{Class, ClientKind};
    /// assert!(Class::Overloaded.is_retryable_by_default());
    /// assert!(!Class::Client(ClientKind::InvalidRequest).is_retryable_by_default());
    /// ```
    pub const fn is_retryable_by_default(self) -> bool {
        matches!(
            self,
            Class::Overloaded
                | Class::RateLimited
                | Class::ServerError
                | Class::Timeout
                | Class::Conflict
                | Class::Transport
        )
    }

    /// Whether this class is a failure of any kind.
    ///
    /// ```
    /// use tower_overload::classify::Class;
    /// assert!(!Class::Success.is_failure());
    /// assert!(Class::Timeout.is_failure());
    /// ```
    pub const fn is_failure(self) -> bool {
        !matches!(self, Class::Success)
    }

    /// A short, stable name for logs and metrics, e.g. `"overloaded"`.
    ///
    /// ```
    /// use tower_overload::classify::{Class, ClientKind};
    /// assert_eq!(Class::RateLimited.as_str(), "rate_limited");
    /// assert_eq!(Class::Client(ClientKind::SpendLimit).as_str(), "client_spend_limit");
    /// ```
    pub const fn as_str(self) -> &'static str {
        match self {
            Class::Success => "success",
            Class::Overloaded => "overloaded",
            Class::RateLimited => "rate_limited",
            Class::ServerError => "server_error",
            Class::Timeout => "timeout",
            Class::Conflict => "conflict",
            Class::Transport => "transport",
            Class::Client(kind) => match kind {
                ClientKind::InvalidRequest => "client_invalid_request",
                ClientKind::Authentication => "client_authentication",
                ClientKind::Billing => "client_billing",
                ClientKind::Permission => "client_permission",
                ClientKind::NotFound => "client_not_found",
                ClientKind::RequestTooLarge => "client_request_too_large",
                ClientKind::SpendLimit => "client_spend_limit",
                ClientKind::Other => "client_other",
            },
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The verdict on one outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classification {
    /// Which repair applies.
    pub class: Class,
    /// Whether another attempt may help: the class's default, overridden by
    /// the server's `x-should-retry`. A success is never retryable.
    pub retryable: bool,
    /// The server's `x-should-retry` verdict, when it gave one.
    pub server_verdict: Option<bool>,
}

impl Classification {
    /// The verdict for an error of the inner service (no response at all).
    ///
    /// ```
    /// use tower_overload::classify::{Class, Classification};
    /// let verdict = Classification::transport(true);
    /// assert_eq!(verdict.class, Class::Transport);
    /// assert!(verdict.retryable);
    /// ```
    pub const fn transport(retryable: bool) -> Self {
        Self {
            class: Class::Transport,
            retryable,
            server_verdict: None,
        }
    }
}

/// What the server said about an outcome, beyond its class: read once per
/// failed attempt by the layers that act on it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hints {
    /// The delay the server asked for (`retry-after-ms` / `retry-after`), unbounded.
    pub server_delay: Option<Duration>,
    /// The server's `x-should-retry` verdict.
    pub should_retry: Option<bool>,
    /// The attempt's `request-id`.
    pub request_id: Option<RequestId>,
    /// The `anthropic-ratelimit-*` state, and the OpenAI-style `x-ratelimit-*` windows.
    pub rate_limits: RateLimits,
}

impl Hints {
    /// Reads every hint from `headers`; `now` anchors HTTP-dates.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use http::HeaderMap;
    /// use tower_overload::classify::Hints;
    ///
    /// let mut map = HeaderMap::new();
    /// map.insert("retry-after", "3".parse().unwrap());
    /// map.insert("request-id", "req_1".parse().unwrap());
    /// let hints = Hints::from_headers(&map, SystemTime::now());
    /// assert_eq!(hints.server_delay, Some(Duration::from_secs(3)));
    /// assert_eq!(hints.request_id.unwrap().as_str(), "req_1");
    /// assert!(hints.rate_limits.is_empty());
    /// ```
    pub fn from_headers(headers: &HeaderMap, now: SystemTime) -> Self {
        Self {
            server_delay: headers::server_delay(headers, now),
            should_retry: headers::should_retry(headers),
            request_id: headers::request_id(headers),
            rate_limits: RateLimits::from_headers_at(headers, now),
        }
    }

    /// How long the server wants the client to wait: its explicit delay, else
    /// the time until an exhausted rate-limit window resets.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use http::HeaderMap;
    /// use tower_overload::classify::Hints;
    ///
    /// let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_417_200); // 2026-11-23T07:00:00Z
    /// let mut map = HeaderMap::new();
    /// map.insert("anthropic-ratelimit-requests-remaining", "0".parse().unwrap());
    /// map.insert("anthropic-ratelimit-requests-reset", "2026-11-23T07:00:12Z".parse().unwrap());
    /// assert_eq!(Hints::from_headers(&map, now).wait(now), Some(Duration::from_secs(12)));
    /// ```
    pub fn wait(&self, now: SystemTime) -> Option<Duration> {
        self.server_delay
            .or_else(|| self.rate_limits.exhausted_for(now))
    }
}

/// Classifies a response from its status, headers and, optionally, a prefix of
/// its body (at most [`MAX_SNIFF_BYTES`] are read).
///
/// The body is needed only for two cases the status cannot tell: a 5xx that
/// says overloaded (`overloaded_error`, or `api_error` with message
/// "Overloaded", as gateways and the API itself sometimes send), and a 429
/// without `retry-after` that says a spend, credit or billing limit was
/// reached (not retryable). Without a body those fall back to their status.
///
/// ```
/// use http::{HeaderMap, HeaderValue, StatusCode};
/// use tower_overload::classify::{classify, Class, ClientKind};
///
/// let mut headers = HeaderMap::new();
/// headers.insert("x-should-retry", HeaderValue::from_static("false"));
/// let verdict = classify(StatusCode::from_u16(529).unwrap(), &headers, None);
/// assert_eq!(verdict.class, Class::Overloaded);
/// assert!(!verdict.retryable, "the server's verdict wins");
///
/// let body = br#"{"type":"error","error":{"type":"rate_limit_error","message":"enforced_spend_limit_reached"}}"#;
/// let verdict = classify(StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new(), Some(body));
/// assert_eq!(verdict.class, Class::Client(ClientKind::SpendLimit));
/// assert!(!verdict.retryable);
/// ```
pub fn classify(status: StatusCode, headers: &HeaderMap, body: Option<&[u8]>) -> Classification {
    let class = class_of(status, headers, body);
    if class == Class::Success {
        return Classification {
            class,
            retryable: false,
            server_verdict: None,
        };
    }
    let server_verdict = if headers.is_empty() {
        None
    } else {
        headers::should_retry(headers)
    };
    Classification {
        class,
        retryable: server_verdict.unwrap_or(class.is_retryable_by_default()),
        server_verdict,
    }
}

/// [`classify`] with a bounded prefix of the body as it came on the wire,
/// decoded first when `content-encoding` says it is compressed.
///
/// `gzip` (and `x-gzip`) and `deflate` (zlib-wrapped as HTTP means it, or
/// raw deflate as some servers send it) are decoded, at most
/// [`MAX_SNIFF_BYTES`] of output, so a small bomb cannot expand into memory.
/// A stream that does not decode, several stacked encodings, and encodings
/// this crate does not decode (`br`, `zstd`, ...) are classified by status and
/// headers alone, as if there were no body. Nothing here changes the body the
/// caller receives: that is always the bytes as they came.
///
/// ```
/// use std::io::Write;
/// use http::{HeaderMap, HeaderValue, StatusCode};
/// use tower_overload::classify::{classify_body, Class};
///
/// let body = br#"{"type":"error","error":{"type":"api_error","message":"Overloaded"}}"#;
/// let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
/// gzip.write_all(body).unwrap();
/// let compressed = gzip.finish().unwrap();
///
/// let mut headers = HeaderMap::new();
/// headers.insert("content-encoding", HeaderValue::from_static("gzip"));
/// let verdict = classify_body(StatusCode::INTERNAL_SERVER_ERROR, &headers, &compressed);
/// assert_eq!(verdict.class, Class::Overloaded);
///
/// headers.insert("content-encoding", HeaderValue::from_static("br"));
/// let verdict = classify_body(StatusCode::INTERNAL_SERVER_ERROR, &headers, &compressed);
/// assert_eq!(verdict.class, Class::ServerError, "undecodable: status only");
/// ```
pub fn classify_body(status: StatusCode, headers: &HeaderMap, raw_prefix: &[u8]) -> Classification {
    match decoded_prefix(headers, raw_prefix) {
        Some(body) => classify(status, headers, Some(&body)),
        None => classify(status, headers, None),
    }
}

/// The body prefix to read, decoded as `content-encoding` says; `None` when
/// it cannot be decoded.
fn decoded_prefix<'a>(headers: &HeaderMap, raw: &'a [u8]) -> Option<Cow<'a, [u8]>> {
    let mut codings = headers
        .get_all(CONTENT_ENCODING)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&c| c == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case(b"identity"));
    let Some(coding) = codings.next() else {
        return Some(Cow::Borrowed(raw));
    };
    if codings.next().is_some() {
        return None;
    }
    let raw = sniff_window(raw);
    let decoded = if coding.eq_ignore_ascii_case(b"gzip") || coding.eq_ignore_ascii_case(b"x-gzip")
    {
        read_bounded(flate2::read::GzDecoder::new(raw))
    } else if coding.eq_ignore_ascii_case(b"deflate") {
        read_bounded(flate2::read::ZlibDecoder::new(raw))
            .or_else(|| read_bounded(flate2::read::DeflateDecoder::new(raw)))
    } else {
        None
    };
    decoded.map(Cow::Owned)
}

/// Up to [`MAX_SNIFF_BYTES`] of what `decoder` yields; `None` if it fails first.
fn read_bounded(decoder: impl Read) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    // `take` stops the decoder at the cap: a bomb costs at most this much output.
    decoder
        .take(MAX_SNIFF_BYTES as u64)
        .read_to_end(&mut out)
        .ok()?;
    Some(out)
}

/// Whether a prefix of the body can change the class `classify` gave from the
/// status and headers alone: a 5xx may say overloaded, a 429 without a delay
/// may be a spend limit. The server's `x-should-retry` plays no part: it says
/// whether to retry, the body says which class (and so the backoff, the
/// fallback and the adaptive limit).
#[cfg_attr(not(feature = "retry"), allow(dead_code))]
pub(crate) fn body_may_change(class: Class, headers: &HeaderMap) -> bool {
    match class {
        Class::ServerError => true,
        Class::RateLimited => {
            !headers.contains_key(RETRY_AFTER) && !headers.contains_key(RETRY_AFTER_MS)
        }
        _ => false,
    }
}

fn class_of(status: StatusCode, headers: &HeaderMap, body: Option<&[u8]>) -> Class {
    let code = status.as_u16();
    match code {
        529 => Class::Overloaded,
        429 => {
            let told_when =
                headers.contains_key(RETRY_AFTER) || headers.contains_key(RETRY_AFTER_MS);
            if !told_when && body.is_some_and(says_spend_limit) {
                Class::Client(ClientKind::SpendLimit)
            } else {
                Class::RateLimited
            }
        }
        408 | 504 => Class::Timeout,
        409 => Class::Conflict,
        400 => Class::Client(ClientKind::InvalidRequest),
        401 => Class::Client(ClientKind::Authentication),
        402 => Class::Client(ClientKind::Billing),
        403 => Class::Client(ClientKind::Permission),
        404 => Class::Client(ClientKind::NotFound),
        413 => Class::Client(ClientKind::RequestTooLarge),
        _ if status.is_client_error() => Class::Client(ClientKind::Other),
        _ if status.is_server_error() => {
            if body.is_some_and(says_overloaded) {
                Class::Overloaded
            } else {
                Class::ServerError
            }
        }
        _ => Class::Success,
    }
}

fn says_overloaded(body: &[u8]) -> bool {
    let Some(error) = ErrorObject::find(body) else {
        return false;
    };
    if error.kind() == Some("overloaded_error") {
        return true;
    }
    let Some(message) = error.message() else {
        return false;
    };
    if message.trim_ascii().eq_ignore_ascii_case(b"overloaded") {
        return true;
    }
    // OpenAI-style servers say it in a sentence ("The engine is currently
    // overloaded, please try again later"). Only a server-error type and a
    // phrase about the service's state count: "overloaded" alone appears in
    // messages about a request ("context overloaded with images").
    const PHRASES: [&[u8]; 4] = [
        b"currently overloaded",
        b"is overloaded",
        b"are overloaded",
        b"engine_overloaded",
    ];
    let server_kind = matches!(
        error.kind(),
        None | Some("server_error" | "api_error" | "service_unavailable" | "engine_overloaded")
    );
    server_kind
        && PHRASES
            .iter()
            .any(|phrase| contains_ignore_ascii_case(message, phrase))
}

fn says_spend_limit(body: &[u8]) -> bool {
    const MARKERS: [&[u8]; 6] = [
        b"spend_limit",
        b"spend limit",
        b"credit balance",
        b"credit limit",
        b"billing",
        b"insufficient_quota",
    ];
    let body = sniff_window(body);
    MARKERS
        .iter()
        .any(|marker| contains_ignore_ascii_case(body, marker))
}

fn contains_ignore_ascii_case(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window.eq_ignore_ascii_case(needle))
}

fn sniff_window(body: &[u8]) -> &[u8] {
    &body[..body.len().min(MAX_SNIFF_BYTES)]
}

/// The `error` object of an error body, read member by member on demand.
struct ErrorObject<'a> {
    json: &'a [u8],
    start: usize,
}

impl<'a> ErrorObject<'a> {
    fn find(body: &'a [u8]) -> Option<Self> {
        let json = json_payload(sniff_window(body))?;
        let start = json::find_member(json, 0, "error")?;
        Some(Self { json, start })
    }

    fn string_member(&self, key: &str) -> Option<json::RawString<'a>> {
        let at = json::find_member(self.json, self.start, key)?;
        json::string_at(self.json, at).map(|(string, _)| string)
    }

    /// `error.type`, when it is a plain (escape-free) string.
    fn kind(&self) -> Option<&'a str> {
        let kind = self.string_member("type").filter(|s| !s.escaped)?;
        std::str::from_utf8(kind.raw).ok()
    }

    /// `error.message`, raw.
    fn message(&self) -> Option<&'a [u8]> {
        self.string_member("message").map(|s| s.raw)
    }
}

/// The JSON text of a body: the body itself, or the first `data:` line of an SSE block.
fn json_payload(body: &[u8]) -> Option<&[u8]> {
    let start = json::skip_ws(body, 0);
    if body.get(start) == Some(&b'{') {
        return Some(&body[start..]);
    }
    for line in body.split(|&c| c == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(data) = line.strip_prefix(b"data:") {
            return Some(data.strip_prefix(b" ").unwrap_or(data));
        }
        let is_sse_line = line.is_empty()
            || line.starts_with(b":")
            || line.starts_with(b"event:")
            || line.starts_with(b"id:")
            || line.starts_with(b"retry:");
        if !is_sse_line {
            return None;
        }
    }
    None
}

/// The `error.type` of a JSON error body, e.g. `"overloaded_error"`.
///
/// Also reads an SSE block (`event: error` then `data: {...}`): the first
/// `data:` line is taken as the JSON. `None` for anything else: no top-level
/// `error` object, a `type` that is not a direct member of it (a nested one
/// inside `error.details` does not count), a non-string or escaped type,
/// broken JSON before the type. At most [`MAX_SNIFF_BYTES`] are read and the
/// scan is linear and non-recursive, so hostile input costs bounded work.
///
/// ```
/// use tower_overload::classify::error_type;
///
/// let body = br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_1"}"#;
/// assert_eq!(error_type(body), Some("overloaded_error"));
///
/// let sse = b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
/// assert_eq!(error_type(sse), Some("overloaded_error"));
///
/// assert_eq!(error_type(br#"{"error":{"details":{"type":"nested"}}}"#), None);
/// assert_eq!(error_type(b"<html>502 Bad Gateway</html>"), None);
/// ```
pub fn error_type(body: &[u8]) -> Option<&str> {
    ErrorObject::find(body)?.kind()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    fn status(code: u16) -> StatusCode {
        StatusCode::from_u16(code).unwrap()
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_static(k),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    const OVERLOADED_BODY: &[u8] =
        br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_1"}"#;
    const API_ERROR_OVERLOADED: &[u8] =
        br#"{"type":"error","error":{"type":"api_error","message":"Overloaded"}}"#;
    const API_ERROR: &[u8] =
        br#"{"type":"error","error":{"type":"api_error","message":"Internal server error"}}"#;
    const SPEND_LIMIT: &[u8] = br#"{"type":"error","error":{"type":"rate_limit_error","message":"enforced_spend_limit_reached: raise your limit"}}"#;
    const OPENAI_QUOTA: &[u8] = br#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota"}}"#;

    #[test]
    fn classification_table() {
        use Class::*;
        use ClientKind::*;
        let none = HeaderMap::new();
        type Case<'a> = (u16, &'a HeaderMap, Option<&'a [u8]>, Class, bool);
        let cases: &[Case<'_>] = &[
            (200, &none, None, Success, false),
            (204, &none, None, Success, false),
            (304, &none, None, Success, false),
            (529, &none, None, Overloaded, true),
            (529, &none, Some(OVERLOADED_BODY), Overloaded, true),
            (429, &none, None, RateLimited, true),
            (500, &none, None, ServerError, true),
            (500, &none, Some(API_ERROR), ServerError, true),
            (500, &none, Some(API_ERROR_OVERLOADED), Overloaded, true),
            (503, &none, Some(OVERLOADED_BODY), Overloaded, true),
            (
                502,
                &none,
                Some(b"<html>Bad Gateway</html>"),
                ServerError,
                true,
            ),
            (502, &none, None, ServerError, true),
            (503, &none, None, ServerError, true),
            (501, &none, None, ServerError, true),
            (504, &none, None, Timeout, true),
            (408, &none, None, Timeout, true),
            (409, &none, None, Conflict, true),
            (400, &none, None, Client(InvalidRequest), false),
            (401, &none, None, Client(Authentication), false),
            (402, &none, None, Client(Billing), false),
            (403, &none, None, Client(Permission), false),
            (404, &none, None, Client(NotFound), false),
            (413, &none, None, Client(RequestTooLarge), false),
            (422, &none, None, Client(Other), false),
            (429, &none, Some(SPEND_LIMIT), Client(SpendLimit), false),
            (429, &none, Some(OPENAI_QUOTA), Client(SpendLimit), false),
            // An overloaded body on a 400 does not make it retryable.
            (
                400,
                &none,
                Some(OVERLOADED_BODY),
                Client(InvalidRequest),
                false,
            ),
        ];
        for (code, headers, body, class, retryable) in cases {
            let verdict = classify(status(*code), headers, *body);
            assert_eq!(verdict.class, *class, "{code} {body:?}");
            assert_eq!(verdict.retryable, *retryable, "{code} {body:?}");
        }
    }

    #[test]
    fn server_verdict_does_not_hide_the_body_defect_6() {
        for verdict in ["true", "false"] {
            let map = headers(&[("x-should-retry", verdict)]);
            let status_only = classify(status(500), &map, None);
            assert!(body_may_change(status_only.class, &map), "{verdict}");
            let read = classify(status(500), &map, Some(API_ERROR_OVERLOADED));
            assert_eq!(read.class, Class::Overloaded, "{verdict}");
            assert_eq!(read.retryable, verdict == "true");
            let spend = classify(status(429), &map, Some(SPEND_LIMIT));
            assert!(body_may_change(Class::RateLimited, &map));
            assert_eq!(spend.class, Class::Client(ClientKind::SpendLimit));
        }
        let told = headers(&[("retry-after", "1")]);
        assert!(!body_may_change(Class::RateLimited, &told));
        assert!(!body_may_change(Class::Overloaded, &HeaderMap::new()));
    }

    fn compress(encoding: &str, body: &[u8]) -> Vec<u8> {
        use flate2::Compression;
        use std::io::Write;
        match encoding {
            "gzip" => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), Compression::default());
                e.write_all(body).unwrap();
                e.finish().unwrap()
            }
            "deflate" => {
                let mut e = flate2::write::ZlibEncoder::new(Vec::new(), Compression::default());
                e.write_all(body).unwrap();
                e.finish().unwrap()
            }
            "raw-deflate" => {
                let mut e = flate2::write::DeflateEncoder::new(Vec::new(), Compression::default());
                e.write_all(body).unwrap();
                e.finish().unwrap()
            }
            _ => unreachable!(),
        }
    }

    #[test]
    fn compressed_bodies_are_read_decoded_defect_7() {
        use Class::*;
        let gz = |body| compress("gzip", body);
        let cases: Vec<(u16, &str, Vec<u8>, Class)> = vec![
            (500, "gzip", gz(API_ERROR_OVERLOADED), Overloaded),
            (500, "GZIP", gz(API_ERROR_OVERLOADED), Overloaded),
            (500, "x-gzip", gz(API_ERROR_OVERLOADED), Overloaded),
            (503, "gzip", gz(OVERLOADED_BODY), Overloaded),
            (
                500,
                "deflate",
                compress("deflate", API_ERROR_OVERLOADED),
                Overloaded,
            ),
            (
                500,
                "deflate",
                compress("raw-deflate", API_ERROR_OVERLOADED),
                Overloaded,
            ),
            (500, "identity", API_ERROR_OVERLOADED.to_vec(), Overloaded),
            (500, "gzip", gz(API_ERROR), ServerError),
            (429, "gzip", gz(SPEND_LIMIT), Client(ClientKind::SpendLimit)),
            (
                429,
                " gzip ",
                gz(OPENAI_QUOTA),
                Client(ClientKind::SpendLimit),
            ),
            // Undecodable: the status alone.
            (500, "br", gz(API_ERROR_OVERLOADED), ServerError),
            (500, "zstd", API_ERROR_OVERLOADED.to_vec(), ServerError),
            (500, "gzip", API_ERROR_OVERLOADED.to_vec(), ServerError),
            (
                500,
                "gzip, gzip",
                gz(&gz(API_ERROR_OVERLOADED)),
                ServerError,
            ),
            (429, "br", SPEND_LIMIT.to_vec(), RateLimited),
            (500, "gzip", Vec::new(), ServerError),
        ];
        for (code, encoding, body, class) in cases {
            let map: HeaderMap = [(CONTENT_ENCODING, HeaderValue::from_str(encoding).unwrap())]
                .into_iter()
                .collect();
            assert_eq!(
                classify_body(status(code), &map, &body).class,
                class,
                "{code} {encoding}"
            );
        }
        assert_eq!(
            classify_body(status(500), &HeaderMap::new(), API_ERROR_OVERLOADED).class,
            Overloaded
        );
    }

    #[test]
    fn broken_gzip_falls_back_to_the_status_defect_7() {
        let good = compress("gzip", API_ERROR_OVERLOADED);
        let map: HeaderMap = [(CONTENT_ENCODING, HeaderValue::from_static("gzip"))]
            .into_iter()
            .collect();
        for cut in 0..good.len() {
            let verdict = classify_body(status(500), &map, &good[..cut]);
            assert_eq!(verdict.class, Class::ServerError, "cut at {cut}");
        }
        for flip in 0..good.len() {
            let mut bad = good.clone();
            bad[flip] ^= 0x55;
            // Whatever a corrupt stream decodes to, it never panics.
            let _ = classify_body(status(500), &map, &bad);
        }
    }

    #[test]
    fn a_gzip_bomb_decodes_at_most_the_sniff_window_defect_7() {
        // 64 MiB of zeros compress to about 64 KiB; only the window is decoded.
        let mut bomb = br#"{"type":"error","error":{"type":"overloaded_error","pad":""#.to_vec();
        bomb.resize(64 << 20, b' ');
        let compressed = compress("gzip", &bomb);
        assert!(compressed.len() < MAX_SNIFF_BYTES * 2);
        let map: HeaderMap = [(CONTENT_ENCODING, HeaderValue::from_static("gzip"))]
            .into_iter()
            .collect();
        let decoded = decoded_prefix(&map, &compressed).unwrap();
        assert_eq!(decoded.len(), MAX_SNIFF_BYTES);
        // The type came before the padding, inside the window.
        assert_eq!(error_type(&decoded), Some("overloaded_error"));
    }

    #[test]
    fn openai_style_overloads_defect_11() {
        let body = |kind: &str, message: &str| {
            serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
                .to_string()
        };
        let cases = [
            (
                503,
                body(
                    "server_error",
                    "The engine is currently overloaded, please try again later",
                ),
                Class::Overloaded,
            ),
            (
                500,
                body(
                    "server_error",
                    "That model is currently overloaded with other requests. You can retry your request.",
                ),
                Class::Overloaded,
            ),
            (
                503,
                body("server_error", "The server is overloaded or not ready yet."),
                Class::Overloaded,
            ),
            (
                503,
                r#"{"error":{"message":"The engine is currently overloaded"}}"#.to_owned(),
                Class::Overloaded,
            ),
            (
                500,
                body(
                    "server_error",
                    "The server had an error while processing your request.",
                ),
                Class::ServerError,
            ),
            (
                500,
                body(
                    "invalid_request_error",
                    "The engine is currently overloaded",
                ),
                Class::ServerError,
            ),
            (
                500,
                body("api_error", "Prompt overloaded with images"),
                Class::ServerError,
            ),
            (
                500,
                body("server_error", "overloads: none"),
                Class::ServerError,
            ),
            (
                429,
                body("server_error", "The engine is currently overloaded"),
                Class::RateLimited,
            ),
            (
                400,
                body("server_error", "The engine is currently overloaded"),
                Class::Client(ClientKind::InvalidRequest),
            ),
        ];
        for (code, body, class) in cases {
            assert_eq!(
                classify(status(code), &HeaderMap::new(), Some(body.as_bytes())).class,
                class,
                "{code} {body}"
            );
        }
    }

    #[test]
    fn hints_prefer_the_explicit_delay() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_417_200);
        let map = headers(&[
            ("retry-after-ms", "1500"),
            ("anthropic-ratelimit-tokens-remaining", "0"),
            ("anthropic-ratelimit-tokens-reset", "2026-11-23T07:01:00Z"),
            ("x-should-retry", "true"),
        ]);
        let hints = Hints::from_headers(&map, now);
        assert_eq!(hints.wait(now), Some(Duration::from_millis(1500)));
        assert_eq!(hints.should_retry, Some(true));
        assert_eq!(
            hints.rate_limits.exhausted_for(now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            Hints::from_headers(&HeaderMap::new(), now),
            Hints::default()
        );
        assert_eq!(Hints::default().wait(now), None);
    }

    #[test]
    fn spend_limit_with_retry_after_stays_a_rate_limit() {
        for header in ["retry-after", "retry-after-ms"] {
            let verdict = classify(status(429), &headers(&[(header, "5")]), Some(SPEND_LIMIT));
            assert_eq!(verdict.class, Class::RateLimited, "{header}");
            assert!(verdict.retryable);
        }
    }

    #[test]
    fn server_verdict_overrides_status() {
        let no = headers(&[("x-should-retry", "false")]);
        let yes = headers(&[("x-should-retry", "true")]);
        let odd = headers(&[("x-should-retry", "maybe")]);
        for code in [529, 429, 500, 503, 504, 408, 409] {
            let verdict = classify(status(code), &no, None);
            assert!(!verdict.retryable, "{code}");
            assert_eq!(verdict.server_verdict, Some(false));
            assert!(classify(status(code), &odd, None).retryable, "{code}");
        }
        for code in [400, 401, 403, 404, 413] {
            let verdict = classify(status(code), &yes, None);
            assert!(verdict.retryable, "{code}");
            assert_eq!(verdict.server_verdict, Some(true));
        }
        let success = classify(StatusCode::OK, &yes, None);
        assert!(!success.retryable, "a success is never retried");
    }

    #[test]
    fn error_type_table() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (OVERLOADED_BODY, Some("overloaded_error")),
            (API_ERROR, Some("api_error")),
            (br#"  {"error" : { "message":"x" , "type" : "rate_limit_error" } }"#, Some("rate_limit_error")),
            (br#"{"type":"error","error":{"details":{"type":"nested"},"type":"api_error"}}"#, Some("api_error")),
            (br#"{"error":{"details":{"type":"nested"}}}"#, None),
            (br#"{"type":"overloaded_error"}"#, None),
            (br#"{"error":"overloaded_error"}"#, None),
            (br#"{"error":{"type":42}}"#, None),
            (br#"{"error":{"type":"a\"b"}}"#, None),
            (br#"{"error":{"type":"overloaded_error""#, Some("overloaded_error")),
            (br#"{"error":{"message":"unterminated}"#, None),
            (br#"["error",{"type":"x"}]"#, None),
            (b"", None),
            (b"{", None),
            (b"\xff\xfe", None),
            (b"<html><body>503</body></html>", None),
            (b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}\n\n", Some("overloaded_error")),
            (b"event: error\r\ndata:{\"error\":{\"type\":\"api_error\"}}\r\n\r\n", Some("api_error")),
            (b": ping\n\nevent: error\ndata: {\"error\":{\"type\":\"overloaded_error\"}}\n\n", Some("overloaded_error")),
            (b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"type\":\"message\"}}\n\n", None),
            (b"hello\ndata: {\"error\":{\"type\":\"x\"}}", None),
        ];
        for (body, expected) in cases {
            assert_eq!(
                error_type(body),
                *expected,
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn error_type_reads_a_bounded_prefix() {
        let mut body = br#"{"padding":""#.to_vec();
        body.resize(MAX_SNIFF_BYTES + 10, b'a');
        body.extend_from_slice(br#"","error":{"type":"overloaded_error"}}"#);
        assert_eq!(error_type(&body), None);
    }

    #[test]
    fn hostile_nesting_is_harmless() {
        let mut body = br#"{"error":{"details":"#.to_vec();
        body.extend(std::iter::repeat_n(b'[', 60_000));
        assert_eq!(error_type(&body), None);
        body.extend(std::iter::repeat_n(b']', 60_000));
        body.extend_from_slice(br#","type":"x"}}"#);
        assert_eq!(error_type(&body), None, "deeper than the scanner follows");
    }

    proptest! {
        #[test]
        fn error_type_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = error_type(&body);
            for encoding in ["gzip", "deflate"] {
                let map: HeaderMap = [(CONTENT_ENCODING, HeaderValue::from_static(encoding))].into_iter().collect();
                let _ = classify_body(status(500), &map, &body);
            }
            let _ = classify(status(500), &HeaderMap::new(), Some(&body));
            let _ = classify(status(429), &HeaderMap::new(), Some(&body));
        }

        #[test]
        fn error_type_matches_serde_json(kind in "[a-z_]{1,20}", message in "\\PC{0,40}", pad in 0usize..4) {
            let value = serde_json::json!({
                "type": "error",
                "pad": "x".repeat(pad),
                "error": {"message": message, "details": {"type": "nested"}, "type": kind},
            });
            let body = serde_json::to_vec(&value).unwrap();
            prop_assert_eq!(error_type(&body), Some(kind.as_str()));
            let pretty = serde_json::to_vec_pretty(&value).unwrap();
            prop_assert_eq!(error_type(&pretty), Some(kind.as_str()));
        }

        #[test]
        fn every_status_classifies(code in 100u16..1000) {
            let verdict = classify(status(code), &HeaderMap::new(), None);
            prop_assert_eq!(verdict.class == Class::Success, !(400..600).contains(&code));
        }
    }
}
