//! Stream processing: the runners every processor reads the log through,
//! the processors themselves ([`profiles`]), and the [`relay`] that
//! publishes profile changes back to the log.
//!
//! A runner owns reading, batching, offsets, fencing, rebalances, dead
//! letters, lag, time and stop; a processor only turns records into
//! effects. There are two checkpoint styles, one runner each:
//!
//! - [`Runner`], for a [`Processor`] whose effects live in a store:
//!   each batch's effects and the partitions' next offsets commit in one
//!   store transaction, so whatever the crash, restart, rebalance or
//!   redelivery, each record's effect is in the store exactly once.
//! - [`InFlightRunner`], for an [`AtLeastOnce`] processor whose effects
//!   are elsewhere (a webhook, an object store): many records of a
//!   partition are worked on at once, and the stored position moves only
//!   past records whose work is done (the lowest unfinished offset), so a
//!   crash repeats unfinished work and never skips it.
//!
//! Both trust only the stored offsets: records below them are skipped, a
//! reader that resumes above them is sent back (seek), and a commit whose
//! expected offset is no longer the stored one is refused (fenced)
//! because another reader got there first.
//!
//! Both tell the processor how far each partition's clock has advanced
//! ([`PartitionTime`], see [`clock`]), so windows and timeouts close on
//! quiet partitions too.

pub mod clock;
mod dead_letters;
pub mod defined;
mod definition_stage;
mod in_flight;
mod metric_set;
mod metric_stage;
pub mod metrics;
pub mod profiles;
mod reading;
pub mod relay;
mod rule_stage;
pub mod rules;
mod runner;
mod stats;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::BoxFuture;

use crate::log::StoredRecord;

pub use clock::{Clock, PartitionTime, SystemClock};
pub(crate) use definition_stage::compiled;
pub use in_flight::{InFlightRunner, InFlightSettings};
pub use runner::{Continuity, Runner, panic_message};
pub use stats::{PartitionLag, RunnerStats, SharedStats};

/// A record a processor cannot handle, and why: it goes to the dead
/// letters (`user_events_rejected`) and the partition goes on.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// Boxed: a rejection is rare, and a `Result` with it in place would
    /// carry a record's size on every success.
    pub record: Box<StoredRecord>,
    pub reason: String,
}

/// Where a checkpoint takes one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetAdvance {
    pub partition: i32,
    /// The next offset the runner believes is stored (`None`: nothing
    /// stored yet). The checkpoint fails as fenced when the stored one
    /// differs.
    pub expected: Option<i64>,
    /// The next offset after this checkpoint.
    pub next: i64,
}

/// One batch's checkpoint: where its partitions' offsets go, and how far
/// their clocks have got with its records.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub topic: String,
    pub offsets: Vec<OffsetAdvance>,
    /// Every partition the runner reads, after this batch.
    pub clocks: Vec<PartitionTime>,
    /// More records are waiting (a backlog): the batch is as large as the
    /// runner makes them, or a quarter of that and the reader is not at
    /// the log's end (a Kafka consumer hands over what it has fetched,
    /// often less than a batch, however long the backlog). A processor
    /// may hold the batch's effects back to write them with a later
    /// one's (see [`Processor::flush`]); live traffic comes in smaller
    /// batches, written at once.
    pub backlog: bool,
}

/// What a committed batch did, as the runner counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Committed {
    /// Records whose effect is now stored.
    pub applied: usize,
    /// Records whose effect was stored before (retries, redelivery).
    pub duplicates: usize,
}

/// Why a checkpoint or a read of the stored offsets did not happen.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    /// Another reader committed this partition past where this runner
    /// expected it: nothing was written; the runner reads it again from
    /// the stored offset.
    #[error("partition {partition} was processed elsewhere: {reason}")]
    Fenced { partition: i32, reason: String },
    /// The store could not take it now (unreachable, a conflict, a
    /// timeout): the runner tries the same batch again.
    #[error("{0}")]
    Retryable(String),
    /// Trying again cannot help (a bug, corrupt state): the runner stops
    /// and its supervisor restarts it.
    #[error("{0}")]
    Fatal(String),
}

/// What both kinds of processor have: a name, and offsets in a store.
#[async_trait]
pub trait Checkpoints: Send + Sync + 'static {
    /// The name its offsets are stored under.
    fn name(&self) -> &str;

    /// The next offset of each partition of `topic` in the store.
    async fn stored_offsets(&self, topic: &str) -> Result<HashMap<i32, i64>, CommitError>;
}

/// A processor whose effects and offsets commit in one store transaction
/// (exactly once): profiles, windows, rules.
#[async_trait]
pub trait Processor: Checkpoints {
    /// What a batch becomes before it is committed.
    type Prepared: Send + Sync + 'static;

    /// Parses and checks `records` (in offset order per partition), taking
    /// them over so their bytes need not be copied; the ones it cannot
    /// handle come back as rejects, and the rest are applied at commit.
    /// Runs on a blocking thread.
    fn prepare(&self, records: Vec<StoredRecord>) -> (Self::Prepared, Vec<Rejected>);

    /// Writes a prepared batch and moves the checkpoint's offsets, in one
    /// transaction.
    async fn commit(
        &self,
        prepared: &Self::Prepared,
        checkpoint: Checkpoint,
    ) -> Result<Committed, CommitError>;

    /// The partitions' clocks moved on without records (every partition
    /// read to its end): the time to close what has timed out. The
    /// checkpoint's offsets stay where the runner believes they are stored
    /// (`next` is `expected`; a partition with nothing stored, which is
    /// empty, gets offset 0), so storing them fences the tick like a
    /// commit: an instance that lost a partition cannot close its windows.
    /// True when the processor stored them. Called at most every
    /// [`RunnerSettings::tick`].
    async fn tick(&self, _checkpoint: Checkpoint) -> Result<bool, CommitError> {
        Ok(false)
    }

