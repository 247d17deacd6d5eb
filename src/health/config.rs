//! The monitor's settings ([`HealthConfig`]) and the probe's ([`Probe`]).

use std::fmt;
use std::time::Duration;

use http::{HeaderMap, HeaderName, Uri, header};

/// The Claude status page's summary.
pub const DEFAULT_STATUS_PAGE: &str = "https://status.claude.com/api/v2/summary.json";

/// Settings of a [`HealthMonitor`](super::HealthMonitor).
///
/// Defaults: the Claude status page, read every 30 s at most while a
/// model's 529 rate is raised (2% or more of at least 20 attempts over the
/// last 60 s) and never otherwise, each read bounded by 10 s and 1 MiB; a
/// verdict is believed for 10 minutes; 64 models are tracked apart, the rest
/// together; no probe.
///
/// ```
/// use std::time::Duration;
/// use tower_overload::health::{HealthConfig, Probe};
///
/// let config = HealthConfig::default()
///     .idle_poll_interval(Some(Duration::from_secs(60)))
///     .probe(Some(Probe::default()));
/// assert_eq!(config.get_threshold(), 0.02);
/// ```
#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub(crate) status_page: Option<Uri>,
    pub(crate) poll_interval: Duration,
    pub(crate) idle_poll_interval: Option<Duration>,
    pub(crate) poll_timeout: Duration,
    pub(crate) max_body: usize,
    pub(crate) window: Duration,
    pub(crate) threshold: f64,
    pub(crate) min_samples: u32,
    pub(crate) verdict_ttl: Duration,
    pub(crate) max_models: usize,
    pub(crate) probe: Option<Probe>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            status_page: Some(Uri::from_static(DEFAULT_STATUS_PAGE)),
            poll_interval: Duration::from_secs(30),
            idle_poll_interval: None,
            poll_timeout: Duration::from_secs(10),
            max_body: 1024 * 1024,
            window: Duration::from_secs(60),
            threshold: 0.02,
            min_samples: 20,
            verdict_ttl: Duration::from_secs(600),
            max_models: 64,
            probe: None,
        }
    }
}

impl HealthConfig {
    /// The Statuspage `summary.json` to read, or `None` to never read one
    /// (the probe alone then decides).
    ///
    /// ```
    /// # use tower_overload::health::HealthConfig;
    /// let config = HealthConfig::default().status_page(Some("http://127.0.0.1:8080/api/v2/summary.json".parse().unwrap()));
    /// ```
    pub fn status_page(mut self, page: Option<Uri>) -> Self {
        self.status_page = page;
        self
    }

    /// The shortest time between two reads of the page while a model's
    /// 529 rate is raised (default 30 s).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::health::HealthConfig;
    /// let config = HealthConfig::default().poll_interval(Duration::from_secs(60));
    /// ```
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The shortest time between two reads of the page while no rate is
    /// raised, or `None` (the default) to read it only while one is.
    /// Reads happen only as calls are made: an idle client reads nothing.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::health::HealthConfig;
    /// let config = HealthConfig::default().idle_poll_interval(Some(Duration::from_secs(60)));
    /// ```
    pub fn idle_poll_interval(mut self, interval: Option<Duration>) -> Self {
        self.idle_poll_interval = interval;
        self
    }

    /// The bound on one read of the page, head and body (default 10 s).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::health::HealthConfig;
    /// let config = HealthConfig::default().poll_timeout(Duration::from_secs(3));
    /// ```
    pub fn poll_timeout(mut self, timeout: Duration) -> Self {
        self.poll_timeout = timeout;
        self
    }

    /// The most bytes of the page that are read (default 1 MiB); a longer
    /// page is a [`HealthError::BodyTooLarge`](super::HealthError::BodyTooLarge).
    ///
    /// ```
    /// # use tower_overload::health::HealthConfig;
    /// let config = HealthConfig::default().max_body(256 * 1024);
    /// ```
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// The window of the 529 rate (default 60 s).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::health::HealthConfig;
    /// let config = HealthConfig::default().window(Duration::from_secs(120));
    /// ```
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// The 529 rate at which a model's rate is raised (default 0.02), and
    /// the fewest attempts in the window before it can be (default 20).
    /// A rate that is not a number is read as 0.02.
    ///
    /// ```
    /// # use tower_overload::health::HealthConfig;
    /// let config = HealthConfig::default().threshold(0.05, 50);
    /// assert_eq!(config.get_threshold(), 0.05);
    /// ```
    pub fn threshold(mut self, rate: f64, min_samples: u32) -> Self {
        self.threshold = if rate.is_nan() { 0.02 } else { rate };
        self.min_samples = min_samples;
        self
    }

