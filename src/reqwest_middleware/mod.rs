//! The crate's layers as a [`reqwest_middleware::Middleware`].
//!
//! Many Rust clients of LLM APIs take a `reqwest_middleware::ClientWithMiddleware`.
//! [`OverloadMiddleware`] runs any stack of this crate's layers (an
//! [`OverloadStack`](crate::stack::OverloadStack), or a `tower::ServiceBuilder`
//! of them) around the rest of that client's middleware chain:
//!
//! ```
//! # #[cfg(all(feature = "concurrency", feature = "fallback", feature = "request-id"))]
//! # async fn call(url: &str) -> Result<(), reqwest_middleware::Error> {
//! use reqwest_middleware::ClientBuilder;
//! use tower_overload::retry::{RetryPolicy, RetryReport};
//! use tower_overload::reqwest_middleware::OverloadMiddleware;
//! use tower_overload::stack::OverloadStack;
//!
//! let client = ClientBuilder::new(reqwest::Client::new())
//!     .with(OverloadMiddleware::new(OverloadStack::new().retry(RetryPolicy::foreground())))
//!     .build();
//! let response = client
//!     .post(url)
//!     .header("content-type", "application/json")
//!     .body(r#"{"model":"claude-haiku-4-5","max_tokens":64,"messages":[]}"#)
//!     .send()
//!     .await?;
//! if let Some(report) = response.extensions().get::<RetryReport>() {
//!     println!("{} attempts, waited {:?}", report.attempts.len(), report.waited);
//! }
//! # Ok(()) }
//! ```
//!
//! # What happens to a call
//!
//! The `reqwest::Request` becomes an `http::Request<`[`RequestBody`]`>`, the
//! layers run on it as on any client, and each attempt goes on through
//! [`NextService`] (the middleware registered after this one, then the
//! `reqwest::Client`). The final `http::Response` becomes a
//! `reqwest::Response` again, with the same status, headers, URL, body
//! stream and extensions, so what the layers leave there is reachable with
//! `response.extensions()`: [`RetryReport`](crate::retry::RetryReport),
//! [`ServedBy`](crate::fallback::ServedBy) (when a fallback chain served the
//! call); the answering attempt's id is its `request-id` header
//! ([`RequestId::from_headers`](crate::RequestId::from_headers)).
//! Register it first (outermost) so that every other middleware runs once
//! per attempt, and so that no other middleware retries too: two retry
//! loops multiply their attempts.
//!
//! # Bodies
//!
//! A body in memory (what `.body(bytes | String | Vec<u8>)` and `.json(..)`
//! give; `reqwest::Body::as_bytes` is `Some`) is taken as `Bytes` without a
//! copy and replayed by reference count for every retry and fallback. A
//! streaming body (`reqwest::Body::wrap_stream`, a file) exists only as it is
//! read, so it is sent once: if that attempt's answer was worth retrying,
//! the call ends there with
//! [`StopReason::BodyNotReplayable`](crate::retry::StopReason::BodyNotReplayable)
//! in the `RetryReport` (the response itself is handed back, under the
//! default [`FinalFailure::Response`](crate::retry::FinalFailure)), or with
//! [`ErrorKind::BodyNotReplayable`](crate::ErrorKind::BodyNotReplayable)
//! under `FinalFailure::Error`. It is never sent short or twice. A stream's
//! model cannot be read without consuming it, so per-model limits count it
//! under their default key and fallback cannot rewrite it: send requests
//! whose routing matters from memory.
//!
//! # Shared state, and one stack per call
//!
//! `Next` borrows the client for one call only, so the layered service is
//! built anew around it for every call (`Layer::layer` per call). The
//! crate's layers keep their shared state in the *layer*, behind an `Arc`
//! that every service they make shares, so nothing is lost between calls:
//! the retry quota or budget and the jitter seeds live in the
//! [`RetryPolicy`](crate::retry::RetryPolicy) (`Arc`s cloned with it);
//! [`ConcurrencyPerModelLayer`](crate::concurrency::ConcurrencyPerModelLayer)
//! makes its per-model limits at its first `layer()` call and shares them
//! with every later one; [`ModelFallbackLayer`](crate::fallback::ModelFallbackLayer)
//! does the same with its cooldowns and breakers; the
//! [`OverloadStats`](crate::request_id::OverloadStats) of a
//! [`RequestIdLogLayer`](crate::request_id::RequestIdLogLayer) are shared
//! too (only its correlation-id counter is per service, and ids stay
//! random). Clones of one `OverloadMiddleware` share all of this.
//!
//! A third-party layer that makes fresh state in `layer()` (tower's
//! `ConcurrencyLimitLayer` or `RateLimitLayer`, for example) would get a
//! fresh limit per call inside this middleware, which limits nothing: put
//! such limits around the `reqwest::Client` instead, or use this crate's
//! per-model limits.
//!
//! # Errors
//!
//! An error no layer wrapped keeps its variant: a `reqwest::Error` stays
//! `reqwest_middleware::Error::Reqwest`, and an error of a middleware
//! further in stays `Error::Middleware` with its own `anyhow::Error`. The
//! layers' errors become `Error::Middleware`, whose `anyhow::Error`
//! downcasts to the crate's [`Error`](crate::Error) (the class, status,
//! attempts and request ids). The retry layer wraps every failure of the
//! chain it gives up on (a refused connection after its retries, say) in
//! its own `Error`: the `reqwest::Error` (or the inner middleware's error)
//! is then that error's source, found with `anyhow::Error::chain`.
//!
//! ```
//! # fn check(error: reqwest_middleware::Error) {
//! use reqwest_middleware::Error;
//! match error {
//!     Error::Middleware(error) => {
//!         if let Some(ours) = error.downcast_ref::<tower_overload::Error>() {
//!             eprintln!("{ours} ({:?} after {} attempts)", ours.kind(), ours.attempts());
//!         }
//!         let transport = error.chain().find_map(|e| e.downcast_ref::<reqwest::Error>());
//!         if let Some(transport) = transport {
//!             eprintln!("the client failed: {transport}");
//!         }
//!     }
//!     Error::Reqwest(error) => eprintln!("the client failed: {error}"),
//! }
//! # }
//! ```

