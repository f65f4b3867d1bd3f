//! The definition set: the processor every metric version (and every
//! rule version) reads the log through. One runner reads and parses each
//! batch once, works out for each member which events it takes and in
//! which group, claims the batch's message ids once, and hands the batch
//! to every member at once; each member commits its effects with its own
//! offsets in a transaction of its own (see [`MetricProcessor`]).
//!
//! Members may stand at different offsets: the set reads each partition
//! from the lowest of its members' offsets, and a member skips what it
//! has committed already. So a member whose commit failed catches up on
//! the batch tried again, and a new version that read the history in a
//! set of its own (a backfill) joins the live set where it stopped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::metrics::{Event, MetricProcessor};
use super::profiles::{commit_error, group_reader};
use super::{
    Checkpoint, Checkpoints, CommitError, Committed, Processor, Rejected, Runner, RunnerSettings,
};
use crate::config::Config;
use crate::definitions::{Envelope, Reads};
use crate::log::{EventLog, ReadError, StoredRecord, Topics};
use crate::metric::Head;
use crate::store::{Careful, Dialect, Store};

/// Records below this many are parsed on one thread.
const PARSE_CHUNK: usize = 2_000;

/// One version of a definition in a [`Set`]: it works out what it does
/// with each event, and applies batches with offsets of its own.
#[async_trait]
pub trait Member: Send + Sync + 'static {
    /// What a batch does with each of its events for this member, in the
    /// batch's order.
    type Steps: Send + Sync + 'static;

    /// Its set's runner in metrics and logs (`definitions` for the
    /// service's metrics and rules together).
    const RUNNER: &'static str;

    /// The name the message ids its set takes are claimed under: one
    /// claim an event for every version, since which record of an id is
    /// its first is a fact of the log.
    const CLAIMS: &'static str;

    /// The definition's name.
    fn definition(&self) -> &str;

    /// Its processor name (`metric:{name}:{version}`), under which its
    /// offsets are stored.
    fn name(&self) -> &str;

    /// The envelope fields its definition reads of an event, beyond
    /// the [`HEAD`].
    ///
    /// [`HEAD`]: crate::definitions::HEAD
    fn reads(&self) -> Reads;

    fn version(&self) -> i64;

    /// It in a log line (`orders version 2`).
    fn label(&self) -> String {
        format!("{} version {}", self.definition(), self.version())
    }

    /// No steps yet, with room for `capacity`.
    fn no_steps(&self, capacity: usize) -> Self::Steps;

    /// Works out what a batch does with `event` (whose head is `head`),
    /// after what `steps` holds.
    fn step(&self, head: &Head, event: &Envelope, steps: &mut Self::Steps);

    /// Puts `more`, a later part of the batch, after `steps`.
    fn append(steps: &mut Self::Steps, more: Self::Steps);

    /// Whether the batch's `i`th event counts (and so its message id is
    /// claimed).
    fn counts(steps: &Self::Steps, i: usize) -> bool;

    /// Reads its offsets from the store (writing what it held back
    /// first).
    async fn refresh(&self, topic: &str) -> Result<HashMap<i32, i64>, CommitError>;

    /// Applies the set's batch (`events` with this member's `steps`) from
    /// its own offsets on, and commits it (or holds it back, as `hold`
    /// says); the events it counted. `retries` marks the events that are
    /// a client's retry: their message id's first record is another.
    #[allow(clippy::too_many_arguments)]
    async fn apply(
        &self,
        topic: &str,
        events: &[Event],
        steps: &Self::Steps,
        retries: &[bool],
        advances: &[super::OffsetAdvance],
        clocks: &[super::PartitionTime],
        tick: bool,
        hold: Hold,
    ) -> Result<usize, CommitError>;

    /// Whether it would hold back a backlog's batch of `steps`
    /// ([`Hold::Backlog`]) whatever the batch makes: its bounds allow
    /// one more batch, and none of `steps` must be written at once.
    async fn would_hold(&self, steps: &Self::Steps) -> bool;

    /// Drops what it holds back, to read it again from the store's
    /// offsets.
    async fn discard(&self);

    /// Writes what it held back.
    async fn flush(&self) -> Result<(), CommitError>;
}

