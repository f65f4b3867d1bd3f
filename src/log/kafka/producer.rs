//! One producer per process, shared by every request (a producer a request
//! costs a broker connection each time). Its settings, next to librdkafka's
//! defaults:
//!
//! | setting | here | librdkafka default | why |
//! |---|---|---|---|
//! | `enable.idempotence` | true | false | retries never duplicate or reorder a partition |
//! | `acks` | all | all | a 2xx means every in-sync replica has it |
//! | `compression.type` | lz4 | none | cheap CPU, 3-5x less network and disk for JSON |
//! | `linger.ms` | 5 | 5 | small batches under light load, full ones under heavy load |
//! | `batch.size` | 1 MB | 1 MB | |
//! | `queue.buffering.max.messages` | 100000 | 100000 | bounded: a full queue makes requests wait, then 503 |
//! | `queue.buffering.max.kbytes` | 65536 (64 MiB) | 1048576 (1 GiB) | the queue's memory stays small when events are large |
//! | `message.timeout.ms` | the append timeout | 300000 | a message is not delivered long after its request got 503 |
//! | `partitioner` | murmur2_random | consistent_random | the Java client's partitioner, as the embedded log |
//! | `statistics.interval.ms` | 5000 | 0 (off) | queue depth and broker state for `/metrics` |

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::statistics::Statistics;

use super::{KafkaSetupError, base_config, client_error, ensure_topics};
use crate::config::KafkaSettings;
use crate::log::{AppendError, EventLog, Record};

/// The producer, shared by every request: its own thread serves
/// librdkafka's delivery reports to [`ProducerCallbacks::delivery`].
type SharedProducer = Arc<ThreadedProducer<ProducerCallbacks>>;

/// The producer's context: each delivery report settles its append's
/// [`Acks`], and librdkafka's statistics (every `statistics.interval.ms`)
/// become the Kafka metrics.
struct ProducerCallbacks;

/// The acknowledgements one append waits for: one channel an append, not
/// one a record, so a batch costs one wake-up.
struct Acks {
    /// Records not yet acknowledged, plus one until all are enqueued.
    pending: AtomicUsize,
    /// The first failure, if any.
    failed: Mutex<Option<KafkaError>>,
    /// Answers the append once nothing is pending.
    done: Mutex<Option<tokio::sync::oneshot::Sender<Option<KafkaError>>>>,
}

impl Acks {
    fn new() -> (
        Arc<Acks>,
        tokio::sync::oneshot::Receiver<Option<KafkaError>>,
    ) {
        let (done, answer) = tokio::sync::oneshot::channel();
        let acks = Acks {
            pending: AtomicUsize::new(1),
            failed: Mutex::new(None),
            done: Mutex::new(Some(done)),
        };
        (Arc::new(acks), answer)
    }

    /// One record (or the enqueuing) is done; the last answers.
    fn settle(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            let failed = self.failed.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(done) = self.done.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = done.send(failed);
            }
        }
    }
}

impl ProducerContext for ProducerCallbacks {
    type DeliveryOpaque = Arc<Acks>;

    fn delivery(&self, result: &DeliveryResult<'_>, acks: Arc<Acks>) {
        if let Err((error, _)) = result {
            acks.failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert_with(|| error.clone());
        }
        acks.settle();
    }
}

impl ClientContext for ProducerCallbacks {
    fn stats(&self, statistics: Statistics) {
        use crate::metrics::{KAFKA_BROKER_RTT_SECONDS, KAFKA_BROKER_UP, KAFKA_QUEUE_MESSAGES};
        metrics::gauge!(KAFKA_QUEUE_MESSAGES).set(statistics.msg_cnt as f64);
        // Negative node ids are librdkafka's bootstrap and coordinator
        // entries, not brokers.
        for broker in statistics.brokers.values().filter(|b| b.nodeid >= 0) {
            let up = if broker.state == "UP" { 1.0 } else { 0.0 };
            metrics::gauge!(KAFKA_BROKER_UP, "broker" => broker.nodename.clone()).set(up);
            if let Some(rtt) = &broker.rtt {
                metrics::gauge!(KAFKA_BROKER_RTT_SECONDS, "broker" => broker.nodename.clone())
                    .set(rtt.avg as f64 / 1e6);
            }
        }
    }
}

