//! The tokens a call used, as the API reports them: the `usage` of a JSON
//! response, or of a stream's `message_start` and `message_delta` events.
//!
//! Read without building a tree (like [`model`](crate::model)): only the
//! `usage` object is looked at, whatever else the response holds. Rate
//! limits count input tokens and cache writes toward the input-tokens limit
//! but not cache reads, so [`Usage::input_charged`] is what a pacer must
//! charge.
//!
//! ```
//! use tower_overload::usage::Usage;
//!
//! let body = br#"{"type":"message","content":[],"usage":{"input_tokens":12,"cache_creation_input_tokens":100,"cache_read_input_tokens":2000,"output_tokens":30}}"#;
//! let usage = Usage::from_message(body).unwrap();
//! assert_eq!(usage.input_charged(), 112);
//! assert_eq!(usage.output_tokens, Some(30));
//! ```

use crate::json;

/// Token counts of one call; a count the API did not report is `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// `input_tokens`: input not read from or written to the prompt cache.
    pub input_tokens: Option<u64>,
    /// `cache_creation_input_tokens`: input written to the prompt cache.
    pub cache_creation_input_tokens: Option<u64>,
    /// `cache_read_input_tokens`: input read from the prompt cache.
    pub cache_read_input_tokens: Option<u64>,
    /// `output_tokens`: tokens generated (so far, in a stream).
    pub output_tokens: Option<u64>,
}

const FIELDS: [&str; 4] = [
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "output_tokens",
];

impl Usage {
    /// The `usage` of a Messages API response body (a `message` object).
    /// `None` when the body is not an object with a `usage` object.
    ///
    /// ```
    /// # use tower_overload::usage::Usage;
    /// let usage = Usage::from_message(br#"{"usage":{"input_tokens":5,"output_tokens":7}}"#).unwrap();
    /// assert_eq!((usage.input_tokens, usage.output_tokens), (Some(5), Some(7)));
    /// assert_eq!(Usage::from_message(b"not json"), None);
    /// ```
    pub fn from_message(body: &[u8]) -> Option<Self> {
        let at = json::find_member(body, 0, "usage")?;
        Self::from_object(body, at)
    }

    /// The usage an SSE event's `data` reports: the message's at
    /// `message_start` (input, cache and the first output count), the
    /// running totals at `message_delta`. `None` for other events.
    ///
    /// ```
    /// # use tower_overload::usage::Usage;
    /// let start = br#"{"type":"message_start","message":{"id":"msg_1","usage":{"input_tokens":25,"output_tokens":1}}}"#;
    /// let delta = br#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":15}}"#;
    /// let mut usage = Usage::from_event(start).unwrap();
    /// usage.update(Usage::from_event(delta).unwrap());
    /// assert_eq!((usage.input_tokens, usage.output_tokens), (Some(25), Some(15)));
    /// assert_eq!(Usage::from_event(br#"{"type":"ping"}"#), None);
    /// ```
    pub fn from_event(data: &[u8]) -> Option<Self> {
        let kind = json::find_member(data, 0, "type")?;
        let (kind, _) = json::string_at(data, kind)?;
        if kind.eq_str("message_start") {
            let message = json::find_member(data, 0, "message")?;
            let usage = json::find_member(data, message, "usage")?;
            Self::from_object(data, usage)
        } else if kind.eq_str("message_delta") {
            Self::from_message(data)
        } else {
            None
        }
    }

    /// The counts of the `usage` object at `at` or after JSON whitespace:
    /// how a reader that found `"usage":` in the tail of a body too long to
    /// keep whole reads what follows.
    #[cfg_attr(not(feature = "pacing"), allow(dead_code))]
    pub(crate) fn object_at(bytes: &[u8], at: usize) -> Option<Self> {
        Self::from_object(bytes, json::skip_ws(bytes, at))
    }

    /// The counts of the `usage` object starting at `at`.
    fn from_object(bytes: &[u8], at: usize) -> Option<Self> {
        if bytes.get(at) != Some(&b'{') {
            return None;
        }
        let [input, creation, read, output] = FIELDS
            .map(|field| json::find_member(bytes, at, field).and_then(|v| count_at(bytes, v)));
        Some(Self {
            input_tokens: input,
            cache_creation_input_tokens: creation,
            cache_read_input_tokens: read,
            output_tokens: output,
        })
    }

