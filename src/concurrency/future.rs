//! The response future and body of [`ConcurrencyPerModel`](super::ConcurrencyPerModel).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::{AcquireError, OwnedSemaphorePermit};
use tokio::time::Sleep;
use tower_service::Service;

use super::limits::{HeldKey, KeyState, Limits, Permit};
use crate::classify::{self, Class};
use crate::{BoxError, Error, ErrorKind};

type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

pin_project! {
    /// The future of one call through [`ConcurrencyPerModel`](super::ConcurrencyPerModel).
    ///
    /// When a permit is free, the call goes straight on (nothing allocated);
    /// otherwise it waits in its key's first-come, first-served queue. Dropping
    /// it while waiting frees its queue slot; dropping it later frees the permit.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S, B, S::Future>,
        limits: Arc<Limits>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B, F> {
        Called { #[pin] future: F, permit: Option<Permit> },
        // Boxed: only a queued call pays for holding its request and service.
        Waiting { wait: Option<Box<Wait<S, B>>> },
        // Boxed: only a layer shared with a fleet waits for a lease.
        Leasing { leasing: Option<Box<Leasing<S, B>>> },
        Failed { error: Option<Error> },
        Done,
    }
}

/// A queued call: which semaphore it waits on, since when, and for how long.
struct Wait<S, B> {
    /// The service made ready for this call, and the call.
    pending: Option<(S, Request<B>)>,
    key: Arc<KeyState>,
    acquire: Acquire,
    /// The key's permit, once held, while the global one is awaited.
    key_permit: Option<HeldKey>,
    timer: Option<Pin<Box<Sleep>>>,
    _slot: QueueSlot,
}

/// A call holding its local permit while it waits for a fleet slot.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
struct Leasing<S, B> {
    pending: Option<(S, Request<B>)>,
    permit: Option<Permit>,
    lease: Lease,
}

#[cfg(feature = "redis")]
type Lease = Pin<Box<dyn Future<Output = Option<crate::fleet::FleetLease>> + Send>>;
/// Never made without the `redis` feature.
#[cfg(not(feature = "redis"))]
type Lease = ();

/// One place in a key's queue, given back when dropped.
struct QueueSlot(
    Arc<KeyState>,
    #[cfg(feature = "metrics")] tokio::time::Instant,
);

impl QueueSlot {
    fn new(key: Arc<KeyState>) -> Self {
        #[cfg(feature = "metrics")]
        if let Some(meters) = &key.meters {
            meters.queued.increment(1.0);
        }
        Self(
            key,
            #[cfg(feature = "metrics")]
            tokio::time::Instant::now(),
        )
    }
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::Relaxed);
        // The wait ends here: permit, timeout or cancellation.
        #[cfg(feature = "metrics")]
        if let Some(meters) = &self.0.meters {
            meters.queued.decrement(1.0);
            meters.queue_wait.record(self.1.elapsed().as_secs_f64());
        }
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>> + Clone,
{
    pub(crate) fn new(
        service: &mut S,
        request: Request<B>,
        key: Arc<KeyState>,
        limits: Arc<Limits>,
    ) -> Self {
        if !key.try_take() {
            return Self::queue(service, request, key, None, limits);
        }
        let global = match &limits.global {
            None => None,
            Some(global) => match Arc::clone(global).try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    let held = HeldKey::taken(Arc::clone(&key));
                    return Self::queue(service, request, key, Some(held), limits);
                }
            },
        };
        let permit = KeyState::permit(key, global);
        let state = go(service, request, permit, &limits);
        Self { state, limits }
    }

    fn queue(
        service: &mut S,
        request: Request<B>,
        key: Arc<KeyState>,
        key_permit: Option<HeldKey>,
        limits: Arc<Limits>,
    ) -> Self {
        let config = &limits.config;
        if key.queued.fetch_add(1, Ordering::Relaxed) >= config.max_queued {
            key.queued.fetch_sub(1, Ordering::Relaxed);
            key.rejected.fetch_add(1, Ordering::Relaxed);
            let error = Error::new(ErrorKind::QueueFull).with_model(key.key.clone());
            return Self::failed(error, limits);
        }
        let slot = QueueSlot::new(Arc::clone(&key));
        let acquire: Acquire = match (&key_permit, &limits.global) {
            (Some(_), Some(global)) => Box::pin(Arc::clone(global).acquire_owned()),
            _ => Box::pin(Arc::clone(&key.semaphore).acquire_owned()),
        };
        let timer = config
            .queue_timeout
            .map(|t| Box::pin(tokio::time::sleep(t)));
        // Take the service that was made ready for this call; leave a clone.
        let clone = service.clone();
        let ready = std::mem::replace(service, clone);
        Self {
            state: State::Waiting {
                wait: Some(Box::new(Wait {
                    pending: Some((ready, request)),
                    key,
                    acquire,
                    key_permit,
                    timer,
                    _slot: slot,
                })),
            },
            limits,
        }
    }

    fn failed(error: Error, limits: Arc<Limits>) -> Self {
        Self {
            state: State::Failed { error: Some(error) },
            limits,
        }
    }
}

