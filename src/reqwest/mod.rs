//! [`ReqwestService`]: a [`reqwest::Client`] as the HTTP client under the layers.
//!
//! The layers serve `http::Request<B>` and expect an `http::Response<R>`;
//! `reqwest::Client` speaks `reqwest::Request` and `reqwest::Response`.
//! [`ReqwestService`] converts both ways, without copying a body:
//!
//! - an in-memory request body (`Full<Bytes>`, `String`, `Empty<Bytes>`:
//!   any body of known length that hands over all of it in its first frame)
//!   becomes a reqwest body over the same `Bytes` (a reference count; reqwest
//!   knows its length and could resend it); any other `http_body::Body` is
//!   streamed through [`reqwest::Body::wrap`], nothing of it is buffered here;
//! - the response comes back as an `http::Response<reqwest::Body>`, which is
//!   an `http_body::Body`, with the request's extensions still reachable on
//!   it (the layers outside add [`RetryReport`](crate::retry::RetryReport),
//!   `ServedBy` and the rest).
//!
//! Its error is [`reqwest::Error`], as the client returned it. The retry
//! layer boxes it and asks its [`ClassifyError`](crate::retry::ClassifyError)
//! about it: [`ReqwestErrorClassifier`] (which
//! [`DefaultErrorClassifier`](crate::retry::DefaultErrorClassifier) also
//! consults when this feature is on) retries connection failures and
//! reqwest's own timeouts, so `Client::builder().timeout(..)` is a per-attempt
//! timeout that the retry layer sees as [`Class::Timeout`](crate::classify::Class::Timeout).
//!
//! TLS is reqwest's business: enable the reqwest TLS feature you want in your
//! own `Cargo.toml` (this crate turns none on).
//!
//! Under the whole `OverloadStack` (the default features):
//!
//! ```
//! # #[cfg(all(feature = "concurrency", feature = "fallback", feature = "request-id"))]
//! # async fn call() -> Result<(), tower_overload::BoxError> {
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use tower::{Layer, ServiceExt};
//! use tower_overload::reqwest::ReqwestService;
//! use tower_overload::retry::RetryPolicy;
//! use tower_overload::stack::OverloadStack;
//!
//! let client = reqwest::Client::builder()
//!     .timeout(std::time::Duration::from_secs(600))
//!     .build()?;
//! let service = OverloadStack::new()
//!     .retry(RetryPolicy::foreground())
//!     .layer(ReqwestService::new(client));
//!
//! let request = http::Request::post("http://127.0.0.1:8080/v1/messages")
//!     .header("content-type", "application/json")
//!     .body(Full::new(Bytes::from_static(br#"{"model":"claude-opus-4-6","max_tokens":64,"messages":[]}"#)))?;
//! let response = service.oneshot(request).await?;
//! println!("{}", response.status());
//! # Ok(())
//! # }
//! ```
//!
//! Under the retry layer alone, with the classifier named:
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_overload::reqwest::{ReqwestErrorClassifier, ReqwestService};
//! use tower_overload::retry::{OverloadRetryLayer, RetryPolicy, RetryReport};
//!
//! # async fn call() -> Result<(), tower_overload::BoxError> {
//! let client = reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).build()?;
//! let service = ServiceBuilder::new()
//!     .layer(OverloadRetryLayer::new(
//!         RetryPolicy::foreground().error_classifier(ReqwestErrorClassifier::new()),
//!     ))
//!     .service(ReqwestService::new(client));
//!
//! let request = http::Request::post("http://127.0.0.1:8080/v1/messages")
//!     .body(Full::new(Bytes::from_static(br#"{"model":"claude-opus-4-6"}"#)))?;
//! let response = service.oneshot(request).await?;
//! let attempts = response.extensions().get::<RetryReport>().map_or(1, |r| r.attempts.len());
//! let body = response.into_body().collect().await?.to_bytes();
//! println!("{attempts} attempt(s), {} bytes", body.len());
//! # Ok(())
//! # }
//! ```

mod body;
mod classify;
pub mod future;

use std::fmt;
use std::marker::PhantomData;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::Full;
use tower_service::Service;

use crate::BoxError;

pub use self::classify::ReqwestErrorClassifier;
pub(crate) use self::classify::verdict;

