//! The four layers in the recommended order, in one call.
//!
//! ```text
//! RequestIdLogLayer           the logical call's span and final outcome; every
//!                             attempt's request id, from the reports inside
//!  ModelFallbackLayer         gives up on a model only after its retries are
//!                             spent, or while it is cooling down
//!   OverloadRetryLayer        the one retry loop in the stack; sleeping between
//!                             attempts holds no concurrency permit
//!    RateLimitPacingLayer     (feature `pacing`) every attempt waits here for
//!                             rate-limit budget, holding no permit
//!     ConcurrencyPerModelLayer a permit per attempt, held until the response body ends
//!      the HTTP client
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
//! Pacing sits between the two. Inside the retry layer, every attempt is
//! paced (a retry spends rate-limit budget as the first attempt does) and
//! every attempt's response reaches the pacer, so a 429 that the retry
//! layer absorbs still pauses the model for every other call. Outside the
//! cap, a call waiting for budget holds no concurrency slot; and since the
//! wait happens before anything is sent, it spends no retry: a call that
//! waits too long fails with [`PacingTimeout`](crate::ErrorKind::PacingTimeout),
//! which the retry layer passes on instead of retrying (the wait already
//! was the backoff), and the wait counts against the call's deadline.
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
use tower_layer::Stack;

#[cfg(feature = "concurrency")]
use crate::concurrency::ConcurrencyPerModelLayer;
#[cfg(feature = "fallback")]
use crate::fallback::{FallbackStep, ModelFallbackLayer};
#[cfg(feature = "pacing")]
use crate::pacing::RateLimitPacingLayer;
#[cfg(feature = "request-id")]
use crate::request_id::RequestIdLogLayer;
#[cfg(feature = "retry")]
use crate::retry::{OverloadRetryLayer, RetryPolicy};

#[cfg(all(
    feature = "retry",
    feature = "concurrency",
    feature = "fallback",
    feature = "request-id"
))]
mod overload;
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
pub use self::overload::{OverloadBody, OverloadService, OverloadStack};

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
    /// Adds a [`RateLimitPacingLayer`].
    ///
    /// ```
    /// use tower::ServiceBuilder;
    /// use tower_overload::stack::ServiceBuilderExt;
    /// # use tower_overload::pacing::RateLimitPacingLayer;
    /// let builder = ServiceBuilder::new().rate_limit_pacing(RateLimitPacingLayer::new());
    /// ```
    #[cfg(feature = "pacing")]
    #[cfg_attr(docsrs, doc(cfg(feature = "pacing")))]
    fn rate_limit_pacing(
        self,
        layer: RateLimitPacingLayer,
    ) -> ServiceBuilder<Stack<RateLimitPacingLayer, L>>;
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

    #[cfg(feature = "pacing")]
    fn rate_limit_pacing(
        self,
        layer: RateLimitPacingLayer,
    ) -> ServiceBuilder<Stack<RateLimitPacingLayer, L>> {
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
