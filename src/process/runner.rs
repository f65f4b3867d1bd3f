//! The exactly-once runner: reads a topic, hands batches to a
//! [`Processor`], and commits each batch's effects with its offsets in
//! one store transaction.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;

use super::clock::{Clock, SystemClock};
use super::dead_letters::DeadLetters;
use super::reading::Reading;
use super::stats::{Counting, SharedStats};
use super::{
    Checkpoint, CommitError, Committed, OffsetAdvance, PartitionTime, Processor, RETRY_DELAY,
    Rejected, RunnerSettings,
};
use crate::log::{EventLog, LogReader, Polled, ReadError, StoredRecord};

/// What a runner hands on to the runner that replaces it after a failure:
/// its counts, and the records whose batch panicked.
#[derive(Clone, Default)]
pub struct Continuity {
    pub stats: SharedStats,
    /// Per partition, the last offset of a batch whose processing
    /// panicked: up to there, records are taken one at a time, and one
    /// that panics alone is a dead letter.
    suspects: Arc<Mutex<BTreeMap<i32, i64>>>,
}

impl Continuity {
    fn suspects(&self) -> std::sync::MutexGuard<'_, BTreeMap<i32, i64>> {
        self.suspects.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Reads a topic, hands batches to a processor, commits them with their
/// offsets. One runner per processor per process; Kafka's consumer group
/// shares partitions among the processes.
pub struct Runner<P: Processor> {
    processor: Arc<P>,
    reading: Reading,
    dead_letters: DeadLetters,
    settings: RunnerSettings,
    counting: Counting,
    continuity: Continuity,
    clock: Arc<dyn Clock>,
    last_tick: Option<Instant>,
    /// The next records, read while the batch before them committed.
    prefetched: Option<Result<Polled, ReadError>>,
    /// The last committed batch, being freed.
    freeing: Option<tokio::task::JoinHandle<()>>,
}

/// How one batch went.
enum Outcome {
    Committed,
    /// Some partitions were not committed and are read again from the
    /// store's offsets (fenced): not the end of a replay.
    SentBack,
    /// `stop` came first; the batch is read again after a restart.
    Stopped,
    /// The processor panicked or failed for good; the cause, for the
    /// supervisor.
    Failed(String),
}

impl<P: Processor> Runner<P> {
    pub fn new(
        processor: Arc<P>,
        reader: Box<dyn LogReader>,
        log: Arc<dyn EventLog>,
        settings: RunnerSettings,
    ) -> Runner<P> {
        let continuity = Continuity::default();
        Runner {
            dead_letters: DeadLetters::new(log, &settings, processor.name()),
            reading: Reading::new(reader, settings.topic.clone()),
            processor,
            counting: Counting {
                name: settings.name,
                stats: continuity.stats.clone(),
            },
            continuity,
            settings,
            clock: Arc::new(SystemClock),
            last_tick: None,
            prefetched: None,
            freeing: None,
        }
    }

    /// Goes on from where a failed runner of the same stage stopped.
    pub fn continuing(mut self, continuity: Continuity) -> Runner<P> {
        self.counting.stats = continuity.stats.clone();
        self.continuity = continuity;
        self
    }

    /// Uses `clock` for the wall clock (tests).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Runner<P> {
        self.clock = clock;
        self
    }

    /// Reads through `wrap` around its reader (a benchmark notes when
    /// the first records come).
    pub fn map_reader(
        self,
        wrap: impl FnOnce(Box<dyn LogReader>) -> Box<dyn LogReader>,
    ) -> Runner<P> {
        Runner {
            reading: self.reading.map_reader(wrap),
            ..self
        }
    }

    /// What the runner has done, updated as it goes.
    pub fn stats(&self) -> SharedStats {
        self.continuity.stats.clone()
    }

    /// What a replacement of this runner needs.
    pub fn continuity(&self) -> Continuity {
        self.continuity.clone()
    }

