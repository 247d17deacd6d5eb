//! One organisation, many workers: limits, retry quota and cooldowns shared
//! through a store (Redis or Valkey), with each worker's own state as the
//! fallback.
//!
//! Rate limits belong to the organisation and overload is per model for
//! everyone, but each layer's state lives in one process: twenty workers
//! each capped at 4 opus calls put 80 in flight, and each holds its own
//! retry quota. A [`Fleet`] is the handle that makes the layers share:
//!
//! - [`ConcurrencyPerModelLayer::fleet`](crate::concurrency::ConcurrencyPerModelLayer::fleet):
//!   the per-model cap holds for the whole fleet (a semaphore in the store,
//!   with leases);
//! - [`RetryPolicy::fleet`](crate::retry::RetryPolicy::fleet): one retry
//!   quota for the fleet, so a storm costs the fleet one quota, not one per
//!   worker.
//!
//! ```no_run
//! # #[cfg(all(feature = "concurrency", feature = "retry"))]
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use tower_overload::concurrency::ConcurrencyPerModelLayer;
//! use tower_overload::fleet::{Fleet, FleetConfig, RedisStore};
//! use tower_overload::retry::RetryPolicy;
//!
//! // Four workers: when Redis is unreachable each keeps a quarter of the limits.
//! let store = RedisStore::open("redis://127.0.0.1:6379/").unwrap();
//! let fleet = Fleet::new(store, FleetConfig::default().share(0.25));
//! let concurrency = ConcurrencyPerModelLayer::new(8).fleet(fleet.clone());
//! let retry = RetryPolicy::foreground().fleet(&fleet);
//! # let _ = (concurrency, retry);
//! # }
//! # #[cfg(not(all(feature = "concurrency", feature = "retry")))] fn main() {}
//! ```
//!
//! # What holds
//!
//! - **Slots.** A call holds a lease on one of the model's slots in the
//!   store for as long as its response body is alive; the worker renews its
//!   leases every third of the lease time (at most every second), writing
//!   back any the store lost. A worker that crashes stops renewing, and its
//!   slots free themselves within one lease (default 10 s). While the store
//!   is down, calls count against the worker's local share; when it comes
//!   back, the calls still in flight are written to it before any call asks
//!   it again. So the fleet never has more than the cap in flight, except
//!   while the store is down (each worker's share) and for up to a second
//!   after a restart that no call noticed (the leases are written back at
//!   the next renewal). A restart also refills the pacing buckets, until
//!   the responses' `remaining` headers correct them.
//! - **Fairness.** Within a worker, calls take slots first come, first
//!   served (the layer's own queue). Across workers a freed slot goes to the
//!   first worker to ask after it was freed: each waiting worker asks again
//!   at once when a call of its own ends, and otherwise every `poll` (20 ms)
//!   or when the earliest lease would expire. A worker keeps a slot its call
//!   just freed for its own next call (no round trip) while it is busy, but
//!   gives it back after 20 ms idle and always within
//!   [`reuse`](FleetConfig::reuse) (500 ms) of taking it, so a busy worker
//!   holds a slot others wait for at most that long. No worker starves
//!   while it asks, but a worker closer to the store wins more races.
//! - **Retry quota.** Each worker spends from a local view of the fleet's
//!   quota and syncs every `sync` (100 ms): its net spending goes to the
//!   store, and its view becomes its `share` of what the fleet has left. A
//!   retry decision never waits for the store; between two syncs the fleet
//!   can overspend by at most one view per worker.
//! - **Faults.** Every store operation has a short timeout (`op_timeout`,
//!   100 ms). When one fails, the worker switches to its local state scaled
//!   to its `share` of the fleet's limits (a cap of 8 at share 0.25 is 2
//!   local slots), logs one warning for the episode, counts it
//!   ([`FleetSnapshot`]), and checks the store every `recheck` (1 s); once
//!   it answers, calls use it again and one line says so. A call is never
//!   failed or sent twice because of the store: the store only decides when
//!   it goes.
//! - **Cost.** On the success path a call makes at most one store round
//!   trip (the acquire), none when it takes a slot its worker kept; its
//!   release is sent in the background, batched with the others, and the
//!   quota and cooldowns sync in the background too. Measured with
//!   `cargo run --release --features redis --example fleet_bench` (four
//!   worker processes, a fast loopback upstream): 0.005 round trips per
//!   call, 0.94x the calls per second of the same workers on local state.

