//! The response future of [`ReqwestService`](super::ReqwestService).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Extensions, Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::BoxError;

/// reqwest's own future. `Client::execute` returns an unnameable
/// `impl Future`; its `tower::Service` impl names the same future, so no box
/// of ours is needed (reqwest boxes its in-flight state inside).
type Pending = <reqwest::Client as Service<reqwest::Request>>::Future;

pin_project! {
    /// Converts the request on its first poll, then awaits reqwest.
    ///
    /// ```
    /// # let _ = rustls::crypto::ring::default_provider().install_default(); // the dev build of reqwest has no TLS provider
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower::Service;
    /// use tower_overload::reqwest::{ReqwestService, future::ResponseFuture};
    ///
    /// let mut service = ReqwestService::new(reqwest::Client::new());
    /// let request = http::Request::get("http://127.0.0.1:8080/").body(Full::new(Bytes::new())).unwrap();
    /// let future: ResponseFuture<Full<Bytes>> = service.call(request);
    /// # drop(future);
    /// ```
    pub struct ResponseFuture<B> {
        #[pin]
        state: State<B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<B> {
        // The body is converted here rather than in `call`: polling it
        // needs the caller's waker (and, for some bodies, its runtime).
        Convert {
            client: reqwest::Client,
            request: Option<Request<B>>,
        },
        Send {
            #[pin]
            pending: Pending,
            // The request's, merged under the response's own.
            extensions: Extensions,
        },
        Done,
    }
}

impl<B> ResponseFuture<B> {
    pub(super) fn new(client: reqwest::Client, request: Request<B>) -> Self {
        Self {
            state: State::Convert {
                client,
                request: Some(request),
            },
        }
    }
}

impl<B> fmt::Debug for ResponseFuture<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Convert { .. } => "Convert",
            State::Send { .. } => "Send",
            State::Done => "Done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<B> Future for ResponseFuture<B>
where
    B: Body + Send + Sync + Unpin + 'static,
    B::Data: Into<Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<reqwest::Body>, reqwest::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project().state.project() {
                StateProj::Convert { client, request } => {
                    let Some(request) = request.take() else {
                        self.as_mut().project().state.set(State::Done);
                        continue;
                    };
                    let (parts, body) = request.into_parts();
                    // Cloning an empty map allocates nothing; under the
                    // layers it holds a few small records.
                    let extensions = parts.extensions.clone();
                    let body = super::body::to_reqwest(body, cx);
                    let request = match reqwest::Request::try_from(Request::from_parts(parts, body))
                    {
                        Ok(request) => request,
                        Err(error) => {
                            self.as_mut().project().state.set(State::Done);
                            return Poll::Ready(Err(error));
                        }
                    };
                    let pending = client.call(request);
                    self.as_mut().project().state.set(State::Send {
                        pending,
                        extensions,
                    });
                }
                StateProj::Send {
                    pending,
                    extensions,
                } => {
                    let result = std::task::ready!(pending.poll(cx));
                    let mut request_extensions = std::mem::take(extensions);
                    self.as_mut().project().state.set(State::Done);
                    return Poll::Ready(result.map(|response| {
                        let mut response = Response::from(response);
                        if !request_extensions.is_empty() {
                            // What the response (hyper, reqwest) set wins.
                            request_extensions.extend(std::mem::take(response.extensions_mut()));
                            *response.extensions_mut() = request_extensions;
                        }
                        response
                    }));
                }
                // Polled after completion: stay pending rather than panic.
                StateProj::Done => return Poll::Pending,
            }
        }
    }
}
