//! The model a request is for: read from the body, set by the caller, or rewritten for fallback.
//!
//! [`extract`] and [`rewrite`] work on the raw JSON bytes of a Messages-style
//! request without parsing it into a tree: they walk the members of the
//! top-level object only and skip the values of the others (however long the
//! `messages` array). Keys named `model` inside messages, tools, schemas or
//! metadata never match; a duplicate top-level `model` is read as the API
//! reads it (the last one wins).
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

/// The top-level `"model"` string of a JSON object body: the model the API
/// will serve.
///
/// Escapes in keys and value are decoded (only then is anything allocated);
/// whitespace may stand anywhere JSON allows it. When the key appears more
/// than once at the top level, the last one counts, as it does for the API's
/// parser (and serde_json's `Value`); so the whole object is walked, and
/// values other than `model`s are skipped without being decoded. `None` for
/// a non-object top, a missing or non-string last `model`, invalid escapes or
/// UTF-8 in its value, and for a body that is not one well-formed object
/// followed by whitespace only (the API rejects those). Nesting deeper than
/// 1024 levels reads as broken; the scan is iterative, never recursive.
///
/// ```
/// use tower_overload::model::extract;
///
/// assert_eq!(extract(br#"{ "\u006dodel" : "claude-haiku-4-5" }"#).as_deref(), Some("claude-haiku-4-5"));
/// assert_eq!(extract(br#"{"model":"claude-x","max_tokens":1,"model":"claude-opus-4-6"}"#).as_deref(), Some("claude-opus-4-6"));
/// assert_eq!(extract(br#"{"metadata":{"model":"nested"}}"#), None);
/// assert_eq!(extract(br#"{"model": 42}"#), None);
/// assert_eq!(extract(b"not json"), None);
/// ```
pub fn extract(body: &[u8]) -> Option<Cow<'_, str>> {
    name_at(body, json::last_member(body, "model")?)
}

/// The model name whose string value starts at `at`, escapes decoded.
pub(crate) fn name_at(body: &[u8], at: usize) -> Option<Cow<'_, str>> {
    json::string_at(body, at)?.0.decode()
}

/// `body` with the top-level `model` value replaced by `model`, every other
/// byte as it was. The new value is escaped as JSON needs. `None` when
/// [`extract`] reads no model from the body.
///
/// When the key appears more than once at the top level, every occurrence
/// gets the new value, so no parser can read an older model from the result,
/// whichever duplicate it keeps.
///
/// ```
/// use tower_overload::model::rewrite;
///
/// let body = br#"{"model" : "claude-opus-4-6",  "stream":true}"#;
/// let rewritten = rewrite(body, "claude-sonnet-4-6").unwrap();
/// assert_eq!(&rewritten[..], br#"{"model" : "claude-sonnet-4-6",  "stream":true}"#);
///
/// assert_eq!(&rewrite(br#"{"model":"a"}"#, "quote\"d").unwrap()[..], br#"{"model":"quote\"d"}"#);
/// assert_eq!(&rewrite(br#"{"model":"a","model":"b"}"#, "c").unwrap()[..], br#"{"model":"c","model":"c"}"#);
/// assert!(rewrite(br#"{"stream":true}"#, "x").is_none());
/// ```
pub fn rewrite(body: &[u8], model: &str) -> Option<Bytes> {
    // A value extract cannot read (a bad escape, invalid UTF-8) is not a model to replace.
    extract(body)?;
    let mut value = Vec::with_capacity(model.len() + 2);
    value.push(b'"');
    json::escape_into(model, &mut value);
    value.push(b'"');
    let mut out = Vec::with_capacity(body.len() + value.len());
    let mut copied = 0;
    for (name, start, end) in json::Members::new(body) {
        if name.eq_str("model") {
            out.extend_from_slice(&body[copied..start]);
            out.extend_from_slice(&value);
            copied = end;
        }
    }
    out.extend_from_slice(&body[copied..]);
    Some(Bytes::from(out))
}

/// A model name carried in request or response extensions.
///
/// Set it on a request to tell the layers which model it is for without
/// reading the body; the layers also record the model they found here.
/// Cloning is a copy or a reference-count bump. The names of current
/// Claude models, read from a body or made with `From<&str>`, need no
/// allocation at all: every call of every layer reads its model, and the
/// common names are kept as static text.
///
/// ```
/// use tower_overload::Model;
///
/// let mut request = http::Request::new(());
/// request.extensions_mut().insert(Model::new("claude-sonnet-4-6"));
/// assert_eq!(request.extensions().get::<Model>().unwrap().as_str(), "claude-sonnet-4-6");
/// ```
#[derive(Clone)]
pub struct Model(Name);

