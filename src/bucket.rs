//! A token bucket that refills continuously, as the API's rate limits do.
//!
//! The API limits an organisation per model class in requests, input tokens
//! and output tokens per minute, each "a token bucket that refills
//! continuously (not a fixed window)". [`TokenBucket`] is that bucket on the
//! client side: the pure arithmetic a pacer runs before sending (does this
//! call fit now, and if not, when?), corrected by what the responses say
//! (`anthropic-ratelimit-*` headers) and by what calls really used.
//!
//! No clock of its own: every method takes `now`, so the same code runs on
//! a paused clock in tests and on the real one in production.
//!
//! ```
//! use std::time::Duration;
//! use tokio::time::Instant;
//! use tower_overload::bucket::{Shortfall, TokenBucket};
//!
//! let start = Instant::now();
//! let mut itpm = TokenBucket::per_minute(30_000, start);
//! assert!(itpm.try_take(20_000, start).is_ok());
//! // 10,000 left; 15,000 more fit after 10 s of refill at 500 tokens a second.
//! assert_eq!(itpm.try_take(15_000, start), Err(Shortfall::Wait(Duration::from_secs(10))));
//! assert!(itpm.try_take(15_000, start + Duration::from_secs(10)).is_ok());
//! // More than the whole bucket never fits.
//! assert_eq!(itpm.try_take(40_000, start), Err(Shortfall::TooLarge { capacity: 30_000 }));
//! ```

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::headers::RateLimitWindow;

/// How soon a bucket lent by a fleet (no refill of its own) asks again.
const LENT_RECHECK: Duration = Duration::from_millis(100);

/// Why an amount cannot be taken now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortfall {
    /// It fits after this much refill (or after a pause ends).
    Wait(Duration),
    /// It is more than the whole bucket holds: it never fits.
    TooLarge {
        /// What the bucket holds when full.
        capacity: u64,
    },
}

/// A bucket of `capacity` tokens refilled at `capacity` per period.
///
/// Its level may go below zero: a call that used more than it reserved is
/// charged in full (down to a debt of one whole bucket), and the calls
/// after it wait for the refill to pay that debt, as the API's own bucket
/// would make them.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    period: Duration,
    level: f64,
    /// Tokens refilled per second: `capacity / period`, kept so that the
    /// refill on every call does no division.
    per_second: f64,
    /// The share of the refill this bucket gets itself: 1 alone, a
    /// worker's share while its fleet's store is down, 0 while the fleet
    /// lends it tokens (the fleet's bucket refills instead).
    refill_share: f64,
    /// Tokens in the level the fleet did not lend: infinite after the
    /// bucket refilled alone while its store was down, of which only a
    /// debt goes back.
    #[cfg_attr(not(all(feature = "redis", feature = "pacing")), allow(dead_code))]
    unlent: f64,
    updated: Instant,
    paused_until: Option<Instant>,
}

impl TokenBucket {
    /// A full bucket of `capacity` tokens refilled over `period` (at least 1
    /// token and 1 ms).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::bucket::TokenBucket;
    /// let rpm = TokenBucket::new(50, Duration::from_secs(60), tokio::time::Instant::now());
    /// assert_eq!(rpm.capacity(), 50);
    /// ```
    pub fn new(capacity: u64, period: Duration, now: Instant) -> Self {
        let capacity = capacity.max(1) as f64;
        let period = period.max(Duration::from_millis(1));
        Self {
            capacity,
            period,
            level: capacity,
            per_second: capacity / period.as_secs_f64(),
            refill_share: 1.0,
            unlent: 0.0,
            updated: now,
            paused_until: None,
        }
    }

    /// A full bucket of `limit` tokens a minute: an RPM, ITPM or OTPM limit.
    ///
    /// ```
    /// # use tower_overload::bucket::TokenBucket;
    /// let otpm = TokenBucket::per_minute(8_000, tokio::time::Instant::now());
    /// assert_eq!(otpm.capacity(), 8_000);
    /// ```
    pub fn per_minute(limit: u64, now: Instant) -> Self {
        Self::new(limit, Duration::from_secs(60), now)
    }

    /// What the bucket holds when full.
    ///
    /// ```
    /// # use tower_overload::bucket::TokenBucket;
    /// assert_eq!(TokenBucket::per_minute(10, tokio::time::Instant::now()).capacity(), 10);
    /// ```
    pub fn capacity(&self) -> u64 {
        self.capacity as u64
    }

    /// Brings the level up to `now`: refill since the last update, none
    /// while paused, never past the capacity.
    fn refill(&mut self, now: Instant) {
        // Several operations at one instant (a check, then the take) refill once.
        if now == self.updated && self.paused_until.is_none() {
            return;
        }
        let from = match self.paused_until {
            Some(until) if now < until => {
                self.updated = now;
                return;
            }
            Some(until) => {
                self.paused_until = None;
                until.max(self.updated)
            }
            None => self.updated,
        };
        let elapsed = now.saturating_duration_since(from).as_secs_f64();
        self.level = (self.level + elapsed * self.per_second).min(self.capacity);
        self.updated = self.updated.max(now);
    }

