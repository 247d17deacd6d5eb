//! The overload health signal: sliding-window counts per class and per model.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::classify::Class;
use crate::model::Model;

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
    /// # use tower_overload::request_id::ClassCounts;
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
    /// # use tower_overload::request_id::ClassCounts;
    /// assert_eq!(ClassCounts { success: 98, overloaded: 2, ..Default::default() }.overload_rate(), 0.02);
    /// ```
    pub fn overload_rate(&self) -> f64 {
        match self.total() {
            0 => 0.0,
            total => self.overloaded as f64 / total as f64,
        }
    }

    fn add(&mut self, class: Class, n: u64) {
        let slot = match class {
            Class::Success => &mut self.success,
            Class::Overloaded => &mut self.overloaded,
            Class::RateLimited => &mut self.rate_limited,
            Class::ServerError => &mut self.server_error,
            Class::Timeout => &mut self.timeout,
            Class::Conflict => &mut self.conflict,
            Class::Client(_) => &mut self.client,
            Class::Transport => &mut self.transport,
        };
        *slot += n;
    }

    fn merge(&mut self, other: &ClassCounts) {
        self.success += other.success;
        self.overloaded += other.overloaded;
        self.rate_limited += other.rate_limited;
        self.server_error += other.server_error;
        self.timeout += other.timeout;
        self.conflict += other.conflict;
        self.client += other.client;
        self.transport += other.transport;
    }
}

/// Counts in one-second slots over the last sixty seconds.
#[derive(Debug, Clone)]
struct Window {
    slots: [(u64, ClassCounts); SLOTS],
}

impl Window {
    fn new() -> Self {
        Self {
            slots: [(u64::MAX, ClassCounts::default()); SLOTS],
        }
    }

    fn record(&mut self, second: u64, class: Class) {
        let slot = &mut self.slots[(second % SLOTS as u64) as usize];
        if slot.0 != second {
            *slot = (second, ClassCounts::default());
        }
        slot.1.add(class, 1);
    }

