//! Typed parsing of the response headers an LLM API uses to steer its clients.
//!
//! Every function here is pure: it reads a [`HeaderMap`] (and, where a date is
//! involved, a `now` you pass in) and never panics on odd values. Garbage,
//! negative and NaN values read as absent (`None`); an infinite or overflowing
//! delay reads as [`Duration::MAX`](std::time::Duration::MAX), so the retry
//! policy's bound stops the call instead of retrying at once. Bounds (such as
//! "use a server delay only up to 60 s") belong to the retry policy, not here.
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use http::HeaderMap;
//! use tower_overload::headers;
//!
//! let mut map = HeaderMap::new();
//! map.insert("retry-after", "3".parse().unwrap());
//! map.insert("request-id", "req_011CSHoEeqs5C35K2UUqR7Fy".parse().unwrap());
//! map.insert("x-should-retry", "true".parse().unwrap());
//!
//! assert_eq!(headers::server_delay(&map, SystemTime::now()), Some(Duration::from_secs(3)));
//! assert_eq!(headers::should_retry(&map), Some(true));
//! assert_eq!(headers::request_id(&map).unwrap().as_str(), "req_011CSHoEeqs5C35K2UUqR7Fy");
//! ```

use std::fmt;
use std::time::{Duration, SystemTime};

use http::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};

use crate::time::{parse_decimal, parse_http_date, parse_rfc3339};

/// `retry-after-ms`: the server's delay in milliseconds (fractions allowed).
pub const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
/// `x-should-retry`: the server's own verdict on retrying, `true` or `false`.
pub const X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");
/// `request-id`: the id to quote in logs and support tickets.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("request-id");

/// Longest request id kept; longer values are not ids this crate will log.
pub const MAX_REQUEST_ID_LEN: usize = 256;

/// The delay the server asked for, if any.
///
/// `retry-after-ms` is read first (milliseconds); when it is absent or
/// unreadable, `retry-after` is read as seconds or as an HTTP-date in any of
/// the three forms of RFC 9110, relative to `now`. Numbers are read as the
/// official SDK's `float()` reads them (`+1`, `.5`, `5.`, `1e3`, `1_000`,
/// `inf`); plain decimals exactly, to the nanosecond. A date in the past gives
/// [`Duration::ZERO`]. An infinite or overflowing number gives
/// [`Duration::MAX`]: the server asked for longer than any policy waits.
/// Negative, NaN or garbage values give `None`. No cap is applied here.
///
/// ```
/// use std::time::{Duration, SystemTime, UNIX_EPOCH};
/// use http::HeaderMap;
/// use tower_overload::headers::server_delay;
///
/// let now = UNIX_EPOCH + Duration::from_secs(784_111_767); // Sun, 06 Nov 1994 08:49:27 GMT
/// let mut map = HeaderMap::new();
/// map.insert("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT".parse().unwrap());
/// assert_eq!(server_delay(&map, now), Some(Duration::from_secs(10)));
///
/// map.insert("retry-after-ms", "1500.5".parse().unwrap());
/// assert_eq!(server_delay(&map, now), Some(Duration::from_micros(1_500_500)));
///
/// map.insert("retry-after-ms", "1e300".parse().unwrap());
/// assert_eq!(server_delay(&map, now), Some(Duration::MAX));
///
/// map.insert("retry-after-ms", "-1".parse().unwrap());
/// map.insert("retry-after", "soon".parse().unwrap());
/// assert_eq!(server_delay(&map, now), None);
/// ```
pub fn server_delay(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    static MS_NAME: HeaderName = RETRY_AFTER_MS;
    if let Some(delay) = find(headers, &MS_NAME).and_then(retry_after_ms) {
        return Some(delay);
    }
    headers
        .get(RETRY_AFTER)
        .and_then(|value| retry_after(value, now))
}

/// Parses one `retry-after-ms` value: milliseconds, any number `float()` reads
/// (see [`server_delay`]).
///
/// ```
/// use std::time::Duration;
/// use http::HeaderValue;
/// use tower_overload::headers::retry_after_ms;
///
/// assert_eq!(retry_after_ms(&HeaderValue::from_static("250")), Some(Duration::from_millis(250)));
/// assert_eq!(retry_after_ms(&HeaderValue::from_static("2.5e2")), Some(Duration::from_millis(250)));
/// assert_eq!(retry_after_ms(&HeaderValue::from_static("inf")), Some(Duration::MAX));
/// assert_eq!(retry_after_ms(&HeaderValue::from_static("NaN")), None);
/// ```
pub fn retry_after_ms(value: &HeaderValue) -> Option<Duration> {
    if let Some((whole, nanos)) = parse_decimal(value.as_bytes()) {
        // `nanos` is the fraction of one millisecond in billionths.
        let exact = whole.checked_mul(1000).and_then(|micros| {
            let micros = micros.checked_add(u64::from(nanos) / 1_000_000)?;
            let extra_nanos = u64::from(nanos % 1_000_000) / 1000;
            Duration::from_micros(micros).checked_add(Duration::from_nanos(extra_nanos))
        });
        if let Some(delay) = exact {
            return Some(delay);
        }
    }
    float_seconds(python_float(value.as_bytes())? / 1000.0)
}

