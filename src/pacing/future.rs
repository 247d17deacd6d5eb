//! The response future of [`RateLimitPacing`](super::RateLimitPacing).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use http::{Request, Response, header::CONTENT_TYPE};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::body::{PacedBody, Settler};
use super::state::{Amounts, KeyState, Pacer, Settle, Short};
use crate::body::ReplayableBody;
use crate::classify::{self, Class};
use crate::estimate::model_and_max_tokens;
use crate::model::Model;
use crate::sync::lock;
use crate::{BoxError, Error, ErrorKind, headers};

/// A wait longer than this is worth a tracing event.
const LONG_WAIT: Duration = Duration::from_secs(1);

pin_project! {
    /// The future of one call through [`RateLimitPacing`](super::RateLimitPacing).
    ///
    /// When the budget is there and nobody waits, the call goes straight
    /// on; otherwise it waits in its key's first-come, first-served queue
    /// (nothing sent upstream meanwhile). Dropping it while waiting leaves
    /// the queue; dropping it while the call is in flight gives back the
    /// call's token reservations.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S, B, S::Future>,
        pacer: Arc<Pacer>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B, F> {
        Called { #[pin] future: F, call: Option<Call> },
        // Boxed: only a queued call pays for holding its request and service.
        Waiting { wait: Option<Box<Wait<S, B>>> },
        Failed { error: Option<Error> },
        Done,
    }
}

/// A call sent upstream: its key and what it took. Dropped before a
/// response (the call failed or was cancelled), it gives back its token
/// reservations; the request slot stays spent.
struct Call {
    key: Arc<KeyState>,
    settle: Settle,
    /// Whether dropping it gives back; off once the body settles instead.
    armed: bool,
}

impl Call {
    /// Hands the call over to the response body, which settles it.
    fn into_settler(mut self, event_stream: bool) -> Box<Settler> {
        self.armed = false;
        Box::new(Settler::new(
            Arc::clone(&self.key),
            self.settle,
            event_stream,
        ))
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut buckets = lock(&self.key.inner);
        buckets.give_back(self.settle.amounts, self.settle.taken, Instant::now());
        self.key.wake(&buckets);
    }
}

/// A queued call.
struct Wait<S, B> {
    /// The service made ready for this call, and the call.
    pending: Option<(S, Request<B>)>,
    ticket: Ticket,
    amounts: Amounts,
    body_len: usize,
    estimated: u64,
    started: Instant,
    /// Why it waits, as last computed: named by the errors.
    short: Option<(&'static str, Duration)>,
    /// The head's sleep until its buckets have refilled enough.
    refill: Option<Pin<Box<Sleep>>>,
    timeout: Option<Pin<Box<Sleep>>>,
}

/// A place in a key's queue, left when dropped (waking the others when it
/// was the head, so the next one computes its own wait).
struct Ticket {
    key: Arc<KeyState>,
    id: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut buckets = lock(&self.key.inner);
        if buckets.leave(self.id) {
            self.key.wake(&buckets);
        }
    }
}

enum Waited {
    Go(Call),
    Fail(Error),
}

impl<S, B> Wait<S, B> {
    fn poll_wait(&mut self, cx: &mut Context<'_>, pacer: &Pacer) -> Poll<Waited> {
        let key = Arc::clone(&self.ticket.key);
        loop {
            let now = Instant::now();
            let mut buckets = lock(&key.inner);
            if buckets.register(self.ticket.id, cx.waker()) {
                match buckets.try_take(self.amounts, now) {
                    Ok(taken) => {
                        buckets.queue.pop_front();
                        let waited = now.saturating_duration_since(self.started);
                        buckets.record_wait(waited);
                        key.measure(&mut buckets, now, Some(waited));
                        key.wake(&buckets);
                        drop(buckets);
                        if waited > LONG_WAIT {
                            tracing::info!(
                                model = %key.key,
                                waited_ms = waited.as_millis() as u64,
                                bucket = self.short.map_or("queue", |(name, _)| name),
                                "rate-limit pacing: call waited for budget"
                            );
                        }
                        return Poll::Ready(Waited::Go(Call {
                            key: Arc::clone(&key),
                            settle: Settle {
                                amounts: self.amounts,
                                taken,
                                body_len: self.body_len,
                                estimated: self.estimated,
                            },
                            armed: true,
                        }));
                    }
                    Err(Short::TooLarge(name)) => {
                        // A limit learned since the call was queued is smaller than it.
                        buckets.too_large += 1;
                        return Poll::Ready(Waited::Fail(
                            Error::new(ErrorKind::PacingTooLarge)
                                .with_model(key.key.clone())
                                .with_bucket(name),
                        ));
                    }
                    Err(Short::Wait(name, wait)) => {
                        self.short = Some((name, wait));
                        // Saturating: a wait past the clock's range is a wait for a wake-up.
                        let deadline = now
                            .checked_add(wait)
                            .unwrap_or_else(|| now + Duration::from_secs(365 * 86_400));
                        match self.refill.as_mut() {
                            Some(sleep) => sleep.as_mut().reset(deadline),
                            None => {
                                self.refill = Some(Box::pin(tokio::time::sleep_until(deadline)))
                            }
                        }
                    }
                }
            } else {
                self.refill = None;
            }
            drop(buckets);
            if let Some(timeout) = self.timeout.as_mut()
                && timeout.as_mut().poll(cx).is_ready()
            {
                let mut buckets = lock(&key.inner);
                buckets.timed_out += 1;
                let short = match buckets.shortfall(self.amounts, Instant::now()) {
                    Some(Short::Wait(name, wait)) => Some((name, wait)),
                    _ => self.short,
                };
                drop(buckets);
                let (name, wait) = short.unwrap_or(("queue", Duration::ZERO));
                let error = Error::new(ErrorKind::PacingTimeout)
                    .with_model(key.key.clone())
                    .with_elapsed(pacer.config.queue_timeout.unwrap_or_default())
                    .with_wait(name, wait);
                return Poll::Ready(Waited::Fail(error));
            }
            if let Some(refill) = self.refill.as_mut()
                && refill.as_mut().poll(cx).is_ready()
            {
                continue;
            }
            return Poll::Pending;
        }
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>> + Clone,
    B: ReplayableBody,
{
    pub(crate) fn new(service: &mut S, request: Request<B>, pacer: Arc<Pacer>) -> Self {
        let body = request.body().in_memory();
        // One walk of the body for both: it is the per-call cost of pacing.
        let (from_body, output) = match &body {
            Some(body) => model_and_max_tokens(body),
            None => (None, None),
        };
        let model = request.extensions().get::<Model>().cloned().or(from_body);
        let key = pacer.key(model);
        let output = output.unwrap_or(0);
        let body_len = body.as_ref().map_or(0, |body| body.len());
        let exact = match (&pacer.config.count_tokens, &body) {
            (Some(count), Some(body)) => count(body),
            _ => None,
        };
        let mut buckets = lock(&key.inner);
        let estimated = match body {
            Some(_) => buckets.estimator.estimate(body_len),
            None => 0,
        };
        // A size-based estimate above the whole bucket is looked at again
        // with its media counted as media (a 200 KB base64 image is a few
        // thousand tokens, not 60,000) before the call is refused; the
        // reconciliation charges what the call really used either way.
        let input = match (exact, &body) {
            (Some(exact), _) => exact,
            (None, Some(bytes))
                if buckets
                    .input_capacity()
                    .is_some_and(|full| estimated > full) =>
            {
                estimated.min(buckets.estimator.estimate_with_media(bytes))
            }
            (None, _) => estimated,
        };
        let amounts = Amounts([1, input, output]);
        let now = Instant::now();
        let short = if buckets.queue.is_empty() {
            match buckets.try_take(amounts, now) {
                Ok(taken) => {
                    key.measure(&mut buckets, now, None);
                    drop(buckets);
                    let call = Call {
                        key,
                        settle: Settle {
                            amounts,
                            taken,
                            body_len,
                            estimated,
                        },
                        armed: true,
                    };
                    let future = service.call(request);
                    return Self {
                        state: State::Called {
                            future,
                            call: Some(call),
                        },
                        pacer,
                    };
                }
                Err(short) => Some(short),
            }
        } else {
            buckets.shortfall(amounts, now)
        };
        let short = match short {
            Some(Short::TooLarge(name)) => {
                buckets.too_large += 1;
                drop(buckets);
                let error = Error::new(ErrorKind::PacingTooLarge)
                    .with_model(key.key.clone())
                    .with_bucket(name);
                return Self::failed(error, pacer);
            }
            Some(Short::Wait(name, wait)) => Some((name, wait)),
            None => None,
        };
        let Some(id) = buckets.enqueue(pacer.config.max_queued, amounts) else {
            drop(buckets);
            let (name, wait) = short.unwrap_or(("queue", Duration::ZERO));
            let error = Error::new(ErrorKind::PacingQueueFull)
                .with_model(key.key.clone())
                .with_wait(name, wait);
            return Self::failed(error, pacer);
        };
        drop(buckets);
        let timeout = pacer
            .config
            .queue_timeout
            .map(|timeout| Box::pin(tokio::time::sleep(timeout)));
        // Take the service that was made ready for this call; leave a clone.
        let clone = service.clone();
        let ready = std::mem::replace(service, clone);
        Self {
            state: State::Waiting {
                wait: Some(Box::new(Wait {
                    pending: Some((ready, request)),
                    ticket: Ticket { key, id },
                    amounts,
                    body_len,
                    estimated,
                    started: now,
                    short,
                    refill: None,
                    timeout,
                })),
            },
            pacer,
        }
    }

    fn failed(error: Error, pacer: Arc<Pacer>) -> Self {
        Self {
            state: State::Failed { error: Some(error) },
            pacer,
        }
    }
}

impl<S, B, R> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Error: Into<BoxError>,
    R: Body,
{
    type Output = Result<Response<PacedBody<R>>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Called { future, call } => {
                    let result = ready!(future.poll(cx));
                    let call = call.take();
                    this.state.set(State::Done);
                    // On an error the call is dropped here: its tokens go back.
                    let response = result.map_err(Error::from_inner)?;
                    let Some(call) = call else {
                        return Poll::Ready(Ok(response.map(|body| PacedBody::new(body, None))));
                    };
                    return Poll::Ready(Ok(settle_on(response, call)));
                }
                StateProj::Waiting { wait } => {
                    let Some(waiting) = wait.as_mut() else {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(Error::new(ErrorKind::PacingTimeout)));
                    };
                    let waited = ready!(waiting.poll_wait(cx, this.pacer));
                    // Leaves the queue (if still in it) as the wait is dropped.
                    let pending = wait.take().and_then(|mut wait| wait.pending.take());
                    match (waited, pending) {
                        (Waited::Go(call), Some((mut service, request))) => {
                            let future = service.call(request);
                            this.state.set(State::Called {
                                future,
                                call: Some(call),
                            });
                        }
                        (Waited::Fail(error), _) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error));
                        }
                        (Waited::Go(_), None) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(Error::new(ErrorKind::PacingTimeout)));
                        }
                    }
                }
                StateProj::Failed { error } => {
                    let error = error
                        .take()
                        .unwrap_or_else(|| Error::new(ErrorKind::PacingQueueFull));
                    this.state.set(State::Done);
                    return Poll::Ready(Err(error));
                }
                StateProj::Done => panic!("ResponseFuture polled after it completed"),
            }
        }
    }
}

/// Learns from the response's headers, then hands the call to the body
/// (a success) or gives its tokens back (an error response used none).
fn settle_on<R>(response: Response<R>, call: Call) -> Response<PacedBody<R>> {
    let status = response.status();
    let headers = response.headers();
    let class = classify::classify(status, headers, None).class;
    let delay = match class {
        Class::RateLimited => headers::server_delay(headers, SystemTime::now()),
        _ => None,
    };
    if !status.is_success() {
        // Given back before the headers are read, so that their
        // `remaining` (and a 429's pause) caps what was given back.
        let key = Arc::clone(&call.key);
        drop(call);
        key.observe(headers, delay);
        return response.map(|body| PacedBody::new(body, None));
    }
    call.key.observe(headers, delay);
    let event_stream = headers
        .get(CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"text/event-stream"));
    let settler = call.into_settler(event_stream);
    response.map(|body| PacedBody::new(body, Some(settler)))
}

impl<S, B> std::fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Called { .. } => "called",
            State::Waiting { .. } => "waiting",
            State::Failed { .. } => "failed",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}
