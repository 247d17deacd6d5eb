//! [`RequestIdLogLayer`]: a `tracing` record of every call and attempt, with the API's request id.
//!
//! Support asks for the `request-id` of a failed call; most clients never
//! record it. This layer opens a span per call and records an event per
//! outcome with the status, the [class](crate::classify::Class), the
//! `request-id` (or, when the response has none, a client-side correlation
//! id), the model, the attempt and of how many, the latency and the
//! server's delay. Placed outside the retry and fallback layers (the
//! recommended order), it also records every attempt as it ends (an
//! operator watching a minute-long retry loop sees each attempt when it
//! happens), each with its own request id, and every model a call skipped
//! because its breaker was open.
//!
//! It only observes: the request goes on unchanged, as tower-http keeps
//! `SetRequestId` apart from `Trace`. Sending the correlation id upstream
//! as a request header is opt-in
//! ([`RequestIdLogLayer::send_correlation_header`]).
//!
//! Successes are DEBUG; overloads, rate limits, server errors and timeouts
//! WARN; client errors and failures whose retries were spent ERROR (see
//! [`DefaultOnOutcome`]; swap [`MakeSpan`] or [`OnOutcome`] to change what
//! is recorded). Secrets are never logged: no header and no body is
//! recorded, only the URI's path, and `authorization`, `x-api-key`,
//! `cookie` and `proxy-authorization` are marked sensitive on the way
//! through, so that layers inside print them as `Sensitive`.
//!
//! The response keeps its `request-id` header; read it with
//! [`RequestId::from_headers`] (no extension is added: it would cost every
//! call three allocations for a copy of a header). An optional
//! [`OverloadStats`] counts outcomes per class and model over the last
//! minute: the 529 rate, with an alert callback.
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_overload::RequestId;
//! use tower_overload::request_id::{OverloadStats, RequestIdLogLayer};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let stats = OverloadStats::new();
//! let upstream = service_fn(|_: Request<Full<Bytes>>| async {
//!     let response = Response::builder().status(529).header("request-id", "req_1").body(Full::new(Bytes::new())).unwrap();
//!     Ok::<_, std::convert::Infallible>(response)
//! });
//! let client = ServiceBuilder::new()
//!     .layer(RequestIdLogLayer::new().stats(stats.clone()))
//!     .service(upstream);
//! let response = client.oneshot(Request::new(Full::new(Bytes::from_static(br#"{"model":"claude-opus-4-6"}"#)))).await.unwrap();
//! assert_eq!(RequestId::from_headers(response.headers()).unwrap().as_str(), "req_1");
//! assert_eq!(stats.overload_rate(), 1.0);
//! # }
//! ```

mod callbacks;
pub mod future;
mod layer;

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION, SET_COOKIE};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use tower_service::Service;

pub use self::callbacks::{
    CallInfo, DefaultMakeSpan, DefaultOnOutcome, MakeSpan, OnOutcome, Outcome, Skip,
};
pub use self::layer::RequestIdLogLayer;
// The overload signal lives in its own module now; its old path still works.
pub use crate::stats::{AlertState, ClassCounts, OverloadAlert, OverloadStats};

use crate::body::ReplayableBody;
use crate::headers::RequestId;
use crate::model::{self, Model};

/// The default request header carrying the client-side correlation id.
pub const X_CLIENT_REQUEST_ID: HeaderName = HeaderName::from_static("x-client-request-id");

const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Marks the headers that carry secrets as sensitive, so `Debug` prints `Sensitive`.
///
/// ```
/// use http::HeaderMap;
/// use tower_overload::request_id::mark_sensitive;
///
/// let mut headers = HeaderMap::new();
/// headers.insert("x-api-key", "sk-ant-secret".parse().unwrap());
/// mark_sensitive(&mut headers);
/// assert!(!format!("{headers:?}").contains("sk-ant-secret"));
/// ```
pub fn mark_sensitive(headers: &mut HeaderMap) {
    // One pass over the few headers a request has, rather than a hashed
    // lookup per secret name (and `entry`, which may grow the map).
    for (name, value) in headers.iter_mut() {
        if [
            &AUTHORIZATION,
            &X_API_KEY,
            &COOKIE,
            &SET_COOKIE,
            &PROXY_AUTHORIZATION,
        ]
        .contains(&name)
        {
            value.set_sensitive(true);
        }
    }
}

