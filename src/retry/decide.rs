//! The pure decision core of the retry layer: what follows one failed
//! attempt, from the policy, the attempts so far and the attempt's outcome.
//!
//! [`RetryPolicy::decide`] answers and pays for a retry in one step; the
//! response future plans first and withdraws the retry's cost itself, so
//! the decision reads no shared state.

use std::time::Duration;

use rand::rngs::SmallRng;

use crate::classify::{Class, Classification};
use crate::retry::RetryPolicy;

// ===== impl RetryPolicy (decisions) =====

impl RetryPolicy {
    /// Decides what follows one failed attempt. Draws from the retry
    /// budget or quota only when it answers [`Decision::Retry`]; the rest is
    /// a pure function of its arguments.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_overload::classify::{Class, Classification};
    /// use tower_overload::retry::{AttemptLog, Decision, Outcome, RetryPolicy, StopReason};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let policy = RetryPolicy::foreground().budget(None).seed(1);
    /// let mut log = AttemptLog::default();
    /// let overloaded = Classification { class: Class::Overloaded, retryable: true, server_verdict: None };
    /// log.record(overloaded.class);
    /// let outcome = Outcome { verdict: overloaded, server_delay: None, elapsed: Duration::ZERO, body_replayable: true };
    /// let mut rng = policy.rng();
    /// assert!(matches!(policy.decide(&log, &outcome, &mut rng), Decision::Retry(d) if d <= Duration::from_secs(1)));
    ///
    /// let client_error = Outcome { verdict: Classification { retryable: false, ..overloaded }, ..outcome };
    /// assert_eq!(policy.decide(&log, &client_error, &mut rng), Decision::Stop(StopReason::NotRetryable));
    /// # }
    /// ```
    pub fn decide(&self, log: &AttemptLog, outcome: &Outcome, rng: &mut SmallRng) -> Decision {
        let decision = self.plan(log, outcome, rng);
        self.pay_for(decision, outcome.verdict.class)
    }

    /// Draws a retry's cost from the budget or quota when `decision` is a
    /// retry: the decision stands if it was paid for, else the call stops.
    pub(crate) fn pay_for(&self, decision: Decision, class: Class) -> Decision {
        match (decision, &self.rationing) {
            (Decision::Retry(_), Some(rationing)) if !rationing.try_retry(class) => {
                Decision::Stop(StopReason::BudgetExhausted)
            }
            _ => decision,
        }
    }

    /// The pure core of [`decide`](Self::decide): the same answer, with
    /// nothing drawn from the retry budget or quota. A caller that acts on
    /// a [`Decision::Retry`] pays for it with [`pay_for`](Self::pay_for).
    pub(crate) fn plan(&self, log: &AttemptLog, outcome: &Outcome, rng: &mut SmallRng) -> Decision {
        let verdict = outcome.verdict;
        if !verdict.class.is_failure() {
            return Decision::Stop(StopReason::Success);
        }
        if !verdict.retryable {
            return Decision::Stop(StopReason::NotRetryable);
        }
        // A class the policy has no settings for (a client error the server
        // said to retry) gets the server-error settings.
        let class_policy = self
            .class_policy(verdict.class)
            .unwrap_or(&self.server_error);
        let class_attempts = log.count(verdict.class);
        if class_attempts >= class_policy.max_attempts || log.attempts >= self.max_attempts {
            return Decision::Stop(StopReason::AttemptsExhausted);
        }
        if let Some(delay) = outcome.server_delay
            && delay > self.max_server_delay
        {
            return Decision::Stop(StopReason::ServerDelayTooLong(delay));
        }
        let retry_index = class_attempts.saturating_sub(1);
        let previous = log.last_delay.max(class_policy.backoff.base());
        let computed = class_policy.backoff.delay(retry_index, previous, rng);
        // The server's delay is a floor on ours, never a reason to hurry.
        let delay = outcome
            .server_delay
            .map_or(computed, |server| server.max(computed));
        if let Some(window) = self.retry_limit() {
            let remaining = window.saturating_sub(outcome.elapsed);
            if let Some(server) = outcome.server_delay
                && server > remaining
            {
                return Decision::Stop(StopReason::ServerDelayTooLong(server));
            }
            if delay > remaining {
                return Decision::Stop(StopReason::DeadlineExceeded);
            }
        }
        if !outcome.body_replayable {
            return Decision::Stop(StopReason::BodyNotReplayable);
        }
        Decision::Retry(delay)
    }

    /// The time after the call's start past which no retry may be started:
    /// the retry window, or the deadline if that is sooner.
    fn retry_limit(&self) -> Option<Duration> {
        match (self.retry_window, self.deadline) {
            (Some(window), Some(deadline)) => Some(window.min(deadline)),
            (window, deadline) => window.or(deadline),
        }
    }
}

/// The facts about one failed attempt that [`RetryPolicy::decide`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The attempt's classification.
    pub verdict: Classification,
    /// The delay the server asked for, or the reset of an exhausted rate-limit window.
    pub server_delay: Option<Duration>,
    /// Time since the call started.
    pub elapsed: Duration,
    /// Whether the request body can be sent again.
    pub body_replayable: bool,
}

