//! When a model is skipped: a small circuit breaker per model, on an explicit clock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::Shared;
use crate::breaker_signal::ModelBreaker;
use crate::classify::Class;
use crate::model::Model;

/// When a model that keeps answering "overloaded" is given a rest.
///
/// After `overloads` calls met an overload on the model within `window`,
/// with no success in between, the model is skipped for `cooldown`. A call
/// counts when its first attempt is overloaded (the retry layer inside tells
/// the breaker at once), so a storm opens the breaker within its first few
/// calls, and calls still retrying the model then stop and move on. Then one
/// call at a time may probe it (half-open): the probe is that call's one
/// attempt at the model (if it fails, the call falls back as usual); a
/// success closes the breaker at once, another overload skips the model
/// again for twice as long, up to `max_cooldown`.
///
/// The defaults probe a resting model 2 s after it opened, then every 5 s:
/// storms last minutes, but a primary that has recovered is found within
/// 5 s, for one wasted attempt per 5 s of storm (at 20 calls/s, one
/// attempt per 100 calls). Five calls, not one or two, open the breaker so
/// that sparse transient 529s (which the retries inside absorb) do not
/// send traffic to another model.
///
/// ```
/// use std::time::Duration;
/// use tower_overload::fallback::Cooldown;
///
/// let cooldown = Cooldown::default();
/// assert_eq!(cooldown.overloads, 5);
/// assert_eq!(cooldown.window, Duration::from_secs(60));
/// assert_eq!(cooldown.cooldown, Duration::from_secs(2));
/// assert_eq!(cooldown.max_cooldown, Duration::from_secs(5));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cooldown {
    /// Overloaded calls (after the retries inside) that open the breaker.
    pub overloads: u32,
    /// The window they must fall in.
    pub window: Duration,
    /// The first rest.
    pub cooldown: Duration,
    /// The longest rest, however often probes fail.
    pub max_cooldown: Duration,
}

impl Default for Cooldown {
    fn default() -> Self {
        Self {
            overloads: 5,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(2),
            max_cooldown: Duration::from_secs(5),
        }
    }
}

/// What a breaker lets a call do with its model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Use the model.
    Use,
    /// Use the model as the one probe after a cooldown.
    Probe,
    /// Skip the model: it is cooling down, or another call is probing it.
    Skip,
}

#[derive(Debug)]
enum State {
    Closed {
        overloads: u32,
        since: Option<Instant>,
    },
    Open {
        until: Instant,
        rest: Duration,
    },
    HalfOpen {
        probing: bool,
        rest: Duration,
    },
}

/// One model's breaker.
#[derive(Debug)]
pub(crate) struct Breaker {
    policy: Cooldown,
    state: Mutex<State>,
    /// The fleet this breaker is shared with, if any: while its store is
    /// up, only the fleet's sync lets a rest end in a probe.
    #[cfg(feature = "redis")]
    fleet: Option<crate::fleet::Fleet>,
    /// What the breaker did since the fleet last synced.
    #[cfg(feature = "redis")]
    event: Mutex<Option<crate::fleet::BreakerEvent>>,
    /// A call was kept from the model after its rest ended, waiting for the
    /// fleet's go to probe it.
    #[cfg(feature = "redis")]
    wants_probe: AtomicBool,
}

impl Breaker {
    pub(crate) fn new(policy: Cooldown) -> Self {
        Self {
            policy,
            state: Mutex::new(State::Closed {
                overloads: 0,
                since: None,
            }),
            #[cfg(feature = "redis")]
            fleet: None,
            #[cfg(feature = "redis")]
            event: Mutex::new(None),
            #[cfg(feature = "redis")]
            wants_probe: AtomicBool::new(false),
        }
    }

