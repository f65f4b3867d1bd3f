//! Stream processing: the one [`Runner`] every processor uses to read the
//! log, the processors themselves ([`profiles`]), and the [`relay`] that
//! publishes profile changes back to the log.
//!
//! The runner owns batching, offsets, rebalances, dead letters and stop.
//! Its promise, whatever the crash, restart, rebalance or redelivery: each
//! record's effect is in the store exactly once. It gets there by
//! committing each batch's effects and the partitions' next offsets in one
//! store transaction, and by trusting only the store's offsets: records
//! below them are skipped, a gap above them is re-read (seek), and a
//! commit whose expected offset is no longer the stored one is refused
//! (fenced) because another reader got there first.

pub mod profiles;
pub mod relay;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::future::join_all;
use serde::Serialize;

use crate::log::{EventLog, LogReader, Polled, ReadError, Record, StoredRecord};
use crate::store::{BatchOutcome, OffsetAdvance, StoreError};

/// A record a processor cannot handle, and why.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub record: StoredRecord,
    pub reason: String,
}

/// A processor: turns a batch of records into store effects.
#[async_trait]
pub trait Processor: Send + Sync + 'static {
    /// What a batch becomes before it is committed.
    type Prepared: Send + Sync + 'static;

    /// The name its offsets are stored under.
    fn name(&self) -> &str;

    /// Parses and checks `records` (in offset order per partition), taking
    /// them over so their bytes need not be copied; the ones it cannot
    /// handle come back as rejects, and the rest are applied at commit.
    fn prepare(&self, records: Vec<StoredRecord>) -> (Self::Prepared, Vec<Rejected>);

    /// Writes a prepared batch and moves `offsets`, in one transaction.
    async fn commit(
        &self,
        prepared: &Self::Prepared,
        topic: &str,
        offsets: Vec<OffsetAdvance>,
    ) -> Result<BatchOutcome, StoreError>;

    /// The next offset of each partition of `topic` in the store.
    async fn stored_offsets(&self, topic: &str) -> Result<HashMap<i32, i64>, StoreError>;
}

/// How a runner reads.
#[derive(Debug, Clone)]
pub struct RunnerSettings {
    /// The processor's name in metrics (`processor` label).
    pub name: &'static str,
    pub topic: String,
    /// Where rejected records go (`user_events_rejected`).
    pub rejected_topic: String,
    /// Most records in one batch (one transaction).
    pub max_batch: usize,
    /// Longest wait for a batch to fill.
    pub max_wait: Duration,
    /// Stop once every partition is read to its end (replay).
    pub stop_when_caught_up: bool,
    /// Transactions a batch is split into, committed at once (by
    /// partition).
    pub parallel_commits: usize,
}

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

/// What a runner has done so far, shared with whoever watches it.
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
}

impl RunnerStats {
    /// Records not yet processed, over the partitions whose lag is known.
    pub fn lag(&self) -> Option<i64> {
        self.partitions
            .values()
            .filter_map(PartitionLag::lag)
            .reduce(|a, b| a + b)
    }
}

/// The processor's view of one partition.
#[derive(Debug, Clone, Copy)]
struct Position {
    /// The store's next offset (`None`: nothing stored).
    expected: Option<i64>,
    /// Whether the reader is known to deliver from `expected` on (checked
    /// on the partition's first record, or after a seek).
    verified: bool,
}

/// Reads a topic, hands batches to a processor, commits them with their
/// offsets. One runner per processor per process; Kafka's consumer group
/// shares partitions among the processes.
pub struct Runner<P: Processor> {
    processor: Arc<P>,
    reader: Box<dyn LogReader>,
    log: Arc<dyn EventLog>,
    settings: RunnerSettings,
    positions: HashMap<i32, Position>,
    stored: Option<HashMap<i32, i64>>,
    stats: Arc<Mutex<RunnerStats>>,
    last_lag_probe: Option<Instant>,
    /// The next records, read while the batch before them committed.
    prefetched: Option<Result<Polled, ReadError>>,
    /// The last committed batch, being freed.
    freeing: Option<tokio::task::JoinHandle<()>>,
}

/// How long to wait before retrying a failed store or log write.
const RETRY_DELAY: Duration = Duration::from_millis(500);

