//! The settings as flags, `TRAITLINE_*` variables and the TOML file give
//! them, before defaults and validation.

use std::path::{Path, PathBuf};

use clap::Args;
use serde::Deserialize;

use super::ConfigError;

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

    /// How long the closed windows of metrics are kept, in days after a
    /// window ends (once on `user_metrics`) [default: 400]
    #[arg(long, env = "TRAITLINE_METRIC_WINDOWS_RETENTION_DAYS", global = true)]
    pub metric_windows_retention_days: Option<u64>,

    /// How long destinations' delivery attempts are kept (listed at
    /// `/v1/destinations/{name}/attempts`, counted in its status), in days;
    /// dead letters stay until replayed [default: 7]
    #[arg(
        long,
        env = "TRAITLINE_DELIVERY_ATTEMPTS_RETENTION_DAYS",
        global = true
    )]
    pub delivery_attempts_retention_days: Option<u64>,

    /// Memory the metric runners may keep open window state in, in MiB:
    /// an even part for each running metric version, and what some leave
    /// unused for those that need more; past its part a runner
    /// keeps its least recently used groups in the store only, and reads
    /// one back when an event or its next window close needs it
    /// [default: 256]
    #[arg(long, env = "TRAITLINE_METRIC_STATE_BUDGET_MB", global = true)]
    pub metric_state_budget_mb: Option<u64>,

    /// Let destinations deliver to private, loopback, link-local and
    /// cloud metadata addresses (a local test receiver); off, such a URL
    /// is refused when it is defined and when it is connected to
    /// [default: false]
    #[arg(long, env = "TRAITLINE_DESTINATIONS_ALLOW_PRIVATE", global = true, num_args = 0..=1, default_missing_value = "true")]
    pub destinations_allow_private: Option<bool>,

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

    /// Metric definitions (`[[metrics]]` tables of the file only; the
    /// admin API changes them at run time).
    #[arg(skip)]
    #[serde(default)]
    pub metrics: Option<Vec<crate::definitions::MetricDefinition>>,

    /// Pattern rules (`[[rules]]` tables of the file only; the admin API
    /// changes them at run time).
    #[arg(skip)]
    #[serde(default)]
    pub rules: Option<Vec<crate::definitions::RuleDefinition>>,

    /// Destinations (`[[destinations]]` tables of the file only; the
    /// admin API changes them at run time).
    #[arg(skip)]
    #[serde(default)]
    pub destinations: Option<Vec<crate::definitions::DestinationDefinition>>,
}

impl Settings {
    /// Fills every setting this one leaves unset from `fallback`.
    pub(super) fn or(self, fallback: Settings) -> Settings {
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
            metric_windows_retention_days: self
                .metric_windows_retention_days
                .or(fallback.metric_windows_retention_days),
            delivery_attempts_retention_days: self
                .delivery_attempts_retention_days
                .or(fallback.delivery_attempts_retention_days),
            metric_state_budget_mb: self
                .metric_state_budget_mb
                .or(fallback.metric_state_budget_mb),
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
            metrics: self.metrics.or(fallback.metrics),
            rules: self.rules.or(fallback.rules),
            destinations: self.destinations.or(fallback.destinations),
            destinations_allow_private: self
                .destinations_allow_private
                .or(fallback.destinations_allow_private),
        }
    }
}

/// Reads the TOML configuration file.
pub(super) fn read_file(path: &Path) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}