    /// A breaker shared with `fleet` (the caller registers it).
    #[cfg(feature = "redis")]
    pub(crate) fn shared_with(policy: Cooldown, fleet: crate::fleet::Fleet) -> Self {
        Self {
            fleet: Some(fleet),
            ..Self::new(policy)
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        crate::sync::lock(&self.state)
    }

    /// Whether the fleet decides when a rest ends (its store is up).
    fn gated(&self) -> bool {
        #[cfg(feature = "redis")]
        return self
            .fleet
            .as_ref()
            .is_some_and(crate::fleet::Fleet::is_available);
        #[cfg(not(feature = "redis"))]
        false
    }

    /// Notes a change the fleet must hear of.
    #[cfg(feature = "redis")]
    fn record(&self, event: crate::fleet::BreakerEvent) {
        if self.fleet.is_some() {
            *crate::sync::lock(&self.event) = Some(event);
        }
    }

    pub(crate) fn admit(&self, now: Instant) -> Admission {
        let mut state = self.state();
        match *state {
            State::Closed { .. } => Admission::Use,
            // Shared with a fleet: its sync picks the one worker that probes.
            State::Open { until, .. } if now >= until && self.gated() => {
                #[cfg(feature = "redis")]
                self.wants_probe.store(true, Ordering::Relaxed);
                Admission::Skip
            }
            State::Open { until, rest } if now >= until => {
                *state = State::HalfOpen {
                    probing: true,
                    rest,
                };
                Admission::Probe
            }
            State::Open { .. } => Admission::Skip,
            State::HalfOpen {
                probing: false,
                rest,
            } => {
                *state = State::HalfOpen {
                    probing: true,
                    rest,
                };
                Admission::Probe
            }
            State::HalfOpen { probing: true, .. } => Admission::Skip,
        }
    }

    /// The model answered overloaded.
    pub(crate) fn on_overload(&self, now: Instant, probe: bool) {
        let policy = self.policy;
        let mut state = self.state();
        match *state {
            State::HalfOpen { rest, .. } if probe => {
                let rest = rest.saturating_mul(2).min(policy.max_cooldown);
                *state = State::Open {
                    until: now + rest,
                    rest,
                };
                #[cfg(feature = "redis")]
                self.record(crate::fleet::BreakerEvent::Opened { rest });
            }
            State::Closed { overloads, since } => {
                let fresh =
                    since.is_none_or(|since| now.saturating_duration_since(since) > policy.window);
                let (overloads, since) = if fresh {
                    (1, now)
                } else {
                    (overloads + 1, since.unwrap_or(now))
                };
                *state = if overloads >= policy.overloads.max(1) {
                    #[cfg(feature = "redis")]
                    self.record(crate::fleet::BreakerEvent::Opened {
                        rest: policy.cooldown,
                    });
                    State::Open {
                        until: now + policy.cooldown,
                        rest: policy.cooldown,
                    }
                } else {
                    State::Closed {
                        overloads,
                        since: Some(since),
                    }
                };
            }
            // An overload from a call admitted before the breaker opened: already open.
            State::Open { .. } | State::HalfOpen { .. } => {}
        }
    }

    /// The model answered with something other than an overload.
    pub(crate) fn on_other(&self, probe: bool, success: bool) {
        let mut state = self.state();
        match *state {
            State::HalfOpen { rest, .. } if probe => {
                #[cfg(feature = "redis")]
                if success {
                    self.record(crate::fleet::BreakerEvent::Closed);
                }
                *state = if success {
                    State::Closed {
                        overloads: 0,
                        since: None,
                    }
                } else {
                    // Not an overload, not a success (a 400, say): says nothing about capacity.
                    State::HalfOpen {
                        probing: false,
                        rest,
                    }
                };
            }
            State::Closed { .. } if success => {
                *state = State::Closed {
                    overloads: 0,
                    since: None,
                }
            }
            _ => {}
        }
    }

    /// A probe ended without an answer (dropped, or failed in transport).
    pub(crate) fn release_probe(&self) {
        let mut state = self.state();
        if let State::HalfOpen { rest, .. } = *state {
            *state = State::HalfOpen {
                probing: false,
                rest,
            };
        }
    }

    /// Whether calls may use the model freely (not resting, not being probed).
    pub(crate) fn is_closed(&self) -> bool {
        matches!(*self.state(), State::Closed { .. })
    }

    pub(crate) fn is_cooling_down(&self, now: Instant) -> bool {
        match *self.state() {
            State::Closed { .. } => false,
            State::Open { until, .. } => now < until,
            State::HalfOpen { probing, .. } => probing,
        }
    }
}

#[cfg(feature = "redis")]
impl crate::fleet::SyncedBreaker for Breaker {
    fn take_event(&self) -> (Option<crate::fleet::BreakerEvent>, bool) {
        let wants = self.wants_probe.swap(false, Ordering::Relaxed);
        (crate::sync::lock(&self.event).take(), wants)
    }

