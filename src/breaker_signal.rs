//! [`BreakerSignal`]: a model's circuit breaker, as the attempts of one call see it.
//!
//! A layer that gives up on a model when it keeps failing (the
//! [fallback layer](crate::fallback)'s breaker) learns of a storm only from
//! the calls that reach it; with a retry loop inside, a call reaches it only
//! after all of its retries, so a full outage would cost every call its whole
//! retry loop before the breaker opened. The signal closes that gap: the outer
//! layer puts a [`BreakerSignal`] in the extensions of the request it sends
//! for a model, and the [retry layer](crate::retry) inside tells it of every
//! failed attempt and asks it, before each retry and again when the backoff
//! ends, whether to go on. Once the breaker has opened, a call still retrying
//! that model stops (`StopReason::ModelUnavailable`) and the outer layer moves
//! it on to the next model.
//!
//! Requests without a signal (no such layer outside, or the last model of a
//! chain, where there is nowhere to move on to) are retried as before.
//!
//! ```
//! use std::sync::atomic::{AtomicBool, Ordering};
//! use tower_overload::breaker_signal::{BreakerSignal, ModelBreaker};
//! use tower_overload::classify::Class;
//!
//! // A breaker that opens on the first overload it hears of.
//! #[derive(Default)]
//! struct OneStrike(AtomicBool);
//!
//! impl ModelBreaker for OneStrike {
//!     fn on_failure(&self, class: Class) {
//!         if class == Class::Overloaded {
//!             self.0.store(true, Ordering::Release);
//!         }
//!     }
//!     fn should_stop(&self, class: Class) -> bool {
//!         class == Class::Overloaded && self.0.load(Ordering::Acquire)
//!     }
//! }
//!
//! let signal = BreakerSignal::new(OneStrike::default());
//! let mut request = http::Request::new(());
//! request.extensions_mut().insert(signal.clone());
//! assert!(!signal.should_stop(Class::Overloaded));
//! signal.on_failure(Class::Overloaded);
//! assert!(signal.should_stop(Class::Overloaded));
//! assert!(!signal.should_stop(Class::ServerError), "the breaker only cares about overloads");
//! ```

use std::fmt;
use std::sync::Arc;

use crate::classify::Class;

/// A model's circuit breaker, as one call's attempts see it.
///
/// Implementations are shared by all attempts of a call (and across
/// threads), and are called only on the failure path.
///
/// ```
/// use tower_overload::breaker_signal::ModelBreaker;
/// use tower_overload::classify::Class;
///
/// struct NeverOpen;
/// impl ModelBreaker for NeverOpen {
///     fn on_failure(&self, _class: Class) {}
///     fn should_stop(&self, _class: Class) -> bool { false }
/// }
/// assert!(!NeverOpen.should_stop(Class::Overloaded));
/// ```
pub trait ModelBreaker: Send + Sync + 'static {
    /// An attempt of the call failed with `class`.
    fn on_failure(&self, class: Class);

    /// Whether the call should stop retrying this model after a failure of
    /// `class` (its breaker is open, so another model should be tried).
    fn should_stop(&self, class: Class) -> bool;
}

/// The handle a request carries to its model's breaker; cloning it is a
/// reference-count bump. See the [module docs](self).
///
/// ```
/// use tower_overload::breaker_signal::{BreakerSignal, ModelBreaker};
/// use tower_overload::classify::Class;
///
/// struct Open;
/// impl ModelBreaker for Open {
///     fn on_failure(&self, _class: Class) {}
///     fn should_stop(&self, class: Class) -> bool { class == Class::Overloaded }
/// }
/// let signal = BreakerSignal::new(Open);
/// assert!(signal.should_stop(Class::Overloaded));
/// ```
#[derive(Clone)]
pub struct BreakerSignal(Arc<dyn ModelBreaker>);

impl BreakerSignal {
    /// A signal to `breaker`.
    ///
    /// ```
    /// # use tower_overload::breaker_signal::{BreakerSignal, ModelBreaker};
    /// # use tower_overload::classify::Class;
    /// # struct Closed;
    /// # impl ModelBreaker for Closed {
    /// #     fn on_failure(&self, _class: Class) {}
    /// #     fn should_stop(&self, _class: Class) -> bool { false }
    /// # }
    /// let signal = BreakerSignal::new(Closed);
    /// ```
    pub fn new(breaker: impl ModelBreaker) -> Self {
        Self(Arc::new(breaker))
    }

    /// A signal to a breaker already shared.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tower_overload::breaker_signal::{BreakerSignal, ModelBreaker};
    /// # use tower_overload::classify::Class;
    /// # struct Closed;
    /// # impl ModelBreaker for Closed {
    /// #     fn on_failure(&self, _class: Class) {}
    /// #     fn should_stop(&self, _class: Class) -> bool { false }
    /// # }
    /// let shared = Arc::new(Closed);
    /// let signal = BreakerSignal::from_arc(shared.clone());
    /// ```
    pub fn from_arc(breaker: Arc<dyn ModelBreaker>) -> Self {
        Self(breaker)
    }

    /// Tells the breaker an attempt failed with `class`.
    ///
    /// ```
    /// # use tower_overload::breaker_signal::{BreakerSignal, ModelBreaker};
    /// # use tower_overload::classify::Class;
    /// # struct Closed;
    /// # impl ModelBreaker for Closed {
    /// #     fn on_failure(&self, _class: Class) {}
    /// #     fn should_stop(&self, _class: Class) -> bool { false }
    /// # }
    /// BreakerSignal::new(Closed).on_failure(Class::Overloaded);
    /// ```
    pub fn on_failure(&self, class: Class) {
        self.0.on_failure(class);
    }

    /// Whether the call should stop retrying this model after a failure of `class`.
    ///
    /// ```
    /// # use tower_overload::breaker_signal::{BreakerSignal, ModelBreaker};
    /// # use tower_overload::classify::Class;
    /// # struct Closed;
    /// # impl ModelBreaker for Closed {
    /// #     fn on_failure(&self, _class: Class) {}
    /// #     fn should_stop(&self, _class: Class) -> bool { false }
    /// # }
    /// assert!(!BreakerSignal::new(Closed).should_stop(Class::Overloaded));
    /// ```
    pub fn should_stop(&self, class: Class) -> bool {
        self.0.should_stop(class)
    }
}

impl fmt::Debug for BreakerSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerSignal").finish_non_exhaustive()
    }
}
