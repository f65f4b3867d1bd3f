//! The one typed configuration of a Traitline process.
//!
//! Every setting is resolved in one order: built-in defaults, then the TOML
//! file (`traitline.toml`, or `--config`), then `TRAITLINE_*` environment
//! variables, then command-line flags. Flags and environment come through
//! clap (which already prefers a flag over its variable); the file fills
//! what neither set. [`Config::resolve`] validates the result once, at
//! start-up, and every error names the setting the user has to fix.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

/// Settings as given by flags, environment or file, before defaults apply.
///
/// The same struct is parsed by clap (flags and `TRAITLINE_*` variables) and
/// by serde (the TOML file, whose keys are the flag names without `--`), so
/// a setting has exactly one name everywhere.
#[derive(Args, Deserialize, Debug, Default, Clone)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Settings {
    /// Address the HTTP API listens on [default: 127.0.0.1:8080]
    #[arg(long, env = "TRAITLINE_LISTEN", global = true)]
    pub listen: Option<String>,

    /// Directory for the embedded log, the generated keys and (later) the
    /// SQLite store [default: ./traitline-data]
    #[arg(long, env = "TRAITLINE_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,

    /// Kafka bootstrap servers (host:port,...). Unset: the embedded log in
    /// the data directory is used instead of Kafka
    #[arg(long, env = "TRAITLINE_KAFKA_BROKERS", global = true)]
    pub kafka_brokers: Option<String>,

    /// PostgreSQL URL for the stores. Unset: SQLite in the data directory
    #[arg(long, env = "TRAITLINE_DATABASE_URL", global = true)]
    pub database_url: Option<String>,

    /// Prefix put before every topic name (`user_events` becomes
    /// `<prefix>user_events`) [default: empty]
    #[arg(long, env = "TRAITLINE_TOPIC_PREFIX", global = true)]
    pub topic_prefix: Option<String>,

    /// Kafka consumer group name the processors' groups start with
    /// (`<group>-profiles`, `<group>-profiles_overflow`). Instances with one
    /// database share it; a deployment with a database of its own reading
    /// the same topics needs its own [default: <topic-prefix>traitline]
    #[arg(long, env = "TRAITLINE_KAFKA_GROUP", global = true)]
    pub kafka_group: Option<String>,

    /// Partitions of a topic Traitline creates (Kafka or embedded)
    /// [default: 8]
    #[arg(long, env = "TRAITLINE_PARTITIONS", global = true)]
    pub partitions: Option<i32>,

    /// Write keys that may send events, comma-separated. Unset: one is
    /// generated on first start and saved in the data directory
    #[arg(
        long,
        env = "TRAITLINE_WRITE_KEYS",
        value_delimiter = ',',
        global = true
    )]
    pub write_keys: Option<Vec<String>>,

    /// Read keys for the query API, comma-separated. Unset: generated
    #[arg(
        long,
        env = "TRAITLINE_READ_KEYS",
        value_delimiter = ',',
        global = true
    )]
    pub read_keys: Option<Vec<String>>,

    /// Admin keys (may also delete), comma-separated. Unset: generated
    #[arg(
        long,
        env = "TRAITLINE_ADMIN_KEYS",
        value_delimiter = ',',
        global = true
    )]
    pub admin_keys: Option<Vec<String>>,

    /// Stages this process runs, comma-separated from ingest, process, query
    /// [default: ingest,process,query]
    #[arg(long, env = "TRAITLINE_ROLES", value_delimiter = ',', global = true)]
    pub roles: Option<Vec<String>>,

    /// Largest accepted event, in bytes after decompression [default: 32768]
    #[arg(long, env = "TRAITLINE_MAX_EVENT_BYTES", global = true)]
    pub max_event_bytes: Option<usize>,

    /// Largest accepted request body (a batch), in bytes after
    /// decompression [default: 512000]
    #[arg(long, env = "TRAITLINE_MAX_BATCH_BYTES", global = true)]
    pub max_batch_bytes: Option<usize>,

    /// How long a request may wait for the log to store its events before
    /// it is answered 503, in milliseconds [default: 5000]
    #[arg(long, env = "TRAITLINE_APPEND_TIMEOUT_MS", global = true)]
    pub append_timeout_ms: Option<u64>,

    /// How far the clocks of two instances may differ, in milliseconds.
    /// With the append timeout it bounds how late a record stamped
    /// earlier can still reach a partition, so a quiet partition's time
    /// (which closes windows) moves to the wall clock less both
    /// [default: 2000]
    #[arg(long, env = "TRAITLINE_CLOCK_SKEW_MS", global = true)]
    pub clock_skew_ms: Option<u64>,

    /// Longest graceful shutdown after SIGTERM or Ctrl-C, in seconds: past
    /// it the process exits with status 1 and work in flight is left to
    /// the log (read again on restart) [default: 30]
    #[arg(long, env = "TRAITLINE_SHUTDOWN_TIMEOUT_SECS", global = true)]
    pub shutdown_timeout_secs: Option<u64>,

    /// Ingest requests in flight at once; past it requests get 503 at once
    /// instead of queueing without bound [default: 2048]
    #[arg(long, env = "TRAITLINE_MAX_IN_FLIGHT", global = true)]
    pub max_in_flight: Option<usize>,

    /// Request body bytes being handled at once (a gzip body or one without
    /// Content-Length counts as its route's size limit); past it requests
    /// get 503 at once. Bounds memory under overload [default: 33554432]
    #[arg(long, env = "TRAITLINE_MAX_IN_FLIGHT_BYTES", global = true)]
    pub max_in_flight_bytes: Option<usize>,

    /// Events a second each write key may send, averaged; past it requests
    /// get 429 with Retry-After. 0 turns the limit off [default: 0]
    #[arg(long, env = "TRAITLINE_RATE_LIMIT_EVENTS", global = true)]
    pub rate_limit_events: Option<u32>,

    /// Events a write key may send at once above its rate (a request larger
    /// than this is refused with 429) [default: the rate, one second's worth]
    #[arg(long, env = "TRAITLINE_RATE_LIMIT_BURST", global = true)]
    pub rate_limit_burst: Option<u32>,

    /// Events a second one user may send before the excess goes to the
    /// overflow topic (processed apart, never dropped). 0 turns it off
    /// [default: 1000]
    #[arg(long, env = "TRAITLINE_HOT_USER_EVENTS_PER_SECOND", global = true)]
    pub hot_user_events_per_second: Option<u32>,

    /// Failed authentications (401 answers) a client address may cause a
    /// minute; past it the address gets 429 with Retry-After on every route
    /// until its allowance refills. 0 turns the limit off [default: 60]
    #[arg(long, env = "TRAITLINE_AUTH_FAILURES_PER_MINUTE", global = true)]
    pub auth_failures_per_minute: Option<u32>,

    /// Replication factor of topics Traitline creates in Kafka; -1 takes the
    /// broker's default [default: -1]
    #[arg(
        long,
        env = "TRAITLINE_KAFKA_REPLICATION_FACTOR",
        global = true,
        allow_negative_numbers = true
    )]
    pub kafka_replication_factor: Option<i32>,

    /// Producer compression: none, gzip, snappy, lz4 or zstd [default: lz4]
    #[arg(long, env = "TRAITLINE_KAFKA_COMPRESSION", global = true)]
    pub kafka_compression: Option<String>,

    /// Producer linger (batching delay) in milliseconds [default: 5]
    #[arg(long, env = "TRAITLINE_KAFKA_LINGER_MS", global = true)]
    pub kafka_linger_ms: Option<u32>,

    /// Most messages the producer queues before sends wait (back-pressure)
    /// [default: 100000]
    #[arg(long, env = "TRAITLINE_KAFKA_QUEUE_MESSAGES", global = true)]
    pub kafka_queue_messages: Option<u32>,

    /// Kafka `security.protocol`: plaintext, ssl, sasl_plaintext or
    /// sasl_ssl [default: plaintext]
    #[arg(long, env = "TRAITLINE_KAFKA_SECURITY_PROTOCOL", global = true)]
    pub kafka_security_protocol: Option<String>,

    /// Kafka `sasl.mechanisms`: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512,
    /// GSSAPI or OAUTHBEARER
    #[arg(long, env = "TRAITLINE_KAFKA_SASL_MECHANISM", global = true)]
    pub kafka_sasl_mechanism: Option<String>,

    /// Kafka `sasl.username`
    #[arg(long, env = "TRAITLINE_KAFKA_SASL_USERNAME", global = true)]
    pub kafka_sasl_username: Option<String>,

    /// Kafka `sasl.password` (never logged; prefer the environment variable
    /// to a flag, which other users can see in the process list)
    #[arg(
        long,
        env = "TRAITLINE_KAFKA_SASL_PASSWORD",
        global = true,
        hide_env_values = true
    )]
    pub kafka_sasl_password: Option<String>,

    /// Kafka `ssl.ca.location`: the CA certificate file to trust
    #[arg(long, env = "TRAITLINE_KAFKA_SSL_CA_LOCATION", global = true)]
    pub kafka_ssl_ca_location: Option<String>,

    /// Extra librdkafka setting, `name=value`; repeatable (e.g.
    /// `security.protocol=SASL_SSL`)
    #[arg(
        long = "kafka-option",
        env = "TRAITLINE_KAFKA_OPTIONS",
        value_delimiter = ',',
        global = true
    )]
    pub kafka_options: Option<Vec<String>>,

    /// Most events the profile processor takes in one batch: one store
    /// transaction on SQLite, up to four (by partition) on PostgreSQL.
    /// Larger batches fold more of a user's events into one write of the
    /// profile; the processor's memory grows about 5 KB a batch event
    /// [default: 40000]
    #[arg(long, env = "TRAITLINE_PROCESS_BATCH", global = true)]
    pub process_batch: Option<usize>,

    /// Profiles whose state the profile processor keeps in memory between
    /// batches (least recently written go first), about 3.5 KB each; 0
    /// turns the cache off. A cached state is used only while the store
    /// still holds that very version of it [default: 20000]
    #[arg(long, env = "TRAITLINE_PROFILE_CACHE", global = true)]
    pub profile_cache: Option<usize>,

    /// Not a setting: a message id is remembered for as long as its event
    /// is stored (`events-retention-days`). Read only to refuse it, so a
    /// deployment that sets it learns that at start-up.
    #[arg(long, env = "TRAITLINE_DEDUP_WINDOW_HOURS", global = true, hide = true)]
    pub dedup_window_hours: Option<u64>,

    /// How long the `events` table keeps each event, in days. The stored
    /// events are also the record of applied message ids: a client's retry
    /// of an event is not counted again for as long [default: 90]
    #[arg(long, env = "TRAITLINE_EVENTS_RETENTION_DAYS", global = true)]
    pub events_retention_days: Option<u64>,

    /// Log format: text or json [default: text]
    #[arg(long, env = "TRAITLINE_LOG_FORMAT", global = true)]
    pub log_format: Option<String>,

    /// Directory of profile snapshots: `traitline snapshot` writes one,
    /// `traitline replay` and a process role starting on an empty store
    /// begin from the newest [default: <data-dir>/snapshots]
    #[arg(long, env = "TRAITLINE_SNAPSHOT_DIR", global = true)]
    pub snapshot_dir: Option<PathBuf>,

    /// Seconds between the snapshots a process role takes by itself (the
    /// newest three are kept), e.g. 3600; 0: only on demand [default: 0]
    #[arg(long, env = "TRAITLINE_SNAPSHOT_INTERVAL_SECS", global = true)]
    pub snapshot_interval_secs: Option<u64>,

    /// OpenTelemetry collector to export spans to over OTLP/HTTP
    /// (protobuf), as a base URL such as http://localhost:4318 (spans go to
    /// its /v1/traces); a URL with a path is used as it is. Unset: no export
    /// [default: off]
    #[arg(long, env = "TRAITLINE_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,

    /// Share of traces exported, from 0 to 1; a request carrying a W3C
    /// `traceparent` follows its caller's decision instead [default: 1]
    #[arg(long, env = "TRAITLINE_OTLP_SAMPLE_RATIO", global = true)]
    pub otlp_sample_ratio: Option<f64>,
}

