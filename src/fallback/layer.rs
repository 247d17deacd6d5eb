use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use http::HeaderName;
use tower_layer::Layer;

use super::cooldown::Breaker;
use super::{Cooldown, FallbackStep, ModelFallback, Shared};
use crate::classify::Class;

/// Builds [`ModelFallback`]: falls back along model chains when a model stays overloaded.
///
/// Every service the layer makes shares the chains' cooldowns. Settings
/// are fixed once the layer has made its first service; changing a setting
/// gives a layer with state of its own.
///
/// ```
/// use std::time::Duration;
/// use tower_overload::classify::Class;
/// use tower_overload::fallback::{Cooldown, ModelFallbackLayer};
///
/// let layer = ModelFallbackLayer::new(["claude-opus-4-6", "claude-sonnet-4-6", "claude-haiku-4-5"])
///     .chain(["claude-sonnet-4-5", "claude-haiku-4-5"])
///     .cooldown(Cooldown { cooldown: Duration::from_secs(60), ..Cooldown::default() })
///     .trigger_on([Class::Overloaded, Class::Timeout])
///     .served_by_header(http::HeaderName::from_static("x-served-by-model"));
/// ```
#[derive(Debug, Clone)]
pub struct ModelFallbackLayer {
    chains: Vec<Vec<FallbackStep>>,
    cooldown: Cooldown,
    triggers: Vec<Class>,
    served_by_header: Option<HeaderName>,
    fall_back_when_saturated: bool,
    #[cfg(feature = "redis")]
    fleet: Option<crate::fleet::Fleet>,
    #[cfg(feature = "metrics")]
    metrics: bool,
    shared: Arc<OnceLock<Arc<Shared>>>,
}

