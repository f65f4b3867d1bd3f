//! The load generator (`traitline bench ingest`) against a real service:
//! every request it counts was a 2xx, and the events it sent are stored
//! once each.

use std::collections::HashSet;

use traitline::bench::BenchIngestArgs;
use traitline::bench::ingest::load;

use crate::helpers::{Backend, WRITE_KEY, spawn_app};

fn args(url: &str, batch_size: usize) -> BenchIngestArgs {
    BenchIngestArgs {
        url: url.to_owned(),
        write_key: None,
        concurrency: 4,
        duration_secs: 1,
        warmup_secs: 0,
        batch_size,
        users: 50,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_counts_only_stored_events() {
    let app = spawn_app(Backend::Embedded).await;
    let mut counted = 0;
    for batch_size in [1, 10] {
        let report = load(&args(&app.base, batch_size), WRITE_KEY).await.unwrap();
        assert!(report.failures.is_empty(), "{:?}", report.failures);
        assert!(report.requests > 0, "some requests were measured");
        assert_eq!(report.events, report.requests * batch_size as u64);
        assert_eq!(report.latencies_us.len() as u64, report.requests);
        counted += report.events;
    }
    let stored = app.stored_events().await;
    let ids: HashSet<&str> = stored.iter().map(|e| e.message_id.as_str()).collect();
    assert_eq!(ids.len(), stored.len(), "each event stored once");
    // The probe requests and those that ended past the window are stored
    // but not counted.
    assert!(
        stored.len() as u64 >= counted,
        "{} < {counted}",
        stored.len()
    );
}

#[tokio::test]
async fn a_wrong_key_fails_fast_naming_the_service() {
    let app = spawn_app(Backend::Embedded).await;
    let error = load(&args(&app.base, 1), "tlw_not_a_key")
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(message.contains(&app.base), "{message}");
    assert!(message.contains("401"), "{message}");
}
