//! [`PacedBody`]: the response body that settles its call's reservations with the usage it reports.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::state::{KeyState, Settle};
use crate::sync::lock;
use crate::usage::Usage;

/// The longest SSE line kept while it arrives in pieces; a longer one
/// (a huge text delta) is skipped, as it cannot carry the usage events.
const MAX_LINE: usize = 64 * 1024;

/// How much of the end of a JSON body is kept to find its `usage`, which
/// the API writes last.
const TAIL: usize = 4 * 1024;

pin_project! {
    /// A response body that reads the usage the response reports (the JSON
    /// `usage`, or a stream's `message_start` and `message_delta` events)
    /// and, when it ends or is dropped, corrects its call's reservations:
    /// the unused input and output tokens go back to their buckets, usage
    /// beyond them is charged. Every byte passes through unchanged.
    pub struct PacedBody<B> {
        #[pin]
        inner: B,
        settle: Option<Box<Settler>>,
    }
}

impl<B> PacedBody<B> {
    pub(crate) fn new(inner: B, settle: Option<Box<Settler>>) -> Self {
        Self { inner, settle }
    }

    /// Whether the call's reservations are still to be settled (the body
    /// has not ended yet).
    ///
    /// ```
    /// # fn check<B>(body: &tower_overload::pacing::PacedBody<B>) -> bool {
    /// body.settles()
    /// # }
    /// ```
    pub fn settles(&self) -> bool {
        self.settle.is_some()
    }

    /// The inner body.
    ///
    /// ```
    /// # fn inner<B>(body: &tower_overload::pacing::PacedBody<B>) -> &B {
    /// body.get_ref()
    /// # }
    /// ```
    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

impl<B> Body for PacedBody<B>
where
    B: Body,
    B::Data: Buf,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let mut inner = this.inner;
        let polled = ready!(inner.as_mut().poll_frame(cx));
        if let Some(settler) = this.settle.as_mut() {
            match &polled {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        settler.feed(data.chunk());
                    }
                    if inner.is_end_stream() {
                        settler.ended = true;
                        *this.settle = None;
                    }
                }
                None => {
                    settler.ended = true;
                    *this.settle = None;
                }
                // A failed body: what was read so far is all there is.
                Some(Err(_)) => *this.settle = None,
            }
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> std::fmt::Debug for PacedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacedBody")
            .field("settles", &self.settle.is_some())
            .finish_non_exhaustive()
    }
}

/// Reads a response's usage and settles its call when dropped (at the end
/// of the body, or earlier).
pub(crate) struct Settler {
    key: Arc<KeyState>,
    call: Settle,
    reader: Reader,
    /// The body was read to its end: what it reported is complete.
    ended: bool,
}

enum Reader {
    Sse {
        /// The start of a line whose end has not arrived yet.
        line: Vec<u8>,
        /// Skipping to the end of a line that cannot be a usage event.
        skipping: bool,
        usage: Option<Usage>,
    },
    Json {
        tail: Vec<u8>,
        /// Bytes before `tail` were dropped.
        cut: bool,
    },
}

impl Settler {
    pub(crate) fn new(key: Arc<KeyState>, call: Settle, event_stream: bool) -> Self {
        let reader = if event_stream {
            Reader::Sse {
                line: Vec::new(),
                skipping: false,
                usage: None,
            }
        } else {
            Reader::Json {
                tail: Vec::new(),
                cut: false,
            }
        };
        Self {
            key,
            call,
            reader,
            ended: false,
        }
    }

    fn feed(&mut self, chunk: &[u8]) {
        match &mut self.reader {
            Reader::Sse {
                line,
                skipping,
                usage,
            } => feed_sse(line, skipping, usage, chunk),
            Reader::Json { tail, cut } => {
                tail.extend_from_slice(chunk);
                // Trimmed in steps of at least TAIL bytes, so each byte is
                // moved a bounded number of times.
                if tail.len() > 2 * TAIL {
                    tail.drain(..tail.len() - TAIL);
                    *cut = true;
                }
            }
        }
    }

