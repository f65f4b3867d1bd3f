//! Profile semantics: what a user's events make of their profile. Pure code,
//! no I/O; the store loads profiles, [`Book`] applies a batch of events to
//! them, and the store writes back what changed.
//!
//! Every part of a profile is a merge that does not depend on order: counts
//! add, first/last seen take the minimum/maximum, and every value that can
//! be overwritten (a trait, the context, the user id) is a register that
//! keeps the write with the greatest [`Stamp`] (event time, then message id
//! to break ties). So any arrival order of the same events, and any order of
//! merging two profiles, gives the same profile.

mod book;

pub use book::{Applied, Book, Change, Merge};

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::envelope::{EventEnvelope, EventType};

/// When a write happened: the event's (skew-corrected) time, then its
/// message id, so two writes are never tied.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Stamp {
    #[serde(with = "state_time")]
    pub at: DateTime<Utc>,
    pub message_id: String,
}

impl Stamp {
    pub fn of(event: &EventEnvelope) -> Stamp {
        Stamp {
            at: event.timestamp,
            message_id: event.message_id.clone(),
        }
    }
}

/// Times in a profile's stored state: nanoseconds since the Unix epoch, an
/// integer, which is several times cheaper to write and to read than RFC
/// 3339 text (a state holds a time for every register). A time outside
/// that range (before 1677 or after 2262) is written as text, and states
/// written before, with text, still read.
mod state_time {
    use std::fmt;

    use chrono::{DateTime, Utc};
    use serde::de::{self, Visitor};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(
        time: &DateTime<Utc>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match time.timestamp_nanos_opt() {
            Some(nanos) => serializer.serialize_i64(nanos),
            None => time.serialize(serializer),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<DateTime<Utc>, D::Error> {
        deserializer.deserialize_any(TimeVisitor)
    }

    struct TimeVisitor;

    impl Visitor<'_> for TimeVisitor {
        type Value = DateTime<Utc>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("nanoseconds since the Unix epoch or an RFC 3339 time")
        }

        fn visit_i64<E: de::Error>(self, nanos: i64) -> Result<Self::Value, E> {
            Ok(DateTime::from_timestamp_nanos(nanos))
        }

        fn visit_u64<E: de::Error>(self, nanos: u64) -> Result<Self::Value, E> {
            i64::try_from(nanos)
                .map(DateTime::from_timestamp_nanos)
                .map_err(|_| E::custom("time out of range"))
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
            text.parse().map_err(E::custom)
        }
    }

    /// The same, for an optional time.
    pub mod option {
        use super::*;

        #[derive(Serialize, Deserialize)]
        struct Time(#[serde(with = "super")] DateTime<Utc>);

        pub fn serialize<S: Serializer>(
            time: &Option<DateTime<Utc>>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            time.map(Time).serialize(serializer)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<DateTime<Utc>>, D::Error> {
            Ok(Option::<Time>::deserialize(deserializer)?.map(|t| t.0))
        }
    }
}

/// A value and the stamp of the write that set it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stamped<T> {
    pub stamp: Stamp,
    pub value: T,
}

/// Which write of a register wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wins {
    /// The latest; of two writes by one event, the second.
    Latest,
    /// The earliest (`$set_once`).
    Earliest,
}

use Wins::{Earliest, Latest};

/// A value a register can be written from without copying it first: the
/// register's own type, or a borrowed form of it.
trait WriteFrom<T> {
    fn same_as(&self, value: &T) -> bool;
    fn to_value(&self) -> T;
}

impl<T: Clone + PartialEq> WriteFrom<T> for &T {
    fn same_as(&self, value: &T) -> bool {
        *self == value
    }
    fn to_value(&self) -> T {
        (*self).clone()
    }
}

impl WriteFrom<Option<Value>> for Option<&Value> {
    fn same_as(&self, value: &Option<Value>) -> bool {
        *self == value.as_ref()
    }
    fn to_value(&self) -> Option<Value> {
        self.cloned()
    }
}

impl<T> Stamped<T> {
    /// Takes the write of `value` at `stamp` if it wins over this one.
    fn rewrite(&mut self, stamp: &Stamp, wins: Wins, value: impl WriteFrom<T>) {
        let replaces = match wins {
            Latest => *stamp >= self.stamp,
            Earliest => *stamp < self.stamp,
        };
        if replaces {
            self.stamp.at = stamp.at;
            self.stamp.message_id.clone_from(&stamp.message_id);
            if !value.same_as(&self.value) {
                self.value = value.to_value();
            }
        }
    }
}

