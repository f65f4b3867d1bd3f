//! Dead letters: records a processor cannot handle go to
//! `user_events_rejected` with the reason, and the partition goes on, so
//! a poison record never stalls it.

use std::future::Future;
use std::sync::Arc;

use super::{RETRY_DELAY, Rejected};
use crate::log::{EventLog, Record};

/// Where a runner's rejects go.
pub(super) struct DeadLetters {
    pub log: Arc<dyn EventLog>,
    pub topic: String,
    /// The processor's name, in each dead letter.
    pub processor: String,
}

impl DeadLetters {
    /// The dead letters of `processor`, which reads with `settings`.
    pub fn new(
        log: Arc<dyn EventLog>,
        settings: &super::RunnerSettings,
        processor: &str,
    ) -> DeadLetters {
        DeadLetters {
            log,
            topic: settings.rejected_topic.clone(),
            processor: processor.to_owned(),
        }
    }

    /// Publishes `rejects`, retrying until it works or `stop` comes (then
    /// false: the batch they came from must not be committed).
    pub async fn publish(
        &self,
        rejects: &[Rejected],
        stop: &mut (impl Future<Output = ()> + Unpin),
    ) -> bool {
        if rejects.is_empty() {
            return true;
        }
        let records: Vec<Record> = rejects.iter().map(|r| self.letter(r)).collect();
        for r in rejects {
            tracing::warn!(
                partition = r.record.partition,
                offset = r.record.offset,
                "record {}/{} cannot be processed ({}); it goes to {}",
                r.record.partition,
                r.record.offset,
                r.reason,
                self.topic
            );
        }
        loop {
            match self.log.append(&self.topic, records.clone()).await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(
                        "cannot write rejected records to {}: {e}; trying again",
                        self.topic
                    );
                    tokio::select! {
                        biased;
                        () = &mut *stop => return false,
                        () = tokio::time::sleep(RETRY_DELAY) => {}
                    }
                }
            }
        }
    }

    /// The dead letter of one reject: the reason, where the record was,
    /// and its value, keyed like the record.
    fn letter(&self, rejected: &Rejected) -> Record {
        let record = &rejected.record;
        Record {
            key: record
                .key
                .as_ref()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            value: serde_json::to_vec(&serde_json::json!({
                "reason": rejected.reason,
                "processor": self.processor,
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
                "value": String::from_utf8_lossy(&record.value),
            }))
            .unwrap_or_default(),
        }
    }
}
