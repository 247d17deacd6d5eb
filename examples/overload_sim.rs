//! A deterministic, virtual-time simulation of many clients calling an
//! overloaded API, comparing the usual retry code with this crate's layers.
//!
//! `cargo run --release --example overload_sim` prints a table per strategy
//! and writes `target/overload_sim.svg` (upstream load and goodput over time),
//! then reproduces the AWS backoff paper's contention experiment.
//!
//! The upstream: per-model concurrent capacity (over it: 529), a service time
//! of 1 to 4 s, an organisation quota (over it: 429 with retry-after), and the
//! reference storm: a full 529 outage of the primary model for 2 minutes.
//! Calls arrive on one seeded Poisson trace, all for the primary model, with a
//! 60 s deadline. Every strategy is a real tower service stack (tower's own
//! `Retry` or this crate's layers) in front of the same simulated upstream;
//! tokio's clock is paused, so 8 minutes of traffic take seconds.
//!
//! With `--features pacing`, a last table: the rate-limit scenario (issue
//! 14), an organisation at 50 RPM, 30k ITPM and 8k OTPM for one model,
//! bursty calls of 100 to 50,000 tokens, comparing retrying the 429s, a
//! local reserve-and-reject check and the pacing layer (see the `rate_limit` module).

// The test includes this file for `run`; `main` is its to ignore.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use rand::rngs::SmallRng;
use rand::{Rng, RngExt, SeedableRng};
use tokio::time::Instant;
use tower::retry::Policy;
use tower::retry::backoff::{
    Backoff as _, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff,
};
use tower::retry::budget::{Budget as _, TpsBudget};
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_overload::backoff::{Backoff, Jitter};
use tower_overload::concurrency::{Aimd, ConcurrencyPerModelLayer};
use tower_overload::fallback::ModelFallbackLayer;
use tower_overload::retry::{OverloadRetryLayer, RetryPolicy};
use tower_overload::stack::OverloadStack;
use tower_overload::{BoxError, model};

pub const PRIMARY: &str = "claude-opus-4-6";
const MODELS: [(&str, usize); 3] = [
    (PRIMARY, 60),
    ("claude-sonnet-4-6", 60),
    ("claude-haiku-4-5", 120),
];

/// The traffic and the storm.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub calls_per_sec: f64,
    pub length: Duration,
    pub outage: (Duration, Duration),
    pub deadline: Duration,
    /// Organisation quota: requests per second across models.
    pub quota_per_sec: f64,
    /// From this time on, each attempt on the primary fails with a 529 at
    /// this probability: the faults a long-running process meets after an
    /// outage, which its retries must still rescue.
    pub intermittent: Option<(Duration, f64)>,
    pub seed: u64,
}

impl Scenario {
    /// The reference storm: 10 calls/s for 8 minutes, the primary model down from 2:00 to 4:00.
    pub fn reference() -> Self {
        Self {
            calls_per_sec: 10.0,
            length: Duration::from_secs(480),
            outage: (Duration::from_secs(120), Duration::from_secs(240)),
            deadline: Duration::from_secs(60),
            quota_per_sec: 40.0,
            intermittent: None,
            seed: 2026,
        }
    }

    /// The long horizon: 2 calls/s for 70 minutes, the primary fully down
    /// from 10:00 to 40:00, then healthy, then from 50:00 one attempt in
    /// three overloaded at random. Retries must come back after the outage.
    pub fn long_horizon() -> Self {
        Self {
            calls_per_sec: 2.0,
            length: Duration::from_secs(70 * 60),
            outage: (Duration::from_secs(10 * 60), Duration::from_secs(40 * 60)),
            deadline: Duration::from_secs(60),
            quota_per_sec: 40.0,
            intermittent: Some((Duration::from_secs(50 * 60), 1.0 / 3.0)),
            seed: 2027,
        }
    }

    fn arrivals(&self) -> Vec<Duration> {
        let mut rng = SmallRng::seed_from_u64(self.seed);
        let mut at = 0.0;
        let mut arrivals = Vec::new();
        loop {
            let u: f64 = rng.random::<f64>().max(1e-12);
            at += -u.ln() / self.calls_per_sec;
            if at >= self.length.as_secs_f64() {
                return arrivals;
            }
            arrivals.push(Duration::from_secs_f64(at));
        }
    }
}

// ===== the simulated upstream =====

struct UpstreamState {
    start: Instant,
    scenario: Scenario,
    in_flight: Mutex<HashMap<String, usize>>,
    rng: Mutex<SmallRng>,
    /// (seconds since start, status) of every attempt.
    attempts: Mutex<Vec<(f64, u16)>>,
    quota: Mutex<(f64, Instant)>,
}

#[derive(Clone)]
struct Upstream(Arc<UpstreamState>);

impl Upstream {
    fn new(scenario: &Scenario) -> Self {
        Self(Arc::new(UpstreamState {
            start: Instant::now(),
            scenario: scenario.clone(),
            in_flight: Mutex::new(HashMap::new()),
            rng: Mutex::new(SmallRng::seed_from_u64(scenario.seed ^ 0x5eed)),
            attempts: Mutex::new(Vec::new()),
            quota: Mutex::new((scenario.quota_per_sec, Instant::now())),
        }))
    }
}