mod lease;
mod redis;
mod store;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::time::Instant;

pub use self::lease::FleetLease;
pub use self::redis::RedisStore;
pub use self::store::{
    Acquired, BreakerEvent, BreakerState, BucketsSync, BucketsView, SharedStore, StoreError,
    StoreFuture,
};
use crate::budget::RetryQuota;
use crate::sync::lock;

/// How a fleet shares, and how each worker falls back.
///
/// ```
/// use std::time::Duration;
/// use tower_overload::fleet::FleetConfig;
///
/// let config = FleetConfig::default();
/// assert_eq!(config.get_lease(), Duration::from_secs(10));
/// assert_eq!(config.get_op_timeout(), Duration::from_millis(100));
/// let config = config.share(0.25).prefix("myapp");
/// assert_eq!(config.get_share(), 0.25);
/// ```
#[derive(Debug, Clone)]
pub struct FleetConfig {
    prefix: String,
    op_timeout: Duration,
    lease: Duration,
    share: f64,
    recheck: Duration,
    poll: Duration,
    sync: Duration,
    reuse: Duration,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            prefix: "tower_overload".to_owned(),
            op_timeout: Duration::from_millis(100),
            lease: Duration::from_secs(10),
            share: 1.0,
            recheck: Duration::from_secs(1),
            poll: Duration::from_millis(20),
            sync: Duration::from_millis(100),
            reuse: Duration::from_millis(500),
        }
    }
}

impl FleetConfig {
    /// The prefix of every key in the store (default `tower_overload`):
    /// fleets with different prefixes share nothing.
    ///
    /// ```
    /// # use tower_overload::fleet::FleetConfig;
    /// let config = FleetConfig::default().prefix("staging");
    /// ```
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The longest a store operation may take before the worker falls back
    /// to its local state (default 100 ms).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::fleet::FleetConfig;
    /// let config = FleetConfig::default().op_timeout(Duration::from_millis(50));
    /// ```
    pub fn op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// How long a slot stays held without renewal (default 10 s, from
    /// 30 ms to a day): the longest a crashed worker's slots stay taken.
    /// Renewed every third.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::fleet::FleetConfig;
    /// let config = FleetConfig::default().lease(Duration::from_secs(5));
    /// ```
    pub fn lease(mut self, lease: Duration) -> Self {
        // At most a day: the scripts do lease arithmetic in Lua doubles and
        // Redis refuses an expiry it gets back in exponent form (defect 5).
        self.lease = lease.clamp(Duration::from_millis(30), MAX_DURATION);
        self
    }

    /// This worker's share of the fleet's limits when the store is down
    /// (default 1.0: a lone worker; 0.25 for one of four), in (0, 1].
    ///
    /// ```
    /// # use tower_overload::fleet::FleetConfig;
    /// let config = FleetConfig::default().share(0.25);
    /// ```
    pub fn share(mut self, share: f64) -> Self {
        self.share = if share.is_finite() {
            share.clamp(1e-6, 1.0)
        } else {
            1.0
        };
        self
    }

    /// How often a worker cut off from the store checks it again (default 1 s).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::fleet::FleetConfig;
    /// let config = FleetConfig::default().recheck(Duration::from_millis(500));
    /// ```
    pub fn recheck(mut self, every: Duration) -> Self {
        self.recheck = every.max(Duration::from_millis(1));
        self
    }

