//! The store abstraction: the few atomic operations a fleet shares, whatever
//! engine holds them.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// A boxed future of a store operation.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// What a fleet shares, as atomic operations on named state.
///
/// [`RedisStore`](super::RedisStore) implements it on Redis or Valkey with
/// server-side scripts; implement it for another engine (or a test double
/// that fails on demand). Every operation must be atomic on the server: the
/// workers of a fleet call them concurrently. Times are measured by the
/// store (the server's clock), never by a worker's, so workers whose clocks
/// disagree still agree on when a lease expires.
///
/// ```
/// use tower_overload::fleet::{Acquired, BreakerEvent, BreakerState, BucketsSync, BucketsView, SharedStore, StoreError, StoreFuture};
/// # use std::time::Duration;
/// /// A store that is always down: every worker falls back to its local share.
/// #[derive(Debug)]
/// struct Down;
/// impl SharedStore for Down {
///     fn acquire<'a>(&'a self, _: &'a str, _: u32, _: Duration, _: &'a str) -> StoreFuture<'a, Acquired> {
///         Box::pin(async { Err(StoreError::new("down")) })
///     }
///     fn renew<'a>(&'a self, _: &'a str, _: &'a [String], _: Duration) -> StoreFuture<'a, u32> {
///         Box::pin(async { Err(StoreError::new("down")) })
///     }
///     fn release<'a>(&'a self, _: &'a str, _: &'a [String]) -> StoreFuture<'a, ()> {
///         Box::pin(async { Err(StoreError::new("down")) })
///     }
///     fn add_tokens<'a>(&'a self, _: &'a str, _: u32, _: i64) -> StoreFuture<'a, u32> {
///         Box::pin(async { Err(StoreError::new("down")) })
///     }
///     fn sync_breaker<'a>(&'a self, _: &'a str, _: &'a str, _: &'a str, _: Option<BreakerEvent>, _: bool, _: Duration) -> StoreFuture<'a, BreakerState> {
///         Box::pin(async { Err(StoreError::new("down")) })
///     }
///     fn sync_buckets<'a>(&'a self, _: &'a str, _: &'a str, _: &'a str, _: &'a BucketsSync) -> StoreFuture<'a, BucketsView> {
///         Box::pin(async { Err(StoreError::new("down")) })
///     }
///     fn ping(&self) -> StoreFuture<'_, ()> {
///         Box::pin(async { Err(StoreError::new("down")) })
///     }
/// }
/// ```
pub trait SharedStore: fmt::Debug + Send + Sync + 'static {
    /// Takes one of `cap` slots of the semaphore `key` for `holder` for
    /// `lease` (first dropping leases that expired), or says when the
    /// earliest lease expires.
    fn acquire<'a>(
        &'a self,
        key: &'a str,
        cap: u32,
        lease: Duration,
        holder: &'a str,
    ) -> StoreFuture<'a, Acquired>;

    /// Extends the leases of `holders` on `key` by `lease` from now, bringing
    /// back any the store lost (their calls are still in flight); how many
    /// had to be brought back.
    fn renew<'a>(
        &'a self,
        key: &'a str,
        holders: &'a [String],
        lease: Duration,
    ) -> StoreFuture<'a, u32>;

    /// Gives back the slots of `holders` on `key`.
    fn release<'a>(&'a self, key: &'a str, holders: &'a [String]) -> StoreFuture<'a, ()>;

    /// Adds `delta` (negative to take) to the token counter `key`, which
    /// starts full at `capacity` and stays within `0..=capacity`; the
    /// count after the change.
    fn add_tokens<'a>(&'a self, key: &'a str, capacity: u32, delta: i64) -> StoreFuture<'a, u32>;

    /// Publishes `event` (this worker's breaker for `key` opened, or its
    /// probe succeeded) and answers the fleet's breaker state; when the
    /// rest is over, the one worker allowed to probe is told so
    /// (`probe_is_yours`), holding the probe for `probe_ttl` at most. Only a
    /// worker that `wants_probe` (a call of its own is waiting for the
    /// model) may take the probe: an idle worker would keep it from others.
    fn sync_breaker<'a>(
        &'a self,
        key: &'a str,
        probe_key: &'a str,
        holder: &'a str,
        event: Option<BreakerEvent>,
        wants_probe: bool,
        probe_ttl: Duration,
    ) -> StoreFuture<'a, BreakerState>;

    /// Syncs a pacing key's three buckets (requests, input tokens, output
    /// tokens). The fleet's buckets refill; each worker's are lent tokens:
    /// a sync takes back what the worker held (a debt too), applies a
    /// 429's pause and the `remaining` the responses reported, records what
    /// the worker's queue needs, and lends it tokens again: a worker with
    /// calls waiting gets up to what they need, after the needs of workers
    /// whose head waits longer; a worker with none gets its `share` of what
    /// no queue needs. Answers the tokens lent and the pause left.
    fn sync_buckets<'a>(
        &'a self,
        key: &'a str,
        needs_key: &'a str,
        holder: &'a str,
        sync: &'a BucketsSync,
    ) -> StoreFuture<'a, BucketsView>;

    /// Whether the store answers.
    fn ping(&self) -> StoreFuture<'_, ()>;
}

/// One worker's news about a pacing key's buckets, for [`SharedStore::sync_buckets`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BucketsSync {
    /// Each bucket's capacity and refill period, `None` when the key has
    /// no such bucket.
    pub buckets: [Option<(u64, Duration)>; 3],
    /// What this worker held of each bucket, handed back (negative: a debt).
    pub returned: [f64; 3],
    /// The lowest `remaining` each bucket's responses reported.
    pub remaining: [Option<u64>; 3],
    /// A 429's pause, from now.
    pub pause: Duration,
    /// What this worker's waiting calls need of each bucket, and since
    /// when its head waits (milliseconds since the Unix epoch).
    pub need: Option<([u64; 3], u64)>,
    /// The worker's share of the fleet's limits.
    pub share: f64,
}

/// The store's answer to [`SharedStore::sync_buckets`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BucketsView {
    /// The tokens lent to this worker from each bucket.
    pub lent: [f64; 3],
    /// How long the key stays paused.
    pub paused_for: Duration,
}

/// What a worker's breaker did since it last synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerEvent {
    /// It opened (or its probe failed) for `rest`.
    Opened {
        /// How long the model rests.
        rest: Duration,
    },
    /// Its probe succeeded: the model is healthy again.
    Closed,
}

/// A model's breaker, as the fleet sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls use the model.
    Closed,
    /// The model rests for `remaining` more.
    Open {
        /// Until the rest is over.
        remaining: Duration,
        /// The rest it was given.
        rest: Duration,
    },
    /// The rest is over: one worker of the fleet probes the model.
    HalfOpen {
        /// Whether that worker is the one asking.
        probe_is_yours: bool,
        /// The last rest (a failed probe doubles it).
        rest: Duration,
    },
}

/// The answer of [`SharedStore::acquire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// The slot is held until the lease runs out or is released.
    Granted,
    /// Every slot is held; the earliest lease expires after this long.
    Full {
        /// Until the earliest lease expires (a release may come sooner).
        earliest_expiry: Duration,
    },
}

/// A store operation that failed: unreachable, slow, or an error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError {
    message: String,
}

impl StoreError {
    /// An error with this message.
    ///
    /// ```
    /// # use tower_overload::fleet::StoreError;
    /// assert_eq!(StoreError::new("timed out").to_string(), "fleet store: timed out");
    /// ```
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fleet store: {}", self.message)
    }
}

impl std::error::Error for StoreError {}