fn reply(status: u16, kind: &str, retry_after: Option<u64>) -> Response<Full<Bytes>> {
    let body = if status == 200 {
        r#"{"type":"message","content":[{"type":"text","text":"ok"}]}"#.to_owned()
    } else {
        format!(r#"{{"type":"error","error":{{"type":"{kind}","message":"{kind}"}}}}"#)
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = StatusCode::from_u16(status).expect("a status");
    if let Some(secs) = retry_after {
        response.headers_mut().insert("retry-after", secs.into());
    }
    response
}

impl Service<Request<Full<Bytes>>> for Upstream {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Full<Bytes>>) -> Self::Future {
        let state = Arc::clone(&self.0);
        Box::pin(async move {
            use http_body_util::BodyExt;
            let body = request
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let model = model::extract(&body)
                .map(|m| m.into_owned())
                .unwrap_or_default();
            let now = Instant::now();
            let elapsed = now.duration_since(state.start);
            let record = |status: u16| {
                state
                    .attempts
                    .lock()
                    .unwrap()
                    .push((elapsed.as_secs_f64(), status))
            };
            let (from, to) = state.scenario.outage;
            if model == PRIMARY && elapsed >= from && elapsed < to {
                record(529);
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Ok(reply(529, "overloaded_error", None));
            }
            if let Some((from, p)) = state.scenario.intermittent
                && model == PRIMARY
                && elapsed >= from
                && state.rng.lock().unwrap().random_bool(p)
            {
                record(529);
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Ok(reply(529, "overloaded_error", None));
            }
            let within_quota = {
                let mut quota = state.quota.lock().unwrap();
                let refill =
                    now.duration_since(quota.1).as_secs_f64() * state.scenario.quota_per_sec;
                quota.0 = (quota.0 + refill).min(state.scenario.quota_per_sec);
                quota.1 = now;
                let ok = quota.0 >= 1.0;
                if ok {
                    quota.0 -= 1.0;
                }
                ok
            };
            if !within_quota {
                record(429);
                tokio::time::sleep(Duration::from_millis(20)).await;
                return Ok(reply(429, "rate_limit_error", Some(1)));
            }
            let capacity = MODELS
                .iter()
                .find(|(m, _)| *m == model)
                .map_or(60, |(_, c)| *c);
            let admitted = {
                let mut in_flight = state.in_flight.lock().unwrap();
                let n = in_flight.entry(model.clone()).or_default();
                let ok = *n < capacity;
                if ok {
                    *n += 1;
                }
                ok
            };
            if !admitted {
                record(529);
                tokio::time::sleep(Duration::from_millis(20)).await;
                return Ok(reply(529, "overloaded_error", None));
            }
            record(200);
            let service = Duration::from_millis(state.rng.lock().unwrap().random_range(1000..4000));
            tokio::time::sleep(service).await;
            *state
                .in_flight
                .lock()
                .unwrap()
                .get_mut(&model)
                .expect("counted") -= 1;
            Ok(reply(200, "", None))
        })
    }
}

// ===== the retry code people write, on tower's Retry =====

fn failed(result: &Result<Response<Full<Bytes>>, BoxError>) -> bool {
    match result {
        Ok(response) => matches!(response.status().as_u16(), 408 | 409 | 429 | 500..=599),
        Err(_) => true,
    }
}

fn copy(request: &Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    let mut copy = Request::new(request.body().clone());
    *copy.uri_mut() = request.uri().clone();
    *copy.method_mut() = request.method().clone();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// Retries at once, up to 5 attempts.
#[derive(Clone)]
struct Immediate(u32);

impl Policy<Request<Full<Bytes>>, Response<Full<Bytes>>, BoxError> for Immediate {
    type Future = Ready<()>;
    fn retry(
        &mut self,
        _: &mut Request<Full<Bytes>>,
        result: &mut Result<Response<Full<Bytes>>, BoxError>,
    ) -> Option<Ready<()>> {
        (failed(result) && self.0 < 4).then(|| {
            self.0 += 1;
            ready(())
        })
    }
    fn clone_request(&mut self, request: &Request<Full<Bytes>>) -> Option<Request<Full<Bytes>>> {
        Some(copy(request))
    }
}

/// Exponential without jitter, 1 s to 60 s, 5 attempts: the code in common guides.
#[derive(Clone)]
struct NoJitter(u32);

impl Policy<Request<Full<Bytes>>, Response<Full<Bytes>>, BoxError> for NoJitter {
    type Future = tokio::time::Sleep;
    fn retry(
        &mut self,
        _: &mut Request<Full<Bytes>>,
        result: &mut Result<Response<Full<Bytes>>, BoxError>,
    ) -> Option<Self::Future> {
        if !failed(result) || self.0 >= 4 {
            return None;
        }
        let delay = Duration::from_secs((1u64 << self.0).min(60));
        self.0 += 1;
        Some(tokio::time::sleep(delay))
    }
    fn clone_request(&mut self, request: &Request<Full<Bytes>>) -> Option<Request<Full<Bytes>>> {
        Some(copy(request))
    }
}

/// The official SDKs: 2 retries, min(0.5 s * 2^n, 8 s) * (1 - 0.25 rand), or retry-after when 0 < it <= 60 s.
#[derive(Clone)]
struct OfficialSdk {
    retries: u32,
    rng: SmallRng,
}

impl Policy<Request<Full<Bytes>>, Response<Full<Bytes>>, BoxError> for OfficialSdk {
    type Future = tokio::time::Sleep;
    fn retry(
        &mut self,
        _: &mut Request<Full<Bytes>>,
        result: &mut Result<Response<Full<Bytes>>, BoxError>,
    ) -> Option<Self::Future> {
        if !failed(result) || self.retries >= 2 {
            return None;
        }
        let server = result.as_ref().ok().and_then(|r| {
            let secs: f64 = r
                .headers()
                .get("retry-after")?
                .to_str()
                .ok()?
                .parse()
                .ok()?;
            (secs > 0.0 && secs <= 60.0).then(|| Duration::from_secs_f64(secs))
        });
        let computed = Duration::from_secs_f64(
            (0.5 * 2f64.powi(self.retries as i32)).min(8.0)
                * (1.0 - 0.25 * self.rng.random::<f64>()),
        );
        self.retries += 1;
        Some(tokio::time::sleep(server.unwrap_or(computed)))
    }
    fn clone_request(&mut self, request: &Request<Full<Bytes>>) -> Option<Request<Full<Bytes>>> {
        Some(copy(request))
    }
}

/// A seeded generator for tower's backoff.
#[derive(Clone)]
struct TowerRng(SmallRng);

impl tower::util::rng::Rng for TowerRng {
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
}

/// tower's Retry with its ExponentialBackoff (1 s to 60 s, jitter) and TpsBudget (20%, 10 s, 1/s), 5 attempts.
#[derive(Clone)]
struct TowerBudgeted {
    attempts: u32,
    backoff: ExponentialBackoff<TowerRng>,
    budget: Arc<TpsBudget>,
}

impl Policy<Request<Full<Bytes>>, Response<Full<Bytes>>, BoxError> for TowerBudgeted {
    type Future = tokio::time::Sleep;
    fn retry(
        &mut self,
        _: &mut Request<Full<Bytes>>,
        result: &mut Result<Response<Full<Bytes>>, BoxError>,
    ) -> Option<Self::Future> {
        if self.attempts == 0 {
            self.budget.deposit();
        }
        self.attempts += 1;
        if !failed(result) || self.attempts >= 5 || !self.budget.withdraw() {
            return None;
        }
        Some(self.backoff.next_backoff())
    }
    fn clone_request(&mut self, request: &Request<Full<Bytes>>) -> Option<Request<Full<Bytes>>> {
        Some(copy(request))
    }
}

// ===== the strategies =====

type Client = BoxCloneService<Request<Full<Bytes>>, StatusCode, BoxError>;

/// Every strategy compared, by name, each built on `upstream`.
fn strategies(upstream: &Upstream, seed: u64) -> Vec<(&'static str, Client)> {
    let raw = ServiceBuilder::new()
        .map_err(|never: Infallible| -> BoxError { match never {} })
        .service(upstream.clone());
    let status =
        |service: BoxCloneService<Request<Full<Bytes>>, Response<Full<Bytes>>, BoxError>| {
            BoxCloneService::new(service.map_response(|r: Response<Full<Bytes>>| r.status()))
        };
    let tower_backoff = ExponentialBackoffMaker::new(
        Duration::from_secs(1),
        Duration::from_secs(60),
        0.5,
        TowerRng(SmallRng::seed_from_u64(seed)),
    )
    .expect("valid backoff")
    .make_backoff();
    let budget = Arc::new(TpsBudget::new(Duration::from_secs(10), 1, 0.2));
    let ours_retry =
        OverloadRetryLayer::new(RetryPolicy::foreground().seed(seed)).layer(upstream.clone());
    let stack = OverloadStack::new()
        .retry(RetryPolicy::foreground().seed(seed))
        .concurrency(
            ConcurrencyPerModelLayer::new(60)
                .queue_timeout(Some(Duration::from_secs(10)))
                .max_queued(200)
                .adaptive(Aimd::default()),
        )
        .fallback(ModelFallbackLayer::new(MODELS.iter().map(|(m, _)| *m)))
        .layer(upstream.clone());
    vec![
        ("no retry", status(BoxCloneService::new(raw.clone()))),
        (
            "immediate retry x5",
            status(BoxCloneService::new(tower::retry::Retry::new(
                Immediate(0),
                raw.clone(),
            ))),
        ),
        (
            "exponential, no jitter",
            status(BoxCloneService::new(tower::retry::Retry::new(
                NoJitter(0),
                raw.clone(),
            ))),
        ),
        (
            "official SDK policy",
            status(BoxCloneService::new(tower::retry::Retry::new(
                OfficialSdk {
                    retries: 0,
                    rng: SmallRng::seed_from_u64(seed),
                },
                raw.clone(),
            ))),
        ),
        (
            "tower Retry + TpsBudget",
            status(BoxCloneService::new(tower::retry::Retry::new(
                TowerBudgeted {
                    attempts: 0,
                    backoff: tower_backoff,
                    budget,
                },
                raw.clone(),
            ))),
        ),
        (
            "OverloadRetryLayer foreground",
            BoxCloneService::new(
                ours_retry
                    .map_response(|r| r.status())
                    .map_err(BoxError::from),
            ),
        ),
        (
            "full stack",
            BoxCloneService::new(stack.map_response(|r| r.status()).map_err(BoxError::from)),
        ),
    ]
}

// ===== running and measuring =====

/// What one strategy achieved.
#[derive(Debug, Clone)]
pub struct StrategyResult {
    pub name: &'static str,
    pub calls: usize,
    pub successes: usize,
    /// Upstream attempts per call, over the whole run.
    pub amplification: f64,
    /// Upstream attempts per call arriving during the outage.
    pub outage_amplification: f64,
    /// Peak upstream attempts per second during the outage, over the mean before it.
    pub peak_load_ratio: f64,
    pub p50: Duration,
    pub p99: Duration,
    /// Seconds after the outage until goodput is back to 90% of its level before it.
    pub recovery: Option<f64>,
    /// Of the calls arriving in the intermittent phase (if any): the share
    /// that succeeded, and upstream attempts per call.
    pub late_success: f64,
    pub late_amplification: f64,
    /// Upstream attempts and successes per 10 s, for the plot.
    pub load: Vec<f64>,
    pub goodput: Vec<f64>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs every strategy on the same arrival trace; call under a paused tokio clock.
pub async fn run(scenario: &Scenario) -> Vec<StrategyResult> {
    let arrivals = scenario.arrivals();
    let names: Vec<&'static str> = strategies(&Upstream::new(scenario), scenario.seed)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut results = Vec::new();
    for index in 0..names.len() {
        let upstream = Upstream::new(scenario);
        let (name, client) = strategies(&upstream, scenario.seed).swap_remove(index);
        results.push(run_one(name, client, &upstream, scenario, &arrivals).await);
    }
    results
}

async fn run_one(
    name: &'static str,
    client: Client,
    upstream: &Upstream,
    scenario: &Scenario,
    arrivals: &[Duration],
) -> StrategyResult {
    let start = upstream.0.start;
    let mut tasks = tokio::task::JoinSet::new();
    for &at in arrivals {
        let client = client.clone();
        let deadline = scenario.deadline;
        tasks.spawn(async move {
            tokio::time::sleep_until(start + at).await;
            let sent = Instant::now();
            let outcome = tokio::time::timeout(
                deadline,
                client.oneshot(Request::new(Full::new(Bytes::from(format!(
                    r#"{{"model":"{PRIMARY}","max_tokens":64}}"#
                ))))),
            )
            .await;
            let ok = matches!(outcome, Ok(Ok(status)) if status == StatusCode::OK);
            (at, sent.elapsed(), ok)
        });
    }
    let mut outcomes = Vec::new();
    while let Some(done) = tasks.join_next().await {
        outcomes.push(done.expect("a call task"));
    }
    let attempts = upstream.0.attempts.lock().unwrap().clone();
    let (from, to) = (
        scenario.outage.0.as_secs_f64(),
        scenario.outage.1.as_secs_f64(),
    );
    let buckets = (scenario.length.as_secs_f64() / 10.0).ceil() as usize + 7;
    let mut load = vec![0.0; buckets];
    let mut per_second: HashMap<u64, f64> = HashMap::new();
    for (at, _) in &attempts {
        load[(*at / 10.0) as usize] += 1.0;
        *per_second.entry(*at as u64).or_default() += 1.0;
    }
    let mut goodput = vec![0.0; buckets];
    let mut latencies = Vec::new();
    for (at, latency, ok) in &outcomes {
        if *ok {
            goodput[((at.as_secs_f64() + latency.as_secs_f64()) / 10.0) as usize] += 1.0;
            latencies.push(*latency);
        }
    }
    latencies.sort();
    let before = per_second
        .iter()
        .filter(|(s, _)| (**s as f64) < from)
        .map(|(_, n)| n)
        .sum::<f64>()
        / from.max(1.0);
    let peak = per_second
        .iter()
        .filter(|(s, _)| (**s as f64) >= from && (**s as f64) < to)
        .map(|(_, n)| *n)
        .fold(0.0, f64::max);
    let arrived_in_outage = arrivals
        .iter()
        .filter(|a| a.as_secs_f64() >= from && a.as_secs_f64() < to)
        .count();
    let attempts_in_outage = attempts
        .iter()
        .filter(|(at, _)| *at >= from && *at < to)
        .count();
    let baseline = goodput[1..(from / 10.0) as usize].iter().sum::<f64>()
        / ((from / 10.0) as usize - 1) as f64;
    let recovery = ((to / 10.0) as usize..buckets)
        .find(|&b| goodput[b] >= 0.9 * baseline)
        .map(|b| (b as f64 * 10.0 - to).max(0.0));
    let successes = outcomes.iter().filter(|(_, _, ok)| *ok).count();
    let late_from = scenario
        .intermittent
        .map_or(f64::INFINITY, |(from, _)| from.as_secs_f64());
    let late_calls = outcomes
        .iter()
        .filter(|(at, _, _)| at.as_secs_f64() >= late_from)
        .count();
    let late_successes = outcomes
        .iter()
        .filter(|(at, _, ok)| *ok && at.as_secs_f64() >= late_from)
        .count();
    let late_attempts = attempts.iter().filter(|(at, _)| *at >= late_from).count();
    StrategyResult {
        late_success: late_successes as f64 / late_calls.max(1) as f64,
        late_amplification: late_attempts as f64 / late_calls.max(1) as f64,
        name,
        calls: outcomes.len(),
        successes,
        amplification: attempts.len() as f64 / outcomes.len() as f64,
        outage_amplification: attempts_in_outage as f64 / arrived_in_outage.max(1) as f64,
        peak_load_ratio: peak / before.max(1e-9),
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
        recovery,
        load,
        goodput,
    }
}

/// The table on stdout.
pub fn table(results: &[StrategyResult]) -> String {
    let mut out = format!(
        "{:<30} {:>8} {:>10} {:>10} {:>10} {:>9} {:>9} {:>10}\n",
        "strategy", "success", "attempts", "in outage", "peak load", "p50", "p99", "recovery"
    );
    for r in results {
        out += &format!(
            "{:<30} {:>7.1}% {:>9.2}x {:>9.2}x {:>9.1}x {:>8.1}s {:>8.1}s {:>10}\n",
            r.name,
            100.0 * r.successes as f64 / r.calls as f64,
            r.amplification,
            r.outage_amplification,
            r.peak_load_ratio,
            r.p50.as_secs_f64(),
            r.p99.as_secs_f64(),
            r.recovery
                .map_or("never".to_owned(), |s| format!("{s:.0} s")),
        );
    }
    out
}

/// The long-horizon table: what each strategy does in the outage and,
/// twenty minutes later, with intermittent faults.
pub fn long_table(results: &[StrategyResult]) -> String {
    let mut out = format!(
        "{:<30} {:>10} {:>14} {:>14}\n",
        "strategy", "in outage", "after: success", "after: attempts"
    );
    for r in results {
        out += &format!(
            "{:<30} {:>9.2}x {:>13.1}% {:>14.2}x\n",
            r.name,
            r.outage_amplification,
            100.0 * r.late_success,
            r.late_amplification,
        );
    }
    out
}

/// Upstream load and goodput over time, one line per strategy, as SVG.
pub fn svg(results: &[StrategyResult], scenario: &Scenario) -> String {
    const COLOURS: [&str; 7] = [
        "#888888", "#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#1f77b4", "#2ca02c",
    ];
    let (width, height, pad) = (900.0, 260.0, 40.0);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{}" font-family="sans-serif" font-size="11">"#,
        2.0 * height + 100.0
    );
    for (panel, title) in [
        (0, "upstream attempts per 10 s"),
        (1, "successful calls per 10 s"),
    ] {
        let top = panel as f64 * (height + 30.0) + 20.0;
        let series: Vec<&Vec<f64>> = results
            .iter()
            .map(|r| if panel == 0 { &r.load } else { &r.goodput })
            .collect();
        let max = series
            .iter()
            .flat_map(|s| s.iter())
            .cloned()
            .fold(1.0, f64::max);
        let buckets = series.first().map_or(1, |s| s.len()) as f64;
        let x = |i: f64| pad + i / buckets * (width - 2.0 * pad);
        let y = |v: f64| top + height - v / max * height;
        let (from, to) = (
            scenario.outage.0.as_secs_f64() / 10.0,
            scenario.outage.1.as_secs_f64() / 10.0,
        );
        svg += &format!(
            r##"<rect x="{}" y="{top}" width="{}" height="{height}" fill="#f3e0e0"/>"##,
            x(from),
            x(to) - x(from)
        );
        svg += &format!(
            r#"<text x="{pad}" y="{}">{title} (outage shaded; max {max:.0})</text>"#,
            top - 5.0
        );
        for (r, colour) in results.iter().zip(COLOURS) {
            let values = if panel == 0 { &r.load } else { &r.goodput };
            let points: Vec<String> = values
                .iter()
                .enumerate()
                .map(|(i, v)| format!("{:.1},{:.1}", x(i as f64), y(*v)))
                .collect();
            svg += &format!(
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
                points.join(" ")
            );
        }
    }
    for (i, (r, colour)) in results.iter().zip(COLOURS).enumerate() {
        svg += &format!(
            r#"<text x="{}" y="{}" fill="{colour}">{}</text>"#,
            pad + (i % 4) as f64 * 210.0,
            2.0 * height + 75.0 + (i / 4) as f64 * 14.0,
            r.name
        );
    }
    svg + "</svg>\n"
}

// ===== the AWS backoff paper's contention experiment =====

/// Total work (attempts) and completion time of `clients` contending on one
/// resource that accepts one write per millisecond slot, per jitter kind.
pub fn contention(clients: usize, seed: u64) -> Vec<(Jitter, usize, f64)> {
    [
        Jitter::None,
        Jitter::Equal,
        Jitter::Full,
        Jitter::Decorrelated,
    ]
    .into_iter()
    .map(|jitter| {
        let backoff = Backoff::new(
            Duration::from_millis(5),
            Duration::from_millis(2000),
            jitter,
        );
        let mut rng = SmallRng::seed_from_u64(seed);
        // (next attempt time in µs, retries so far, previous delay)
        let mut pending: Vec<(u64, u32, Duration)> = (0..clients)
            .map(|_| (rng.random_range(0..1000), 0, backoff.base()))
            .collect();
        let (mut work, mut finished) = (0usize, 0u64);
        while !pending.is_empty() {
            pending.sort_by_key(|p| p.0);
            let slot = pending[0].0 / 1000;
            let contenders = pending.iter().take_while(|p| p.0 / 1000 == slot).count();
            work += contenders;
            let mut next = Vec::with_capacity(pending.len());
            for (i, (at, retries, previous)) in pending.into_iter().enumerate() {
                if i >= contenders {
                    next.push((at, retries, previous));
                } else if contenders == 1 {
                    finished = finished.max(at);
                } else {
                    let delay = backoff.delay(retries, previous, &mut rng);
                    // A little network noise, as any real client has.
                    let noise = rng.random_range(0..200);
                    next.push((
                        at + delay.as_micros() as u64 + 1000 + noise,
                        retries + 1,
                        delay,
                    ));
                }
            }
            pending = next;
        }
        (jitter, work, finished as f64 / 1000.0)
    })
    .collect()
}

// ===== the rate-limit scenario (issue 14) =====

/// An organisation at its per-minute limits for one model: an upstream
/// that answers 429 when a request does not fit its RPM, ITPM and OTPM
/// token buckets, bursty traffic of mixed prompt sizes, and the ways a
/// client can live with it: retry the 429s, check locally and reject, or
/// pace (wait for the budget before sending).
#[cfg(feature = "pacing")]
pub mod rate_limit {
    use super::*;
    use http::HeaderValue;
    use http_body::Body;
    use http_body_util::BodyExt;
    use std::time::{SystemTime, UNIX_EPOCH};
    use tower_overload::bucket::{Shortfall, TokenBucket};
    use tower_overload::estimate::max_tokens;
    use tower_overload::pacing::{PacingLimits, RateLimitPacingLayer};
    use tower_overload::usage::Usage;

    pub const MODEL: &str = "claude-sonnet-4-6";
    const BUCKETS: [&str; 3] = ["requests", "input-tokens", "output-tokens"];

    /// The traffic and the organisation's limits.
    #[derive(Debug, Clone)]
    pub struct RateLimitScenario {
        /// Arrivals stop after this long; the run lasts until every call ends.
        pub length: Duration,
        pub deadline: Duration,
        /// RPM, ITPM, OTPM.
        pub limits: [u64; 3],
        /// Seconds between the starts of two bursts (uniform in the range).
        pub burst_gap: (f64, f64),
        /// Calls per burst (uniform in the range).
        pub burst_calls: (usize, usize),
        /// A burst's calls arrive within this many seconds.
        pub burst_spread: f64,
        /// Prompt sizes in tokens (log-uniform in the range).
        pub prompt_tokens: (u64, u64),
        pub max_tokens: &'static [u64],
        /// Output speed of the upstream, tokens per second.
        pub tokens_per_sec: f64,
        /// What the steady state excludes: the start, before the first
        /// headers were learned and the buckets were full.
        pub warm_up: Duration,
        pub seed: u64,
    }

    impl RateLimitScenario {
        /// A tier-like limit (50 RPM, 30k ITPM, 8k OTPM), bursts every 30 to
        /// 90 s of 6 to 14 calls within 10 s, prompts of 100 to 50,000
        /// tokens, `max_tokens` 256 to 4096; 40 minutes; 120 s deadline.
        pub fn reference() -> Self {
            Self {
                length: Duration::from_secs(40 * 60),
                deadline: Duration::from_secs(120),
                limits: [50, 30_000, 8_000],
                burst_gap: (30.0, 90.0),
                burst_calls: (6, 14),
                burst_spread: 10.0,
                prompt_tokens: (100, 50_000),
                max_tokens: &[256, 512, 1024, 2048, 4096],
                tokens_per_sec: 100.0,
                warm_up: Duration::from_secs(60),
                seed: 2028,
            }
        }

        /// Every call: when it arrives and its request body.
        fn calls(&self) -> Vec<(Duration, Bytes)> {
            let mut rng = SmallRng::seed_from_u64(self.seed);
            let (low, high) = (
                (self.prompt_tokens.0 as f64).ln(),
                (self.prompt_tokens.1 as f64).ln(),
            );
            let mut calls = Vec::new();
            let mut burst = rng.random_range(0.0..self.burst_gap.0);
            while burst < self.length.as_secs_f64() {
                let n = rng.random_range(self.burst_calls.0..=self.burst_calls.1);
                for _ in 0..n {
                    let at = burst + rng.random::<f64>() * self.burst_spread;
                    let tokens = rng.random_range(low..high).exp() as usize;
                    let max = self.max_tokens[rng.random_range(0..self.max_tokens.len())];
                    calls.push((Duration::from_secs_f64(at), body(tokens, max)));
                }
                burst += rng.random_range(self.burst_gap.0..self.burst_gap.1);
            }
            calls.sort_by_key(|(at, _)| *at);
            calls
        }
    }

    /// A Messages request of about `tokens` input tokens (4 bytes each, as
    /// the upstream counts them).
    fn body(tokens: usize, max_tokens: u64) -> Bytes {
        let head = format!(
            r#"{{"model":"{MODEL}","max_tokens":{max_tokens},"messages":[{{"role":"user","content":""#
        );
        let tail = r#""}]}"#;
        let text = (4 * tokens).saturating_sub(head.len() + tail.len());
        let mut body = head.into_bytes();
        body.resize(body.len() + text, b'x');
        body.extend_from_slice(tail.as_bytes());
        Bytes::from(body)
    }

    /// One attempt the upstream saw.
    #[derive(Debug, Clone, Copy)]
    struct Attempt {
        at: f64,
        status: u16,
        input: u64,
        output: u64,
    }

    struct LimitedState {
        start: Instant,
        scenario: RateLimitScenario,
        /// RPM, ITPM, OTPM, refilled continuously.
        buckets: Mutex<[TokenBucket; 3]>,
        attempts: Mutex<Vec<Attempt>>,
    }

    /// The organisation's upstream for one model.
    #[derive(Clone)]
    pub struct Limited(Arc<LimitedState>);

    impl Limited {
        fn new(scenario: &RateLimitScenario) -> Self {
            let now = Instant::now();
            Self(Arc::new(LimitedState {
                start: now,
                scenario: scenario.clone(),
                buckets: Mutex::new(
                    scenario
                        .limits
                        .map(|limit| TokenBucket::per_minute(limit, now)),
                ),
                attempts: Mutex::new(Vec::new()),
            }))
        }

        /// The share of `max_tokens` a call generates: fixed per request
        /// body, so every strategy's calls generate the same.
        fn generated(&self, body: &[u8], max_tokens: u64) -> u64 {
            let mut x = (body.len() as u64 ^ max_tokens.rotate_left(32)) ^ self.0.scenario.seed;
            // splitmix64's finaliser
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
            x ^= x >> 31;
            let share = 0.1 + 0.9 * (x % 1000) as f64 / 1000.0;
            ((max_tokens as f64 * share) as u64).max(1)
        }
    }

    /// `anthropic-ratelimit-{requests,input-tokens,output-tokens}-{limit,remaining,reset}`.
    fn rate_limit_headers(
        response: &mut Response<Full<Bytes>>,
        buckets: &mut [TokenBucket; 3],
        now: Instant,
    ) {
        let wall = SystemTime::now();
        for (bucket, name) in buckets.iter_mut().zip(BUCKETS) {
            let capacity = bucket.capacity();
            let level = bucket.available(now);
            let to_full = (capacity as f64 - level).max(0.0) * 60.0 / capacity as f64;
            let headers = response.headers_mut();
            headers.insert(
                http::HeaderName::try_from(format!("anthropic-ratelimit-{name}-limit")).unwrap(),
                capacity.into(),
            );
            headers.insert(
                http::HeaderName::try_from(format!("anthropic-ratelimit-{name}-remaining"))
                    .unwrap(),
                (level.max(0.0).floor() as u64).into(),
            );
            headers.insert(
                http::HeaderName::try_from(format!("anthropic-ratelimit-{name}-reset")).unwrap(),
                HeaderValue::from_str(&rfc3339(wall + Duration::from_secs_f64(to_full.ceil())))
                    .unwrap(),
            );
        }
    }

    /// `time` as RFC 3339 in UTC, to the second.
    fn rfc3339(time: SystemTime) -> String {
        let secs = time
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs() as i64;
        let (days, of_day) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        // Days since 1970-01-01 to a proleptic Gregorian date, by 400-year eras
        // starting on 1 March (so the leap day ends a year).
        let shifted = days + 719_468;
        let era = shifted.div_euclid(146_097);
        let of_era = shifted - era * 146_097;
        let year_of_era = (of_era - of_era / 1460 + of_era / 36_524 - of_era / 146_096) / 365;
        let of_year = of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
        let month_from_march = (5 * of_year + 2) / 153;
        let day = of_year - (153 * month_from_march + 2) / 5 + 1;
        let month = if month_from_march < 10 {
            month_from_march + 3
        } else {
            month_from_march - 9
        };
        let year = year_of_era + era * 400 + i64::from(month <= 2);
        format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
            of_day / 3600,
            of_day / 60 % 60,
            of_day % 60
        )
    }

    impl Service<Request<Full<Bytes>>> for Limited {
        type Response = Response<Full<Bytes>>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: Request<Full<Bytes>>) -> Self::Future {
            let this = self.clone();
            Box::pin(async move {
                let state = &this.0;
                let body = request
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let input = body.len() as u64 / 4;
                let max = max_tokens(&body).unwrap_or(0);
                let now = Instant::now();
                let at = now.duration_since(state.start).as_secs_f64();
                // The API's check: one request, the input, and max_tokens of
                // output (reserved until the output is known) must all fit.
                let short = {
                    let mut buckets = state.buckets.lock().unwrap();
                    let mut longest = Some(Duration::ZERO);
                    for (bucket, amount) in buckets.iter_mut().zip([1, input, max]) {
                        match bucket.fits(amount, now) {
                            Ok(()) => {}
                            Err(Shortfall::Wait(wait)) => longest = longest.map(|l| l.max(wait)),
                            Err(Shortfall::TooLarge { .. }) => longest = None,
                        }
                    }
                    match longest {
                        Some(wait) if wait.is_zero() => {
                            for (bucket, amount) in buckets.iter_mut().zip([1, input, max]) {
                                bucket.charge(amount, now);
                            }
                            None
                        }
                        // Larger than a whole bucket: it never fits; say a minute.
                        other => {
                            let retry_after =
                                other.map_or(60, |wait| wait.as_secs_f64().ceil().max(1.0) as u64);
                            let mut response = reply(429, "rate_limit_error", Some(retry_after));
                            rate_limit_headers(&mut response, &mut buckets, now);
                            Some(response)
                        }
                    }
                };
                if let Some(response) = short {
                    state.attempts.lock().unwrap().push(Attempt {
                        at,
                        status: 429,
                        input: 0,
                        output: 0,
                    });
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    return Ok(response);
                }
                let output = this.generated(&body, max);
                state.attempts.lock().unwrap().push(Attempt {
                    at,
                    status: 200,
                    input,
                    output,
                });
                let service =
                    Duration::from_secs_f64(0.5 + output as f64 / state.scenario.tokens_per_sec);
                tokio::time::sleep(service).await;
                let text = format!(
                    r#"{{"type":"message","role":"assistant","model":"{MODEL}","content":[{{"type":"text","text":"ok"}}],"usage":{{"input_tokens":{input},"output_tokens":{output}}}}}"#
                );
                let mut response = Response::new(Full::new(Bytes::from(text)));
                response
                    .headers_mut()
                    .insert("content-type", HeaderValue::from_static("application/json"));
                let now = Instant::now();
                let mut buckets = state.buckets.lock().unwrap();
                // The end of the call: the unused part of max_tokens comes back.
                buckets[2].put_back(max - output, now);
                rate_limit_headers(&mut response, &mut buckets, now);
                Ok(response)
            })
        }
    }

    // ===== LiteLLM-style reserve-and-reject =====

    /// Checks a local copy of the limits before sending; when the budget is
    /// short it answers its own 429 at once (nothing sent, nothing waits).
    #[derive(Clone)]
    struct ReserveReject<S> {
        inner: S,
        buckets: Arc<Mutex<[TokenBucket; 3]>>,
    }

    impl<S> Service<Request<Full<Bytes>>> for ReserveReject<S>
    where
        S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = BoxError>
            + Clone
            + Send
            + 'static,
        S::Future: Send,
    {
        type Response = Response<Full<Bytes>>;
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            self.inner.poll_ready(cx)
        }

        fn call(&mut self, request: Request<Full<Bytes>>) -> Self::Future {
            let clone = self.inner.clone();
            let mut inner = std::mem::replace(&mut self.inner, clone);
            let buckets = Arc::clone(&self.buckets);
            Box::pin(async move {
                let (parts, body) = request.into_parts();
                let body = body.collect().await?.to_bytes();
                let amounts = [1, body.len() as u64 / 4, max_tokens(&body).unwrap_or(0)];
                {
                    let now = Instant::now();
                    let mut buckets = buckets.lock().unwrap();
                    let fits = buckets
                        .iter_mut()
                        .zip(amounts)
                        .all(|(bucket, amount)| bucket.fits(amount, now).is_ok());
                    if !fits {
                        return Ok(reply(429, "rate_limit_error", None));
                    }
                    for (bucket, amount) in buckets.iter_mut().zip(amounts) {
                        bucket.charge(amount, now);
                    }
                }
                let response = inner
                    .call(Request::from_parts(parts, Full::new(body)))
                    .await?;
                let (parts, body) = response.into_parts();
                let body = body.collect().await?.to_bytes();
                let now = Instant::now();
                let mut buckets = buckets.lock().unwrap();
                match Usage::from_message(&body).and_then(|usage| usage.output_tokens) {
                    // The real output replaces the max_tokens reserved.
                    Some(output) if output <= amounts[2] => {
                        buckets[2].put_back(amounts[2] - output, now)
                    }
                    Some(_) => {}
                    // An error used no tokens.
                    None => {
                        buckets[1].put_back(amounts[1], now);
                        buckets[2].put_back(amounts[2], now);
                    }
                }
                Ok(Response::from_parts(parts, Full::new(body)))
            })
        }
    }

    // ===== the strategies =====

    /// Reads the body to its end (a pacing layer settles the call there)
    /// and keeps the status.
    fn read_through<S, B>(service: S) -> Client
    where
        S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        BoxCloneService::new(service.map_err(Into::into).and_then(
            |response: Response<B>| async move {
                let status = response.status();
                response.into_body().collect().await.map_err(Into::into)?;
                Ok(status)
            },
        ))
    }

    fn strategies(upstream: &Limited, scenario: &RateLimitScenario) -> Vec<(&'static str, Client)> {
        let seed = scenario.seed;
        let raw = ServiceBuilder::new()
            .map_err(|never: Infallible| -> BoxError { match never {} })
            .service(upstream.clone());
        let now = Instant::now();
        let [rpm, itpm, otpm] = scenario.limits;
        let pacing = RateLimitPacingLayer::new()
            .limits_for(
                MODEL,
                PacingLimits {
                    requests_per_minute: Some(rpm),
                    input_tokens_per_minute: Some(itpm),
                    output_tokens_per_minute: Some(otpm),
                },
            )
            // Waited budget plus the longest generation stay within the deadline.
            .queue_timeout(Some(scenario.deadline / 2));
        vec![
            (
                "retry only (foreground)",
                read_through(
                    OverloadRetryLayer::new(RetryPolicy::foreground().seed(seed))
                        .layer(upstream.clone()),
                ),
            ),
            (
                "official SDK policy",
                read_through(tower::retry::Retry::new(
                    OfficialSdk {
                        retries: 0,
                        rng: SmallRng::seed_from_u64(seed),
                    },
                    raw.clone(),
                )),
            ),
            (
                "reserve-and-reject (LiteLLM)",
                read_through(ReserveReject {
                    inner: raw.clone(),
                    buckets: Arc::new(Mutex::new(
                        scenario
                            .limits
                            .map(|limit| TokenBucket::per_minute(limit, now)),
                    )),
                }),
            ),
            (
                "pacing + foreground retry",
                read_through(
                    ServiceBuilder::new()
                        .layer(OverloadRetryLayer::new(
                            RetryPolicy::foreground().seed(seed),
                        ))
                        .layer(pacing)
                        .service(upstream.clone()),
                ),
            ),
        ]
    }

    // ===== running and measuring =====

    /// What one strategy achieved.
    #[derive(Debug, Clone)]
    pub struct RateLimitResult {
        pub name: &'static str,
        pub calls: usize,
        pub ok: usize,
        pub failed: usize,
        /// 429s the upstream answered, in all and after the warm-up.
        pub upstream_429: usize,
        pub steady_429: usize,
        /// Input and output tokens the upstream accepted after the warm-up,
        /// as a share of what the limits allow over that time.
        pub itpm_use: f64,
        pub otpm_use: f64,
        /// Successful calls per minute of traffic.
        pub goodput: f64,
        /// Input tokens of the successful calls per minute of traffic: the
        /// goodput that does not favour the strategies that serve small
        /// prompts and fail large ones.
        pub token_goodput: f64,
        pub p50: Duration,
        pub p99: Duration,
        /// Calls still unanswered at their deadline.
        pub past_deadline: usize,
    }

    /// Runs every strategy on the same calls; call under a paused tokio clock.
    pub async fn run(scenario: &RateLimitScenario) -> Vec<RateLimitResult> {
        let calls = Arc::new(scenario.calls());
        let count = strategies(&Limited::new(scenario), scenario).len();
        let mut results = Vec::new();
        for index in 0..count {
            let upstream = Limited::new(scenario);
            let (name, client) = strategies(&upstream, scenario).swap_remove(index);
            results.push(run_one(name, client, &upstream, scenario, Arc::clone(&calls)).await);
        }
        results
    }

    async fn run_one(
        name: &'static str,
        client: Client,
        upstream: &Limited,
        scenario: &RateLimitScenario,
        calls: Arc<Vec<(Duration, Bytes)>>,
    ) -> RateLimitResult {
        let start = upstream.0.start;
        let mut tasks = tokio::task::JoinSet::new();
        for index in 0..calls.len() {
            let client = client.clone();
            let deadline = scenario.deadline;
            let calls = Arc::clone(&calls);
            tasks.spawn(async move {
                let (at, body) = calls[index].clone();
                let tokens = body.len() as u64 / 4;
                tokio::time::sleep_until(start + at).await;
                let sent = Instant::now();
                let mut request = Request::post("/v1/messages").body(Full::new(body)).unwrap();
                request
                    .headers_mut()
                    .insert("content-type", HeaderValue::from_static("application/json"));
                let outcome = tokio::time::timeout(deadline, client.oneshot(request)).await;
                let ok = matches!(outcome, Ok(Ok(status)) if status == StatusCode::OK);
                (sent.elapsed(), ok, outcome.is_err(), tokens)
            });
        }
        let mut outcomes = Vec::new();
        while let Some(done) = tasks.join_next().await {
            outcomes.push(done.expect("a call task"));
        }
        let attempts = upstream.0.attempts.lock().unwrap().clone();
        let warm_up = scenario.warm_up.as_secs_f64();
        let length = scenario.length.as_secs_f64();
        let steady = |a: &&Attempt| a.at >= warm_up && a.at < length;
        let steady_minutes = (length - warm_up) / 60.0;
        let accepted = |field: fn(&Attempt) -> u64| {
            attempts
                .iter()
                .filter(steady)
                .filter(|a| a.status == 200)
                .map(field)
                .sum::<u64>() as f64
        };
        let mut latencies: Vec<Duration> = outcomes
            .iter()
            .filter(|(_, ok, _, _)| *ok)
            .map(|(latency, _, _, _)| *latency)
            .collect();
        latencies.sort();
        let ok = latencies.len();
        RateLimitResult {
            name,
            calls: outcomes.len(),
            ok,
            failed: outcomes.len() - ok,
            upstream_429: attempts.iter().filter(|a| a.status == 429).count(),
            steady_429: attempts
                .iter()
                .filter(steady)
                .filter(|a| a.status == 429)
                .count(),
            itpm_use: accepted(|a| a.input) / (scenario.limits[1] as f64 * steady_minutes),
            otpm_use: accepted(|a| a.output) / (scenario.limits[2] as f64 * steady_minutes),
            goodput: ok as f64 / (length / 60.0),
            token_goodput: outcomes
                .iter()
                .filter(|(_, ok, _, _)| *ok)
                .map(|(_, _, _, tokens)| *tokens)
                .sum::<u64>() as f64
                / (length / 60.0),
            p50: percentile(&latencies, 0.5),
            p99: percentile(&latencies, 0.99),
            past_deadline: outcomes.iter().filter(|(_, _, late, _)| *late).count(),
        }
    }

    /// The table on stdout.
    pub fn table(results: &[RateLimitResult]) -> String {
        let mut out = format!(
            "{:<30} {:>5} {:>6} {:>5} {:>6} {:>6} {:>6} {:>8} {:>9} {:>6} {:>6} {:>5}\n",
            "strategy",
            "ok",
            "failed",
            "429s",
            "steady",
            "ITPM",
            "OTPM",
            "goodput",
            "ok tokens",
            "p50",
            "p99",
            "late"
        );
        for r in results {
            out += &format!(
                "{:<30} {:>5} {:>6} {:>5} {:>6} {:>5.1}% {:>5.1}% {:>6.2}/m {:>6.1}k/m {:>5.1}s {:>5.1}s {:>5}\n",
                r.name,
                r.ok,
                r.failed,
                r.upstream_429,
                r.steady_429,
                100.0 * r.itpm_use,
                100.0 * r.otpm_use,
                r.goodput,
                r.token_goodput / 1000.0,
                r.p50.as_secs_f64(),
                r.p99.as_secs_f64(),
                r.past_deadline,
            );
        }
        out
    }
}