    /// How often a call waiting for a fleet slot asks again when nothing of
    /// its own worker ended (default 20 ms).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::fleet::FleetConfig;
    /// let config = FleetConfig::default().poll(Duration::from_millis(10));
    /// ```
    pub fn poll(mut self, every: Duration) -> Self {
        self.poll = every.max(Duration::from_millis(1));
        self
    }

    /// How often the retry quota syncs with the store (default 100 ms).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::fleet::FleetConfig;
    /// let config = FleetConfig::default().sync(Duration::from_millis(50));
    /// ```
    pub fn sync(mut self, every: Duration) -> Self {
        self.sync = every.max(Duration::from_millis(1));
        self
    }

    /// How long a worker may keep a slot it took from the fleet for its
    /// next calls (default 500 ms; zero: never; a day at most). A call that
    /// ends hands its slot to the worker's next call with no store round
    /// trip; a slot
    /// idle for a tick (20 ms) goes back, and every slot goes back to the
    /// fleet once this old, so a busy worker cannot keep slots others wait for.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::fleet::FleetConfig;
    /// let config = FleetConfig::default().reuse(Duration::ZERO);
    /// ```
    pub fn reuse(mut self, reuse: Duration) -> Self {
        // Bounded: added to instants, which panic on overflow (defect 4).
        self.reuse = reuse.min(MAX_DURATION);
        self
    }

    /// The lease time.
    ///
    /// ```
    /// # use tower_overload::fleet::FleetConfig;
    /// assert_eq!(FleetConfig::default().get_lease().as_secs(), 10);
    /// ```
    pub fn get_lease(&self) -> Duration {
        self.lease
    }

    /// The store operations' timeout.
    ///
    /// ```
    /// # use tower_overload::fleet::FleetConfig;
    /// assert_eq!(FleetConfig::default().get_op_timeout().as_millis(), 100);
    /// ```
    pub fn get_op_timeout(&self) -> Duration {
        self.op_timeout
    }

    /// The share of the limits kept when the store is down.
    ///
    /// ```
    /// # use tower_overload::fleet::FleetConfig;
    /// assert_eq!(FleetConfig::default().get_share(), 1.0);
    /// ```
    pub fn get_share(&self) -> f64 {
        self.share
    }

    /// `limit` scaled to this worker's share, at least 1.
    fn scaled(&self, limit: u32) -> u32 {
        ((f64::from(limit) * self.share).ceil() as u32).max(1)
    }
}

/// The handle every layer of a worker shares the fleet through; cheap to clone.
///
/// Made inside a Tokio runtime: it runs one background task (renewing
/// leases, sending releases, syncing the quota, checking a store that
/// failed), which ends when the last clone is dropped.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use tower_overload::fleet::{Fleet, FleetConfig, RedisStore};
/// let fleet = Fleet::new(RedisStore::open("redis://127.0.0.1/").unwrap(), FleetConfig::default());
/// assert!(!fleet.snapshot().degraded);
/// # }
/// ```
#[derive(Clone)]
pub struct Fleet {
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    store: Arc<dyn SharedStore>,
    config: FleetConfig,
    /// This worker's name in the store: a lease's holder is `worker:n`.
    worker: String,
    next_lease: AtomicU64,
    degraded: AtomicBool,
    episodes: AtomicU64,
    local_calls: AtomicU64,
    shared_calls: AtomicU64,
    waits: AtomicU64,
    acquires: AtomicU64,
    /// Leases held, by store key: what the background task renews.
    held: Mutex<HashMap<String, HashSet<String>>>,
    /// Slots of the local share in use (the store was down), by key.
    local_held: Mutex<HashMap<String, HashSet<String>>>,
    /// Leases whose call ended, kept for this worker's next call, by key.
    idle: Mutex<HashMap<String, Vec<lease::Idle>>>,
    reused: AtomicU64,
    releases: mpsc::UnboundedSender<(String, String)>,
    /// A call of this worker ended: its waiting calls ask the store again.
    released: Notify,
    /// The local semaphores used while the store is down, by key (bounded).
    local: Mutex<HashMap<String, Arc<Semaphore>>>,
    quotas: Mutex<Vec<QuotaSync>>,
    /// Breakers synced with the fleet's, by store key.
    breakers: Mutex<Vec<Registered<dyn SyncedBreaker>>>,
    /// Pacing keys synced with the fleet's buckets, by store key.
    buckets: Mutex<Vec<Registered<dyn SyncedBuckets>>>,
}

