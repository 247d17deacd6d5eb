//! The stream guard: reading the start of a streamed 200 to its first event
//! with content, so an overload sent as the first event is retried like a
//! 529 before the caller sees a byte.
//!
//! [`StreamGuard`] and [`Silence`] are its settings; the response future
//! calls [`worth_peeking`] on a response head, [`StreamPeek::feed`] with each
//! chunk it reads, and [`stream_verdict`] once it stops reading.

use std::time::Duration;

use http::{StatusCode, response};

use crate::classify::{Class, Classification};
use crate::sse::{self, FirstEvent};

/// The stream guard: how the retry layer checks the start of a streamed
/// (`text/event-stream`) 200 before handing it on.
///
/// With `"stream": true` the API answers 200 and may then send
/// `event: error` with an `overloaded_error`. The guard reads the stream up
/// to its first event with content (past `ping`, `message_start` and
/// `content_block_start`, which show the caller nothing), at most
/// `max_peek_bytes` and `peek_timeout`. If that event is an error, the
/// attempt is classified by it (an overload like a 529) and retried or
/// given up as any other; the fallback layer sees it too. If it is content,
/// everything read is handed on, delayed by no more than that first event.
/// Error events after content has started pass through untouched (a retry
/// would show output twice), are logged, and counted in the
/// [`MidStreamErrors`](crate::sse::MidStreamErrors) response extension.
///
/// ```
/// use std::time::Duration;
/// use tower_overload::retry::{RetryPolicy, Silence, StreamGuard};
///
/// let policy = RetryPolicy::foreground().stream_guard(Some(StreamGuard {
///     peek_timeout: Duration::from_secs(20),
///     on_silence: Silence::Retry,
///     ..StreamGuard::default()
/// }));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamGuard {
    /// The most bytes read before deciding (default 64 KiB).
    pub max_peek_bytes: usize,
    /// The longest wait for the first event with content (default 30 s).
    pub peek_timeout: Duration,
    /// What a stream with no event with content within those bounds gets.
    pub on_silence: Silence,
}

impl Default for StreamGuard {
    fn default() -> Self {
        Self {
            max_peek_bytes: 64 * 1024,
            peek_timeout: Duration::from_secs(30),
            on_silence: Silence::PassThrough,
        }
    }
}

/// What the stream guard does with a stream that says nothing in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Silence {
    /// Hand it on as it is (default): a slow first token is not an error.
    #[default]
    PassThrough,
    /// Treat the attempt as a [`Class::Timeout`] and retry it.
    Retry,
}

/// What the stream guard has read of a stream so far.
///
/// The chunks themselves are kept by the peek (they go to the caller); this
/// keeps only what judging them needs: the start of an event block cut by a
/// chunk boundary, copied once, and nothing once the first event is known.
pub(super) struct StreamPeek {
    pub(super) guard: StreamGuard,
    /// The start of the block not yet complete, when it began in an earlier
    /// chunk: every complete block before it was preamble.
    partial: Vec<u8>,
    /// What the line the last chunk left unfinished holds so far.
    line: LineSoFar,
    /// The first event with content, once a complete block showed it.
    pub(super) first: FirstEvent,
}

/// The unfinished last line of what was read: a `\n` after an empty line or
/// a lone `\r` ends an event block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineSoFar {
    Empty,
    CarriageReturn,
    Other,
}

impl StreamPeek {
    fn new(guard: StreamGuard) -> Self {
        Self {
            guard,
            partial: Vec::new(),
            line: LineSoFar::Empty,
            first: FirstEvent::Incomplete,
        }
    }

    /// Judges the blocks `chunk` completes, each byte once: a stream
    /// trickled a byte per frame costs linear time, not a re-parse per frame.
    pub(super) fn feed(&mut self, chunk: &[u8]) {
        if self.first != FirstEvent::Incomplete || chunk.is_empty() {
            return;
        }
        let ends_block = |i: usize| match i {
            0 => self.line != LineSoFar::Other,
            _ if chunk[i - 1] == b'\n' => true,
            _ if chunk[i - 1] != b'\r' => false,
            1 => self.line == LineSoFar::Empty,
            _ => chunk[i - 2] == b'\n',
        };
        let end = memchr::memrchr_iter(b'\n', chunk).find(|&i| ends_block(i));
        self.line = match (memchr::memrchr(b'\n', chunk), self.line) {
            (Some(at), _) => LineSoFar::after(&chunk[at + 1..]),
            (None, LineSoFar::Empty) => LineSoFar::after(chunk),
            (None, _) => LineSoFar::Other,
        };
        let Some(end) = end else {
            self.partial.extend_from_slice(chunk);
            return;
        };
        let first = if self.partial.is_empty() {
            sse::first_event(&chunk[..=end])
        } else {
            self.partial.extend_from_slice(&chunk[..=end]);
            let first = sse::first_event(&self.partial);
            self.partial.clear();
            first
        };
        match first {
            FirstEvent::Incomplete => self.partial.extend_from_slice(&chunk[end + 1..]),
            found => {
                self.first = found;
                self.partial = Vec::new();
            }
        }
    }
}

