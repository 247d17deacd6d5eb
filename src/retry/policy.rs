//! The retry policy: its two presets and the builder that adjusts them
//! ([`RetryPolicy`], [`ClassPolicy`], [`FinalFailure`]). Its decisions are in
//! `decide.rs`, its stream guard in `stream_guard.rs`.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::HeaderName;
use rand::{SeedableRng, rngs::SmallRng};

use crate::backoff::{Backoff, Jitter};
use crate::budget::{Rationing, RetryBudget, RetryQuota};
use crate::classify::Class;
use crate::retry::classify_error::{ClassifyError, DefaultErrorClassifier};
use crate::retry::stream_guard::StreamGuard;

/// Attempts and backoff for one [`Class`] of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassPolicy {
    /// Most attempts that may end in this class; 1 means never retried.
    pub max_attempts: u32,
    /// The wait before each retry of this class.
    pub backoff: Backoff,
}

impl ClassPolicy {
    /// `max_attempts` attempts (counting the first) with `backoff` between them.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_overload::backoff::{Backoff, Jitter};
    /// use tower_overload::retry::ClassPolicy;
    ///
    /// let policy = ClassPolicy::new(3, Backoff::new(Duration::from_millis(500), Duration::from_secs(8), Jitter::Equal));
    /// assert_eq!(policy.max_attempts, 3);
    /// ```
    pub const fn new(max_attempts: u32, backoff: Backoff) -> Self {
        Self {
            max_attempts,
            backoff,
        }
    }

    /// Never retried.
    ///
    /// ```
    /// use tower_overload::retry::ClassPolicy;
    /// assert_eq!(ClassPolicy::never().max_attempts, 1);
    /// ```
    pub const fn never() -> Self {
        Self::new(
            1,
            Backoff::new(Duration::ZERO, Duration::ZERO, Jitter::None),
        )
    }
}

/// What the layer returns when the last attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FinalFailure {
    /// The last upstream response, as it came, with a
    /// [`RetryReport`](crate::retry::RetryReport) extension.
    #[default]
    Response,
    /// The crate's typed [`Error`](crate::Error); the response is dropped.
    Error,
}

/// Settings of [`OverloadRetryLayer`](crate::retry::OverloadRetryLayer).
///
/// Start from a preset, [`foreground`](Self::foreground) for a person
/// waiting or [`background`](Self::background) for a job that can ride out a
/// storm, and adjust. Clones share one retry quota (or budget).
///
/// ```
/// use std::time::Duration;
/// use tower_overload::retry::{FinalFailure, RetryPolicy};
///
/// let policy = RetryPolicy::foreground()
///     .deadline(Some(Duration::from_secs(20)))
///     .final_failure(FinalFailure::Error)
///     .seed(42);
/// assert_eq!(policy.get_deadline(), Some(Duration::from_secs(20)));
/// ```
#[derive(Clone)]
pub struct RetryPolicy {
    pub(crate) overloaded: ClassPolicy,
    pub(crate) rate_limited: ClassPolicy,
    pub(crate) server_error: ClassPolicy,
    pub(crate) timeout: ClassPolicy,
    pub(crate) conflict: ClassPolicy,
    pub(crate) transport: ClassPolicy,
    pub(crate) max_attempts: u32,
    pub(crate) deadline: Option<Duration>,
    pub(crate) retry_window: Option<Duration>,
    pub(crate) attempt_timeout: Option<Duration>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) max_server_delay: Duration,
    pub(crate) rationing: Option<Rationing>,
    pub(crate) final_failure: FinalFailure,
    pub(crate) retry_count_header: Option<HeaderName>,
    pub(crate) sniff_timeout: Duration,
    pub(crate) stream_guard: Option<StreamGuard>,
    pub(crate) error_classifier: Arc<dyn ClassifyError>,
    pub(crate) seeds: Arc<SeedSource>,
    #[cfg(feature = "health")]
    pub(crate) health: Option<crate::health::HealthMonitor>,
    /// The per-model handles, shared by clones; `None` when switched off.
    #[cfg(feature = "metrics")]
    pub(crate) metrics: Option<Arc<crate::metrics::RetryMeters>>,
}