    /// Runs until `stop` resolves (the batch in flight is finished and
    /// committed first) or, with `stop_when_caught_up`, until the topic is
    /// read to its end. An error is why it cannot go on (the processor
    /// panicked, or failed for good): its supervisor restarts it.
    pub async fn run(mut self, stop: impl Future<Output = ()> + Send) -> Result<(), String> {
        tokio::pin!(stop);
        self.reading.start(self.processor.as_ref()).await;
        let name = self.processor.name().to_owned();
        let result = loop {
            // Records read ahead, if any were there (else read, waiting).
            let ahead = self
                .prefetched
                .take()
                .filter(|p| !matches!(p, Ok(p) if p.records.is_empty()));
            let polled = match ahead {
                Some(polled) => self.top_up(polled).await,
                None => tokio::select! {
                    biased;
                    () = &mut stop => break Ok(()),
                    polled = self.reading.reader.poll(self.settings.max_batch, self.settings.max_wait) => polled,
                },
            };
            let Some((records, caught_up)) = self
                .reading
                .take(polled, self.processor.as_ref(), &self.counting)
                .await
            else {
                continue;
            };
            let mut replaying_done = caught_up && self.settings.stop_when_caught_up;
            if !records.is_empty() {
                // Read ahead while this batch commits, unless the runner
                // stops when caught up and is.
                match self
                    .process(records, caught_up, !replaying_done, &mut stop)
                    .await
                {
                    Outcome::Committed => {}
                    Outcome::SentBack => replaying_done = false,
                    Outcome::Stopped => break Ok(()),
                    Outcome::Failed(cause) => break Err(cause),
                }
            } else if caught_up && !self.settings.stop_when_caught_up {
                if let Err(cause) = self.flush().await {
                    break Err(cause);
                }
                self.reading.reseek_behind();
                let partitions = self.reading.partitions();
                let now = self.clock.now_ms();
                self.reading
                    .clocks
                    .idle(&partitions, now, self.settings.idle_bound);
                if let Err(cause) = self.tick().await {
                    break Err(cause);
                }
            }
            self.reading.probe_lag(caught_up, &self.counting);
            if replaying_done {
                match self.flush().await {
                    Ok(true) => break Ok(()),
                    Ok(false) => continue,
                    Err(cause) => break Err(cause),
                }
            }
        };
        // Batches held back are written before the runner stops; what
        // cannot be written now is read again after the restart.
        if result.is_ok() {
            let _ = self.flush().await;
        }
        tracing::info!(processor = %name, "the {name} processor stopped");
        result
    }

    /// Has the processor write the batches it held back. True when it
    /// did; false when it could not now (logged, and the partitions are
    /// read again from the store's offsets); an error when it cannot go
    /// on.
    async fn flush(&mut self) -> Result<bool, String> {
        match self.processor.flush().await {
            Ok(()) => Ok(true),
            Err(CommitError::Fatal(e)) => Err(format!(
                "the {} processor cannot write the batches it held back: {e}",
                self.settings.name
            )),
            Err(e) => {
                tracing::warn!(
                    "the {} processor could not write the batches it held back: {e}; reading them again from the store's offsets",
                    self.settings.name
                );
                self.counting.error(&e);
                self.reread_from_store(&[]).await;
                Ok(false)
            }
        }
    }

    /// Sends `partitions` and every partition the runner reads back to
    /// the store's offsets, dropping what was read ahead of them: a
    /// processor that held batches back may have lost more partitions'
    /// work than a failed batch names.
    async fn reread_from_store(&mut self, partitions: &[i32]) {
        let mut all = self.reading.partitions();
        all.extend_from_slice(partitions);
        all.sort_unstable();
        all.dedup();
        self.reading
            .seek_to_store(&all, self.processor.as_ref())
            .await;
        if let Some(Ok(next)) = &mut self.prefetched {
            next.records.retain(|r| !all.contains(&r.partition));
        }
    }