    fn restore_event(&self, event: crate::fleet::BreakerEvent) {
        crate::sync::lock(&self.event).get_or_insert(event);
    }

    fn apply(&self, fleet: crate::fleet::BreakerState, hold: Duration) {
        use crate::fleet::BreakerState;
        // A change made during the sync is published by the next one first.
        let pending = crate::sync::lock(&self.event).is_some();
        if pending {
            return;
        }
        let now = Instant::now();
        let mut state = self.state();
        let probing = matches!(*state, State::HalfOpen { probing: true, .. });
        match fleet {
            BreakerState::Closed => {
                if !matches!(*state, State::Closed { .. }) {
                    *state = State::Closed {
                        overloads: 0,
                        since: None,
                    };
                }
            }
            BreakerState::Open { remaining, rest } if !probing => {
                *state = State::Open {
                    until: now + remaining,
                    rest,
                };
            }
            BreakerState::HalfOpen {
                probe_is_yours: true,
                rest,
            } => {
                if !matches!(*state, State::HalfOpen { .. }) {
                    *state = State::HalfOpen {
                        probing: false,
                        rest,
                    };
                }
            }
            BreakerState::HalfOpen {
                probe_is_yours: false,
                rest,
            } if !probing => {
                *state = State::Open {
                    until: now + hold,
                    rest,
                };
            }
            BreakerState::Open { .. } | BreakerState::HalfOpen { .. } => {}
        }
    }
}

/// One call's view of one model's breaker, handed to the retry layer
/// inside as a [`BreakerSignal`](crate::breaker_signal::BreakerSignal).
///
/// The breaker counts overloaded *calls*: the retry layer reports a call's
/// first overloaded attempt at once (so a storm opens the breaker while the
/// first calls are still in their retry loops), and the call's end is then
/// not counted again.
pub(crate) struct CallOnModel {
    shared: Arc<Shared>,
    model: Model,
    probe: bool,
    counted: AtomicBool,
}

impl CallOnModel {
    pub(crate) fn new(shared: Arc<Shared>, model: Model, probe: bool) -> Self {
        Self {
            shared,
            model,
            probe,
            counted: AtomicBool::new(false),
        }
    }

    fn breaker(&self) -> Option<&Breaker> {
        self.shared
            .breakers
            .get(&self.model)
            .map(|breaker| &**breaker)
    }

    /// Counts this call's overload, once however often it is reported.
    pub(crate) fn count_overload(&self, now: Instant) {
        if !self.counted.swap(true, Ordering::AcqRel)
            && let Some(breaker) = self.breaker()
        {
            breaker.on_overload(now, self.probe);
        }
    }
}

impl ModelBreaker for CallOnModel {
    fn on_failure(&self, class: Class) {
        if self.shared.triggers.contains(&class) {
            self.count_overload(Instant::now());
        }
    }