/// Seeds one RNG per call: reproducible when seeded, different for every call.
pub(crate) struct SeedSource {
    seed: u64,
    calls: AtomicU64,
}

impl SeedSource {
    fn new(seed: u64) -> Self {
        Self {
            seed,
            calls: AtomicU64::new(0),
        }
    }

    fn from_entropy() -> Self {
        // std's RandomState is seeded from the OS once per thread and varied per instance.
        Self::new(
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish(),
        )
    }

    pub(crate) fn next_rng(&self) -> SmallRng {
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        SmallRng::seed_from_u64(self.seed ^ call.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }
}

/// The official SDKs' default timeout of a request. A non-streaming answer
/// sends its head only once the whole message is generated, so a shorter
/// wait for the head would kill long generations that would have succeeded.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(600);

/// Silence between two frames of a response body. A stream sends `ping`
/// events every few seconds while the model thinks, and a non-streaming
/// body follows its head at once, so two minutes of nothing is a dead
/// connection, not a slow model.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// A person waiting gets the official SDKs' bound on one call, so no
/// generation the SDK would let finish is cut short by this preset.
const FOREGROUND_DEADLINE: Duration = ATTEMPT_TIMEOUT;

pub(super) const fn backoff(base_ms: u64, cap_ms: u64, jitter: Jitter) -> Backoff {
    Backoff::new(
        Duration::from_millis(base_ms),
        Duration::from_millis(cap_ms),
        jitter,
    )
}

impl RetryPolicy {
    /// For a person waiting: overloads get up to 5 attempts with full jitter
    /// (base 1 s, cap 60 s); rate limits wait what the server says (up to 60 s,
    /// 3 attempts); server errors, timeouts, conflicts and connection failures
    /// get 3 attempts (equal jitter, 0.5 s to 8 s, as the official SDKs); at
    /// most 6 attempts in all, and no retry is started after 60 s (the
    /// [retry window](Self::retry_window)).
    ///
    /// No call stays pending forever: an attempt without a response head
    /// after 600 s (the official SDKs' timeout; a non-streaming answer sends
    /// its head only when the whole message is generated) or a body silent
    /// for 120 s between frames is a [`Class::Timeout`], and the whole call
    /// ends at its [deadline](Self::deadline) of 600 s, the attempt in flight
    /// included.
    ///
    /// Retries are rationed by a [`RetryQuota`] shared by every clone, as
    /// the AWS SDKs' standard mode does: 500 tokens, 5 a retry, 10 after a
    /// timeout; a success gives back what its retry cost, or 1 token on a
    /// first try. In a full outage, about 100 retries, then one attempt per
    /// call; as calls succeed again, retries come back with them.
    ///
    /// ```
    /// use tower_overload::retry::RetryPolicy;
    /// let policy = RetryPolicy::foreground();
    /// assert_eq!(policy.get_max_attempts(), 6);
    /// ```
    pub fn foreground() -> Self {
        let quick = ClassPolicy::new(3, backoff(500, 8_000, Jitter::Equal));
        Self {
            overloaded: ClassPolicy::new(5, backoff(1_000, 60_000, Jitter::Full)),
            rate_limited: ClassPolicy::new(3, backoff(1_000, 60_000, Jitter::Full)),
            server_error: quick,
            timeout: quick,
            conflict: quick,
            transport: quick,
            max_attempts: 6,
            deadline: Some(FOREGROUND_DEADLINE),
            retry_window: Some(Duration::from_secs(60)),
            attempt_timeout: Some(ATTEMPT_TIMEOUT),
            idle_timeout: Some(IDLE_TIMEOUT),
            max_server_delay: Duration::from_secs(60),
            rationing: Some(Rationing::Quota(RetryQuota::default())),
            final_failure: FinalFailure::Response,
            retry_count_header: None,
            sniff_timeout: Duration::from_secs(5),
            stream_guard: None,
            error_classifier: Arc::new(DefaultErrorClassifier),
            seeds: Arc::new(SeedSource::from_entropy()),
            #[cfg(feature = "health")]
            health: None,
            #[cfg(feature = "metrics")]
            metrics: Some(Arc::new(crate::metrics::RetryMeters::new(None))),
        }
    }