/// State shared by every clone of the service.
pub(crate) struct Shared<M, O> {
    make_span: M,
    on_outcome: O,
    stats: Option<OverloadStats>,
    correlation_header: HeaderName,
    send_correlation: bool,
    #[cfg(feature = "metrics")]
    metrics: Option<crate::metrics::CallTable>,
}

impl<M: Send + Sync, O: OnOutcome + Send + Sync> crate::observe::ObserveCall for Shared<M, O> {
    fn attempt_ended(
        &self,
        correlation_id: &HeaderValue,
        attempt: &crate::observe::AttemptEnded<'_>,
    ) {
        if let Some(stats) = &self.stats {
            stats.record(attempt.model, attempt.class);
        }
        self.on_outcome.on_outcome(&Outcome {
            class: attempt.class,
            status: attempt.status,
            request_id: attempt.request_id,
            correlation_id: correlation_id.to_str().unwrap_or("-"),
            model: attempt.model,
            attempt: Some((attempt.number, attempt.max)),
            latency: Some(attempt.latency),
            // No wait follows the last attempt of a loop: zero, not "-".
            delay: Some(attempt.wait.unwrap_or_default()),
            is_final: false,
            exhausted: false,
            error: attempt.error,
            verdict: None,
        });
    }

    fn model_skipped(
        &self,
        correlation_id: &HeaderValue,
        model: &Model,
        reason: crate::observe::SkipReason,
        next: Option<&Model>,
    ) {
        self.on_outcome.on_skip(&Skip {
            model,
            reason: reason.as_str(),
            next,
            correlation_id: correlation_id.to_str().unwrap_or("-"),
        });
    }
}

/// Correlation ids made per thread, a block at a time: a counter from a
/// random start (no cache line shared by the cores on every call; two
/// threads' runs of ids practically never meet), written into one shared
/// buffer that each id is a slice of. So an id costs no allocation of its
/// own (one per block), and the retry layer's copy of the headers shares it.
struct CorrelationIds {
    next: u64,
    block: bytes::Bytes,
    used: usize,
}

const ID_LEN: usize = 20;
const IDS_PER_BLOCK: usize = 256;

impl CorrelationIds {
    fn next(&mut self) -> HeaderValue {
        if self.used == IDS_PER_BLOCK {
            let mut block = bytes::BytesMut::with_capacity(ID_LEN * IDS_PER_BLOCK);
            for _ in 0..IDS_PER_BLOCK {
                block.extend_from_slice(&correlation_text(self.next));
                self.next = self.next.wrapping_add(1);
            }
            self.block = block.freeze();
            self.used = 0;
        }
        let id = self
            .block
            .slice(self.used * ID_LEN..(self.used + 1) * ID_LEN);
        self.used += 1;
        HeaderValue::from_maybe_shared(id).unwrap_or(HeaderValue::from_static("cli_unknown"))
    }
}

/// `cli_` and 16 hex digits of a bijection of `n`: distinct counts give
/// distinct ids, scrambled so that ids do not look sequential.
fn correlation_text(n: u64) -> [u8; ID_LEN] {
    let id = n.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29) ^ 0x5851_F42D_4C95_7F2D;
    let mut text = *b"cli_0000000000000000";
    for (i, byte) in text[4..].iter_mut().enumerate() {
        *byte = b"0123456789abcdef"[((id >> (60 - 4 * i)) & 0xf) as usize];
    }
    text
}

thread_local! {
    static CORRELATION_IDS: std::cell::RefCell<CorrelationIds> = std::cell::RefCell::new(CorrelationIds {
        next: std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0u8),
        block: bytes::Bytes::new(),
        used: IDS_PER_BLOCK,
    });
}

fn next_correlation_id() -> HeaderValue {
    CORRELATION_IDS.with(|ids| ids.borrow_mut().next())
}

