//! What a [`reqwest::Error`] means for a retry.

use std::error::Error as StdError;

use crate::classify::{Class, Classification};
use crate::retry::{ClassifyError, DefaultErrorClassifier};

/// How deep a source chain is followed; chains are short, cycles are possible.
const MAX_CHAIN: usize = 16;

/// Judges reqwest's errors like hyper-util's, then asks another classifier.
///
/// Walks the error and its sources; at the first [`reqwest::Error`] it finds
/// (the error itself, or one boxed inside another layer's error):
/// - a timeout (`is_timeout`: the client's `timeout`, `read_timeout` or
///   `connect_timeout`) is a [`Class::Timeout`], retried;
/// - a failure to connect (`is_connect`: refused, unreachable, DNS, TLS
///   handshake) is a [`Class::Transport`], retried;
/// - a bad URL (`is_builder`) or a redirect policy's refusal (`is_redirect`)
///   is a [`Class::Transport`] that is not retried: another attempt would
///   fail the same way;
/// - a request, body or decode error (`is_request`, `is_body`, `is_decode`)
///   is decided by its cause (the io or hyper error inside), which goes with
///   every other error to the classifier given to
///   [`otherwise`](Self::otherwise): [`DefaultErrorClassifier`] unless set,
///   which retries a connection reset or closed before the answer and
///   surfaces anything else.
///
/// With the `reqwest` feature, [`DefaultErrorClassifier`] gives reqwest's
/// errors these same verdicts, so a policy that keeps the default classifier
/// still retries reqwest's timeouts; name this one to say so in code, or to
/// put reqwest's verdict in front of a classifier of your own.
///
/// ```
/// use tower_overload::reqwest::ReqwestErrorClassifier;
/// use tower_overload::retry::RetryPolicy;
///
/// let policy = RetryPolicy::foreground().error_classifier(ReqwestErrorClassifier::new());
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct ReqwestErrorClassifier<C = DefaultErrorClassifier> {
    otherwise: C,
}

impl ReqwestErrorClassifier {
    /// reqwest's verdicts, then [`DefaultErrorClassifier`].
    ///
    /// ```
    /// # use tower_overload::reqwest::ReqwestErrorClassifier;
    /// let classifier = ReqwestErrorClassifier::new();
    /// ```
    pub const fn new() -> Self {
        Self {
            otherwise: DefaultErrorClassifier,
        }
    }
}

impl<C> ReqwestErrorClassifier<C> {
    /// Asks `classifier` about errors that carry no verdict of reqwest's.
    ///
    /// ```
    /// use std::error::Error;
    /// use tower_overload::classify::Classification;
    /// use tower_overload::reqwest::ReqwestErrorClassifier;
    /// use tower_overload::retry::ClassifyError;
    ///
    /// #[derive(Debug)]
    /// struct NeverRetry;
    /// impl ClassifyError for NeverRetry {
    ///     fn classify_error(&self, _: &(dyn Error + 'static)) -> Classification {
    ///         Classification::transport(false)
    ///     }
    /// }
    /// let classifier = ReqwestErrorClassifier::new().otherwise(NeverRetry);
    /// let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
    /// assert!(!classifier.classify_error(&reset).retryable);
    /// ```
    pub fn otherwise<D>(self, classifier: D) -> ReqwestErrorClassifier<D> {
        ReqwestErrorClassifier {
            otherwise: classifier,
        }
    }
}

impl<C: ClassifyError> ClassifyError for ReqwestErrorClassifier<C> {
    fn classify_error(&self, error: &(dyn StdError + 'static)) -> Classification {
        let mut current = Some(error);
        for _ in 0..MAX_CHAIN {
            let Some(error) = current else { break };
            if let Some(verdict) = error.downcast_ref::<reqwest::Error>().and_then(verdict) {
                return verdict;
            }
            current = error.source();
        }
        self.otherwise.classify_error(error)
    }
}

/// reqwest's own verdict on `error`, or `None` when its cause decides (a
/// request, body or decode error wraps the io or hyper error that tells).
pub(crate) fn verdict(error: &reqwest::Error) -> Option<Classification> {
    if error.is_timeout() {
        return Some(Classification {
            class: Class::Timeout,
            retryable: true,
            server_verdict: None,
        });
    }
    if error.is_connect() {
        return Some(Classification::transport(true));
    }
    if error.is_builder() || error.is_redirect() {
        return Some(Classification::transport(false));
    }
    None
}
