//! The Segment HTTP Tracking API: `/v1/track`, `/v1/identify`, `/v1/page`,
//! `/v1/screen`, `/v1/group`, `/v1/alias` and `/v1/batch`, so existing
//! Segment (and RudderStack) SDKs can send to Traitline unchanged.
//!
//! Parsing is typed (serde) with the path of a bad field kept
//! (serde_path_to_error), then each message is checked for the fields its
//! type requires and normalized into an [`EventEnvelope`].

use chrono::{DateTime, Datelike, Utc};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::error::{IngestError, parse_json, parse_json_str};
use super::object::RawObject;
use crate::envelope::{EventEnvelope, EventType, JsonObject, Source};

/// An envelope as ingest makes it: its objects are the client's text.
pub type IngestEnvelope<'a> = EventEnvelope<RawObject<'a>>;

/// One Segment message. Which fields are required depends on its type:
/// every type needs `userId` or `anonymousId` (alias: `userId` and
/// `previousId`), `track` needs `event`, `group` needs `groupId`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SegmentMessage<'a> {
    /// The call type; required inside a batch, ignored on the single routes
    /// (the route says it).
    #[serde(rename = "type", default)]
    #[schema(value_type = Option<EventType>)]
    pub kind: Option<String>,
    /// Your id for the user. Numbers are accepted and kept as text.
    #[serde(default, deserialize_with = "id")]
    #[schema(value_type = Option<String>, example = "u1")]
    pub user_id: Option<String>,
    /// A device or browser id for a user not yet known.
    #[serde(default, deserialize_with = "id")]
    #[schema(value_type = Option<String>)]
    pub anonymous_id: Option<String>,
    /// Unique per event; generated when absent. A retry must reuse it.
    #[serde(default, deserialize_with = "id")]
    #[schema(value_type = Option<String>)]
    pub message_id: Option<String>,
    /// `track`: the event name.
    #[serde(default)]
    #[schema(example = "Order Completed")]
    pub event: Option<String>,
    /// `page` / `screen`: the page or screen name.
    #[serde(default)]
    pub name: Option<String>,
    /// `group`: the group (account) id.
    #[serde(default, deserialize_with = "id")]
    #[schema(value_type = Option<String>)]
    pub group_id: Option<String>,
    /// `alias`: the id the user had before.
    #[serde(default, deserialize_with = "id")]
    #[schema(value_type = Option<String>)]
    pub previous_id: Option<String>,
    /// When the event happened, by the client's clock (ISO 8601).
    #[serde(default, deserialize_with = "time")]
    pub timestamp: Option<DateTime<Utc>>,
    /// When the client sent the request, by its clock; used to correct skew.
    #[serde(default, deserialize_with = "time")]
    pub sent_at: Option<DateTime<Utc>>,
    #[serde(default, borrow)]
    #[schema(value_type = Option<Object>)]
    pub properties: RawObject<'a>,
    #[serde(default, borrow)]
    #[schema(value_type = Option<Object>)]
    pub traits: RawObject<'a>,
    #[serde(default, borrow)]
    #[schema(value_type = Option<Object>)]
    pub context: RawObject<'a>,
    #[serde(default, borrow)]
    #[schema(value_type = Option<Object>)]
    pub integrations: RawObject<'a>,
    /// The write key, when not sent in `Authorization`.
    #[serde(default)]
    pub write_key: Option<String>,
}

/// A `/v1/batch` request: up to `max-batch-bytes` of messages, each with a
/// `type`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchRequest<'a> {
    #[serde(borrow)]
    #[schema(value_type = Vec<SegmentMessage>)]
    pub batch: Vec<&'a RawValue>,
    /// Context shared by every message; a message's own keys win.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub context: Option<Map<String, Value>>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub integrations: Option<Map<String, Value>>,
    /// When the client sent the batch; applies to messages without their own.
    #[serde(default, deserialize_with = "time")]
    pub sent_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub write_key: Option<String>,
}

/// Only the body's `writeKey`, read when no `Authorization` header came.
#[derive(Deserialize)]
pub struct BodyKey {
    #[serde(default, rename = "writeKey")]
    pub write_key: Option<String>,
}

/// Accepts a string or a number as an id (Segment coerces numbers); empty
/// means absent.
fn id<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    struct IdVisitor;
    impl serde::de::Visitor<'_> for IdVisitor {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a string or a number")
        }
        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok((!v.is_empty()).then(|| v.to_owned()))
        }
        fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
            Ok((!v.is_empty()).then_some(v))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    deserializer.deserialize_any(IdVisitor)
}

