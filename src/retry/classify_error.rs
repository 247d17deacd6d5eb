//! Judging errors of the inner service: no response at all, so no status to read.

use std::error::Error as StdError;
use std::fmt;
use std::io;

use crate::classify::{Class, Classification};

/// Decides whether an error of the inner service is worth another attempt.
///
/// The retry layer turns every inner error into a boxed error and asks this
/// trait about it; implement it for error types of your own (downcast the
/// error or walk its [`source`](StdError::source) chain), or use
/// [`DefaultErrorClassifier`].
///
/// ```
/// use std::error::Error;
/// use tower_overload::classify::{Class, Classification};
/// use tower_overload::retry::{ClassifyError, DefaultErrorClassifier};
///
/// #[derive(Debug)]
/// struct GatewayBusy;
/// impl std::fmt::Display for GatewayBusy {
///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str("gateway busy") }
/// }
/// impl Error for GatewayBusy {}
///
/// #[derive(Debug)]
/// struct MyClassifier;
/// impl ClassifyError for MyClassifier {
///     fn classify_error(&self, error: &(dyn Error + 'static)) -> Classification {
///         if error.is::<GatewayBusy>() {
///             return Classification { class: Class::Overloaded, retryable: true, server_verdict: None };
///         }
///         DefaultErrorClassifier.classify_error(error)
///     }
/// }
/// assert_eq!(MyClassifier.classify_error(&GatewayBusy).class, Class::Overloaded);
/// ```
pub trait ClassifyError: fmt::Debug + Send + Sync {
    /// The classification of `error`.
    fn classify_error(&self, error: &(dyn StdError + 'static)) -> Classification;
}

/// Retries what the official SDKs retry: connection failures and timeouts.
///
/// Walks the error and its sources and retries when it finds:
/// - `tower::timeout::error::Elapsed` (as [`Class::Timeout`]);
/// - a [`std::io::Error`] of kind `ConnectionRefused`, `ConnectionReset`,
///   `ConnectionAborted`, `NotConnected`, `BrokenPipe`, `TimedOut`,
///   `UnexpectedEof` or `Interrupted` (as [`Class::Transport`]);
/// - with the `hyper-util` feature, a hyper-util client error that failed
///   to connect, or a hyper error for a connection closed or canceled before
///   a complete response;
/// - with the `reqwest` feature, a `reqwest::Error` judged as
///   `tower_overload::reqwest::ReqwestErrorClassifier` judges it (its timeouts as [`Class::Timeout`], its connection failures
///   as [`Class::Transport`]).
///
/// Anything else is a [`Class::Transport`] error that is not retried: an
/// error the layer does not understand is surfaced rather than repeated.
///
/// ```
/// use std::io;
/// use tower_overload::retry::{ClassifyError, DefaultErrorClassifier};
///
/// let reset = io::Error::from(io::ErrorKind::ConnectionReset);
/// assert!(DefaultErrorClassifier.classify_error(&reset).retryable);
/// let denied = io::Error::from(io::ErrorKind::PermissionDenied);
/// assert!(!DefaultErrorClassifier.classify_error(&denied).retryable);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultErrorClassifier;

/// How deep a source chain is followed; chains are short, cycles are possible.
const MAX_CHAIN: usize = 16;

impl ClassifyError for DefaultErrorClassifier {
    fn classify_error(&self, error: &(dyn StdError + 'static)) -> Classification {
        let mut current = Some(error);
        for _ in 0..MAX_CHAIN {
            let Some(error) = current else { break };
            if let Some(verdict) = known(error) {
                return verdict;
            }
            current = error.source();
        }
        Classification::transport(false)
    }
}

fn known(error: &(dyn StdError + 'static)) -> Option<Classification> {
    if error.is::<tower::timeout::error::Elapsed>() {
        return Some(Classification {
            class: Class::Timeout,
            retryable: true,
            server_verdict: None,
        });
    }
    if let Some(io) = error.downcast_ref::<io::Error>() {
        use io::ErrorKind::*;
        let retryable = matches!(
            io.kind(),
            ConnectionRefused
                | ConnectionReset
                | ConnectionAborted
                | NotConnected
                | BrokenPipe
                | TimedOut
                | UnexpectedEof
                | Interrupted
        );
        if retryable {
            return Some(Classification::transport(true));
        }
        // An io::Error may wrap a more telling error of its own.
        return io
            .get_ref()
            .and_then(|inner| known(inner))
            .or(Some(Classification::transport(false)));
    }
    #[cfg(feature = "reqwest")]
    if let Some(verdict) = error
        .downcast_ref::<reqwest::Error>()
        .and_then(crate::reqwest::verdict)
    {
        return Some(verdict);
    }
    #[cfg(feature = "hyper-util")]
    if let Some(client) = error.downcast_ref::<hyper_util::client::legacy::Error>()
        && client.is_connect()
    {
        return Some(Classification::transport(true));
    }
    #[cfg(feature = "hyper-util")]
    if let Some(hyper) = error.downcast_ref::<hyper::Error>()
        && (hyper.is_incomplete_message() || hyper.is_canceled() || hyper.is_closed())
    {
        return Some(Classification::transport(true));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapper(Box<dyn StdError + Send + Sync>);

    impl fmt::Display for Wrapper {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("wrapped")
        }
    }

    impl StdError for Wrapper {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&*self.0)
        }
    }

    #[test]
    fn walks_the_source_chain() {
        let classify = |e: &(dyn StdError + 'static)| DefaultErrorClassifier.classify_error(e);
        let refused = Wrapper(Box::new(io::Error::from(io::ErrorKind::ConnectionRefused)));
        assert_eq!(classify(&refused), Classification::transport(true));
        let elapsed = Wrapper(Box::new(tower::timeout::error::Elapsed::new()));
        assert_eq!(classify(&elapsed).class, Class::Timeout);
        assert!(classify(&elapsed).retryable);
        let odd = Wrapper(Box::new(fmt::Error));
        assert_eq!(classify(&odd), Classification::transport(false));
        let io_wrapping_elapsed = io::Error::other(tower::timeout::error::Elapsed::new());
        assert_eq!(classify(&io_wrapping_elapsed).class, Class::Timeout);
    }
}
