//! Locating and substituting the top-level `"model"` member of a JSON body.
//!
//! [`locate`] makes one validating pass over the body and returns where every top-level `"model"`
//! value sits ([`ModelSlots`]). [`ModelSlots::splice`] then builds the body for one target as a list
//! of [`Bytes`] slices of the original buffer around the target's pre-escaped model literal, so no
//! unchanged byte is copied and everything outside the model value stays byte-identical.
//!
//! The scanner is purpose-built: one validating pass, iterative (a bit stack, not recursion, so
//! nesting depth cannot overflow the stack), skipping string contents eight bytes at a time. It
//! was chosen over serde_json's borrowed `RawValue` spans by measurement (`benches/substitute.rs`,
//! `scripts/substitute-instructions.sh`).

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use crate::target::ModelLiteral;

/// Where the top-level `"model"` members of a JSON object body are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ModelSlots {
    /// Byte ranges of every top-level `"model"` value, in order.
    Replace(Ranges),
    /// The object has no `"model"` member: one is inserted right after the opening brace at
    /// `brace`; `empty` tells whether the object has no members at all (then no comma follows).
    Insert { brace: usize, empty: bool },
}

/// One or more byte ranges, allocation-free for the usual single range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ranges {
    first: Range<usize>,
    more: Vec<Range<usize>>,
}

impl Ranges {
    fn iter(&self) -> impl Iterator<Item = &Range<usize>> {
        std::iter::once(&self.first).chain(self.more.iter())
    }

    pub(crate) fn first(&self) -> &Range<usize> {
        &self.first
    }

    /// The substituted body in one buffer: for bodies with many top-level `"model"` members,
    /// where slices would cost more than the copy.
    fn joined(&self, body: &Bytes, model: &ModelLiteral) -> Bytes {
        let removed: usize = self.iter().map(|r| r.len()).sum();
        let added = model.value.len() * (self.more.len() + 1);
        let mut out = Vec::with_capacity(body.len() - removed + added);
        let mut at = 0;
        for r in self.iter() {
            out.extend_from_slice(&body[at..r.start]);
            out.extend_from_slice(&model.value);
            at = r.end;
        }
        out.extend_from_slice(&body[at..]);
        Bytes::from(out)
    }
}

/// Past this many repeated top-level `"model"` members, the body is substituted into one buffer
/// rather than sent as slices (a body of a million `"model":0,` members must not become two
/// million slices).
const MAX_SLICED_SLOTS: usize = 8;

/// Why a body is not a JSON object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JsonError {
    /// Byte offset where the problem was found.
    pub(crate) offset: usize,
    /// What was wrong, in a few words.
    pub(crate) reason: &'static str,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.reason, self.offset)
    }
}

impl std::error::Error for JsonError {}

impl ModelSlots {
    /// The body for one target: slices of `body` around `model`'s literal, empty slices left out.
    pub(crate) fn splice(&self, body: &Bytes, model: &ModelLiteral) -> Vec<Bytes> {
        if let ModelSlots::Replace(ranges) = self {
            if ranges.more.len() >= MAX_SLICED_SLOTS {
                return vec![ranges.joined(body, model)];
            }
        }
        let mut out = Vec::with_capacity(3);
        let mut push = |b: Bytes| {
            if !b.is_empty() {
                out.push(b)
            }
        };
        match self {
            ModelSlots::Replace(ranges) => {
                let mut at = 0;
                for r in ranges.iter() {
                    push(body.slice(at..r.start));
                    push(model.value.clone());
                    at = r.end;
                }
                push(body.slice(at..));
            }
            ModelSlots::Insert { brace, empty } => {
                push(body.slice(..brace + 1));
                let member = if *empty {
                    model.member.slice(..model.member.len() - 1)
                } else {
                    model.member.clone()
                };
                push(member);
                push(body.slice(brace + 1..));
            }
        }
        out
    }
}

