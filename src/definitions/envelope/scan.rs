//! The envelope's fast path: a scanner that finds where each top-level
//! field of an event lies, checking every byte of it as serde_json's
//! parser does and building nothing. serde_json skips a field no
//! definition reads through its deserializer (a call and a match a
//! token); here a skipped `context` is a loop over its bytes.
//!
//! It is never looser than serde_json, only at times stricter: what it
//! cannot place (any error, a value nested deeper than [`MAX_DEPTH`]) it
//! leaves to serde_json, which then gives the event or the error.

/// Containers nested deeper than this in one field are left to
/// serde_json: a field's value is parsed on its own here, one level up
/// from where serde_json's parse of the whole event (128 levels) meets it.
const MAX_DEPTH: u32 = 64;

/// One top-level field as it lies in the event.
pub(super) struct RawField<'a> {
    /// The key's JSON, quotes included.
    pub key_json: &'a str,
    /// Whether the key has escapes: its meaning is then not its text.
    pub key_escaped: bool,
    /// The value's JSON.
    pub value: &'a str,
    /// The value is a string with escapes.
    pub value_escaped: bool,
}

impl<'a> RawField<'a> {
    /// The key's text between its quotes, as written.
    pub fn key_text(&self) -> &'a str {
        &self.key_json[1..self.key_json.len() - 1]
    }
}

/// Calls `each` with every field of `json` in order: `None` when `json`
/// is not one JSON object (with nothing but whitespace around it) as
/// serde_json reads one, nests deeper than [`MAX_DEPTH`], or `each` gives
/// up on a field.
pub(super) fn object_fields<'a>(
    json: &'a str,
    mut each: impl FnMut(RawField<'a>) -> Option<()>,
) -> Option<()> {
    let mut scan = Scanner {
        bytes: json.as_bytes(),
        at: 0,
    };
    scan.whitespace();
    scan.eat(b'{')?;
    scan.whitespace();
    if !scan.eat_if(b'}') {
        loop {
            let key_start = scan.at;
            scan.eat(b'"')?;
            let key_escaped = scan.string()?;
            let key_json = &json[key_start..scan.at];
            scan.whitespace();
            scan.eat(b':')?;
            scan.whitespace();
            let value_start = scan.at;
            let value_escaped = if scan.eat_if(b'"') {
                scan.string()?
            } else {
                scan.value()?;
                false
            };
            each(RawField {
                key_json,
                key_escaped,
                value: &json[value_start..scan.at],
                value_escaped,
            })?;
            scan.whitespace();
            match scan.next()? {
                b',' => scan.whitespace(),
                b'}' => break,
                _ => return None,
            }
        }
    }
    scan.whitespace();
    (scan.at == scan.bytes.len()).then_some(())
}

