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
    /// Not a Segment call: a GDPR deletion of a user, recorded in the log
    /// in order with the user's events (keyed like them), so any rebuild
    /// from the log deletes the user again at the same point. Its
    /// `properties.ids` lists every id the deleted profile had.
    Delete,
    /// Not a Segment call: a computed trait's new value, from a metric with
    /// a trait name, put in the log (keyed by the user) after the events
    /// that made it, so the profile takes it in order like any change.
    /// `properties` holds `trait`, `value`, `metric` and `version`.
    Computed,
}

impl EventType {
    /// The name on the wire (`track`, `identify`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Track => "track",
            EventType::Identify => "identify",
            EventType::Page => "page",
            EventType::Screen => "screen",
            EventType::Group => "group",
            EventType::Alias => "alias",
            EventType::Delete => "delete",
            EventType::Computed => "computed",
        }
    }

    /// Whether clients send events of this type (Traitline writes the
    /// others itself).
    pub fn is_segment_call(self) -> bool {
        !matches!(self, EventType::Delete | EventType::Computed)
    }
}

/// The API an event came in by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The Segment Tracking API (`/v1/...`).
    Segment,
    /// The seed route `POST /event/user/track`.
    Seed,
    /// The admin API (a deletion).
    Admin,
    /// A metric's computed trait.
    Metric,
}

/// A JSON object field of an envelope (`properties`, `traits`, `context`,
/// `integrations`): left out of the JSON when empty.
pub trait JsonObject {
    fn is_empty(&self) -> bool;
}

impl JsonObject for Map<String, Value> {
    fn is_empty(&self) -> bool {
        Map::is_empty(self)
    }
}

/// The map of a JSON object; anything else is an empty map.
fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// One accepted event, as stored in `user_events`.
///
/// `timestamp` is the event's time corrected for client clock skew;
/// `originalTimestamp` is what the client said. The record key in the log
/// is [`EventEnvelope::record_key`].
///
/// Its objects are maps (`O`) where events are read; ingest, which only
/// passes them on, keeps the client's text
/// ([`crate::ingest::object::RawObject`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(
    rename_all = "camelCase",
    bound(
        serialize = "O: Serialize + JsonObject",
        deserialize = "O: Deserialize<'de> + Default"
    )
)]
#[schema(bound = "")]
pub struct EventEnvelope<O = Map<String, Value>> {
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
    #[serde(serialize_with = "rfc3339::write")]
    pub timestamp: DateTime<Utc>,
    /// The timestamp the client sent, uncorrected.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "rfc3339::write_some"
    )]
    pub original_timestamp: Option<DateTime<Utc>>,
    /// When Traitline received the request.
    #[serde(serialize_with = "rfc3339::write")]
    pub received_at: DateTime<Utc>,
    /// When the client says it sent the request.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "rfc3339::write_some"
    )]
    pub sent_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "JsonObject::is_empty")]
    #[schema(value_type = Object)]
    pub properties: O,
    #[serde(default, skip_serializing_if = "JsonObject::is_empty")]
    #[schema(value_type = Object)]
    pub traits: O,
    #[serde(default, skip_serializing_if = "JsonObject::is_empty")]
    #[schema(value_type = Object)]
    pub context: O,
    #[serde(default, skip_serializing_if = "JsonObject::is_empty")]
    #[schema(value_type = Object)]
    pub integrations: O,
    pub source: Source,
    /// The W3C trace context of the request that stored the event, when
    /// Traitline exports spans (`otlp-endpoint`): the processor's work on
    /// the event joins that request's trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl<O> EventEnvelope<O> {
    /// The log record key: the user id, else the anonymous id. Every event
    /// of one user shares a key, so it lands on one partition, in order.
    pub fn record_key(&self) -> Option<&str> {
        self.user_id.as_deref().or(self.anonymous_id.as_deref())
    }
}

impl EventEnvelope {
    /// An envelope of `kind` with the id `message_id` that happened and
    /// was received at `at`, and nothing else: the start of an envelope
    /// Traitline makes itself (a deletion record, a benchmark's, a test's),
    /// filled in with the methods below.
    pub fn new(kind: EventType, message_id: impl Into<String>, at: DateTime<Utc>) -> EventEnvelope {
        EventEnvelope {
            kind,
            event: None,
            name: None,
            user_id: None,
            anonymous_id: None,
            group_id: None,
            previous_id: None,
            message_id: message_id.into(),
            timestamp: at,
            original_timestamp: None,
            received_at: at,
            sent_at: None,
            properties: Map::new(),
            traits: Map::new(),
            context: Map::new(),
            integrations: Map::new(),
            source: Source::Segment,
            traceparent: None,
        }
    }

    /// With the user id `id`.
    pub fn user(mut self, id: impl Into<String>) -> EventEnvelope {
        self.user_id = Some(id.into());
        self
    }

    /// With the anonymous id `id`.
    pub fn anonymous(mut self, id: impl Into<String>) -> EventEnvelope {
        self.anonymous_id = Some(id.into());
        self
    }

