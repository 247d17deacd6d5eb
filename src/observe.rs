//! How the layers inside a call tell the log layer outside of each attempt
//! as it ends, and of each model skipped, while the call goes on.
//!
//! The log layer polls the layers inside it (as `tracing` enters a span):
//! for the length of each poll, and of its inner `call`, it lends its call's
//! context to the thread, and the retry and fallback layers report to it
//! there. Nothing travels in the request (no header, no extension, no
//! allocation), and without a log layer outside a report costs a
//! thread-local read.

// The log layer listens, the retry and fallback layers report: a build
// without all three leaves part of this unused.
#![cfg_attr(
    not(all(feature = "retry", feature = "request-id", feature = "fallback")),
    allow(dead_code)
)]

use std::cell::Cell;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, StatusCode};

use crate::classify::Class;
use crate::headers::RequestId;
use crate::model::Model;

/// One attempt that just ended.
#[cfg_attr(not(any(feature = "retry", feature = "request-id")), allow(dead_code))]
pub(crate) struct AttemptEnded<'a> {
    pub(crate) model: Option<&'a Model>,
    pub(crate) class: Class,
    pub(crate) status: Option<StatusCode>,
    pub(crate) request_id: Option<&'a RequestId>,
    /// 1-based, and the most the retry policy allows.
    pub(crate) number: u32,
    pub(crate) max: u32,
    /// From the attempt's start to its response head (or its end).
    pub(crate) latency: Duration,
    /// The backoff before the next attempt; `None` when none follows.
    pub(crate) wait: Option<Duration>,
    pub(crate) error: Option<&'a dyn fmt::Display>,
}

/// Why a call did not try a model of its chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    not(any(feature = "fallback", feature = "request-id")),
    allow(dead_code)
)]
pub(crate) enum SkipReason {
    /// The model's breaker is open: it is cooling down, or another call is
    /// probing it.
    BreakerOpen,
}

impl SkipReason {
    #[cfg_attr(not(feature = "request-id"), allow(dead_code))]
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SkipReason::BreakerOpen => "breaker_open",
        }
    }
}

/// What the log layer does with the reports.
pub(crate) trait ObserveCall: Send + Sync {
    fn attempt_ended(&self, correlation_id: &HeaderValue, attempt: &AttemptEnded<'_>);
    fn model_skipped(
        &self,
        correlation_id: &HeaderValue,
        model: &Model,
        reason: SkipReason,
        next: Option<&Model>,
    );
}

/// A call's context, lent to the thread while the log layer polls inside.
pub(crate) struct CallContext {
    pub(crate) sink: Arc<dyn ObserveCall>,
    pub(crate) correlation_id: HeaderValue,
    /// How many attempts were reported.
    pub(crate) told: u32,
}

thread_local! {
    static CURRENT: Cell<Option<CallContext>> = const { Cell::new(None) };
}

/// Runs `f` with `context` lent to the thread (and put back after).
#[cfg_attr(not(feature = "request-id"), allow(dead_code))]
pub(crate) fn lend<T>(context: &mut Option<CallContext>, f: impl FnOnce() -> T) -> T {
    struct Restore<'a> {
        context: &'a mut Option<CallContext>,
        previous: Option<CallContext>,
    }
    impl Drop for Restore<'_> {
        fn drop(&mut self) {
            *self.context = CURRENT.with(|current| current.replace(self.previous.take()));
        }
    }
    let previous = CURRENT.with(|current| current.replace(context.take()));
    let _restore = Restore { context, previous };
    f()
}

/// Reports an attempt to the call's log layer, if one is polling.
#[cfg_attr(not(feature = "retry"), allow(dead_code))]
pub(crate) fn attempt_ended(attempt: impl FnOnce() -> Option<ReportedAttempt>) {
    with_current(|context| {
        let Some(reported) = attempt() else {
            return;
        };
        context.told += 1;
        context.sink.attempt_ended(
            &context.correlation_id,
            &AttemptEnded {
                model: reported.model.as_ref(),
                class: reported.class,
                status: reported.status,
                request_id: reported.request_id.as_ref(),
                number: reported.number,
                max: reported.max,
                latency: reported.latency,
                wait: reported.wait,
                error: reported.error.as_ref().map(|e| e as &dyn fmt::Display),
            },
        );
    });
}

/// An attempt as the retry layer reports it (owned: built only when a log
/// layer listens).
#[cfg_attr(not(feature = "retry"), allow(dead_code))]
pub(crate) struct ReportedAttempt {
    pub(crate) model: Option<Model>,
    pub(crate) class: Class,
    pub(crate) status: Option<StatusCode>,
    pub(crate) request_id: Option<RequestId>,
    pub(crate) number: u32,
    pub(crate) max: u32,
    pub(crate) latency: Duration,
    pub(crate) wait: Option<Duration>,
    pub(crate) error: Option<String>,
}

/// Reports a model skipped, if a log layer is polling.
#[cfg_attr(not(feature = "fallback"), allow(dead_code))]
pub(crate) fn model_skipped(model: &Model, reason: SkipReason, next: Option<&Model>) {
    with_current(|context| {
        context
            .sink
            .model_skipped(&context.correlation_id, model, reason, next);
    });
}

/// Whether a log layer is listening on this thread now.
#[cfg_attr(not(feature = "retry"), allow(dead_code))]
pub(crate) fn listening() -> bool {
    CURRENT.with(|current| {
        let context = current.take();
        let listening = context.is_some();
        current.set(context);
        listening
    })
}

fn with_current(f: impl FnOnce(&mut CallContext)) {
    CURRENT.with(|current| {
        // Taken while `f` runs: a report made from inside a report (a
        // callback that calls a service) finds no listener, not a loop.
        if let Some(mut context) = current.take() {
            f(&mut context);
            current.set(Some(context));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Seen(Mutex<Vec<String>>);

    impl ObserveCall for Seen {
        fn attempt_ended(&self, id: &HeaderValue, attempt: &AttemptEnded<'_>) {
            self.0.lock().unwrap().push(format!(
                "{} attempt {} {}",
                id.to_str().unwrap(),
                attempt.number,
                attempt.class
            ));
        }
        fn model_skipped(
            &self,
            id: &HeaderValue,
            model: &Model,
            reason: SkipReason,
            _: Option<&Model>,
        ) {
            self.0.lock().unwrap().push(format!(
                "{} skipped {model} {}",
                id.to_str().unwrap(),
                reason.as_str()
            ));
        }
    }

    fn attempt(number: u32) -> Option<ReportedAttempt> {
        Some(ReportedAttempt {
            model: None,
            class: Class::Overloaded,
            status: None,
            request_id: None,
            number,
            max: 3,
            latency: Duration::ZERO,
            wait: None,
            error: None,
        })
    }

    #[test]
    fn reports_reach_the_lent_context_only_while_lent() {
        let seen = Arc::new(Seen::default());
        let mut context = Some(CallContext {
            sink: seen.clone(),
            correlation_id: HeaderValue::from_static("cli_1"),
            told: 0,
        });
        attempt_ended(|| attempt(1));
        assert!(!listening());
        lend(&mut context, || {
            assert!(listening());
            attempt_ended(|| attempt(2));
            model_skipped(&Model::new("m"), SkipReason::BreakerOpen, None);
        });
        assert!(!listening());
        assert_eq!(context.as_ref().unwrap().told, 1);
        assert_eq!(
            *seen.0.lock().unwrap(),
            ["cli_1 attempt 2 overloaded", "cli_1 skipped m breaker_open"]
        );
    }
}