/// A state synced with the fleet: its two store keys (the state's and its
/// probe's or needs'), and the state while it lives.
type Registered<T> = ((String, String), Weak<T>);

/// A pacing key whose buckets the fleet shares.
pub(crate) trait SyncedBuckets: Send + Sync {
    /// What changed since the last sync, taken.
    fn take_sync(&self, share: f64) -> BucketsSync;
    /// Puts back the spending of a sync that failed.
    fn restore_sync(&self, sync: &BucketsSync);
    /// Follows the fleet's answer.
    fn apply(&self, view: BucketsView);
    /// The store is down: the buckets refill on their own, at this worker's share.
    fn alone(&self);
}

/// A breaker whose state the fleet shares (the fallback layer's cooldowns).
pub(crate) trait SyncedBreaker: Send + Sync {
    /// What it did since the last sync, taken, and whether a call of this
    /// worker was kept from the model since (it wants to probe it).
    fn take_event(&self) -> (Option<BreakerEvent>, bool);
    /// Puts back an event whose sync failed (unless a newer one is there).
    fn restore_event(&self, event: BreakerEvent);
    /// Follows the fleet's state; `hold` is how long to keep skipping a
    /// model another worker probes (until the next sync).
    fn apply(&self, state: BreakerState, hold: Duration);
}

/// How long a worker may hold the fleet's one probe of a model before
/// another may take it (a crashed prober must not keep the model out).
const PROBE_TTL: Duration = Duration::from_secs(30);

/// The longest lease or reuse a config keeps (one day).
const MAX_DURATION: Duration = Duration::from_secs(86_400);

/// The most keys with a local fallback semaphore of their own; more share one
/// per local size.
const MAX_LOCAL_KEYS: usize = 1024;

/// A retry quota kept in step with the fleet's.
struct QuotaSync {
    key: String,
    capacity: u32,
    quota: RetryQuota,
    /// The tokens the quota was set to at the last sync.
    view: u32,
}

