//! Reading the start of a server-sent event stream: is its first event with
//! content an error? And, once content has flowed, spotting a later error.
//!
//! With `"stream": true` the API answers 200 and may then send
//! `event: error` with an `overloaded_error`, as the first event or after
//! `message_start`. While no content has reached the caller, that call can
//! be retried like a 529; afterwards it must not be (the caller would see
//! output twice), but it should not go unnoticed either.
//!
//! ```
//! use tower_overload::classify::Class;
//! use tower_overload::sse::{FirstEvent, first_event};
//!
//! let overloaded = b"event: message_start\ndata: {\"type\":\"message_start\"}\n\nevent: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
//! assert_eq!(first_event(overloaded), FirstEvent::Error(Class::Overloaded));
//!
//! let normal = b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\"}\n\n";
//! assert_eq!(first_event(normal), FirstEvent::Content);
//! assert_eq!(first_event(b"event: ping\ndata: {}\n\nevent: cont"), FirstEvent::Incomplete);
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::classify::{self, Class, ClientKind};
use crate::json;

/// Error events seen in a stream after its content had started: passed
/// through to the caller untouched (a retry would show output twice), and
/// counted here. Set in the response extensions by the retry layer's
/// [stream guard](crate::retry::StreamGuard); clones share the count, which
/// grows as the body is read.
///
/// ```
/// use tower_overload::sse::MidStreamErrors;
/// let errors = MidStreamErrors::default();
/// assert_eq!(errors.count(), 0);
/// ```
#[derive(Debug, Clone, Default)]
pub struct MidStreamErrors {
    count: Arc<AtomicU32>,
}

impl MidStreamErrors {
    /// Error events seen so far in the part of the body that was read.
    ///
    /// ```
    /// # use tower_overload::sse::MidStreamErrors;
    /// assert_eq!(MidStreamErrors::default().count(), 0);
    /// ```
    pub fn count(&self) -> u32 {
        self.count.load(Ordering::Relaxed)
    }

    pub(crate) fn add(&self, n: u32) {
        self.count.fetch_add(n, Ordering::Relaxed);
    }
}

/// What the start of a stream says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstEvent {
    /// No event with content yet: read more.
    Incomplete,
    /// The first event with content is not an error: the stream has started.
    Content,
    /// The first event with content is an error of this class.
    Error(Class),
}

/// Events that carry no content for the caller: a stream that so far sent
/// only these can still be retried without showing anything twice.
const PREAMBLE: [&[u8]; 3] = [b"ping", b"message_start", b"content_block_start"];

/// Classifies the first event with content in `bytes`, the start of a stream.
pub fn first_event(bytes: &[u8]) -> FirstEvent {
    let mut rest = bytes;
    while let Some((block, after)) = next_block(rest) {
        rest = after;
        let name = event_name(block);
        if let Some(class) = error_class(block, name) {
            return FirstEvent::Error(class);
        }
        let is_preamble = match name {
            Some(name) => PREAMBLE.contains(&name),
            // A block of comments only (`: keep-alive`) carries nothing.
            None => !block
                .split(|&c| c == b'\n')
                .any(|line| line.starts_with(b"data:")),
        };
        if !is_preamble {
            return FirstEvent::Content;
        }
    }
    FirstEvent::Incomplete
}

/// The class of an error event: `event: error`, or data whose JSON is an error.
fn error_class(block: &[u8], name: Option<&[u8]>) -> Option<Class> {
    let kind = classify::error_type(block);
    if kind.is_none() && name != Some(b"error") {
        return None;
    }
    Some(match kind {
        Some("overloaded_error") => Class::Overloaded,
        Some("rate_limit_error") => Class::RateLimited,
        Some("timeout_error") => Class::Timeout,
        Some("invalid_request_error") => Class::Client(ClientKind::InvalidRequest),
        Some("authentication_error") => Class::Client(ClientKind::Authentication),
        Some("permission_error") => Class::Client(ClientKind::Permission),
        Some("not_found_error") => Class::Client(ClientKind::NotFound),
        Some("request_too_large") => Class::Client(ClientKind::RequestTooLarge),
        Some("billing_error") => Class::Client(ClientKind::Billing),
        // `api_error` with message "Overloaded" is an overload, as for a 500.
        _ => {
            classify::classify(
                http::StatusCode::INTERNAL_SERVER_ERROR,
                &http::HeaderMap::new(),
                Some(block),
            )
            .class
        }
    })
}

/// The next complete event block (ended by a blank line) and what follows it.
fn next_block(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut start = 0;
    while start < bytes.len() {
        let end = bytes[start..].iter().position(|&c| c == b'\n')? + start;
        let line = &bytes[start..end];
        if line.is_empty() || line == b"\r" {
            return Some((&bytes[..start], &bytes[end + 1..]));
        }
        start = end + 1;
    }
    None
}

