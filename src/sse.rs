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

/// Counts the lines `event: error` (or `event:error`) of a stream fed in
/// chunks, a line split across chunks included.
///
/// Every byte of a guarded stream passes through here after the peek, so it
/// does not walk the stream line by line: it searches each chunk for `error`
/// (one SIMD pass, the only one per byte; the word is rare in a stream) and
/// checks the few bytes around each hit. Of the line a chunk leaves
/// unfinished, it keeps at most [`CARRY`] bytes, and only while they may still
/// become an error line: a chunk ending in the middle of a long `data:` line
/// (the usual case) leaves nothing to carry.
#[derive(Debug, Clone)]
pub(crate) struct ErrorEventWatch {
    /// The unfinished last line so far, while `live`.
    carry: [u8; CARRY],
    carry_len: usize,
    /// Whether the unfinished last line starts a line and may still become
    /// an error line (the stream's start counts as a line start).
    live: bool,
    finder: memchr::memmem::Finder<'static>,
}

/// The lines counted, without their line end.
const ERROR_LINES: [&[u8]; 2] = [b"event: error", b"event:error"];
/// The longest of them with its line end: `event: error\r\n`.
const LONGEST: usize = 14;
/// The longest unfinished line that may still become one: `event: error\r`.
const CARRY: usize = LONGEST - 1;

impl Default for ErrorEventWatch {
    fn default() -> Self {
        Self {
            carry: [0; CARRY],
            carry_len: 0,
            live: true,
            finder: memchr::memmem::Finder::new(b"error"),
        }
    }
}

/// If an error line starts at `at` in `bytes`, the index of the `\n` that ends it.
fn error_line_end(bytes: &[u8], at: usize) -> Option<usize> {
    let rest = &bytes[at..];
    ERROR_LINES.iter().find_map(|line| {
        let after = rest.strip_prefix(*line)?;
        match after {
            [b'\n', ..] => Some(at + line.len()),
            [b'\r', b'\n', ..] => Some(at + line.len() + 1),
            _ => None,
        }
    })
}

/// Whether `partial`, the start of a line (no `\n` in it), may still become an error line.
fn may_become_error_line(partial: &[u8]) -> bool {
    ERROR_LINES.iter().any(|line| {
        let (head, rest) = partial.split_at(partial.len().min(line.len()));
        line.starts_with(head) && (rest.is_empty() || rest == b"\r")
    })
}

impl ErrorEventWatch {
    /// Feeds a chunk; returns how many error event lines ended in it.
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> usize {
        let mut found = 0;
        // The line the previous chunks left unfinished, ending in this one.
        if self.live && self.carry_len == 0 {
            // The chunk starts a line.
            if error_line_end(chunk, 0).is_some() {
                found += 1;
            }
        } else if self.live {
            let mut window = [0u8; CARRY + LONGEST];
            let head = &chunk[..chunk.len().min(LONGEST)];
            window[..self.carry_len].copy_from_slice(&self.carry[..self.carry_len]);
            window[self.carry_len..self.carry_len + head.len()].copy_from_slice(head);
            // The carry holds no `\n`: a line end found is in this chunk.
            if error_line_end(&window[..self.carry_len + head.len()], 0).is_some() {
                found += 1;
            }
        }
        // Lines starting after the chunk's first byte and ending in it.
        for hit in self.finder.find_iter(chunk) {
            for line in ERROR_LINES {
                let prefix = line.len() - b"error".len();
                let Some(at) = hit.checked_sub(prefix) else {
                    continue;
                };
                if at >= 1 && chunk[at - 1] == b'\n' && error_line_end(chunk, at).is_some() {
                    found += 1;
                }
            }
        }
        self.carry_over(chunk);
        found
    }

    /// Keeps the line `chunk` leaves unfinished, if it may still become an error line.
    fn carry_over(&mut self, chunk: &[u8]) {
        // Only the last `CARRY + 1` bytes matter: a longer unfinished line
        // cannot become an error line.
        let from = chunk.len().saturating_sub(CARRY + 1);
        // A plain loop: a SIMD search costs more than it saves on 14 bytes.
        let partial = match chunk[from..].iter().rposition(|&b| b == b'\n') {
            Some(at) => &chunk[from + at + 1..],
            None if chunk.len() > CARRY || !self.live => {
                self.live = false;
                return;
            }
            // A short chunk inside a line that may still become one.
            None => {
                let len = self.carry_len + chunk.len();
                if len > CARRY {
                    self.live = false;
                    return;
                }
                self.carry[self.carry_len..len].copy_from_slice(chunk);
                self.carry_len = len;
                self.live = may_become_error_line(&self.carry[..len]);
                return;
            }
        };
        self.live = may_become_error_line(partial);
        if self.live {
            self.carry[..partial.len()].copy_from_slice(partial);
            self.carry_len = partial.len();
        }
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

    /// The count a line-by-line reading of the whole stream gives.
    fn reference_count(stream: &[u8]) -> usize {
        let mut lines: Vec<&[u8]> = stream.split(|&b| b == b'\n').collect();
        lines.pop(); // the last piece has no line end yet
        lines
            .into_iter()
            .filter(|line| {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                ERROR_LINES.contains(&line)
            })
            .count()
    }

    proptest::proptest! {
        #[test]
        fn the_watch_agrees_with_a_line_by_line_reading(
            pieces in proptest::collection::vec(
                proptest::sample::select(vec![
                    &b"event: error"[..], b"event:error", b"\n", b"\r", b"\r\n", b"x",
                    b"event: errors", b"data: {\"error\":1}", b"event: ", b"error", b" ",
                ]),
                0..40,
            ),
            cuts in proptest::collection::vec(0usize..400, 0..8),
        ) {
            let stream: Vec<u8> = pieces.concat();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(stream.len())).collect();
            cuts.push(0);
            cuts.push(stream.len());
            cuts.sort_unstable();
            let mut watch = ErrorEventWatch::default();
            let found: usize = cuts.windows(2).map(|w| watch.feed(&stream[w[0]..w[1]])).sum();
            proptest::prop_assert_eq!(found, reference_count(&stream));
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = first_event(&bytes);
            let mut watch = ErrorEventWatch::default();
            watch.feed(&bytes);
        }
    }
}
