//! The per-key buckets, queue and counters shared by every clone of the service.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::HeaderMap;
use tokio::time::Instant;

use crate::bucket::{Shortfall, TokenBucket};
use crate::estimate::TokenEstimator;
use crate::headers::{RateLimitWindow, RateLimits};
use crate::model::Model;
use crate::sync::lock;
use crate::usage::Usage;

use super::{BucketSnapshot, PacingLimits, PacingSnapshot};

/// An exact input-token counter: the request body in, the count out.
pub(crate) type CountTokens = Arc<dyn Fn(&[u8]) -> Option<u64> + Send + Sync>;

/// Settings fixed when the layer is built.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) limits: HashMap<Model, PacingLimits>,
    /// Model -> the name of the group whose buckets it spends from.
    pub(crate) shares: HashMap<Model, Model>,
    pub(crate) max_queued: usize,
    pub(crate) queue_timeout: Option<Duration>,
    pub(crate) count_tokens: Option<CountTokens>,
    pub(crate) max_keys: usize,
    /// Shares every key's buckets with the fleet.
    #[cfg(feature = "redis")]
    pub(crate) fleet: Option<crate::fleet::Fleet>,
    /// Whether keys record metrics (the `metrics` feature's switch).
    #[cfg(feature = "metrics")]
    pub(crate) metrics: bool,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("limits", &self.limits)
            .field("shares", &self.shares)
            .field("max_queued", &self.max_queued)
            .field("queue_timeout", &self.queue_timeout)
            .field("count_tokens", &self.count_tokens.is_some())
            .field("max_keys", &self.max_keys)
            .finish()
    }
}

/// The key that learned names beyond `max_keys`, and requests with no
/// model, share.
pub(crate) const OTHER_KEY: &str = "<other>";

use crate::model::MAX_KEY_LEN;

/// The three buckets, in the order of [`Amounts`].
pub(crate) const BUCKETS: [&str; 3] = ["requests", "input-tokens", "output-tokens"];

/// What one call takes from each bucket: 1 request, its input tokens, its
/// `max_tokens`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Amounts(pub(crate) [u64; 3]);

/// What a call really took: for each bucket, the amount, or `None` when the
/// key had no such bucket then (nothing to give back or correct).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Taken(pub(crate) [Option<u64>; 3]);

