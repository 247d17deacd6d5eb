//! Additive-increase, multiplicative-decrease of one key's limit: the pure arithmetic.

/// How an adaptive limit reacts to overload signals.
///
/// On an overload (529, or a 429) the limit is multiplied by
/// `decrease_ratio` (never below `min_limit`); on a success while at least
/// half the limit is in use, it grows by one, up to the key's configured
/// maximum. A storm on one model thus lowers that model's concurrency alone,
/// and it recovers as calls succeed again.
///
/// ```
/// use tower_overload::concurrency::Aimd;
/// let aimd = Aimd::default();
/// assert_eq!(aimd.decrease_ratio, 0.9);
/// assert_eq!(aimd.min_limit, 1);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aimd {
    /// Factor applied to the limit on an overload, in (0, 1).
    pub decrease_ratio: f64,
    /// The lowest the limit goes; at least 1.
    pub min_limit: usize,
    /// Whether a 429 shrinks the limit too (it is your quota, not the
    /// platform's capacity, but fewer calls in flight still help).
    pub on_rate_limit: bool,
}

impl Default for Aimd {
    fn default() -> Self {
        Self {
            decrease_ratio: 0.9,
            min_limit: 1,
            on_rate_limit: true,
        }
    }
}

/// The adaptive limit of one key.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AdaptiveLimit {
    /// The exact limit; the integer part is what is enforced.
    estimate: f64,
    max: usize,
    min: usize,
    ratio: f64,
}

impl AdaptiveLimit {
    pub(crate) fn new(max: usize, aimd: &Aimd) -> Self {
        let max = max.max(1);
        let ratio = if aimd.decrease_ratio.is_finite()
            && aimd.decrease_ratio > 0.0
            && aimd.decrease_ratio < 1.0
        {
            aimd.decrease_ratio
        } else {
            Aimd::default().decrease_ratio
        };
        Self {
            estimate: max as f64,
            max,
            min: aimd.min_limit.clamp(1, max),
            ratio,
        }
    }

    /// The enforced limit.
    pub(crate) fn limit(&self) -> usize {
        (self.estimate.floor() as usize).clamp(self.min, self.max)
    }

    /// After an overload: the new enforced limit.
    pub(crate) fn on_overload(&mut self) -> usize {
        // Shrink by at least one whole permit, or small limits would never move.
        let before = self.limit();
        self.estimate = (self.estimate * self.ratio)
            .min(before as f64 - 1.0)
            .max(self.min as f64);
        self.limit()
    }

    /// Whether a success with `in_flight` calls running raises the limit.
    pub(crate) fn would_grow(&self, in_flight: usize) -> bool {
        let limit = self.limit();
        in_flight * 2 >= limit && limit < self.max
    }

    /// After a success with `in_flight` calls running: the new enforced limit.
    pub(crate) fn on_success(&mut self, in_flight: usize) -> usize {
        if self.would_grow(in_flight) {
            self.estimate = (self.estimate.floor() + 1.0).min(self.max as f64);
        }
        self.limit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shrinks_multiplicatively_and_grows_additively() {
        let mut limit = AdaptiveLimit::new(16, &Aimd::default());
        assert_eq!(limit.limit(), 16);
        let shrunk: Vec<usize> = (0..6).map(|_| limit.on_overload()).collect();
        assert_eq!(shrunk, [14, 12, 11, 9, 8, 7]);
        for _ in 0..50 {
            limit.on_overload();
        }
        assert_eq!(limit.limit(), 1, "never below the floor");
        assert_eq!(limit.on_success(0), 1, "nothing in use: no reason to grow");
        assert_eq!(
            limit.on_success(1),
            2,
            "the call itself is half of the limit"
        );
        assert_eq!(limit.on_success(0), 2);
        assert_eq!(limit.on_success(1), 3);
        for in_flight in 0..100 {
            limit.on_success(in_flight);
        }
        assert_eq!(limit.limit(), 16, "never above the maximum");
    }

    #[test]
    fn bad_settings_fall_back_to_sane_ones() {
        for ratio in [0.0, 1.0, -1.0, f64::NAN, 7.0] {
            let aimd = Aimd {
                decrease_ratio: ratio,
                ..Aimd::default()
            };
            let mut limit = AdaptiveLimit::new(10, &aimd);
            assert_eq!(limit.on_overload(), 9, "{ratio}");
        }
        let high_floor = Aimd {
            min_limit: 50,
            ..Aimd::default()
        };
        let mut limit = AdaptiveLimit::new(10, &high_floor);
        assert_eq!(
            limit.on_overload(),
            10,
            "the floor is capped at the maximum"
        );
        assert_eq!(AdaptiveLimit::new(0, &Aimd::default()).limit(), 1);
    }
}
