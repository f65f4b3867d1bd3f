//! Mergeable partial aggregates.
//!
//! A window's value is built from partials: one per slice, per partition,
//! per instance. Merging two partials gives the partial of the union of
//! their events, whatever the order, bit for bit: sums keep the exact sum
//! as non-overlapping floating-point parts (Shewchuk's expansion, as
//! Python's `math.fsum`) and round only when read, and `first`/`last` break
//! ties on equal times by message id. So a global metric combined from 8
//! partitions equals the same metric computed in one.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What a metric computes over its events (DESIGN.md, "Definitions").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    Count,
    Sum,
    Avg,
    Min,
    Max,
    /// The number of distinct values.
    Distinct,
    /// The value seen most often (ties: the smallest in JSON text).
    MostFrequent,
    /// The value of the earliest event.
    First,
    /// The value of the latest event.
    Last,
    /// The distinct values, in the order they were first seen.
    Unique,
}

impl Aggregate {
    /// Every aggregate but `count` reads a field of the event.
    pub fn needs_field(self) -> bool {
        self != Aggregate::Count
    }

    /// Whether the aggregate reads the field as a number.
    pub fn numeric(self) -> bool {
        matches!(
            self,
            Aggregate::Sum | Aggregate::Avg | Aggregate::Min | Aggregate::Max
        )
    }

    /// The partial of no events.
    pub fn empty(self) -> Partial {
        match self {
            Aggregate::Count => Partial::Count(0),
            Aggregate::Sum | Aggregate::Avg => Partial::Sum {
                parts: Vec::new(),
                n: 0,
            },
            Aggregate::Min => Partial::Min(None),
            Aggregate::Max => Partial::Max(None),
            Aggregate::Distinct => Partial::Distinct(BTreeSet::new()),
            Aggregate::MostFrequent => Partial::Frequencies(BTreeMap::new()),
            Aggregate::First => Partial::First(None),
            Aggregate::Last => Partial::Last(None),
            Aggregate::Unique => Partial::Unique(BTreeMap::new()),
        }
    }
}

/// When an event happened and which one it is: orders events with equal
/// times the same way on every instance and in every replay.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Stamp {
    /// Event time, milliseconds since the epoch.
    pub at: i64,
    /// The event's message id (shared: every metric and rule of a
    /// batch holds the one copy).
    pub id: Arc<str>,
}

/// A value with the stamp of the event that carried it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stamped {
    pub stamp: Stamp,
    pub value: Value,
}

/// The state of an aggregate over some events; [`Partial::merge`] combines
/// two, [`Partial::value`] reads one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Partial {
    Count(u64),
    /// The exact sum as non-overlapping parts, smallest first, and how many
    /// numbers it holds (for `avg`).
    Sum {
        parts: Vec<f64>,
        n: u64,
    },
    Min(Option<f64>),
    Max(Option<f64>),
    /// Values by their JSON text.
    Distinct(BTreeSet<String>),
    /// How often each value (by its JSON text) was seen.
    Frequencies(BTreeMap<String, u64>),
    /// Boxed, so a partial (one a slice) is the size of its usual
    /// variants, not of a stamped value.
    First(Option<Box<Stamped>>),
    Last(Option<Box<Stamped>>),
    /// Each value (by its JSON text) with the stamp it was first seen at.
    Unique(BTreeMap<String, Stamp>),
}