/// The shared producer and what it needs to answer for a topic.
pub struct KafkaLog {
    /// The producer in use and its generation. A producer that hits a
    /// fatal error (for example fenced after an epoch bump that followed
    /// timed-out writes) never produces again, so it is replaced.
    producer: std::sync::RwLock<(u64, SharedProducer)>,
    /// How to build a replacement.
    producer_config: ClientConfig,
    brokers: String,
    /// The topic `check_ready` looks at.
    ready_topic: String,
    append_timeout: Duration,
}

impl KafkaLog {
    /// Connects, checks the broker answers, and creates the `topics` that
    /// are missing with `partitions` partitions.
    pub async fn connect(
        settings: &KafkaSettings,
        partitions: i32,
        topics: &[(String, bool)],
        append_timeout: Duration,
    ) -> Result<KafkaLog, KafkaSetupError> {
        let mut config = base_config(settings);
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", &settings.compression)
            .set("linger.ms", settings.linger_ms.to_string())
            .set("batch.size", "1000000")
            .set(
                "queue.buffering.max.messages",
                settings.queue_messages.to_string(),
            )
            .set("queue.buffering.max.kbytes", "65536")
            .set("message.timeout.ms", append_timeout.as_millis().to_string())
            .set("partitioner", "murmur2_random")
            .set("statistics.interval.ms", "5000");
        // Pass-through options win over Traitline's choices.
        for (name, value) in &settings.options {
            config.set(name, value);
        }
        let producer: SharedProducer = Arc::new(
            config
                .create_with_context(ProducerCallbacks)
                .map_err(client_error)?,
        );
        ensure_topics(settings, partitions, topics).await?;
        let ready_topic = topics
            .first()
            .map(|(name, _)| name.clone())
            .unwrap_or_default();
        Ok(KafkaLog {
            producer: std::sync::RwLock::new((0, producer)),
            producer_config: config,
            brokers: settings.brokers.clone(),
            ready_topic,
            append_timeout,
        })
    }

    /// The producer in use, with its generation.
    fn producer(&self) -> (u64, SharedProducer) {
        self.producer.read().expect("never poisoned").clone()
    }

    /// Replaces producer `generation`, which can no longer produce: it hit
    /// a fatal error, or the broker fenced it (tansu does, after the epoch
    /// bump that follows timed-out writes). Such a producer fails every
    /// later write, so without this one broker hiccup would stop ingest
    /// until a restart.
    fn replace_producer(&self, generation: u64, reason: &str) {
        let mut current = self.producer.write().expect("never poisoned");
        if current.0 != generation {
            return; // another request replaced it already
        }
        match self
            .producer_config
            .create_with_context::<_, ThreadedProducer<ProducerCallbacks>>(ProducerCallbacks)
        {
            Ok(fresh) => {
                let fresh = Arc::new(fresh);
                tracing::warn!(
                    "the Kafka producer cannot produce any more ({reason}); a new producer replaces it, and the writes it held were answered 503"
                );
                let old = std::mem::replace(&mut *current, (generation + 1, fresh));
                // Dropping a producer joins its thread: not on this one.
                tokio::task::spawn_blocking(move || drop(old));
            }
            Err(e) => tracing::error!(
                "the Kafka producer cannot produce any more ({reason}) and a new one cannot be made: {e}"
            ),
        }
    }