    /// The tokens there are now (negative while a debt is being paid; 0 or
    /// less while paused).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::bucket::TokenBucket;
    /// let start = tokio::time::Instant::now();
    /// let mut bucket = TokenBucket::per_minute(60, start);
    /// bucket.charge(60, start);
    /// assert_eq!(bucket.available(start + Duration::from_secs(30)), 30.0);
    /// ```
    pub fn available(&mut self, now: Instant) -> f64 {
        self.refill(now);
        if self.paused_until.is_some() {
            return self.level.min(0.0);
        }
        self.level
    }

    /// How long until `amount` fits: `Ok(())` when it fits now.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::bucket::{Shortfall, TokenBucket};
    /// let start = tokio::time::Instant::now();
    /// let mut rpm = TokenBucket::per_minute(60, start);
    /// rpm.charge(60, start);
    /// assert_eq!(rpm.fits(1, start), Err(Shortfall::Wait(Duration::from_secs(1))));
    /// ```
    pub fn fits(&mut self, amount: u64, now: Instant) -> Result<(), Shortfall> {
        let amount_f = amount as f64;
        if amount_f > self.capacity {
            return Err(Shortfall::TooLarge {
                capacity: self.capacity(),
            });
        }
        self.refill(now);
        let pause = match self.paused_until {
            Some(until) => until.saturating_duration_since(now),
            None => Duration::ZERO,
        };
        let missing = amount_f - self.level;
        // A millionth of a token of slack: the level is refilled in floating
        // point, and a wait computed to fit exactly must fit when it ends.
        if missing <= 1e-6 && pause.is_zero() {
            return Ok(());
        }
        // Rounded up to the next millisecond, so that waiting this long
        // always suffices (a wait that comes up a hair short would wake a
        // caller only to make it wait again).
        // Saturating: a bucket refilled over ages (a huge `period`) must
        // name a long wait, not panic.
        if self.per_second <= 0.0 {
            // Lent by a fleet, it refills only when the fleet lends more
            // (every sync): ask again then.
            return Err(Shortfall::Wait(pause.max(LENT_RECHECK)));
        }
        let refill = Duration::try_from_secs_f64(missing.max(0.0) / self.per_second).map_or(
            Duration::MAX,
            |refill| {
                let millis = refill.as_nanos().div_ceil(1_000_000);
                Duration::from_millis(u64::try_from(millis).unwrap_or(u64::MAX))
            },
        );
        Err(Shortfall::Wait(pause.saturating_add(refill)))
    }

    /// Takes `amount` if it fits now; otherwise takes nothing and says how
    /// long until it fits.
    ///
    /// ```
    /// # use tower_overload::bucket::TokenBucket;
    /// let start = tokio::time::Instant::now();
    /// let mut rpm = TokenBucket::per_minute(2, start);
    /// assert!(rpm.try_take(1, start).is_ok());
    /// assert!(rpm.try_take(1, start).is_ok());
    /// assert!(rpm.try_take(1, start).is_err());
    /// ```
    pub fn try_take(&mut self, amount: u64, now: Instant) -> Result<(), Shortfall> {
        self.fits(amount, now)?;
        self.level -= amount as f64;
        Ok(())
    }

    /// Takes `amount` whether it fits or not: usage beyond a reservation
    /// (the level may go below zero; later calls wait out the debt). The
    /// debt stops at one whole bucket: the API's own bucket lets no more
    /// through in a period, so a larger figure is a bogus report, and
    /// believing it would stall every call for ages.
    ///
    /// ```
    /// # use tower_overload::bucket::TokenBucket;
    /// let start = tokio::time::Instant::now();
    /// let mut itpm = TokenBucket::per_minute(100, start);
    /// itpm.charge(150, start);
    /// assert_eq!(itpm.available(start), -50.0);
    /// ```
    pub fn charge(&mut self, amount: u64, now: Instant) {
        self.refill(now);
        self.level = (self.level - amount as f64).max(-self.capacity);
    }

    /// Gives back `amount` taken but not used: a cancelled call's
    /// reservation, or a reservation larger than the real usage. Never past
    /// the capacity.
    ///
    /// ```
    /// # use tower_overload::bucket::TokenBucket;
    /// let start = tokio::time::Instant::now();
    /// let mut otpm = TokenBucket::per_minute(8_000, start);
    /// otpm.try_take(4_096, start).unwrap();
    /// otpm.put_back(4_000, start); // max_tokens 4096 reserved, 96 generated
    /// assert_eq!(otpm.available(start), 7_904.0);
    /// ```
    pub fn put_back(&mut self, amount: u64, now: Instant) {
        self.refill(now);
        self.level = (self.level + amount as f64).min(self.capacity);
    }

