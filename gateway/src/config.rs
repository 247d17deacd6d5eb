//! What the gateway is told: flags (with environment fallbacks), an optional
//! TOML file, and the defaults, checked once at start.
//!
//! Precedence, strongest first: a flag, its environment variable, the file,
//! the default. Every value is validated before anything listens, and a bad
//! one is a message that names the flag, the file key and what would do.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use http::Uri;
use serde::Deserialize;
use tower_overload::pacing::PacingLimits;

use crate::names::valid_model_name;

/// The largest request body the API accepts; a larger one is refused before
/// anything is sent.
pub const API_MAX_BODY: usize = 32 * 1024 * 1024;

/// The resolved configuration the gateway runs with.
///
/// [`Config::default`] is what the binary runs with when given nothing but
/// an upstream: permissive limits that only overload signals shrink, the
/// foreground retry preset, the stream guard on.
///
/// ```
/// use tower_overload_gateway::Config;
///
/// let config = Config::default();
/// assert_eq!(config.max_per_model, 1024);
/// assert!(config.stream_guard);
/// assert!(config.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where the gateway listens.
    pub listen: SocketAddr,
    /// The API it forwards to (`http` or `https`, no path).
    pub upstream: Uri,
    /// Calls in flight per model before queueing. The adaptive limit starts
    /// here and shrinks on 529s and 429s, then grows back on successes.
    pub max_per_model: usize,
    /// Calls waiting for a permit (all models together, per model key).
    pub max_queued: usize,
    /// The longest a call waits in the queue before a 529 `overloaded_error`.
    pub queue_timeout: Duration,
    /// Per-model concurrency caps that replace `max_per_model`.
    pub limits: Vec<(String, usize)>,
    /// Fallback chains, each tried in order on overload.
    pub fallback: Vec<Vec<String>>,
    /// The retry preset.
    pub retry: RetryPreset,
    /// The longest a whole call may take, retries included (`None`: the
    /// preset's own).
    pub deadline: Option<Duration>,
    /// Whether the first event of a stream is read before it is handed on,
    /// so an overload sent as that event is retried like a 529.
    pub stream_guard: bool,
    /// Pacing limits per model (requests and tokens per minute).
    pub pacing: Vec<(String, PacingLimits)>,
    /// How long a client may take to send a request's headers.
    pub header_read_timeout: Duration,
    /// How long a client may take to send a whole request body.
    pub body_read_timeout: Duration,
    /// The most header bytes (names, values and their separators) a request
    /// may carry.
    pub max_header_bytes: usize,
    /// The largest request body.
    pub max_body_bytes: usize,
    /// After SIGTERM or ctrl-c, how long calls and streams in flight may go on.
    pub shutdown_grace: Duration,
    /// How logs are written.
    pub log_format: LogFormat,
    /// A Redis (or Valkey) server through which several gateways share their
    /// per-model caps, retry quota, cooldowns and pacing (`redis://` or `rediss://`).
    pub redis: Option<String>,
    /// This gateway's share of the limits when Redis is unreachable (0 < share <= 1).
    pub fleet_share: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8787)),
            upstream: Uri::from_static("https://api.anthropic.com"),
            max_per_model: 1024,
            max_queued: 4096,
            queue_timeout: Duration::from_secs(60),
            limits: Vec::new(),
            fallback: Vec::new(),
            retry: RetryPreset::Foreground,
            deadline: None,
            stream_guard: true,
            pacing: Vec::new(),
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(60),
            max_header_bytes: 64 * 1024,
            max_body_bytes: API_MAX_BODY,
            shutdown_grace: Duration::from_secs(30),
            log_format: LogFormat::Text,
            redis: None,
            fleet_share: 1.0,
        }
    }
}

/// The retry preset of the gateway's one retry loop.
///
/// ```
/// use tower_overload_gateway::RetryPreset;
/// assert_eq!(RetryPreset::default(), RetryPreset::Foreground);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetryPreset {
    /// A person is waiting: up to 5 attempts on overload, within minutes (`RetryPolicy::foreground`).
    #[default]
    Foreground,
    /// A batch job: rides out storms of many minutes (`RetryPolicy::background`).
    Background,
}

