//! The model a request is for: read from the body, set by the caller, or rewritten for fallback.
//!
//! [`extract`] and [`rewrite`] work on the raw JSON bytes of a Messages-style
//! request without parsing it into a tree: they walk the members of the
//! top-level object only, skip the values of the others (however long the
//! `messages` array), and stop at `model`. Keys named `model` inside
//! messages, tools, schemas or metadata never match.
//!
//! ```
//! use tower_overload::model;
//!
//! let body = br#"{"messages":[{"role":"user","content":"{\"model\":\"fake\"}"}],"model":"claude-opus-4-6","max_tokens":1024}"#;
//! assert_eq!(model::extract(body).as_deref(), Some("claude-opus-4-6"));
//!
//! let rewritten = model::rewrite(body, "claude-sonnet-4-6").unwrap();
//! assert_eq!(model::extract(&rewritten).as_deref(), Some("claude-sonnet-4-6"));
//! ```

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

use crate::json;

/// The top-level `"model"` string of a JSON object body.
///
/// Escapes in keys and value are decoded (only then is anything allocated);
/// whitespace may stand anywhere JSON allows it. `None` for a non-object
/// top, a missing or non-string `model`, invalid escapes or UTF-8 in the
/// value, and for JSON that is broken before the `model` member. Members
/// after `model` are not read. Nesting deeper than 1024 levels before
/// `model` reads as broken; the scan is iterative, never recursive.
///
/// ```
/// use tower_overload::model::extract;
///
/// assert_eq!(extract(br#"{ "\u006dodel" : "claude-haiku-4-5" }"#).as_deref(), Some("claude-haiku-4-5"));
/// assert_eq!(extract(br#"{"metadata":{"model":"nested"}}"#), None);
/// assert_eq!(extract(br#"{"model": 42}"#), None);
/// assert_eq!(extract(b"not json"), None);
/// ```
pub fn extract(body: &[u8]) -> Option<Cow<'_, str>> {
    let at = json::find_member(body, 0, "model")?;
    json::string_at(body, at)?.0.decode()
}

/// `body` with the top-level `model` value replaced by `model`, every other
/// byte as it was. The new value is escaped as JSON needs. `None` when the
/// body has no top-level string `model` (see [`extract`]).
///
/// ```
/// use tower_overload::model::rewrite;
///
/// let body = br#"{"model" : "claude-opus-4-6",  "stream":true}"#;
/// let rewritten = rewrite(body, "claude-sonnet-4-6").unwrap();
/// assert_eq!(&rewritten[..], br#"{"model" : "claude-sonnet-4-6",  "stream":true}"#);
///
/// assert_eq!(&rewrite(br#"{"model":"a"}"#, "quote\"d").unwrap()[..], br#"{"model":"quote\"d"}"#);
/// assert!(rewrite(br#"{"stream":true}"#, "x").is_none());
/// ```
pub fn rewrite(body: &[u8], model: &str) -> Option<Bytes> {
    let start = json::find_member(body, 0, "model")?;
    let (current, end) = json::string_at(body, start)?;
    // A value extract cannot read (a bad escape, invalid UTF-8) is not a model to replace.
    current.decode()?;
    let mut out = Vec::with_capacity(body.len() - (end - start) + model.len() + 2);
    out.extend_from_slice(&body[..start]);
    out.push(b'"');
    json::escape_into(model, &mut out);
    out.push(b'"');
    out.extend_from_slice(&body[end..]);
    Some(Bytes::from(out))
}

/// A model name carried in request or response extensions.
///
/// Set it on a request to tell the layers which model it is for without
/// reading the body; the layers also record the model they found here.
/// Cloning is a reference-count bump.
///
/// ```
/// use tower_overload::Model;
///
/// let mut request = http::Request::new(());
/// request.extensions_mut().insert(Model::new("claude-sonnet-4-6"));
/// assert_eq!(request.extensions().get::<Model>().unwrap().as_str(), "claude-sonnet-4-6");
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Model(Arc<str>);

impl Model {
    /// A model name.
    ///
    /// ```
    /// # use tower_overload::Model;
    /// let model = Model::new("claude-haiku-4-5");
    /// assert_eq!(model.to_string(), "claude-haiku-4-5");
    /// ```
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Self(name.into())
    }

    /// The name as text.
    ///
    /// ```
    /// # use tower_overload::Model;
    /// assert_eq!(Model::new("m").as_str(), "m");
    /// ```
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Model").field(&self.as_str()).finish()
    }
}

impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for Model {
    fn from(name: &str) -> Self {
        Self::new(name)
    }
}