impl<P: Processor> Runner<P> {
    pub fn new(
        processor: Arc<P>,
        reader: Box<dyn LogReader>,
        log: Arc<dyn EventLog>,
        settings: RunnerSettings,
    ) -> Runner<P> {
        Runner {
            processor,
            reader,
            log,
            settings,
            positions: HashMap::new(),
            stored: None,
            stats: Arc::new(Mutex::new(RunnerStats::default())),
            last_lag_probe: None,
            prefetched: None,
            freeing: None,
        }
    }

    /// What the runner has done, updated as it goes.
    pub fn stats(&self) -> Arc<Mutex<RunnerStats>> {
        self.stats.clone()
    }

    /// Runs until `stop` resolves (the batch in flight is finished and
    /// committed first) or, with `stop_when_caught_up`, until the topic is
    /// read to its end.
    pub async fn run(mut self, stop: impl Future<Output = ()> + Send) {
        tokio::pin!(stop);
        // Start each partition where the store is. A consumer-group reader
        // has no partitions yet and refuses; it is checked on its first
        // records instead (`admit`).
        if let Ok(stored) = self.processor.stored_offsets(&self.settings.topic).await {
            for (partition, next) in &stored {
                if let Err(e) = self.reader.seek(*partition, Some(*next)) {
                    tracing::debug!("not seeking partition {partition} before it is assigned: {e}");
                }
            }
            self.stored = Some(stored);
        }
        let mut unseeked = false;
        loop {
            // Records read ahead, if any were there (else read, waiting).
            let ahead = self
                .prefetched
                .take()
                .filter(|p| !matches!(p, Ok(p) if p.records.is_empty()));
            let polled = match ahead {
                Some(polled) => self.top_up(polled).await,
                None => tokio::select! {
                    biased;
                    () = &mut stop => break,
                    polled = self.reader.poll(self.settings.max_batch, self.settings.max_wait) => polled,
                },
            };
            let polled = match polled {
                Ok(polled) => polled,
                Err(e) => {
                    tracing::warn!("{e}; reading again in {RETRY_DELAY:?}");
                    self.note_error(&e);
                    tokio::time::sleep(RETRY_DELAY).await;
                    continue;
                }
            };
            if self.reader.take_assignment_change() {
                // Partitions came or went: trust nothing remembered.
                self.positions.clear();
                self.stored = None;
                unseeked = true;
            }
            if unseeked {
                // Start each new partition where the store is, not where
                // the group committed: a new store, or one restored from a
                // snapshot, may be behind it, and an idle partition would
                // otherwise never show the gap. A partition not yet
                // fetching refuses the seek; it is tried again next time.
                let assigned = self.reader.assigned();
                unseeked = !self.seek_to_store(&assigned).await;
            }
            let records = match self.admit(polled.records).await {
                Ok(records) => records,
                Err(e) => {
                    tracing::warn!(
                        "cannot read the stored offsets of {}: {e}; trying again",
                        self.settings.topic
                    );
                    // The records just read are dropped: forget where each
                    // partition is, so the next records are checked against
                    // the store and the reader is sent back to them.
                    self.positions.clear();
                    self.note_error(&e);
                    tokio::time::sleep(RETRY_DELAY).await;
                    continue;
                }
            };
            // Read ahead while this batch commits, unless the runner stops
            // when caught up and is.
            let read_ahead = !(polled.caught_up && self.settings.stop_when_caught_up);
            if !records.is_empty() && !self.process(records, read_ahead, &mut stop).await {
                break;
            }
            self.probe_lag(polled.caught_up);
            if polled.caught_up && self.settings.stop_when_caught_up {
                break;
            }
        }
        tracing::info!(
            processor = self.processor.name(),
            "the {} processor stopped",
            self.processor.name()
        );
    }

    /// Adds what arrived since records were read ahead (without waiting),
    /// so a batch is everything there is, as it is without reading ahead:
    /// a read ahead that found a few records early would otherwise leave
    /// the rest for the batch after.
    async fn top_up(&mut self, polled: Result<Polled, ReadError>) -> Result<Polled, ReadError> {
        let mut polled = polled?;
        let room = self.settings.max_batch.saturating_sub(polled.records.len());
        if room > 0 {
            // A failure here is met again by the next read.
            if let Ok(more) = self.reader.poll(room, Duration::ZERO).await {
                polled.records.extend(more.records);
                polled.caught_up = more.caught_up;
            }
        }
        Ok(polled)
    }

