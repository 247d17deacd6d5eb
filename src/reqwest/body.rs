//! Request bodies into reqwest's, without a copy.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::BoxError;

/// `body` as a reqwest body.
///
/// A body of known length is polled once: `Full`, `String` and `Empty` hand
/// over everything in that frame, and become reqwest's in-memory body over
/// the same `Bytes`, which reqwest frames with a `content-length` and can
/// resend on a redirect. Anything else is streamed; a frame already taken is
/// put back in front. Polling here, inside the response future, gives the
/// body the caller's waker, so a streaming body that is not ready yet is
/// woken as usual once reqwest polls it.
pub(super) fn to_reqwest<B>(mut body: B, cx: &mut Context<'_>) -> reqwest::Body
where
    B: Body + Send + Sync + Unpin + 'static,
    B::Data: Into<Bytes>,
    B::Error: Into<BoxError>,
{
    if body.is_end_stream() {
        return reqwest::Body::from(Bytes::new());
    }
    if body.size_hint().exact().is_none() {
        return reqwest::Body::wrap(body);
    }
    let first = match Pin::new(&mut body).poll_frame(cx) {
        Poll::Pending => return reqwest::Body::wrap(body),
        Poll::Ready(None) => return reqwest::Body::from(Bytes::new()),
        Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
            Ok(data) if body.is_end_stream() => return reqwest::Body::from(data.into()),
            Ok(data) => Ok(Frame::data(data.into())),
            Err(frame) => Ok(frame.map_data(Into::into)),
        },
        Poll::Ready(Some(Err(error))) => Err(error.into()),
    };
    reqwest::Body::wrap(Resumed {
        first: Some(first),
        rest: body,
    })
}

/// A body whose first frame (or error) was already read.
struct Resumed<B> {
    first: Option<Result<Frame<Bytes>, BoxError>>,
    rest: B,
}

impl<B> Body for Resumed<B>
where
    B: Body + Unpin,
    B::Data: Into<Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(first));
        }
        Pin::new(&mut self.rest)
            .poll_frame(cx)
            .map_ok(|frame| frame.map_data(Into::into))
            .map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.rest.size_hint();
        if let Some(Ok(frame)) = &self.first
            && let Some(data) = frame.data_ref()
        {
            let len = data.len() as u64;
            let lower = hint.lower().saturating_add(len);
            // Upper first: `set_lower` asserts it stays at or below the upper bound.
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper.saturating_add(len));
            }
            hint.set_lower(lower);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty, Full, StreamBody};
    use std::task::Waker;

    fn convert<B>(body: B) -> reqwest::Body
    where
        B: Body + Send + Sync + Unpin + 'static,
        B::Data: Into<Bytes>,
        B::Error: Into<BoxError>,
    {
        to_reqwest(body, &mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn in_memory_bodies_stay_in_memory() {
        let bytes = Bytes::from_static(b"{\"model\":\"m\"}");
        let body = convert(Full::new(bytes.clone()));
        // The same allocation: reqwest's body points at our bytes.
        assert_eq!(body.as_bytes().map(<[u8]>::as_ptr), Some(bytes.as_ptr()));
        assert_eq!(convert(String::from("hi")).as_bytes(), Some(&b"hi"[..]));
        assert_eq!(convert(Empty::<Bytes>::new()).as_bytes(), Some(&b""[..]));
    }

    #[tokio::test]
    async fn streaming_bodies_lose_no_frame() {
        let chunks =
            ["one ", "two ", "three"].map(|c| Ok::<_, std::io::Error>(Frame::data(Bytes::from(c))));
        let body = convert(StreamBody::new(futures::stream::iter(chunks)));
        assert!(body.as_bytes().is_none());
        assert_eq!(body.collect().await.unwrap().to_bytes(), "one two three");

        // A body of known length that takes several frames: the first is put back.
        let chunks = ["ab", "cd"].map(|c| Ok::<_, std::io::Error>(Frame::data(Bytes::from(c))));
        let known = KnownLength(StreamBody::new(futures::stream::iter(chunks)), 4);
        let body = convert(known);
        assert_eq!(body.size_hint().exact(), Some(4));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abcd");
    }

    #[tokio::test]
    async fn a_failing_first_frame_surfaces_as_a_body_error() {
        let chunks = [Err::<Frame<Bytes>, _>(std::io::Error::other("disk gone"))];
        let body = convert(KnownLength(
            StreamBody::new(futures::stream::iter(chunks)),
            4,
        ));
        let error = body.collect().await.unwrap_err();
        assert!(error.is_body());
    }

    /// A streaming body that announces what is left of its length.
    struct KnownLength<B>(B, u64);

    impl<B: Body<Data = Bytes> + Unpin> Body for KnownLength<B> {
        type Data = Bytes;
        type Error = B::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
            let polled = Pin::new(&mut self.0).poll_frame(cx);
            if let Poll::Ready(Some(Ok(frame))) = &polled
                && let Some(data) = frame.data_ref()
            {
                self.1 -= data.len() as u64;
            }
            polled
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.1)
        }
    }
}
