//! A small JSON scanner: enough to walk the members of one object and skip
//! values without building a tree.
//!
//! It is not a validator. Members of the object being walked are checked
//! strictly (key, colon, value, comma); values that are skipped are checked
//! only for matching brackets and terminated strings, which is what keeps a
//! scan linear and lets it stop early. Nesting is tracked with a fixed bit
//! stack, never recursion, so hostile depth cannot overflow the call stack.

use std::borrow::Cow;

/// Deepest nesting a skipped value may have; deeper input is treated as broken.
pub(crate) const MAX_DEPTH: usize = 1024;

const LANES: u64 = 0x0101_0101_0101_0101;
const HIGH_BITS: u64 = 0x8080_8080_8080_8080;

#[inline]
pub(crate) fn skip_ws(bytes: &[u8], mut at: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = bytes.get(at) {
        at += 1;
    }
    at
}

/// Marks, in the high bit of each lane, the bytes of `word` equal to `byte`.
/// Only the lowest mark is exact (a borrow can set marks above it), which is
/// all a search for the first match needs.
#[inline(always)]
fn lanes_equal(word: u64, byte: u8) -> u64 {
    let x = word ^ (LANES * u64::from(byte));
    x.wrapping_sub(LANES) & !x & HIGH_BITS
}

/// The end of a string whose opening quote is at `at - 1`: the index past
/// its closing quote, and whether it holds escapes.
///
/// Every scan spends most of its time here (LLM bodies are mostly strings,
/// long texts and many short keys), so it loads one word per eight bytes and
/// does no slicing per call.
///
/// Short strings (keys, roles, model names) end within the first two words;
/// past them the string is long text, and `memchr2` takes over with SIMD.
#[inline(always)]
fn string_end(bytes: &[u8], mut at: usize) -> Option<(usize, bool)> {
    let mut escaped = false;
    loop {
        let hit = 'found: {
            for _ in 0..2 {
                let Some(chunk) = bytes.get(at..at + 8) else {
                    let tail = bytes.get(at..)?;
                    break 'found at + memchr::memchr2(b'"', b'\\', tail)?;
                };
                let mut word = [0u8; 8];
                word.copy_from_slice(chunk);
                let word = u64::from_le_bytes(word);
                let hits = lanes_equal(word, b'"') | lanes_equal(word, b'\\');
                if hits != 0 {
                    break 'found at + (hits.trailing_zeros() / 8) as usize;
                }
                at += 8;
            }
            at + memchr::memchr2(b'"', b'\\', bytes.get(at..)?)?
        };
        if bytes[hit] == b'"' {
            return Some((hit + 1, escaped));
        }
        escaped = true;
        at = hit + 2;
    }
}

/// A JSON string found in the input: `raw` is the text between the quotes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawString<'a> {
    pub(crate) raw: &'a [u8],
    pub(crate) escaped: bool,
}

impl<'a> RawString<'a> {
    /// Whether the decoded string equals `expected`.
    pub(crate) fn eq_str(&self, expected: &str) -> bool {
        if !self.escaped {
            return self.raw == expected.as_bytes();
        }
        decode(self.raw).is_some_and(|decoded| decoded == expected)
    }

    /// The decoded string; borrowed unless escapes force a copy. `None`
    /// for a raw control character, which JSON forbids in a string (the
    /// scan to its end looks for quotes and backslashes only).
    pub(crate) fn decode(&self) -> Option<Cow<'a, str>> {
        if self.escaped {
            decode(self.raw).map(Cow::Owned)
        } else if self.raw.iter().any(|&c| c < 0x20) {
            None
        } else {
            std::str::from_utf8(self.raw).ok().map(Cow::Borrowed)
        }
    }
}

/// `at` points at an opening quote; returns the string and the index past its closing quote.
#[inline]
pub(crate) fn scan_string(bytes: &[u8], at: usize) -> Option<(RawString<'_>, usize)> {
    let (end, escaped) = string_end(bytes, at + 1)?;
    let raw = &bytes[at + 1..end - 1];
    Some((RawString { raw, escaped }, end))
}

/// Skips one value starting at `at` (no leading whitespace); returns the index past it.
pub(crate) fn skip_value(bytes: &[u8], at: usize) -> Option<usize> {
    match *bytes.get(at)? {
        b'"' => scan_string(bytes, at).map(|(_, end)| end),
        b'{' | b'[' => skip_container(bytes, at),
        _ => skip_scalar(bytes, at),
    }
}

