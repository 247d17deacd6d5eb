//! [`PeekedBody`]: a response body whose start a layer already read.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::headers::RequestId;
use crate::sse::{ErrorEventWatch, MidStreamErrors};
use crate::{BoxError, Error, ErrorKind};

pin_project! {
    /// A response body whose first frames were read by a layer (to classify
    /// it) and are yielded again, in order, before the rest of the original
    /// body: the caller sees every frame, trailers included, exactly once.
    ///
    /// Its error is a [`BoxError`]: the inner body's own error, or this
    /// crate's [`Error`] of kind [`ErrorKind::Timeout`] when an
    /// [idle timeout](Self::with_idle_timeout) ran out (downcast to tell).
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
        // Boxed: most bodies were never peeked nor watched, and the
        // response that carries this body is moved through every layer.
        peeked: Option<Box<Peeked<B::Error>>>,
        idle: Option<Idle>,
        #[pin]
        inner: B,
    }
}

/// What a layer read of the body before handing it on, and the watcher.
struct Peeked<E> {
    prefix: VecDeque<Frame<Bytes>>,
    error: Option<E>,
    watch: Option<Watch>,
    #[cfg(all(feature = "metrics", feature = "retry"))]
    meter: Option<crate::metrics::BodyMeter>,
}

impl<E> Default for Peeked<E> {
    fn default() -> Self {
        Self {
            prefix: VecDeque::new(),
            error: None,
            watch: None,
            #[cfg(all(feature = "metrics", feature = "retry"))]
            meter: None,
        }
    }
}

impl<E> Peeked<E> {
    /// A chunk the caller is handed: watched, and measured.
    fn see(&mut self, chunk: &[u8]) {
        if let Some(watch) = self.watch.as_mut() {
            watch.see(chunk);
        }
        #[cfg(all(feature = "metrics", feature = "retry"))]
        if let Some(meter) = self.meter.as_mut() {
            meter.see(chunk);
        }
    }

    /// The inner body ended.
    fn ended(&mut self) {
        #[cfg(all(feature = "metrics", feature = "retry"))]
        if let Some(meter) = self.meter.as_mut() {
            meter.end();
        }
    }
}

