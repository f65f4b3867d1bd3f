//! The event log: where accepted events are stored before anything else
//! happens to them.
//!
//! Two implementations sit behind [`EventLog`] and pass one test suite:
//! [`kafka::KafkaLog`] for production and [`embedded::EmbeddedLog`], a
//! durable append-only log in the data directory, for one machine. Both
//! place a keyed record on partition `murmur2(key) % partitions`
//! ([`partitioner`]), so a user's events keep their order and land on the
//! same partition number in either.

pub mod embedded;
pub mod kafka;
pub mod partitioner;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::config::{Config, LogBackend};

/// One record to append: an optional key (which picks the partition) and
/// the value bytes. An empty value is a tombstone (in Kafka a null
/// payload: a compacted topic then forgets the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: Option<String>,
    pub value: Vec<u8>,
}

/// A record read back from the log, with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Shared by every record a reader reads.
    pub topic: std::sync::Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// Milliseconds since the Unix epoch when the log stored the record.
    pub timestamp_ms: i64,
    /// Key and value share their buffer with the records read with them
    /// ([`bytes::Bytes`]): a reader copies a poll's records into a few
    /// large buffers, not two allocations a record.
    pub key: Option<bytes::Bytes>,
    pub value: bytes::Bytes,
}

impl StoredRecord {
    /// The record with its key and value in allocations of their own, for
    /// one kept after its batch (a delivery waiting out its destination):
    /// a slice of a reader's buffer keeps the whole buffer alive.
    pub fn detached(self) -> StoredRecord {
        StoredRecord {
            key: self.key.map(|key| bytes::Bytes::copy_from_slice(&key)),
            value: bytes::Bytes::copy_from_slice(&self.value),
            ..self
        }
    }
}

/// Why an append failed. Nothing in a failed append may be acknowledged to
/// a client; some of its records may still be stored (a retry is then
/// deduplicated by message id downstream).
#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendError {
    /// The log could not take the write now; retrying later may succeed.
    #[error("the event log is unavailable: {0}")]
    Unavailable(String),
    /// The log did not confirm the write within the configured bound.
    #[error("the event log did not confirm the write within {0:?}")]
    TimedOut(Duration),
    /// The log refused the records for good (retrying will not help).
    #[error("the event log refused the write: {0}")]
    Rejected(String),
}

impl AppendError {
    /// True when the client should retry later (503), false when the
    /// request itself can never be stored.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, AppendError::Rejected(_))
    }
}

/// An event log that accepts appends.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Appends `records` to `topic` and returns once every one of them is
    /// durable (Kafka: acknowledged by all in-sync replicas; embedded:
    /// fsync'd). Records with the same key keep their order.
    async fn append(&self, topic: &str, records: Vec<Record>) -> Result<(), AppendError>;

    /// Whether the log can take writes now; the error says why not.
    async fn check_ready(&self) -> Result<(), String>;

    /// Writes out everything accepted so far and stops taking appends.
    async fn close(&self, deadline: Duration);

    /// A one-line description for start-up messages.
    fn describe(&self) -> String;
}

/// Where a reader starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest stored record of every partition.
    Beginning,
    /// After the newest record: only records appended from now on.
    End,
}

/// What one [`LogReader::poll`] got.
#[derive(Debug, Default)]
pub struct Polled {
    pub records: Vec<StoredRecord>,
    /// True when the reader had reached the end of every partition.
    pub caught_up: bool,
    /// True when the partitions this reader is given changed since the
    /// last poll (a consumer-group rebalance): nothing remembered about
    /// where they are can be trusted.
    pub reassigned: bool,
}

/// Reads a topic's records across all its partitions, in offset order
/// within each partition.
#[async_trait]
pub trait LogReader: Send {
    /// Returns up to `max` records, waiting at most `wait` when none is
    /// there yet.
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Polled, ReadError>;

    /// Moves `partition` so the next record read from it is the first at or
    /// after `offset` (`None`: the oldest stored). Records of the partition
    /// already read but not yet returned are dropped.
    fn seek(&mut self, partition: i32, offset: Option<i64>) -> Result<(), ReadError>;

    /// The partitions this reader reads now: a consumer group's share, or
    /// every partition (none while they are not known yet).
    fn assigned(&self) -> Vec<i32> {
        Vec::new()
    }

    /// Tells the log how far a consumer has durably got (Kafka: the
    /// consumer group's committed offsets), best effort: the store's
    /// offsets are the truth, this only makes a restart start closer.
    fn note_committed(&mut self, _partition: i32, _next: i64) {}