fn skip_scalar(bytes: &[u8], at: usize) -> Option<usize> {
    let rest = &bytes[at..];
    let len = rest
        .iter()
        .position(|c| !matches!(c, b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' | b'+' | b'-' | b'.'))
        .unwrap_or(rest.len());
    let token = &rest[..len];
    let valid = match token.first()? {
        b't' => token == b"true",
        b'f' => token == b"false",
        b'n' => token == b"null",
        b'-' | b'0'..=b'9' => token[token.len() - 1].is_ascii_digit(),
        _ => false,
    };
    valid.then_some(at + len)
}

const STRUCTURAL: [bool; 256] = {
    let mut table = [false; 256];
    table[b'"' as usize] = true;
    table[b'{' as usize] = true;
    table[b'}' as usize] = true;
    table[b'[' as usize] = true;
    table[b']' as usize] = true;
    table
};

fn skip_container(bytes: &[u8], at: usize) -> Option<usize> {
    // One bit per open level: set for an object, clear for an array.
    let mut kinds = [0u64; MAX_DEPTH / 64];
    let mut depth = 0usize;
    let mut cursor = at;
    loop {
        // Numbers, literals, commas and whitespace between strings: skip them
        // without going through the match below.
        while let Some(&c) = bytes.get(cursor) {
            if STRUCTURAL[usize::from(c)] {
                break;
            }
            cursor += 1;
        }
        match *bytes.get(cursor)? {
            b'"' => {
                cursor = string_end(bytes, cursor + 1)?.0;
                continue;
            }
            open @ (b'{' | b'[') => {
                if depth == MAX_DEPTH {
                    return None;
                }
                let (word, bit) = (depth / 64, depth % 64);
                if open == b'{' {
                    kinds[word] |= 1 << bit;
                } else {
                    kinds[word] &= !(1 << bit);
                }
                depth += 1;
            }
            close @ (b'}' | b']') => {
                depth -= 1;
                let is_object = kinds[depth / 64] & (1 << (depth % 64)) != 0;
                if is_object != (close == b'}') {
                    return None;
                }
                if depth == 0 {
                    return Some(cursor + 1);
                }
            }
            _ => {}
        }
        cursor += 1;
    }
}

/// A member's key at `cursor` (its opening quote) and where its value
/// starts, past the colon and any whitespace.
fn member_head(bytes: &[u8], cursor: usize) -> Option<(RawString<'_>, usize)> {
    if *bytes.get(cursor)? != b'"' {
        return None;
    }
    let (name, after_name) = scan_string(bytes, cursor)?;
    let colon = skip_ws(bytes, after_name);
    if *bytes.get(colon)? != b':' {
        return None;
    }
    Some((name, skip_ws(bytes, colon + 1)))
}

/// Walks the members of the object starting at `at` (whitespace allowed before it)
/// and returns where the value of the first member named `key` starts.
///
/// `None` when the input is not an object, the key is absent, or the object
/// is broken before the key is found. Nothing after the key is read, so a
/// truncated prefix of a body still answers for the members it holds.
pub(crate) fn find_member(bytes: &[u8], at: usize, key: &str) -> Option<usize> {
    let mut cursor = skip_ws(bytes, at);
    if *bytes.get(cursor)? != b'{' {
        return None;
    }
    cursor = skip_ws(bytes, cursor + 1);
    if *bytes.get(cursor)? == b'}' {
        return None;
    }
    loop {
        let (name, start) = member_head(bytes, cursor)?;
        if name.eq_str(key) {
            return Some(start);
        }
        cursor = skip_ws(bytes, skip_value(bytes, start)?);
        match *bytes.get(cursor)? {
            b',' => cursor = skip_ws(bytes, cursor + 1),
            _ => return None,
        }
    }
}

/// The members of the JSON document `bytes`, which must be one object, in order.
///
/// Yields each member's key and the span of its value. Unlike [`find_member`]
/// it reads to the end: [`Members::complete`] then says whether the whole
/// document was one well-formed object followed by whitespace only, which is
/// what a caller needs before trusting that it saw every member (a parser
/// such as serde_json rejects anything else, and keeps the last duplicate).
pub(crate) struct Members<'a> {
    bytes: &'a [u8],
    cursor: usize,
    state: MembersState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum MembersState {
    First,
    Next,
    Complete,
    Broken,
}

impl<'a> Members<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self {
            bytes,
            cursor: 0,
            state: MembersState::First,
        }
    }

    /// Whether the walk reached the closing brace and nothing but whitespace followed.
    pub(crate) fn complete(&self) -> bool {
        self.state == MembersState::Complete
    }

    fn step(&mut self) -> Option<(RawString<'a>, usize, usize)> {
        let bytes = self.bytes;
        let mut cursor = skip_ws(bytes, self.cursor);
        if self.state == MembersState::First {
            if *bytes.get(cursor)? != b'{' {
                return None;
            }
            cursor = skip_ws(bytes, cursor + 1);
            if *bytes.get(cursor)? == b'}' {
                self.finish(cursor + 1);
                return None;
            }
        } else {
            match *bytes.get(cursor)? {
                b',' => cursor = skip_ws(bytes, cursor + 1),
                b'}' => {
                    self.finish(cursor + 1);
                    return None;
                }
                _ => return None,
            }
        }
        let (name, start) = member_head(bytes, cursor)?;
        let end = skip_value(bytes, start)?;
        self.cursor = end;
        self.state = MembersState::Next;
        Some((name, start, end))
    }

    fn finish(&mut self, after_brace: usize) {
        self.state = if skip_ws(self.bytes, after_brace) == self.bytes.len() {
            MembersState::Complete
        } else {
            MembersState::Broken
        };
    }
}

