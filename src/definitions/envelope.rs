//! An event as the metric and rule runners read it: the envelope's head
//! (its type, names, ids and times, which every definition reads) as text
//! borrowed from the record, and the other fields its definitions read as
//! JSON. Every definition reads the head of every event; built into a
//! JSON tree it would cost a map entry, a key and a string each, most of
//! a batch's parse. The whole envelope as JSON is built only for what
//! reads a head field as JSON (a condition or a path naming one), once.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::fmt;

use serde::Deserialize;
use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::{FieldPath, Reads};

/// The head: the envelope fields every metric and rule reads of an event,
/// whatever its definition names (its `metric::Head`, the ids an alias
/// links, its stamp and when it was received). A deletion's ids are in
/// its properties, which a runner reads of a deletion whatever its
/// definitions name.
pub const HEAD: [&str; 8] = [
    "type",
    "event",
    "userId",
    "anonymousId",
    "previousId",
    "messageId",
    "timestamp",
    "receivedAt",
];

/// One event's head and the other fields read.
#[derive(Debug)]
pub struct Envelope<'a> {
    /// Each head field's text, when it is a string (as `HEAD` orders them).
    head: [Option<Cow<'a, str>>; HEAD.len()],
    /// The other fields read, and a head field that is not a string: an
    /// object.
    rest: Value,
    /// The whole as JSON, made when first asked for.
    whole: OnceCell<Value>,
    /// Not a JSON object: nothing to read of it.
    not_an_object: Option<Value>,
}

impl Default for Envelope<'_> {
    fn default() -> Self {
        Envelope {
            head: Default::default(),
            rest: Value::Object(Map::new()),
            whole: OnceCell::new(),
            not_an_object: None,
        }
    }
}

impl<'a> Envelope<'a> {
    /// Parses `json`, an event, reading its head and the fields of
    /// `reads` (the others are checked to be JSON, not built).
    pub fn parse(json: &'a [u8], reads: Reads) -> serde_json::Result<Envelope<'a>> {
        // Checked whole, in one pass: what is skipped is not checked by
        // the parser, and what is borrowed needs no check of its own then.
        let json =
            std::str::from_utf8(json).map_err(<serde_json::Error as serde::de::Error>::custom)?;
        match Envelope::scan(json, reads) {
            Some(envelope) => Ok(envelope),
            // What the scanner leaves, serde_json parses: the event, or
            // the error it is refused with.
            None => Envelope::parse_whole(json, reads),
        }
    }

    /// [`Envelope::parse`] by serde_json's parser alone.
    fn parse_whole(json: &'a str, reads: Reads) -> serde_json::Result<Envelope<'a>> {
        if !json.trim_start().starts_with('{') {
            // An event that is not an object has no fields to read (and
            // no definition takes it).
            return Ok(Envelope::other(serde_json::from_str(json)?));
        }
        let mut deserializer = serde_json::Deserializer::from_str(json);
        let envelope = Projection(reads).deserialize(&mut deserializer)?;
        deserializer.end()?;
        Ok(envelope)
    }

    /// `event`'s head and every other field, borrowed where they are text.
    pub fn of(event: &'a Value) -> Envelope<'a> {
        let Value::Object(fields) = event else {
            return Envelope::other(event.clone());
        };
        let mut envelope = Envelope::default();
        for (name, value) in fields {
            match (head_slot(name), value) {
                (Some(slot), Value::String(text)) => {
                    envelope.head[slot] = Some(Cow::Borrowed(text))
                }
                _ => {
                    envelope.fields().insert(name.clone(), value.clone());
                }
            }
        }
        envelope
    }

    /// Head field `name`'s text: `None` when it is missing or not a
    /// string (or `name` is not a head field).
    pub fn text(&self, name: &str) -> Option<&str> {
        self.head[head_slot(name)?].as_deref()
    }

    /// The whole envelope as JSON.
    pub fn whole(&self) -> &Value {
        self.whole.get_or_init(|| {
            if let Some(other) = &self.not_an_object {
                return other.clone();
            }
            let mut whole = self.rest.clone();
            let fields = whole
                .as_object_mut()
                .expect("the fields read are an object");
            for (name, text) in HEAD.iter().zip(&self.head) {
                if let Some(text) = text {
                    fields.insert((*name).to_owned(), Value::String(text.as_ref().to_owned()));
                }
            }
            whole
        })
    }

    /// The envelope as JSON for something reading `reads`: without its
    /// head, which is then not built, when none of it is read.
    pub fn json(&self, reads: Reads) -> &Value {
        if self.not_an_object.is_none() && !reads.meets(Reads::of(HEAD)) {
            return &self.rest;
        }
        self.whole()
    }

    /// The value at `path`; `None` when a part of it is missing.
    pub fn path(&self, path: &FieldPath) -> Option<Cow<'_, Value>> {
        let (root, inner) = path.split_first();
        if let Some(slot) = head_slot(root)
            && let Some(text) = &self.head[slot]
        {
            // A string has no fields.
            return inner
                .is_empty()
                .then(|| Cow::Owned(Value::String(text.as_ref().to_owned())));
        }
        let at_root = self.rest.get(root)?;
        inner
            .iter()
            .try_fold(at_root, |value, segment| value.get(segment))
            .map(Cow::Borrowed)
    }

    /// The text at `path` when it is a head field that is text: read
    /// without a JSON string made of it.
    pub fn path_text(&self, path: &FieldPath) -> Option<&str> {
        match path.split_first() {
            (root, []) => self.text(root),
            _ => None,
        }
    }

    /// Top-level field `name` as JSON.
    pub fn get(&self, name: &str) -> Option<Cow<'_, Value>> {
        match head_slot(name).and_then(|slot| self.head[slot].as_ref()) {
            Some(text) => Some(Cow::Owned(Value::String(text.as_ref().to_owned()))),
            None => self.rest.get(name).map(Cow::Borrowed),
        }
    }
}

impl<'a> Envelope<'a> {
    /// The fast path of [`Envelope::parse`] (see [`scan`]): `None` for
    /// what it leaves to serde_json.
    fn scan(json: &'a str, reads: Reads) -> Option<Envelope<'a>> {
        let mut envelope = Envelope::default();
        scan::object_fields(json, |field| {
            let key = if field.key_escaped {
                Cow::Owned(serde_json::from_str(field.key_json).ok()?)
            } else {
                Cow::Borrowed(field.key_text())
            };
            if let Some(slot) = head_slot(&key) {
                let value = if !field.value.starts_with('"') {
                    Field::Other(serde_json::from_str(field.value).ok()?)
                } else if field.value_escaped {
                    Field::Text(Cow::Owned(serde_json::from_str(field.value).ok()?))
                } else {
                    Field::Text(Cow::Borrowed(&field.value[1..field.value.len() - 1]))
                };
                envelope.put_head(slot, key, value);
            } else if reads.contains(&key) {
                let value = serde_json::from_str(field.value).ok()?;
                envelope.fields().insert(key.into_owned(), value);
            }
            Some(())
        })?;
        Some(envelope)
    }

    /// Head field `key` (at `slot`): text is kept as text, anything else
    /// among the other fields. A field given twice keeps its last value,
    /// as a whole parse does.
    fn put_head(&mut self, slot: usize, key: Cow<'a, str>, value: Field<'a>) {
        match value {
            Field::Text(text) => {
                self.head[slot] = Some(text);
                self.fields().remove(key.as_ref());
            }
            Field::Other(value) => {
                self.head[slot] = None;
                self.fields().insert(key.into_owned(), value);
            }
        }
    }
}

impl Envelope<'_> {
    /// An event that is not a JSON object.
    fn other(value: Value) -> Self {
        Envelope {
            not_an_object: Some(value),
            ..Envelope::default()
        }
    }

