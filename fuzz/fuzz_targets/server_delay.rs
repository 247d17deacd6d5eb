//! `headers::server_delay` and the rate-limit family on arbitrary header bytes: never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::time::{Duration, UNIX_EPOCH};

fuzz_target!(|data: &[u8]| {
    let Ok(value) = http::HeaderValue::from_bytes(data) else {
        return;
    };
    let mut headers = http::HeaderMap::new();
    headers.insert("retry-after", value.clone());
    headers.insert("retry-after-ms", value.clone());
    headers.insert("anthropic-ratelimit-requests-reset", value);
    let now = UNIX_EPOCH + Duration::from_secs(1_795_417_200);
    let _ = tower_overload::headers::server_delay(&headers, now);
    let _ = tower_overload::headers::RateLimits::from_headers(&headers).exhausted_for(now);
});
