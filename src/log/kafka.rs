//! The event log on Apache Kafka (any Kafka-protocol broker), via rdkafka.
//!
//! One producer per process, shared by every request (the seed's
//! per-request producer cost a connection each time). Its settings, next to
//! librdkafka's defaults:
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

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};

use super::{AppendError, EventLog, LogReader, Polled, ReadError, Record, StartAt, StoredRecord};
use crate::config::KafkaSettings;

/// Kafka cannot be used as configured.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    #[error("invalid Kafka client setting (check --kafka-option and the kafka-* settings): {0}")]
    Client(String),
    #[error(
        "cannot reach Kafka at {brokers} (setting kafka-brokers / TRAITLINE_KAFKA_BROKERS): {reason}"
    )]
    Unreachable { brokers: String, reason: String },
    #[error("cannot create topic {topic} in Kafka: {reason}")]
    CreateTopic { topic: String, reason: String },
}

/// The producer, shared by every request: its own thread serves
/// librdkafka's delivery reports to [`ProducerCallbacks::delivery`].
type SharedProducer = Arc<ThreadedProducer<ProducerCallbacks>>;

/// The producer's context: each delivery report settles its append's
/// [`Acks`], and librdkafka's statistics (every `statistics.interval.ms`)
/// become the Kafka metrics.
struct ProducerCallbacks;

/// The acknowledgements one append waits for: one channel an append, not
/// one a record (a 100-event batch was 100 futures and channels).
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

/// A client that cannot be made from its settings, said without the value
/// of a secret setting.
fn client_error(error: KafkaError) -> KafkaSetupError {
    KafkaSetupError::Client(match error {
        KafkaError::ClientConfig(_, description, name, _)
            if crate::config::is_secret_option(&name) =>
        {
            format!("{name}: {description}")
        }
        other => other.to_string(),
    })
}

/// The client settings every Traitline Kafka client shares.
fn base_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.brokers)
        .set("client.id", "traitline");
    for (name, value) in &settings.options {
        config.set(name, value);
    }
    config
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