/// Attempts made so far in one call, by class.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttemptLog {
    /// Attempts sent.
    pub attempts: u32,
    counts: [u32; Class::COUNT],
    /// The last wait before a retry.
    pub last_delay: Duration,
}

impl AttemptLog {
    /// Records an attempt that ended in `class`.
    ///
    /// ```
    /// # use tower_overload::{classify::Class, retry::AttemptLog};
    /// let mut log = AttemptLog::default();
    /// log.record(Class::Overloaded);
    /// log.record(Class::Overloaded);
    /// assert_eq!((log.attempts, log.count(Class::Overloaded)), (2, 2));
    /// ```
    pub fn record(&mut self, class: Class) {
        self.attempts += 1;
        self.counts[class.index()] += 1;
    }

    /// Attempts that ended in `class`.
    ///
    /// ```
    /// # use tower_overload::{classify::Class, retry::AttemptLog};
    /// assert_eq!(AttemptLog::default().count(Class::Timeout), 0);
    /// ```
    pub fn count(&self, class: Class) -> u32 {
        self.counts[class.index()]
    }
}

/// What follows a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Wait this long, then send the next attempt.
    Retry(Duration),
    /// Stop and return the last outcome.
    Stop(StopReason),
}

/// Why a call ended where it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StopReason {
    /// The last attempt succeeded.
    Success,
    /// The last outcome is not retryable (a client error, or `x-should-retry: false`).
    NotRetryable,
    /// The class's or the call's attempts are spent.
    AttemptsExhausted,
    /// The next wait would pass the deadline.
    DeadlineExceeded,
    /// The server asked for a longer wait than the policy or the deadline allows.
    ServerDelayTooLong(Duration),
    /// The shared retry budget refused a retry.
    BudgetExhausted,
    /// The request body cannot be sent again.
    BodyNotReplayable,
    /// The model's circuit breaker opened while the call was retrying it
    /// (a [`BreakerSignal`](crate::breaker_signal::BreakerSignal) from the
    /// fallback layer outside said so): the call stops so that the next
    /// model of its chain can answer, instead of finishing its retry loop.
    /// When the backoff had already begun, the call ends with an
    /// [`Error`](crate::Error) of kind
    /// [`RetriesExhausted`](crate::ErrorKind::RetriesExhausted) and the last
    /// attempt's class, which the fallback layer falls back on like the
    /// response it stands for.
    ModelUnavailable,
}

