//! Request bodies that can be sent again, and response bodies that were peeked at.
//!
//! Retrying and falling back need the request again. [`ReplayableBody`] says
//! how a body type gives a copy for another attempt: cheap bodies
//! ([`Full<Bytes>`], [`Empty<Bytes>`]) clone by reference count, never
//! copying bytes. A `String` owns its bytes, so each copy of one is a copy of
//! the bytes: turn it into `Full::new(Bytes::from(string))` (which takes the
//! string's buffer, no copy) to replay it by reference count. Any other body can be wrapped in a [`ReplayBody`],
//! which keeps the chunks the first attempt streams (again by reference
//! count) up to a cap, and replays them.
//!
//! [`PeekedBody`] is what a layer returns after reading the start of a
//! response body to classify it: the chunks it read, then the rest, so the
//! caller sees every byte exactly once.

mod peeked;
mod replay;

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::Body;
use http_body_util::{Empty, Full};

pub use peeked::PeekedBody;
pub use replay::{ReplayBody, ReplayError};

/// The API's own request size limit, and [`ReplayBody`]'s default cap.
pub const DEFAULT_REPLAY_CAP: usize = 32 * 1024 * 1024;

/// A request body that can give a copy of itself for another attempt.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use tower_overload::body::ReplayableBody;
///
/// let body = Full::new(Bytes::from_static(b"{\"model\":\"claude-opus-4-6\"}"));
/// let copy = body.try_clone_body().expect("Full<Bytes> always replays");
/// assert_eq!(copy.in_memory().unwrap(), body.in_memory().unwrap());
/// ```
pub trait ReplayableBody: Body + Sized {
    /// A copy that will yield the same bytes, or `None` when the body can no
    /// longer be replayed (e.g. a [`ReplayBody`] past its cap).
    fn try_clone_body(&self) -> Option<Self>;

    /// The whole body, when it is in memory and can be read without being
    /// consumed (a reference-count clone, no copy). Used to read the model
    /// from a request before sending it.
    fn in_memory(&self) -> Option<Bytes> {
        None
    }

    /// A body of this type holding `bytes` instead: how a request is sent
    /// again with a rewritten body (the same call for another model).
    /// `None` when the type cannot hold arbitrary bytes.
    fn with_bytes(&self, bytes: Bytes) -> Option<Self> {
        let _ = bytes;
        None
    }
}

impl ReplayableBody for Full<Bytes> {
    fn try_clone_body(&self) -> Option<Self> {
        Some(self.clone())
    }

    fn in_memory(&self) -> Option<Bytes> {
        // `Full` keeps its bytes private; a clone yields them at once,
        // without a runtime, so polling it with a no-op waker reads them.
        let mut copy = self.clone();
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(&mut copy).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => frame.into_data().ok(),
            _ => Some(Bytes::new()),
        }
    }

    fn with_bytes(&self, bytes: Bytes) -> Option<Self> {
        Some(Full::new(bytes))
    }
}

impl ReplayableBody for Empty<Bytes> {
    fn try_clone_body(&self) -> Option<Self> {
        Some(*self)
    }

    fn in_memory(&self) -> Option<Bytes> {
        Some(Bytes::new())
    }
}

/// Each copy copies the bytes (two `String`s cannot share a buffer); for
/// replay by reference count send `Full::new(Bytes::from(string))` instead,
/// which takes the string's buffer without copying it.
impl ReplayableBody for String {
    fn try_clone_body(&self) -> Option<Self> {
        Some(self.clone())
    }

    fn in_memory(&self) -> Option<Bytes> {
        Some(Bytes::copy_from_slice(self.as_bytes()))
    }

    fn with_bytes(&self, bytes: Bytes) -> Option<Self> {
        String::from_utf8(bytes.into()).ok()
    }
}

/// A body of the given chunks, for the body modules' tests.
#[cfg(test)]
pub(crate) mod test_stream {
    use bytes::Bytes;
    use http_body::Frame;
    use http_body_util::StreamBody;

    pub(crate) type Chunks = Vec<Result<Frame<Bytes>, std::io::Error>>;
    pub(crate) type TestStream =
        StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>>;

    pub(crate) fn stream(parts: &[&'static str]) -> TestStream {
        let chunks: Chunks = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        StreamBody::new(futures::stream::iter(chunks))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_memory_bodies_can_be_rebuilt_from_bytes() {
        let full = Full::new(Bytes::from_static(b"a"));
        let rebuilt = full.with_bytes(Bytes::from_static(b"b")).unwrap();
        assert_eq!(rebuilt.in_memory().unwrap(), "b");
        assert_eq!(
            String::new().with_bytes(Bytes::from_static(b"s")).unwrap(),
            "s"
        );
        assert!(
            String::new()
                .with_bytes(Bytes::from_static(b"\xff"))
                .is_none()
        );
        assert!(
            Empty::<Bytes>::new()
                .with_bytes(Bytes::from_static(b"x"))
                .is_none()
        );
    }
    #[test]
    fn full_bodies_are_read_in_memory_without_a_runtime() {
        let body = Full::new(Bytes::from_static(b"{\"model\":\"m\"}"));
        assert_eq!(body.in_memory().unwrap(), "{\"model\":\"m\"}");
        assert_eq!(Empty::<Bytes>::new().in_memory().unwrap(), "");
        assert_eq!(String::from("s").in_memory().unwrap(), "s");
    }
}
