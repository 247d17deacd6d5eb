//! [`PacedBody`]: the response body that settles its call's reservations with the usage it reports.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::state::{KeyState, Settle};
use crate::sync::lock;
use crate::usage::UsageReader;

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
                        settler.reader.end();
                        *this.settle = None;
                    }
                }
                None => {
                    settler.reader.end();
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
    reader: UsageReader,
}

impl Settler {
    pub(crate) fn new(key: Arc<KeyState>, call: Settle, event_stream: bool) -> Self {
        Self {
            key,
            call,
            reader: UsageReader::new(event_stream),
        }
    }

    fn feed(&mut self, chunk: &[u8]) {
        self.reader.feed(chunk);
    }
}

impl Drop for Settler {
    fn drop(&mut self) {
        let usage = self.reader.usage();
        let mut buckets = lock(&self.key.inner);
        buckets.settle(&self.call, usage);
        self.key.wake(&buckets);
    }
}