    /// For a job that can wait: rides out multi-minute storms. Overloads get
    /// 12 attempts with full jitter (base 30 s, cap 300 s); rate limits wait
    /// what the server says up to 300 s (8 attempts); other transient
    /// failures get 6 attempts (equal jitter, 5 s to 120 s); at most 16
    /// attempts; no retry is started after 30 minutes, and the call ends at
    /// 40 minutes (room for a last attempt's long generation). Same attempt
    /// and idle timeouts and the same quota as [`foreground`](Self::foreground).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_overload::retry::RetryPolicy;
    /// let policy = RetryPolicy::background();
    /// assert_eq!(policy.get_retry_window(), Some(Duration::from_secs(30 * 60)));
    /// assert_eq!(policy.get_deadline(), Some(Duration::from_secs(40 * 60)));
    /// ```
    pub fn background() -> Self {
        let patient = ClassPolicy::new(6, backoff(5_000, 120_000, Jitter::Equal));
        Self {
            overloaded: ClassPolicy::new(12, backoff(30_000, 300_000, Jitter::Full)),
            rate_limited: ClassPolicy::new(8, backoff(5_000, 300_000, Jitter::Full)),
            server_error: patient,
            timeout: patient,
            conflict: patient,
            transport: patient,
            max_attempts: 16,
            deadline: Some(Duration::from_secs(40 * 60)),
            retry_window: Some(Duration::from_secs(30 * 60)),
            max_server_delay: Duration::from_secs(300),
            ..Self::foreground()
        }
    }

    /// Settings for [`Class::Overloaded`] (529, or a 5xx that says overloaded).
    ///
    /// ```
    /// # use tower_overload::retry::{ClassPolicy, RetryPolicy};
    /// let policy = RetryPolicy::foreground().overloaded(ClassPolicy::never());
    /// ```
    pub fn overloaded(mut self, policy: ClassPolicy) -> Self {
        self.overloaded = policy;
        self
    }

    /// Settings for [`Class::RateLimited`] (429). The server's delay, or the
    /// reset of an exhausted `anthropic-ratelimit-*` window, is waited when given.
    ///
    /// ```
    /// # use tower_overload::retry::{ClassPolicy, RetryPolicy};
    /// let policy = RetryPolicy::foreground().rate_limited(ClassPolicy::never());
    /// ```
    pub fn rate_limited(mut self, policy: ClassPolicy) -> Self {
        self.rate_limited = policy;
        self
    }

    /// Settings for [`Class::ServerError`] (500, 502, 503, other 5xx).
    ///
    /// ```
    /// # use tower_overload::retry::{ClassPolicy, RetryPolicy};
    /// let policy = RetryPolicy::foreground().server_error(ClassPolicy::never());
    /// ```
    pub fn server_error(mut self, policy: ClassPolicy) -> Self {
        self.server_error = policy;
        self
    }

    /// Settings for [`Class::Timeout`] (504, 408).
    ///
    /// ```
    /// # use tower_overload::retry::{ClassPolicy, RetryPolicy};
    /// let policy = RetryPolicy::foreground().timeout(ClassPolicy::never());
    /// ```
    pub fn timeout(mut self, policy: ClassPolicy) -> Self {
        self.timeout = policy;
        self
    }

    /// Settings for [`Class::Conflict`] (409).
    ///
    /// ```
    /// # use tower_overload::retry::{ClassPolicy, RetryPolicy};
    /// let policy = RetryPolicy::foreground().conflict(ClassPolicy::never());
    /// ```
    pub fn conflict(mut self, policy: ClassPolicy) -> Self {
        self.conflict = policy;
        self
    }

    /// Settings for [`Class::Transport`]: errors of the inner service, as
    /// judged retryable by the [error classifier](Self::error_classifier).
    ///
    /// ```
    /// # use tower_overload::retry::{ClassPolicy, RetryPolicy};
    /// let policy = RetryPolicy::foreground().transport(ClassPolicy::never());
    /// ```
    pub fn transport(mut self, policy: ClassPolicy) -> Self {
        self.transport = policy;
        self
    }

