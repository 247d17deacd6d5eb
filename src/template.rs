//! The head of a request kept to send it again: what retrying and falling back share.

use http::{Extensions, HeaderMap, HeaderValue, Method, Request, Uri, Version, header, request};

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

    /// The head a health probe copies (its endpoint and key).
    #[cfg(all(feature = "health", feature = "retry"))]
    pub(crate) fn head(&self) -> (&Uri, &HeaderMap) {
        (&self.uri, &self.headers)
    }
}

/// Fixes the framing headers of a request whose body was changed to `len`
/// bytes: the caller's `content-length` described the old body, and an
/// upstream reading it would get the new one cut short or wait for bytes that
/// never come. A request sent with `transfer-encoding` keeps that framing
/// (the client frames each chunk) and loses any `content-length`, which must
/// not go with it.
#[cfg_attr(not(feature = "fallback"), allow(dead_code))]
pub(crate) fn set_body_length(headers: &mut HeaderMap, len: usize) {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    } else {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_body_gets_its_own_length() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(10));
        set_body_length(&mut headers, 12);
        assert_eq!(headers[header::CONTENT_LENGTH], "12");
        let mut chunked = HeaderMap::new();
        chunked.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        chunked.insert(header::CONTENT_LENGTH, HeaderValue::from(10));
        set_body_length(&mut chunked, 12);
        assert!(!chunked.contains_key(header::CONTENT_LENGTH));
        assert_eq!(chunked[header::TRANSFER_ENCODING], "chunked");
    }
}
