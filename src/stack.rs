//! The four layers in the recommended order, in one call.
//!
//! ```text
//! RequestIdLogLayer           the logical call's span and final outcome; every
//!                             attempt's request id, from the reports inside
//!  ModelFallbackLayer         gives up on a model only after its retries are
//!                             spent, or while it is cooling down
//!   OverloadRetryLayer        the one retry loop in the stack; sleeping between
//!                             attempts holds no concurrency permit
//!    ConcurrencyPerModelLayer a permit per attempt, held until the response body ends
//!     the HTTP client
//! ```
//!
//! Why this order: logging outermost sees the call as the caller does (one
//! span, one final verdict) and still records every attempt from the
//! [`RetryReport`](crate::retry::RetryReport) and
//! [`ServedBy`](crate::fallback::ServedBy) the inner layers leave. Fallback
//! outside retry switches models only when retrying the same model has
//! failed; inside, it would switch on the first 529. Retry outside the
//! concurrency cap means a call waiting out its backoff does not occupy a
//! slot that another call could use; inside, a storm would fill every slot
//! with sleepers. The cap innermost counts exactly what the upstream sees.
//!
//! ```
//! # #[cfg(all(feature = "retry", feature = "concurrency", feature = "fallback", feature = "request-id"))]
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use tower::Layer;
//! use tower_overload::concurrency::{Aimd, ConcurrencyPerModelLayer};
//! use tower_overload::fallback::ModelFallbackLayer;
//! use tower_overload::retry::RetryPolicy;
//! use tower_overload::stack::OverloadStack;
//!
//! let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//! let stack = OverloadStack::new()
//!     .retry(RetryPolicy::foreground())
//!     .concurrency(ConcurrencyPerModelLayer::new(16).limit_for("claude-opus-4-6", 4).adaptive(Aimd::default()))
//!     .fallback(ModelFallbackLayer::new(["claude-opus-4-6", "claude-sonnet-4-6", "claude-haiku-4-5"]));
//! let service = stack.layer(client);
//! # let _ = service;
//! # }
//! # #[cfg(not(all(feature = "retry", feature = "concurrency", feature = "fallback", feature = "request-id")))]
//! # fn main() {}
//! ```

use tower::ServiceBuilder;
#[cfg(all(
    feature = "retry",
    feature = "concurrency",
    feature = "fallback",
    feature = "request-id"
))]
use tower_layer::Layer;
use tower_layer::Stack;

#[cfg(all(
    feature = "retry",
    feature = "concurrency",
    feature = "fallback",
    feature = "request-id"
))]
use crate::concurrency::ConcurrencyPerModel;
#[cfg(feature = "concurrency")]
use crate::concurrency::ConcurrencyPerModelLayer;
#[cfg(all(
    feature = "retry",
    feature = "concurrency",
    feature = "fallback",
    feature = "request-id"
))]
use crate::fallback::ModelFallback;
#[cfg(feature = "fallback")]
use crate::fallback::{FallbackStep, ModelFallbackLayer};
#[cfg(feature = "request-id")]
use crate::request_id::RequestIdLogLayer;
#[cfg(all(
    feature = "retry",
    feature = "concurrency",
    feature = "fallback",
    feature = "request-id"
))]
use crate::request_id::{OverloadStats, RequestIdLog};
#[cfg(all(
    feature = "retry",
    feature = "concurrency",
    feature = "fallback",
    feature = "request-id"
))]
use crate::retry::OverloadRetry;
#[cfg(feature = "retry")]
use crate::retry::{OverloadRetryLayer, RetryPolicy};

#[cfg(all(
    feature = "retry",
    feature = "concurrency",
    feature = "fallback",
    feature = "request-id"
))]
/// The recommended stack: log, fallback, retry, per-model concurrency.
///
/// Defaults: logging on, no fallback chain (fallback is opt-in: switching
/// models changes answers), [`RetryPolicy::foreground`], 16 calls in flight
/// per model.
#[derive(Debug, Clone)]
pub struct OverloadStack {
    log: RequestIdLogLayer,
    fallback: ModelFallbackLayer,
    retry: RetryPolicy,
    concurrency: ConcurrencyPerModelLayer,
}

#[cfg(all(
    feature = "retry",
    feature = "concurrency",
    feature = "fallback",
    feature = "request-id"
))]
impl Default for OverloadStack {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(all(
    feature = "retry",
    feature = "concurrency",
    feature = "fallback",
    feature = "request-id"
))]
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

#[cfg(all(
    feature = "retry",
    feature = "concurrency",
    feature = "fallback",
    feature = "request-id"
))]
/// The service [`OverloadStack`] makes.
pub type OverloadService<S> = RequestIdLog<ModelFallback<OverloadRetry<ConcurrencyPerModel<S>>>>;

#[cfg(all(
    feature = "retry",
    feature = "concurrency",
    feature = "fallback",
    feature = "request-id"
))]
impl<S> Layer<S> for OverloadStack {
    type Service = OverloadService<S>;

    fn layer(&self, client: S) -> Self::Service {
        let concurrent = self.concurrency.layer(client);
        let retrying = OverloadRetryLayer::new(self.retry.clone()).layer(concurrent);
        let falling_back = self.fallback.layer(retrying);
        self.log.layer(falling_back)
    }
}