    /// What the response reported. A JSON body counts only when read to
    /// its end; of a stream dropped early, only the input counts (the
    /// output so far is not what the call will have generated).
    fn usage(&self) -> Option<Usage> {
        match &self.reader {
            Reader::Sse { usage, .. } => {
                let mut usage = (*usage)?;
                if !self.ended {
                    usage.output_tokens = None;
                }
                Some(usage)
            }
            Reader::Json { .. } if !self.ended => None,
            Reader::Json { tail, cut: false } => Usage::from_message(tail),
            Reader::Json { tail, cut: true } => {
                let at = memchr::memmem::rfind(tail, b"\"usage\":")?;
                Usage::object_at(tail, at + b"\"usage\":".len())
            }
        }
    }
}

impl Drop for Settler {
    fn drop(&mut self) {
        let usage = self.usage();
        let mut buckets = lock(&self.key.inner);
        buckets.settle(&self.call, usage);
        self.key.wake(&buckets);
    }
}

fn feed_sse(line: &mut Vec<u8>, skipping: &mut bool, usage: &mut Option<Usage>, mut chunk: &[u8]) {
    while !chunk.is_empty() {
        match memchr::memchr(b'\n', chunk) {
            Some(at) => {
                let part = &chunk[..at];
                chunk = &chunk[at + 1..];
                if *skipping {
                    *skipping = false;
                } else if line.is_empty() {
                    read_line(part, usage);
                } else {
                    line.extend_from_slice(part);
                    read_line(line, usage);
                }
                line.clear();
            }
            None => {
                if !*skipping {
                    line.extend_from_slice(chunk);
                    let start = &line[..line.len().min(5)];
                    if line.len() > MAX_LINE || !b"data:".starts_with(start) {
                        *skipping = true;
                        line.clear();
                    }
                }
                return;
            }
        }
    }
}

fn read_line(line: &[u8], usage: &mut Option<Usage>) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(data) = line.strip_prefix(b"data:") else {
        return;
    };
    // Most events carry no usage: skip them without a look at their JSON.
    if memchr::memmem::find(data, b"usage").is_none() {
        return;
    }
    let data = data.strip_prefix(b" ").unwrap_or(data);
    if let Some(reported) = Usage::from_event(data) {
        usage.get_or_insert_default().update(reported);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sse(chunks: &[&[u8]]) -> Option<Usage> {
        let (mut line, mut skipping, mut usage) = (Vec::new(), false, None);
        for chunk in chunks {
            feed_sse(&mut line, &mut skipping, &mut usage, chunk);
        }
        usage
    }

    #[test]
    fn usage_events_split_anywhere_are_read() {
        let stream = b"event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"cache_read_input_tokens\":100,\"output_tokens\":1}}}\r\n\r\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"usage\"}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n";
        for split in 0..stream.len() {
            for second in split..stream.len() {
                let usage = sse(&[&stream[..split], &stream[split..second], &stream[second..]])
                    .unwrap_or_else(|| panic!("split at {split}, {second}"));
                assert_eq!(
                    (
                        usage.input_charged(),
                        usage.input_total(),
                        usage.output_tokens
                    ),
                    (25, 125, Some(15)),
                    "split at {split}, {second}"
                );
            }
        }
    }

    #[test]
    fn an_overlong_line_is_skipped_and_the_next_read() {
        let mut long = b"data: {\"type\":\"content_block_delta\",\"text\":\"".to_vec();
        long.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        let delta = b"\"}\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":7}}\n";
        let usage = sse(&[&long[..1000], &long[1000..], delta]).unwrap();
        assert_eq!(usage.output_tokens, Some(7));
        // A usage-looking line that is not `data:` is not an event.
        assert_eq!(
            sse(&[b"id: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":7}}\n"]),
            None
        );
    }
}
