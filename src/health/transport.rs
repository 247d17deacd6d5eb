//! The user's client, type-erased: the monitor is stored in a retry policy
//! that is not generic, and it only ever needs one request at a time.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use bytes::{Buf, Bytes};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use tower_service::Service;

use super::HealthError;
use crate::BoxError;

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A response read whole, up to a cap.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

pub(crate) trait Transport: Send + Sync + 'static {
    /// Sends `request` and reads at most `max_body` bytes of the answer.
    fn send(
        &self,
        request: Request<Full<Bytes>>,
        max_body: usize,
    ) -> BoxFuture<Result<Reply, HealthError>>;
}

/// A `tower::Service` as a [`Transport`]. The mutex only guards the clone
/// taken for each request, so the service need not be `Sync`.
pub(crate) struct ServiceTransport<S>(pub(crate) Mutex<S>);

/// The error's message and its sources', for a record a person reads.
fn describe(error: BoxError) -> HealthError {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        source = inner.source();
    }
    HealthError::Transport(message)
}

impl<S, R> Transport for ServiceTransport<S>
where
    S: Service<Request<Full<Bytes>>, Response = Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    R: Body + Send + 'static,
    R::Data: Buf + Send,
    R::Error: Into<BoxError>,
{
    fn send(
        &self,
        request: Request<Full<Bytes>>,
        max_body: usize,
    ) -> BoxFuture<Result<Reply, HealthError>> {
        let mut service = crate::sync::lock(&self.0).clone();
        Box::pin(async move {
            std::future::poll_fn(|cx| service.poll_ready(cx))
                .await
                .map_err(|error| describe(error.into()))?;
            let response = service
                .call(request)
                .await
                .map_err(|error| describe(error.into()))?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, max_body)
                .collect()
                .await
                .map_err(|error| {
                    if error.is::<LengthLimitError>() {
                        HealthError::BodyTooLarge(max_body)
                    } else {
                        describe(error)
                    }
                })?
                .to_bytes();
            Ok(Reply {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        })
    }
}