/// Parses one `retry-after` value: seconds (any number `float()` reads, see
/// [`server_delay`]) or an HTTP-date.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use http::HeaderValue;
/// use tower_overload::headers::retry_after;
///
/// let now = SystemTime::now();
/// assert_eq!(retry_after(&HeaderValue::from_static("2.5"), now), Some(Duration::from_millis(2500)));
/// assert_eq!(retry_after(&HeaderValue::from_static("99999999999999999999"), now), Some(Duration::MAX));
/// assert_eq!(retry_after(&HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"), now), Some(Duration::ZERO));
/// ```
pub fn retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let bytes = value.as_bytes();
    // The plain form exactly (to the nanosecond, however many seconds), any
    // other number as the SDK's float() reads it, else a date.
    if let Some((secs, nanos)) = parse_decimal(bytes) {
        return Some(Duration::new(secs, nanos));
    }
    if let Some(secs) = python_float(bytes) {
        return float_seconds(secs);
    }
    let date = parse_http_date(bytes)?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A number as Python's `float()` reads it, which is how the official SDK
/// reads these headers: surrounding whitespace, a sign, `.5` and `5.`,
/// exponents, single underscores between digits, and `inf`, `infinity` and
/// `nan` in any case. `None` for anything float() refuses.
fn python_float(bytes: &[u8]) -> Option<f64> {
    let text = bytes.trim_ascii();
    let mut cleaned = String::with_capacity(text.len());
    for (at, &c) in text.iter().enumerate() {
        if c == b'_' {
            let between_digits = at > 0
                && text[at - 1].is_ascii_digit()
                && text.get(at + 1).is_some_and(u8::is_ascii_digit);
            if !between_digits {
                return None;
            }
        } else if c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.') {
            cleaned.push(char::from(c));
        } else {
            return None;
        }
    }
    // Once the underscores are gone, Rust's grammar for f64 is float()'s.
    cleaned.parse().ok()
}