    /// Empties the bucket and stops its refill until `until`: what a 429's
    /// `retry-after` says for every caller of this bucket, not just the one
    /// that got it.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::bucket::{Shortfall, TokenBucket};
    /// let start = tokio::time::Instant::now();
    /// let mut rpm = TokenBucket::per_minute(60, start);
    /// rpm.pause_until(start + Duration::from_secs(20), start);
    /// assert_eq!(rpm.fits(1, start), Err(Shortfall::Wait(Duration::from_secs(21))));
    /// ```
    pub fn pause_until(&mut self, until: Instant, now: Instant) {
        self.refill(now);
        self.level = self.level.min(0.0);
        if until > now {
            self.paused_until = Some(self.paused_until.map_or(until, |p| p.max(until)));
        }
    }

    /// Refills at `share` of the rate (0 while a fleet lends the tokens).
    #[cfg(all(feature = "redis", feature = "pacing"))]
    pub(crate) fn refill_share(&mut self, share: f64, now: Instant) {
        self.refill(now);
        if share > 0.0 && self.refill_share == 0.0 {
            // Alone again: what it refills is not the fleet's to take back.
            self.unlent = f64::INFINITY;
        }
        self.refill_share = share;
        self.per_second = self.capacity * share / self.period.as_secs_f64();
    }

    /// Hands the whole level back to the fleet (a debt too): what the
    /// bucket held, now empty.
    #[cfg(all(feature = "redis", feature = "pacing"))]
    pub(crate) fn lend_back(&mut self, now: Instant) -> f64 {
        self.refill(now);
        let level = std::mem::take(&mut self.level);
        let unlent = std::mem::take(&mut self.unlent);
        if unlent.is_infinite() {
            level.min(0.0)
        } else {
            level - unlent
        }
    }

    /// Starts a worker's bucket empty, with no refill of its own: it holds
    /// only what the fleet lends it (at the first sync, within 100 ms).
    /// Tokens of its own before that would be spent by every worker at
    /// once, before any of them had told the fleet.
    #[cfg(all(feature = "redis", feature = "pacing"))]
    pub(crate) fn start_shared(&mut self, now: Instant) {
        self.refill_share = 0.0;
        self.per_second = 0.0;
        self.level = 0.0;
        self.unlent = 0.0;
        self.updated = now;
    }

    /// Receives tokens from the fleet (or back after a failed sync).
    #[cfg(all(feature = "redis", feature = "pacing"))]
    pub(crate) fn receive(&mut self, tokens: f64, now: Instant) {
        self.refill(now);
        self.level = (self.level + tokens).clamp(-self.capacity, self.capacity);
    }

    /// The refill period.
    #[cfg(all(feature = "redis", feature = "pacing"))]
    pub(crate) fn period(&self) -> Duration {
        self.period
    }

