//! [`OverloadStats`]: the overload health signal, counted on atomics.
//!
//! Outcomes per class over the last 60 seconds, for all traffic and per
//! model, the 529 rate and the 429 rate, and an alert when the 529 rate
//! passes a threshold (2% by default, the level the guides alert at), cleared
//! with hysteresis once it falls below half of it. Recording takes no lock:
//! each one-second slot keeps its counts in atomics tagged with the second
//! they count, so a slot is reused by the first outcome of a new second
//! without a reset that could lose a racing count.
//!
//! The [log layer](crate::request_id::RequestIdLogLayer) feeds it with every
//! attempt as it ends (told by the retry layer inside it), including the
//! models the fallback layer gave up; anything else can
//! [`record`](OverloadStats::record) too. With the `metrics` feature it also
//! publishes `tower_overload.overload_rate`, `tower_overload.rate_limit_rate`
//! and `tower_overload.overload_alert` (see [`metrics`](crate::metrics)).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::classify::Class;
use crate::model::Model;
use crate::table::Table;

const SLOTS: usize = 60;
const MAX_MODELS: usize = 64;

/// Outcomes by class over the window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClassCounts {
    /// Successes.
    pub success: u64,
    /// 529s and other overloads.
    pub overloaded: u64,
    /// 429s.
    pub rate_limited: u64,
    /// 500, 502, 503 and other server errors.
    pub server_error: u64,
    /// 504s and 408s.
    pub timeout: u64,
    /// 409s.
    pub conflict: u64,
    /// Client errors (4xx).
    pub client: u64,
    /// Errors with no response.
    pub transport: u64,
}

impl ClassCounts {
    /// All outcomes.
    ///
    /// ```
    /// # use tower_overload::stats::ClassCounts;
    /// assert_eq!(ClassCounts { success: 3, overloaded: 1, ..Default::default() }.total(), 4);
    /// ```
    pub fn total(&self) -> u64 {
        self.success
            + self.overloaded
            + self.rate_limited
            + self.server_error
            + self.timeout
            + self.conflict
            + self.client
            + self.transport
    }

    /// Overloads as a fraction of all outcomes (0 when there were none).
    ///
    /// ```
    /// # use tower_overload::stats::ClassCounts;
    /// assert_eq!(ClassCounts { success: 98, overloaded: 2, ..Default::default() }.overload_rate(), 0.02);
    /// ```
    pub fn overload_rate(&self) -> f64 {
        fraction(self.overloaded, self.total())
    }

    /// Rate limits (429s) as a fraction of all outcomes (0 when there were none).
    ///
    /// ```
    /// # use tower_overload::stats::ClassCounts;
    /// assert_eq!(ClassCounts { success: 9, rate_limited: 1, ..Default::default() }.rate_limit_rate(), 0.1);
    /// ```
    pub fn rate_limit_rate(&self) -> f64 {
        fraction(self.rate_limited, self.total())
    }

    fn from_array(counts: [u64; CLASSES]) -> Self {
        let [
            success,
            overloaded,
            rate_limited,
            server_error,
            timeout,
            conflict,
            client,
            transport,
        ] = counts;
        Self {
            success,
            overloaded,
            rate_limited,
            server_error,
            timeout,
            conflict,
            client,
            transport,
        }
    }
}

fn fraction(part: u64, total: u64) -> f64 {
    match total {
        0 => 0.0,
        total => part as f64 / total as f64,
    }
}

const CLASSES: usize = Class::COUNT;

/// A count tagged with the second it counts: the tag in the high bits, the
/// count in the low ones. A count of an older second reads as zero and is
/// replaced, in one compare-and-swap, by the first count of the new one.
const COUNT_BITS: u32 = 40;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

fn tag_of(second: u64) -> u64 {
    // Tags repeat after 2^24 seconds (194 days): a slot untouched that
    // long, then read in the very second its tag comes round, is the only
    // one misread.
    (second & ((1 << (64 - COUNT_BITS)) - 1)) << COUNT_BITS
}

/// Counts in one-second slots over the last sixty seconds; the last cell of
/// a slot counts every class together, so a rate reads two cells per slot.
struct Window {
    slots: Box<[[AtomicU64; CLASSES + 1]; SLOTS]>,
}

const TOTAL: usize = CLASSES;

impl Window {
    fn new() -> Self {
        Self {
            slots: Box::new(std::array::from_fn(|_| {
                std::array::from_fn(|_| AtomicU64::new(0))
            })),
        }
    }