/// Writes `value` at `stamp` into a register.
fn write<T>(slot: &mut Option<Stamped<T>>, stamp: &Stamp, wins: Wins, value: impl WriteFrom<T>) {
    match slot {
        Some(current) => current.rewrite(stamp, wins, value),
        None => {
            *slot = Some(Stamped {
                stamp: stamp.clone(),
                value: value.to_value(),
            })
        }
    }
}

/// Writes `value` at `stamp` into the register `map[key]`.
fn write_entry<T>(
    map: &mut BTreeMap<String, Stamped<T>>,
    key: &str,
    stamp: &Stamp,
    wins: Wins,
    value: impl WriteFrom<T>,
) {
    match map.get_mut(key) {
        Some(current) => current.rewrite(stamp, wins, value),
        None => {
            let write = Stamped {
                stamp: stamp.clone(),
                value: value.to_value(),
            };
            map.insert(key.to_owned(), write);
        }
    }
}

fn insert_missing(set: &mut BTreeSet<String>, id: &str) {
    if !set.contains(id) {
        set.insert(id.to_owned());
    }
}

/// The full state of one profile, as the store keeps it. The registers are
/// kept (not only their values) so that later events and merges still
/// resolve by time. [`ProfileView`] is what the API shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// The user id of the latest event that carried one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<Stamped<String>>,
    /// Every id that resolves to this profile: user ids, anonymous ids and
    /// aliased ids.
    pub ids: BTreeSet<String>,
    /// The ids that came as `anonymousId` or an alias's `previousId`.
    pub anonymous_ids: BTreeSet<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "state_time::option"
    )]
    pub first_seen: Option<DateTime<Utc>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "state_time::option"
    )]
    pub last_seen: Option<DateTime<Utc>>,
    pub event_count: u64,
    /// Per event name; calls other than `track` count as `$identify`,
    /// `$page`, `$screen`, `$group` and `$alias`.
    pub event_counts: BTreeMap<String, u64>,
    /// The context of the latest event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Stamped<Map<String, Value>>>,
    /// Traits set by `identify` or `$set`, and removed by `$unset` (a `None`
    /// value is a removal that still wins over older sets).
    #[serde(default)]
    pub traits: BTreeMap<String, Stamped<Option<Value>>>,
    /// Traits set by `$set_once`: the earliest write wins.
    #[serde(default)]
    pub traits_once: BTreeMap<String, Stamped<Value>>,
    /// Computed traits (metrics with a trait name), stamped by the
    /// metric's watermark when it computed them: the latest wins.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub computed: BTreeMap<String, Stamped<Value>>,
}

impl Profile {
    /// Adds one event's effect. The caller has already resolved that the
    /// event belongs to this profile and that it was not applied before.
    ///
    /// Most events repeat what the profile holds (the same user id,
    /// context and event name), so values are compared before they are
    /// copied: a rewrite of an equal value only moves its stamp.
    pub fn apply(&mut self, event: &EventEnvelope) {
        let stamp = Stamp::of(event);
        if event.kind == EventType::Computed {
            // A value computed from the user's events, not an event of
            // theirs: nothing is counted or seen.
            match (event.properties.get("trait"), event.properties.get("value")) {
                // The metric was deleted (or its trait renamed).
                (Some(Value::String(name)), Some(Value::Null)) => {
                    self.computed.remove(name);
                }
                (Some(Value::String(name)), Some(value)) => {
                    write_entry(&mut self.computed, name, &stamp, Latest, value);
                }
                _ => {}
            }
            return;
        }
        if let Some(user_id) = &event.user_id {
            insert_missing(&mut self.ids, user_id);
            write(&mut self.user_id, &stamp, Latest, user_id);
        }
        let linked = [
            event.anonymous_id.as_ref(),
            event
                .previous_id
                .as_ref()
                .filter(|_| event.kind == EventType::Alias),
        ];
        for id in linked.into_iter().flatten() {
            // A `track` with both ids is the user's; it links nothing.
            if event.user_id.is_none() || links_ids(event) {
                insert_missing(&mut self.ids, id);
                insert_missing(&mut self.anonymous_ids, id);
            }
        }
        self.first_seen = Some(
            self.first_seen
                .map_or(event.timestamp, |t| t.min(event.timestamp)),
        );
        self.last_seen = Some(
            self.last_seen
                .map_or(event.timestamp, |t| t.max(event.timestamp)),
        );
        self.event_count += 1;
        let name = count_name(event);
        match self.event_counts.get_mut(name) {
            Some(count) => *count += 1,
            None => {
                self.event_counts.insert(name.to_owned(), 1);
            }
        }
        if !event.context.is_empty() {
            write(&mut self.context, &stamp, Latest, &event.context);
        }
        self.apply_traits(event, &stamp);
    }

