//! The response future of [`ModelFallback`](super::ModelFallback).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_service::Service;

use super::cooldown::{Admission, CallOnModel};
use super::{FallbackRecord, ServedBy, Shared};
use crate::body::ReplayableBody;
use crate::breaker_signal::BreakerSignal;
use crate::classify::{self, Class};
use crate::headers::{self, RequestId};
use crate::model::{self, Model};
use crate::template::{RequestTemplate, set_body_length};
use crate::{BoxError, Error, ErrorKind};

pin_project! {
    /// The future of one call through [`ModelFallback`](super::ModelFallback).
    ///
    /// Calls outside every chain are the inner future and nothing more.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future>,
        // Boxed: a call outside every chain (the common case) then carries
        // one pointer, not a template, a body and a service.
        call: Option<Box<FallbackCall<S, B>>>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Called { #[pin] future: F },
        Ready,
        Done,
    }
}

/// A call of a chain: what is needed to send it again for the next model.
struct FallbackCall<S, B> {
    service: S,
    shared: Arc<Shared>,
    template: RequestTemplate,
    /// A copy of the original body, to build rewritten bodies of its type.
    spare: B,
    bytes: Bytes,
    requested: Model,
    chain: usize,
    position: usize,
    probe: bool,
    /// Whether the breaker has heard how the current model's attempt ended.
    settled: bool,
    /// The current model's breaker as the retry layer inside sees it, when
    /// there is a next model to move on to.
    signal: Option<Arc<CallOnModel>>,
    records: Vec<FallbackRecord>,
    /// The next model's request, while the service gets ready for it.
    pending: Option<Request<B>>,
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>> + Clone,
    B: ReplayableBody,
{
    pub(crate) fn new(service: &mut S, request: Request<B>, shared: &Arc<Shared>) -> Self {
        match FallbackCall::start(service, request, shared) {
            Ok((call, first)) => {
                let mut call = call;
                let future = call.service.call(first);
                Self {
                    state: State::Called { future },
                    call: Some(Box::new(call)),
                }
            }
            Err(request) => Self {
                state: State::Called {
                    future: service.call(request),
                },
                call: None,
            },
        }
    }
}

impl<S, B> FallbackCall<S, B>
where
    S: Service<Request<B>> + Clone,
    B: ReplayableBody,
{
    /// A call of a chain and its first request, or the request back when it
    /// takes no part (no model, a model in no chain, a body not in memory).
    #[allow(clippy::result_large_err)]
    fn start(
        service: &mut S,
        request: Request<B>,
        shared: &Arc<Shared>,
    ) -> Result<(Self, Request<B>), Request<B>> {
        // No chain: nothing to read, the call passes through untouched.
        if shared.positions.is_empty() {
            return Err(request);
        }
        let Some(requested) = model::of_request(&request) else {
            return Err(request);
        };
        let Some(&(chain, start)) = shared.positions.get(&requested) else {
            return Err(request);
        };
        let (Some(bytes), Some(spare)) =
            (request.body().in_memory(), request.body().try_clone_body())
        else {
            return Err(request);
        };
        let (parts, body) = request.into_parts();
        let template = RequestTemplate::new(parts);
        // Take the service made ready for this call; leave a clone.
        let clone = service.clone();
        let ready = std::mem::replace(service, clone);
        let mut call = Self {
            service: ready,
            shared: Arc::clone(shared),
            template,
            spare,
            bytes,
            requested,
            chain,
            position: start,
            probe: false,
            settled: true,
            signal: None,
            records: Vec::new(),
            pending: None,
        };
        let (selected, probe) = call.select(start, Instant::now()).unwrap_or_else(|| {
            // Every model is resting: the last of the chain is the best bet.
            (call.chain_len() - 1, false)
        });
        let routed = if selected == start {
            None
        } else {
            call.request_for(selected)
        };
        let mut first = match routed {
            Some(request) => {
                call.position = selected;
                call.probe = probe;
                request
            }
            None => {
                if selected != start
                    && probe
                    && let Some(breaker) = call.breaker_at(selected)
                {
                    breaker.release_probe();
                }
                call.probe = probe && selected == start;
                call.template_request(body, None)
            }
        };
        call.settled = false;
        call.attach(&mut first);
        Ok((call, first))
    }

    fn breaker_at(&self, position: usize) -> Option<&super::cooldown::Breaker> {
        self.shared
            .breakers
            .get(self.model_at(position)?)
            .map(|breaker| &**breaker)
    }

    fn chain_len(&self) -> usize {
        self.shared.chains[self.chain].len()
    }

    fn model_at(&self, position: usize) -> Option<&Model> {
        self.shared
            .step(self.chain, position)
            .map(|step| &step.model)
    }

    /// The first model from `from` on that its breaker lets this call use;
    /// skipped ones are recorded.
    fn select(&mut self, from: usize, now: Instant) -> Option<(usize, bool)> {
        for position in from..self.chain_len() {
            let model = self.model_at(position)?.clone();
            let admission = self.shared.breakers.get(&model).map(|b| b.admit(now));
            #[cfg(feature = "metrics")]
            if let (Some(meters), Some(admission)) = (&self.shared.metrics, admission) {
                meters.models.with(Some(&model), |meters| {
                    let state = match admission {
                        Admission::Use => 0.0,
                        Admission::Skip => 1.0,
                        Admission::Probe => 2.0,
                    };
                    meters.breaker_state.set(state);
                    if admission == Admission::Skip {
                        meters.skipped();
                    }
                });
            }
            match admission {
                Some(Admission::Use) | None => return Some((position, false)),
                Some(Admission::Probe) => return Some((position, true)),
                Some(Admission::Skip) => {
                    // Told as it happens, with the call's other lines.
                    crate::observe::model_skipped(
                        &model,
                        crate::observe::SkipReason::BreakerOpen,
                        self.model_at(position + 1),
                    );
                    self.records.push(FallbackRecord {
                        model,
                        skipped: true,
                        class: None,
                        status: None,
                        request_ids: Vec::new(),
                    });
                }
            }
        }
        None
    }

    fn template_request(&self, body: B, routed: Option<usize>) -> Request<B> {
        let mut request = self.template.build(body);
        let Some(position) = routed else {
            return request;
        };
        let Some(step) = self.shared.step(self.chain, position) else {
            return request;
        };
        request.extensions_mut().insert(step.model.clone());
        if let Some(route) = &step.route {
            let (mut parts, body) = request.into_parts();
            route(&mut parts);
            request = Request::from_parts(parts, body);
        }
        request
    }

    /// The call, for the model at `position`: body rewritten, routed.
    fn request_for(&self, position: usize) -> Option<Request<B>> {
        let model = self.model_at(position)?;
        let bytes = if *model == self.requested {
            self.bytes.clone()
        } else {
            model::rewrite(&self.bytes, model.as_str())?
        };
        let len = bytes.len();
        let body = self.spare.with_bytes(bytes)?;
        let mut request =
            self.template_request(body, (*model != self.requested).then_some(position));
        set_body_length(request.headers_mut(), len);
        Some(request)
    }

    fn current_model(&self) -> Model {
        self.model_at(self.position)
            .cloned()
            .unwrap_or_else(|| self.requested.clone())
    }

    /// Gives the request for the current model a [`BreakerSignal`], so that
    /// the retry layer inside stops retrying it once its breaker opens
    /// (defect 12). Not for the last model of the chain: nowhere to move on to.
    fn attach(&mut self, request: &mut Request<B>) {
        self.signal = None;
        if self.position + 1 >= self.chain_len() {
            return;
        }
        let signal = Arc::new(CallOnModel::new(
            Arc::clone(&self.shared),
            self.current_model(),
            self.probe,
        ));
        request
            .extensions_mut()
            .insert(BreakerSignal::from_arc(signal.clone()));
        self.signal = Some(signal);
    }

    /// Tells the current model's breaker how its attempt ended.
    fn settle(&mut self, class: Option<Class>) {
        if self.settled {
            return;
        }
        self.settled = true;
        let Some(breaker) = self.shared.breakers.get(&self.current_model()) else {
            return;
        };
        match class {
            // Counted once per call: the retry layer inside may have told it already.
            Some(class) if self.shared.triggers.contains(&class) => match &self.signal {
                Some(signal) => signal.count_overload(Instant::now()),
                None => breaker.on_overload(Instant::now(), self.probe),
            },
            Some(class) => breaker.on_other(self.probe, class == Class::Success),
            None if self.probe => breaker.release_probe(),
            None => {}
        }
    }

    /// After a triggering outcome: the next model's request, if the chain has one.
    fn next_request(&mut self) -> Option<Request<B>> {
        let mut from = self.position + 1;
        let (position, probe, mut request) = loop {
            let (position, probe) = self.select(from, Instant::now())?;
            match self.request_for(position) {
                Some(request) => break (position, probe, request),
                None => {
                    // Defect 10: a probe slot taken for a model this call cannot
                    // be sent to is given back, or that model is skipped for good.
                    if probe && let Some(breaker) = self.breaker_at(position) {
                        breaker.release_probe();
                    }
                    from = position + 1;
                }
            }
        };
        let from = self.current_model();
        self.position = position;
        self.probe = probe;
        self.settled = false;
        self.attach(&mut request);
        let to = self.current_model();
        let ids: Vec<&str> = self
            .records
            .iter()
            .flat_map(|r| r.request_ids.iter().map(RequestId::as_str))
            .collect();
        #[cfg(feature = "metrics")]
        if let Some(meters) = &self.shared.metrics
            && from != to
        {
            meters.fallbacks.fallback(&from, &to);
        }
        tracing::warn!(
            target: "tower_overload::fallback",
            requested = %self.requested,
            from = %from,
            to = %to,
            probe,
            request_ids = ?ids,
            "model overloaded; falling back"
        );
        Some(request)
    }

    fn served_by(&mut self) -> ServedBy {
        ServedBy {
            requested: self.requested.clone(),
            served: self.current_model(),
            fallbacks: std::mem::take(&mut self.records),
        }
    }
}

impl<S, B> Drop for FallbackCall<S, B> {
    fn drop(&mut self) {
        // A probe dropped before its answer must not hold the probe slot forever.
        if self.probe
            && !self.settled
            && let Some(step) = self.shared.step(self.chain, self.position)
            && let Some(breaker) = self.shared.breakers.get(&step.model)
        {
            breaker.release_probe();
        }
    }
}

/// The class of a response: the retry layer's verdict when it left one
/// (it may have read the body), else the status and headers.
fn response_class<R>(response: &Response<R>) -> Class {
    #[cfg(feature = "retry")]
    if let Some(report) = response.extensions().get::<crate::retry::RetryReport>()
        && let Some(last) = report.attempts.last()
    {
        return last.class;
    }
    classify::classify(response.status(), response.headers(), None).class
}

/// The request ids of a response given up on: every attempt's when the
/// retry layer left a report, else the response's own. Read only when the
/// call falls back, so a success collects nothing.
fn response_request_ids<R>(response: &Response<R>) -> Vec<RequestId> {
    #[cfg(feature = "retry")]
    if let Some(report) = response.extensions().get::<crate::retry::RetryReport>() {
        return report.request_ids().cloned().collect();
    }
    headers::request_id(response.headers())
        .into_iter()
        .collect()
}

impl<S, B, R> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<R>> + Clone,
    S::Error: Into<BoxError>,
    B: ReplayableBody,
{
    type Output = Result<Response<R>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Called { future } => {
                    let result = ready!(future.poll(cx));
                    let Some(call) = this.call.as_mut() else {
                        this.state.set(State::Done);
                        return Poll::Ready(result.map_err(Error::from_inner));
                    };
                    match result {
                        Ok(mut response) => {
                            let class = response_class(&response);
                            call.settle(Some(class));
                            if call.shared.triggers.contains(&class) {
                                call.records.push(FallbackRecord {
                                    model: call.current_model(),
                                    skipped: false,
                                    class: Some(class),
                                    status: Some(response.status()),
                                    request_ids: response_request_ids(&response),
                                });
                                if call.fall_back() {
                                    this.state.set(State::Ready);
                                    continue;
                                }
                            }
                            let served = call.served_by();
                            if let Some(name) = &call.shared.served_by_header
                                && let Ok(value) = HeaderValue::from_str(served.served.as_str())
                            {
                                response.headers_mut().insert(name.clone(), value);
                            }
                            response.extensions_mut().insert(served);
                            this.state.set(State::Done);
                            return Poll::Ready(Ok(response));
                        }
                        Err(error) => {
                            let error = Error::from_inner(error);
                            let ours = Some(&error);
                            let class = ours.and_then(Error::class);
                            // A full or timed-out per-model queue: the model is saturated
                            // here, before the upstream; not a verdict on its capacity.
                            let saturated = call.shared.fall_back_when_saturated
                                && ours.is_some_and(|e| {
                                    matches!(
                                        e.kind(),
                                        ErrorKind::QueueFull | ErrorKind::QueueTimeout
                                    )
                                });
                            call.settle(if saturated { None } else { class });
                            if saturated || class.is_some_and(|c| call.shared.triggers.contains(&c))
                            {
                                call.records.push(FallbackRecord {
                                    model: call.current_model(),
                                    skipped: false,
                                    class,
                                    status: None,
                                    request_ids: Vec::new(),
                                });
                                if call.fall_back() {
                                    this.state.set(State::Ready);
                                    continue;
                                }
                            }
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error));
                        }
                    }
                }
                StateProj::Ready => {
                    let Some(call) = this.call.as_mut() else {
                        unreachable!("only calls of a chain fall back");
                    };
                    if let Err(error) = ready!(call.service.poll_ready(cx)) {
                        call.settle(None);
                        this.state.set(State::Done);
                        return Poll::Ready(Err(Error::from_inner(error)));
                    }
                    let Some(request) = call.pending.take() else {
                        unreachable!("a fallback request is pending in the ready state");
                    };
                    let future = call.service.call(request);
                    this.state.set(State::Called { future });
                }
                StateProj::Done => panic!("ResponseFuture polled after it completed"),
            }
        }
    }
}

impl<S, B> FallbackCall<S, B>
where
    S: Service<Request<B>> + Clone,
    B: ReplayableBody,
{
    /// After a triggering outcome (recorded last): readies the next model's
    /// request. `false` when the chain has none left, and the outcome is
    /// the call's answer (its record is dropped: it is no fallback).
    fn fall_back(&mut self) -> bool {
        let kept = self.records.len();
        match self.next_request() {
            Some(request) => {
                self.pending = Some(request);
                true
            }
            None => {
                self.records.truncate(kept - 1);
                false
            }
        }
    }
}

impl<S, B> std::fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Called { .. } => "called",
            State::Ready => "ready",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("in_chain", &self.call.is_some())
            .finish_non_exhaustive()
    }
}
