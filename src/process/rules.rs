//! One version of one pattern rule over `user_events`: a member of a
//! [`Set`], read through the one runner as metrics are. Its offsets are
//! its own (`rule:{name}:{version}`), so a new or changed rule starts
//! from the log's beginning and its partial matches start afresh.
//!
//! Each partition has its own pattern engine, clocked by the partition's
//! clock (the runner's time hook moves it on quiet partitions, so a "not
//! followed by" fires and partial matches are pruned with no further
//! events). A batch's changed keys' states, the alerts it made and the
//! offsets commit in one store transaction; when a commit fails, the
//! partitions it touched are read back from the store before the batch is
//! tried again, so a crash, a retry or a rebalance never loses a partial
//! match nor makes an alert twice (an alert's id is the rule, version,
//! key and first event's message id).
//!
//! [`Set`]: super::metric_set::Set

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use serde_json::Value;

use super::metric_set::{Hold, Member, held_back_failure, hold_offsets, own_offsets};
use super::metrics::Event;
use super::profiles::commit_error;
use super::{CommitError, OffsetAdvance, PartitionTime};
use crate::admin::time;
use crate::definitions::{Envelope, RuleKey, RuleSpec};
use crate::envelope::rfc3339;
use crate::metric::Head;
use crate::patterns::{Engine, Input, KeyState, Match, Observed};
use crate::store::{RuleBatch, Store, StoredAlert};

pub use super::defined::RuleRunners;
pub use super::metric_set::Set;
pub use super::rule_stage::purge_superseded;

/// The name a rule version's offsets and states are stored under.
pub fn processor_name(rule: &str, version: i64) -> String {
    format!("rule:{rule}:{version}")
}

/// What a batch does with an event for one rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleStep {
    /// The event has no key, or meets no step of a rule whose steps all
    /// pass other events over.
    Skip,
    /// A GDPR deletion of these keys (a rule keyed by user): their
    /// partial matches and alerts go.
    Delete(Vec<String>),
    /// An event of `key` meeting the steps of `meets`.
    Event {
        key: crate::metric::Key,
        meets: u64,
        /// The fields the rule's conditions that read earlier steps read
        /// of it ([`RuleSpec::keeps`]).
        values: Option<Arc<Value>>,
    },
}

/// The matches a rule holds back at most (some 80 MB with their alerts
/// built to be written): a rule that matches most events would
/// otherwise hold the alerts of a backlog's whole hold in memory, and
/// write them in one long transaction at its end.
const HELD_MATCHES: usize = 100_000;

/// Batches applied to the engines and not written yet: under a backlog
/// (see the metrics' `HeldBack`) each key's state is written once for
/// several batches. Their offsets are not stored until then, so a crash
/// reads them again; a failed write drops the engines they changed.
#[derive(Default)]
struct HeldBack {
    /// When the first of them was applied (`None`: nothing held back).
    since: Option<std::time::Instant>,
    batches: usize,
    topic: String,
    /// Each partition's first expected offset and last next offset.
    offsets: BTreeMap<i32, OffsetAdvance>,
    clocks: BTreeMap<i32, i64>,
    /// Partitions whose engines changed.
    touched: BTreeSet<i32>,
    matches: Vec<Match>,
    deleted: Vec<String>,
}

impl HeldBack {
    fn add(
        &mut self,
        topic: &str,
        offsets: Vec<OffsetAdvance>,
        clocks: Vec<(i32, i64)>,
        touched: &BTreeSet<i32>,
        mut matches: Vec<Match>,
        mut deleted: Vec<String>,
    ) {
        hold_offsets(&mut self.offsets, offsets);
        self.clocks.extend(clocks);
        self.touched.extend(touched);
        self.matches.append(&mut matches);
        self.deleted.append(&mut deleted);
        self.batches += 1;
        if self.since.is_none() {
            self.since = Some(std::time::Instant::now());
            topic.clone_into(&mut self.topic);
        }
    }
}