/// How logs are written.
///
/// ```
/// use tower_overload_gateway::LogFormat;
/// assert_eq!(LogFormat::default(), LogFormat::Text);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event (for log shippers).
    Json,
}

/// A configuration that cannot run, and what to change.
///
/// ```
/// use tower_overload_gateway::Config;
///
/// let config = Config { max_per_model: 0, ..Config::default() };
/// let error = config.validate().unwrap_err();
/// assert!(error.to_string().contains("--max-per-model"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(String);

impl ConfigError {
    fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// The command line. Every flag also reads an environment variable
/// (`GATEWAY_*`), and everything but `--config` can come from the TOML file.
///
/// ```
/// use clap::Parser;
/// use tower_overload_gateway::Args;
///
/// let args = Args::try_parse_from(["tower-overload-gateway", "--upstream", "http://127.0.0.1:9"]).unwrap();
/// let config = args.resolve().unwrap();
/// assert_eq!(config.upstream.to_string(), "http://127.0.0.1:9/");
/// ```
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "tower-overload-gateway",
    version,
    about = "Forwards /v1/* to the Anthropic API through overload retries, per-model concurrency and model fallback.",
    long_about = None,
    after_help = "Point an SDK at it: ANTHROPIC_BASE_URL=http://127.0.0.1:8787"
)]
pub struct Args {
    /// A TOML file with any of the settings below (flags and env win over it).
    #[arg(long, env = "GATEWAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8787].
    #[arg(long, env = "GATEWAY_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// The API to forward to [default: `https://api.anthropic.com`].
    #[arg(long, env = "GATEWAY_UPSTREAM", value_name = "URL")]
    pub upstream: Option<String>,
    /// Calls in flight per model before queueing; adaptive, shrinks on overload [default: 1024].
    #[arg(long, env = "GATEWAY_MAX_PER_MODEL", value_name = "N")]
    pub max_per_model: Option<usize>,
    /// Calls waiting for a permit before a 529 [default: 4096].
    #[arg(long, env = "GATEWAY_MAX_QUEUED", value_name = "N")]
    pub max_queued: Option<usize>,
    /// Longest wait in the queue, in seconds [default: 60].
    #[arg(long, env = "GATEWAY_QUEUE_TIMEOUT", value_name = "SECS")]
    pub queue_timeout: Option<f64>,
    /// A model's own concurrency cap (repeatable, or comma-separated in the env).
    #[arg(
        long = "limit",
        env = "GATEWAY_LIMITS",
        value_name = "MODEL=N",
        value_delimiter = ','
    )]
    pub limits: Vec<String>,
    /// A fallback chain, tried in order on overload (repeatable; `;` separates chains in the env).
    #[arg(
        long = "fallback",
        env = "GATEWAY_FALLBACK",
        value_name = "A,B,..",
        value_delimiter = ';'
    )]
    pub fallback: Vec<String>,
    /// The retry preset [default: foreground].
    #[arg(long, env = "GATEWAY_RETRY", value_enum)]
    pub retry: Option<RetryPreset>,
    /// Longest a whole call may take, retries included, in seconds [default: the preset's].
    #[arg(long, env = "GATEWAY_DEADLINE", value_name = "SECS")]
    pub deadline: Option<f64>,
    /// Whether to read a stream's first event before handing it on [default: true].
    #[arg(long, env = "GATEWAY_STREAM_GUARD", value_name = "BOOL")]
    pub stream_guard: Option<bool>,
    /// Pacing limits of a model: requests, input tokens, output tokens per minute (repeatable;
    /// `-` leaves one unset, e.g. `claude-opus-4-6=50/30000/8000`).
    #[arg(
        long = "pace",
        env = "GATEWAY_PACE",
        value_name = "MODEL=RPM/ITPM/OTPM",
        value_delimiter = ','
    )]
    pub pacing: Vec<String>,
    /// Seconds a client may take to send its headers [default: 30].
    #[arg(long, env = "GATEWAY_HEADER_READ_TIMEOUT", value_name = "SECS")]
    pub header_read_timeout: Option<f64>,
    /// Seconds a client may take to send a whole body [default: 60].
    #[arg(long, env = "GATEWAY_BODY_READ_TIMEOUT", value_name = "SECS")]
    pub body_read_timeout: Option<f64>,
    /// The most header bytes of a request [default: 65536].
    #[arg(long, env = "GATEWAY_MAX_HEADER_BYTES", value_name = "BYTES")]
    pub max_header_bytes: Option<usize>,
    /// The largest request body [default: 33554432, the API's own limit].
    #[arg(long, env = "GATEWAY_MAX_BODY_BYTES", value_name = "BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Seconds in-flight calls may go on after SIGTERM or ctrl-c [default: 30].
    #[arg(long, env = "GATEWAY_SHUTDOWN_GRACE", value_name = "SECS")]
    pub shutdown_grace: Option<f64>,
    /// Log format [default: text].
    #[arg(long, env = "GATEWAY_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Share caps, retry quota, cooldowns and pacing with other gateways through this Redis
    /// (`redis://host:6379/`) [default: none, each gateway alone].
    #[arg(long, env = "GATEWAY_REDIS", value_name = "URL")]
    pub redis: Option<String>,
    /// This gateway's share of the limits while Redis is unreachable, e.g. 0.25 for one of four
    /// [default: 1].
    #[arg(long, env = "GATEWAY_FLEET_SHARE", value_name = "SHARE")]
    pub fleet_share: Option<f64>,
}