    /// With the event name `name` (a `track`'s).
    pub fn named(mut self, name: impl Into<String>) -> EventEnvelope {
        self.event = Some(name.into());
        self
    }

    /// With the former id `id` (an `alias`'s).
    pub fn previous(mut self, id: impl Into<String>) -> EventEnvelope {
        self.previous_id = Some(id.into());
        self
    }

    /// With `properties` (a JSON object; anything else is none).
    pub fn properties(mut self, properties: Value) -> EventEnvelope {
        self.properties = object(properties);
        self
    }

    /// With `traits` (a JSON object; anything else is none).
    pub fn traits(mut self, traits: Value) -> EventEnvelope {
        self.traits = object(traits);
        self
    }

    /// With `context` (a JSON object; anything else is none).
    pub fn context(mut self, context: Value) -> EventEnvelope {
        self.context = object(context);
        self
    }

    /// The deletion record of a profile whose ids are `ids` (its user id,
    /// when it has one, first), deleted at `at`.
    pub fn deletion(user_id: Option<String>, ids: Vec<String>, at: DateTime<Utc>) -> EventEnvelope {
        let anonymous_id = match user_id {
            Some(_) => None,
            None => ids.first().cloned(),
        };
        let mut deletion = EventEnvelope::new(
            EventType::Delete,
            format!("tl-delete-{}", uuid::Uuid::new_v4()),
            at,
        )
        .properties(serde_json::json!({ "ids": ids }));
        deletion.user_id = user_id;
        deletion.anonymous_id = anonymous_id;
        deletion.source = Source::Admin;
        deletion
    }

    /// The ids a deletion record deletes: its user or anonymous id and
    /// every id in `properties.ids`.
    pub fn deleted_ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self
            .user_id
            .iter()
            .chain(self.anonymous_id.iter())
            .map(String::as_str)
            .chain(
                self.properties
                    .get("ids")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str),
            )
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
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

/// Writes times as chrono's serde does (RFC 3339 in UTC with a `Z`, a
/// fraction of 3, 6 or 9 digits only when there is one), without its
/// formatting machinery: every event carries up to four times, and writing
/// them was a tenth of the ingest's work.
pub(crate) mod rfc3339 {
    use chrono::{DateTime, Datelike, Timelike, Utc};
    use serde::{Serialize, Serializer};

    pub fn write<S: Serializer>(time: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
        let mut buffer = [0u8; 30];
        match format(time, &mut buffer) {
            Some(text) => serializer.serialize_str(text),
            None => time.serialize(serializer),
        }
    }

    pub fn write_some<S: Serializer>(
        time: &Option<DateTime<Utc>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match time {
            Some(time) => write(time, serializer),
            None => serializer.serialize_none(),
        }
    }