/// An alert as `user_alerts` and the API show it (its times written as
/// the envelope's are: chrono's formatting was a twentieth of the rules'
/// CPU with an alert for most events).
#[derive(serde::Serialize)]
struct AlertBody<'a> {
    rule: &'a str,
    version: i64,
    key: &'a str,
    message_ids: Vec<&'a str>,
    #[serde(serialize_with = "rfc3339::write")]
    first: chrono::DateTime<chrono::Utc>,
    #[serde(serialize_with = "rfc3339::write")]
    last: chrono::DateTime<chrono::Utc>,
    #[serde(serialize_with = "rfc3339::write")]
    at: chrono::DateTime<chrono::Utc>,
    /// Each step's events, by the step's name.
    steps: BTreeMap<&'a str, Vec<StepEvent<'a>>>,
}

/// An event a step of a match took.
#[derive(serde::Serialize)]
struct StepEvent<'a> {
    message_id: &'a str,
    #[serde(serialize_with = "rfc3339::write")]
    time: chrono::DateTime<chrono::Utc>,
    /// What a rule comparing with earlier steps kept of the event: the
    /// values it compared.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    kept: Option<&'a serde_json::Map<String, Value>>,
}

/// One version of one rule.
pub struct RuleProcessor {
    store: Store,
    name: String,
    spec: RuleSpec,
    version: i64,
    /// Whether some step is strict: then every event of a key counts, as
    /// one that breaks the contiguity.
    strict: bool,
    /// Each partition's engine as of the last batch applied (a partition
    /// not here is read from the store first), and what is held back.
    engines: tokio::sync::Mutex<(HashMap<i32, Engine>, HeldBack)>,
    /// The next offset of each partition in the store, as this member
    /// last read or committed it (`None`: not read yet).
    positions: std::sync::Mutex<Option<HashMap<i32, i64>>>,
    counted: AtomicU64,
    /// The matches it holds back at most ([`HELD_MATCHES`]).
    held_matches: usize,
}

