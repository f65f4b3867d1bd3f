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
use bytes::Bytes;
use serde_json::Value;
use tokio::sync::watch;

use super::breaker::{Admission, Breaker};
use super::recorder::Recorder;
use super::webhook::{Attempt, Sender, Verdict};
use crate::definitions::DestinationSpec;
use crate::definitions::destination::{Ordering, WebhookSpec};
use crate::log::StoredRecord;
use crate::process::profiles::commit_error;
use crate::process::{AtLeastOnce, Checkpoints, CommitError, OffsetAdvance, Rejected};
use crate::store::{DeadLetter, DeliveryOutcome, Store, now_ms};

/// One version of a destination, delivering.
pub struct Destination {
    spec: DestinationSpec,
    webhook: WebhookSpec,
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
    /// The batch being filled (with `batch_size` above 1), and how many
    /// were begun.
    open: std::sync::Mutex<(Option<Open>, u64)>,
}

/// Records waiting to go as one batch, and what its senders wait on:
/// `Some(delivered)` once it is done for good.
struct Open {
    records: Vec<Member>,
    number: u64,
    sent: watch::Sender<Option<bool>>,
}

/// How long a batch waits for more records before it goes as it is.
const BATCH_LINGER: Duration = Duration::from_millis(100);

impl Destination {
    pub fn new(
        spec: DestinationSpec,
        webhook: WebhookSpec,
        version: i64,
        since_ms: i64,
        sender: Sender,
        store: Store,
        recorder: Recorder,
    ) -> Destination {
        let breaker = Arc::new(Breaker::new(
            webhook.backoff.max(Duration::from_secs(1)),
            webhook.backoff_max,
        ));
        Destination {
            webhook,
            breaker,
            processor: processor_name(&spec.name),
            spec,
            version,
            since_ms,
            sender,
            store,
            recorder,
            disabled: watch::channel(None).0,
            open: std::sync::Mutex::new((None, 0)),
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

    /// Delivers `record` alone as `id` (see [`Destination::deliver_payload`]).
    pub async fn deliver(&self, id: String, record: StoredRecord, key: Option<String>) -> bool {
        self.deliver_payload(&Payload::one(id, record, key)).await
    }

    /// Delivers `payload` until it is delivered or given up on (each of
    /// its records then a dead letter); true when delivered. A
    /// destination disabled meanwhile never resolves (its runner is
    /// stopped, and the records done again by the next version).
    pub async fn deliver_payload(&self, payload: &Payload) -> bool {
        let webhook = &self.webhook;
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
                    let dead = self.outcome(payload, attempt, "dead_letter", &paused);
                    self.recorder.record_final(dead).await;
                    return false;
                }
            };
            attempt += 1;
            let mut unanswered = Unanswered(probe.then_some(&*self.breaker));
            let tried = self
                .sender
                .attempt(webhook, &payload.id, &payload.body)
                .await;
            unanswered.0 = None;
            self.breaker
                .record(tried.verdict == Verdict::Delivered, probe);
            let outcome = |what: &str| self.outcome(payload, attempt, what, &tried);
            match &tried.verdict {
                Verdict::Delivered => {
                    self.recorder.record_final(outcome("delivered")).await;
                    return true;
                }
                Verdict::Gone => {
                    let why = format!(
                        "the endpoint answered 410 Gone to delivery {}; define the destination again to resume",
                        payload.id
                    );
                    tracing::warn!("destination {} is disabled: {why}", self.spec.name);
                    self.recorder.record(outcome("disabled")).await;
                    self.disable(why).await;
                    std::future::pending::<()>().await;
                }
                Verdict::Retry { after } => {
                    let delay = backoff(webhook.backoff, webhook.backoff_max, attempt)
                        .max(after.unwrap_or_default());
                    if started.elapsed() + delay > webhook.retry_for {
                        self.recorder.record_final(outcome("dead_letter")).await;
                        return false;
                    }
                    self.recorder.record(outcome("retrying")).await;
                    last = Some(tried);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Adds `record` to the open batch and resolves once the batch is
    /// done for good: the record that fills it sends it, else its first
    /// record's task does after [`BATCH_LINGER`].
    async fn deliver_in_batch(&self, record: Member) {
        let (mut sent, full, first) = {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            let (batch, begun) = &mut *open;
            let batch = batch.get_or_insert_with(|| {
                *begun += 1;
                Open {
                    records: Vec::with_capacity(self.spec.batch_size),
                    number: *begun,
                    sent: watch::channel(None).0,
                }
            });
            batch.records.push(record);
            let sent = batch.sent.subscribe();
            let first = (batch.records.len() == 1).then_some(batch.number);
            let full = if batch.records.len() >= self.spec.batch_size {
                open.0.take()
            } else {
                None
            };
            (sent, full, first)
        };
        if let Some(batch) = full {
            return self.send_batch(batch).await;
        }
        if let Some(number) = first {
            tokio::select! {
                () = tokio::time::sleep(BATCH_LINGER) => {}
                // Filled and sent by another record's task.
                _ = sent.changed() => {}
            }
            let due = {
                let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
                if open.0.as_ref().is_some_and(|b| b.number == number) {
                    open.0.take()
                } else {
                    None
                }
            };
            if let Some(batch) = due {
                return self.send_batch(batch).await;
            }
        }
        // The sender gone without an answer (a stop): not done.
        if sent.wait_for(Option::is_some).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    async fn send_batch(&self, batch: Open) {
        let delivered = self.deliver_payload(&Payload::batch(batch.records)).await;
        batch.sent.send_replace(Some(delivered));
    }

    /// An attempt's outcome as stored: under the payload's id, at its
    /// first record's place; a dead letter keeps each of its records.
    fn outcome(
        &self,
        payload: &Payload,
        attempt: i32,
        what: &str,
        tried: &Attempt,
    ) -> DeliveryOutcome {
        let first = &payload.records[0];
        let dead_letters = if what == "dead_letter" {
            payload
                .records
                .iter()
                .map(|r| DeadLetter {
                    delivery_id: r.id.clone(),
                    partition: r.partition,
                    offset: r.offset,
                    key: r.key.clone(),
                    body: String::from_utf8_lossy(&r.value).into_owned(),
                })
                .collect()
        } else {
            Vec::new()
        };
        DeliveryOutcome {
            attempt_id: uuid::Uuid::new_v4().to_string(),
            destination: self.spec.name.clone(),
            version: self.version,
            delivery_id: payload.id.clone(),
            attempt,
            partition: first.partition,
            offset: first.offset,
            key: first.key.clone(),
            outcome: what.to_owned(),
            status: tried.status.map(i32::from),
            latency_ms: tried.latency.as_millis() as i64,
            response: tried.response.clone(),
            at: now_ms(),
            dead_letters,
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
                    record: Box::new(record.clone()),
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

/// One record of a payload.
#[derive(Debug, Clone)]
pub struct Member {
    /// Its own delivery id.
    pub id: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Bytes,
}

/// What one request carries: a record, or a batch of them
/// (`{"batch": [...]}`), under one id.
#[derive(Debug, Clone)]
pub struct Payload {
    pub id: String,
    pub body: Bytes,
    pub records: Vec<Member>,
}

impl Payload {
    fn one(id: String, record: StoredRecord, key: Option<String>) -> Payload {
        let body = record.value;
        Payload {
            records: vec![Member {
                id: id.clone(),
                partition: record.partition,
                offset: record.offset,
                key,
                value: body.clone(),
            }],
            body,
            id,
        }
    }

    /// A batch: its id names its first record and how many there are, so
    /// it is the same on every retry.
    fn batch(records: Vec<Member>) -> Payload {
        let mut body = b"{\"batch\":[".to_vec();
        for (i, record) in records.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&record.value);
        }
        body.extend_from_slice(b"]}");
        Payload {
            id: format!("batch-{}-{}", records[0].id, records.len()),
            body: Bytes::from(body),
            records,
        }
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
pub(super) fn backoff(first: Duration, max: Duration, attempt: i32) -> Duration {
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
            if self.spec.batch_size > 1 {
                let member = Member {
                    id,
                    partition: record.partition,
                    offset: record.offset,
                    key,
                    value: record.value,
                };
                self.deliver_in_batch(member).await;
            } else {
                self.deliver(id, record, key).await;
            }
        }
        Ok(())
    }

    fn in_order_of(&self, record: &StoredRecord) -> Option<Vec<u8>> {
        match self.spec.ordering {
            Ordering::PerUser => Some(record.key.as_deref().unwrap_or_default().to_vec()),
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
            value: Bytes::new(),
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
