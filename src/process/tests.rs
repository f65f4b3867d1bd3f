//! The runners against the real embedded log, with test processors that
//! keep their effects and offsets in memory as a store does (a checkpoint
//! whose expected offset is not the stored one is fenced).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::*;
use crate::log::embedded::{EmbeddedLog, EmbeddedReader};
use crate::log::{EventLog, LogReader, Record, StartAt, StoredRecord};
use crate::supervisor::{Supervisor, problem};

const TOPIC: &str = "events";

/// A log of `count` records over two partitions, and every record's
/// (partition, offset).
async fn log_with(count: usize) -> (tempfile::TempDir, Arc<EmbeddedLog>, Vec<(i32, i64)>) {
    let dir = tempfile::tempdir().unwrap();
    let topics = [TOPIC.to_owned(), "rejected".to_owned()];
    let log = Arc::new(EmbeddedLog::open(dir.path(), 2, &topics).unwrap());
    let records = (0..count)
        .map(|i| Record {
            key: Some(format!("user-{}", i % 13)),
            value: format!("{i}").into_bytes(),
        })
        .collect();
    log.append(TOPIC, records).await.unwrap();
    let mut all = read_all(dir.path(), TOPIC).await;
    all.sort_unstable();
    assert!(all.iter().any(|(p, _)| *p == 0) && all.iter().any(|(p, _)| *p == 1));
    (dir, log, all)
}

async fn read_all(dir: &std::path::Path, topic: &str) -> Vec<(i32, i64)> {
    records_of(dir, topic)
        .await
        .iter()
        .map(|r| (r.partition, r.offset))
        .collect()
}

async fn records_of(dir: &std::path::Path, topic: &str) -> Vec<StoredRecord> {
    let mut reader = EmbeddedReader::open(dir, topic, StartAt::Beginning).unwrap();
    let mut all = Vec::new();
    loop {
        let polled = reader.poll(1000, Duration::from_millis(10)).await.unwrap();
        all.extend(polled.records);
        if polled.caught_up {
            return all;
        }
    }
}

fn reader(dir: &tempfile::TempDir) -> Box<dyn LogReader> {
    Box::new(EmbeddedReader::open(dir.path(), TOPIC, StartAt::Beginning).unwrap())
}

fn settings(replay: bool) -> RunnerSettings {
    RunnerSettings {
        max_batch: 40,
        max_wait: Duration::from_millis(10),
        stop_when_caught_up: replay,
        parallel_commits: 2,
        tick: Duration::ZERO,
        ..RunnerSettings::new("recorder", TOPIC.to_owned(), "rejected".to_owned())
    }
}

fn fenced(partition: i32) -> CommitError {
    CommitError::Fenced {
        partition,
        reason: "stored offset moved".into(),
    }
}

/// Applies records in memory and keeps offsets as a store does. On commit
/// number `take_over_at`, another reader of partition 0 first applies
/// that partition's next `taken` records. Panics on the record whose
/// value is `panic_on`, while `panics_left` lasts.
#[derive(Default)]
struct Recorder {
    take_over_at: usize,
    taken: i64,
    panic_on: Option<String>,
    panics_left: AtomicUsize,
    state: Mutex<Recorded>,
}

#[derive(Default)]
struct Recorded {
    offsets: HashMap<i32, i64>,
    applied: Vec<(i32, i64)>,
    commits: usize,
    fenced: usize,
    /// The clocks each commit carried, and each tick's.
    commit_clocks: Vec<Vec<PartitionTime>>,
    tick_clocks: Vec<Vec<PartitionTime>>,
}

#[async_trait]
impl Checkpoints for Recorder {
    fn name(&self) -> &str {
        "recorder"
    }

    async fn stored_offsets(&self, _topic: &str) -> Result<HashMap<i32, i64>, CommitError> {
        Ok(self.state.lock().unwrap().offsets.clone())
    }
}

#[async_trait]
impl Processor for Recorder {
    type Prepared = Vec<(i32, i64)>;

