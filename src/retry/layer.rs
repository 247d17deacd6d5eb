use std::sync::Arc;

use tower_layer::Layer;

use super::{OverloadRetry, RetryPolicy};

/// Wraps a service in [`OverloadRetry`]: the one retry loop a client of an
/// overloaded API needs.
///
/// Every service this layer makes shares the policy, and so its retry
/// budget and its seeded jitter.
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_overload::retry::{OverloadRetryLayer, RetryPolicy};
///
/// let layer = OverloadRetryLayer::new(RetryPolicy::foreground());
/// let _builder = ServiceBuilder::new().layer(layer);
/// ```
#[derive(Debug, Clone)]
pub struct OverloadRetryLayer {
    policy: Arc<RetryPolicy>,
}

impl OverloadRetryLayer {
    /// A layer retrying by `policy`.
    ///
    /// ```
    /// use tower_overload::retry::{OverloadRetryLayer, RetryPolicy};
    /// let layer = OverloadRetryLayer::new(RetryPolicy::background());
    /// ```
    pub fn new(policy: RetryPolicy) -> Self {
        Self {
            policy: Arc::new(policy),
        }
    }

    /// The policy.
    ///
    /// ```
    /// use tower_overload::retry::{OverloadRetryLayer, RetryPolicy};
    /// let layer = OverloadRetryLayer::new(RetryPolicy::foreground().max_attempts(2));
    /// assert_eq!(layer.policy().get_max_attempts(), 2);
    /// ```
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }
}

impl<S> Layer<S> for OverloadRetryLayer {
    type Service = OverloadRetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OverloadRetry::from_shared(inner, Arc::clone(&self.policy))
    }
}