/// Reads an ISO 8601 time; empty or null means absent, as for ids.
pub(super) fn time<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<DateTime<Utc>>, D::Error> {
    match Option::<std::borrow::Cow<str>>::deserialize(deserializer)? {
        None => Ok(None),
        Some(text) if text.is_empty() => Ok(None),
        // Strict RFC 3339 first (what SDKs send, and fast), then chrono's
        // more lenient ISO 8601.
        Some(text) => match DateTime::parse_from_rfc3339(&text)
            .map(|time| time.to_utc())
            .or_else(|_| text.parse::<DateTime<Utc>>())
        {
            // ISO 8601 without its expanded years: 0000 to 9999.
            Ok(time) if (0..=9999).contains(&time.year()) => Ok(Some(time)),
            Ok(_) => Err(serde::de::Error::custom(
                "not an ISO 8601 time (the year must be 0000 to 9999)",
            )),
            Err(e) => Err(serde::de::Error::custom(format!(
                "not an ISO 8601 time ({e})"
            ))),
        },
    }
}

/// What the batch-level fields contribute to each message.
#[derive(Default)]
pub struct Shared<'a> {
    pub context: Option<&'a Map<String, Value>>,
    pub integrations: Option<&'a Map<String, Value>>,
    pub sent_at: Option<DateTime<Utc>>,
}

impl EventType {
    fn parse(name: &str) -> Option<EventType> {
        Some(match name {
            "track" => EventType::Track,
            "identify" => EventType::Identify,
            "page" => EventType::Page,
            "screen" => EventType::Screen,
            "group" => EventType::Group,
            "alias" => EventType::Alias,
            _ => return None,
        })
    }
}

/// Parses a single message body.
pub fn parse_message(bytes: &[u8]) -> Result<SegmentMessage<'_>, IngestError> {
    parse_json(bytes)
}

/// Parses a `/v1/batch` body (the messages stay raw until [`normalize_batch`]).
pub fn parse_batch(bytes: &[u8]) -> Result<BatchRequest<'_>, IngestError> {
    parse_json(bytes)
}

/// Checks a message against the rules of `kind` and builds its envelope.
pub fn normalize<'a>(
    message: SegmentMessage<'a>,
    kind: EventType,
    shared: &Shared,
    received_at: DateTime<Utc>,
) -> Result<IngestEnvelope<'a>, IngestError> {
    let required = |value: &Option<String>, field: &str| {
        if value.is_none() {
            Err(IngestError::MissingField {
                field: field.to_owned(),
                hint: None,
            })
        } else {
            Ok(())
        }
    };
    match kind {
        EventType::Alias => {
            required(&message.user_id, "userId")?;
            required(&message.previous_id, "previousId")?;
        }
        _ => {
            if message.user_id.is_none() && message.anonymous_id.is_none() {
                return Err(IngestError::MissingField {
                    field: "userId".into(),
                    hint: Some("send userId or anonymousId"),
                });
            }
        }
    }
    match kind {
        EventType::Track if message.event.as_deref().is_none_or(str::is_empty) => {
            return Err(IngestError::MissingField {
                field: "event".into(),
                hint: None,
            });
        }
        EventType::Group => required(&message.group_id, "groupId")?,
        _ => {}
    }

    let sent_at = message.sent_at.or(shared.sent_at);
    let context = message.context.under(shared.context);
    // RudderStack's SDKs send an identify's traits in `context.traits`
    // (its server reads them from there when `traits` is empty).
    let traits = match kind {
        EventType::Identify if message.traits.is_empty() => {
            context.member("traits").unwrap_or_default()
        }
        _ => message.traits,
    };
    Ok(EventEnvelope {
        kind,
        event: message.event.filter(|_| kind == EventType::Track),
        name: message.name,
        user_id: message.user_id,
        anonymous_id: message.anonymous_id,
        group_id: message.group_id,
        previous_id: message.previous_id,
        message_id: message
            .message_id
            .unwrap_or_else(|| format!("tl-{}", uuid::Uuid::new_v4())),
        timestamp: EventEnvelope::corrected_timestamp(message.timestamp, sent_at, received_at),
        original_timestamp: message.timestamp,
        received_at,
        sent_at,
        properties: message.properties,
        traits,
        context,
        integrations: message.integrations.under(shared.integrations),
        source: Source::Segment,
        traceparent: None,
    })
}