mod body;
mod next;

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use ::reqwest_middleware::{Middleware, Next};
use bytes::Bytes;
use http::Extensions;
use tower_layer::Layer;
use tower_service::Service;

pub use body::RequestBody;
pub use next::NextService;
use next::{ChainExtensions, InnerMiddlewareError};

use crate::BoxError;

/// A `reqwest_middleware::Middleware` that runs a stack of this crate's
/// layers (any `tower::Layer` over [`NextService`]) for every call.
///
/// ```
/// use reqwest_middleware::ClientBuilder;
/// use tower::ServiceBuilder;
/// use tower_overload::reqwest_middleware::OverloadMiddleware;
/// use tower_overload::retry::{OverloadRetryLayer, RetryPolicy};
///
/// // Any stack of the layers, built with tower's ServiceBuilder (here the
/// // retry layer alone), or an `OverloadStack`.
/// let layers = ServiceBuilder::new().layer(OverloadRetryLayer::new(RetryPolicy::background()));
/// # // This crate's tests build reqwest with rustls but no crypto provider.
/// # let _ = rustls::crypto::ring::default_provider().install_default();
/// let client = ClientBuilder::new(reqwest::Client::new())
///     .with(OverloadMiddleware::new(layers))
///     .build();
/// # let _ = client;
/// ```
#[derive(Clone)]
pub struct OverloadMiddleware<L> {
    layer: L,
}

impl<L> fmt::Debug for OverloadMiddleware<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OverloadMiddleware")
            .field("layer", &std::any::type_name::<L>())
            .finish()
    }
}

impl<L> OverloadMiddleware<L> {
    /// Runs `layer`'s stack around the rest of the chain, for every call.
    ///
    /// ```
    /// use tower_overload::reqwest_middleware::OverloadMiddleware;
    /// use tower_overload::retry::{OverloadRetryLayer, RetryPolicy};
    /// let middleware = OverloadMiddleware::new(OverloadRetryLayer::new(RetryPolicy::foreground()));
    /// ```
    pub const fn new(layer: L) -> Self {
        Self { layer }
    }