/// Whether a member may hold a batch back rather than write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Live traffic, or a tick: written now.
    Never,
    /// A backlog: held back while the member's own bounds allow.
    Backlog,
    /// A backlog whose message ids are claimed in memory only (see
    /// [`Pending`]): held back, as the member said it would
    /// ([`Member::would_hold`]), since nothing it counted may be written
    /// before their claims are.
    Always,
}

/// Claims not written yet after which the set writes them even while
/// every member holds its batches back (some 90 MB of table, and the
/// ids).
const PENDING_CLAIMS: usize = 1_000_000;

/// Bytes of ids not written yet after which the set writes them: long
/// ids fill memory before a million do (and an id's place in
/// [`Pending::ids`] is 32-bit).
const PENDING_ID_BYTES: usize = 64 << 20;

/// The message ids claimed while every member holds a backlog's batches
/// back (SQLite only): each batch's claims in memory, checked against
/// one another, and all of them written at once, sorted, before any
/// member writes. Random ids (the SDKs' UUIDs) land across SQLite's
/// claim index, so claims written a batch at a time rewrite most of its
/// pages every batch. A retry of an id claimed in an
/// earlier write shows only then, as a claim that is not its id's first
/// record: every member drops what it held back and the batches are read
/// again, their ids claimed through the store.
#[derive(Default)]
struct Pending {
    /// The ids, one after another: one allocation for a million claims
    /// rather than one an id, and a table of plain entries.
    ids: String,
    /// Each id's first record among the claims not written.
    first: hashbrown::HashTable<PendingClaim>,
    hasher: crate::KeyHasher,
}

/// An id's place in [`Pending::ids`] and its first record: partition,
/// offset, and when the log stored it.
struct PendingClaim {
    hash: u64,
    start: u32,
    len: u32,
    partition: i32,
    offset: i64,
    received: i64,
}

impl PendingClaim {
    fn id<'a>(&self, ids: &'a str) -> &'a str {
        &ids[self.start as usize..][..self.len as usize]
    }
}

impl Pending {
    /// Whether the set writes them before it claims more in memory.
    fn full(&self) -> bool {
        self.first.len() >= PENDING_CLAIMS || self.ids.len() >= PENDING_ID_BYTES
    }

    fn is_empty(&self) -> bool {
        self.first.is_empty()
    }

    /// Claims `id` for the record at `partition` and `offset`: whether an
    /// earlier record claimed it (a retry).
    fn claim(&mut self, id: &str, partition: i32, offset: i64, received: i64) -> bool {
        let hash = std::hash::BuildHasher::hash_one(&self.hasher, id);
        let ids = &self.ids;
        let same = |c: &PendingClaim| c.hash == hash && c.id(ids) == id;
        if let Some(first) = self.first.find(hash, same) {
            return (first.partition, first.offset) != (partition, offset);
        }
        // A batch's ids past `PENDING_ID_BYTES` are a few megabytes (a
        // Kafka fetch), far from 4 GiB.
        let start = self.ids.len() as u32;
        self.ids.push_str(id);
        let claim = PendingClaim {
            hash,
            start,
            len: id.len() as u32,
            partition,
            offset,
            received,
        };
        self.first.insert_unique(hash, claim, |c| c.hash);
        false
    }

    /// The claims as the store takes them, sorted by id.
    fn sorted(&self) -> Vec<(&str, i32, i64, i64)> {
        let mut claims: Vec<(&str, i32, i64, i64)> = self
            .first
            .iter()
            .map(|c| (c.id(&self.ids), c.partition, c.offset, c.received))
            .collect();
        claims.sort_unstable_by(|a, b| a.0.cmp(b.0));
        claims
    }
}

/// Versions of definitions of one kind read through one runner.
pub struct Set<M: Member> {
    name: String,
    store: Store,
    members: Vec<Arc<M>>,
    /// The envelope fields some member reads: the rest of an event is
    /// not built when it is parsed.
    reads: Reads,
    /// The member (its processor name) whose commit failed for good, for
    /// `/readyz`.
    failed: Mutex<Option<String>>,
    pending: Mutex<Pending>,
    /// Batches still to claim through the store before claiming in
    /// memory again: after a claim made in memory turned out to be a
    /// retry, and while they keep finding retries (a backfill's ids are
    /// all claimed before).
    careful: Careful,
}

/// The metric versions' set.
pub type MetricSet = Set<MetricProcessor>;