impl Settings {
    /// Fills every setting this one leaves unset from `fallback`.
    fn or(self, fallback: Settings) -> Settings {
        Settings {
            listen: self.listen.or(fallback.listen),
            data_dir: self.data_dir.or(fallback.data_dir),
            kafka_brokers: self.kafka_brokers.or(fallback.kafka_brokers),
            database_url: self.database_url.or(fallback.database_url),
            topic_prefix: self.topic_prefix.or(fallback.topic_prefix),
            kafka_group: self.kafka_group.or(fallback.kafka_group),
            partitions: self.partitions.or(fallback.partitions),
            write_keys: self.write_keys.or(fallback.write_keys),
            read_keys: self.read_keys.or(fallback.read_keys),
            admin_keys: self.admin_keys.or(fallback.admin_keys),
            roles: self.roles.or(fallback.roles),
            max_event_bytes: self.max_event_bytes.or(fallback.max_event_bytes),
            max_batch_bytes: self.max_batch_bytes.or(fallback.max_batch_bytes),
            append_timeout_ms: self.append_timeout_ms.or(fallback.append_timeout_ms),
            clock_skew_ms: self.clock_skew_ms.or(fallback.clock_skew_ms),
            shutdown_timeout_secs: self
                .shutdown_timeout_secs
                .or(fallback.shutdown_timeout_secs),
            max_in_flight: self.max_in_flight.or(fallback.max_in_flight),
            max_in_flight_bytes: self.max_in_flight_bytes.or(fallback.max_in_flight_bytes),
            rate_limit_events: self.rate_limit_events.or(fallback.rate_limit_events),
            rate_limit_burst: self.rate_limit_burst.or(fallback.rate_limit_burst),
            auth_failures_per_minute: self
                .auth_failures_per_minute
                .or(fallback.auth_failures_per_minute),
            hot_user_events_per_second: self
                .hot_user_events_per_second
                .or(fallback.hot_user_events_per_second),
            process_batch: self.process_batch.or(fallback.process_batch),
            profile_cache: self.profile_cache.or(fallback.profile_cache),
            dedup_window_hours: self.dedup_window_hours.or(fallback.dedup_window_hours),
            events_retention_days: self
                .events_retention_days
                .or(fallback.events_retention_days),
            kafka_replication_factor: self
                .kafka_replication_factor
                .or(fallback.kafka_replication_factor),
            kafka_compression: self.kafka_compression.or(fallback.kafka_compression),
            kafka_linger_ms: self.kafka_linger_ms.or(fallback.kafka_linger_ms),
            kafka_queue_messages: self.kafka_queue_messages.or(fallback.kafka_queue_messages),
            kafka_options: self.kafka_options.or(fallback.kafka_options),
            kafka_security_protocol: self
                .kafka_security_protocol
                .or(fallback.kafka_security_protocol),
            kafka_sasl_mechanism: self.kafka_sasl_mechanism.or(fallback.kafka_sasl_mechanism),
            kafka_sasl_username: self.kafka_sasl_username.or(fallback.kafka_sasl_username),
            kafka_sasl_password: self.kafka_sasl_password.or(fallback.kafka_sasl_password),
            kafka_ssl_ca_location: self
                .kafka_ssl_ca_location
                .or(fallback.kafka_ssl_ca_location),
            log_format: self.log_format.or(fallback.log_format),
            snapshot_dir: self.snapshot_dir.or(fallback.snapshot_dir),
            snapshot_interval_secs: self
                .snapshot_interval_secs
                .or(fallback.snapshot_interval_secs),
            otlp_endpoint: self.otlp_endpoint.or(fallback.otlp_endpoint),
            otlp_sample_ratio: self.otlp_sample_ratio.or(fallback.otlp_sample_ratio),
        }
    }
}

