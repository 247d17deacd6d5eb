//! [`PeekedBody`]: a response body whose start a layer already read.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::headers::RequestId;
use crate::sse::{ErrorEventWatch, MidStreamErrors};

pin_project! {
    /// A response body whose first chunks were read by a layer (to classify
    /// it) and are yielded again before the rest of the original body.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::{BodyExt, Full};
    /// use tower_overload::body::PeekedBody;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let body = PeekedBody::new(Full::new(Bytes::from_static(b"world")))
    ///     .with_prefix(vec![Bytes::from_static(b"hello ")]);
    /// assert_eq!(body.collect().await.unwrap().to_bytes(), "hello world");
    /// # }
    /// ```
    pub struct PeekedBody<B: Body> {
        prefix: VecDeque<Bytes>,
        error: Option<B::Error>,
        watch: Option<Box<Watch>>,
        #[pin]
        inner: B,
    }
}

/// Watches a stream for error events after its content started.
#[derive(Debug)]
struct Watch {
    lines: ErrorEventWatch,
    errors: MidStreamErrors,
    request_id: Option<RequestId>,
}

impl Watch {
    fn see(&mut self, chunk: &[u8]) {
        let found = self.lines.feed(chunk);
        if found > 0 {
            self.errors.add(found as u32);
            tracing::warn!(
                target: "tower_overload",
                request_id = self.request_id.as_ref().map_or("-", RequestId::as_str),
                "error event in a stream whose content had started; passed through, not retried"
            );
        }
    }
}

impl<B: Body> PeekedBody<B> {
    /// `inner`, with nothing peeked.
    ///
    /// ```
    /// # use tower_overload::body::PeekedBody;
    /// let body = PeekedBody::new(http_body_util::Empty::<bytes::Bytes>::new());
    /// ```
    pub fn new(inner: B) -> Self {
        Self {
            prefix: VecDeque::new(),
            error: None,
            watch: None,
            inner,
        }
    }

    /// Yields `chunks` before the rest of the inner body.
    ///
    /// ```
    /// # use tower_overload::body::PeekedBody;
    /// let body = PeekedBody::new(http_body_util::Empty::<bytes::Bytes>::new())
    ///     .with_prefix([bytes::Bytes::from_static(b"x")]);
    /// ```
    pub fn with_prefix(mut self, chunks: impl IntoIterator<Item = Bytes>) -> Self {
        self.prefix.extend(chunks);
        self
    }

    /// Yields `error` after the prefix, before the rest of the inner body:
    /// the error the peek ran into, handed on to the caller.
    ///
    /// ```
    /// # use tower_overload::body::PeekedBody;
    /// use http_body_util::{BodyExt, StreamBody};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let never = StreamBody::new(futures::stream::empty::<Result<http_body::Frame<bytes::Bytes>, std::io::Error>>());
    /// let body = PeekedBody::new(never).with_error(std::io::Error::other("cut off"));
    /// assert!(body.collect().await.is_err());
    /// # }
    /// ```
    pub fn with_error(mut self, error: B::Error) -> Self {
        self.error = Some(error);
        self
    }

    /// Counts (and logs) error events in every chunk yielded from here on.
    #[cfg_attr(not(feature = "retry"), allow(dead_code))]
    pub(crate) fn watch_for_errors(
        mut self,
        errors: MidStreamErrors,
        request_id: Option<RequestId>,
    ) -> Self {
        self.watch = Some(Box::new(Watch {
            lines: ErrorEventWatch::default(),
            errors,
            request_id,
        }));
        self
    }

    /// The inner body.
    ///
    /// ```
    /// # use tower_overload::body::PeekedBody;
    /// let body = PeekedBody::new(String::from("x"));
    /// assert_eq!(body.get_ref(), "x");
    /// ```
    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

impl<B> Body for PeekedBody<B>
where
    B: Body,
    B::Data: Buf,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        if let Some(chunk) = this.prefix.pop_front() {
            if let Some(watch) = this.watch.as_mut() {
                watch.see(&chunk);
            }
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if let Some(error) = this.error.take() {
            return Poll::Ready(Some(Err(error)));
        }
        let frame = match std::task::ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(error)) => return Poll::Ready(Some(Err(error))),
            None => return Poll::Ready(None),
        };
        let frame = frame.map_data(|mut data| data.copy_to_bytes(data.remaining()));
        if let (Some(watch), Some(chunk)) = (this.watch.as_mut(), frame.data_ref()) {
            watch.see(chunk);
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.error.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let peeked: u64 = self.prefix.iter().map(|c| c.len() as u64).sum();
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(peeked));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(peeked));
        }
        hint
    }
}

impl<B: Body> fmt::Debug for PeekedBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeekedBody")
            .field("peeked_chunks", &self.prefix.len())
            .field("pending_error", &self.error.is_some())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    type Chunks = Vec<Result<Frame<Bytes>, std::io::Error>>;
    type TestStream =
        StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>>;

    fn stream(parts: &[&'static str]) -> TestStream {
        let chunks: Chunks = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        StreamBody::new(futures::stream::iter(chunks))
    }

    #[tokio::test]
    async fn peeked_bodies_yield_prefix_error_then_nothing() {
        let body = PeekedBody::new(stream(&["c"])).with_prefix([Bytes::from_static(b"ab")]);
        assert_eq!(body.size_hint().lower(), 2);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abc");
        let body = PeekedBody::new(stream(&["never"]))
            .with_prefix([Bytes::from_static(b"ab")])
            .with_error(std::io::Error::other("cut"));
        assert!(body.collect().await.is_err());
    }
}