/// Validates `buf` as one JSON object and finds its top-level `"model"` members.
pub(crate) fn locate(buf: &[u8]) -> Result<ModelSlots, JsonError> {
    // Outside strings the grammar admits ASCII only; strings check their own UTF-8.
    let mut s = Scanner { buf, pos: 0 };
    s.skip_ws();
    match s.peek() {
        Some(b'{') => {}
        None => return Err(s.error("empty body where a JSON object was expected")),
        Some(_) => {
            let start = s.pos;
            s.value()?;
            s.end()?;
            return Err(JsonError {
                offset: start,
                reason: "the JSON body is not an object",
            });
        }
    }
    let brace = s.pos;
    s.pos += 1;
    s.skip_ws();
    let mut first: Option<Range<usize>> = None;
    let mut more = Vec::new();
    let empty = s.peek() == Some(b'}');
    if empty {
        s.pos += 1;
    } else {
        loop {
            let is_model = s.key()?;
            s.skip_ws();
            let start = s.pos;
            s.value()?;
            if is_model {
                match first {
                    None => first = Some(start..s.pos),
                    Some(_) => more.push(start..s.pos),
                }
            }
            s.skip_ws();
            match s.peek() {
                Some(b',') => {
                    s.pos += 1;
                    s.skip_ws();
                }
                Some(b'}') => {
                    s.pos += 1;
                    break;
                }
                Some(_) => return Err(s.error("expected ',' or '}' after an object member")),
                None => return Err(s.error("unexpected end of JSON")),
            }
        }
    }
    s.end()?;
    Ok(match first {
        Some(first) => ModelSlots::Replace(Ranges { first, more }),
        None => ModelSlots::Insert { brace, empty },
    })
}

struct Scanner<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// A stack of container kinds (`true` = object), one bit per level; allocates only past 64 levels.
struct BitStack {
    depth: usize,
    head: u64,
    spill: Vec<u64>,
}

impl BitStack {
    fn new() -> Self {
        BitStack {
            depth: 0,
            head: 0,
            spill: Vec::new(),
        }
    }

    fn push(&mut self, object: bool) {
        let (word, bit) = (self.depth / 64, self.depth % 64);
        let slot = if word == 0 {
            &mut self.head
        } else {
            if self.spill.len() < word {
                self.spill.push(0);
            }
            &mut self.spill[word - 1]
        };
        if object {
            *slot |= 1 << bit;
        } else {
            *slot &= !(1 << bit);
        }
        self.depth += 1;
    }

    fn top(&self) -> Option<bool> {
        let d = self.depth.checked_sub(1)?;
        let (word, bit) = (d / 64, d % 64);
        let w = if word == 0 {
            self.head
        } else {
            self.spill[word - 1]
        };
        Some(w & (1 << bit) != 0)
    }

    fn pop(&mut self) {
        self.depth -= 1;
    }
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// A mask with the high bit set in every byte of `w` that is `"`, `\` or a control character.
/// Bits can be set falsely only above a true one (borrows propagate upwards), so the lowest set
/// bit is exact.
#[inline]
fn attention(w: u64) -> u64 {
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    let quote = has_zero(w ^ (ONES * b'"' as u64));
    let backslash = has_zero(w ^ (ONES * b'\\' as u64));
    let control = w.wrapping_sub(ONES * 0x20) & !w & HIGHS;
    quote | backslash | control
}

/// The position of the first `"`, `\` or control character at or after `pos` (or the end),
/// skipping plain bytes eight at a time; `high` collects the high bits seen.
#[inline(always)]
fn skip_plain(buf: &[u8], mut pos: usize, high: &mut u64) -> usize {
    while let Some(chunk) = buf.get(pos..pos + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let word = u64::from_le_bytes(word);
        *high |= word;
        let mask = attention(word);
        if mask != 0 {
            return pos + (mask.trailing_zeros() / 8) as usize;
        }
        pos += 8;
    }
    pos
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    fn error(&self, reason: &'static str) -> JsonError {
        JsonError {
            offset: self.pos,
            reason,
        }
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn end(&mut self) -> Result<(), JsonError> {
        self.skip_ws();
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(self.error("trailing characters after the JSON value"))
        }
    }

    /// An object key and its colon; returns whether the key is `model`.
    #[inline(always)]
    fn key(&mut self) -> Result<bool, JsonError> {
        if self.peek() != Some(b'"') {
            return Err(self.error("expected a string key"));
        }
        let start = self.pos;
        let escaped = self.string()?;
        let raw = &self.buf[start..self.pos];
        let is_model = if escaped {
            serde_json::from_slice::<String>(raw).is_ok_and(|k| k == "model")
        } else {
            raw == b"\"model\""
        };
        self.skip_ws();
        if self.peek() != Some(b':') {
            return Err(self.error("expected ':' after an object key"));
        }
        self.pos += 1;
        Ok(is_model)
    }

    /// A string starting at the opening quote; returns whether it contains escapes.
    #[inline(always)]
    fn string(&mut self) -> Result<bool, JsonError> {
        // The position lives in a register here: this loop is where the scanner spends its time.
        let buf = self.buf;
        let start = self.pos;
        let mut pos = self.pos + 1;
        let mut escaped = false;
        // High bits seen: only strings can hold non-ASCII bytes, so only those strings need
        // UTF-8 validation (a whole-body pass cost more than the scan of an ASCII body).
        let mut high = 0u64;
        loop {
            pos = skip_plain(buf, pos, &mut high);
            match buf.get(pos) {
                Some(b'"') => {
                    if high & HIGHS != 0 {
                        if let Err(e) = std::str::from_utf8(&buf[start + 1..pos]) {
                            return Err(self.error_at(start + 1 + e.valid_up_to(), "invalid UTF-8"));
                        }
                    }
                    self.pos = pos + 1;
                    return Ok(escaped);
                }
                Some(b'\\') => {
                    escaped = true;
                    pos += match buf.get(pos + 1) {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => 2,
                        Some(b'u')
                            if buf
                                .get(pos + 2..pos + 6)
                                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) =>
                        {
                            6
                        }
                        Some(b'u') => return Err(self.error_at(pos, "invalid \\u escape")),
                        _ => return Err(self.error_at(pos, "invalid escape")),
                    };
                }
                Some(b) if *b < 0x20 => {
                    return Err(self.error_at(pos, "control character in a string"))
                }
                Some(b) => {
                    high |= u64::from(*b);
                    pos += 1;
                }
                None => return Err(self.error_at(pos, "unterminated string")),
            }
        }
    }

