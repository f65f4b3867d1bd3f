//! A metric over events: which events a definition takes, what group and
//! value each gives, and the window engine they feed. Pure code, no I/O:
//! the metrics processor hands it envelopes (as JSON, parsed once for all
//! metrics) and the partition clocks, and stores what comes out.
//!
//! Per-user metrics are final per partition (a user's events share one).
//! Metrics grouped otherwise (globally, or by a property) are combined
//! across partitions by [`combine::Combiner`]: a window is final once every
//! partition's watermark has passed it.

pub mod combine;

use std::borrow::Cow;
use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use serde_json::Value;

use crate::definitions::{Envelope, GroupBy, MetricSpec};
use crate::windows::{
    Closed, Engine, GroupState, Millis, Observed, OpenWindow, Partial, Span, Stamp,
};

/// The group of a metric without a group-by.
pub const GLOBAL_GROUP: &str = "*";

/// [`GLOBAL_GROUP`], shared by every event of every global metric.
static GLOBAL_KEY: LazyLock<Arc<str>> = LazyLock::new(|| GLOBAL_GROUP.into());

/// A group or key as the metrics' and rules' batch steps hold it: an
/// event's user id is made once and shared by all of them.
pub type Key = Arc<str>;

/// What became of one event for one metric.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The definition does not take this event (type, name or `where`).
    NotSelected,
    /// Taken, but it has no value for the group-by (a per-user metric and
    /// an event without a user, a property group-by and no such property).
    NoGroup,
    /// Given to the engine as `group`.
    Observed { group: Key, observed: Observed },
}

/// The envelope fields every metric looks at, read once an event.
#[derive(Debug, Clone, Default)]
pub struct Head<'a> {
    /// `type`.
    pub kind: Option<&'a str>,
    /// `event` (a track's name).
    pub event: Option<&'a str>,
    /// `userId` and `anonymousId`, when not empty.
    pub user: Option<&'a str>,
    pub anonymous: Option<&'a str>,
    /// `user` and `anonymous` as [`Key`]s, made when first asked for.
    user_key: OnceCell<Key>,
    anonymous_key: OnceCell<Key>,
}

impl<'a> Head<'a> {
    pub fn of(envelope: &'a Envelope) -> Head<'a> {
        let text = |name: &str| envelope.text(name);
        Head {
            kind: text("type"),
            event: text("event"),
            user: text("userId").filter(|id| !id.is_empty()),
            anonymous: text("anonymousId").filter(|id| !id.is_empty()),
            ..Head::default()
        }
    }

    /// `userId` as a key, the one copy every metric and rule of the event
    /// shares.
    pub fn user_key(&self) -> Option<Key> {
        let user = self.user?;
        Some(self.user_key.get_or_init(|| user.into()).clone())
    }

    /// `anonymousId` as a key, shared as [`Head::user_key`] is.
    pub fn anonymous_key(&self) -> Option<Key> {
        let anonymous = self.anonymous?;
        Some(self.anonymous_key.get_or_init(|| anonymous.into()).clone())
    }
}

/// One version of a metric over the events of the partitions it is fed.
#[derive(Debug)]
pub struct Metric {
    pub spec: MetricSpec,
    pub version: i64,
    engine: Engine,
}

impl Metric {
    pub fn new(spec: MetricSpec, version: i64) -> Metric {
        let engine = Engine::new(spec.window, spec.aggregate, spec.lateness);
        Metric {
            spec,
            version,
            engine,
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// Whether the definition takes this event. Records Traitline writes
    /// itself (deletions, computed traits) are never a metric's events.
    fn selects_head(&self, head: &Head, envelope: &Envelope) -> bool {
        if matches!(head.kind, Some("delete" | "computed")) {
            return false;
        }
        if let Some(kind) = self.spec.kind
            && head.kind != Some(kind.as_str())
        {
            return false;
        }
        if let Some(event) = &self.spec.event
            && head.event != Some(event.as_str())
        {
            return false;
        }
        self.spec
            .condition
            .as_ref()
            .is_none_or(|c| c.matches_event(envelope))
    }

    /// The group an event counts in. A per-user metric groups by `userId`,
    /// else by `anonymousId` (merged into the user's group when the ids
    /// are linked); a property group-by by its value, strings as they are
    /// and anything else as JSON text.
    fn group_head(&self, head: &Head, envelope: &Envelope) -> Option<Key> {
        match &self.spec.group_by {
            GroupBy::Global => Some(GLOBAL_KEY.clone()),
            GroupBy::User => head.user_key().or_else(|| head.anonymous_key()),
            GroupBy::Field(path) => {
                if let Some(text) = envelope.path_text(path) {
                    return Some(text.into());
                }
                match envelope.path(path)?.as_ref() {
                    Value::Null => None,
                    Value::String(s) => Some(s.as_str().into()),
                    other => Some(other.to_string().into()),
                }
            }
        }
    }

    /// Takes one event in.
    pub fn observe(&mut self, envelope: &Envelope) -> Outcome {
        let head = Head::of(envelope);
        if !self.selects_head(&head, envelope) {
            return Outcome::NotSelected;
        }
        match self.group_head(&head, envelope) {
            Some(group) => self.observe_in(group, stamp(envelope).as_ref(), envelope),
            None => Outcome::NoGroup,
        }
    }

    /// The group an event this definition takes counts in, if any: what
    /// [`Metric::observe`] would give it to, so its state can be read back
    /// from the store first. The envelope's [`Head`] is read once for
    /// every metric.
    pub fn selected_group(&self, head: &Head, envelope: &Envelope) -> Option<Key> {
        self.selects_head(head, envelope)
            .then(|| self.group_head(head, envelope))
            .flatten()
    }

    /// Takes in an event of `group` (from [`Metric::selected_group`]) and
    /// its [`stamp`], worked out once for every metric.
    pub fn observe_in(
        &mut self,
        group: Key,
        stamp: Option<&Stamp>,
        envelope: &Envelope,
    ) -> Outcome {
        match self.observe_value(&group, stamp, self.field_value(envelope).as_deref()) {
            Some(observed) => Outcome::Observed { group, observed },
            None => Outcome::NoGroup,
        }
    }

    /// [`Metric::observe_in`] with the value of the metric's field
    /// ([`Metric::field_value`]) read before; `None` for an event without
    /// a time.
    pub fn observe_value(
        &mut self,
        group: &str,
        stamp: Option<&Stamp>,
        value: Option<&Value>,
    ) -> Option<Observed> {
        Some(self.engine.observe(group, stamp?, value))
    }

    /// The value of the metric's field in `envelope`, if it has one.
    pub fn field_value<'v>(&self, envelope: &'v Envelope) -> Option<Cow<'v, Value>> {
        self.spec.field.as_ref().and_then(|f| envelope.path(f))
    }

