//! Reading a topic: every partition, or a consumer group's share.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt};
use rdkafka::bindings as rd;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::Notify;

use super::base_config;
use super::fetch::{FetchQueue, Fetched};
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
    /// Where the partitions' fetched messages go (see [`super::fetch`]):
    /// here, so that a rebalance can split off the partitions it assigns
    /// before their fetching starts. Taken out when the reader is
    /// dropped, before the consumer.
    fetch: Mutex<Option<FetchQueue>>,
}

impl ReaderContext {
    /// Sends `partitions`' fetched messages to the fetch queue.
    fn split(&self, client: *mut rd::rd_kafka_t, partitions: &TopicPartitionList) {
        if let Some(fetch) = &*self.fetch.lock().unwrap_or_else(|e| e.into_inner()) {
            for p in partitions.elements() {
                fetch.split(client, p.topic(), p.partition());
            }
        }
    }
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
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            self.split(consumer.client().native_ptr(), list);
        }
    }

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
        fetch: Mutex::new(None),
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
    let consumer: StreamConsumer<ReaderContext> = config
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
    let fetch = FetchQueue::new(consumer.client().native_ptr());
    *consumer
        .context()
        .fetch
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(fetch);
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
            .context()
            .split(consumer.client().native_ptr(), &assignment);
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

impl Drop for KafkaReader {
    fn drop(&mut self) {
        // librdkafka's queues go before their consumer.
        self.consumer
            .context()
            .fetch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

/// What one poll gathers, from either queue.
struct Gathered<'a> {
    records: Vec<StoredRecord>,
    max: usize,
    /// The records' first room (see [`KafkaReader::poll`]).
    first_room: usize,
    topic: &'a Arc<str>,
    at_end: &'a mut HashSet<i32>,
    copies: &'a mut Copies,
    /// A partition reached its end: count the partitions again.
    ended: bool,
    failed: Option<KafkaError>,
}

impl Gathered<'_> {
    fn full(&self) -> bool {
        self.records.len() >= self.max || self.failed.is_some()
    }

    fn record(
        &mut self,
        partition: i32,
        offset: i64,
        timestamp_ms: i64,
        key: Option<&[u8]>,
        value: &[u8],
    ) {
        if !self.at_end.is_empty() {
            self.at_end.remove(&partition);
        }
        if self.records.len() == self.first_room {
            self.records.reserve_exact(self.max - self.first_room);
        }
        let key = key.map(|key| self.copies.copy(key));
        self.records.push(StoredRecord {
            topic: self.topic.clone(),
            partition,
            offset,
            timestamp_ms,
            key,
            value: self.copies.copy(value),
        });
    }

    fn ended(&mut self, partition: i32) {
        self.at_end.insert(partition);
        self.ended = true;
    }

    /// One item of the consumer queue's stream.
    fn polled(&mut self, next: Option<Result<BorrowedMessage<'_>, KafkaError>>) {
        match next.expect("a Kafka stream never ends") {
            Ok(message) => self.record(
                message.partition(),
                message.offset(),
                message.timestamp().to_millis().unwrap_or(0),
                message.key(),
                message.payload().unwrap_or_default(),
            ),
            Err(KafkaError::PartitionEOF(p)) => self.ended(p),
            Err(e) => {
                self.failed.get_or_insert(e);
            }
        }
    }

    /// One message of the fetch queue.
    fn fetched(&mut self, fetched: Fetched<'_>) {
        match fetched {
            Fetched::Record {
                partition,
                offset,
                timestamp_ms,
                key,
                value,
            } => self.record(partition, offset, timestamp_ms, key, value),
            Fetched::End(p) => self.ended(p),
            Fetched::Failed(e) => {
                self.failed.get_or_insert(e);
            }
        }
    }
}

/// Until `arrivals` is notified; never without a fetch queue.
async fn arrival(arrivals: Option<&Notify>) {
    match arrivals {
        Some(arrivals) => arrivals.notified().await,
        None => std::future::pending().await,
    }
}