    /// The most attempts of one call, whatever their classes.
    ///
    /// ```
    /// # use tower_overload::retry::RetryPolicy;
    /// assert_eq!(RetryPolicy::foreground().max_attempts(3).get_max_attempts(), 3);
    /// ```
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The most attempts of one call.
    ///
    /// ```
    /// # use tower_overload::retry::RetryPolicy;
    /// assert_eq!(RetryPolicy::background().get_max_attempts(), 16);
    /// ```
    pub fn get_max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The hard bound on one call, from the first attempt to the response
    /// head: an attempt still in flight when it passes is cancelled and the
    /// call ends with [`ErrorKind::DeadlineExceeded`](crate::ErrorKind::DeadlineExceeded),
    /// naming the attempts and their request ids; no retry is scheduled whose
    /// wait would end past it. A body already handed to the caller is not cut
    /// (the [idle timeout](Self::idle_timeout) bounds its silences). `None`:
    /// no bound but the per-attempt timeouts.
    ///
    /// ```
    /// # use tower_overload::retry::RetryPolicy;
    /// assert_eq!(RetryPolicy::foreground().deadline(None).get_deadline(), None);
    /// ```
    pub fn deadline(mut self, deadline: Option<Duration>) -> Self {
        self.deadline = deadline;
        self
    }

    /// The hard bound on one call.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::retry::RetryPolicy;
    /// assert_eq!(RetryPolicy::foreground().get_deadline(), Some(Duration::from_secs(600)));
    /// ```
    pub fn get_deadline(&self) -> Option<Duration> {
        self.deadline
    }

    /// How long after the call started a retry may still be started: no
    /// retry is scheduled whose wait would end past it, and a server delay
    /// beyond it ends the call with
    /// [`ErrorKind::ServerDelayTooLong`](crate::ErrorKind::ServerDelayTooLong).
    /// The attempt in flight is not cut by it (that is the
    /// [deadline](Self::deadline)). `None`: only the deadline limits retries.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::retry::RetryPolicy;
    /// let policy = RetryPolicy::foreground().retry_window(Some(Duration::from_secs(20)));
    /// assert_eq!(policy.get_retry_window(), Some(Duration::from_secs(20)));
    /// ```
    pub fn retry_window(mut self, window: Option<Duration>) -> Self {
        self.retry_window = window;
        self
    }

    /// How long after the call started a retry may still be started.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::retry::RetryPolicy;
    /// assert_eq!(RetryPolicy::foreground().get_retry_window(), Some(Duration::from_secs(60)));
    /// ```
    pub fn get_retry_window(&self) -> Option<Duration> {
        self.retry_window
    }

    /// The longest wait for one attempt's response head. When it passes the
    /// attempt is dropped, counted as a [`Class::Timeout`] and retried as the
    /// timeout settings allow (nothing has reached the caller yet). Presets:
    /// 600 s, the official SDKs' timeout, because a non-streaming answer
    /// sends its head only when the whole message is generated.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::retry::RetryPolicy;
    /// let policy = RetryPolicy::foreground().attempt_timeout(Some(Duration::from_secs(120)));
    /// assert_eq!(policy.get_attempt_timeout(), Some(Duration::from_secs(120)));
    /// ```
    pub fn attempt_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// The longest wait for one attempt's response head.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::retry::RetryPolicy;
    /// assert_eq!(RetryPolicy::background().get_attempt_timeout(), Some(Duration::from_secs(600)));
    /// ```
    pub fn get_attempt_timeout(&self) -> Option<Duration> {
        self.attempt_timeout
    }