/// A delay of `secs` seconds: `None` for NaN and negatives (no delay was
/// given), [`Duration::MAX`] for infinite or overflowing values (the server
/// asked for longer than anything, which the retry policy reads as too long
/// rather than as no delay at all).
fn float_seconds(secs: f64) -> Option<Duration> {
    if secs.is_nan() || secs < 0.0 {
        return None;
    }
    if secs == 0.0 {
        // Also -0.0, which `try_from_secs_f64` refuses as negative.
        return Some(Duration::ZERO);
    }
    Some(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
}

/// `headers.get(name)`, by a linear scan when the map is small.
///
/// `HeaderMap` hashes a custom name byte by byte (FNV) before probing and
/// then compares it anyway; up to about sixteen entries, comparing names
/// directly is as fast when the name is absent and faster when present
/// (measured in `benches/core.rs`, group `classify`). This lookup sits on
/// every response's path.
fn find<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a HeaderValue> {
    const SCAN_UP_TO: usize = 16;
    if headers.keys_len() > SCAN_UP_TO {
        return headers.get(name);
    }
    headers
        .iter()
        .find_map(|(key, value)| (key == name).then_some(value))
}

/// The server's verdict from `x-should-retry`: `Some(true)`, `Some(false)`, or
/// `None` when absent or neither word (case and surrounding spaces ignored).
///
/// ```
/// use http::HeaderMap;
/// use tower_overload::headers::should_retry;
///
/// let mut map = HeaderMap::new();
/// assert_eq!(should_retry(&map), None);
/// map.insert("x-should-retry", "False".parse().unwrap());
/// assert_eq!(should_retry(&map), Some(false));
/// ```
pub fn should_retry(headers: &HeaderMap) -> Option<bool> {
    // A static, not the const: looking up by a const builds and drops a
    // `HeaderName` on every call.
    static NAME: HeaderName = X_SHOULD_RETRY;
    let value = find(headers, &NAME)?.as_bytes().trim_ascii();
    if value.eq_ignore_ascii_case(b"true") {
        Some(true)
    } else if value.eq_ignore_ascii_case(b"false") {
        Some(false)
    } else {
        None
    }
}

/// The API's `request-id` for one attempt: what support asks for.
///
/// Holds the header value itself, so cloning it is a reference-count bump.
/// Only non-empty values of visible ASCII up to [`MAX_REQUEST_ID_LEN`] bytes
/// are accepted, so a hostile server cannot inject control characters or
/// megabytes into logs.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// Accepts `value` as a request id if it is a plausible one.
    ///
    /// ```
    /// use http::HeaderValue;
    /// use tower_overload::RequestId;
    ///
    /// assert!(RequestId::new(HeaderValue::from_static("req_123")).is_some());
    /// assert!(RequestId::new(HeaderValue::from_static("")).is_none());
    /// assert!(RequestId::new(HeaderValue::from_static("two words")).is_none());
    /// ```
    pub fn new(value: HeaderValue) -> Option<Self> {
        let bytes = value.as_bytes();
        let plausible = !bytes.is_empty()
            && bytes.len() <= MAX_REQUEST_ID_LEN
            && bytes.iter().all(|c| c.is_ascii_graphic());
        plausible.then_some(Self(value))
    }

    /// The `request-id` of a response's headers, if it holds a plausible id
    /// (the same as [`request_id`]): how to read the id of any response
    /// the layers hand back, `http` or `reqwest`.
    ///
    /// ```
    /// # use tower_overload::RequestId;
    /// let response = http::Response::builder().header("request-id", "req_1").body(()).unwrap();
    /// assert_eq!(RequestId::from_headers(response.headers()).unwrap().as_str(), "req_1");
    /// ```
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        request_id(headers)
    }

    /// The id as text.
    ///
    /// ```
    /// # use http::HeaderValue;
    /// # use tower_overload::RequestId;
    /// let id = RequestId::new(HeaderValue::from_static("req_123")).unwrap();
    /// assert_eq!(id.as_str(), "req_123");
    /// ```
    pub fn as_str(&self) -> &str {
        // `new` admits visible ASCII only.
        self.0.to_str().unwrap_or_default()
    }

    /// The id as a header value, e.g. to echo it on a request.
    ///
    /// ```
    /// # use http::HeaderValue;
    /// # use tower_overload::RequestId;
    /// let id = RequestId::new(HeaderValue::from_static("req_123")).unwrap();
    /// assert_eq!(id.as_header_value(), "req_123");
    /// ```
    pub fn as_header_value(&self) -> &HeaderValue {
        &self.0
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RequestId").field(&self.as_str()).finish()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `request-id` response header, if it holds a plausible id (see [`RequestId::new`]).
///
/// ```
/// use http::HeaderMap;
/// use tower_overload::headers::request_id;
///
/// let mut map = HeaderMap::new();
/// map.insert("request-id", "req_abc".parse().unwrap());
/// assert_eq!(request_id(&map).map(|id| id.to_string()), Some("req_abc".to_owned()));
/// ```
pub fn request_id(headers: &HeaderMap) -> Option<RequestId> {
    static NAME: HeaderName = REQUEST_ID;
    find(headers, &NAME).cloned().and_then(RequestId::new)
}

/// One `anthropic-ratelimit-<kind>-*` window: limit, what remains, and when it resets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimitWindow {
    /// `…-limit`: the most allowed in the window.
    pub limit: Option<u64>,
    /// `…-remaining`: what is left before a 429.
    pub remaining: Option<u64>,
    /// `…-reset`: when the window is fully replenished (RFC 3339 in the header).
    pub reset: Option<SystemTime>,
}

impl RateLimitWindow {
    /// Whether none of the three headers was readable.
    ///
    /// ```
    /// use tower_overload::headers::RateLimitWindow;
    /// assert!(RateLimitWindow::default().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.limit.is_none() && self.remaining.is_none() && self.reset.is_none()
    }

    /// How long until this window resets, if it is exhausted (`remaining` is 0) and has a reset time.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use tower_overload::headers::RateLimitWindow;
    ///
    /// let now = SystemTime::now();
    /// let window = RateLimitWindow { limit: Some(50), remaining: Some(0), reset: Some(now + Duration::from_secs(7)) };
    /// assert_eq!(window.exhausted_for(now), Some(Duration::from_secs(7)));
    /// ```
    pub fn exhausted_for(&self, now: SystemTime) -> Option<Duration> {
        if self.remaining != Some(0) {
            return None;
        }
        let reset = self.reset?;
        Some(reset.duration_since(now).unwrap_or(Duration::ZERO))
    }
}

/// The `anthropic-ratelimit-*` family of a response.
///
/// ```
/// use http::HeaderMap;
/// use tower_overload::headers::RateLimits;
///
/// let mut map = HeaderMap::new();
/// map.insert("anthropic-ratelimit-requests-limit", "50".parse().unwrap());
/// map.insert("anthropic-ratelimit-requests-remaining", "0".parse().unwrap());
/// map.insert("anthropic-ratelimit-requests-reset", "2026-11-23T07:00:10Z".parse().unwrap());
/// let limits = RateLimits::from_headers(&map);
/// assert_eq!(limits.requests.remaining, Some(0));
/// assert!(limits.tokens.is_empty());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimits {
    /// `anthropic-ratelimit-requests-*`.
    pub requests: RateLimitWindow,
    /// `anthropic-ratelimit-tokens-*`.
    pub tokens: RateLimitWindow,
    /// `anthropic-ratelimit-input-tokens-*`.
    pub input_tokens: RateLimitWindow,
    /// `anthropic-ratelimit-output-tokens-*`.
    pub output_tokens: RateLimitWindow,
    /// OpenAI-style `x-ratelimit-{limit,remaining,reset}-requests`, read by
    /// [`from_headers_at`](Self::from_headers_at) only (the reset is a duration
    /// such as `1m30s`, anchored at `now`).
    pub openai_requests: RateLimitWindow,
    /// OpenAI-style `x-ratelimit-{limit,remaining,reset}-tokens` (see `openai_requests`).
    pub openai_tokens: RateLimitWindow,
}