/// The call goes on with its permit: sent now, or first leased a fleet
/// slot when the layer shares its caps with a fleet.
fn go<S, B>(
    service: &mut S,
    request: Request<B>,
    permit: Permit,
    limits: &Limits,
) -> State<S, B, S::Future>
where
    S: Service<Request<B>> + Clone,
{
    #[cfg(feature = "redis")]
    if limits.config.fleet.is_some() {
        // Take the service that was made ready for this call; leave a clone.
        let clone = service.clone();
        let ready = std::mem::replace(service, clone);
        return go_owned(ready, request, permit, limits);
    }
    #[cfg(not(feature = "redis"))]
    let _ = limits;
    State::Called {
        future: service.call(request),
        permit: Some(permit),
    }
}

/// [`go`] for a call that owns its ready service (it waited).
fn go_owned<S, B>(
    mut service: S,
    request: Request<B>,
    permit: Permit,
    limits: &Limits,
) -> State<S, B, S::Future>
where
    S: Service<Request<B>>,
{
    #[cfg(feature = "redis")]
    if let Some(fleet) = &limits.config.fleet {
        let fleet = fleet.clone();
        let name = permit.state().key.as_str().to_owned();
        let cap = u32::try_from(permit.state().limit_now()).unwrap_or(u32::MAX);
        let deadline = limits
            .config
            .queue_timeout
            // A timeout too long for an instant is no deadline (defect 6).
            .and_then(|timeout| tokio::time::Instant::now().checked_add(timeout));
        let lease: Lease = Box::pin(async move { fleet.lease(&name, cap, deadline).await });
        return State::Leasing {
            leasing: Some(Box::new(Leasing {
                pending: Some((service, request)),
                permit: Some(permit),
                lease,
            })),
        };
    }
    #[cfg(not(feature = "redis"))]
    let _ = limits;
    State::Called {
        future: service.call(request),
        permit: Some(permit),
    }
}

impl<S, B, R> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Error: Into<BoxError>,
    R: Body,
{
    type Output = Result<Response<PermitBody<R>>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Called { future, permit } => {
                    let result = ready!(future.poll(cx));
                    let permit = permit.take();
                    this.state.set(State::Done);
                    // On an error the permit is dropped here, at once.
                    let response = result.map_err(Error::from_inner)?;
                    if let Some(permit) = &permit {
                        adapt(permit.state(), &response, this.limits);
                    }
                    return Poll::Ready(Ok(response.map(|body| PermitBody::new(body, permit))));
                }
                StateProj::Waiting { wait } => {
                    let Some(waiting) = wait.as_mut() else {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(Error::new(ErrorKind::QueueTimeout)));
                    };
                    if let Poll::Ready(acquired) = waiting.acquire.as_mut().poll(cx) {
                        let Ok(acquired) = acquired else {
                            // The semaphores are never closed; treat it as a full queue.
                            this.state.set(State::Done);
                            return Poll::Ready(Err(Error::new(ErrorKind::QueueFull)));
                        };
                        let (key_permit, mut global) = match waiting.key_permit.take() {
                            Some(key_permit) => (key_permit, Some(acquired)),
                            None => (HeldKey::acquired(Arc::clone(&waiting.key), acquired), None),
                        };
                        if global.is_none()
                            && let Some(semaphore) = &this.limits.global
                        {
                            match Arc::clone(semaphore).try_acquire_owned() {
                                Ok(permit) => global = Some(permit),
                                Err(_) => {
                                    waiting.key_permit = Some(key_permit);
                                    waiting.acquire =
                                        Box::pin(Arc::clone(semaphore).acquire_owned());
                                    continue;
                                }
                            }
                        }
                        // Ends the wait, freeing the queue slot.
                        let Some(mut waited) = wait.take() else {
                            continue;
                        };
                        let permit = key_permit.into_permit(global);
                        let Some((service, request)) = waited.pending.take() else {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(Error::new(ErrorKind::QueueFull)));
                        };
                        this.state
                            .set(go_owned(service, request, permit, this.limits));
                        continue;
                    }
                    if let Some(timer) = waiting.timer.as_mut()
                        && timer.as_mut().poll(cx).is_ready()
                    {
                        let Some(waited) = wait.take() else {
                            continue;
                        };
                        let key = &waited.key;
                        key.timed_out.fetch_add(1, Ordering::Relaxed);
                        this.state.set(State::Done);
                        let error = Error::new(ErrorKind::QueueTimeout)
                            .with_model(key.key.clone())
                            .with_elapsed(this.limits.config.queue_timeout.unwrap_or_default());
                        return Poll::Ready(Err(error));
                    }
                    return Poll::Pending;
                }
                #[cfg(feature = "redis")]
                StateProj::Leasing { leasing } => {
                    let Some(waiting) = leasing.as_mut() else {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(Error::new(ErrorKind::QueueTimeout)));
                    };
                    let lease = ready!(waiting.lease.as_mut().poll(cx));
                    let Some(mut done) = leasing.take() else {
                        continue;
                    };
                    let (Some(mut permit), Some((mut service, request))) =
                        (done.permit.take(), done.pending.take())
                    else {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(Error::new(ErrorKind::QueueTimeout)));
                    };
                    let Some(lease) = lease else {
                        // The fleet's slots stayed held past the queue timeout.
                        let key = permit.state();
                        key.timed_out.fetch_add(1, Ordering::Relaxed);
                        let error = Error::new(ErrorKind::QueueTimeout)
                            .with_model(key.key.clone())
                            .with_elapsed(this.limits.config.queue_timeout.unwrap_or_default());
                        this.state.set(State::Done);
                        return Poll::Ready(Err(error));
                    };
                    permit.hold(lease);
                    let future = service.call(request);
                    this.state.set(State::Called {
                        future,
                        permit: Some(permit),
                    });
                }
                // Never entered without the feature.
                #[cfg(not(feature = "redis"))]
                StateProj::Leasing { .. } => {
                    this.state.set(State::Done);
                    return Poll::Ready(Err(Error::new(ErrorKind::QueueTimeout)));
                }
                StateProj::Failed { error } => {
                    let error = error
                        .take()
                        .unwrap_or_else(|| Error::new(ErrorKind::QueueFull));
                    this.state.set(State::Done);
                    return Poll::Ready(Err(error));
                }
                StateProj::Done => panic!("ResponseFuture polled after it completed"),
            }
        }
    }
}