#[derive(Clone)]
enum Name {
    Static(&'static str),
    Shared(Arc<str>),
}

/// Model ids common enough that reading one should not allocate. Any other
/// name works the same, in a shared allocation of its own.
const KNOWN: &[&str] = &[
    "claude-opus-4-6",
    "claude-sonnet-4-6",
    "claude-haiku-4-5",
    "claude-opus-4-5",
    "claude-sonnet-4-5",
    "claude-opus-4-1",
    "claude-opus-4-0",
    "claude-sonnet-4-0",
    "claude-haiku-4-5-20251001",
    "claude-opus-4-5-20251101",
    "claude-sonnet-4-5-20250929",
    "claude-opus-4-1-20250805",
    "claude-opus-4-20250514",
    "claude-sonnet-4-20250514",
    "claude-3-7-sonnet-latest",
    "claude-3-7-sonnet-20250219",
    "claude-3-5-haiku-latest",
    "claude-3-5-haiku-20241022",
    "claude-3-haiku-20240307",
];

impl Model {
    /// A model name.
    ///
    /// ```
    /// # use tower_overload::Model;
    /// let model = Model::new("claude-haiku-4-5");
    /// assert_eq!(model.to_string(), "claude-haiku-4-5");
    /// ```
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Self(Name::Shared(name.into()))
    }

    /// A model name known at compile time: no allocation, in a `const` too.
    ///
    /// ```
    /// # use tower_overload::Model;
    /// const OPUS: Model = Model::from_static("claude-opus-4-6");
    /// assert_eq!(OPUS, Model::new("claude-opus-4-6"));
    /// ```
    pub const fn from_static(name: &'static str) -> Self {
        Self(Name::Static(name))
    }

    /// `name` as a model, without allocating when it is a common model id.
    pub(crate) fn from_name(name: &str) -> Self {
        if name.starts_with("claude-")
            && let Some(known) = KNOWN.iter().find(|known| **known == name)
        {
            return Self::from_static(known);
        }
        Self::new(name)
    }

    /// The name as text, raw: what routing and keys use. Show it with
    /// `Display`, which escapes it for logs.
    ///
    /// ```
    /// # use tower_overload::Model;
    /// assert_eq!(Model::new("m").as_str(), "m");
    /// ```
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Name::Static(name) => name,
            Name::Shared(name) => name,
        }
    }
}

// Equality, order and hash are the name's, so a `Model` is found in a map
// by `&str` too (`Borrow<str>`), whichever way it was made.
impl PartialEq for Model {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Model {}

impl PartialOrd for Model {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Model {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl std::hash::Hash for Model {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl std::borrow::Borrow<str> for Model {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

/// The longest model name, in bytes, that a layer keying by model gives a
/// state of its own (a slot, a set of buckets): real model names are far
/// shorter, and a name chosen by a client must not make one state large.
#[cfg_attr(
    not(any(feature = "concurrency", feature = "pacing", feature = "health")),
    allow(dead_code)
)]
pub(crate) const MAX_KEY_LEN: usize = 256;

/// Bodies longer than this carry the model read from them as an extension
/// (see [`of_request_carried`]); shorter ones are read again by each layer.
///
/// An extension costs three allocations, and each retry clones it (three
/// more); reading the `model` of a 2 KiB body costs about as much as that,
/// and a 100 KiB one thirty times more.
pub(crate) const CARRY_MODEL_ABOVE: usize = 4 * 1024;

/// [`of_request`], and when the model was read from a body longer than
/// [`CARRY_MODEL_ABOVE`], left on the request as a [`Model`] extension so
/// the layers inside do not read the body again. The outermost layer calls it.
#[cfg_attr(not(feature = "request-id"), allow(dead_code))]
pub(crate) fn of_request_carried<B: crate::body::ReplayableBody>(
    request: &mut http::Request<B>,
) -> Option<Model> {
    if let Some(model) = request.extensions().get::<Model>() {
        return Some(model.clone());
    }
    let body = request.body().in_memory()?;
    let model = extract(&body).map(|name| Model::from_name(&name))?;
    if body.len() > CARRY_MODEL_ABOVE {
        request.extensions_mut().insert(model.clone());
    }
    Some(model)
}

/// The model a request is for: its [`Model`] extension when the caller set
/// one, else the `model` of its in-memory JSON body. Every layer asks this
/// one question the same way.
#[cfg_attr(
    not(any(feature = "concurrency", feature = "fallback")),
    allow(dead_code)
)]
pub(crate) fn of_request<B: crate::body::ReplayableBody>(
    request: &http::Request<B>,
) -> Option<Model> {
    if let Some(model) = request.extensions().get::<Model>() {
        return Some(model.clone());
    }
    let body = request.body().in_memory()?;
    extract(&body).map(|name| Model::from_name(&name))
}

/// The most bytes of a model name that [`Model`]'s `Display` and `Debug` show
/// before cutting it with `…`.
///
/// ```
/// use tower_overload::{Model, model::MAX_MODEL_DISPLAY_LEN};
/// let shown = Model::new("m".repeat(500)).to_string();
/// assert_eq!(shown.len(), MAX_MODEL_DISPLAY_LEN + '…'.len_utf8());
/// ```
pub const MAX_MODEL_DISPLAY_LEN: usize = 128;

/// Whether `c` must not reach a log as it is: control characters (line
/// breaks, escape sequences) and the invisible format characters that can
/// reorder or hide text in a terminal (bidi overrides, zero-width marks).
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\\'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{206F}'
                | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFB}'
        )
}

