use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::definitions::ENVELOPE_FIELDS;

/// What an envelope must read as: the whole event without the fields
/// neither read nor in the head.
fn expected(json: &str, reads: Reads) -> Value {
    let mut whole: Value = serde_json::from_str(json).unwrap();
    if let Value::Object(fields) = &mut whole {
        fields.retain(|name, _| reads.contains(name) || HEAD.contains(&name.as_str()));
    }
    whole
}

#[test]
fn the_head_is_read_as_text_and_the_fields_read_as_json() {
    let event = r#"{"type":"track","event":"Order Completed","userId":"u1","messageId":"m1","context":{"os":{"name":"iOS"}},"properties":{"amount":12.5},"traits":{"plan":"pro"}}"#;
    let envelope = Envelope::parse(event.as_bytes(), Reads::of(["properties"])).unwrap();
    assert_eq!(envelope.text("type"), Some("track"));
    assert_eq!(envelope.text("event"), Some("Order Completed"));
    assert_eq!(envelope.text("anonymousId"), None);
    assert_eq!(envelope.text("properties"), None, "not a head field");
    assert_eq!(
        envelope.whole(),
        &json!({"type": "track", "event": "Order Completed", "userId": "u1", "messageId": "m1", "properties": {"amount": 12.5}})
    );
    let amount = FieldPath::parse("field", "properties.amount").unwrap();
    assert_eq!(envelope.path(&amount).as_deref(), Some(&json!(12.5)));
    let user = FieldPath::parse("field", "userId").unwrap();
    assert_eq!(envelope.path(&user).as_deref(), Some(&json!("u1")));
    assert_eq!(envelope.path_text(&user), Some("u1"));
    let inside_text = FieldPath::parse("field", "userId.x").unwrap();
    assert_eq!(envelope.path(&inside_text), None);
    assert_eq!(envelope.path_text(&inside_text), None);
    assert_eq!(envelope.path_text(&amount), None, "not a head field");
    assert_eq!(
        envelope.get("event").as_deref(),
        Some(&json!("Order Completed"))
    );
    assert_eq!(envelope.get("context"), None, "not read");
}

#[test]
fn json_for_what_reads_no_head_field_leaves_the_head_out() {
    let event = r#"{"type":"track","userId":"u1","properties":{"amount":3}}"#;
    let envelope = Envelope::parse(event.as_bytes(), Reads::of(["properties"])).unwrap();
    assert_eq!(
        envelope.json(Reads::of(["properties"])),
        &json!({"properties": {"amount": 3}})
    );
    assert_eq!(
        envelope.json(Reads::of(["properties", "userId"])),
        &json!({"type": "track", "userId": "u1", "properties": {"amount": 3}})
    );
}

#[test]
fn a_head_field_that_is_not_text_is_json() {
    let event = r#"{"type":"track","userId":42,"anonymousId":null,"event":{"name":"x"}}"#;
    let envelope = Envelope::parse(event.as_bytes(), Reads::NONE).unwrap();
    assert_eq!(envelope.text("userId"), None);
    assert_eq!(envelope.get("userId").as_deref(), Some(&json!(42)));
    let name = FieldPath::parse("field", "event.name").unwrap();
    assert_eq!(envelope.path(&name).as_deref(), Some(&json!("x")));
    assert_eq!(
        envelope.whole(),
        &serde_json::from_str::<Value>(event).unwrap()
    );
}

#[test]
fn a_head_field_with_escapes_is_read_by_its_meaning() {
    let event = r#"{"user\u0049d":"u\"1","type":"tr\u0061ck","pr\u006fperties":{"a":1}}"#;
    let envelope = Envelope::parse(event.as_bytes(), Reads::of(["properties"])).unwrap();
    assert_eq!(envelope.text("userId"), Some("u\"1"));
    assert_eq!(envelope.text("type"), Some("track"));
    assert_eq!(
        envelope.get("properties").as_deref(),
        Some(&json!({"a": 1}))
    );
}

#[test]
fn a_field_given_twice_keeps_its_last_value_as_a_whole_parse_does() {
    for event in [
        r#"{"userId":"a","userId":7}"#,
        r#"{"userId":7,"userId":"b"}"#,
        r#"{"userId":"a","userId":"b"}"#,
    ] {
        let envelope = Envelope::parse(event.as_bytes(), Reads::NONE).unwrap();
        assert_eq!(
            envelope.whole(),
            &serde_json::from_str::<Value>(event).unwrap(),
            "{event}"
        );
    }
}

