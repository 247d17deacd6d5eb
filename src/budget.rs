//! A retry budget shared by every clone: retries stay a bounded fraction of traffic.
//!
//! Each first attempt [deposits](RetryBudget::deposit) `retry_ratio` of a
//! retry; each retry [withdraws](RetryBudget::withdraw) one whole retry and is
//! refused when the balance cannot pay. Deposits expire after `ttl`, so the
//! budget follows recent traffic, and a floor of `min_per_sec` retries per
//! second keeps low-traffic clients able to retry at all. These are the
//! semantics of Finagle's `RetryBudget` and tower's `TpsBudget`: with a ratio
//! of 0.2, a storm where every call fails costs the upstream at most about
//! 1.2 attempts per call, however many retries each call is allowed.
//!
//! The balance lives in ten time buckets spanning `ttl`, each one atomic word
//! (epoch and balance packed together), so deposits and withdrawals are
//! lock-free compare-and-swap loops. Time comes from [`tokio::time::Instant`],
//! so a paused test clock drives expiry; the `*_at` methods take the instant
//! explicitly for tests without a runtime.
//!
//! ```
//! use std::time::Duration;
//! use tower_overload::budget::RetryBudget;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // 20% of traffic, and at least 1 retry a second over a 10 s window.
//! let budget = RetryBudget::new(Duration::from_secs(10), 1, 0.2);
//! let shared = budget.clone();
//! for _ in 0..100 {
//!     shared.deposit();
//! }
//! let granted = (0..1000).filter(|_| budget.withdraw()).count();
//! assert_eq!(granted, 100 / 5 + 10); // the ratio's share, plus the floor's reserve
//! # }
//! ```

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

const BUCKETS: usize = 10;
/// Units per whole retry: deposits are fractions of a retry, in thousandths.
const RETRY_COST: i64 = 1000;
const MIN_TTL: Duration = Duration::from_millis(100);
const MAX_TTL: Duration = Duration::from_secs(3600);
const MAX_RATIO: f32 = 1000.0;

/// A retry budget; clones share one balance.
#[derive(Clone)]
pub struct RetryBudget {
    shared: Arc<Shared>,
}

struct Shared {
    origin: Instant,
    bucket_width: Duration,
    deposit_units: i64,
    reserve_units: i64,
    /// Each bucket packs the epoch it belongs to (high 32 bits) and its
    /// balance in units (low 32 bits, two's complement).
    buckets: [AtomicU64; BUCKETS],
}

impl RetryBudget {
    /// A budget over a window of `ttl` that grants `retry_ratio` retries per
    /// first attempt, plus `min_per_sec` retries per second regardless of traffic.
    ///
    /// Out-of-range settings are brought into range rather than rejected:
    /// `ttl` is clamped to 100 ms ..= 1 h, a negative or NaN `retry_ratio`
    /// reads as 0 (no retries beyond the floor) and one above 1000 as 1000.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_overload::budget::RetryBudget;
    /// let budget = RetryBudget::new(Duration::from_secs(10), 10, 0.2);
    /// assert_eq!(budget.ttl(), Duration::from_secs(10));
    /// ```
    pub fn new(ttl: Duration, min_per_sec: u32, retry_ratio: f32) -> Self {
        Self::new_at(Instant::now(), ttl, min_per_sec, retry_ratio)
    }

    /// [`new`](Self::new), with the instant the budget's clock starts at.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tokio::time::Instant;
    /// use tower_overload::budget::RetryBudget;
    /// let budget = RetryBudget::new_at(Instant::now(), Duration::from_secs(10), 0, 0.1);
    /// assert_eq!(budget.retry_ratio(), 0.1);
    /// ```
    pub fn new_at(origin: Instant, ttl: Duration, min_per_sec: u32, retry_ratio: f32) -> Self {
        let ttl = ttl.clamp(MIN_TTL, MAX_TTL);
        let ratio = if retry_ratio.is_nan() {
            0.0
        } else {
            retry_ratio.clamp(0.0, MAX_RATIO)
        };
        let reserve = i64::from(min_per_sec)
            .saturating_mul(RETRY_COST)
            .saturating_mul(ttl.as_millis() as i64)
            / 1000;
        Self {
            shared: Arc::new(Shared {
                origin,
                bucket_width: ttl / BUCKETS as u32,
                deposit_units: (f64::from(ratio) * RETRY_COST as f64).round() as i64,
                reserve_units: reserve,
                buckets: Default::default(),
            }),
        }
    }