/// The TOML file: the flags' names with `_` for `-`, durations in seconds.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    upstream: Option<String>,
    max_per_model: Option<usize>,
    max_queued: Option<usize>,
    queue_timeout: Option<f64>,
    #[serde(default)]
    limits: BTreeMap<String, usize>,
    #[serde(default)]
    fallback: Vec<Vec<String>>,
    retry: Option<RetryPreset>,
    deadline: Option<f64>,
    stream_guard: Option<bool>,
    #[serde(default)]
    pacing: BTreeMap<String, FilePacing>,
    header_read_timeout: Option<f64>,
    body_read_timeout: Option<f64>,
    max_header_bytes: Option<usize>,
    max_body_bytes: Option<usize>,
    shutdown_grace: Option<f64>,
    log_format: Option<LogFormat>,
    redis: Option<String>,
    fleet_share: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePacing {
    requests_per_minute: Option<u64>,
    input_tokens_per_minute: Option<u64>,
    output_tokens_per_minute: Option<u64>,
}

impl Args {
    /// Reads the file named by `--config` (if any), lays the flags over it
    /// and the defaults under it, and validates the result.
    ///
    /// ```
    /// use clap::Parser;
    /// use tower_overload_gateway::Args;
    ///
    /// let args = Args::try_parse_from(["gw", "--limit", "claude-opus-4-6=0"]).unwrap();
    /// let error = args.resolve().unwrap_err();
    /// assert!(error.to_string().contains("--limit claude-opus-4-6=0"));
    /// ```
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let mut config = Config::default();
        if let Some(listen) = self.listen.as_ref().or(file.listen.as_ref()) {
            config.listen = listen.parse().map_err(|e| {
                ConfigError::new(format!(
                    "--listen / listen: `{listen}` is not an address and port ({e}); for example 127.0.0.1:8787 or 0.0.0.0:8787"
                ))
            })?;
        }
        if let Some(upstream) = self.upstream.as_ref().or(file.upstream.as_ref()) {
            config.upstream = upstream.parse().map_err(|e| {
                ConfigError::new(format!(
                    "--upstream / upstream: `{upstream}` is not a URL ({e}); for example https://api.anthropic.com"
                ))
            })?;
        }
        set(
            &mut config.max_per_model,
            self.max_per_model,
            file.max_per_model,
        );
        set(&mut config.max_queued, self.max_queued, file.max_queued);
        if let Some(secs) = self.queue_timeout.or(file.queue_timeout) {
            config.queue_timeout = seconds("--queue-timeout / queue_timeout", secs)?;
        }
        config.limits = file.limits.into_iter().collect();
        for spec in &self.limits {
            let (model, limit) = spec.split_once('=').ok_or_else(|| {
                ConfigError::new(format!(
                    "--limit {spec}: takes MODEL=N, for example --limit claude-opus-4-6=8"
                ))
            })?;
            let limit = limit.trim().parse().map_err(|e| {
                ConfigError::new(format!("--limit {spec}: `{limit}` is not a count ({e})"))
            })?;
            config.limits.retain(|(m, _)| m != model.trim());
            config.limits.push((model.trim().to_owned(), limit));
        }
        config.fallback = if self.fallback.is_empty() {
            file.fallback
        } else {
            self.fallback
                .iter()
                .map(|chain| chain.split(',').map(|m| m.trim().to_owned()).collect())
                .collect()
        };
        set(&mut config.retry, self.retry, file.retry);
        if let Some(secs) = self.deadline.or(file.deadline) {
            config.deadline = Some(seconds("--deadline / deadline", secs)?);
        }
        set(
            &mut config.stream_guard,
            self.stream_guard,
            file.stream_guard,
        );
        config.pacing = file
            .pacing
            .into_iter()
            .map(|(model, p)| {
                let limits = PacingLimits {
                    requests_per_minute: p.requests_per_minute,
                    input_tokens_per_minute: p.input_tokens_per_minute,
                    output_tokens_per_minute: p.output_tokens_per_minute,
                };
                (model, limits)
            })
            .collect();
        for spec in &self.pacing {
            let (model, limits) = parse_pace(spec)?;
            config.pacing.retain(|(m, _)| *m != model);
            config.pacing.push((model, limits));
        }
        if let Some(secs) = self.header_read_timeout.or(file.header_read_timeout) {
            config.header_read_timeout = seconds("--header-read-timeout", secs)?;
        }
        if let Some(secs) = self.body_read_timeout.or(file.body_read_timeout) {
            config.body_read_timeout = seconds("--body-read-timeout", secs)?;
        }
        set(
            &mut config.max_header_bytes,
            self.max_header_bytes,
            file.max_header_bytes,
        );
        set(
            &mut config.max_body_bytes,
            self.max_body_bytes,
            file.max_body_bytes,
        );
        if let Some(secs) = self.shutdown_grace.or(file.shutdown_grace) {
            config.shutdown_grace = seconds("--shutdown-grace", secs)?;
        }
        set(&mut config.log_format, self.log_format, file.log_format);
        config.redis = self.redis.clone().or(file.redis);
        set(&mut config.fleet_share, self.fleet_share, file.fleet_share);
        config.validate()?;
        Ok(config)
    }
}