#[test]
fn what_is_not_json_is_refused_even_where_it_is_skipped() {
    for bad in [
        r#"{"type":"track","context":{"os":}"#,
        r#"{"type":"track"} trailing"#,
        "",
    ] {
        assert!(
            Envelope::parse(bad.as_bytes(), Reads::NONE).is_err(),
            "{bad} was taken"
        );
    }
    let not_utf_8 = b"{\"type\":\"track\",\"context\":{\"os\":\"\xff\"}}";
    assert!(Envelope::parse(not_utf_8, Reads::NONE).is_err());
}

#[test]
fn an_event_that_is_not_an_object_has_no_head() {
    for other in [
        "[1,{\"a\":2}]",
        "\"text\"",
        "12",
        "-3",
        "1.5",
        "true",
        "null",
    ] {
        let envelope = Envelope::parse(other.as_bytes(), Reads::of(["type"])).unwrap();
        assert_eq!(envelope.text("type"), None);
        assert_eq!(
            envelope.whole(),
            &serde_json::from_str::<Value>(other).unwrap()
        );
        assert_eq!(envelope.json(Reads::NONE), envelope.whole());
    }
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
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
    /// Parsed or made from a parsed event, an envelope reads as the
    /// event does: its whole, its head's text, and each field.
    #[test]
    fn an_envelope_reads_as_the_event_without_the_fields_not_read(
        fields in prop::collection::vec(
            (
                prop_oneof![
                    prop::sample::select(ENVELOPE_FIELDS.to_vec()).prop_map(str::to_owned),
                    "[a-z]{1,5}",
                ],
                prop_oneof![json_value(), "[a-z\"é]{0,6}".prop_map(Value::from)],
            ),
            0..10,
        ),
        read in prop::sample::subsequence(ENVELOPE_FIELDS.to_vec(), 0..=ENVELOPE_FIELDS.len()),
        all in any::<bool>(),
    ) {
        let event = Value::Object(fields.into_iter().collect());
        let text = event.to_string();
        let reads = if all { Reads::ALL } else { Reads::of(read) };
        let want = expected(&text, reads);
        let parsed = Envelope::parse(text.as_bytes(), reads).unwrap();
        let made = Envelope::of(&want);
        for envelope in [&parsed, &made] {
            prop_assert_eq!(envelope.whole(), &want);
            for name in HEAD {
                prop_assert_eq!(envelope.text(name), want.get(name).and_then(Value::as_str));
            }
            for name in ENVELOPE_FIELDS {
                let got = envelope.get(name);
                prop_assert_eq!(got.as_deref(), want.get(*name));
                let path = FieldPath::parse("field", name).unwrap();
                let got = envelope.path(&path);
                prop_assert_eq!(got.as_deref(), want.get(*name));
                let text = want.get(*name).and_then(Value::as_str).filter(|_| HEAD.contains(name));
                prop_assert_eq!(envelope.path_text(&path), text);
            }
        }
    }
}

proptest! {
    /// A condition answers on an envelope as it does on the event's JSON,
    /// natively (head fields as text) or by the interpreter.
    #[test]
    fn a_condition_answers_on_an_envelope_as_on_the_json(
        kind in prop_oneof![Just(json!("track")), Just(json!("identify")), Just(json!(3)), Just(Value::Null)],
        event in prop_oneof![Just(json!("Order Completed")), Just(json!("x")), Just(json!({"a": 1}))],
        user in prop_oneof![Just(json!("u1")), Just(json!("")), Just(json!(7))],
        amount in prop_oneof![Just(json!(5)), Just(json!(150.5)), Just(json!("150")), Just(json!(null))],
        with_event in any::<bool>(),
    ) {
        let mut fields = serde_json::Map::new();
        fields.insert("type".into(), kind);
        if with_event {
            fields.insert("event".into(), event);
        }
        fields.insert("userId".into(), user);
        fields.insert("properties".into(), json!({"amount": amount, "tags": ["a"]}));
        fields.insert("context".into(), json!({"os": {"name": "iOS"}}));
        let whole = Value::Object(fields);
        let text = whole.to_string();
        for source in [
            r#"type == "track""#,
            r#"event == "Order Completed" && properties.amount > 100"#,
            r#"type in ["track", "page"] || userId == "u1""#,
            r#"has(properties.amount) && !(userId == "")"#,
            "event.a == 1",
            "userId.x == 1",
            r#"size(userId) > 1"#,
            r#"context.os.name == "iOS" && type != "identify""#,
        ] {
            let condition = crate::definitions::Condition::compile("where", source).unwrap();
            let envelope = Envelope::parse(text.as_bytes(), condition.reads()).unwrap();
            prop_assert_eq!(
                condition.matches_event(&envelope),
                condition.matches(&whole),
                "{} on {}", source, text
            );
        }
    }
}

