//! Reading a topic: every partition, or a consumer group's share.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};

use super::base_config;
use crate::config::KafkaSettings;
use crate::log::{LogReader, Polled, ReadError, StartAt, StoredRecord};

/// Tells a [`KafkaReader`] that its consumer group moved partitions.
struct ReaderContext {
    /// For the poll: the partitions changed ([`Polled::reassigned`]).
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
    topic: std::sync::Arc<str>,
    /// Partitions at their end since their last record.
    at_end: HashSet<i32>,
    /// How many partitions this reader has now.
    partitions: usize,
    rebalanced: Arc<AtomicBool>,
    recount: Arc<AtomicBool>,
    /// Whether partitions come from a consumer group (and may change).
    grouped: bool,
    /// Where records' bytes are copied out of librdkafka.
    copies: Copies,
}

/// Records' bytes copied into shared buffers of [`Copies::CHUNK`]: one
/// allocation, and one free once every record in it is dropped, for some
/// six hundred analytics.js events. A `Vec` a key and a value cost two
/// allocations a record, and two frees, often on another thread than the
/// one that allocated (a twentieth of a metric runner's CPU).
#[derive(Default)]
struct Copies {
    buffer: BytesMut,
}

impl Copies {
    const CHUNK: usize = 1 << 20;

    fn copy(&mut self, bytes: &[u8]) -> Bytes {
        if bytes.is_empty() {
            return Bytes::new();
        }
        if self.buffer.capacity() - self.buffer.len() < bytes.len() {
            // The old buffer stays alive as long as a record in it.
            self.buffer = BytesMut::with_capacity(Self::CHUNK.max(bytes.len()));
        }
        self.buffer.extend_from_slice(bytes);
        self.buffer.split().freeze()
    }
}

/// A group member's partitions are the group's to give: counts them
/// again after a rebalance.
fn recount(
    consumer: &StreamConsumer<ReaderContext>,
    grouped: bool,
    recount: &AtomicBool,
    partitions: &mut usize,
) {
    if grouped && recount.swap(false, Ordering::AcqRel) {
        *partitions = consumer.assignment().map(|a| a.count()).unwrap_or(0);
    }
}

/// Every partition this reader has is at its end (and it has some: a
/// group member waiting for its assignment is not caught up).
fn all_at_end(at_end: &HashSet<i32>, partitions: usize) -> bool {
    partitions > 0 && at_end.len() >= partitions
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
    let mut config = base_config(settings);
    config
        // How long the broker may hold a fetch that has no data yet
        // (librdkafka: 500 ms). Kafka answers as soon as data arrives, but
        // some brokers (tansu) hold every fetch the full time, which is
        // then the floor of end-to-end latency.
        .set("fetch.wait.max.ms", "50")
        // What librdkafka fetches ahead of the processor (default 64 MiB):
        // when the processor stops reading (a stalled store), fetching
        // stops at this bound, so memory does not grow with the backlog.
        .set("queued.max.messages.kbytes", "16384")
        // How long librdkafka waits to fetch again once that bound is
        // reached (default 1 s). A processor working through a backlog
        // empties the bound in a tenth of that and would sit idle the
        // rest: one metric on a 1,000,000-event backlog runs at 320,000
        // events/s rather than 84,000 (docs/benchmarks.md). A stalled
        // processor's full queue is looked at this often.
        .set("fetch.queue.backoff.ms", "20")
        // How often the high watermarks (the lag) are refreshed.
        .set("statistics.interval.ms", "1000");
    // Pass-through options win over Traitline's choices.
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
            topic: topic.into(),
            at_end: HashSet::new(),
            partitions: partitions.len(),
            rebalanced,
            recount,
            grouped: false,
            copies: Copies::default(),
        })
    }

    /// See [`recount`].
    fn refresh_partitions(&mut self) {
        recount(
            &self.consumer,
            self.grouped,
            &self.recount,
            &mut self.partitions,
        );
    }

    fn caught_up(&self) -> bool {
        all_at_end(&self.at_end, self.partitions)
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
            topic: topic.into(),
            at_end: HashSet::new(),
            partitions: 0,
            rebalanced,
            recount,
            grouped: true,
            copies: Copies::default(),
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
        // Room for a few thousand records, which a poll of a quiet log
        // rarely fills; one that fills it is reading a backlog, and takes
        // room for the whole batch at once rather than regrowing (and
        // copying what it holds) three or four times.
        let first_room = max.min(4096);
        let mut records = Vec::with_capacity(first_room);
        self.refresh_partitions();
        let KafkaReader {
            consumer,
            topic,
            at_end,
            partitions,
            recount: recounted,
            grouped,
            copies,
            ..
        } = &mut *self;
        // One stream for the whole poll: `recv` makes one a record, and
        // registering its waker and dropping it took a lock each time.
        let mut stream = consumer.stream();
        while records.len() < max {
            let caught_up = all_at_end(at_end, *partitions);
            if caught_up && !records.is_empty() {
                break;
            }
            // Wait (up to `wait`) for the first record only; then take what
            // librdkafka has fetched already, polled once without a timer
            // (a timer a record was a twentieth of a metric runner's CPU).
            // Batches grow with the backlog instead of every record
            // waiting out the window.
            let next = if records.is_empty() {
                match tokio::time::timeout_at(deadline, stream.next()).await {
                    Err(_) => break,
                    Ok(next) => next,
                }
            } else {
                match stream.next().now_or_never() {
                    None => break,
                    Some(next) => next,
                }
            }
            .expect("a Kafka stream never ends");
            match next {
                Ok(message) => {
                    if !at_end.is_empty() {
                        at_end.remove(&message.partition());
                    }
                    if records.len() == first_room {
                        records.reserve_exact(max - first_room);
                    }
                    records.push(StoredRecord {
                        topic: topic.clone(),
                        partition: message.partition(),
                        offset: message.offset(),
                        timestamp_ms: message.timestamp().to_millis().unwrap_or(0),
                        key: message.key().map(|key| copies.copy(key)),
                        value: copies.copy(message.payload().unwrap_or_default()),
                    });
                }
                Err(KafkaError::PartitionEOF(p)) => {
                    at_end.insert(p);
                    recount(consumer, *grouped, recounted, partitions);
                    if all_at_end(at_end, *partitions) && records.is_empty() {
                        drop(stream);
                        return Ok(Polled {
                            records,
                            caught_up: true,
                            reassigned: self.reassigned(),
                        });
                    }
                }
                Err(e) => {
                    return Err(ReadError {
                        topic: topic.to_string(),
                        reason: e.to_string(),
                    });
                }
            }
        }
        drop(stream);
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
                    topic: self.topic.to_string(),
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
                topic: self.topic.to_string(),
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
        // time, blocking the runner for a round trip each.
        self.consumer
            .context()
            .high_watermarks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&partition)
            .copied()
    }
}