    /// Tells the processor how far the clocks have moved without records,
    /// at most every `tick`. A failure is retried at the next tick; a
    /// fatal one stops the runner.
    async fn tick(&mut self) -> Result<(), String> {
        if self
            .last_tick
            .is_some_and(|t| t.elapsed() < self.settings.tick)
        {
            return Ok(());
        }
        let Some(clocks) = self.reading.clocks.news() else {
            return Ok(());
        };
        self.last_tick = Some(Instant::now());
        // Only partitions whose stored offset this runner knows: the
        // others wait for the next tick.
        let (offsets, clocks): (Vec<OffsetAdvance>, Vec<PartitionTime>) = clocks
            .into_iter()
            .filter_map(|clock| {
                let expected = self.reading.believed(clock.partition)?;
                let offset = OffsetAdvance {
                    partition: clock.partition,
                    expected,
                    next: expected.unwrap_or(0),
                };
                Some((offset, clock))
            })
            .unzip();
        let checkpoint = Checkpoint {
            topic: self.settings.topic.clone(),
            offsets: offsets.clone(),
            clocks,
            backlog: false,
        };
        match self.processor.tick(checkpoint).await {
            Ok(stored) => {
                if stored {
                    self.reading.committed(&offsets);
                }
                Ok(())
            }
            Err(CommitError::Fatal(e)) => Err(format!(
                "the {} processor cannot advance its time: {e}",
                self.settings.name
            )),
            Err(e) => {
                tracing::warn!(
                    "the {} processor cannot advance its time: {e}; trying again",
                    self.settings.name
                );
                self.counting.error(&e);
                // Told again next time.
                self.reading.clocks.untold();
                Ok(())
            }
        }
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
            if let Ok(more) = self.reading.reader.poll(room, Duration::ZERO).await {
                polled.records.extend(more.records);
                polled.caught_up = more.caught_up;
                polled.reassigned |= more.reassigned;
            }
        }
        Ok(polled)
    }

    /// Rejects, commits and records one batch.
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
        caught_up: bool,
        read_ahead: bool,
        stop: &mut (impl Future<Output = ()> + Unpin),
    ) -> Outcome {
        if self.has_suspects(&records) {
            return self.process_one_by_one(records, stop).await;
        }
        let started = Instant::now();
        let name = self.settings.name;
        let max = self.settings.max_batch;
        let backlog = records.len() >= max || (!caught_up && records.len() >= max / 4);
        metrics::histogram!(crate::metrics::PROCESSOR_BATCH_RECORDS, "processor" => name)
            .record(records.len() as f64);
        let received_ms: Vec<i64> = records.iter().map(|r| r.timestamp_ms).collect();
        let last_offsets = last_offsets(&records);
        let groups = self.split(records);
        let advances: Vec<Vec<OffsetAdvance>> =
            groups.iter().map(|g| self.reading.advances(g)).collect();
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
                Err(e) if e.is_panic() => return self.panicked(&last_offsets, e.into_panic()),
                // Only when the runtime shuts down: nothing was committed.
                Err(_) => return Outcome::Stopped,
            };
            prepared.push(Arc::new(batch));
            rejects.extend(rejected);
        }
        if !self.dead_letters.publish(&rejects, stop).await {
            return Outcome::Stopped;
        }
        self.counting.rejected(rejects.len());
        let mut pending: Vec<usize> = (0..prepared.len()).collect();
        let mut sent_back = false;
        loop {
            let clocks = self.reading.clocks.all();
            // Each group on a task of its own, so their CPU work (encoding
            // rows, applying rules) runs on every core, not just this one.
            let commits = join_all(pending.iter().map(|&i| {
                let processor = self.processor.clone();
                let prepared = prepared[i].clone();
                let checkpoint = Checkpoint {
                    topic: self.settings.topic.clone(),
                    offsets: advances[i].clone(),
                    clocks: clocks.clone(),
                    backlog,
                };
                tokio::spawn(async move { processor.commit(&prepared, checkpoint).await })
            }));
            let results = if read_ahead && self.prefetched.is_none() {
                // Without waiting: records not there yet are waited for
                // after the commit, as they would be without reading ahead
                // (a wait here could outlast the commit).
                let (results, next) = tokio::join!(
                    commits,
                    self.reading
                        .reader
                        .poll(self.settings.max_batch, Duration::ZERO)
                );
                self.prefetched = Some(next);
                results
            } else {
                commits.await
            };
            let mut failed = Vec::new();
            let mut fenced = Vec::new();
            for (&i, joined) in pending.iter().zip(results) {
                let result = match joined {
                    Ok(result) => result,
                    Err(e) if e.is_panic() => {
                        return self.panicked(&last_offsets, e.into_panic());
                    }
                    // Only when the runtime shuts down; read again.
                    Err(_) => return Outcome::Stopped,
                };
                match result {
                    Ok(outcome) => self.committed(&advances[i], outcome),
                    Err(e @ CommitError::Fenced { .. }) => {
                        // Another reader committed this partition: drop
                        // the group, read again from the store's offsets.
                        tracing::warn!("{e}; the batch was not written");
                        fenced.push(i);
                    }
                    Err(CommitError::Fatal(e)) => {
                        return Outcome::Failed(format!(
                            "the {name} processor cannot commit a batch of {} records: {e}",
                            sizes[i]
                        ));
                    }
                    Err(e @ CommitError::Retryable(_)) => {
                        tracing::warn!(
                            "cannot commit a batch of {} records to the store: {e}; trying again in {RETRY_DELAY:?}",
                            sizes[i]
                        );
                        self.counting.error(&e);
                        failed.push(i);
                    }
                }
            }
            if !fenced.is_empty() {
                let partitions: Vec<i32> = fenced
                    .iter()
                    .flat_map(|&i| advances[i].iter().map(|a| a.partition))
                    .collect();
                self.counting.fenced();
                self.reread_from_store(&partitions).await;
                sent_back = true;
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
                self.reading.clocks.told_all();
                self.free(prepared).await;
                return if sent_back {
                    Outcome::SentBack
                } else {
                    Outcome::Committed
                };
            }
            pending = failed;
            tokio::select! {
                biased;
                () = &mut *stop => return Outcome::Stopped,
                () = tokio::time::sleep(RETRY_DELAY) => {}
            }
        }
    }

    /// Whether any of `records` is in a batch that panicked before.
    fn has_suspects(&self, records: &[StoredRecord]) -> bool {
        let suspects = self.continuity.suspects();
        !suspects.is_empty()
            && records.iter().any(|r| {
                suspects
                    .get(&r.partition)
                    .is_some_and(|&last| r.offset <= last)
            })
    }

    /// A batch panicked: remembers its records as suspects, for the
    /// runner that replaces this one, and says why it stops.
    fn panicked(
        &mut self,
        last_offsets: &BTreeMap<i32, i64>,
        panic: Box<dyn std::any::Any + Send>,
    ) -> Outcome {
        self.continuity.suspects().extend(last_offsets);
        Outcome::Failed(format!(
            "the {} processor panicked on a batch of partitions {:?} ({}); after its restart it takes those records one at a time, and one that panics again goes to {}",
            self.settings.name,
            last_offsets.keys().collect::<Vec<_>>(),
            panic_message(panic.as_ref()),
            self.settings.rejected_topic
        ))
    }

    /// Processes a batch that holds suspects one record at a time, each
    /// in its own transaction; a record whose processing panics is a dead
    /// letter, and its offset is committed past.
    async fn process_one_by_one(
        &mut self,
        records: Vec<StoredRecord>,
        stop: &mut (impl Future<Output = ()> + Unpin),
    ) -> Outcome {
        for record in records {
            let advances = self.reading.advances(std::slice::from_ref(&record));
            let processor = self.processor.clone();
            let copy = record.clone();
            let checkpoint = Checkpoint {
                topic: self.settings.topic.clone(),
                offsets: advances.clone(),
                clocks: self.reading.clocks.all(),
                backlog: false,
            };
            let parsed = tokio::task::spawn_blocking(move || processor.prepare(vec![record])).await;
            let (prepared, rejects) = match parsed {
                Ok(parsed) => parsed,
                Err(e) if e.is_panic() => {
                    let reason = format!(
                        "processing it panicked: {}",
                        panic_message(e.into_panic().as_ref())
                    );
                    let rejected = Rejected {
                        record: Box::new(copy.clone()),
                        reason,
                    };
                    (self.empty_batch(), vec![rejected])
                }
                Err(_) => return Outcome::Stopped,
            };
            if !self.dead_letters.publish(&rejects, stop).await {
                return Outcome::Stopped;
            }
            self.counting.rejected(rejects.len());
            let mut prepared = Arc::new(prepared);
            let mut panicked_once = false;
            loop {
                let processor = self.processor.clone();
                let batch = prepared.clone();
                let checkpoint = checkpoint.clone();
                let joined =
                    tokio::spawn(async move { processor.commit(&batch, checkpoint).await }).await;
                match joined {
                    Ok(Ok(outcome)) => {
                        self.committed(&advances, outcome);
                        break;
                    }
                    Ok(Err(CommitError::Fenced { .. })) => {
                        self.counting.fenced();
                        self.reread_from_store(&[copy.partition]).await;
                        return Outcome::SentBack;
                    }
                    Ok(Err(CommitError::Fatal(e))) => {
                        return Outcome::Failed(format!(
                            "the {} processor cannot commit record {}/{}: {e}",
                            self.settings.name, copy.partition, copy.offset
                        ));
                    }
                    Ok(Err(e)) => {
                        self.counting.error(&e);
                        tokio::select! {
                            biased;
                            () = &mut *stop => return Outcome::Stopped,
                            () = tokio::time::sleep(RETRY_DELAY) => {}
                        }
                    }
                    Err(e) if e.is_panic() && !panicked_once => {
                        // Its commit panics: a dead letter, and the
                        // offset moves past it with nothing applied.
                        panicked_once = true;
                        let reason = format!(
                            "committing it panicked: {}",
                            panic_message(e.into_panic().as_ref())
                        );
                        let rejects = [Rejected {
                            record: Box::new(copy.clone()),
                            reason,
                        }];
                        if !self.dead_letters.publish(&rejects, stop).await {
                            return Outcome::Stopped;
                        }
                        self.counting.rejected(1);
                        prepared = Arc::new(self.empty_batch());
                    }
                    Err(e) if e.is_panic() => {
                        return Outcome::Failed(format!(
                            "the {} processor panics committing an empty batch: {}",
                            self.settings.name,
                            panic_message(e.into_panic().as_ref())
                        ));
                    }
                    Err(_) => return Outcome::Stopped,
                }
            }
            let mut suspects = self.continuity.suspects();
            if suspects
                .get(&copy.partition)
                .is_some_and(|&last| copy.offset >= last)
            {
                suspects.remove(&copy.partition);
            }
        }
        self.reading.clocks.told_all();
        Outcome::Committed
    }

    /// What a batch of no records prepares to: a commit of it only moves
    /// offsets.
    fn empty_batch(&self) -> P::Prepared {
        self.processor.prepare(Vec::new()).0
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
        if count == 1 {
            return if records.is_empty() {
                Vec::new()
            } else {
                vec![records]
            };
        }
        let mut groups: Vec<Vec<StoredRecord>> = (0..count)
            .map(|_| Vec::with_capacity(records.len() / count + 1))
            .collect();
        for record in records {
            let slot = partitions.binary_search(&record.partition).unwrap_or(0) % count;
            groups[slot].push(record);
        }
        groups.retain(|g| !g.is_empty());
        groups
    }

    /// Records a committed group.
    fn committed(&mut self, advances: &[OffsetAdvance], outcome: Committed) {
        self.reading.committed(advances);
        self.counting
            .committed(advances.iter().map(|a| (a.partition, a.next)), outcome);
    }
}

/// The last offset of each partition in `records`.
fn last_offsets(records: &[StoredRecord]) -> BTreeMap<i32, i64> {
    let mut last = BTreeMap::new();
    for record in records {
        let offset = last.entry(record.partition).or_insert(record.offset);
        *offset = (*offset).max(record.offset);
    }
    last
}

/// What a panic said, when it said it as text.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}