/// Why a call cannot take its amounts now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Short {
    /// The longest wait among the buckets, and which bucket.
    Wait(&'static str, Duration),
    /// Larger than the whole of this bucket.
    TooLarge(&'static str),
}

/// Every key's state by name, a group's members included (each pointing at
/// its group's state).
type KeyMap = HashMap<Model, Arc<KeyState>, foldhash::fast::RandomState>;

/// Every key's state.
#[derive(Debug)]
pub(crate) struct Pacer {
    pub(crate) config: Config,
    /// What lookups read: the key map, published again whole after each new
    /// key, read with no lock, so calls on several cores do not serialise on
    /// a table. Keys are never removed (learned ones are bounded by
    /// `max_keys`), so it is copied at most that many times.
    published: ArcSwap<KeyMap>,
    /// Taken to add a learned key; holds how many were learned.
    learning: Mutex<usize>,
    other: Arc<KeyState>,
}

impl Pacer {
    pub(crate) fn new(config: Config) -> Self {
        let other = Arc::new(KeyState::new(
            Model::new(OTHER_KEY),
            PacingLimits::default(),
            &config,
        ));
        share_with_fleet(&config, &other);
        // Configured keys and groups exist from the start: their lookups
        // never take the learning lock.
        let mut map = KeyMap::default();
        let groups = config.shares.values().chain(config.limits.keys());
        for key in groups {
            map.entry(key.clone()).or_insert_with(|| {
                let limits = config.limits.get(key).copied().unwrap_or_default();
                let state = Arc::new(KeyState::new(key.clone(), limits, &config));
                share_with_fleet(&config, &state);
                state
            });
        }
        for (member, group) in &config.shares {
            let state = Arc::clone(&map[group]);
            map.insert(member.clone(), state);
        }
        Self {
            config,
            published: ArcSwap::from_pointee(map),
            learning: Mutex::new(0),
            other,
        }
    }

    /// The state of `model`'s key: its group's when it shares one, its own
    /// when configured or among the first `max_keys` learned names, else
    /// the shared `<other>` key.
    pub(crate) fn key(&self, model: Option<Model>) -> Arc<KeyState> {
        let Some(model) = model else {
            return Arc::clone(&self.other);
        };
        if let Some(state) = self.published.load().get(model.as_str()) {
            return Arc::clone(state);
        }
        self.learn(model)
    }

    /// A name not seen yet: a key of its own while fewer than `max_keys`
    /// were learned, else `<other>`.
    #[cold]
    fn learn(&self, model: Model) -> Arc<KeyState> {
        let mut learned = lock(&self.learning);
        let published = self.published.load_full();
        if let Some(state) = published.get(model.as_str()) {
            return Arc::clone(state);
        }
        if *learned >= self.config.max_keys
            || model.as_str().len() > MAX_KEY_LEN
            || model.as_str() == OTHER_KEY
        {
            return Arc::clone(&self.other);
        }
        *learned += 1;
        let state = Arc::new(KeyState::new(
            model.clone(),
            PacingLimits::default(),
            &self.config,
        ));
        share_with_fleet(&self.config, &state);
        let mut map = KeyMap::clone(&published);
        map.insert(model, Arc::clone(&state));
        self.published.store(Arc::new(map));
        state
    }

    pub(crate) fn snapshot(&self) -> Vec<PacingSnapshot> {
        let published = self.published.load_full();
        // A group's members point at its state: each state once, by its own name.
        let mut states: Vec<&Arc<KeyState>> = published
            .iter()
            .filter(|(name, state)| **name == state.key)
            .map(|(_, state)| state)
            .collect();
        states.push(&self.other);
        let now = Instant::now();
        let mut snapshots: Vec<PacingSnapshot> = states
            .iter()
            .map(|state| state.snapshot(now))
            .filter(|s| s.key.as_str() != OTHER_KEY || s.requests_sent > 0 || s.queued > 0)
            .collect();
        snapshots.sort_by(|a, b| a.key.as_str().cmp(b.key.as_str()));
        snapshots
    }
}

/// This worker's share of each limit's refill: its fleet's, or all of it.
fn fleet_share(config: &Config) -> f64 {
    #[cfg(feature = "redis")]
    if let Some(fleet) = &config.fleet {
        return fleet.share();
    }
    let _ = config;
    1.0
}

/// Registers a key's buckets with the fleet, when there is one.
fn share_with_fleet(config: &Config, state: &Arc<KeyState>) {
    #[cfg(feature = "redis")]
    if let Some(fleet) = &config.fleet {
        let synced: Arc<dyn crate::fleet::SyncedBuckets> = state.clone();
        fleet.register_buckets(state.key.as_str(), Arc::downgrade(&synced));
    }
    let _ = (config, state);
}

/// One key: its buckets, estimator, queue and counters behind one lock, and
/// the notification its waiting calls sleep on.
#[derive(Debug)]
pub(crate) struct KeyState {
    pub(crate) key: Model,
    pub(crate) inner: Mutex<Buckets>,
    /// Keys are never removed and are bounded by `max_keys`: so are these.
    #[cfg(feature = "metrics")]
    pub(crate) meters: Option<crate::metrics::PacingMeters>,
}

/// What the lock of a key guards.
#[derive(Debug)]
pub(crate) struct Buckets {
    /// Requests, input tokens, output tokens per minute; `None` until
    /// configured or learned (an unknown limit is not paced).
    pub(crate) buckets: [Option<TokenBucket>; 3],
    /// Until when a 429 paused the key: kept apart from the buckets so
    /// that a key with no known limit (a 429 without `anthropic-ratelimit-*`
    /// headers, from a proxy) pauses too.
    paused_until: Option<Instant>,
    pub(crate) estimator: TokenEstimator,
    /// This worker's share of the refill (1 unless a fleet shares the buckets).
    share: f64,
    /// For the fleet: a 429's pause to publish, and the lowest `remaining`
    /// each bucket's responses reported since the last sync.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    fleet_pause: Option<Instant>,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    remaining: [Option<u64>; 3],
    /// Tickets of the waiting calls, first come first served.
    /// Waiting tickets in order, each with the waker of its call: only the
    /// head is woken (when the buckets change, or when it becomes the head),
    /// so a long queue costs one wake-up per event, not one per waiter.
    pub(crate) queue: VecDeque<Queued>,
    next_ticket: u64,
    /// Tokens reserved by calls not settled yet (input, output).
    pub(crate) reserved: [u64; 2],
    pub(crate) sent: u64,
    pub(crate) waits: u64,
    pub(crate) waited: Duration,
    pub(crate) longest_wait: Duration,
    pub(crate) rejected: u64,
    pub(crate) timed_out: u64,
    pub(crate) too_large: u64,
    /// Sums over settled calls of estimated and reported input tokens.
    pub(crate) estimated_input: u64,
    pub(crate) reported_input: u64,
    /// (estimate - reported) / reported of the last settled call.
    pub(crate) last_estimate_error: Option<f64>,
}

impl KeyState {
    fn new(key: Model, limits: PacingLimits, config: &Config) -> Self {
        let now = Instant::now();
        let share = fleet_share(config);
        let bucket = |limit: Option<u64>| limit.map(|limit| shared_bucket(limit, now, share));
        Self {
            #[cfg(feature = "metrics")]
            meters: config
                .metrics
                .then(|| crate::metrics::PacingMeters::new(key.as_str())),
            key,
            inner: Mutex::new(Buckets {
                buckets: [
                    bucket(limits.requests_per_minute),
                    bucket(limits.input_tokens_per_minute),
                    bucket(limits.output_tokens_per_minute),
                ],
                paused_until: None,
                estimator: TokenEstimator::new(),
                share,
                fleet_pause: None,
                remaining: [None; 3],
                queue: VecDeque::new(),
                next_ticket: 0,
                reserved: [0; 2],
                sent: 0,
                waits: 0,
                waited: Duration::ZERO,
                longest_wait: Duration::ZERO,
                rejected: 0,
                timed_out: 0,
                too_large: 0,
                estimated_input: 0,
                reported_input: 0,
                last_estimate_error: None,
            }),
        }
    }

    /// Publishes what is left of each bucket (after a call took its share)
    /// and, when it waited, how long.
    pub(crate) fn measure(&self, buckets: &mut Buckets, now: Instant, waited: Option<Duration>) {
        #[cfg(feature = "metrics")]
        if let Some(meters) = &self.meters {
            for (bucket, gauge) in buckets.buckets.iter_mut().zip(&meters.fill) {
                if let Some(bucket) = bucket {
                    let capacity = bucket.capacity().max(1) as f64;
                    gauge.set((bucket.available(now) / capacity).clamp(0.0, 1.0));
                }
            }
            if let Some(waited) = waited {
                meters.wait.record(waited.as_secs_f64());
            }
        }
        let _ = (buckets, now, waited);
    }

    /// Wakes the head of the queue, if any: it may go earlier, or, new at
    /// the head, must compute its own wait.
    pub(crate) fn wake(&self, buckets: &Buckets) {
        if let Some(Queued {
            waker: Some(waker), ..
        }) = buckets.queue.front()
        {
            waker.wake_by_ref();
        }
    }

    /// Corrects the buckets with a response's `anthropic-ratelimit-*`
    /// windows (creating a bucket the first time its limit is seen), and on
    /// a rate-limited response with a server delay, pauses them all until
    /// then: every clone waits, not just the call that got the 429.
    pub(crate) fn observe(&self, headers: &HeaderMap, rate_limited: Option<Duration>) {
        let limits = RateLimits::from_headers(headers);
        let windows = [limits.requests, limits.input_tokens, limits.output_tokens];
        if rate_limited.is_none() && windows.iter().all(RateLimitWindow::is_empty) {
            return;
        }
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut buckets = lock(&self.inner);
        let share = buckets.share;
        let Buckets {
            buckets: all,
            remaining,
            ..
        } = &mut *buckets;
        for ((bucket, window), lowest) in all.iter_mut().zip(&windows).zip(remaining) {
            if window.is_empty() {
                continue;
            }
            if let Some(left) = window.remaining {
                *lowest = Some(lowest.map_or(left, |lowest| lowest.min(left)));
            }
            match bucket {
                Some(bucket) => bucket.observe(window, wall, now),
                None => {
                    if let Some(limit) = window.limit.filter(|&limit| limit > 0) {
                        let mut learned = shared_bucket(limit, now, share);
                        learned.observe(window, wall, now);
                        *bucket = Some(learned);
                    }
                }
            }
        }
        if let Some(delay) = rate_limited {
            // At most a minute: the buckets refill fully in one, and a
            // queued call has its own timeout for anything longer.
            let until = now + delay.min(Duration::from_secs(60));
            buckets.fleet_pause = Some(buckets.fleet_pause.map_or(until, |p| p.max(until)));
            for bucket in buckets.buckets.iter_mut().flatten() {
                bucket.pause_until(until, now);
            }
            buckets.paused_until = Some(buckets.paused_until.map_or(until, |p| p.max(until)));
        }
        self.wake(&buckets);
    }

    fn snapshot(&self, now: Instant) -> PacingSnapshot {
        let mut b = lock(&self.inner);
        let bucket = |bucket: &mut Option<TokenBucket>| {
            bucket.as_mut().map(|bucket| BucketSnapshot {
                capacity: bucket.capacity(),
                available: bucket.available(now),
            })
        };
        let [requests, input, output] = &mut b.buckets;
        let (requests, input_tokens, output_tokens) =
            (bucket(requests), bucket(input), bucket(output));
        PacingSnapshot {
            key: self.key.clone(),
            requests,
            input_tokens,
            output_tokens,
            reserved_input_tokens: b.reserved[0],
            reserved_output_tokens: b.reserved[1],
            queued: b.queue.len(),
            requests_sent: b.sent,
            waits: b.waits,
            waited: b.waited,
            longest_wait: b.longest_wait,
            rejected: b.rejected,
            timed_out: b.timed_out,
            too_large: b.too_large,
            bytes_per_token: b.estimator.bytes_per_token(),
            estimated_input_tokens: b.estimated_input,
            reported_input_tokens: b.reported_input,
            last_estimate_error: b.last_estimate_error,
        }
    }
}

impl Buckets {
    /// What the input-tokens bucket holds when full, when there is one.
    pub(crate) fn input_capacity(&self) -> Option<u64> {
        self.buckets[1].as_ref().map(TokenBucket::capacity)
    }

    /// How long until `amounts` fit in every bucket, without taking anything.
    pub(crate) fn shortfall(&mut self, amounts: Amounts, now: Instant) -> Option<Short> {
        let mut longest: Option<(&'static str, Duration)> = None;
        match self.paused_until {
            Some(until) if now < until => longest = Some((BUCKETS[0], until - now)),
            Some(_) => self.paused_until = None,
            None => {}
        }
        for ((bucket, amount), name) in self.buckets.iter_mut().zip(amounts.0).zip(BUCKETS) {
            let Some(bucket) = bucket else { continue };
            match bucket.fits(amount, now) {
                Ok(()) => {}
                Err(Shortfall::TooLarge { .. }) => return Some(Short::TooLarge(name)),
                Err(Shortfall::Wait(wait)) => {
                    if longest.is_none_or(|(_, longest)| wait > longest) {
                        longest = Some((name, wait));
                    }
                }
            }
        }
        longest.map(|(name, wait)| Short::Wait(name, wait))
    }

    /// Takes `amounts` from every bucket, or nothing when one is short.
    pub(crate) fn try_take(&mut self, amounts: Amounts, now: Instant) -> Result<Taken, Short> {
        if let Some(short) = self.shortfall(amounts, now) {
            return Err(short);
        }
        let mut taken = Taken::default();
        for ((bucket, amount), slot) in self.buckets.iter_mut().zip(amounts.0).zip(&mut taken.0) {
            if let Some(bucket) = bucket {
                // Fits: checked above at the same instant.
                bucket.charge(amount, now);
                *slot = Some(amount);
            }
        }
        // Saturating: `max_tokens` is the client's number, u64::MAX included.
        self.reserved[0] = self.reserved[0].saturating_add(amounts.0[1]);
        self.reserved[1] = self.reserved[1].saturating_add(amounts.0[2]);
        self.sent += 1;
        Ok(taken)
    }

    /// A new ticket at the back of the queue, or `None` when it is full.
    pub(crate) fn enqueue(&mut self, max_queued: usize, amounts: Amounts) -> Option<u64> {
        if self.queue.len() >= max_queued {
            self.rejected += 1;
            return None;
        }
        let ticket = self.next_ticket;
        self.next_ticket = self.next_ticket.wrapping_add(1);
        self.queue.push_back(Queued {
            ticket,
            waker: None,
            amounts,
            since: SystemTime::now(),
        });
        Some(ticket)
    }

    /// Removes `ticket` from the queue; whether it was the head.
    pub(crate) fn leave(&mut self, ticket: u64) -> bool {
        match self.queue.iter().position(|queued| queued.ticket == ticket) {
            Some(at) => {
                self.queue.remove(at);
                at == 0
            }
            None => false,
        }
    }

    /// Whether `ticket` is at the head, after keeping `waker` as its wake-up
    /// (under the same lock as the look at the buckets, so no wake-up
    /// between the look and the wait is lost).
    pub(crate) fn register(&mut self, ticket: u64, waker: &Waker) -> bool {
        let Some(at) = self.queue.iter().position(|queued| queued.ticket == ticket) else {
            return false;
        };
        let kept = &mut self.queue[at].waker;
        if !kept.as_ref().is_some_and(|kept| kept.will_wake(waker)) {
            *kept = Some(waker.clone());
        }
        at == 0
    }

    /// Counts a wait that ended with the call going on.
    pub(crate) fn record_wait(&mut self, waited: Duration) {
        self.waits += 1;
        self.waited = self.waited.saturating_add(waited);
        self.longest_wait = self.longest_wait.max(waited);
    }

    /// Gives back the token reservations of a call that used none (it
    /// failed before a response, or the response is an error).
    pub(crate) fn give_back(&mut self, amounts: Amounts, taken: Taken, now: Instant) {
        for index in [1, 2] {
            if let (Some(bucket), Some(amount)) = (&mut self.buckets[index], taken.0[index]) {
                bucket.put_back(amount, now);
            }
        }
        self.unreserve(amounts);
    }

    fn unreserve(&mut self, amounts: Amounts) {
        self.reserved[0] = self.reserved[0].saturating_sub(amounts.0[1]);
        self.reserved[1] = self.reserved[1].saturating_sub(amounts.0[2]);
    }

    /// Corrects a call's reservations with the usage it reported; `None`
    /// (nothing known) keeps them, which errs on the safe side.
    pub(crate) fn settle(&mut self, call: &Settle, usage: Option<Usage>) {
        self.unreserve(call.amounts);
        let Some(usage) = usage else { return };
        // Read only here: most settles (a body dropped unread) need no clock.
        let now = Instant::now();
        if usage.input_tokens.is_some() {
            let charged = usage.input_charged();
            if let (Some(bucket), Some(taken)) = (&mut self.buckets[1], call.taken.0[1]) {
                if charged < taken {
                    bucket.put_back(taken - charged, now);
                } else {
                    bucket.charge(charged - taken, now);
                }
            }
            let total = usage.input_total();
            self.estimator.observe(call.body_len, total);
            if total > 0 {
                // Saturating: the counts are the upstream's numbers.
                self.estimated_input = self.estimated_input.saturating_add(call.estimated);
                self.reported_input = self.reported_input.saturating_add(total);
                self.last_estimate_error =
                    Some((call.estimated as f64 - total as f64) / total as f64);
            }
        }
        if let (Some(output), Some(bucket), Some(taken)) =
            (usage.output_tokens, &mut self.buckets[2], call.taken.0[2])
        {
            if output < taken {
                bucket.put_back(taken - output, now);
            } else {
                bucket.charge(output - taken, now);
            }
        }
    }
}

#[cfg(feature = "redis")]
impl KeyState {
    fn alone_now(&self) {
        let now = Instant::now();
        let mut buckets = lock(&self.inner);
        let share = buckets.share;
        for bucket in buckets.buckets.iter_mut().flatten() {
            bucket.refill_share(share, now);
        }
        self.wake(&buckets);
    }
}

/// A waiting call in a key's queue.
#[derive(Debug)]
pub(crate) struct Queued {
    ticket: u64,
    /// Its call's waker, once it was polled.
    waker: Option<Waker>,
    /// What it takes: at the head, what the fleet is told it needs.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    amounts: Amounts,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    since: SystemTime,
}

/// A per-minute bucket refilled at `share` of its rate.
fn shared_bucket(limit: u64, now: Instant, share: f64) -> TokenBucket {
    #[allow(unused_mut)]
    let mut bucket = TokenBucket::per_minute(limit, now);
    #[cfg(feature = "redis")]
    if share < 1.0 {
        bucket.start_shared(now);
    }
    let _ = share;
    bucket
}

#[cfg(feature = "redis")]
impl crate::fleet::SyncedBuckets for KeyState {
    fn take_sync(&self, share: f64) -> crate::fleet::BucketsSync {
        let now = Instant::now();
        let mut buckets = lock(&self.inner);
        let mut sync = crate::fleet::BucketsSync {
            share,
            ..Default::default()
        };
        for (i, bucket) in buckets.buckets.iter_mut().enumerate() {
            if let Some(bucket) = bucket {
                sync.buckets[i] = Some((bucket.capacity(), bucket.period()));
                sync.returned[i] = bucket.lend_back(now);
            }
        }
        sync.remaining = std::mem::take(&mut buckets.remaining);
        sync.pause = buckets
            .fleet_pause
            .take()
            .map_or(Duration::ZERO, |until| until.saturating_duration_since(now));
        sync.need = buckets.queue.front().map(|head| {
            let since = head
                .since
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_millis() as u64);
            let mut need = [0u64; 3];
            for queued in &buckets.queue {
                for (total, amount) in need.iter_mut().zip(queued.amounts.0) {
                    *total = total.saturating_add(amount);
                }
            }
            (need, since)
        });
        sync
    }

    fn alone(&self) {
        self.alone_now();
    }

    fn restore_sync(&self, sync: &crate::fleet::BucketsSync) {
        let now = Instant::now();
        let mut buckets = lock(&self.inner);
        for (bucket, returned) in buckets.buckets.iter_mut().zip(sync.returned) {
            if let Some(bucket) = bucket {
                bucket.receive(returned, now);
            }
        }
    }

    fn apply(&self, view: crate::fleet::BucketsView) {
        let now = Instant::now();
        let mut buckets = lock(&self.inner);
        for (bucket, lent) in buckets.buckets.iter_mut().zip(view.lent) {
            if let Some(bucket) = bucket {
                // The fleet's bucket refills; this one only holds what it lends.
                bucket.refill_share(0.0, now);
                bucket.receive(lent, now);
            }
        }
        if !view.paused_for.is_zero() {
            let until = now + view.paused_for.min(Duration::from_secs(60));
            for bucket in buckets.buckets.iter_mut().flatten() {
                bucket.pause_until(until, now);
            }
            buckets.paused_until = Some(buckets.paused_until.map_or(until, |p| p.max(until)));
        }
        // The head may fit now, or must wait for what the fleet left it.
        self.wake(&buckets);
    }
}

/// What settling a call needs to know about it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settle {
    pub(crate) amounts: Amounts,
    pub(crate) taken: Taken,
    pub(crate) body_len: usize,
    /// The estimator's estimate (even when an exact counter was used): what
    /// the estimate error is measured on.
    pub(crate) estimated: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pacer(max_keys: usize) -> Pacer {
        let mut config = Config {
            limits: HashMap::new(),
            shares: HashMap::new(),
            max_queued: 8,
            queue_timeout: None,
            count_tokens: None,
            max_keys,
            #[cfg(feature = "redis")]
            fleet: None,
            #[cfg(feature = "metrics")]
            metrics: false,
        };
        let limits = PacingLimits {
            requests_per_minute: Some(5),
            ..PacingLimits::default()
        };
        config.limits.insert(Model::new("configured"), limits);
        config.limits.insert(Model::new("group"), limits);
        for model in ["a-1", "a-2"] {
            config.shares.insert(Model::new(model), Model::new("group"));
        }
        Pacer::new(config)
    }

    #[tokio::test]
    async fn keys_are_bounded_and_groups_share_one_state() {
        let pacer = pacer(2);
        let key = |name: &str| pacer.key(Some(Model::new(name)));
        assert!(Arc::ptr_eq(&key("a-1"), &key("a-2")));
        assert_eq!(key("a-1").key.as_str(), "group");
        assert_eq!(key("learned-1").key.as_str(), "learned-1");
        assert_eq!(key("learned-2").key.as_str(), "learned-2");
        // Past `max_keys`, and without a model: the shared key.
        assert_eq!(key("learned-3").key.as_str(), OTHER_KEY);
        assert_eq!(pacer.key(None).key.as_str(), OTHER_KEY);
        // Configured keys never count against the bound.
        assert_eq!(key("configured").key.as_str(), "configured");
        assert!(lock(&key("group").inner).buckets[0].is_some());
        assert!(lock(&key("learned-1").inner).buckets[0].is_none());
    }

    #[tokio::test]
    async fn taking_is_all_or_nothing_and_names_the_longest_wait() {
        let pacer = pacer(2);
        let state = pacer.key(Some(Model::new("configured")));
        let now = Instant::now();
        let mut buckets = lock(&state.inner);
        buckets.buckets[1] = Some(TokenBucket::per_minute(600, now));
        assert!(buckets.try_take(Amounts([5, 100, 0]), now).is_ok());
        // Requests are out (12 s for one); input tokens have room: nothing is taken.
        assert_eq!(
            buckets.try_take(Amounts([1, 100, 0]), now),
            Err(Short::Wait("requests", Duration::from_secs(12)))
        );
        assert_eq!(buckets.buckets[1].as_mut().unwrap().available(now), 500.0);
        assert_eq!(
            buckets.shortfall(Amounts([1, 700, 0]), now),
            Some(Short::TooLarge("input-tokens"))
        );
    }
}