/// A [`reqwest::Client`] as a `tower::Service<http::Request<B>>`.
///
/// `B` is the request body: any `http_body::Body` whose data turns into
/// [`Bytes`], `Full<Bytes>` unless named. It is a type parameter, as in
/// hyper-util's `Client`, so that `service.ready().await?.call(request)`
/// infers it. The response is an `http::Response<reqwest::Body>` and the
/// error a [`reqwest::Error`]. Cloning is cheap (reqwest's client is a
/// reference count); every clone shares the client's connection pool.
///
/// ```
/// # let _ = rustls::crypto::ring::default_provider().install_default(); // the dev build of reqwest has no TLS provider
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use tower::Service;
/// use tower_overload::reqwest::ReqwestService;
///
/// fn is_a_client<S: Service<http::Request<Full<Bytes>>> + Clone>(_: &S) {}
///
/// let service: ReqwestService = ReqwestService::new(reqwest::Client::new());
/// is_a_client(&service);
/// // Another body type, on the same connection pool.
/// let strings: ReqwestService<String> = service.get_ref().clone().into();
/// # let _ = strings;
/// ```
pub struct ReqwestService<B = Full<Bytes>> {
    client: reqwest::Client,
    _body: PhantomData<fn(B)>,
}

// ===== impl ReqwestService =====

impl<B> ReqwestService<B> {
    /// Serves requests with `client`.
    ///
    /// ```
    /// # let _ = rustls::crypto::ring::default_provider().install_default(); // the dev build of reqwest has no TLS provider
    /// # use tower_overload::reqwest::ReqwestService;
    /// let service: ReqwestService = ReqwestService::new(reqwest::Client::new());
    /// ```
    pub const fn new(client: reqwest::Client) -> Self {
        Self {
            client,
            _body: PhantomData,
        }
    }

    /// The client.
    ///
    /// ```
    /// # let _ = rustls::crypto::ring::default_provider().install_default(); // the dev build of reqwest has no TLS provider
    /// # use tower_overload::reqwest::ReqwestService;
    /// let service: ReqwestService = ReqwestService::new(reqwest::Client::new());
    /// let _builder = service.get_ref().get("http://127.0.0.1:8080/health");
    /// ```
    pub fn get_ref(&self) -> &reqwest::Client {
        &self.client
    }

    /// The client, mutably.
    ///
    /// ```
    /// # let _ = rustls::crypto::ring::default_provider().install_default(); // the dev build of reqwest has no TLS provider
    /// # use tower_overload::reqwest::ReqwestService;
    /// let mut service: ReqwestService = ReqwestService::new(reqwest::Client::new());
    /// *service.get_mut() = reqwest::Client::new();
    /// ```
    pub fn get_mut(&mut self) -> &mut reqwest::Client {
        &mut self.client
    }

    /// Unwraps the client.
    ///
    /// ```
    /// # let _ = rustls::crypto::ring::default_provider().install_default(); // the dev build of reqwest has no TLS provider
    /// # use tower_overload::reqwest::ReqwestService;
    /// let service: ReqwestService = ReqwestService::new(reqwest::Client::new());
    /// let client: reqwest::Client = service.into_inner();
    /// ```
    pub fn into_inner(self) -> reqwest::Client {
        self.client
    }
}

impl<B> Clone for ReqwestService<B> {
    fn clone(&self) -> Self {
        Self::new(self.client.clone())
    }
}

impl<B> fmt::Debug for ReqwestService<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReqwestService")
            .field("client", &self.client)
            .finish()
    }
}

impl<B> From<reqwest::Client> for ReqwestService<B> {
    fn from(client: reqwest::Client) -> Self {
        Self::new(client)
    }
}

impl<B> Service<Request<B>> for ReqwestService<B>
where
    B: Body + Send + Sync + Unpin + 'static,
    B::Data: Into<Bytes>,
    B::Error: Into<BoxError>,
{
    type Response = Response<reqwest::Body>;
    type Error = reqwest::Error;
    type Future = future::ResponseFuture<B>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // reqwest's client is always ready: its pool queues connections itself.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        future::ResponseFuture::new(self.client.clone(), request)
    }
}