    fn error_at(&self, offset: usize, reason: &'static str) -> JsonError {
        JsonError { offset, reason }
    }

    fn literal(&mut self, word: &'static [u8]) -> Result<(), JsonError> {
        if self.buf[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(self.error("invalid literal"))
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Result<(), JsonError> {
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.error("invalid number")),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return Err(self.error("invalid number: no digit after '.'"));
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(self.error("invalid number: no digit in the exponent"));
            }
        }
        Ok(())
    }

    /// One complete value of any depth, without recursion.
    fn value(&mut self) -> Result<(), JsonError> {
        let mut stack = BitStack::new();
        'value: loop {
            self.skip_ws();
            match self.peek() {
                Some(b'{') => {
                    self.pos += 1;
                    self.skip_ws();
                    if self.peek() == Some(b'}') {
                        self.pos += 1;
                    } else {
                        stack.push(true);
                        self.key()?;
                        continue 'value;
                    }
                }
                Some(b'[') => {
                    self.pos += 1;
                    self.skip_ws();
                    if self.peek() == Some(b']') {
                        self.pos += 1;
                    } else {
                        stack.push(false);
                        continue 'value;
                    }
                }
                Some(b'"') => {
                    self.string()?;
                }
                Some(b't') => self.literal(b"true")?,
                Some(b'f') => self.literal(b"false")?,
                Some(b'n') => self.literal(b"null")?,
                Some(b'-' | b'0'..=b'9') => self.number()?,
                Some(_) => return Err(self.error("expected a JSON value")),
                None => return Err(self.error("unexpected end of JSON")),
            }
            // A value ended: close every container that ends here.
            loop {
                let Some(in_object) = stack.top() else {
                    return Ok(());
                };
                self.skip_ws();
                match self.peek() {
                    Some(b',') => {
                        self.pos += 1;
                        if in_object {
                            self.skip_ws();
                            self.key()?;
                        }
                        continue 'value;
                    }
                    Some(b'}') if in_object => {
                        self.pos += 1;
                        stack.pop();
                    }
                    Some(b']') if !in_object => {
                        self.pos += 1;
                        stack.pop();
                    }
                    Some(_) if in_object => {
                        return Err(self.error("expected ',' or '}' in an object"))
                    }
                    Some(_) => return Err(self.error("expected ',' or ']' in an array")),
                    None => return Err(self.error("unexpected end of JSON")),
                }
            }
        }
    }
}

