//! [`ReplayBody`]: any body, kept as it streams so that copies can replay it.

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use super::{DEFAULT_REPLAY_CAP, ReplayableBody};
use crate::BoxError;

/// Why a [`ReplayBody`] cannot be replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplayError {
    /// The body was longer than the cap, so it was not kept.
    TooLarge,
    /// Another copy is streaming the original body right now.
    InUse,
    /// The original body failed while it was being read.
    Failed,
}

impl fmt::Display for ReplayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReplayError::TooLarge => "request body larger than the replay cap; it was sent once",
            ReplayError::InUse => "request body is still being streamed by an earlier attempt",
            ReplayError::Failed => "request body failed while it was read",
        })
    }
}

impl std::error::Error for ReplayError {}

/// Wraps any body so that it can be replayed: the first attempt streams it
/// and keeps each chunk (a reference-count clone of the data) up to `cap`
/// bytes; copies replay the kept chunks, then go on reading the original
/// where the last reader stopped. Past the cap the kept chunks are dropped
/// and copies report [`ReplayError::TooLarge`], so a retry layer sends the
/// request once and says why, never silently dropping it.
///
/// Put it in front of the layers, with the client taking `ReplayBody<B>`:
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::{BodyExt, StreamBody};
/// use http_body::Frame;
/// use tower_overload::body::{ReplayBody, ReplayableBody};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let chunks = vec![Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"hello "))), Ok(Frame::data(Bytes::from_static(b"world")))];
/// let body = ReplayBody::new(StreamBody::new(futures::stream::iter(chunks)), 1024);
/// let copy = body.try_clone_body().unwrap();
/// assert_eq!(body.collect().await.unwrap().to_bytes(), "hello world");
/// assert_eq!(copy.collect().await.unwrap().to_bytes(), "hello world");
/// # }
/// ```
pub struct ReplayBody<B> {
    shared: Arc<Mutex<Shared<B>>>,
    /// The original body, while this copy is the one reading it.
    live: Option<B>,
    /// How many kept chunks this copy has yielded.
    replayed: usize,
    done: bool,
}

struct Shared<B> {
    /// The original body when no copy is reading it.
    rest: Option<B>,
    chunks: Vec<Bytes>,
    kept: usize,
    cap: usize,
    /// Whether anything was read from the original body.
    started: bool,
    trailers: Option<HeaderMap>,
    ended: bool,
    too_large: bool,
    failed: bool,
}

impl<B: Body> ReplayBody<B> {
    /// Wraps `body`, keeping up to `cap` bytes for replay.
    ///
    /// ```
    /// use http_body_util::Full;
    /// use bytes::Bytes;
    /// use tower_overload::body::{ReplayBody, DEFAULT_REPLAY_CAP};
    /// let body = ReplayBody::new(Full::new(Bytes::from_static(b"{}")), DEFAULT_REPLAY_CAP);
    /// ```
    pub fn new(body: B, cap: usize) -> Self {
        let too_large = body.size_hint().lower() > cap as u64;
        Self {
            shared: Arc::new(Mutex::new(Shared {
                rest: Some(body),
                chunks: Vec::new(),
                kept: 0,
                cap,
                started: false,
                trailers: None,
                ended: false,
                too_large,
                failed: false,
            })),
            live: None,
            replayed: 0,
            done: false,
        }
    }

    /// Wraps the body of `request` with the [default cap](DEFAULT_REPLAY_CAP).
    ///
    /// ```
    /// use tower_overload::body::ReplayBody;
    /// let request = http::Request::new(http_body_util::Full::new(bytes::Bytes::new()));
    /// let request = ReplayBody::wrap_request(request);
    /// ```
    pub fn wrap_request(request: http::Request<B>) -> http::Request<Self> {
        request.map(|body| Self::new(body, DEFAULT_REPLAY_CAP))
    }

    /// Whether a copy made now could replay the body, and if not, why.
    ///
    /// ```
    /// # use tower_overload::body::{ReplayBody, ReplayError};
    /// let body = ReplayBody::new(http_body_util::Full::new(bytes::Bytes::from_static(b"12345")), 2);
    /// assert_eq!(body.replayable(), Err(ReplayError::TooLarge));
    /// ```
    pub fn replayable(&self) -> Result<(), ReplayError> {
        let shared = lock(&self.shared);
        if shared.too_large {
            Err(ReplayError::TooLarge)
        } else if shared.failed {
            Err(ReplayError::Failed)
        } else {
            Ok(())
        }
    }
}

fn lock<B>(shared: &Mutex<Shared<B>>) -> MutexGuard<'_, Shared<B>> {
    // Nothing panics while holding the lock; a poisoned lock still holds valid state.
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<B: Body + Unpin> ReplayableBody for ReplayBody<B>
where
    B::Data: Buf,
    B::Error: Into<BoxError>,
{
    fn try_clone_body(&self) -> Option<Self> {
        self.replayable().ok()?;
        Some(Self {
            shared: Arc::clone(&self.shared),
            live: None,
            replayed: 0,
            done: false,
        })
    }

    fn in_memory(&self) -> Option<Bytes> {
        let shared = lock(&self.shared);
        if !shared.ended || shared.too_large {
            return None;
        }
        match shared.chunks.as_slice() {
            [] => Some(Bytes::new()),
            [one] => Some(one.clone()),
            many => Some(many.concat().into()),
        }
    }
}

