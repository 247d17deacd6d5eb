//! [`ConcurrencyPerModelLayer`]: per-model in-flight caps that understand streaming and overload.
//!
//! A 529 is per model: the platform is full for that model, for everyone.
//! Sending it fewer calls at once is the repair the guides give, and bursts
//! of parallel calls are what most clients get wrong. This layer caps the
//! calls in flight per key (by default the model: the [`Model`] extension,
//! else the body's top-level `"model"`), with per-model overrides and an
//! optional global cap across keys.
//!
//! - **Waiting.** `poll_ready` cannot see the request, so readiness passes
//!   through to the inner service and the key's permit is taken in the
//!   response future: at once when one is free (no allocation), else in the
//!   key's first-come, first-served queue. The queue is bounded
//!   (`max_queued`) and a wait can time out (`queue_timeout`); both fail
//!   fast with [`ErrorKind::QueueFull`](crate::ErrorKind::QueueFull) /
//!   [`ErrorKind::QueueTimeout`](crate::ErrorKind::QueueTimeout) and nothing
//!   sent upstream.
//! - **Permit lifetime.** The permit lives in the response body
//!   ([`PermitBody`]) until the body ends, fails or is dropped: a streamed
//!   answer keeps the upstream busy until its last event. (tower's
//!   `ConcurrencyLimit` releases at the headers.) An error of the inner
//!   service releases it at once; so does dropping a waiting call.
//! - **Adaptive mode** (opt-in, [`Aimd`]): a 529 (or 429) for a key
//!   multiplies its limit by 0.9; a success with at least half the limit in
//!   use adds one, up to the configured maximum.
//! - **Bounded keys.** Keys are created on first use. Configured models
//!   (`limit_for`) and the default key always keep their own key and limit:
//!   no other name can evict, block or share them. Other names share at most
//!   `max_keys` (default 64) slots, reused least recently used first among
//!   those with nothing in flight or queued; only while every slot is busy
//!   do new names share one `<overflow>` bucket with the default limit. A
//!   client inventing model names thus costs bounded memory and never
//!   disables a configured cap (see
//!   [`max_keys`](ConcurrencyPerModelLayer::max_keys)).
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_overload::concurrency::ConcurrencyPerModelLayer;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let layer = ConcurrencyPerModelLayer::new(16)
//!     .limit_for("claude-opus-4-6", 4)
//!     .max_queued(100)
//!     .queue_timeout(Some(Duration::from_secs(30)))
//!     .adaptive(Default::default());
//! let upstream = service_fn(|_: Request<Full<Bytes>>| async {
//!     Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
//! });
//! let client = ServiceBuilder::new().layer(layer.clone()).service(upstream);
//! let request = Request::new(Full::new(Bytes::from_static(br#"{"model":"claude-opus-4-6"}"#)));
//! let response = client.oneshot(request).await.unwrap();
//! assert_eq!(layer.snapshot()[0].in_flight, 1, "the body still holds the permit");
//! drop(response);
//! assert_eq!(layer.snapshot()[0].in_flight, 0);
//! # }
//! ```

mod aimd;
pub mod future;
mod key;
mod layer;
mod limits;

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

pub use self::aimd::Aimd;
pub use self::future::PermitBody;
pub use self::key::{KeyRequest, ModelKey};
pub use self::layer::ConcurrencyPerModelLayer;
pub use self::limits::KeySnapshot;

use self::limits::Limits;
#[cfg(doc)]
use crate::Model;
use crate::{BoxError, Error};

/// Caps in-flight calls per model; made by [`ConcurrencyPerModelLayer`].
#[derive(Debug, Clone)]
pub struct ConcurrencyPerModel<S, K = ModelKey> {
    inner: S,
    key_fn: K,
    limits: Arc<Limits>,
}

// ===== impl ConcurrencyPerModel =====

impl<S, K> ConcurrencyPerModel<S, K> {
    pub(crate) fn from_parts(inner: S, key_fn: K, limits: Arc<Limits>) -> Self {
        Self {
            inner,
            key_fn,
            limits,
        }
    }

    /// Every key's limit, calls in flight and queued, and refusals so far.
    ///
    /// ```
    /// # use tower_overload::concurrency::ConcurrencyPerModelLayer;
    /// # use tower::Layer;
    /// let service = ConcurrencyPerModelLayer::new(4).layer(());
    /// assert!(service.snapshot().is_empty(), "keys appear on first use");
    /// ```
    pub fn snapshot(&self) -> Vec<KeySnapshot> {
        self.limits.snapshot()
    }

    /// The inner service.
    ///
    /// ```
    /// # use tower_overload::concurrency::ConcurrencyPerModelLayer;
    /// # use tower::Layer;
    /// assert_eq!(*ConcurrencyPerModelLayer::new(4).layer(7u8).get_ref(), 7);
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    ///
    /// ```
    /// # use tower_overload::concurrency::ConcurrencyPerModelLayer;
    /// # use tower::Layer;
    /// let mut service = ConcurrencyPerModelLayer::new(4).layer(7u8);
    /// *service.get_mut() = 8;
    /// ```
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    ///
    /// ```
    /// # use tower_overload::concurrency::ConcurrencyPerModelLayer;
    /// # use tower::Layer;
    /// assert_eq!(ConcurrencyPerModelLayer::new(4).layer(7u8).into_inner(), 7);
    /// ```
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, K, B, R> Service<Request<B>> for ConcurrencyPerModel<S, K>
where
    S: Service<Request<B>, Response = Response<R>> + Clone,
    S::Error: Into<BoxError>,
    K: KeyRequest<B>,
    R: Body,
{
    type Response = Response<PermitBody<R>>;
    type Error = Error;
    type Future = future::ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Error::from_inner)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let key = self.limits.key(self.key_fn.key(&request));
        future::ResponseFuture::new(&mut self.inner, request, key, Arc::clone(&self.limits))
    }
}