/// A configuration that cannot be used; the message names the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid setting `{setting}` (flag --{setting}, environment {env}): {reason}")]
    Invalid {
        setting: &'static str,
        env: String,
        reason: String,
    },
    #[error("cannot read the configuration file {path}: {reason}")]
    File { path: PathBuf, reason: String },
}

fn invalid(setting: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        env: format!("TRAITLINE_{}", setting.replace('-', "_").to_uppercase()),
        reason: reason.into(),
    }
}

/// Checks the OTLP settings: an http(s) URL, and a ratio from 0 to 1.
fn otlp(endpoint: Option<&str>, ratio: Option<f64>) -> Result<Option<Otlp>, ConfigError> {
    let sample_ratio = ratio.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&sample_ratio) {
        return Err(invalid(
            "otlp-sample-ratio",
            format!("{sample_ratio} is not between 0 and 1"),
        ));
    }
    let Some(endpoint) = endpoint.map(str::trim).filter(|e| !e.is_empty()) else {
        return Ok(None);
    };
    let url = reqwest::Url::parse(endpoint)
        .ok()
        .filter(|url| matches!(url.scheme(), "http" | "https") && url.has_host())
        .ok_or_else(|| {
            invalid(
                "otlp-endpoint",
                format!("`{endpoint}` is not an http(s) URL such as http://localhost:4318"),
            )
        })?;
    let traces_url = if url.path() == "/" {
        format!("{}/v1/traces", endpoint.trim_end_matches('/'))
    } else {
        endpoint.to_owned()
    };
    Ok(Some(Otlp {
        traces_url,
        sample_ratio,
    }))
}

