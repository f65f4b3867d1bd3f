//! The stage that runs the definitions (metrics and rules) on every
//! instance (the definitions are in the shared store), without a restart
//! when one is added, changed or deleted.
//!
//! The versions that are live share one runner, the live [`Set`]: the
//! log is read and parsed once for all of them. A new or changed version
//! first reads the log's history in a set of its own (a backfill, shared
//! by the versions that appeared together), so the live ones do not wait
//! for it; once the backfill has caught up it joins the live set, which
//! restarts with it between two batches and reads on from its members'
//! lowest offset (each member skips what it has taken). A deleted or
//! superseded version leaves its set the same way.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use utoipa::ToSchema;

use super::metric_set::{Member, Set, runner};
use super::stats::SharedStats;
use crate::config::Config;
use crate::definitions::Definition;
use crate::log::{EventLog, Topics};
use crate::store::{DefinitionKind, Store};
use crate::supervisor::{StageResult, StopSignal, Supervisor, stop_signal};

/// A member kind the stage runs.
#[async_trait]
pub trait Staged: Member + Sized {
    /// A compiled definition.
    type Spec: Send;
    /// What its members are made with, beside the configuration and the
    /// store (the metrics' state budget).
    type Context: Clone + Send + Sync + 'static;
    /// What changes whenever a stored definition of its kinds does.
    type Changes: PartialEq + Send;

    async fn changes(store: &Store) -> Result<Self::Changes, String>;

    /// The current version of every stored definition that compiles, by
    /// [`Staged::key`].
    async fn current(store: &Store) -> Result<HashMap<String, (i64, Self::Spec)>, String>;

    fn create(
        context: &Self::Context,
        config: &Config,
        store: Store,
        spec: Self::Spec,
        version: i64,
    ) -> Arc<Self>;

    /// Its definition among the stage's: its kind and name.
    fn key(&self) -> String;

    fn kind(&self) -> DefinitionKind;

    /// Its kind in a log line (`metric`).
    fn noun(&self) -> &'static str;

    /// Events it has taken since it started.
    fn counted(&self) -> u64;

    /// Whether a version that leaves has something to clear once no
    /// runner has it.
    fn retires(&self) -> bool {
        false
    }

    /// Clears it (`current`: the versions that run now); false to be tried
    /// again.
    async fn retire(&self, _store: &Store, _current: &[Arc<Self>]) -> bool {
        true
    }
}

/// The definitions' runners in this process, for `/readyz` and the
/// definitions' API: each definition's running version, its runner's
/// progress, and why it failed, by [`Staged::key`].
#[derive(Debug)]
pub struct Runners<M: Staged>(Arc<std::sync::Mutex<BTreeMap<String, RunnerEntry<M>>>>);

impl<M: Staged> Clone for Runners<M> {
    fn clone(&self) -> Self {
        Runners(self.0.clone())
    }
}

impl<M: Staged> Default for Runners<M> {
    fn default() -> Self {
        Runners(Arc::default())
    }
}

#[derive(Debug)]
struct RunnerEntry<M> {
    version: i64,
    member: Arc<M>,
    /// The stats of the runner of the member's set.
    stats: SharedStats,
    /// Whether that set is the live one.
    live: bool,
    /// How far behind the log's end a live set still counts as live.
    front: i64,
    failed: Option<String>,
}

/// How one definition (a metric, a rule) is being computed here.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct DefinitionState {
    pub version: i64,
    /// `backfilling` (reading the log's history), `live` (at the log's
    /// end) or `failed` (the stage is restarting it; `error` says why).
    pub state: &'static str,
    /// Events of the log not yet read, when known.
    pub lag: Option<i64>,
    /// Events counted since the stage started.
    pub applied: u64,
    /// Why it failed, or why its last read or commit did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl<M: Staged> Runners<M> {
    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<String, RunnerEntry<M>>) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Every definition of `kind` this process computes, by name.
    pub fn states(&self, kind: DefinitionKind) -> BTreeMap<String, DefinitionState> {
        self.with(|runners| {
            runners
                .values()
                .filter(|entry| entry.member.kind() == kind)
                .map(|entry| (entry.member.definition().to_owned(), entry.state()))
                .collect()
        })
    }

    /// How `name` of `kind` is computed here, if it is.
    pub fn state(&self, kind: DefinitionKind, name: &str) -> Option<DefinitionState> {
        self.with(|runners| {
            runners
                .values()
                .find(|entry| entry.member.kind() == kind && entry.member.definition() == name)
                .map(RunnerEntry::state)
        })
    }

    /// Marks the definition `key` failed with `cause`.
    fn fail(&self, key: &str, cause: &str) {
        self.with(|runners| {
            if let Some(entry) = runners.get_mut(key) {
                entry.failed = Some(cause.to_owned());
            }
        });
    }
}