impl Fleet {
    /// A fleet sharing through `store`. Must be called inside a Tokio runtime.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use tower_overload::fleet::{Fleet, FleetConfig, RedisStore};
    /// let fleet = Fleet::new(RedisStore::open("redis://127.0.0.1/").unwrap(), FleetConfig::default().share(0.5));
    /// # let _ = fleet;
    /// # }
    /// ```
    pub fn new(store: impl SharedStore, config: FleetConfig) -> Self {
        let (releases, receiver) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            store: Arc::new(store),
            worker: worker_name(),
            config,
            next_lease: AtomicU64::new(0),
            degraded: AtomicBool::new(false),
            episodes: AtomicU64::new(0),
            local_calls: AtomicU64::new(0),
            shared_calls: AtomicU64::new(0),
            waits: AtomicU64::new(0),
            acquires: AtomicU64::new(0),
            held: Mutex::new(HashMap::new()),
            local_held: Mutex::new(HashMap::new()),
            idle: Mutex::new(HashMap::new()),
            reused: AtomicU64::new(0),
            releases,
            released: Notify::new(),
            local: Mutex::new(HashMap::new()),
            quotas: Mutex::new(Vec::new()),
            breakers: Mutex::new(Vec::new()),
            buckets: Mutex::new(Vec::new()),
        });
        tokio::spawn(background(Arc::downgrade(&shared), receiver));
        Self { shared }
    }

    /// A retry quota shared by the fleet under `name`: `capacity` tokens
    /// for the fleet, a retry costing `retry_cost` (`timeout_cost` after a
    /// timeout). This worker spends from its share of what the fleet has
    /// left, synced in the background. Asking again for the same name gives
    /// the same quota.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # use tower_overload::fleet::{Fleet, FleetConfig, RedisStore};
    /// # let fleet = Fleet::new(RedisStore::open("redis://127.0.0.1/").unwrap(), FleetConfig::default());
    /// let quota = fleet.retry_quota("retries", 500, 5, 10);
    /// # let _ = quota;
    /// # }
    /// ```
    pub fn retry_quota(
        &self,
        name: &str,
        capacity: u32,
        retry_cost: u32,
        timeout_cost: u32,
    ) -> RetryQuota {
        let key = self.shared.key("quota", name);
        let mut quotas = lock(&self.shared.quotas);
        // One per name: a policy made per call must not add a sync each time.
        if let Some(known) = quotas.iter().find(|sync| sync.key == key) {
            return known.quota.clone();
        }
        let local = self.shared.config.scaled(capacity);
        let quota = RetryQuota::new(local, retry_cost, timeout_cost);
        quotas.push(QuotaSync {
            key,
            capacity,
            quota: quota.clone(),
            view: local,
        });
        quota
    }

    /// What the fleet handle has done so far.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # use tower_overload::fleet::{Fleet, FleetConfig, RedisStore};
    /// # let fleet = Fleet::new(RedisStore::open("redis://127.0.0.1/").unwrap(), FleetConfig::default());
    /// let snapshot = fleet.snapshot();
    /// println!("store down {} times; {} calls on local state", snapshot.episodes, snapshot.local_calls);
    /// # }
    /// ```
    pub fn snapshot(&self) -> FleetSnapshot {
        let shared = &self.shared;
        FleetSnapshot {
            degraded: shared.degraded.load(Ordering::Acquire),
            episodes: shared.episodes.load(Ordering::Relaxed),
            shared_calls: shared.shared_calls.load(Ordering::Relaxed),
            local_calls: shared.local_calls.load(Ordering::Relaxed),
            waits: shared.waits.load(Ordering::Relaxed),
            acquires: shared.acquires.load(Ordering::Relaxed),
            reused: shared.reused.load(Ordering::Relaxed),
            leases_held: lock(&shared.held).values().map(HashSet::len).sum(),
        }
    }

    /// Shares `breaker` (the cooldown of `model`) with the fleet.
    #[cfg_attr(not(feature = "fallback"), allow(dead_code))]
    pub(crate) fn register_breaker(&self, model: &str, breaker: Weak<dyn SyncedBreaker>) {
        // Each kind of state has its own namespace: no model name can make
        // one key stand for another's (`X:probe` is a model, not X's probe).
        let keys = (
            self.shared.key("breaker", model),
            self.shared.key("probe", model),
        );
        lock(&self.shared.breakers).push((keys, breaker));
    }

    /// Shares the buckets of the pacing key `name` with the fleet.
    #[cfg_attr(not(feature = "pacing"), allow(dead_code))]
    pub(crate) fn register_buckets(&self, name: &str, buckets: Weak<dyn SyncedBuckets>) {
        let keys = (
            self.shared.key("pacing", name),
            self.shared.key("needs", name),
        );
        lock(&self.shared.buckets).push((keys, buckets));
    }

    /// This worker's share of the fleet's limits.
    #[cfg_attr(not(feature = "pacing"), allow(dead_code))]
    pub(crate) fn share(&self) -> f64 {
        self.shared.config.share
    }

    /// Whether the store is in use (not down).
    #[cfg_attr(not(feature = "fallback"), allow(dead_code))]
    pub(crate) fn is_available(&self) -> bool {
        !self.shared.is_degraded()
    }

    /// Waits for one of `cap` fleet slots of `name` (until `deadline`,
    /// `None` when it passes): a lease in the store, or while the store is
    /// down a slot of the local share.
    pub(crate) async fn lease(
        &self,
        name: &str,
        cap: u32,
        deadline: Option<Instant>,
    ) -> Option<FleetLease> {
        lease::acquire(&self.shared, name, cap, deadline).await
    }
}

