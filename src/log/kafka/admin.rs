//! Creating the topics Traitline needs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;

use super::{KafkaSetupError, base_config, client_error};
use crate::config::KafkaSettings;

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
                        .map(|t| (t.name().to_owned(), t.partitions().len()))
                        .collect::<HashMap<_, _>>()
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
    for (topic, _) in topics {
        if let Some(&found) = existing.get(topic)
            && i32::try_from(found).ok() != Some(partitions)
        {
            return Err(KafkaSetupError::Partitions {
                topic: topic.clone(),
                found: i32::try_from(found).unwrap_or(i32::MAX),
                configured: partitions,
            });
        }
    }
    let missing: Vec<&(String, bool)> = topics
        .iter()
        .filter(|(t, _)| !existing.contains_key(t))
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