const OPENAI_RATE_LIMIT_HEADERS: [[HeaderName; 3]; 2] = [
    [
        HeaderName::from_static("x-ratelimit-limit-requests"),
        HeaderName::from_static("x-ratelimit-remaining-requests"),
        HeaderName::from_static("x-ratelimit-reset-requests"),
    ],
    [
        HeaderName::from_static("x-ratelimit-limit-tokens"),
        HeaderName::from_static("x-ratelimit-remaining-tokens"),
        HeaderName::from_static("x-ratelimit-reset-tokens"),
    ],
];

const RATE_LIMIT_HEADERS: [[HeaderName; 3]; 4] = [
    [
        HeaderName::from_static("anthropic-ratelimit-requests-limit"),
        HeaderName::from_static("anthropic-ratelimit-requests-remaining"),
        HeaderName::from_static("anthropic-ratelimit-requests-reset"),
    ],
    [
        HeaderName::from_static("anthropic-ratelimit-tokens-limit"),
        HeaderName::from_static("anthropic-ratelimit-tokens-remaining"),
        HeaderName::from_static("anthropic-ratelimit-tokens-reset"),
    ],
    [
        HeaderName::from_static("anthropic-ratelimit-input-tokens-limit"),
        HeaderName::from_static("anthropic-ratelimit-input-tokens-remaining"),
        HeaderName::from_static("anthropic-ratelimit-input-tokens-reset"),
    ],
    [
        HeaderName::from_static("anthropic-ratelimit-output-tokens-limit"),
        HeaderName::from_static("anthropic-ratelimit-output-tokens-remaining"),
        HeaderName::from_static("anthropic-ratelimit-output-tokens-reset"),
    ],
];

impl RateLimits {
    /// Reads the whole family; unreadable values are `None`.
    ///
    /// ```
    /// use http::HeaderMap;
    /// use tower_overload::headers::RateLimits;
    /// assert_eq!(RateLimits::from_headers(&HeaderMap::new()), RateLimits::default());
    /// ```
    pub fn from_headers(headers: &HeaderMap) -> Self {
        // One pass over the names first (it stops at the first match): an
        // answer without these headers (another API, a mock, a proxy's own
        // error) then costs no hashed lookup of the twelve names.
        let any = headers
            .keys()
            .any(|name| name.as_str().starts_with("anthropic-ratelimit-"));
        if !any {
            return Self::default();
        }
        let window = |names: &[HeaderName; 3]| RateLimitWindow {
            limit: headers.get(&names[0]).and_then(count),
            remaining: headers.get(&names[1]).and_then(count),
            reset: headers
                .get(&names[2])
                .and_then(|v| parse_rfc3339(v.as_bytes())),
        };
        Self {
            requests: window(&RATE_LIMIT_HEADERS[0]),
            tokens: window(&RATE_LIMIT_HEADERS[1]),
            input_tokens: window(&RATE_LIMIT_HEADERS[2]),
            output_tokens: window(&RATE_LIMIT_HEADERS[3]),
            openai_requests: RateLimitWindow::default(),
            openai_tokens: RateLimitWindow::default(),
        }
    }

    /// The whole family, and the OpenAI-style `x-ratelimit-*` windows, whose
    /// resets are durations (`20s`, `1m30s`, `250ms`, `2h1m`) counted from `now`.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use http::HeaderMap;
    /// use tower_overload::headers::RateLimits;
    ///
    /// let now = SystemTime::now();
    /// let mut map = HeaderMap::new();
    /// map.insert("x-ratelimit-remaining-requests", "0".parse().unwrap());
    /// map.insert("x-ratelimit-reset-requests", "1m30s".parse().unwrap());
    /// let limits = RateLimits::from_headers_at(&map, now);
    /// assert_eq!(limits.exhausted_for(now), Some(Duration::from_secs(90)));
    /// ```
    pub fn from_headers_at(headers: &HeaderMap, now: SystemTime) -> Self {
        let window = |names: &[HeaderName; 3]| RateLimitWindow {
            limit: headers.get(&names[0]).and_then(count),
            remaining: headers.get(&names[1]).and_then(count),
            reset: headers
                .get(&names[2])
                .and_then(|v| reset_duration(v.as_bytes()))
                .and_then(|after| now.checked_add(after)),
        };
        Self {
            openai_requests: window(&OPENAI_RATE_LIMIT_HEADERS[0]),
            openai_tokens: window(&OPENAI_RATE_LIMIT_HEADERS[1]),
            ..Self::from_headers(headers)
        }
    }