    fn apply_traits(&mut self, event: &EventEnvelope, stamp: &Stamp) {
        if event.kind == EventType::Identify {
            for (key, value) in &event.traits {
                write_entry(&mut self.traits, key, stamp, Latest, Some(value));
            }
        }
        if let Some(Value::Object(values)) = event.properties.get("$set") {
            for (key, value) in values {
                write_entry(&mut self.traits, key, stamp, Latest, Some(value));
            }
        }
        if let Some(Value::Object(values)) = event.properties.get("$set_once") {
            for (key, value) in values {
                write_entry(&mut self.traits_once, key, stamp, Earliest, value);
            }
        }
        let unset: Vec<&str> = match event.properties.get("$unset") {
            Some(Value::Array(keys)) => keys.iter().filter_map(Value::as_str).collect(),
            Some(Value::Object(keys)) => keys.keys().map(String::as_str).collect(),
            _ => Vec::new(),
        };
        for key in unset {
            write_entry(&mut self.traits, key, stamp, Latest, None::<&Value>);
        }
    }

    /// Folds `other` into this profile: what either knew, with every
    /// register resolved by stamp, counts added.
    pub fn merge(&mut self, other: Profile) {
        // The registers by the same rule as events write them.
        if let Some(user_id) = &other.user_id {
            write(&mut self.user_id, &user_id.stamp, Latest, &user_id.value);
        }
        if let Some(context) = &other.context {
            write(&mut self.context, &context.stamp, Latest, &context.value);
        }
        for (key, set) in &other.traits {
            write_entry(
                &mut self.traits,
                key,
                &set.stamp,
                Latest,
                set.value.as_ref(),
            );
        }
        for (key, once) in &other.traits_once {
            write_entry(
                &mut self.traits_once,
                key,
                &once.stamp,
                Earliest,
                &once.value,
            );
        }
        for (key, computed) in &other.computed {
            write_entry(
                &mut self.computed,
                key,
                &computed.stamp,
                Latest,
                &computed.value,
            );
        }
        self.ids.extend(other.ids);
        self.anonymous_ids.extend(other.anonymous_ids);
        self.first_seen = min_option(self.first_seen, other.first_seen);
        self.last_seen = self.last_seen.max(other.last_seen);
        self.event_count += other.event_count;
        for (name, count) in other.event_counts {
            *self.event_counts.entry(name).or_default() += count;
        }
    }

    /// The effective traits: a trait's latest `identify`/`$set` value; a
    /// `$set_once` value when the trait was never set, or was unset before
    /// the `$set_once`.
    pub fn effective_traits(&self) -> Map<String, Value> {
        self.effective_trait_refs()
            .into_iter()
            .map(|(key, value)| (key.to_owned(), value.clone()))
            .collect()
    }

    fn effective_trait_refs(&self) -> BTreeMap<&str, &Value> {
        let mut out = BTreeMap::new();
        for (key, once) in &self.traits_once {
            match self.traits.get(key) {
                Some(set) if set.stamp >= once.stamp || set.value.is_some() => {}
                _ => {
                    out.insert(key.as_str(), &once.value);
                }
            }
        }
        for (key, set) in &self.traits {
            if let Some(value) = &set.value {
                out.insert(key.as_str(), value);
            }
        }
        out
    }