impl Partial {
    /// Takes one event's value in. A value the aggregate cannot use (a
    /// missing field, a string summed) leaves the partial unchanged, and
    /// the answer says so.
    pub fn observe(&mut self, stamp: &Stamp, value: Option<&Value>) -> bool {
        let value = value.filter(|v| !v.is_null());
        match self {
            Partial::Count(n) => {
                *n += 1;
                true
            }
            Partial::Sum { parts, n } => match value.and_then(Value::as_f64) {
                Some(x) if x.is_finite() => {
                    add_exact(parts, x);
                    *n += 1;
                    true
                }
                _ => false,
            },
            Partial::Min(m) => number(value).map(|x| keep(m, x, f64::min)).is_some(),
            Partial::Max(m) => number(value).map(|x| keep(m, x, f64::max)).is_some(),
            Partial::Distinct(set) => match value {
                Some(v) => {
                    set.insert(v.to_string());
                    true
                }
                None => false,
            },
            Partial::Frequencies(counts) => match value {
                Some(v) => {
                    *counts.entry(v.to_string()).or_default() += 1;
                    true
                }
                None => false,
            },
            Partial::First(first) => match value {
                Some(v) => {
                    if first.as_ref().is_none_or(|f| *stamp < f.stamp) {
                        *first = Some(Box::new(Stamped {
                            stamp: stamp.clone(),
                            value: v.clone(),
                        }));
                    }
                    true
                }
                None => false,
            },
            Partial::Last(last) => match value {
                Some(v) => {
                    if last.as_ref().is_none_or(|l| *stamp > l.stamp) {
                        *last = Some(Box::new(Stamped {
                            stamp: stamp.clone(),
                            value: v.clone(),
                        }));
                    }
                    true
                }
                None => false,
            },
            Partial::Unique(seen) => match value {
                Some(v) => {
                    let entry = seen.entry(v.to_string()).or_insert_with(|| stamp.clone());
                    if *stamp < *entry {
                        *entry = stamp.clone();
                    }
                    true
                }
                None => false,
            },
        }
    }

    /// Combines `other` into this partial: the partial of both sets of
    /// events. Partials of different aggregates never meet (one metric has
    /// one aggregate); if they do, `other` is ignored.
    pub fn merge(&mut self, other: &Partial) {
        match (self, other) {
            (Partial::Count(a), Partial::Count(b)) => *a += b,
            (Partial::Sum { parts, n }, Partial::Sum { parts: more, n: m }) => {
                for x in more {
                    add_exact(parts, *x);
                }
                *n += m;
            }
            (Partial::Min(a), Partial::Min(Some(b))) => keep(a, *b, f64::min),
            (Partial::Max(a), Partial::Max(Some(b))) => keep(a, *b, f64::max),
            (Partial::Distinct(a), Partial::Distinct(b)) => a.extend(b.iter().cloned()),
            (Partial::Frequencies(a), Partial::Frequencies(b)) => {
                for (value, count) in b {
                    *a.entry(value.clone()).or_default() += count;
                }
            }
            (Partial::First(a), Partial::First(Some(b)))
                if a.as_ref().is_none_or(|f| b.stamp < f.stamp) =>
            {
                *a = Some(b.clone());
            }
            (Partial::Last(a), Partial::Last(Some(b)))
                if a.as_ref().is_none_or(|l| b.stamp > l.stamp) =>
            {
                *a = Some(b.clone());
            }
            (Partial::Unique(a), Partial::Unique(b)) => {
                for (value, stamp) in b {
                    let entry = a.entry(value.clone()).or_insert_with(|| stamp.clone());
                    if stamp < entry {
                        *entry = stamp.clone();
                    }
                }
            }
            _ => {}
        }
    }

    /// The aggregate's value, as it goes to the API and `user_metrics`.
    /// `avg` is the exact sum, rounded once, over the count.
    pub fn value(&self, aggregate: Aggregate) -> Value {
        match self {
            Partial::Count(n) => Value::from(*n),
            Partial::Sum { parts, n } => {
                let sum = round_exact(parts);
                match aggregate {
                    Aggregate::Avg if *n == 0 => Value::Null,
                    Aggregate::Avg => json_number(sum / *n as f64),
                    _ => json_number(sum),
                }
            }
            Partial::Min(m) | Partial::Max(m) => m.map_or(Value::Null, json_number),
            Partial::Distinct(set) => Value::from(set.len()),
            Partial::Frequencies(counts) => counts
                .iter()
                // Highest count; among equals, the smallest text (the
                // first in the map's order, which `max_by` would not keep).
                .fold(None::<(&String, u64)>, |best, (v, c)| match best {
                    Some((_, b)) if b >= *c => best,
                    _ => Some((v, *c)),
                })
                .map_or(Value::Null, |(v, _)| parse(v)),
            Partial::First(s) | Partial::Last(s) => {
                s.as_ref().map_or(Value::Null, |s| s.value.clone())
            }
            Partial::Unique(seen) => {
                let mut values: Vec<(&Stamp, &String)> = seen.iter().map(|(v, s)| (s, v)).collect();
                values.sort();
                Value::Array(values.into_iter().map(|(_, v)| parse(v)).collect())
            }
        }
    }
}