    /// Whether no window was readable.
    ///
    /// ```
    /// use tower_overload::headers::RateLimits;
    /// assert!(RateLimits::default().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.windows().iter().all(RateLimitWindow::is_empty)
    }

    /// The longest wait among exhausted windows: how long a 429 without
    /// `retry-after` should wait before the quota is back.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use tower_overload::headers::{RateLimitWindow, RateLimits};
    ///
    /// let now = SystemTime::now();
    /// let limits = RateLimits {
    ///     output_tokens: RateLimitWindow { limit: None, remaining: Some(0), reset: Some(now + Duration::from_secs(20)) },
    ///     ..RateLimits::default()
    /// };
    /// assert_eq!(limits.exhausted_for(now), Some(Duration::from_secs(20)));
    /// ```
    pub fn exhausted_for(&self, now: SystemTime) -> Option<Duration> {
        self.windows()
            .iter()
            .filter_map(|w| w.exhausted_for(now))
            .max()
    }

    fn windows(&self) -> [RateLimitWindow; 6] {
        [
            self.requests,
            self.tokens,
            self.input_tokens,
            self.output_tokens,
            self.openai_requests,
            self.openai_tokens,
        ]
    }
}

/// A duration as OpenAI-style reset headers write it: one or more
/// `<number><unit>` parts, units `h`, `m`, `s`, `ms` (`20s`, `1m30s`, `1.5s`,
/// `250ms`, `2h1m`), or a bare number of seconds. `None` for anything else,
/// negatives and overflow.
fn reset_duration(bytes: &[u8]) -> Option<Duration> {
    let text = std::str::from_utf8(bytes.trim_ascii()).ok()?;
    if text.is_empty() {
        return None;
    }
    if let Ok(secs) = text.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::try_from_secs_f64(secs).ok())
            .flatten();
    }
    let mut rest = text;
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        let unit_len = after
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let scale = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            _ => return None,
        };
        if number.is_empty() || number.starts_with('.') && number.len() == 1 {
            return None;
        }
        let value: f64 = number.parse().ok()?;
        let part = Duration::try_from_secs_f64(value * scale).ok()?;
        total = total.checked_add(part)?;
        rest = after;
    }
    Some(total)
}

