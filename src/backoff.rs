//! Capped exponential backoff with jitter, after the AWS Architecture Blog's
//! "Exponential Backoff and Jitter" (Marc Brooker, 2015).
//!
//! With `n` the number of retries already made (0 before the first retry),
//! `exp = min(cap, base * 2^n)`:
//!
//! | [`Jitter`] | delay |
//! |---|---|
//! | `None` | `exp` |
//! | `Full` | `random(0, exp)` |
//! | `Equal` | `exp / 2 + random(0, exp / 2)` |
//! | `Decorrelated` | `min(cap, random(base, previous * 3))`, `previous` starting at `base` |
//!
//! Full jitter spreads a crowd of clients that failed together over the whole
//! window, which is what an overloaded API needs; it is the default for 529s.
//! The randomness comes from any [`rand::Rng`], so a seeded generator makes
//! every delay reproducible. Nothing here allocates.
//!
//! ```
//! use std::time::Duration;
//! use rand::{SeedableRng, rngs::SmallRng};
//! use tower_overload::backoff::{Backoff, Jitter};
//!
//! let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60), Jitter::Full);
//! let mut rng = SmallRng::seed_from_u64(7);
//! let mut previous = backoff.base();
//! for retry in 0..5 {
//!     let delay = backoff.delay(retry, previous, &mut rng);
//!     assert!(delay <= Duration::from_secs(1 << retry));
//!     previous = delay;
//! }
//! ```

use std::time::Duration;

use rand::Rng;

/// How randomness is mixed into the exponential delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Jitter {
    /// No randomness: every client that failed together retries together. For tests and comparisons.
    None,
    /// Uniform over `[0, exp]`: the least total work for a contended server.
    #[default]
    Full,
    /// Half fixed, half random: never retries too soon, still spreads.
    Equal,
    /// Grows from the previous delay, not the attempt number.
    Decorrelated,
}

/// A capped exponential backoff schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    jitter: Jitter,
}

impl Backoff {
    /// A schedule that starts at `base` and never exceeds `cap`. A `cap` below
    /// `base` is raised to `base`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_overload::backoff::{Backoff, Jitter};
    /// let backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(8), Jitter::Equal);
    /// assert_eq!(backoff.cap(), Duration::from_secs(8));
    /// ```
    pub const fn new(base: Duration, cap: Duration, jitter: Jitter) -> Self {
        let cap = if cap.as_nanos() < base.as_nanos() {
            base
        } else {
            cap
        };
        Self { base, cap, jitter }
    }

    /// The first delay before jitter.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::backoff::{Backoff, Jitter};
    /// assert_eq!(Backoff::new(Duration::from_secs(1), Duration::from_secs(2), Jitter::None).base(), Duration::from_secs(1));
    /// ```
    pub const fn base(&self) -> Duration {
        self.base
    }

    /// The largest delay.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::backoff::{Backoff, Jitter};
    /// assert_eq!(Backoff::new(Duration::from_secs(1), Duration::from_secs(2), Jitter::None).cap(), Duration::from_secs(2));
    /// ```
    pub const fn cap(&self) -> Duration {
        self.cap
    }

    /// The jitter kind.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::backoff::{Backoff, Jitter};
    /// assert_eq!(Backoff::new(Duration::ZERO, Duration::ZERO, Jitter::Full).jitter(), Jitter::Full);
    /// ```
    pub const fn jitter(&self) -> Jitter {
        self.jitter
    }

    /// `min(cap, base * 2^retry)`: the window before jitter.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::backoff::{Backoff, Jitter};
    /// let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60), Jitter::Full);
    /// assert_eq!(backoff.ceiling(3), Duration::from_secs(8));
    /// assert_eq!(backoff.ceiling(200), Duration::from_secs(60));
    /// ```
    pub fn ceiling(&self, retry: u32) -> Duration {
        Duration::from_nanos(self.ceiling_nanos(retry))
    }

    fn ceiling_nanos(&self, retry: u32) -> u64 {
        let base = saturating_nanos(self.base);
        let cap = saturating_nanos(self.cap);
        if base == 0 {
            return 0;
        }
        if retry >= base.leading_zeros() {
            return cap;
        }
        (base << retry).min(cap)
    }