    /// Takes every count `later` reports: the totals of a later event.
    ///
    /// ```
    /// # use tower_overload::usage::Usage;
    /// let mut usage = Usage { input_tokens: Some(3), ..Usage::default() };
    /// usage.update(Usage { output_tokens: Some(9), ..Usage::default() });
    /// assert_eq!((usage.input_tokens, usage.output_tokens), (Some(3), Some(9)));
    /// ```
    pub fn update(&mut self, later: Usage) {
        let counts = [
            (&mut self.input_tokens, later.input_tokens),
            (
                &mut self.cache_creation_input_tokens,
                later.cache_creation_input_tokens,
            ),
            (
                &mut self.cache_read_input_tokens,
                later.cache_read_input_tokens,
            ),
            (&mut self.output_tokens, later.output_tokens),
        ];
        for (count, later) in counts {
            if later.is_some() {
                *count = later;
            }
        }
    }

    /// What the input-tokens-per-minute limit counts: input tokens and
    /// cache writes, not cache reads.
    ///
    /// ```
    /// # use tower_overload::usage::Usage;
    /// let usage = Usage { input_tokens: Some(10), cache_read_input_tokens: Some(5000), ..Usage::default() };
    /// assert_eq!(usage.input_charged(), 10);
    /// ```
    pub fn input_charged(&self) -> u64 {
        self.input_tokens
            .unwrap_or(0)
            .saturating_add(self.cache_creation_input_tokens.unwrap_or(0))
    }

    /// All input the model read, cached or not: what the request's size
    /// stands for, and so what a bytes-per-token estimate is calibrated on.
    ///
    /// ```
    /// # use tower_overload::usage::Usage;
    /// let usage = Usage { input_tokens: Some(10), cache_read_input_tokens: Some(5000), ..Usage::default() };
    /// assert_eq!(usage.input_total(), 5010);
    /// ```
    pub fn input_total(&self) -> u64 {
        self.input_charged()
            .saturating_add(self.cache_read_input_tokens.unwrap_or(0))
    }
}

/// A non-negative integer count at `at`: digits only, as the API writes
/// counts (no sign, fraction or exponent), at most `u64::MAX`.
pub(crate) fn count_at(bytes: &[u8], at: usize) -> Option<u64> {
    let digits = bytes.get(at..)?;
    let len = digits.iter().take_while(|c| c.is_ascii_digit()).count();
    if len == 0 || (len > 1 && digits[0] == b'0') {
        return None;
    }
    // The number must end there: `12.5` or `1e3` is not a count.
    if matches!(digits.get(len), Some(b'.' | b'e' | b'E')) {
        return None;
    }
    digits[..len].iter().try_fold(0u64, |total, &digit| {
        total.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
    })
}

/// The longest SSE line kept while it arrives in pieces; a longer one
/// (a huge text delta) is skipped, as it cannot carry the usage events.
const MAX_LINE: usize = 64 * 1024;

/// How much of the end of a JSON body is kept to find its `usage`, which
/// the API writes last.
const TAIL: usize = 4 * 1024;

/// Reads the usage a response body reports as its chunks pass (the JSON
/// `usage`, or a stream's `message_start` and `message_delta` events),
/// without keeping the body: a stream's current line, or a JSON body's
/// last few KiB. Also notes a stream's first content event. Shared by the
/// pacing layer (which settles reservations with it) and the metrics.
#[cfg_attr(
    not(all(feature = "pacing", feature = "metrics", feature = "retry")),
    allow(dead_code)
)]
#[derive(Debug)]
pub(crate) struct UsageReader {
    reader: Reader,
    /// The body was read to its end: what it reported is complete.
    ended: bool,
}

#[derive(Debug)]
enum Reader {
    Sse {
        /// The start of a line whose end has not arrived yet.
        line: Vec<u8>,
        /// Skipping to the end of a line that cannot be a usage event.
        skipping: bool,
        usage: Option<Usage>,
        /// A content event (`content_block_delta`) was seen.
        content: bool,
    },
    Json {
        tail: Vec<u8>,
        /// Bytes before `tail` were dropped.
        cut: bool,
    },
}

#[cfg_attr(
    not(all(feature = "pacing", feature = "metrics", feature = "retry")),
    allow(dead_code)
)]
impl UsageReader {
    pub(crate) fn new(event_stream: bool) -> Self {
        let reader = if event_stream {
            Reader::Sse {
                line: Vec::new(),
                skipping: false,
                usage: None,
                content: false,
            }
        } else {
            Reader::Json {
                tail: Vec::new(),
                cut: false,
            }
        };
        Self {
            reader,
            ended: false,
        }
    }