/// Where events are stored.
#[derive(Debug, Clone)]
pub enum LogBackend {
    /// The durable log in `<data-dir>/log`, for one machine.
    Embedded,
    /// Apache Kafka (any Kafka-protocol broker).
    Kafka(KafkaSettings),
}

/// Producer and admin settings for Kafka, each next to its librdkafka name.
/// Its `Debug` hides the values of secret options.
#[derive(Clone)]
pub struct KafkaSettings {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Replication of created topics; -1 asks the broker's default.
    pub replication_factor: i32,
    /// `compression.type` (librdkafka default: none).
    pub compression: String,
    /// `linger.ms` (librdkafka default: 5).
    pub linger_ms: u32,
    /// `queue.buffering.max.messages` (librdkafka default: 100000).
    pub queue_messages: u32,
    /// Any other librdkafka setting, passed through unchanged.
    pub options: Vec<(String, String)>,
}

/// Whether a librdkafka setting holds a secret (`sasl.password`,
/// `ssl.key.password`, `sasl.oauthbearer.client.secret`, `ssl.key.pem`...).
pub fn is_secret_option(name: &str) -> bool {
    ["password", "secret", "ssl.key.pem", "ssl_key", "keystore"]
        .iter()
        .any(|s| name.to_ascii_lowercase().contains(s))
}

/// A `name=value` option as it may be shown: the value of a secret hidden.
fn redacted_option(option: &str) -> String {
    match option.split_once('=') {
        Some((name, _)) if is_secret_option(name) => format!("{name}=***"),
        _ if is_secret_option(option) => "***".to_owned(),
        _ => option.to_owned(),
    }
}

impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let options: Vec<(&str, &str)> = self
            .options
            .iter()
            .map(|(name, value)| {
                let shown = if is_secret_option(name) { "***" } else { value };
                (name.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("replication_factor", &self.replication_factor)
            .field("compression", &self.compression)
            .field("linger_ms", &self.linger_ms)
            .field("queue_messages", &self.queue_messages)
            .field("options", &options)
            .finish()
    }
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
    pub log_format: LogFormat,
    /// Where spans are exported, when they are.
    pub otlp: Option<Otlp>,
    /// Where profile snapshots are kept.
    pub snapshot_dir: PathBuf,
    /// How often the process role takes a snapshot; `None`: never.
    pub snapshot_interval: Option<Duration>,
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

impl Config {
    /// Resolves flags and environment (`cli`), the configuration file and
    /// the defaults into a validated configuration.
    ///
    /// `config_file` is the `--config` setting: a file named there must
    /// exist; without it `traitline.toml` is read only when present.
    pub fn resolve(cli: Settings, config_file: Option<&Path>) -> Result<Config, ConfigError> {
        let file = match config_file {
            Some(path) => read_file(path)?,
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
                read_file(Path::new(DEFAULT_CONFIG_FILE))?
            }
            None => Settings::default(),
        };
        Config::from_settings(cli.or(file))
    }

    /// Applies defaults to `s` and validates every setting.
    pub fn from_settings(s: Settings) -> Result<Config, ConfigError> {
        let listen_text = s.listen.unwrap_or_else(|| "127.0.0.1:8080".to_owned());
        let listen = listen_text.parse().map_err(|_| {
            invalid(
                "listen",
                format!("`{listen_text}` is not an address like 127.0.0.1:8080"),
            )
        })?;

        let data_dir = s
            .data_dir
            .unwrap_or_else(|| PathBuf::from("./traitline-data"));
        if data_dir.as_os_str().is_empty() {
            return Err(invalid("data-dir", "must not be empty"));
        }

        let partitions = s.partitions.unwrap_or(8);
        if !(1..=10_000).contains(&partitions) {
            return Err(invalid(
                "partitions",
                format!("{partitions} is out of range; use 1 to 10000"),
            ));
        }

        let topic_prefix = s.topic_prefix.unwrap_or_default();
        if !topic_prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            || topic_prefix.len() > 200
        {
            return Err(invalid(
                "topic-prefix",
                format!(
                    "`{topic_prefix}`: a Kafka topic name allows only a-z, A-Z, 0-9, `.`, `_` and `-`"
                ),
            ));
        }

        let kafka_group = match s.kafka_group.filter(|g| !g.trim().is_empty()) {
            None => format!("{topic_prefix}traitline"),
            Some(group) if group.len() <= 200 && !group.chars().any(char::is_control) => group,
            Some(group) => {
                return Err(invalid(
                    "kafka-group",
                    format!("`{group}`: use up to 200 characters, none of them control characters"),
                ));
            }
        };

        let log = match s.kafka_brokers.filter(|b| !b.trim().is_empty()) {
            None => LogBackend::Embedded,
            Some(brokers) => LogBackend::Kafka(kafka_settings(
                brokers,
                s.kafka_replication_factor,
                s.kafka_compression,
                s.kafka_linger_ms,
                s.kafka_queue_messages,
                s.kafka_options,
                [
                    (
                        "kafka-security-protocol",
                        "security.protocol",
                        s.kafka_security_protocol,
                    ),
                    (
                        "kafka-sasl-mechanism",
                        "sasl.mechanisms",
                        s.kafka_sasl_mechanism,
                    ),
                    (
                        "kafka-sasl-username",
                        "sasl.username",
                        s.kafka_sasl_username,
                    ),
                    (
                        "kafka-sasl-password",
                        "sasl.password",
                        s.kafka_sasl_password,
                    ),
                    (
                        "kafka-ssl-ca-location",
                        "ssl.ca.location",
                        s.kafka_ssl_ca_location,
                    ),
                ],
            )?),
        };

        let keys = KeySettings {
            write: key_list("write-keys", s.write_keys)?,
            read: key_list("read-keys", s.read_keys)?,
            admin: key_list("admin-keys", s.admin_keys)?,
        };

        let roles = roles(s.roles)?;

        let limits = Limits {
            max_event_bytes: s.max_event_bytes.unwrap_or(32 * 1024),
            max_batch_bytes: s.max_batch_bytes.unwrap_or(500 * 1024),
            max_in_flight: s.max_in_flight.unwrap_or(2048),
            max_in_flight_bytes: s.max_in_flight_bytes.unwrap_or(32 * 1024 * 1024),
            auth_failures_per_minute: std::num::NonZeroU32::new(
                s.auth_failures_per_minute.unwrap_or(60),
            ),
            hot_user_events_per_second: std::num::NonZeroU32::new(
                s.hot_user_events_per_second.unwrap_or(1000),
            ),
            rate_limit: match std::num::NonZeroU32::new(s.rate_limit_events.unwrap_or(0)) {
                None => None,
                Some(per_second) => Some(RateLimit {
                    per_second,
                    burst: match s.rate_limit_burst {
                        None => per_second,
                        Some(burst) => std::num::NonZeroU32::new(burst)
                            .ok_or_else(|| invalid("rate-limit-burst", "must be at least 1"))?,
                    },
                }),
            },
        };
        if limits.max_event_bytes < 256 {
            return Err(invalid("max-event-bytes", "must be at least 256"));
        }
        if limits.max_batch_bytes < limits.max_event_bytes {
            return Err(invalid(
                "max-batch-bytes",
                format!(
                    "{} is smaller than max-event-bytes ({})",
                    limits.max_batch_bytes, limits.max_event_bytes
                ),
            ));
        }
        if limits.max_in_flight == 0 {
            return Err(invalid("max-in-flight", "must be at least 1"));
        }
        if limits.max_in_flight_bytes < limits.max_batch_bytes {
            return Err(invalid(
                "max-in-flight-bytes",
                format!(
                    "{} is smaller than max-batch-bytes ({}): no batch could ever be taken",
                    limits.max_in_flight_bytes, limits.max_batch_bytes
                ),
            ));
        }

        let shutdown_timeout = match s.shutdown_timeout_secs.unwrap_or(30) {
            0 => return Err(invalid("shutdown-timeout-secs", "must be at least 1")),
            secs => Duration::from_secs(secs),
        };
        let clock_skew_ms = s.clock_skew_ms.unwrap_or(2000);
        if clock_skew_ms > 3_600_000 {
            return Err(invalid(
                "clock-skew-ms",
                format!("{clock_skew_ms} is out of range; use 0 to 3600000 (an hour)"),
            ));
        }
        let append_timeout_ms = s.append_timeout_ms.unwrap_or(5000);
        if !(10..=600_000).contains(&append_timeout_ms) {
            return Err(invalid(
                "append-timeout-ms",
                format!("{append_timeout_ms} is out of range; use 10 to 600000"),
            ));
        }

        let process_batch = s.process_batch.unwrap_or(40_000);
        if !(1..=100_000).contains(&process_batch) {
            return Err(invalid(
                "process-batch",
                format!("{process_batch} is out of range; use 1 to 100000"),
            ));
        }
        let profile_cache = s
            .profile_cache
            .unwrap_or(crate::store::DEFAULT_PROFILE_CACHE);
        if profile_cache > 10_000_000 {
            return Err(invalid(
                "profile-cache",
                format!("{profile_cache} is out of range; use 0 to 10000000"),
            ));
        }
        if s.dedup_window_hours.is_some() {
            return Err(invalid(
                "dedup-window-hours",
                "is not a setting: a message id is remembered for as long as its event is stored; \
                 set events-retention-days instead, and remove this one",
            ));
        }
        let events_retention_days = s.events_retention_days.unwrap_or(90);
        if events_retention_days == 0 {
            return Err(invalid("events-retention-days", "must be at least 1"));
        }

        let log_format = match s.log_format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "log-format",
                    format!("`{other}`: use text or json"),
                ));
            }
        };

        let otlp = otlp(s.otlp_endpoint.as_deref(), s.otlp_sample_ratio)?;
        let snapshot_dir = s
            .snapshot_dir
            .filter(|dir| !dir.as_os_str().is_empty())
            .unwrap_or_else(|| data_dir.join("snapshots"));
        let snapshot_interval = match s.snapshot_interval_secs.unwrap_or(0) {
            0 => None,
            secs => Some(Duration::from_secs(secs)),
        };

        let database_url = s.database_url.filter(|u| !u.trim().is_empty());
        if let Some(url) = &database_url
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return Err(invalid(
                "database-url",
                "must be a PostgreSQL URL like postgres://user:password@host/database",
            ));
        }

        Ok(Config {
            listen,
            data_dir,
            log,
            database_url,
            topic_prefix,
            kafka_group,
            partitions,
            keys,
            roles,
            limits,
            append_timeout: Duration::from_millis(append_timeout_ms),
            clock_skew: Duration::from_millis(clock_skew_ms),
            shutdown_timeout,
            process_batch,
            profile_cache,
            events_retention: Duration::from_secs(events_retention_days * 86_400),
            log_format,
            otlp,
            snapshot_dir,
            snapshot_interval,
        })
    }
}