impl StopReason {
    /// The error kind a failure stopped for this reason turns into.
    pub(crate) fn error_kind(self) -> crate::ErrorKind {
        use crate::ErrorKind;
        match self {
            StopReason::Success | StopReason::NotRetryable => ErrorKind::NotRetryable,
            StopReason::AttemptsExhausted | StopReason::ModelUnavailable => {
                ErrorKind::RetriesExhausted
            }
            StopReason::DeadlineExceeded => ErrorKind::DeadlineExceeded,
            StopReason::ServerDelayTooLong(_) => ErrorKind::ServerDelayTooLong,
            StopReason::BudgetExhausted => ErrorKind::BudgetExhausted,
            StopReason::BodyNotReplayable => ErrorKind::BodyNotReplayable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backoff::Jitter;
    use crate::budget::RetryBudget;
    use crate::classify::ClientKind;
    use crate::retry::ClassPolicy;
    use crate::retry::policy::backoff;

    fn failed(class: Class) -> Outcome {
        Outcome {
            verdict: Classification {
                class,
                retryable: class.is_retryable_by_default(),
                server_verdict: None,
            },
            server_delay: None,
            elapsed: Duration::ZERO,
            body_replayable: true,
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy::foreground().budget(None).seed(9)
    }

    fn run(policy: &RetryPolicy, class: Class) -> (u32, StopReason) {
        let mut log = AttemptLog::default();
        let mut rng = policy.rng();
        loop {
            log.record(class);
            match policy.decide(&log, &failed(class), &mut rng) {
                Decision::Retry(delay) => log.last_delay = delay,
                Decision::Stop(reason) => return (log.attempts, reason),
            }
        }
    }

    #[test]
    fn attempts_per_class_follow_the_preset() {
        let policy = policy();
        assert_eq!(
            run(&policy, Class::Overloaded),
            (5, StopReason::AttemptsExhausted)
        );
        assert_eq!(
            run(&policy, Class::RateLimited),
            (3, StopReason::AttemptsExhausted)
        );
        assert_eq!(
            run(&policy, Class::ServerError),
            (3, StopReason::AttemptsExhausted)
        );
        assert_eq!(
            run(&policy, Class::Transport),
            (3, StopReason::AttemptsExhausted)
        );
        assert_eq!(
            run(&policy, Class::Client(ClientKind::Authentication)),
            (1, StopReason::NotRetryable)
        );
        assert_eq!(run(&policy, Class::Success), (1, StopReason::Success));
    }

    #[test]
    fn classes_have_separate_counts_under_one_total() {
        let policy = policy();
        let mut log = AttemptLog::default();
        let mut rng = policy.rng();
        for class in [
            Class::Overloaded,
            Class::Overloaded,
            Class::ServerError,
            Class::ServerError,
        ] {
            log.record(class);
            assert!(matches!(
                policy.decide(&log, &failed(class), &mut rng),
                Decision::Retry(_)
            ));
        }
        log.record(Class::Timeout);
        assert!(matches!(
            policy.decide(&log, &failed(Class::Timeout), &mut rng),
            Decision::Retry(_)
        ));
        log.record(Class::Overloaded);
        assert_eq!(
            policy.decide(&log, &failed(Class::Overloaded), &mut rng),
            Decision::Stop(StopReason::AttemptsExhausted),
            "six attempts in all"
        );
    }

    #[test]
    fn server_delay_is_a_floor_and_bounded() {
        let policy = policy();
        let mut log = AttemptLog::default();
        log.record(Class::RateLimited);
        let mut rng = policy.rng();
        let mut outcome = failed(Class::RateLimited);
        outcome.server_delay = Some(Duration::from_secs(3));
        for _ in 0..100 {
            match policy.decide(&log, &outcome, &mut rng) {
                Decision::Retry(delay) => assert_eq!(delay, Duration::from_secs(3)),
                other => panic!("{other:?}"),
            }
        }
        outcome.server_delay = Some(Duration::from_secs(61));
        assert_eq!(
            policy.decide(&log, &outcome, &mut rng),
            Decision::Stop(StopReason::ServerDelayTooLong(Duration::from_secs(61)))
        );
        let short = policy.clone().deadline(Some(Duration::from_secs(30)));
        outcome.server_delay = Some(Duration::from_secs(31));
        assert_eq!(
            short.decide(&log, &outcome, &mut rng),
            Decision::Stop(StopReason::ServerDelayTooLong(Duration::from_secs(31)))
        );
    }

    #[test]
    fn deadline_stops_a_wait_that_would_pass_it() {
        let policy = policy()
            .deadline(Some(Duration::from_secs(10)))
            .overloaded(ClassPolicy::new(5, backoff(4_000, 4_000, Jitter::None)));
        let mut log = AttemptLog::default();
        log.record(Class::Overloaded);
        let mut rng = policy.rng();
        let mut outcome = failed(Class::Overloaded);
        outcome.elapsed = Duration::from_secs(6);
        assert_eq!(
            policy.decide(&log, &outcome, &mut rng),
            Decision::Retry(Duration::from_secs(4))
        );
        outcome.elapsed = Duration::from_millis(6_001);
        assert_eq!(
            policy.decide(&log, &outcome, &mut rng),
            Decision::Stop(StopReason::DeadlineExceeded)
        );
    }

    #[test]
    fn server_verdict_and_body_and_budget_stop_retries() {
        let mut rng = policy().rng();
        let mut log = AttemptLog::default();
        log.record(Class::Overloaded);
        let mut outcome = failed(Class::Overloaded);
        outcome.verdict.retryable = false;
        assert_eq!(
            policy().decide(&log, &outcome, &mut rng),
            Decision::Stop(StopReason::NotRetryable)
        );
        let mut outcome = failed(Class::Overloaded);
        outcome.body_replayable = false;
        assert_eq!(
            policy().decide(&log, &outcome, &mut rng),
            Decision::Stop(StopReason::BodyNotReplayable)
        );
        let empty = RetryBudget::new(Duration::from_secs(10), 0, 0.0);
        let budgeted = policy().budget(Some(empty));
        assert_eq!(
            budgeted.decide(&log, &failed(Class::Overloaded), &mut rng),
            Decision::Stop(StopReason::BudgetExhausted)
        );
    }

    #[test]
    fn client_error_the_server_says_to_retry_uses_server_error_settings() {
        let policy = policy();
        let mut outcome = failed(Class::Client(ClientKind::InvalidRequest));
        outcome.verdict.retryable = true;
        let mut log = AttemptLog::default();
        let mut rng = policy.rng();
        log.record(outcome.verdict.class);
        assert!(matches!(
            policy.decide(&log, &outcome, &mut rng),
            Decision::Retry(_)
        ));
        log.record(outcome.verdict.class);
        log.record(outcome.verdict.class);
        assert_eq!(
            policy.decide(&log, &outcome, &mut rng),
            Decision::Stop(StopReason::AttemptsExhausted)
        );
    }

    #[test]
    fn seeded_calls_reproduce_and_differ_from_each_other() {
        let delays = |policy: &RetryPolicy| {
            let mut rng = policy.rng();
            let backoff = policy.overloaded.backoff;
            (0..4)
                .map(|n| backoff.delay(n, backoff.base(), &mut rng))
                .collect::<Vec<_>>()
        };
        let a = RetryPolicy::foreground().seed(5);
        let b = RetryPolicy::foreground().seed(5);
        let (a1, a2) = (delays(&a), delays(&a));
        assert_eq!((delays(&b), delays(&b)), (a1.clone(), a2.clone()));
        assert_ne!(a1, a2, "two calls draw different jitter");
    }
}
