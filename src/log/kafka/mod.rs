//! The event log on Apache Kafka (any Kafka-protocol broker), via rdkafka:
//! the shared producer ([`KafkaLog`]), topic creation ([`ensure_topics`]),
//! the reader ([`KafkaReader`]), and the client settings they share.

mod admin;
mod fetch;
mod producer;
mod reader;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;

pub use admin::ensure_topics;
pub use producer::KafkaLog;
pub use reader::KafkaReader;

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
    #[error(
        "Kafka topic {topic} has {found} partitions but the setting partitions is {configured}: \
         set partitions to {found} (records are placed by it, and windows combined across \
         partitions wait for each of them)"
    )]
    Partitions {
        topic: String,
        found: i32,
        configured: i32,
    },
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
