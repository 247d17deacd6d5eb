//! [`OverloadStack`]: the four layers in one value (all four features), and
//! the pacing layer with the `pacing` feature.

use tower_layer::Layer;

use crate::body::PeekedBody;
use crate::concurrency::{ConcurrencyPerModel, ConcurrencyPerModelLayer, PermitBody};
use crate::fallback::{FallbackStep, ModelFallback, ModelFallbackLayer};
#[cfg(feature = "pacing")]
use crate::pacing::{PacedBody, RateLimitPacing, RateLimitPacingLayer};
use crate::request_id::{OverloadStats, RequestIdLog, RequestIdLogLayer};
use crate::retry::{OverloadRetry, OverloadRetryLayer, RetryPolicy};

/// The recommended stack: log, fallback, retry, (pacing,) per-model concurrency.
///
/// Defaults: logging on, no fallback chain (fallback is opt-in: switching
/// models changes answers), [`RetryPolicy::foreground`], 16 calls in flight
/// per model. Without a chain the fallback layer is a pass-through that
/// reads nothing and allocates nothing, so leaving it in the type costs no
/// more than leaving it out.
///
/// With the `pacing` feature the stack also paces every attempt under the
/// organisation's rate limits ([`RateLimitPacingLayer::new`]: no limit
/// configured, each learned from the first response's
/// `anthropic-ratelimit-*` headers, and a 429 pauses the model for every
/// clone); set limits up front with [`OverloadStack::pacing`].
#[derive(Debug, Clone)]
pub struct OverloadStack {
    log: RequestIdLogLayer,
    fallback: ModelFallbackLayer,
    retry: RetryPolicy,
    #[cfg(feature = "pacing")]
    pacing: RateLimitPacingLayer,
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
            #[cfg(feature = "pacing")]
            pacing: RateLimitPacingLayer::new(),
            concurrency: ConcurrencyPerModelLayer::new(16),
        }
    }

    /// The rate-limit pacing layer (feature `pacing`).
    ///
    /// ```
    /// # use tower_overload::{pacing::{PacingLimits, RateLimitPacingLayer}, stack::OverloadStack};
    /// let tier_1 = PacingLimits {
    ///     requests_per_minute: Some(50),
    ///     input_tokens_per_minute: Some(30_000),
    ///     output_tokens_per_minute: Some(8_000),
    /// };
    /// let stack = OverloadStack::new()
    ///     .pacing(RateLimitPacingLayer::new().limits_for("claude-opus-4-6", tier_1));
    /// ```
    #[cfg(feature = "pacing")]
    #[cfg_attr(docsrs, doc(cfg(feature = "pacing")))]
    pub fn pacing(mut self, layer: RateLimitPacingLayer) -> Self {
        self.pacing = layer;
        self
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

    /// Switches [metrics](crate::metrics) on or off in every layer of the
    /// stack as set so far (on by default with the feature); a layer set
    /// afterwards keeps its own switch.
    ///
    /// ```
    /// # use tower_overload::stack::OverloadStack;
    /// let quiet = OverloadStack::new().metrics(false);
    /// ```
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn metrics(mut self, on: bool) -> Self {
        self.log = self.log.metrics(on);
        self.fallback = self.fallback.metrics(on);
        self.retry = self.retry.metrics(on);
        #[cfg(feature = "pacing")]
        {
            self.pacing = self.pacing.metrics(on);
        }
        self.concurrency = self.concurrency.metrics(on);
        self
    }

    /// Prices that turn token usage into the `tower_overload.cost` counter
    /// (see [`RetryPolicy::prices`]).
    ///
    /// ```
    /// use tower_overload::metrics::{PriceTable, Prices};
    /// use tower_overload::stack::OverloadStack;
    /// let stack = OverloadStack::new()
    ///     .prices(PriceTable::new().price("claude-sonnet-4-6", Prices::per_million(3.0, 15.0, 0.3, 3.75)));
    /// ```
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn prices(mut self, prices: crate::metrics::PriceTable) -> Self {
        self.retry = self.retry.prices(prices);
        self
    }
}

/// What the retry layer wraps: pacing over the concurrency cap with the
/// `pacing` feature, the cap alone without.
#[cfg(feature = "pacing")]
type Attempts<S> = RateLimitPacing<ConcurrencyPerModel<S>>;
#[cfg(not(feature = "pacing"))]
type Attempts<S> = ConcurrencyPerModel<S>;

/// The body around the client's body `B` below the retry layer.
#[cfg(feature = "pacing")]
type AttemptBody<B> = PacedBody<PermitBody<B>>;
#[cfg(not(feature = "pacing"))]
type AttemptBody<B> = PermitBody<B>;

/// The service [`OverloadStack`] makes.
pub type OverloadService<S> = RequestIdLog<ModelFallback<OverloadRetry<Attempts<S>>>>;

/// The body of the responses an [`OverloadService`] gives, around the
/// client's response body `B`: what the retry layer peeked, then the rest,
/// holding the call's concurrency permit until it ends (and, with the
/// `pacing` feature, settling its rate-limit reservations with the usage
/// it reports).
///
/// ```
/// use http_body_util::Full;
/// use bytes::Bytes;
/// use tower_overload::stack::OverloadBody;
/// fn read_later(_response: http::Response<OverloadBody<Full<Bytes>>>) {}
/// ```
pub type OverloadBody<B> = PeekedBody<AttemptBody<B>>;

impl<S> Layer<S> for OverloadStack {
    type Service = OverloadService<S>;

    fn layer(&self, client: S) -> Self::Service {
        let concurrent = self.concurrency.layer(client);
        #[cfg(feature = "pacing")]
        let concurrent = self.pacing.layer(concurrent);
        let retrying = OverloadRetryLayer::new(self.retry.clone()).layer(concurrent);
        let falling_back = self.fallback.layer(retrying);
        self.log.layer(falling_back)
    }
}