    pub(crate) fn feed(&mut self, chunk: &[u8]) {
        match &mut self.reader {
            Reader::Sse {
                line,
                skipping,
                usage,
                content,
            } => feed_sse(line, skipping, usage, content, chunk),
            Reader::Json { tail, cut } => {
                tail.extend_from_slice(chunk);
                // Trimmed in steps of at least TAIL bytes, so each byte is
                // moved a bounded number of times.
                if tail.len() > 2 * TAIL {
                    tail.drain(..tail.len() - TAIL);
                    *cut = true;
                }
            }
        }
    }

    /// The body was read to its end.
    pub(crate) fn end(&mut self) {
        self.ended = true;
    }

    /// Whether the body was read to its end.
    pub(crate) fn ended(&self) -> bool {
        self.ended
    }

    /// Whether a stream's first content event has passed.
    pub(crate) fn content_started(&self) -> bool {
        matches!(self.reader, Reader::Sse { content: true, .. })
    }

    /// What the response reported. A JSON body counts only when read to
    /// its end; of a stream dropped early, only the input counts (the
    /// output so far is not what the call will have generated).
    pub(crate) fn usage(&self) -> Option<Usage> {
        match &self.reader {
            Reader::Sse { usage, .. } => {
                let mut usage = (*usage)?;
                if !self.ended {
                    usage.output_tokens = None;
                }
                Some(usage)
            }
            Reader::Json { .. } if !self.ended => None,
            Reader::Json { tail, cut: false } => Usage::from_message(tail),
            Reader::Json { tail, cut: true } => {
                let at = memchr::memmem::rfind(tail, b"\"usage\":")?;
                Usage::object_at(tail, at + b"\"usage\":".len())
            }
        }
    }
}

fn feed_sse(
    line: &mut Vec<u8>,
    skipping: &mut bool,
    usage: &mut Option<Usage>,
    content: &mut bool,
    mut chunk: &[u8],
) {
    while !chunk.is_empty() {
        match memchr::memchr(b'\n', chunk) {
            Some(at) => {
                let part = &chunk[..at];
                chunk = &chunk[at + 1..];
                if *skipping {
                    *skipping = false;
                } else if line.is_empty() {
                    read_line(part, usage, content);
                } else {
                    line.extend_from_slice(part);
                    read_line(line, usage, content);
                }
                line.clear();
            }
            None => {
                if !*skipping {
                    line.extend_from_slice(chunk);
                    let start = &line[..line.len().min(5)];
                    if line.len() > MAX_LINE || !b"data:".starts_with(start) {
                        *skipping = true;
                        line.clear();
                    }
                }
                return;
            }
        }
    }
}