    /// The layer.
    ///
    /// ```
    /// # use tower_overload::reqwest_middleware::OverloadMiddleware;
    /// # use tower_overload::retry::{OverloadRetryLayer, RetryPolicy};
    /// let middleware = OverloadMiddleware::new(OverloadRetryLayer::new(RetryPolicy::foreground()));
    /// let _layer: &OverloadRetryLayer = middleware.get_ref();
    /// ```
    pub fn get_ref(&self) -> &L {
        &self.layer
    }

    /// The layer, by value.
    ///
    /// ```
    /// # use tower_overload::reqwest_middleware::OverloadMiddleware;
    /// # use tower_overload::retry::{OverloadRetryLayer, RetryPolicy};
    /// let middleware = OverloadMiddleware::new(OverloadRetryLayer::new(RetryPolicy::foreground()));
    /// let _layer: OverloadRetryLayer = middleware.into_inner();
    /// ```
    pub fn into_inner(self) -> L {
        self.layer
    }
}

/// The service `L` makes around one call's [`NextService`].
pub type Stacked<'a, L> = <L as Layer<NextService<'a>>>::Service;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

// ===== impl OverloadMiddleware =====

// Written out rather than with `#[async_trait]`: the same signature the
// attribute gives the trait, without another dependency.
impl<L, R> Middleware for OverloadMiddleware<L>
where
    L: for<'a> Layer<NextService<'a>> + Send + Sync + 'static,
    for<'a> Stacked<'a, L>:
        Service<http::Request<RequestBody>, Response = http::Response<R>> + Send,
    for<'a> <Stacked<'a, L> as Service<http::Request<RequestBody>>>::Error: Into<BoxError>,
    for<'a> <Stacked<'a, L> as Service<http::Request<RequestBody>>>::Future: Send,
    R: http_body::Body + Send + Sync + 'static,
    R::Data: Into<Bytes>,
    R::Error: Into<BoxError>,
{
    fn handle<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        request: ::reqwest::Request,
        extensions: &'life1 mut Extensions,
        next: Next<'life2>,
    ) -> BoxFuture<'async_trait, ::reqwest_middleware::Result<::reqwest::Response>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let request =
                http::Request::<::reqwest::Body>::try_from(request)?.map(RequestBody::from);
            let mut service = self.layer.layer(NextService::new(next, extensions.clone()));
            std::future::poll_fn(|cx| service.poll_ready(cx))
                .await
                .map_err(into_middleware_error)?;
            let response = service.call(request).await.map_err(into_middleware_error)?;
            let (mut parts, body) = response.into_parts();
            if let Some(ChainExtensions(chain)) = parts.extensions.remove::<ChainExtensions>() {
                extensions.extend(chain);
            }
            let body = ::reqwest::Body::wrap(body);
            Ok(::reqwest::Response::from(http::Response::from_parts(
                parts, body,
            )))
        })
    }
}

/// The stack's error as reqwest-middleware's: see the module docs.
fn into_middleware_error(error: impl Into<BoxError>) -> ::reqwest_middleware::Error {
    let error = error.into();
    // A layer that only wrapped the error of the service inside it (the
    // crate's convention) is seen through, so that error keeps its type.
    let error = match error
        .downcast::<crate::Error>()
        .map(|ours| ours.into_foreign())
    {
        Ok(Ok(foreign)) => foreign,
        Ok(Err(ours)) => Box::new(ours),
        Err(other) => other,
    };
    let error = match error.downcast::<InnerMiddlewareError>() {
        Ok(inner) => return ::reqwest_middleware::Error::Middleware(inner.0),
        Err(error) => error,
    };
    let error = match error.downcast::<::reqwest::Error>() {
        Ok(reqwest) => return ::reqwest_middleware::Error::Reqwest(*reqwest),
        Err(error) => error,
    };
    match error.downcast::<crate::Error>() {
        Ok(crate_error) => {
            ::reqwest_middleware::Error::Middleware(anyhow::Error::new(*crate_error))
        }
        Err(other) => ::reqwest_middleware::Error::Middleware(anyhow::Error::from_boxed(other)),
    }
}
