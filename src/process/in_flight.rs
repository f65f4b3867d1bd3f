//! The at-least-once runner: many records of a partition are worked on
//! at once (slow I/O in parallel, seed 002), and the stored position of a
//! partition moves only past records whose work is done: the lowest
//! unfinished offset. A crash or a stop repeats what was unfinished and
//! never skips it; a receiver deduplicates on the record's identity.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio::task::JoinSet;

use super::dead_letters::DeadLetters;
use super::reading::Reading;
use super::runner::panic_message;
use super::stats::{Counting, SharedStats};
use super::{AtLeastOnce, CommitError, Committed, Group, OffsetAdvance, RunnerSettings, Undone};
use crate::log::{EventLog, LogReader, StoredRecord};

/// How an at-least-once runner reads and saves.
#[derive(Debug, Clone)]
pub struct InFlightSettings {
    pub runner: RunnerSettings,
    /// Most records being worked on at once, over all partitions (held
    /// ones included).
    pub max_in_flight: usize,
    /// How often the positions are saved while work completes.
    pub save_every: Duration,
}

/// The last record of a key's chain (partition and offset) and what
/// resolves when its work ends.
type Link = ((i32, i64), oneshot::Receiver<()>);

/// Per partition, ranges `[from, to)` of offsets whose work is done.
type Finished = HashMap<i32, Vec<(i64, i64)>>;

/// What one finished piece of work reports.
struct Done {
    partition: i32,
    /// The offsets it finishes, `[from, offset]` (one record, or a group
    /// and the records held for it).
    from: i64,
    offset: i64,
    /// The partition's generation when the work started: work started
    /// before the partition was fenced and read again is not counted.
    generation: u64,
    outcome: Result<(), Undone>,
    /// The key it was worked on in the order of, if any.
    key: Option<Vec<u8>>,
}

/// Runs an [`AtLeastOnce`] processor over a topic.
pub struct InFlightRunner<P: AtLeastOnce> {
    processor: Arc<P>,
    reading: Reading,
    dead_letters: DeadLetters,
    settings: InFlightSettings,
    counting: Counting,
    /// Per partition, the offsets being worked on, each with when the
    /// log stored its record.
    unfinished: BTreeMap<i32, BTreeMap<i64, i64>>,
    /// How many offsets `unfinished` holds: the records in flight, held
    /// ones included.
    in_flight: usize,
    /// Per partition, the offset after the last record started.
    started_up_to: HashMap<i32, i64>,
    /// Per partition, the first record the processor holds (see
    /// [`AtLeastOnce::begin`]).
    held_from: HashMap<i32, i64>,
    generations: HashMap<i32, u64>,
    /// Work finished since the positions were last saved.
    done_since_save: usize,
    /// Per key worked on in order, the last record started (partition
    /// and offset) and what resolves when its work ends: the key's next
    /// record waits for it.
    chains: HashMap<Vec<u8>, Link>,
    /// Per partition, offsets above the stored position whose work a
    /// runner before this one finished (ranges `[from, to)`): skipped.
    done_before: Finished,
    /// Per partition, the finished ranges above its position as last
    /// saved.
    saved_done: Finished,
    tasks: JoinSet<Done>,
}

impl<P: AtLeastOnce> InFlightRunner<P> {
    pub fn new(
        processor: Arc<P>,
        reader: Box<dyn LogReader>,
        log: Arc<dyn EventLog>,
        settings: InFlightSettings,
    ) -> InFlightRunner<P> {
        InFlightRunner {
            dead_letters: DeadLetters::new(log, &settings.runner, processor.name()),
            reading: Reading::new(reader, settings.runner.topic.clone()),
            processor,
            counting: Counting {
                name: settings.runner.name,
                stats: SharedStats::default(),
            },
            settings,
            unfinished: BTreeMap::new(),
            in_flight: 0,
            started_up_to: HashMap::new(),
            held_from: HashMap::new(),
            generations: HashMap::new(),
            done_since_save: 0,
            chains: HashMap::new(),
            done_before: HashMap::new(),
            saved_done: HashMap::new(),
            tasks: JoinSet::new(),
        }
    }