/// The idle timeout: its timer is boxed, so a body without one carries no
/// timer and allocates nothing for it.
#[derive(Debug)]
struct Idle {
    timeout: Duration,
    /// Made at the first wait: polling happens inside a runtime, building
    /// the body need not.
    sleep: Option<Pin<Box<Sleep>>>,
    /// Whether the timer runs: from the first wait after a frame (or the
    /// first poll), so a caller slow to read is not taken for a silent server.
    armed: bool,
    expired: bool,
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
            peeked: None,
            idle: None,
            inner,
        }
    }

    fn peeked(&mut self) -> &mut Peeked<B::Error> {
        self.peeked.get_or_insert_with(Box::default)
    }

    /// Yields `chunks` before the rest of the inner body.
    ///
    /// ```
    /// # use tower_overload::body::PeekedBody;
    /// let body = PeekedBody::new(http_body_util::Empty::<bytes::Bytes>::new())
    ///     .with_prefix([bytes::Bytes::from_static(b"x")]);
    /// ```
    pub fn with_prefix(self, chunks: impl IntoIterator<Item = Bytes>) -> Self {
        self.with_prefix_frames(chunks.into_iter().map(Frame::data))
    }

    /// Yields `frames` (data or trailers, in this order) before the rest of
    /// the inner body: what a layer read, handed back whole.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body::Frame;
    /// use http_body_util::{BodyExt, Empty};
    /// use tower_overload::body::PeekedBody;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let mut trailers = http::HeaderMap::new();
    /// trailers.insert("x-checksum", http::HeaderValue::from_static("abc"));
    /// let body = PeekedBody::new(Empty::<Bytes>::new())
    ///     .with_prefix_frames([Frame::data(Bytes::from_static(b"x")), Frame::trailers(trailers)]);
    /// let collected = body.collect().await.unwrap();
    /// assert_eq!(collected.trailers().unwrap()["x-checksum"], "abc");
    /// assert_eq!(collected.to_bytes(), "x");
    /// # }
    /// ```
    pub fn with_prefix_frames(mut self, frames: impl IntoIterator<Item = Frame<Bytes>>) -> Self {
        let mut frames = frames.into_iter().peekable();
        if frames.peek().is_some() {
            self.peeked().prefix.extend(frames);
        }
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
        self.peeked().error = Some(error);
        self
    }

    /// Ends the body with an [`ErrorKind::Timeout`] error when the inner body
    /// yields no frame for `timeout` while it is waited on: from the first
    /// poll, then after each frame. A server that stalls mid-body then ends
    /// the call instead of leaving it pending forever; a caller that is slow
    /// to read does not count as silence. The timer restarts with each frame.
    ///
    /// ```
    /// use std::time::Duration;
    /// use http_body_util::{BodyExt, StreamBody};
    /// use tower_overload::body::PeekedBody;
    /// use tower_overload::{Error, ErrorKind};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// let silent = StreamBody::new(futures::stream::pending::<Result<http_body::Frame<bytes::Bytes>, std::io::Error>>());
    /// let body = PeekedBody::new(silent).with_idle_timeout(Duration::from_secs(30));
    /// let error = body.collect().await.unwrap_err();
    /// assert_eq!(error.downcast_ref::<Error>().unwrap().kind(), ErrorKind::Timeout);
    /// # }
    /// ```
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle = Some(Idle {
            timeout,
            sleep: None,
            armed: false,
            expired: false,
        });
        self
    }

    /// Counts (and logs) error events in every chunk yielded from here on.
    #[cfg_attr(not(feature = "retry"), allow(dead_code))]
    pub(crate) fn watch_for_errors(
        mut self,
        errors: MidStreamErrors,
        request_id: Option<RequestId>,
    ) -> Self {
        self.peeked().watch = Some(Watch {
            lines: ErrorEventWatch::default(),
            errors,
            request_id,
        });
        self
    }

    /// Measures the chunks yielded from here on (time to first content,
    /// token usage).
    #[cfg(all(feature = "metrics", feature = "retry"))]
    pub(crate) fn with_meter(mut self, meter: crate::metrics::BodyMeter) -> Self {
        self.peeked().meter = Some(meter);
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
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Some(peeked) = this.peeked.as_mut() {
            if let Some(frame) = peeked.prefix.pop_front() {
                if let Some(chunk) = frame.data_ref() {
                    peeked.see(chunk);
                }
                if peeked.prefix.is_empty() && peeked.error.is_none() && this.inner.is_end_stream()
                {
                    peeked.ended();
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            if let Some(error) = peeked.error.take() {
                return Poll::Ready(Some(Err(error.into())));
            }
        }
        if this.idle.as_ref().is_some_and(|idle| idle.expired) {
            return Poll::Ready(None);
        }
        let mut inner = this.inner;
        let frame = match inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => {
                if let Some(peeked) = this.peeked.as_mut() {
                    peeked.ended();
                }
                return Poll::Ready(None);
            }
            Poll::Pending => {
                let Some(idle) = this.idle.as_mut() else {
                    return Poll::Pending;
                };
                if !idle.armed {
                    idle.armed = true;
                    // A timeout too long to represent is no timeout at all.
                    let Some(deadline) = Instant::now().checked_add(idle.timeout) else {
                        return Poll::Pending;
                    };
                    match idle.sleep.as_mut() {
                        Some(sleep) => sleep.as_mut().reset(deadline),
                        None => idle.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                }
                let Some(sleep) = idle.sleep.as_mut() else {
                    return Poll::Pending;
                };
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                idle.expired = true;
                return Poll::Ready(Some(Err(Box::new(Error::new(ErrorKind::Timeout)))));
            }
        };
        if let Some(idle) = this.idle.as_mut() {
            idle.armed = false;
        }
        let frame = frame.map_data(|mut data| data.copy_to_bytes(data.remaining()));
        if let Some(peeked) = this.peeked.as_mut() {
            if let Some(chunk) = frame.data_ref() {
                peeked.see(chunk);
            }
            if inner.is_end_stream() {
                peeked.ended();
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        if self.idle.as_ref().is_some_and(|idle| idle.expired) {
            return true;
        }
        let nothing_peeked = self
            .peeked
            .as_ref()
            .is_none_or(|peeked| peeked.prefix.is_empty() && peeked.error.is_none());
        nothing_peeked && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let peeked: u64 = self.peeked.as_ref().map_or(0, |peeked| {
            peeked
                .prefix
                .iter()
                .filter_map(Frame::data_ref)
                .map(|c| c.len() as u64)
                .sum()
        });
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
            .field(
                "peeked_frames",
                &self.peeked.as_ref().map_or(0, |p| p.prefix.len()),
            )
            .field(
                "pending_error",
                &self.peeked.as_ref().is_some_and(|p| p.error.is_some()),
            )
            .field("idle_timeout", &self.idle.as_ref().map(|idle| idle.timeout))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::test_stream::stream;
    use http_body_util::{BodyExt, StreamBody};

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

    /// Frames `gaps` apart (virtual time), then silence forever.
    fn spaced(gaps: &[u64]) -> impl Body<Data = Bytes, Error = std::io::Error> + Unpin {
        let gaps: Vec<u64> = gaps.to_vec();
        let frames = futures::stream::unfold(gaps.into_iter(), |mut gaps| async move {
            match gaps.next() {
                Some(gap) => {
                    tokio::time::sleep(Duration::from_secs(gap)).await;
                    Some((Ok(Frame::data(Bytes::from_static(b"x"))), gaps))
                }
                None => futures::future::pending().await,
            }
        });
        StreamBody::new(Box::pin(frames))
    }

    fn is_timeout(error: &BoxError) -> bool {
        error
            .downcast_ref::<Error>()
            .is_some_and(|e| e.kind() == ErrorKind::Timeout)
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_body_times_out_after_the_idle_timeout() {
        let started = Instant::now();
        let mut body = PeekedBody::new(spaced(&[])).with_idle_timeout(Duration::from_secs(30));
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(is_timeout(&error), "{error}");
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert!(body.frame().await.is_none(), "the timeout ends the body");
        assert!(body.is_end_stream());
    }

    #[tokio::test(start_paused = true)]
    async fn each_frame_restarts_the_idle_timer() {
        let started = Instant::now();
        let body = PeekedBody::new(spaced(&[20, 20, 20, 20]))
            .with_prefix([Bytes::from_static(b"peeked")])
            .with_idle_timeout(Duration::from_secs(30));
        let mut body = std::pin::pin!(body);
        let mut data = Vec::new();
        let error = loop {
            match body.frame().await.unwrap() {
                Ok(frame) => data.extend_from_slice(frame.data_ref().unwrap()),
                Err(error) => break error,
            }
        };
        assert_eq!(data, b"peekedxxxx", "80 s of frames 20 s apart all pass");
        assert!(is_timeout(&error), "{error}");
        assert_eq!(started.elapsed(), Duration::from_secs(110));
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_slow_to_read_is_not_silence() {
        let mut body = PeekedBody::new(spaced(&[1, 1])).with_idle_timeout(Duration::from_secs(5));
        assert!(body.frame().await.unwrap().is_ok());
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(
            body.frame().await.unwrap().is_ok(),
            "the next frame came 1 s after we asked"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_an_idle_timeout_a_silent_body_stays_pending() {
        let body = PeekedBody::new(spaced(&[]));
        let waited = tokio::time::timeout(Duration::from_secs(3600), body.collect()).await;
        assert!(waited.is_err(), "no timeout unless asked for");
    }
}