/// Checks the broker answers and creates the missing topics.
pub async fn ensure_topics(
    settings: &KafkaSettings,
    partitions: i32,
    topics: &[(String, bool)],
) -> Result<(), KafkaSetupError> {
    let admin: AdminClient<DefaultClientContext> =
        base_config(settings).create().map_err(client_error)?;
    let admin = Arc::new(admin);
    let existing = {
        let admin = admin.clone();
        let brokers = settings.brokers.clone();
        tokio::task::spawn_blocking(move || {
            admin
                .inner()
                .fetch_metadata(None, Duration::from_secs(10))
                .map(|m| {
                    m.topics()
                        .iter()
                        .filter(|t| t.error().is_none())
                        .map(|t| t.name().to_owned())
                        .collect::<HashSet<_>>()
                })
                .map_err(|e| KafkaSetupError::Unreachable {
                    brokers,
                    reason: e.to_string(),
                })
        })
        .await
        .map_err(|e| KafkaSetupError::Unreachable {
            brokers: settings.brokers.clone(),
            reason: e.to_string(),
        })??
    };
    let missing: Vec<&(String, bool)> = topics
        .iter()
        .filter(|(t, _)| !existing.contains(t))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let new_topics: Vec<NewTopic> = missing
        .iter()
        .map(|(t, compacted)| {
            let topic = NewTopic::new(
                t,
                partitions,
                TopicReplication::Fixed(settings.replication_factor),
            );
            if *compacted {
                topic.set("cleanup.policy", "compact")
            } else {
                topic
            }
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(new_topics.iter(), &options)
        .await
        .map_err(|e| KafkaSetupError::CreateTopic {
            topic: missing
                .iter()
                .map(|(t, _)| t.as_str())
                .collect::<Vec<_>>()
                .join(","),
            reason: e.to_string(),
        })?;
    for result in results {
        match result {
            Ok(topic) => tracing::info!(
                topic,
                partitions,
                "created Kafka topic {topic} with {partitions} partitions"
            ),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaSetupError::CreateTopic {
                    topic,
                    reason: code.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Tells a [`KafkaReader`] that its consumer group moved partitions.
struct ReaderContext {
    /// For the runner: the partitions changed ([`LogReader::take_assignment_change`]).
    rebalanced: Arc<AtomicBool>,
    /// For the reader itself: count the partitions again.
    recount: Arc<AtomicBool>,
    /// The high watermark of each partition of the topic, from the
    /// consumer's statistics (fetch responses carry it): lag without a
    /// broker round trip.
    high_watermarks: Mutex<HashMap<i32, i64>>,
}

impl ClientContext for ReaderContext {
    fn stats(&self, statistics: Statistics) {
        let mut high = self
            .high_watermarks
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for topic in statistics.topics.values() {
            // Negative ids are librdkafka's internal (unassigned) entry;
            // negative offsets mean "not known yet".
            for p in topic.partitions.values() {
                if p.partition >= 0 && p.hi_offset >= 0 {
                    high.insert(p.partition, p.hi_offset);
                }
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // Reaching a partition's end is how a reader knows it caught up,
        // not a fault.
        let eof = matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        );
        if !eof {
            tracing::error!("librdkafka: {error}: {reason}");
        }
    }
}

impl ConsumerContext for ReaderContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let partitions = |list: &TopicPartitionList| {
            list.elements()
                .iter()
                .map(|e| e.partition().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match rebalance {
            Rebalance::Assign(list) => tracing::info!(
                "the consumer group gave this instance partitions [{}]",
                partitions(list)
            ),
            Rebalance::Revoke(list) => tracing::info!(
                "the consumer group took partitions [{}] from this instance",
                partitions(list)
            ),
            Rebalance::Error(e) => tracing::warn!("Kafka consumer group rebalance failed: {e}"),
        }
        self.rebalanced.store(true, Ordering::Release);
        self.recount.store(true, Ordering::Release);
    }
}

/// Reads a topic from Kafka: either every partition without a consumer
/// group, as kcat does ([`KafkaReader::open`]), or the partitions a
/// consumer group gives it ([`KafkaReader::join_group`]).
pub struct KafkaReader {
    consumer: StreamConsumer<ReaderContext>,
    topic: String,
    /// Partitions at their end since their last record.
    at_end: HashSet<i32>,
    /// How many partitions this reader has now.
    partitions: usize,
    rebalanced: Arc<AtomicBool>,
    recount: Arc<AtomicBool>,
    /// Whether partitions come from a consumer group (and may change).
    grouped: bool,
}

/// A consumer and the two flags its context raises on a rebalance.
type ReaderParts = (
    StreamConsumer<ReaderContext>,
    Arc<AtomicBool>,
    Arc<AtomicBool>,
);

fn reader_consumer(
    settings: &KafkaSettings,
    topic: &str,
    group: &str,
) -> Result<ReaderParts, ReadError> {
    let rebalanced = Arc::new(AtomicBool::new(false));
    let recount = Arc::new(AtomicBool::new(false));
    let context = ReaderContext {
        rebalanced: rebalanced.clone(),
        recount: recount.clone(),
        high_watermarks: Mutex::default(),
    };
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.brokers)
        .set("client.id", "traitline")
        // How long the broker may hold a fetch that has no data yet
        // (librdkafka: 500 ms). Kafka answers as soon as data arrives, but
        // some brokers (tansu) hold every fetch the full time, which is
        // then the floor of end-to-end latency.
        .set("fetch.wait.max.ms", "50")
        // What librdkafka fetches ahead of the processor (default 64 MiB):
        // when the processor stops reading (a stalled store), fetching
        // stops at this bound, so memory does not grow with the backlog.
        .set("queued.max.messages.kbytes", "16384")
        // How often the high watermarks (the lag) are refreshed.
        .set("statistics.interval.ms", "1000");
    for (name, value) in &settings.options {
        config.set(name, value);
    }
    let consumer = config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "true")
        .create_with_context(context)
        .map_err(|e| ReadError {
            topic: topic.to_owned(),
            reason: e.to_string(),
        })?;
    Ok((consumer, rebalanced, recount))
}

impl KafkaReader {
    /// Reads every partition of `topic` from `start`, committing nothing.
    pub fn open(
        settings: &KafkaSettings,
        topic: &str,
        start: StartAt,
    ) -> Result<KafkaReader, ReadError> {
        let error = |reason: String| ReadError {
            topic: topic.to_owned(),
            reason,
        };
        let group = format!("traitline-reader-{}", uuid::Uuid::new_v4().simple());
        let (consumer, rebalanced, recount) = reader_consumer(settings, topic, &group)?;
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(|e| error(format!("cannot reach Kafka at {}: {e}", settings.brokers)))?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .filter(|t| t.error() != Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART))
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            return Err(error("the topic does not exist".into()));
        }
        let offset = match start {
            StartAt::Beginning => Offset::Beginning,
            StartAt::End => Offset::End,
        };
        let mut assignment = TopicPartitionList::new();
        for p in &partitions {
            assignment
                .add_partition_offset(topic, *p, offset)
                .map_err(|e| error(e.to_string()))?;
        }
        consumer
            .assign(&assignment)
            .map_err(|e| error(e.to_string()))?;
        Ok(KafkaReader {
            consumer,
            topic: topic.to_owned(),
            at_end: HashSet::new(),
            partitions: partitions.len(),
            rebalanced,
            recount,
            grouped: false,
        })
    }

    /// A group member's partitions are the group's to give: count them
    /// again after a rebalance.
    fn refresh_partitions(&mut self) {
        if self.grouped && self.recount.swap(false, Ordering::AcqRel) {
            self.partitions = self.consumer.assignment().map(|a| a.count()).unwrap_or(0);
        }
    }

    /// Every partition this reader has is at its end (and it has some:
    /// a group member waiting for its assignment is not caught up).
    fn caught_up(&self) -> bool {
        self.partitions > 0 && self.at_end.len() >= self.partitions
    }

    /// Joins consumer group `group` on `topic`: Kafka shares the
    /// partitions among the group's members and moves them when a member
    /// comes or goes. A partition the group never committed starts at its
    /// oldest record.
    pub fn join_group(
        settings: &KafkaSettings,
        topic: &str,
        group: &str,
    ) -> Result<KafkaReader, ReadError> {
        let (consumer, rebalanced, recount) = reader_consumer(settings, topic, group)?;
        consumer.subscribe(&[topic]).map_err(|e| ReadError {
            topic: topic.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(KafkaReader {
            consumer,
            topic: topic.to_owned(),
            at_end: HashSet::new(),
            partitions: 0,
            rebalanced,
            recount,
            grouped: true,
        })
    }

    /// True (once) when a rebalance changed this reader's partitions since
    /// the last call; forgets which partitions were at their end.
    fn reassigned(&mut self) -> bool {
        if !self.rebalanced.swap(false, Ordering::AcqRel) {
            return false;
        }
        if self.grouped {
            self.at_end.clear();
            self.recount.store(true, Ordering::Release);
            self.refresh_partitions();
        }
        true
    }
}

#[async_trait]
impl LogReader for KafkaReader {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Polled, ReadError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut records = Vec::new();
        self.refresh_partitions();
        while records.len() < max {
            let caught_up = self.caught_up();
            if caught_up && !records.is_empty() {
                break;
            }
            // Wait (up to `wait`) for the first record only; then take what
            // librdkafka has fetched already. Batches grow with the backlog
            // instead of every record waiting out the window.
            let until = if records.is_empty() {
                deadline
            } else {
                tokio::time::Instant::now()
            };
            let next = match tokio::time::timeout_at(until, self.consumer.recv()).await {
                Err(_) => break,
                Ok(next) => next,
            };
            match next {
                Ok(message) => {
                    self.at_end.remove(&message.partition());
                    records.push(StoredRecord {
                        topic: message.topic().to_owned(),
                        partition: message.partition(),
                        offset: message.offset(),
                        timestamp_ms: message.timestamp().to_millis().unwrap_or(0),
                        key: message.key().map(<[u8]>::to_vec),
                        value: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    });
                }
                Err(KafkaError::PartitionEOF(p)) => {
                    self.at_end.insert(p);
                    self.refresh_partitions();
                    if self.caught_up() && records.is_empty() {
                        return Ok(Polled {
                            records,
                            caught_up: true,
                            reassigned: self.reassigned(),
                        });
                    }
                }
                Err(e) => {
                    return Err(ReadError {
                        topic: self.topic.clone(),
                        reason: e.to_string(),
                    });
                }
            }
        }
        let caught_up = self.caught_up();
        Ok(Polled {
            records,
            caught_up,
            reassigned: self.reassigned(),
        })
    }

    fn seek(&mut self, partition: i32, offset: Option<i64>) -> Result<(), ReadError> {
        if self.grouped {
            let assigned = self.consumer.assignment().map(|a| {
                a.elements_for_topic(&self.topic)
                    .iter()
                    .any(|e| e.partition() == partition)
            });
            if !matches!(assigned, Ok(true)) {
                return Err(ReadError {
                    topic: self.topic.clone(),
                    reason: format!("partition {partition} is not assigned to this instance"),
                });
            }
        }
        let offset = offset.map_or(Offset::Beginning, Offset::Offset);
        self.at_end.remove(&partition);
        // A timeout of zero makes librdkafka's seek asynchronous, so it
        // never holds up a runtime worker; a seek that fails shows in the
        // next records' offsets, which the runner checks against the
        // store (and seeks again).
        self.consumer
            .seek(&self.topic, partition, offset, Duration::ZERO)
            .map_err(|e| ReadError {
                topic: self.topic.clone(),
                reason: format!("cannot seek partition {partition} to {offset:?}: {e}"),
            })
    }

    fn assigned(&self) -> Vec<i32> {
        if !self.grouped {
            return Vec::new();
        }
        self.consumer
            .assignment()
            .map(|list| {
                list.elements_for_topic(&self.topic)
                    .iter()
                    .map(|e| e.partition())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn note_committed(&mut self, partition: i32, next: i64) {
        if !self.grouped {
            return;
        }
        let mut offsets = TopicPartitionList::new();
        if offsets
            .add_partition_offset(&self.topic, partition, Offset::Offset(next))
            .is_ok()
            && let Err(e) = self.consumer.commit(&offsets, CommitMode::Async)
        {
            tracing::debug!(
                partition,
                "could not commit the consumer group offset (the store keeps the truth): {e}"
            );
        }
    }

    fn high_watermark(&self, partition: i32) -> Option<i64> {
        // Not `fetch_watermarks`: that asks the broker, one partition at a
        // time, blocking the runner (8 partitions on tansu: ~600 ms).
        self.consumer
            .context()
            .high_watermarks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&partition)
            .copied()
    }
}