/// What an envelope holds, to compare one parsed two ways.
fn parts<'e>(envelope: &'e Envelope) -> (Vec<Option<&'e str>>, &'e Value, Option<&'e Value>) {
    (
        envelope.head.iter().map(|text| text.as_deref()).collect(),
        &envelope.rest,
        envelope.not_an_object.as_ref(),
    )
}

/// Events as serde_json writes them: every kind of value, numbers with
/// fractions and exponents, strings with escapes and control characters.
fn event_text() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[a-z\"\\\\é \u{1}\t/]{0,12}".prop_map(Value::from),
    ];
    let value = leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z\"é]{0,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    let fields = prop::collection::vec(
        (
            prop_oneof![
                prop::sample::select(ENVELOPE_FIELDS.to_vec()).prop_map(str::to_owned),
                "[a-z\"]{0,5}",
            ],
            value,
        ),
        0..10,
    );
    (fields, any::<bool>()).prop_map(|(fields, pretty)| {
        let event = Value::Object(fields.into_iter().collect());
        if pretty {
            serde_json::to_string_pretty(&event).unwrap()
        } else {
            event.to_string()
        }
    })
}

/// Bytes that make JSON wrong, or right in another way.
const EDITS: [&str; 26] = [
    "\"", "\\", "{", "}", "[", "]", ",", ":", "0", "-", ".", "e", "+", " ", "\u{1}", "\t", "u",
    "\\u00", "n", "true", "1e5", "é", "\u{a0}", "}}", ",]", ",}",
];

proptest! {
    /// The scanner takes every event serde_json writes, reads it as
    /// serde_json's parse does, and of an event edited at random takes
    /// only what serde_json takes, read the same.
    #[test]
    fn the_scanner_reads_as_serde_json_and_takes_nothing_it_refuses(
        text in event_text(),
        edits in prop::collection::vec(
            (
                any::<prop::sample::Index>(),
                any::<bool>(),
                prop::sample::select(EDITS.to_vec()),
                0..3usize,
            ),
            1..3,
        ),
        read in prop::sample::subsequence(ENVELOPE_FIELDS.to_vec(), 0..=ENVELOPE_FIELDS.len()),
    ) {
        let reads = Reads::of(read);
        let scanned = Envelope::scan(&text, reads).expect("serde_json's own output is scanned");
        let whole = Envelope::parse_whole(&text, reads).unwrap();
        prop_assert_eq!(parts(&scanned), parts(&whole));

        let mut edited = text.clone();
        for (at, at_structure, insert, remove) in edits {
            // At random, or at a quote, bracket, comma or colon.
            let structure: Vec<usize> = edited.match_indices(['"', '{', '}', '[', ']', ',', ':']).map(|(i, _)| i).collect();
            let mut at = if at_structure && !structure.is_empty() {
                structure[at.index(structure.len())]
            } else {
                at.index(edited.len() + 1)
            };
            while !edited.is_char_boundary(at) {
                at -= 1;
            }
            let mut end = at;
            for _ in 0..remove {
                end += edited[end..].chars().next().map_or(0, char::len_utf8);
            }
            edited.replace_range(at..end, insert);
        }
        if let Some(scanned) = Envelope::scan(&edited, reads) {
            let whole = Envelope::parse_whole(&edited, reads);
            prop_assert!(whole.is_ok(), "the scanner took {:?}, which serde_json refuses", edited);
            let whole = whole.unwrap();
            prop_assert_eq!(parts(&scanned), parts(&whole));
        }
    }
}