impl Shared {
    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}:{kind}:{name}", self.config.prefix)
    }

    /// A store operation failed: the worker goes local until a recheck
    /// succeeds, saying so once per episode.
    fn degrade(&self, error: &StoreError) {
        if !self.degraded.swap(true, Ordering::AcqRel) {
            // Kept slots may expire in the store meanwhile: never reused.
            lease::give_back_idle(self);
            let buckets: Vec<_> = lock(&self.buckets)
                .iter()
                .filter_map(|(_, buckets)| buckets.upgrade())
                .collect();
            for buckets in buckets {
                buckets.alone();
            }
            self.episodes.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                target: "tower_overload::fleet",
                %error,
                share = self.config.share,
                "fleet store unavailable: using this worker's local share of the limits"
            );
        }
    }

    fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    /// The local semaphore standing in for `key`'s fleet cap while the
    /// store is down: the worker's share of it.
    fn local_semaphore(&self, key: &str, cap: u32) -> Arc<Semaphore> {
        let mut local = lock(&self.local);
        let permits = self.config.scaled(cap) as usize;
        // Past the bound, keys share a semaphore of their own size: a key
        // never borrows a larger key's share.
        let entry_key = if local.len() >= MAX_LOCAL_KEYS && !local.contains_key(key) {
            format!("<other:{permits}>")
        } else {
            key.to_owned()
        };
        Arc::clone(
            local
                .entry(entry_key)
                .or_insert_with(|| Arc::new(Semaphore::new(permits))),
        )
    }

    async fn timed<T>(&self, operation: StoreFuture<'_, T>) -> Result<T, StoreError> {
        match tokio::time::timeout(self.config.op_timeout, operation).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::new(format!(
                "no answer within {:?}",
                self.config.op_timeout
            ))),
        }
    }
}

/// What a [`Fleet`] handle has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct FleetSnapshot {
    /// The store failed and the worker is on its local share now.
    pub degraded: bool,
    /// How many times the store became unavailable.
    pub episodes: u64,
    /// Calls that held a fleet slot in the store.
    pub shared_calls: u64,
    /// Calls that held a slot of the local share (the store was down).
    pub local_calls: u64,
    /// Times a call found the fleet's slots all held and waited.
    pub waits: u64,
    /// Store round trips made on calls' paths (one per acquire attempt):
    /// `acquires / shared_calls` is the round trips per call, 1.0 when no
    /// call had to wait. Releases, renewals and syncs go in the background.
    pub acquires: u64,
    /// Calls that took a slot this worker kept from an earlier call (no
    /// round trip; see [`FleetConfig::reuse`]).
    pub reused: u64,
    /// Leases this worker holds in the store now.
    pub leases_held: usize,
}

impl fmt::Debug for Fleet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fleet")
            .field("store", &self.shared.store)
            .field("config", &self.shared.config)
            .field("worker", &self.shared.worker)
            .field("snapshot", &self.snapshot())
            .finish()
    }
}

/// A name unique to this worker among the fleet's: process, start time
/// and a random part.
fn worker_name() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as u64);
    format!(
        "{}-{:x}-{:x}",
        std::process::id(),
        nanos,
        // std's per-process hash seed: random without another dependency.
        {
            use std::hash::{BuildHasher, Hasher};
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish() as u32
        }
    )
}

