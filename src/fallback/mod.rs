//! [`ModelFallbackLayer`]: opt-in model fallback with cooldown and an honest record.
//!
//! When a model stays overloaded (its answer is still a 529 after the retry
//! layer inside has given up), the call is sent again for the next model of
//! its chain, e.g. `claude-opus-4-6` → `claude-sonnet-4-6` →
//! `claude-haiku-4-5`, with the body's `model` rewritten and no other byte
//! changed. Switching models changes the answer's quality, so it is opt-in
//! (only requests whose model is in a configured chain take part) and always
//! visible: every such response carries a [`ServedBy`] extension, optionally
//! a response header, and every fallback is a `tracing` event with the
//! request ids involved.
//!
//! Errors come back as the crate's [`Error`] (the inner
//! service's own, when not ours, as its source: the convention is on that
//! type); one with a trigger class (the retry
//! layer's [`FinalFailure::Error`](crate::retry::FinalFailure::Error) mode)
//! falls back like the response it stands for.
//!
//! A call refused by a per-model queue inside ([`ErrorKind::QueueFull`] or
//! [`ErrorKind::QueueTimeout`] from the
//! [concurrency layer](crate::concurrency)) also moves on to the next model:
//! that model is saturated here, and waiting behind it in a storm costs more
//! than another model's answer. This does not count toward its cooldown.
//!
//! A model that keeps answering "overloaded" is skipped for a while
//! ([`Cooldown`]): not contacted at all, so a storm costs a few wasted
//! attempts, not one per request. With the retry layer inside, each attempt
//! carries a [`BreakerSignal`](crate::breaker_signal::BreakerSignal) to its
//! model's breaker (except on the last model of a chain): the breaker hears
//! of a call's first overloaded attempt at once, and once it opens, calls
//! still retrying that model stop at their next retry and move on, so a full
//! outage costs about one attempt per call, not a whole retry loop. While the
//! model rests, one call at a time probes it every few seconds (one attempt;
//! if it fails, that call falls back as usual), and a successful probe brings
//! the model back at once.
//!
//! Place it outside the retry layer: a model is given up only after its
//! retries are spent. Bodies must be in memory to be rewritten
//! ([`ReplayableBody::with_bytes`]: `Full<Bytes>`, `String`); requests whose
//! body is not, or whose model is in no chain, pass through untouched.
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_overload::{model, fallback::{ModelFallbackLayer, ServedBy}};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // Opus is overloaded; the others answer.
//! let upstream = service_fn(|request: Request<Full<Bytes>>| async move {
//!     use http_body_util::BodyExt;
//!     let body = request.into_body().collect().await.unwrap().to_bytes();
//!     let status = if model::extract(&body).as_deref() == Some("claude-opus-4-6") { 529 } else { 200 };
//!     Ok::<_, std::convert::Infallible>(Response::builder().status(status).body(Full::new(body)).unwrap())
//! });
//! let client = ServiceBuilder::new()
//!     .layer(ModelFallbackLayer::new(["claude-opus-4-6", "claude-sonnet-4-6", "claude-haiku-4-5"]))
//!     .service(upstream);
//! let request = Request::new(Full::new(Bytes::from_static(br#"{"model":"claude-opus-4-6","max_tokens":9}"#)));
//! let response = client.oneshot(request).await.unwrap();
//! assert_eq!(response.status(), 200);
//! let served = response.extensions().get::<ServedBy>().unwrap();
//! assert_eq!((served.requested.as_str(), served.served.as_str()), ("claude-opus-4-6", "claude-sonnet-4-6"));
//! # }
//! ```

mod cooldown;
pub mod future;
mod layer;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderName, Request, Response, StatusCode, request};
use tower_service::Service;

pub use self::cooldown::Cooldown;
pub use self::layer::ModelFallbackLayer;

use self::cooldown::Breaker;
#[cfg(doc)]
use crate::ErrorKind;
use crate::body::ReplayableBody;
#[cfg(doc)]
use crate::body::ReplayableBody as _;
use crate::classify::Class;
use crate::headers::RequestId;
use crate::model::Model;
use crate::{BoxError, Error};

/// One entry of a fallback chain: a model, and optionally a change to the
/// request for it (another endpoint or gateway serving that model).
///
/// ```
/// use tower_overload::fallback::FallbackStep;
///
/// // Haiku through a gateway of our own, with its own key header.
/// let step = FallbackStep::new("claude-haiku-4-5").route(|parts| {
///     parts.uri = "http://llm-gateway.internal/v1/messages".parse().unwrap();
///     parts.headers.insert("x-gateway-tenant", http::HeaderValue::from_static("batch"));
/// });
/// ```
#[derive(Clone)]
pub struct FallbackStep {
    model: Model,
    route: Option<Route>,
}

type Route = Arc<dyn Fn(&mut request::Parts) + Send + Sync>;

impl FallbackStep {
    /// The same endpoint, for `model`.
    ///
    /// ```
    /// # use tower_overload::fallback::FallbackStep;
    /// let step = FallbackStep::new("claude-sonnet-4-6");
    /// ```
    pub fn new(model: impl Into<Model>) -> Self {
        Self {
            model: model.into(),
            route: None,
        }
    }

    /// Changes the request's URI, headers or extensions when this step is
    /// used as a fallback (not when the caller asked for this model).
    ///
    /// ```
    /// # use tower_overload::fallback::FallbackStep;
    /// let step = FallbackStep::new("claude-sonnet-4-6")
    ///     .route(|parts| parts.uri = "https://eu.gateway.example/v1/messages".parse().unwrap());
    /// ```
    pub fn route(mut self, route: impl Fn(&mut request::Parts) + Send + Sync + 'static) -> Self {
        self.route = Some(Arc::new(route));
        self
    }
}