    /// The text of `time`, or `None` for what chrono writes differently (a
    /// year past 9999, a leap second).
    pub(super) fn format<'b>(time: &DateTime<Utc>, buffer: &'b mut [u8; 30]) -> Option<&'b str> {
        // DateTime<Utc>'s own getters each work out the UTC date again.
        let time = time.naive_utc();
        let year = u32::try_from(time.year()).ok().filter(|y| *y <= 9999)?;
        let nanos = time.nanosecond();
        if nanos >= 1_000_000_000 {
            return None;
        }
        for (at, value, width) in [
            (0, year, 4),
            (5, time.month(), 2),
            (8, time.day(), 2),
            (11, time.hour(), 2),
            (14, time.minute(), 2),
            (17, time.second(), 2),
        ] {
            put_digits(&mut buffer[at..at + width], value);
        }
        buffer[4] = b'-';
        buffer[7] = b'-';
        buffer[10] = b'T';
        buffer[13] = b':';
        buffer[16] = b':';
        let mut at = 19;
        if nanos != 0 {
            let (fraction, width) = if nanos.is_multiple_of(1_000_000) {
                (nanos / 1_000_000, 3)
            } else if nanos.is_multiple_of(1_000) {
                (nanos / 1_000, 6)
            } else {
                (nanos, 9)
            };
            buffer[at] = b'.';
            put_digits(&mut buffer[at + 1..at + 1 + width], fraction);
            at += 1 + width;
        }
        buffer[at] = b'Z';
        std::str::from_utf8(&buffer[..=at]).ok()
    }

    /// Milliseconds since the epoch of `text`, an RFC 3339 time, as
    /// chrono reads it (`None` where chrono refuses it). The form
    /// Traitline writes (`2026-11-20T11:00:00.250Z`) is read directly:
    /// every runner reads two times an event, and chrono's parser was
    /// a few per cent of a metric's CPU. Any other form goes to chrono.
    pub fn millis(text: &str) -> Option<i64> {
        utc_millis(text.as_bytes()).or_else(|| {
            DateTime::parse_from_rfc3339(text)
                .ok()
                .map(|t| t.timestamp_millis())
        })
    }

    /// `YYYY-MM-DDTHH:MM:SS[.f{1,9}]Z`, a valid date and time, in
    /// milliseconds; `None` for anything else (a leap second included).
    pub(super) fn utc_millis(text: &[u8]) -> Option<i64> {
        let [date @ .., b'Z'] = text else {
            return None;
        };
        if date.len() < 19
            || date[4] != b'-'
            || date[7] != b'-'
            || date[10] != b'T'
            || date[13] != b':'
            || date[16] != b':'
        {
            return None;
        }
        let number = |from: usize, to: usize| {
            date[from..to].iter().try_fold(0_i64, |n, c| {
                c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0'))
            })
        };
        let (year, month, day) = (number(0, 4)?, number(5, 7)?, number(8, 10)?);
        let (hour, minute, second) = (number(11, 13)?, number(14, 16)?, number(17, 19)?);
        let millis = match &date[19..] {
            [] => 0,
            [b'.', fraction @ ..]
                if (1..=9).contains(&fraction.len()) && fraction.iter().all(u8::is_ascii_digit) =>
            {
                let digits = fraction.len().min(3);
                number(20, 20 + digits)? * 10_i64.pow(3 - digits as u32)
            }
            _ => return None,
        };
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
        let month_days = match month {
            2 if leap => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            1..=12 => 31,
            _ => return None,
        };
        if day == 0 || day > month_days || hour > 23 || minute > 59 || second > 59 {
            return None;
        }
        // Days from the civil date (Howard Hinnant's algorithm: years from
        // March, so a leap day ends its year).
        let y = if month <= 2 { year - 1 } else { year };
        let era = y.div_euclid(400);
        let year_of_era = y - era * 400;
        let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
        let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
        let days = era * 146_097 + day_of_era - 719_468;
        Some(((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + millis)
    }

    /// Writes `value` in decimal into all of `out`, zero-padded.
    fn put_digits(out: &mut [u8], mut value: u32) {
        for digit in out.iter_mut().rev() {
            *digit = b'0' + (value % 10) as u8;
            value /= 10;
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
    fn a_types_name_is_its_name_on_the_wire() {
        for kind in [
            EventType::Track,
            EventType::Identify,
            EventType::Page,
            EventType::Screen,
            EventType::Group,
            EventType::Alias,
        ] {
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
    }

    #[test]
    fn times_are_written_as_chrono_writes_them() {
        for text in [
            "2026-11-20T11:00:00Z",
            "2026-11-20T11:00:00.250Z",
            "0000-01-01T00:00:00.000001Z",
            "9999-12-31T23:59:59.999999999Z",
            "1970-01-01T00:00:00.120000Z",
        ] {
            let time = at(text);
            let mut buffer = [0u8; 30];
            let ours = rfc3339::format(&time, &mut buffer).unwrap();
            assert_eq!(ours, serde_json::to_value(time).unwrap(), "{text}");
            assert_eq!(at(ours), time);
        }
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
            .unwrap()
            .and_utc();
        assert_eq!(rfc3339::format(&leap, &mut [0u8; 30]), None, "chrono's own");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]

        /// Any text of the written form, valid or not (month 13, February
        /// 30th, hour 24, second 60, ten fraction digits), reads as
        /// chrono reads it; each valid one without chrono.
        #[test]
        fn times_are_read_as_chrono_reads_them(
            year in 0_u32..=9999,
            month in 0_u32..=13,
            day in 0_u32..=32,
            hour in 0_u32..=24,
            minute in 0_u32..=60,
            second in 0_u32..=60,
            fraction in proptest::option::of("[0-9]{0,10}"),
            other_form in proptest::bool::weighted(0.1),
        ) {
            let fraction = fraction.map(|f| format!(".{f}")).unwrap_or_default();
            let zone = if other_form { "+02:00" } else { "Z" };
            let text = format!(
                "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}{fraction}{zone}"
            );
            let chrono = DateTime::parse_from_rfc3339(&text).ok().map(|t| t.timestamp_millis());
            proptest::prop_assert_eq!(rfc3339::millis(&text), chrono, "{}", text);
            let written_form = !other_form && second < 60 && fraction.len() != 1 && fraction.len() <= 10;
            proptest::prop_assert_eq!(
                rfc3339::utc_millis(text.as_bytes()),
                chrono.filter(|_| written_form),
                "{}", text
            );
        }
    }

    #[test]
    fn odd_times_are_read_as_chrono_reads_them() {
        for text in [
            "1969-12-31T23:59:59.999Z",
            "0000-03-01T00:00:00Z",
            "2000-02-29T12:00:00Z",
            "1900-02-29T12:00:00Z",
            "2026-11-20t11:00:00z",
            "2026-11-20 11:00:00Z",
            "2026-11-20T11:00Z",
            "2016-12-31T23:59:60Z",
            "",
            "Z",
        ] {
            let chrono = DateTime::parse_from_rfc3339(text)
                .ok()
                .map(|t| t.timestamp_millis());
            assert_eq!(rfc3339::millis(text), chrono, "{text}");
        }
        assert_eq!(
            rfc3339::millis("2026-11-20T11:00:00.250Z"),
            Some(1_795_172_400_250)
        );
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