    fn bump(cell: &AtomicU64, tag: u64) {
        let mut current = cell.load(Ordering::Relaxed);
        loop {
            let next = if current & !COUNT_MASK == tag {
                tag | ((current + 1) & COUNT_MASK)
            } else {
                tag | 1
            };
            match cell.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(seen) => current = seen,
            }
        }
    }

    fn record(&self, second: u64, class: Class) {
        let slot = &self.slots[(second % SLOTS as u64) as usize];
        let tag = tag_of(second);
        Self::bump(&slot[class.index()], tag);
        Self::bump(&slot[TOTAL], tag);
    }

    /// The count of `cell` of every slot still in the window at `second`.
    fn sum(&self, second: u64, cell: usize) -> u64 {
        (0..SLOTS as u64)
            .filter_map(|age| second.checked_sub(age))
            .map(|at| {
                let value = self.slots[(at % SLOTS as u64) as usize][cell].load(Ordering::Relaxed);
                if value & !COUNT_MASK == tag_of(at) {
                    value & COUNT_MASK
                } else {
                    0
                }
            })
            .sum()
    }

    fn counts(&self, second: u64) -> ClassCounts {
        ClassCounts::from_array(std::array::from_fn(|class| self.sum(second, class)))
    }
}

/// Whether an alert is being raised or cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertState {
    /// The overload rate passed the threshold.
    Raised,
    /// It fell back below half the threshold.
    Cleared,
}

/// What the alert callback is told.
#[derive(Debug, Clone, PartialEq)]
pub struct OverloadAlert {
    /// The model, or `None` for all traffic.
    pub model: Option<Model>,
    /// Raised or cleared.
    pub state: AlertState,
    /// Overloads as a fraction of outcomes in the window.
    pub rate: f64,
    /// The counts behind it.
    pub counts: ClassCounts,
}

type AlertFn = Arc<dyn Fn(&OverloadAlert) + Send + Sync>;

/// A shared health signal: outcomes per class and per model over the last
/// 60 seconds, the overload (529) and rate-limit (429) rates, and a callback
/// when the overload rate passes a threshold (default 2%; at least 50
/// outcomes in the window before it can fire) and again when it falls
/// below half of it. Clones share the counts; recording takes no lock.
///
/// ```
/// use tower_overload::classify::Class;
/// use tower_overload::stats::OverloadStats;
/// use tower_overload::Model;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let stats = OverloadStats::new().on_alert(|alert| eprintln!("529 rate {:.1}% for {:?}", alert.rate * 100.0, alert.model));
/// let opus = Model::new("claude-opus-4-6");
/// for _ in 0..97 { stats.record(Some(&opus), Class::Success); }
/// for _ in 0..3 { stats.record(Some(&opus), Class::Overloaded); }
/// assert_eq!(stats.overload_rate(), 0.03);
/// assert_eq!(stats.counts_for(&opus).total(), 100);
/// # }
/// ```
#[derive(Clone)]
pub struct OverloadStats {
    inner: Arc<Inner>,
}

struct Inner {
    origin: Instant,
    threshold: f64,
    min_samples: u64,
    on_alert: Option<AlertFn>,
    all: Signal,
    models: Table<Model, Signal>,
}

/// One window with its alert state (and gauges).
struct Signal {
    window: Window,
    alerting: AtomicBool,
    #[cfg(feature = "metrics")]
    meters: crate::metrics::RateMeters,
}

impl Signal {
    fn new(_label: &str) -> Self {
        Self {
            window: Window::new(),
            alerting: AtomicBool::new(false),
            #[cfg(feature = "metrics")]
            meters: crate::metrics::RateMeters::new(
                crate::metrics::clean_label(_label).unwrap_or(crate::metrics::OTHER),
            ),
        }
    }
}

impl Default for OverloadStats {
    fn default() -> Self {
        Self::new()
    }
}

impl OverloadStats {
    /// Empty counts, a 2% threshold, no callback.
    ///
    /// ```
    /// # use tower_overload::stats::OverloadStats;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// assert_eq!(OverloadStats::new().overload_rate(), 0.0);
    /// # }
    /// ```
    pub fn new() -> Self {
        Self::build(0.02, 50, None)
    }

    fn build(threshold: f64, min_samples: u64, on_alert: Option<AlertFn>) -> Self {
        Self {
            inner: Arc::new(Inner {
                origin: Instant::now(),
                threshold,
                min_samples,
                on_alert,
                all: Signal::new("all"),
                models: Table::new(MAX_MODELS),
            }),
        }
    }

    /// The overload rate that raises an alert (a fraction: 0.02 is 2%).
    /// Starts new, empty counts.
    ///
    /// ```
    /// # use tower_overload::stats::OverloadStats;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let stats = OverloadStats::new().threshold(0.05);
    /// # }
    /// ```
    pub fn threshold(self, threshold: f64) -> Self {
        Self::build(
            threshold,
            self.inner.min_samples,
            self.inner.on_alert.clone(),
        )
    }

