//! `classify::error_type` and body-aware classification on arbitrary bytes: never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tower_overload::classify::error_type(data);
    let _ = tower_overload::sse::first_event(data);
    for status in [429, 500, 503] {
        let status = http::StatusCode::from_u16(status).unwrap();
        let _ = tower_overload::classify::classify(status, &http::HeaderMap::new(), Some(data));
    }
});
