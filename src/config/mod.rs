//! The one typed configuration of a Traitline process.
//!
//! Every setting is resolved in one order: built-in defaults, then the TOML
//! file (`traitline.toml`, or `--config`), then `TRAITLINE_*` environment
//! variables, then command-line flags. Flags and environment come through
//! clap (which already prefers a flag over its variable); the file fills
//! what neither set. [`Config::resolve`] validates the result once, at
//! start-up, and every error names the setting the user has to fix.
//!
//! [`settings`] holds the settings as given, [`validation`] turns them into
//! a [`Config`], and [`kafka`] the Kafka client settings.

mod kafka;
mod settings;
mod validation;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use kafka::{KafkaSettings, is_secret_option};
pub use settings::Settings;
pub use validation::ConfigError;

/// Where events are stored.
#[derive(Debug, Clone)]
pub enum LogBackend {
    /// The durable log in `<data-dir>/log`, for one machine.
    Embedded,
    /// Apache Kafka (any Kafka-protocol broker).
    Kafka(KafkaSettings),
}

/// The stages a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub ingest: bool,
    pub process: bool,
    pub query: bool,
}

/// Request size limits of the ingest API, applied after decompression.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest single event (a single-event request, or one batch item).
    pub max_event_bytes: usize,
    /// Largest request body.
    pub max_batch_bytes: usize,
    /// Ingest requests being handled at once.
    pub max_in_flight: usize,
    /// Request body bytes being handled at once.
    pub max_in_flight_bytes: usize,
    /// Events a second per write key, and the burst above it; None: no limit.
    pub rate_limit: Option<RateLimit>,
    /// Failed authentications a client address may cause a minute.
    pub auth_failures_per_minute: Option<std::num::NonZeroU32>,
    /// Events a second per user before the overflow topic takes the rest.
    pub hot_user_events_per_second: Option<std::num::NonZeroU32>,
}

/// A per-key rate: `per_second` events a second on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_second: std::num::NonZeroU32,
    pub burst: std::num::NonZeroU32,
}

/// Keys as configured; an empty list means "generate and keep in the data
/// directory".
#[derive(Debug, Clone, Default)]
pub struct KeySettings {
    pub write: Vec<String>,
    pub read: Vec<String>,
    pub admin: Vec<String>,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The validated configuration of a process.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub log: LogBackend,
    pub database_url: Option<String>,
    pub topic_prefix: String,
    /// The start of the processors' Kafka consumer group names.
    pub kafka_group: String,
    pub partitions: i32,
    pub keys: KeySettings,
    pub roles: Roles,
    pub limits: Limits,
    pub append_timeout: Duration,
    /// How far two instances' clocks may differ.
    pub clock_skew: Duration,
    /// Longest graceful shutdown.
    pub shutdown_timeout: Duration,
    /// Most events a processor applies in one transaction.
    pub process_batch: usize,
    /// Profile states kept in memory between batches.
    pub profile_cache: usize,
    /// How long the `events` table keeps an event.
    pub events_retention: Duration,
    /// How long closed metric windows are kept after they end.
    pub metric_windows_retention: Duration,
    /// Bytes of open window state the metric runners keep in memory.
    pub metric_state_budget: usize,
    /// How long delivery attempts are kept.
    pub delivery_attempts_retention: Duration,
    pub log_format: LogFormat,
    /// Where spans are exported, when they are.
    pub otlp: Option<Otlp>,
    /// Where profile snapshots are kept.
    pub snapshot_dir: PathBuf,
    /// How often the process role takes a snapshot; `None`: never.
    pub snapshot_interval: Option<Duration>,
    /// The `[[metrics]]` of the configuration file, each checked, by name.
    pub metrics: Vec<(String, crate::definitions::MetricDefinition)>,
    /// The `[[rules]]` of the configuration file, each checked, by name.
    pub rules: Vec<(String, crate::definitions::RuleDefinition)>,
    /// The `[[destinations]]` of the configuration file, each checked.
    pub destinations: Vec<(String, crate::definitions::DestinationDefinition)>,
    /// Destinations may deliver to private and loopback addresses.
    pub destinations_allow_private: bool,
}

/// OTLP span export.
#[derive(Debug, Clone, PartialEq)]
pub struct Otlp {
    /// The full URL spans are posted to.
    pub traces_url: String,
    /// Share of root traces sampled.
    pub sample_ratio: f64,
}

/// The default name of the configuration file, read when present.
pub const DEFAULT_CONFIG_FILE: &str = "traitline.toml";
