//! The response future of [`RequestIdLog`](super::RequestIdLog).

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Response};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tracing::Span;

use super::{MakeSpan, OnOutcome, Outcome, Shared};
use crate::classify::{self, Class};
use crate::headers;
use crate::model::Model;
use crate::observe::{self, CallContext};
use crate::{BoxError, Error, ErrorKind};

pin_project! {
    /// The future of one call through [`RequestIdLog`](super::RequestIdLog):
    /// the inner future, polled inside the call's span.
    pub struct ResponseFuture<F, M, O> {
        #[pin]
        inner: F,
        span: Span,
        shared: Arc<Shared<M, O>>,
        correlation_id: HeaderValue,
        model: Option<Model>,
        start: Instant,
        // Lent to the thread while the layers inside are polled, so they
        // can report each attempt as it ends.
        context: Option<CallContext>,
    }
}

impl<F, M, O> ResponseFuture<F, M, O> {
    pub(crate) fn new(
        inner: F,
        span: Span,
        shared: Arc<Shared<M, O>>,
        correlation_id: HeaderValue,
        model: Option<Model>,
        context: Option<CallContext>,
    ) -> Self {
        Self {
            inner,
            span,
            shared,
            correlation_id,
            model,
            start: Instant::now(),
            context,
        }
    }
}

/// This crate's error inside `error`, whether it is one or a boxed one.
fn crate_error<E: 'static>(error: &E) -> Option<&Error> {
    let any: &dyn Any = error;
    any.downcast_ref::<Error>()
        .or_else(|| any.downcast_ref::<BoxError>()?.downcast_ref::<Error>())
}

impl<F, M, O, R, E> Future for ResponseFuture<F, M, O>
where
    F: Future<Output = Result<Response<R>, E>>,
    E: fmt::Display + 'static,
    M: MakeSpan,
    O: OnOutcome,
{
    type Output = Result<Response<R>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let inner = this.inner;
        let mut result = ready!(observe::lend(this.context, || inner.poll(cx)));
        let latency = this.start.elapsed();
        let correlation_id = this.correlation_id.to_str().unwrap_or("-");
        let shared = &**this.shared;
        // Attempts the layers inside reported as they ended (and counted).
        let told = this.context.as_ref().map_or(0, |context| context.told);
        this.span.record(
            "tower_overload.time_to_response_head_ms",
            latency.as_millis() as u64,
        );
        // Whether the layers inside left the final attempt uncounted: a
        // first try that succeeded (no report), or no retry layer at all.
        let (class, served, uncounted) = match &mut result {
            Ok(response) => {
                #[cfg(feature = "retry")]
                let uncounted = response
                    .extensions()
                    .get::<crate::retry::RetryReport>()
                    .is_none();
                #[cfg(not(feature = "retry"))]
                let uncounted = true;
                let served = served_model(response).or_else(|| this.model.clone());
                let class = record_response(
                    shared,
                    response,
                    served.as_ref(),
                    correlation_id,
                    latency,
                    told,
                );
                this.span
                    .record("http.response.status_code", response.status().as_u16());
                (class, served, uncounted)
            }
            Err(error) => {
                let ours = crate_error(&*error);
                let class = ours.and_then(Error::class).unwrap_or(Class::Transport);
                let model = ours.and_then(Error::model).or(this.model.as_ref());
                let exhausted = ours.is_some_and(|e| {
                    matches!(
                        e.kind(),
                        ErrorKind::RetriesExhausted
                            | ErrorKind::BudgetExhausted
                            | ErrorKind::DeadlineExceeded
                    )
                });
                // The retry layer inside told of its attempts as they ended.
                let counted = told > 0 && ours.is_some_and(|e| e.attempts() > 0);
                let uncounted = ours.is_none_or(|e| e.attempts() == 0);
                if let Some(stats) = &shared.stats
                    && !counted
                {
                    stats.record(model, class);
                }
                if let Some(status) = ours.and_then(Error::status) {
                    this.span
                        .record("http.response.status_code", status.as_u16());
                }
                shared.on_outcome.on_outcome(&Outcome {
                    class,
                    status: ours.and_then(Error::status),
                    request_id: ours.and_then(Error::request_id),
                    correlation_id,
                    model,
                    attempt: ours
                        .filter(|e| e.attempts() > 0)
                        .map(|e| (e.attempts(), e.attempts())),
                    latency: Some(latency),
                    delay: ours.and_then(Error::server_delay),
                    is_final: true,
                    exhausted,
                    error: Some(&*error),
                    verdict: verdict_of_error(ours),
                });
                (class, model.cloned(), uncounted)
            }
        };
        if let Some(served) = &served {
            this.span
                .record("gen_ai.response.model", tracing::field::display(served));
        }
        if class.is_failure() {
            this.span.record("error.type", class.as_str());
        }
        #[cfg(feature = "metrics")]
        if let Some(table) = &shared.metrics {
            static UNKNOWN: Model = Model::from_static(crate::metrics::OTHER);
            let asked = this.model.as_ref().unwrap_or(&UNKNOWN);
            let served = served.as_ref().unwrap_or(asked);
            table.record(asked, served, class, latency, uncounted);
        }
        let _ = uncounted;
        Poll::Ready(result)
    }
}

