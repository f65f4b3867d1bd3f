//! A destination as a processor of the at-least-once runner: each record
//! of its source topic the filter takes is delivered on a task of its
//! own, retried with backoff until its budget is spent (then it is a dead
//! letter, kept for a replay), and done for good only once its outcome is
//! stored; the runner moves the stored position only past records whose
//! work is done.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::watch;

use super::breaker::{Admission, Breaker};
use super::recorder::Recorder;
use super::webhook::{Attempt, Sender, Verdict};
use crate::definitions::DestinationSpec;
use crate::definitions::destination::Ordering;
use crate::log::StoredRecord;
use crate::process::profiles::commit_error;
use crate::process::{AtLeastOnce, Checkpoints, CommitError, OffsetAdvance, Rejected};
use crate::store::{DeliveryOutcome, Store, now_ms};

/// One version of a destination, delivering.
pub struct Destination {
    spec: DestinationSpec,
    version: i64,
    /// Its positions' name in the store (`destination:{name}`): a new
    /// version goes on from where the last one got.
    processor: String,
    /// Records the log stored before the destination was created are not
    /// its to deliver (a replay sends them when asked).
    since_ms: i64,
    sender: Sender,
    store: Store,
    recorder: Recorder,
    /// Why the destination stopped delivering (a 410), once it has.
    disabled: watch::Sender<Option<String>>,
    breaker: Arc<Breaker>,
}

impl Destination {
    pub fn new(
        spec: DestinationSpec,
        version: i64,
        since_ms: i64,
        sender: Sender,
        store: Store,
        recorder: Recorder,
    ) -> Destination {
        let breaker = Arc::new(Breaker::new(
            spec.webhook.backoff.max(Duration::from_secs(1)),
            spec.webhook.backoff_max,
        ));
        Destination {
            breaker,
            processor: processor_name(&spec.name),
            spec,
            version,
            since_ms,
            sender,
            store,
            recorder,
            disabled: watch::channel(None).0,
        }
    }

    /// Its endpoint's circuit breaker.
    pub fn breaker(&self) -> Arc<Breaker> {
        self.breaker.clone()
    }

    /// Resolves when an endpoint disabled the destination, with why.
    pub fn disabled(&self) -> watch::Receiver<Option<String>> {
        self.disabled.subscribe()
    }

    /// Delivers `body` as `id` until it is delivered or given up on; a
    /// destination disabled meanwhile never resolves (its runner is
    /// stopped, and the record done again by the next version).
    pub async fn deliver(&self, id: String, record: &StoredRecord, key: Option<String>) -> bool {
        let webhook = &self.spec.webhook;
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + webhook.retry_for;
        let mut attempt = 0;
        let mut last: Option<Attempt> = None;
        loop {
            if self.disabled.borrow().is_some() {
                std::future::pending::<()>().await;
            }
            let probe = match self.breaker.admit(deadline).await {
                Admission::Go { probe } => probe,
                Admission::Expired => {
                    let paused = Attempt {
                        status: None,
                        latency: Duration::ZERO,
                        response: format!(
                            "the endpoint stayed paused by the circuit breaker past the retry budget; the last attempt: {}",
                            last.map_or_else(String::new, |a| a.response)
                        ),
                        verdict: Verdict::Retry { after: None },
                    };
                    let body = String::from_utf8_lossy(&record.value).into_owned();
                    let dead = self.outcome(
                        &id,
                        attempt,
                        record,
                        key,
                        "dead_letter",
                        &paused,
                        Some(body),
                    );
                    self.recorder.record_final(dead).await;
                    return false;
                }
            };
            attempt += 1;
            let mut unanswered = Unanswered(probe.then_some(&*self.breaker));
            let tried = self.sender.attempt(webhook, &id, &record.value).await;
            unanswered.0 = None;
            self.breaker
                .record(tried.verdict == Verdict::Delivered, probe);
            let outcome = |what: &str, body: Option<String>| {
                self.outcome(&id, attempt, record, key.clone(), what, &tried, body)
            };
            match &tried.verdict {
                Verdict::Delivered => {
                    self.recorder.record_final(outcome("delivered", None)).await;
                    return true;
                }
                Verdict::Gone => {
                    let why = format!(
                        "the endpoint answered 410 Gone to delivery {id}; define the destination again to resume"
                    );
                    tracing::warn!("destination {} is disabled: {why}", self.spec.name);
                    self.recorder.record(outcome("disabled", None)).await;
                    self.disable(why).await;
                    std::future::pending::<()>().await;
                }
                Verdict::Retry { after } => {
                    let delay = backoff(webhook.backoff, webhook.backoff_max, attempt)
                        .max(after.unwrap_or_default());
                    if started.elapsed() + delay > webhook.retry_for {
                        let body = String::from_utf8_lossy(&record.value).into_owned();
                        self.recorder
                            .record_final(outcome("dead_letter", Some(body)))
                            .await;
                        return false;
                    }
                    self.recorder.record(outcome("retrying", None)).await;
                    last = Some(tried);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn outcome(
        &self,
        id: &str,
        attempt: i32,
        record: &StoredRecord,
        key: Option<String>,
        what: &str,
        tried: &Attempt,
        body: Option<String>,
    ) -> DeliveryOutcome {
        DeliveryOutcome {
            attempt_id: uuid::Uuid::new_v4().to_string(),
            destination: self.spec.name.clone(),
            version: self.version,
            delivery_id: id.to_owned(),
            attempt,
            partition: record.partition,
            offset: record.offset,
            key,
            outcome: what.to_owned(),
            status: tried.status.map(i32::from),
            latency_ms: tried.latency.as_millis() as i64,
            response: tried.response.clone(),
            at: now_ms(),
            body,
        }
    }

    /// Whether the destination delivers `record`, and as what: its
    /// delivery id and key; `None` when its filter does not take it.
    pub fn take(
        &self,
        record: &StoredRecord,
    ) -> Result<Option<(String, Option<String>)>, Rejected> {
        let value: Value = match serde_json::from_slice(&record.value) {
            Ok(value) => value,
            Err(e) => {
                return Err(Rejected {
                    reason: format!(
                        "destination {} cannot read the record as JSON: {e}",
                        self.spec.name
                    ),
                    record: record.clone(),
                });
            }
        };
        if let Some(filter) = &self.spec.filter
            && !filter.matches(&value)
        {
            return Ok(None);
        }
        let id = delivery_id(self.spec.source, &value, record);
        let key = record
            .key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).into_owned());
        Ok(Some((id, key)))
    }

    pub fn spec(&self) -> &DestinationSpec {
        &self.spec
    }

    async fn disable(&self, why: String) {
        // Stored first, so a restart does not deliver to the endpoint
        // again; tried until the store takes it.
        while let Err(e) = self
            .store
            .set_destination_state(&self.spec.name, self.version, "disabled", &why)
            .await
        {
            tracing::warn!(
                "cannot store that destination {} is disabled: {e}; trying again",
                self.spec.name
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        self.disabled.send_replace(Some(why));
    }
}

/// A probe whose attempt ends without an answer (its task is dropped)
/// lets another attempt be the probe.
struct Unanswered<'a>(Option<&'a Breaker>);

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if let Some(breaker) = self.0 {
            breaker.abandon_probe();
        }
    }
}

/// The name a destination's positions are stored under.
pub fn processor_name(destination: &str) -> String {
    format!("destination:{destination}")
}

/// The delay before attempt `attempt + 1`: doubling from `first`, at
/// most `max`, with "full jitter" in its upper half so retries of many
/// records spread out.
fn backoff(first: Duration, max: Duration, attempt: i32) -> Duration {
    let doubled = first.saturating_mul(1u32 << (attempt - 1).clamp(0, 30) as u32);
    let ceiling = doubled.min(max);
    ceiling.mul_f64(0.5 + fastrand::f64() / 2.0)
}

/// The id a receiver deduplicates on (`webhook-id`): an event's message
/// id (a client's retry of it is the same delivery), an alert's id,
/// else the record's place in its topic.
pub fn delivery_id(source: &str, value: &Value, record: &StoredRecord) -> String {
    let own = match source {
        "user_events" => value.get("messageId").and_then(Value::as_str),
        "user_alerts" => value.get("id").and_then(Value::as_str),
        _ => None,
    };
    match own {
        Some(id) => id.to_owned(),
        None => format!("{source}-{}-{}", record.partition, record.offset),
    }
}

#[async_trait]
impl Checkpoints for Destination {
    fn name(&self) -> &str {
        &self.processor
    }

