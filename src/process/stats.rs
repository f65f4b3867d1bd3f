//! What a runner has done, shared with whoever watches it (`/readyz`,
//! `replay`'s progress line) and exported as metrics.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::Committed;

/// Where the runner is in one partition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PartitionLag {
    /// The next offset to process (committed in the store).
    pub next_offset: Option<i64>,
    /// The next offset the log will write, when known.
    pub high_watermark: Option<i64>,
}

impl PartitionLag {
    /// Records in the log not yet processed, when known.
    pub fn lag(&self) -> Option<i64> {
        Some((self.high_watermark? - self.next_offset.unwrap_or(0)).max(0))
    }
}

/// What a runner has done so far.
#[derive(Debug, Default, Clone, Serialize)]
pub struct RunnerStats {
    pub batches: u64,
    pub applied: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub fenced: u64,
    pub partitions: BTreeMap<i32, PartitionLag>,
    /// Whether the last poll found every partition at its end.
    pub caught_up: bool,
    /// Why the last read or commit failed, until one succeeds again.
    pub last_error: Option<String>,
    /// When the log stored the oldest record whose work is under way (an
    /// at-least-once runner's), as of its last save; `None` when none is.
    pub oldest_unfinished_ms: Option<i64>,
}

impl RunnerStats {
    /// Whether the runner is at the log's end, or was within `bound`
    /// records of it when its lag was last measured: a runner under
    /// steady traffic is seldom at the end of every partition at once.
    pub fn near_front(&self, bound: i64) -> bool {
        self.caught_up || self.lag().is_some_and(|lag| lag <= bound)
    }

    /// Records not yet processed, over the partitions whose lag is known.
    pub fn lag(&self) -> Option<i64> {
        self.partitions
            .values()
            .filter_map(PartitionLag::lag)
            .reduce(|a, b| a + b)
    }
}

/// A runner's stats, shared; they outlive the runner, so a restarted
/// stage counts on from where the last one got.
pub type SharedStats = Arc<Mutex<RunnerStats>>;

/// The runner's side of its stats.
pub(super) struct Counting {
    pub name: &'static str,
    pub stats: SharedStats,
}

impl Counting {
    fn with<T>(&self, change: impl FnOnce(&mut RunnerStats) -> T) -> T {
        change(&mut self.stats.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Shows why the last read or commit failed (in `/readyz`), until one
    /// succeeds.
    pub fn error(&self, error: &impl std::fmt::Display) {
        self.with(|s| s.last_error = Some(error.to_string()));
    }

    pub fn fenced(&self) {
        self.with(|s| s.fenced += 1);
    }

    pub fn rejected(&self, count: usize) {
        self.with(|s| s.rejected += count as u64);
        metrics::counter!(crate::metrics::PROCESSOR_EVENTS, "processor" => self.name, "outcome" => "rejected")
            .increment(count as u64);
    }

    /// A committed batch of `partitions` (each at its next offset).
    pub fn committed(&self, partitions: impl Iterator<Item = (i32, i64)>, outcome: Committed) {
        let name = self.name;
        self.with(|stats| {
            stats.last_error = None;
            stats.batches += 1;
            stats.applied += outcome.applied as u64;
            stats.duplicates += outcome.duplicates as u64;
            for (partition, next) in partitions {
                let lag = stats.partitions.entry(partition).or_default();
                lag.next_offset = Some(next);
                export_lag(name, partition, lag);
            }
        });
        metrics::counter!(crate::metrics::PROCESSOR_EVENTS, "processor" => name, "outcome" => "applied")
            .increment(outcome.applied as u64);
        metrics::counter!(crate::metrics::PROCESSOR_EVENTS, "processor" => name, "outcome" => "duplicate")
            .increment(outcome.duplicates as u64);
    }

    /// The reader's latest news: whether it is at the end, and each
    /// partition's position and high watermark.
    pub fn positions(&self, caught_up: bool, partitions: &[(i32, Option<i64>, Option<i64>)]) {
        let name = self.name;
        self.with(|stats| {
            stats.caught_up = caught_up;
            for &(partition, next, high) in partitions {
                let lag = stats.partitions.entry(partition).or_default();
                lag.next_offset = next.or(lag.next_offset);
                if high.is_some() {
                    lag.high_watermark = high;
                }
                export_lag(name, partition, lag);
            }
        });
    }

    pub fn caught_up(&self, caught_up: bool) {
        self.with(|s| s.caught_up = caught_up);
    }

    pub fn oldest_unfinished(&self, stored_at_ms: Option<i64>) {
        self.with(|s| s.oldest_unfinished_ms = stored_at_ms);
    }
}

/// Sets the lag gauge of `partition`, when its lag is known.
fn export_lag(processor: &'static str, partition: i32, lag: &PartitionLag) {
    if let Some(records) = lag.lag() {
        metrics::gauge!(crate::metrics::PROCESSOR_LAG, "processor" => processor, "partition" => partition.to_string())
            .set(records as f64);
    }
}
