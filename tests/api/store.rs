//! The store's own promises, on both databases: a stale batch is fenced
//! and writes nothing; a message id is remembered for the deduplication
//! window and forgotten after it.

use chrono::Utc;
use traitline::envelope::{EventEnvelope, EventType, Source};
use traitline::store::{OffsetAdvance, ProfileBatch, Store, StoreError};

use crate::helpers::{Backend, TestDir, test_database};

both_logs!(
    a_stale_batch_is_fenced_and_writes_nothing,
    a_message_id_is_forgotten_after_the_dedup_window
);

/// A store of the deployment `backend` stands for: SQLite for the embedded
/// one, a fresh PostgreSQL database for Kafka.
async fn open(backend: Backend, dir: &TestDir) -> Store {
    let url = match backend {
        Backend::Embedded => None,
        Backend::Kafka => Some(test_database().await),
    };
    Store::open(url.as_deref(), dir.path())
        .await
        .expect("the store opens")
}

fn track(user: &str, message_id: &str) -> (EventEnvelope, String) {
    let event = EventEnvelope {
        kind: EventType::Track,
        event: Some("Tested".into()),
        name: None,
        user_id: Some(user.into()),
        anonymous_id: None,
        group_id: None,
        previous_id: None,
        message_id: message_id.into(),
        timestamp: Utc::now(),
        original_timestamp: None,
        received_at: Utc::now(),
        sent_at: None,
        properties: Default::default(),
        traits: Default::default(),
        context: Default::default(),
        integrations: Default::default(),
        source: Source::Segment,
        traceparent: None,
    };
    let text = serde_json::to_string(&event).unwrap();
    (event, text)
}

fn batch<'a>(
    events: &'a [(EventEnvelope, String)],
    expected: Option<i64>,
    next: i64,
) -> ProfileBatch<'a> {
    ProfileBatch {
        processor: "profiles",
        topic: "user_events",
        offsets: vec![OffsetAdvance {
            partition: 0,
            expected,
            next,
        }],
        events,
    }
}

async fn a_stale_batch_is_fenced_and_writes_nothing(backend: Backend) {
    let dir = TestDir::new();
    let store = open(backend, &dir).await;
    let first = [track("f1", "m1")];
    store
        .apply_profile_batch(&batch(&first, None, 1))
        .await
        .unwrap();

    // Another processor took the partition and committed offset 1..3.
    let theirs = [track("f1", "m2"), track("f1", "m3")];
    store
        .apply_profile_batch(&batch(&theirs, Some(1), 3))
        .await
        .unwrap();

    // This processor still believes the partition is at 1.
    let stale = [track("f1", "m2"), track("f1", "m9")];
    let refused = store.apply_profile_batch(&batch(&stale, Some(1), 3)).await;
    assert!(
        matches!(refused, Err(StoreError::Fenced { partition: 0, .. })),
        "{refused:?}"
    );
    // Nor may a processor that believes nothing is stored commit.
    let refused = store.apply_profile_batch(&batch(&stale, None, 3)).await;
    assert!(
        matches!(refused, Err(StoreError::Fenced { .. })),
        "{refused:?}"
    );

    assert_eq!(
        store.offsets("profiles", "user_events").await.unwrap()[&0],
        3
    );
    let profile = store.profile("f1").await.unwrap().unwrap();
    assert_eq!(
        profile.event_count, 3,
        "m9 of the stale batch was not applied"
    );
}

async fn a_message_id_is_forgotten_after_the_dedup_window(backend: Backend) {
    let dir = TestDir::new();
    let store = open(backend, &dir).await;
    let old = track("d1", "old-id");
    let mut recent = track("d1", "recent-id");
    recent.0.received_at += chrono::Duration::hours(1);
    recent.1 = serde_json::to_string(&recent.0).unwrap();
    let events = [old, recent];
    let outcome = store
        .apply_profile_batch(&batch(&events, None, 1))
        .await
        .unwrap();
    assert_eq!((outcome.applied, outcome.duplicates), (2, 0));
    let outcome = store
        .apply_profile_batch(&batch(&events, Some(1), 2))
        .await
        .unwrap();
    assert_eq!(
        (outcome.applied, outcome.duplicates),
        (0, 2),
        "a retry within the window changes nothing"
    );

    // The retention (at least the window) ends now: between the two.
    let later = Utc::now().timestamp_millis() + 1;
    let purged = store.purge(later).await.unwrap();
    assert_eq!(
        purged, 1,
        "the older stored event, and with it the record of its id"
    );
    let outcome = store
        .apply_profile_batch(&batch(&events, Some(2), 3))
        .await
        .unwrap();
    assert_eq!(
        (outcome.applied, outcome.duplicates),
        (1, 1),
        "past the window the old id is new again; the recent one is still known"
    );
    assert_eq!(store.profile("d1").await.unwrap().unwrap().event_count, 3);
}