    /// The fewest outcomes in the window before an alert can be raised.
    /// Starts new, empty counts.
    ///
    /// ```
    /// # use tower_overload::stats::OverloadStats;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let stats = OverloadStats::new().min_samples(20);
    /// # }
    /// ```
    pub fn min_samples(self, min_samples: u64) -> Self {
        Self::build(
            self.inner.threshold,
            min_samples,
            self.inner.on_alert.clone(),
        )
    }

    /// Called when the overload rate of all traffic, or of one model, passes
    /// the threshold, and again when it falls below half of it. Starts new,
    /// empty counts.
    ///
    /// ```
    /// # use tower_overload::stats::OverloadStats;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let stats = OverloadStats::new().on_alert(|alert| tracing::error!(rate = alert.rate, "API overloaded"));
    /// # }
    /// ```
    pub fn on_alert(self, callback: impl Fn(&OverloadAlert) + Send + Sync + 'static) -> Self {
        Self::build(
            self.inner.threshold,
            self.inner.min_samples,
            Some(Arc::new(callback)),
        )
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.inner.origin).as_secs()
    }

    /// Records one outcome, now.
    ///
    /// ```
    /// # use tower_overload::{classify::Class, stats::OverloadStats};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let stats = OverloadStats::new();
    /// stats.record(None, Class::Overloaded);
    /// assert_eq!(stats.counts().overloaded, 1);
    /// # }
    /// ```
    pub fn record(&self, model: Option<&Model>, class: Class) {
        let second = self.second(Instant::now());
        self.record_in(&self.inner.all, None, second, class);
        if let Some(model) = model {
            // Past the bound, a model counts in the totals only.
            self.inner.models.with_own(
                model,
                |model| Some((model.clone(), Signal::new(model.as_str()))),
                |signal| self.record_in(signal, Some(model), second, class),
            );
        }
    }

    fn record_in(&self, signal: &Signal, model: Option<&Model>, second: u64, class: Class) {
        signal.window.record(second, class);
        let total = signal.window.sum(second, TOTAL);
        let overloaded = signal.window.sum(second, Class::Overloaded.index());
        let rate = fraction(overloaded, total);
        #[cfg(feature = "metrics")]
        {
            signal.meters.overload_rate.set(rate);
            let limited = signal.window.sum(second, Class::RateLimited.index());
            signal.meters.rate_limit_rate.set(fraction(limited, total));
        }
        let alerting = signal.alerting.load(Ordering::Relaxed);
        let new_state =
            if !alerting && total >= self.inner.min_samples && rate >= self.inner.threshold {
                AlertState::Raised
            } else if alerting && rate < self.inner.threshold / 2.0 {
                AlertState::Cleared
            } else {
                return;
            };
        let raised = new_state == AlertState::Raised;
        // One caller wins the change; the others saw the old state.
        if signal
            .alerting
            .compare_exchange(!raised, raised, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        #[cfg(feature = "metrics")]
        signal.meters.alert.set(if raised { 1.0 } else { 0.0 });
        if let Some(callback) = &self.inner.on_alert {
            callback(&OverloadAlert {
                model: model.cloned(),
                state: new_state,
                rate,
                counts: signal.window.counts(second),
            });
        }
    }

    /// Outcomes of all traffic over the last 60 s.
    ///
    /// ```
    /// # use tower_overload::stats::OverloadStats;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// assert_eq!(OverloadStats::new().counts().total(), 0);
    /// # }
    /// ```
    pub fn counts(&self) -> ClassCounts {
        let second = self.second(Instant::now());
        self.inner.all.window.counts(second)
    }

    /// Outcomes of one model over the last 60 s.
    ///
    /// ```
    /// # use tower_overload::{Model, stats::OverloadStats};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// assert_eq!(OverloadStats::new().counts_for(&Model::new("m")).total(), 0);
    /// # }
    /// ```
    pub fn counts_for(&self, model: &Model) -> ClassCounts {
        let second = self.second(Instant::now());
        self.inner
            .models
            .get(model)
            .map(|signal| signal.window.counts(second))
            .unwrap_or_default()
    }

    /// The overload rate of all traffic over the last 60 s.
    ///
    /// ```
    /// # use tower_overload::stats::OverloadStats;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// assert_eq!(OverloadStats::new().overload_rate(), 0.0);
    /// # }
    /// ```
    pub fn overload_rate(&self) -> f64 {
        self.counts().overload_rate()
    }

    /// The rate-limit (429) rate of all traffic over the last 60 s.
    ///
    /// ```
    /// # use tower_overload::stats::OverloadStats;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// assert_eq!(OverloadStats::new().rate_limit_rate(), 0.0);
    /// # }
    /// ```
    pub fn rate_limit_rate(&self) -> f64 {
        self.counts().rate_limit_rate()
    }

    /// The overload rate of one model over the last 60 s.
    ///
    /// ```
    /// # use tower_overload::{Model, stats::OverloadStats};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// assert_eq!(OverloadStats::new().overload_rate_for(&Model::new("m")), 0.0);
    /// # }
    /// ```
    pub fn overload_rate_for(&self, model: &Model) -> f64 {
        self.counts_for(model).overload_rate()
    }

    /// The models seen (at most 64; later ones count in the totals only),
    /// with their counts.
    ///
    /// ```
    /// # use tower_overload::stats::OverloadStats;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// assert!(OverloadStats::new().models().is_empty());
    /// # }
    /// ```
    pub fn models(&self) -> Vec<(Model, ClassCounts)> {
        let second = self.second(Instant::now());
        let mut models: Vec<_> = self
            .inner
            .models
            .entries()
            .into_iter()
            .map(|(model, signal)| (model, signal.window.counts(second)))
            .collect();
        models.sort_by(|a, b| a.0.cmp(&b.0));
        models
    }

    /// The window the counts cover.
    ///
    /// ```
    /// # use tower_overload::stats::OverloadStats;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// assert_eq!(OverloadStats::new().window(), std::time::Duration::from_secs(60));
    /// # }
    /// ```
    pub fn window(&self) -> Duration {
        Duration::from_secs(SLOTS as u64)
    }
}

