//! The `rules` stage: runs every defined rule's current version, on every
//! instance (the definitions are in the shared store), without a restart
//! when one is added, changed or deleted.
//!
//! The current versions share one runner (a [`Set`]): the log is read and
//! parsed once for all of them. A change restarts the runner between two
//! batches with the new members; it reads on from their lowest offset, so
//! a new or changed version takes the log from its beginning (its partial
//! matches start afresh) while the others skip what they have taken.
//!
//! [`Set`]: super::metric_set::Set

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::metric_set::{Set, runner};
use super::metrics::DefinitionState;
use super::rules::RuleProcessor;
use super::stats::SharedStats;
use crate::config::Config;
use crate::definitions::{Definition, RuleDefinition, RuleSpec};
use crate::log::EventLog;
use crate::store::{DefinitionKind, Store};
use crate::supervisor::{StageResult, StopSignal, Supervisor};

/// The rule runner of this process, for `/readyz`: each rule's running
/// version and its runner's progress.
#[derive(Debug, Clone, Default)]
pub struct RuleRunners(Arc<std::sync::Mutex<BTreeMap<String, RuleEntry>>>);

#[derive(Debug)]
struct RuleEntry {
    member: Arc<RuleProcessor>,
    stats: SharedStats,
    /// How far behind the log's end the runner still counts as live.
    front: i64,
    failed: Option<String>,
}

impl RuleRunners {
    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<String, RuleEntry>) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Every rule this process runs, by name: `backfilling` while its
    /// runner reads the log's history, `live` at its end, `failed` while
    /// the stage restarts.
    pub fn states(&self) -> BTreeMap<String, DefinitionState> {
        self.with(|rules| {
            rules
                .iter()
                .map(|(name, entry)| {
                    let stats = entry.stats.lock().unwrap_or_else(|e| e.into_inner());
                    let shown = DefinitionState::of(
                        entry.member.version(),
                        entry.member.counted(),
                        entry.failed.as_deref(),
                        stats.near_front(entry.front),
                        &stats,
                    );
                    (name.clone(), shown)
                })
                .collect()
        })
    }
}

/// How often the stage looks for changed definitions.
const DEFINITIONS_POLL: Duration = Duration::from_secs(1);

/// Runs every defined rule's current version as one supervised stage,
/// `rules`. A runner that fails ends the stage with its cause, and the
/// supervisor starts it again.
pub fn spawn(
    supervisor: &mut Supervisor,
    config: &Config,
    store: &Store,
    log: &Arc<dyn EventLog>,
) -> Result<RuleRunners, String> {
    let (config, store, log) = (config.clone(), store.clone(), log.clone());
    let runners = RuleRunners::default();
    let shown = runners.clone();
    supervisor.spawn("rules", move |stop| {
        let stage = Stage {
            config: config.clone(),
            store: store.clone(),
            log: log.clone(),
            shown: shown.clone(),
        };
        Ok(Box::pin(stage.run(stop)))
    })?;
    Ok(runners)
}

/// The current versions of the stored rule definitions that compile.
async fn current_rules(store: &Store) -> Result<BTreeMap<String, (i64, RuleSpec)>, String> {
    let definitions = store
        .definitions(DefinitionKind::Rule)
        .await
        .map_err(|e| e.to_string())?;
    let mut current = BTreeMap::new();
    for stored in definitions {
        let compiled = crate::definitions::from_json::<RuleDefinition>(stored.body.as_bytes())
            .and_then(|d| Definition::compile(&d, &stored.name));
        match compiled {
            Ok(spec) => {
                current.insert(stored.name, (stored.version, spec));
            }
            // Checked when it was put; one that no longer compiles is not
            // run, and said.
            Err(e) => tracing::error!(
                "rule {} version {} cannot run: {e}",
                stored.name,
                stored.version
            ),
        }
    }
    Ok(current)
}

/// The runner going now: its members' versions, and how to stop it.
struct Running {
    versions: HashMap<String, i64>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

struct Stage {
    config: Config,
    store: Store,
    log: Arc<dyn EventLog>,
    shown: RuleRunners,
}

impl Stage {
    async fn run(self, stop: StopSignal) -> StageResult {
        let mut seen = None;
        let mut running: Option<Running> = None;
        let mut poll = tokio::time::interval(DEFINITIONS_POLL);
        tokio::pin!(stop);
        loop {
            let ended = async {
                match running.as_mut() {
                    Some(r) => (&mut r.task).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut stop => {
                    if let Some(r) = running.take() {
                        let _ = r.stop.send(true);
                        let _ = r.task.await;
                    }
                    return Ok(());
                }
                ended = ended => {
                    let cause = match ended {
                        Ok(Ok(())) => "the rule runner stopped".to_owned(),
                        Ok(Err(cause)) => cause,
                        Err(e) => format!("the rule runner panicked: {e}"),
                    };
                    self.shown.with(|rules| {
                        for entry in rules.values_mut() {
                            entry.failed = Some(cause.clone());
                        }
                    });
                    return Err(cause);
                }
                _ = poll.tick() => {
                    let changes = match self.store.definitions_changes(DefinitionKind::Rule).await {
                        Ok(changes) => changes,
                        Err(e) => {
                            tracing::warn!("cannot read the rule definitions: {e}; trying again");
                            continue;
                        }
                    };
                    if seen == Some(changes) {
                        continue;
                    }
                    let current = match current_rules(&self.store).await {
                        Ok(current) => current,
                        Err(e) => {
                            tracing::warn!("cannot read the rule definitions: {e}; trying again");
                            continue;
                        }
                    };
                    seen = Some(changes);
                    let versions: HashMap<String, i64> =
                        current.iter().map(|(name, (v, _))| (name.clone(), *v)).collect();
                    if running.as_ref().is_some_and(|r| r.versions == versions) {
                        continue;
                    }
                    if let Some(r) = running.take() {
                        // Between two batches: what it took is committed.
                        let _ = r.stop.send(true);
                        let _ = r.task.await;
                    }
                    running = self.start(current)?;
                }
            }
        }
    }

    /// Starts a runner of `current` (none when there is no rule).
    fn start(&self, current: BTreeMap<String, (i64, RuleSpec)>) -> Result<Option<Running>, String> {
        let versions: HashMap<String, i64> = current
            .iter()
            .map(|(name, (v, _))| (name.clone(), *v))
            .collect();
        let members: Vec<Arc<RuleProcessor>> = current
            .into_values()
            .map(|(version, spec)| Arc::new(RuleProcessor::new(self.store.clone(), spec, version)))
            .collect();
        if members.is_empty() {
            self.shown.with(BTreeMap::clear);
            return Ok(None);
        }
        let set = Arc::new(Set::new(
            "rules".into(),
            self.store.clone(),
            members.clone(),
        ));
        tracing::info!("the rule runner starts with {}", set.describe());
        let runner = runner(&self.config, self.log.clone(), set, false)
            .map_err(|e| format!("cannot start the rule runner: {e}"))?;
        let stats = runner.stats();
        let front = i64::try_from(self.config.process_batch).unwrap_or(i64::MAX);
        self.shown.with(|rules| {
            rules.clear();
            for member in &members {
                rules.insert(
                    member.rule().to_owned(),
                    RuleEntry {
                        member: member.clone(),
                        stats: stats.clone(),
                        front,
                        failed: None,
                    },
                );
            }
        });
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(runner.run(crate::supervisor::stop_signal(stopped)));
        Ok(Some(Running {
            versions,
            stop,
            task,
        }))
    }
}
