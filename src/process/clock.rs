//! Each partition's clock: the runner's time hook.
//!
//! A partition's time is the latest log timestamp (`receivedAt`) its
//! records have carried, so replaying the same log gives the same times.
//! A quiet partition would stop the clock, and windows and timeouts would
//! never close when traffic stops; so once the reader has read every
//! partition to its end, a partition's time may move on to the wall clock
//! less a bound on how late a record stamped earlier can still be
//! appended (the append timeout and an allowance for clock differences).
//! A replay, which is never at the end until it finishes, moves by the
//! records alone. A clock never goes back.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::log::StoredRecord;

/// How far one partition's clock has got, in milliseconds since the Unix
/// epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PartitionTime {
    pub partition: i32,
    pub time_ms: i64,
}

/// The wall clock, behind a trait so tests can set it.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        chrono::Utc::now().timestamp_millis()
    }
}

/// The clocks of the partitions a runner reads.
#[derive(Debug, Default)]
pub(super) struct PartitionClocks {
    times: BTreeMap<i32, i64>,
    /// The times last told to the processor by a tick.
    told: BTreeMap<i32, i64>,
}

impl PartitionClocks {
    /// Moves each record's partition to its timestamp, if that is later.
    pub fn saw(&mut self, records: &[StoredRecord]) {
        for record in records {
            self.advance(record.partition, record.timestamp_ms);
        }
    }

    fn advance(&mut self, partition: i32, time_ms: i64) {
        let time = self.times.entry(partition).or_insert(time_ms);
        *time = (*time).max(time_ms);
    }

    /// Every partition of `partitions` has been read to its end at
    /// `now_ms`: no record stamped before `now_ms - bound` can still come.
    pub fn idle(&mut self, partitions: &[i32], now_ms: i64, bound: Duration) {
        let bound_ms = i64::try_from(bound.as_millis()).unwrap_or(i64::MAX);
        let time = now_ms.saturating_sub(bound_ms);
        for &partition in partitions {
            self.advance(partition, time);
        }
    }

    /// Forgets the partitions not in `partitions` (a rebalance took them).
    pub fn keep(&mut self, partitions: &[i32]) {
        self.times.retain(|p, _| partitions.contains(p));
        self.told.retain(|p, _| partitions.contains(p));
    }

    /// Every partition's time.
    pub fn all(&self) -> Vec<PartitionTime> {
        self.times
            .iter()
            .map(|(&partition, &time_ms)| PartitionTime { partition, time_ms })
            .collect()
    }

    /// The partitions' times when any moved since the last tick told
    /// them; marks them told.
    pub fn news(&mut self) -> Option<Vec<PartitionTime>> {
        if self.times == self.told {
            return None;
        }
        self.told.clone_from(&self.times);
        Some(self.all())
    }

    /// A tick failed: the next one tells every time again.
    pub fn untold(&mut self) {
        self.told.clear();
    }

    /// After a batch: the processor knows these times from its checkpoint.
    pub fn told_all(&mut self) {
        self.told.clone_from(&self.times);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(partition: i32, timestamp_ms: i64) -> StoredRecord {
        StoredRecord {
            topic: "t".into(),
            partition,
            offset: 0,
            timestamp_ms,
            key: None,
            value: bytes::Bytes::new(),
        }
    }

    fn times(clocks: &PartitionClocks) -> Vec<(i32, i64)> {
        clocks
            .all()
            .iter()
            .map(|t| (t.partition, t.time_ms))
            .collect()
    }

    #[test]
    fn a_partitions_time_is_its_latest_record_and_never_goes_back() {
        let mut clocks = PartitionClocks::default();
        clocks.saw(&[record(0, 100), record(1, 50), record(0, 90)]);
        assert_eq!(times(&clocks), [(0, 100), (1, 50)]);
        clocks.saw(&[record(1, 40)]);
        assert_eq!(
            times(&clocks),
            [(0, 100), (1, 50)],
            "an older record moves nothing"
        );
    }

    #[test]
    fn an_idle_partition_moves_to_the_wall_clock_less_the_bound() {
        let mut clocks = PartitionClocks::default();
        clocks.saw(&[record(0, 1_000)]);
        clocks.idle(&[0, 1], 20_000, Duration::from_secs(5));
        assert_eq!(times(&clocks), [(0, 15_000), (1, 15_000)]);
        clocks.idle(&[0], 10_000, Duration::from_secs(5));
        assert_eq!(
            times(&clocks)[0],
            (0, 15_000),
            "a wall clock that steps back moves nothing"
        );
    }

    #[test]
    fn a_tick_tells_only_what_moved() {
        let mut clocks = PartitionClocks::default();
        assert_eq!(clocks.news(), None);
        clocks.saw(&[record(0, 5)]);
        assert_eq!(clocks.news().map(|t| t.len()), Some(1));
        assert_eq!(clocks.news(), None);
        clocks.idle(&[0], 5, Duration::ZERO);
        assert_eq!(clocks.news(), None, "the same time again is not news");
        clocks.keep(&[]);
        assert!(clocks.all().is_empty());
    }
}
