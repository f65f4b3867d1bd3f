//! A group's slices, by start: a sorted vector, not a B-tree map.
//!
//! Most groups hold one to a few slices (a tumbling window, a hopping
//! window's handful), and a budget of open window state is counted in
//! groups: a B-tree's first node has room for eleven slices, about a
//! kilobyte a group whatever it holds, where a vector grown one slice at
//! a time holds what there is. Stored the way a map of starts to slices
//! is (a JSON object keyed by start), so states written before read back.

use std::fmt;
use std::ops::Range;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Millis;
use super::engine::Slice;

/// Up to this many slices, a vector grows by one: beyond it, by doubling.
const GROW_BY_ONE: usize = 8;

/// Slices ordered by start, each start once.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Slices(Vec<(Millis, Slice)>);

impl Slices {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The slices, earliest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (Millis, &Slice)> {
        self.0.iter().map(|(start, s)| (*start, s))
    }

    /// The earliest start.
    pub fn first_start(&self) -> Option<Millis> {
        self.0.first().map(|(start, _)| *start)
    }

    /// The latest start.
    pub fn last_start(&self) -> Option<Millis> {
        self.0.last().map(|(start, _)| *start)
    }

    /// The earliest slice.
    pub fn first(&self) -> Option<(Millis, &Slice)> {
        self.0.first().map(|(start, s)| (*start, s))
    }

    fn position(&self, start: Millis) -> Result<usize, usize> {
        self.0.binary_search_by_key(&start, |(s, _)| *s)
    }

    /// The slice starting at `start`.
    pub fn get_mut(&mut self, start: Millis) -> Option<&mut Slice> {
        let i = self.position(start).ok()?;
        Some(&mut self.0[i].1)
    }

    /// The slice starting at `start`, made by `make` if there is none.
    pub fn get_or_insert_with(
        &mut self,
        start: Millis,
        make: impl FnOnce() -> Slice,
    ) -> &mut Slice {
        let i = match self.position(start) {
            Ok(i) => i,
            Err(i) => {
                self.make_room();
                self.0.insert(i, (start, make()));
                i
            }
        };
        &mut self.0[i].1
    }

    /// Puts `slice` at `start`, replacing one there.
    pub fn insert(&mut self, start: Millis, slice: Slice) {
        match self.position(start) {
            Ok(i) => self.0[i].1 = slice,
            Err(i) => {
                self.make_room();
                self.0.insert(i, (start, slice));
            }
        }
    }

    fn make_room(&mut self) {
        if self.0.len() == self.0.capacity() && self.0.len() < GROW_BY_ONE {
            self.0.reserve_exact(1);
        }
    }

    /// Takes the earliest slice out when `take` says so.
    pub fn pop_first_if(&mut self, take: impl FnOnce(&Slice) -> bool) -> Option<(Millis, Slice)> {
        if take(&self.0.first()?.1) {
            Some(self.0.remove(0))
        } else {
            None
        }
    }

    /// Keeps the slices `keep` says to, by start.
    pub fn retain(&mut self, mut keep: impl FnMut(Millis) -> bool) {
        self.0.retain(|(start, _)| keep(*start));
        if self.0.capacity() > GROW_BY_ONE && self.0.len() <= self.0.capacity() / 4 {
            self.0.shrink_to_fit();
        }
    }

    /// The slices starting within `range`.
    pub fn range(&self, range: Range<Millis>) -> impl Iterator<Item = (Millis, &Slice)> {
        let from = self.0.partition_point(|(s, _)| *s < range.start);
        let to = self.0.partition_point(|(s, _)| *s < range.end);
        self.0[from..to.max(from)]
            .iter()
            .map(|(start, s)| (*start, s))
    }

    /// The start of the earliest slice starting at or after `at`.
    pub fn start_from(&self, at: Millis) -> Option<Millis> {
        let i = self.0.partition_point(|(s, _)| *s < at);
        self.0.get(i).map(|(start, _)| *start)
    }
}

impl IntoIterator for Slices {
    type Item = (Millis, Slice);
    type IntoIter = std::vec::IntoIter<(Millis, Slice)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl Serialize for Slices {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(start, s)| (start, s)))
    }
}

impl<'de> Deserialize<'de> for Slices {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Slices, D::Error> {
        struct SlicesVisitor;

        impl<'de> Visitor<'de> for SlicesVisitor {
            type Value = Slices;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of slice starts to slices")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Slices, A::Error> {
                let mut slices: Vec<(Millis, Slice)> =
                    Vec::with_capacity(map.size_hint().unwrap_or(0).min(GROW_BY_ONE));
                while let Some(entry) = map.next_entry::<Millis, Slice>()? {
                    slices.push(entry);
                }
                slices.sort_by_key(|(start, _)| *start);
                // A map's keys are unique; a repeated one keeps the last,
                // as a map read back would.
                slices.dedup_by(|later, earlier| {
                    let same = later.0 == earlier.0;
                    if same {
                        std::mem::swap(later, earlier);
                    }
                    same
                });
                Ok(Slices(slices))
            }
        }

