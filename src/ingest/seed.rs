//! The seed route, `POST /event/user/track`, kept compatible with the
//! original trait service: `{"key": "landing.user.home.click", "payload":
//! {"client_os": "iOS", "client_version": "1.0.0"}}`.
//!
//! It becomes a `track` envelope: `key` is the event name, `payload` the
//! properties, and the seed's `client_os` / `client_version` also go into
//! the context, where profiles read the last context from.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::error::{IngestError, parse_json};
use crate::envelope::{EventEnvelope, EventType, Source};

/// A user event of the seed API.
#[derive(Debug, Deserialize, ToSchema)]
pub struct SeedEvent {
    /// What happened, as dot-separated segments from the general to the
    /// specific: version, where, who, what (`v1.landing.user.order.create`).
    #[schema(
        example = "landing.user.home.click",
        max_length = 255,
        pattern = r"^[a-z0-9][a-z0-9_]*(\.[a-z0-9][a-z0-9_]*)+$"
    )]
    pub key: String,
    /// Free-form details; `client_os` and `client_version`, when present,
    /// must be strings.
    #[serde(default)]
    #[schema(value_type = Object, example = json!({"client_os": "iOS", "client_version": "1.0.0"}))]
    pub payload: Map<String, Value>,
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub anonymous_id: Option<String>,
    /// Unique per event; generated when absent.
    #[serde(default)]
    pub message_id: Option<String>,
    /// When it happened; the receive time when absent.
    #[serde(default, deserialize_with = "super::segment::time")]
    pub timestamp: Option<DateTime<Utc>>,
}

/// The seed's typed payload fields: strings when present.
const STRING_FIELDS: [&str; 2] = ["client_os", "client_version"];

/// The rule an event key must follow, as told to clients.
pub const KEY_RULE: &str = "must be two or more dot-separated segments of lowercase letters a-z, digits and underscores, each starting with a letter or digit, e.g. v1.landing.user.order.create";

/// Whether `key` follows [`KEY_RULE`].
pub fn valid_key(key: &str) -> bool {
    key.len() <= 255
        && key.split('.').count() >= 2
        && key.split('.').all(|segment| {
            segment
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
}

/// Parses and checks a seed event and builds its envelope.
pub fn parse(bytes: &[u8], received_at: DateTime<Utc>) -> Result<EventEnvelope, IngestError> {
    let event: SeedEvent = parse_json(bytes)?;
    if !valid_key(&event.key) {
        return Err(IngestError::InvalidValue {
            field: "key".into(),
            message: format!("`{}` {KEY_RULE}", truncate(&event.key)),
        });
    }
    let mut context = Map::new();
    for name in STRING_FIELDS {
        match event.payload.get(name) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => {
                context.insert(name.to_owned(), Value::String(s.clone()));
            }
            Some(other) => {
                return Err(IngestError::InvalidType {
                    field: format!("payload.{name}"),
                    message: format!("must be a string, not {}", json_type(other)),
                });
            }
        }
    }
    Ok(EventEnvelope {
        kind: EventType::Track,
        event: Some(event.key),
        name: None,
        user_id: event.user_id.filter(|s| !s.is_empty()),
        anonymous_id: event.anonymous_id.filter(|s| !s.is_empty()),
        group_id: None,
        previous_id: None,
        message_id: event
            .message_id
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("tl-{}", uuid::Uuid::new_v4())),
        timestamp: event.timestamp.unwrap_or(received_at),
        original_timestamp: event.timestamp,
        received_at,
        sent_at: None,
        properties: event.payload,
        traits: Map::new(),
        context,
        integrations: Map::new(),
        source: Source::Seed,
        traceparent: None,
    })
}

fn truncate(s: &str) -> String {
    if s.chars().count() > 64 {
        format!("{}…", s.chars().take(64).collect::<String>())
    } else {
        s.to_owned()
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_rule() {
        for good in [
            "landing.user.home.click",
            "v1.landing.user.order.create",
            "checkout.order_item.create",
            "checkout.order__item_.create",
            "2fa.user.enable",
            "a.b",
        ] {
            assert!(valid_key(good), "{good}");
        }
        for bad in [
            "Landing.user",
            "landing.User.click",
            "landing",
            "landing..click",
            "landing.user.",
            "landing._x",
            "_landing.x",
            "landing user.click",
            "landing-page.click",
            "",
        ] {
            assert!(!valid_key(bad), "{bad}");
        }
    }

    #[test]
    fn client_fields_go_to_properties_and_context() {
        let e = parse(
            br#"{"key":"landing.user.home.click","payload":{"client_os":"iOS","client_version":"1.0.0","x":1},"user_id":"u1"}"#,
            Utc::now(),
        )
        .unwrap();
        assert_eq!(e.event.as_deref(), Some("landing.user.home.click"));
        assert_eq!(e.properties["x"], 1);
        assert_eq!(e.context["client_os"], "iOS");
        assert_eq!(e.context["client_version"], "1.0.0");
        assert_eq!(e.record_key(), Some("u1"));
    }

    #[test]
    fn a_numeric_client_os_names_the_field() {
        let err = parse(
            br#"{"key":"landing.user.home.click","payload":{"client_os":33}}"#,
            Utc::now(),
        )
        .unwrap_err();
        assert!(
            matches!(&err, IngestError::InvalidType { field, .. } if field == "payload.client_os"),
            "{err:?}"
        );
    }
}