fn set<T>(slot: &mut T, flag: Option<T>, file: Option<T>) {
    if let Some(value) = flag.or(file) {
        *slot = value;
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(format!("--config {}: cannot read it ({e})", path.display()))
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::new(format!("--config {}: {e}", path.display())))
}

fn seconds(name: &str, secs: f64) -> Result<Duration, ConfigError> {
    if secs.is_finite() && secs > 0.0 && secs <= 86_400.0 {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(ConfigError::new(format!(
            "{name}: {secs} is not a number of seconds between 0 and 86400 (exclusive of 0)"
        )))
    }
}

fn parse_pace(spec: &str) -> Result<(String, PacingLimits), ConfigError> {
    let usage = || {
        ConfigError::new(format!(
            "--pace {spec}: takes MODEL=RPM/ITPM/OTPM with `-` for a limit left unset, for example --pace claude-opus-4-6=50/30000/8000"
        ))
    };
    let (model, numbers) = spec.split_once('=').ok_or_else(usage)?;
    let mut parts = numbers.split('/');
    let mut next = || -> Result<Option<u64>, ConfigError> {
        match parts.next().map(str::trim) {
            None | Some("-") | Some("") => Ok(None),
            Some(n) => n.parse().map(Some).map_err(|_| usage()),
        }
    };
    let limits = PacingLimits {
        requests_per_minute: next()?,
        input_tokens_per_minute: next()?,
        output_tokens_per_minute: next()?,
    };
    if parts.next().is_some() {
        return Err(usage());
    }
    Ok((model.trim().to_owned(), limits))
}

