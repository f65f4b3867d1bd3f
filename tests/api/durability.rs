//! Durability of the embedded log: a 2xx means the event is on disk, so a
//! SIGKILL during concurrent load loses no acknowledged event, and recovery
//! after it stores none twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;
use tokio::sync::Mutex;
use traitline::config::{Config, Settings};
use traitline::log::Topics;

use crate::helpers::{
    ServiceProcess, TestDir, WRITE_KEY, embedded_env, env_refs, read_all, wait_for,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_event() {
    let dir = TestDir::new();
    let env = embedded_env(dir.path());
    let mut service = ServiceProcess::start(dir.path(), "first", &[], &env_refs(&env)).await;

    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let answered = Arc::new(AtomicU64::new(0));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut workers = Vec::new();
    for worker in 0..16 {
        let (client, url) = (client.clone(), service.url("/v1/batch"));
        let (acknowledged, answered) = (acknowledged.clone(), answered.clone());
        workers.push(tokio::spawn(async move {
            for i in 0.. {
                let ids: Vec<String> = (0..5).map(|j| format!("w{worker}-r{i}-e{j}")).collect();
                let batch: Vec<_> = ids
                    .iter()
                    .map(|id| json!({"type": "track", "userId": format!("u{worker}"), "event": "e", "messageId": id}))
                    .collect();
                let response = client
                    .post(&url)
                    .basic_auth(WRITE_KEY, Some(""))
                    .json(&json!({"batch": batch}))
                    .send()
                    .await;
                match response {
                    Ok(r) if r.status().is_success() => {
                        acknowledged.lock().await.extend(ids);
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => panic!("unexpected answer {} before the kill", r.status()),
                    Err(_) => return, // the service is gone
                }
            }
        }));
    }
    // Kill in the middle of the load, once plenty has been acknowledged.
    wait_for("500 acknowledged requests", Duration::from_secs(60), || {
        let n = answered.load(Ordering::Relaxed);
        async move { n >= 500 }
    })
    .await;
    service.kill();
    for worker in workers {
        worker.await.unwrap();
    }

    // Restart on the same data directory: recovery cuts any torn write.
    let restarted = ServiceProcess::start(dir.path(), "second", &[], &env_refs(&env)).await;
    let config = Config::from_settings(Settings {
        data_dir: Some(dir.path().join("data")),
        ..Settings::default()
    })
    .unwrap();
    let records = read_all(&config, &Topics::new("").events()).await;
    let mut copies: HashMap<String, u32> = HashMap::new();
    for record in &records {
        let event: serde_json::Value = serde_json::from_slice(&record.value).unwrap();
        *copies
            .entry(event["messageId"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let acknowledged = acknowledged.lock().await;
    assert!(acknowledged.len() >= 2500);
    for id in acknowledged.iter() {
        assert_eq!(
            copies.get(id),
            Some(&1),
            "acknowledged event {id} is stored exactly once"
        );
    }
    assert!(copies.values().all(|n| *n == 1), "no event is stored twice");

    // And the restarted service appends after the recovered records.
    let response = client
        .post(restarted.url("/v1/track"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&json!({"userId": "after", "event": "e", "messageId": "after-restart"}))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let after = read_all(&config, &Topics::new("").events()).await;
    assert_eq!(after.len(), records.len() + 1);
}
