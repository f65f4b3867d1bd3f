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

use async_trait::async_trait;
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};

use super::profiles::commit_error;
use super::{
    Checkpoint, Checkpoints, CommitError, Committed, OffsetAdvance, PartitionTime, Processor,
    Rejected,
};
use crate::definitions::MetricSpec;
use crate::log::StoredRecord;
use crate::metric::{Metric, Outcome};
use crate::store::{MetricBatch, Store, StoredWindow};
use crate::windows::Closed;

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
    /// Each partition's engine and stored next offset, as of the last
    /// commit; a partition not here is read from the store first.
    partitions: tokio::sync::Mutex<HashMap<i32, Partition>>,
}

struct Partition {
    metric: Metric,
    /// The stored next offset (`None`: nothing stored yet).
    next: Option<i64>,
}

/// A batch's events by partition, parsed once.
pub struct Prepared {
    events: Vec<(i32, Value)>,
}

impl MetricProcessor {
    pub fn new(store: Store, spec: MetricSpec, version: i64) -> MetricProcessor {
        MetricProcessor {
            store,
            name: processor_name(&spec.name, version),
            spec,
            version,
            partitions: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Reads `partition`'s engine back from the store: its groups' states
    /// and its clock.
    async fn load(&self, topic: &str, partition: i32) -> Result<Partition, CommitError> {
        let (clock, states) = self
            .store
            .metric_states(&self.name, topic, partition)
            .await
            .map_err(commit_error)?;
        let next = self
            .store
            .offsets(&self.name, topic)
            .await
            .map_err(commit_error)?
            .get(&partition)
            .copied();
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
        Ok(Partition { metric, next })
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
        for p in &touched {
            if !partitions.contains_key(p) {
                let loaded = self.load(topic, *p).await?;
                partitions.insert(*p, loaded);
            }
        }
        let mut counted = 0;
        for (p, event) in events {
            let partition = partitions.get_mut(p).expect("loaded above");
            if let Outcome::Observed { observed, .. } = partition.metric.observe(event)
                && observed.counted
            {
                counted += 1;
            }
        }
        let mut windows = Vec::new();
        let mut stored_clocks = Vec::new();
        let mut states = Vec::new();
        for p in &touched {
            let partition = partitions.get_mut(p).expect("loaded above");
            if let Some(clock) = clocks.iter().find(|c| c.partition == *p) {
                windows.extend(partition.metric.advance(clock.time_ms));
                stored_clocks.push((*p, clock.time_ms));
            }
            let engine = partition.metric.engine_mut();
            for group in engine.take_changed() {
                let state = engine
                    .state(&group)
                    .map(|s| serde_json::to_string(s).expect("a state serializes"));
                states.push((*p, group, state));
            }
        }
        let batch = MetricBatch {
            processor: &self.name,
            topic,
            offsets: offsets.clone(),
            clocks: stored_clocks,
            states,
            windows: windows.into_iter().map(|c| self.stored(c)).collect(),
        };
        match self.store.apply_metric_batch(&batch).await {
            Ok(()) => {
                for o in &offsets {
                    if let Some(partition) = partitions.get_mut(&o.partition) {
                        partition.next = Some(o.next);
                    }
                }
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

    /// Closes what the clocks passed on quiet partitions. The stored
    /// offsets stay where they are, checked as in a commit, so an instance
    /// that lost a partition cannot close its windows.
    async fn tick(&self, topic: &str, clocks: &[PartitionTime]) -> Result<(), CommitError> {
        let known: Vec<OffsetAdvance> = {
            let partitions = self.partitions.lock().await;
            clocks
                .iter()
                .filter_map(|c| {
                    let next = partitions.get(&c.partition)?.next?;
                    Some(OffsetAdvance {
                        partition: c.partition,
                        expected: Some(next),
                        next,
                    })
                })
                .collect()
        };
        // A partition with nothing committed has no windows to close.
        let clocks: Vec<PartitionTime> = clocks
            .iter()
            .filter(|c| known.iter().any(|o| o.partition == c.partition))
            .copied()
            .collect();
        if clocks.is_empty() {
            return Ok(());
        }
        self.apply(topic, &[], known, &clocks).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests;