impl std::fmt::Debug for RuleProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleProcessor")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl RuleProcessor {
    pub fn new(store: Store, spec: RuleSpec, version: i64) -> RuleProcessor {
        RuleProcessor {
            store,
            name: processor_name(&spec.name, version),
            strict: spec.pattern.steps.iter().any(|s| s.strict),
            spec,
            version,
            engines: tokio::sync::Mutex::new((HashMap::new(), HeldBack::default())),
            positions: std::sync::Mutex::new(None),
            counted: AtomicU64::new(0),
            held_matches: HELD_MATCHES,
        }
    }

    /// Whether `held` may take a batch of `matches` more matches: within
    /// the bound of matches and the metrics' time.
    fn holds(&self, held: &HeldBack, matches: usize) -> bool {
        held.matches.len() + matches < self.held_matches
            && held
                .since
                .is_none_or(|t| t.elapsed() < super::metrics::HOLD_BACK_FOR)
    }

    /// It holding back at most `matches` matches.
    #[cfg(test)]
    fn holding_at_most(self, matches: usize) -> RuleProcessor {
        RuleProcessor {
            held_matches: matches,
            ..self
        }
    }

    /// The name its offsets and states are stored under.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn rule(&self) -> &str {
        &self.spec.name
    }

    pub fn version(&self) -> i64 {
        self.version
    }

    /// Events it has taken since it was made.
    pub fn counted(&self) -> u64 {
        self.counted.load(Ordering::Relaxed)
    }

    /// The event's key for this rule.
    fn key(&self, head: &Head, event: &Envelope) -> Option<crate::metric::Key> {
        match &self.spec.key {
            RuleKey::User => head.user_key(),
            RuleKey::Field(path) => {
                if let Some(text) = event.path_text(path) {
                    return (!text.is_empty()).then(|| text.into());
                }
                match event.path(path)?.as_ref() {
                    Value::String(s) if !s.is_empty() => Some(s.as_str().into()),
                    Value::Number(n) => Some(n.to_string().into()),
                    Value::Bool(b) => Some(b.to_string().into()),
                    _ => None,
                }
            }
        }
    }

    /// Reads `partition`'s engine back from the store.
    async fn load(&self, topic: &str, partition: i32) -> Result<Engine, CommitError> {
        let (clock, states) = self
            .store
            .rule_states(&self.name, topic, partition)
            .await
            .map_err(commit_error)?;
        let mut engine = Engine::new(self.spec.pattern.clone());
        if let Some(clock) = clock {
            engine.resume(clock);
        }
        for (key, text) in states {
            let state: KeyState = serde_json::from_str(&text).map_err(|e| {
                CommitError::Fatal(format!(
                    "the stored partial matches of {} key {key:?} are unreadable: {e}",
                    self.name
                ))
            })?;
            engine.restore(&key, state);
        }
        engine.take_changed();
        Ok(engine)
    }

    /// What a batch does with `event` (whose head is `head`).
    fn step_of(&self, head: &Head, event: &Envelope) -> RuleStep {
        if self.spec.key == RuleKey::User
            && let Some(ids) = crate::metric::deleted_ids(head, event)
        {
            return RuleStep::Delete(ids.into_iter().map(str::to_owned).collect());
        }
        let Some(key) = self.key(head, event) else {
            return RuleStep::Skip;
        };
        let meets = self
            .spec
            .conditions
            .iter()
            .enumerate()
            .filter(|(_, c)| c.matches_event(event))
            .fold(0u64, |bits, (i, _)| bits | 1 << i);
        if meets == 0 && !self.strict {
            return RuleStep::Skip;
        }
        let values = (!self.spec.keeps.is_empty()).then(|| {
            let kept = self
                .spec
                .keeps
                .iter()
                .filter_map(|f| Some(((*f).to_owned(), event.get(f)?.into_owned())))
                .collect();
            Arc::new(Value::Object(kept))
        });
        RuleStep::Event { key, meets, values }
    }

    /// The alert a match makes.
    fn alert(&self, m: &Match) -> StoredAlert {
        let first = m.taken.first().expect("a match took an event");
        let last = m.taken.last().expect("a match took an event");
        let steps = self
            .spec
            .pattern
            .steps
            .iter()
            .enumerate()
            .map(|(i, step)| {
                let events = m
                    .taken
                    .iter()
                    .filter(|t| t.step == i)
                    .map(|t| StepEvent {
                        message_id: &t.id,
                        time: time(t.time),
                        kept: match t.values.as_deref() {
                            Some(Value::Object(kept)) => Some(kept),
                            _ => None,
                        },
                    })
                    .collect();
                (step.name.as_str(), events)
            })
            .collect();
        let body = AlertBody {
            rule: &self.spec.name,
            version: self.version,
            key: &m.key,
            message_ids: m.taken.iter().map(|t| &*t.id).collect(),
            first: time(first.time),
            last: time(last.time),
            at: time(m.at),
            steps,
        };
        StoredAlert {
            id: format!("{}:{}:{}:{}", self.spec.name, self.version, m.key, first.id),
            rule: self.spec.name.clone(),
            version: self.version,
            key: m.key.clone(),
            at: m.at,
            body: serde_json::to_string(&body).expect("an alert serializes"),
        }
    }

    /// Writes what is held back in one transaction: the changed keys'
    /// states as the engines have them now, the alerts, the deletions and
    /// the offsets. Left held back on failure.
    async fn write(
        &self,
        engines: &mut HashMap<i32, Engine>,
        held: &mut HeldBack,
    ) -> Result<(), CommitError> {
        let mut states = Vec::new();
        for p in &held.touched {
            let engine = engines.get_mut(p).expect("held back partitions are held");
            for key in engine.changed() {
                let state = engine
                    .state(&key)
                    .map(|s| serde_json::to_string(s).expect("a state serializes"));
                states.push((*p, key, state));
            }
        }
        let alerts: Vec<StoredAlert> = held.matches.iter().map(|m| self.alert(m)).collect();
        let batch = RuleBatch {
            processor: &self.name,
            rule: &self.spec.name,
            topic: &held.topic,
            offsets: held.offsets.values().copied().collect(),
            clocks: held.clocks.iter().map(|(p, c)| (*p, *c)).collect(),
            states,
            deleted: held.deleted.clone(),
            alerts,
        };
        self.store
            .apply_rule_batch(&batch)
            .await
            .map_err(commit_error)?;
        for p in &held.touched {
            engines.get_mut(p).expect("held").take_changed();
        }
        let rule = self.spec.name.clone();
        metrics::counter!(crate::metrics::RULE_MATCHES, "rule" => rule.clone())
            .increment(held.matches.len() as u64);
        let partials: usize = engines.values().map(|e| e.held().1).sum();
        metrics::gauge!(crate::metrics::RULE_PARTIALS, "rule" => rule).set(partials as f64);
        *held = HeldBack::default();
        Ok(())
    }

    /// After a failed batch: drops the engines of the partitions it
    /// touched and of everything held back, to be read back from the
    /// store. When `earlier` batches were held back (the runner counts
    /// them committed), the failure is fenced, so the runner reads them
    /// again from the store's offsets.
    fn forget(
        &self,
        engines: &mut HashMap<i32, Engine>,
        held: &mut HeldBack,
        touched: &BTreeSet<i32>,
        earlier: usize,
        e: CommitError,
    ) -> CommitError {
        let lost = std::mem::take(held);
        for p in touched
            .iter()
            .chain(&lost.touched)
            .chain(lost.offsets.keys())
        {
            engines.remove(p);
        }
        let first = lost.offsets.keys().next().copied();
        held_back_failure(&format!("rule {}", self.spec.name), first, earlier, e)
    }

    /// Counts what the engines report.
    fn account(&self, engine: &mut Engine, late: u64) {
        let counts = engine.take_counts();
        let rule = self.spec.name.clone();
        metrics::counter!(crate::metrics::RULE_TIMEOUTS, "rule" => rule.clone())
            .increment(counts.timed_out);
        metrics::counter!(crate::metrics::RULE_BOUND_HITS, "rule" => rule.clone(), "bound" => "partials")
            .increment(counts.dropped);
        metrics::counter!(crate::metrics::RULE_BOUND_HITS, "rule" => rule.clone(), "bound" => "waiting")
            .increment(counts.rushed);
        metrics::counter!(crate::metrics::RULE_LATE_EVENTS, "rule" => rule).increment(late);
    }
}