    fn prepare(&self, records: Vec<StoredRecord>) -> (Self::Prepared, Vec<Rejected>) {
        for record in &records {
            if self.panic_on.as_deref().map(str::as_bytes) == Some(&record.value[..])
                && self
                    .panics_left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                panic!("a bug met record {}/{}", record.partition, record.offset);
            }
        }
        (
            records.iter().map(|r| (r.partition, r.offset)).collect(),
            Vec::new(),
        )
    }

    async fn commit(
        &self,
        prepared: &Self::Prepared,
        checkpoint: Checkpoint,
    ) -> Result<Committed, CommitError> {
        let mut state = self.state.lock().unwrap();
        state.commits += 1;
        if state.commits == self.take_over_at {
            let from = state.offsets.get(&0).copied().unwrap_or(0);
            state
                .applied
                .extend((from..from + self.taken).map(|o| (0, o)));
            state.offsets.insert(0, from + self.taken);
        }
        for advance in &checkpoint.offsets {
            if state.offsets.get(&advance.partition).copied() != advance.expected {
                state.fenced += 1;
                return Err(fenced(advance.partition));
            }
        }
        for advance in &checkpoint.offsets {
            state.offsets.insert(advance.partition, advance.next);
        }
        state.applied.extend(prepared);
        state.commit_clocks.push(checkpoint.clocks);
        Ok(Committed {
            applied: prepared.len(),
            duplicates: 0,
        })
    }

    async fn tick(&self, checkpoint: Checkpoint) -> Result<bool, CommitError> {
        self.state
            .lock()
            .unwrap()
            .tick_clocks
            .push(checkpoint.clocks);
        Ok(false)
    }
}

async fn run_to_end<P: Processor>(runner: Runner<P>) {
    tokio::time::timeout(Duration::from_secs(30), runner.run(std::future::pending()))
        .await
        .expect("the runner reads the log to its end")
        .expect("the runner does not fail");
}

/// Reading ahead while a batch commits loses and doubles nothing, also
/// when the commit is fenced because another reader took a partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_commit_with_records_read_ahead_loses_and_doubles_nothing() {
    let (dir, log, expected) = log_with(400).await;
    let recorder = Arc::new(Recorder {
        take_over_at: 3,
        taken: 5,
        ..Recorder::default()
    });
    run_to_end(Runner::new(
        recorder.clone(),
        reader(&dir),
        log,
        settings(true),
    ))
    .await;

    let state = recorder.state.lock().unwrap();
    assert_eq!(
        state.fenced, 1,
        "the taken-over partition's commit was fenced"
    );
    let mut applied = state.applied.clone();
    applied.sort_unstable();
    assert_eq!(applied, expected, "every record applied exactly once");
}

/// A wall clock the test sets.
struct FixedClock(AtomicI64);

impl Clock for FixedClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Each checkpoint carries every partition's clock: the latest log
/// timestamp its records carried. A replay, never at the end until it
/// stops, moves the clocks by the records alone: no tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_moves_each_partitions_clock_by_its_records_alone() {
    let (dir, log, _) = log_with(300).await;
    let mut latest: HashMap<i32, i64> = HashMap::new();
    for record in records_of(dir.path(), TOPIC).await {
        let time = latest
            .entry(record.partition)
            .or_insert(record.timestamp_ms);
        *time = (*time).max(record.timestamp_ms);
    }
    let recorder = Arc::new(Recorder::default());
    let far_future = Arc::new(FixedClock(AtomicI64::new(i64::MAX / 2)));
    let runner =
        Runner::new(recorder.clone(), reader(&dir), log, settings(true)).with_clock(far_future);
    run_to_end(runner).await;

    let state = recorder.state.lock().unwrap();
    assert!(
        state.tick_clocks.is_empty(),
        "a replay never moves time by the wall clock"
    );
    let last = state.commit_clocks.last().expect("a commit");
    let last: HashMap<i32, i64> = last.iter().map(|t| (t.partition, t.time_ms)).collect();
    assert_eq!(
        last, latest,
        "each partition's clock is its latest record's time"
    );
    for clocks in &state.commit_clocks {
        for time in clocks {
            assert!(
                time.time_ms <= latest[&time.partition],
                "never ahead of the records"
            );
        }
    }
}