impl fmt::Debug for OverloadStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OverloadStats")
            .field("threshold", &self.inner.threshold)
            .field("min_samples", &self.inner.min_samples)
            .field("counts", &self.counts())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test(start_paused = true)]
    async fn counts_slide_out_of_the_window() {
        let stats = OverloadStats::new();
        let model = Model::new("m");
        stats.record(Some(&model), Class::Overloaded);
        tokio::time::advance(Duration::from_secs(30)).await;
        stats.record(Some(&model), Class::Success);
        assert_eq!(stats.counts_for(&model).total(), 2);
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(
            stats.counts_for(&model),
            ClassCounts {
                success: 1,
                ..Default::default()
            }
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(stats.counts().total(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_reused_a_minute_later_starts_from_zero() {
        let stats = OverloadStats::new();
        for _ in 0..5 {
            stats.record(None, Class::Overloaded);
        }
        tokio::time::advance(Duration::from_secs(60)).await;
        stats.record(None, Class::Success);
        assert_eq!(
            stats.counts(),
            ClassCounts {
                success: 1,
                ..Default::default()
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn alerts_are_raised_once_and_cleared_with_hysteresis() {
        let raised = Arc::new(AtomicUsize::new(0));
        let cleared = Arc::new(AtomicUsize::new(0));
        let (r, c) = (raised.clone(), cleared.clone());
        let stats = OverloadStats::new().min_samples(10).on_alert(move |alert| {
            if alert.model.is_none() {
                match alert.state {
                    AlertState::Raised => r.fetch_add(1, Ordering::SeqCst),
                    AlertState::Cleared => c.fetch_add(1, Ordering::SeqCst),
                };
            }
        });
        for _ in 0..9 {
            stats.record(None, Class::Overloaded);
        }
        assert_eq!(raised.load(Ordering::SeqCst), 0, "too few samples");
        for _ in 0..5 {
            stats.record(None, Class::Overloaded);
        }
        assert_eq!(
            raised.load(Ordering::SeqCst),
            1,
            "raised once, not on every record"
        );
        // Between half the threshold and the threshold: still raised.
        tokio::time::advance(Duration::from_secs(61)).await;
        stats.record(None, Class::Overloaded);
        for _ in 0..66 {
            stats.record(None, Class::Success);
        }
        assert_eq!(cleared.load(Ordering::SeqCst), 0, "1.5% is not below 1%");
        for _ in 0..100 {
            stats.record(None, Class::Success);
        }
        assert_eq!(cleared.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_model_table_is_bounded() {
        let stats = OverloadStats::new();
        for i in 0..200 {
            stats.record(Some(&Model::new(format!("m{i}"))), Class::Success);
        }
        assert_eq!(stats.models().len(), MAX_MODELS);
        assert_eq!(stats.counts().total(), 200);
    }

    #[test]
    fn counts_from_many_threads_are_all_kept() {
        let stats = OverloadStats::new();
        let model = Model::new("m");
        std::thread::scope(|scope| {
            for _ in 0..4 {
                let _ = scope.spawn(|| {
                    for _ in 0..10_000 {
                        stats.record(Some(&model), Class::Overloaded);
                    }
                });
            }
        });
        // Real time: the four threads may straddle a second, never lose a count.
        assert_eq!(stats.counts_for(&model).overloaded, 40_000);
    }
}