        deserializer.deserialize_map(SlicesVisitor)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::windows::Partial;

    fn slice(events: u64) -> Slice {
        Slice {
            end: 0,
            partial: Partial::Count(events),
            events,
        }
    }

    /// What a map of the same slices would say.
    fn as_map(slices: &Slices) -> BTreeMap<Millis, Slice> {
        slices.iter().map(|(start, s)| (start, s.clone())).collect()
    }

    #[derive(Clone, Debug)]
    enum Op {
        Add(Millis),
        Insert(Millis, u64),
        PopFirstBelow(u64),
        RetainFrom(Millis),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (-20i64..20).prop_map(Op::Add),
            ((-20i64..20), 0u64..5).prop_map(|(s, n)| Op::Insert(s, n)),
            (0u64..5).prop_map(Op::PopFirstBelow),
            (-20i64..20).prop_map(Op::RetainFrom),
        ]
    }

    proptest! {
        /// Any sequence of changes leaves the slices a map would hold, in
        /// order, and ranges and lookups agree with the map's.
        #[test]
        fn slices_behave_as_a_map_of_starts(ops in proptest::collection::vec(op(), 0..60), from in -25i64..25, len in 0i64..30) {
            let mut slices = Slices::default();
            let mut model: BTreeMap<Millis, Slice> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Add(start) => {
                        slices.get_or_insert_with(start, || slice(0)).events += 1;
                        model.entry(start).or_insert_with(|| slice(0)).events += 1;
                    }
                    Op::Insert(start, n) => {
                        slices.insert(start, slice(n));
                        model.insert(start, slice(n));
                    }
                    Op::PopFirstBelow(n) => {
                        let popped = slices.pop_first_if(|s| s.events < n);
                        let expected = model.first_entry().filter(|e| e.get().events < n).map(|e| e.remove_entry());
                        prop_assert_eq!(popped, expected);
                    }
                    Op::RetainFrom(at) => {
                        slices.retain(|start| start >= at);
                        model.retain(|start, _| *start >= at);
                    }
                }
                prop_assert_eq!(as_map(&slices), model.clone());
            }
            let range: Vec<Millis> = slices.range(from..from + len).map(|(s, _)| s).collect();
            let expected: Vec<Millis> = model.range(from..from + len).map(|(s, _)| *s).collect();
            prop_assert_eq!(range, expected);
            prop_assert_eq!(slices.start_from(from), model.range(from..).next().map(|(s, _)| *s));
            prop_assert_eq!(slices.first_start(), model.keys().next().copied());
            prop_assert_eq!(slices.last_start(), model.keys().next_back().copied());
            prop_assert_eq!(slices.get_mut(from).cloned(), model.get(&from).cloned());
        }
    }

    #[test]
    fn slices_are_stored_as_the_map_they_replace() {
        let mut slices = Slices::default();
        slices.insert(120_000, slice(2));
        slices.insert(-60_000, slice(1));
        let map = as_map(&slices);
        let json = serde_json::to_string(&slices).unwrap();
        assert_eq!(json, serde_json::to_string(&map).unwrap());
        assert!(json.starts_with(r#"{"-60000":"#), "{json}");
        // A state written from the map reads back the same.
        let back: Slices = serde_json::from_str(&serde_json::to_string(&map).unwrap()).unwrap();
        assert_eq!(back, slices);
    }

    #[test]
    fn slices_read_back_in_order_whatever_order_they_were_written_in() {
        let json = r#"{"300": {"end": 0, "partial": {"count": 3}, "events": 3}, "100": {"end": 0, "partial": {"count": 1}, "events": 1}}"#;
        let slices: Slices = serde_json::from_str(json).unwrap();
        assert_eq!(slices.first_start(), Some(100));
        assert_eq!(slices.last_start(), Some(300));
        assert_eq!(slices.len(), 2);
        assert!(serde_json::from_str::<Slices>(r#"{"x": {}}"#).is_err());
    }

    /// A slice is what most groups hold: its partial is boxed where it
    /// would otherwise be the size of a stamped value.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn a_slice_is_48_bytes() {
        assert_eq!(std::mem::size_of::<Slice>(), 48);
    }

    #[test]
    fn a_group_with_one_slice_holds_one() {
        let mut slices = Slices::default();
        slices.get_or_insert_with(0, || slice(1));
        assert_eq!(slices.0.capacity(), 1);
    }
}
