//! The head of a request kept to send it again: what retrying and falling back share.

use http::{Extensions, HeaderMap, Method, Request, Uri, Version, request};

/// Everything of a request but its body.
#[derive(Debug)]
pub(crate) struct RequestTemplate {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    extensions: Extensions,
}

impl RequestTemplate {
    pub(crate) fn new(parts: request::Parts) -> Self {
        Self {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            headers: parts.headers,
            extensions: parts.extensions,
        }
    }

    /// A request with a copy of this head and `body`.
    pub(crate) fn build<B>(&self, body: B) -> Request<B> {
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        *request.extensions_mut() = self.extensions.clone();
        request
    }

    #[cfg_attr(not(feature = "retry"), allow(dead_code))]
    pub(crate) fn extensions(&self) -> &Extensions {
        &self.extensions
    }
}