    async fn stored_offsets(&self, topic: &str) -> Result<HashMap<i32, i64>, CommitError> {
        self.store
            .offsets(&self.processor, topic)
            .await
            .map_err(commit_error)
    }
}

#[async_trait]
impl AtLeastOnce for Destination {
    async fn handle(&self, record: StoredRecord) -> Result<(), Rejected> {
        if record.timestamp_ms < self.since_ms {
            return Ok(());
        }
        if let Some((id, key)) = self.take(&record)? {
            self.deliver(id, &record, key).await;
        }
        Ok(())
    }

    fn in_order_of(&self, record: &StoredRecord) -> Option<Vec<u8>> {
        match self.spec.ordering {
            Ordering::PerUser => Some(record.key.clone().unwrap_or_default()),
            Ordering::Unordered => None,
        }
    }

    async fn save_positions(
        &self,
        topic: &str,
        offsets: Vec<OffsetAdvance>,
        done: &HashMap<i32, Vec<(i64, i64)>>,
    ) -> Result<(), CommitError> {
        self.store
            .save_positions(&self.processor, topic, &offsets, done)
            .await
            .map_err(commit_error)
    }

    async fn stored_done(&self, topic: &str) -> Result<HashMap<i32, Vec<(i64, i64)>>, CommitError> {
        self.store
            .done_above(&self.processor, topic)
            .await
            .map_err(commit_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_its_ceiling() {
        let first = Duration::from_secs(1);
        let max = Duration::from_secs(60);
        for attempt in 1..=12 {
            let ceiling = Duration::from_secs(1 << (attempt - 1)).min(max);
            for _ in 0..50 {
                let delay = backoff(first, max, attempt);
                assert!(
                    delay >= ceiling / 2 && delay <= ceiling,
                    "{attempt}: {delay:?}"
                );
            }
        }
        assert!(backoff(first, max, 1000) <= max);
    }

    #[test]
    fn an_event_is_delivered_under_its_message_id() {
        let record = StoredRecord {
            topic: "user_events".into(),
            partition: 3,
            offset: 17,
            timestamp_ms: 0,
            key: None,
            value: Vec::new(),
        };
        let event = serde_json::json!({"messageId": "m-1"});
        assert_eq!(delivery_id("user_events", &event, &record), "m-1");
        let alert = serde_json::json!({"id": "rule:1:u:m"});
        assert_eq!(delivery_id("user_alerts", &alert, &record), "rule:1:u:m");
        assert_eq!(
            delivery_id("user_metrics", &serde_json::json!({}), &record),
            "user_metrics-3-17"
        );
    }
}
