//! Where delivery outcomes go: the store (every attempt, and the dead
//! letters) and `user_deliveries` (seed 002's completion report). Outcomes
//! are written in batches by one task; a record's final outcome (delivered
//! or dead letter) is stored before its work counts as done, so a dead
//! letter is never lost and the position never passes an unrecorded
//! record.

use std::time::Duration;

use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::log::{EventLog, Record};
use crate::store::{DeliveryOutcome, Store};

/// Outcomes waiting to be written; a full queue holds deliveries back.
const QUEUE: usize = 20_000;
/// Most outcomes one write takes.
const BATCH: usize = 2_000;
/// How long to wait before trying a failed write again.
const RETRY_DELAY: Duration = Duration::from_millis(500);

struct Entry {
    outcome: DeliveryOutcome,
    stored: Option<oneshot::Sender<()>>,
}

/// A handle to the outcome writer.
#[derive(Clone)]
pub struct Recorder {
    queue: mpsc::Sender<Entry>,
}

/// The outcome writer's end.
pub struct Outcomes(mpsc::Receiver<Entry>);

impl Recorder {
    pub fn new() -> (Recorder, Outcomes) {
        let (queue, outcomes) = mpsc::channel(QUEUE);
        (Recorder { queue }, Outcomes(outcomes))
    }

    /// Records an attempt that is not a record's last.
    pub async fn record(&self, outcome: DeliveryOutcome) {
        count(&outcome);
        let _ = self
            .queue
            .send(Entry {
                outcome,
                stored: None,
            })
            .await;
    }

    /// Records a record's final outcome and waits until it is stored.
    /// When the writer has stopped (the process is stopping) it never
    /// resolves: the record is not done, and is delivered again.
    pub async fn record_final(&self, outcome: DeliveryOutcome) {
        count(&outcome);
        let (stored, done) = oneshot::channel();
        let entry = Entry {
            outcome,
            stored: Some(stored),
        };
        if self.queue.send(entry).await.is_err() || done.await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

fn count(outcome: &DeliveryOutcome) {
    metrics::counter!(crate::metrics::DELIVERY_ATTEMPTS,
        "destination" => outcome.destination.clone(), "outcome" => outcome.outcome.clone())
    .increment(1);
    metrics::histogram!(crate::metrics::DELIVERY_SECONDS, "destination" => outcome.destination.clone())
        .record(outcome.latency_ms as f64 / 1000.0);
}

impl Outcomes {
    /// Writes outcomes as they come and relays them to `topic`, until
    /// every [`Recorder`] is gone.
    pub async fn run(mut self, store: Store, log: std::sync::Arc<dyn EventLog>, topic: String) {
        let mut entries = Vec::with_capacity(BATCH);
        loop {
            let received = tokio::select! {
                n = self.0.recv_many(&mut entries, BATCH) => n,
                // Outcomes stored while the log could not take them.
                () = tokio::time::sleep(Duration::from_secs(1)) => 0,
            };
            if received == 0 && self.0.is_closed() && self.0.is_empty() {
                return;
            }
            if !entries.is_empty() {
                let outcomes: Vec<DeliveryOutcome> =
                    entries.iter().map(|e| e.outcome.clone()).collect();
                while let Err(e) = store.record_deliveries(&outcomes).await {
                    tracing::warn!(
                        "cannot store {} delivery outcomes: {e}; deliveries wait until the store takes them",
                        outcomes.len()
                    );
                    tokio::time::sleep(RETRY_DELAY).await;
                }
                for entry in entries.drain(..) {
                    if let Some(stored) = entry.stored {
                        let _ = stored.send(());
                    }
                }
            }
            if let Err(e) = publish(&store, log.as_ref(), &topic).await {
                tracing::warn!("cannot relay delivery outcomes to {topic}: {e}; trying again");
            }
        }
    }
}

/// Relays stored outcomes not yet on `user_deliveries` (key: destination
/// and the record's key).
async fn publish(store: &Store, log: &dyn EventLog, topic: &str) -> Result<(), String> {
    loop {
        let outcomes = store
            .unpublished_deliveries(BATCH as u32)
            .await
            .map_err(|e| e.to_string())?;
        if outcomes.is_empty() {
            return Ok(());
        }
        let records = outcomes
            .iter()
            .map(|o| Record {
                key: Some(format!(
                    "{}:{}",
                    o.destination,
                    o.key.as_deref().unwrap_or_default()
                )),
                value: view(o).to_string().into_bytes(),
            })
            .collect();
        log.append(topic, records)
            .await
            .map_err(|e| e.to_string())?;
        let ids: Vec<&str> = outcomes.iter().map(|o| o.attempt_id.as_str()).collect();
        store
            .mark_deliveries_published(&ids)
            .await
            .map_err(|e| e.to_string())?;
    }
}

/// An outcome as `user_deliveries` and the API show it.
pub fn view(o: &DeliveryOutcome) -> serde_json::Value {
    json!({
        "destination": o.destination,
        "version": o.version,
        "delivery_id": o.delivery_id,
        "attempt": o.attempt,
        "partition": o.partition,
        "offset": o.offset,
        "key": o.key,
        "outcome": o.outcome,
        "status": o.status,
        "latency_ms": o.latency_ms,
        "response": o.response,
        "at": crate::admin::time(o.at),
    })
}