/// Once every partition is read to its end, a quiet partition's clock
/// moves to the wall clock less the bound, with no new records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_partition_read_to_its_end_moves_with_the_wall_clock_less_the_bound() {
    let (dir, log, _) = log_with(50).await;
    let recorder = Arc::new(Recorder::default());
    // Ahead of the records' times, so the wall clock is what moves them.
    let clock = Arc::new(FixedClock(AtomicI64::new(crate::store::now_ms() + 100_000)));
    let settings = RunnerSettings {
        idle_bound: Duration::from_secs(7),
        ..settings(false)
    };
    let runner =
        Runner::new(recorder.clone(), reader(&dir), log, settings).with_clock(clock.clone());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(runner.run(crate::supervisor::stop_signal(stopped)));

    let wait_for_tick = |at: i64| {
        let recorder = recorder.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let ticks = recorder.state.lock().unwrap().tick_clocks.clone();
                if let Some(last) = ticks.last()
                    && last.len() == 2
                    && last.iter().all(|t| t.time_ms == at)
                {
                    return;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "a tick at {at} within 10 s: {ticks:?}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    let now = clock.now_ms();
    wait_for_tick(now - 7_000).await;
    clock.0.store(now + 60_000, Ordering::SeqCst);
    wait_for_tick(now + 53_000).await;

    stop.send(true).unwrap();
    running.await.unwrap().unwrap();
}

/// A processor that panics on one record: the stage is shown as stopped
/// (what readiness reports), restarted, and after the restart the record
/// panics again alone and becomes a dead letter; every other record is
/// applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_that_panics_on_a_record_is_restarted_and_the_record_dead_lettered() {
    let (dir, log, expected) = log_with(200).await;
    let poison = "77".to_owned();
    let recorder = Arc::new(Recorder {
        panic_on: Some(poison.clone()),
        panics_left: AtomicUsize::new(2),
        ..Recorder::default()
    });
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut supervisor = Supervisor::new(stopped);
    let continuity = Continuity::default();
    let (made, path) = (recorder.clone(), dir.path().to_owned());
    let log_for_stage: Arc<dyn EventLog> = log.clone();
    supervisor
        .spawn("recorder", move |stop| {
            let reader = Box::new(EmbeddedReader::open(&path, TOPIC, StartAt::Beginning).unwrap());
            let runner = Runner::new(made.clone(), reader, log_for_stage.clone(), settings(false))
                .continuing(continuity.clone());
            Ok(Box::pin(runner.run(stop)))
        })
        .unwrap();
    let stages = supervisor.stages();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut seen_problem = None;
    loop {
        if seen_problem.is_none() {
            seen_problem = problem(&stages);
        }
        let applied = recorder.state.lock().unwrap().applied.len();
        if applied == expected.len() - 1 && problem(&stages).is_none() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "recovery within 20 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let problem = seen_problem.expect("readiness showed the stopped stage");
    assert!(
        problem.contains("recorder") && problem.contains("panicked"),
        "{problem}"
    );
    assert_eq!(stages.lock().unwrap()["recorder"].restarts, 1);

    let letters = records_of(dir.path(), "rejected").await;
    assert_eq!(letters.len(), 1, "the poison record is one dead letter");
    let letter: serde_json::Value = serde_json::from_slice(&letters[0].value).unwrap();
    assert_eq!(letter["value"], poison.as_str());
    assert!(
        letter["reason"].as_str().unwrap().contains("panicked"),
        "{letter}"
    );
    let poisoned = (
        letter["partition"].as_i64().unwrap() as i32,
        letter["offset"].as_i64().unwrap(),
    );

    let mut applied = recorder.state.lock().unwrap().applied.clone();
    applied.sort_unstable();
    let others: Vec<(i32, i64)> = expected.into_iter().filter(|r| *r != poisoned).collect();
    assert_eq!(applied, others, "every other record applied exactly once");
    stop.send(true).unwrap();
    supervisor.join().await;
}

/// Works on records out of order with many in flight; keeps what it
/// finished, and checks on every save that no position passes a record
/// whose work is not done.
#[derive(Default)]
struct Deliverer {
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
    state: Mutex<Delivered>,
    /// While set, the work of record 20 of partition 0 does not finish:
    /// a runner stopped then has work finished above that partition's
    /// position, whatever the machine's pace.
    held_up: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Delivered {
    positions: HashMap<i32, i64>,
    /// Per partition, the ranges saved as finished above its position.
    finished: HashMap<i32, Vec<(i64, i64)>>,
    done: BTreeSet<(i32, i64)>,
    /// How many times each record's work ran to its end.
    deliveries: HashMap<(i32, i64), usize>,
    saves: usize,
}

#[async_trait]
impl Checkpoints for Deliverer {
    fn name(&self) -> &str {
        "deliverer"
    }

    async fn stored_offsets(&self, _topic: &str) -> Result<HashMap<i32, i64>, CommitError> {
        Ok(self.state.lock().unwrap().positions.clone())
    }
}

#[async_trait]
impl AtLeastOnce for Deliverer {
    async fn handle(&self, record: StoredRecord) -> Result<(), Rejected> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_in_flight.fetch_max(now, Ordering::SeqCst);
        // Later records of a partition often finish first.
        let delay = (record.offset * 7919 % 13) as u64;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        while (record.partition, record.offset) == (0, 20) && self.held_up.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let mut state = self.state.lock().unwrap();
        state.done.insert((record.partition, record.offset));
        *state
            .deliveries
            .entry((record.partition, record.offset))
            .or_default() += 1;
        Ok(())
    }

    async fn save_positions(
        &self,
        _topic: &str,
        offsets: Vec<OffsetAdvance>,
        finished: &HashMap<i32, Vec<(i64, i64)>>,
    ) -> Result<(), CommitError> {
        let mut state = self.state.lock().unwrap();
        for advance in &offsets {
            if state.positions.get(&advance.partition).copied() != advance.expected {
                return Err(fenced(advance.partition));
            }
            let above = finished.get(&advance.partition).into_iter().flatten();
            for offset in (0..advance.next).chain(above.flat_map(|&(from, to)| from..to)) {
                assert!(
                    state.done.contains(&(advance.partition, offset)),
                    "position {} of partition {} passes unfinished record {offset}",
                    advance.next,
                    advance.partition
                );
            }
        }
        for advance in offsets {
            state.positions.insert(advance.partition, advance.next);
            let ranges = finished
                .get(&advance.partition)
                .cloned()
                .unwrap_or_default();
            state.finished.insert(advance.partition, ranges);
        }
        state.saves += 1;
        Ok(())
    }

    async fn stored_done(
        &self,
        _topic: &str,
    ) -> Result<HashMap<i32, Vec<(i64, i64)>>, CommitError> {
        Ok(self.state.lock().unwrap().finished.clone())
    }
}

fn in_flight_settings(replay: bool) -> InFlightSettings {
    InFlightSettings {
        runner: settings(replay),
        max_in_flight: 16,
        save_every: Duration::from_millis(5),
    }
}

/// Many records of a partition are worked on at once, the stored
/// position is always the lowest unfinished offset, and a runner stopped
/// mid-way (a crash as far as the store knows) leaves its unfinished work
/// to the next, which skips nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_work_moves_the_position_only_past_finished_records() {
    let (dir, log, expected) = log_with(300).await;
    let deliverer = Arc::new(Deliverer::default());
    deliverer.held_up.store(true, Ordering::SeqCst);

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let first = InFlightRunner::new(
        deliverer.clone(),
        reader(&dir),
        log.clone(),
        in_flight_settings(false),
    );
    let running = tokio::spawn(first.run(crate::supervisor::stop_signal(stopped)));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while deliverer.state.lock().unwrap().done.len() < 100 {
        assert!(
            std::time::Instant::now() < deadline,
            "work done within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    stop.send(true).unwrap();
    running.await.unwrap().unwrap();
    let (saved_at_stop, finished_at_stop) = {
        let state = deliverer.state.lock().unwrap();
        assert!(state.done.len() < expected.len(), "stopped mid-way");
        assert!(state.saves > 0);
        (state.positions.clone(), state.finished.clone())
    };
    assert!(
        finished_at_stop.values().any(|r| !r.is_empty()),
        "work finished above a position was saved: {finished_at_stop:?}"
    );
    deliverer.held_up.store(false, Ordering::SeqCst);

    let second = InFlightRunner::new(
        deliverer.clone(),
        reader(&dir),
        log,
        in_flight_settings(true),
    );
    tokio::time::timeout(Duration::from_secs(30), second.run(std::future::pending()))
        .await
        .expect("the second runner reads to the end")
        .unwrap();

    let state = deliverer.state.lock().unwrap();
    let done: Vec<(i32, i64)> = state.done.iter().copied().collect();
    assert_eq!(done, expected, "every record's work done, none skipped");
    let mut ends: Vec<(i32, i64)> = state.positions.iter().map(|(&p, &n)| (p, n)).collect();
    ends.sort_unstable();
    let mut last: HashMap<i32, i64> = HashMap::new();
    for (p, o) in &expected {
        last.insert(*p, o + 1);
    }
    let mut want: Vec<(i32, i64)> = last.into_iter().collect();
    want.sort_unstable();
    assert_eq!(ends, want, "the positions end past the last records");
    assert!(
        deliverer.most_in_flight.load(Ordering::SeqCst) > 1,
        "records were worked on at once"
    );
    for (&(partition, offset), &times) in &state.deliveries {
        if times > 1 {
            assert!(
                offset >= saved_at_stop.get(&partition).copied().unwrap_or(0),
                "only work past the saved position is done again ({partition}/{offset})"
            );
            let finished = finished_at_stop.get(&partition).into_iter().flatten();
            assert!(
                !finished
                    .clone()
                    .any(|&(from, to)| (from..to).contains(&offset)),
                "work saved as finished is not done again ({partition}/{offset})"
            );
        }
    }
}

/// Holds records and finishes them in groups (an archive's objects): a
/// group of seven closes with its last record, a record whose value is a
/// multiple of 11 closes the group before it and starts the next, and
/// what is left closes on time ([`AtLeastOnce::due`]).
#[derive(Default)]
struct Gatherer {
    deliverer: Deliverer,
    held: Mutex<HashMap<i32, Vec<i64>>>,
    groups: Mutex<Vec<(i32, Vec<i64>)>>,
    /// The first group of partition 1 finds the store changed under it.
    reread: std::sync::atomic::AtomicBool,
}

impl Gatherer {
    /// Waits until `partition` has a stored position.
    async fn saved(&self, partition: i32) {
        let stored = async {
            while !self
                .deliverer
                .state
                .lock()
                .unwrap()
                .positions
                .contains_key(&partition)
            {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), stored)
            .await
            .expect("the other partition's position is stored");
    }

    fn close(self: &Arc<Self>, partition: i32, offsets: Vec<i64>) -> Group {
        let through = *offsets.last().unwrap();
        self.groups
            .lock()
            .unwrap()
            .push((partition, offsets.clone()));
        let this = self.clone();
        Group {
            through,
            work: Box::pin(async move {
                tokio::time::sleep(Duration::from_millis((through % 5) as u64)).await;
                if partition == 1 && !this.reread.swap(true, Ordering::SeqCst) {
                    // Once partition 0's position is stored: reading
                    // partition 1 again must leave it where it is.
                    this.saved(0).await;
                    return Err(Undone::Reread("the test says so".to_owned()));
                }
                let mut state = this.deliverer.state.lock().unwrap();
                for offset in offsets {
                    state.done.insert((partition, offset));
                    *state.deliveries.entry((partition, offset)).or_default() += 1;
                }
                Ok(())
            }),
        }
    }
}

#[async_trait]
impl Checkpoints for Gatherer {
    fn name(&self) -> &str {
        "gatherer"
    }

    async fn stored_offsets(&self, topic: &str) -> Result<HashMap<i32, i64>, CommitError> {
        self.deliverer.stored_offsets(topic).await
    }
}

#[async_trait]
impl AtLeastOnce for Gatherer {
    async fn handle(&self, _record: StoredRecord) -> Result<(), Rejected> {
        unreachable!("every record is begun")
    }

    fn begin(self: Arc<Self>, record: StoredRecord) -> Option<Group> {
        let value: i64 = String::from_utf8_lossy(&record.value).parse().unwrap();
        let mut held = self.held.lock().unwrap();
        let offsets = held.entry(record.partition).or_default();
        if value % 11 == 0 && !offsets.is_empty() {
            let before = std::mem::replace(offsets, vec![record.offset]);
            drop(held);
            return Some(self.close(record.partition, before));
        }
        offsets.push(record.offset);
        if offsets.len() < 7 {
            return None;
        }
        let group = std::mem::take(offsets);
        drop(held);
        Some(self.close(record.partition, group))
    }

    fn forget(&self, partition: i32) {
        self.held.lock().unwrap().remove(&partition);
    }

    fn due(self: &Arc<Self>) -> Vec<(i32, Group)> {
        let held: Vec<(i32, Vec<i64>)> = self
            .held
            .lock()
            .unwrap()
            .drain()
            .filter(|(_, offsets)| !offsets.is_empty())
            .collect();
        held.into_iter()
            .map(|(partition, offsets)| (partition, self.close(partition, offsets)))
            .collect()
    }

    async fn save_positions(
        &self,
        topic: &str,
        offsets: Vec<OffsetAdvance>,
        done: &HashMap<i32, Vec<(i64, i64)>>,
    ) -> Result<(), CommitError> {
        self.deliverer.save_positions(topic, offsets, done).await
    }

    async fn stored_done(&self, topic: &str) -> Result<HashMap<i32, Vec<(i64, i64)>>, CommitError> {
        self.deliverer.stored_done(topic).await
    }
}

/// Records held for a group are finished with it, the position never
/// passes a held record, and the tail closes on time; a group whose
/// partition must be read again finishes nothing and its records come
/// again: every record done, and only that partition's work repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_records_finish_with_their_group() {
    let (dir, log, expected) = log_with(300).await;
    let gatherer = Arc::new(Gatherer::default());
    let runner = InFlightRunner::new(
        gatherer.clone(),
        reader(&dir),
        log,
        InFlightSettings {
            max_in_flight: 40,
            ..in_flight_settings(true)
        },
    );
    tokio::time::timeout(Duration::from_secs(30), runner.run(std::future::pending()))
        .await
        .expect("the runner reads to the end")
        .unwrap();

    let state = gatherer.deliverer.state.lock().unwrap();
    let done: Vec<(i32, i64)> = state.done.iter().copied().collect();
    assert_eq!(done, expected, "every record finished, none skipped");
    assert!(
        gatherer.reread.load(Ordering::SeqCst),
        "a partition was read again"
    );
    // Work under way when partition 1 was read again is done again (at
    // least once); nothing else is.
    assert!(
        state
            .deliveries
            .iter()
            .all(|(&(partition, _), &n)| n == 1 || partition == 1),
        "only the partition read again repeats work"
    );
    let groups = gatherer.groups.lock().unwrap();
    assert!(groups.iter().any(|(_, g)| g.len() == 7), "full groups");
    assert!(
        groups.iter().any(|(_, g)| g.len() < 7),
        "groups closed before a multiple of 11, and on time"
    );
    let mut last: HashMap<i32, i64> = HashMap::new();
    for (p, o) in &expected {
        last.insert(*p, o + 1);
    }
    assert_eq!(
        state.positions, last,
        "the positions end past the last records"
    );
}

/// Reading one partition again from the store leaves the others where
/// the runner knows them stored: a save of theirs right after is not
/// taken for another instance's work (a fence), which would send them
/// back too and repeat the work they had under way.
#[tokio::test]
async fn reading_one_partition_again_leaves_the_others_positions() {
    let (dir, _log, _) = log_with(20).await;
    let store = Deliverer::default();
    store
        .state
        .lock()
        .unwrap()
        .positions
        .extend([(0, 2), (1, 3)]);
    let mut reading = reading::Reading::new(reader(&dir), TOPIC.to_owned());
    let counting = stats::Counting {
        name: "test",
        stats: SharedStats::default(),
    };
    let polled = reading.reader.poll(100, Duration::from_millis(100)).await;
    reading
        .take(polled, &store, &counting)
        .await
        .expect("records are read");
    assert_eq!(
        (reading.expected(0), reading.expected(1)),
        (Some(2), Some(3))
    );

    store.state.lock().unwrap().positions.insert(1, 1);
    assert!(reading.seek_to_store(&[1], &store).await);
    assert_eq!(reading.expected(0), Some(2), "partition 0 stays");
    assert_eq!(reading.believed(1), Some(Some(1)), "partition 1 as stored");
}