impl From<String> for Model {
    fn from(name: String) -> Self {
        Self::new(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    #[test]
    fn extract_table() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (br#"{"model":"m"}"#, Some("m")),
            (b" \n\t{ \"model\" \n:\r \"m\" } ", Some("m")),
            (br#"{"max_tokens":1,"model":"m"}"#, Some("m")),
            (br#"{"model":"","x":1}"#, Some("")),
            (br#"{"model":"a\"b\\c\u00e9\ud83d\ude00"}"#, Some("a\"b\\cé😀")),
            (br#"{"mod\u0065l":"m"}"#, Some("m")),
            (br#"{"models":"no","model":"yes"}"#, Some("yes")),
            (br#"{"model":"first","model":"second"}"#, Some("first")),
            (br#"{"messages":[{"role":"user","content":[{"type":"text","text":"\"model\":\"x\""}]}],"model":"m"}"#, Some("m")),
            (br#"{"tools":[{"name":"t","input_schema":{"properties":{"model":{"type":"string"}}}}],"model":"m"}"#, Some("m")),
            (br#"{"metadata":{"model":"nested"},"x":[{"model":"n"}]}"#, None),
            (br#"{"model":null}"#, None),
            (br#"{"model":["m"]}"#, None),
            (br#"{"model":{"name":"m"}}"#, None),
            (br#"["model","m"]"#, None),
            (br#""model""#, None),
            (br#"{"a":[1,2}, "model":"m"}"#, None),
            (br#"{"a" "model":"m"}"#, None),
            (br#"{"model":"unterminated}"#, None),
            (br#"{"model":"bad \x escape"}"#, None),
            (b"{\"model\":\"\xff\"}", None),
            (b"", None),
            (b"{", None),
        ];
        for (body, expected) in cases {
            assert_eq!(
                extract(body).as_deref(),
                *expected,
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn extract_borrows_unless_escaped() {
        assert!(matches!(
            extract(br#"{"model":"m"}"#),
            Some(Cow::Borrowed("m"))
        ));
        assert!(matches!(
            extract(br#"{"model":"\u006d"}"#),
            Some(Cow::Owned(_))
        ));
    }

    #[test]
    fn deep_nesting_before_model_is_refused_without_overflow() {
        let depth = 200_000;
        let body = format!(
            r#"{{"x":{}{},"model":"m"}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        assert_eq!(extract(body.as_bytes()), None);
        let depth = 1000;
        let body = format!(
            r#"{{"x":{}{},"model":"m"}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        assert_eq!(extract(body.as_bytes()).as_deref(), Some("m"));
    }

    #[test]
    fn rewrite_changes_only_the_value() {
        let body = br#"{"system":"s","model":"claude-opus-4-6","metadata":{"model":"keep"}}"#;
        let out = rewrite(body, "claude-haiku-4-5").unwrap();
        assert_eq!(
            &out[..],
            br#"{"system":"s","model":"claude-haiku-4-5","metadata":{"model":"keep"}}"#
        );
        let out = rewrite(br#"{"model":"\u006d"}"#, "new\nline").unwrap();
        assert_eq!(&out[..], br#"{"model":"new\nline"}"#);
        assert!(rewrite(br#"{"model":7}"#, "x").is_none());
        // Found by fuzzing: a value extract rejects is not rewritten either.
        assert!(rewrite(br#"{"model":"bad \q escape"}"#, "x").is_none());
        assert!(rewrite(b"{\"model\":\"\xff\"}", "x").is_none());
        assert!(rewrite(b"garbage", "x").is_none());
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            // Floats that serde_json reads back exactly; inexact ones would test serde, not us.
            (-1000i32..1000).prop_map(|n| Value::from(f64::from(n) / 8.0)),
            "\\PC{0,12}".prop_map(Value::String),
            Just(Value::String("model".into())),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![Just("model".to_owned()), "[a-z\"\\\\]{0,6}"],
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn extract_agrees_with_serde_json(
            before in proptest::collection::vec(("[a-z]{1,8}", json_value()), 0..4),
            model in proptest::option::of("\\PC{0,24}"),
            after in proptest::collection::vec(("[a-z]{1,8}", json_value()), 0..4),
            pretty in any::<bool>(),
        ) {
            let mut object = serde_json::Map::new();
            for (k, v) in before { if k != "model" { object.insert(k, v); } }
            if let Some(m) = &model { object.insert("model".into(), json!(m)); }
            for (k, v) in after { if k != "model" { object.insert(k, v); } }
            let value = Value::Object(object);
            let body = if pretty { serde_json::to_vec_pretty(&value) } else { serde_json::to_vec(&value) }.unwrap();
            let extracted = extract(&body);
            prop_assert_eq!(extracted.as_deref(), model.as_deref());

            if let Some(original) = &model {
                let rewritten = rewrite(&body, "new \"model\" \u{e9}").unwrap();
                let mut reparsed: Value = serde_json::from_slice(&rewritten).unwrap();
                prop_assert_eq!(reparsed["model"].as_str(), Some("new \"model\" \u{e9}"));
                reparsed["model"] = json!(original);
                prop_assert_eq!(reparsed, value);
            }
        }

        #[test]
        fn rewrite_changes_only_the_model_value(
            before in proptest::collection::vec(("[a-z]{1,8}", json_value()), 0..4),
            original in "[a-zA-Z0-9 .\\-\"\\\\]{0,24}",
            replacement in "\\PC{0,24}|[\"\\\\\n\t\u{1}]{0,5}",
            after in proptest::collection::vec(("[a-z]{1,8}", json_value()), 0..4),
        ) {
            let mut object = serde_json::Map::new();
            for (k, v) in before { if k != "model" { object.insert(k, v); } }
            object.insert("model".into(), json!(original));
            for (k, v) in after { if k != "model" { object.insert(k, v); } }
            let body = serde_json::to_vec(&Value::Object(object)).unwrap();
            let rewritten = rewrite(&body, &replacement).unwrap();
            let read_back = extract(&rewritten);
            prop_assert_eq!(read_back.as_deref(), Some(replacement.as_str()));
            // Writing the original back gives the original bytes: nothing else moved.
            let restored = rewrite(&rewritten, &original).unwrap();
            prop_assert_eq!(restored, Bytes::from(body));
        }

        #[test]
        fn extract_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = extract(&body);
            let _ = rewrite(&body, "x");
        }

        #[test]
        fn extract_never_panics_on_jsonish(body in "[\\{\\}\\[\\]\":,\\\\a-z0-9 ]{0,200}") {
            let _ = extract(body.as_bytes());
            let _ = rewrite(body.as_bytes(), "x");
        }
    }
}