    /// The view as JSON, exactly as [`ProfileView`] serializes, written
    /// from the state instead of from a copy of it (the store writes a view
    /// before and after for every profile a batch changes).
    pub fn view_json(&self) -> String {
        let user_id = self.user_id.as_ref().map(|u| u.value.as_str());
        let view = ViewRef {
            user_id,
            anonymous_ids: self
                .anonymous_ids
                .iter()
                .map(String::as_str)
                .filter(|id| Some(*id) != user_id)
                .collect(),
            first_seen: self.first_seen,
            last_seen: self.last_seen,
            event_count: self.event_count,
            event_counts: &self.event_counts,
            context: self.context.as_ref().map(|c| &c.value),
            traits: self.effective_trait_refs(),
            computed: self
                .computed
                .iter()
                .map(|(k, v)| (k.as_str(), &v.value))
                .collect(),
        };
        // Strings, numbers and maps with string keys always serialize.
        serde_json::to_string(&view).unwrap_or_else(|_| "null".to_owned())
    }

    /// The profile as the query API shows it.
    pub fn view(&self) -> ProfileView {
        let user_id = self.user_id.as_ref().map(|u| u.value.clone());
        ProfileView {
            anonymous_ids: self
                .anonymous_ids
                .iter()
                .filter(|id| Some(*id) != user_id.as_ref())
                .cloned()
                .collect(),
            user_id,
            first_seen: self.first_seen,
            last_seen: self.last_seen,
            event_count: self.event_count,
            event_counts: self.event_counts.clone(),
            context: self
                .context
                .as_ref()
                .map(|c| c.value.clone())
                .unwrap_or_default(),
            traits: self.effective_traits(),
            computed: self
                .computed
                .iter()
                .map(|(k, v)| (k.clone(), v.value.clone()))
                .collect(),
        }
    }
}

/// Whether an event links its ids into one profile: an `alias`, or an
/// `identify` that carries both a user id and an anonymous id.
pub fn links_ids(event: &EventEnvelope) -> bool {
    match event.kind {
        EventType::Alias => event.previous_id.is_some(),
        EventType::Identify => event.user_id.is_some() && event.anonymous_id.is_some(),
        _ => false,
    }
}

fn count_name(event: &EventEnvelope) -> &str {
    match (event.kind, &event.event) {
        (EventType::Track, Some(name)) => name,
        (EventType::Track, None) => "$track",
        (EventType::Identify, _) => "$identify",
        (EventType::Page, _) => "$page",
        (EventType::Screen, _) => "$screen",
        (EventType::Group, _) => "$group",
        (EventType::Alias, _) => "$alias",
        (EventType::Delete, _) => "$delete",
        (EventType::Computed, _) => "$computed",
    }
}

fn min_option<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// [`ProfileView`]'s fields borrowed from a [`Profile`], in its order.
#[derive(Serialize)]
struct ViewRef<'a> {
    user_id: Option<&'a str>,
    anonymous_ids: Vec<&'a str>,
    first_seen: Option<DateTime<Utc>>,
    last_seen: Option<DateTime<Utc>>,
    event_count: u64,
    event_counts: &'a BTreeMap<String, u64>,
    #[serde(serialize_with = "map_or_empty")]
    context: Option<&'a Map<String, Value>>,
    traits: BTreeMap<&'a str, &'a Value>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    computed: BTreeMap<&'a str, &'a Value>,
}

fn map_or_empty<S: serde::Serializer>(
    map: &Option<&Map<String, Value>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match map {
        Some(map) => map.serialize(serializer),
        None => serializer.collect_map(std::iter::empty::<(&str, &Value)>()),
    }
}

/// A profile as the query API returns it. These field names are fixed by
/// the design; fields may be added.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProfileView {
    /// The user id of the latest event that carried one.
    pub user_id: Option<String>,
    /// Other ids linked to the profile (anonymous ids, aliased ids).
    pub anonymous_ids: Vec<String>,
    pub first_seen: Option<DateTime<Utc>>,
    pub last_seen: Option<DateTime<Utc>>,
    /// Every event applied to the profile, each counted once.
    pub event_count: u64,
    /// Per event name (`track`'s event; `$identify`, `$page`, ... for other
    /// calls).
    pub event_counts: BTreeMap<String, u64>,
    /// The context of the latest event (`client_os`, `client_version`,
    /// `library`, `locale`, `userAgent`, ...).
    #[schema(value_type = Object)]
    pub context: Map<String, Value>,
    /// Effective traits from `identify`, `$set`, `$set_once`, `$unset`.
    #[schema(value_type = Object)]
    pub traits: Map<String, Value>,
    /// Computed traits: metrics with a trait name, by that name (left out
    /// when there are none).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    #[schema(value_type = Object)]
    pub computed: Map<String, Value>,
}

#[cfg(test)]
mod tests;
