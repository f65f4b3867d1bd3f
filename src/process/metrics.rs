//! One version of one metric definition over `user_events`: a member of
//! a [`MetricSet`], the processor the one runner reads the log through
//! for every metric. Its offsets are its own (`metric:{name}:{version}`),
//! so a new or changed definition starts from the log's beginning
//! (history first, then live) and its progress is its lag.
//!
//! Each partition has its own window engine, clocked by the partition's
//! clock (the runner's time hook moves it on quiet partitions). A batch's
//! events, the windows its clocks close, the groups' states and the
//! offsets commit in one store transaction; under a backlog several
//! batches share one ([`HeldBack`]). When a commit fails, the partitions
//! it touched are read back from the store, and the batches it carried
//! are read again from the store's offsets, so a retry, a crash or a
//! rebalance never counts an event twice.
//!
//! [`MetricSet`]: super::metric_set::MetricSet

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::metric_set::{Hold, held_back_failure, hold_offsets};
use super::profiles::commit_error;
use super::{CommitError, OffsetAdvance, PartitionTime};
use crate::definitions::{Envelope, GroupBy, MetricSpec, Reads};
use crate::log::StoredRecord;
use crate::metric::{Head, Metric};
use crate::store::{
    Combine, ComputedTrait, GroupRow, LateEvent, MergeRow, MetricBatch, StateSummary, Store,
    StoredWindow,
};
use crate::windows::{Closed, Millis, Stamp};

pub use super::defined::MetricRunners;
pub use super::metric_set::{Member, MetricSet, member, runner};
pub use super::metric_stage::{DefinitionState, purge_superseded};

/// The name a metric version's offsets and states are stored under.
pub fn processor_name(metric: &str, version: i64) -> String {
    format!("metric:{metric}:{version}")
}

/// The memory the metric runners of a process may keep open window state
/// in (`metric-state-budget-mb`). Each running metric version may hold
/// its even part of it; one that holds that much may also hold an equal
/// share, with the others that do, of what the runners under their part
/// leave unused: a global count or a metric grouped by product holds a
/// few groups, and the per-user metrics beside it split their room. A
/// runner over what it may hold evicts the groups it used least recently
/// (their state is in the store after every commit) and reads one back
/// when an event, a deletion or the watermark needs it. Runners look at
/// what the others hold at each batch, so when one under its part grows
/// (a new version starting), together they exceed the budget by at most
/// its part until the others have evicted, a batch later.
#[derive(Debug, Clone)]
pub struct StateBudget {
    bytes: usize,
    /// What each runner holding a part holds, by the part's number.
    runners: Arc<std::sync::Mutex<BTreeMap<u64, usize>>>,
    next: Arc<AtomicU64>,
}

impl StateBudget {
    pub fn new(bytes: usize) -> StateBudget {
        StateBudget {
            bytes,
            runners: Arc::default(),
            next: Arc::default(),
        }
    }