impl Config {
    /// Checks every value; the error names the flag and says what would do.
    ///
    /// ```
    /// use tower_overload_gateway::Config;
    ///
    /// let config = Config { fallback: vec![vec!["claude-opus-4-6".into()]], ..Config::default() };
    /// assert!(config.validate().unwrap_err().to_string().contains("at least two models"));
    /// ```
    pub fn validate(&self) -> Result<(), ConfigError> {
        let scheme = self.upstream.scheme_str();
        if !matches!(scheme, Some("http") | Some("https")) || self.upstream.host().is_none() {
            return Err(ConfigError::new(format!(
                "--upstream: `{}` needs http:// or https:// and a host, for example https://api.anthropic.com",
                self.upstream
            )));
        }
        if !matches!(self.upstream.path(), "" | "/") || self.upstream.query().is_some() {
            return Err(ConfigError::new(format!(
                "--upstream: `{}` has a path or query; give the API's origin only (the client's /v1/... path is appended)",
                self.upstream
            )));
        }
        if self.max_per_model == 0 {
            return Err(ConfigError::new(
                "--max-per-model: 0 would refuse every call; use at least 1 (the default 1024 shrinks by itself on overload)",
            ));
        }
        for (model, limit) in &self.limits {
            check_model("--limit", model)?;
            if *limit == 0 {
                return Err(ConfigError::new(format!(
                    "--limit {model}={limit}: a limit of 0 would refuse every call to {model}; use at least 1"
                )));
            }
        }
        for chain in &self.fallback {
            if chain.len() < 2 {
                return Err(ConfigError::new(format!(
                    "--fallback {}: a chain needs at least two models, the primary first (for example claude-opus-4-6,claude-sonnet-4-6)",
                    chain.join(",")
                )));
            }
            for model in chain {
                check_model("--fallback", model)?;
            }
        }
        for (model, limits) in &self.pacing {
            check_model("--pace", model)?;
            let all = [
                limits.requests_per_minute,
                limits.input_tokens_per_minute,
                limits.output_tokens_per_minute,
            ];
            if all.contains(&Some(0)) {
                return Err(ConfigError::new(format!(
                    "--pace {model}: a limit of 0 per minute would never send a call; leave it unset with `-`"
                )));
            }
        }
        if self.max_header_bytes < 1024 || self.max_header_bytes > 1024 * 1024 {
            return Err(ConfigError::new(format!(
                "--max-header-bytes: {} is outside 1024..=1048576 (the SDKs send about 1 KiB)",
                self.max_header_bytes
            )));
        }
        if let Some(url) = &self.redis
            && !(url.starts_with("redis://") || url.starts_with("rediss://"))
        {
            return Err(ConfigError::new(format!(
                "--redis {url}: takes a redis:// or rediss:// URL, for example --redis redis://127.0.0.1:6379/"
            )));
        }
        if !(self.fleet_share > 0.0 && self.fleet_share <= 1.0) {
            return Err(ConfigError::new(format!(
                "--fleet-share {}: takes a share in (0, 1], for example 0.25 for one of four gateways",
                self.fleet_share
            )));
        }
        if self.max_body_bytes == 0 || self.max_body_bytes > API_MAX_BODY {
            return Err(ConfigError::new(format!(
                "--max-body-bytes: {} is outside 1..={API_MAX_BODY} (the API refuses larger bodies itself)",
                self.max_body_bytes
            )));
        }
        Ok(())
    }
}

fn check_model(flag: &str, model: &str) -> Result<(), ConfigError> {
    if valid_model_name(model) {
        Ok(())
    } else {
        Err(ConfigError::new(format!(
            "{flag}: `{}` is not a model name (letters, digits and - _ . : @ /, at most 128)",
            model.escape_debug()
        )))
    }
}