impl<M: Staged> RunnerEntry<M> {
    fn state(&self) -> DefinitionState {
        let stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        DefinitionState::of(
            self.version,
            self.member.counted(),
            self.failed.as_deref(),
            self.live && stats.near_front(self.front),
            &stats,
        )
    }
}

impl DefinitionState {
    /// The state of a version counting `applied` events on a runner with
    /// `stats`: `failed` with a cause, else `live` when `live`, else
    /// `backfilling`.
    pub fn of(
        version: i64,
        applied: u64,
        failed: Option<&str>,
        live: bool,
        stats: &super::RunnerStats,
    ) -> DefinitionState {
        let state = match (failed, live) {
            (Some(_), _) => "failed",
            (None, true) => "live",
            (None, false) => "backfilling",
        };
        DefinitionState {
            version,
            state,
            lag: stats.lag(),
            applied,
            error: failed
                .map(str::to_owned)
                .or_else(|| stats.last_error.clone()),
        }
    }
}

/// How often the stage looks for changed definitions and finished
/// backfills.
const DEFINITIONS_POLL: Duration = Duration::from_secs(1);

/// Runs every defined version as one supervised stage (named as its
/// runner: `definitions`). A runner that fails ends the stage with its
/// cause, and the supervisor starts it again.
pub fn spawn<M: Staged>(
    supervisor: &mut Supervisor,
    config: &Config,
    store: &Store,
    log: &Arc<dyn EventLog>,
    context: M::Context,
) -> Result<Runners<M>, String> {
    let (config, store, log) = (config.clone(), store.clone(), log.clone());
    let runners = Runners::<M>::default();
    let shown = runners.clone();
    supervisor.spawn(M::RUNNER, move |stop| {
        let stage = Stage {
            config: config.clone(),
            store: store.clone(),
            log: log.clone(),
            shown: shown.clone(),
            context: context.clone(),
            members: HashMap::new(),
            sets: BTreeMap::new(),
            next_set: 0,
            tasks: JoinSet::new(),
            retiring: Vec::new(),
        };
        Ok(Box::pin(stage.run(stop)))
    })?;
    Ok(runners)
}

/// The current versions of the stored definitions of `kind` that
/// compile, as `D`; one that no longer compiles is logged and left out.
pub(crate) async fn compiled<D: Definition>(
    store: &Store,
    kind: DefinitionKind,
) -> Result<HashMap<String, (i64, D::Spec)>, String> {
    let definitions = store.definitions(kind).await.map_err(|e| e.to_string())?;
    let mut current = HashMap::new();
    for stored in definitions {
        let compiled = crate::definitions::from_json::<D>(stored.body.as_bytes())
            .and_then(|d| d.compile(&stored.name));
        match compiled {
            Ok(spec) => {
                current.insert(stored.name, (stored.version, spec));
            }
            // Checked when it was put; one that no longer compiles is not
            // run, and said.
            Err(e) => tracing::error!(
                "{} {} version {} cannot run: {e}",
                D::NOUN,
                stored.name,
                stored.version
            ),
        }
    }
    Ok(current)
}

/// The live set's id; backfills get ids above it.
const LIVE: u64 = 0;

/// One set of members and its runner.
struct SetSlot<M> {
    /// The members it should run.
    wanted: Vec<Arc<M>>,
    /// The runner going now, its members and how to stop it.
    running: Option<RunningSet<M>>,
}

impl<M> Default for SetSlot<M> {
    fn default() -> Self {
        SetSlot {
            wanted: Vec::new(),
            running: None,
        }
    }
}

struct RunningSet<M> {
    members: Vec<Arc<M>>,
    stats: SharedStats,
    stop: watch::Sender<bool>,
    stopping: bool,
}

type Ended<M> = (u64, Arc<Set<M>>, Result<(), String>);

struct Stage<M: Staged> {
    config: Config,
    store: Store,
    log: Arc<dyn EventLog>,
    shown: Runners<M>,
    context: M::Context,
    /// Each current definition's member, by name.
    members: HashMap<String, Arc<M>>,
    sets: BTreeMap<u64, SetSlot<M>>,
    next_set: u64,
    tasks: JoinSet<Ended<M>>,
    /// Versions that left with something to clear (a metric's computed
    /// trait), once no runner here has them.
    retiring: Vec<Arc<M>>,
}

