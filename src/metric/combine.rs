//! Combining one metric's windows across partitions. Each partition's
//! engine closes its part of a window when that partition's watermark
//! passes it; the combiner merges the parts and makes the window final
//! only when every partition's watermark has passed it, so a global or
//! property group-by is exact whichever instances own which partitions. An
//! idle partition does not hold windows back: the runner's time hook moves
//! its watermark on.

use std::collections::{BTreeMap, HashMap};

use crate::windows::{Aggregate, Closed, Millis, Partial, Span};

/// The windows of one metric waiting for every partition.
#[derive(Debug)]
pub struct Combiner {
    aggregate: Aggregate,
    lateness: Millis,
    /// Each partition's watermark; `MIN` until it has one.
    watermarks: HashMap<i32, Millis>,
    /// Parts merged so far, by window end (the order they become final).
    pending: BTreeMap<(Millis, String, Millis), (Partial, u64)>,
}

impl Combiner {
    /// A combiner over `partitions` (all the partitions of the topic).
    pub fn new(
        aggregate: Aggregate,
        lateness: Millis,
        partitions: impl IntoIterator<Item = i32>,
    ) -> Combiner {
        Combiner {
            aggregate,
            lateness,
            watermarks: partitions.into_iter().map(|p| (p, Millis::MIN)).collect(),
            pending: BTreeMap::new(),
        }
    }

    /// Takes a window part a partition's engine closed.
    pub fn add(&mut self, part: Closed) {
        let key = (part.window.end, part.group, part.window.start);
        let aggregate = self.aggregate;
        let (partial, events) = self
            .pending
            .entry(key)
            .or_insert_with(|| (aggregate.empty(), 0));
        partial.merge(&part.partial);
        *events += part.events;
    }

    /// Moves `partition`'s watermark (after its parts up to it were
    /// added); the windows that every partition has now passed, final.
    pub fn advance(&mut self, partition: i32, watermark: Millis) -> Vec<Closed> {
        let slot = self.watermarks.entry(partition).or_insert(Millis::MIN);
        *slot = (*slot).max(watermark);
        let Some(limit) = self
            .watermarks
            .values()
            .min()
            .map(|w| w.saturating_sub(self.lateness))
        else {
            return Vec::new();
        };
        let mut out = Vec::new();
        while let Some(entry) = self.pending.first_entry()
            && entry.key().0 <= limit
        {
            let ((end, group, start), (partial, events)) = entry.remove_entry();
            out.push(Closed {
                group,
                window: Span { start, end },
                value: partial.value(self.aggregate),
                partial,
                events,
            });
        }
        out
    }

    /// Windows waiting for a partition.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}
