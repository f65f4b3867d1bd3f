//! The normalized event envelope: the one shape every accepted event takes
//! in the log, whichever route it came in by.
//!
//! It is plain JSON with Segment's field names, so that any Kafka client
//! (kcat, Kafka Connect, a Java consumer) can read `user_events` without
//! Traitline's code.

use chrono::{DateTime, Datelike, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// What kind of call an event is, as in Segment's spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Track,
    Identify,
    Page,
    Screen,
    Group,
    Alias,
}

/// The API an event came in by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The Segment Tracking API (`/v1/...`).
    Segment,
    /// The seed route `POST /event/user/track`.
    Seed,
}

/// One accepted event, as stored in `user_events`.
///
/// `timestamp` is the event's time corrected for client clock skew;
/// `originalTimestamp` is what the client said. The record key in the log
/// is [`EventEnvelope::record_key`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventEnvelope {
    #[serde(rename = "type")]
    pub kind: EventType,
    /// The event name of a `track` call (the seed route's `key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// The page or screen name of a `page` or `screen` call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous_id: Option<String>,
    /// The group of a `group` call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// The former id of an `alias` call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_id: Option<String>,
    /// Unique per event; the client's, or generated at ingest. Retries of
    /// one event carry the same id, which is how they are deduplicated.
    pub message_id: String,
    /// When the event happened, corrected for client clock skew.
    pub timestamp: DateTime<Utc>,
    /// The timestamp the client sent, uncorrected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_timestamp: Option<DateTime<Utc>>,
    /// When Traitline received the request.
    pub received_at: DateTime<Utc>,
    /// When the client says it sent the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    #[schema(value_type = Object)]
    pub properties: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    #[schema(value_type = Object)]
    pub traits: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    #[schema(value_type = Object)]
    pub context: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    #[schema(value_type = Object)]
    pub integrations: Map<String, Value>,
    pub source: Source,
}

impl EventEnvelope {
    /// The log record key: the user id, else the anonymous id. Every event
    /// of one user shares a key, so it lands on one partition, in order.
    pub fn record_key(&self) -> Option<&str> {
        self.user_id.as_deref().or(self.anonymous_id.as_deref())
    }

    /// Segment's clock-skew correction: the client's clock may be wrong, but
    /// the time between its `timestamp` and `sentAt` is right, so the event
    /// happened that long before Traitline received it. A correction that
    /// leaves the years 0000-9999 (a nonsense `sentAt`) keeps the client's
    /// own timestamp.
    pub fn corrected_timestamp(
        original: Option<DateTime<Utc>>,
        sent_at: Option<DateTime<Utc>>,
        received_at: DateTime<Utc>,
    ) -> DateTime<Utc> {
        match (original, sent_at) {
            (Some(original), Some(sent)) => received_at
                .checked_sub_signed(sent - original)
                .filter(|t| (0..=9999).contains(&t.year()))
                .unwrap_or(original),
            (Some(original), None) => original,
            (None, _) => received_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn skew_is_removed_when_sent_at_is_known() {
        // The client clock runs one hour fast: it says it sent at 11:00:05
        // an event from 11:00:00; we received it at 10:00:06.
        let t = EventEnvelope::corrected_timestamp(
            Some(at("2026-11-20T11:00:00Z")),
            Some(at("2026-11-20T11:00:05Z")),
            at("2026-11-20T10:00:06Z"),
        );
        assert_eq!(t, at("2026-11-20T10:00:01Z"));
    }

    #[test]
    fn without_sent_at_the_client_timestamp_stands() {
        let t = EventEnvelope::corrected_timestamp(
            Some(at("2026-11-20T11:00:00Z")),
            None,
            at("2026-11-20T10:00:06Z"),
        );
        assert_eq!(t, at("2026-11-20T11:00:00Z"));
    }

    #[test]
    fn a_correction_past_the_year_0000_keeps_the_client_timestamp() {
        let original = at("0001-01-01T00:00:00Z");
        let t = EventEnvelope::corrected_timestamp(
            Some(original),
            Some(at("9999-01-01T00:00:00Z")),
            at("2026-11-20T10:00:06Z"),
        );
        assert_eq!(t, original);
    }

    #[test]
    fn without_a_timestamp_the_receive_time_is_used() {
        let received = at("2026-11-20T10:00:06Z");
        let t =
            EventEnvelope::corrected_timestamp(None, Some(at("2026-11-20T11:00:05Z")), received);
        assert_eq!(t, received);
    }
}