impl<B> Drop for ReplayBody<B> {
    fn drop(&mut self) {
        if let Some(body) = self.live.take() {
            // Hand the unread rest back so the next copy can go on from here.
            lock(&self.shared).rest = Some(body);
        }
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body + Unpin,
    B::Data: Buf,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if this.live.is_none() {
            let mut shared = lock(&this.shared);
            if this.replayed < shared.chunks.len() {
                let chunk = shared.chunks[this.replayed].clone();
                this.replayed += 1;
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            // The start of the body was read and not kept: this copy cannot have it.
            if shared.too_large && shared.started {
                return Poll::Ready(Some(Err(ReplayError::TooLarge.into())));
            }
            if shared.ended {
                this.done = true;
                return Poll::Ready(shared.trailers.clone().map(|t| Ok(Frame::trailers(t))));
            }
            if shared.failed {
                return Poll::Ready(Some(Err(ReplayError::Failed.into())));
            }
            match shared.rest.take() {
                Some(body) => this.live = Some(body),
                None => return Poll::Ready(Some(Err(ReplayError::InUse.into()))),
            }
        }
        let Some(body) = this.live.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(body).poll_frame(cx);
        let mut shared = lock(&this.shared);
        if polled.is_ready() {
            shared.started = true;
        }
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                shared.ended = true;
                this.live = None;
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(error))) => {
                shared.failed = true;
                this.live = None;
                Poll::Ready(Some(Err(error.into())))
            }
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(mut data) => {
                    let chunk = data.copy_to_bytes(data.remaining());
                    if !shared.too_large {
                        shared.kept += chunk.len();
                        if shared.kept > shared.cap {
                            shared.too_large = true;
                            shared.chunks = Vec::new();
                        } else {
                            shared.chunks.push(chunk.clone());
                        }
                    }
                    // This copy has now yielded every kept chunk.
                    this.replayed = shared.chunks.len();
                    Poll::Ready(Some(Ok(Frame::data(chunk))))
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => {
                        shared.trailers = Some(trailers.clone());
                        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                    }
                    // A frame that is neither data nor trailers: nothing to keep.
                    Err(_) => Poll::Ready(Some(Ok(Frame::data(Bytes::new())))),
                },
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        let shared = lock(&self.shared);
        if shared.ended && !shared.too_large {
            let remaining: usize = shared.chunks[self.replayed.min(shared.chunks.len())..]
                .iter()
                .map(Bytes::len)
                .sum();
            return SizeHint::with_exact(remaining as u64);
        }
        match (&self.live, &shared.rest) {
            (Some(body), _) | (None, Some(body)) if self.replayed == 0 => body.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

impl<B> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = lock(&self.shared);
        f.debug_struct("ReplayBody")
            .field("kept", &shared.kept)
            .field("cap", &shared.cap)
            .field("ended", &shared.ended)
            .field("too_large", &shared.too_large)
            .field("replayed", &self.replayed)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

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
    async fn replays_without_copying_bytes() {
        let body = ReplayBody::new(stream(&["ab", "cd"]), 16);
        let spare = body.try_clone_body().unwrap();
        let first = body.collect().await.unwrap().to_bytes();
        let again = spare.try_clone_body().unwrap();
        let second = spare.collect().await.unwrap().to_bytes();
        assert_eq!(
            (first.as_ref(), second.as_ref()),
            (b"abcd".as_ref(), b"abcd".as_ref())
        );
        assert_eq!(again.in_memory().unwrap(), "abcd");
        assert_eq!(again.size_hint().exact(), Some(4));
    }

    #[tokio::test]
    async fn a_dropped_reader_hands_the_rest_to_the_next() {
        let mut body = ReplayBody::new(stream(&["ab", "cd", "ef"]), 16);
        let spare = body.try_clone_body().unwrap();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "ab");
        drop(body);
        assert_eq!(spare.collect().await.unwrap().to_bytes(), "abcdef");
    }

    #[tokio::test]
    async fn past_the_cap_it_streams_once_and_refuses_copies() {
        let body = ReplayBody::new(stream(&["abcd", "efgh"]), 6);
        let spare = body.try_clone_body().unwrap();
        assert_eq!(
            body.collect().await.unwrap().to_bytes(),
            "abcdefgh",
            "the first attempt gets it all"
        );
        assert_eq!(spare.replayable(), Err(ReplayError::TooLarge));
        assert!(spare.try_clone_body().is_none());
        let error = spare.collect().await.unwrap_err();
        assert!(
            error.to_string().contains("larger than the replay cap"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_known_size_over_the_cap_is_refused_up_front() {
        let body = ReplayBody::new(Full::new(Bytes::from_static(b"0123456789")), 4);
        assert!(body.try_clone_body().is_none());
        assert_eq!(body.collect().await.unwrap().to_bytes(), "0123456789");
    }

    #[tokio::test]
    async fn two_live_readers_get_a_clear_error() {
        let mut first = ReplayBody::new(stream(&["ab", "cd"]), 16);
        let mut second = first.try_clone_body().unwrap();
        first.frame().await.unwrap().unwrap();
        second.frame().await.unwrap().unwrap(); // replays "ab"
        let error = second.frame().await.unwrap().unwrap_err();
        assert!(
            error.to_string().contains("still being streamed"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn failures_are_not_replayed() {
        let chunks: Chunks = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Err(std::io::Error::other("boom")),
        ];
        let body = ReplayBody::new(StreamBody::new(futures::stream::iter(chunks)), 16);
        let spare = body.try_clone_body().unwrap();
        assert!(body.collect().await.is_err());
        assert_eq!(spare.replayable(), Err(ReplayError::Failed));
    }
}
