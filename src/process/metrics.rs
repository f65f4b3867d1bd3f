//! The metrics processor: one version of one metric definition over
//! `user_events`, through the one runner. Its offsets are its own
//! (`metric:{name}:{version}`), so a new or changed definition starts from
//! the log's beginning (history first, then live) and its progress is its
//! lag.
//!
//! Each partition has its own window engine, clocked by the partition's
//! clock (the runner's time hook moves it on quiet partitions). A batch's
//! events, the windows its clocks close, the groups' states and the
//! offsets commit in one store transaction. The engines in memory are
//! what the store holds after the last commit: when a commit fails, the
//! partitions it touched are read back from the store before the batch is
//! tried again, so a retry, a crash or a rebalance never counts an event
//! twice.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinSet;
use utoipa::ToSchema;

use super::profiles::{commit_error, group_reader};
use super::stats::SharedStats;
use super::{
    Checkpoint, Checkpoints, CommitError, Committed, OffsetAdvance, PartitionTime, Processor,
    Rejected, Runner, RunnerSettings,
};
use crate::config::Config;
use crate::definitions::{GroupBy, MetricDefinition, MetricSpec};
use crate::log::{EventLog, ReadError, StoredRecord, Topics};
use crate::metric::{Metric, Outcome};
use crate::store::{
    Combine, ComputedTrait, DefinitionKind, LateEvent, MetricBatch, Store, StoredWindow,
};
use crate::supervisor::{StageResult, StopSignal, Supervisor, stop_signal};
use crate::windows::Closed;

/// The metric runners of this process, for `/readyz`: each definition's
/// running version, its runner's progress, and why it failed.
#[derive(Debug, Clone, Default)]
pub struct MetricRunners(Arc<std::sync::Mutex<BTreeMap<String, RunnerEntry>>>);

#[derive(Debug)]
struct RunnerEntry {
    version: i64,
    stats: SharedStats,
    failed: Option<String>,
}

/// How one metric definition is being computed here.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct DefinitionState {
    pub version: i64,
    /// `backfilling` (reading the log's history), `live` (at the log's
    /// end) or `failed` (the stage is restarting it; `error` says why).
    pub state: &'static str,
    /// Events of the log not yet read, when known.
    pub lag: Option<i64>,
    /// Events counted since the runner started.
    pub applied: u64,
    /// Why it failed, or why its last read or commit did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl MetricRunners {
    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<String, RunnerEntry>) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Every definition this process computes, by name.
    pub fn states(&self) -> BTreeMap<String, DefinitionState> {
        self.with(|runners| {
            runners
                .iter()
                .map(|(name, entry)| (name.clone(), entry.state()))
                .collect()
        })
    }

    /// How `name` is computed here, if it is.
    pub fn state(&self, name: &str) -> Option<DefinitionState> {
        self.with(|runners| runners.get(name).map(RunnerEntry::state))
    }
}

impl RunnerEntry {
    fn state(&self) -> DefinitionState {
        let stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let state = match (&self.failed, stats.caught_up) {
            (Some(_), _) => "failed",
            (None, true) => "live",
            (None, false) => "backfilling",
        };
        DefinitionState {
            version: self.version,
            state,
            lag: stats.lag(),
            applied: stats.applied,
            error: self.failed.clone().or_else(|| stats.last_error.clone()),
        }
    }
}

/// How often the stage looks for changed definitions.
const DEFINITIONS_POLL: Duration = Duration::from_secs(1);

/// The name a metric version's offsets and states are stored under.
pub fn processor_name(metric: &str, version: i64) -> String {
    format!("metric:{metric}:{version}")
}

/// One metric version's processor.
pub struct MetricProcessor {
    store: Store,
    name: String,
    spec: MetricSpec,
    version: i64,
    /// Each partition's engine as of the last commit; a partition not
    /// here is read from the store first.
    partitions: tokio::sync::Mutex<HashMap<i32, Metric>>,
    /// Partitions of the topic, all of which a combined window waits for.
    topic_partitions: i32,
}

/// A batch's events by partition, parsed once.
pub struct Prepared {
    events: Vec<(i32, Value)>,
}

impl MetricProcessor {
    /// A processor of one version of a metric over a topic of
    /// `topic_partitions` partitions.
    pub fn new(
        store: Store,
        spec: MetricSpec,
        version: i64,
        topic_partitions: i32,
    ) -> MetricProcessor {
        MetricProcessor {
            store,
            name: processor_name(&spec.name, version),
            spec,
            version,
            partitions: tokio::sync::Mutex::new(HashMap::new()),
            topic_partitions,
        }
    }