fn adapt<R>(key: &KeyState, response: &Response<R>, limits: &Limits) {
    let Some(aimd) = &limits.config.adaptive else {
        return;
    };
    #[cfg(feature = "health")]
    let verdict = || {
        use crate::health::Verdict;
        limits
            .config
            .health
            .as_ref()
            .map_or(Verdict::Unknown, |health| {
                health.verdict_for(key.key.as_str())
            })
    };
    #[cfg(feature = "health")]
    let local_pressure = || matches!(verdict(), crate::health::Verdict::LocalPressure { .. });
    #[cfg(not(feature = "health"))]
    let local_pressure = || false;
    #[cfg(feature = "health")]
    let no_incident = || !matches!(verdict(), crate::health::Verdict::Incident { .. });
    #[cfg(not(feature = "health"))]
    let no_incident = || true;
    match classify::classify(response.status(), response.headers(), None).class {
        Class::Overloaded => key.on_overload(local_pressure()),
        Class::RateLimited if aimd.on_rate_limit => key.on_overload(false),
        Class::Success => key.on_success(no_incident),
        _ => {}
    }
}

pin_project! {
    /// A response body that holds its call's concurrency permit until it
    /// ends, fails or is dropped: the upstream is busy until the stream ends.
    pub struct PermitBody<B> {
        #[pin]
        inner: B,
        permit: Option<Permit>,
    }
}

impl<B> PermitBody<B> {
    pub(crate) fn new(inner: B, permit: Option<Permit>) -> Self {
        Self { inner, permit }
    }

    /// Whether the permit is still held.
    ///
    /// ```
    /// # fn check<B>(body: &tower_overload::concurrency::PermitBody<B>) -> bool {
    /// body.holds_permit()
    /// # }
    /// ```
    pub fn holds_permit(&self) -> bool {
        self.permit.is_some()
    }

    /// The inner body.
    ///
    /// ```
    /// # fn inner<B>(body: &tower_overload::concurrency::PermitBody<B>) -> &B {
    /// body.get_ref()
    /// # }
    /// ```
    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

impl<B: Body> Body for PermitBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let mut inner = this.inner;
        let polled = ready!(inner.as_mut().poll_frame(cx));
        let finished = match &polled {
            Some(Ok(_)) => inner.is_end_stream(),
            // The end, or a failure: the upstream is done with this call.
            Some(Err(_)) | None => true,
        };
        if finished {
            *this.permit = None;
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> std::fmt::Debug for PermitBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PermitBody")
            .field("holds_permit", &self.permit.is_some())
            .finish_non_exhaustive()
    }
}

impl<S, B> std::fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Called { .. } => "called",
            State::Waiting { .. } => "waiting",
            State::Leasing { .. } => "leasing",
            State::Failed { .. } => "failed",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}