/// `name` with [`needs_escape`] characters escaped (`\n`, `\u{1b}`),
/// at most [`MAX_MODEL_DISPLAY_LEN`] bytes of it, then `…` if cut.
fn write_log_safe(name: &str, f: &mut dyn fmt::Write) -> fmt::Result {
    let mut written = 0;
    let mut buf = [0u8; 4];
    for c in name.chars() {
        let escaped;
        let piece: &str = match c {
            '\n' => "\\n",
            '\r' => "\\r",
            '\t' => "\\t",
            '\\' => "\\\\",
            c if needs_escape(c) => {
                escaped = format!("\\u{{{:x}}}", u32::from(c));
                &escaped
            }
            c => c.encode_utf8(&mut buf),
        };
        if written + piece.len() > MAX_MODEL_DISPLAY_LEN {
            return f.write_str("…");
        }
        f.write_str(piece)?;
        written += piece.len();
    }
    Ok(())
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Model(\"")?;
        // Quotes too, so the Debug form stays one unambiguous token.
        let mut safe = String::new();
        write_log_safe(self.as_str(), &mut safe)?;
        f.write_str(&safe.replace('"', "\\\""))?;
        f.write_str("\")")
    }
}

/// The log-safe rendering: a name from a request body can hold anything, so
/// control and invisible format characters are escaped (`x\nINFO forged` is
/// shown as `x\\nINFO forged`, one line) and a long name is cut at
/// [`MAX_MODEL_DISPLAY_LEN`] bytes with `…`. Logs, error messages and the
/// fallback's warnings all show a model this way; [`Model::as_str`] is the raw
/// name, for routing and keys.
///
/// ```
/// use tower_overload::Model;
///
/// assert_eq!(Model::new("claude-opus-4-6").to_string(), "claude-opus-4-6");
/// assert_eq!(Model::new("x\nINFO forged").to_string(), "x\\nINFO forged");
/// assert!(Model::new("m".repeat(1000)).to_string().ends_with('…'));
/// assert_eq!(Model::new("x\nINFO forged").as_str(), "x\nINFO forged");
/// ```
impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.as_str();
        if name.len() <= MAX_MODEL_DISPLAY_LEN && !name.chars().any(needs_escape) {
            return f.write_str(name);
        }
        write_log_safe(name, f)
    }
}