/// Records the final outcome of a call answered with a response, and
/// returns its class. When the layers inside told nothing as it went (no
/// retry layer inside), the earlier attempts and the models given up are
/// recorded from the retry layer's and the fallback layer's reports.
fn record_response<M, O: OnOutcome, R>(
    shared: &Shared<M, O>,
    response: &mut Response<R>,
    served: Option<&Model>,
    correlation_id: &str,
    latency: Duration,
    told: u32,
) -> Class {
    let request_id = headers::request_id(response.headers());

    // Models given up by the fallback layer, with their attempts' ids.
    #[cfg(feature = "fallback")]
    if told == 0
        && let Some(served_by) = response.extensions().get::<crate::fallback::ServedBy>()
    {
        for record in served_by.fallbacks.iter().filter(|r| !r.skipped) {
            let class = record.class.unwrap_or(Class::Transport);
            for id in &record.request_ids {
                if let Some(stats) = &shared.stats {
                    stats.record(Some(&record.model), class);
                }
                shared.on_outcome.on_outcome(&Outcome {
                    class,
                    status: record.status,
                    request_id: Some(id),
                    correlation_id,
                    model: Some(&record.model),
                    attempt: None,
                    latency: None,
                    delay: None,
                    is_final: false,
                    exhausted: false,
                    error: None,
                    verdict: None,
                });
            }
        }
    }

    let (class, attempt, exhausted) = attempts_of(shared, response, served, correlation_id, told);
    let delay = if class.is_failure() {
        headers::server_delay(response.headers(), SystemTime::now())
    } else {
        None
    };
    shared.on_outcome.on_outcome(&Outcome {
        class,
        status: Some(response.status()),
        request_id: request_id.as_ref(),
        correlation_id,
        model: served,
        attempt,
        latency: Some(latency),
        delay,
        is_final: true,
        exhausted,
        error: None,
        verdict: verdict_of_response(response),
    });
    class
}

/// The health verdict an error carries, to log beside it.
fn verdict_of_error(error: Option<&Error>) -> Option<&dyn std::fmt::Display> {
    #[cfg(feature = "health")]
    if let Some(verdict) = error.and_then(Error::verdict) {
        return Some(verdict);
    }
    let _ = error;
    None
}

/// The health verdict a failed response carries (the retry layer's, with a monitor).
fn verdict_of_response<R>(response: &Response<R>) -> Option<&dyn std::fmt::Display> {
    #[cfg(feature = "health")]
    if let Some(verdict) = response.extensions().get::<crate::health::Verdict>() {
        return Some(verdict);
    }
    let _ = response;
    None
}

fn served_model<R>(response: &Response<R>) -> Option<Model> {
    #[cfg(feature = "fallback")]
    if let Some(served_by) = response.extensions().get::<crate::fallback::ServedBy>() {
        return Some(served_by.served.clone());
    }
    let _ = response;
    None
}

/// The final outcome's class, its attempt number and whether retries were
/// spent on it. When nothing was told as it went, earlier attempts in the
/// retry layer's report are recorded on the way, and every attempt (the
/// final one included) is counted in the stats.
fn attempts_of<M, O: OnOutcome, R>(
    shared: &Shared<M, O>,
    response: &Response<R>,
    model: Option<&Model>,
    correlation_id: &str,
    told: u32,
) -> (Class, Option<(u32, u32)>, bool) {
    #[cfg(feature = "retry")]
    if let Some(report) = response.extensions().get::<crate::retry::RetryReport>()
        && let Some((last, earlier)) = report.attempts.split_last()
    {
        if told == 0 {
            for (index, attempt) in earlier.iter().enumerate() {
                if let Some(stats) = &shared.stats {
                    stats.record(model, attempt.class);
                }
                shared.on_outcome.on_outcome(&Outcome {
                    class: attempt.class,
                    status: attempt.status,
                    request_id: attempt.request_id.as_ref(),
                    correlation_id,
                    model,
                    attempt: Some((index as u32 + 1, report.max_attempts)),
                    latency: None,
                    delay: attempt.wait_after,
                    is_final: false,
                    exhausted: false,
                    error: None,
                    verdict: None,
                });
            }
            if let Some(stats) = &shared.stats {
                stats.record(model, last.class);
            }
        }
        let exhausted = last.class.is_failure() && !earlier.is_empty();
        return (
            last.class,
            Some((report.attempts.len() as u32, report.max_attempts)),
            exhausted,
        );
    }
    let _ = (correlation_id, told);
    let class = classify::classify(response.status(), response.headers(), None).class;
    // A first try that succeeded is never told on the way: counted here.
    if let Some(stats) = &shared.stats {
        stats.record(model, class);
    }
    (class, None, false)
}

impl<F, M, O> fmt::Debug for ResponseFuture<F, M, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("correlation_id", &self.correlation_id)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}