fn read_line(line: &[u8], usage: &mut Option<Usage>, content: &mut bool) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(data) = line.strip_prefix(b"data:") else {
        return;
    };
    // The first content event, looked for until seen (its `type` comes
    // first in the API's events, so the search stops early).
    if !*content && memchr::memmem::find(data, b"\"content_block_delta\"").is_some() {
        *content = true;
    }
    // Most events carry no usage: skip them without a look at their JSON.
    if memchr::memmem::find(data, b"usage").is_none() {
        return;
    }
    let data = data.strip_prefix(b" ").unwrap_or(data);
    if let Some(reported) = Usage::from_event(data) {
        usage.get_or_insert_default().update(reported);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sse(chunks: &[&[u8]]) -> Option<Usage> {
        let mut reader = UsageReader::new(true);
        for chunk in chunks {
            reader.feed(chunk);
        }
        reader.end();
        reader.usage()
    }

    #[test]
    fn usage_events_split_anywhere_are_read() {
        let stream = b"event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"cache_read_input_tokens\":100,\"output_tokens\":1}}}\r\n\r\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"usage\"}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n";
        for split in 0..stream.len() {
            for second in split..stream.len() {
                let usage = sse(&[&stream[..split], &stream[split..second], &stream[second..]])
                    .unwrap_or_else(|| panic!("split at {split}, {second}"));
                assert_eq!(
                    (
                        usage.input_charged(),
                        usage.input_total(),
                        usage.output_tokens
                    ),
                    (25, 125, Some(15)),
                    "split at {split}, {second}"
                );
            }
        }
    }

    #[test]
    fn the_first_content_event_is_noted_once_it_passes() {
        let mut reader = UsageReader::new(true);
        reader.feed(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3}}}\n\n");
        assert!(!reader.content_started());
        reader.feed(b"event: content_block_delta\ndata: {\"type\":\"content_block_del");
        assert!(!reader.content_started(), "not before the line ends");
        reader.feed(b"ta\",\"delta\":{\"text\":\"Hi\"}}\n\n");
        assert!(reader.content_started());
    }

    #[test]
    fn an_overlong_line_is_skipped_and_the_next_read() {
        let mut long = b"data: {\"type\":\"content_block_delta\",\"text\":\"".to_vec();
        long.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        let delta = b"\"}\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":7}}\n";
        let usage = sse(&[&long[..1000], &long[1000..], delta]).unwrap();
        assert_eq!(usage.output_tokens, Some(7));
        // A usage-looking line that is not `data:` is not an event.
        assert_eq!(
            sse(&[b"id: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":7}}\n"]),
            None
        );
    }

    #[test]
    fn counts_are_plain_integers() {
        let cases: &[(&[u8], Option<u64>)] = &[
            (b"0", Some(0)),
            (b"42,", Some(42)),
            (b"42}", Some(42)),
            (b"18446744073709551615", Some(u64::MAX)),
            (b"18446744073709551616", None),
            (b"-1", None),
            (b"1.5", None),
            (b"1e3", None),
            (b"01", None),
            (b"\"5\"", None),
            (b"", None),
        ];
        for (input, expected) in cases {
            assert_eq!(
                count_at(input, 0),
                *expected,
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn usage_inside_content_is_not_the_usage() {
        let body = br#"{"content":[{"type":"text","text":"{\"usage\":{\"input_tokens\":999}}"}],"metadata":{"usage":{"input_tokens":7}},"usage":{"input_tokens":3,"output_tokens":4}}"#;
        let usage = Usage::from_message(body).unwrap();
        assert_eq!(
            (usage.input_tokens, usage.output_tokens),
            (Some(3), Some(4))
        );
        assert_eq!(usage.cache_read_input_tokens, None);
    }

    #[test]
    fn an_object_after_whitespace_is_read() {
        let tail = b"ng\"}],\"usage\": \n {\"input_tokens\":9,\"output_tokens\":2}}";
        let at = tail.windows(8).position(|w| w == b"\"usage\":").unwrap() + 8;
        let usage = Usage::object_at(tail, at).unwrap();
        assert_eq!(
            (usage.input_tokens, usage.output_tokens),
            (Some(9), Some(2))
        );
        assert_eq!(Usage::object_at(tail, tail.len()), None);
        assert_eq!(Usage::object_at(b"  12", 0), None);
    }

    #[test]
    fn events_other_than_start_and_delta_report_nothing() {
        for data in [
            &br#"{"type":"content_block_delta","usage":{"output_tokens":3}}"#[..],
            br#"{"type":"error","error":{"type":"overloaded_error"}}"#,
            br#"{"usage":{"output_tokens":3}}"#,
            b"[1,2]",
        ] {
            assert_eq!(Usage::from_event(data), None);
        }
    }

    proptest! {
        /// Agrees with serde_json on the counts of any `usage` object whose
        /// counts are integers or other JSON values.
        #[test]
        fn agrees_with_serde_json(
            counts in proptest::collection::vec(proptest::option::of(0u64..u64::MAX), 4),
            noise in "[a-z ]{0,20}",
            odd in proptest::option::of(prop_oneof![Just("1.5"), Just("-3"), Just("\"7\""), Just("null")]),
        ) {
            let mut fields: Vec<String> = FIELDS
                .iter()
                .zip(&counts)
                .filter_map(|(field, count)| count.map(|c| format!("\"{field}\":{c}")))
                .collect();
            if let Some(odd) = odd {
                fields.push(format!("\"service_tier\":{odd}"));
            }
            let body = format!(
                r#"{{"content":[{{"type":"text","text":"{noise}"}}],"usage":{{{}}}}}"#,
                fields.join(",")
            );
            let value: serde_json::Value = serde_json::from_str(&body).unwrap();
            let usage = Usage::from_message(body.as_bytes()).unwrap();
            let read = |field: &str| value["usage"].get(field).and_then(serde_json::Value::as_u64);
            prop_assert_eq!(usage.input_tokens, read("input_tokens"));
            prop_assert_eq!(usage.cache_creation_input_tokens, read("cache_creation_input_tokens"));
            prop_assert_eq!(usage.cache_read_input_tokens, read("cache_read_input_tokens"));
            prop_assert_eq!(usage.output_tokens, read("output_tokens"));
        }
    }
}