fn number(value: Option<&Value>) -> Option<f64> {
    value.and_then(Value::as_f64).filter(|x| x.is_finite())
}

fn keep(slot: &mut Option<f64>, x: f64, pick: fn(f64, f64) -> f64) {
    *slot = Some(slot.map_or(x, |m| pick(m, x)));
}

fn json_number(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

/// Adds `x` to the exact sum held in `parts` (non-overlapping, increasing
/// magnitude): Shewchuk's grow-expansion, as in CPython's `math.fsum`.
fn add_exact(parts: &mut Vec<f64>, mut x: f64) {
    let mut kept = 0;
    for i in 0..parts.len() {
        let mut y = parts[i];
        if x.abs() < y.abs() {
            std::mem::swap(&mut x, &mut y);
        }
        let high = x + y;
        let low = y - (high - x);
        if low != 0.0 {
            parts[kept] = low;
            kept += 1;
        }
        x = high;
    }
    parts.truncate(kept);
    parts.push(x);
}

/// The exact sum of `parts`, correctly rounded to the nearest `f64`.
fn round_exact(parts: &[f64]) -> f64 {
    let Some((&last, rest)) = parts.split_last() else {
        return 0.0;
    };
    let mut high = last;
    let mut low = 0.0;
    let mut i = rest.len();
    while i > 0 {
        i -= 1;
        let x = high;
        let y = rest[i];
        high = x + y;
        let y_rounded = high - x;
        low = y - y_rounded;
        if low != 0.0 {
            break;
        }
    }
    // Half-way cases: round as the parts below would push it (fsum's
    // correction), so the result is the correctly rounded exact sum.
    if i > 0 && ((low < 0.0 && rest[i - 1] < 0.0) || (low > 0.0 && rest[i - 1] > 0.0)) {
        let y = low * 2.0;
        let x = high + y;
        if y == x - high {
            high = x;
        }
    }
    high
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn stamp(at: i64, id: &str) -> Stamp {
        Stamp { at, id: id.into() }
    }

    fn fold(aggregate: Aggregate, values: &[(i64, &str, Value)]) -> Value {
        let mut p = aggregate.empty();
        for (at, id, v) in values {
            p.observe(&stamp(*at, id), Some(v));
        }
        p.value(aggregate)
    }

    #[test]
    fn each_aggregate_reads_its_events() {
        let events = [
            (3, "c", json!(5)),
            (1, "a", json!(2.5)),
            (2, "b", json!(5)),
            (2, "a2", json!("x")),
        ];
        assert_eq!(fold(Aggregate::Count, &events), json!(4));
        // The string is not a number: three numbers summed.
        assert_eq!(fold(Aggregate::Sum, &events), json!(12.5));
        assert_eq!(fold(Aggregate::Avg, &events), json!(12.5 / 3.0));
        assert_eq!(fold(Aggregate::Min, &events), json!(2.5));
        assert_eq!(fold(Aggregate::Max, &events), json!(5.0));
        assert_eq!(fold(Aggregate::Distinct, &events), json!(3));
        assert_eq!(fold(Aggregate::MostFrequent, &events), json!(5));
        assert_eq!(fold(Aggregate::First, &events), json!(2.5));
        assert_eq!(fold(Aggregate::Last, &events), json!(5));
        // In the order first seen: 2.5 at 1, then at 2 "a2" < "b".
        assert_eq!(fold(Aggregate::Unique, &events), json!([2.5, "x", 5]));
    }

    #[test]
    fn no_events_read_as_zero_or_null() {
        assert_eq!(Aggregate::Count.empty().value(Aggregate::Count), json!(0));
        assert_eq!(Aggregate::Sum.empty().value(Aggregate::Sum), json!(0.0));
        assert_eq!(Aggregate::Avg.empty().value(Aggregate::Avg), Value::Null);
        assert_eq!(Aggregate::Max.empty().value(Aggregate::Max), Value::Null);
        assert_eq!(
            Aggregate::Unique.empty().value(Aggregate::Unique),
            json!([])
        );
    }

    #[test]
    fn a_missing_or_null_field_is_not_taken() {
        let mut p = Aggregate::Distinct.empty();
        assert!(!p.observe(&stamp(1, "a"), None));
        assert!(!p.observe(&stamp(1, "b"), Some(&Value::Null)));
        assert_eq!(p.value(Aggregate::Distinct), json!(0));
        let mut c = Aggregate::Count.empty();
        assert!(c.observe(&stamp(1, "a"), None), "count counts events");
    }

    #[test]
    fn ties_on_equal_times_break_on_the_message_id() {
        let a = [(5, "m2", json!("second")), (5, "m1", json!("first"))];
        assert_eq!(fold(Aggregate::First, &a), json!("first"));
        assert_eq!(fold(Aggregate::Last, &a), json!("second"));
        let freq = [(1, "a", json!("b")), (2, "b", json!("a"))];
        assert_eq!(fold(Aggregate::MostFrequent, &freq), json!("a"));
    }

    #[test]
    fn sums_are_exact_where_plain_addition_is_not() {
        let values = [1e16, 1.0, -1e16, 0.1, 0.2, 0.3];
        let mut p = Aggregate::Sum.empty();
        for (i, x) in values.iter().enumerate() {
            p.observe(&stamp(i as i64, "m"), Some(&json!(x)));
        }
        // The plain left-to-right sum loses the 1.0 (it is 0.6000000000000001).
        assert_eq!(p.value(Aggregate::Sum), json!(1.6));
    }

    fn aggregates() -> impl Strategy<Value = Aggregate> {
        prop_oneof![
            Just(Aggregate::Count),
            Just(Aggregate::Sum),
            Just(Aggregate::Avg),
            Just(Aggregate::Min),
            Just(Aggregate::Max),
            Just(Aggregate::Distinct),
            Just(Aggregate::MostFrequent),
            Just(Aggregate::First),
            Just(Aggregate::Last),
            Just(Aggregate::Unique),
        ]
    }

    fn values() -> impl Strategy<Value = Value> {
        prop_oneof![
            (-1e6f64..1e6).prop_map(|x| json!(x)),
            (0i64..5).prop_map(|x| json!(x)),
            "[a-c]".prop_map(|s| json!(s)),
            (-1e300f64..1e300).prop_map(|x| json!(x)),
        ]
    }

    proptest! {
        /// Any split of the events into partials, merged in any order,
        /// gives the value of all of them taken one by one.
        #[test]
        fn merged_partials_equal_the_whole(
            aggregate in aggregates(),
            events in prop::collection::vec((0i64..20, values()), 0..40),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..4),
            order in any::<prop::sample::Index>(),
        ) {
            let stamped: Vec<(Stamp, Value)> = events
                .iter()
                .enumerate()
                .map(|(i, (at, v))| (stamp(*at, &format!("m{i:03}")), v.clone()))
                .collect();
            let mut whole = aggregate.empty();
            for (s, v) in &stamped {
                whole.observe(s, Some(v));
            }
            let mut bounds: Vec<usize> = cuts.iter().map(|c| c.index(stamped.len() + 1)).collect();
            bounds.push(0);
            bounds.push(stamped.len());
            bounds.sort();
            let mut pieces: Vec<Partial> = bounds
                .windows(2)
                .map(|w| {
                    let mut p = aggregate.empty();
                    for (s, v) in stamped[w[0]..w[1]].iter().rev() {
                        p.observe(s, Some(v));
                    }
                    p
                })
                .collect();
            let len = pieces.len();
            pieces.rotate_left(order.index(len));
            let mut merged = aggregate.empty();
            for p in &pieces {
                merged.merge(p);
            }
            prop_assert_eq!(merged.value(aggregate), whole.value(aggregate));
        }

        #[test]
        fn the_exact_sum_does_not_depend_on_order(
            xs in prop::collection::vec(-1e20f64..1e20, 0..30),
            order in any::<prop::sample::Index>(),
        ) {
            let mut forward = Vec::new();
            for x in &xs {
                add_exact(&mut forward, *x);
            }
            let mut rotated = xs.clone();
            let len = rotated.len().max(1);
            rotated.rotate_left(order.index(len) % xs.len().max(1));
            rotated.reverse();
            let mut other = Vec::new();
            for x in &rotated {
                add_exact(&mut other, *x);
            }
            prop_assert_eq!(round_exact(&forward).to_bits(), round_exact(&other).to_bits());
        }
    }
}
