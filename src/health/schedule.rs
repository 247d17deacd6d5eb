//! When to check and when to probe (pure: every function takes `now`): a
//! windowed 529 rate per model, and single-flight timers with intervals.

use std::time::Duration;

use tokio::time::Instant;

/// A model's overload rate over the monitor's window.
///
/// ```
/// use tower_overload::health::OverloadRate;
/// let rate = OverloadRate { overloaded: 3.0, samples: 100.0 };
/// assert_eq!(rate.rate(), 0.03);
/// assert_eq!(OverloadRate::default().rate(), 0.0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct OverloadRate {
    /// Overloaded attempts in the window (the previous window's count is
    /// weighted by how much of it the sliding window still covers).
    pub overloaded: f64,
    /// All attempts in the window, weighted the same way.
    pub samples: f64,
}

impl OverloadRate {
    /// Overloaded attempts per attempt, 0 with no attempts.
    pub fn rate(&self) -> f64 {
        if self.samples > 0.0 {
            self.overloaded / self.samples
        } else {
            0.0
        }
    }

    /// Whether the rate is at or past `threshold` with at least `min_samples` attempts.
    ///
    /// ```
    /// use tower_overload::health::OverloadRate;
    /// let rate = OverloadRate { overloaded: 1.0, samples: 10.0 };
    /// assert!(!rate.is_raised(0.02, 20), "too few samples to tell");
    /// assert!(rate.is_raised(0.02, 10));
    /// ```
    pub fn is_raised(&self, threshold: f64, min_samples: u32) -> bool {
        self.samples >= f64::from(min_samples) && self.rate() >= threshold
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    total: u64,
    overloaded: u64,
}

/// Two fixed windows, the current and the previous, read as a sliding one:
/// two counters per model, whatever the traffic.
#[derive(Debug, Clone)]
pub(crate) struct RateWindow {
    start: Option<Instant>,
    current: Counts,
    previous: Counts,
}

impl RateWindow {
    pub(crate) fn new() -> Self {
        Self {
            start: None,
            current: Counts::default(),
            previous: Counts::default(),
        }
    }

    /// Moves the windows on to `now`.
    fn roll(&mut self, now: Instant, window: Duration) {
        let Some(start) = self.start else {
            self.start = Some(now);
            return;
        };
        let elapsed = now.saturating_duration_since(start);
        if elapsed < window {
            return;
        }
        if elapsed < window.saturating_mul(2) {
            self.previous = self.current;
            self.start = start.checked_add(window).or(Some(now));
        } else {
            self.previous = Counts::default();
            self.start = Some(now);
        }
        self.current = Counts::default();
    }

    pub(crate) fn record(&mut self, now: Instant, window: Duration, overloaded: bool) {
        self.roll(now, window);
        self.current.total = self.current.total.saturating_add(1);
        if overloaded {
            self.current.overloaded = self.current.overloaded.saturating_add(1);
        }
    }

    pub(crate) fn rate(&self, now: Instant, window: Duration) -> OverloadRate {
        let mut rolled = self.clone();
        rolled.roll(now, window);
        let Some(start) = rolled.start else {
            return OverloadRate::default();
        };
        let into = now.saturating_duration_since(start).as_secs_f64();
        let weight = if window.is_zero() {
            0.0
        } else {
            (1.0 - into / window.as_secs_f64()).clamp(0.0, 1.0)
        };
        OverloadRate {
            overloaded: rolled.current.overloaded as f64
                + weight * rolled.previous.overloaded as f64,
            samples: rolled.current.total as f64 + weight * rolled.previous.total as f64,
        }
    }
}

/// A single-flight job on an interval: a poll of the page, or a model's probe.
#[derive(Debug, Clone, Default)]
pub(crate) struct Flight {
    last_started: Option<Instant>,
    in_flight: bool,
}

impl Flight {
    /// Not running, and never started or started `interval` ago or more.
    pub(crate) fn due(&self, now: Instant, interval: Duration) -> bool {
        !self.in_flight
            && self
                .last_started
                .is_none_or(|last| now.saturating_duration_since(last) >= interval)
    }

    pub(crate) fn start(&mut self, now: Instant) {
        self.in_flight = true;
        self.last_started = Some(now);
    }

    pub(crate) fn finish(&mut self) {
        self.in_flight = false;
    }
}

/// Whether the page should be read now: every `raised` interval while a
/// model's rate is raised, else every `idle` interval, or never when idle
/// polling is off.
pub(crate) fn poll_due(
    flight: &Flight,
    raised: bool,
    raised_interval: Duration,
    idle_interval: Option<Duration>,
    now: Instant,
) -> bool {
    let interval = if raised {
        Some(raised_interval)
    } else {
        idle_interval
    };
    interval.is_some_and(|interval| flight.due(now, interval))
}

/// Whether a model should be probed now: its rate is raised, the page does
/// not already declare an incident for it (probing then only adds load), and
/// its last probe started an interval ago or more and is over.
pub(crate) fn probe_due(
    flight: &Flight,
    raised: bool,
    incident: bool,
    interval: Duration,
    now: Instant,
) -> bool {
    raised && !incident && flight.due(now, interval)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn the_window_slides_and_forgets() {
        let t0 = Instant::now();
        let mut window = RateWindow::new();
        for i in 0..100 {
            window.record(t0, MINUTE, i < 5);
        }
        let rate = window.rate(t0, MINUTE);
        assert_eq!((rate.overloaded, rate.samples), (5.0, 100.0));
        assert!(rate.is_raised(0.02, 20));
        // Half a window into the next one: the previous counts half.
        let later = t0 + MINUTE + MINUTE / 2;
        let rate = window.rate(later, MINUTE);
        assert_eq!((rate.overloaded, rate.samples), (2.5, 50.0));
        window.record(later, MINUTE, false);
        assert_eq!(window.rate(later, MINUTE).samples, 51.0);
        // Two windows of silence: nothing is remembered.
        assert_eq!(window.rate(later + 2 * MINUTE, MINUTE).samples, 0.0);
    }

    #[test]
    fn flights_are_single_and_spaced() {
        let t0 = Instant::now();
        let mut flight = Flight::default();
        assert!(flight.due(t0, MINUTE));
        flight.start(t0);
        assert!(!flight.due(t0 + 2 * MINUTE, MINUTE), "one at a time");
        flight.finish();
        assert!(
            !flight.due(t0 + MINUTE / 2, MINUTE),
            "spaced by the interval"
        );
        assert!(flight.due(t0 + MINUTE, MINUTE));
    }

    #[test]
    fn polls_follow_the_rate_and_probes_stop_under_an_incident() {
        let t0 = Instant::now();
        let flight = Flight::default();
        assert!(
            !poll_due(&flight, false, MINUTE, None, t0),
            "idle polling off"
        );
        assert!(poll_due(&flight, false, MINUTE, Some(MINUTE), t0));
        assert!(poll_due(&flight, true, MINUTE, None, t0));
        assert!(!probe_due(&flight, false, false, MINUTE, t0));
        assert!(!probe_due(&flight, true, true, MINUTE, t0));
        assert!(probe_due(&flight, true, false, MINUTE, t0));
    }
}