/// The model a caller asked for: the first top-level `"model"` value, when it is a string.
pub(crate) fn requested_model(body: &[u8], slots: &ModelSlots) -> Option<Arc<str>> {
    let ModelSlots::Replace(ranges) = slots else {
        return None;
    };
    let raw = &body[ranges.first().clone()];
    match raw {
        // A string without escapes (the usual case) is its own content: `locate` checked its
        // UTF-8, so no decoding and one allocation.
        [b'"', inner @ .., b'"'] if !inner.contains(&b'\\') => {
            std::str::from_utf8(inner).ok().map(Arc::from)
        }
        _ => serde_json::from_slice::<String>(raw).ok().map(Arc::from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(body: &str, model: &str) -> Result<String, JsonError> {
        let bytes = Bytes::copy_from_slice(body.as_bytes());
        let slots = locate(&bytes)?;
        let parts = slots.splice(&bytes, &ModelLiteral::new(model));
        Ok(String::from_utf8(parts.concat()).unwrap())
    }

    #[test]
    fn replaces_the_top_level_model_and_nothing_else() {
        let body = r#"{ "model" : "a",  "messages":[{"model":"keep"}], "n": 1e400 }"#;
        assert_eq!(
            sub(body, "b").unwrap(),
            r#"{ "model" : "b",  "messages":[{"model":"keep"}], "n": 1e400 }"#
        );
    }

    #[test]
    fn replaces_every_top_level_occurrence() {
        assert_eq!(
            sub(r#"{"model":"a","x":0,"model":null}"#, "b").unwrap(),
            r#"{"model":"b","x":0,"model":"b"}"#
        );
    }

    #[test]
    fn recognises_an_escaped_key() {
        assert_eq!(
            sub(r#"{"mod\u0065l":"a"}"#, "b").unwrap(),
            r#"{"mod\u0065l":"b"}"#
        );
    }

    #[test]
    fn many_duplicate_models_are_joined_into_one_buffer() {
        let body = format!("{{{}\"x\":1}}", "\"model\":0,".repeat(1000));
        let bytes = Bytes::from(body.clone());
        let parts = locate(&bytes)
            .unwrap()
            .splice(&bytes, &ModelLiteral::new("m"));
        assert_eq!(parts.len(), 1);
        assert_eq!(
            String::from_utf8(parts.concat()).unwrap(),
            body.replace("\"model\":0", "\"model\":\"m\"")
        );
    }

    #[test]
    fn a_control_character_deep_in_a_long_string_is_found() {
        for at in 0..24 {
            let mut s = String::from("{\"a\":\"");
            s.push_str(&"x".repeat(at));
            s.push('\u{1f}');
            s.push_str(&"y".repeat(30));
            s.push_str("\"}");
            let err = locate(s.as_bytes()).unwrap_err();
            assert_eq!(
                (err.reason, err.offset),
                ("control character in a string", 6 + at)
            );
        }
    }

    #[test]
    fn every_special_byte_is_found_at_every_offset_of_a_block() {
        // Offsets across several words of the word-at-a-time skip and the byte-at-a-time end.
        for at in 0..40 {
            for tail in [0, 3, 20] {
                let body = |special: &str| {
                    format!(
                        "{{\"a\":\"{}{special}{}\"}}",
                        "x".repeat(at),
                        "y".repeat(tail)
                    )
                };
                let err = locate(body("\u{1}").as_bytes()).unwrap_err();
                assert_eq!(
                    (err.reason, err.offset),
                    ("control character in a string", 6 + at)
                );
                assert!(locate(body("\\n").as_bytes()).is_ok(), "escape at {at}");
                let err = locate(body("\\q").as_bytes()).unwrap_err();
                assert_eq!((err.reason, err.offset), ("invalid escape", 6 + at));
                assert!(locate(body("é").as_bytes()).is_ok(), "UTF-8 at {at}");
                let mut bad = body("").into_bytes();
                bad.insert(6 + at, 0xff);
                let err = locate(&bad).unwrap_err();
                assert_eq!((err.reason, err.offset), ("invalid UTF-8", 6 + at));
                // A closing quote: what follows is then outside the string.
                let err = locate(body("\"").as_bytes()).unwrap_err();
                assert_eq!(err.offset, 7 + at, "quote at {at}");
            }
        }
    }

    #[test]
    fn inserts_a_missing_model() {
        assert_eq!(sub(r#"{"a":1}"#, "m").unwrap(), r#"{"model":"m","a":1}"#);
        assert_eq!(sub(r#" { } "#, "m").unwrap(), r#" {"model":"m" } "#);
        assert_eq!(sub(r#"{}"#, "m").unwrap(), r#"{"model":"m"}"#);
    }

    #[test]
    fn the_requested_model_is_read_with_or_without_escapes() {
        let model =
            |body: &str| requested_model(body.as_bytes(), &locate(body.as_bytes()).unwrap());
        assert_eq!(model(r#"{"model":"gpt-4o"}"#).as_deref(), Some("gpt-4o"));
        assert_eq!(
            model(r#"{"model":"gpt\u002d4o\"x"}"#).as_deref(),
            Some("gpt-4o\"x")
        );
        assert_eq!(model(r#"{"model":"modèle"}"#).as_deref(), Some("modèle"));
        assert_eq!(model(r#"{"model":""}"#).as_deref(), Some(""));
        assert_eq!(model(r#"{"model":7}"#), None);
        assert_eq!(model(r#"{"n":1}"#), None);
    }

    #[test]
    fn escapes_the_model_id() {
        let out = sub(r#"{"model":"a"}"#, "q\"b\\s\n\u{1}é").unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["model"], "q\"b\\s\n\u{1}é");
        assert_eq!(out, "{\"model\":\"q\\\"b\\\\s\\n\\u0001é\"}");
    }

    #[test]
    fn rejects_invalid_json_with_a_position() {
        for (body, reason) in [
            ("", "empty body where a JSON object was expected"),
            ("{", "expected a string key"),
            (r#"{"a":}"#, "expected a JSON value"),
            (r#"{"a":1,}"#, "expected a string key"),
            (r#"{"a":01}"#, "expected ',' or '}' after an object member"),
            (r#"{"a":"x\q"}"#, "invalid escape"),
            (r#"{"a":"\u12"}"#, "invalid \\u escape"),
            (r#"{"a":"x"} x"#, "trailing characters after the JSON value"),
            (r#"[1,2]"#, "the JSON body is not an object"),
            (r#"{"a":[1,}"#, "expected a JSON value"),
            (r#"{"a":[1}"#, "expected ',' or ']' in an array"),
            (r#"{"a":{"b":1]}"#, "expected ',' or '}' in an object"),
            (r#"{"a":tru}"#, "invalid literal"),
            (r#"{"a":-}"#, "invalid number"),
            (r#"{"a":1.}"#, "invalid number: no digit after '.'"),
            (r#"{"a":1e}"#, "invalid number: no digit in the exponent"),
            (r#"{"a":"x"#, "unterminated string"),
            ("{\"a\":\"\u{1}\"}", "control character in a string"),
        ] {
            assert_eq!(
                locate(body.as_bytes()).unwrap_err().reason,
                reason,
                "{body}"
            );
        }
        assert_eq!(locate(br#"{"a":}"#).unwrap_err().offset, 5);
        assert_eq!(
            locate(b"{\"a\":\"\xff\"}").unwrap_err().reason,
            "invalid UTF-8"
        );
        let overlong = b"{\"k\":\"caf\xc3\xa9 and a long tail \xe2\x82\"}";
        assert_eq!(locate(overlong).unwrap_err().reason, "invalid UTF-8");
        assert_eq!(
            locate(b"{\"\xc3\x28\":1}").unwrap_err().reason,
            "invalid UTF-8"
        );
        assert_eq!(
            locate(b"{\"a\":1}\xff").unwrap_err().reason,
            "trailing characters after the JSON value"
        );
        assert!(
            locate("{\"k\":\"caf\u{e9} \u{1F600} long enough for a word\"}".as_bytes()).is_ok()
        );
    }

    #[test]
    fn deep_nesting_inside_the_object_is_skipped_without_recursion() {
        let nest = |depth: usize| {
            format!(
                r#"{{"model":"a","x":{}{}}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            )
        };
        let ok = nest(100);
        assert_eq!(sub(&ok, "b").unwrap(), ok.replacen("\"a\"", "\"b\"", 1));
        // serde_json skips a value with an explicit stack, not recursion.
        let deep = nest(100_000);
        assert_eq!(sub(&deep, "b").unwrap().len(), deep.len());
        assert!(locate("[".repeat(100_000).as_bytes()).is_err());
    }
}