impl LineSoFar {
    /// The state of a line holding `bytes` (no `\n`) from its start.
    fn after(bytes: &[u8]) -> Self {
        match bytes {
            [] => Self::Empty,
            [b'\r'] => Self::CarriageReturn,
            _ => Self::Other,
        }
    }
}

/// Whether the stream guard should read the start of this response.
pub(super) fn worth_peeking(
    parts: &response::Parts,
    verdict: &Classification,
    guard: Option<StreamGuard>,
) -> Option<Box<StreamPeek>> {
    let guard = guard?;
    let is_stream = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"text/event-stream"));
    (verdict.class == Class::Success && parts.status == StatusCode::OK && is_stream)
        .then(|| Box::new(StreamPeek::new(guard)))
}

/// The verdict on a streamed 200 from its first event with content.
pub(super) fn stream_verdict(
    peek: &StreamPeek,
    failed: bool,
    ended: bool,
    on_silence: Silence,
) -> Classification {
    let failure = |class: Class| Classification {
        class,
        retryable: class.is_retryable_by_default(),
        server_verdict: None,
    };
    // The peek judged every complete block as it came: what the whole
    // prefix would say.
    match peek.first {
        FirstEvent::Error(class) => failure(class),
        FirstEvent::Content => failure(Class::Success),
        // Cut off before any content: nothing reached the caller, so it may be retried.
        FirstEvent::Incomplete if failed => failure(Class::Transport),
        FirstEvent::Incomplete if ended || on_silence == Silence::PassThrough => {
            failure(Class::Success)
        }
        FirstEvent::Incomplete => failure(Class::Timeout),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse;

    /// What the peek concludes from `stream` cut at `cuts`.
    fn peek_of(stream: &[u8], cuts: &[usize]) -> FirstEvent {
        let mut peek = StreamPeek::new(StreamGuard::default());
        let mut at = 0;
        for &cut in cuts.iter().chain([&stream.len()]) {
            peek.feed(&stream[at..cut]);
            at = cut;
        }
        peek.first
    }

    #[test]
    fn the_peek_agrees_with_a_reading_of_the_whole_prefix_at_any_split() {
        let streams: &[&[u8]] = &[
            b"event: message_start\ndata: {}\n\nevent: content_block_delta\ndata: {}\n\n",
            b"event: ping\r\ndata: {}\r\n\r\nevent: error\r\ndata: {\"error\":{\"type\":\"overloaded_error\"}}\r\n\r\n",
            b": keep-alive\n\n\n\r\nevent: ping\ndata: {}\n\ndata: {\"choices\":[]}\n\n",
            b"\r\n\r\nevent: message_start\ndata: {}\n\nevent: cont",
            b"\revent: error\n\n",
        ];
        for stream in streams {
            let whole = sse::first_event(stream);
            let bytewise: Vec<usize> = (1..stream.len()).collect();
            assert_eq!(peek_of(stream, &bytewise), whole, "byte by byte");
            for first in 0..=stream.len() {
                for second in first..=stream.len() {
                    assert_eq!(peek_of(stream, &[first, second]), whole, "{first} {second}");
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn the_peek_agrees_with_a_reading_of_the_whole_prefix(
            pieces in proptest::collection::vec(
                proptest::sample::select(vec![
                    &b"event: ping"[..], b"event: error", b"event: message_start", b"data: {}",
                    b"data: {\"error\":{\"type\":\"rate_limit_error\"}}", b": c", b"\n", b"\r", b"\r\n",
                    b"event: content_block_delta", b"x",
                ]),
                0..30,
            ),
            cuts in proptest::collection::vec(0usize..400, 0..8),
        ) {
            let stream: Vec<u8> = pieces.concat();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(stream.len())).collect();
            cuts.sort_unstable();
            proptest::prop_assert_eq!(peek_of(&stream, &cuts), sse::first_event(&stream));
        }
    }
}