    /// Corrects the bucket with what a response's `anthropic-ratelimit-*`
    /// window says, the truth about the organisation's bucket: `limit`
    /// becomes the capacity (keeping the level's share of it), and the
    /// level is never above `remaining` (other clients of the organisation
    /// spend from the same bucket). When `remaining` is 0 and `reset` is in
    /// the future, the bucket pauses until then.
    ///
    /// ```
    /// # use tower_overload::bucket::TokenBucket;
    /// # use tower_overload::headers::RateLimitWindow;
    /// let start = tokio::time::Instant::now();
    /// let mut itpm = TokenBucket::per_minute(1_000_000, start); // a guess
    /// let window = RateLimitWindow { limit: Some(30_000), remaining: Some(12_000), reset: None };
    /// itpm.observe(&window, std::time::SystemTime::now(), start);
    /// assert_eq!(itpm.capacity(), 30_000);
    /// assert_eq!(itpm.available(start), 12_000.0);
    /// ```
    pub fn observe(&mut self, window: &RateLimitWindow, wall: SystemTime, now: Instant) {
        self.refill(now);
        if let Some(limit) = window.limit.filter(|&limit| limit > 0) {
            let limit = limit as f64;
            if limit != self.capacity {
                self.level = self.level / self.capacity * limit;
                self.capacity = limit;
                self.per_second = limit * self.refill_share / self.period.as_secs_f64();
            }
        }
        if let Some(remaining) = window.remaining {
            self.level = self.level.min(remaining as f64);
            if remaining == 0
                && let Some(wait) = window
                    .reset
                    .and_then(|reset| reset.duration_since(wall).ok())
                    .filter(|wait| !wait.is_zero())
            {
                self.pause_until(now + wait.min(self.period), now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn refill_is_continuous_and_capped() {
        let start = Instant::now();
        let mut bucket = TokenBucket::per_minute(600, start);
        bucket.charge(600, start);
        assert_eq!(bucket.available(start + SECOND / 2), 5.0);
        assert_eq!(bucket.available(start + 30 * SECOND), 300.0);
        assert_eq!(bucket.available(start + 600 * SECOND), 600.0);
    }

    #[test]
    fn a_pause_holds_every_caller_then_refill_resumes_from_empty() {
        let start = Instant::now();
        let mut bucket = TokenBucket::per_minute(60, start);
        bucket.pause_until(start + 10 * SECOND, start);
        assert_eq!(bucket.available(start + 5 * SECOND), 0.0);
        assert_eq!(
            bucket.fits(1, start + 5 * SECOND),
            Err(Shortfall::Wait(6 * SECOND))
        );
        // A shorter pause does not cut a longer one short.
        bucket.pause_until(start + 2 * SECOND, start + 5 * SECOND);
        assert_eq!(bucket.available(start + 9 * SECOND), 0.0);
        assert_eq!(bucket.available(start + 13 * SECOND), 3.0);
        assert!(bucket.try_take(3, start + 13 * SECOND).is_ok());
    }

    #[test]
    fn an_exhausted_window_pauses_until_its_reset() {
        let start = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut bucket = TokenBucket::per_minute(50, start);
        let window = RateLimitWindow {
            limit: Some(50),
            remaining: Some(0),
            reset: Some(wall + 7 * SECOND),
        };
        bucket.observe(&window, wall, start);
        assert_eq!(
            bucket.fits(1, start),
            Err(Shortfall::Wait(7 * SECOND + SECOND * 6 / 5))
        );
        // A reset in the past, or a window with room, pauses nothing.
        let mut fresh = TokenBucket::per_minute(50, start);
        let stale = RateLimitWindow {
            reset: Some(wall - SECOND),
            ..window
        };
        fresh.observe(&stale, wall, start);
        assert_eq!(fresh.fits(0, start), Ok(()));
    }

    #[test]
    fn a_learned_limit_keeps_the_level_share() {
        let start = Instant::now();
        let mut bucket = TokenBucket::per_minute(100, start);
        bucket.charge(50, start);
        let window = RateLimitWindow {
            limit: Some(1000),
            remaining: None,
            reset: None,
        };
        bucket.observe(&window, SystemTime::now(), start);
        assert_eq!((bucket.capacity(), bucket.available(start)), (1000, 500.0));
    }

    /// Defect B1 (breaker 14): a report of u64::MAX tokens made `fits`
    /// panic (`Duration::from_secs_f64` overflowed) on a small bucket, and
    /// would have stalled it for ages on a large one.
    #[test]
    fn an_absurd_charge_is_one_bucket_of_debt_at_most() {
        let start = Instant::now();
        let mut bucket = TokenBucket::per_minute(50, start);
        bucket.charge(u64::MAX, start);
        bucket.charge(u64::MAX, start);
        assert_eq!(bucket.available(start), -50.0);
        assert_eq!(bucket.fits(50, start), Err(Shortfall::Wait(120 * SECOND)));
        assert_eq!(bucket.available(start + 120 * SECOND), 50.0);
        // A bucket refilled over ages names a long wait, without a panic.
        let mut slow = TokenBucket::new(u64::MAX, Duration::MAX, start);
        slow.charge(u64::MAX, start);
        assert!(matches!(
            slow.fits(u64::MAX, start),
            Err(Shortfall::Wait(_))
        ));
    }

    proptest! {
        /// Whatever happened before, waiting the time `fits` names is
        /// enough, and the bucket never holds more than its capacity.
        #[test]
        fn waiting_as_told_always_suffices(
            ops in proptest::collection::vec((0u8..4, 0u64..2_000, 0u64..5_000), 1..40),
            amount in 1u64..1_000,
        ) {
            let start = Instant::now();
            let mut now = start;
            let mut bucket = TokenBucket::per_minute(1_000, start);
            for (op, size, step_ms) in ops {
                now += Duration::from_millis(step_ms);
                match op {
                    0 => { let _ = bucket.try_take(size, now); }
                    1 => bucket.charge(size, now),
                    2 => bucket.put_back(size, now),
                    _ => bucket.pause_until(now + Duration::from_millis(size), now),
                }
                prop_assert!(bucket.available(now) <= 1_000.0);
            }
            match bucket.fits(amount, now) {
                Ok(()) => {}
                Err(Shortfall::Wait(wait)) => prop_assert!(bucket.try_take(amount, now + wait).is_ok()),
                Err(Shortfall::TooLarge { .. }) => prop_assert!(amount > 1_000),
            }
        }
    }
}