/// A batch parsed once: its events, and for each member (in the set's
/// order) what it does with each event.
pub struct Prepared<M: Member>(Arc<Parsed<M>>);

struct Parsed<M: Member> {
    events: Vec<Event>,
    steps: Vec<M::Steps>,
}

impl<M: Member> Set<M> {
    /// A set named `name` (in logs and the dead-letter records) of
    /// `members`.
    pub fn new(name: String, store: Store, members: Vec<Arc<M>>) -> Set<M> {
        let reads = members
            .iter()
            .fold(Reads::of(crate::definitions::HEAD), |reads, m| {
                reads.with(m.reads())
            });
        Set {
            name,
            store,
            reads,
            members,
            failed: Mutex::new(None),
            pending: Mutex::default(),
            // The first batch is claimed through the store: a set that
            // reads a history (a backfill) finds its ids claimed before.
            careful: Careful::new(1),
        }
    }

    pub fn members(&self) -> &[Arc<M>] {
        &self.members
    }

    /// Its members, as a log line names them.
    pub fn describe(&self) -> String {
        let members: Vec<String> = self.members.iter().map(|m| m.label()).collect();
        format!("{} {}", M::RUNNER, members.join(", "))
    }

    /// The member (its processor name) whose failure stopped the set, if
    /// one did.
    pub fn failed_member(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Parses `records` and works out every member's steps.
    fn parse(&self, records: Vec<StoredRecord>) -> Parsed<M> {
        let mut events = Vec::with_capacity(records.len());
        let mut steps = self.no_steps(records.len());
        for record in records {
            let read = |envelope: &Envelope| {
                let head = Head::of(envelope);
                for (member, steps) in self.members.iter().zip(&mut steps) {
                    member.step(&head, envelope, steps);
                }
            };
            events.extend(Event::parse(record, self.reads, read));
        }
        Parsed { events, steps }
    }

    /// Claims the message ids of the events some member counts, and marks
    /// each event that is a retry (its id's first record, as stored, is
    /// another), once for every member.
    /// Every member's steps, none yet, with room for `capacity`.
    fn no_steps(&self, capacity: usize) -> Vec<M::Steps> {
        self.members.iter().map(|m| m.no_steps(capacity)).collect()
    }

    async fn claim(&self, parsed: &Parsed<M>) -> Result<Vec<bool>, CommitError> {
        let mut claims: Vec<(&str, i32, i64, i64)> = parsed
            .events
            .iter()
            .enumerate()
            .filter(|(i, _)| parsed.steps.iter().any(|steps| M::counts(steps, *i)))
            .filter_map(|(_, e)| Some((e.message_id()?, e.partition, e.offset, e.received)))
            .collect();
        if claims.is_empty() {
            return Ok(vec![false; parsed.events.len()]);
        }
        // In key order, the claims' index takes them page by page rather
        // than at random; a stable sort keeps an id's first record first.
        claims.sort_by(|a, b| a.0.cmp(b.0));
        let claimed = self
            .store
            .claim_metric_ids(M::CLAIMS, &claims)
            .await
            .map_err(commit_error)?;
        let retries: Vec<bool> = parsed
            .events
            .iter()
            .map(|e| {
                e.message_id()
                    .is_some_and(|id| claimed.is_retry(id, e.partition, e.offset))
            })
            .collect();
        if retries.contains(&true) {
            self.careful.arm();
        }
        Ok(retries)
    }

    /// Whether `parsed`, a backlog's batch, may be claimed in memory: the
    /// store is SQLite, no retry was met lately, and every member would
    /// hold it back.
    async fn claims_in_memory(&self, parsed: &Parsed<M>) -> bool {
        // PostgreSQL's buffers hold the claim index, so claims written a
        // batch at a time cost it no more than once a hold, and each
        // overlaps the next batch's parse where one large write would
        // stall the runner (and other instances claim beside this one).
        if self.store.dialect() == Dialect::Postgres {
            return false;
        }
        let full = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .full();
        if full || self.careful.take() {
            return false;
        }
        for (member, steps) in self.members.iter().zip(&parsed.steps) {
            if !member.would_hold(steps).await {
                return false;
            }
        }
        true
    }

    /// Claims the message ids of `parsed` in memory (see [`Pending`]);
    /// marks each event that is a retry of an id claimed there.
    fn claim_in_memory(&self, parsed: &Parsed<M>) -> Vec<bool> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        parsed
            .events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                if !parsed.steps.iter().any(|steps| M::counts(steps, i)) {
                    return false;
                }
                let Some(id) = e.message_id() else {
                    return false;
                };
                pending.claim(id, e.partition, e.offset, e.received)
            })
            .collect()
    }

    /// Writes the claims made in memory (see [`Pending`]) before a member
    /// writes. When one was not its id's first record, or they cannot be
    /// written, every member drops what it held back, and the runner
    /// reads the batches again from the store's offsets.
    async fn write_pending(&self) -> Result<(), CommitError> {
        let first = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        if first.is_empty() {
            return Ok(());
        }
        let claims = first.sorted();
        let retry = match self.store.claim_metric_ids(M::CLAIMS, &claims).await {
            Ok(claimed) => claims
                .iter()
                .find(|(id, partition, offset, _)| claimed.is_retry(id, *partition, *offset))
                .map(|(id, partition, ..)| {
                    (
                        *partition,
                        format!(
                            "message id {id} was claimed in memory but its first record is another (a client's retry)"
                        ),
                    )
                }),
            Err(e) => Some((
                claims[0].1,
                format!("the message ids claimed in memory cannot be written ({e})"),
            )),
        };
        let Some((partition, cause)) = retry else {
            return Ok(());
        };
        self.careful.arm();
        for member in &self.members {
            member.discard().await;
        }
        Err(CommitError::Fenced {
            partition,
            reason: format!(
                "{cause}: the batches held back are read again from the store's offsets, their ids claimed through the store"
            ),
        })
    }

    /// Runs every member's commit of `parsed` at once (see
    /// [`MetricSet::each_member`]).
    async fn apply_all(
        &self,
        parsed: &Arc<Parsed<M>>,
        retries: Vec<bool>,
        checkpoint: &Checkpoint,
        tick: bool,
        hold: Hold,
    ) -> Result<(), CommitError> {
        let retries = Arc::new(retries);
        self.each_member(|i, member| {
            let (parsed, retries) = (parsed.clone(), retries.clone());
            let checkpoint = checkpoint.clone();
            async move {
                member
                    .apply(
                        &checkpoint.topic,
                        &parsed.events,
                        &parsed.steps[i],
                        &retries,
                        &checkpoint.offsets,
                        &checkpoint.clocks,
                        tick,
                        hold,
                    )
                    .await
                    .map(drop)
            }
        })
        .await
    }

    /// Runs `work` for every member at once, each on a task of its own
    /// (their CPU work runs on every core), and says how it went: the
    /// first fatal failure (remembered for `/readyz`), else the first
    /// fenced partition, else the first retryable failure.
    async fn each_member<F, W>(&self, work: F) -> Result<(), CommitError>
    where
        F: Fn(usize, Arc<M>) -> W,
        W: std::future::Future<Output = Result<(), CommitError>> + Send + 'static,
    {
        let tasks: Vec<_> = self
            .members
            .iter()
            .enumerate()
            .map(|(i, member)| tokio::spawn(work(i, member.clone())))
            .collect();
        let mut outcome = Ok(());
        for (member, task) in self.members.iter().zip(tasks) {
            let result = match task.await {
                Ok(result) => result,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => Err(CommitError::Retryable(
                    "the runtime is shutting down".into(),
                )),
            };
            let Err(e) = result else { continue };
            let worse = match (&outcome, &e) {
                (Ok(()), _) => true,
                (Err(CommitError::Fatal(_)), _) => false,
                (_, CommitError::Fatal(_)) => true,
                (Err(CommitError::Retryable(_)), CommitError::Fenced { .. }) => true,
                _ => false,
            };
            if let CommitError::Fatal(cause) = &e {
                tracing::error!("{} cannot go on: {cause}", member.label());
                let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
                failed.get_or_insert_with(|| member.name().to_owned());
            }
            if worse {
                outcome = Err(e);
            }
        }
        outcome
    }
}