fn main() {
    let scenario = Scenario::reference();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    println!(
        "reference storm: {} calls/s for {} s, {PRIMARY} fully down from {} s to {} s, {} s deadline (virtual time)\n",
        scenario.calls_per_sec,
        scenario.length.as_secs(),
        scenario.outage.0.as_secs(),
        scenario.outage.1.as_secs(),
        scenario.deadline.as_secs()
    );
    let results = runtime.block_on(run(&scenario));
    print!("{}", table(&results));
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/overload_sim.svg");
    match std::fs::write(&path, svg(&results, &scenario)) {
        Ok(()) => println!("\nplot: {}", path.display()),
        Err(error) => println!("\ncould not write the plot: {error}"),
    }
    let long = Scenario::long_horizon();
    println!(
        "\nlong horizon: {} calls/s for {} min, {PRIMARY} fully down from {} to {} min, then 1 attempt in 3 overloaded from {} min\n",
        long.calls_per_sec,
        long.length.as_secs() / 60,
        long.outage.0.as_secs() / 60,
        long.outage.1.as_secs() / 60,
        long.intermittent.map_or(0, |(from, _)| from.as_secs() / 60),
    );
    print!("{}", long_table(&runtime.block_on(run(&long))));
    println!("\ncontention on one resource, 100 clients (the AWS backoff paper's experiment):");
    println!("{:<14} {:>8} {:>12}", "jitter", "work", "completion");
    for (jitter, work, ms) in contention(100, 7) {
        println!("{:<14} {:>8} {:>10.0} ms", format!("{jitter:?}"), work, ms);
    }
    println!("paper's ordering: work None >> Equal > Full ~ Decorrelated; completion None slowest");
    rate_limit_main(&runtime);
}

#[cfg(feature = "pacing")]
fn rate_limit_main(runtime: &tokio::runtime::Runtime) {
    let scenario = rate_limit::RateLimitScenario::reference();
    let [rpm, itpm, otpm] = scenario.limits;
    println!(
        "\nrate limits: {rpm} RPM, {itpm} ITPM, {otpm} OTPM for {}; bursts of {} to {} calls every {} to {} s, prompts of {} to {} tokens, for {} min, {} s deadline; steady state after {} s\n",
        rate_limit::MODEL,
        scenario.burst_calls.0,
        scenario.burst_calls.1,
        scenario.burst_gap.0,
        scenario.burst_gap.1,
        scenario.prompt_tokens.0,
        scenario.prompt_tokens.1,
        scenario.length.as_secs() / 60,
        scenario.deadline.as_secs(),
        scenario.warm_up.as_secs(),
    );
    print!(
        "{}",
        rate_limit::table(&runtime.block_on(rate_limit::run(&scenario)))
    );
}

#[cfg(not(feature = "pacing"))]
fn rate_limit_main(_: &tokio::runtime::Runtime) {
    println!("\nrate-limit scenario: run with `--features pacing`");
}
