//! Which bucket a request is counted in.

use http::Request;

use crate::body::ReplayableBody;
use crate::model::{self, Model};

/// Picks the key a request's concurrency is limited under.
///
/// `None` sends the request to the layer's default key. Closures
/// `Fn(&Request<B>) -> Option<Model>` are key functions too, e.g. to cap per
/// model and route:
///
/// ```
/// use tower_overload::Model;
/// use tower_overload::concurrency::{ConcurrencyPerModelLayer, KeyRequest, ModelKey};
///
/// let per_route = |request: &http::Request<http_body_util::Full<bytes::Bytes>>| {
///     let model = ModelKey.key(request)?;
///     Some(Model::new(format!("{}:{}", model, request.uri().path())))
/// };
/// let layer = ConcurrencyPerModelLayer::new(8).key_fn(per_route);
/// ```
pub trait KeyRequest<B> {
    /// The key of `request`.
    fn key(&self, request: &Request<B>) -> Option<Model>;
}

/// The default key: the [`Model`] extension the caller set, else the
/// top-level `"model"` of a body that is in memory (see
/// [`ReplayableBody::in_memory`]).
///
/// Reading the body costs a scan up to the `model` member (about 0.5 ns a
/// byte); setting the extension avoids it.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use tower_overload::Model;
/// use tower_overload::concurrency::{KeyRequest, ModelKey};
///
/// let request = http::Request::new(Full::new(Bytes::from_static(br#"{"model":"claude-haiku-4-5"}"#)));
/// assert_eq!(ModelKey.key(&request), Some(Model::new("claude-haiku-4-5")));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct ModelKey;

impl<B: ReplayableBody> KeyRequest<B> for ModelKey {
    fn key(&self, request: &Request<B>) -> Option<Model> {
        model::of_request(request)
    }
}

impl<B, F> KeyRequest<B> for F
where
    F: Fn(&Request<B>) -> Option<Model>,
{
    fn key(&self, request: &Request<B>) -> Option<Model> {
        self(request)
    }
}
