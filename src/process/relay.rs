//! The change relay: publishes `profile_changes` rows, in change order, to
//! `user_profile_changes` (one record a change) and `user_profiles` (the
//! latest profile; a tombstone when it is deleted or merged away). Both
//! keyed by user id, else profile id.
//!
//! At least once: rows are marked published only after the log has them,
//! so a crash in between publishes them again; the change id in each record
//! is the stable identity a consumer deduplicates on.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::log::{EventLog, Record, Topics};
use crate::store::{ChangeRecord, Store};

/// Changes published in one round.
const BATCH: u32 = 500;
/// How long to wait when there is nothing to publish, or after a failure.
const IDLE: Duration = Duration::from_millis(100);
const RETRY: Duration = Duration::from_millis(500);

/// Publishes profile changes from the store to the log.
#[derive(Clone)]
pub struct ChangeRelay {
    store: Store,
    log: Arc<dyn EventLog>,
    topics: Topics,
}

impl ChangeRelay {
    pub fn new(store: Store, log: Arc<dyn EventLog>, topics: Topics) -> ChangeRelay {
        ChangeRelay { store, log, topics }
    }

    /// Publishes until `stop` resolves.
    pub async fn run(self, stop: impl Future<Output = ()> + Send) {
        tokio::pin!(stop);
        loop {
            let pause = match self.publish_some().await {
                Ok(0) => IDLE,
                Ok(_) => Duration::ZERO,
                Err(e) => {
                    tracing::warn!("cannot relay profile changes: {e}; trying again in {RETRY:?}");
                    RETRY
                }
            };
            tokio::select! {
                biased;
                () = &mut stop => break,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Publishes the oldest unpublished changes; returns how many.
    pub async fn publish_some(&self) -> Result<usize, String> {
        let changes = self
            .store
            .unpublished_changes(BATCH)
            .await
            .map_err(|e| e.to_string())?;
        if changes.is_empty() {
            return Ok(0);
        }
        let mut change_records = Vec::with_capacity(changes.len());
        let mut profile_records = Vec::with_capacity(changes.len());
        for change in &changes {
            let key = Some(
                change
                    .user_id
                    .clone()
                    .unwrap_or_else(|| change.profile_id.clone()),
            );
            change_records.push(Record {
                key: key.clone(),
                value: serde_json::to_vec(change).map_err(|e| e.to_string())?,
            });
            profile_records.push(Record {
                key,
                value: snapshot(change)?,
            });
        }
        self.log
            .append(&self.topics.profile_changes(), change_records)
            .await
            .map_err(|e| e.to_string())?;
        self.log
            .append(&self.topics.profiles(), profile_records)
            .await
            .map_err(|e| e.to_string())?;
        let ids: Vec<i64> = changes.iter().map(|c| c.change_id).collect();
        self.store
            .mark_published(&ids)
            .await
            .map_err(|e| e.to_string())?;
        Ok(changes.len())
    }
}

/// The `user_profiles` value of a change: the profile after it, or a
/// tombstone (empty) when there is none.
fn snapshot(change: &ChangeRecord) -> Result<Vec<u8>, String> {
    match &change.after {
        Some(after) => serde_json::to_vec(after).map_err(|e| e.to_string()),
        None => Ok(Vec::new()),
    }
}
