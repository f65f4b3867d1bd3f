//! The change relay: publishes what the processors wrote to the store for
//! the log. `profile_changes` rows, in change order, to
//! `user_profile_changes` (one record a change) and `user_profiles` (the
//! latest profile; a tombstone when it is deleted or merged away), both
//! keyed by user id, else profile id; closed metric windows to
//! `user_metrics` and late events to `user_events_late`, keyed by metric
//! and group; computed traits' new values to `user_events`, keyed by the
//! user, for the profile processor; alerts to `user_alerts`, keyed by
//! rule and key.
//!
//! At least once: rows are marked published only after the log has them,
//! so a crash in between publishes them again; each record carries a
//! stable identity a consumer deduplicates on (the change id; a window's
//! metric, version, group and start; a late event's metric, version and
//! message id; an alert's id).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::admin::{WindowValue, time};
use crate::envelope::{EventEnvelope, EventType, Source};
use crate::log::{EventLog, Record, Topics};
use crate::store::{ChangeRecord, Store};

/// Changes published in one round.
const BATCH: u32 = 500;
/// How long to wait when there is nothing to publish, or after a failure.
const IDLE: Duration = Duration::from_millis(100);
const RETRY: Duration = Duration::from_millis(500);

/// What the relay publishes.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Changes,
    Windows,
    Late,
    Traits,
    Alerts,
}

/// The relay's loops, each publishing its kinds in turn: profile changes
/// (one a processed event, so their loop is rarely idle) apart from the
/// rest, so a closed window or an alert does not wait behind a burst of
/// them. Two loops, not one a kind: on SQLite every loop's "published"
/// mark is a write that waits for the others.
const LOOPS: [&[Kind]; 2] = [
    &[Kind::Changes],
    &[Kind::Windows, Kind::Alerts, Kind::Late, Kind::Traits],
];

