//! Destinations (DESIGN.md, "Destinations"): each defined destination
//! delivers the records of one topic through an at-least-once runner of
//! its own, so a slow or dead endpoint holds up no other destination.
//! The stage follows the stored definitions: a new version replaces the
//! running one (which goes on from the same positions), a deleted one
//! stops, one an endpoint disabled (410) stays stopped until its
//! definition changes.

pub mod address;
pub mod archive;
mod breaker;
mod processor;
pub mod recorder;
mod replay;
pub mod signature;
mod webhook;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::definitions::destination::Target;
use crate::definitions::{DestinationDefinition, DestinationSpec};
use crate::log::{EventLog, Topics};
use crate::process::profiles::group_reader;
use crate::process::{InFlightRunner, InFlightSettings, RunnerSettings, SharedStats};
use crate::store::{DefinitionKind, Store};
use crate::supervisor::{StopSignal, Supervisor};

pub use processor::{Destination, delivery_id, processor_name};
pub use webhook::Sender;

/// How often the stage looks for changed definitions.
const DEFINITIONS_POLL: Duration = Duration::from_secs(1);
/// How often a runner stores its positions while deliveries complete.
const SAVE_EVERY: Duration = Duration::from_millis(200);
/// Most records an archive's runner reads at once.
const ARCHIVE_BATCH: usize = 5000;

/// How a destination runs in this process, for `/readyz` and the API.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DestinationState {
    pub version: i64,
    /// `active`, `paused` (its circuit breaker is open: one probe at a
    /// time until the endpoint answers), `disabled` (an endpoint answered
    /// 410; a new version resumes) or `failed` (its runner stopped; it is
    /// started again).
    pub state: &'static str,
    /// Records of its topic not yet done, when known.
    pub lag: Option<i64>,
    /// Records done since this process started it.
    pub done: u64,
    /// How long ago the log stored the oldest record being delivered
    /// (retries included), in seconds; `None` when none is.
    pub oldest_undelivered_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

struct Shown {
    version: i64,
    state: &'static str,
    reason: Option<String>,
    stats: Option<SharedStats>,
    /// Why its endpoint disabled it, as soon as it has (the stage stops
    /// the runner at its next look).
    disabled: Option<watch::Receiver<Option<String>>>,
    breaker: Option<Arc<breaker::Breaker>>,
}

/// The destinations this process runs, as they are now.
#[derive(Clone, Default)]
pub struct DestinationRunners(Arc<Mutex<BTreeMap<String, Shown>>>);

impl DestinationRunners {
    pub fn states(&self) -> BTreeMap<String, DestinationState> {
        let shown = self.0.lock().unwrap_or_else(|e| e.into_inner());
        shown
            .iter()
            .map(|(name, s)| (name.clone(), s.state()))
            .collect()
    }

    pub fn state(&self, name: &str) -> Option<DestinationState> {
        let shown = self.0.lock().unwrap_or_else(|e| e.into_inner());
        shown.get(name).map(Shown::state)
    }

    fn show(&self, name: &str, shown: Option<Shown>) {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match shown {
            Some(s) => {
                all.insert(name.to_owned(), s);
            }
            None => {
                all.remove(name);
            }
        }
    }
}

impl Shown {
    fn state(&self) -> DestinationState {
        let stats = self
            .stats
            .as_ref()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).clone());
        if let Some(why) = self.disabled.as_ref().and_then(|d| d.borrow().clone()) {
            return Shown::disabled(self.version, why).state();
        }
        let paused = self.breaker.as_ref().is_some_and(|b| b.paused());
        DestinationState {
            version: self.version,
            state: if paused { "paused" } else { self.state },
            lag: stats.as_ref().and_then(|s| s.lag()),
            done: stats.as_ref().map_or(0, |s| s.applied),
            oldest_undelivered_seconds: stats
                .as_ref()
                .and_then(|s| s.oldest_unfinished_ms)
                .map(|at| (crate::store::now_ms() - at).max(0) as f64 / 1000.0),
            reason: self
                .reason
                .clone()
                .or_else(|| stats.and_then(|s| s.last_error)),
        }
    }
}

