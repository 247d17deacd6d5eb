//! The per-key limits shared by every clone of the service.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::aimd::{AdaptiveLimit, Aimd};
use crate::model::Model;
use crate::sync::lock;

/// The key table's map: a fast hash with a random seed per process (the
/// names come from clients, but the table is bounded, so no worse than a
/// few dozen comparisons even for colliding names).
type KeyMap = HashMap<Model, Arc<KeyState>, foldhash::fast::RandomState>;

/// What lookups read: the table's keys with weak references to their states,
/// so a copy a reader still holds never makes a key look busy to eviction.
type PublishedMap = HashMap<Model, Weak<KeyState>, foldhash::fast::RandomState>;

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
    /// Shares each key's cap with the fleet.
    #[cfg(feature = "redis")]
    pub(crate) fleet: Option<crate::fleet::Fleet>,
    /// Tells the adaptive limit whether an overload is local pressure (shrink
    /// harder) or a declared incident (do not grow back into it).
    #[cfg(feature = "health")]
    pub(crate) health: Option<crate::health::HealthMonitor>,
    /// Whether keys record metrics (the `metrics` feature's switch).
    #[cfg(feature = "metrics")]
    pub(crate) metrics: bool,
}

#[cfg(feature = "metrics")]
type Meters = Option<Arc<crate::metrics::ConcurrencyMeters>>;
#[cfg(not(feature = "metrics"))]
type Meters = ();

/// Name of the bucket that unknown keys share when every slot is busy.
pub(crate) const OVERFLOW_KEY: &str = "<overflow>";

pub(crate) use crate::model::MAX_KEY_LEN;

/// Every key's state, created lazily and bounded in number.
///
/// Configured keys (those given a `limit_for`, and the default key) always
/// get and keep a state of their own and never count against `max_keys`.
/// Other keys get one of `max_keys` slots; when all are taken, a new key
/// takes the slot of the least recently used one that is idle (nothing in
/// flight, nothing queued), and shares the overflow bucket only while every
/// slot is busy. So the table holds at most `overrides + 1 + max_keys`
/// states plus the overflow bucket, each with a name of at most
/// [`MAX_KEY_LEN`] bytes for unknown keys.
#[derive(Debug)]
pub(crate) struct Limits {
    pub(crate) config: Config,
    /// What lookups read: a copy of `table.map`, published again after each
    /// change, read with no lock and no write to a shared cache line, so
    /// calls on several cores do not serialise on the table.
    published: ArcSwap<PublishedMap>,
    /// The table itself, changed only on a miss, under this lock.
    table: Mutex<Table>,
    overflow: Arc<KeyState>,
    /// Advanced by every miss; a hit stamps its key with it, so the idle key
    /// with the oldest stamp is (roughly) the least recently used, without a
    /// shared counter written on the hot path.
    epoch: AtomicU64,
    pub(crate) global: Option<Arc<Semaphore>>,
    #[cfg(feature = "metrics")]
    meters: Option<crate::metrics::ModelTable<crate::metrics::ConcurrencyMeters>>,
}

#[derive(Debug, Default)]
struct Table {
    map: KeyMap,
    /// How many entries of `map` are unknown keys (the ones `max_keys` bounds).
    unknown: usize,
}

