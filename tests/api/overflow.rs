//! Hot users: events of a user past `hot-user-events-per-second` go to the
//! overflow topic, processed by a runner of their own, never dropped; the
//! profile counts every event once, and other users stay on `user_events`.

use reqwest::StatusCode;
use serde_json::{Value, json};
use traitline::log::Topics;

use std::time::Duration;

use crate::helpers::{Backend, eventually, read_all, spawn_app_with};

async fn a_hot_users_excess_goes_to_the_overflow_topic_and_is_counted(backend: Backend) {
    let app = spawn_app_with(backend, |s| s.hot_user_events_per_second = Some(5)).await;
    let mut batch: Vec<Value> = (0..20)
        .map(|i| json!({"type": "track", "userId": "hot", "event": "e", "messageId": format!("h{i}")}))
        .collect();
    batch.extend((0..3).map(
        |i| json!({"type": "track", "userId": "cold", "event": "e", "messageId": format!("c{i}")}),
    ));
    let response = app.post("/v1/batch", &json!({"batch": batch})).await;
    assert_eq!(response.status(), StatusCode::OK);

    let topics = Topics::new(&app.config.topic_prefix);
    let overflow = read_all(&app.config, &topics.overflow()).await;
    let main = read_all(&app.config, &topics.events()).await;
    let user = |r: &traitline::log::StoredRecord| {
        serde_json::from_slice::<Value>(&r.value).unwrap()["userId"].clone()
    };
    assert!(
        overflow.len() >= 10 && overflow.iter().all(|r| user(r) == "hot"),
        "the hot user's excess, and only it, overflows: {} records",
        overflow.len()
    );
    assert_eq!(main.len() + overflow.len(), 23, "every event stored once");
    assert_eq!(main.iter().filter(|r| user(r) == "cold").count(), 3);

    let hot = app
        .wait_for_profile("hot", |p| p["event_count"].as_u64() >= Some(20))
        .await;
    assert_eq!(hot["event_count"], 20, "{hot}");
    let cold = app
        .wait_for_profile("cold", |p| p["event_count"] == 3)
        .await;
    assert_eq!(cold["event_count"], 3);
    // `/readyz` adds up both runners (their counts follow the commits).
    eventually(
        "both runners counted in /readyz",
        Duration::from_secs(30),
        || async {
            let ready = app.get_json("/readyz").await;
            ready["processing"]["applied"] == 23
        },
    )
    .await;
}

both_logs!(a_hot_users_excess_goes_to_the_overflow_topic_and_is_counted);