    /// The longest silence between two frames of a response body. While
    /// the layer itself reads the body (to classify an error, or the stream
    /// guard's peek) a silence this long is a [`Class::Timeout`] and is
    /// retried; once the body is the caller's, it ends the body with
    /// [`ErrorKind::Timeout`](crate::ErrorKind::Timeout) instead of hanging.
    /// Presets: 120 s (streams send `ping` events every few seconds).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::retry::RetryPolicy;
    /// let policy = RetryPolicy::foreground().idle_timeout(Some(Duration::from_secs(30)));
    /// assert_eq!(policy.get_idle_timeout(), Some(Duration::from_secs(30)));
    /// ```
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// The longest silence between two frames of a response body.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::retry::RetryPolicy;
    /// assert_eq!(RetryPolicy::foreground().get_idle_timeout(), Some(Duration::from_secs(120)));
    /// ```
    pub fn get_idle_timeout(&self) -> Option<Duration> {
        self.idle_timeout
    }

    /// The longest server-requested delay that is waited. A longer one ends
    /// the call at once with [`ErrorKind::ServerDelayTooLong`](crate::ErrorKind::ServerDelayTooLong),
    /// carrying the delay, so a job queue can reschedule.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::retry::RetryPolicy;
    /// let policy = RetryPolicy::foreground().max_server_delay(Duration::from_secs(10));
    /// ```
    pub fn max_server_delay(mut self, delay: Duration) -> Self {
        self.max_server_delay = delay;
        self
    }

    /// Rations retries with a [`RetryBudget`] (a fraction of traffic plus a
    /// floor) shared by every clone, or not at all with `None`. Replaces the
    /// preset's quota.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::{budget::RetryBudget, retry::RetryPolicy};
    /// let shared = RetryBudget::new(Duration::from_secs(10), 0, 0.1);
    /// let policy = RetryPolicy::foreground().budget(Some(shared.clone()));
    /// ```
    pub fn budget(mut self, budget: Option<RetryBudget>) -> Self {
        self.rationing = budget.map(Rationing::Budget);
        self
    }

    /// Rations retries with a [`RetryQuota`] shared by every clone (the
    /// presets' choice), or not at all with `None`. Replaces any budget.
    ///
    /// ```
    /// # use tower_overload::{budget::RetryQuota, retry::RetryPolicy};
    /// let policy = RetryPolicy::background().retry_quota(Some(RetryQuota::new(1000, 5, 10)));
    /// ```
    pub fn retry_quota(mut self, quota: Option<RetryQuota>) -> Self {
        self.rationing = quota.map(Rationing::Quota);
        self
    }

    /// Shares the policy's retry quota with the whole fleet (the store's
    /// quota of the same capacity and costs, named by them): a storm costs the
    /// fleet one quota, not one per worker. A policy without a quota (or
    /// with a budget) is unchanged. See [`crate::fleet`] for what holds
    /// between syncs and when the store is down.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use tower_overload::fleet::{Fleet, FleetConfig, RedisStore};
    /// use tower_overload::retry::RetryPolicy;
    /// let fleet = Fleet::new(RedisStore::open("redis://127.0.0.1/").unwrap(), FleetConfig::default());
    /// let policy = RetryPolicy::foreground().fleet(&fleet);
    /// # }
    /// ```
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn fleet(mut self, fleet: &crate::fleet::Fleet) -> Self {
        if let Some(Rationing::Quota(quota)) = &self.rationing {
            let (capacity, retry_cost, timeout_cost) = quota.parameters();
            // Named by its parameters: policies with different quotas (a
            // foreground and a background one) share nothing.
            let name = format!("retry-{capacity}-{retry_cost}-{timeout_cost}");
            self.rationing = Some(Rationing::Quota(fleet.retry_quota(
                &name,
                capacity,
                retry_cost,
                timeout_cost,
            )));
        }
        self
    }

    /// What a call whose last attempt failed returns: the response (default) or a typed error.
    ///
    /// ```
    /// # use tower_overload::retry::{FinalFailure, RetryPolicy};
    /// let policy = RetryPolicy::foreground().final_failure(FinalFailure::Error);
    /// ```
    pub fn final_failure(mut self, mode: FinalFailure) -> Self {
        self.final_failure = mode;
        self
    }