/// A position in text known to be UTF-8 (every byte it stops at is
/// ASCII, so every slice it makes is of whole characters).
struct Scanner<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Scanner<'_> {
    fn next(&mut self) -> Option<u8> {
        let byte = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(byte)
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        self.eat_if(byte).then_some(())
    }

    fn eat_if(&mut self, byte: u8) -> bool {
        let there = self.peek() == Some(byte);
        self.at += usize::from(there);
        there
    }

    /// JSON's whitespace, which is serde_json's: not Unicode's.
    fn whitespace(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    /// One value, whitespace before it skipped: its containers are
    /// followed on a stack of bits (set: an object) rather than by
    /// recursion.
    fn value(&mut self) -> Option<()> {
        let mut objects = 0u64;
        let mut depth = 0;
        loop {
            match self.next()? {
                b'"' => {
                    self.string()?;
                }
                open @ (b'{' | b'[') => {
                    self.whitespace();
                    let object = open == b'{';
                    if !self.eat_if(if object { b'}' } else { b']' }) {
                        if depth == MAX_DEPTH {
                            return None;
                        }
                        objects = objects & !(1 << depth) | u64::from(object) << depth;
                        depth += 1;
                        if object {
                            self.key()?;
                        }
                        continue;
                    }
                }
                b't' => self.word(b"rue")?,
                b'f' => self.word(b"alse")?,
                b'n' => self.word(b"ull")?,
                b'-' => {
                    let first = self.next()?;
                    self.number(first)?;
                }
                first @ b'0'..=b'9' => self.number(first)?,
                _ => return None,
            }
            // A value ended: close what ends with it, up to the next one.
            loop {
                if depth == 0 {
                    return Some(());
                }
                self.whitespace();
                let object = objects >> (depth - 1) & 1 == 1;
                match self.next()? {
                    b',' => {
                        self.whitespace();
                        if object {
                            self.key()?;
                        }
                        break;
                    }
                    b'}' if object => depth -= 1,
                    b']' if !object => depth -= 1,
                    _ => return None,
                }
            }
        }
    }

    /// A key of an object being skipped, its colon and the whitespace
    /// up to its value.
    fn key(&mut self) -> Option<()> {
        self.eat(b'"')?;
        self.string()?;
        self.whitespace();
        self.eat(b':')?;
        self.whitespace();
        Some(())
    }

    fn word(&mut self, rest: &[u8]) -> Option<()> {
        let end = self.at + rest.len();
        (self.bytes.get(self.at..end)? == rest).then(|| self.at = end)
    }

    /// A number's grammar, its first character (after any minus) read;
    /// as serde_json skips one, without a check of its range.
    fn number(&mut self, first: u8) -> Option<()> {
        match first {
            // One leading zero, and only one.
            b'0' => {
                if self.peek().is_some_and(|b| b.is_ascii_digit()) {
                    return None;
                }
            }
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.eat_if(b'.') {
            self.some_digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            self.some_digits()?;
        }
        Some(())
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
        }
    }

    fn some_digits(&mut self) -> Option<()> {
        let start = self.at;
        self.digits();
        (self.at > start).then_some(())
    }

    /// The rest of a string, its opening quote read: whether it has
    /// escapes. Escapes are checked as serde_json checks one it skips
    /// (a `\u` needs four hex digits, whatever they make).
    fn string(&mut self) -> Option<bool> {
        let mut escaped = false;
        loop {
            self.plain();
            match self.next()? {
                b'"' => return Some(escaped),
                b'\\' => {
                    escaped = true;
                    match self.next()? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                        b'u' => {
                            let end = self.at + 4;
                            if !self
                                .bytes
                                .get(self.at..end)?
                                .iter()
                                .all(u8::is_ascii_hexdigit)
                            {
                                return None;
                            }
                            self.at = end;
                        }
                        _ => return None,
                    }
                }
                // A control character, which JSON strings may not hold.
                _ => return None,
            }
        }
    }

    /// Up to the next quote, backslash or control character: eight bytes
    /// a step, as serde_json does (the lowest byte flagged in a word is
    /// the first such; flags above it may be false).
    fn plain(&mut self) {
        const ONES: u64 = u64::MAX / 255;
        const HIGH: u64 = ONES * 0x80;
        let has = |word: u64, byte: u8| {
            let x = word ^ (ONES * u64::from(byte));
            x.wrapping_sub(ONES) & !x
        };
        while let Some(chunk) = self.bytes.get(self.at..self.at + 8) {
            let word = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
            let control = word.wrapping_sub(ONES * 0x20) & !word;
            let found = (control | has(word, b'"') | has(word, b'\\')) & HIGH;
            if found != 0 {
                self.at += found.trailing_zeros() as usize / 8;
                return;
            }
            self.at += 8;
        }
        while let Some(byte) = self.peek() {
            if byte == b'"' || byte == b'\\' || byte < 0x20 {
                return;
            }
            self.at += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(json: &str) -> Option<Vec<(String, String)>> {
        let mut out = Vec::new();
        object_fields(json, |f| {
            out.push((f.key_text().to_owned(), f.value.to_owned()));
            Some(())
        })?;
        Some(out)
    }

    #[test]
    fn each_field_is_found_where_it_lies() {
        let json =
            " {\"a\" : 1 ,\"b\":[1, {\"c\": \"d\\n\"}, [], {}],\"e\":\"x\\u00e9\", \"\":null}\n";
        let found = fields(json).unwrap();
        let want = [
            ("a", "1"),
            ("b", r#"[1, {"c": "d\n"}, [], {}]"#),
            ("e", r#""x\u00e9""#),
            ("", "null"),
        ];
        assert_eq!(found.len(), want.len());
        for ((key, value), (want_key, want_value)) in found.iter().zip(want) {
            assert_eq!((key.as_str(), value.as_str()), (want_key, want_value));
        }
        assert_eq!(fields("{}"), Some(vec![]));
    }

    #[test]
    fn what_serde_json_refuses_is_refused() {
        for json in [
            "",
            "{",
            "}",
            "[]",
            "{}x",
            "{} {}",
            r#"{"a"}"#,
            r#"{"a":}"#,
            r#"{"a":1,}"#,
            r#"{"a":1 "b":2}"#,
            r#"{a:1}"#,
            r#"{"a":[1,]}"#,
            r#"{"a":[1 2]}"#,
            r#"{"a":{"b"}}"#,
            r#"{"a":{"b":1,}}"#,
            r#"{"a":{1:2}}"#,
            r#"{"a":[}"#,
            r#"{"a":{]}"#,
            r#"{"a":01}"#,
            r#"{"a":-}"#,
            r#"{"a":1.}"#,
            r#"{"a":.5}"#,
            r#"{"a":1e}"#,
            r#"{"a":1e+}"#,
            r#"{"a":+1}"#,
            r#"{"a":tru}"#,
            r#"{"a":nul}"#,
            r#"{"a":True}"#,
            r#"{"a":"\x"}"#,
            r#"{"a":"\u12"}"#,
            r#"{"a":"\u12g4"}"#,
            "{\"a\":\"tab\there\"}",
            "{\"a\":\"\u{1}\"}",
            r#"{"a":"open}"#,
            "\u{a0}{}",
            "{\"a\":1}\u{a0}",
            r#"{"a":NaN}"#,
            r#"{"a":'x'}"#,
        ] {
            assert!(fields(json).is_none(), "{json:?} is refused");
            assert!(
                serde_json::from_str::<serde_json::Value>(json).is_err()
                    || serde_json::from_str::<serde_json::Value>(json)
                        .is_ok_and(|v| !v.is_object()),
                "{json:?} is refused by serde_json too"
            );
        }
    }

    #[test]
    fn deep_values_are_left_to_serde_json() {
        let nested =
            |depth: usize| format!("{{\"a\":{}1{}}}", "[".repeat(depth), "]".repeat(depth));
        assert!(fields(&nested(MAX_DEPTH as usize)).is_some());
        assert!(fields(&nested(MAX_DEPTH as usize + 1)).is_none());
        assert!(serde_json::from_str::<serde_json::Value>(&nested(MAX_DEPTH as usize + 1)).is_ok());
    }

    #[test]
    fn strings_are_read_to_their_closing_quote_in_every_position_of_a_word() {
        for pad in 0..17 {
            let text = "é".repeat(pad % 3) + &"x".repeat(pad);
            for tail in ["", "\\\"", "\\\\", "\\u0041", "q"] {
                let json = format!("{{\"k\":\"{text}{tail}\",\"n\":2}}");
                let found = fields(&json).unwrap();
                assert_eq!(found[0].1, format!("\"{text}{tail}\""), "{json}");
                assert_eq!(found[1], ("n".to_owned(), "2".to_owned()));
            }
            let control = format!("{{\"k\":\"{text}\u{1f}\"}}");
            assert!(fields(&control).is_none(), "{control:?}");
        }
    }
}
