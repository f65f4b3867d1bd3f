//! The Kafka client settings, checked, with secrets kept out of logs.

use super::ConfigError;
use super::validation::invalid;

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

pub(super) fn kafka_settings(
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