    /// What the runner has done, updated as it goes.
    pub fn stats(&self) -> SharedStats {
        self.counting.stats.clone()
    }

    /// Runs until `stop` resolves, or with `stop_when_caught_up` until
    /// the topic is read to its end and every record's work is done.
    /// At a stop, unfinished work is dropped and the positions saved
    /// below it: it is done again by the next runner.
    pub async fn run(mut self, stop: impl Future<Output = ()> + Send) -> Result<(), String> {
        tokio::pin!(stop);
        self.reading.start(self.processor.as_ref()).await;
        self.load_done(None).await;
        let mut last_save = Instant::now();
        loop {
            while let Some(joined) = self.tasks.try_join_next() {
                if !self.finished(joined, &mut stop).await {
                    return self.stopped().await;
                }
            }
            if last_save.elapsed() >= self.settings.save_every {
                self.start_due();
                self.save().await;
                last_save = Instant::now();
            }
            let room = self
                .settings
                .max_in_flight
                .saturating_sub(self.in_flight)
                .min(self.settings.runner.max_batch);
            if room == 0 {
                self.start_due();
                // Work that never ends (an endpoint that never answers)
                // still lets the positions and the stats be saved.
                let next_save = self.settings.save_every.saturating_sub(last_save.elapsed());
                let joined = tokio::select! {
                    biased;
                    () = &mut stop => return self.stopped().await,
                    joined = self.tasks.join_next(), if !self.tasks.is_empty() => joined,
                    () = tokio::time::sleep(next_save) => continue,
                };
                if let Some(joined) = joined
                    && !self.finished(joined, &mut stop).await
                {
                    return self.stopped().await;
                }
                continue;
            }
            let polled = tokio::select! {
                biased;
                () = &mut stop => return self.stopped().await,
                polled = self.reading.reader.poll(room, self.settings.runner.max_wait) => polled,
            };
            let Some((records, caught_up)) = self
                .reading
                .take(polled, self.processor.as_ref(), &self.counting)
                .await
            else {
                continue;
            };
            self.start_work(records);
            self.reading.probe_lag(caught_up, &self.counting);
            if caught_up
                && self.settings.runner.stop_when_caught_up
                && self.tasks.is_empty()
                && self.held_from.is_empty()
            {
                self.save().await;
                return Ok(());
            }
        }
    }

    /// Starts the work of each record, each on a task of its own.
    fn start_work(&mut self, records: Vec<StoredRecord>) {
        for record in records {
            let partition = record.partition;
            let offset = record.offset;
            if self
                .started_up_to
                .get(&partition)
                .is_some_and(|&next| offset < next)
            {
                // Already being worked on (a re-read after a seek back).
                continue;
            }
            if self
                .done_before
                .get(&partition)
                .is_some_and(|done| done.iter().any(|&(from, to)| (from..to).contains(&offset)))
            {
                // Finished by the runner before this one.
                self.started_up_to.insert(partition, offset + 1);
                continue;
            }
            // Its work may wait as long as a destination does (retries, a
            // receiver that is down, max_in_flight records at once).
            let record = record.detached();
            self.unfinished
                .entry(partition)
                .or_default()
                .insert(offset, record.timestamp_ms);
            self.in_flight += 1;
            self.started_up_to.insert(partition, offset + 1);
            let key = self.processor.in_order_of(&record);
            let Some(group) = self.processor.clone().begin(record) else {
                self.held_from.entry(partition).or_insert(offset);
                continue;
            };
            let from = self
                .held_from
                .remove(&partition)
                .unwrap_or(group.through.min(offset));
            if group.through < offset {
                // The record starts the next group.
                self.held_from.insert(partition, offset);
            }
            // The key's previous record's work, which this one waits for;
            // its own end is what the next one waits for. The sender goes
            // with the task, so a panic or abort ends the wait too.
            let (ended, waited) = oneshot::channel::<()>();
            let previous = key.as_ref().and_then(|key| {
                self.chains
                    .insert(key.clone(), ((partition, group.through), waited))
                    .map(|(_, previous)| previous)
            });
            self.spawn(partition, from, group, key, previous, ended);
        }
    }