    /// Sends the number of retries so far on every attempt in this header
    /// (0 on the first), as the official SDKs do with `x-stainless-retry-count`.
    /// Off by default.
    ///
    /// ```
    /// # use tower_overload::retry::RetryPolicy;
    /// let policy = RetryPolicy::foreground()
    ///     .retry_count_header(http::HeaderName::from_static("x-stainless-retry-count"));
    /// ```
    pub fn retry_count_header(mut self, name: HeaderName) -> Self {
        self.retry_count_header = Some(name);
        self
    }

    /// How long the layer may spend reading the first bytes of a failed
    /// response's body, to tell a 500 that says "Overloaded" or a spend-limit
    /// 429 from the rest. Default 5 s; when it passes, the status alone decides.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::retry::RetryPolicy;
    /// let policy = RetryPolicy::foreground().sniff_timeout(Duration::from_secs(1));
    /// ```
    pub fn sniff_timeout(mut self, timeout: Duration) -> Self {
        self.sniff_timeout = timeout;
        self
    }

    /// Checks the start of streamed successes for an error event (off by
    /// default); see [`StreamGuard`].
    ///
    /// ```
    /// # use tower_overload::retry::{RetryPolicy, StreamGuard};
    /// let policy = RetryPolicy::foreground().stream_guard(Some(StreamGuard::default()));
    /// ```
    pub fn stream_guard(mut self, guard: Option<StreamGuard>) -> Self {
        self.stream_guard = guard;
        self
    }

    /// How errors of the inner service are judged; see [`ClassifyError`].
    ///
    /// ```
    /// use tower_overload::retry::{ClassifyError, DefaultErrorClassifier, RetryPolicy};
    /// use tower_overload::classify::Classification;
    ///
    /// #[derive(Debug)]
    /// struct NeverRetry;
    /// impl ClassifyError for NeverRetry {
    ///     fn classify_error(&self, _: &(dyn std::error::Error + 'static)) -> Classification {
    ///         Classification::transport(false)
    ///     }
    /// }
    /// let policy = RetryPolicy::foreground().error_classifier(NeverRetry);
    /// ```
    pub fn error_classifier(mut self, classifier: impl ClassifyError + 'static) -> Self {
        self.error_classifier = Arc::new(classifier);
        self
    }

    /// Seeds the jitter so that a run reproduces: call `n` of every clone
    /// draws from a generator seeded by `seed` and `n`.
    ///
    /// ```
    /// # use tower_overload::retry::RetryPolicy;
    /// let policy = RetryPolicy::foreground().seed(7);
    /// ```
    pub fn seed(mut self, seed: u64) -> Self {
        self.seeds = Arc::new(SeedSource::new(seed));
        self
    }

    /// Tells `monitor` the outcome of every attempt (its model, its class
    /// and, for a probe to copy, its endpoint and key), and attaches the
    /// monitor's verdict for the model to every [`Error`](crate::Error)
    /// the layer returns, and to a failed response it returns as it came
    /// ([`FinalFailure::Response`]) as a
    /// [`Verdict`](crate::health::Verdict) extension, when the verdict is
    /// known. Off by default; without a monitor the layer does none of this
    /// work.
    ///
    /// ```
    /// use tower_overload::health::{HealthConfig, HealthMonitor};
    /// use tower_overload::retry::RetryPolicy;
    /// # let client = tower::service_fn(|_r: http::Request<http_body_util::Full<bytes::Bytes>>| async {
    /// #     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::new())))
    /// # });
    ///
    /// let monitor = HealthMonitor::new(client, HealthConfig::default());
    /// let policy = RetryPolicy::foreground().health(monitor);
    /// assert!(policy.get_health().is_some());
    /// ```
    #[cfg(feature = "health")]
    #[cfg_attr(docsrs, doc(cfg(feature = "health")))]
    pub fn health(mut self, monitor: crate::health::HealthMonitor) -> Self {
        self.health = Some(monitor);
        self
    }

    /// The health monitor told of every attempt, if one is set.
    ///
    /// ```
    /// # use tower_overload::retry::RetryPolicy;
    /// assert!(RetryPolicy::foreground().get_health().is_none());
    /// ```
    #[cfg(feature = "health")]
    #[cfg_attr(docsrs, doc(cfg(feature = "health")))]
    pub fn get_health(&self) -> Option<&crate::health::HealthMonitor> {
        self.health.as_ref()
    }