    /// The fields read beyond the head, to fill.
    fn fields(&mut self) -> &mut Map<String, Value> {
        match &mut self.rest {
            Value::Object(fields) => fields,
            _ => unreachable!("the fields read are an object"),
        }
    }
}

impl super::condition::Fields for Envelope<'_> {
    fn field(&self, name: &str) -> Option<super::condition::Field<'_>> {
        use super::condition::Field;
        match head_slot(name).and_then(|slot| self.head[slot].as_deref()) {
            Some(text) => Some(Field::Text(text)),
            None => self.rest.get(name).map(Field::Json),
        }
    }
}

/// Where head field `name` is in [`HEAD`]. (Asked of every field of
/// every event: a match on the name compiles to a switch on its length.)
fn head_slot(name: &str) -> Option<usize> {
    let slot = match name {
        "type" => 0,
        "event" => 1,
        "userId" => 2,
        "anonymousId" => 3,
        "previousId" => 4,
        "messageId" => 5,
        "timestamp" => 6,
        "receivedAt" => 7,
        _ => return None,
    };
    debug_assert_eq!(HEAD[slot], name);
    Some(slot)
}

/// Deserializes an event into an [`Envelope`], building of its other
/// fields only those in its set.
struct Projection(Reads);

impl<'de> DeserializeSeed<'de> for Projection {
    type Value = Envelope<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Envelope<'de>, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Projection {
    type Value = Envelope<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an event")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope<'de>, A::Error> {
        let mut envelope = Envelope::default();
        while let Some(Key(key)) = map.next_key()? {
            if let Some(slot) = head_slot(&key) {
                envelope.put_head(slot, key, map.next_value()?);
            } else if self.0.contains(&key) {
                let value = map.next_value()?;
                envelope.fields().insert(key.into_owned(), value);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(envelope)
    }
}

/// A head field's value: text borrowed from the input unless it has
/// escapes, or any other JSON.
enum Field<'de> {
    Text(Cow<'de, str>),
    Other(Value),
}

impl<'de> Deserialize<'de> for Field<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Field<'de>, D::Error> {
        deserializer.deserialize_any(FieldVisitor)
    }
}

struct FieldVisitor;

impl<'de> Visitor<'de> for FieldVisitor {
    type Value = Field<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field's value")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Field<'de>, E> {
        Ok(Field::Text(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Field<'de>, E> {
        Ok(Field::Text(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Field<'de>, E> {
        Ok(Field::Text(Cow::Owned(v)))
    }

    fn visit_bool<E>(self, v: bool) -> Result<Field<'de>, E> {
        Ok(Field::Other(Value::Bool(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Field<'de>, E> {
        Ok(Field::Other(Value::from(v)))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Field<'de>, E> {
        Ok(Field::Other(Value::from(v)))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Field<'de>, E> {
        Ok(Field::Other(Value::from(v)))
    }

    fn visit_unit<E>(self) -> Result<Field<'de>, E> {
        Ok(Field::Other(Value::Null))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Field<'de>, A::Error> {
        Ok(Field::Other(Value::deserialize(
            MapAccessDeserializer::new(map),
        )?))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Field<'de>, A::Error> {
        Ok(Field::Other(Value::deserialize(
            SeqAccessDeserializer::new(seq),
        )?))
    }
}

/// An object's key, borrowed from the input unless it has escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Key<'de>, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }

            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }

            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

mod scan;
#[cfg(test)]
mod tests;
