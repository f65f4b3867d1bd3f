//! The profile processor: applies `user_events` to profiles in the store;
//! and its stage, the runner that serve, replay and bench build.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;

use super::{
    Checkpoint, Checkpoints, CommitError, Committed, Continuity, Processor, Rejected, Runner,
    RunnerSettings, SharedStats,
};
use crate::config::{Config, LogBackend};
use crate::envelope::EventEnvelope;
use crate::log::embedded::EmbeddedReader;
use crate::log::kafka::KafkaReader;
use crate::log::{EventLog, LogReader, ReadError, StartAt, StoredRecord, Topics};
use crate::store::{Dialect, ProfileBatch, Store, StoreError};
use crate::supervisor::Supervisor;

/// The name the profile processor's offsets are stored under.
pub const PROCESSOR: &str = "profiles";

/// Runs the profile processor on `input` as a supervised stage: a
/// restart builds a new runner (a new reader, a new group member) that
/// goes on with the last one's counts and panic suspects.
pub fn spawn(
    supervisor: &mut Supervisor,
    config: &Config,
    store: &Store,
    log: &Arc<dyn EventLog>,
    input: ProfileInput,
) -> Result<SharedStats, String> {
    let (config, store, log) = (config.clone(), store.clone(), log.clone());
    let continuity = Continuity::default();
    let stats = continuity.stats.clone();
    supervisor.spawn(input.name(), move |stop| {
        let runner = runner(&config, store.clone(), log.clone(), false, input)
            .map_err(|e| e.to_string())?
            .continuing(continuity.clone());
        Ok(Box::pin(runner.run(stop)))
    })?;
    Ok(stats)
}

/// The topics the profile processor reads: one runner each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProfileInput {
    /// `user_events`.
    Events,
    /// `user_events_overflow`: hot users' excess, read apart so it cannot
    /// hold up the partitions other users share.
    Overflow,
}

impl ProfileInput {
    /// Its runner's name: in metrics, readiness and consumer groups.
    pub fn name(self) -> &'static str {
        match self {
            ProfileInput::Events => "profiles",
            ProfileInput::Overflow => "profiles_overflow",
        }
    }
}

/// The profile processor's runner on `user_events`: a consumer group
/// member in Kafka mode, a reader of the whole topic when embedded.
/// `replay` reads with a group of its own and stops at the end.
pub fn runner(
    config: &Config,
    store: Store,
    log: Arc<dyn EventLog>,
    replay: bool,
    input: ProfileInput,
) -> Result<Runner<ProfileProcessor>, ReadError> {
    let topics = Topics::new(&config.topic_prefix);
    let name = input.name();
    let topic = match input {
        ProfileInput::Events => topics.events(),
        ProfileInput::Overflow => topics.overflow(),
    };
    let group = if replay {
        format!(
            "{}traitline-replay-{}",
            config.topic_prefix,
            uuid::Uuid::new_v4().simple()
        )
    } else {
        format!("{}-{name}", config.kafka_group)
    };
    let reader = group_reader(config, &topic, &group)?;
    let settings = RunnerSettings {
        max_batch: config.process_batch,
        stop_when_caught_up: replay,
        // SQLite has one writer at a time; PostgreSQL runs transactions
        // side by side: while one waits on its commit, another has work
        // for the CPU. One a core: on 2 cores, 4 make profiles + 10
        // metrics 5-17% slower than 2, and profiles alone no faster
        // (docs/benchmarks.md); at most 4, within the pool's connections.
        parallel_commits: match store.dialect() {
            Dialect::Postgres => std::thread::available_parallelism()
                .map_or(2, usize::from)
                .clamp(2, 4),
            Dialect::Sqlite => 1,
        },
        idle_bound: config.append_timeout + config.clock_skew,
        ..RunnerSettings::new(name, topic, topics.rejected())
    };
    Ok(Runner::new(
        Arc::new(ProfileProcessor::new(store)),
        reader,
        log,
        settings,
    ))
}

