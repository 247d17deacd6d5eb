//! Model names from request bodies are the client's text: checked before
//! they reach a log line or a metric label.

use std::collections::HashSet;
use std::sync::Mutex;

/// Whether `name` may be written to logs and metrics as it is: 1 to 128
/// ASCII letters, digits and `- _ . : @ /` (every model id of the API fits).
/// Anything else (control characters, quotes, spaces, a 10 KiB string) is
/// still forwarded, but logged and counted as `invalid`.
///
/// ```
/// use tower_overload_gateway::valid_model_name;
///
/// assert!(valid_model_name("claude-opus-4-6"));
/// assert!(valid_model_name("claude-3-5-haiku@20241022"));
/// assert!(!valid_model_name("claude\nINFO forged line"));
/// assert!(!valid_model_name(""));
/// assert!(!valid_model_name(&"m".repeat(129)));
/// ```
pub fn valid_model_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'@' | b'/')
        })
}

/// At most this many distinct model labels in the gateway's metrics; the
/// next new name is counted as `other`, so a client cannot grow the
/// exporter's memory without bound.
const MAX_LABELS: usize = 64;

/// The label set of model names seen so far.
#[derive(Debug, Default)]
pub(crate) struct ModelLabels {
    seen: Mutex<HashSet<String>>,
}

impl ModelLabels {
    /// The label for `model`: the name if valid and within the bound.
    pub(crate) fn label(&self, model: Option<&str>) -> String {
        let Some(model) = model else {
            return "none".to_owned();
        };
        if !valid_model_name(model) {
            return "invalid".to_owned();
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(model) {
            return model.to_owned();
        }
        if seen.len() < MAX_LABELS {
            seen.insert(model.to_owned());
            return model.to_owned();
        }
        "other".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded_and_never_carry_bad_text() {
        let labels = ModelLabels::default();
        assert_eq!(labels.label(Some("claude-opus-4-6")), "claude-opus-4-6");
        assert_eq!(labels.label(Some("a\"b")), "invalid");
        assert_eq!(labels.label(None), "none");
        for i in 0..200 {
            let label = labels.label(Some(&format!("m{i}")));
            assert!(label == format!("m{i}") || label == "other");
        }
        assert_eq!(labels.label(Some("m199")), "other");
        assert_eq!(labels.label(Some("claude-opus-4-6")), "claude-opus-4-6");
    }
}