/// The worker's background task: releases (batched), renewals, quota
/// syncs, and rechecks of a store that failed. Ends with the last handle.
async fn background(shared: Weak<Shared>, mut releases: mpsc::UnboundedReceiver<(String, String)>) {
    let (renew_every, sync_every, recheck_every) = match shared.upgrade() {
        // At most a second: a store that restarts without a failed call to
        // show it has lost the leases until the next renewal writes them back.
        Some(shared) => (
            (shared.config.lease / 3).min(Duration::from_secs(1)),
            shared.config.sync,
            shared.config.recheck,
        ),
        None => return,
    };
    // Idle kept slots go back within a tick.
    let tick = renew_every
        .min(sync_every)
        .min(recheck_every)
        .min(lease::IDLE_TICK);
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut renewed, mut synced, mut rechecked) = (Instant::now(), Instant::now(), Instant::now());
    // Releases that could not be sent while the store was down: sent once it
    // is back, so no slot stays taken for a whole lease after a short outage.
    let mut unsent: HashMap<String, Vec<String>> = HashMap::new();
    loop {
        tokio::select! {
            first = releases.recv() => {
                let Some(first) = first else { return };
                let Some(shared) = shared.upgrade() else { return };
                let mut batch: HashMap<String, Vec<String>> = HashMap::new();
                batch.entry(first.0).or_default().push(first.1);
                while let Ok((key, holder)) = releases.try_recv() {
                    batch.entry(key).or_default().push(holder);
                }
                if shared.is_degraded() {
                    merge(&mut unsent, batch);
                    continue;
                }
                if let Err(batch) = send_releases(&shared, batch).await {
                    merge(&mut unsent, batch);
                }
            }
            _ = ticker.tick() => {
                let Some(shared) = shared.upgrade() else { return };
                let now = Instant::now();
                if shared.is_degraded() {
                    if now.duration_since(rechecked) >= recheck_every {
                        rechecked = now;
                        recheck(&shared).await;
                    }
                    if shared.is_degraded() {
                        continue;
                    }
                }
                if !unsent.is_empty()
                    && let Err(batch) = send_releases(&shared, std::mem::take(&mut unsent)).await
                {
                    unsent = batch;
                }
                lease::release_idle(&shared, now);
                if now.duration_since(renewed) >= renew_every {
                    renewed = now;
                    renew(&shared).await;
                }
                if now.duration_since(synced) >= sync_every {
                    synced = now;
                    sync_quotas(&shared).await;
                    sync_breakers(&shared).await;
                    sync_buckets(&shared).await;
                }
            }
        }
    }
}

/// Sends a batch of releases; gives back what was not sent when the store fails.
async fn send_releases(
    shared: &Shared,
    batch: HashMap<String, Vec<String>>,
) -> Result<(), HashMap<String, Vec<String>>> {
    let mut keys: Vec<String> = batch.keys().cloned().collect();
    while let Some(key) = keys.pop() {
        let holders = &batch[&key];
        if let Err(error) = shared.timed(shared.store.release(&key, holders)).await {
            shared.degrade(&error);
            keys.push(key);
            let left = keys
                .into_iter()
                .filter_map(|key| batch.get(&key).map(|holders| (key, holders.clone())))
                .collect();
            return Err(left);
        }
    }
    Ok(())
}

/// Adds `more` to the releases waiting for the store (bounded: a store
/// down for long lets leases expire on their own instead).
fn merge(unsent: &mut HashMap<String, Vec<String>>, more: HashMap<String, Vec<String>>) {
    const MOST: usize = 100_000;
    let held: usize = unsent.values().map(Vec::len).sum();
    if held >= MOST {
        return;
    }
    for (key, holders) in more {
        unsent.entry(key).or_default().extend(holders);
    }
}

async fn recheck(shared: &Shared) {
    if shared.timed(shared.store.ping()).await.is_ok() {
        // Slots kept before the outage may have expired: not reused.
        lease::give_back_idle(shared);
        // Before any call asks the store again: the calls begun on the local
        // share and the leases from before the outage (which may have
        // expired) are written back, so the fleet counts every call in flight.
        lease::promote_local(shared);
        renew(shared).await;
        shared.degraded.store(false, Ordering::Release);
        tracing::info!(
            target: "tower_overload::fleet",
            "fleet store available again: limits are shared again"
        );
    }
}