/// Checks and normalizes every message of a batch; the first bad one
/// refuses the whole batch, naming it (`batch[3].userId`).
pub fn normalize_batch<'a>(
    batch: &BatchRequest<'a>,
    max_event_bytes: usize,
    received_at: DateTime<Utc>,
) -> Result<Vec<IngestEnvelope<'a>>, IngestError> {
    normalize_batch_into(batch, max_event_bytes, received_at, |event, _| Ok(event))
}

/// [`normalize_batch`], turning each envelope (with the size of its JSON in
/// the request) into a `T` (its log record) as soon as it is made, so a
/// large batch never holds every envelope at once.
pub fn normalize_batch_into<'a, T>(
    batch: &BatchRequest<'a>,
    max_event_bytes: usize,
    received_at: DateTime<Utc>,
    mut each: impl FnMut(IngestEnvelope<'a>, usize) -> Result<T, IngestError>,
) -> Result<Vec<T>, IngestError> {
    if batch.batch.is_empty() {
        return Err(IngestError::InvalidValue {
            field: "batch".into(),
            message: "must hold at least one message".into(),
        });
    }
    let shared = Shared {
        context: batch.context.as_ref(),
        integrations: batch.integrations.as_ref(),
        sent_at: batch.sent_at,
    };
    batch
        .batch
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            let prefix = format!("batch[{i}]");
            let json = raw.get();
            if json.len() > max_event_bytes {
                return Err(IngestError::EventTooLarge {
                    field: Some(prefix),
                    size: json.len(),
                    limit: max_event_bytes,
                });
            }
            let message: SegmentMessage = parse_json_str(json).map_err(|e| e.within(&prefix))?;
            let kind = match message.kind.as_deref() {
                None | Some("") => {
                    return Err(IngestError::MissingField {
                        field: format!("{prefix}.type"),
                        hint: Some("track, identify, page, screen, group or alias"),
                    });
                }
                Some(name) => EventType::parse(name).ok_or_else(|| IngestError::InvalidValue {
                    field: format!("{prefix}.type"),
                    message: format!(
                        "`{name}` is not a message type; use track, identify, page, screen, group or alias"
                    ),
                })?,
            };
            each(
                normalize(message, kind, &shared, received_at).map_err(|e| e.within(&prefix))?,
                json.len(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        "2026-11-22T10:00:00Z".parse().unwrap()
    }

    /// The envelope as the log stores it and processors read it.
    fn stored(event: IngestEnvelope) -> EventEnvelope {
        serde_json::from_slice(&serde_json::to_vec(&event).unwrap()).unwrap()
    }

    fn track(json: &str) -> Result<EventEnvelope, IngestError> {
        normalize(
            parse_message(json.as_bytes())?,
            EventType::Track,
            &Shared::default(),
            now(),
        )
        .map(stored)
    }

    fn identify(json: &str) -> EventEnvelope {
        normalize(
            parse_message(json.as_bytes()).unwrap(),
            EventType::Identify,
            &Shared::default(),
            now(),
        )
        .map(stored)
        .unwrap()
    }

    #[test]
    fn identify_traits_come_from_traits_else_from_context_traits() {
        let rudder = identify(
            r#"{"userId":"u1","context":{"traits":{"plan":"pro"},"library":{"name":"analytics-python"}}}"#,
        );
        assert_eq!(rudder.traits["plan"], "pro");
        let both = identify(
            r#"{"userId":"u1","traits":{"plan":"free"},"context":{"traits":{"plan":"pro"}}}"#,
        );
        assert_eq!(both.traits["plan"], "free", "top-level traits win");
        let neither = identify(r#"{"userId":"u1","context":{"traits":"x"}}"#);
        assert!(neither.traits.is_empty());
        let tracked =
            track(r#"{"userId":"u1","event":"e","context":{"traits":{"plan":"pro"}}}"#).unwrap();
        assert!(
            tracked.traits.is_empty(),
            "only identify reads context.traits"
        );
    }

    #[test]
    fn a_track_call_keeps_what_it_carries() {
        let e = track(
            r#"{"userId":"u1","event":"Order Completed","properties":{"total":3},
                "context":{"locale":"de"},"integrations":{"All":false},"messageId":"m1"}"#,
        )
        .unwrap();
        assert_eq!(e.user_id.as_deref(), Some("u1"));
        assert_eq!(e.event.as_deref(), Some("Order Completed"));
        assert_eq!(e.properties["total"], 3);
        assert_eq!(e.context["locale"], "de");
        assert_eq!(e.integrations["All"], false);
        assert_eq!(e.message_id, "m1");
        assert_eq!(e.received_at, now());
        assert_eq!(e.timestamp, now());
    }

    #[test]
    fn numeric_ids_become_text_and_a_message_id_is_generated() {
        let e = track(r#"{"userId":42,"event":"x"}"#).unwrap();
        assert_eq!(e.user_id.as_deref(), Some("42"));
        assert!(e.message_id.starts_with("tl-"));
    }

    #[test]
    fn missing_identity_names_the_field() {
        let err = track(r#"{"event":"x"}"#).unwrap_err();
        assert!(
            matches!(&err, IngestError::MissingField { field, .. } if field == "userId"),
            "{err:?}"
        );
        let err = track(r#"{"userId":"","anonymousId":null,"event":"x"}"#).unwrap_err();
        assert!(matches!(err, IngestError::MissingField { .. }));
    }

    #[test]
    fn a_wrong_type_names_the_field() {
        let err = track(r#"{"userId":"u","event":"x","properties":[1]}"#).unwrap_err();
        assert!(
            matches!(&err, IngestError::InvalidType { field, .. } if field == "properties"),
            "{err:?}"
        );
        // Accepted, this would stop the processors, which read it as a map.
        let err = track(r#"{"userId":"u","event":"x","traits":{"n":[1e999]}}"#).unwrap_err();
        assert!(
            matches!(&err, IngestError::InvalidValue { field, message } if field == "traits" && message == "number out of range"),
            "{err:?}"
        );
        let err = track(r#"{"userId":"u","event":"x","timestamp":"yesterday"}"#).unwrap_err();
        assert!(
            matches!(&err, IngestError::InvalidValue { field, .. } if field == "timestamp"),
            "{err:?}"
        );
    }

    #[test]
    fn an_empty_time_is_absent_and_a_year_past_9999_is_refused() {
        let e = track(r#"{"userId":"u","event":"x","timestamp":"","sentAt":""}"#).unwrap();
        assert_eq!(e.timestamp, now(), "no timestamp: the receive time");
        assert_eq!(e.sent_at, None);
        for time in ["-3300-08-02T23:22:23Z", "+10000-01-01T00:00:00Z"] {
            let json = format!(r#"{{"userId":"u","event":"x","timestamp":"{time}"}}"#);
            let err = track(&json).unwrap_err();
            assert!(
                matches!(&err, IngestError::InvalidValue { field, message } if field == "timestamp" && message.contains("0000 to 9999")),
                "{time}: {err:?}"
            );
        }
    }

    #[test]
    fn alias_and_group_need_their_ids() {
        let msg = parse_message(br#"{"userId":"u"}"#).unwrap();
        let err = normalize(msg, EventType::Alias, &Shared::default(), now()).unwrap_err();
        assert!(matches!(&err, IngestError::MissingField { field, .. } if field == "previousId"));
        let msg = parse_message(br#"{"userId":"u"}"#).unwrap();
        let err = normalize(msg, EventType::Group, &Shared::default(), now()).unwrap_err();
        assert!(matches!(&err, IngestError::MissingField { field, .. } if field == "groupId"));
    }

    #[test]
    fn a_bad_batch_item_is_named_by_index() {
        let batch = parse_batch(
            br#"{"batch":[{"type":"track","userId":"u","event":"a"},
                          {"type":"identify","anonymousId":"a"},
                          {"type":"page","userId":"u"},
                          {"type":"track","event":"b"}]}"#,
        )
        .unwrap();
        let err = normalize_batch(&batch, 32 * 1024, now()).unwrap_err();
        assert!(
            matches!(&err, IngestError::MissingField { field, .. } if field == "batch[3].userId"),
            "{err:?}"
        );
    }

    #[test]
    fn batch_context_and_sent_at_apply_to_each_message() {
        let batch = parse_batch(
            br#"{"sentAt":"2026-11-22T11:00:10Z","context":{"library":{"name":"x"},"locale":"fr"},
                 "batch":[{"type":"track","userId":"u","event":"a","timestamp":"2026-11-22T11:00:00Z",
                           "context":{"locale":"de"}}]}"#,
        )
        .unwrap();
        let events: Vec<EventEnvelope> = normalize_batch(&batch, 32 * 1024, now())
            .unwrap()
            .into_iter()
            .map(stored)
            .collect();
        assert_eq!(events[0].context["locale"], "de");
        assert_eq!(events[0].context["library"]["name"], "x");
        assert_eq!(
            events[0].timestamp,
            "2026-11-22T09:59:50Z".parse::<DateTime<Utc>>().unwrap()
        );
    }
}