impl ModelFallbackLayer {
    /// A layer with one chain, tried in order. Defaults: fall back on
    /// [`Class::Overloaded`] and on a saturated per-model queue,
    /// [`Cooldown::default`], no response header.
    ///
    /// ```
    /// # use tower_overload::fallback::{FallbackStep, ModelFallbackLayer};
    /// let layer = ModelFallbackLayer::new([FallbackStep::new("claude-opus-4-6"), FallbackStep::new("claude-sonnet-4-6")]);
    /// ```
    pub fn new<I>(chain: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<FallbackStep>,
    {
        Self {
            chains: vec![chain.into_iter().map(Into::into).collect()],
            cooldown: Cooldown::default(),
            triggers: vec![Class::Overloaded],
            served_by_header: None,
            fall_back_when_saturated: true,
            #[cfg(feature = "redis")]
            fleet: None,
            #[cfg(feature = "metrics")]
            metrics: true,
            shared: Arc::new(OnceLock::new()),
        }
    }

    /// Adds another chain. A model named by several chains follows the first.
    ///
    /// ```
    /// # use tower_overload::fallback::ModelFallbackLayer;
    /// let layer = ModelFallbackLayer::new(["a", "b"]).chain(["c", "d"]);
    /// ```
    pub fn chain<I>(mut self, chain: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<FallbackStep>,
    {
        self.chains
            .push(chain.into_iter().map(Into::into).collect());
        self.reset()
    }

    /// When a model is skipped, and for how long.
    ///
    /// ```
    /// # use tower_overload::fallback::{Cooldown, ModelFallbackLayer};
    /// let layer = ModelFallbackLayer::new(["a", "b"]).cooldown(Cooldown { overloads: 1, ..Cooldown::default() });
    /// ```
    pub fn cooldown(mut self, cooldown: Cooldown) -> Self {
        self.cooldown = cooldown;
        self.reset()
    }

    /// The classes that make a call fall back (default: `Overloaded` only).
    ///
    /// ```
    /// # use tower_overload::{classify::Class, fallback::ModelFallbackLayer};
    /// let layer = ModelFallbackLayer::new(["a", "b"]).trigger_on([Class::Overloaded, Class::ServerError]);
    /// ```
    pub fn trigger_on(mut self, classes: impl IntoIterator<Item = Class>) -> Self {
        self.triggers = classes.into_iter().collect();
        self.reset()
    }

    /// Also names the answering model in this response header.
    ///
    /// ```
    /// # use tower_overload::fallback::ModelFallbackLayer;
    /// let layer = ModelFallbackLayer::new(["a", "b"]).served_by_header(http::HeaderName::from_static("x-served-by-model"));
    /// ```
    pub fn served_by_header(mut self, name: HeaderName) -> Self {
        self.served_by_header = Some(name);
        self.reset()
    }

    /// Whether a call refused by a per-model queue inside (full, or timed
    /// out) moves on to the next model (default `true`).
    ///
    /// ```
    /// # use tower_overload::fallback::ModelFallbackLayer;
    /// let layer = ModelFallbackLayer::new(["a", "b"]).fall_back_when_saturated(false);
    /// ```
    pub fn fall_back_when_saturated(mut self, enabled: bool) -> Self {
        self.fall_back_when_saturated = enabled;
        self.reset()
    }

    /// Whether the layer records [metrics](crate::metrics) (default on
    /// with the feature): fallbacks from and to, models skipped, breaker
    /// state per model.
    ///
    /// ```
    /// # use tower_overload::fallback::ModelFallbackLayer;
    /// let layer = ModelFallbackLayer::new(["claude-opus-4-6", "claude-sonnet-4-6"]).metrics(false);
    /// ```
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn metrics(mut self, on: bool) -> Self {
        self.metrics = on;
        self.reset()
    }

    fn reset(mut self) -> Self {
        self.shared = Arc::new(OnceLock::new());
        self
    }

    /// A model's breaker: shared with the fleet when there is one.
    fn breaker(&self, model: &crate::Model) -> Arc<Breaker> {
        #[cfg(feature = "redis")]
        if let Some(fleet) = &self.fleet {
            let breaker = Arc::new(Breaker::shared_with(self.cooldown, fleet.clone()));
            let synced: Arc<dyn crate::fleet::SyncedBreaker> = breaker.clone();
            fleet.register_breaker(model.as_str(), Arc::downgrade(&synced));
            return breaker;
        }
        let _ = model;
        Arc::new(Breaker::new(self.cooldown))
    }

    /// Shares the cooldowns with the fleet: when one worker's breaker opens
    /// for a model, every worker skips it for the rest; when the rest is
    /// over, one worker of the fleet probes it, and its success closes the
    /// breaker everywhere (its failure doubles the rest everywhere). Synced
    /// in the background (every 100 ms by default); while the store is
    /// down each worker's breakers work alone. See [`crate::fleet`].
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use tower_overload::fallback::ModelFallbackLayer;
    /// use tower_overload::fleet::{Fleet, FleetConfig, RedisStore};
    /// let fleet = Fleet::new(RedisStore::open("redis://127.0.0.1/").unwrap(), FleetConfig::default());
    /// let layer = ModelFallbackLayer::new(["claude-opus-4-6", "claude-sonnet-4-6"]).fleet(fleet);
    /// # }
    /// ```
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn fleet(mut self, fleet: crate::fleet::Fleet) -> Self {
        self.fleet = Some(fleet);
        self.reset()
    }

    fn shared(&self) -> Arc<Shared> {
        let shared = self.shared.get_or_init(|| {
            let mut positions = HashMap::new();
            let mut breakers = HashMap::new();
            for (chain, steps) in self.chains.iter().enumerate() {
                for (position, step) in steps.iter().enumerate() {
                    positions
                        .entry(step.model.clone())
                        .or_insert((chain, position));
                    breakers
                        .entry(step.model.clone())
                        .or_insert_with(|| self.breaker(&step.model));
                }
            }
            Arc::new(Shared {
                chains: self.chains.clone(),
                positions,
                breakers,
                triggers: self.triggers.clone(),
                served_by_header: self.served_by_header.clone(),
                fall_back_when_saturated: self.fall_back_when_saturated,
                #[cfg(feature = "metrics")]
                metrics: self.metrics.then(|| super::Meters {
                    fallbacks: crate::metrics::FallbackTable::new(),
                    models: crate::metrics::ModelTable::new(crate::metrics::ModelStateMeters::new),
                }),
            })
        });
        Arc::clone(shared)
    }
}

impl<S> Layer<S> for ModelFallbackLayer {
    type Service = ModelFallback<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ModelFallback {
            inner,
            shared: self.shared(),
        }
    }
}
