//! Which of the envelope's fields a definition reads, and parsing only
//! those. A metric or a rule reads a few top-level fields (`type`,
//! `userId`, `properties`, ...); an event from a Segment SDK carries a
//! `context` of device, app, network and library details that is often
//! most of its bytes. Parsing an event into a JSON tree costs by the
//! node, so a runner parses the fields its definitions read and skips
//! the rest unbuilt.

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value};

use super::ENVELOPE_FIELDS;

/// A set of the envelope's top-level fields ([`ENVELOPE_FIELDS`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reads(u32);

const _: () = assert!(ENVELOPE_FIELDS.len() <= 32, "a bit a field");

impl Reads {
    /// None of them.
    pub const NONE: Reads = Reads(0);

    /// Every field, and anything else the event holds.
    pub const ALL: Reads = Reads(u32::MAX);

    /// The fields named (names that are not envelope fields are not
    /// read: a definition cannot name them).
    pub fn of<'a>(names: impl IntoIterator<Item = &'a str>) -> Reads {
        names.into_iter().fold(Reads::NONE, |reads, name| {
            match ENVELOPE_FIELDS.iter().position(|f| *f == name) {
                Some(bit) => Reads(reads.0 | 1 << bit),
                None => reads,
            }
        })
    }

    pub fn with(self, other: Reads) -> Reads {
        Reads(self.0 | other.0)
    }

    pub fn contains(self, name: &str) -> bool {
        self == Reads::ALL
            || ENVELOPE_FIELDS
                .iter()
                .position(|f| *f == name)
                .is_some_and(|bit| self.0 & 1 << bit != 0)
    }

    /// Parses `json`, an event, keeping of a top-level object only the
    /// fields read (the others are checked to be JSON, not built). The
    /// same as parsing the whole and removing the fields not read.
    pub fn parse(self, json: &[u8]) -> serde_json::Result<Value> {
        // Checked whole, in one pass: what is skipped is not checked by
        // the parser, and what is built needs no check of its own then.
        let json =
            std::str::from_utf8(json).map_err(<serde_json::Error as serde::de::Error>::custom)?;
        if self == Reads::ALL {
            return serde_json::from_str(json);
        }
        let mut deserializer = serde_json::Deserializer::from_str(json);
        let value = Projection(self).deserialize(&mut deserializer)?;
        deserializer.end()?;
        Ok(value)
    }
}

/// Deserializes an event, building only the top-level fields in its set.
struct Projection(Reads);

impl<'de> DeserializeSeed<'de> for Projection {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Projection {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an event")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut fields = Map::new();
        while let Some(Key(key)) = map.next_key()? {
            if self.0.contains(&key) {
                fields.insert(key.into_owned(), map.next_value()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Value::Object(fields))
    }

    // An event that is not an object has no fields to choose from: it is
    // parsed whole (and no definition takes it).
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    /// What a projection must equal: the whole event without the fields
    /// not read.
    fn expected(json: &str, reads: Reads) -> Value {
        let mut whole: Value = serde_json::from_str(json).unwrap();
        if let Value::Object(fields) = &mut whole {
            fields.retain(|name, _| reads.contains(name));
        }
        whole
    }

    #[test]
    fn only_the_fields_read_are_built() {
        let event = r#"{"type":"track","userId":"u1","context":{"os":{"name":"iOS"},"ip":"1.2.3.4"},"properties":{"amount":12.5,"tags":["a","b"]},"extra":[1,{"x":null}]}"#;
        let reads = Reads::of(["type", "properties"]);
        assert_eq!(
            reads.parse(event.as_bytes()).unwrap(),
            json!({"type": "track", "properties": {"amount": 12.5, "tags": ["a", "b"]}})
        );
        assert_eq!(
            Reads::ALL.parse(event.as_bytes()).unwrap(),
            serde_json::from_str::<Value>(event).unwrap()
        );
        assert_eq!(Reads::NONE.parse(event.as_bytes()).unwrap(), json!({}));
    }

    #[test]
    fn a_key_with_escapes_is_read_by_its_meaning() {
        let event = r#"{"user\u0049d":"u1","ty\"pe":"x"}"#;
        assert_eq!(
            Reads::of(["userId"]).parse(event.as_bytes()).unwrap(),
            json!({"userId": "u1"})
        );
    }

    #[test]
    fn what_is_not_json_is_refused_even_where_it_is_skipped() {
        for bad in [
            r#"{"type":"track","context":{"os":}"#,
            r#"{"type":"track","context":[1,2}"#,
            r#"{"type":"track"} trailing"#,
            "",
        ] {
            assert!(
                Reads::of(["type"]).parse(bad.as_bytes()).is_err(),
                "{bad} was taken"
            );
        }
    }

    #[test]
    fn bytes_that_are_not_utf_8_are_refused_where_they_are_skipped() {
        let event = b"{\"type\":\"track\",\"context\":{\"os\":\"\xff\"}}";
        assert!(serde_json::from_slice::<Value>(event).is_err());
        assert!(Reads::of(["type"]).parse(event).is_err());
    }

    #[test]
    fn a_field_given_twice_keeps_its_last_value_as_a_whole_parse_does() {
        let event = r#"{"type":"a","type":"b"}"#;
        assert_eq!(
            Reads::of(["type"]).parse(event.as_bytes()).unwrap(),
            expected(event, Reads::of(["type"]))
        );
    }

    #[test]
    fn an_event_that_is_not_an_object_is_parsed_whole() {
        for other in [
            "[1,{\"a\":2}]",
            "\"text\"",
            "12",
            "-3",
            "1.5",
            "true",
            "null",
        ] {
            assert_eq!(
                Reads::of(["type"]).parse(other.as_bytes()).unwrap(),
                serde_json::from_str::<Value>(other).unwrap()
            );
        }
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            (-1e9f64..1e9).prop_map(Value::from),
            "[a-z\"\\\\é ]{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-zA-Z]{1,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn a_projection_is_the_whole_without_the_fields_not_read(
            fields in prop::collection::vec(
                (
                    prop_oneof![
                        prop::sample::select(ENVELOPE_FIELDS.to_vec()).prop_map(str::to_owned),
                        "[a-z]{1,5}",
                    ],
                    json_value(),
                ),
                0..8,
            ),
            bits in any::<u32>(),
        ) {
            let event = Value::Object(fields.into_iter().collect());
            let text = event.to_string();
            let reads = Reads(bits);
            prop_assert_eq!(reads.parse(text.as_bytes()).unwrap(), expected(&text, reads));
        }
    }
}
