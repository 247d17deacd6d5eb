//! [`OverloadStack`]: the four layers in one value (all four features).

use tower_layer::Layer;

use crate::body::PeekedBody;
use crate::concurrency::{ConcurrencyPerModel, ConcurrencyPerModelLayer, PermitBody};
use crate::fallback::{FallbackStep, ModelFallback, ModelFallbackLayer};
use crate::request_id::{OverloadStats, RequestIdLog, RequestIdLogLayer};
use crate::retry::{OverloadRetry, OverloadRetryLayer, RetryPolicy};

/// The recommended stack: log, fallback, retry, per-model concurrency.
///
/// Defaults: logging on, no fallback chain (fallback is opt-in: switching
/// models changes answers), [`RetryPolicy::foreground`], 16 calls in flight
/// per model. Without a chain the fallback layer is a pass-through that
/// reads nothing and allocates nothing, so leaving it in the type costs no
/// more than leaving it out.
#[derive(Debug, Clone)]
pub struct OverloadStack {
    log: RequestIdLogLayer,
    fallback: ModelFallbackLayer,
    retry: RetryPolicy,
    concurrency: ConcurrencyPerModelLayer,
}

impl Default for OverloadStack {
    fn default() -> Self {
        Self::new()
    }
}

impl OverloadStack {
    /// The defaults above.
    ///
    /// ```
    /// # use tower_overload::stack::OverloadStack;
    /// let stack = OverloadStack::new();
    /// ```
    pub fn new() -> Self {
        Self {
            log: RequestIdLogLayer::new(),
            fallback: ModelFallbackLayer::new(Vec::<FallbackStep>::new()),
            retry: RetryPolicy::foreground(),
            concurrency: ConcurrencyPerModelLayer::new(16),
        }
    }

    /// The retry policy.
    ///
    /// ```
    /// # use tower_overload::{retry::RetryPolicy, stack::OverloadStack};
    /// let stack = OverloadStack::new().retry(RetryPolicy::background());
    /// ```
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// The per-model concurrency layer.
    ///
    /// ```
    /// # use tower_overload::{concurrency::ConcurrencyPerModelLayer, stack::OverloadStack};
    /// let stack = OverloadStack::new().concurrency(ConcurrencyPerModelLayer::new(8));
    /// ```
    pub fn concurrency(mut self, layer: ConcurrencyPerModelLayer) -> Self {
        self.concurrency = layer;
        self
    }

    /// Model fallback (off unless set).
    ///
    /// ```
    /// # use tower_overload::{fallback::ModelFallbackLayer, stack::OverloadStack};
    /// let stack = OverloadStack::new().fallback(ModelFallbackLayer::new(["claude-opus-4-6", "claude-sonnet-4-6"]));
    /// ```
    pub fn fallback(mut self, layer: ModelFallbackLayer) -> Self {
        self.fallback = layer;
        self
    }

    /// The log layer.
    ///
    /// ```
    /// # use tower_overload::{request_id::RequestIdLogLayer, stack::OverloadStack};
    /// let stack = OverloadStack::new().log(RequestIdLogLayer::new());
    /// ```
    pub fn log(mut self, layer: RequestIdLogLayer) -> Self {
        self.log = layer;
        self
    }

    /// Counts every attempt's outcome in `stats` (the 529 rate and its alert).
    ///
    /// ```
    /// # use tower_overload::{request_id::OverloadStats, stack::OverloadStack};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let stack = OverloadStack::new().stats(OverloadStats::new());
    /// # }
    /// ```
    pub fn stats(mut self, stats: OverloadStats) -> Self {
        self.log = self.log.stats(stats);
        self
    }
}

/// The service [`OverloadStack`] makes.
pub type OverloadService<S> = RequestIdLog<ModelFallback<OverloadRetry<ConcurrencyPerModel<S>>>>;

/// The body of the responses an [`OverloadService`] gives, around the
/// client's response body `B`: what the retry layer peeked, then the rest,
/// holding the call's concurrency permit until it ends.
///
/// ```
/// use http_body_util::Full;
/// use bytes::Bytes;
/// use tower_overload::stack::OverloadBody;
/// fn read_later(_response: http::Response<OverloadBody<Full<Bytes>>>) {}
/// ```
pub type OverloadBody<B> = PeekedBody<PermitBody<B>>;

impl<S> Layer<S> for OverloadStack {
    type Service = OverloadService<S>;

    fn layer(&self, client: S) -> Self::Service {
        let concurrent = self.concurrency.layer(client);
        let retrying = OverloadRetryLayer::new(self.retry.clone()).layer(concurrent);
        let falling_back = self.fallback.layer(retrying);
        self.log.layer(falling_back)
    }
}