    /// The window deposits live for.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::budget::RetryBudget;
    /// assert_eq!(RetryBudget::new(Duration::ZERO, 0, 0.2).ttl(), Duration::from_millis(100));
    /// ```
    pub fn ttl(&self) -> Duration {
        self.shared.bucket_width * BUCKETS as u32
    }

    /// Retries granted per first attempt, as configured (after clamping, to 1/1000).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::budget::RetryBudget;
    /// assert_eq!(RetryBudget::new(Duration::from_secs(1), 0, f32::NAN).retry_ratio(), 0.0);
    /// ```
    pub fn retry_ratio(&self) -> f32 {
        self.shared.deposit_units as f32 / RETRY_COST as f32
    }

    /// Records a first attempt, now.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # use std::time::Duration;
    /// # use tower_overload::budget::RetryBudget;
    /// let budget = RetryBudget::new(Duration::from_secs(10), 0, 1.0);
    /// budget.deposit();
    /// assert!(budget.withdraw());
    /// assert!(!budget.withdraw());
    /// # }
    /// ```
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    /// Asks for one retry, now; `false` means the budget is spent.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # use std::time::Duration;
    /// # use tower_overload::budget::RetryBudget;
    /// let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.5);
    /// assert!(!budget.withdraw(), "nothing deposited, no floor");
    /// # }
    /// ```
    pub fn withdraw(&self) -> bool {
        self.withdraw_at(Instant::now())
    }

    /// The retries that could be granted now (whole retries, rounded down).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # use std::time::Duration;
    /// # use tower_overload::budget::RetryBudget;
    /// let budget = RetryBudget::new(Duration::from_secs(10), 2, 0.2);
    /// assert_eq!(budget.available(), 20);
    /// # }
    /// ```
    pub fn available(&self) -> u64 {
        self.available_at(Instant::now())
    }

    /// [`deposit`](Self::deposit) at a given instant.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tokio::time::Instant;
    /// # use tower_overload::budget::RetryBudget;
    /// let start = Instant::now();
    /// let budget = RetryBudget::new_at(start, Duration::from_secs(10), 0, 1.0);
    /// budget.deposit_at(start);
    /// assert_eq!(budget.available_at(start + Duration::from_secs(5)), 1);
    /// assert_eq!(budget.available_at(start + Duration::from_secs(11)), 0, "expired");
    /// ```
    pub fn deposit_at(&self, now: Instant) {
        self.shared.add(now, self.shared.deposit_units);
    }

    /// [`withdraw`](Self::withdraw) at a given instant.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tokio::time::Instant;
    /// # use tower_overload::budget::RetryBudget;
    /// let start = Instant::now();
    /// let budget = RetryBudget::new_at(start, Duration::from_secs(10), 1, 0.0);
    /// let granted = (0..100).filter(|_| budget.withdraw_at(start)).count();
    /// assert_eq!(granted, 10, "the floor: 1 a second over 10 s");
    /// ```
    pub fn withdraw_at(&self, now: Instant) -> bool {
        // Check-then-act: concurrent withdrawals may overdraw by at most one
        // retry each, the same slack tower's TpsBudget accepts for being lock-free.
        if self.shared.balance(now) < RETRY_COST {
            return false;
        }
        self.shared.add(now, -RETRY_COST);
        true
    }

    /// [`available`](Self::available) at a given instant.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tokio::time::Instant;
    /// # use tower_overload::budget::RetryBudget;
    /// let start = Instant::now();
    /// let budget = RetryBudget::new_at(start, Duration::from_secs(10), 0, 0.5);
    /// budget.deposit_at(start);
    /// budget.deposit_at(start);
    /// assert_eq!(budget.available_at(start), 1);
    /// ```
    pub fn available_at(&self, now: Instant) -> u64 {
        (self.shared.balance(now).max(0) / RETRY_COST) as u64
    }
}

impl Shared {
    fn epoch(&self, now: Instant) -> u32 {
        let elapsed = now.saturating_duration_since(self.origin);
        // Epochs wrap after 2^32 buckets (over 13 years at the smallest ttl);
        // liveness is judged with wrapping arithmetic, so a wrap is harmless.
        (elapsed.as_nanos() / self.bucket_width.as_nanos().max(1)) as u32
    }