impl Kind {
    fn noun(self) -> &'static str {
        match self {
            Kind::Changes => "profile changes",
            Kind::Windows => "metric windows",
            Kind::Late => "late events",
            Kind::Traits => "computed traits",
            Kind::Alerts => "alerts",
        }
    }
}

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

    /// Publishes until `stop` resolves, in the [`LOOPS`]. A loop stops
    /// between two rounds, never with a write in flight.
    pub async fn run(self, stop: impl Future<Output = ()> + Send) {
        let (stopping, stopped) = watch::channel(false);
        let loops = futures_util::future::join_all(
            LOOPS.map(|kinds| self.run_loop(kinds, stopped.clone())),
        );
        tokio::pin!(loops);
        tokio::select! {
            () = stop => {
                let _ = stopping.send(true);
                loops.await;
            }
            _ = &mut loops => {}
        }
    }

    async fn run_loop(&self, kinds: &[Kind], mut stopped: watch::Receiver<bool>) {
        while !*stopped.borrow() {
            let mut pause = IDLE;
            for kind in kinds {
                match self.publish(*kind).await {
                    Ok(0) => {}
                    Ok(_) => pause = Duration::ZERO,
                    Err(e) => {
                        tracing::warn!(
                            "cannot relay {} to the log: {e}; trying again in {RETRY:?}",
                            kind.noun()
                        );
                        pause = RETRY;
                        break;
                    }
                }
            }
            tokio::select! {
                biased;
                _ = stopped.changed() => break,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    async fn publish(&self, kind: Kind) -> Result<usize, String> {
        match kind {
            Kind::Changes => self.publish_changes().await,
            Kind::Windows => self.publish_windows().await,
            Kind::Late => self.publish_late().await,
            Kind::Traits => self.publish_traits().await,
            Kind::Alerts => self.publish_alerts().await,
        }
    }

    /// Computed traits go to `user_events`, keyed by the user like their
    /// events, so the profile processor applies each after the events
    /// that made it; the message id (processor, user, change number) makes
    /// a value published twice count once.
    async fn publish_traits(&self) -> Result<usize, String> {
        let traits = self
            .store
            .unpublished_traits(BATCH)
            .await
            .map_err(|e| e.to_string())?;
        if traits.is_empty() {
            return Ok(0);
        }
        let received = chrono::Utc::now();
        let records = traits
            .iter()
            .map(|(processor, t)| {
                let at = chrono::DateTime::from_timestamp_millis(t.at).unwrap_or(received);
                let value: Value = serde_json::from_str(&t.value).unwrap_or(Value::Null);
                let mut envelope = EventEnvelope::new(
                    EventType::Computed,
                    format!("tl-computed-{processor}-{}-{:020}", t.group, t.seq),
                    at,
                )
                .user(t.group.clone())
                .properties(json!({
                    "trait": t.name, "value": value, "metric": t.metric, "version": t.version,
                }));
                envelope.received_at = received;
                envelope.source = Source::Metric;
                Record {
                    key: Some(t.group.clone()),
                    value: serde_json::to_vec(&envelope).expect("an envelope serializes"),
                }
            })
            .collect();
        self.log
            .append(&self.topics.events(), records)
            .await
            .map_err(|e| e.to_string())?;
        let keys: Vec<(String, String, i64)> = traits
            .into_iter()
            .map(|(processor, t)| (processor, t.group, t.seq))
            .collect();
        self.store
            .mark_traits_published(&keys)
            .await
            .map_err(|e| e.to_string())?;
        Ok(keys.len())
    }

    async fn publish_windows(&self) -> Result<usize, String> {
        let windows = self
            .store
            .unpublished_windows(BATCH)
            .await
            .map_err(|e| e.to_string())?;
        if windows.is_empty() {
            return Ok(0);
        }
        let records = windows
            .iter()
            .map(|w| {
                let value = MetricRecord {
                    metric: &w.metric,
                    version: w.version,
                    window: WindowValue::closed(w.clone()),
                };
                Record {
                    key: Some(format!("{}:{}", w.metric, w.group)),
                    value: serde_json::to_vec(&value).expect("a window serializes"),
                }
            })
            .collect();
        self.log
            .append(&self.topics.metrics(), records)
            .await
            .map_err(|e| e.to_string())?;
        self.store
            .mark_windows_published(&windows)
            .await
            .map_err(|e| e.to_string())?;
        Ok(windows.len())
    }

    /// Alerts go to `user_alerts`, each record the alert as the API shows
    /// it (its `id` stable across a repeated publish).
    async fn publish_alerts(&self) -> Result<usize, String> {
        let alerts = self
            .store
            .unpublished_alerts(BATCH)
            .await
            .map_err(|e| e.to_string())?;
        if alerts.is_empty() {
            return Ok(0);
        }
        let records = alerts
            .iter()
            .map(|a| Record {
                key: Some(format!("{}:{}", a.rule, a.key)),
                value: crate::admin::rules::alert_view(a).to_string().into_bytes(),
            })
            .collect();
        self.log
            .append(&self.topics.alerts(), records)
            .await
            .map_err(|e| e.to_string())?;
        let ids: Vec<&str> = alerts.iter().map(|a| a.id.as_str()).collect();
        self.store
            .mark_alerts_published(&ids)
            .await
            .map_err(|e| e.to_string())?;
        Ok(alerts.len())
    }

    async fn publish_late(&self) -> Result<usize, String> {
        let late = self
            .store
            .unpublished_late(BATCH)
            .await
            .map_err(|e| e.to_string())?;
        if late.is_empty() {
            return Ok(0);
        }
        let records = late
            .iter()
            .map(|(_, l)| {
                let event: Value = serde_json::from_str(&l.event).unwrap_or(Value::Null);
                let value = json!({
                    "metric": l.metric,
                    "version": l.version,
                    "group": l.group,
                    "window": {"start": time(l.start_ms), "end": time(l.end_ms)},
                    "late_by_ms": l.late_by_ms,
                    "message_id": l.message_id,
                    "event": event,
                });
                Record {
                    key: Some(format!("{}:{}", l.metric, l.group)),
                    value: value.to_string().into_bytes(),
                }
            })
            .collect();
        self.log
            .append(&self.topics.late(), records)
            .await
            .map_err(|e| e.to_string())?;
        let keys: Vec<(String, String)> = late
            .into_iter()
            .map(|(processor, l)| (processor, l.message_id))
            .collect();
        self.store
            .mark_late_published(&keys)
            .await
            .map_err(|e| e.to_string())?;
        Ok(keys.len())
    }

    async fn publish_changes(&self) -> Result<usize, String> {
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

/// A `user_metrics` value: the window as the values API shows it, with
/// its metric and version.
#[derive(Serialize)]
struct MetricRecord<'a> {
    metric: &'a str,
    version: i64,
    #[serde(flatten)]
    window: WindowValue,
}

/// The `user_profiles` value of a change: the profile after it, or a
/// tombstone (empty) when there is none.
fn snapshot(change: &ChangeRecord) -> Result<Vec<u8>, String> {
    match &change.after {
        Some(after) => serde_json::to_vec(after).map_err(|e| e.to_string()),
        None => Ok(Vec::new()),
    }
}