/// One method per layer on [`ServiceBuilder`], in tower-http's style; each
/// method is there when its layer's feature is on.
///
/// ```
/// # #[cfg(all(feature = "retry", feature = "concurrency", feature = "fallback", feature = "request-id"))]
/// # fn main() {
/// use tower::ServiceBuilder;
/// use tower_overload::concurrency::ConcurrencyPerModelLayer;
/// use tower_overload::retry::RetryPolicy;
/// use tower_overload::stack::ServiceBuilderExt;
///
/// let builder = ServiceBuilder::new()
///     .request_id_log()
///     .model_fallback(["claude-opus-4-6", "claude-sonnet-4-6"])
///     .overload_retry(RetryPolicy::foreground())
///     .concurrency_per_model(ConcurrencyPerModelLayer::new(8));
/// # }
/// # #[cfg(not(all(feature = "retry", feature = "concurrency", feature = "fallback", feature = "request-id")))]
/// # fn main() {}
/// ```
pub trait ServiceBuilderExt<L>: sealed::Sealed {
    /// Adds [`RequestIdLogLayer::new`].
    ///
    /// ```
    /// use tower::ServiceBuilder;
    /// use tower_overload::stack::ServiceBuilderExt;
    /// let builder = ServiceBuilder::new().request_id_log();
    /// ```
    #[cfg(feature = "request-id")]
    #[cfg_attr(docsrs, doc(cfg(feature = "request-id")))]
    fn request_id_log(self) -> ServiceBuilder<Stack<RequestIdLogLayer, L>>;
    /// Adds a [`ModelFallbackLayer`] with one chain.
    ///
    /// ```
    /// use tower::ServiceBuilder;
    /// use tower_overload::stack::ServiceBuilderExt;
    /// let builder = ServiceBuilder::new().model_fallback(["claude-opus-4-6", "claude-sonnet-4-6"]);
    /// ```
    #[cfg(feature = "fallback")]
    #[cfg_attr(docsrs, doc(cfg(feature = "fallback")))]
    fn model_fallback<I>(self, chain: I) -> ServiceBuilder<Stack<ModelFallbackLayer, L>>
    where
        I: IntoIterator,
        I::Item: Into<FallbackStep>;
    /// Adds an [`OverloadRetryLayer`].
    ///
    /// ```
    /// use tower::ServiceBuilder;
    /// use tower_overload::stack::ServiceBuilderExt;
    /// # use tower_overload::retry::RetryPolicy;
    /// let builder = ServiceBuilder::new().overload_retry(RetryPolicy::foreground());
    /// ```
    #[cfg(feature = "retry")]
    #[cfg_attr(docsrs, doc(cfg(feature = "retry")))]
    fn overload_retry(self, policy: RetryPolicy) -> ServiceBuilder<Stack<OverloadRetryLayer, L>>;
    /// Adds a [`ConcurrencyPerModelLayer`].
    ///
    /// ```
    /// use tower::ServiceBuilder;
    /// use tower_overload::stack::ServiceBuilderExt;
    /// # use tower_overload::concurrency::ConcurrencyPerModelLayer;
    /// let builder = ServiceBuilder::new().concurrency_per_model(ConcurrencyPerModelLayer::new(8));
    /// ```
    #[cfg(feature = "concurrency")]
    #[cfg_attr(docsrs, doc(cfg(feature = "concurrency")))]
    fn concurrency_per_model(
        self,
        layer: ConcurrencyPerModelLayer,
    ) -> ServiceBuilder<Stack<ConcurrencyPerModelLayer, L>>;
    /// Adds the whole [`OverloadStack`].
    ///
    /// ```
    /// use tower::ServiceBuilder;
    /// use tower_overload::stack::ServiceBuilderExt;
    /// # use tower_overload::stack::OverloadStack;
    /// let builder = ServiceBuilder::new().overload_stack(OverloadStack::new());
    /// ```
    #[cfg(all(
        feature = "retry",
        feature = "concurrency",
        feature = "fallback",
        feature = "request-id"
    ))]
    #[cfg_attr(
        docsrs,
        doc(cfg(all(
            feature = "retry",
            feature = "concurrency",
            feature = "fallback",
            feature = "request-id"
        )))
    )]
    fn overload_stack(self, stack: OverloadStack) -> ServiceBuilder<Stack<OverloadStack, L>>;
}

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    #[cfg(feature = "request-id")]
    fn request_id_log(self) -> ServiceBuilder<Stack<RequestIdLogLayer, L>> {
        self.layer(RequestIdLogLayer::new())
    }

    #[cfg(feature = "fallback")]
    fn model_fallback<I>(self, chain: I) -> ServiceBuilder<Stack<ModelFallbackLayer, L>>
    where
        I: IntoIterator,
        I::Item: Into<FallbackStep>,
    {
        self.layer(ModelFallbackLayer::new(chain))
    }

    #[cfg(feature = "retry")]
    fn overload_retry(self, policy: RetryPolicy) -> ServiceBuilder<Stack<OverloadRetryLayer, L>> {
        self.layer(OverloadRetryLayer::new(policy))
    }

    #[cfg(feature = "concurrency")]
    fn concurrency_per_model(
        self,
        layer: ConcurrencyPerModelLayer,
    ) -> ServiceBuilder<Stack<ConcurrencyPerModelLayer, L>> {
        self.layer(layer)
    }

    #[cfg(all(
        feature = "retry",
        feature = "concurrency",
        feature = "fallback",
        feature = "request-id"
    ))]
    fn overload_stack(self, stack: OverloadStack) -> ServiceBuilder<Stack<OverloadStack, L>> {
        self.layer(stack)
    }
}