    /// Enqueues one record, waiting while the producer queue is full (the
    /// back-pressure of a bounded queue) until `deadline`.
    async fn enqueue(
        &self,
        producer: &SharedProducer,
        topic: &str,
        record: &Record,
        acks: &Arc<Acks>,
        deadline: Instant,
    ) -> Result<(), AppendError> {
        // An empty value is a tombstone: a null payload, which a compacted
        // topic reads as "delete this key".
        let mut message: BaseRecord<str, [u8], Arc<Acks>> =
            BaseRecord::with_opaque_to(topic, acks.clone());
        if !record.value.is_empty() {
            message = message.payload(&record.value);
        }
        if let Some(key) = &record.key {
            message = message.key(key.as_str());
        }
        acks.pending.fetch_add(1, Ordering::AcqRel);
        loop {
            match producer.send(message) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    if Instant::now() >= deadline {
                        return Err(AppendError::TimedOut(self.append_timeout));
                    }
                    message = returned;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((e, _)) => return Err(classify(e)),
            }
        }
    }

    /// Enqueues `records` in order (per-key order is the enqueue order),
    /// then waits for every acknowledgement until the append deadline.
    async fn append_with(
        &self,
        generation: u64,
        producer: &SharedProducer,
        topic: &str,
        records: &[Record],
    ) -> Result<(), AppendError> {
        let deadline = Instant::now() + self.append_timeout;
        let (acks, answer) = Acks::new();
        for record in records {
            // On a failure the records enqueued before it are still sent;
            // the request is answered with the failure at once.
            self.enqueue(producer, topic, record, &acks, deadline)
                .await?;
        }
        acks.settle();
        let wait = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(wait, answer).await {
            Ok(Ok(None)) => Ok(()),
            Ok(Ok(Some(e))) => {
                if matches!(
                    e.rdkafka_error_code(),
                    Some(RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch)
                ) {
                    self.replace_producer(generation, &e.to_string());
                }
                Err(classify(e))
            }
            Ok(Err(_)) => Err(AppendError::Unavailable("the producer was closed".into())),
            Err(_) => Err(AppendError::TimedOut(self.append_timeout)),
        }
    }
}

/// Sorts a produce error into retryable (503) or permanent.
fn classify(error: KafkaError) -> AppendError {
    use RDKafkaErrorCode as C;
    match error.rdkafka_error_code() {
        Some(C::MessageTimedOut) => AppendError::Unavailable(
            "Kafka did not acknowledge the write in time (broker down or overloaded)".into(),
        ),
        Some(
            code @ (C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::InvalidMessage
            | C::InvalidRecord
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::InvalidTopic
            | C::UnsupportedForMessageFormat),
        ) => AppendError::Rejected(format!("{code:?}")),
        _ => AppendError::Unavailable(error.to_string()),
    }
}

#[async_trait]
impl EventLog for KafkaLog {
    async fn append(&self, topic: &str, records: Vec<Record>) -> Result<(), AppendError> {
        let (generation, producer) = self.producer();
        let result = self
            .append_with(generation, &producer, topic, &records)
            .await;
        if result.is_err()
            && let Some((code, reason)) = producer.client().fatal_error()
        {
            self.replace_producer(generation, &format!("{code:?}: {reason}"));
        }
        result
    }

    async fn check_ready(&self) -> Result<(), String> {
        let (generation, producer) = self.producer();
        if let Some((code, reason)) = producer.client().fatal_error() {
            let reason = format!("{code:?}: {reason}");
            self.replace_producer(generation, &reason);
            return Err(format!(
                "the Kafka producer hit a fatal error ({reason}); it was replaced"
            ));
        }
        let topic = self.ready_topic.clone();
        let brokers = self.brokers.clone();
        tokio::task::spawn_blocking(move || {
            let metadata = producer
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(2))
                .map_err(|e| format!("Kafka at {brokers} does not answer: {e}"))?;
            let topic_meta = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .ok_or_else(|| format!("topic {topic} is missing"))?;
            if let Some(err) = topic_meta.error() {
                return Err(format!("topic {topic}: {err:?}"));
            }
            if topic_meta.partitions().iter().any(|p| p.leader() < 0) {
                return Err(format!("a partition of {topic} has no leader"));
            }
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    async fn close(&self, deadline: Duration) {
        let (_, producer) = self.producer();
        let flushed = tokio::task::spawn_blocking(move || producer.flush(deadline)).await;
        match flushed {
            Ok(Ok(())) => tracing::info!("the Kafka producer delivered everything it held"),
            Ok(Err(e)) => tracing::warn!(
                "the Kafka producer could not deliver everything within {deadline:?}: {e}; those requests were answered 503"
            ),
            Err(e) => tracing::warn!("flushing the Kafka producer failed: {e}"),
        }
    }

    fn describe(&self) -> String {
        format!("Kafka at {}", self.brokers)
    }
}
