//! Typed parsing of the response headers an LLM API uses to steer its clients.
//!
//! Every function here is pure: it reads a [`HeaderMap`] (and, where a date is
//! involved, a `now` you pass in) and never panics on odd values. Garbage,
//! negative, non-finite and overflowing values read as absent (`None`), so a
//! hostile or broken server cannot make a client wait forever. Bounds (such as
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
/// `retry-after-ms` is read first (milliseconds, fractions allowed); when it is
/// absent or unreadable, `retry-after` is read as seconds (integer or fraction)
/// or as an HTTP-date in any of the three forms of RFC 9110, relative to `now`.
/// A date in the past gives [`Duration::ZERO`]. Negative, NaN, infinite,
/// overflowing or garbage values give `None`. No cap is applied here.
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

/// Parses one `retry-after-ms` value: milliseconds, fractions allowed.
///
/// ```
/// use std::time::Duration;
/// use http::HeaderValue;
/// use tower_overload::headers::retry_after_ms;
///
/// assert_eq!(retry_after_ms(&HeaderValue::from_static("250")), Some(Duration::from_millis(250)));
/// assert_eq!(retry_after_ms(&HeaderValue::from_static("NaN")), None);
/// ```
pub fn retry_after_ms(value: &HeaderValue) -> Option<Duration> {
    let (whole, nanos) = parse_decimal(value.as_bytes())?;
    // `nanos` is the fraction of one millisecond in billionths.
    let micros = whole
        .checked_mul(1000)?
        .checked_add(u64::from(nanos) / 1_000_000)?;
    let extra_nanos = u64::from(nanos % 1_000_000) / 1000;
    Some(Duration::from_micros(micros) + Duration::from_nanos(extra_nanos))
}

/// Parses one `retry-after` value: seconds (integer or fraction) or an HTTP-date.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use http::HeaderValue;
/// use tower_overload::headers::retry_after;
///
/// let now = SystemTime::now();
/// assert_eq!(retry_after(&HeaderValue::from_static("2.5"), now), Some(Duration::from_millis(2500)));
/// assert_eq!(retry_after(&HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"), now), Some(Duration::ZERO));
/// ```
pub fn retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let bytes = value.as_bytes();
    if let Some((secs, nanos)) = parse_decimal(bytes) {
        return Some(Duration::new(secs, nanos));
    }
    let date = parse_http_date(bytes)?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
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
}

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

    fn windows(&self) -> [RateLimitWindow; 4] {
        [
            self.requests,
            self.tokens,
            self.input_tokens,
            self.output_tokens,
        ]
    }
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
            // Garbage, signs, non-finite, exponents, overflow.
            (&[("retry-after", "-1")], None),
            (&[("retry-after", "+1")], None),
            (&[("retry-after", "NaN")], None),
            (&[("retry-after", "inf")], None),
            (&[("retry-after", "Infinity")], None),
            (&[("retry-after", "1e3")], None),
            (&[("retry-after", "1.")], None),
            (&[("retry-after", ".5")], None),
            (&[("retry-after", "")], None),
            (&[("retry-after", "   ")], None),
            (&[("retry-after", "99999999999999999999999")], None),
            (&[("retry-after-ms", "18446744073709551615")], None),
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

    use proptest::prop_assert_eq;

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