/// A reader of `topic` for a stage: in Kafka mode a member of consumer
/// group `group` (Kafka shares the partitions among the group's members),
/// embedded a reader of every partition.
pub fn group_reader(
    config: &Config,
    topic: &str,
    group: &str,
) -> Result<Box<dyn LogReader>, ReadError> {
    Ok(match &config.log {
        LogBackend::Embedded => Box::new(EmbeddedReader::open(
            &config.data_dir.join("log"),
            topic,
            StartAt::Beginning,
        )?),
        LogBackend::Kafka(settings) => Box::new(KafkaReader::join_group(settings, topic, group)?),
    })
}

/// Builds profiles from events; see [`crate::profile`] for the rules.
pub struct ProfileProcessor {
    store: Store,
}

impl ProfileProcessor {
    pub fn new(store: Store) -> ProfileProcessor {
        ProfileProcessor { store }
    }
}

/// The event in a record, with the record's text; the record back with
/// the reason when it is not one.
fn parse(record: StoredRecord) -> Result<(EventEnvelope, String), Rejected> {
    let text = match std::str::from_utf8(&record.value) {
        Ok(text) => text.to_owned(),
        Err(e) => {
            let reason = format!("the record is not UTF-8: {e}");
            return Err(Rejected {
                record: Box::new(record),
                reason,
            });
        }
    };
    match event_in(&text) {
        Ok(event) => Ok((event, text)),
        Err(reason) => Err(Rejected {
            record: Box::new(record),
            reason,
        }),
    }
}

fn event_in(text: &str) -> Result<EventEnvelope, String> {
    let event: EventEnvelope = serde_json::from_str(text)
        .map_err(|e| format!("the record is not an event envelope: {e}"))?;
    if event.user_id.is_none() && event.anonymous_id.is_none() {
        return Err("the event has neither userId nor anonymousId".to_owned());
    }
    Ok(event)
}

/// The store's failures in the runner's words: a fenced batch, one worth
/// trying again (the database away, a conflict), or corrupt state.
pub fn commit_error(error: StoreError) -> CommitError {
    match error {
        StoreError::Fenced { partition, .. } => CommitError::Fenced {
            partition,
            reason: error.to_string(),
        },
        StoreError::Corrupt(_) => CommitError::Fatal(error.to_string()),
        StoreError::Open { .. }
        | StoreError::Database(_)
        | StoreError::Conflict
        | StoreError::Interrupted(_)
        | StoreError::Native { .. } => CommitError::Retryable(error.to_string()),
    }
}

#[async_trait]
impl Checkpoints for ProfileProcessor {
    fn name(&self) -> &str {
        PROCESSOR
    }

    async fn stored_offsets(&self, topic: &str) -> Result<HashMap<i32, i64>, CommitError> {
        self.store
            .offsets(PROCESSOR, topic)
            .await
            .map_err(commit_error)
    }
}

#[async_trait]
impl Processor for ProfileProcessor {
    type Prepared = Vec<(EventEnvelope, String)>;

    fn prepare(&self, records: Vec<StoredRecord>) -> (Self::Prepared, Vec<Rejected>) {
        let mut events = Vec::with_capacity(records.len());
        let mut rejects = Vec::new();
        for record in records {
            match parse(record) {
                Ok(event) => events.push(event),
                Err(rejected) => rejects.push(rejected),
            }
        }
        (events, rejects)
    }

    async fn commit(
        &self,
        prepared: &Self::Prepared,
        checkpoint: Checkpoint,
    ) -> Result<Committed, CommitError> {
        let topic = checkpoint.topic.as_str();
        // In the trace of each request whose events are in the batch.
        let _spans = crate::telemetry::spans_following(
            prepared
                .iter()
                .filter_map(|(event, _)| event.traceparent.as_deref()),
            || {
                tracing::info_span!(
                    target: crate::telemetry::TRACE_TARGET,
                    parent: None,
                    "store commit",
                    otel.kind = "consumer",
                    processor = PROCESSOR,
                    messaging.destination.name = %topic,
                    messaging.batch.message_count = prepared.len(),
                )
            },
        );
        let batch = ProfileBatch {
            processor: PROCESSOR,
            topic,
            offsets: checkpoint.offsets,
            events: prepared,
        };
        let outcome = self
            .store
            .apply_profile_batch(&batch)
            .await
            .map_err(commit_error)?;
        Ok(Committed {
            applied: outcome.applied,
            duplicates: outcome.duplicates,
        })
    }
}
