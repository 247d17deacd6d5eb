use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tower_layer::Layer;

use super::state::{Config, Pacer};
use super::{PacingLimits, PacingSnapshot, RateLimitPacing};
use crate::model::Model;

/// Builds [`RateLimitPacing`]: calls wait for rate-limit budget instead of
/// collecting 429s.
///
/// Every service this layer makes shares one set of buckets, so clones
/// (and services made for several clients) pace together. Settings are
/// fixed once the layer has made its first service; changing a setting
/// gives a layer with buckets of its own.
///
/// ```
/// use std::time::Duration;
/// use tower_overload::pacing::{PacingLimits, RateLimitPacingLayer};
///
/// let layer = RateLimitPacingLayer::new()
///     .limits_for("claude-sonnet-4-6", PacingLimits {
///         requests_per_minute: Some(50),
///         input_tokens_per_minute: Some(30_000),
///         output_tokens_per_minute: Some(8_000),
///     })
///     .max_queued(256)
///     .queue_timeout(Some(Duration::from_secs(30)));
/// ```
#[derive(Debug, Clone)]
pub struct RateLimitPacingLayer {
    config: Config,
    /// Created with the first service, then shared by all.
    pacer: Arc<OnceLock<Arc<Pacer>>>,
}

impl Default for RateLimitPacingLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimitPacingLayer {
    /// A layer that learns every model's limits from the
    /// `anthropic-ratelimit-*` headers of its responses; a model with no
    /// known limit is not paced (its calls go straight on). Defaults: 1024
    /// queued calls per key, a 60 s queue timeout, at most 64 learned keys.
    ///
    /// ```
    /// # use tower_overload::pacing::RateLimitPacingLayer;
    /// let layer = RateLimitPacingLayer::new();
    /// assert!(layer.snapshot().is_empty());
    /// ```
    pub fn new() -> Self {
        Self {
            config: Config {
                limits: HashMap::new(),
                shares: HashMap::new(),
                max_queued: 1024,
                queue_timeout: Some(Duration::from_secs(60)),
                count_tokens: None,
                max_keys: 64,
                #[cfg(feature = "redis")]
                fleet: None,
                #[cfg(feature = "metrics")]
                metrics: true,
            },
            pacer: Arc::new(OnceLock::new()),
        }
    }

    /// The limits of one model (or of a group named by [`share`](Self::share)),
    /// known up front (from your tier's table), so even the first calls are
    /// paced. The responses' headers still correct them.
    ///
    /// ```
    /// # use tower_overload::pacing::{PacingLimits, RateLimitPacingLayer};
    /// let layer = RateLimitPacingLayer::new().limits_for(
    ///     "claude-opus-4-6",
    ///     PacingLimits { requests_per_minute: Some(50), ..PacingLimits::default() },
    /// );
    /// ```
    pub fn limits_for(self, model: impl Into<Model>, limits: PacingLimits) -> Self {
        let model = model.into();
        self.configure(|config| {
            config.limits.insert(model, limits);
        })
    }

    /// One set of buckets, named `name`, for all of `models`: the API
    /// limits a model class, so models of one class spend from one budget.
    /// Give the group its limits with [`limits_for`](Self::limits_for)`(name, …)`.
    ///
    /// ```
    /// # use tower_overload::pacing::{PacingLimits, RateLimitPacingLayer};
    /// let layer = RateLimitPacingLayer::new()
    ///     .share("sonnet-4", ["claude-sonnet-4-5", "claude-sonnet-4-6"])
    ///     .limits_for("sonnet-4", PacingLimits { input_tokens_per_minute: Some(30_000), ..PacingLimits::default() });
    /// ```
    pub fn share<M: Into<Model>>(
        self,
        name: impl Into<Model>,
        models: impl IntoIterator<Item = M>,
    ) -> Self {
        let name = name.into();
        let models: Vec<Model> = models.into_iter().map(Into::into).collect();
        self.configure(|config| {
            for model in models {
                config.shares.insert(model, name.clone());
            }
        })
    }

    /// The most calls waiting per key; one more fails at once with
    /// [`PacingQueueFull`](crate::ErrorKind::PacingQueueFull). 0 means never
    /// wait: fail when the budget is short.
    ///
    /// ```
    /// # use tower_overload::pacing::RateLimitPacingLayer;
    /// let layer = RateLimitPacingLayer::new().max_queued(0);
    /// ```
    pub fn max_queued(self, max: usize) -> Self {
        self.configure(|config| config.max_queued = max)
    }