#[async_trait]
impl Member for RuleProcessor {
    type Steps = Vec<RuleStep>;
    const RUNNER: &'static str = "rules";
    // The one name every set claims under (migration 21).
    const CLAIMS: &'static str = "metrics";

    fn definition(&self) -> &str {
        &self.spec.name
    }

    fn name(&self) -> &str {
        RuleProcessor::name(self)
    }

    fn reads(&self) -> crate::definitions::Reads {
        self.spec.reads()
    }

    fn version(&self) -> i64 {
        self.version
    }

    fn no_steps(&self, capacity: usize) -> Vec<RuleStep> {
        Vec::with_capacity(capacity)
    }

    fn step(&self, head: &Head, event: &Envelope, steps: &mut Vec<RuleStep>) {
        steps.push(self.step_of(head, event));
    }

    fn append(steps: &mut Vec<RuleStep>, more: Vec<RuleStep>) {
        steps.extend(more);
    }

    fn counts(steps: &Vec<RuleStep>, i: usize) -> bool {
        matches!(steps[i], RuleStep::Event { .. })
    }

    /// Reads its offsets from the store. A partition held in memory whose
    /// offset moved since this member last committed it was processed
    /// elsewhere (a rebalance): its engine is read from the store again.
    async fn refresh(&self, topic: &str) -> Result<HashMap<i32, i64>, CommitError> {
        // What is held back is written first: a new owner of a partition
        // starts from its stored offset (a failure forgets it, logged).
        if let Err(e) = Member::flush(self).await {
            tracing::warn!("{e}");
        }
        let stored = self
            .store
            .offsets(&self.name, topic)
            .await
            .map_err(commit_error)?;
        let mut engines = self.engines.lock().await;
        let mut positions = self.positions.lock().unwrap_or_else(|e| e.into_inner());
        super::metric_set::follow_stored(&mut engines.0, &mut positions, &stored);
        Ok(stored)
    }

