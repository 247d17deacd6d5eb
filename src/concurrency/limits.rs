//! The per-key limits shared by every clone of the service.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::aimd::{AdaptiveLimit, Aimd};
use crate::model::Model;

/// Settings fixed when the layer is built.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) default_limit: usize,
    pub(crate) overrides: HashMap<Model, usize>,
    pub(crate) global_limit: Option<usize>,
    pub(crate) max_queued: usize,
    pub(crate) queue_timeout: Option<Duration>,
    pub(crate) adaptive: Option<Aimd>,
    pub(crate) default_key: Model,
    pub(crate) max_keys: usize,
}

/// Name of the bucket that keys past `max_keys` share.
pub(crate) const OVERFLOW_KEY: &str = "<overflow>";

/// Every key's state, created lazily and bounded in number.
#[derive(Debug)]
pub(crate) struct Limits {
    pub(crate) config: Config,
    keys: RwLock<HashMap<Model, Arc<KeyState>>>,
    overflow: Arc<KeyState>,
    pub(crate) global: Option<Arc<Semaphore>>,
}

impl Limits {
    pub(crate) fn new(config: Config) -> Self {
        let overflow = Arc::new(KeyState::new(
            Model::new(OVERFLOW_KEY),
            config.default_limit,
            config.adaptive.as_ref(),
        ));
        let global = config
            .global_limit
            .map(|n| Arc::new(Semaphore::new(n.max(1))));
        Self {
            config,
            keys: RwLock::new(HashMap::new()),
            overflow,
            global,
        }
    }

    /// The state of `key`, created on first use; past `max_keys` distinct
    /// keys, new ones share the overflow bucket, so a hostile or buggy model
    /// string cannot grow the table without bound.
    pub(crate) fn key(&self, key: Option<Model>) -> Arc<KeyState> {
        let key = key.unwrap_or_else(|| self.config.default_key.clone());
        if let Some(state) = read(&self.keys).get(&key) {
            return Arc::clone(state);
        }
        let mut keys = write(&self.keys);
        if let Some(state) = keys.get(&key) {
            return Arc::clone(state);
        }
        if keys.len() >= self.config.max_keys {
            return Arc::clone(&self.overflow);
        }
        let limit = self
            .config
            .overrides
            .get(&key)
            .copied()
            .unwrap_or(self.config.default_limit);
        let state = Arc::new(KeyState::new(
            key.clone(),
            limit,
            self.config.adaptive.as_ref(),
        ));
        keys.insert(key, Arc::clone(&state));
        state
    }

    pub(crate) fn snapshot(&self) -> Vec<KeySnapshot> {
        let keys = read(&self.keys);
        let mut snapshot: Vec<KeySnapshot> = keys.values().map(|k| k.snapshot()).collect();
        let overflow = self.overflow.snapshot();
        if overflow.in_flight + overflow.queued > 0 || overflow.rejected + overflow.timed_out > 0 {
            snapshot.push(overflow);
        }
        snapshot.sort_by(|a, b| a.key.cmp(&b.key));
        snapshot
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // No code panics while holding these locks; a poisoned lock still holds valid state.
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One key's permits, counters and (optionally) adaptive limit.
#[derive(Debug)]
pub(crate) struct KeyState {
    pub(crate) key: Model,
    pub(crate) semaphore: Arc<Semaphore>,
    limit: Mutex<LimitState>,
    in_flight: AtomicUsize,
    pub(crate) queued: AtomicUsize,
    pub(crate) rejected: AtomicU64,
    pub(crate) timed_out: AtomicU64,
}

#[derive(Debug)]
struct LimitState {
    current: usize,
    /// Permits in use that must be forgotten, not returned, when released:
    /// how a limit shrinks below what is already in flight.
    debt: usize,
    adaptive: Option<AdaptiveLimit>,
}

impl KeyState {
    fn new(key: Model, limit: usize, adaptive: Option<&Aimd>) -> Self {
        let limit = limit.max(1);
        Self {
            key,
            semaphore: Arc::new(Semaphore::new(limit)),
            limit: Mutex::new(LimitState {
                current: limit,
                debt: 0,
                adaptive: adaptive.map(|aimd| AdaptiveLimit::new(limit, aimd)),
            }),
            in_flight: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            rejected: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
        }
    }

    /// Counts a call in flight from here until the permit is dropped.
    pub(crate) fn permit(
        self: &Arc<Self>,
        key: OwnedSemaphorePermit,
        global: Option<OwnedSemaphorePermit>,
    ) -> Permit {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Permit {
            state: Arc::clone(self),
            key: Some(key),
            _global: global,
        }
    }

    /// A response said the platform or the quota is overloaded.
    pub(crate) fn on_overload(&self) {
        let mut limit = lock(&self.limit);
        let Some(adaptive) = limit.adaptive.as_mut() else {
            return;
        };
        let target = adaptive.on_overload();
        if target < limit.current {
            let shrink = limit.current - target;
            limit.current = target;
            let forgotten = self.semaphore.forget_permits(shrink);
            limit.debt += shrink - forgotten;
        }
    }

    /// A response succeeded.
    pub(crate) fn on_success(&self) {
        let mut limit = lock(&self.limit);
        let in_flight = self.in_flight.load(Ordering::Relaxed);
        let Some(adaptive) = limit.adaptive.as_mut() else {
            return;
        };
        let target = adaptive.on_success(in_flight);
        if target > limit.current {
            let grow = target - limit.current;
            limit.current = target;
            let repaid = grow.min(limit.debt);
            limit.debt -= repaid;
            self.semaphore.add_permits(grow - repaid);
        }
    }

    fn release(&self, permit: OwnedSemaphorePermit) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let mut limit = lock(&self.limit);
        if limit.debt > 0 {
            limit.debt -= 1;
            permit.forget();
        }
        // Otherwise dropping the permit (after the lock, below) hands it to the next waiter.
    }

    pub(crate) fn snapshot(&self) -> KeySnapshot {
        KeySnapshot {
            key: self.key.clone(),
            limit: lock(&self.limit).current,
            in_flight: self.in_flight.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            timed_out: self.timed_out.load(Ordering::Relaxed),
        }
    }
}

/// A key's permit (and the global one, when there is a global cap): held
/// by the response body until it ends or is dropped.
#[derive(Debug)]
pub(crate) struct Permit {
    state: Arc<KeyState>,
    key: Option<OwnedSemaphorePermit>,
    _global: Option<OwnedSemaphorePermit>,
}

impl Permit {
    pub(crate) fn state(&self) -> &KeyState {
        &self.state
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(permit) = self.key.take() {
            self.state.release(permit);
        }
    }
}

/// One key's state at a moment, from [`snapshot`](super::ConcurrencyPerModelLayer::snapshot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySnapshot {
    /// The key (a model, or what the key function returned; `<overflow>`
    /// for the bucket that keys past the table's bound share).
    pub key: Model,
    /// The limit in force (lower than configured while adaptive mode has shrunk it).
    pub limit: usize,
    /// Calls holding a permit: sent upstream, body not yet finished.
    pub in_flight: usize,
    /// Calls waiting for a permit.
    pub queued: usize,
    /// Calls refused because the queue was full.
    pub rejected: u64,
    /// Calls whose wait for a permit timed out.
    pub timed_out: u64,
}