    /// The 529 rate at which a model's rate is raised.
    ///
    /// ```
    /// # use tower_overload::health::HealthConfig;
    /// assert_eq!(HealthConfig::default().get_threshold(), 0.02);
    /// ```
    pub fn get_threshold(&self) -> f64 {
        self.threshold
    }

    /// How long a check or a probe is believed (default 10 minutes); an
    /// older one says nothing.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::health::HealthConfig;
    /// let config = HealthConfig::default().verdict_ttl(Duration::from_secs(300));
    /// ```
    pub fn verdict_ttl(mut self, ttl: Duration) -> Self {
        self.verdict_ttl = ttl;
        self
    }

    /// How many models get a rate (and a probe) of their own (default 64);
    /// the others share one rate and are never probed. Models are tracked
    /// in the order they are first seen and never evicted.
    ///
    /// ```
    /// # use tower_overload::health::HealthConfig;
    /// let config = HealthConfig::default().max_models(8);
    /// ```
    pub fn max_models(mut self, models: usize) -> Self {
        self.max_models = models;
        self
    }

    /// The controlled probe: `None` (the default; a probe spends tokens) or
    /// its settings.
    ///
    /// ```
    /// # use tower_overload::health::{HealthConfig, Probe};
    /// let config = HealthConfig::default().probe(Some(Probe::default()));
    /// assert!(config.get_probe().is_some());
    /// ```
    pub fn probe(mut self, probe: Option<Probe>) -> Self {
        self.probe = probe;
        self
    }

    /// The probe's settings, if it is on.
    ///
    /// ```
    /// # use tower_overload::health::HealthConfig;
    /// assert!(HealthConfig::default().get_probe().is_none());
    /// ```
    pub fn get_probe(&self) -> Option<&Probe> {
        self.probe.as_ref()
    }
}

/// The headers a probe copies from the call that raised the rate: the key
/// and the API version. Nothing else: a probe must not carry a caller's
/// idempotency key, tracing ids or betas into a request of its own.
pub(crate) const COPIED_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-api-key"),
    header::AUTHORIZATION,
    HeaderName::from_static("anthropic-version"),
];

/// The controlled probe: one minimal request (`max_tokens: 1`, a one-word
/// prompt) to a model whose 529 rate is raised, at most once an interval per
/// model and one at a time, sent straight through the client the monitor was
/// given (never through the retry layer: it is never one of a caller's
/// attempts).
///
/// By default it copies the endpoint, the key (`x-api-key` or
/// `authorization`) and `anthropic-version` of the call that raised the rate,
/// as the guides ask ("same key, same model"); [`template`](Self::template)
/// gives them instead (a gateway that needs other headers). The copied
/// values are marked sensitive and never logged.
///
/// ```
/// use std::time::Duration;
/// use tower_overload::health::Probe;
/// let probe = Probe::default().interval(Duration::from_secs(120));
/// assert_eq!(probe.get_interval(), Duration::from_secs(120));
/// ```
#[derive(Clone)]
pub struct Probe {
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    pub(crate) template: Option<(Uri, HeaderMap)>,
}

impl Default for Probe {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(60),
            timeout: Duration::from_secs(30),
            template: None,
        }
    }
}

impl Probe {
    /// The shortest time between two probes of one model (default 60 s).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::health::Probe;
    /// let probe = Probe::default().interval(Duration::from_secs(300));
    /// ```
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// The shortest time between two probes of one model.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::health::Probe;
    /// assert_eq!(Probe::default().get_interval(), Duration::from_secs(60));
    /// ```
    pub fn get_interval(&self) -> Duration {
        self.interval
    }

    /// The bound on one probe (default 30 s).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_overload::health::Probe;
    /// let probe = Probe::default().timeout(Duration::from_secs(10));
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends probes to `uri` with `headers` (all of them, each marked
    /// sensitive) instead of copying the call that raised the rate.
    ///
    /// ```
    /// use http::{HeaderMap, HeaderValue};
    /// use tower_overload::health::Probe;
    ///
    /// let mut headers = HeaderMap::new();
    /// headers.insert("x-api-key", HeaderValue::from_static("sk-ant-..."));
    /// headers.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
    /// let probe = Probe::default().template("https://api.anthropic.com/v1/messages".parse().unwrap(), headers);
    /// assert!(!format!("{probe:?}").contains("sk-ant"), "never printed");
    /// ```
    pub fn template(mut self, uri: Uri, mut headers: HeaderMap) -> Self {
        for value in headers.values_mut() {
            value.set_sensitive(true);
        }
        self.template = Some((uri, headers));
        self
    }
}

impl fmt::Debug for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Probe")
            .field("interval", &self.interval)
            .field("timeout", &self.timeout)
            .field(
                "template",
                &self.template.as_ref().map(|(uri, headers)| {
                    (
                        uri,
                        headers.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
                    )
                }),
            )
            .finish()
    }
}