impl Table {
    /// Drops the least recently used unknown key that nobody holds.
    ///
    /// Every permit, waiter and queue slot holds an `Arc` of its key, so a
    /// strong count of 1 (this table) means idle. Published copies hold weak
    /// references: a copy a reader on another core still holds must not make
    /// every key look busy, or new names would share the overflow bucket
    /// with slots idle (issue 19, breaker finding 2). A lookup upgrades the
    /// reference from a published copy with no lock (the strong count goes
    /// up as for a clone), so eviction and lookup meet like Dekker's two flags: the
    /// evictor marks the key, fences, and checks the count again; a lookup
    /// counts itself, fences, and checks the mark. At least one of them sees
    /// the other: the evictor keeps the key, or the lookup drops its clone
    /// and asks the table (`Limits::insert`). An entry a permit points at is
    /// never evicted, and no call is counted on an evicted state.
    fn evict_idle(&mut self) -> bool {
        const IDLE: usize = 1;
        let mut candidates: Vec<(u64, Model)> = self
            .map
            .iter()
            .filter(|(_, state)| !state.configured && Arc::strong_count(state) == IDLE)
            .map(|(key, state)| (state.last_used.load(Ordering::Relaxed), key.clone()))
            .collect();
        candidates.sort_unstable_by_key(|(stamp, _)| *stamp);
        for (_, key) in candidates {
            let Some(state) = self.map.get(&key) else {
                continue;
            };
            state.evicted.store(true, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            if Arc::strong_count(state) == IDLE {
                self.map.remove(&key);
                self.unknown -= 1;
                return true;
            }
            state.evicted.store(false, Ordering::Relaxed);
        }
        false
    }
}

impl Limits {
    pub(crate) fn new(config: Config) -> Self {
        #[cfg(feature = "metrics")]
        let meters = config
            .metrics
            .then(|| crate::metrics::ModelTable::new(crate::metrics::ConcurrencyMeters::new));
        let overflow = Arc::new(KeyState::new(
            Model::new(OVERFLOW_KEY),
            config.default_limit,
            config.adaptive.as_ref(),
            false,
            0,
            #[cfg(feature = "metrics")]
            meters.as_ref().map(|table| table.arc(None)),
            #[cfg(not(feature = "metrics"))]
            (),
        ));
        let global = config
            .global_limit
            .map(|n| Arc::new(Semaphore::new(n.clamp(1, Semaphore::MAX_PERMITS))));
        Self {
            config,
            published: ArcSwap::from_pointee(PublishedMap::default()),
            table: Mutex::new(Table::default()),
            overflow,
            epoch: AtomicU64::new(0),
            global,
            #[cfg(feature = "metrics")]
            meters,
        }
    }

    /// The state of `key`, created on first use (see [`Limits`] for the bound).
    pub(crate) fn key(&self, key: Option<Model>) -> Arc<KeyState> {
        let key = key.unwrap_or_else(|| self.config.default_key.clone());
        let found = {
            let published = self.published.load();
            let found = published.get(&key);
            // Widens the race window with an eviction, for the test below.
            #[cfg(test)]
            std::thread::yield_now();
            // `None` once evicted and let go by its last holder.
            found.and_then(Weak::upgrade)
        };
        if let Some(state) = found {
            // The lookup's half of the handshake in `Table::evict_idle`.
            fence(Ordering::SeqCst);
            if !state.evicted.load(Ordering::Relaxed) {
                state.touch(&self.epoch);
                return state;
            }
        }
        self.insert(key)
    }

    #[cold]
    fn insert(&self, key: Model) -> Arc<KeyState> {
        let mut table = lock(&self.table);
        if let Some(state) = table.map.get(&key) {
            state.touch(&self.epoch);
            return Arc::clone(state);
        }
        let configured = match self.config.overrides.get(&key) {
            Some(&limit) => Some(limit),
            None => (key == self.config.default_key).then_some(self.config.default_limit),
        };
        let limit = match configured {
            Some(limit) => limit,
            None => {
                // A model literally named like the bucket would show twice in snapshots.
                if key.as_str().len() > MAX_KEY_LEN || key.as_str() == OVERFLOW_KEY {
                    return Arc::clone(&self.overflow);
                }
                if table.unknown >= self.config.max_keys && !table.evict_idle() {
                    return Arc::clone(&self.overflow);
                }
                table.unknown += 1;
                self.config.default_limit
            }
        };
        // Odd stamps for new keys, even ones for hits after them: a key used
        // after another was created is strictly newer, and the reverse too.
        let stamp = self.epoch.fetch_add(2, Ordering::Relaxed) + 1;
        let state = Arc::new(KeyState::new(
            key.clone(),
            limit,
            self.config.adaptive.as_ref(),
            configured.is_some(),
            stamp,
            #[cfg(feature = "metrics")]
            self.meters.as_ref().map(|table| table.arc(Some(&key))),
            #[cfg(not(feature = "metrics"))]
            (),
        ));
        table.map.insert(key, Arc::clone(&state));
        // Copied whole: the table is bounded (`max_keys` plus the configured
        // keys), and a miss is rare next to the hits it makes lock-free.
        self.published.store(Arc::new(
            table
                .map
                .iter()
                .map(|(key, state)| (key.clone(), Arc::downgrade(state)))
                .collect(),
        ));
        state
    }