/// Runs the destinations as one supervised stage, `destinations`.
pub fn spawn(
    supervisor: &mut Supervisor,
    config: &Config,
    store: &Store,
    log: &Arc<dyn EventLog>,
) -> Result<DestinationRunners, String> {
    let (config, store, log) = (config.clone(), store.clone(), log.clone());
    let shown = DestinationRunners::default();
    let runners = shown.clone();
    // Built once: a misconfigured TLS stack fails the start, named.
    let sender = Sender::new(config.destinations_allow_private)?;
    supervisor.spawn("destinations", move |stop| {
        let stage = Stage {
            config: config.clone(),
            store: store.clone(),
            log: log.clone(),
            shown: shown.clone(),
            sender: sender.clone(),
            running: HashMap::new(),
        };
        Ok(Box::pin(stage.run(stop)))
    })?;
    Ok(runners)
}

struct Running {
    version: i64,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), String>>,
    /// A webhook's: why its endpoint disabled it, and the destination
    /// (which replays run through).
    webhook: Option<(watch::Receiver<Option<String>>, Arc<Destination>)>,
    /// The replay it runs, if any.
    replay: Option<JoinHandle<()>>,
}

struct Stage {
    config: Config,
    store: Store,
    log: Arc<dyn EventLog>,
    shown: DestinationRunners,
    sender: Sender,
    running: HashMap<String, Running>,
}

impl Stage {
    async fn run(mut self, mut stop: StopSignal) -> Result<(), String> {
        let topics = Topics::new(&self.config.topic_prefix);
        let (recorder, outcomes) = recorder::Recorder::new();
        let writer =
            tokio::spawn(outcomes.run(self.store.clone(), self.log.clone(), topics.deliveries()));
        let mut seen = None;
        loop {
            match self
                .store
                .definitions_changes(DefinitionKind::Destination)
                .await
            {
                Ok(changes) => {
                    let changed = seen != Some(changes);
                    match self.follow(changed, &recorder).await {
                        Ok(()) => seen = Some(changes),
                        Err(e) => tracing::warn!(
                            "cannot read the destinations' definitions: {e}; trying again"
                        ),
                    }
                }
                Err(e) => {
                    tracing::warn!("cannot read the destinations' definitions: {e}; trying again")
                }
            }
            tokio::select! {
                () = &mut stop => break,
                () = tokio::time::sleep(DEFINITIONS_POLL) => {}
            }
        }
        let names: Vec<String> = self.running.keys().cloned().collect();
        for name in names {
            self.stop(&name).await;
        }
        drop(recorder);
        let _ = tokio::time::timeout(Duration::from_secs(10), writer).await;
        Ok(())
    }