    fn counts(&self, second: u64) -> ClassCounts {
        let mut total = ClassCounts::default();
        for (slot_second, counts) in &self.slots {
            if *slot_second != u64::MAX
                && second.saturating_sub(*slot_second) < SLOTS as u64
                && *slot_second <= second
            {
                total.merge(counts);
            }
        }
        total
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
/// 60 seconds, the overload (529) rate, and a callback when that rate passes
/// a threshold (default 2%, the level the guides alert at; at least 50
/// outcomes in the window before it can fire). Clones share the counts.
///
/// ```
/// use tower_overload::classify::Class;
/// use tower_overload::request_id::OverloadStats;
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
    state: Mutex<State>,
}

struct State {
    all: Window,
    models: HashMap<Model, Window>,
    alerting: HashMap<Option<Model>, bool>,
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
    /// # use tower_overload::request_id::OverloadStats;
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
                state: Mutex::new(State {
                    all: Window::new(),
                    models: HashMap::new(),
                    alerting: HashMap::new(),
                }),
            }),
        }
    }

    /// The overload rate that raises an alert (a fraction: 0.02 is 2%).
    ///
    /// ```
    /// # use tower_overload::request_id::OverloadStats;
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
    ///
    /// ```
    /// # use tower_overload::request_id::OverloadStats;
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
    /// the threshold, and again when it falls below half of it.
    ///
    /// ```
    /// # use tower_overload::request_id::OverloadStats;
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

    fn state(&self) -> MutexGuard<'_, State> {
        // Callbacks run after the lock is released.
        crate::sync::lock(&self.inner.state)
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.inner.origin).as_secs()
    }

    /// Records one outcome, now.
    ///
    /// ```
    /// # use tower_overload::{classify::Class, request_id::OverloadStats};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let stats = OverloadStats::new();
    /// stats.record(None, Class::Overloaded);
    /// assert_eq!(stats.counts().overloaded, 1);
    /// # }
    /// ```
    pub fn record(&self, model: Option<&Model>, class: Class) {
        let second = self.second(Instant::now());
        let mut alerts = Vec::new();
        {
            let mut state = self.state();
            state.all.record(second, class);
            let all = state.all.counts(second);
            self.check(&mut state, None, all, &mut alerts);
            if let Some(model) = model {
                if !state.models.contains_key(model) && state.models.len() >= MAX_MODELS {
                    // Past the bound, a model counts in the totals only.
                } else {
                    let window = state
                        .models
                        .entry(model.clone())
                        .or_insert_with(Window::new);
                    window.record(second, class);
                    let counts = window.counts(second);
                    self.check(&mut state, Some(model.clone()), counts, &mut alerts);
                }
            }
        }
        if let Some(callback) = &self.inner.on_alert {
            for alert in &alerts {
                callback(alert);
            }
        }
    }

    fn check(
        &self,
        state: &mut State,
        model: Option<Model>,
        counts: ClassCounts,
        alerts: &mut Vec<OverloadAlert>,
    ) {
        let rate = counts.overload_rate();
        let alerting = state.alerting.get(&model).copied().unwrap_or(false);
        let new_state = if !alerting
            && counts.total() >= self.inner.min_samples
            && rate >= self.inner.threshold
        {
            Some(AlertState::Raised)
        } else if alerting && rate < self.inner.threshold / 2.0 {
            Some(AlertState::Cleared)
        } else {
            None
        };
        if let Some(new_state) = new_state {
            state
                .alerting
                .insert(model.clone(), new_state == AlertState::Raised);
            alerts.push(OverloadAlert {
                model,
                state: new_state,
                rate,
                counts,
            });
        }
    }

    /// Outcomes of all traffic over the last 60 s.
    ///
    /// ```
    /// # use tower_overload::request_id::OverloadStats;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// assert_eq!(OverloadStats::new().counts().total(), 0);
    /// # }
    /// ```
    pub fn counts(&self) -> ClassCounts {
        let second = self.second(Instant::now());
        self.state().all.counts(second)
    }

    /// Outcomes of one model over the last 60 s.
    ///
    /// ```
    /// # use tower_overload::{Model, request_id::OverloadStats};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// assert_eq!(OverloadStats::new().counts_for(&Model::new("m")).total(), 0);
    /// # }
    /// ```
    pub fn counts_for(&self, model: &Model) -> ClassCounts {
        let second = self.second(Instant::now());
        self.state()
            .models
            .get(model)
            .map(|w| w.counts(second))
            .unwrap_or_default()
    }

    /// The overload rate of all traffic over the last 60 s.
    ///
    /// ```
    /// # use tower_overload::request_id::OverloadStats;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// assert_eq!(OverloadStats::new().overload_rate(), 0.0);
    /// # }
    /// ```
    pub fn overload_rate(&self) -> f64 {
        self.counts().overload_rate()
    }

    /// The overload rate of one model over the last 60 s.
    ///
    /// ```
    /// # use tower_overload::{Model, request_id::OverloadStats};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// assert_eq!(OverloadStats::new().overload_rate_for(&Model::new("m")), 0.0);
    /// # }
    /// ```
    pub fn overload_rate_for(&self, model: &Model) -> f64 {
        self.counts_for(model).overload_rate()
    }

    /// The models seen, with their counts.
    ///
    /// ```
    /// # use tower_overload::request_id::OverloadStats;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// assert!(OverloadStats::new().models().is_empty());
    /// # }
    /// ```
    pub fn models(&self) -> Vec<(Model, ClassCounts)> {
        let second = self.second(Instant::now());
        let state = self.state();
        let mut models: Vec<_> = state
            .models
            .iter()
            .map(|(model, window)| (model.clone(), window.counts(second)))
            .collect();
        models.sort_by(|a, b| a.0.cmp(&b.0));
        models
    }

    /// The window the counts cover.
    ///
    /// ```
    /// # use tower_overload::request_id::OverloadStats;
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
    use std::sync::atomic::{AtomicUsize, Ordering};

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
        tokio::time::advance(Duration::from_secs(61)).await;
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
}