    fn add(&self, now: Instant, units: i64) {
        let epoch = self.epoch(now);
        let bucket = &self.buckets[epoch as usize % BUCKETS];
        let mut current = bucket.load(Ordering::Acquire);
        loop {
            let (bucket_epoch, balance) = unpack(current);
            let base = if bucket_epoch == epoch {
                i64::from(balance)
            } else {
                0
            };
            let next = pack(epoch, base.saturating_add(units));
            match bucket.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }

    fn balance(&self, now: Instant) -> i64 {
        let epoch = self.epoch(now);
        let live: i64 = self
            .buckets
            .iter()
            .map(|bucket| unpack(bucket.load(Ordering::Acquire)))
            .filter(|&(bucket_epoch, _)| {
                // Never-written buckets are epoch 0 with balance 0, so counting them is harmless.
                (epoch.wrapping_sub(bucket_epoch) as usize) < BUCKETS
            })
            .map(|(_, balance)| i64::from(balance))
            .sum();
        self.reserve_units + live
    }
}

fn pack(epoch: u32, balance: i64) -> u64 {
    let balance = balance.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32;
    (u64::from(epoch) << 32) | u64::from(balance as u32)
}

/// How retries are rationed across the calls of every clone.
#[derive(Debug, Clone)]
#[cfg(feature = "retry")]
pub(crate) enum Rationing {
    /// A fraction of traffic plus a floor (Finagle's / tower's budget).
    Budget(RetryBudget),
    /// A bucket of tokens that successes refill (the AWS SDKs' quota).
    Quota(RetryQuota),
}

#[cfg(feature = "retry")]
impl Rationing {
    /// Draws one retry's cost; false when the budget or quota refuses it.
    pub(crate) fn try_retry(&self, class: crate::classify::Class) -> bool {
        match self {
            Rationing::Budget(budget) => budget.withdraw(),
            Rationing::Quota(quota) => quota.try_retry(class),
        }
    }
}

fn unpack(word: u64) -> (u32, i32) {
    ((word >> 32) as u32, word as u32 as i32)
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ttl", &self.ttl())
            .field("retry_ratio", &self.retry_ratio())
            .field("reserve", &(self.shared.reserve_units / RETRY_COST))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[tokio::test(start_paused = true)]
    async fn retries_stay_a_fraction_of_traffic() {
        let budget = RetryBudget::new(S(10), 0, 0.2);
        let mut attempts = 0u32;
        // A full outage: every call fails and would like 10 retries.
        for _ in 0..1000 {
            budget.deposit();
            attempts += 1;
            for _ in 0..10 {
                if !budget.withdraw() {
                    break;
                }
                attempts += 1;
            }
            tokio::time::advance(Duration::from_millis(5)).await;
        }
        let amplification = f64::from(attempts) / 1000.0;
        assert!((1.19..=1.21).contains(&amplification), "{amplification}");
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_expire_with_the_window() {
        let budget = RetryBudget::new(S(10), 0, 1.0);
        for _ in 0..5 {
            budget.deposit();
        }
        assert_eq!(budget.available(), 5);
        tokio::time::advance(S(9)).await;
        assert_eq!(budget.available(), 5);
        tokio::time::advance(S(2)).await;
        assert_eq!(budget.available(), 0);
    }

    #[test]
    fn floor_refills_as_old_withdrawals_expire() {
        let start = Instant::now();
        let budget = RetryBudget::new_at(start, S(10), 1, 0.0);
        assert_eq!((0..50).filter(|_| budget.withdraw_at(start)).count(), 10);
        assert!(!budget.withdraw_at(start + S(5)));
        assert!(budget.withdraw_at(start + S(11)));
    }

    #[test]
    fn clones_share_one_balance() {
        let start = Instant::now();
        let budget = RetryBudget::new_at(start, S(10), 0, 1.0);
        let clone = budget.clone();
        clone.deposit_at(start);
        assert!(budget.withdraw_at(start));
        assert!(!clone.withdraw_at(start));
    }

    #[test]
    fn settings_are_clamped() {
        let budget = RetryBudget::new(Duration::from_secs(100_000), 0, -3.0);
        assert_eq!(budget.ttl(), S(3600));
        assert_eq!(budget.retry_ratio(), 0.0);
        assert_eq!(
            RetryBudget::new(S(1), 0, f32::INFINITY).retry_ratio(),
            1000.0
        );
        let huge = RetryBudget::new(S(3600), u32::MAX, 1000.0);
        assert!(huge.available() > 0);
    }

    #[test]
    fn bucket_balance_saturates_instead_of_wrapping() {
        let start = Instant::now();
        let budget = RetryBudget::new_at(start, S(10), 0, 1000.0);
        for _ in 0..10_000 {
            budget.deposit_at(start);
        }
        assert!(budget.available_at(start) > 2_000_000);
        assert_eq!(unpack(pack(7, i64::MIN)), (7, i32::MIN));
    }

    proptest::proptest! {
        #[test]
        fn grants_never_exceed_floor_plus_ratio(
            steps in proptest::collection::vec((0u32..20, 0u32..20, 0u64..3_000), 1..200),
            ratio_tenths in 0u32..20,
            min_per_sec in 0u32..5,
        ) {
            // Within one window (no expiry), grants are bounded by what was paid in.
            let start = Instant::now();
            let ratio = ratio_tenths as f32 / 10.0;
            let budget = RetryBudget::new_at(start, S(60), min_per_sec, ratio);
            let (mut deposits, mut granted) = (0u64, 0u64);
            let mut now = start;
            for (deposit, withdraw, step_ms) in steps {
                now += Duration::from_millis(step_ms / 100);
                for _ in 0..deposit { budget.deposit_at(now); }
                deposits += u64::from(deposit);
                granted += (0..withdraw).filter(|_| budget.withdraw_at(now)).count() as u64;
            }
            let reserve = u64::from(min_per_sec) * 60;
            let earned = deposits * u64::from(ratio_tenths) / 10;
            proptest::prop_assert!(granted <= reserve + earned, "{granted} > {reserve} + {earned}");
        }
    }

    #[test]
    fn concurrent_use_never_overdraws_more_than_the_threads() {
        let start = Instant::now();
        let budget = RetryBudget::new_at(start, S(10), 0, 0.5);
        let threads = 4;
        std::thread::scope(|scope| {
            for _ in 0..threads {
                let budget = budget.clone();
                scope.spawn(move || {
                    for _ in 0..10_000 {
                        budget.deposit_at(start);
                    }
                });
            }
        });
        assert_eq!(budget.available_at(start), 20_000);
        let granted = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    while budget.withdraw_at(start) {
                        granted.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        let granted = granted.into_inner();
        assert!((20_000..20_000 + threads).contains(&granted), "{granted}");
    }
}

/// A retry quota in the style of the AWS SDKs' standard retry mode: a bucket
/// of tokens shared by every clone, from which each retry takes a few (more
/// for a timeout), and to which each success gives back.
///
/// With the defaults (500 tokens, 5 per retry, 10 per timeout retry, 1 back
/// per first-try success, the cost back when a retry succeeds), a client
/// can retry about 100 times in a row before the bucket is empty. In a full
/// outage nothing comes back, so after those retries every call is tried
/// once: the longer the storm, the closer the upstream's load gets to one
/// attempt per call. When calls succeed again, retries come back with them.
///
/// ```
/// use tower_overload::budget::RetryQuota;
/// use tower_overload::classify::Class;
///
/// let quota = RetryQuota::new(20, 5, 10);
/// assert!(quota.try_retry(Class::Overloaded));
/// assert!(quota.try_retry(Class::Timeout));
/// assert!(!quota.try_retry(Class::Timeout), "5 tokens left, a timeout retry costs 10");
/// quota.on_success(None);
/// assert_eq!(quota.available(), 6);
/// ```
#[derive(Clone)]
pub struct RetryQuota {
    shared: Arc<QuotaShared>,
}

struct QuotaShared {
    capacity: u32,
    retry_cost: u32,
    timeout_cost: u32,
    tokens: AtomicU64,
}

impl Default for RetryQuota {
    fn default() -> Self {
        Self::new(500, 5, 10)
    }
}

impl RetryQuota {
    /// A full bucket of `capacity` tokens; a retry costs `retry_cost`, a
    /// retry after a timeout or transport failure `timeout_cost`.
    ///
    /// ```
    /// # use tower_overload::budget::RetryQuota;
    /// let quota = RetryQuota::new(500, 5, 10);
    /// assert_eq!(quota.available(), 500);
    /// ```
    pub fn new(capacity: u32, retry_cost: u32, timeout_cost: u32) -> Self {
        Self {
            shared: Arc::new(QuotaShared {
                capacity,
                retry_cost,
                timeout_cost,
                tokens: AtomicU64::new(u64::from(capacity)),
            }),
        }
    }

    /// Tokens left.
    ///
    /// ```
    /// # use tower_overload::budget::RetryQuota;
    /// assert_eq!(RetryQuota::default().available(), 500);
    /// ```
    pub fn available(&self) -> u32 {
        self.shared.tokens.load(Ordering::Acquire) as u32
    }

    /// What a retry after an outcome of `class` costs.
    ///
    /// ```
    /// # use tower_overload::{budget::RetryQuota, classify::Class};
    /// assert_eq!(RetryQuota::default().cost(Class::Timeout), 10);
    /// assert_eq!(RetryQuota::default().cost(Class::Overloaded), 5);
    /// ```
    pub fn cost(&self, class: crate::classify::Class) -> u32 {
        use crate::classify::Class;
        match class {
            Class::Timeout | Class::Transport => self.shared.timeout_cost,
            _ => self.shared.retry_cost,
        }
    }

    /// Takes the cost of one retry after an outcome of `class`; `false`
    /// (and nothing taken) when the bucket cannot pay.
    ///
    /// ```
    /// # use tower_overload::{budget::RetryQuota, classify::Class};
    /// let quota = RetryQuota::new(4, 5, 10);
    /// assert!(!quota.try_retry(Class::Overloaded));
    /// ```
    pub fn try_retry(&self, class: crate::classify::Class) -> bool {
        let cost = u64::from(self.cost(class));
        self.shared
            .tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tokens| {
                tokens.checked_sub(cost)
            })
            .is_ok()
    }

    /// Gives back the cost of a retry after `class` that was granted but
    /// never sent (the call stopped during its backoff). Never past the capacity.
    ///
    /// ```
    /// # use tower_overload::{budget::RetryQuota, classify::Class};
    /// let quota = RetryQuota::new(10, 5, 10);
    /// assert!(quota.try_retry(Class::Overloaded));
    /// quota.refund(Class::Overloaded);
    /// assert_eq!(quota.available(), 10);
    /// ```
    pub fn refund(&self, class: crate::classify::Class) {
        self.give_back(u64::from(self.cost(class)));
    }

    fn give_back(&self, tokens: u64) {
        let capacity = u64::from(self.shared.capacity);
        // Full, as it is between storms: every success would otherwise write
        // the shared counter, a cache line bounced between the cores.
        if self.shared.tokens.load(Ordering::Relaxed) >= capacity {
            return;
        }
        let _ = self
            .shared
            .tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                Some((held + tokens).min(capacity))
            });
    }

