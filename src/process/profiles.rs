//! The profile processor: applies `user_events` to profiles in the store.

use std::collections::HashMap;

use async_trait::async_trait;

use super::{Processor, Rejected};
use crate::envelope::EventEnvelope;
use crate::log::StoredRecord;
use crate::store::{BatchOutcome, OffsetAdvance, ProfileBatch, Store, StoreError};

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

#[async_trait]
impl Processor for ProfileProcessor {
    type Prepared = Vec<(EventEnvelope, String)>;

    fn name(&self) -> &str {
        PROCESSOR
    }

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
        topic: &str,
        offsets: Vec<OffsetAdvance>,
    ) -> Result<BatchOutcome, StoreError> {
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
            offsets,
            events: prepared,
        };
        self.store.apply_profile_batch(&batch).await
    }

    async fn stored_offsets(&self, topic: &str) -> Result<HashMap<i32, i64>, StoreError> {
        self.store.offsets(PROCESSOR, topic).await
    }
}