    fn should_stop(&self, class: Class) -> bool {
        // Open, or half-open: either way not proven healthy, and a probe
        // is one attempt (if it fails, the call moves on as usual).
        self.shared.triggers.contains(&class) && self.breaker().is_some_and(|b| !b.is_closed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    /// Settings with round numbers, to test the state machine.
    fn slow() -> Cooldown {
        Cooldown {
            overloads: 2,
            window: S(60),
            cooldown: S(30),
            max_cooldown: S(300),
        }
    }

    /// Defect 13: while a model rests, it is probed every few seconds, never
    /// minutes apart, and a successful probe closes the breaker at once.
    #[test]
    fn defect_13_the_default_probe_cadence_stays_within_seconds() {
        let policy = Cooldown::default();
        let breaker = Breaker::new(policy);
        let mut now = Instant::now();
        for _ in 0..policy.overloads {
            assert_eq!(breaker.admit(now), Admission::Use);
            breaker.on_overload(now, false);
        }
        let mut rests = Vec::new();
        for _ in 0..20 {
            let mut waited = Duration::ZERO;
            while breaker.admit(now + waited) != Admission::Probe {
                waited += Duration::from_millis(100);
            }
            rests.push(waited.as_millis());
            now += waited;
            breaker.on_overload(now, true);
        }
        assert_eq!(&rests[..4], [2_000, 4_000, 5_000, 5_000]);
        assert!(rests.iter().all(|&rest| rest <= 5_000), "{rests:?}");
        assert!(breaker.admit(now + S(5)) == Admission::Probe);
        breaker.on_other(true, true);
        assert_eq!(breaker.admit(now + S(5)), Admission::Use, "closed at once");
    }

    #[test]
    fn opens_after_k_overloads_in_the_window_then_probes() {
        let breaker = Breaker::new(slow());
        let t0 = Instant::now();
        assert_eq!(breaker.admit(t0), Admission::Use);
        breaker.on_overload(t0, false);
        assert_eq!(
            breaker.admit(t0),
            Admission::Use,
            "one overload is not a storm"
        );
        breaker.on_overload(t0 + S(10), false);
        assert_eq!(breaker.admit(t0 + S(11)), Admission::Skip);
        assert!(breaker.is_cooling_down(t0 + S(39)));
        assert_eq!(breaker.admit(t0 + S(40)), Admission::Probe);
        assert_eq!(
            breaker.admit(t0 + S(40)),
            Admission::Skip,
            "one probe at a time"
        );
        breaker.on_other(true, true);
        assert_eq!(breaker.admit(t0 + S(41)), Admission::Use);
    }

    #[test]
    fn overloads_outside_the_window_do_not_add_up() {
        let breaker = Breaker::new(slow());
        let t0 = Instant::now();
        breaker.on_overload(t0, false);
        breaker.on_overload(t0 + S(61), false);
        assert_eq!(breaker.admit(t0 + S(61)), Admission::Use);
    }

    #[test]
    fn failed_probes_double_the_rest_up_to_the_cap() {
        let breaker = Breaker::new(Cooldown {
            overloads: 1,
            ..slow()
        });
        let mut now = Instant::now();
        breaker.on_overload(now, false);
        let mut rests = Vec::new();
        for _ in 0..6 {
            let mut waited = S(0);
            while breaker.admit(now + waited) != Admission::Probe {
                waited += S(1);
            }
            rests.push(waited.as_secs());
            now += waited;
            breaker.on_overload(now, true);
        }
        assert_eq!(rests, [30, 60, 120, 240, 300, 300]);
    }

    #[test]
    fn a_probe_that_ends_without_an_answer_frees_the_slot() {
        let breaker = Breaker::new(Cooldown {
            overloads: 1,
            ..slow()
        });
        let t0 = Instant::now();
        breaker.on_overload(t0, false);
        assert_eq!(breaker.admit(t0 + S(30)), Admission::Probe);
        breaker.release_probe();
        assert_eq!(breaker.admit(t0 + S(30)), Admission::Probe);
        breaker.on_other(true, false);
        assert_eq!(
            breaker.admit(t0 + S(30)),
            Admission::Probe,
            "a 400 says nothing about capacity"
        );
    }
}
