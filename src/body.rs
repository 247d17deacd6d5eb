//! Request bodies that can be sent again, and response bodies that were peeked at.
//!
//! Retrying and falling back need the request again. [`ReplayableBody`] says
//! how a body type gives a copy for another attempt: cheap bodies
//! ([`Full<Bytes>`], [`Empty<Bytes>`], `String`) clone by reference count,
//! never copying bytes; any other body can be wrapped in a [`ReplayBody`],
//! which keeps the chunks the first attempt streams (again by reference
//! count) up to a cap, and replays them.
//!
//! [`PeekedBody`] is what a layer returns after reading the start of a
//! response body to classify it: the chunks it read, then the rest, so the
//! caller sees every byte exactly once.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Empty, Full};
use pin_project_lite::pin_project;

use crate::BoxError;
use crate::headers::RequestId;
use crate::sse::{ErrorEventWatch, MidStreamErrors};

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
