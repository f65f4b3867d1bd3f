//! The reading half both runners share: the reader, where the store is in
//! each partition, and the partitions' clocks.
//!
//! Only the store's offsets are trusted: records below them are dropped,
//! a partition whose first record is above them is sent back (the
//! reader's own resume point, Kafka's committed offset, can be ahead of a
//! new or restored store), and after a rebalance every position is read
//! from the store again.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use super::clock::PartitionClocks;
use super::stats::Counting;
use super::{Checkpoints, CommitError, OffsetAdvance, RETRY_DELAY};
use crate::log::{LogReader, Polled, ReadError, StoredRecord};

/// How often a runner refreshes its partitions' lag.
const LAG_PROBE_EVERY: Duration = Duration::from_millis(250);

/// The processor's view of one partition.
#[derive(Debug, Clone, Copy)]
struct Position {
    /// The store's next offset (`None`: nothing stored).
    expected: Option<i64>,
    /// Whether the reader is known to deliver from `expected` on (checked
    /// on the partition's first record, or after a seek).
    verified: bool,
}

pub(super) struct Reading {
    pub reader: Box<dyn LogReader>,
    pub topic: String,
    positions: HashMap<i32, Position>,
    stored: Option<HashMap<i32, i64>>,
    /// Partitions came and some could not be sent to the store's offsets
    /// yet.
    unseeked: bool,
    pub clocks: PartitionClocks,
    last_lag_probe: Option<Instant>,
    last_reseek: Option<Instant>,
}

/// Least time between two looks for partitions read to their end while
/// the store is behind them.
const RESEEK: Duration = Duration::from_secs(5);

impl Reading {
    pub fn new(reader: Box<dyn LogReader>, topic: String) -> Reading {
        Reading {
            reader,
            topic,
            positions: HashMap::new(),
            stored: None,
            unseeked: false,
            clocks: PartitionClocks::default(),
            last_lag_probe: None,
            last_reseek: None,
        }
    }

    /// The same reading through `wrap` around its reader.
    pub fn map_reader(
        self,
        wrap: impl FnOnce(Box<dyn LogReader>) -> Box<dyn LogReader>,
    ) -> Reading {
        Reading {
            reader: wrap(self.reader),
            ..self
        }
    }

    /// Starts each partition where the store is. A consumer-group reader
    /// has no partitions yet and refuses; it is checked on its first
    /// records instead ([`Reading::admit`]).
    pub async fn start(&mut self, store: &dyn Checkpoints) {
        if let Ok(stored) = store.stored_offsets(&self.topic).await {
            for (partition, next) in &stored {
                if let Err(e) = self.reader.seek(*partition, Some(*next)) {
                    tracing::debug!("not seeking partition {partition} before it is assigned: {e}");
                }
            }
            self.stored = Some(stored);
        }
    }

    /// After each poll: when partitions came or went, trusts nothing
    /// remembered and sends each new partition to the store's offset.
    async fn follow_assignment(&mut self, reassigned: bool, store: &dyn Checkpoints) {
        if reassigned {
            self.positions.clear();
            self.stored = None;
            self.unseeked = true;
            let assigned = self.reader.assigned();
            self.clocks.keep(&assigned);
        }
        if self.unseeked {
            // Start each new partition where the store is, not where the
            // group committed: a new store, or one restored from a
            // snapshot, may be behind it, and an idle partition would
            // otherwise never show the gap. A partition not yet fetching
            // refuses the seek; it is tried again next time.
            let assigned = self.reader.assigned();
            self.unseeked = !self.seek_to_store(&assigned, store).await;
        }
    }

    /// Takes what a poll got: the records the store has not seen, and
    /// whether the reader was at the end of every partition. `None` after
    /// a failed read or lookup of the stored offsets (logged, shown in the
    /// stats and waited out): poll again.
    pub async fn take(
        &mut self,
        polled: Result<Polled, ReadError>,
        store: &dyn Checkpoints,
        counting: &Counting,
    ) -> Option<(Vec<StoredRecord>, bool)> {
        let polled = match polled {
            Ok(polled) => polled,
            Err(e) => {
                tracing::warn!("{e}; reading again in {RETRY_DELAY:?}");
                counting.error(&e);
                tokio::time::sleep(RETRY_DELAY).await;
                return None;
            }
        };
        self.follow_assignment(polled.reassigned, store).await;
        match self.admit(polled.records, store).await {
            Ok(records) => Some((records, polled.caught_up)),
            Err(e) => {
                tracing::warn!(
                    "cannot read the stored offsets of {}: {e}; trying again",
                    self.topic
                );
                // The records just read are dropped: forget where each
                // partition is, so the next records are checked against
                // the store and the reader is sent back to them.
                self.positions.clear();
                counting.error(&e);
                tokio::time::sleep(RETRY_DELAY).await;
                None
            }
        }
    }

    /// Keeps the records the store has not seen: drops those below the
    /// stored offset, and seeks back when the reader starts above it. The
    /// kept records move their partitions' clocks.
    async fn admit(
        &mut self,
        records: Vec<StoredRecord>,
        store: &dyn Checkpoints,
    ) -> Result<Vec<StoredRecord>, CommitError> {
        if records.is_empty() {
            return Ok(records);
        }
        if self.stored.is_none() {
            self.stored = Some(store.stored_offsets(&self.topic).await?);
        }
        let stored = self.stored.as_ref().expect("loaded above");
        let mut kept = Vec::with_capacity(records.len());
        let mut sought = Vec::new();
        for record in records {
            let position = self
                .positions
                .entry(record.partition)
                .or_insert_with(|| Position {
                    expected: stored.get(&record.partition).copied(),
                    verified: false,
                });
            if sought.contains(&record.partition) {
                continue;
            }
            if let Some(expected) = position.expected
                && record.offset < expected
            {
                continue;
            }
            if !position.verified {
                let starts_late = match position.expected {
                    Some(expected) => record.offset > expected,
                    // Nothing stored: everything from the oldest record.
                    None => record.offset > 0,
                };
                position.verified = true;
                if starts_late {
                    tracing::info!(
                        partition = record.partition,
                        "partition {} resumed at offset {} but the store is at {:?}; seeking back",
                        record.partition,
                        record.offset,
                        position.expected
                    );
                    if let Err(e) = self.reader.seek(record.partition, position.expected) {
                        tracing::warn!("{e}");
                    }
                    sought.push(record.partition);
                    continue;
                }
            }
            kept.push(record);
        }
        self.clocks.saw(&kept);
        Ok(kept)
    }