    /// Shows why the last read or commit failed (in `/readyz`), until one
    /// succeeds.
    fn note_error(&self, error: &impl std::fmt::Display) {
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_error = Some(error.to_string());
    }

    /// Keeps the records the store has not seen: drops those below the
    /// stored offset, and seeks back when the reader starts above it.
    async fn admit(&mut self, records: Vec<StoredRecord>) -> Result<Vec<StoredRecord>, StoreError> {
        if records.is_empty() {
            return Ok(records);
        }
        if self.stored.is_none() {
            self.stored = Some(self.processor.stored_offsets(&self.settings.topic).await?);
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
                    // The reader resumed past the store (Kafka's committed
                    // offset ahead of it): go back and read what is missing.
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
        Ok(kept)
    }

    /// Rejects, commits and records one batch. Returns false when `stop`
    /// came while the batch could not be committed (it will be read again).
    ///
    /// The batch's partitions are split into `parallel_commits` groups,
    /// each committed in its own transaction at the same time: a database
    /// runs one transaction on one core, so this is how a batch uses more.
    /// A partition is in one group only, so its order and offsets stay one
    /// transaction's; profiles shared across groups (merges) are row-locked.
    ///
    /// With `read_ahead`, the next records are read while the batch
    /// commits (the database works while the reader does), for the next
    /// round of [`Runner::run`].
    async fn process(
        &mut self,
        records: Vec<StoredRecord>,
        read_ahead: bool,
        stop: &mut (impl Future<Output = ()> + Unpin),
    ) -> bool {
        let started = Instant::now();
        let name = self.settings.name;
        metrics::histogram!(crate::metrics::PROCESSOR_BATCH_RECORDS, "processor" => name)
            .record(records.len() as f64);
        let received_ms: Vec<i64> = records.iter().map(|r| r.timestamp_ms).collect();
        let groups = self.split(records);
        let advances: Vec<Vec<OffsetAdvance>> = groups.iter().map(|g| self.advances(g)).collect();
        let sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
        // Each group is parsed on a thread of its own, so a batch's
        // parsing uses every core, and leaves the async workers free.
        let parsed = join_all(groups.into_iter().map(|group| {
            let processor = self.processor.clone();
            tokio::task::spawn_blocking(move || processor.prepare(group))
        }))
        .await;
        let mut prepared = Vec::with_capacity(parsed.len());
        let mut rejects = Vec::new();
        for joined in parsed {
            let (batch, rejected) = match joined {
                Ok(parsed) => parsed,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                // Only when the runtime shuts down: nothing was committed.
                Err(_) => return false,
            };
            prepared.push(Arc::new(batch));
            rejects.extend(rejected);
        }
        if !rejects.is_empty() && !self.reject(&rejects, stop).await {
            return false;
        }
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .rejected += rejects.len() as u64;
        metrics::counter!(crate::metrics::PROCESSOR_EVENTS, "processor" => name, "outcome" => "rejected")
            .increment(rejects.len() as u64);
        let mut pending: Vec<usize> = (0..prepared.len()).collect();
        loop {
            // Each group on a task of its own, so their CPU work (encoding
            // rows, applying rules) runs on every core, not just this one.
            let commits = join_all(pending.iter().map(|&i| {
                let processor = self.processor.clone();
                let prepared = prepared[i].clone();
                let topic = self.settings.topic.clone();
                let advances = advances[i].clone();
                tokio::spawn(async move { processor.commit(&prepared, &topic, advances).await })
            }));
            let results = if read_ahead && self.prefetched.is_none() {
                // Without waiting: records not there yet are waited for
                // after the commit, as they would be without reading ahead
                // (a wait here could outlast the commit).
                let (results, next) = tokio::join!(
                    commits,
                    self.reader.poll(self.settings.max_batch, Duration::ZERO)
                );
                self.prefetched = Some(next);
                results
            } else {
                commits.await
            };
            let results = results.into_iter().map(|joined| match joined {
                Ok(result) => result,
                // A panic is a bug: it goes on as it would have here.
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                // Only when the runtime shuts down; the batch is read again.
                Err(e) => Err(StoreError::Interrupted(e.to_string())),
            });
            let mut failed = Vec::new();
            let mut fenced = Vec::new();
            for (&i, result) in pending.iter().zip(results) {
                match result {
                    Ok(outcome) => self.committed(&advances[i], outcome),
                    Err(e @ StoreError::Fenced { .. }) => {
                        // Another reader committed this partition: drop
                        // the group, read again from the store's offsets.
                        tracing::warn!("{e}");
                        fenced.push(i);
                    }
                    Err(e) => {
                        tracing::warn!(
                            "cannot commit a batch of {} records to the store: {e}; trying again in {RETRY_DELAY:?}",
                            sizes[i]
                        );
                        self.note_error(&e);
                        failed.push(i);
                    }
                }
            }
            if !fenced.is_empty() {
                let partitions: Vec<i32> = fenced
                    .iter()
                    .flat_map(|&i| advances[i].iter().map(|a| a.partition))
                    .collect();
                self.refence(&partitions).await;
                // Those partitions are read again from the store's offsets.
                if let Some(Ok(next)) = &mut self.prefetched {
                    next.records.retain(|r| !partitions.contains(&r.partition));
                }
            }
            if failed.is_empty() {
                let took = started.elapsed();
                tracing::debug!(
                    processor = name,
                    "committed {} records in {} transactions in {:.1} ms",
                    received_ms.len(),
                    prepared.len(),
                    took.as_secs_f64() * 1000.0
                );
                metrics::histogram!(crate::metrics::PROCESSOR_BATCH_SECONDS, "processor" => name)
                    .record(took.as_secs_f64());
                let now_ms = chrono::Utc::now().timestamp_millis();
                let latency = metrics::histogram!(crate::metrics::PROCESSOR_EVENT_LATENCY_SECONDS, "processor" => name);
                for received in received_ms {
                    latency.record((now_ms - received).max(0) as f64 / 1000.0);
                }
                self.free(prepared).await;
                return true;
            }
            pending = failed;
            tokio::select! {
                biased;
                () = &mut *stop => return false,
                () = tokio::time::sleep(RETRY_DELAY) => {}
            }
        }
    }

    /// Frees a committed batch on a thread of its own (tens of
    /// milliseconds for a large batch, which would hold up the next one);
    /// one batch at a time, so memory stays bounded.
    async fn free<T: Send + Sync + 'static>(&mut self, batch: Vec<Arc<T>>) {
        if let Some(freeing) = self.freeing.take() {
            let _ = freeing.await;
        }
        self.freeing = Some(tokio::task::spawn_blocking(move || drop(batch)));
    }

