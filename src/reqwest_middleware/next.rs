//! The rest of the reqwest-middleware chain as a tower service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use ::reqwest::ResponseBuilderExt;
use ::reqwest_middleware::Next;
use http::{Extensions, Request, Response};

use super::RequestBody;
use crate::BoxError;

/// What the layers inside [`OverloadMiddleware`](super::OverloadMiddleware)
/// wrap: the middleware after it and the `reqwest::Client`, as a
/// `tower::Service`.
///
/// Each attempt sends its `http::Request` on through `Next`, with its own
/// copy of the call's `http::Extensions` (the answering attempt's copy is
/// handed back to the middleware outside). The response comes back as an
/// `http::Response<reqwest::Body>` that still knows its URL.
///
/// Errors: a `reqwest::Error` is passed up as itself, so that a retry
/// policy's error classifier can read it; an error of a middleware further
/// in is passed up with that error as its source.
pub struct NextService<'a> {
    next: Next<'a>,
    extensions: Extensions,
}

impl fmt::Debug for NextService<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NextService").finish_non_exhaustive()
    }
}

impl Clone for NextService<'_> {
    fn clone(&self) -> Self {
        Self {
            next: self.next.clone(),
            extensions: self.extensions.clone(),
        }
    }
}

impl<'a> NextService<'a> {
    pub(crate) fn new(next: Next<'a>, extensions: Extensions) -> Self {
        Self { next, extensions }
    }
}

/// The extensions the answering attempt's middleware chain left, carried
/// back to [`OverloadMiddleware`](super::OverloadMiddleware) on the response.
#[derive(Clone)]
pub(crate) struct ChainExtensions(pub(crate) Extensions);

/// An error of a middleware further in, carried through the layers.
pub(crate) struct InnerMiddlewareError(pub(crate) anyhow::Error);

impl fmt::Debug for InnerMiddlewareError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for InnerMiddlewareError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for InnerMiddlewareError {
    // The middleware's own error, so that an error classifier sees what it is.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

impl<'a> tower_service::Service<Request<RequestBody>> for NextService<'a> {
    type Response = Response<::reqwest::Body>;
    type Error = BoxError;
    type Future = BoxFuture<'a, Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<RequestBody>) -> Self::Future {
        let next = self.next.clone();
        let mut extensions = self.extensions.clone();
        Box::pin(async move {
            let request = ::reqwest::Request::try_from(request.map(RequestBody::into_reqwest))?;
            let response = match next.run(request, &mut extensions).await {
                Ok(response) => response,
                Err(::reqwest_middleware::Error::Reqwest(error)) => return Err(error.into()),
                Err(::reqwest_middleware::Error::Middleware(error)) => {
                    return Err(InnerMiddlewareError(error).into());
                }
            };
            let url = response.url().clone();
            let mut response = Response::from(response);
            // `reqwest::Response::from(http::Response)` reads the URL back from here.
            if let Ok(carrier) = Response::builder().url(url).body(()) {
                response
                    .extensions_mut()
                    .extend(carrier.into_parts().0.extensions);
            }
            response
                .extensions_mut()
                .insert(ChainExtensions(extensions));
            Ok(response)
        })
    }
}
