//! Snapshots: profile state with its offsets, so a replay, or a new
//! instance, starts from the newest snapshot instead of the log's first
//! record, and ends where live processing did.

use std::collections::HashSet;
use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{
    Backend, READ_KEY, TestApp, TestDir, spawn_app_with, start, test_database, test_settings,
};
use crate::profiles::{all_profiles, mixed_events, send_and_wait};

both_logs!(snapshot_plus_replay_equals_live);

/// The events, then the changes, of `id` as the API serves them.
async fn history(app: &TestApp, id: &str) -> (Value, Value) {
    let (status, events) = app
        .get_as(&format!("/v1/profiles/{id}/events?limit=1000"), READ_KEY)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, changes) = app
        .get_as(&format!("/v1/profiles/{id}/changes?limit=1000"), READ_KEY)
        .await;
    assert_eq!(status, StatusCode::OK);
    (events, changes)
}

fn unique_ids(events: &[Value]) -> HashSet<String> {
    events
        .iter()
        .map(|e| e["messageId"].as_str().unwrap().to_owned())
        .collect()
}

/// The first half of the events, a snapshot, the second half with client
/// retries of events from both halves; then the profiles live processing
/// made, and what a snapshot-based replay makes.
async fn snapshot_plus_replay_equals_live(backend: Backend) {
    let dir = Arc::new(TestDir::new());
    let mut settings = test_settings(backend, dir.path());
    if backend == Backend::Kafka {
        settings.database_url = Some(test_database().await);
    }
    let app = start(settings.clone(), dir).await;
    let first = mixed_events(0..150);
    send_and_wait(&app, &first, first.len()).await;

    let store =
        traitline::store::Store::open(app.config.database_url.as_deref(), &app.config.data_dir)
            .await
            .unwrap();
    let (path, info) = traitline::snapshot::take(&app.config, &store)
        .await
        .expect("a snapshot is taken beside the running service");
    store.close().await;
    assert!(
        path.starts_with(&app.config.snapshot_dir),
        "{}",
        path.display()
    );
    assert_eq!(info.records(), 150, "a record an event");

    // Retries of events on both sides of the snapshot: the restored store
    // must still know the first half's message ids.
    let mut second = mixed_events(150..300);
    second.extend(first.iter().step_by(10).cloned());
    second.extend(mixed_events(150..300).into_iter().step_by(10));
    let all: Vec<Value> = first.iter().chain(&second).cloned().collect();
    let unique = unique_ids(&all);
    send_and_wait(&app, &second, unique.len()).await;
    let live = all_profiles(&app).await;
    let live_history = history(&app, "r3").await;
    let config = app.config.clone();
    let dir = app.stop().await;

    let mut progress = Vec::new();
    let report = traitline::replay::run(&config, &Default::default(), &mut progress)
        .await
        .expect("the replay runs");
    let progress = String::from_utf8(progress).unwrap();
    assert!(progress.contains("restored the snapshot"), "{progress}");
    assert_eq!(
        report.applied as usize,
        unique.len() - first.len(),
        "only the events after the snapshot are read: {progress}"
    );
    assert_eq!(
        report.duplicates as usize,
        second.len() - (unique.len() - first.len())
    );

    let replayed = start(settings, dir).await;
    assert!(
        all_profiles(&replayed).await == live,
        "the replayed profiles differ from the live ones"
    );
    let replayed_history = history(&replayed, "r3").await;
    assert!(
        replayed_history.0 == live_history.0,
        "the stored events differ"
    );
    // Changes after the snapshot are grouped by the replay's batches; the
    // ones before it are the snapshot's own.
    let before_snapshot = |changes: &Value| -> Vec<Value> {
        changes["changes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| {
                chrono::DateTime::parse_from_rfc3339(c["changed_at"].as_str().unwrap())
                    .unwrap()
                    .timestamp_millis()
                    <= info.taken_at_ms
            })
            .cloned()
            .collect()
    };
    let kept = before_snapshot(&live_history.1);
    assert!(!kept.is_empty());
    assert!(
        before_snapshot(&replayed_history.1) == kept,
        "the changes before the snapshot are kept"
    );
    let prefix = config.topic_prefix.clone();
    let snapshot_dir = config.snapshot_dir.clone();
    // Kept: the snapshot directory is in it.
    let _dir = replayed.stop().await;

    if backend == Backend::Kafka {
        // A new instance with a database of its own (so a consumer group
        // of its own), on the same topics: it starts from the snapshot and
        // reads the rest of the log.
        let fresh = spawn_app_with(Backend::Kafka, |s| {
            s.kafka_group = Some(format!("{prefix}fresh"));
            s.topic_prefix = Some(prefix);
            s.snapshot_dir = Some(snapshot_dir);
        })
        .await;
        crate::helpers::eventually(
            "the new instance's profiles",
            std::time::Duration::from_secs(60),
            || async { all_profiles(&fresh).await == live },
        )
        .await;
        let fresh_history = history(&fresh, "r3").await;
        assert!(fresh_history.0 == live_history.0, "its stored events");
        assert!(
            before_snapshot(&fresh_history.1) == kept,
            "it started from the snapshot, not from the log's beginning"
        );
    }
}