    /// Splits a batch into groups of whole partitions.
    fn split(&self, records: Vec<StoredRecord>) -> Vec<Vec<StoredRecord>> {
        let mut partitions: Vec<i32> = records.iter().map(|r| r.partition).collect();
        partitions.sort_unstable();
        partitions.dedup();
        let count = self
            .settings
            .parallel_commits
            .clamp(1, partitions.len().max(1));
        let mut groups: Vec<Vec<StoredRecord>> = vec![Vec::new(); count];
        for record in records {
            let slot = partitions.binary_search(&record.partition).unwrap_or(0) % count;
            groups[slot].push(record);
        }
        groups.retain(|g| !g.is_empty());
        groups
    }

    /// Where a group takes each of its partitions.
    fn advances(&self, records: &[StoredRecord]) -> Vec<OffsetAdvance> {
        let mut advances: BTreeMap<i32, OffsetAdvance> = BTreeMap::new();
        for record in records {
            let expected = self
                .positions
                .get(&record.partition)
                .and_then(|p| p.expected);
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

    /// Records a committed group.
    fn committed(&mut self, advances: &[OffsetAdvance], outcome: BatchOutcome) {
        for advance in advances {
            if let Some(position) = self.positions.get_mut(&advance.partition) {
                position.expected = Some(advance.next);
            }
            if let Some(stored) = self.stored.as_mut() {
                stored.insert(advance.partition, advance.next);
            }
            self.reader.note_committed(advance.partition, advance.next);
        }
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats.last_error = None;
        stats.batches += 1;
        stats.applied += outcome.applied as u64;
        stats.duplicates += outcome.duplicates as u64;
        let name = self.settings.name;
        metrics::counter!(crate::metrics::PROCESSOR_EVENTS, "processor" => name, "outcome" => "applied")
            .increment(outcome.applied as u64);
        metrics::counter!(crate::metrics::PROCESSOR_EVENTS, "processor" => name, "outcome" => "duplicate")
            .increment(outcome.duplicates as u64);
        for advance in advances {
            let lag = stats.partitions.entry(advance.partition).or_default();
            lag.next_offset = Some(advance.next);
            export_lag(name, advance.partition, lag);
        }
    }

    /// After a fenced commit: reload the store's offsets and move the
    /// fenced partitions back to them.
    async fn refence(&mut self, partitions: &[i32]) {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).fenced += 1;
        self.seek_to_store(partitions).await;
    }

    /// Reloads the store's offsets and moves `partitions` to them (the
    /// oldest record where none is stored). False when the offsets could
    /// not be read or a partition refused the seek.
    async fn seek_to_store(&mut self, partitions: &[i32]) -> bool {
        self.stored = None;
        self.positions.clear();
        let Ok(stored) = self.processor.stored_offsets(&self.settings.topic).await else {
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

    /// Publishes rejects to the dead-letter topic, retrying until it works
    /// or `stop` comes (then false: the batch is not committed).
    async fn reject(
        &mut self,
        rejects: &[Rejected],
        stop: &mut (impl Future<Output = ()> + Unpin),
    ) -> bool {
        let records: Vec<Record> = rejects
            .iter()
            .map(|r| Record {
                key: r
                    .record
                    .key
                    .as_ref()
                    .map(|k| String::from_utf8_lossy(k).into_owned()),
                value: serde_json::to_vec(&serde_json::json!({
                    "reason": r.reason,
                    "processor": self.processor.name(),
                    "topic": r.record.topic,
                    "partition": r.record.partition,
                    "offset": r.record.offset,
                    "value": String::from_utf8_lossy(&r.record.value),
                }))
                .unwrap_or_default(),
            })
            .collect();
        for r in rejects {
            tracing::warn!(
                partition = r.record.partition,
                offset = r.record.offset,
                "record {}/{} cannot be processed ({}); it goes to {}",
                r.record.partition,
                r.record.offset,
                r.reason,
                self.settings.rejected_topic
            );
        }
        loop {
            match self
                .log
                .append(&self.settings.rejected_topic, records.clone())
                .await
            {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(
                        "cannot write rejected records to {}: {e}; trying again",
                        self.settings.rejected_topic
                    );
                    tokio::select! {
                        biased;
                        () = &mut *stop => return false,
                        () = tokio::time::sleep(RETRY_DELAY) => {}
                    }
                }
            }
        }
    }

    /// Refreshes each partition's high watermark now and then.
    fn probe_lag(&mut self, caught_up: bool) {
        if self
            .last_lag_probe
            .is_some_and(|t| t.elapsed() < Duration::from_secs(5))
        {
            self.stats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .caught_up = caught_up;
            return;
        }
        self.last_lag_probe = Some(Instant::now());
        let partitions: Vec<i32> = self.positions.keys().copied().collect();
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats.caught_up = caught_up;
        for partition in partitions {
            let lag = stats.partitions.entry(partition).or_default();
            lag.next_offset = self
                .positions
                .get(&partition)
                .and_then(|p| p.expected)
                .or(lag.next_offset);
            if let Some(high) = self.reader.high_watermark(partition) {
                lag.high_watermark = Some(high);
            }
            export_lag(self.settings.name, partition, lag);
        }
    }
}

/// Sets the lag gauge of `partition`, when its lag is known.
fn export_lag(processor: &'static str, partition: i32, lag: &PartitionLag) {
    if let Some(records) = lag.lag() {
        metrics::gauge!(crate::metrics::PROCESSOR_LAG, "processor" => processor, "partition" => partition.to_string())
            .set(records as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::StartAt;
    use crate::log::embedded::{EmbeddedLog, EmbeddedReader};

    /// Applies records in memory and keeps offsets as a store does
    /// (a commit whose expected offset is not the stored one is fenced).
    /// On commit number `take_over_at`, another reader of partition 0
    /// first applies that partition's next `taken` records.
    struct Recorder {
        take_over_at: usize,
        taken: i64,
        state: Mutex<Recorded>,
    }

    #[derive(Default)]
    struct Recorded {
        offsets: HashMap<i32, i64>,
        applied: Vec<(i32, i64)>,
        commits: usize,
        fenced: usize,
    }

    #[async_trait]
    impl Processor for Recorder {
        type Prepared = Vec<(i32, i64)>;

        fn name(&self) -> &str {
            "recorder"
        }

        fn prepare(&self, records: Vec<StoredRecord>) -> (Self::Prepared, Vec<Rejected>) {
            (
                records.iter().map(|r| (r.partition, r.offset)).collect(),
                Vec::new(),
            )
        }

        async fn commit(
            &self,
            prepared: &Self::Prepared,
            topic: &str,
            offsets: Vec<OffsetAdvance>,
        ) -> Result<BatchOutcome, StoreError> {
            let mut state = self.state.lock().unwrap();
            state.commits += 1;
            if state.commits == self.take_over_at {
                let from = state.offsets.get(&0).copied().unwrap_or(0);
                state
                    .applied
                    .extend((from..from + self.taken).map(|o| (0, o)));
                state.offsets.insert(0, from + self.taken);
            }
            for advance in &offsets {
                if state.offsets.get(&advance.partition).copied() != advance.expected {
                    state.fenced += 1;
                    return Err(StoreError::Fenced {
                        topic: topic.to_owned(),
                        partition: advance.partition,
                    });
                }
            }
            for advance in &offsets {
                state.offsets.insert(advance.partition, advance.next);
            }
            state.applied.extend(prepared);
            Ok(BatchOutcome {
                applied: prepared.len(),
                ..BatchOutcome::default()
            })
        }

        async fn stored_offsets(&self, _topic: &str) -> Result<HashMap<i32, i64>, StoreError> {
            Ok(self.state.lock().unwrap().offsets.clone())
        }
    }

    /// Reading ahead while a batch commits loses and doubles nothing, also
    /// when the commit is fenced because another reader took a partition.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fenced_commit_with_records_read_ahead_loses_and_doubles_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let topic = "events".to_owned();
        let log = Arc::new(EmbeddedLog::open(dir.path(), 2, std::slice::from_ref(&topic)).unwrap());
        let records = (0..400)
            .map(|i| Record {
                key: Some(format!("user-{}", i % 13)),
                value: b"{}".to_vec(),
            })
            .collect();
        log.append(&topic, records).await.unwrap();
        let mut expected = Vec::new();
        let mut reader = EmbeddedReader::open(dir.path(), &topic, StartAt::Beginning).unwrap();
        loop {
            let polled = reader.poll(1000, Duration::from_millis(10)).await.unwrap();
            expected.extend(polled.records.iter().map(|r| (r.partition, r.offset)));
            if polled.caught_up {
                break;
            }
        }
        expected.sort_unstable();
        assert!(expected.iter().any(|(p, _)| *p == 0) && expected.iter().any(|(p, _)| *p == 1));

        let recorder = Arc::new(Recorder {
            take_over_at: 3,
            taken: 5,
            state: Mutex::default(),
        });
        let settings = RunnerSettings {
            name: "recorder",
            topic: topic.clone(),
            rejected_topic: "rejected".to_owned(),
            max_batch: 40,
            max_wait: Duration::from_millis(10),
            stop_when_caught_up: true,
            parallel_commits: 2,
        };
        let reader = EmbeddedReader::open(dir.path(), &topic, StartAt::Beginning).unwrap();
        let runner = Runner::new(recorder.clone(), Box::new(reader), log, settings);
        tokio::time::timeout(Duration::from_secs(30), runner.run(std::future::pending()))
            .await
            .expect("the runner reads the log to its end");

        let state = recorder.state.lock().unwrap();
        assert_eq!(
            state.fenced, 1,
            "the taken-over partition's commit was fenced"
        );
        let mut applied = state.applied.clone();
        applied.sort_unstable();
        assert_eq!(applied, expected, "every record applied exactly once");
    }
}