    /// The offset the next record appended to `partition` will get, when
    /// known; with the processed position, the partition's lag. May ask
    /// the broker (a short blocking call): call it now and then.
    fn high_watermark(&self, _partition: i32) -> Option<i64> {
        None
    }
}

/// A reader that cannot go on.
#[derive(Debug, thiserror::Error)]
#[error("cannot read topic {topic}: {reason}")]
pub struct ReadError {
    pub topic: String,
    pub reason: String,
}

/// The full names of Traitline's topics, under the configured prefix.
#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: &str) -> Topics {
        Topics {
            prefix: prefix.to_owned(),
        }
    }

    /// Every accepted event, one envelope each, keyed by user.
    pub fn events(&self) -> String {
        format!("{}user_events", self.prefix)
    }

    /// Events of users over `hot-user-events-per-second`, processed by a
    /// runner of their own so one hot user cannot lag a partition that
    /// other users share (PostHog's overflow).
    pub fn overflow(&self) -> String {
        self.named("user_events_overflow")
    }

    /// The full name of a topic given by its short name (`user_events`).
    pub fn named(&self, short: &str) -> String {
        format!("{}{short}", self.prefix)
    }

    /// Records a processor could not handle, with the reason.
    pub fn rejected(&self) -> String {
        self.named("user_events_rejected")
    }

    /// The latest snapshot of each profile; a tombstone on delete.
    pub fn profiles(&self) -> String {
        self.named("user_profiles")
    }

    /// One record per profile change.
    pub fn profile_changes(&self) -> String {
        self.named("user_profile_changes")
    }

    /// Each closed window of a metric, once (key: metric and group).
    pub fn metrics(&self) -> String {
        self.named("user_metrics")
    }

    /// Events that came after a window they belong to closed, with the
    /// metric, the window and how late (key: metric and group).
    pub fn late(&self) -> String {
        self.named("user_events_late")
    }

    /// Each match of a pattern rule (key: rule and key).
    pub fn alerts(&self) -> String {
        self.named("user_alerts")
    }

    /// Each delivery attempt's outcome (key: destination and the
    /// record's key).
    pub fn deliveries(&self) -> String {
        self.named("user_deliveries")
    }

    /// Every topic Traitline writes, and whether Kafka should compact it
    /// (keep only the latest record of a key).
    pub fn all(&self) -> Vec<(String, bool)> {
        vec![
            (self.events(), false),
            (self.overflow(), false),
            (self.rejected(), false),
            (self.profiles(), true),
            (self.profile_changes(), false),
            (self.metrics(), false),
            (self.late(), false),
            (self.alerts(), false),
            (self.deliveries(), false),
        ]
    }
}

/// Why a log could not be opened at start-up.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Embedded(#[from] embedded::EmbeddedError),
    #[error(transparent)]
    Kafka(#[from] kafka::KafkaSetupError),
}

/// Opens the log the configuration names, ready to append to the events
/// topic (created when missing).
pub async fn open(config: &Config) -> Result<Arc<dyn EventLog>, OpenError> {
    let topics = Topics::new(&config.topic_prefix);
    match &config.log {
        LogBackend::Embedded => {
            let log = embedded::EmbeddedLog::open(
                &config.data_dir.join("log"),
                config.partitions,
                &topics
                    .all()
                    .into_iter()
                    .map(|(name, _)| name)
                    .collect::<Vec<_>>(),
            )?;
            Ok(Arc::new(log))
        }
        LogBackend::Kafka(settings) => {
            let log = kafka::KafkaLog::connect(
                settings,
                config.partitions,
                &topics.all(),
                config.append_timeout,
            )
            .await?;
            Ok(Arc::new(log))
        }
    }
}

/// Opens a reader of `topic` for the configured log. It does not take the
/// embedded log's writer lock, so it works beside a running service.
pub fn open_reader(
    config: &Config,
    topic: &str,
    start: StartAt,
) -> Result<Box<dyn LogReader>, ReadError> {
    match &config.log {
        LogBackend::Embedded => Ok(Box::new(embedded::EmbeddedReader::open(
            &config.data_dir.join("log"),
            topic,
            start,
        )?)),
        LogBackend::Kafka(settings) => {
            Ok(Box::new(kafka::KafkaReader::open(settings, topic, start)?))
        }
    }
}