impl<M: fmt::Debug, O: fmt::Debug> fmt::Debug for Shared<M, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("make_span", &self.make_span)
            .field("on_outcome", &self.on_outcome)
            .field("stats", &self.stats)
            .field("correlation_header", &self.correlation_header)
            .field("send_correlation", &self.send_correlation)
            .finish_non_exhaustive()
    }
}

/// Records calls and attempts with their request ids; made by [`RequestIdLogLayer`].
#[derive(Debug)]
pub struct RequestIdLog<S, M = DefaultMakeSpan, O = DefaultOnOutcome> {
    inner: S,
    shared: Arc<Shared<M, O>>,
}

impl<S: Clone, M, O> Clone for RequestIdLog<S, M, O> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

// ===== impl RequestIdLog =====

impl<S, M, O> RequestIdLog<S, M, O> {
    /// The inner service.
    ///
    /// ```
    /// # use tower::Layer;
    /// # use tower_overload::request_id::RequestIdLogLayer;
    /// assert_eq!(*RequestIdLogLayer::new().layer(7u8).get_ref(), 7);
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    ///
    /// ```
    /// # use tower::Layer;
    /// # use tower_overload::request_id::RequestIdLogLayer;
    /// let mut service = RequestIdLogLayer::new().layer(7u8);
    /// *service.get_mut() = 8;
    /// ```
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    ///
    /// ```
    /// # use tower::Layer;
    /// # use tower_overload::request_id::RequestIdLogLayer;
    /// assert_eq!(RequestIdLogLayer::new().layer(7u8).into_inner(), 7);
    /// ```
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, M, O, B, R> Service<Request<B>> for RequestIdLog<S, M, O>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Error: fmt::Display + 'static,
    M: MakeSpan + Send + Sync + 'static,
    O: OnOutcome + Send + Sync + 'static,
    B: ReplayableBody,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = future::ResponseFuture<S::Future, M, O>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        mark_sensitive(request.headers_mut());
        let correlation_id = match request.headers().get(&self.shared.correlation_header) {
            Some(value) if RequestId::new(value.clone()).is_some() => value.clone(),
            _ => {
                let id = next_correlation_id();
                // Opt-in: a layer that logs does not change requests by default.
                if self.shared.send_correlation {
                    request
                        .headers_mut()
                        .insert(self.shared.correlation_header.clone(), id.clone());
                }
                id
            }
        };
        let model = model::of_request_carried(&mut request);
        #[cfg(feature = "metrics")]
        if let Some(table) = &self.shared.metrics {
            table.server(request.uri());
        }
        let span = self.shared.make_span.make_span(&CallInfo {
            method: request.method(),
            uri: request.uri(),
            model: model.as_ref(),
            correlation_id: correlation_id.to_str().unwrap_or("-"),
        });
        let mut context = Some(crate::observe::CallContext {
            sink: Arc::clone(&self.shared) as Arc<dyn crate::observe::ObserveCall>,
            correlation_id: correlation_id.clone(),
            told: 0,
        });
        let inner = &mut self.inner;
        let future = span.in_scope(|| crate::observe::lend(&mut context, || inner.call(request)));
        future::ResponseFuture::new(
            future,
            span,
            Arc::clone(&self.shared),
            correlation_id,
            model,
            context,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlation_ids_are_distinct_across_blocks_and_threads() {
        let run = || {
            (0..IDS_PER_BLOCK * 3 + 7)
                .map(|_| next_correlation_id())
                .collect::<Vec<_>>()
        };
        let mut ids = run();
        ids.extend(std::thread::spawn(run).join().unwrap());
        for id in &ids {
            let text = id.to_str().unwrap();
            assert_eq!(text.len(), ID_LEN);
            assert!(text.starts_with("cli_"));
            assert!(
                RequestId::new(id.clone()).is_some(),
                "a plausible id: {text}"
            );
        }
        let distinct: std::collections::HashSet<_> = ids.iter().map(|id| id.as_bytes()).collect();
        assert_eq!(distinct.len(), ids.len());
    }

    #[test]
    fn correlation_texts_of_distinct_counts_differ() {
        let texts: std::collections::HashSet<_> = (0..100_000u64)
            .chain(u64::MAX - 1000..=u64::MAX)
            .map(correlation_text)
            .collect();
        assert_eq!(texts.len(), 100_000 + 1001);
    }
}