async fn renew(shared: &Shared) {
    let held: Vec<(String, Vec<String>)> = lock(&shared.held)
        .iter()
        .filter(|(_, holders)| !holders.is_empty())
        .map(|(key, holders)| (key.clone(), holders.iter().cloned().collect()))
        .collect();
    for (key, holders) in held {
        match shared
            .timed(shared.store.renew(&key, &holders, shared.config.lease))
            .await
        {
            Ok(back) if back > 0 => {
                tracing::info!(
                    target: "tower_overload::fleet",
                    key,
                    back,
                    "fleet leases the store had lost were brought back"
                );
            }
            Ok(_) => {}
            Err(error) => {
                shared.degrade(&error);
                return;
            }
        }
    }
}

async fn sync_breakers(shared: &Shared) {
    let breakers: Vec<((String, String), Arc<dyn SyncedBreaker>)> = {
        let mut registered = lock(&shared.breakers);
        registered.retain(|(_, breaker)| breaker.strong_count() > 0);
        registered
            .iter()
            .filter_map(|(key, breaker)| Some((key.clone(), breaker.upgrade()?)))
            .collect()
    };
    // Until the next sync, with room for a slow one.
    let hold = shared.config.sync * 3;
    for ((key, probe_key), breaker) in breakers {
        let (event, wants_probe) = breaker.take_event();
        match shared
            .timed(shared.store.sync_breaker(
                &key,
                &probe_key,
                &shared.worker,
                event,
                wants_probe,
                PROBE_TTL,
            ))
            .await
        {
            Ok(state) => breaker.apply(state, hold),
            Err(error) => {
                if let Some(event) = event {
                    breaker.restore_event(event);
                }
                shared.degrade(&error);
                return;
            }
        }
    }
}

async fn sync_buckets(shared: &Shared) {
    let keys: Vec<((String, String), Arc<dyn SyncedBuckets>)> = {
        let mut registered = lock(&shared.buckets);
        registered.retain(|(_, buckets)| buckets.strong_count() > 0);
        registered
            .iter()
            .filter_map(|(key, buckets)| Some((key.clone(), buckets.upgrade()?)))
            .collect()
    };
    for ((key, needs_key), buckets) in keys {
        let sync = buckets.take_sync(shared.config.share);
        // A key with no limit known yet (say `<other>`) has nothing to share.
        if sync.buckets.iter().all(Option::is_none) && sync.pause.is_zero() {
            continue;
        }
        match shared
            .timed(
                shared
                    .store
                    .sync_buckets(&key, &needs_key, &shared.worker, &sync),
            )
            .await
        {
            Ok(view) => buckets.apply(view),
            Err(error) => {
                buckets.restore_sync(&sync);
                shared.degrade(&error);
                return;
            }
        }
    }
}

async fn sync_quotas(shared: &Shared) {
    let count = lock(&shared.quotas).len();
    for index in 0..count {
        let Some((key, capacity, quota, view)) = lock(&shared.quotas).get(index).map(|sync| {
            (
                sync.key.clone(),
                sync.capacity,
                sync.quota.clone(),
                sync.view,
            )
        }) else {
            return;
        };
        let observed = quota.available();
        let delta = i64::from(observed) - i64::from(view);
        match shared
            .timed(shared.store.add_tokens(&key, capacity, delta))
            .await
        {
            Ok(fleet_has) => {
                let new_view = shared
                    .config
                    .scaled(fleet_has)
                    .min(fleet_has)
                    .min(shared.config.scaled(capacity));
                quota.rebase(observed, new_view);
                if let Some(sync) = lock(&shared.quotas).get_mut(index) {
                    sync.view = new_view;
                }
            }
            Err(error) => {
                shared.degrade(&error);
                return;
            }
        }
    }
}