    /// Fleet sync: sets the tokens to `view` plus whatever changed since
    /// they were read as `observed` (spending and refills made meanwhile
    /// are kept, to be sent at the next sync), within the capacity.
    #[cfg(feature = "redis")]
    pub(crate) fn rebase(&self, observed: u32, view: u32) {
        let capacity = i64::from(self.shared.capacity);
        let _ = self
            .shared
            .tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                let since = now as i64 - i64::from(observed);
                Some((i64::from(view) + since).clamp(0, capacity) as u64)
            });
    }

    /// The parameters: capacity, retry cost, timeout cost.
    #[cfg(all(feature = "redis", feature = "retry"))]
    pub(crate) fn parameters(&self) -> (u32, u32, u32) {
        (
            self.shared.capacity,
            self.shared.retry_cost,
            self.shared.timeout_cost,
        )
    }

    /// A call succeeded. `retried_after` is the class whose retry led to the
    /// success (its cost comes back), or `None` for a first-try success (one
    /// token comes back). Never past the capacity.
    ///
    /// ```
    /// # use tower_overload::{budget::RetryQuota, classify::Class};
    /// let quota = RetryQuota::new(10, 5, 10);
    /// assert!(quota.try_retry(Class::Overloaded));
    /// quota.on_success(Some(Class::Overloaded));
    /// assert_eq!(quota.available(), 10);
    /// ```
    pub fn on_success(&self, retried_after: Option<crate::classify::Class>) {
        self.give_back(u64::from(retried_after.map_or(1, |class| self.cost(class))));
    }
}