    /// Whether the layer records [metrics](crate::metrics) (on by default
    /// with the feature): attempts, retries, backoff, time to the response
    /// head and to a stream's first content event, token usage and cost.
    /// Each call to this method starts new handles (registered with the
    /// recorder in force at their first use).
    ///
    /// ```
    /// # use tower_overload::retry::RetryPolicy;
    /// let quiet = RetryPolicy::foreground().metrics(false);
    /// assert!(!quiet.get_metrics());
    /// ```
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn metrics(mut self, on: bool) -> Self {
        let prices = self.metrics.as_ref().and_then(|m| m.prices.clone());
        self.metrics = on.then(|| Arc::new(crate::metrics::RetryMeters::new(prices)));
        self
    }

    /// Whether the layer records metrics.
    ///
    /// ```
    /// # use tower_overload::retry::RetryPolicy;
    /// assert!(RetryPolicy::foreground().get_metrics());
    /// ```
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn get_metrics(&self) -> bool {
        self.metrics.is_some()
    }

    /// Prices that turn each response's token usage into the
    /// `tower_overload.cost` counter (switches metrics on).
    ///
    /// ```
    /// use tower_overload::metrics::{PriceTable, Prices};
    /// use tower_overload::retry::RetryPolicy;
    /// let policy = RetryPolicy::foreground()
    ///     .prices(PriceTable::new().price("claude-opus-4-6", Prices::per_million(5.0, 25.0, 0.5, 6.25)));
    /// ```
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn prices(mut self, prices: crate::metrics::PriceTable) -> Self {
        self.metrics = Some(Arc::new(crate::metrics::RetryMeters::new(Some(prices))));
        self
    }

    /// The settings for `class`; `None` for a success or a client error.
    ///
    /// ```
    /// # use tower_overload::{classify::Class, retry::RetryPolicy};
    /// assert_eq!(RetryPolicy::foreground().class_policy(Class::Overloaded).unwrap().max_attempts, 5);
    /// assert!(RetryPolicy::foreground().class_policy(Class::Success).is_none());
    /// ```
    pub fn class_policy(&self, class: Class) -> Option<&ClassPolicy> {
        Some(match class {
            Class::Overloaded => &self.overloaded,
            Class::RateLimited => &self.rate_limited,
            Class::ServerError => &self.server_error,
            Class::Timeout => &self.timeout,
            Class::Conflict => &self.conflict,
            Class::Transport => &self.transport,
            Class::Success | Class::Client(_) => return None,
        })
    }

    /// A generator for one call's jitter (see [`seed`](Self::seed)).
    ///
    /// ```
    /// # use tower_overload::retry::RetryPolicy;
    /// let policy = RetryPolicy::foreground().seed(3);
    /// let _rng = policy.rng();
    /// ```
    pub fn rng(&self) -> SmallRng {
        self.seeds.next_rng()
    }
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("RetryPolicy");
        debug
            .field("overloaded", &self.overloaded)
            .field("rate_limited", &self.rate_limited)
            .field("server_error", &self.server_error)
            .field("timeout", &self.timeout)
            .field("conflict", &self.conflict)
            .field("transport", &self.transport)
            .field("max_attempts", &self.max_attempts)
            .field("deadline", &self.deadline)
            .field("retry_window", &self.retry_window)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_server_delay", &self.max_server_delay)
            .field("rationing", &self.rationing)
            .field("final_failure", &self.final_failure)
            .field("retry_count_header", &self.retry_count_header)
            .field("sniff_timeout", &self.sniff_timeout)
            .field("stream_guard", &self.stream_guard)
            .field("error_classifier", &self.error_classifier);
        #[cfg(feature = "health")]
        debug.field("health", &self.health);
        #[cfg(feature = "metrics")]
        debug.field("metrics", &self.metrics.is_some());
        debug.finish_non_exhaustive()
    }
}
