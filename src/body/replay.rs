//! [`ReplayBody`]: any body, kept as it streams so that copies can replay it.

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use super::{DEFAULT_REPLAY_CAP, ReplayableBody};
use crate::BoxError;
use crate::sync::lock;

/// Why a [`ReplayBody`] cannot be replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplayError {
    /// The body was longer than the cap, so it was not kept.
    TooLarge,
    /// Another copy is streaming the original body right now. No longer
    /// returned: a copy now waits for the earlier reader's next chunk or its
    /// drop. Kept so that code naming it still compiles.
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
/// where the last reader stopped (a copy that finds an earlier attempt still
/// reading it, because the server answered early, waits for that reader's
/// next chunk or its drop). Every copy announces the whole body as its size,
/// so a client frames each attempt with the original length. Past the cap the kept chunks are dropped
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
    /// How many bytes this copy has yielded, to announce what is left of the whole.
    yielded: u64,
    done: bool,
}

struct Shared<B> {
    /// The original body when no copy is reading it.
    rest: Option<B>,
    /// The original body's size hint before anything was read: the size of
    /// the whole body, which every copy sends.
    whole: SizeHint,
    chunks: Vec<Bytes>,
    kept: usize,
    cap: usize,
    /// Whether anything was read from the original body.
    started: bool,
    trailers: Option<HeaderMap>,
    ended: bool,
    too_large: bool,
    failed: bool,
    /// Copies waiting for the copy that reads the original to read more or
    /// let go of it.
    waiting: Vec<Waker>,
}

impl<B> Shared<B> {
    fn wake_all(&mut self) {
        for waker in self.waiting.drain(..) {
            waker.wake();
        }
    }

    fn wait(&mut self, waker: &Waker) {
        if !self.waiting.iter().any(|w| w.will_wake(waker)) {
            self.waiting.push(waker.clone());
        }
    }
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
        let whole = body.size_hint();
        let too_large = whole.lower() > cap as u64;
        Self {
            shared: Arc::new(Mutex::new(Shared {
                rest: Some(body),
                whole,
                chunks: Vec::new(),
                kept: 0,
                cap,
                started: false,
                trailers: None,
                ended: false,
                too_large,
                failed: false,
                waiting: Vec::new(),
            })),
            live: None,
            replayed: 0,
            yielded: 0,
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
            yielded: 0,
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
            let mut shared = lock(&self.shared);
            shared.rest = Some(body);
            shared.wake_all();
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
                this.yielded += chunk.len() as u64;
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
                None => {
                    // An earlier attempt is still streaming the original (a
                    // server may answer before reading the whole body): wait
                    // for the chunks it keeps, or for it to let go.
                    shared.wait(cx.waker());
                    return Poll::Pending;
                }
            }
        }
        let Some(body) = this.live.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(body).poll_frame(cx);
        let mut shared = lock(&this.shared);
        if polled.is_ready() {
            shared.started = true;
            shared.wake_all();
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
                    this.yielded += chunk.len() as u64;
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

    /// What is left of the whole body for this copy: the kept chunks it has
    /// not replayed yet plus the unread rest. Never only the rest: a client
    /// frames the request with it (`content-length`), and a copy that
    /// announced less than it sends would go out cut short.
    fn size_hint(&self) -> SizeHint {
        if self.done {
            return SizeHint::with_exact(0);
        }
        let shared = lock(&self.shared);
        if shared.ended && !shared.too_large {
            return SizeHint::with_exact((shared.kept as u64).saturating_sub(self.yielded));
        }
        let mut hint = SizeHint::new();
        hint.set_lower(shared.whole.lower().saturating_sub(self.yielded));
        if let Some(upper) = shared.whole.upper() {
            hint.set_upper(upper.saturating_sub(self.yielded));
        }
        hint
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
    use crate::body::test_stream::{Chunks, stream};
    use http_body_util::{BodyExt, Full, StreamBody};

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

    /// Chunks with an exact size hint, like hyper's `Incoming` with a content-length.
    struct Sized(std::collections::VecDeque<Bytes>);

    impl Body for Sized {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            Poll::Ready(self.0.pop_front().map(|chunk| Ok(Frame::data(chunk))))
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.0.iter().map(|c| c.len() as u64).sum())
        }
    }

    fn sized(parts: &[&'static str]) -> Sized {
        Sized(
            parts
                .iter()
                .map(|p| Bytes::from_static(p.as_bytes()))
                .collect(),
        )
    }

    // Defect 2: a copy made after a partial read announced only the unread
    // rest, so a client framed the retry as `content-length: 4` of a 6-byte body.
    #[tokio::test]
    async fn defect_2_a_copy_announces_the_whole_body() {
        let mut body = ReplayBody::new(sized(&["ab", "cd", "ef"]), 16);
        let spare = body.try_clone_body().unwrap();
        assert_eq!(spare.size_hint().exact(), Some(6));
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "ab"
        );
        assert_eq!(body.size_hint().exact(), Some(4), "the reader has 4 left");
        assert_eq!(spare.size_hint().exact(), Some(6), "while the first reads");
        drop(body);
        assert_eq!(
            spare.size_hint().exact(),
            Some(6),
            "after the first is dropped"
        );
        let mut copy = spare.try_clone_body().unwrap();
        assert_eq!(
            copy.frame().await.unwrap().unwrap().into_data().unwrap(),
            "ab"
        );
        assert_eq!(copy.size_hint().exact(), Some(4));
        assert_eq!(spare.collect().await.unwrap().to_bytes(), "abcdef");
        assert_eq!(copy.size_hint().exact(), Some(4), "once all is kept");
        assert_eq!(copy.collect().await.unwrap().to_bytes(), "cdef");
    }

    // Defect 2: a copy that finds the original still being streamed waits
    // for the next chunk or for the reader's drop, instead of failing `InUse`.
    #[tokio::test]
    async fn defect_2_a_second_reader_waits_for_the_first() {
        let mut first = ReplayBody::new(sized(&["ab", "cd", "ef"]), 16);
        let second = first.try_clone_body().unwrap();
        assert_eq!(
            first.frame().await.unwrap().unwrap().into_data().unwrap(),
            "ab"
        );
        let mut second = tokio_test::task::spawn(second.collect());
        assert!(second.poll().is_pending(), "replays ab, then waits");
        assert_eq!(
            first.frame().await.unwrap().unwrap().into_data().unwrap(),
            "cd"
        );
        assert!(second.is_woken(), "a new kept chunk wakes the waiting copy");
        assert!(second.poll().is_pending());
        drop(first);
        assert!(
            second.is_woken(),
            "the reader's drop wakes the waiting copy"
        );
        match second.poll() {
            Poll::Ready(Ok(collected)) => assert_eq!(collected.to_bytes(), "abcdef"),
            other => panic!("expected the whole body, got {other:?}"),
        }
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