fn event_name(block: &[u8]) -> Option<&[u8]> {
    block.split(|&c| c == b'\n').find_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let value = line.strip_prefix(b"event:")?;
        Some(value.strip_prefix(b" ").unwrap_or(value))
    })
}

/// Spots `event: error` lines in a stream fed chunk by chunk, however the
/// chunks split it. Lines inside a chunk are checked in place; only a line
/// cut by a chunk boundary keeps its first few bytes here.
#[derive(Debug, Clone, Default)]
pub(crate) struct ErrorEventWatch {
    /// Whether the last chunk ended inside a line.
    open: bool,
    /// The start of that line, while it could still be an error line.
    partial: Vec<u8>,
    /// Whether that line is known not to be one.
    ruled_out: bool,
}

const ERROR_LINES: [&[u8]; 2] = [b"event: error", b"event:error"];
/// Longest line start worth keeping: the longer form and a `\r`.
const KEEP: usize = 13;

fn is_error_line(line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line.len() <= KEEP && ERROR_LINES.contains(&line)
}

fn could_become_error_line(start: &[u8]) -> bool {
    let start = start.strip_suffix(b"\r").unwrap_or(start);
    start.len() <= KEEP && ERROR_LINES.iter().any(|line| line.starts_with(start))
}

impl ErrorEventWatch {
    /// Feeds a chunk; returns how many error event lines ended in it.
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> usize {
        let mut found = 0;
        let mut at = 0;
        if self.open {
            let end = json::find_byte(chunk, b'\n');
            let piece = &chunk[..end.unwrap_or(chunk.len())];
            if !self.ruled_out {
                self.partial
                    .extend_from_slice(&piece[..piece.len().min(KEEP + 1)]);
                self.ruled_out = !could_become_error_line(&self.partial);
            }
            let Some(end) = end else { return 0 };
            if !self.ruled_out && is_error_line(&self.partial) {
                found += 1;
            }
            self.partial.clear();
            self.ruled_out = false;
            self.open = false;
            at = end + 1;
        }
        while at < chunk.len() {
            let rest = &chunk[at..];
            match json::find_byte(rest, b'\n') {
                Some(len) => {
                    if is_error_line(&rest[..len]) {
                        found += 1;
                    }
                    at += len + 1;
                }
                None => {
                    self.open = true;
                    self.ruled_out = !could_become_error_line(rest);
                    if !self.ruled_out {
                        self.partial.extend_from_slice(rest);
                    }
                    break;
                }
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_event_table() {
        let cases: &[(&[u8], FirstEvent)] = &[
            (b"", FirstEvent::Incomplete),
            (b"event: message_start\ndata: {}\n", FirstEvent::Incomplete),
            (b"event: message_start\ndata: {}\n\n", FirstEvent::Incomplete),
            (b": keep-alive\n\nevent: ping\ndata: {}\n\n", FirstEvent::Incomplete),
            (b"event: message_start\ndata: {}\n\nevent: content_block_delta\ndata: {}\n\n", FirstEvent::Content),
            (b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}\n\n", FirstEvent::Error(Class::Overloaded)),
            (b"event: error\r\ndata: {\"error\":{\"type\":\"api_error\",\"message\":\"Overloaded\"}}\r\n\r\n", FirstEvent::Error(Class::Overloaded)),
            (b"event: error\ndata: {\"error\":{\"type\":\"api_error\",\"message\":\"boom\"}}\n\n", FirstEvent::Error(Class::ServerError)),
            (b"event: error\ndata: not json\n\n", FirstEvent::Error(Class::ServerError)),
            (b"data: {\"error\":{\"type\":\"rate_limit_error\"}}\n\n", FirstEvent::Error(Class::RateLimited)),
            (b"data: {\"choices\":[]}\n\n", FirstEvent::Content),
            (b"event: error\ndata: {\"error\":{\"type\":\"invalid_request_error\"}}\n\n", FirstEvent::Error(Class::Client(ClientKind::InvalidRequest))),
        ];
        for (bytes, expected) in cases {
            assert_eq!(
                first_event(bytes),
                *expected,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn the_watch_finds_error_lines_across_any_split() {
        let stream = b"event: content_block_delta\ndata: {\"text\":\"event: error\"}\n\nevent: error\ndata: {}\n\nevent:error\n\nevent: errors\n\n";
        for split in 0..stream.len() {
            for second in split..stream.len() {
                let mut watch = ErrorEventWatch::default();
                let found = watch.feed(&stream[..split])
                    + watch.feed(&stream[split..second])
                    + watch.feed(&stream[second..]);
                assert_eq!(found, 2, "split at {split} and {second}");
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = first_event(&bytes);
            let mut watch = ErrorEventWatch::default();
            watch.feed(&bytes);
        }
    }
}
