//! A JSON object a client sent (`properties`, `traits`, `context`,
//! `integrations`), kept as the client's own text.
//!
//! Ingest only passes these objects on to the log, so it checks them and
//! copies their text instead of building a map and writing it out again:
//! most of an event's bytes are in them. The check is the one a map would
//! make: an object, every string valid (no lone surrogate escape), every
//! number within an `f64`. An event the ingest accepts is one the
//! processors can read.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::envelope::JsonObject;

/// A checked JSON object, borrowed from the request body where it can be.
#[derive(Debug, Default)]
pub enum RawObject<'a> {
    /// Absent or `null`.
    #[default]
    Empty,
    Borrowed(&'a RawValue),
    Owned(Box<RawValue>),
}

impl<'a> RawObject<'a> {
    fn text(&self) -> &str {
        match self {
            RawObject::Empty => "{}",
            RawObject::Borrowed(raw) => raw.get(),
            RawObject::Owned(raw) => raw.get(),
        }
    }

    /// This object with the keys of `shared` it does not have itself (a
    /// batch's `context` under each message's own).
    pub fn under(self, shared: Option<&Map<String, Value>>) -> RawObject<'a> {
        let Some(shared) = shared.filter(|map| !map.is_empty()) else {
            return self;
        };
        // Checked when it was read: it parses.
        let mut own: Map<String, Value> = serde_json::from_str(self.text()).unwrap_or_default();
        for (key, value) in shared {
            own.entry(key.clone()).or_insert_with(|| value.clone());
        }
        // Writing a map cannot fail.
        RawObject::Owned(serde_json::value::to_raw_value(&own).unwrap_or_default())
    }

    /// The object under `key`, when there is one and it is not empty
    /// (`context.traits`).
    pub fn member(&self, key: &str) -> Option<RawObject<'static>> {
        // Checked when it was read: it parses, and so do its members.
        let members: std::collections::HashMap<String, &RawValue> =
            serde_json::from_str(self.text()).ok()?;
        let raw = members.get(key)?;
        let member = RawObject::Owned((*raw).to_owned());
        (raw.get().starts_with('{') && !member.is_empty()).then_some(member)
    }
}

impl JsonObject for RawObject<'_> {
    fn is_empty(&self) -> bool {
        let text = self.text().trim();
        text.len() <= 2
            || text[1..text.len() - 1]
                .bytes()
                .all(|b| b.is_ascii_whitespace())
    }
}

impl Serialize for RawObject<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            RawObject::Empty => Map::new().serialize(serializer),
            RawObject::Borrowed(raw) => raw.serialize(serializer),
            RawObject::Owned(raw) => raw.serialize(serializer),
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for RawObject<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let Some(raw) = Option::<&'a RawValue>::deserialize(deserializer)? else {
            return Ok(RawObject::Empty);
        };
        let text = raw.get();
        if !text.starts_with('{') {
            return Err(de::Error::invalid_type(unexpected(text), &"a JSON object"));
        }
        if may_be_refused(text) {
            serde_json::from_str::<Checked>(text)
                .map_err(|e| de::Error::custom(strip_position(&e.to_string())))?;
        }
        Ok(RawObject::Borrowed(raw))
    }
}

/// Whether valid JSON `text` may hold what a map refuses, so it must be
/// read through: a number past an `f64` needs an exponent or 309 digits,
/// a lone surrogate an escape. Most objects have neither, and this scan is
/// a fraction of the cost of reading them.
fn may_be_refused(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() >= 309
        || bytes.iter().enumerate().any(|(i, &b)| {
            b == b'\\'
                || (matches!(b, b'e' | b'E')
                    && i > 0
                    && (bytes[i - 1].is_ascii_digit() || bytes[i - 1] == b'.'))
        })
}

/// What a non-object value is, for the error.
fn unexpected(text: &str) -> de::Unexpected<'_> {
    match text.as_bytes().first() {
        Some(b'[') => de::Unexpected::Seq,
        Some(b'"') => de::Unexpected::Other("string"),
        Some(b't' | b'f') => de::Unexpected::Other("boolean"),
        _ => de::Unexpected::Other("number"),
    }
}

fn strip_position(message: &str) -> &str {
    message
        .rfind(" at line ")
        .map_or(message, |at| &message[..at])
}

/// Reads a JSON value as a map would, keeping nothing: numbers are parsed
/// (so one out of an `f64`'s range fails) and strings unescaped (so a
/// lone surrogate fails).
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

impl<'de> Visitor<'de> for CheckedVisitor {
    type Value = Checked;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_unit<E>(self) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_entry::<Checked, Checked>()?.is_some() {}
        Ok(Checked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Holder<'a> {
        #[serde(borrow, default)]
        o: RawObject<'a>,
    }

    fn read(json: &str) -> Result<RawObject<'_>, String> {
        serde_json::from_str::<Holder>(json)
            .map(|h| h.o)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn an_object_is_kept_as_its_text() {
        let o = read(r#"{"o": {"a": [1, "x"], "b": {"c": null}}}"#).unwrap();
        assert!(matches!(o, RawObject::Borrowed(_)));
        assert_eq!(
            serde_json::to_string(&o).unwrap(),
            r#"{"a": [1, "x"], "b": {"c": null}}"#
        );
        assert!(!o.is_empty());
    }

    #[test]
    fn null_absent_and_empty_objects_are_empty() {
        for json in [r#"{"o": null}"#, "{}", r#"{"o": { }}"#] {
            let o = read(json).unwrap();
            assert!(o.is_empty(), "{json}");
            assert_eq!(serde_json::to_string(&o).unwrap().replace(' ', ""), "{}");
        }
    }

    #[test]
    fn what_a_map_would_refuse_is_refused() {
        for (json, says) in [
            (
                r#"{"o": [1]}"#,
                "invalid type: sequence, expected a JSON object",
            ),
            (
                r#"{"o": "x"}"#,
                "invalid type: string, expected a JSON object",
            ),
            (
                r#"{"o": 3}"#,
                "invalid type: number, expected a JSON object",
            ),
            (r#"{"o": {"n": 1e400}}"#, "number out of range"),
            (r#"{"o": {"n": [-1e400]}}"#, "number out of range"),
            (r#"{"o": {"s": "\ud800"}}"#, "hex escape"),
            (
                &format!(r#"{{"o": {{"n": 1{}}}}}"#, "0".repeat(400)),
                "number out of range",
            ),
        ] {
            let err = read(json).unwrap_err();
            assert!(err.contains(says), "{json}: {err}");
        }
    }

    #[test]
    fn shared_keys_go_under_the_own_ones() {
        let shared: Map<String, Value> =
            serde_json::from_str(r#"{"locale": "fr", "library": {"name": "x"}}"#).unwrap();
        let o = read(r#"{"o": {"locale": "de"}}"#)
            .unwrap()
            .under(Some(&shared));
        let merged: Value = serde_json::from_str(o.text()).unwrap();
        assert_eq!(
            merged,
            serde_json::json!({"locale": "de", "library": {"name": "x"}})
        );
        let o = RawObject::Empty.under(Some(&shared));
        assert_eq!(
            serde_json::from_str::<Value>(o.text()).unwrap(),
            Value::Object(shared)
        );
    }
}