    pub(crate) fn snapshot(&self) -> Vec<KeySnapshot> {
        let table = lock(&self.table);
        let mut snapshot: Vec<KeySnapshot> = table.map.values().map(|k| k.snapshot()).collect();
        drop(table);
        let overflow = self.overflow.snapshot();
        if overflow.in_flight + overflow.queued > 0 || overflow.rejected + overflow.timed_out > 0 {
            snapshot.push(overflow);
        }
        snapshot.sort_by(|a, b| a.key.cmp(&b.key));
        snapshot
    }
}

/// One key's permits, counters and (optionally) adaptive limit.
#[derive(Debug)]
pub(crate) struct KeyState {
    pub(crate) key: Model,
    pub(crate) semaphore: Arc<Semaphore>,
    /// Configured keys are never evicted.
    configured: bool,
    /// Set while the table evicts this key (see `Table::evict_idle`).
    evicted: AtomicBool,
    /// The epoch of the last lookup (see [`Limits`]).
    last_used: AtomicU64,
    limit: Mutex<LimitState>,
    /// Permits in use that must be forgotten, not returned, when released:
    /// how a limit shrinks below what is already in flight. An atomic, so a
    /// release (every call) takes no lock; only limit changes lock.
    debt: AtomicUsize,
    in_flight: AtomicUsize,
    pub(crate) queued: AtomicUsize,
    pub(crate) rejected: AtomicU64,
    pub(crate) timed_out: AtomicU64,
    /// The key's gauges, from a table of their own: keys come and go as
    /// the key table evicts idle ones, label values must not.
    #[cfg(feature = "metrics")]
    pub(crate) meters: Option<Arc<crate::metrics::ConcurrencyMeters>>,
}

#[derive(Debug)]
struct LimitState {
    current: usize,
    adaptive: Option<AdaptiveLimit>,
}

impl KeyState {
    fn new(
        key: Model,
        limit: usize,
        adaptive: Option<&Aimd>,
        configured: bool,
        stamp: u64,
        meters: Meters,
    ) -> Self {
        // tokio's semaphore panics past MAX_PERMITS; `usize::MAX` means "no cap" to a caller.
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS);
        #[cfg(feature = "metrics")]
        if let Some(meters) = &meters {
            meters.limit.set(limit as f64);
        }
        #[cfg(not(feature = "metrics"))]
        let () = meters;
        Self {
            key,
            semaphore: Arc::new(Semaphore::new(limit)),
            configured,
            evicted: AtomicBool::new(false),
            last_used: AtomicU64::new(stamp),
            limit: Mutex::new(LimitState {
                current: limit,
                adaptive: adaptive.map(|aimd| AdaptiveLimit::new(limit, aimd)),
            }),
            debt: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            rejected: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            #[cfg(feature = "metrics")]
            meters,
        }
    }

    /// Marks an unknown key as used now; skips the store when the stamp is
    /// current, so hot keys do not write a shared cache line per call.
    fn touch(&self, epoch: &AtomicU64) {
        if self.configured {
            return;
        }
        let now = epoch.load(Ordering::Relaxed);
        if self.last_used.load(Ordering::Relaxed) != now {
            self.last_used.store(now, Ordering::Relaxed);
        }
    }

    /// Takes one of the key's permits now, if one is free.
    ///
    /// Borrowed, not owned: an owned permit would clone the semaphore's
    /// `Arc` and drop it again, two writes to a shared cache line per call.
    /// The permit is forgotten here and given back by [`Permit`]'s drop.
    pub(crate) fn try_take(&self) -> bool {
        self.semaphore
            .try_acquire()
            .map(tokio::sync::SemaphorePermit::forget)
            .is_ok()
    }