impl fmt::Debug for FallbackStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackStep")
            .field("model", &self.model)
            .field("routed", &self.route.is_some())
            .finish()
    }
}

impl From<&str> for FallbackStep {
    fn from(model: &str) -> Self {
        Self::new(model)
    }
}

impl From<String> for FallbackStep {
    fn from(model: String) -> Self {
        Self::new(model)
    }
}

impl From<Model> for FallbackStep {
    fn from(model: Model) -> Self {
        Self::new(model)
    }
}

/// One model a call tried, or skipped, before the one that answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FallbackRecord {
    /// The model.
    pub model: Model,
    /// Whether it was skipped (cooling down, or being probed by another call).
    pub skipped: bool,
    /// How its answer was classified, when it was tried.
    pub class: Option<Class>,
    /// Its status, when it answered.
    pub status: Option<StatusCode>,
    /// The request ids of its attempts (from the retry layer's report, or the response).
    pub request_ids: Vec<RequestId>,
}

/// Which model answered a call of a fallback chain: set on every response
/// for such a call, so a fallback is never silent.
///
/// ```
/// # use tower_overload::{Model, fallback::ServedBy};
/// let served = ServedBy { requested: Model::new("a"), served: Model::new("b"), fallbacks: Vec::new() };
/// assert!(served.fell_back());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedBy {
    /// The model the caller asked for.
    pub requested: Model,
    /// The model whose answer this is.
    pub served: Model,
    /// The models tried or skipped before it, in order.
    pub fallbacks: Vec<FallbackRecord>,
}

impl ServedBy {
    /// Whether another model than the one asked for answered.
    ///
    /// ```
    /// # use tower_overload::{Model, fallback::ServedBy};
    /// let served = ServedBy { requested: Model::new("a"), served: Model::new("a"), fallbacks: Vec::new() };
    /// assert!(!served.fell_back());
    /// ```
    pub fn fell_back(&self) -> bool {
        self.requested != self.served
    }
}

/// The chains, their breakers and the settings, shared by every clone.
pub(crate) struct Shared {
    chains: Vec<Vec<FallbackStep>>,
    /// Where each model stands: (chain, position). The first chain naming a model wins.
    positions: HashMap<Model, (usize, usize)>,
    breakers: HashMap<Model, Arc<Breaker>>,
    triggers: Vec<Class>,
    served_by_header: Option<HeaderName>,
    fall_back_when_saturated: bool,
    #[cfg(feature = "metrics")]
    metrics: Option<Meters>,
}

/// The layer's metric handles, made at first use.
#[cfg(feature = "metrics")]
#[derive(Debug)]
pub(crate) struct Meters {
    pub(crate) fallbacks: crate::metrics::FallbackTable,
    pub(crate) models: crate::metrics::ModelTable<crate::metrics::ModelStateMeters>,
}

impl Shared {
    fn step(&self, chain: usize, position: usize) -> Option<&FallbackStep> {
        self.chains.get(chain)?.get(position)
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("chains", &self.chains)
            .field("triggers", &self.triggers)
            .field("served_by_header", &self.served_by_header)
            .finish_non_exhaustive()
    }
}

/// Falls back along model chains; made by [`ModelFallbackLayer`].
#[derive(Debug, Clone)]
pub struct ModelFallback<S> {
    inner: S,
    shared: Arc<Shared>,
}

// ===== impl ModelFallback =====

impl<S> ModelFallback<S> {
    /// The inner service.
    ///
    /// ```
    /// # use tower::Layer;
    /// # use tower_overload::fallback::ModelFallbackLayer;
    /// let service = ModelFallbackLayer::new(["a", "b"]).layer(7u8);
    /// assert_eq!(*service.get_ref(), 7);
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    ///
    /// ```
    /// # use tower::Layer;
    /// # use tower_overload::fallback::ModelFallbackLayer;
    /// let mut service = ModelFallbackLayer::new(["a", "b"]).layer(7u8);
    /// *service.get_mut() = 8;
    /// ```
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    ///
    /// ```
    /// # use tower::Layer;
    /// # use tower_overload::fallback::ModelFallbackLayer;
    /// assert_eq!(ModelFallbackLayer::new(["a", "b"]).layer(7u8).into_inner(), 7);
    /// ```
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Whether `model` is cooling down now (skipped by every call).
    ///
    /// ```
    /// # use tower::Layer;
    /// # use tower_overload::fallback::ModelFallbackLayer;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let service = ModelFallbackLayer::new(["a", "b"]).layer(());
    /// assert!(!service.is_cooling_down("a"));
    /// # }
    /// ```
    pub fn is_cooling_down(&self, model: &str) -> bool {
        self.shared
            .breakers
            .get(model)
            .is_some_and(|b| b.is_cooling_down(tokio::time::Instant::now()))
    }
}

impl<S, B, R> Service<Request<B>> for ModelFallback<S>
where
    S: Service<Request<B>, Response = Response<R>> + Clone,
    S::Error: Into<BoxError>,
    B: ReplayableBody,
{
    type Response = Response<R>;
    type Error = Error;
    type Future = future::ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Error::from_inner)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        future::ResponseFuture::new(&mut self.inner, request, &self.shared)
    }
}