    async fn apply(
        &self,
        topic: &str,
        events: &[Event],
        steps: &Vec<RuleStep>,
        retries: &[bool],
        advances: &[OffsetAdvance],
        clocks: &[PartitionTime],
        tick: bool,
        hold: Hold,
    ) -> Result<usize, CommitError> {
        let known = self
            .positions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let positions = match known {
            Some(positions) => positions,
            None => self.refresh(topic).await?,
        };
        let offsets = own_offsets(&positions, advances, tick);
        if offsets.is_empty() && !tick {
            return Ok(0);
        }
        let from: HashMap<i32, i64, crate::KeyHasher> = offsets
            .iter()
            .map(|o| (o.partition, o.expected.unwrap_or(0)))
            .collect();
        let mut touched: BTreeSet<i32> = offsets.iter().map(|o| o.partition).collect();
        touched.extend(clocks.iter().map(|c| c.partition));
        let mut guard = self.engines.lock().await;
        let (engines, held) = &mut *guard;
        for p in &touched {
            if !engines.contains_key(p) {
                let engine = self.load(topic, *p).await?;
                engines.insert(*p, engine);
            }
        }
        let mut counted = 0;
        let mut late: HashMap<i32, u64> = HashMap::new();
        let mut deleted = Vec::new();
        debug_assert_eq!(retries.len(), events.len(), "one retry mark an event");
        for ((event, step), retry) in events.iter().zip(steps).zip(retries) {
            if from.get(&event.partition).is_none_or(|f| event.offset < *f) {
                continue;
            }
            let (key, meets, values) = match step {
                RuleStep::Skip => continue,
                RuleStep::Delete(ids) => {
                    // In order with the user's events: what came before is
                    // forgotten, what comes after starts afresh.
                    let engine = engines.get_mut(&event.partition).expect("loaded above");
                    for id in ids {
                        engine.forget(id);
                        deleted.push(id.clone());
                    }
                    continue;
                }
                RuleStep::Event { key, meets, values } => (key, meets, values),
            };
            let Some(stamp) = &event.stamp else {
                continue;
            };
            // A client's retry (the same message id) is taken once: where
            // the first record of its id is.
            if *retry {
                continue;
            }
            let input = Input {
                time: stamp.at,
                id: stamp.id.clone(),
                meets: *meets,
                values: values.clone(),
            };
            let engine = engines.get_mut(&event.partition).expect("loaded above");
            match engine.observe(key, input) {
                Observed::Waiting => counted += 1,
                Observed::Late { .. } => *late.entry(event.partition).or_default() += 1,
            }
        }
        let mut matches = Vec::new();
        let mut stored_clocks = Vec::new();
        for p in &touched {
            let engine = engines.get_mut(p).expect("loaded above");
            if let Some(clock) = clocks.iter().find(|c| c.partition == *p) {
                matches.extend(engine.advance(clock.time_ms));
                stored_clocks.push((*p, clock.time_ms));
            }
            self.account(engine, late.get(p).copied().unwrap_or(0));
        }
        let next: Vec<(i32, i64)> = offsets.iter().map(|o| (o.partition, o.next)).collect();
        // Held back while a backlog lasts, up to the metrics' time and a
        // number of matches, and never a batch with a deletion (its
        // alerts go at once).
        let hold = match hold {
            Hold::Never => false,
            Hold::Always => true,
            Hold::Backlog => !tick && deleted.is_empty() && self.holds(held, matches.len()),
        };
        let earlier = held.batches;
        held.add(topic, offsets, stored_clocks, &touched, matches, deleted);
        if !hold && let Err(e) = self.write(engines, held).await {
            return Err(self.forget(engines, held, &touched, earlier, e));
        }
        let mut positions = self.positions.lock().unwrap_or_else(|e| e.into_inner());
        positions.get_or_insert_with(HashMap::new).extend(next);
        self.counted.fetch_add(counted as u64, Ordering::Relaxed);
        Ok(counted)
    }

    async fn would_hold(&self, steps: &Vec<RuleStep>) -> bool {
        let guard = self.engines.lock().await;
        self.holds(&guard.1, 0) && !steps.iter().any(|s| matches!(s, RuleStep::Delete(_)))
    }

    async fn discard(&self) {
        let mut guard = self.engines.lock().await;
        *guard = (HashMap::new(), HeldBack::default());
        *self.positions.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    async fn flush(&self) -> Result<(), CommitError> {
        let mut guard = self.engines.lock().await;
        let (engines, held) = &mut *guard;
        if held.since.is_none() {
            return Ok(());
        }
        match self.write(engines, held).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.forget(engines, held, &BTreeSet::new(), 0, e)),
        }
    }
}

#[cfg(test)]
mod tests;
