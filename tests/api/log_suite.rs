//! One suite, two logs: every accepted event is read back from the embedded
//! log and from Kafka (the tansu broker) with the same messageId and
//! fields, keyed by user, on the partition Kafka's murmur2 picks.

use std::collections::{HashMap, HashSet};

use reqwest::StatusCode;
use serde_json::{Value, json};
use traitline::log::partitioner::partition_for_key;

use crate::helpers::{Backend, spawn_app};

both_logs!(
    every_accepted_event_is_read_back_with_its_fields,
    records_are_keyed_by_user_on_the_murmur2_partition,
    concurrent_requests_are_each_stored_once,
);

async fn every_accepted_event_is_read_back_with_its_fields(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut sent: HashMap<String, Value> = HashMap::new();
    for i in 0..10 {
        let body = json!({
            "userId": format!("user-{i}"), "event": "Product Viewed", "messageId": format!("single-{i}"),
            "properties": {"sku": format!("sku-{i}"), "price": 9.5, "tags": ["a", "b"]},
            "context": {"locale": "en-GB", "client_os": "Android"},
            "timestamp": "2026-11-21T09:30:00.250Z"
        });
        assert_eq!(app.post("/v1/track", &body).await.status(), StatusCode::OK);
        sent.insert(format!("single-{i}"), body);
    }
    let batch: Vec<Value> = (0..40)
        .map(|i| {
            json!({
                "type": if i % 2 == 0 { "identify" } else { "track" },
                "anonymousId": format!("anon-{}", i % 7), "event": "Clicked",
                "traits": {"n": i}, "messageId": format!("batch-{i}")
            })
        })
        .collect();
    for item in &batch {
        sent.insert(item["messageId"].as_str().unwrap().to_owned(), item.clone());
    }
    assert_eq!(
        app.post("/v1/batch", &json!({"batch": batch}))
            .await
            .status(),
        StatusCode::OK
    );
    let seed = json!({"key": "landing.user.home.click", "user_id": "seed-user", "message_id": "seed-1",
                      "payload": {"client_os": "iOS", "client_version": "1.0.0"}});
    assert_eq!(
        app.post("/event/user/track", &seed).await.status(),
        StatusCode::OK
    );

    let stored = app.stored_events().await;
    assert_eq!(stored.len(), 51);
    let ids: HashSet<&str> = stored.iter().map(|e| e.message_id.as_str()).collect();
    assert_eq!(ids.len(), 51, "each event stored once");
    for event in &stored {
        if event.message_id == "seed-1" {
            assert_eq!(event.user_id.as_deref(), Some("seed-user"));
            assert_eq!(event.context["client_version"], "1.0.0");
            continue;
        }
        let original = &sent[&event.message_id];
        assert_eq!(event.user_id.as_deref(), original["userId"].as_str());
        assert_eq!(
            event.anonymous_id.as_deref(),
            original["anonymousId"].as_str()
        );
        if event.message_id.starts_with("single-") {
            assert_eq!(
                Value::Object(event.properties.clone()),
                original["properties"]
            );
            assert_eq!(Value::Object(event.context.clone()), original["context"]);
            assert_eq!(
                event.timestamp.to_rfc3339(),
                "2026-11-21T09:30:00.250+00:00"
            );
            assert_eq!(event.event.as_deref(), Some("Product Viewed"));
        } else {
            assert_eq!(Value::Object(event.traits.clone()), original["traits"]);
        }
    }
}

async fn records_are_keyed_by_user_on_the_murmur2_partition(backend: Backend) {
    let app = spawn_app(backend).await;
    let batch: Vec<Value> = (0..64)
        .map(|i| json!({"type": "track", "userId": format!("customer-{i}"), "event": "e"}))
        .collect();
    assert_eq!(
        app.post("/v1/batch", &json!({"batch": batch}))
            .await
            .status(),
        StatusCode::OK
    );
    let anonymous = json!({"anonymousId": "device-1", "event": "e"});
    assert_eq!(
        app.post("/v1/track", &anonymous).await.status(),
        StatusCode::OK
    );

    let records = app.stored_records().await;
    assert_eq!(records.len(), 65);
    let partitions = app.config.partitions;
    let mut used = HashSet::new();
    for record in &records {
        let event: Value = serde_json::from_slice(&record.value).unwrap();
        let expected_key = event["userId"]
            .as_str()
            .or(event["anonymousId"].as_str())
            .unwrap();
        let key = record.key.as_deref().expect("every record is keyed");
        assert_eq!(key, expected_key.as_bytes());
        assert_eq!(
            record.partition,
            partition_for_key(key, partitions),
            "key {expected_key}"
        );
        used.insert(record.partition);
    }
    assert_eq!(
        used.len() as i32,
        partitions,
        "64 users spread over every partition"
    );
}

async fn concurrent_requests_are_each_stored_once(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut tasks = Vec::new();
    for worker in 0..16 {
        let client = app.client.clone();
        let url = app.url("/v1/track");
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                let response = client
                    .post(&url)
                    .basic_auth(crate::helpers::WRITE_KEY, Some(""))
                    .json(&json!({"userId": format!("w{worker}"), "event": "e", "messageId": format!("{worker}-{i}")}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), StatusCode::OK);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let stored = app.stored_events().await;
    assert_eq!(stored.len(), 400);
    let ids: HashSet<String> = stored.into_iter().map(|e| e.message_id).collect();
    assert_eq!(ids.len(), 400);
}