    /// Sends back a partition the reader has read to its end while the
    /// store is behind its high watermark: the seek that should have sent
    /// it to the store's offset was lost (a seek made as the partition
    /// starts fetching can be), and on a quiet log no record comes to
    /// show it. Called when every partition is read to its end, at most
    /// every [`RESEEK`].
    pub fn reseek_behind(&mut self) {
        if self.last_reseek.is_some_and(|t| t.elapsed() < RESEEK) {
            return;
        }
        self.last_reseek = Some(Instant::now());
        for partition in self.reader.assigned() {
            let (Some(high), Some(expected)) = (
                self.reader.high_watermark(partition),
                self.believed(partition),
            ) else {
                continue;
            };
            if expected.unwrap_or(0) >= high {
                continue;
            }
            tracing::info!(
                partition,
                "partition {partition} is read to its end at offset {high} but the store is at {expected:?}; seeking back"
            );
            match self.reader.seek(partition, expected) {
                // Its next record is checked against the store again.
                Ok(()) => {
                    self.positions.remove(&partition);
                }
                Err(e) => tracing::debug!("{e}"),
            }
        }
    }

    /// Where a checkpoint of `records` takes each of their partitions.
    pub fn advances(&self, records: &[StoredRecord]) -> Vec<OffsetAdvance> {
        let mut advances: BTreeMap<i32, OffsetAdvance> = BTreeMap::new();
        for record in records {
            let expected = self.expected(record.partition);
            advances
                .entry(record.partition)
                .and_modify(|a| a.next = a.next.max(record.offset + 1))
                .or_insert(OffsetAdvance {
                    partition: record.partition,
                    expected,
                    next: record.offset + 1,
                });
        }
        advances.into_values().collect()
    }

    /// The store's next offset of `partition`, as this runner knows it.
    pub fn expected(&self, partition: i32) -> Option<i64> {
        self.positions.get(&partition).and_then(|p| p.expected)
    }

    /// The store's next offset of `partition` as this runner knows it,
    /// whether or not it has read a record of it since (`Some(None)`:
    /// nothing stored); `None` when it does not know.
    pub fn believed(&self, partition: i32) -> Option<Option<i64>> {
        match self.positions.get(&partition) {
            Some(position) => Some(position.expected),
            None => self.stored.as_ref().map(|s| s.get(&partition).copied()),
        }
    }

    /// Records a stored checkpoint.
    pub fn committed(&mut self, advances: &[OffsetAdvance]) {
        for advance in advances {
            if let Some(position) = self.positions.get_mut(&advance.partition) {
                position.expected = Some(advance.next);
            }
            if let Some(stored) = self.stored.as_mut() {
                stored.insert(advance.partition, advance.next);
            }
            self.reader.note_committed(advance.partition, advance.next);
        }
    }

    /// Reloads the store's offsets and moves `partitions` to them (the
    /// oldest record where none is stored). False when the offsets could
    /// not be read or a partition refused the seek.
    pub async fn seek_to_store(&mut self, partitions: &[i32], store: &dyn Checkpoints) -> bool {
        self.stored = None;
        // Only these: another partition stays where this runner knows it
        // stored, or its next save, expecting nothing stored, would be
        // taken for another instance's and send it back too.
        for partition in partitions {
            self.positions.remove(partition);
        }
        let Ok(stored) = store.stored_offsets(&self.topic).await else {
            return false;
        };
        let mut all = true;
        for partition in partitions {
            if let Err(e) = self.reader.seek(*partition, stored.get(partition).copied()) {
                tracing::debug!("{e}");
                all = false;
            }
        }
        self.stored = Some(stored);
        all
    }

    /// The partitions this runner reads: the reader's, else those it has
    /// seen.
    pub fn partitions(&self) -> Vec<i32> {
        let assigned = self.reader.assigned();
        if !assigned.is_empty() {
            return assigned;
        }
        let mut seen: Vec<i32> = self
            .positions
            .keys()
            .chain(self.stored.iter().flat_map(HashMap::keys))
            .copied()
            .collect();
        seen.sort_unstable();
        seen.dedup();
        seen
    }

    /// Refreshes each partition's high watermark now and then: often
    /// enough that a backfill that has caught up joins its live runner
    /// within the stage's next look, and the lag gauges follow; the high
    /// watermarks are the reader's own (no broker round trip).
    pub fn probe_lag(&mut self, caught_up: bool, counting: &Counting) {
        if self
            .last_lag_probe
            .is_some_and(|t| t.elapsed() < LAG_PROBE_EVERY)
        {
            counting.caught_up(caught_up);
            return;
        }
        self.last_lag_probe = Some(Instant::now());
        let partitions: Vec<(i32, Option<i64>, Option<i64>)> = self
            .positions
            .iter()
            .map(|(&partition, position)| {
                (
                    partition,
                    position.expected,
                    self.reader.high_watermark(partition),
                )
            })
            .collect();
        counting.positions(caught_up, &partitions);
    }
}
