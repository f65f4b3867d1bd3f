//! Defaults and checks: every error names the setting to fix.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::kafka::kafka_settings;
use super::settings::read_file;
use super::*;

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
    #[error("invalid {noun} definition {table}[{index}] in the configuration file: {error}")]
    Definition {
        noun: &'static str,
        table: &'static str,
        index: usize,
        error: crate::definitions::DefinitionError,
    },
}

pub(super) fn invalid(setting: &'static str, reason: impl Into<String>) -> ConfigError {
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

        let windows_retention_days = s.metric_windows_retention_days.unwrap_or(400);
        if windows_retention_days == 0 {
            return Err(invalid(
                "metric-windows-retention-days",
                "must be at least 1",
            ));
        }

        let attempts_retention_days = s.delivery_attempts_retention_days.unwrap_or(7);
        if attempts_retention_days == 0 {
            return Err(invalid(
                "delivery-attempts-retention-days",
                "must be at least 1",
            ));
        }

        let state_budget_mb = s.metric_state_budget_mb.unwrap_or(256);
        if !(1..=1_048_576).contains(&state_budget_mb) {
            return Err(invalid(
                "metric-state-budget-mb",
                format!("{state_budget_mb} is out of range; use 1 to 1048576 (MiB)"),
            ));
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

        let metrics = named_definitions(s.metrics.unwrap_or_default())?;
        let rules = named_definitions(s.rules.unwrap_or_default())?;
        let destinations = named_definitions(s.destinations.unwrap_or_default())?;

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
            metric_windows_retention: Duration::from_secs(
                windows_retention_days.saturating_mul(86_400),
            ),
            metric_state_budget: usize::try_from(state_budget_mb << 20).unwrap_or(usize::MAX),
            delivery_attempts_retention: Duration::from_secs(
                attempts_retention_days.saturating_mul(86_400),
            ),
            log_format,
            otlp,
            snapshot_dir,
            snapshot_interval,
            metrics,
            rules,
            destinations,
            destinations_allow_private: s.destinations_allow_private.unwrap_or(false),
        })
    }
}

/// Checks the file's tables of one kind of definition (`[[metrics]]`):
/// each has a unique name and compiles.
fn named_definitions<D: crate::definitions::Definition>(
    definitions: Vec<D>,
) -> Result<Vec<(String, D)>, ConfigError> {
    use crate::definitions::DefinitionError;
    let mut named: Vec<(String, D)> = Vec::new();
    for (index, definition) in definitions.into_iter().enumerate() {
        let refuse = |error| ConfigError::Definition {
            noun: D::NOUN,
            table: D::TABLE,
            index,
            error,
        };
        let Some(name) = definition.name().map(str::to_owned) else {
            return Err(refuse(DefinitionError::new(
                "name",
                format!("a [[{}]] table needs a name", D::TABLE),
            )));
        };
        if named.iter().any(|(n, _)| *n == name) {
            return Err(refuse(DefinitionError::new(
                "name",
                format!("`{name}` is defined twice"),
            )));
        }
        definition.compile(&name).map_err(refuse)?;
        named.push((name, definition));
    }
    Ok(named)
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