    /// Reads `partition`'s engine back from the store: its groups' states
    /// and its clock.
    async fn load(&self, topic: &str, partition: i32) -> Result<Metric, CommitError> {
        let (clock, states) = self
            .store
            .metric_states(&self.name, topic, partition)
            .await
            .map_err(commit_error)?;
        let mut metric = Metric::new(self.spec.clone(), self.version);
        if let Some(clock) = clock {
            metric.engine_mut().resume(clock);
        }
        for (group, text) in states {
            let state = serde_json::from_str(&text).map_err(|e| {
                CommitError::Fatal(format!(
                    "the stored window state of {} group {group:?} is unreadable: {e}",
                    self.name
                ))
            })?;
            metric.engine_mut().restore(&group, state);
        }
        Ok(metric)
    }

    /// Applies `events` and `clocks` to the engines and commits the result
    /// with `offsets`; on any failure the partitions touched are dropped
    /// from memory, to be read back from the store.
    async fn apply(
        &self,
        topic: &str,
        events: &[(i32, Value)],
        offsets: Vec<OffsetAdvance>,
        clocks: &[PartitionTime],
    ) -> Result<usize, CommitError> {
        let mut partitions = self.partitions.lock().await;
        let touched: BTreeSet<i32> = events
            .iter()
            .map(|(p, _)| *p)
            .chain(offsets.iter().map(|o| o.partition))
            .chain(clocks.iter().map(|c| c.partition))
            .collect();
        let missing: Vec<i32> = touched
            .iter()
            .filter(|p| !partitions.contains_key(p))
            .copied()
            .collect();
        for p in missing {
            let loaded = self.load(topic, p).await?;
            partitions.insert(p, loaded);
        }
        // A client's retry (the same message id) is counted once: ids
        // counted by earlier batches are in the store, this batch's here.
        let ids: Vec<&str> = events
            .iter()
            .filter_map(|(_, e)| e.get("messageId").and_then(Value::as_str))
            .collect();
        let mut known = if ids.is_empty() {
            Default::default()
        } else {
            self.store
                .metric_seen(&self.name, &ids)
                .await
                .map_err(commit_error)?
        };
        let mut counted = 0;
        let mut seen = Vec::new();
        let mut late = Vec::new();
        let mut deleted = Vec::new();
        for (p, event) in events {
            let id = event.get("messageId").and_then(Value::as_str);
            if id.is_some_and(|id| known.contains(id)) {
                continue;
            }
            let metric = partitions.get_mut(p).expect("loaded above");
            if let Some(ids) = metric.deleted_groups(event) {
                // A GDPR deletion, in order with the user's events: what
                // came before it is forgotten, what comes after counts
                // afresh.
                for id in ids {
                    metric.engine_mut().forget(id);
                    deleted.push(id.to_owned());
                }
                continue;
            }
            let Outcome::Observed { group, observed } = metric.observe(event) else {
                continue;
            };
            if let (Some(missed), Some(id)) = (&observed.late, id) {
                late.push(LateEvent {
                    metric: self.spec.name.clone(),
                    version: self.version,
                    group,
                    message_id: id.to_owned(),
                    start_ms: missed.window.start,
                    end_ms: missed.window.end,
                    late_by_ms: missed.late_by,
                    event: event.to_string(),
                });
            }
            if observed.counted {
                counted += 1;
                if let Some(id) = id {
                    known.insert(id.to_owned());
                    let received = event
                        .get("receivedAt")
                        .and_then(Value::as_str)
                        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                        .map_or_else(crate::store::now_ms, |t| t.timestamp_millis());
                    seen.push((id.to_owned(), received));
                }
            }
        }
        let mut closed = Vec::new();
        let mut stored_clocks = Vec::new();
        let mut states = Vec::new();
        let mut traits = Vec::new();
        for p in &touched {
            let metric = partitions.get_mut(p).expect("loaded above");
            if let Some(clock) = clocks.iter().find(|c| c.partition == *p) {
                closed.extend(metric.advance(clock.time_ms).into_iter().map(|c| (*p, c)));
                stored_clocks.push((*p, clock.time_ms));
            }
            let at = metric
                .engine()
                .watermark()
                .unwrap_or_else(crate::store::now_ms);
            for group in metric.engine_mut().take_changed() {
                if let Some(name) = &self.spec.computed_trait {
                    traits.push(ComputedTrait {
                        metric: self.spec.name.clone(),
                        version: self.version,
                        name: name.clone(),
                        value: metric.trait_value(&group).to_string(),
                        group: group.clone(),
                        at,
                        seq: 0,
                    });
                }
                let state = metric
                    .engine()
                    .state(&group)
                    .map(|s| serde_json::to_string(s).expect("a state serializes"));
                states.push((*p, group, state));
            }
        }
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
            topic,
            offsets,
            clocks: stored_clocks,
            states,
            windows,
            seen,
            late,
            traits,
            deleted,
            combine,
        };
        match self.store.apply_metric_batch(&batch).await {
            Ok(made_final) => {
                self.account(&partitions, &batch, made_final);
                Ok(counted)
            }
            Err(e) => {
                for p in &touched {
                    partitions.remove(p);
                }
                Err(commit_error(e))
            }
        }
    }

    /// The Prometheus metrics of a committed batch.
    fn account(&self, partitions: &HashMap<i32, Metric>, batch: &MetricBatch, made_final: usize) {
        let name = self.spec.name.clone();
        metrics::counter!(crate::metrics::METRIC_WINDOWS_CLOSED, "metric" => name.clone())
            .increment(made_final as u64);
        metrics::counter!(crate::metrics::METRIC_LATE_EVENTS, "metric" => name.clone())
            .increment(batch.late.len() as u64);
        let open: usize = partitions.values().map(|m| m.engine().group_count()).sum();
        metrics::gauge!(crate::metrics::METRIC_OPEN_GROUPS, "metric" => name.clone())
            .set(open as f64);
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

#[async_trait]
impl Checkpoints for MetricProcessor {
    fn name(&self) -> &str {
        &self.name
    }

    async fn stored_offsets(&self, topic: &str) -> Result<HashMap<i32, i64>, CommitError> {
        self.store
            .offsets(&self.name, topic)
            .await
            .map_err(commit_error)
    }
}

#[async_trait]
impl Processor for MetricProcessor {
    type Prepared = Prepared;

    /// Records that are not JSON are skipped, not dead-lettered: the
    /// profile processor, which reads the same records, reports them.
    fn prepare(&self, records: Vec<StoredRecord>) -> (Prepared, Vec<Rejected>) {
        let events = records
            .into_iter()
            .filter_map(|r| {
                serde_json::from_slice::<Value>(&r.value)
                    .ok()
                    .map(|v| (r.partition, v))
            })
            .collect();
        (Prepared { events }, Vec::new())
    }

    async fn commit(
        &self,
        prepared: &Prepared,
        checkpoint: Checkpoint,
    ) -> Result<Committed, CommitError> {
        let counted = self
            .apply(
                &checkpoint.topic,
                &prepared.events,
                checkpoint.offsets,
                &checkpoint.clocks,
            )
            .await?;
        Ok(Committed {
            applied: counted,
            duplicates: 0,
        })
    }

    /// Closes what the clocks passed on quiet partitions, and stores
    /// every partition's watermark (an empty one's too, for the windows
    /// combined across partitions).
    async fn tick(&self, checkpoint: Checkpoint) -> Result<bool, CommitError> {
        if checkpoint.clocks.is_empty() {
            return Ok(false);
        }
        self.apply(
            &checkpoint.topic,
            &[],
            checkpoint.offsets,
            &checkpoint.clocks,
        )
        .await?;
        Ok(true)
    }
}

/// The runner of one metric version on `user_events`: its own consumer
/// group in Kafka mode, so it reads from the beginning the first time.
pub fn runner(
    config: &Config,
    store: Store,
    log: Arc<dyn EventLog>,
    spec: MetricSpec,
    version: i64,
) -> Result<Runner<MetricProcessor>, ReadError> {
    let topics = Topics::new(&config.topic_prefix);
    let topic = topics.events();
    let processor = Arc::new(MetricProcessor::new(
        store,
        spec,
        version,
        config.partitions,
    ));
    let group = format!(
        "{}-{}",
        config.kafka_group,
        processor.name().replace(':', "-")
    );
    let reader = group_reader(config, &topic, &group)?;
    let settings = RunnerSettings {
        max_batch: config.process_batch,
        // One set of engines a runner: its commits take turns.
        parallel_commits: 1,
        idle_bound: config.append_timeout + config.clock_skew,
        ..RunnerSettings::new("metrics", topic, topics.rejected())
    };
    Ok(Runner::new(processor, reader, log, settings))
}

/// Runs every defined metric's current version as one supervised stage,
/// `metrics`: a runner each, started when a definition appears or changes
/// (on every instance: the definitions are in the shared store), stopped
/// when it changes again or is deleted. A runner that fails ends the stage
/// with its cause, and the supervisor starts it again.
pub fn spawn(
    supervisor: &mut Supervisor,
    config: &Config,
    store: &Store,
    log: &Arc<dyn EventLog>,
) -> Result<MetricRunners, String> {
    let (config, store, log) = (config.clone(), store.clone(), log.clone());
    let runners = MetricRunners::default();
    let shown = runners.clone();
    supervisor.spawn("metrics", move |stop| {
        Ok(Box::pin(run_definitions(
            config.clone(),
            store.clone(),
            log.clone(),
            shown.clone(),
            stop,
        )))
    })?;
    Ok(runners)
}

/// Deletes the working state of metric versions that no longer run (a
/// changed or deleted definition); returns how many. Their runners stop
/// within a poll of the change, long before the hourly purge comes.
pub async fn purge_superseded(store: &Store) -> Result<usize, crate::store::StoreError> {
    let current: BTreeSet<String> = store
        .definitions(DefinitionKind::Metric)
        .await?
        .into_iter()
        .map(|d| processor_name(&d.name, d.version))
        .collect();
    let mut purged = 0;
    for processor in store.metric_processors().await? {
        if !current.contains(&processor) {
            store.forget_metric_processor(&processor).await?;
            purged += 1;
        }
    }
    Ok(purged)
}

/// The current versions of the stored metric definitions that compile.
async fn current_metrics(store: &Store) -> Result<HashMap<String, (i64, MetricSpec)>, String> {
    let definitions = store
        .definitions(DefinitionKind::Metric)
        .await
        .map_err(|e| e.to_string())?;
    let mut current = HashMap::new();
    for stored in definitions {
        match MetricDefinition::from_json(stored.body.as_bytes())
            .and_then(|d| d.compile(&stored.name))
        {
            Ok(spec) => {
                current.insert(stored.name, (stored.version, spec));
            }
            // Checked when it was put; one that no longer compiles is not
            // run, and said.
            Err(e) => tracing::error!(
                "metric {} version {} cannot run: {e}",
                stored.name,
                stored.version
            ),
        }
    }
    Ok(current)
}

async fn run_definitions(
    config: Config,
    store: Store,
    log: Arc<dyn EventLog>,
    shown: MetricRunners,
    stop: StopSignal,
) -> StageResult {
    let mut running: HashMap<String, (i64, watch::Sender<bool>)> = HashMap::new();
    let mut runners: JoinSet<(String, i64, Result<(), String>)> = JoinSet::new();
    let mut seen = None;
    let mut poll = tokio::time::interval(DEFINITIONS_POLL);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => {
                for (_, (_, stop)) in running.drain() {
                    let _ = stop.send(true);
                }
                while runners.join_next().await.is_some() {}
                return Ok(());
            }
            Some(ended) = runners.join_next() => {
                let (name, version, result) = ended.map_err(|e| {
                    format!("a metric runner panicked: {}", super::panic_message(e.into_panic().as_ref()))
                })?;
                let wanted = running.get(&name).is_some_and(|(v, _)| *v == version);
                match result {
                    Err(cause) => {
                        let cause = format!("the runner of metric {name} version {version} failed: {cause}");
                        shown.with(|runners| {
                            if let Some(entry) = runners.get_mut(&name) {
                                entry.failed = Some(cause.clone());
                            }
                        });
                        return Err(cause);
                    }
                    Ok(()) if wanted => {
                        return Err(format!(
                            "the runner of metric {name} version {version} returned although it was not asked to stop"
                        ));
                    }
                    Ok(()) => {}
                }
            }
            _ = poll.tick() => {
                let changes = match store.definitions_changes(DefinitionKind::Metric).await {
                    Ok(changes) if seen == Some(changes) => continue,
                    Ok(changes) => changes,
                    Err(e) => {
                        tracing::warn!("cannot read the metric definitions: {e}; trying again");
                        continue;
                    }
                };
                let current = match current_metrics(&store).await {
                    Ok(current) => current,
                    Err(e) => {
                        tracing::warn!("cannot read the metric definitions: {e}; trying again");
                        continue;
                    }
                };
                seen = Some(changes);
                running.retain(|name, (version, stop)| {
                    let keep = current.get(name).is_some_and(|(v, _)| v == version);
                    if !keep {
                        tracing::info!("metric {name} version {version} stops");
                        let _ = stop.send(true);
                        shown.with(|runners| runners.remove(name));
                    }
                    keep
                });
                for (name, (version, spec)) in current {
                    if running.contains_key(&name) {
                        continue;
                    }
                    let runner = runner(&config, store.clone(), log.clone(), spec, version)
                        .map_err(|e| format!("cannot start metric {name} version {version}: {e}"))?;
                    let entry = RunnerEntry { version, stats: runner.stats(), failed: None };
                    shown.with(|runners| runners.insert(name.clone(), entry));
                    let (stop_runner, stopped) = watch::channel(false);
                    tracing::info!(
                        "metric {name} version {version} runs, from the log's beginning where it has not been computed yet"
                    );
                    let task = name.clone();
                    runners.spawn(async move { (task, version, runner.run(stop_signal(stopped)).await) });
                    running.insert(name, (version, stop_runner));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