    /// Writes the effects of batches whose commit held them back (a
    /// [`Checkpoint::backlog`] batch may be applied in memory only, and
    /// written with a later batch: under a backlog, state every batch
    /// touches is then written once for several). The runner counts such
    /// a batch committed, and calls this when it has read every partition
    /// to its end and before it stops; the processor writes them too when
    /// its offsets are read (a rebalance) and at its next batch that is
    /// not held back. An error other than fatal means they were not
    /// written and are forgotten: the runner reads again from the store's
    /// offsets.
    async fn flush(&self) -> Result<(), CommitError> {
        Ok(())
    }
}

/// A processor whose effects are outside the store (at least once):
/// destinations. Each record's work runs on its own, many at once.
#[async_trait]
pub trait AtLeastOnce: Checkpoints {
    /// Does the work of one record, resolving when it is done for good
    /// (delivered, or given up on and kept by the processor as a dead
    /// letter). A record it cannot handle at all comes back rejected.
    async fn handle(&self, record: StoredRecord) -> Result<(), Rejected>;

    /// Begins `record`'s work, on the runner's task, in offset order per
    /// partition. The default is [`AtLeastOnce::handle`] on the record
    /// alone. A processor that gathers records into one piece of work (an
    /// archive's object) returns `None` to hold a record, and a [`Group`]
    /// when a piece of work is whole: its end finishes the partition's
    /// records held since its last group, up to [`Group::through`].
    fn begin(self: Arc<Self>, record: StoredRecord) -> Option<Group> {
        let through = record.offset;
        Some(Group {
            through,
            work: Box::pin(async move { self.handle(record).await.map_err(Undone::Rejected) }),
        })
    }

    /// Groups whose time has come without a record to close them (an
    /// object old enough to go), by partition. Asked at every save of the
    /// positions and whenever every in-flight slot is taken.
    fn due(self: &Arc<Self>) -> Vec<(i32, Group)> {
        Vec::new()
    }

    /// The runner has dropped the unfinished work of `partition` (it is
    /// read again from the stored position): records held for it are
    /// forgotten.
    fn forget(&self, _partition: i32) {}

    /// The key whose records are worked on one at a time, in offset
    /// order (a destination's `ordering = "per-user"`: the record's key);
    /// `None`, the default: the record's work starts at once.
    fn in_order_of(&self, _record: &StoredRecord) -> Option<Vec<u8>> {
        None
    }

    /// Stores each partition's position (the lowest offset whose work is
    /// not done) and the work done above it (`done`: per partition,
    /// ranges `[from, to)` of offsets), so a restart redoes only what was
    /// unfinished. Fenced when the stored position is not `expected`.
    async fn save_positions(
        &self,
        topic: &str,
        offsets: Vec<OffsetAdvance>,
        done: &HashMap<i32, Vec<(i64, i64)>>,
    ) -> Result<(), CommitError>;

    /// The work done above each partition's stored position, as
    /// [`AtLeastOnce::save_positions`] stored it.
    async fn stored_done(&self, topic: &str) -> Result<HashMap<i32, Vec<(i64, i64)>>, CommitError>;
}

/// Work that finishes a partition's held records (see
/// [`AtLeastOnce::begin`]).
pub struct Group {
    /// The last offset it finishes.
    pub through: i64,
    pub work: BoxFuture<'static, Result<(), Undone>>,
}

/// Why a group's work did not finish its records.
#[derive(Debug)]
pub enum Undone {
    /// A record it cannot handle at all: to the dead letters, and the
    /// group is finished.
    Rejected(Rejected),
    /// What the store holds for the partition changed under the work
    /// (another instance took the partition over): nothing of it is
    /// finished, and the partition is read again from the store, as
    /// when a save is fenced.
    Reread(String),
}

/// How a runner reads.
#[derive(Debug, Clone)]
pub struct RunnerSettings {
    /// The processor's name in metrics (`processor` label) and readiness.
    pub name: &'static str,
    pub topic: String,
    /// Where rejected records go (`user_events_rejected`).
    pub rejected_topic: String,
    /// Most records in one batch (one transaction).
    pub max_batch: usize,
    /// Longest wait for a batch to fill.
    pub max_wait: Duration,
    /// Stop once every partition is read to its end (replay). The clocks
    /// then move by the records alone.
    pub stop_when_caught_up: bool,
    /// Transactions a batch is split into, committed at once (by
    /// partition).
    pub parallel_commits: usize,
    /// How late a record stamped earlier can still be appended after the
    /// reader has found a partition's end: the append timeout plus an
    /// allowance for clock differences between instances. A quiet
    /// partition's clock moves to the wall clock less this.
    pub idle_bound: Duration,
    /// Least time between two [`Processor::tick`]s.
    pub tick: Duration,
}

impl RunnerSettings {
    /// Settings with the defaults every runner shares, for `topic`.
    pub fn new(name: &'static str, topic: String, rejected_topic: String) -> RunnerSettings {
        RunnerSettings {
            name,
            topic,
            rejected_topic,
            max_batch: 1000,
            max_wait: Duration::from_millis(50),
            stop_when_caught_up: false,
            parallel_commits: 1,
            idle_bound: Duration::from_secs(7),
            tick: Duration::from_secs(1),
        }
    }
}

/// How long to wait before retrying a failed store or log write.
const RETRY_DELAY: Duration = Duration::from_millis(500);