    fn runners(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, usize>> {
        self.runners.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A runner's part of the budget, for as long as it is held.
    fn share(&self) -> BudgetShare {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.runners().insert(id, 0);
        BudgetShare {
            budget: self.clone(),
            id,
        }
    }
}

/// One running metric version's part of a [`StateBudget`].
#[derive(Debug)]
struct BudgetShare {
    budget: StateBudget,
    id: u64,
}

impl BudgetShare {
    /// What this runner may hold: its even part and, when it holds that
    /// much, an equal share with the others that do of what those under
    /// theirs leave.
    fn bytes(&self) -> usize {
        let runners = self.budget.runners();
        let even = self.budget.bytes / runners.len().max(1);
        if runners.get(&self.id).is_none_or(|held| *held < even) {
            return even;
        }
        let others = runners.iter().filter(|(id, _)| **id != self.id);
        let (unused, full) = others.fold((0, 1), |(unused, full), (_, held)| {
            if *held < even {
                (unused + (even - held), full)
            } else {
                (unused, full + 1)
            }
        });
        even + unused / full
    }

    /// Records that this runner holds `bytes` now.
    fn hold(&self, bytes: usize) {
        self.budget.runners().insert(self.id, bytes);
    }
}

impl Drop for BudgetShare {
    fn drop(&mut self) {
        self.budget.runners().remove(&self.id);
    }
}

/// What a group held in memory costs beyond its state's JSON: its entries
/// in the engine's group table and timer set and in [`Held::groups`], and
/// the state's own allocations. Measured: about 330 bytes a group of a
/// per-user hourly count, between 220,000 and 880,000 groups held
/// (docs/benchmarks.md, `bench metrics`); counted a little high, so a
/// budget is not overrun.
pub const GROUP_BYTES: usize = 380;

/// One partition's engine, and which of its groups are in memory.
struct Held {
    metric: Metric,
    /// Each group in memory: its estimated bytes and the batch that last
    /// changed or read it.
    groups: HashMap<String, (usize, u64), crate::KeyHasher>,
    bytes: usize,
    /// Some group's state is only in the store (evicted, or too much to
    /// read when the partition was loaded).
    spilled: bool,
    /// No group held only in the store is due before this.
    spilled_due: Option<Millis>,
    /// Groups read back without a stored `due`, to write again with one.
    undated: Vec<String>,
}

impl Held {
    fn new(metric: Metric) -> Held {
        Held {
            metric,
            groups: HashMap::default(),
            bytes: 0,
            spilled: false,
            spilled_due: None,
            undated: Vec::new(),
        }
    }

    /// Records that `group` holds `bytes` now (`None`: nothing).
    fn account(&mut self, group: &str, bytes: Option<usize>, batch: u64) {
        let old = match bytes {
            Some(bytes) => self.groups.insert(group.to_owned(), (bytes, batch)),
            None => self.groups.remove(group),
        };
        self.bytes = self.bytes - old.map_or(0, |(b, _)| b) + bytes.unwrap_or(0);
    }

    /// Gives the engine a group's stored state, unless it holds the group.
    fn read_back(
        &mut self,
        processor: &str,
        group: String,
        row: GroupRow,
        batch: u64,
    ) -> Result<(), CommitError> {
        if self.groups.contains_key(&group) {
            return Ok(());
        }
        let state = serde_json::from_str(&row.state).map_err(|e| {
            CommitError::Fatal(format!(
                "the stored window state of {processor} group {group:?} is unreadable: {e}"
            ))
        })?;
        self.metric.engine_mut().restore(&group, state);
        if self.metric.engine().state(&group).is_some() {
            self.account(&group, Some(row.state.len() + GROUP_BYTES), batch);
            if row.due.is_none() {
                self.undated.push(group);
            }
        }
        Ok(())
    }

    /// Evicts `group` (its state is stored); the bytes it held.
    fn evict(&mut self, group: &str) -> usize {
        let due = self.metric.engine().timer(group);
        self.metric.engine_mut().evict(group);
        let (bytes, _) = self.groups.remove(group).unwrap_or_default();
        self.bytes -= bytes;
        self.spilled = true;
        self.spilled_due = match (self.spilled_due, due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        bytes
    }
}

/// How long a member may hold back the effects of batches read from a
/// backlog before it writes them (see [`HeldBack`]): what a crash makes
/// it read again, and how stale the store may be while a backlog lasts.
/// Each write rewrites every group the batches touched, so the longer
/// the hold, the fewer rows a backlog costs (the pipeline benchmark makes
/// a tenth more events a second than at 5 s); Kafka Streams commits
/// every 30 s by default.
pub(super) const HOLD_BACK_FOR: Duration = Duration::from_secs(10);

/// Whether a batch with `step` may be held back: not one that deletes or
/// links groups, which other partitions and instances wait for.
fn holds_step(step: &Step) -> bool {
    match step {
        Step::Skip => true,
        Step::Delete(_) => false,
        Step::Observe { link, .. } => link.is_none(),
    }
}

/// A member's engines and what it has not written of them.
#[derive(Default)]
struct Engines {
    /// Each partition's engine as of the last batch applied; a partition
    /// not here is read from the store first.
    partitions: HashMap<i32, Held>,
    held_back: HeldBack,
}

/// The effects of batches applied to the engines and not written yet.
/// Under a backlog every batch touches most groups, so writing each
/// group's state once for several batches, not once a batch, is most of
/// what a metric costs the store. The runner counts these batches
/// committed; until they are written their offsets are not stored, so a
/// crash reads them again, and a failed write drops the engines they
/// changed.
#[derive(Default)]
struct HeldBack {
    /// When the first of them was applied (`None`: nothing held back).
    since: Option<Instant>,
    batches: usize,
    topic: String,
    /// Each partition's first expected offset and last next offset.
    offsets: BTreeMap<i32, OffsetAdvance>,
    /// Each partition's latest clock.
    clocks: BTreeMap<i32, Millis>,
    /// Groups whose state changed, by partition: written as the engines
    /// have them then.
    changed: BTreeMap<i32, BTreeSet<String>>,
    closed: Vec<(i32, Closed)>,
    late: Vec<LateEvent>,
    deleted: Vec<String>,
    merges: Vec<MergeRow>,
    merged: Vec<(i32, String, String)>,
}

impl HeldBack {
    fn is_empty(&self) -> bool {
        self.since.is_none()
    }

    /// The partitions whose engines hold what is held back.
    fn partitions(&self) -> BTreeSet<i32> {
        self.offsets
            .keys()
            .chain(self.clocks.keys())
            .chain(self.changed.keys())
            .copied()
            .collect()
    }
}

/// One event of a batch, parsed once for every member of a set. Its
/// envelope lives only while the members work out their steps (see
/// [`Event::parse`]); what they need of it later is here.
pub struct Event {
    pub partition: i32,
    pub offset: i64,
    /// The record as the log holds it: what a late event is reported
    /// with.
    pub record: bytes::Bytes,
    /// Its message id when it has no stamp (a stamp holds the id): one
    /// copy of it an event.
    unstamped_id: Option<String>,
    /// When the log received it (ms), else when it was parsed.
    pub received: Millis,
    /// Its time and message id, when it has both.
    pub stamp: Option<Stamp>,
}

impl Event {
    /// Parses a record into the event, handing `read` its envelope with
    /// the fields in `reads` (a deletion's properties too); `None` when it
    /// is not JSON. The envelope lives only while `read` works out the
    /// members' steps, while it is still in the CPU's cache: a batch's
    /// envelopes kept to its commit would cost a cold walk to free and
    /// fresh pages to hold.
    pub fn parse(
        record: StoredRecord,
        reads: Reads,
        read: impl FnOnce(&Envelope),
    ) -> Option<Event> {
        let mut envelope = Envelope::parse(&record.value, reads).ok()?;
        if envelope.text("type") == Some("delete") {
            envelope = Envelope::parse(&record.value, Reads::ALL).ok()?;
        }
        read(&envelope);
        let stamp = crate::metric::stamp(&envelope);
        let unstamped_id = match stamp {
            Some(_) => None,
            None => envelope.text("messageId").map(str::to_owned),
        };
        let received = received_ms(&envelope);
        drop(envelope);
        Some(Event {
            partition: record.partition,
            offset: record.offset,
            received,
            unstamped_id,
            stamp,
            record: record.value,
        })
    }

    pub fn message_id(&self) -> Option<&str> {
        match &self.stamp {
            Some(stamp) => Some(&stamp.id),
            None => self.unstamped_id.as_deref(),
        }
    }

    /// The event's JSON text.
    fn json(&self) -> String {
        String::from_utf8_lossy(&self.record).into_owned()
    }
}

/// What a batch does with one of its events for one metric, worked out
/// when the batch is parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Skip,
    /// A GDPR deletion of these groups.
    Delete(Vec<String>),
    /// Merges the groups an alias or identify links into the user's (the
    /// user, the linked ids), then counts the event in its group if the
    /// metric takes it, with the value of the metric's field: read while
    /// the batch is parsed, when the event's JSON is in the CPU's cache
    /// (by the time each member applies the batch, it is cold).
    Observe {
        link: Option<(String, Vec<String>)>,
        group: Option<crate::metric::Key>,
        value: Option<Value>,
    },
}

impl Step {
    /// Whether the event counts in a group (and so its id is claimed).
    pub fn counts(&self) -> bool {
        matches!(self, Step::Observe { group: Some(_), .. })
    }
}

/// The partitions a batch has events, offsets or clocks of.
fn touched<'a>(
    events: impl Iterator<Item = &'a Event>,
    offsets: &[OffsetAdvance],
    clocks: &[PartitionTime],
) -> BTreeSet<i32> {
    events
        .map(|e| e.partition)
        .chain(offsets.iter().map(|o| o.partition))
        .chain(clocks.iter().map(|c| c.partition))
        .collect()
}

/// When an event was received (ms), else now.
fn received_ms(event: &Envelope) -> Millis {
    event
        .text("receivedAt")
        .and_then(crate::envelope::rfc3339::millis)
        .unwrap_or_else(crate::store::now_ms)
}

/// One version of one metric, a member of a [`MetricSet`]: its engines,
/// its offsets (`metric:{name}:{version}`) and its commits are its own,
/// so members of one set may stand at different offsets (one that joined
/// late, or whose commit of a batch failed) and each takes only the
/// records past its own.
///
/// [`MetricSet`]: super::metric_set::MetricSet
pub struct MetricProcessor {
    store: Store,
    name: String,
    spec: MetricSpec,
    version: i64,
    /// The definition without state: what it takes, and in which group.
    selector: Metric,
    /// Each partition's engine, and what it has not written yet.
    engines: tokio::sync::Mutex<Engines>,
    /// The next offset of each partition in the store, as this member
    /// last read or committed it (`None`: not read yet).
    positions: std::sync::Mutex<Option<HashMap<i32, i64>>>,
    /// Partitions of the topic, all of which a combined window waits for.
    topic_partitions: i32,
    budget: BudgetShare,
    /// Batches applied, the clock of least recent use.
    batches: AtomicU64,
    /// Events counted since it was made, for `/readyz`.
    counted: AtomicU64,
    /// How late a record received earlier can still be appended: a
    /// partition hands a linked group's windows over only once its clock
    /// has passed the linking event's time by this much.
    link_bound: Millis,
}

impl std::fmt::Debug for MetricProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricProcessor")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl MetricProcessor {
    /// A processor of one version of a metric over a topic of
    /// `topic_partitions` partitions, keeping its open windows within its
    /// share of `budget`.
    pub fn new(
        store: Store,
        spec: MetricSpec,
        version: i64,
        topic_partitions: i32,
        budget: &StateBudget,
    ) -> MetricProcessor {
        MetricProcessor {
            store,
            name: processor_name(&spec.name, version),
            selector: Metric::new(spec.clone(), version),
            spec,
            version,
            engines: tokio::sync::Mutex::new(Engines::default()),
            positions: std::sync::Mutex::new(None),
            topic_partitions,
            budget: budget.share(),
            batches: AtomicU64::new(0),
            counted: AtomicU64::new(0),
            link_bound: 0,
        }
    }