    /// Starts the groups the processor closes on time.
    fn start_due(&mut self) {
        for (partition, group) in self.processor.due() {
            let from = self.held_from.remove(&partition).unwrap_or(group.through);
            let (ended, _) = oneshot::channel::<()>();
            self.spawn(partition, from, group, None, None, ended);
        }
    }

    fn spawn(
        &mut self,
        partition: i32,
        from: i64,
        group: Group,
        key: Option<Vec<u8>>,
        previous: Option<oneshot::Receiver<()>>,
        ended: oneshot::Sender<()>,
    ) {
        let generation = self.generations.get(&partition).copied().unwrap_or(0);
        self.tasks.spawn(async move {
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            let outcome = group.work.await;
            drop(ended);
            Done {
                partition,
                from,
                offset: group.through,
                generation,
                outcome,
                key,
            }
        });
    }

    /// Takes one finished piece of work: a reject goes to the dead
    /// letters first. False when `stop` came while it could not.
    async fn finished(
        &mut self,
        joined: Result<Done, tokio::task::JoinError>,
        stop: &mut (impl Future<Output = ()> + Unpin),
    ) -> bool {
        let done = match joined {
            Ok(done) => done,
            // A panic is a bug in one record's work; the task's identity
            // is gone with it, so its record stays unfinished until a
            // restart redoes it. Only aborts (at stop) end a task else.
            Err(e) if e.is_panic() => {
                let cause = panic_message(e.into_panic().as_ref());
                tracing::error!(
                    "the {} processor panicked on a record ({cause}); it is done again after a restart",
                    self.settings.runner.name
                );
                self.counting
                    .error(&format!("a record's work panicked: {cause}"));
                return true;
            }
            Err(_) => return true,
        };
        // The key's chain ends with this record unless a later one joined.
        if let Some(key) = &done.key
            && self
                .chains
                .get(key)
                .is_some_and(|(last, _)| *last == (done.partition, done.offset))
        {
            self.chains.remove(key);
        }
        if self.generations.get(&done.partition).copied().unwrap_or(0) != done.generation {
            return true;
        }
        match done.outcome {
            Ok(()) => {}
            Err(Undone::Rejected(rejected)) => {
                if !self.dead_letters.publish(&[rejected], stop).await {
                    return false;
                }
                self.counting.rejected(1);
            }
            Err(Undone::Reread(why)) => {
                tracing::warn!(
                    "partition {} of {}: {why}; reading it again from the stored position",
                    done.partition,
                    self.settings.runner.topic
                );
                self.counting.fenced();
                self.reread(&[done.partition]).await;
                return true;
            }
        }
        self.done_since_save += self.finish(done.partition, done.from, done.offset);
        true
    }

    /// Takes `[from, through]` of `partition` off the unfinished offsets:
    /// how many it finished.
    fn finish(&mut self, partition: i32, from: i64, through: i64) -> usize {
        let Some(offsets) = self.unfinished.get_mut(&partition) else {
            return 0;
        };
        let finished = if from == through {
            usize::from(offsets.remove(&through).is_some())
        } else {
            let finished: Vec<i64> = offsets
                .range(from..=through)
                .map(|(&offset, _)| offset)
                .collect();
            for offset in &finished {
                offsets.remove(offset);
            }
            finished.len()
        };
        self.in_flight -= finished;
        finished
    }

    /// Reads the work finished above the stored positions (of
    /// `partitions`, or all): what a runner before this one did.
    async fn load_done(&mut self, partitions: Option<&[i32]>) {
        let topic = self.settings.runner.topic.clone();
        let stored = match self.processor.stored_done(&topic).await {
            Ok(stored) => stored,
            Err(e) => {
                // Only costs repeating finished work.
                tracing::warn!(
                    "cannot read the finished work above the positions of {topic}: {e}; it is done again"
                );
                HashMap::new()
            }
        };
        match partitions {
            None => self.done_before = stored,
            Some(partitions) => {
                for partition in partitions {
                    match stored.get(partition) {
                        Some(done) => self.done_before.insert(*partition, done.clone()),
                        None => self.done_before.remove(partition),
                    };
                }
            }
        }
        self.saved_done = self.done_before.clone();
    }