/// A process role with `snapshot-interval-secs` takes snapshots by itself
/// and keeps the newest three.
#[tokio::test]
async fn snapshots_are_taken_on_a_timer_and_the_newest_three_kept() {
    let app = spawn_app_with(Backend::Embedded, |s| s.snapshot_interval_secs = Some(1)).await;
    send_and_wait(&app, &mixed_events(0..20), 20).await;
    let dir = app.config.snapshot_dir.clone();
    let mut seen = HashSet::new();
    crate::helpers::eventually(
        "five snapshots taken",
        std::time::Duration::from_secs(30),
        || {
            let present: Vec<_> = std::fs::read_dir(&dir)
                .map(|entries| {
                    entries
                        .filter_map(Result::ok)
                        .map(|e| e.file_name().into_string().unwrap())
                        .filter(|name| name.starts_with("snapshot-"))
                        .collect()
                })
                .unwrap_or_default();
            assert!(present.len() <= traitline::snapshot::KEPT, "{present:?}");
            seen.extend(present);
            let enough = seen.len() >= 5;
            async move { enough }
        },
    )
    .await;
    let newest = traitline::snapshot::latest(&app.config).unwrap();
    let text = std::io::read_to_string(flate2::read::GzDecoder::new(
        std::fs::File::open(&newest).unwrap(),
    ))
    .unwrap();
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with(r#"{"row":{"table":"events""#))
            .count(),
        20,
        "the newest holds every stored event"
    );
}

/// A cut-off snapshot, or one of other topics, is refused and changes
/// nothing.
#[tokio::test]
async fn a_cut_off_or_foreign_snapshot_is_refused_and_changes_nothing() {
    let app = spawn_app_with(Backend::Embedded, |_| {}).await;
    send_and_wait(&app, &mixed_events(0..30), 30).await;
    let store = traitline::store::Store::open(None, &app.config.data_dir)
        .await
        .unwrap();
    let mut whole = Vec::new();
    store.write_snapshot("profiles", &mut whole).await.unwrap();
    let before = all_profiles(&app).await;
    let text = String::from_utf8(whole).unwrap();
    let topics = [
        app.events_topic(),
        format!("{}_overflow", app.events_topic()),
    ];

    let cut: String = text
        .lines()
        .take(text.lines().count() - 1)
        .map(|l| format!("{l}\n"))
        .collect();
    let err = store
        .restore_snapshot("profiles", &topics, cut.as_bytes(), false)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("cut off"), "{err}");

    let foreign = text.replace(
        &format!("\"{}\"", app.events_topic()),
        "\"prod_user_events\"",
    );
    let err = store
        .restore_snapshot("profiles", &topics, foreign.as_bytes(), false)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("prod_user_events") && err.contains("topic-prefix"),
        "{err}"
    );
    store.close().await;
    assert!(all_profiles(&app).await == before, "nothing changed");
}