    /// How long a call may wait for budget before failing with
    /// [`PacingTimeout`](crate::ErrorKind::PacingTimeout) (`None`: as long
    /// as it takes).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::pacing::RateLimitPacingLayer;
    /// let layer = RateLimitPacingLayer::new().queue_timeout(Some(Duration::from_secs(5)));
    /// ```
    pub fn queue_timeout(self, timeout: Option<Duration>) -> Self {
        self.configure(|config| config.queue_timeout = timeout)
    }

    /// An exact input-token counter used instead of the estimate: the
    /// request body in, its input tokens out (`None`: fall back to the
    /// estimate). It runs before each call, on the caller's task, so it must
    /// be quick (a local tokenizer, a cache of the API's `count_tokens`).
    ///
    /// ```
    /// # use tower_overload::pacing::RateLimitPacingLayer;
    /// let layer = RateLimitPacingLayer::new().count_tokens(|body: &[u8]| Some(body.len() as u64 / 4));
    /// ```
    pub fn count_tokens<F>(self, count: F) -> Self
    where
        F: Fn(&[u8]) -> Option<u64> + Send + Sync + 'static,
    {
        let count = Arc::new(count);
        self.configure(|config| config.count_tokens = Some(count))
    }

    /// The most keys learned from responses besides the configured ones
    /// (default 64): the bound on memory that model names chosen by clients
    /// can use. Beyond it, and for requests with no model, calls share one
    /// `<other>` key.
    ///
    /// ```
    /// # use tower_overload::pacing::RateLimitPacingLayer;
    /// let layer = RateLimitPacingLayer::new().max_keys(8);
    /// ```
    pub fn max_keys(self, max: usize) -> Self {
        self.configure(|config| config.max_keys = max)
    }

    /// Whether the layer records [metrics](crate::metrics) (default on
    /// with the feature): the wait for budget, what is left of each bucket.
    ///
    /// ```
    /// # use tower_overload::pacing::RateLimitPacingLayer;
    /// let layer = RateLimitPacingLayer::new().metrics(false);
    /// ```
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn metrics(self, on: bool) -> Self {
        self.configure(|config| config.metrics = on)
    }

    /// Every key's buckets, queue and counters, across all services this
    /// layer made.
    ///
    /// ```
    /// # use tower_overload::pacing::RateLimitPacingLayer;
    /// assert!(RateLimitPacingLayer::new().snapshot().is_empty());
    /// ```
    pub fn snapshot(&self) -> Vec<PacingSnapshot> {
        self.pacer
            .get()
            .map(|pacer| pacer.snapshot())
            .unwrap_or_default()
    }

    /// Shares every key's buckets with the fleet: each worker's spending
    /// goes to the fleet's buckets every sync (100 ms by default), each
    /// worker refills at its share of the rate, the head of each worker's
    /// queue is served in the order it arrived across the fleet (what older
    /// heads need is kept for them), and a 429's pause reaches every worker
    /// at the next sync. While the store is down each worker paces alone at
    /// its share. See [`crate::fleet`].
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use tower_overload::fleet::{Fleet, FleetConfig, RedisStore};
    /// use tower_overload::pacing::{PacingLimits, RateLimitPacingLayer};
    /// let fleet = Fleet::new(RedisStore::open("redis://127.0.0.1/").unwrap(), FleetConfig::default().share(0.25));
    /// let tier_1 = PacingLimits { requests_per_minute: Some(50), input_tokens_per_minute: Some(30_000), output_tokens_per_minute: Some(8_000) };
    /// let layer = RateLimitPacingLayer::new().limits_for("claude-opus-4-6", tier_1).fleet(fleet);
    /// # }
    /// ```
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn fleet(self, fleet: crate::fleet::Fleet) -> Self {
        self.configure(|config| config.fleet = Some(fleet))
    }

    /// Changes a setting; the changed layer gets buckets of its own, so a
    /// clone configured differently never shares them with the original.
    fn configure(mut self, change: impl FnOnce(&mut Config)) -> Self {
        change(&mut self.config);
        self.pacer = Arc::new(OnceLock::new());
        self
    }

    fn shared(&self) -> Arc<Pacer> {
        Arc::clone(
            self.pacer
                .get_or_init(|| Arc::new(Pacer::new(self.config.clone()))),
        )
    }
}

impl<S> Layer<S> for RateLimitPacingLayer {
    type Service = RateLimitPacing<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitPacing::from_parts(inner, self.shared())
    }
}