    /// Where each partition can be saved: its lowest unfinished offset
    /// (else past the last record started), with the ranges finished
    /// above it; only partitions where either changed.
    fn positions(&self) -> (Vec<OffsetAdvance>, Finished) {
        let mut advances = Vec::new();
        let mut finished = HashMap::new();
        for (&partition, &after_last) in &self.started_up_to {
            let unfinished = self.unfinished.get(&partition);
            let next = unfinished
                .and_then(|offsets| offsets.keys().next().copied())
                .unwrap_or(after_last);
            let mut done = Vec::new();
            // Between unfinished offsets, and after the last up to the
            // last record started, all is finished.
            let mut low: Option<i64> = None;
            for &offset in unfinished.into_iter().flat_map(BTreeMap::keys) {
                if let Some(low) = low
                    && offset > low + 1
                {
                    done.push((low + 1, offset));
                }
                low = Some(offset);
            }
            if let Some(low) = low
                && after_last > low + 1
            {
                done.push((low + 1, after_last));
            }
            // What an earlier runner finished that this one has not read.
            for &(from, to) in self.done_before.get(&partition).into_iter().flatten() {
                let from = from.max(after_last);
                if to > from {
                    done.push((from, to));
                }
            }
            let expected = self.reading.expected(partition);
            let saved = self
                .saved_done
                .get(&partition)
                .map_or(&[][..], Vec::as_slice);
            if expected != Some(next) || saved != done.as_slice() {
                advances.push(OffsetAdvance {
                    partition,
                    expected,
                    next,
                });
                finished.insert(partition, done);
            }
        }
        (advances, finished)
    }

    /// Saves the positions that moved. A fenced partition is read again
    /// from the store (its unfinished work is forgotten: its records come
    /// again); other failures are tried at the next save.
    async fn save(&mut self) {
        let oldest = self
            .unfinished
            .values()
            .filter_map(|offsets| offsets.values().min().copied())
            .min();
        self.counting.oldest_unfinished(oldest);
        let (positions, finished) = self.positions();
        if positions.is_empty() {
            return;
        }
        let topic = self.settings.runner.topic.clone();
        match self
            .processor
            .save_positions(&topic, positions.clone(), &finished)
            .await
        {
            Ok(()) => {
                self.reading.committed(&positions);
                self.saved_done.extend(finished);
                let outcome = Committed {
                    applied: std::mem::take(&mut self.done_since_save),
                    duplicates: 0,
                };
                self.counting
                    .committed(positions.iter().map(|p| (p.partition, p.next)), outcome);
            }
            Err(CommitError::Fenced { partition, reason }) => {
                tracing::warn!(
                    "partition {partition} of {topic} was processed elsewhere ({reason}); reading it again from the stored position"
                );
                self.counting.fenced();
                let partitions: Vec<i32> = positions.iter().map(|p| p.partition).collect();
                self.reread(&partitions).await;
            }
            Err(e) => {
                tracing::warn!("cannot save the positions of {topic}: {e}; trying again");
                self.counting.error(&e);
            }
        }
    }

    /// Drops the unfinished work of `partitions` (work under way is not
    /// counted when it ends) and reads them again from the store.
    async fn reread(&mut self, partitions: &[i32]) {
        for partition in partitions {
            *self.generations.entry(*partition).or_default() += 1;
            let dropped = self.unfinished.remove(partition).map_or(0, |o| o.len());
            self.in_flight -= dropped;
            self.started_up_to.remove(partition);
            self.held_from.remove(partition);
            self.processor.forget(*partition);
        }
        self.reading
            .seek_to_store(partitions, self.processor.as_ref())
            .await;
        self.load_done(Some(partitions)).await;
    }

    /// At a stop: the finished work is saved, the unfinished dropped.
    async fn stopped(mut self) -> Result<(), String> {
        self.tasks.abort_all();
        while let Some(joined) = self.tasks.join_next().await {
            if let Ok(done) = joined
                && done.outcome.is_ok()
                && self.generations.get(&done.partition).copied().unwrap_or(0) == done.generation
            {
                self.finish(done.partition, done.from, done.offset);
            }
        }
        self.save().await;
        Ok(())
    }
}