impl<'a> Iterator for Members<'a> {
    type Item = (RawString<'a>, usize, usize);

    fn next(&mut self) -> Option<Self::Item> {
        if matches!(self.state, MembersState::Complete | MembersState::Broken) {
            return None;
        }
        let item = self.step();
        if item.is_none() && self.state != MembersState::Complete {
            self.state = MembersState::Broken;
        }
        item
    }
}

/// Where the value of the last top-level member named `key` starts: the one
/// a parser keeping the last duplicate (serde_json, the API) reads. `None`
/// when there is none or `bytes` is not one well-formed object.
pub(crate) fn last_member(bytes: &[u8], key: &str) -> Option<usize> {
    last_members(bytes, [key])?[0]
}

/// [`last_member`] for several keys in one walk of the object: the start of
/// each key's last value. `None` when `bytes` is not one well-formed object.
pub(crate) fn last_members<const N: usize>(
    bytes: &[u8],
    keys: [&str; N],
) -> Option<[Option<usize>; N]> {
    let mut found = [None; N];
    let mut members = Members::new(bytes);
    for (name, start, _) in members.by_ref() {
        if let Some(slot) = keys.iter().position(|key| name.eq_str(key)) {
            found[slot] = Some(start);
        }
    }
    members.complete().then_some(found)
}

/// The string starting at `at`, if the value there is a string, and the index past it.
pub(crate) fn string_at(bytes: &[u8], at: usize) -> Option<(RawString<'_>, usize)> {
    if bytes.get(at) != Some(&b'"') {
        return None;
    }
    scan_string(bytes, at)
}

/// Decodes the text between a string's quotes.
pub(crate) fn decode(raw: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(raw.len());
    let mut cursor = 0;
    while cursor < raw.len() {
        let c = raw[cursor];
        if c < 0x20 {
            // JSON allows control characters in a string only escaped.
            return None;
        }
        if c != b'\\' {
            out.push(c);
            cursor += 1;
            continue;
        }
        let escape = *raw.get(cursor + 1)?;
        cursor += 2;
        let simple = match escape {
            b'"' => b'"',
            b'\\' => b'\\',
            b'/' => b'/',
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                let high = hex4(raw.get(cursor..cursor + 4)?)?;
                cursor += 4;
                let code = if (0xD800..0xDC00).contains(&high) {
                    if raw.get(cursor..cursor + 2)? != b"\\u" {
                        return None;
                    }
                    let low = hex4(raw.get(cursor + 2..cursor + 6)?)?;
                    if !(0xDC00..0xE000).contains(&low) {
                        return None;
                    }
                    cursor += 6;
                    0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00)
                } else {
                    high
                };
                let ch = char::from_u32(code)?;
                let mut buf = [0u8; 4];
                out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                continue;
            }
            _ => return None,
        };
        out.push(simple);
    }
    String::from_utf8(out).ok()
}

