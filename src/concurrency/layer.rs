use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tower_layer::Layer;

use super::limits::{Config, Limits};
use super::{Aimd, ConcurrencyPerModel, KeySnapshot, ModelKey};
use crate::model::Model;

/// Builds [`ConcurrencyPerModel`]: per-model caps on calls in flight.
///
/// Every service this layer makes shares one table of limits, so clones
/// (and services made for several clients) count together. Settings are
/// fixed once the layer has made its first service; changing a setting
/// gives a layer with a table of its own.
///
/// ```
/// use std::time::Duration;
/// use tower_overload::concurrency::{Aimd, ConcurrencyPerModelLayer};
///
/// let layer = ConcurrencyPerModelLayer::new(16)
///     .limit_for("claude-opus-4-6", 4)
///     .limit_for("claude-haiku-4-5", 32)
///     .global_limit(Some(48))
///     .max_queued(256)
///     .queue_timeout(Some(Duration::from_secs(60)))
///     .adaptive(Aimd::default());
/// ```
#[derive(Debug, Clone)]
pub struct ConcurrencyPerModelLayer<K = ModelKey> {
    config: Config,
    key_fn: K,
    /// Created with the first service, then shared by all.
    limits: Arc<OnceLock<Arc<Limits>>>,
}

impl ConcurrencyPerModelLayer {
    /// At most `max_per_model` calls in flight per model (at least 1). Other
    /// defaults: no global cap, 1024 queued per key, a 60 s queue timeout,
    /// fixed limits, default key `<default>`, at most 64 keys.
    ///
    /// ```
    /// # use tower_overload::concurrency::ConcurrencyPerModelLayer;
    /// let layer = ConcurrencyPerModelLayer::new(8);
    /// ```
    pub fn new(max_per_model: usize) -> Self {
        Self {
            config: Config {
                default_limit: max_per_model.max(1),
                overrides: HashMap::new(),
                global_limit: None,
                max_queued: 1024,
                queue_timeout: Some(Duration::from_secs(60)),
                adaptive: None,
                default_key: Model::new("<default>"),
                max_keys: 64,
                #[cfg(feature = "redis")]
                fleet: None,
                #[cfg(feature = "health")]
                health: None,
                #[cfg(feature = "metrics")]
                metrics: true,
            },
            key_fn: ModelKey,
            limits: Arc::new(OnceLock::new()),
        }
    }
}

impl<K> ConcurrencyPerModelLayer<K> {
    /// The limit for one model (or key), instead of the default.
    ///
    /// ```
    /// # use tower_overload::concurrency::ConcurrencyPerModelLayer;
    /// let layer = ConcurrencyPerModelLayer::new(16).limit_for("claude-opus-4-6", 4);
    /// ```
    pub fn limit_for(self, model: impl Into<Model>, limit: usize) -> Self {
        let model = model.into();
        self.configure(|config| {
            config.overrides.insert(model, limit.max(1));
        })
    }

    /// A cap on calls in flight across all keys (`None`: no cap). A call
    /// takes its key's permit first, then the global one.
    ///
    /// ```
    /// # use tower_overload::concurrency::ConcurrencyPerModelLayer;
    /// let layer = ConcurrencyPerModelLayer::new(16).global_limit(Some(40));
    /// ```
    pub fn global_limit(self, limit: Option<usize>) -> Self {
        self.configure(|config| config.global_limit = limit)
    }

    /// The most calls waiting per key; one more fails at once with `QueueFull`.
    /// 0 means never wait: fail when the key is at its limit.
    ///
    /// ```
    /// # use tower_overload::concurrency::ConcurrencyPerModelLayer;
    /// let layer = ConcurrencyPerModelLayer::new(16).max_queued(0);
    /// ```
    pub fn max_queued(self, max: usize) -> Self {
        self.configure(|config| config.max_queued = max)
    }

    /// How long a call may wait for a permit before failing with
    /// `QueueTimeout` (`None`: as long as it takes).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::concurrency::ConcurrencyPerModelLayer;
    /// let layer = ConcurrencyPerModelLayer::new(16).queue_timeout(Some(Duration::from_secs(5)));
    /// ```
    pub fn queue_timeout(self, timeout: Option<Duration>) -> Self {
        self.configure(|config| config.queue_timeout = timeout)
    }

    /// Adapts each key's limit to overload signals (see [`Aimd`]).
    ///
    /// ```
    /// # use tower_overload::concurrency::{Aimd, ConcurrencyPerModelLayer};
    /// let layer = ConcurrencyPerModelLayer::new(16).adaptive(Aimd { decrease_ratio: 0.75, ..Aimd::default() });
    /// ```
    pub fn adaptive(self, aimd: Aimd) -> Self {
        self.configure(|config| config.adaptive = Some(aimd))
    }