    /// Counts a call in flight from here until the permit is dropped; the
    /// key's permit was taken with [`try_take`](Self::try_take).
    pub(crate) fn permit(state: Arc<Self>, global: Option<OwnedSemaphorePermit>) -> Permit {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        if let Some(meters) = &state.meters {
            meters.in_flight.increment(1.0);
        }
        Permit {
            state,
            _global: global,
            #[cfg(feature = "redis")]
            lease: None,
        }
    }

    /// The limit in force now.
    #[cfg(feature = "redis")]
    pub(crate) fn limit_now(&self) -> usize {
        lock(&self.limit).current
    }

    /// A response said the platform or the quota is overloaded; `harder`
    /// shrinks twice (a probe found the pressure to be ours).
    pub(crate) fn on_overload(&self, harder: bool) {
        let mut limit = lock(&self.limit);
        let Some(adaptive) = limit.adaptive.as_mut() else {
            return;
        };
        let mut target = adaptive.on_overload();
        if harder {
            target = adaptive.on_overload();
        }
        if target < limit.current {
            let shrink = limit.current - target;
            limit.current = target;
            self.limit_changed(target);
            let forgotten = self.semaphore.forget_permits(shrink);
            self.debt.fetch_add(shrink - forgotten, Ordering::AcqRel);
        }
    }

    /// A response succeeded; `may_grow` is asked only when the limit would
    /// grow (a declared incident holds it where it is).
    pub(crate) fn on_success(&self, may_grow: impl FnOnce() -> bool) {
        let mut limit = lock(&self.limit);
        let in_flight = self.in_flight.load(Ordering::Relaxed);
        let Some(adaptive) = limit.adaptive.as_mut() else {
            return;
        };
        if !adaptive.would_grow(in_flight) || !may_grow() {
            return;
        }
        let target = adaptive.on_success(in_flight);
        if target > limit.current {
            let grow = target - limit.current;
            limit.current = target;
            self.limit_changed(target);
            // Growth first cancels debt, so the permits in use come back.
            let debt = self
                .debt
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |debt| {
                    Some(debt - grow.min(debt))
                })
                .unwrap_or_default();
            self.semaphore.add_permits(grow - grow.min(debt));
        }
    }

    fn limit_changed(&self, limit: usize) {
        #[cfg(feature = "metrics")]
        if let Some(meters) = &self.meters {
            meters.limit.set(limit as f64);
        }
        let _ = limit;
    }

    fn release(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        if let Some(meters) = &self.meters {
            meters.in_flight.decrement(1.0);
        }
        self.give_back();
    }

    /// Returns one taken permit, or keeps it out to pay a shrink's debt.
    /// Every permit taken from the semaphore comes back this way, whether
    /// its call went out or not (a [`HeldKey`] dropped while waiting for the
    /// global permit): a permit returned past the debt would let a new call
    /// in above the shrunk limit (issue 19, breaker finding 1).
    fn give_back(&self) {
        let paid = self.debt.load(Ordering::Acquire) > 0
            && self
                .debt
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |debt| {
                    debt.checked_sub(1)
                })
                .is_ok();
        // Paying a debt keeps the permit out: the limit shrank meanwhile.
        // Otherwise it goes back, to the next waiter if there is one.
        if !paid {
            self.semaphore.add_permits(1);
        }
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

/// A key's permit, taken (see [`KeyState::try_take`]) but not yet counted in
/// flight: what a call holds while it waits for the global permit. Dropped,
/// it gives the permit back.
pub(crate) struct HeldKey {
    state: Arc<KeyState>,
    armed: bool,
}

impl HeldKey {
    /// `state`'s permit, which the caller has just taken with `try_take`.
    pub(crate) fn taken(state: Arc<KeyState>) -> Self {
        Self { state, armed: true }
    }

    /// A permit acquired by waiting, held the same way.
    pub(crate) fn acquired(state: Arc<KeyState>, permit: OwnedSemaphorePermit) -> Self {
        permit.forget();
        Self::taken(state)
    }

    /// The call goes out: its permit now counts in flight.
    pub(crate) fn into_permit(mut self, global: Option<OwnedSemaphorePermit>) -> Permit {
        self.armed = false;
        KeyState::permit(Arc::clone(&self.state), global)
    }
}