fn read_file(path: &Path) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn kafka_settings(
    brokers: String,
    replication_factor: Option<i32>,
    compression: Option<String>,
    linger_ms: Option<u32>,
    queue_messages: Option<u32>,
    options: Option<Vec<String>>,
    security: [(&'static str, &'static str, Option<String>); 5],
) -> Result<KafkaSettings, ConfigError> {
    let replication_factor = replication_factor.unwrap_or(-1);
    if replication_factor == 0 || replication_factor < -1 {
        return Err(invalid(
            "kafka-replication-factor",
            "use -1 (the broker's default) or a positive number",
        ));
    }
    let compression = compression.unwrap_or_else(|| "lz4".to_owned());
    if !["none", "gzip", "snappy", "lz4", "zstd"].contains(&compression.as_str()) {
        return Err(invalid(
            "kafka-compression",
            format!("`{compression}`: use none, gzip, snappy, lz4 or zstd"),
        ));
    }
    let queue_messages = queue_messages.unwrap_or(100_000);
    if queue_messages == 0 {
        return Err(invalid("kafka-queue-messages", "must be at least 1"));
    }
    // The named security settings first, so a `kafka-option` can still
    // override any of them.
    let mut named = Vec::new();
    for (setting, librdkafka, value) in security {
        let Some(value) = value.filter(|v| !v.trim().is_empty()) else {
            continue;
        };
        let allowed: &[&str] = match setting {
            "kafka-security-protocol" => &["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"],
            "kafka-sasl-mechanism" => &[
                "PLAIN",
                "SCRAM-SHA-256",
                "SCRAM-SHA-512",
                "GSSAPI",
                "OAUTHBEARER",
            ],
            _ => &[],
        };
        if !allowed.is_empty() && !allowed.iter().any(|a| a.eq_ignore_ascii_case(&value)) {
            return Err(invalid(
                setting,
                format!("`{value}`: use one of {}", allowed.join(", ")),
            ));
        }
        named.push((librdkafka.to_owned(), value));
    }
    let passed = options
        .unwrap_or_default()
        .into_iter()
        .filter(|o| !o.trim().is_empty())
        .map(|o| match o.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
            _ => Err(invalid(
                "kafka-option",
                format!("`{}` is not name=value", redacted_option(&o)),
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let options = named.into_iter().chain(passed).collect();
    Ok(KafkaSettings {
        brokers,
        replication_factor,
        compression,
        linger_ms: linger_ms.unwrap_or(5),
        queue_messages,
        options,
    })
}

fn key_list(setting: &'static str, keys: Option<Vec<String>>) -> Result<Vec<String>, ConfigError> {
    let keys: Vec<String> = keys
        .unwrap_or_default()
        .into_iter()
        .map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty())
        .collect();
    if let Some(short) = keys.iter().find(|k| k.len() < 16) {
        return Err(invalid(
            setting,
            format!(
                "a key of {} characters is too easy to guess; use at least 16",
                short.len()
            ),
        ));
    }
    Ok(keys)
}

fn roles(roles: Option<Vec<String>>) -> Result<Roles, ConfigError> {
    let Some(list) = roles else {
        return Ok(Roles {
            ingest: true,
            process: true,
            query: true,
        });
    };
    let mut roles = Roles {
        ingest: false,
        process: false,
        query: false,
    };
    for role in list.iter().map(|r| r.trim()).filter(|r| !r.is_empty()) {
        match role {
            "ingest" => roles.ingest = true,
            "process" => roles.process = true,
            "query" => roles.query = true,
            other => {
                return Err(invalid(
                    "roles",
                    format!("unknown role `{other}`; use ingest, process or query"),
                ));
            }
        }
    }
    if !(roles.ingest || roles.process || roles.query) {
        return Err(invalid(
            "roles",
            "name at least one of ingest, process, query",
        ));
    }
    Ok(roles)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_embedded_on_localhost_8080() {
        let c = Config::from_settings(Settings::default()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.data_dir, PathBuf::from("./traitline-data"));
        assert!(matches!(c.log, LogBackend::Embedded));
        assert_eq!(c.partitions, 8);
        assert_eq!(c.limits.max_event_bytes, 32 * 1024);
        assert_eq!(c.limits.max_batch_bytes, 500 * 1024);
        assert_eq!(c.append_timeout, Duration::from_secs(5));
        assert_eq!(c.clock_skew, Duration::from_secs(2));
        assert_eq!((c.process_batch, c.profile_cache), (40_000, 20_000));
        let off: Settings = toml::from_str("profile-cache = 0").unwrap();
        assert_eq!(Config::from_settings(off).unwrap().profile_cache, 0);
    }

    #[test]
    fn flags_and_environment_win_over_the_file() {
        let cli = Settings {
            partitions: Some(3),
            ..Settings::default()
        };
        let file: Settings = toml::from_str("partitions = 12\nlisten = \"0.0.0.0:9000\"").unwrap();
        let c = Config::from_settings(cli.or(file)).unwrap();
        assert_eq!(c.partitions, 3);
        assert_eq!(c.listen.to_string(), "0.0.0.0:9000");
    }

    #[test]
    fn a_bad_setting_names_itself() {
        let err = Config::from_settings(Settings {
            listen: Some("localhost".into()),
            ..Settings::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`listen`") && err.contains("TRAITLINE_LISTEN"),
            "{err}"
        );

        let err = Config::from_settings(Settings {
            roles: Some(vec!["ingest".into(), "dashboard".into()]),
            ..Settings::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`roles`") && err.contains("dashboard"),
            "{err}"
        );

        let err = Config::from_settings(Settings {
            kafka_brokers: Some("localhost:9092".into()),
            kafka_compression: Some("brotli".into()),
            ..Settings::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("TRAITLINE_KAFKA_COMPRESSION"), "{err}");

        let err = Config::from_settings(Settings {
            profile_cache: Some(20_000_000),
            ..Settings::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`profile-cache`") && err.contains("TRAITLINE_PROFILE_CACHE"),
            "{err}"
        );

        // Deduplication follows the events' retention; the old setting
        // is refused rather than silently ignored.
        let err = Config::from_settings(Settings {
            dedup_window_hours: Some(72),
            ..Settings::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`dedup-window-hours`")
                && err.contains("TRAITLINE_DEDUP_WINDOW_HOURS")
                && err.contains("events-retention-days"),
            "{err}"
        );
    }

    #[test]
    fn otlp_export_is_off_by_default_and_a_base_url_gets_the_traces_path() {
        assert_eq!(
            Config::from_settings(Settings::default()).unwrap().otlp,
            None
        );
        let on = |endpoint: &str| {
            Config::from_settings(Settings {
                otlp_endpoint: Some(endpoint.into()),
                ..Settings::default()
            })
            .map(|c| c.otlp.unwrap().traces_url)
        };
        assert_eq!(
            on("http://collector:4318").unwrap(),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            on("http://collector:4318/").unwrap(),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            on("https://c.example/otlp/v1/traces").unwrap(),
            "https://c.example/otlp/v1/traces"
        );
        let err = on("collector:4318").unwrap_err().to_string();
        assert!(err.contains("TRAITLINE_OTLP_ENDPOINT"), "{err}");
        let err = Config::from_settings(Settings {
            otlp_sample_ratio: Some(1.5),
            ..Settings::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("TRAITLINE_OTLP_SAMPLE_RATIO"), "{err}");
    }

    #[test]
    fn the_rate_limit_is_off_by_default_and_its_burst_defaults_to_one_second() {
        let off = Config::from_settings(Settings::default()).unwrap();
        assert_eq!(off.limits.rate_limit, None);
        let file: Settings = toml::from_str("rate-limit-events = 100").unwrap();
        let on = Config::from_settings(file)
            .unwrap()
            .limits
            .rate_limit
            .unwrap();
        assert_eq!((on.per_second.get(), on.burst.get()), (100, 100));
        let err = Config::from_settings(Settings {
            rate_limit_events: Some(100),
            rate_limit_burst: Some(0),
            ..Settings::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("rate-limit-burst"), "{err}");
    }

    #[test]
    fn kafka_security_settings_become_librdkafka_options_and_secrets_stay_hidden() {
        let settings = Settings {
            kafka_brokers: Some("k:9092".into()),
            kafka_security_protocol: Some("SASL_SSL".into()),
            kafka_sasl_mechanism: Some("SCRAM-SHA-512".into()),
            kafka_sasl_username: Some("svc".into()),
            kafka_sasl_password: Some("hunter2-secret".into()),
            kafka_options: Some(vec!["sasl.username=override".into()]),
            ..Settings::default()
        };
        let LogBackend::Kafka(kafka) = Config::from_settings(settings).unwrap().log else {
            panic!("Kafka mode");
        };
        let value = |name: &str| {
            // The last one wins in librdkafka: a kafka-option overrides.
            kafka
                .options
                .iter()
                .rev()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(value("security.protocol"), Some("SASL_SSL"));
        assert_eq!(value("sasl.mechanisms"), Some("SCRAM-SHA-512"));
        assert_eq!(value("sasl.password"), Some("hunter2-secret"));
        assert_eq!(value("sasl.username"), Some("override"));
        let shown = format!("{kafka:?}");
        assert!(
            !shown.contains("hunter2-secret") && shown.contains("sasl.password"),
            "{shown}"
        );

        let err = Config::from_settings(Settings {
            kafka_brokers: Some("k:9092".into()),
            kafka_security_protocol: Some("tls".into()),
            ..Settings::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("kafka-security-protocol") && err.contains("sasl_ssl"),
            "{err}"
        );
        let err = Config::from_settings(Settings {
            kafka_brokers: Some("k:9092".into()),
            kafka_options: Some(vec!["ssl.key.password".into()]),
            ..Settings::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("kafka-option") && err.contains("***"), "{err}");
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        assert!(toml::from_str::<Settings>("listn = \"x\"").is_err());
    }
}