    /// The value of `group` as a computed trait: its latest open window's
    /// (for a trailing metric, the window ending at the watermark), else
    /// the value of no events (a count of 0).
    pub fn trait_value(&self, group: &str) -> Value {
        match self.engine.open(group).pop() {
            Some(window) => window.value,
            None => self.spec.aggregate.empty().value(self.spec.aggregate),
        }
    }

    /// The groups a deletion record removes from a per-user metric: every
    /// id the deleted profile had (`None` for other records, and for
    /// metrics not grouped by user, whose groups are not a person's).
    pub fn deleted_groups<'a>(&self, head: &Head, envelope: &'a Envelope) -> Option<Vec<&'a str>> {
        if self.spec.group_by != GroupBy::User {
            return None;
        }
        deleted_ids(head, envelope)
    }

    /// For a per-user metric, what an `alias` (its `previousId` and
    /// `anonymousId`) or an `identify` with an anonymous id links into the
    /// user's group: the user, and the ids whose open windows join it.
    pub fn linked_groups<'a>(
        &self,
        head: &Head,
        envelope: &'a Envelope,
    ) -> Option<(&'a str, Vec<&'a str>)> {
        if self.spec.group_by != GroupBy::User || !matches!(head.kind, Some("alias" | "identify")) {
            return None;
        }
        let text = |name: &str| envelope.text(name).filter(|s| !s.is_empty());
        let into = text("userId")?;
        let linked = match text("type")? {
            "alias" => [text("previousId"), text("anonymousId")],
            "identify" => [text("anonymousId"), None],
            _ => return None,
        };
        let mut from: Vec<&str> = linked
            .into_iter()
            .flatten()
            .filter(|id| *id != into)
            .collect();
        from.dedup();
        (!from.is_empty()).then_some((into, from))
    }

    /// Moves the watermark; the windows it closes.
    pub fn advance(&mut self, watermark: Millis) -> Vec<Closed> {
        self.engine.advance(watermark)
    }
}

/// `group`'s open windows across partitions, oldest first: each
/// partition's state (with its clock) read as an engine would hold it,
/// and the parts of windows some partitions closed, merged by window.
pub fn open_windows(
    spec: &MetricSpec,
    group: &str,
    states: Vec<(GroupState, Option<Millis>)>,
    parts: Vec<(Span, Partial, u64)>,
) -> Vec<OpenWindow> {
    let mut merged: BTreeMap<(Millis, Millis), (Partial, u64)> = BTreeMap::new();
    let mut add = |span: Span, partial: &Partial, events: u64| {
        let (into, count) = merged
            .entry((span.start, span.end))
            .or_insert_with(|| (spec.aggregate.empty(), 0));
        into.merge(partial);
        *count += events;
    };
    for (state, clock) in states {
        let mut engine = Engine::new(spec.window, spec.aggregate, spec.lateness);
        if let Some(clock) = clock {
            engine.resume(clock);
        }
        engine.restore(group, state);
        for open in engine.open(group) {
            add(open.window, &open.partial, open.events);
        }
    }
    for (span, partial, events) in &parts {
        add(*span, partial, *events);
    }
    merged
        .into_iter()
        .map(|((start, end), (partial, events))| OpenWindow {
            window: Span { start, end },
            value: partial.value(spec.aggregate),
            partial,
            events,
        })
        .collect()
}

/// Every id a deletion record (a GDPR deletion of a profile, in order
/// with the user's events) names: its `userId`, `anonymousId` and
/// `properties.ids`; `None` for any other record.
pub fn deleted_ids<'a>(head: &Head, envelope: &'a Envelope) -> Option<Vec<&'a str>> {
    if head.kind != Some("delete") {
        return None;
    }
    let mut ids: Vec<&str> = ["userId", "anonymousId"]
        .iter()
        .filter_map(|f| envelope.text(f))
        .chain(
            envelope
                .json(crate::definitions::Reads::of(["properties"]))
                .pointer("/properties/ids")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str),
        )
        .collect();
    ids.sort_unstable();
    ids.dedup();
    Some(ids)
}

/// An event's time (its `timestamp`, corrected for clock skew at ingest)
/// and message id.
pub fn stamp(envelope: &Envelope) -> Option<Stamp> {
    let at = crate::envelope::rfc3339::millis(envelope.text("timestamp")?)?;
    let id = envelope.text("messageId")?;
    Some(Stamp { at, id: id.into() })
}

#[cfg(test)]
mod tests;