#[async_trait]
impl LogReader for KafkaReader {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Polled, ReadError> {
        let deadline = tokio::time::Instant::now() + wait;
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
        // Room for a few thousand records, which a poll of a quiet log
        // rarely fills; one that fills it is reading a backlog, and takes
        // room for the whole batch at once rather than regrowing (and
        // copying what it holds) three or four times.
        let first_room = max.min(4096);
        let mut gathered = Gathered {
            records: Vec::with_capacity(first_room),
            max,
            first_room,
            topic,
            at_end,
            copies,
            ended: false,
            failed: None,
        };
        let context = consumer.context().clone();
        let arrivals = context
            .fetch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(FetchQueue::arrivals);
        // One stream for the whole poll: `recv` makes one a record, and
        // registering its waker and dropping it took a lock each time.
        let mut stream = consumer.stream();
        loop {
            // Take what is there, without a timer (a timer a record costs a
            // twentieth of a metric runner's CPU): the consumer queue (a
            // rebalance, an error, a partition not split off) and the
            // fetch queue, until neither has more or the batch is full.
            // Batches grow with the backlog instead of every record
            // waiting out the window.
            loop {
                let mut taken = 0;
                while !gathered.full() {
                    let Some(next) = stream.next().now_or_never() else {
                        break;
                    };
                    gathered.polled(next);
                    taken += 1;
                }
                if !gathered.full()
                    && let Some(fetch) = context
                        .fetch
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_mut()
                {
                    let room = gathered.max - gathered.records.len();
                    taken += fetch.take(room, |fetched| gathered.fetched(fetched));
                }
                if taken == 0 || gathered.full() {
                    break;
                }
            }
            if let Some(e) = gathered.failed.take() {
                return Err(ReadError {
                    topic: topic.to_string(),
                    reason: e.to_string(),
                });
            }
            // A poll that sees the last partition reach its end says so at
            // once; one that finds them all there already waits for a
            // record (else a caught-up reader's caller spins).
            if std::mem::take(&mut gathered.ended) {
                recount(consumer, *grouped, recounted, partitions);
                if all_at_end(gathered.at_end, *partitions) {
                    break;
                }
            }
            if !gathered.records.is_empty() {
                break;
            }
            // Nothing yet: wait (up to `wait`) for the first record.
            tokio::select! {
                biased;
                next = stream.next() => gathered.polled(next),
                () = arrival(arrivals.as_deref()) => {}
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        drop(stream);
        let records = gathered.records;
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

#[cfg(test)]
mod tests {
    use super::Copies;

    #[test]
    fn copies_keep_every_record_whole_across_buffers() {
        let mut copies = Copies::default();
        // Sizes that fill buffers unevenly, an empty one, and one larger
        // than a buffer.
        let sizes = [
            0,
            1,
            1_500,
            700_000,
            400_000,
            Copies::CHUNK + 3,
            10,
            1_048_000,
        ];
        let originals: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| (0..size).map(|b| (b * 31 + i) as u8).collect())
            .collect();
        let copied: Vec<_> = originals.iter().map(|o| copies.copy(o)).collect();
        for (original, copy) in originals.iter().zip(&copied) {
            assert_eq!(&copy[..], &original[..]);
        }
        // A copy outlives the copier and the buffers after it.
        drop(copies);
        assert_eq!(&copied[3][..], &originals[3][..]);
    }

    #[test]
    fn a_detached_record_holds_its_own_bytes_not_the_readers_buffer() {
        let mut copies = Copies::default();
        let record = crate::log::StoredRecord {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            timestamp_ms: 0,
            key: Some(copies.copy(b"user-1")),
            value: copies.copy(b"{\"type\":\"track\"}"),
        };
        let neighbour = copies.copy(b"the next record");
        assert!(!record.value.is_unique(), "the buffer is shared");
        let detached = record.clone().detached();
        assert_eq!(detached, record);
        assert!(detached.value.is_unique());
        assert!(detached.key.as_ref().is_some_and(bytes::Bytes::is_unique));
        drop((record, neighbour, copies));
    }
}