impl From<&str> for Model {
    fn from(name: &str) -> Self {
        Self::from_name(name)
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
            // Defect 5: the API, like serde_json's Value, keeps the last duplicate.
            (br#"{"model":"first","model":"second"}"#, Some("second")),
            (br#"{"model":"first","x":[{"model":"n"}],"model":"second","y":1}"#, Some("second")),
            (br#"{"model":"first","model":42}"#, None),
            (br#"{"model":42,"model":"second"}"#, Some("second")),
            (br#"{"model":"m","a":[1,2}"#, None),
            (br#"{"model":"m"} trailing"#, None),
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
    fn display_is_log_safe_defect_11() {
        let cases: &[(&str, &str)] = &[
            ("claude-opus-4-6", "claude-opus-4-6"),
            ("x\nINFO forged", "x\\nINFO forged"),
            ("a\rb\tc\\d", "a\\rb\\tc\\\\d"),
            ("\u{1b}[31mred", "\\u{1b}[31mred"),
            ("bidi\u{202e}txt", "bidi\\u{202e}txt"),
            ("zero\u{200b}width\u{85}", "zero\\u{200b}width\\u{85}"),
            ("caf\u{e9} \u{1f600}", "caf\u{e9} \u{1f600}"),
        ];
        for (name, shown) in cases {
            assert_eq!(Model::new(*name).to_string(), *shown, "{name:?}");
            assert_eq!(Model::new(*name).as_str(), *name);
        }
        let long = Model::new("é".repeat(200)).to_string();
        assert!(
            long.len() <= MAX_MODEL_DISPLAY_LEN + '…'.len_utf8(),
            "{}",
            long.len()
        );
        assert!(long.ends_with('…'));
        let escapes = Model::new("\n".repeat(200)).to_string();
        assert!(escapes.len() <= MAX_MODEL_DISPLAY_LEN + 3 && !escapes.contains('\n'));
        assert_eq!(format!("{:?}", Model::new("a\"\nb")), r#"Model("a\"\nb")"#);
    }

    proptest! {
        #[test]
        fn display_never_holds_a_control_character(name in "\\PC{0,40}|[\\x00-\\x1f\\x7f-\\u{9f}\\u{2028}\\u{202e}a-z]{0,300}") {
            let model = Model::new(name.as_str());
            for shown in [model.to_string(), format!("{model:?}")] {
                prop_assert!(!shown.chars().any(|c| c.is_control()), "{:?}", shown);
                prop_assert!(shown.len() <= MAX_MODEL_DISPLAY_LEN + 20);
            }
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

    #[test]
    fn rewrite_leaves_no_other_top_level_model_defect_5() {
        let body = br#"{"model":"claude-x","max_tokens":1,"metadata":{"model":"keep"},"model":"claude-opus-4-6"}"#;
        let out = rewrite(body, "claude-haiku-4-5").unwrap();
        let parsed: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed["model"], "claude-haiku-4-5");
        assert_eq!(parsed["metadata"]["model"], "keep");
        assert_eq!(
            &out[..],
            br#"{"model":"claude-haiku-4-5","max_tokens":1,"metadata":{"model":"keep"},"model":"claude-haiku-4-5"}"#
        );
        // An earlier duplicate of any type is overridden by the last one, so it is replaced too.
        let out = rewrite(br#"{"model":[1,{"a":2}], "model":"b"}"#, "c").unwrap();
        assert_eq!(&out[..], br#"{"model":"c", "model":"c"}"#);
        // The last one decides: not a string, nothing to rewrite.
        assert!(rewrite(br#"{"model":"a","model":null}"#, "c").is_none());
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

    fn member_key() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => Just("model".to_owned()),
            1 => Just("models".to_owned()),
            1 => Just("Model".to_owned()),
            2 => "[a-z]{1,6}",
        ]
    }

    /// A member's value: a string (as text to escape by hand) or any JSON value.
    fn member_value() -> impl Strategy<Value = Result<String, Value>> {
        prop_oneof![
            3 => "\\PC{0,10}|[\"\\\\\n\u{1}\u{7f}]{0,4}".prop_map(Ok),
            2 => json_value().prop_map(Err),
        ]
    }

    /// `value` as a JSON string literal; bits of `escapes` choose which
    /// characters are written as `\uXXXX` (surrogate pairs included).
    fn json_string(value: &str, escapes: u64) -> String {
        let mut out = String::from("\"");
        for (i, c) in value.chars().enumerate() {
            let forced = escapes >> (i % 64) & 1 == 1;
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if forced || u32::from(c) < 0x20 => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
        out
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

        /// Defect 5: JSON text written by hand so that duplicate keys, escaped
        /// keys and odd whitespace exist; serde_json's `Value` is the reference
        /// (it keeps the last duplicate, as the API does).
        #[test]
        fn extract_and_rewrite_agree_with_serde_json_on_duplicates(
            members in proptest::collection::vec((member_key(), member_value(), any::<u8>()), 0..7),
            spacing in proptest::collection::vec(prop_oneof![Just(""), Just(" "), Just("\n  "), Just("\t")], 8),
            escapes in any::<u64>(),
        ) {
            let mut text = String::from(spacing[0]);
            text.push('{');
            for (i, (key, value, salt)) in members.iter().enumerate() {
                if i > 0 { text.push(','); }
                text.push_str(spacing[(i + 1) % 8]);
                text.push_str(&json_string(key, escapes.rotate_left(u32::from(*salt))));
                text.push_str(spacing[(i + 2) % 8]);
                text.push(':');
                text.push_str(spacing[(i + 3) % 8]);
                match value {
                    Ok(string) => text.push_str(&json_string(string, escapes ^ u64::from(*salt))),
                    Err(other) => text.push_str(&other.to_string()),
                }
            }
            text.push_str(spacing[7]);
            text.push('}');
            text.push_str(spacing[1]);

            let reference: Value = serde_json::from_str(&text).unwrap();
            let extracted = extract(text.as_bytes());
            prop_assert_eq!(extracted.as_deref(), reference["model"].as_str(), "{}", text);

            let replacement = "new \"model\"\n\u{e9}";
            match rewrite(text.as_bytes(), replacement) {
                Some(rewritten) => {
                    let mut reparsed: Value = serde_json::from_slice(&rewritten).unwrap();
                    prop_assert_eq!(reparsed["model"].as_str(), Some(replacement));
                    let read_back = extract(&rewritten);
                    prop_assert_eq!(read_back.as_deref(), Some(replacement));
                    reparsed["model"] = reference["model"].clone();
                    prop_assert_eq!(&reparsed, &reference, "{}", text);
                }
                None => prop_assert!(reference["model"].as_str().is_none(), "{}", text),
            }
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