impl fmt::Debug for RetryQuota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryQuota")
            .field("available", &self.available())
            .field("capacity", &self.shared.capacity)
            .field("retry_cost", &self.shared.retry_cost)
            .field("timeout_cost", &self.shared.timeout_cost)
            .finish()
    }
}

#[cfg(test)]
mod quota_tests {
    use super::*;
    use crate::classify::Class;

    #[test]
    fn a_full_outage_drains_it_then_every_call_is_tried_once() {
        let quota = RetryQuota::default();
        let retries = (0..10_000)
            .filter(|_| quota.try_retry(Class::Overloaded))
            .count();
        assert_eq!(retries, 100);
        assert_eq!(quota.available(), 0);
        for _ in 0..5 {
            quota.on_success(None);
        }
        assert!(quota.try_retry(Class::Overloaded));
        assert!(!quota.try_retry(Class::Overloaded));
    }

    #[test]
    fn clones_share_it_and_it_never_overflows() {
        let quota = RetryQuota::new(10, 5, 10);
        let clone = quota.clone();
        assert!(clone.try_retry(Class::ServerError));
        assert_eq!(quota.available(), 5);
        for _ in 0..100 {
            quota.on_success(Some(Class::Timeout));
        }
        assert_eq!(quota.available(), 10);
    }
}