impl<M: Staged> Stage<M> {
    async fn run(mut self, stop: StopSignal) -> StageResult {
        let mut seen = None;
        let mut poll = tokio::time::interval(DEFINITIONS_POLL);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => {
                    for slot in self.sets.values_mut() {
                        if let Some(running) = &slot.running {
                            let _ = running.stop.send(true);
                        }
                    }
                    while self.tasks.join_next().await.is_some() {}
                    return Ok(());
                }
                Some(ended) = self.tasks.join_next() => {
                    let (id, set, result) = ended.map_err(|e| {
                        format!("a {} runner panicked: {}", M::RUNNER, super::panic_message(e.into_panic().as_ref()))
                    })?;
                    self.ended(id, &set, result)?;
                }
                _ = poll.tick() => {
                    match M::changes(&self.store).await {
                        Ok(changes) if seen.as_ref() == Some(&changes) => {}
                        Ok(changes) => match M::current(&self.store).await {
                            Ok(current) => {
                                self.follow(current, seen.is_none()).await;
                                seen = Some(changes);
                            }
                            Err(e) => tracing::warn!("cannot read the definitions: {e}; trying again"),
                        },
                        Err(e) => tracing::warn!("cannot read the definitions: {e}; trying again"),
                    }
                    self.join_caught_up();
                }
            }
            self.reconcile()?;
            self.retire().await;
        }
    }

    /// Clears what the versions that left leave behind, once no runner
    /// here has them; a failure is tried again at the next turn.
    async fn retire(&mut self) {
        let mut still = Vec::new();
        for member in std::mem::take(&mut self.retiring) {
            let running = self.sets.values().any(|slot| {
                slot.running
                    .as_ref()
                    .is_some_and(|r| r.members.iter().any(|m| Arc::ptr_eq(m, &member)))
            });
            let current: Vec<Arc<M>> = self.members.values().cloned().collect();
            if running || !member.retire(&self.store, &current).await {
                still.push(member);
            }
        }
        self.retiring = still;
    }

    /// A set's runner ended: a failure ends the stage; a stop asked for
    /// leaves the slot to be started again with its wanted members.
    fn ended(&mut self, id: u64, set: &Set<M>, result: Result<(), String>) -> Result<(), String> {
        let asked = self
            .sets
            .get_mut(&id)
            .and_then(|slot| slot.running.take())
            .is_some_and(|r| r.stopping);
        match result {
            Err(cause) => {
                let failed = set.failed_member();
                let failed = failed
                    .as_deref()
                    .and_then(|name| set.members().iter().find(|m| m.name() == name));
                let cause = match failed {
                    Some(member) => format!(
                        "the runner of {} {} version {} failed: {cause}",
                        member.noun(),
                        member.definition(),
                        member.version()
                    ),
                    None => format!("the runner of {} failed: {cause}", set.describe()),
                };
                for member in set.members() {
                    if failed.is_none_or(|f| Arc::ptr_eq(f, member)) {
                        self.shown.fail(&member.key(), &cause);
                    }
                }
                Err(cause)
            }
            Ok(()) if !asked => Err(format!(
                "the runner of {} returned although it was not asked to stop",
                set.describe()
            )),
            Ok(()) => Ok(()),
        }
    }

    /// Follows the stored definitions: a version no longer current leaves
    /// its set; a new one gets a backfill set (one for all that appeared
    /// in this poll). At the stage's start, the versions that have been
    /// computed to near the front go straight into the live set.
    async fn follow(&mut self, current: HashMap<String, (i64, M::Spec)>, starting: bool) {
        let gone: Vec<String> = self
            .members
            .iter()
            .filter(|(key, m)| current.get(*key).is_none_or(|(v, _)| *v != m.version()))
            .map(|(key, _)| key.clone())
            .collect();
        for key in gone {
            let member = self.members.remove(&key).expect("listed");
            tracing::info!(
                "{} {} version {} stops",
                member.noun(),
                member.definition(),
                member.version()
            );
            for slot in self.sets.values_mut() {
                slot.wanted.retain(|m| !Arc::ptr_eq(m, &member));
            }
            self.shown.with(|runners| runners.remove(&key));
            if member.retires() {
                self.retiring.push(member);
            }
        }
        let mut new = Vec::new();
        for (key, (version, spec)) in current {
            if self.members.contains_key(&key) {
                continue;
            }
            let member = M::create(
                &self.context,
                &self.config,
                self.store.clone(),
                spec,
                version,
            );
            self.members.insert(key, member.clone());
            new.push(member);
        }
        if new.is_empty() {
            return;
        }
        let (live, backfill) = if starting {
            self.split_by_progress(new).await
        } else {
            (Vec::new(), new)
        };
        for member in &backfill {
            tracing::info!(
                "{} {} version {} runs, reading the log's history first where it has not been computed yet",
                member.noun(),
                member.definition(),
                member.version()
            );
        }
        self.sets.entry(LIVE).or_default().wanted.extend(live);
        if !backfill.is_empty() {
            self.next_set += 1;
            let slot = SetSlot {
                wanted: backfill,
                running: None,
            };
            self.sets.insert(self.next_set, slot);
        }
    }

    /// Splits the versions found at the stage's start: those whose stored
    /// offsets are within a batch a partition of the furthest one's are
    /// live; the rest read their history first.
    async fn split_by_progress(&self, members: Vec<Arc<M>>) -> (Vec<Arc<M>>, Vec<Arc<M>>) {
        let topic = Topics::new(&self.config.topic_prefix).events();
        let mut progress = Vec::new();
        for member in members {
            // Unknown progress reads the history on its own, which is
            // never wrong, only slower.
            let read: Option<i64> = member
                .refresh(&topic)
                .await
                .ok()
                .filter(|stored| !stored.is_empty())
                .map(|stored| stored.values().sum());
            progress.push((member, read));
        }
        let front = progress.iter().filter_map(|(_, r)| *r).max().unwrap_or(0);
        let slack = i64::try_from(self.config.process_batch).unwrap_or(i64::MAX)
            * i64::from(self.config.partitions);
        let (mut live, mut behind) = (Vec::new(), Vec::new());
        for (member, read) in progress {
            if read.is_some_and(|r| r >= front - slack) {
                live.push(member);
            } else {
                behind.push(member);
            }
        }
        (live, behind)
    }

    /// How near the log's end a set is caught up: within a batch, which
    /// the live set then reads in one go for a member that joins.
    fn front(&self) -> i64 {
        i64::try_from(self.config.process_batch).unwrap_or(i64::MAX)
    }

    /// Moves the members of each backfill that has caught up into the live
    /// set.
    fn join_caught_up(&mut self) {
        let front = self.front();
        let caught_up: Vec<u64> = self
            .sets
            .iter()
            .filter(|(id, slot)| {
                **id != LIVE
                    && slot.running.as_ref().is_some_and(|r| {
                        let stats = r.stats.lock().unwrap_or_else(|e| e.into_inner());
                        !r.stopping && stats.near_front(front)
                    })
            })
            .map(|(id, _)| *id)
            .collect();
        for id in caught_up {
            let slot = self.sets.get_mut(&id).expect("listed");
            let joining = std::mem::take(&mut slot.wanted);
            for member in &joining {
                tracing::info!(
                    "{} {} version {} has read the log's history and joins the live {}",
                    member.noun(),
                    member.definition(),
                    member.version(),
                    M::RUNNER
                );
            }
            self.sets.entry(LIVE).or_default().wanted.extend(joining);
        }
    }

    /// Starts and stops runners so each set runs its wanted members: a
    /// runner whose members differ is stopped (between two batches), and
    /// started again with them once it has ended.
    fn reconcile(&mut self) -> Result<(), String> {
        let mut start = Vec::new();
        self.sets.retain(|id, slot| {
            match &mut slot.running {
                Some(running) => {
                    let same = running.members.len() == slot.wanted.len()
                        && running
                            .members
                            .iter()
                            .zip(&slot.wanted)
                            .all(|(a, b)| Arc::ptr_eq(a, b));
                    if !same && !running.stopping {
                        running.stopping = true;
                        let _ = running.stop.send(true);
                    }
                }
                None if !slot.wanted.is_empty() => start.push(*id),
                None => return *id == LIVE,
            }
            true
        });
        for id in start {
            // A member leaving another set joins once that set's runner
            // has finished its last batch, so one member is never on two
            // runners.
            let busy = self.sets.iter().any(|(other, slot)| {
                *other != id
                    && slot.running.as_ref().is_some_and(|r| {
                        r.members
                            .iter()
                            .any(|m| self.sets[&id].wanted.iter().any(|w| Arc::ptr_eq(m, w)))
                    })
            });
            if !busy {
                self.start(id)?;
            }
        }
        Ok(())
    }

    fn start(&mut self, id: u64) -> Result<(), String> {
        let front = self.front();
        let slot = self.sets.get_mut(&id).expect("listed");
        let members = slot.wanted.clone();
        let group = if id == LIVE {
            M::RUNNER.to_owned()
        } else {
            // Its own consumer group, named by its first member, so each
            // instance's backfill of the same versions shares the work.
            format!("{}-backfill:{}", M::RUNNER, members[0].name())
        };
        let set = Arc::new(Set::new(group, self.store.clone(), members.clone()));
        let runner = runner(&self.config, self.log.clone(), set.clone(), false)
            .map_err(|e| format!("cannot start the runner of {}: {e}", set.describe()))?;
        let stats = runner.stats();
        self.shown.with(|runners| {
            for member in &members {
                let entry = RunnerEntry {
                    version: member.version(),
                    member: member.clone(),
                    stats: stats.clone(),
                    live: id == LIVE,
                    front,
                    failed: None,
                };
                runners.insert(member.key(), entry);
            }
        });
        let (stop, stopped) = watch::channel(false);
        slot.running = Some(RunningSet {
            members,
            stats,
            stop,
            stopping: false,
        });
        self.tasks
            .spawn(async move { (id, set, runner.run(stop_signal(stopped)).await) });
        Ok(())
    }
}