    /// Lets the adaptive limit ([`adaptive`](Self::adaptive)) act on the
    /// health verdict of the key's model: when a probe found the overload to
    /// be local pressure (the same model answers a minimal request), a 529
    /// shrinks the limit twice as hard, since lowering concurrency is the
    /// fix; while the status page declares an incident for the model,
    /// successes do not grow the limit back (more calls would only probe a
    /// platform known to be short).
    ///
    /// ```
    /// # use tower_overload::concurrency::{Aimd, ConcurrencyPerModelLayer};
    /// # use tower_overload::health::{HealthConfig, HealthMonitor};
    /// # let client = tower::service_fn(|_r: http::Request<http_body_util::Full<bytes::Bytes>>| async {
    /// #     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::new())))
    /// # });
    /// let monitor = HealthMonitor::new(client, HealthConfig::default());
    /// let layer = ConcurrencyPerModelLayer::new(16).adaptive(Aimd::default()).health(monitor);
    /// ```
    #[cfg(feature = "health")]
    #[cfg_attr(docsrs, doc(cfg(feature = "health")))]
    pub fn health(self, monitor: crate::health::HealthMonitor) -> Self {
        self.configure(|config| config.health = Some(monitor))
    }

    /// Makes each key's limit hold for the whole fleet: a call also takes a
    /// lease on one of the key's slots in the fleet's store before it is
    /// sent, held until its response body ends (see [`crate::fleet`] for
    /// leases, fairness and what happens when the store is down). A call
    /// waiting for a fleet slot counts against the queue timeout.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use tower_overload::concurrency::ConcurrencyPerModelLayer;
    /// use tower_overload::fleet::{Fleet, FleetConfig, RedisStore};
    /// let fleet = Fleet::new(RedisStore::open("redis://127.0.0.1/").unwrap(), FleetConfig::default().share(0.25));
    /// // At most 8 opus calls in flight across every worker.
    /// let layer = ConcurrencyPerModelLayer::new(16).limit_for("claude-opus-4-6", 8).fleet(fleet);
    /// # }
    /// ```
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn fleet(self, fleet: crate::fleet::Fleet) -> Self {
        self.configure(|config| config.fleet = Some(fleet))
    }

    /// The key of requests whose key function found none (default `<default>`).
    ///
    /// ```
    /// # use tower_overload::concurrency::ConcurrencyPerModelLayer;
    /// let layer = ConcurrencyPerModelLayer::new(16).default_key("unknown-model");
    /// ```
    pub fn default_key(self, key: impl Into<Model>) -> Self {
        let key = key.into();
        self.configure(|config| config.default_key = key)
    }

    /// The most keys tracked at once besides the configured ones (default
    /// 64): the bound on memory that model names chosen by clients can use.
    ///
    /// Models given a [`limit_for`](Self::limit_for), and the default key,
    /// always keep a key of their own and do not count. Other keys take one
    /// of `max_keys` slots; when all are taken, a new key replaces the least
    /// recently used one that has nothing in flight or queued (its counters
    /// and adaptive limit start again from the default). Only while every
    /// slot is busy, and for keys longer than 256 bytes, do calls share one
    /// `<overflow>` bucket with the default limit. So the table holds at most
    /// `max_keys` + the configured keys + 1 default key + `<overflow>`.
    ///
    /// ```
    /// # use tower_overload::concurrency::ConcurrencyPerModelLayer;
    /// let layer = ConcurrencyPerModelLayer::new(16)
    ///     .limit_for("claude-opus-4-6", 4)
    ///     .max_keys(16);
    /// ```
    pub fn max_keys(self, max: usize) -> Self {
        self.configure(|config| config.max_keys = max)
    }

    /// Whether the layer records [metrics](crate::metrics) (default on
    /// with the feature): in flight, limit and queued per key, queue wait.
    ///
    /// ```
    /// # use tower_overload::concurrency::ConcurrencyPerModelLayer;
    /// let layer = ConcurrencyPerModelLayer::new(16).metrics(false);
    /// ```
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn metrics(self, on: bool) -> Self {
        self.configure(|config| config.metrics = on)
    }

    /// Keys requests with `key_fn` instead of [`ModelKey`].
    ///
    /// ```
    /// # use tower_overload::{Model, concurrency::ConcurrencyPerModelLayer};
    /// let layer = ConcurrencyPerModelLayer::new(16)
    ///     .key_fn(|request: &http::Request<String>| Some(Model::new(request.uri().path())));
    /// ```
    pub fn key_fn<F>(self, key_fn: F) -> ConcurrencyPerModelLayer<F> {
        ConcurrencyPerModelLayer {
            config: self.config,
            key_fn,
            limits: Arc::new(OnceLock::new()),
        }
    }

    /// Every key's state, across all services this layer made.
    ///
    /// ```
    /// # use tower_overload::concurrency::ConcurrencyPerModelLayer;
    /// assert!(ConcurrencyPerModelLayer::new(4).snapshot().is_empty());
    /// ```
    pub fn snapshot(&self) -> Vec<KeySnapshot> {
        self.limits
            .get()
            .map(|limits| limits.snapshot())
            .unwrap_or_default()
    }

    /// Changes a setting; the changed layer gets a table of its own, so a
    /// clone configured differently never shares limits with the original.
    fn configure(mut self, change: impl FnOnce(&mut Config)) -> Self {
        change(&mut self.config);
        self.limits = Arc::new(OnceLock::new());
        self
    }

    fn shared(&self) -> Arc<Limits> {
        Arc::clone(
            self.limits
                .get_or_init(|| Arc::new(Limits::new(self.config.clone()))),
        )
    }
}

impl<S, K: Clone> Layer<S> for ConcurrencyPerModelLayer<K> {
    type Service = ConcurrencyPerModel<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        ConcurrencyPerModel::from_parts(inner, self.key_fn.clone(), self.shared())
    }
}