fn count(value: &HeaderValue) -> Option<u64> {
    let digits = value.as_bytes().trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    // Sun, 06 Nov 1994 08:49:37 GMT
    const DATE_SECS: u64 = 784_111_777;

    #[test]
    fn server_delay_table() {
        let now = UNIX_EPOCH + Duration::from_secs(DATE_SECS - 30);
        let ms = Duration::from_millis;
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<Duration>);
        let cases: &[Case<'_>] = &[
            (&[], None),
            (&[("retry-after-ms", "250")], Some(ms(250))),
            (
                &[("retry-after-ms", "0.5")],
                Some(Duration::from_micros(500)),
            ),
            (&[("retry-after-ms", " 12 ")], Some(ms(12))),
            (&[("retry-after-ms", "0")], Some(Duration::ZERO)),
            (&[("retry-after", "3")], Some(ms(3000))),
            (&[("retry-after", "1.25")], Some(ms(1250))),
            (
                &[("retry-after", "0.000000001")],
                Some(Duration::from_nanos(1)),
            ),
            (
                &[("retry-after", "1.0000000019")],
                Some(Duration::new(1, 1)),
            ),
            (
                &[("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT")],
                Some(ms(30_000)),
            ),
            (
                &[("retry-after", "Sunday, 06-Nov-94 08:49:37 GMT")],
                Some(ms(30_000)),
            ),
            (
                &[("retry-after", "Sun Nov  6 08:49:37 1994")],
                Some(ms(30_000)),
            ),
            (
                &[("retry-after", "Sat, 05 Nov 1994 08:49:37 GMT")],
                Some(Duration::ZERO),
            ),
            // retry-after-ms wins; garbage in it falls back to retry-after.
            (
                &[("retry-after-ms", "100"), ("retry-after", "9")],
                Some(ms(100)),
            ),
            (
                &[("retry-after-ms", "soon"), ("retry-after", "9")],
                Some(ms(9000)),
            ),
            // Defect 9: every form Python's float() reads is a number.
            (&[("retry-after", "+1")], Some(ms(1000))),
            (&[("retry-after", "1e3")], Some(ms(1_000_000))),
            (&[("retry-after", "1E-3")], Some(ms(1))),
            (&[("retry-after", "1.")], Some(ms(1000))),
            (&[("retry-after", ".5")], Some(ms(500))),
            (&[("retry-after", "+.5e1")], Some(ms(5000))),
            (&[("retry-after", "1_0")], Some(ms(10_000))),
            (&[("retry-after", "1_0.2_5")], Some(ms(10_250))),
            (&[("retry-after", "\t 7 ")], Some(ms(7000))),
            (&[("retry-after", "-0")], Some(Duration::ZERO)),
            (&[("retry-after-ms", "2.5e3")], Some(ms(2500))),
            (&[("retry-after-ms", "+250")], Some(ms(250))),
            // Overflowing or infinite: a wait longer than anything, not an absent one.
            (&[("retry-after", "inf")], Some(Duration::MAX)),
            (&[("retry-after", "Infinity")], Some(Duration::MAX)),
            (&[("retry-after", "+INF")], Some(Duration::MAX)),
            (&[("retry-after", "1e300")], Some(Duration::MAX)),
            (
                &[("retry-after", "99999999999999999999999")],
                Some(Duration::MAX),
            ),
            (
                &[("retry-after", "18446744073709551616")],
                Some(Duration::MAX),
            ),
            (&[("retry-after-ms", "1e300")], Some(Duration::MAX)),
            (&[("retry-after-ms", "inf")], Some(Duration::MAX)),
            (
                &[("retry-after-ms", "1e300"), ("retry-after", "9")],
                Some(Duration::MAX),
            ),
            (
                &[("retry-after-ms", "18446744073709551615")],
                Some(Duration::from_secs_f64(18_446_744_073_709_551.615)),
            ),
            // Absent: NaN, negative, garbage, and forms float() refuses.
            (&[("retry-after", "-1")], None),
            (&[("retry-after", "-inf")], None),
            (&[("retry-after", "NaN")], None),
            (&[("retry-after", "-nan")], None),
            (
                &[("retry-after-ms", "nan"), ("retry-after", "9")],
                Some(ms(9000)),
            ),
            (&[("retry-after", "1e")], None),
            (&[("retry-after", ".")], None),
            (&[("retry-after", "_1")], None),
            (&[("retry-after", "1_")], None),
            (&[("retry-after", "1__0")], None),
            (&[("retry-after", "1_.5")], None),
            (&[("retry-after", "0x10")], None),
            (&[("retry-after", "1 0")], None),
            (&[("retry-after", "in_f")], None),
            (&[("retry-after", "")], None),
            (&[("retry-after", "   ")], None),
            (&[("retry-after", "tomorrow")], None),
            (&[("retry-after", "Sun, 31 Feb 1994 08:49:37 GMT")], None),
            (&[("retry-after", "Sun, 06 Nov 1994 25:49:37 GMT")], None),
            (&[("retry-after", "Sun, 06 Nov 1994 08:49:37 PST")], None),
            (
                &[("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT trailing")],
                None,
            ),
        ];
        for (pairs, expected) in cases {
            assert_eq!(server_delay(&map(pairs), now), *expected, "{pairs:?}");
        }
    }

    #[test]
    fn server_delay_accepts_opaque_bytes_without_panicking() {
        let mut headers = HeaderMap::new();
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_bytes(b"\xff\xfe 12").unwrap(),
        );
        assert_eq!(server_delay(&headers, SystemTime::now()), None);
    }

    #[test]
    fn small_and_large_maps_find_the_same_first_value() {
        for filler in [0, 5, 23, 24, 25, 60] {
            let mut headers = HeaderMap::new();
            for i in 0..filler {
                headers.insert(
                    HeaderName::from_bytes(format!("x-filler-{i}").as_bytes()).unwrap(),
                    HeaderValue::from_static("v"),
                );
            }
            assert_eq!(should_retry(&headers), None, "{filler}");
            headers.append(X_SHOULD_RETRY, HeaderValue::from_static("false"));
            headers.append(X_SHOULD_RETRY, HeaderValue::from_static("true"));
            headers.insert(RETRY_AFTER_MS, HeaderValue::from_static("7"));
            assert_eq!(
                should_retry(&headers),
                Some(false),
                "{filler}: the first value wins"
            );
            assert_eq!(
                server_delay(&headers, SystemTime::now()),
                Some(Duration::from_millis(7))
            );
        }
    }

    #[test]
    fn should_retry_words() {
        assert_eq!(
            should_retry(&map(&[("x-should-retry", " TRUE ")])),
            Some(true)
        );
        assert_eq!(
            should_retry(&map(&[("x-should-retry", "false")])),
            Some(false)
        );
        assert_eq!(should_retry(&map(&[("x-should-retry", "1")])), None);
        assert_eq!(should_retry(&map(&[("x-should-retry", "")])), None);
    }

    #[test]
    fn request_ids_are_bounded_and_printable() {
        assert_eq!(
            request_id(&map(&[("request-id", "req_1")]))
                .unwrap()
                .as_str(),
            "req_1"
        );
        assert!(request_id(&map(&[("request-id", "a\tb")])).is_none());
        let long = "r".repeat(MAX_REQUEST_ID_LEN + 1);
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID, HeaderValue::from_str(&long).unwrap());
        assert!(request_id(&headers).is_none());
        assert!(request_id(&HeaderMap::new()).is_none());
    }

    proptest::proptest! {
        #[test]
        fn server_delay_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            if let Ok(value) = HeaderValue::from_bytes(&bytes) {
                let mut headers = HeaderMap::new();
                headers.insert(RETRY_AFTER, value.clone());
                headers.insert(RETRY_AFTER_MS, value);
                let _ = server_delay(&headers, SystemTime::now());
                let _ = RateLimits::from_headers(&headers);
            }
        }

        #[test]
        fn integer_seconds_round_trip(secs in 0u64..=u64::MAX / 2, millis in 0u64..u64::MAX / 1000) {
            let mut headers = HeaderMap::new();
            headers.insert(RETRY_AFTER, HeaderValue::from(secs));
            prop_assert_eq!(server_delay(&headers, SystemTime::now()), Some(Duration::from_secs(secs)));
            headers.insert(RETRY_AFTER_MS, HeaderValue::from(millis));
            prop_assert_eq!(server_delay(&headers, SystemTime::now()), Some(Duration::from_millis(millis)));
        }

        #[test]
        fn http_dates_agree_with_httpdate(secs in 0u64..253_402_300_799, ahead in 0u64..100_000) {
            // Every IMF-fixdate from 1970 to 9999 that httpdate formats, we read back.
            let at = UNIX_EPOCH + Duration::from_secs(secs);
            let text = httpdate::fmt_http_date(at);
            let mut headers = HeaderMap::new();
            headers.insert(RETRY_AFTER, HeaderValue::from_str(&text).unwrap());
            let now = at.checked_sub(Duration::from_secs(ahead)).unwrap_or(UNIX_EPOCH);
            let expected = at.duration_since(now).unwrap();
            prop_assert_eq!(server_delay(&headers, now), Some(expected), "{}", text);
        }
    }

    use proptest::{prop_assert, prop_assert_eq};
    /// A number in the grammar of Python's float(), with its underscores.
    fn python_number() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let digits = "[0-9]{1,3}(_[0-9]{1,3}){0,2}|[0-9]{15,25}";
        let number = prop_oneof![
            (digits, proptest::option::of(digits)).prop_map(|(a, b)| match b {
                Some(b) => format!("{a}.{b}"),
                None => a,
            }),
            digits.prop_map(|a| format!("{a}.")),
            digits.prop_map(|b| format!(".{b}")),
        ];
        let exponent = proptest::option::of(("[eE]", "[+-]?", "[0-9]{1,3}"))
            .prop_map(|e| e.map_or(String::new(), |(e, sign, d)| format!("{e}{sign}{d}")));
        let finite = (number, exponent).prop_map(|(n, e)| n + &e);
        let special = "(?i:inf|infinity|nan)";
        (
            " {0,2}",
            "[+-]?",
            prop_oneof![4 => finite, 1 => special],
            "[ \t]{0,2}",
        )
            .prop_map(|(a, sign, body, b)| format!("{a}{sign}{body}{b}"))
    }

    proptest::proptest! {
        /// Defect 9: every number float() reads agrees with Rust's f64 reading of
        /// it (underscores removed), as a delay or as absent.
        #[test]
        fn retry_after_numbers_agree_with_a_float_reference(text in python_number()) {
            let reference: f64 = text.trim().replace('_', "").parse().unwrap();
            let value = HeaderValue::from_str(&text).unwrap();
            let now = SystemTime::now();
            let ours = retry_after(&value, now);
            let ours_ms = retry_after_ms(&value);
            if reference.is_nan() || reference < 0.0 {
                prop_assert_eq!(ours, None, "{:?}", text);
                prop_assert_eq!(ours_ms, None, "{:?}", text);
            } else if reference >= Duration::MAX.as_secs_f64() {
                // Past what a Duration holds (2^64 s): too long, as infinity is.
                prop_assert_eq!(ours, Some(Duration::MAX), "{:?}", text);
            } else if reference.is_infinite() {
                prop_assert_eq!(ours, Some(Duration::MAX), "{:?}", text);
                prop_assert_eq!(ours_ms, Some(Duration::MAX), "{:?}", text);
            } else {
                for (got, expected) in [(ours, reference), (ours_ms, reference / 1000.0)] {
                    let got = got.unwrap().as_secs_f64();
                    // Plain decimals are read exactly and truncated at the nanosecond;
                    // the reference rounds to 53 bits.
                    prop_assert!(
                        (got - expected).abs() <= (expected * 1e-12).max(2e-9),
                        "{:?}: {} vs {}", text, got, expected
                    );
                }
            }
        }

        /// HTTP-dates, valid or not, in all three RFC 9110 forms: accepted and
        /// read exactly as httpdate reads them.
        #[test]
        fn http_dates_agree_with_httpdate_on_odd_fields(
            weekday in 0usize..8, day in 0u32..33, month in 0usize..13, year in 1970u32..10000,
            hour in 0u32..26, minute in 0u32..61, second in 0u32..62, form in 0u8..3,
        ) {
            const DAYS: [&str; 8] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun", "Xyz"];
            const LONG: [&str; 8] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "Xyzday"];
            const MONTHS: [&str; 13] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec", "Foo"];
            let render = |weekday: usize, second: u32| match form {
                0 => format!("{}, {day:02} {} {year:04} {hour:02}:{minute:02}:{second:02} GMT", DAYS[weekday], MONTHS[month]),
                1 => format!("{}, {day:02}-{}-{:02} {hour:02}:{minute:02}:{second:02} GMT", LONG[weekday], MONTHS[month], year % 100),
                _ => format!("{} {} {day:>2} {hour:02}:{minute:02}:{second:02} {year:04}", DAYS[weekday], MONTHS[month]),
            };
            let text = render(weekday, second);
            let reference = httpdate::parse_http_date(&text).ok();
            let value = HeaderValue::from_str(&text).unwrap();
            let ours = retry_after(&value, UNIX_EPOCH);
            if let Some(at) = reference {
                prop_assert_eq!(ours, Some(at.duration_since(UNIX_EPOCH).unwrap()), "{}", text);
            }
            if let (None, Some(delay)) = (reference, ours) {
                // Two leniencies, both deliberate: a weekday that does not match
                // the date (RFC 9110 asks recipients to parse, not to police) and
                // a leap second, read as the next second. Corrected, httpdate
                // reads the same instant.
                let (second, leap) = if second == 60 { (59, 1) } else { (second, 0) };
                let instant = delay - Duration::from_secs(leap);
                let actual = usize::try_from((instant.as_secs() / 86_400 + 3) % 7).unwrap();
                prop_assert!(actual != weekday || leap == 1, "{} read as {:?}", text, delay);
                let fixed = render(actual, second);
                let reference = httpdate::parse_http_date(&fixed).ok();
                prop_assert_eq!(reference.map(|at| at.duration_since(UNIX_EPOCH).unwrap()), Some(instant), "{}", fixed);
            }
        }
    }

    #[test]
    fn openai_reset_durations_defect_11() {
        let ms = Duration::from_millis;
        let cases: &[(&str, Option<Duration>)] = &[
            ("20s", Some(ms(20_000))),
            ("1m30s", Some(ms(90_000))),
            ("6m0s", Some(ms(360_000))),
            ("1.5s", Some(ms(1500))),
            ("250ms", Some(ms(250))),
            ("2h1m", Some(ms(7_260_000))),
            ("17ms", Some(ms(17))),
            ("0s", Some(Duration::ZERO)),
            ("3", Some(ms(3000))),
            (" 5s ", Some(ms(5000))),
            ("", None),
            ("s", None),
            ("5x", None),
            ("5 s", None),
            ("-5s", None),
            ("1m-30s", None),
            (".s", None),
            ("1e400h", None),
            ("inf", None),
        ];
        for (text, expected) in cases {
            assert_eq!(reset_duration(text.as_bytes()), *expected, "{text:?}");
        }
        let now = UNIX_EPOCH + Duration::from_secs(DATE_SECS);
        let headers = map(&[
            ("x-ratelimit-limit-requests", "60"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "1m30s"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "6.5s"),
        ]);
        let limits = RateLimits::from_headers_at(&headers, now);
        assert_eq!(limits.openai_requests.limit, Some(60));
        assert_eq!(limits.exhausted_for(now), Some(Duration::from_secs(90)));
        assert!(
            RateLimits::from_headers(&headers).is_empty(),
            "durations need a now"
        );
        let not_exhausted = map(&[
            ("x-ratelimit-remaining-requests", "3"),
            ("x-ratelimit-reset-requests", "20s"),
        ]);
        assert_eq!(
            RateLimits::from_headers_at(&not_exhausted, now).exhausted_for(now),
            None
        );
    }

    #[test]
    fn rate_limits_family() {
        let headers = map(&[
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", "1994-11-06T08:49:47Z"),
            ("anthropic-ratelimit-tokens-limit", "-5"),
            ("anthropic-ratelimit-tokens-remaining", "lots"),
            ("anthropic-ratelimit-input-tokens-remaining", "40000"),
            (
                "anthropic-ratelimit-input-tokens-reset",
                "1994-11-06T09:49:37+01:00",
            ),
            ("anthropic-ratelimit-output-tokens-reset", "not a time"),
        ]);
        let limits = RateLimits::from_headers(&headers);
        let at = |secs| Some(UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(
            limits.requests,
            RateLimitWindow {
                limit: Some(50),
                remaining: Some(0),
                reset: at(DATE_SECS + 10)
            }
        );
        assert!(limits.tokens.is_empty());
        assert_eq!(limits.input_tokens.reset, at(DATE_SECS));
        assert!(limits.output_tokens.is_empty());
        let now = UNIX_EPOCH + Duration::from_secs(DATE_SECS);
        assert_eq!(limits.exhausted_for(now), Some(Duration::from_secs(10)));
        assert!(!limits.is_empty());
    }
}
