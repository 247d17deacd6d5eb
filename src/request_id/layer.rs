use std::sync::Arc;

use http::HeaderName;
use tower_layer::Layer;

use super::{
    DefaultMakeSpan, DefaultOnOutcome, MakeSpan, OnOutcome, OverloadStats, RequestIdLog, Shared,
    X_CLIENT_REQUEST_ID,
};

/// Builds [`RequestIdLog`]: a span per call and an event per outcome, with request ids.
///
/// ```
/// use tracing::Level;
/// use tower_overload::request_id::{DefaultOnOutcome, OverloadStats, RequestIdLogLayer};
///
/// let stats = OverloadStats::new().on_alert(|alert| eprintln!("529 rate {:.1}%", alert.rate * 100.0));
/// let layer = RequestIdLogLayer::new()
///     .on_outcome(DefaultOnOutcome::default().success_level(Level::INFO))
///     .correlation_header(http::HeaderName::from_static("x-my-correlation-id"))
///     .send_correlation_header(true)
///     .stats(stats);
/// ```
#[derive(Debug, Clone)]
pub struct RequestIdLogLayer<M = DefaultMakeSpan, O = DefaultOnOutcome> {
    make_span: M,
    on_outcome: O,
    stats: Option<OverloadStats>,
    correlation_header: HeaderName,
    send_correlation: bool,
    #[cfg(feature = "metrics")]
    metrics: bool,
}

impl RequestIdLogLayer {
    /// The defaults: [`DefaultMakeSpan`], [`DefaultOnOutcome`], the
    /// correlation id read from `x-client-request-id` when the caller set
    /// one (and not sent upstream), no stats; with the `metrics` feature,
    /// metrics on.
    ///
    /// ```
    /// # use tower_overload::request_id::RequestIdLogLayer;
    /// let layer = RequestIdLogLayer::new();
    /// ```
    pub fn new() -> Self {
        Self {
            make_span: DefaultMakeSpan,
            on_outcome: DefaultOnOutcome::default(),
            stats: None,
            correlation_header: X_CLIENT_REQUEST_ID,
            send_correlation: false,
            #[cfg(feature = "metrics")]
            metrics: true,
        }
    }
}

impl Default for RequestIdLogLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<M, O> RequestIdLogLayer<M, O> {
    /// Makes the span of each call with `make_span`.
    ///
    /// ```
    /// use tower_overload::request_id::{CallInfo, RequestIdLogLayer, MakeSpan};
    /// #[derive(Clone)]
    /// struct Quiet;
    /// impl MakeSpan for Quiet {
    ///     fn make_span(&self, _: &CallInfo<'_>) -> tracing::Span { tracing::Span::none() }
    /// }
    /// let layer = RequestIdLogLayer::new().make_span(Quiet);
    /// ```
    pub fn make_span<M2: MakeSpan>(self, make_span: M2) -> RequestIdLogLayer<M2, O> {
        RequestIdLogLayer {
            make_span,
            on_outcome: self.on_outcome,
            stats: self.stats,
            correlation_header: self.correlation_header,
            send_correlation: self.send_correlation,
            #[cfg(feature = "metrics")]
            metrics: self.metrics,
        }
    }

    /// Records outcomes with `on_outcome`.
    ///
    /// ```
    /// use tower_overload::request_id::{Outcome, OnOutcome, RequestIdLogLayer};
    /// #[derive(Clone)]
    /// struct Print;
    /// impl OnOutcome for Print {
    ///     fn on_outcome(&self, outcome: &Outcome<'_>) { println!("{} {:?}", outcome.class, outcome.request_id); }
    /// }
    /// let layer = RequestIdLogLayer::new().on_outcome(Print);
    /// ```
    pub fn on_outcome<O2: OnOutcome>(self, on_outcome: O2) -> RequestIdLogLayer<M, O2> {
        RequestIdLogLayer {
            make_span: self.make_span,
            on_outcome,
            stats: self.stats,
            correlation_header: self.correlation_header,
            send_correlation: self.send_correlation,
            #[cfg(feature = "metrics")]
            metrics: self.metrics,
        }
    }

    /// Counts every outcome in `stats` (clones share counts).
    ///
    /// ```
    /// # use tower_overload::request_id::{OverloadStats, RequestIdLogLayer};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let layer = RequestIdLogLayer::new().stats(OverloadStats::new());
    /// # }
    /// ```
    pub fn stats(mut self, stats: OverloadStats) -> Self {
        self.stats = Some(stats);
        self
    }

    /// The request header that carries the client-side correlation id: a
    /// caller's own value there is logged as the call's id (and, with
    /// [`send_correlation_header`](Self::send_correlation_header), a new
    /// one is sent in it when the caller set none).
    ///
    /// ```
    /// # use tower_overload::request_id::RequestIdLogLayer;
    /// let layer = RequestIdLogLayer::new().correlation_header(http::HeaderName::from_static("x-trace-id"));
    /// ```
    pub fn correlation_header(mut self, name: HeaderName) -> Self {
        self.correlation_header = name;
        self
    }

    /// Whether a request without a correlation id gets one in its
    /// [correlation header](Self::correlation_header), sent upstream
    /// (default `false`: the layer only observes, and the id is in the logs
    /// only). Turn it on to find a call in the upstream's or a proxy's logs.
    ///
    /// ```
    /// # use tower_overload::request_id::RequestIdLogLayer;
    /// let layer = RequestIdLogLayer::new().send_correlation_header(true);
    /// ```
    pub fn send_correlation_header(mut self, send: bool) -> Self {
        self.send_correlation = send;
        self
    }

    /// Whether the layer records [metrics](crate::metrics) (default on
    /// with the feature): `gen_ai.client.operation.duration` per call.
    ///
    /// ```
    /// # use tower_overload::request_id::RequestIdLogLayer;
    /// let layer = RequestIdLogLayer::new().metrics(false);
    /// ```
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn metrics(mut self, on: bool) -> Self {
        self.metrics = on;
        self
    }
}

impl<S, M: Clone, O: Clone> Layer<S> for RequestIdLogLayer<M, O> {
    type Service = RequestIdLog<S, M, O>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestIdLog {
            inner,
            shared: Arc::new(Shared {
                make_span: self.make_span.clone(),
                on_outcome: self.on_outcome.clone(),
                stats: self.stats.clone(),
                correlation_header: self.correlation_header.clone(),
                send_correlation: self.send_correlation,
                #[cfg(feature = "metrics")]
                metrics: self.metrics.then(crate::metrics::CallTable::new),
            }),
        }
    }
}