    /// The delay before retry number `retry` (0 for the first retry).
    /// `previous` is the delay used last time; only decorrelated jitter reads
    /// it (pass [`base`](Self::base) before the first retry).
    ///
    /// ```
    /// use std::time::Duration;
    /// use rand::{SeedableRng, rngs::SmallRng};
    /// use tower_overload::backoff::{Backoff, Jitter};
    ///
    /// let backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(8), Jitter::None);
    /// let mut rng = SmallRng::seed_from_u64(1);
    /// assert_eq!(backoff.delay(2, Duration::ZERO, &mut rng), Duration::from_secs(2));
    /// assert_eq!(backoff.delay(10, Duration::ZERO, &mut rng), Duration::from_secs(8));
    /// ```
    pub fn delay<R: Rng + ?Sized>(&self, retry: u32, previous: Duration, rng: &mut R) -> Duration {
        let nanos = match self.jitter {
            Jitter::None => self.ceiling_nanos(retry),
            Jitter::Full => uniform_inclusive(rng, 0, self.ceiling_nanos(retry)),
            Jitter::Equal => {
                let ceiling = self.ceiling_nanos(retry);
                let half = ceiling / 2;
                half + uniform_inclusive(rng, 0, ceiling - half)
            }
            Jitter::Decorrelated => {
                let base = saturating_nanos(self.base);
                let upper = saturating_nanos(previous).max(base).saturating_mul(3);
                uniform_inclusive(rng, base, upper).min(saturating_nanos(self.cap))
            }
        };
        Duration::from_nanos(nanos)
    }
}

fn saturating_nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Uniform in `[low, high]` by widening multiplication: one draw, no loop,
/// bias below 2^-64 per value, far under what a delay can show.
fn uniform_inclusive<R: Rng + ?Sized>(rng: &mut R, low: u64, high: u64) -> u64 {
    let span = u128::from(high - low) + 1;
    let offset = (u128::from(rng.next_u64()) * span) >> 64;
    low + offset as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{SeedableRng, rngs::SmallRng};

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn no_jitter_doubles_then_caps() {
        let backoff = Backoff::new(S(1), S(60), Jitter::None);
        let mut rng = SmallRng::seed_from_u64(0);
        let delays: Vec<u64> = (0..9)
            .map(|n| backoff.delay(n, S(0), &mut rng).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff.delay(u32::MAX, S(0), &mut rng), S(60));
    }

    #[test]
    fn huge_durations_saturate() {
        let backoff = Backoff::new(Duration::MAX, Duration::MAX, Jitter::Decorrelated);
        let mut rng = SmallRng::seed_from_u64(0);
        assert_eq!(
            backoff.delay(5, Duration::MAX, &mut rng),
            Duration::from_nanos(u64::MAX)
        );
        let zero = Backoff::new(Duration::ZERO, Duration::ZERO, Jitter::Full);
        assert_eq!(zero.delay(3, Duration::ZERO, &mut rng), Duration::ZERO);
    }

    #[test]
    fn cap_below_base_is_raised() {
        let backoff = Backoff::new(S(5), S(1), Jitter::None);
        assert_eq!(backoff.cap(), S(5));
    }

    #[test]
    fn seeded_rng_reproduces() {
        let backoff = Backoff::new(S(1), S(60), Jitter::Full);
        let run = |seed| {
            let mut rng = SmallRng::seed_from_u64(seed);
            (0..6)
                .map(|n| backoff.delay(n, S(1), &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn full_jitter_spreads_over_the_window() {
        let backoff = Backoff::new(S(1), S(60), Jitter::Full);
        let mut rng = SmallRng::seed_from_u64(9);
        let samples: Vec<Duration> = (0..10_000)
            .map(|_| backoff.delay(3, S(0), &mut rng))
            .collect();
        let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
        assert!(samples.iter().all(|d| *d <= S(8)));
        // Uniform over [0, 8 s]: mean 4 s; 10k samples put it within a few percent.
        assert!((3_800..4_200).contains(&mean.as_millis()), "{mean:?}");
        assert!(samples.iter().any(|d| *d < S(1)) && samples.iter().any(|d| *d > S(7)));
    }

    proptest! {
        #[test]
        fn delays_stay_in_their_windows(
            base_ms in 0u64..10_000,
            cap_ms in 0u64..400_000,
            retry in 0u32..100,
            previous_ms in 0u64..1_000_000,
            seed in any::<u64>(),
        ) {
            let (base, cap, previous) = (Duration::from_millis(base_ms), Duration::from_millis(cap_ms), Duration::from_millis(previous_ms));
            let mut rng = SmallRng::seed_from_u64(seed);
            for jitter in [Jitter::None, Jitter::Full, Jitter::Equal, Jitter::Decorrelated] {
                let backoff = Backoff::new(base, cap, jitter);
                let ceiling = backoff.ceiling(retry);
                prop_assert!(ceiling <= backoff.cap());
                let delay = backoff.delay(retry, previous, &mut rng);
                prop_assert!(delay <= backoff.cap(), "{jitter:?} {delay:?}");
                match jitter {
                    Jitter::None => prop_assert_eq!(delay, ceiling),
                    Jitter::Full => prop_assert!(delay <= ceiling),
                    Jitter::Equal => prop_assert!(delay >= ceiling / 2 && delay <= ceiling),
                    Jitter::Decorrelated => prop_assert!(delay >= base.min(backoff.cap())),
                }
            }
        }
    }
}