impl Drop for HeldKey {
    fn drop(&mut self) {
        if self.armed {
            self.state.give_back();
        }
    }
}

/// A key's permit (and the global one, when there is a global cap): held
/// by the response body until it ends or is dropped.
#[derive(Debug)]
pub(crate) struct Permit {
    state: Arc<KeyState>,
    _global: Option<OwnedSemaphorePermit>,
    /// The call's slot in the fleet's cap, when the layer shares one.
    #[cfg(feature = "redis")]
    lease: Option<crate::fleet::FleetLease>,
}

impl Permit {
    pub(crate) fn state(&self) -> &KeyState {
        &self.state
    }

    /// Holds `lease` for as long as the permit.
    #[cfg(feature = "redis")]
    pub(crate) fn hold(&mut self, lease: crate::fleet::FleetLease) {
        self.lease = Some(lease);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.state.release();
    }
}

/// One key's state at a moment, from [`snapshot`](super::ConcurrencyPerModelLayer::snapshot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySnapshot {
    /// The key (a model, or what the key function returned; `<overflow>`
    /// for the bucket unknown keys share while every slot of the table is
    /// busy, see [`max_keys`](super::ConcurrencyPerModelLayer::max_keys)).
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

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_keys: usize, overrides: &[(&str, usize)]) -> Limits {
        Limits::new(Config {
            default_limit: 4,
            overrides: overrides
                .iter()
                .map(|(name, limit)| (Model::new(*name), *limit))
                .collect(),
            global_limit: None,
            max_queued: 8,
            queue_timeout: None,
            adaptive: None,
            default_key: Model::new("<default>"),
            max_keys,
            #[cfg(feature = "redis")]
            fleet: None,
            #[cfg(feature = "health")]
            health: None,
            #[cfg(feature = "metrics")]
            metrics: false,
        })
    }

    fn key(limits: &Limits, name: &str) -> Arc<KeyState> {
        limits.key(Some(Model::new(name)))
    }

    fn names(limits: &Limits) -> Vec<String> {
        limits
            .snapshot()
            .iter()
            .map(|s| s.key.as_str().to_owned())
            .collect()
    }

    // Defect 4: configured keys and the default key neither count against
    // `max_keys` nor can be evicted, even with no slot for unknown keys at all.
    #[test]
    fn configured_keys_are_outside_the_bound() {
        let limits = limits(0, &[("opus", 2)]);
        assert_eq!(key(&limits, "unknown").key.as_str(), OVERFLOW_KEY);
        let opus = key(&limits, "opus");
        assert_eq!((opus.key.as_str(), opus.snapshot().limit), ("opus", 2));
        drop(opus);
        let default = limits.key(None);
        assert_eq!(default.key.as_str(), "<default>");
        drop(default);
        for i in 0..100 {
            assert_eq!(key(&limits, &format!("m{i}")).key.as_str(), OVERFLOW_KEY);
        }
        assert_eq!(names(&limits), ["<default>", "opus"]);
    }

    // Defect 4: the least recently used idle key is the one replaced.
    #[test]
    fn the_least_recently_used_idle_key_is_replaced() {
        let limits = limits(3, &[("opus", 2)]);
        for name in ["a", "b", "c", "opus"] {
            key(&limits, name);
        }
        key(&limits, "a");
        key(&limits, "d");
        assert_eq!(names(&limits), ["a", "c", "d", "opus"], "b was oldest");
        key(&limits, "c");
        key(&limits, "e");
        assert_eq!(names(&limits), ["c", "d", "e", "opus"], "then a");
    }

    // Defect 4: a key something holds (a permit, a waiter) is never evicted;
    // with every slot held, new keys share the overflow bucket.
    #[test]
    fn a_held_key_is_never_evicted() {
        let limits = limits(2, &[]);
        let a = key(&limits, "a");
        let b = key(&limits, "b");
        let c = key(&limits, "c");
        assert_eq!(c.key.as_str(), OVERFLOW_KEY);
        assert_eq!(names(&limits), ["a", "b"]);
        assert!(Arc::ptr_eq(&a, &key(&limits, "a")), "still the same state");
        drop(b);
        assert_eq!(key(&limits, "d").key.as_str(), "d");
        assert_eq!(names(&limits), ["a", "d"]);
        drop(a);
    }

    // Defect 4: long names and the bucket's own name cannot take a slot.
    #[test]
    fn long_names_and_the_overflow_name_share_the_overflow_bucket() {
        let long = "m".repeat(MAX_KEY_LEN + 1);
        let limits = limits(8, &[(long.as_str(), 3)]);
        assert_eq!(
            key(&limits, &"x".repeat(MAX_KEY_LEN + 1)).key.as_str(),
            OVERFLOW_KEY
        );
        assert_eq!(key(&limits, OVERFLOW_KEY).snapshot().limit, 4);
        assert_eq!(
            key(&limits, &"x".repeat(MAX_KEY_LEN)).key.as_str().len(),
            MAX_KEY_LEN
        );
        assert_eq!(
            key(&limits, &long).snapshot().limit,
            3,
            "configured: any length"
        );
        assert_eq!(limits.snapshot().len(), 2);
    }

    // Lookups race evictions on other threads: every holder of a name must
    // hold the same state, or the name's limit would count twice.
    #[test]
    fn lookups_racing_evictions_never_split_a_name() {
        let limits = Arc::new(limits(3, &[]));
        let holders: Arc<Mutex<HashMap<String, (usize, usize)>>> = Arc::default();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (limits, holders) = (Arc::clone(&limits), Arc::clone(&holders));
                std::thread::spawn(move || {
                    for i in 0..20_000usize {
                        let name = format!("m{}", (i * 7 + t) % 6);
                        let state = key(&limits, &name);
                        if state.key.as_str() == OVERFLOW_KEY {
                            continue;
                        }
                        let address = Arc::as_ptr(&state) as usize;
                        {
                            let mut held = lock(&holders);
                            let entry = held.entry(name.clone()).or_insert((address, 0));
                            if entry.1 > 0 {
                                assert_eq!(entry.0, address, "{name} split in two states");
                            }
                            *entry = (address, entry.1 + 1);
                        }
                        std::hint::spin_loop();
                        lock(&holders).get_mut(&name).unwrap().1 -= 1;
                        drop(state);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
    }

    // Issue 19, breaker finding 2: a lookup on another core holds a
    // published copy for a moment (an arc-swap guard). Every key in that
    // copy looked busy to the evictor, so a new name went to the shared
    // overflow bucket with every slot idle: one name could then hold a
    // permit there and one in its own slot, twice its limit.
    #[test]
    fn a_copy_held_by_a_reader_does_not_make_idle_keys_look_busy() {
        let limits = limits(2, &[]);
        key(&limits, "a");
        key(&limits, "b");
        let reader = limits.published.load_full();
        let c = key(&limits, "c");
        assert_eq!(c.key.as_str(), "c", "a slot was idle");
        let reader_too = limits.published.load_full();
        assert_eq!(key(&limits, "d").key.as_str(), "d");
        drop((reader, reader_too));
        assert_eq!(names(&limits).len(), 2);
    }

    // Defect 4: a flood of distinct names keeps the table at its bound.
    #[test]
    fn a_flood_keeps_the_table_at_its_bound() {
        let limits = limits(16, &[("opus", 2), ("sonnet", 3)]);
        let opus = key(&limits, "opus");
        let mut held = Vec::new();
        for i in 0..20_000 {
            let state = key(&limits, &format!("m{i}"));
            if i % 101 == 0 && held.len() < 10 {
                held.push(state);
            }
            assert!(lock(&limits.table).map.len() <= 16 + 2 + 1);
            assert!(limits.published.load().len() <= 16 + 2 + 1);
        }
        assert_eq!(lock(&limits.table).unknown, 16);
        assert!(Arc::ptr_eq(&opus, &key(&limits, "opus")));
        for state in &held {
            assert!(
                Arc::ptr_eq(state, &key(&limits, state.key.as_str())),
                "held keys stay"
            );
        }
    }
}