fn hex4(digits: &[u8]) -> Option<u32> {
    digits.iter().try_fold(0u32, |acc, &d| {
        let v = (d as char).to_digit(16)?;
        Some(acc * 16 + v)
    })
}

/// Appends `value` to `out` as the body of a JSON string (no quotes).
pub(crate) fn escape_into(value: &str, out: &mut Vec<u8>) {
    for &c in value.as_bytes() {
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x00..=0x1f => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(c >> 4)]);
                out.push(HEX[usize::from(c & 0xf)]);
            }
            _ => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_string_ends_in_every_lane() {
        for len in 0..40 {
            for pos in 0..len {
                let mut bytes = vec![b'a'; len];
                bytes[pos] = b'"';
                assert_eq!(
                    string_end(&bytes, 0),
                    Some((pos + 1, false)),
                    "len {len} pos {pos}"
                );
                if pos + 2 < len {
                    // An escaped quote before the real one.
                    bytes[pos] = b'\\';
                    bytes[pos + 1] = b'"';
                    bytes[len - 1] = b'"';
                    assert_eq!(
                        string_end(&bytes, 0),
                        Some((len, true)),
                        "len {len} pos {pos}"
                    );
                }
            }
            assert_eq!(string_end(&vec![b'x'; len], 0), None);
        }
        // Bytes that differ from the needles by one bit must not match.
        let near: Vec<u8> = (0u8..=255).filter(|&c| c != b'"' && c != b'\\').collect();
        assert_eq!(string_end(&near, 0), None);
        assert_eq!(string_end(b"ab\\", 0), None, "an escape at the very end");
    }

    #[test]
    fn skips_values() {
        let cases: &[(&str, Option<usize>)] = &[
            (r#""abc" rest"#, Some(5)),
            (r#""a\"b""#, Some(6)),
            (r#"{"a":[1,{"b":"]"}]} x"#, Some(19)),
            ("[[[]]]", Some(6)),
            ("true,", Some(4)),
            ("-12.5e3]", Some(7)),
            ("nul", None),
            ("[}", None),
            ("{]", None),
            (r#""unterminated"#, None),
            (r#""ends in backslash\"#, None),
            ("[1,2", None),
            ("", None),
            ("@", None),
            ("1.", None),
        ];
        for (input, expected) in cases {
            assert_eq!(skip_value(input.as_bytes(), 0), *expected, "{input}");
        }
    }

    #[test]
    fn deep_nesting_is_bounded_not_recursive() {
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        assert_eq!(skip_value(deep.as_bytes(), 0), None);
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert_eq!(skip_value(ok.as_bytes(), 0), Some(ok.len()));
    }

    #[test]
    fn decodes_escapes() {
        assert_eq!(
            decode(br#"a\"b\\c\/d\n\u00e9\ud83d\ude00"#).as_deref(),
            Some("a\"b\\c/d\né😀")
        );
        assert_eq!(decode(br"\ud83d"), None, "lone high surrogate");
        assert_eq!(decode(br"\udc00"), None, "lone low surrogate");
        assert_eq!(decode(br"\x"), None);
        assert_eq!(decode(br"\u12"), None);
        assert_eq!(decode(b"\xff"), None, "invalid UTF-8");
        assert_eq!(
            decode(b"a\nb"),
            None,
            "a raw control character (breaker finding 3)"
        );
        assert_eq!(decode(b"\\n\t"), None, "escaped, then raw");
    }

    #[test]
    fn escape_round_trips() {
        let value = "a\"b\\c\n\u{1}é😀";
        let mut out = Vec::new();
        escape_into(value, &mut out);
        assert_eq!(decode(&out).as_deref(), Some(value));
    }

    #[test]
    fn finds_members_strictly() {
        let body = br#" { "a" : 1 , "b": {"model": "x"}, "model" : "m" } "#;
        let start = find_member(body, 0, "model").unwrap();
        assert_eq!(string_at(body, start).unwrap().0.raw, b"m");
        assert_eq!(
            find_member(br#"{"model": "m""#, 0, "model"),
            Some(10),
            "truncated after the key"
        );
        assert_eq!(find_member(br#"{"a" 1, "model": "m"}"#, 0, "model"), None);
        assert_eq!(find_member(br#"{"a": 1 "model": "m"}"#, 0, "model"), None);
        assert_eq!(find_member(br#"["model", "m"]"#, 0, "model"), None);
        assert_eq!(find_member(b"{}", 0, "model"), None);
    }
}