    /// Starts, replaces and stops runners to follow the definitions
    /// (`changed`: read them again), and restarts those that stopped.
    async fn follow(&mut self, changed: bool, recorder: &recorder::Recorder) -> Result<(), String> {
        // Endpoints that disabled their destination since the last look.
        let disabled: Vec<(String, i64, String)> = self
            .running
            .iter()
            .filter_map(|(name, r)| {
                let (disabled, _) = r.webhook.as_ref()?;
                disabled
                    .borrow()
                    .clone()
                    .map(|why| (name.clone(), r.version, why))
            })
            .collect();
        for (name, version, why) in disabled {
            self.stop(&name).await;
            self.shown.show(&name, Some(Shown::disabled(version, why)));
        }
        let ended: Vec<String> = self
            .running
            .iter()
            .filter(|(_, r)| r.task.is_finished())
            .map(|(name, _)| name.clone())
            .collect();
        for name in &ended {
            if let Some(running) = self.running.remove(name) {
                let cause = match running.task.await {
                    Ok(Ok(())) => "its runner returned".to_owned(),
                    Ok(Err(e)) => e,
                    Err(e) => format!("its runner panicked: {e}"),
                };
                tracing::error!(
                    "destination {name} stopped delivering ({cause}); starting it again"
                );
                self.shown.show(
                    name,
                    Some(Shown {
                        version: running.version,
                        state: "failed",
                        reason: Some(cause),
                        stats: None,
                        disabled: None,
                        breaker: None,
                    }),
                );
            }
        }
        self.take_replays().await;
        if !changed && ended.is_empty() {
            return Ok(());
        }
        let current = crate::process::compiled::<DestinationDefinition>(
            &self.store,
            DefinitionKind::Destination,
        )
        .await?;
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|name| !current.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            self.stop(&name).await;
            self.shown.show(&name, None);
            tracing::info!("destination {name} stopped: it was deleted");
        }
        for (name, (version, spec)) in current {
            if self
                .running
                .get(&name)
                .is_some_and(|r| r.version == version)
            {
                continue;
            }
            if let Some((state_version, state, why, _)) = self
                .store
                .destination_state(&name)
                .await
                .map_err(|e| e.to_string())?
                && state_version == version
                && state == "disabled"
            {
                self.stop(&name).await;
                self.shown.show(&name, Some(Shown::disabled(version, why)));
                continue;
            }
            self.stop(&name).await;
            self.start(name, version, spec, recorder).await?;
        }
        Ok(())
    }

    async fn start(
        &mut self,
        name: String,
        version: i64,
        spec: DestinationSpec,
        recorder: &recorder::Recorder,
    ) -> Result<(), String> {
        let topics = Topics::new(&self.config.topic_prefix);
        let topic = topics.named(spec.source);
        let since = self
            .store
            .definition_created_at(DefinitionKind::Destination, &name)
            .await
            .map_err(|e| e.to_string())?
            .unwrap_or(0);
        let group = format!("{}-destination-{name}", self.config.kafka_group);
        let reader = group_reader(&self.config, &topic, &group).map_err(|e| e.to_string())?;
        let (max_in_flight, max_batch) = match &spec.target {
            Target::Webhook(_) => (spec.max_in_flight, spec.max_in_flight),
            Target::Archive(_) => (archive::MOST_IN_FLIGHT, ARCHIVE_BATCH),
        };
        let settings = InFlightSettings {
            runner: RunnerSettings {
                max_batch,
                idle_bound: self.config.append_timeout + self.config.clock_skew,
                ..RunnerSettings::new("destination", topic, topics.rejected())
            },
            max_in_flight,
            save_every: SAVE_EVERY,
        };
        let (stop, stopped) = watch::channel(false);
        let stopped = crate::supervisor::stop_signal(stopped);
        let (task, shown, webhook) = match spec.target.clone() {
            Target::Webhook(webhook) => {
                let destination = Arc::new(Destination::new(
                    spec,
                    webhook,
                    version,
                    since,
                    self.sender.clone(),
                    self.store.clone(),
                    recorder.clone(),
                ));
                let disabled = destination.disabled();
                let runner =
                    InFlightRunner::new(destination.clone(), reader, self.log.clone(), settings);
                let shown = Shown {
                    version,
                    state: "active",
                    reason: None,
                    stats: Some(runner.stats()),
                    disabled: Some(disabled.clone()),
                    breaker: Some(destination.breaker()),
                };
                (
                    tokio::spawn(runner.run(stopped)),
                    shown,
                    Some((disabled, destination)),
                )
            }
            Target::Archive(settings_of) => {
                let archive = archive::Archive::new(
                    &spec,
                    settings_of,
                    version,
                    since,
                    self.store.clone(),
                    recorder.clone(),
                )?;
                let runner =
                    InFlightRunner::new(Arc::new(archive), reader, self.log.clone(), settings);
                let shown = Shown {
                    version,
                    state: "active",
                    reason: None,
                    stats: Some(runner.stats()),
                    disabled: None,
                    breaker: None,
                };
                (tokio::spawn(runner.run(stopped)), shown, None)
            }
        };
        self.shown.show(&name, Some(shown));
        tracing::info!("destination {name} (version {version}) is delivering");
        self.running.insert(
            name,
            Running {
                version,
                stop,
                task,
                webhook,
                replay: None,
            },
        );
        Ok(())
    }

    /// Starts the replays asked for of the destinations running here
    /// that have none running.
    async fn take_replays(&mut self) {
        let stale_before = crate::store::now_ms() - replay::STALE_AFTER.as_millis() as i64;
        for (name, running) in &mut self.running {
            let Some((_, destination)) = &running.webhook else {
                continue;
            };
            if running.replay.as_ref().is_some_and(|r| !r.is_finished()) {
                continue;
            }
            match self.store.take_replay(name, stale_before).await {
                Ok(Some(asked)) => {
                    running.replay = Some(tokio::spawn(replay::run(
                        asked,
                        destination.clone(),
                        self.store.clone(),
                        self.config.clone(),
                    )));
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("cannot look for replays of destination {name}: {e}"),
            }
        }
    }

    /// Stops `name`'s runner: deliveries in flight are dropped and done
    /// again by the next runner; the finished ones' positions are saved.
    async fn stop(&mut self, name: &str) {
        if let Some(running) = self.running.remove(name) {
            if let Some(replay) = &running.replay {
                replay.abort();
            }
            let _ = running.stop.send(true);
            let _ = running.task.await;
        }
    }
}

impl Shown {
    fn disabled(version: i64, why: String) -> Shown {
        Shown {
            version,
            state: "disabled",
            reason: Some(why),
            stats: None,
            disabled: None,
            breaker: None,
        }
    }
}