#[async_trait]
impl<M: Member> Checkpoints for Set<M> {
    fn name(&self) -> &str {
        &self.name
    }

    /// Each partition's lowest offset among the members; a partition
    /// some member has nothing stored of is read from its beginning.
    async fn stored_offsets(&self, topic: &str) -> Result<HashMap<i32, i64>, CommitError> {
        // The claims made in memory are written before any member's
        // offsets are read (a failure drops what the members held back,
        // to be read again from where this returns).
        if let Err(e) = self.write_pending().await {
            tracing::warn!("{e}");
        }
        let mut lowest: Option<HashMap<i32, i64>> = None;
        for member in &self.members {
            let stored = member.refresh(topic).await?;
            lowest = Some(match lowest {
                None => stored,
                Some(mut lowest) => {
                    lowest.retain(|p, offset| match stored.get(p) {
                        Some(o) => {
                            *offset = (*offset).min(*o);
                            true
                        }
                        None => false,
                    });
                    lowest
                }
            });
        }
        Ok(lowest.unwrap_or_default())
    }
}

#[async_trait]
impl<M: Member> Processor for Set<M> {
    type Prepared = Prepared<M>;

    /// Records that are not JSON are skipped, not dead-lettered: the
    /// profile processor, which reads the same records, reports them. A
    /// large batch is parsed on every core.
    fn prepare(&self, records: Vec<StoredRecord>) -> (Prepared<M>, Vec<Rejected>) {
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let chunk = records.len().div_ceil(threads).max(PARSE_CHUNK);
        let total = records.len();
        let mut parts = Vec::with_capacity(threads);
        let mut rest = records;
        while rest.len() > chunk {
            let tail = rest.split_off(chunk);
            parts.push(std::mem::replace(&mut rest, tail));
        }
        if !rest.is_empty() {
            parts.push(rest);
        }
        let parts: Vec<Parsed<M>> = std::thread::scope(|scope| {
            let handles: Vec<_> = parts
                .into_iter()
                .map(|part| scope.spawn(|| self.parse(part)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        let mut parsed = Parsed {
            events: Vec::with_capacity(total),
            steps: self.no_steps(total),
        };
        for part in parts {
            parsed.events.extend(part.events);
            for (all, some) in parsed.steps.iter_mut().zip(part.steps) {
                M::append(all, some);
            }
        }
        (Prepared(Arc::new(parsed)), Vec::new())
    }

    async fn commit(
        &self,
        prepared: &Prepared<M>,
        checkpoint: Checkpoint,
    ) -> Result<Committed, CommitError> {
        let parsed = &prepared.0;
        let hold = if !checkpoint.backlog {
            Hold::Never
        } else if self.claims_in_memory(parsed).await {
            Hold::Always
        } else {
            Hold::Backlog
        };
        let retries = if hold == Hold::Always {
            self.claim_in_memory(parsed)
        } else {
            self.write_pending().await?;
            self.claim(parsed).await?
        };
        self.apply_all(parsed, retries, &checkpoint, false, hold)
            .await?;
        Ok(Committed {
            applied: prepared.0.events.len(),
            duplicates: 0,
        })
    }

    /// Closes what the clocks passed on quiet partitions, and stores
    /// every partition's watermark (an empty one's too, for the windows
    /// combined across partitions), for every member.
    async fn tick(&self, checkpoint: Checkpoint) -> Result<bool, CommitError> {
        if checkpoint.clocks.is_empty() {
            return Ok(false);
        }
        let empty = Arc::new(Parsed {
            events: Vec::new(),
            steps: self.no_steps(0),
        });
        self.write_pending().await?;
        self.apply_all(&empty, Vec::new(), &checkpoint, true, Hold::Never)
            .await?;
        Ok(true)
    }

    async fn flush(&self) -> Result<(), CommitError> {
        self.write_pending().await?;
        self.each_member(|_, member| async move { member.flush().await })
            .await
    }
}

/// The runner of a set of versions on `user_events`. The set's name
/// names its consumer group in Kafka mode (the live metric set's is
/// `metrics`; a backfill's is its own). With `replay` it stops once it
/// has read the log to its end.
pub fn runner<M: Member>(
    config: &Config,
    log: Arc<dyn EventLog>,
    set: Arc<Set<M>>,
    replay: bool,
) -> Result<Runner<Set<M>>, ReadError> {
    let topics = Topics::new(&config.topic_prefix);
    let topic = topics.events();
    let consumer_group = format!("{}-{}", config.kafka_group, set.name().replace(':', "-"));
    let reader = group_reader(config, &topic, &consumer_group)?;
    let settings = RunnerSettings {
        max_batch: config.process_batch,
        // The members' engines take one batch at a time.
        parallel_commits: 1,
        idle_bound: config.append_timeout + config.clock_skew,
        stop_when_caught_up: replay,
        ..RunnerSettings::new(M::RUNNER, topic, topics.rejected())
    };
    Ok(Runner::new(set, reader, log, settings))
}

/// A member for `spec`'s `version`, as the runners make them.
pub fn member(
    config: &Config,
    store: Store,
    spec: crate::definitions::MetricSpec,
    version: i64,
    budget: &super::metrics::StateBudget,
) -> Arc<MetricProcessor> {
    Arc::new(
        MetricProcessor::new(store, spec, version, config.partitions, budget)
            .linking_after(config.append_timeout + config.clock_skew),
    )
}

#[async_trait]
impl Member for MetricProcessor {
    type Steps = Vec<super::metrics::Step>;
    const RUNNER: &'static str = "metrics";
    const CLAIMS: &'static str = "metrics";

    fn definition(&self) -> &str {
        self.metric()
    }

    fn name(&self) -> &str {
        MetricProcessor::name(self)
    }

    fn reads(&self) -> Reads {
        MetricProcessor::reads(self)
    }

    fn version(&self) -> i64 {
        MetricProcessor::version(self)
    }

    fn no_steps(&self, capacity: usize) -> Self::Steps {
        Vec::with_capacity(capacity)
    }

    fn step(&self, head: &Head, event: &Envelope, steps: &mut Self::Steps) {
        steps.push(MetricProcessor::step(self, head, event));
    }

    fn append(steps: &mut Self::Steps, more: Self::Steps) {
        steps.extend(more);
    }

    fn counts(steps: &Self::Steps, i: usize) -> bool {
        steps[i].counts()
    }

    async fn refresh(&self, topic: &str) -> Result<HashMap<i32, i64>, CommitError> {
        MetricProcessor::refresh(self, topic).await
    }

    async fn apply(
        &self,
        topic: &str,
        events: &[Event],
        steps: &Self::Steps,
        retries: &[bool],
        advances: &[super::OffsetAdvance],
        clocks: &[super::PartitionTime],
        tick: bool,
        hold: Hold,
    ) -> Result<usize, CommitError> {
        MetricProcessor::apply(
            self, topic, events, steps, retries, advances, clocks, tick, hold,
        )
        .await
    }

    async fn would_hold(&self, steps: &Self::Steps) -> bool {
        MetricProcessor::would_hold(self, steps).await
    }

    async fn discard(&self) {
        MetricProcessor::discard(self).await;
    }

    async fn flush(&self) -> Result<(), CommitError> {
        MetricProcessor::flush(self).await
    }
}

/// Where a member's checkpoint takes each partition of the set's
/// `advances`, given where the member stands (`positions`, its stored
/// offsets as it last read or committed them): from its own offset,
/// skipping partitions it has committed past already. A tick (`next` =
/// `expected`) keeps every partition where the member has it.
pub fn own_offsets(
    positions: &HashMap<i32, i64>,
    advances: &[super::OffsetAdvance],
    tick: bool,
) -> Vec<super::OffsetAdvance> {
    advances
        .iter()
        .filter_map(|a| {
            let expected = positions.get(&a.partition).copied();
            let next = if tick { expected.unwrap_or(0) } else { a.next };
            let behind = tick || expected.unwrap_or(0) < a.next;
            behind.then_some(super::OffsetAdvance {
                partition: a.partition,
                expected,
                next,
            })
        })
        .collect()
}

/// A member's offsets as just read from the store (`stored`): the
/// engines of partitions whose stored offset moved since the member last
/// read or committed it (`positions`; another instance processed them, a
/// rebalance) are dropped, to be read from the store again.
pub fn follow_stored<E>(
    engines: &mut HashMap<i32, E>,
    positions: &mut Option<HashMap<i32, i64>>,
    stored: &HashMap<i32, i64>,
) {
    match positions.as_ref() {
        Some(believed) => engines.retain(|p, _| believed.get(p) == stored.get(p)),
        None => engines.clear(),
    }
    *positions = Some(stored.clone());
}

/// Adds a batch's `offsets` to those of batches held back before it:
/// each partition keeps its first expected offset and takes the last
/// next one.
pub fn hold_offsets(
    held: &mut std::collections::BTreeMap<i32, super::OffsetAdvance>,
    offsets: Vec<super::OffsetAdvance>,
) {
    for offset in offsets {
        held.entry(offset.partition)
            .and_modify(|o| o.next = offset.next)
            .or_insert(offset);
    }
}

/// What a member answers when a write failed with `e` after `earlier`
/// batches were held back (the runner counts them committed): fenced, so
/// the runner reads them again from the store's offsets (`partition`, one
/// of theirs, named); else `e` as it is.
pub fn held_back_failure(
    definition: &str,
    partition: Option<i32>,
    earlier: usize,
    e: CommitError,
) -> CommitError {
    if earlier == 0 || matches!(e, CommitError::Fatal(_) | CommitError::Fenced { .. }) {
        return e;
    }
    CommitError::Fenced {
        partition: partition.unwrap_or(0),
        reason: format!(
            "{definition} could not write the batches it held back ({e}); they are read again from the store's offsets"
        ),
    }
}

/// What the metric and rule processors' tests share.
#[cfg(test)]
pub mod testing {
    use std::sync::Arc;
    use std::time::Duration;

    use super::{Member, Set};
    use crate::process::{Checkpoint, OffsetAdvance, PartitionTime, Processor, Runner};
    use crate::store::Store;

    /// Runs `runner` until it has read the log to its end.
    pub async fn run_to_end<M: Member>(runner: Runner<Set<M>>) {
        tokio::time::timeout(Duration::from_secs(30), runner.run(std::future::pending()))
            .await
            .expect("the runner reads the log to its end")
            .expect("the runner does not fail");
    }

    /// The time hook on a quiet log, through a set of `member` alone:
    /// `partitions`' clocks of `topic` at `time_ms`.
    pub async fn tick<M: Member>(
        store: &Store,
        member: &Arc<M>,
        topic: &str,
        partitions: std::ops::Range<i32>,
        time_ms: i64,
    ) {
        let stored = store.offsets(member.name(), topic).await.unwrap();
        let (offsets, clocks) = partitions
            .map(|partition| {
                let expected = stored.get(&partition).copied();
                let offset = OffsetAdvance {
                    partition,
                    expected,
                    next: expected.unwrap_or(0),
                };
                (offset, PartitionTime { partition, time_ms })
            })
            .unzip();
        let checkpoint = Checkpoint {
            topic: topic.to_owned(),
            offsets,
            clocks,
            backlog: false,
        };
        let set = Set::new(M::RUNNER.into(), store.clone(), vec![member.clone()]);
        assert!(set.tick(checkpoint).await.unwrap());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::definitions::MetricDefinition;
    use crate::process::metrics::{StateBudget, Step};

    fn record(offset: i64, envelope: serde_json::Value) -> StoredRecord {
        StoredRecord {
            topic: "events".into(),
            partition: 0,
            offset,
            timestamp_ms: 0,
            key: None,
            value: envelope.to_string().into(),
        }
    }

    #[test]
    fn pending_claims_know_each_ids_first_record_and_fill_by_count_or_bytes() {
        let mut pending = Pending::default();
        assert!(!pending.claim("b", 0, 10, 1));
        assert!(!pending.claim("a", 1, 4, 2));
        assert!(!pending.claim("b", 0, 10, 1), "its first record again");
        assert!(pending.claim("b", 2, 11, 3), "a retry in another record");
        assert!(pending.claim("a", 1, 5, 3), "a retry in the same partition");
        assert_eq!(pending.sorted(), vec![("a", 1, 4, 2), ("b", 0, 10, 1)]);
        assert!(!pending.full());
        let long = "x".repeat(PENDING_ID_BYTES / 2);
        assert!(!pending.claim(&long, 0, 12, 4));
        assert!(!pending.full());
        assert!(!pending.claim(&format!("{long}y"), 0, 13, 4));
        assert!(pending.full(), "by bytes, with three ids");
    }

    /// A set reads of an event only what its members read, and all of a
    /// deletion, whose ids are in its properties, which no member names.
    #[tokio::test]
    async fn a_set_reads_what_its_members_read_and_every_id_a_deletion_names() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(None, dir.path()).await.unwrap();
        let spec = |body: serde_json::Value, name: &str| {
            serde_json::from_value::<MetricDefinition>(body)
                .unwrap()
                .compile(name)
                .unwrap()
        };
        let by_os = spec(
            json!({"group_by": "context.os", "aggregate": "count",
                   "where": "traits.plan == \"pro\"",
                   "window": {"kind": "tumbling", "size": "1h"}}),
            "by_os",
        );
        let per_user = spec(
            json!({"group_by": "userId", "aggregate": "sum", "field": "traits.score",
                   "window": {"kind": "tumbling", "size": "1h"}}),
            "per_user",
        );
        let budget = StateBudget::new(usize::MAX);
        let member = |spec| Arc::new(MetricProcessor::new(store.clone(), spec, 1, 1, &budget));
        let set = Set::new(
            "metrics".into(),
            store.clone(),
            vec![member(by_os), member(per_user)],
        );
        assert_eq!(
            set.reads,
            Reads::of(crate::definitions::HEAD).with(Reads::of(["context", "traits"]))
        );
        assert!(!set.reads.contains("properties") && !set.reads.contains("sentAt"));

        let at = "2026-01-01T00:00:00Z";
        let (prepared, rejected) = set.prepare(vec![
            record(
                0,
                json!({"type": "identify", "userId": "u1", "messageId": "m0", "timestamp": at,
                       "traits": {"plan": "pro"}, "context": {"os": "iOS"}, "sentAt": at}),
            ),
            record(
                1,
                json!({"type": "track", "event": "order", "userId": "u1", "messageId": "m1",
                       "timestamp": at, "traits": {"score": 4}, "properties": {"amount": 9}}),
            ),
            record(
                2,
                json!({"type": "delete", "userId": "u1", "messageId": "m2", "timestamp": at,
                       "properties": {"ids": ["u1", "anon-1"]}}),
            ),
        ]);
        assert!(rejected.is_empty());
        let parsed = &prepared.0;
        assert_eq!(parsed.events.len(), 3);
        assert!(
            matches!(&parsed.steps[0][0], Step::Observe { group: Some(g), .. } if &**g == "iOS")
        );
        assert!(matches!(
            &parsed.steps[1][1],
            Step::Observe { group: Some(g), value: Some(v), .. } if &**g == "u1" && *v == json!(4)
        ));
        assert_eq!(
            parsed.steps[1][2],
            Step::Delete(vec!["anon-1".to_owned(), "u1".to_owned()])
        );
    }

    /// The claims go to the store in key order (see [`Set::claim`]), and
    /// of an id twice in a batch the first record is the one that counts,
    /// the later one a retry, wherever their ids sort among the others.
    #[tokio::test]
    async fn of_an_id_twice_in_a_batch_the_first_record_counts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(None, dir.path()).await.unwrap();
        let spec = serde_json::from_value::<MetricDefinition>(
            json!({"aggregate": "count", "window": {"kind": "tumbling", "size": "1h"}}),
        )
        .unwrap()
        .compile("all")
        .unwrap();
        let budget = StateBudget::new(usize::MAX);
        let member = Arc::new(MetricProcessor::new(store.clone(), spec, 1, 1, &budget));
        let set = Set::new("metrics".into(), store.clone(), vec![member]);
        let event = |offset: i64, id: &str| {
            record(
                offset,
                json!({"type": "track", "event": "view", "userId": "u1", "messageId": id,
                       "timestamp": "2026-01-01T00:00:00Z"}),
            )
        };
        let ids = ["m9", "m5", "a", "m5", "z", "m9", "m0"];
        let batch = || {
            ids.iter()
                .enumerate()
                .map(|(offset, id)| event(offset as i64, id))
                .collect()
        };
        let (prepared, _) = set.prepare(batch());
        let retries = set.claim(&prepared.0).await.unwrap();
        assert_eq!(retries, [false, false, false, true, false, true, false]);

        // The batch read again (a failed commit) gets the same answers,
        // now from the first records the store holds.
        let (prepared, _) = set.prepare(batch());
        let retries = set.claim(&prepared.0).await.unwrap();
        assert_eq!(retries, [false, false, false, true, false, true, false]);
    }
}
