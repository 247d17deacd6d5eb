//! The response future of [`OverloadRetry`](super::OverloadRetry): a hand-written state machine.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes};
use http::{HeaderValue, Request, Response, StatusCode, response};
use http_body::Body;
use pin_project_lite::pin_project;
use rand::rngs::SmallRng;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use crate::body::{PeekedBody, ReplayableBody};
use crate::breaker_signal::BreakerSignal;
use crate::budget::Rationing;
use crate::classify::{self, Class, Classification, Hints, MAX_SNIFF_BYTES};
use crate::model::{self, Model};
use crate::retry::report::{Attempt, AttemptRecord, RetryReport};
use crate::retry::stream_guard::{StreamPeek, stream_verdict, worth_peeking};
use crate::retry::{AttemptLog, Decision, FinalFailure, Outcome, RetryPolicy, StopReason};
use crate::sse::{FirstEvent, MidStreamErrors};
use crate::template::RequestTemplate;
use crate::{BoxError, Error, ErrorKind, headers};

pin_project! {
    /// The future of one logical call through [`OverloadRetry`](super::OverloadRetry).
    ///
    /// No allocation beyond the attempt's own request, no task, no lock:
    /// dropping it at any point (mid-attempt, mid-wait) drops the attempt
    /// and the spare body, and nothing is left behind.
    pub struct ResponseFuture<S, B, R>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future, R>,
        service: S,
        call: Call<B>,
        // The attempt timeout and the deadline share one timer, made the
        // first time an attempt is not ready at once: a service that answers
        // on its first poll never pays for it.
        timer: Option<Pin<Box<Sleep>>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, R> {
        // An attempt is in flight.
        Called { #[pin] future: F },
        // A failed response's body is being read to classify it. Boxed,
        // like the timers below: inline, the read's state would be moved
        // with every call's future, success path included.
        Sniffing { sniff: Box<Sniff<R>> },
        // Backing off before the next attempt. The timers are boxed: they
        // exist only on the failure path, and inline they would triple the
        // size of every call's future, success path included.
        Waiting { sleep: Pin<Box<Sleep>> },
        // Waiting for the inner service to be ready for the next attempt.
        Ready,
        // The output was returned.
        Done,
    }
}

/// A response whose first bytes are being read before it is judged.
struct Sniff<R> {
    parts: Option<response::Parts>,
    body: Option<R>,
    chunks: Vec<Bytes>,
    len: usize,
    timer: Pin<Box<Sleep>>,
    /// Set when this is the stream guard reading a 200's first event.
    stream: Option<Box<StreamPeek>>,
}

/// Everything about the call that outlives one attempt.
struct Call<B> {
    policy: Arc<RetryPolicy>,
    template: RequestTemplate,
    /// A copy of the body kept for the next attempt.
    spare: Option<B>,
    /// The body of the next attempt, set when a retry is decided.
    next: Option<B>,
    log: AttemptLog,
    records: Vec<AttemptRecord>,
    waited: Duration,
    started: Instant,
    /// When the call must end, attempt in flight included.
    deadline_at: Option<Instant>,
    /// When the attempt in flight was sent.
    attempt_started: Instant,
    rng: Option<SmallRng>,
    /// Attempts told to the log layer and the metrics so far.
    reported: u32,
    /// The model, once read (for reports, metrics and errors).
    model: Option<Option<Model>>,
}

/// Which bound a call's timer reached.
enum Expiry {
    /// The whole call's deadline.
    Deadline,
    /// The attempt's wait for its response head.
    Attempt,
}

/// Builds an attempt: the original head, this body, the attempt's number.
fn attempt_request<B>(
    template: &RequestTemplate,
    body: B,
    attempt: Attempt,
    policy: &RetryPolicy,
) -> Request<B> {
    let mut request = template.build(body);
    // The first attempt carries no `Attempt`: absence means attempt 1, and
    // the success path allocates nothing for it.
    if attempt.is_retry() {
        request.extensions_mut().insert(attempt);
    }
    if let Some(name) = &policy.retry_count_header {
        request
            .headers_mut()
            .insert(name.clone(), HeaderValue::from(attempt.number - 1));
    }
    request
}

impl<S, B, R> ResponseFuture<S, B, R>
where
    S: Service<Request<B>, Response = Response<R>>,
    B: ReplayableBody,
{
    pub(crate) fn new(mut service: S, request: Request<B>, policy: Arc<RetryPolicy>) -> Self {
        let started = Instant::now();
        if let Some(Rationing::Budget(budget)) = &policy.rationing {
            budget.deposit();
        }
        let (parts, body) = request.into_parts();
        let spare = body.try_clone_body();
        let template = RequestTemplate::new(parts);
        let first = attempt_request(
            &template,
            body,
            Attempt {
                number: 1,
                max: policy.max_attempts,
            },
            &policy,
        );
        let deadline_at = policy
            .deadline
            .and_then(|deadline| started.checked_add(deadline));
        let future = service.call(first);
        Self {
            state: State::Called { future },
            service,
            call: Call {
                policy,
                template,
                spare,
                next: None,
                log: AttemptLog::default(),
                records: Vec::new(),
                waited: Duration::ZERO,
                started,
                deadline_at,
                attempt_started: started,
                rng: None,
                reported: 0,
                model: None,
            },
            timer: None,
        }
    }
}

/// What to do after an attempt's outcome was judged.
enum Step<R: Body> {
    Retry(Duration),
    Finish(Result<Response<PeekedBody<R>>, Error>),
}

impl<B: ReplayableBody> Call<B> {
    /// Readies the body of the next attempt; `false` if it cannot be replayed.
    fn prepare_body(&mut self) -> bool {
        if self.next.is_some() {
            return true;
        }
        let Some(spare) = self.spare.take() else {
            return false;
        };
        match spare.try_clone_body() {
            Some(copy) => {
                self.next = Some(spare);
                self.spare = Some(copy);
                true
            }
            None => false,
        }
    }

    /// Tells the health monitor, when one is set, of an attempt's outcome.
    #[cfg(feature = "health")]
    fn tell_health(&self, class: Class) {
        if let Some(monitor) = &self.policy.health {
            monitor.observe(self.model().as_ref(), class, Some(self.template.head()));
        }
    }

    fn decide(&mut self, verdict: Classification, server_delay: Option<Duration>) -> Decision {
        #[cfg(feature = "health")]
        self.tell_health(verdict.class);
        // Defect 12: the model's breaker (fallback layer outside) hears of every
        // failed attempt, and a call stops retrying a model it has opened for.
        if let Some(signal) = self.template.extensions().get::<BreakerSignal>() {
            signal.on_failure(verdict.class);
            if verdict.retryable && signal.should_stop(verdict.class) {
                return Decision::Stop(StopReason::ModelUnavailable);
            }
        }
        let body_replayable = verdict.retryable && self.prepare_body();
        let outcome = Outcome {
            verdict,
            server_delay,
            elapsed: self.started.elapsed(),
            body_replayable,
        };
        let policy = Arc::clone(&self.policy);
        let rng = self.rng.get_or_insert_with(|| policy.rng());
        // The decision is pure; the retry it grants is paid for here.
        let decision = policy.plan(&self.log, &outcome, rng);
        policy.pay_for(decision, verdict.class)
    }

    fn report_decision(&mut self, decision: &Decision, error: Option<&BoxError>) {
        let wait = match decision {
            Decision::Retry(delay) => Some(*delay),
            Decision::Stop(_) => None,
        };
        self.report_last(wait, error);
    }

    /// After a backoff: the error that ends the call when the model's
    /// breaker opened meanwhile (the last response is gone; its class lets
    /// the fallback layer outside move on).
    fn unavailable_after_wait(&mut self) -> Option<Error> {
        let class = self.records.last()?.class;
        let signal = self.template.extensions().get::<BreakerSignal>()?;
        signal.should_stop(class).then(|| {
            // The retry was paid for when it was granted and is not sent.
            if let Some(Rationing::Quota(quota)) = &self.policy.rationing {
                quota.refund(class);
            }
            self.error(
                StopReason::ModelUnavailable.error_kind(),
                class,
                StopReason::ModelUnavailable,
            )
        })
    }

    fn record(
        &mut self,
        class: Class,
        status: Option<StatusCode>,
        request_id: Option<headers::RequestId>,
    ) {
        self.log.record(class);
        self.records.push(AttemptRecord {
            class,
            status,
            request_id,
            wait_after: None,
        });
    }

    fn schedule(&mut self, delay: Duration) {
        self.log.last_delay = delay;
        self.waited += delay;
        if let Some(last) = self.records.last_mut() {
            last.wait_after = Some(delay);
        }
    }

    fn report(&mut self, stop: StopReason) -> RetryReport {
        RetryReport {
            attempts: std::mem::take(&mut self.records),
            waited: self.waited,
            elapsed: self.started.elapsed(),
            stop,
            max_attempts: self.policy.max_attempts,
        }
    }

    /// The model the call is for, for error messages: from the request's
    /// extensions, else read from an in-memory body.
    fn model(&self) -> Option<Model> {
        if let Some(known) = &self.model {
            return known.clone();
        }
        if let Some(model) = self.template.extensions().get::<Model>() {
            return Some(model.clone());
        }
        let body = self.spare.as_ref().or(self.next.as_ref())?.in_memory()?;
        model::extract(&body).map(|name| Model::from_name(&name))
    }

    /// The model, read once and kept.
    fn model_kept(&mut self) -> Option<Model> {
        if self.model.is_none() {
            self.model = Some(self.model());
        }
        self.model.clone().flatten()
    }

    /// Tells the log layer (when one listens) and the metrics (when on) of
    /// the last attempt, once it is judged: `wait` is the backoff before
    /// the next one, `None` when none follows.
    fn report_last(&mut self, wait: Option<Duration>, error: Option<&BoxError>) {
        let number = self.log.attempts;
        if self.reported >= number {
            return;
        }
        self.reported = number;
        let Some(last) = self.records.last() else {
            return;
        };
        let (class, status, request_id) = (last.class, last.status, last.request_id.clone());
        let latency = self.attempt_started.elapsed();
        #[cfg(feature = "metrics")]
        if let Some(meters) = self.policy.metrics.clone() {
            let model = self.model_kept();
            meters.table.with(model.as_ref(), |meters| {
                meters.attempt(class, wait.is_some());
                if let Some(wait) = wait {
                    meters.retry(class, wait);
                }
            });
        }
        if !crate::observe::listening() {
            return;
        }
        let model = self.model_kept();
        let max = self.policy.max_attempts;
        crate::observe::attempt_ended(|| {
            Some(crate::observe::ReportedAttempt {
                model,
                class,
                status,
                request_id,
                number,
                max,
                latency,
                wait,
                error: error.map(ToString::to_string),
            })
        });
    }

    /// A success pays the shared quota back as the AWS standard mode does:
    /// what the retry that led to it cost, or one token for a first try.
    /// Without this a quota drains for good after its first hundred retries.
    /// Called before the success is recorded: the last record, if any, is
    /// the failure the successful retry followed.
    fn refill_quota(&self) {
        if let Some(Rationing::Quota(quota)) = &self.policy.rationing {
            quota.on_success(self.records.last().map(|before| before.class));
        }
    }

    /// The bound the timer should ring at now: the deadline, or for an
    /// attempt in flight its own timeout if that comes first.
    fn limit(&self, in_flight: bool) -> Option<(Instant, Expiry)> {
        let attempt = in_flight
            .then(|| {
                let timeout = self.policy.attempt_timeout?;
                self.attempt_started.checked_add(timeout)
            })
            .flatten();
        match (self.deadline_at, attempt) {
            (Some(deadline), Some(attempt)) if attempt < deadline => {
                Some((attempt, Expiry::Attempt))
            }
            (Some(deadline), _) => Some((deadline, Expiry::Deadline)),
            (None, Some(attempt)) => Some((attempt, Expiry::Attempt)),
            (None, None) => None,
        }
    }

    /// Polls the call's timer against [`limit`](Self::limit).
    fn poll_timer(
        &self,
        timer: &mut Option<Pin<Box<Sleep>>>,
        cx: &mut Context<'_>,
        in_flight: bool,
    ) -> Poll<Expiry> {
        let Some((at, expiry)) = self.limit(in_flight) else {
            return Poll::Pending;
        };
        let sleep = match timer {
            Some(sleep) => {
                if sleep.deadline() != at {
                    sleep.as_mut().reset(at);
                }
                sleep
            }
            None => timer.insert(Box::pin(tokio::time::sleep_until(at))),
        };
        ready!(sleep.as_mut().poll(cx));
        Poll::Ready(expiry)
    }

    /// The attempt in flight got no response head in time: a timeout,
    /// retried like a 504 since nothing reached the caller.
    fn on_attempt_timeout<R: Body>(&mut self) -> Step<R> {
        let verdict = Classification {
            class: Class::Timeout,
            retryable: true,
            server_verdict: None,
        };
        self.record(Class::Timeout, None, None);
        let decision = self.decide(verdict, None);
        self.report_decision(&decision, None);
        match decision {
            Decision::Retry(delay) => {
                self.schedule(delay);
                Step::Retry(delay)
            }
            Decision::Stop(stop) => {
                let kind = match stop {
                    StopReason::NotRetryable => ErrorKind::Timeout,
                    other => other.error_kind(),
                };
                Step::Finish(Err(self.error(kind, Class::Timeout, stop)))
            }
        }
    }

    /// The call's deadline passed; an attempt in flight is cancelled and counted.
    fn deadline_error(&mut self, in_flight: bool) -> Error {
        if in_flight {
            self.record(Class::Timeout, None, None);
        }
        self.report_last(None, None);
        let class = self
            .records
            .last()
            .map_or(Class::Timeout, |last| last.class);
        self.error(
            ErrorKind::DeadlineExceeded,
            class,
            StopReason::DeadlineExceeded,
        )
    }

    fn error(&mut self, kind: ErrorKind, class: Class, stop: StopReason) -> Error {
        let mut error = Error::new(kind)
            .with_class(class)
            .with_attempts(self.log.attempts)
            .with_elapsed(self.started.elapsed());
        if let StopReason::ServerDelayTooLong(delay) = stop {
            error = error.with_server_delay(delay);
        }
        if let Some(model) = self.model() {
            #[cfg(feature = "health")]
            if let Some(monitor) = &self.policy.health {
                error = error.with_verdict(monitor.verdict_for(model.as_str()));
            }
            error = error.with_model(model);
        }
        if let Some(status) = self.records.last().and_then(|last| last.status) {
            error = error.with_status(status);
        }
        let mut ids: Vec<_> = self
            .records
            .iter()
            .filter_map(|record| record.request_id.clone())
            .collect();
        if let Some(last) = ids.pop() {
            error = error.with_request_id(last).with_earlier_request_ids(ids);
        }
        error
    }

    fn on_response<R>(
        &mut self,
        parts: response::Parts,
        body: PeekedBody<R>,
        verdict: Classification,
    ) -> Step<R>
    where
        R: Body,
    {
        if !verdict.class.is_failure() {
            #[cfg(feature = "health")]
            self.tell_health(verdict.class);
            self.refill_quota();
            // A first try that succeeded leaves no report: its absence says
            // "one attempt, success", and the common path allocates nothing.
            let stop = if self.records.is_empty() {
                self.log.record(verdict.class);
                // A first try that succeeded is the call's own outcome: the
                // log layer outside records it (attempt and all), and this
                // layer reads nothing for it (not even the model).
                None
            } else {
                self.record(
                    verdict.class,
                    Some(parts.status),
                    headers::request_id(&parts.headers),
                );
                self.report_last(None, None);
                Some(StopReason::Success)
            };
            return Step::Finish(Ok(self.finish_response(parts, body, stop)));
        }
        let now = SystemTime::now();
        let hints = Hints::from_headers(&parts.headers, now);
        // A rate-limit window's reset says when a 429 can succeed; it says
        // nothing about an overload or a server error.
        let server_delay = if verdict.class == Class::RateLimited {
            hints.wait(now)
        } else {
            hints.server_delay
        };
        self.record(verdict.class, Some(parts.status), hints.request_id.clone());
        let decision = self.decide(verdict, server_delay);
        self.report_decision(&decision, None);
        match decision {
            Decision::Retry(delay) => {
                self.schedule(delay);
                Step::Retry(delay)
            }
            Decision::Stop(stop) => {
                let typed = matches!(stop, StopReason::ServerDelayTooLong(_))
                    || self.policy.final_failure == FinalFailure::Error;
                if typed {
                    Step::Finish(Err(self.error(stop.error_kind(), verdict.class, stop)))
                } else {
                    Step::Finish(Ok(self.finish_response(parts, body, Some(stop))))
                }
            }
        }
    }

    fn on_error<R: Body>(&mut self, error: BoxError) -> Step<R> {
        let verdict = self.policy.error_classifier.classify_error(&*error);
        self.record(verdict.class, None, None);
        let decision = self.decide(verdict, None);
        self.report_decision(&decision, Some(&error));
        match decision {
            Decision::Retry(delay) => {
                self.schedule(delay);
                Step::Retry(delay)
            }
            Decision::Stop(stop) => {
                // An error of this crate from an inner layer (a full queue,
                // say) already says what happened: pass it on as it is.
                // A layer inside that only wrapped a foreign error (the
                // convention) is seen through: this error has the context.
                let error = match error.downcast::<Error>().map(|ours| ours.into_foreign()) {
                    Ok(Ok(foreign)) => foreign,
                    Ok(Err(ours)) => return Step::Finish(Err(ours)),
                    Err(other) => other,
                };
                let kind = match stop {
                    StopReason::NotRetryable => ErrorKind::Transport,
                    other => other.error_kind(),
                };
                Step::Finish(Err(self
                    .error(kind, verdict.class, stop)
                    .with_source(error)))
            }
        }
    }

    fn finish_response<R: Body>(
        &mut self,
        parts: response::Parts,
        body: PeekedBody<R>,
        stop: Option<StopReason>,
    ) -> Response<PeekedBody<R>> {
        // Once the body is the caller's, a silent upstream must end it
        // with an error rather than leave the caller reading forever.
        let body = match self.policy.idle_timeout {
            Some(idle) => body.with_idle_timeout(idle),
            None => body,
        };
        #[cfg(feature = "metrics")]
        // Only a success whose body reports usage (JSON or a stream) is
        // measured, and only then is the model read.
        #[cfg(feature = "metrics")]
        let body = match crate::metrics::BodyMeter::measured(parts.status, &parts.headers)
            .zip(self.policy.metrics.clone())
        {
            Some((stream, meters)) => {
                let model = self.model_kept();
                body.with_meter(crate::metrics::BodyMeter::new(
                    &meters,
                    model.as_ref(),
                    stream,
                    self.started,
                ))
            }
            None => body,
        };
        let mut response = Response::from_parts(parts, body);
        // A failure returned as a response carries the verdict as an
        // extension, as a typed error carries it in its message.
        #[cfg(feature = "health")]
        if stop.is_some_and(|stop| stop != StopReason::Success)
            && let Some(monitor) = &self.policy.health
            && let Some(model) = self.model()
        {
            let verdict = monitor.verdict_for(model.as_str());
            if !verdict.is_unknown() {
                response.extensions_mut().insert(verdict);
            }
        }
        if let Some(stop) = stop {
            let report = self.report(stop);
            response.extensions_mut().insert(report);
        }
        response
    }

    fn next_request(&mut self) -> Option<Request<B>> {
        let body = self.next.take()?;
        let attempt = Attempt {
            number: self.log.attempts + 1,
            max: self.policy.max_attempts,
        };
        Some(attempt_request(&self.template, body, attempt, &self.policy))
    }
}

/// Whether the body can change what the status and headers say: a 5xx may
/// say "Overloaded", a 429 without a delay may be a spend limit. Read even
/// when the server gave its verdict: `x-should-retry` decides whether to
/// retry, the body still decides which class (defect 6).
fn worth_sniffing(parts: &response::Parts, verdict: &Classification) -> bool {
    classify::body_may_change(verdict.class, &parts.headers)
}

impl<S, B, R> Future for ResponseFuture<S, B, R>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Error: Into<BoxError>,
    B: ReplayableBody,
    R: Body + Unpin,
    R::Data: Buf,
{
    type Output = Result<Response<PeekedBody<R>>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let step = match this.state.as_mut().project() {
                StateProj::Called { future } => match future.poll(cx) {
                    Poll::Pending => match this.call.poll_timer(this.timer, cx, true) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Expiry::Deadline) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(this.call.deadline_error(true)));
                        }
                        Poll::Ready(Expiry::Attempt) => {
                            // Dropping the attempt's future cancels it.
                            this.state.set(State::Ready);
                            this.call.on_attempt_timeout()
                        }
                    },
                    Poll::Ready(Ok(response)) => {
                        let (parts, body) = response.into_parts();
                        let verdict = classify::classify(parts.status, &parts.headers, None);
                        let stream = worth_peeking(&parts, &verdict, this.call.policy.stream_guard);
                        if stream.is_some() || worth_sniffing(&parts, &verdict) {
                            let wait = match &stream {
                                Some(peek) => peek.guard.peek_timeout,
                                None => this.call.policy.sniff_timeout,
                            };
                            this.state.set(State::Sniffing {
                                sniff: Box::new(Sniff {
                                    parts: Some(parts),
                                    body: Some(body),
                                    chunks: Vec::new(),
                                    len: 0,
                                    timer: Box::pin(tokio::time::sleep(wait)),
                                    stream,
                                }),
                            });
                            continue;
                        }
                        this.call.on_response(parts, PeekedBody::new(body), verdict)
                    }
                    Poll::Ready(Err(error)) => this.call.on_error(error.into()),
                },
                StateProj::Sniffing { sniff } => {
                    let Sniff {
                        parts,
                        body,
                        chunks,
                        len,
                        timer,
                        stream,
                    } = &mut **sniff;
                    // The caller has not seen the head yet, so the deadline
                    // still bounds this read (a stalled body, a silent stream).
                    if this.call.poll_timer(this.timer, cx, false).is_ready() {
                        let (class, status, id) =
                            parts
                                .as_ref()
                                .map_or((Class::Timeout, None, None), |parts| {
                                    let class =
                                        classify::classify(parts.status, &parts.headers, None)
                                            .class;
                                    let class = if class.is_failure() {
                                        class
                                    } else {
                                        Class::Timeout
                                    };
                                    (
                                        class,
                                        Some(parts.status),
                                        headers::request_id(&parts.headers),
                                    )
                                });
                        this.call.record(class, status, id);
                        let error = this.call.deadline_error(false);
                        this.state.set(State::Done);
                        return Poll::Ready(Err(error));
                    }
                    let mut failure = None;
                    let mut ended = false;
                    let mut tail = None;
                    let limit = stream
                        .as_ref()
                        .map_or(MAX_SNIFF_BYTES, |p| p.guard.max_peek_bytes);
                    let timed_out = timer.as_mut().poll(cx).is_ready();
                    if !timed_out {
                        let Some(inner) = body.as_mut() else {
                            return Poll::Ready(Err(Error::new(ErrorKind::Transport)));
                        };
                        while *len < limit {
                            if let Some(peek) = stream.as_ref()
                                && peek.first != FirstEvent::Incomplete
                            {
                                break;
                            }
                            match Pin::new(&mut *inner).poll_frame(cx) {
                                Poll::Pending => return Poll::Pending,
                                Poll::Ready(None) => {
                                    ended = true;
                                    break;
                                }
                                Poll::Ready(Some(Err(error))) => {
                                    failure = Some(error);
                                    break;
                                }
                                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                                    Ok(mut data) => {
                                        let chunk = data.copy_to_bytes(data.remaining());
                                        *len += chunk.len();
                                        if let Some(peek) = stream.as_mut() {
                                            peek.feed(&chunk);
                                        }
                                        chunks.push(chunk);
                                    }
                                    // Trailers come last: the body is over, and
                                    // the caller gets them after the chunks.
                                    Err(frame) => {
                                        tail = Some(
                                            frame.map_data(|mut d| d.copy_to_bytes(d.remaining())),
                                        );
                                        ended = true;
                                        break;
                                    }
                                },
                            }
                        }
                    }
                    let (Some(mut parts), Some(inner)) = (parts.take(), body.take()) else {
                        return Poll::Ready(Err(Error::new(ErrorKind::Transport)));
                    };
                    let chunks = std::mem::take(chunks);
                    let verdict = match stream.take() {
                        Some(peek) => {
                            stream_verdict(&peek, failure.is_some(), ended, peek.guard.on_silence)
                        }
                        None => {
                            let joined;
                            let prefix: &[u8] = match chunks.as_slice() {
                                [] => &[],
                                [one] => one,
                                many => {
                                    joined = many.concat();
                                    &joined
                                }
                            };
                            // Decoded when compressed; the caller still gets the bytes as they came.
                            classify::classify_body(parts.status, &parts.headers, prefix)
                        }
                    };
                    let mut peeked = PeekedBody::new(inner)
                        .with_prefix(chunks)
                        .with_prefix_frames(tail);
                    if let Some(error) = failure {
                        peeked = peeked.with_error(error);
                    }
                    if verdict.class == Class::Success && this.call.policy.stream_guard.is_some() {
                        let errors = MidStreamErrors::default();
                        let id = headers::request_id(&parts.headers);
                        peeked = peeked.watch_for_errors(errors.clone(), id);
                        parts.extensions.insert(errors);
                    }
                    this.call.on_response(parts, peeked, verdict)
                }
                StateProj::Waiting { sleep } => {
                    ready!(sleep.as_mut().poll(cx));
                    if let Some(error) = this.call.unavailable_after_wait() {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(error));
                    }
                    this.state.set(State::Ready);
                    continue;
                }
                StateProj::Ready => {
                    let ready = match this.service.poll_ready(cx) {
                        Poll::Ready(ready) => ready,
                        Poll::Pending => {
                            if this.call.poll_timer(this.timer, cx, false).is_ready() {
                                this.state.set(State::Done);
                                return Poll::Ready(Err(this.call.deadline_error(false)));
                            }
                            return Poll::Pending;
                        }
                    };
                    if let Err(error) = ready {
                        this.state.set(State::Done);
                        let error = Error::new(ErrorKind::Transport)
                            .with_attempts(this.call.log.attempts)
                            .with_elapsed(this.call.started.elapsed())
                            .with_source(error);
                        return Poll::Ready(Err(error));
                    }
                    let Some(request) = this.call.next_request() else {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(Error::new(ErrorKind::BodyNotReplayable)));
                    };
                    this.call.attempt_started = Instant::now();
                    let future = this.service.call(request);
                    this.state.set(State::Called { future });
                    continue;
                }
                StateProj::Done => {
                    panic!("ResponseFuture polled after it completed");
                }
            };
            match step {
                Step::Retry(delay) => {
                    this.state.set(State::Waiting {
                        sleep: Box::pin(tokio::time::sleep(delay)),
                    });
                }
                Step::Finish(output) => {
                    this.state.set(State::Done);
                    return Poll::Ready(output);
                }
            }
        }
    }
}

impl<S, B, R> std::fmt::Debug for ResponseFuture<S, B, R>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Called { .. } => "called",
            State::Sniffing { .. } => "sniffing",
            State::Waiting { .. } => "waiting",
            State::Ready => "ready",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("attempts", &self.call.log.attempts)
            .finish_non_exhaustive()
    }
}
