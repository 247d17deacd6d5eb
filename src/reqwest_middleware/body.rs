//! The request body the layers see inside [`OverloadMiddleware`](super::OverloadMiddleware).

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use ::reqwest::Body as ReqwestBody;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::body::ReplayableBody;

/// A `reqwest::Request`'s body as the layers see it: in memory (replayed by
/// reference count, like `Full<Bytes>`) or a stream (sent once).
///
/// A body built from bytes, a `String` or a `Vec<u8>` (what `.body(..)` and
/// `.json(..)` give) is in memory. A body made with `reqwest::Body::wrap` or
/// `wrap_stream` is a stream: its bytes exist only as it is read, so the
/// first attempt is the only one. A retryable answer to it then ends the
/// call with [`StopReason::BodyNotReplayable`](crate::retry::StopReason)
/// in the [`RetryReport`](crate::retry::RetryReport) (or
/// [`ErrorKind::BodyNotReplayable`](crate::ErrorKind) with
/// [`FinalFailure::Error`](crate::retry::FinalFailure)); the stream is never
/// cut short, and never sent twice.
///
/// ```
/// use bytes::Bytes;
/// use tower_overload::body::ReplayableBody;
/// use tower_overload::reqwest_middleware::RequestBody;
///
/// let body = RequestBody::from(reqwest::Body::from("{\"model\":\"claude-haiku-4-5\"}"));
/// assert!(body.is_in_memory());
/// assert_eq!(body.in_memory().unwrap(), Bytes::from_static(b"{\"model\":\"claude-haiku-4-5\"}"));
/// assert!(body.try_clone_body().is_some());
/// ```
#[derive(Debug)]
pub struct RequestBody {
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    /// `None` once read: a copy taken after that would be empty, so none is given.
    Memory(Option<Bytes>),
    Stream(ReqwestBody),
}

impl RequestBody {
    /// A body of `bytes`, replayable.
    ///
    /// ```
    /// # use tower_overload::reqwest_middleware::RequestBody;
    /// let body = RequestBody::from_bytes(bytes::Bytes::from_static(b"{}"));
    /// assert!(body.is_in_memory());
    /// ```
    pub fn from_bytes(bytes: Bytes) -> Self {
        Self {
            inner: Inner::Memory(Some(bytes)),
        }
    }

    /// Whether the body is in memory, hence replayable.
    ///
    /// ```
    /// # use tower_overload::reqwest_middleware::RequestBody;
    /// let stream = reqwest::Body::wrap(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")));
    /// assert!(!RequestBody::from(stream).is_in_memory());
    /// ```
    pub fn is_in_memory(&self) -> bool {
        matches!(self.inner, Inner::Memory(_))
    }

    /// The body for `reqwest`: bytes stay bytes (no copy), a stream stays a stream.
    pub(crate) fn into_reqwest(self) -> ReqwestBody {
        match self.inner {
            Inner::Memory(bytes) => ReqwestBody::from(bytes.unwrap_or_default()),
            Inner::Stream(body) => body,
        }
    }
}

impl From<ReqwestBody> for RequestBody {
    fn from(mut body: ReqwestBody) -> Self {
        match take_bytes(&mut body) {
            Some(bytes) => Self::from_bytes(bytes),
            None => Self {
                inner: Inner::Stream(body),
            },
        }
    }
}

/// The bytes of an in-memory `reqwest::Body`, without copying them.
///
/// `as_bytes` only lends them; reading the body's one frame hands over its
/// `Bytes` (a reference count). An in-memory body yields that frame at once,
/// so no runtime is needed; a stream is left untouched.
fn take_bytes(body: &mut ReqwestBody) -> Option<Bytes> {
    let expected = body.as_bytes()?.len();
    if expected == 0 {
        return Some(Bytes::new());
    }
    let mut cx = Context::from_waker(Waker::noop());
    match Pin::new(&mut *body).poll_frame(&mut cx) {
        Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
            Ok(bytes) if bytes.len() == expected => Some(bytes),
            // Not what an in-memory body does; keep what was read rather than lose it.
            Ok(bytes) => {
                *body = ReqwestBody::from(bytes);
                None
            }
            Err(_) => None,
        },
        _ => None,
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = ::reqwest::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match &mut self.inner {
            Inner::Memory(bytes) => Poll::Ready(
                bytes
                    .take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            Inner::Stream(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Memory(bytes) => bytes.as_ref().is_none_or(Bytes::is_empty),
            Inner::Stream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Memory(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Inner::Stream(body) => body.size_hint(),
        }
    }
}

impl ReplayableBody for RequestBody {
    fn try_clone_body(&self) -> Option<Self> {
        match &self.inner {
            Inner::Memory(Some(bytes)) => Some(Self::from_bytes(bytes.clone())),
            Inner::Memory(None) | Inner::Stream(_) => None,
        }
    }

    fn in_memory(&self) -> Option<Bytes> {
        match &self.inner {
            Inner::Memory(bytes) => bytes.clone(),
            Inner::Stream(_) => None,
        }
    }

    fn with_bytes(&self, bytes: Bytes) -> Option<Self> {
        Some(Self::from_bytes(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[test]
    fn an_in_memory_reqwest_body_is_taken_without_a_copy() {
        let bytes = Bytes::from(vec![7u8; 1024]);
        let body = RequestBody::from(ReqwestBody::from(bytes.clone()));
        let taken = body.in_memory().unwrap();
        assert_eq!(taken.as_ptr(), bytes.as_ptr(), "the same buffer");
        assert!(body.try_clone_body().is_some());
    }

    #[test]
    fn an_empty_body_is_in_memory() {
        let body = RequestBody::from(ReqwestBody::from(Vec::new()));
        assert_eq!(body.in_memory().unwrap(), Bytes::new());
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn a_stream_is_not_replayable_and_is_read_whole() {
        let stream = ReqwestBody::wrap(Full::new(Bytes::from_static(b"abc")));
        let body = RequestBody::from(stream);
        assert!(body.try_clone_body().is_none());
        assert!(body.in_memory().is_none());
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abc");
    }

    #[tokio::test]
    async fn a_read_body_gives_no_copy() {
        let mut body = RequestBody::from_bytes(Bytes::from_static(b"abc"));
        let read = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(read, "abc");
        assert!(
            body.try_clone_body().is_none(),
            "an empty copy would send the body short"
        );
    }
}
