//! The profile processor: applies `user_events` to profiles in the store.

use std::collections::HashMap;

use async_trait::async_trait;

use super::{Checkpoint, Checkpoints, CommitError, Committed, Processor, Rejected};
use crate::envelope::EventEnvelope;
use crate::log::StoredRecord;
use crate::store::{ProfileBatch, Store, StoreError};

/// The name the profile processor's offsets are stored under.
pub const PROCESSOR: &str = "profiles";

/// Builds profiles from events; see [`crate::profile`] for the rules.
pub struct ProfileProcessor {
    store: Store,
}

impl ProfileProcessor {
    pub fn new(store: Store) -> ProfileProcessor {
        ProfileProcessor { store }
    }
}

/// The event in a record, with the record's text (its bytes, not a copy);
/// the record back with the reason when it is not one.
fn parse(mut record: StoredRecord) -> Result<(EventEnvelope, String), Rejected> {
    let text = match String::from_utf8(std::mem::take(&mut record.value)) {
        Ok(text) => text,
        Err(e) => {
            let reason = format!("the record is not UTF-8: {}", e.utf8_error());
            record.value = e.into_bytes();
            return Err(Rejected { record, reason });
        }
    };
    match event_in(&text) {
        Ok(event) => Ok((event, text)),
        Err(reason) => {
            record.value = text.into_bytes();
            Err(Rejected { record, reason })
        }
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
        | StoreError::Interrupted(_) => CommitError::Retryable(error.to_string()),
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