    /// Hands linked groups over only once a partition's clock is `bound`
    /// past the linking event (the runner's bound on late appends).
    pub fn linking_after(mut self, bound: Duration) -> MetricProcessor {
        self.link_bound = Millis::try_from(bound.as_millis()).unwrap_or(Millis::MAX);
        self
    }

    /// The name its offsets and states are stored under.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn metric(&self) -> &str {
        &self.spec.name
    }

    pub fn version(&self) -> i64 {
        self.version
    }

    /// The envelope fields its definition reads of an event.
    pub fn reads(&self) -> Reads {
        self.spec.reads()
    }

    /// The name of the computed trait it keeps in the profiles, if any.
    pub fn computed_trait(&self) -> Option<&str> {
        self.spec.computed_trait.as_deref()
    }

    /// Events counted since it was made.
    pub fn counted(&self) -> u64 {
        self.counted.load(Ordering::Relaxed)
    }

    /// What a batch does with `event` (whose head is `head`) for this
    /// metric.
    pub fn step(&self, head: &Head, event: &Envelope) -> Step {
        let metric = &self.selector;
        if let Some(ids) = metric.deleted_groups(head, event) {
            return Step::Delete(ids.into_iter().map(str::to_owned).collect());
        }
        let link = metric.linked_groups(head, event).map(|(into, from)| {
            (
                into.to_owned(),
                from.into_iter().map(str::to_owned).collect(),
            )
        });
        let group = metric.selected_group(head, event);
        if link.is_none() && group.is_none() {
            return Step::Skip;
        }
        let value = group
            .as_ref()
            .and_then(|_| metric.field_value(event))
            .map(std::borrow::Cow::into_owned);
        Step::Observe { link, group, value }
    }

    /// Reads its offsets from the store. A partition held in memory whose
    /// offset moved since this member last committed it was processed
    /// elsewhere (a rebalance): its engine is read from the store again.
    pub async fn refresh(&self, topic: &str) -> Result<HashMap<i32, i64>, CommitError> {
        // What is held back is written first: a new owner of a partition
        // starts from its stored offset (a failure forgets it, logged).
        if let Err(e) = self.flush().await {
            tracing::warn!("{e}");
        }
        let stored = self
            .store
            .offsets(&self.name, topic)
            .await
            .map_err(commit_error)?;
        let mut engines = self.engines.lock().await;
        let partitions = &mut engines.partitions;
        let mut positions = self.positions.lock().unwrap_or_else(|e| e.into_inner());
        super::metric_set::follow_stored(partitions, &mut positions, &stored);
        Ok(stored)
    }

    /// Where this member's checkpoint takes each partition of the set's
    /// `advances`: from its own stored offset, skipping partitions it has
    /// committed past already. A tick (`next` = `expected`) keeps every
    /// partition where this member has it.
    async fn own_offsets(
        &self,
        topic: &str,
        advances: &[OffsetAdvance],
        tick: bool,
    ) -> Result<Vec<OffsetAdvance>, CommitError> {
        let known = self
            .positions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let positions = match known {
            Some(positions) => positions,
            None => self.refresh(topic).await?,
        };
        Ok(super::metric_set::own_offsets(&positions, advances, tick))
    }

    /// Reads `partition`'s engine back from the store: its clock, and its
    /// groups' states when they fit in `room` bytes (else each group is
    /// read when needed).
    async fn load(
        &self,
        topic: &str,
        partition: i32,
        room: usize,
        batch: u64,
    ) -> Result<Held, CommitError> {
        let summary = self
            .store
            .metric_state_summary(&self.name, partition)
            .await
            .map_err(commit_error)?;
        let mut held = Held::new(Metric::new(self.spec.clone(), self.version));
        let fits = |s: &StateSummary| {
            let groups = usize::try_from(s.groups).unwrap_or(usize::MAX);
            let bytes = usize::try_from(s.bytes).unwrap_or(usize::MAX);
            bytes.saturating_add(groups.saturating_mul(GROUP_BYTES)) <= room
        };
        if summary.groups > 0 && !fits(&summary) {
            let clock = self
                .store
                .metric_clock(&self.name, topic, partition)
                .await
                .map_err(commit_error)?;
            if let Some(clock) = clock {
                held.metric.engine_mut().resume(clock);
            }
            held.spilled = true;
            held.spilled_due = summary.first_due;
            return Ok(held);
        }
        let (clock, states) = self
            .store
            .metric_states(&self.name, topic, partition)
            .await
            .map_err(commit_error)?;
        if let Some(clock) = clock {
            held.metric.engine_mut().resume(clock);
        }
        for (group, row) in states {
            held.read_back(&self.name, group, row, batch)?;
        }
        Ok(held)
    }

    /// Reads back the evicted groups this batch needs: `wanted` (those
    /// its events, deletions and merges touch, by partition) and those its
    /// clocks make due.
    async fn read_back(
        &self,
        partitions: &mut HashMap<i32, Held>,
        wanted: BTreeMap<i32, BTreeSet<&str>>,
        clocks: &[PartitionTime],
        batch: u64,
    ) -> Result<(), CommitError> {
        for (p, groups) in wanted {
            let held = partitions.get_mut(&p).expect("loaded");
            let groups: Vec<&str> = groups
                .into_iter()
                .filter(|g| !held.groups.contains_key(*g))
                .collect();
            if !held.spilled || groups.is_empty() {
                continue;
            }
            let rows = self
                .store
                .metric_states_of(&self.name, p, &groups)
                .await
                .map_err(commit_error)?;
            for (group, row) in rows {
                held.read_back(&self.name, group, row, batch)?;
            }
        }
        for clock in clocks {
            let Some(held) = partitions.get_mut(&clock.partition) else {
                continue;
            };
            let limit = held.metric.engine().limit_at(clock.time_ms);
            if !held.spilled || held.spilled_due.is_none_or(|due| due > limit) {
                continue;
            }
            let (rows, next) = self
                .store
                .metric_states_due(&self.name, clock.partition, limit)
                .await
                .map_err(commit_error)?;
            for (group, row) in rows {
                held.read_back(&self.name, group, row, batch)?;
            }
            held.spilled_due = next;
        }
        Ok(())
    }

    /// Applies the set's batch (`events` with this member's `steps`) and
    /// `clocks` to the engines and commits the result with this member's
    /// offsets; the events below its own offsets were applied before and
    /// are skipped. `retries` marks the events that are a client's retry
    /// (their message id's first record is another).
    /// Under a backlog (`hold`) the batch may be held back in memory, to
    /// be written with a later one ([`HeldBack`]). On a failed
    /// write the partitions it touched are dropped from memory, to be
    /// read back from the store; when it carried batches held back, the
    /// failure is fenced, so the runner reads them again. The events it
    /// counted.
    #[allow(clippy::too_many_arguments)]
    pub async fn apply(
        &self,
        topic: &str,
        events: &[Event],
        steps: &[Step],
        retries: &[bool],
        advances: &[OffsetAdvance],
        clocks: &[PartitionTime],
        tick: bool,
        hold: Hold,
    ) -> Result<usize, CommitError> {
        let offsets = self.own_offsets(topic, advances, tick).await?;
        if offsets.is_empty() && !tick {
            return Ok(0);
        }
        let from: HashMap<i32, i64, crate::KeyHasher> = offsets
            .iter()
            .map(|o| (o.partition, o.expected.unwrap_or(0)))
            .collect();
        debug_assert_eq!(retries.len(), events.len(), "one retry mark an event");
        let batch: Vec<(&Event, &Step, bool)> = events
            .iter()
            .zip(steps)
            .zip(retries)
            .map(|((e, step), retry)| (e, step, *retry))
            .filter(|(e, ..)| from.get(&e.partition).is_some_and(|f| e.offset >= *f))
            .collect();
        let batch_no = self.batches.fetch_add(1, Ordering::Relaxed) + 1;
        let mut engines = self.engines.lock().await;
        let touched = touched(batch.iter().map(|(e, ..)| *e), &offsets, clocks);
        let missing: Vec<i32> = touched
            .iter()
            .filter(|p| !engines.partitions.contains_key(p))
            .copied()
            .collect();
        for p in missing {
            let used: usize = engines.partitions.values().map(|h| h.bytes).sum();
            let room = self.budget.bytes().saturating_sub(used);
            let loaded = self.load(topic, p, room, batch_no).await?;
            engines.partitions.insert(p, loaded);
        }
        // Held back only while the engines are within the budget (groups
        // are evicted only once written), and not a batch that deletes or
        // links groups, which other partitions and instances wait for.
        let used: usize = engines.partitions.values().map(|h| h.bytes).sum();
        self.budget.hold(used);
        let hold = match hold {
            Hold::Never => false,
            Hold::Always => true,
            Hold::Backlog => {
                !tick
                    && self.holds(&engines, used)
                    && batch.iter().all(|(_, step, _)| holds_step(step))
            }
        };
        let stored: Vec<(i32, i64)> = offsets.iter().map(|o| (o.partition, o.next)).collect();
        let earlier = engines.held_back.batches;
        let result = match self
            .apply_loaded(
                &mut engines,
                topic,
                &batch,
                offsets,
                clocks,
                &touched,
                batch_no,
                hold,
            )
            .await
        {
            Ok(counted) if hold => Ok(counted),
            Ok(counted) => self
                .write_held_back(&mut engines, batch_no)
                .await
                .map(|()| counted),
            Err(e) => Err(e),
        };
        let counted = match result {
            Ok(counted) => counted,
            Err(e) => return Err(self.forget(&mut engines, &touched, earlier, e)),
        };
        let mut positions = self.positions.lock().unwrap_or_else(|e| e.into_inner());
        positions.get_or_insert_with(HashMap::new).extend(stored);
        self.counted.fetch_add(counted as u64, Ordering::Relaxed);
        Ok(counted)
    }

    /// After a failed batch: drops the engines of the partitions it
    /// touched and of everything held back, to be read back from the
    /// store. When `earlier` batches were held back (the runner counts
    /// them committed), the failure is fenced, so the runner reads them
    /// again from the store's offsets, which this member then starts
    /// from ([`Self::refresh`]).
    fn forget(
        &self,
        engines: &mut Engines,
        touched: &BTreeSet<i32>,
        earlier: usize,
        e: CommitError,
    ) -> CommitError {
        let lost = std::mem::take(&mut engines.held_back);
        for p in touched.iter().chain(&lost.partitions()) {
            engines.partitions.remove(p);
        }
        let first = lost.offsets.keys().next().copied();
        held_back_failure(&format!("metric {}", self.spec.name), first, earlier, e)
    }

    /// Whether its engines may hold back one more batch: within the
    /// budget (groups are evicted only once written) and the time.
    fn holds(&self, engines: &Engines, used: usize) -> bool {
        used <= self.budget.bytes()
            && engines
                .held_back
                .since
                .is_none_or(|t| t.elapsed() < HOLD_BACK_FOR)
    }

    /// Whether it would hold back a backlog's batch of `steps` (see
    /// [`Hold::Always`]).
    pub async fn would_hold(&self, steps: &[Step]) -> bool {
        let engines = self.engines.lock().await;
        let used: usize = engines.partitions.values().map(|h| h.bytes).sum();
        self.holds(&engines, used) && steps.iter().all(holds_step)
    }

    /// Drops what it holds back and every engine, to read its partitions
    /// again from the store's offsets.
    pub async fn discard(&self) {
        let mut engines = self.engines.lock().await;
        engines.held_back = HeldBack::default();
        engines.partitions.clear();
        *self.positions.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Writes what is held back, if anything is (see [`HeldBack`]).
    pub async fn flush(&self) -> Result<(), CommitError> {
        let mut engines = self.engines.lock().await;
        if engines.held_back.is_empty() {
            return Ok(());
        }
        let batch_no = self.batches.fetch_add(1, Ordering::Relaxed) + 1;
        let written = self.write_held_back(&mut engines, batch_no).await;
        written.map_err(|e| self.forget(&mut engines, &BTreeSet::new(), 0, e))
    }

    /// [`MetricProcessor::apply`] with the batch's partitions (`touched`,
    /// by its events, offsets and clocks) loaded: pending merges (unless
    /// the batch is held back), the events, the clocks; their effects join
    /// what is held back. The events it counted.
    #[allow(clippy::too_many_arguments)]
    async fn apply_loaded(
        &self,
        engines: &mut Engines,
        topic: &str,
        batch: &[(&Event, &Step, bool)],
        offsets: Vec<OffsetAdvance>,
        clocks: &[PartitionTime],
        touched: &BTreeSet<i32>,
        batch_no: u64,
        hold: bool,
    ) -> Result<usize, CommitError> {
        let Engines {
            partitions,
            held_back,
        } = engines;
        // Merges other partitions asked this batch's partitions for, or
        // handed over to them (per-user metrics only), taken by a batch
        // that is written.
        let pending: Vec<MergeRow> = if self.spec.group_by == GroupBy::User && !hold {
            self.store
                .metric_merges(&self.name)
                .await
                .map_err(commit_error)?
                .into_iter()
                .filter(|m| touched.contains(&m.partition))
                // A request waits until the group's partition has read
                // every record received before the linking event.
                .filter(|m| {
                    m.state.is_some()
                        || partitions[&m.partition]
                            .metric
                            .engine()
                            .watermark()
                            .is_some_and(|w| w >= m.at.saturating_add(self.link_bound))
                })
                .collect()
        } else {
            Vec::new()
        };
        // Evicted groups are read back before any is observed.
        let mut wanted: BTreeMap<i32, BTreeSet<&str>> = BTreeMap::new();
        for (event, step, _) in batch {
            let p = event.partition;
            if !partitions[&p].spilled {
                continue;
            }
            let wanted = wanted.entry(p).or_default();
            match step {
                Step::Skip => {}
                Step::Delete(ids) => wanted.extend(ids.iter().map(String::as_str)),
                Step::Observe { link, group, .. } => {
                    wanted.extend(group.as_deref());
                    if let Some((into, from)) = link {
                        wanted.insert(into);
                        wanted.extend(
                            from.iter()
                                .filter(|f| self.partition_of(f) == p)
                                .map(String::as_str),
                        );
                    }
                }
            }
        }
        for m in pending.iter().filter(|m| partitions[&m.partition].spilled) {
            let group = if m.state.is_some() {
                &m.into_group
            } else {
                &m.group
            };
            wanted.entry(m.partition).or_default().insert(group);
        }
        self.read_back(partitions, wanted, clocks, batch_no).await?;
        let mut merges = Vec::new();
        let mut merged = Vec::new();
        for m in pending {
            let engine = partitions
                .get_mut(&m.partition)
                .expect("loaded above")
                .metric
                .engine_mut();
            match &m.state {
                // A request: this partition's windows of the group go to
                // the partition of the user it was linked to.
                None => {
                    if let Some(state) = engine.take(&m.group) {
                        merges.push(MergeRow {
                            partition: m.into_partition,
                            state: Some(serde_json::to_string(&state).expect("a state serializes")),
                            ..m.clone()
                        });
                    }
                }
                Some(text) => {
                    let state = serde_json::from_str(text).map_err(|e| {
                        CommitError::Fatal(format!(
                            "the window state of {} handed over from group {:?} is unreadable: {e}",
                            self.name, m.group
                        ))
                    })?;
                    let left_out = engine.merge_state(&m.into_group, state);
                    if left_out > 0 {
                        tracing::info!(
                            "metric {}: merging {:?} into {:?} left out {left_out} events of windows that had closed for {:?} already",
                            self.name,
                            m.group,
                            m.into_group,
                            m.into_group
                        );
                    }
                }
            }
            merged.push((m.partition, m.message_id, m.group));
        }
        let mut counted = 0;
        let mut late = Vec::new();
        let mut deleted = Vec::new();
        for &(event, step, retry) in batch {
            let p = event.partition;
            let id = event.message_id();
            let metric = &mut partitions.get_mut(&p).expect("loaded above").metric;
            let (group, value) = match step {
                Step::Skip => continue,
                Step::Delete(ids) => {
                    // A GDPR deletion, in order with the user's events:
                    // what came before it is forgotten, what comes after
                    // counts afresh.
                    for id in ids {
                        metric.engine_mut().forget(id);
                        deleted.push(id.clone());
                    }
                    continue;
                }
                Step::Observe { link, group, value } => {
                    if let (Some((into, from)), Some(id)) = (link, id) {
                        for from in from {
                            let partition = self.partition_of(from);
                            if partition == p {
                                metric.engine_mut().merge_groups(from, into);
                                continue;
                            }
                            merges.push(MergeRow {
                                partition,
                                message_id: id.to_owned(),
                                group: from.clone(),
                                into_group: into.clone(),
                                into_partition: p,
                                at: event.received,
                                state: None,
                            });
                        }
                    }
                    match group {
                        Some(group) => (group, value.as_ref()),
                        None => continue,
                    }
                }
            };
            // A client's retry (the same message id) is counted once:
            // where the first record of its id is.
            if retry {
                continue;
            }
            let Some(observed) = metric.observe_value(group, event.stamp.as_ref(), value) else {
                continue;
            };
            if let (Some(missed), Some(id)) = (&observed.late, id) {
                late.push(LateEvent {
                    metric: self.spec.name.clone(),
                    version: self.version,
                    group: group.to_string(),
                    message_id: id.to_owned(),
                    start_ms: missed.window.start,
                    end_ms: missed.window.end,
                    late_by_ms: missed.late_by,
                    event: event.json(),
                });
            }
            if observed.counted {
                counted += 1;
            }
        }
        for p in touched {
            let held = partitions.get_mut(p).expect("loaded above");
            if let Some(clock) = clocks.iter().find(|c| c.partition == *p) {
                held_back.closed.extend(
                    held.metric
                        .advance(clock.time_ms)
                        .into_iter()
                        .map(|c| (*p, c)),
                );
                held_back.clocks.insert(*p, clock.time_ms);
            }
            let mut changed = held.metric.engine_mut().take_changed();
            changed.append(&mut held.undated);
            if !changed.is_empty() {
                held_back.changed.entry(*p).or_default().extend(changed);
            }
        }
        hold_offsets(&mut held_back.offsets, offsets);
        held_back.late.append(&mut late);
        held_back.deleted.append(&mut deleted);
        held_back.merges.append(&mut merges);
        held_back.merged.append(&mut merged);
        held_back.batches += 1;
        if held_back.since.is_none() {
            held_back.since = Some(Instant::now());
            topic.clone_into(&mut held_back.topic);
        }
        Ok(counted)
    }

    /// Writes what is held back in one transaction: the changed groups'
    /// states and computed traits as the engines have them now, the
    /// closed windows, and the offsets. Left held back on failure.
    async fn write_held_back(
        &self,
        engines: &mut Engines,
        batch_no: u64,
    ) -> Result<(), CommitError> {
        let Engines {
            partitions,
            held_back,
        } = engines;
        self.write(partitions, held_back, batch_no).await?;
        *held_back = HeldBack::default();
        self.spill(partitions);
        Ok(())
    }

    /// The store transaction of [`MetricProcessor::write_held_back`].
    async fn write(
        &self,
        partitions: &mut HashMap<i32, Held>,
        held_back: &HeldBack,
        batch_no: u64,
    ) -> Result<(), CommitError> {
        let mut states = Vec::new();
        let mut traits = Vec::new();
        for (p, changed) in &held_back.changed {
            let held = partitions
                .get_mut(p)
                .expect("held back partitions are held");
            let at = held
                .metric
                .engine()
                .watermark()
                .unwrap_or_else(crate::store::now_ms);
            for group in changed {
                let engine = held.metric.engine();
                if let Some(name) = &self.spec.computed_trait {
                    traits.push(ComputedTrait {
                        metric: self.spec.name.clone(),
                        version: self.version,
                        name: name.clone(),
                        value: held.metric.trait_value(group).to_string(),
                        group: group.clone(),
                        at,
                        seq: 0,
                    });
                }
                let row = engine.state(group).map(|s| GroupRow {
                    state: serde_json::to_string(s).expect("a state serializes"),
                    due: engine.timer(group),
                });
                let bytes = row.as_ref().map(|r| r.state.len() + GROUP_BYTES);
                held.account(group, bytes, batch_no);
                states.push((*p, group.clone(), row));
            }
        }
        let closed = held_back.closed.clone();
        // A user's events are in one partition, so a per-user window is
        // final where it closes; any other group waits for every
        // partition.
        let (windows, combine) = if self.spec.group_by == GroupBy::User {
            let windows = closed.into_iter().map(|(_, c)| self.stored(c)).collect();
            (windows, None)
        } else {
            let combine = Combine {
                version: self.version,
                aggregate: self.spec.aggregate,
                lateness_ms: self.spec.lateness,
                partitions: self.topic_partitions,
                parts: closed,
            };
            (Vec::new(), Some(combine))
        };
        let batch = MetricBatch {
            processor: &self.name,
            metric: &self.spec.name,
            topic: &held_back.topic,
            offsets: held_back.offsets.values().copied().collect(),
            clocks: held_back.clocks.iter().map(|(p, c)| (*p, *c)).collect(),
            states,
            windows,
            late: held_back.late.clone(),
            traits,
            deleted: held_back.deleted.clone(),
            combine,
            merges: held_back.merges.clone(),
            merged: held_back.merged.clone(),
        };
        let made_final = self
            .store
            .apply_metric_batch(&batch)
            .await
            .map_err(commit_error)?;
        self.account(partitions, &batch, made_final);
        Ok(())
    }

    /// The partition a group's events are in (a user's, keyed by its id).
    fn partition_of(&self, group: &str) -> i32 {
        crate::log::partitioner::partition_for_key(group.as_bytes(), self.topic_partitions)
    }

    /// The groups and estimated bytes the engines hold.
    #[cfg(test)]
    async fn held(&self) -> (usize, usize) {
        let engines = self.engines.lock().await;
        engines
            .partitions
            .values()
            .fold((0, 0), |(groups, bytes), h| {
                (groups + h.metric.engine().group_count(), bytes + h.bytes)
            })
    }

    /// Evicts the least recently used groups when the engines hold more
    /// than this runner's share of the budget, down to three quarters of
    /// it (so a runner at its share does not evict on every batch). Called
    /// after a commit: every group's state is in the store.
    fn spill(&self, partitions: &mut HashMap<i32, Held>) {
        let share = self.budget.bytes();
        let held: usize = partitions.values().map(|h| h.bytes).sum();
        self.budget.hold(held);
        if held <= share {
            return;
        }
        let mut excess = held - share / 4 * 3;
        let mut by_use: Vec<(u64, i32, String)> = partitions
            .iter()
            .flat_map(|(p, h)| h.groups.iter().map(|(g, (_, used))| (*used, *p, g.clone())))
            .collect();
        by_use.sort_unstable();
        let mut evicted = 0u64;
        for (_, p, group) in by_use {
            if excess == 0 {
                break;
            }
            let bytes = partitions.get_mut(&p).expect("listed").evict(&group);
            excess = excess.saturating_sub(bytes);
            evicted += 1;
        }
        let name = self.spec.name.clone();
        metrics::counter!(crate::metrics::METRIC_GROUPS_EVICTED, "metric" => name.clone())
            .increment(evicted);
        let held: usize = partitions.values().map(|h| h.bytes).sum();
        self.budget.hold(held);
        metrics::gauge!(crate::metrics::METRIC_STATE_BYTES, "metric" => name).set(held as f64);
    }

    /// The Prometheus metrics of a committed batch.
    fn account(&self, partitions: &HashMap<i32, Held>, batch: &MetricBatch, made_final: usize) {
        let name = self.spec.name.clone();
        metrics::counter!(crate::metrics::METRIC_WINDOWS_CLOSED, "metric" => name.clone())
            .increment(made_final as u64);
        metrics::counter!(crate::metrics::METRIC_LATE_EVENTS, "metric" => name.clone())
            .increment(batch.late.len() as u64);
        let open: usize = partitions
            .values()
            .map(|h| h.metric.engine().group_count())
            .sum();
        metrics::gauge!(crate::metrics::METRIC_OPEN_GROUPS, "metric" => name.clone())
            .set(open as f64);
        let bytes: usize = partitions.values().map(|h| h.bytes).sum();
        metrics::gauge!(crate::metrics::METRIC_STATE_BYTES, "metric" => name.clone())
            .set(bytes as f64);
        let now = crate::store::now_ms();
        for (partition, clock) in &batch.clocks {
            let lag = (now - clock).max(0) as f64 / 1000.0;
            metrics::gauge!(
                crate::metrics::METRIC_WATERMARK_LAG_SECONDS,
                "metric" => name.clone(),
                "partition" => partition.to_string()
            )
            .set(lag);
        }
    }

    fn stored(&self, closed: Closed) -> StoredWindow {
        StoredWindow {
            metric: self.spec.name.clone(),
            version: self.version,
            group: closed.group,
            start_ms: closed.window.start,
            end_ms: closed.window.end,
            value: closed.value.to_string(),
            events: closed.events as i64,
        }
    }
}

#[cfg(test)]
mod tests;
