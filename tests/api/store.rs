//! The store's own promises, on both databases: a stale batch is fenced
//! and writes nothing; a message id is remembered while its event is
//! stored and forgotten when it is purged; a profile state kept in memory
//! is used only while the store still holds it.

use std::collections::{BTreeMap, HashMap};

use chrono::Utc;
use serde_json::Value;
use traitline::envelope::{EventEnvelope, EventType};
use traitline::store::{
    AlertQuery, ArchivedObject, Claimed, Combine, ComputedTrait, DeadLetter, DeliveryOutcome,
    GroupRow, MergeRow, MetricBatch, OffsetAdvance, ProfileBatch, RuleBatch, StateSummary, Store,
    StoreError, StoredAlert, StoredWindow, WindowQuery,
};
use traitline::windows::{Aggregate, Closed, Span, Stamp};

use crate::helpers::{Backend, TestDir, test_database};

both_logs!(
    a_metric_batch_commits_with_its_offsets_and_a_stale_one_writes_nothing,
    old_windows_and_superseded_versions_state_are_purged,
    combined_windows_from_instances_committing_at_once_are_final_once_and_exact,
    a_stale_batch_is_fenced_and_writes_nothing,
    a_message_id_is_remembered_while_its_event_is_stored,
    a_retried_message_id_is_found_after_many_batches_of_new_ones,
    a_claim_finds_each_ids_first_record_batch_after_batch,
    a_large_claim_with_an_id_claimed_before_keeps_every_first_record,
    claims_past_the_window_are_forgotten_and_the_rest_kept,
    the_rules_claims_join_the_metrics_claims,
    a_cached_profile_is_used_only_while_it_is_the_stored_one,
    a_snapshot_carries_metrics_and_rules_and_an_old_one_leaves_them_be,
    a_rule_batch_commits_its_states_and_alerts_with_its_offsets_once,
    alerts_of_every_rule_read_newest_first_a_page_at_a_time,
    delivery_outcomes_dead_letters_and_positions_are_kept_and_purged,
    the_archive_manifest_refuses_overlaps_and_keeps_what_is_above_the_position
);

/// The database of the deployment `backend` stands for: SQLite in the
/// directory for the embedded one (`None`), a fresh PostgreSQL database
/// for Kafka.
async fn database(backend: Backend) -> Option<String> {
    match backend {
        Backend::Embedded => None,
        Backend::Kafka => Some(test_database().await),
    }
}

async fn open(backend: Backend, dir: &TestDir) -> Store {
    Store::open(database(backend).await.as_deref(), dir.path())
        .await
        .expect("the store opens")
}

fn track(user: &str, message_id: &str) -> (EventEnvelope, String) {
    let event = EventEnvelope::new(EventType::Track, message_id, Utc::now())
        .user(user)
        .named("Tested");
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

async fn a_message_id_is_remembered_while_its_event_is_stored(backend: Backend) {
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
        "a retry while the events are stored changes nothing"
    );

    // The retention ends now: between the two.
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
        "once its event is purged the old id is new again; the recent one is still known"
    );
    assert_eq!(store.profile("d1").await.unwrap().unwrap().event_count, 3);
}

/// On PostgreSQL a profile batch looks its message ids up in `events`
/// only for a while after one met a stored id: a retry that comes after
/// many batches of new ids (none looked up) fails its batch's insert, and
/// the batch, run again, takes the retry as a duplicate, the new event
/// once, and nothing else.
async fn a_retried_message_id_is_found_after_many_batches_of_new_ones(backend: Backend) {
    let dir = TestDir::new();
    let store = open(backend, &dir).await;
    let mut next = 0;
    let mut apply = |events: Vec<(EventEnvelope, String)>| {
        let store = store.clone();
        let expected = (next > 0).then_some(next);
        next += 1;
        async move {
            store
                .apply_profile_batch(&batch(&events, expected, expected.unwrap_or(0) + 1))
                .await
                .unwrap()
        }
    };
    let first = apply(vec![track("r1", "r-0")]).await;
    assert_eq!((first.applied, first.duplicates), (1, 0));
    for i in 1..=40 {
        let fresh = apply(vec![track("r1", &format!("r-{i}"))]).await;
        assert_eq!((fresh.applied, fresh.duplicates), (1, 0), "batch {i}");
    }
    let retried = apply(vec![track("r1", "r-0"), track("r1", "r-41")]).await;
    assert_eq!(
        (retried.applied, retried.duplicates),
        (1, 1),
        "the retry is known, the new event applied"
    );
    let again = apply(vec![track("r1", "r-41"), track("r1", "r-42")]).await;
    assert_eq!((again.applied, again.duplicates), (1, 1));
    assert_eq!(store.profile("r1").await.unwrap().unwrap().event_count, 43);
    assert_eq!(
        store.offsets("profiles", "user_events").await.unwrap()[&0],
        43
    );
}

/// Claims `claims` (id, partition, offset) for the metrics, each received
/// at the same time.
async fn claim_for_metrics(store: &Store, claims: Vec<(String, i32, i64)>) -> Claimed {
    let claims = claims.into_iter().map(|(id, p, o)| (id, p, o, 4_000_000));
    claim_received(store, claims.collect()).await
}

/// Claims `claims` (id, partition, offset, received at) for the metrics.
async fn claim_received(store: &Store, claims: Vec<(String, i32, i64, i64)>) -> Claimed {
    let claims: Vec<(&str, i32, i64, i64)> = claims
        .iter()
        .map(|(id, p, o, r)| (id.as_str(), *p, *o, *r))
        .collect();
    store.claim_metric_ids("metrics", &claims).await.unwrap()
}

/// Claims in a row find each id's first record whatever the batches
/// before held: on PostgreSQL a claim is first a plain insert, which an id
/// claimed before (or twice in the batch) makes fail whole, and the claims
/// after such a failure are made with `ON CONFLICT` for a while.
async fn a_claim_finds_each_ids_first_record_batch_after_batch(backend: Backend) {
    let dir = TestDir::new();
    let store = open(backend, &dir).await;
    let claim = |claims| claim_for_metrics(&store, claims);
    let new = |round: i64| vec![(format!("n{round}"), 0, 100 + round)];
    let twice = claim(vec![("a".into(), 0, 1), ("a".into(), 1, 2)]).await;
    assert_eq!(
        twice,
        Claimed::Positions(traitline::store::FirstRecords::from_iter([(
            "a".to_owned(),
            (0, 1)
        )])),
        "of an id twice in a batch, the first record counts"
    );
    // Enough new ids, one batch each, to be past the claims made with care.
    for round in 0..20 {
        assert_eq!(claim(new(round)).await, Claimed::AllFirst, "round {round}");
    }
    let mixed = claim(vec![
        ("b".into(), 2, 3),
        ("n3".into(), 5, 9),
        ("a".into(), 4, 4),
    ])
    .await;
    assert!(mixed.is_retry("n3", 5, 9), "n3 was claimed at 0:103");
    assert!(mixed.is_retry("a", 4, 4));
    assert!(!mixed.is_retry("b", 2, 3), "b is new, and claimed once");
    for round in 20..40 {
        assert_eq!(claim(new(round)).await, Claimed::AllFirst, "round {round}");
    }
    let again = claim(vec![
        ("c".into(), 1, 7),
        ("c".into(), 0, 8),
        ("b".into(), 3, 3),
    ])
    .await;
    assert!(
        !again.is_retry("c", 1, 7),
        "the first of c in the batch counts"
    );
    assert!(again.is_retry("c", 0, 8));
    assert!(
        again.is_retry("b", 3, 3) && !again.is_retry("b", 2, 3),
        "b's first record is the one claimed with n3: {again:?}"
    );
}

/// A backlog's claims come by the hundred thousand, written a statement
/// of many rows at a time (SQLite: through its own API, every id new or
/// the write rolled back and made the long way). One id claimed before,
/// deep in the batch: that id's first record stays the earlier one, every
/// other claim in the batch is made, and none twice.
async fn a_large_claim_with_an_id_claimed_before_keeps_every_first_record(backend: Backend) {
    let dir = TestDir::new();
    let store = open(backend, &dir).await;
    let owned = |partition: i32| -> Vec<(String, i32, i64)> {
        (0..300)
            .map(|i| {
                (
                    format!("id-{i:04}"),
                    partition,
                    i64::from(partition) * 1000 + i,
                )
            })
            .collect()
    };
    let claim = |claims| claim_for_metrics(&store, claims);
    assert_eq!(
        claim(vec![("id-0200".into(), 7, 70)]).await,
        Claimed::AllFirst
    );
    let first = claim(owned(1)).await;
    assert!(first.is_retry("id-0200", 1, 1200), "claimed at 7:70 before");
    assert!(!first.is_retry("id-0200", 7, 70));
    for (id, partition, offset) in owned(1) {
        if id != "id-0200" {
            assert!(!first.is_retry(&id, partition, offset), "{id} is new");
        }
    }
    // The same ids from elsewhere: every one a retry of its first record.
    let again = claim(owned(2)).await;
    for ((id, partition, offset), (_, first_partition, first_offset)) in
        owned(2).into_iter().zip(owned(1))
    {
        assert!(again.is_retry(&id, partition, offset), "{id} was claimed");
        if id != "id-0200" {
            assert!(
                !again.is_retry(&id, first_partition, first_offset),
                "{id} first at 1:{first_offset}"
            );
        }
    }
    assert!(!again.is_retry("id-0200", 7, 70));
    // New ids after the long way: still claimed, and each once.
    let fresh: Vec<(String, i32, i64)> =
        (0..300).map(|i| (format!("fresh-{i:04}"), 3, i)).collect();
    assert_eq!(claim(fresh.clone()).await, Claimed::AllFirst);
    let twice = claim(fresh.iter().map(|(id, _, o)| (id.clone(), 4, *o)).collect()).await;
    assert!(
        fresh
            .iter()
            .all(|(id, _, o)| twice.is_retry(id, 4, *o) && !twice.is_retry(id, 3, *o))
    );
}

/// Claims received before the deduplication window are forgotten when
/// it is purged, and the rest kept: on SQLite a run all of whose claims
/// are older goes whole, and a run that straddles the window is
/// rewritten without its older claims.
async fn claims_past_the_window_are_forgotten_and_the_rest_kept(backend: Backend) {
    let dir = TestDir::new();
    let store = open(backend, &dir).await;
    let claim = |claims| claim_received(&store, claims);
    let (old, recent, cutoff) = (1_000_000, 9_000_000, 5_000_000);
    let all_old = (0..500).map(|i| (format!("old-{i}"), 0, i, old)).collect();
    assert_eq!(claim(all_old).await, Claimed::AllFirst);
    // One batch, half of it received before the cutoff.
    let straddling = (0..500)
        .map(|i| {
            (
                format!("mixed-{i}"),
                1,
                i,
                if i % 2 == 0 { old } else { recent },
            )
        })
        .collect();
    assert_eq!(claim(straddling).await, Claimed::AllFirst);
    store.purge(cutoff).await.unwrap();

    let again: Vec<(String, i32, i64, i64)> = (0..500)
        .flat_map(|i| {
            [
                (format!("old-{i}"), 2, i, recent),
                (format!("mixed-{i}"), 2, 1000 + i, recent),
            ]
        })
        .collect();
    let found = claim(again).await;
    for i in 0..500 {
        assert!(
            !found.is_retry(&format!("old-{i}"), 2, i),
            "old-{i} was forgotten"
        );
        assert_eq!(
            found.is_retry(&format!("mixed-{i}"), 2, 1000 + i),
            i % 2 == 1,
            "mixed-{i}: kept only if received after the cutoff"
        );
    }
}

/// Many batches of claims, merged as they add up (SQLite), are all found
/// after the store is opened again, each at its first record.
#[tokio::test]
async fn sqlite_claims_merged_over_many_batches_are_found_after_a_restart() {
    let dir = TestDir::new();
    let store = open(Backend::Embedded, &dir).await;
    let batch = |round: i64| -> Vec<(String, i32, i64)> {
        (0..150)
            .map(|i| {
                (
                    format!("{:032x}", (round * 150 + i) * 0x9E37_79B9),
                    0,
                    round * 150 + i,
                )
            })
            .collect()
    };
    for round in 0..70 {
        assert_eq!(
            claim_for_metrics(&store, batch(round)).await,
            Claimed::AllFirst
        );
    }
    store.close().await;
    let store = open(Backend::Embedded, &dir).await;
    let every: Vec<(String, i32, i64)> = (0..70)
        .flat_map(batch)
        .map(|(id, _, offset)| (id, 1, offset))
        .chain([("new".to_owned(), 1, -5)])
        .collect();
    let found = claim_for_metrics(&store, every.clone()).await;
    for (id, _, offset) in &every[..every.len() - 1] {
        assert!(found.is_retry(id, 1, *offset), "{id} was claimed");
        assert!(!found.is_retry(id, 0, *offset), "{id} first at 0:{offset}");
    }
    assert!(!found.is_retry("new", 1, -5));
}

/// Two writers of one SQLite file (two processes on one data directory,
/// here two stores) each keep the runs in memory, and each sees the
/// other's claims: an id claimed by one is a retry to the other.
#[tokio::test]
async fn sqlite_claims_of_another_writer_of_the_file_are_seen() {
    let dir = TestDir::new();
    let (one, other) = (
        open(Backend::Embedded, &dir).await,
        open(Backend::Embedded, &dir).await,
    );
    let ids = |prefix: &str, partition: i32| -> Vec<(String, i32, i64)> {
        (0..50)
            .map(|i| (format!("{prefix}-{i}"), partition, i))
            .collect()
    };
    assert_eq!(
        claim_for_metrics(&one, ids("a", 0)).await,
        Claimed::AllFirst
    );
    assert_eq!(
        claim_for_metrics(&other, ids("b", 1)).await,
        Claimed::AllFirst
    );
    let seen = claim_for_metrics(&other, ids("a", 2)).await;
    assert!(
        (0..50).all(|i| seen.is_retry(&format!("a-{i}"), 2, i)),
        "{seen:?}"
    );
    let seen = claim_for_metrics(&one, ids("b", 3)).await;
    assert!(
        (0..50).all(|i| seen.is_retry(&format!("b-{i}"), 3, i)),
        "{seen:?}"
    );
    assert_eq!(
        claim_for_metrics(&one, ids("c", 4)).await,
        Claimed::AllFirst
    );
}

/// A closed store claims nothing, on SQLite's own connection either; what
/// it claimed before is there when the file is opened again.
#[tokio::test]
async fn a_closed_sqlite_store_claims_nothing_and_keeps_its_claims() {
    let dir = TestDir::new();
    let store = open(Backend::Embedded, &dir).await;
    let claims = vec![("before".to_owned(), 1, 10)];
    assert_eq!(claim_for_metrics(&store, claims).await, Claimed::AllFirst);
    store.close().await;
    assert!(
        store
            .claim_metric_ids("metrics", &[("after", 1, 11, 4_000_000)])
            .await
            .is_err(),
        "a closed store takes no claim"
    );
    let store = open(Backend::Embedded, &dir).await;
    let again = claim_for_metrics(
        &store,
        vec![("before".to_owned(), 2, 20), ("after".to_owned(), 2, 21)],
    )
    .await;
    assert!(again.is_retry("before", 2, 20), "claimed before the close");
    assert!(!again.is_retry("after", 2, 21), "not claimed while closed");
}

/// SQLite's claims wait for another writer of the file, as every write of
/// the store does, and then go in; on a runtime of one thread too, where
/// a claim that blocked the thread would keep the writer from finishing.
#[tokio::test]
async fn a_claim_waits_for_another_writer_of_the_sqlite_file() {
    use sqlx::Connection;
    let dir = TestDir::new();
    let store = open(Backend::Embedded, &dir).await;
    let file = format!("sqlite://{}", dir.path().join("traitline.db").display());
    store
        .claim_metric_ids("metrics", &[("held", 5, 50, 4_000_000)])
        .await
        .unwrap();
    let mut writer = sqlx::SqliteConnection::connect(&file).await.unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut writer)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE written_meanwhile (x INTEGER)")
        .execute(&mut writer)
        .await
        .unwrap();
    let claims: Vec<(String, i32, i64, i64)> = (0..200)
        .map(|i| (format!("w-{i}"), 0, i, 4_000_000))
        .chain([("held".to_owned(), 0, 200, 4_000_000)])
        .collect();
    let claiming = tokio::spawn({
        let store = store.clone();
        async move {
            let claims: Vec<(&str, i32, i64, i64)> = claims
                .iter()
                .map(|(id, p, o, r)| (id.as_str(), *p, *o, *r))
                .collect();
            store.claim_metric_ids("metrics", &claims).await
        }
    });
    // The claim cannot finish while the other writer holds the file.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!claiming.is_finished(), "the claim waits for the writer");
    sqlx::query("COMMIT").execute(&mut writer).await.unwrap();
    let claimed = claiming
        .await
        .unwrap()
        .expect("the claim goes in once the file is free");
    assert!(
        claimed.is_retry("held", 0, 200),
        "the claim made before the writer's came first"
    );
    assert!((0..200).all(|i| !claimed.is_retry(&format!("w-{i}"), 0, i)));
}

async fn a_cached_profile_is_used_only_while_it_is_the_stored_one(backend: Backend) {
    let dir = TestDir::new();
    let url = database(backend).await;
    // Two instances of the service sharing one database.
    let here = Store::open(url.as_deref(), dir.path()).await.unwrap();
    let elsewhere = Store::open(url.as_deref(), dir.path()).await.unwrap();
    let count = async |store: &Store| store.profile("c1").await.unwrap().unwrap().event_count;

    here.apply_profile_batch(&batch(&[track("c1", "m1")], None, 1))
        .await
        .unwrap();
    // Spoil the stored state but not its version: only a batch that takes
    // the state from memory can go on.
    let sql =
        sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect(&url.clone().unwrap_or_else(|| {
                format!("sqlite://{}", dir.path().join("traitline.db").display())
            }))
            .await
            .unwrap();
    sqlx::query("UPDATE profiles SET state_json = 'spoiled'")
        .execute(&sql)
        .await
        .unwrap();
    here.apply_profile_batch(&batch(&[track("c1", "m2")], Some(1), 2))
        .await
        .expect("the state comes from memory");
    assert_eq!(count(&here).await, 2);

    // The other instance takes the partition for a batch, then this one
    // gets it back: its state in memory is one write behind the store's.
    elsewhere
        .apply_profile_batch(&batch(&[track("c1", "m3")], Some(2), 3))
        .await
        .unwrap();
    here.apply_profile_batch(&batch(&[track("c1", "m4")], Some(3), 4))
        .await
        .unwrap();
    assert_eq!(
        count(&here).await,
        4,
        "built on the stored state, not the one in memory"
    );

    // Deleted, the id starts a new profile.
    here.delete_profile("c1", Utc::now().timestamp_millis())
        .await
        .unwrap()
        .unwrap();
    // Received after the deletion (not within its millisecond).
    let mut after = track("c1", "m5");
    after.0.received_at += chrono::Duration::milliseconds(5);
    after.1 = serde_json::to_string(&after.0).unwrap();
    here.apply_profile_batch(&batch(&[after], Some(4), 5))
        .await
        .unwrap();
    assert_eq!(count(&here).await, 1);

    // A state written without a version (before versions, or restored
    // from a snapshot) is read from the store.
    sqlx::query("UPDATE profiles SET state_json = 'spoiled', version = 0")
        .execute(&sql)
        .await
        .unwrap();
    let refused = here
        .apply_profile_batch(&batch(&[track("c1", "m6")], Some(5), 6))
        .await;
    assert!(
        matches!(refused, Err(StoreError::Corrupt(_))),
        "{refused:?}"
    );
}

fn closed(group: &str, start_ms: i64, events: i64) -> StoredWindow {
    StoredWindow {
        metric: "orders_hourly".into(),
        version: 2,
        group: group.into(),
        start_ms,
        end_ms: start_ms + 3_600_000,
        value: events.to_string(),
        events,
    }
}

/// A group and a state with quotes, a backslash, braces, a comma and a
/// word SQL knows, stored and read back as they are.
const ODD_GROUP: &str = r#"u4"\{,} NULL"#;
const ODD_STATE: &str = r#"{"a":"\\"}"#;

async fn a_metric_batch_commits_with_its_offsets_and_a_stale_one_writes_nothing(backend: Backend) {
    let dir = TestDir::new();
    let store = open(backend, &dir).await;
    let processor = "metric:orders_hourly:2";
    let batch = |expected, next, clock, states, windows| MetricBatch {
        processor,
        metric: "orders_hourly",
        topic: "user_events",
        offsets: vec![OffsetAdvance {
            partition: 3,
            expected,
            next,
        }],
        clocks: vec![(3, clock)],
        states,
        windows,
        late: vec![],
        traits: vec![],
        deleted: vec![],
        combine: None,
        merges: vec![],
        merged: vec![],
    };
    let row = |state: &str, due| GroupRow {
        state: state.to_owned(),
        due: Some(due),
    };
    // An identify in partition 3 asks partition 5 for anonymous a1's
    // windows.
    let request = MergeRow {
        partition: 5,
        message_id: "m9".to_owned(),
        group: "a1".to_owned(),
        into_group: "u1".to_owned(),
        into_partition: 3,
        at: 4_000_000,
        state: None,
    };
    let first = MetricBatch {
        merges: vec![request.clone()],
        ..batch(
            None,
            10,
            5_000_000,
            vec![
                (3, "u1".to_owned(), Some(row(r#"{"slices":{}}"#, 3_900_000))),
                (3, ODD_GROUP.to_owned(), Some(row(ODD_STATE, 7_500_000))),
            ],
            vec![closed("u1", 0, 4)],
        )
    };
    store.apply_metric_batch(&first).await.unwrap();
    assert_eq!(
        store.metric_merges(processor).await.unwrap(),
        vec![request.clone()]
    );
    // Claims: the first record of an id is where it counts. A client's
    // retry (m1 again at partition 4) finds m1's first record at
    // partition 3, offset 5; the batch claiming it tried again finds its
    // own claim; of a new id twice in one batch, the first record counts.
    let first = store
        .claim_metric_ids(processor, &[("m1", 3, 5, 4_000_000)])
        .await
        .unwrap();
    assert_eq!(first, Claimed::AllFirst);
    let again = store
        .claim_metric_ids(
            processor,
            &[
                ("m1", 4, 9, 4_100_000),
                ("m1", 3, 5, 4_000_000),
                ("m2", 4, 10, 4_100_000),
                ("m3", 4, 11, 4_100_000),
                ("m3", 2, 7, 4_100_000),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        again,
        Claimed::Positions(traitline::store::FirstRecords::from_iter([
            ("m1".to_owned(), (3, 5)),
            ("m2".to_owned(), (4, 10)),
            ("m3".to_owned(), (4, 11))
        ]))
    );
    assert!(again.is_retry("m1", 4, 9));
    assert!(!again.is_retry("m1", 3, 5));
    assert!(again.is_retry("m3", 2, 7));
    assert!(!again.is_retry("m2", 4, 10));
    let (clock, states) = store
        .metric_states(processor, "user_events", 3)
        .await
        .unwrap();
    assert_eq!(clock, Some(5_000_000));
    assert_eq!(
        states,
        vec![
            ("u1".to_owned(), row(r#"{"slices":{}}"#, 3_900_000)),
            (ODD_GROUP.to_owned(), row(ODD_STATE, 7_500_000))
        ]
    );
    // What a runner under a memory budget reads back: a summary, chosen
    // groups, and the groups due by a limit with the next due after it.
    let summary = store.metric_state_summary(processor, 3).await.unwrap();
    assert_eq!(
        (summary.groups, summary.bytes, summary.first_due),
        (2, 23, Some(3_900_000))
    );
    let chosen = store
        .metric_states_of(processor, 3, &[ODD_GROUP, "nobody"])
        .await
        .unwrap();
    assert_eq!(
        chosen,
        vec![(ODD_GROUP.to_owned(), row(ODD_STATE, 7_500_000))]
    );
    let (due, next) = store
        .metric_states_due(processor, 3, 4_000_000)
        .await
        .unwrap();
    assert_eq!(
        (due, next),
        (
            vec![("u1".to_owned(), row(r#"{"slices":{}}"#, 3_900_000))],
            Some(7_500_000)
        )
    );
    assert_eq!(
        store.metric_state_summary(processor, 4).await.unwrap(),
        StateSummary::default()
    );

    // A second reader that also believed nothing was stored is fenced and
    // leaves no trace: not its state, window or clock.
    let handover = MergeRow {
        partition: 3,
        state: Some(r#"{"slices":{}}"#.to_owned()),
        ..request.clone()
    };
    let stale = MetricBatch {
        merged: vec![(5, "m9".to_owned(), "a1".to_owned())],
        merges: vec![handover.clone()],
        ..batch(
            None,
            12,
            9_000_000,
            vec![(3, "u2".to_owned(), Some(row("{}", 1)))],
            vec![closed("u2", 0, 1)],
        )
    };
    let refused = store.apply_metric_batch(&stale).await.unwrap_err();
    assert!(
        matches!(refused, StoreError::Fenced { partition: 3, .. }),
        "{refused}"
    );
    let (clock, states) = store
        .metric_states(processor, "user_events", 3)
        .await
        .unwrap();
    assert_eq!((clock, states.len()), (Some(5_000_000), 2));
    assert_eq!(
        store.metric_merges(processor).await.unwrap(),
        vec![request.clone()]
    );

    // Partition 5's runner (here the same batch, for brevity) takes the
    // request and hands the state over.
    let next = MetricBatch {
        merged: vec![(5, "m9".to_owned(), "a1".to_owned())],
        merges: vec![handover.clone()],
        ..batch(
            Some(10),
            20,
            8_000_000,
            vec![(3, "u1".to_owned(), None)],
            vec![closed("u1", 3_600_000, 2), closed("u3", 3_600_000, 1)],
        )
    };
    store.apply_metric_batch(&next).await.unwrap();
    assert_eq!(
        store.metric_merges(processor).await.unwrap(),
        vec![handover.clone()]
    );
    let (clock, states) = store
        .metric_states(processor, "user_events", 3)
        .await
        .unwrap();
    assert_eq!(
        (clock, states),
        (
            Some(8_000_000),
            vec![(ODD_GROUP.to_owned(), row(ODD_STATE, 7_500_000))]
        )
    );

    let query = |group, from_ms, to_ms| WindowQuery {
        metric: "orders_hourly",
        version: 2,
        group,
        from_ms,
        to_ms,
        limit: 100,
    };
    let all = store
        .metric_windows(&query(None, None, None))
        .await
        .unwrap();
    assert_eq!(
        all,
        vec![
            closed("u1", 0, 4),
            closed("u1", 3_600_000, 2),
            closed("u3", 3_600_000, 1)
        ]
    );
    let u1_later = store
        .metric_windows(&query(Some("u1"), Some(3_600_000), None))
        .await
        .unwrap();
    assert_eq!(u1_later, vec![closed("u1", 3_600_000, 2)]);
    let before = store
        .metric_windows(&query(None, None, Some(3_600_000)))
        .await
        .unwrap();
    assert_eq!(before, vec![closed("u1", 0, 4)]);
    // A window is written once: the same window again is refused.
    let again = batch(Some(20), 21, 8_000_000, vec![], vec![closed("u1", 0, 4)]);
    assert!(store.apply_metric_batch(&again).await.is_err());
    assert_eq!(
        store
            .metric_windows(&query(None, None, None))
            .await
            .unwrap()
            .len(),
        3
    );
}

/// Four instances, one partition each, commit their parts of the same
/// global windows at once, round after round: whichever commits last
/// makes each window final, exactly once and with every part.
async fn combined_windows_from_instances_committing_at_once_are_final_once_and_exact(
    backend: Backend,
) {
    const HOUR: i64 = 3_600_000;
    let dir = TestDir::new();
    let store = open(backend, &dir).await;
    let processor = "metric:revenue_hourly:1";
    let part = |partition: i32, hour: i64| {
        let mut partial = Aggregate::Sum.empty();
        for i in 0..=partition {
            let stamp = Stamp {
                at: hour * HOUR + i64::from(i),
                id: format!("m{partition}-{hour}-{i}").into(),
            };
            partial.observe(&stamp, Some(&serde_json::json!(0.1 * f64::from(i + 1))));
        }
        let closed = Closed {
            group: "*".to_owned(),
            window: Span {
                start: hour * HOUR,
                end: (hour + 1) * HOUR,
            },
            value: serde_json::Value::Null,
            partial,
            events: u64::try_from(partition).unwrap() + 1,
        };
        (partition, closed)
    };
    for hour in 0..6 {
        let batches: Vec<MetricBatch> = (0..4)
            .map(|partition| MetricBatch {
                processor,
                metric: "revenue_hourly",
                topic: "user_events",
                offsets: vec![OffsetAdvance {
                    partition,
                    expected: (hour > 0).then_some(hour),
                    next: hour + 1,
                }],
                // Past the window's end and its lateness (1 minute).
                clocks: vec![(partition, (hour + 1) * HOUR + 60_000)],
                states: vec![],
                windows: vec![],
                late: vec![],
                traits: vec![],
                deleted: vec![],
                combine: Some(Combine {
                    version: 1,
                    aggregate: Aggregate::Sum,
                    lateness_ms: 60_000,
                    partitions: 4,
                    parts: vec![part(partition, hour)],
                }),
                merges: vec![],
                merged: vec![],
            })
            .collect();
        let results =
            futures_util::future::join_all(batches.iter().map(|b| store.apply_metric_batch(b)))
                .await;
        for result in results {
            result.unwrap();
        }
    }
    let windows = store
        .metric_windows(&WindowQuery {
            metric: "revenue_hourly",
            version: 1,
            limit: 100,
            ..WindowQuery::default()
        })
        .await
        .unwrap();
    // 0.1 + (0.1 + 0.2) + (0.1 + 0.2 + 0.3) + (0.1 + ... + 0.4), summed
    // exactly: the expansion rounds once, at the end.
    let exact: f64 = [1, 3, 6, 10].iter().map(|n| f64::from(*n) * 0.1).sum();
    let expected: Vec<(i64, i64)> = (0..6).map(|hour| (hour * HOUR, 10)).collect();
    let got: Vec<(i64, i64)> = windows.iter().map(|w| (w.start_ms, w.events)).collect();
    assert_eq!(got, expected, "each hour final once, with all 10 events");
    for w in &windows {
        let value: f64 = w.value.parse().unwrap();
        assert!((value - exact).abs() < 1e-12, "{value} vs {exact}");
    }
}

/// The purge: closed windows past the retention go once published; a
/// version no longer current loses its working state, the current one
/// keeps it.
async fn old_windows_and_superseded_versions_state_are_purged(backend: Backend) {
    use traitline::store::DefinitionKind;
    let dir = TestDir::new();
    let store = open(backend, &dir).await;
    let body = |size: &str| {
        format!(
            r#"{{"aggregate":"count","group_by":"userId","window":{{"kind":"tumbling","size":"{size}"}}}}"#
        )
    };
    for size in ["1h", "2h"] {
        store
            .put_definition(DefinitionKind::Metric, "orders_hourly", &body(size))
            .await
            .unwrap();
    }
    for (version, windows) in [
        (1, vec![]),
        (2, vec![closed("u1", 0, 4), closed("u1", 3_600_000, 2)]),
    ] {
        let processor = traitline::process::metrics::processor_name("orders_hourly", version);
        let batch = MetricBatch {
            processor: &processor,
            metric: "orders_hourly",
            topic: "user_events",
            offsets: vec![OffsetAdvance {
                partition: 0,
                expected: None,
                next: 10,
            }],
            clocks: vec![(0, 9_000_000)],
            states: vec![(
                0,
                "u2".to_owned(),
                Some(GroupRow {
                    state: r#"{"slices":{}}"#.to_owned(),
                    due: Some(12_000_000),
                }),
            )],
            windows,
            late: vec![],
            // The old version kept a computed trait; the current one
            // keeps none.
            traits: (version == 1)
                .then(|| ComputedTrait {
                    metric: "orders_hourly".to_owned(),
                    version,
                    name: "orders_1h".to_owned(),
                    group: "u2".to_owned(),
                    value: "3".to_owned(),
                    at: 1,
                    seq: 0,
                })
                .into_iter()
                .collect(),
            deleted: vec![],
            combine: None,
            merges: vec![],
            merged: vec![],
        };
        store.apply_metric_batch(&batch).await.unwrap();
    }
    let published = |traits: Vec<(String, ComputedTrait)>| -> Vec<(String, String, i64)> {
        traits
            .into_iter()
            .map(|(p, t)| (p, t.group, t.seq))
            .collect()
    };
    let values = store.unpublished_traits(10).await.unwrap();
    store
        .mark_traits_published(&published(values))
        .await
        .unwrap();
    assert_eq!(
        traitline::process::metrics::purge_superseded(&store)
            .await
            .unwrap(),
        1
    );
    let processors = store.metric_processors().await.unwrap();
    assert_eq!(processors, vec!["metric:orders_hourly:2".to_owned()]);
    let (_, states) = store
        .metric_states("metric:orders_hourly:1", "user_events", 0)
        .await
        .unwrap();
    assert!(states.is_empty(), "the old version's state is gone");
    let (_, states) = store
        .metric_states("metric:orders_hourly:2", "user_events", 0)
        .await
        .unwrap();
    assert_eq!(states.len(), 1, "the current version's state stays");
    // The old version's trait leaves the profiles: a null value to send.
    let removals = store.unpublished_traits(10).await.unwrap();
    assert_eq!(
        removals
            .iter()
            .map(|(p, t)| (p.as_str(), t.name.as_str(), t.value.as_str()))
            .collect::<Vec<_>>(),
        vec![("metric:orders_hourly:1", "orders_1h", "null")]
    );
    store
        .mark_traits_published(&published(removals))
        .await
        .unwrap();
    assert_eq!(store.purge_published_removals().await.unwrap(), 1);

    // Windows ending before the cut go only once published.
    let query = WindowQuery {
        metric: "orders_hourly",
        version: 2,
        limit: 10,
        ..WindowQuery::default()
    };
    assert_eq!(store.purge_metric_windows(7_200_000).await.unwrap(), 0);
    let unpublished = store.unpublished_windows(10).await.unwrap();
    store.mark_windows_published(&unpublished).await.unwrap();
    assert_eq!(store.purge_metric_windows(7_200_000).await.unwrap(), 1);
    assert_eq!(
        store.metric_windows(&query).await.unwrap(),
        vec![closed("u1", 3_600_000, 2)]
    );
}

/// A snapshot holds the definitions, each metric version's offsets,
/// clock, open state, closed windows and computed traits, and each rule
/// version's offsets, clock, partial matches and alerts: restored into a
/// new store, they go on from there. An older snapshot restored leaves
/// what it does not hold where it is: the rules (format 2), the metrics
/// too (format 1).
/// Migration 21: the claims the rules made under their own name before
/// they shared the metrics' runner are the metrics' now, where the
/// metrics' own claim of the same id is kept.
async fn the_rules_claims_join_the_metrics_claims(backend: Backend) {
    use sqlx::Connection;
    let dir = TestDir::new();
    let url = database(backend).await;
    Store::open(url.as_deref(), dir.path())
        .await
        .unwrap()
        .close()
        .await;
    // The claims as a version before migration 21 left them: rows, the
    // rules' under their own name.
    let older = [
        "INSERT INTO metric_seen (processor, message_id, partition, record_offset, received_at) \
         VALUES ('rules', 'by-a-rule', 2, 7, 4000000), ('rules', 'by-both', 1, 3, 4000000), \
         ('metrics', 'by-both', 1, 3, 4000000), ('metrics', 'by-a-metric', 0, 1, 4000000)",
        "DELETE FROM _sqlx_migrations WHERE version = 21",
    ];
    match &url {
        Some(url) => {
            let mut connection = sqlx::PgConnection::connect(url).await.unwrap();
            for sql in older {
                sqlx::query(sql).execute(&mut connection).await.unwrap();
            }
        }
        None => {
            let file = format!("sqlite://{}", dir.path().join("traitline.db").display());
            let mut connection = sqlx::SqliteConnection::connect(&file).await.unwrap();
            for sql in older {
                sqlx::query(sql).execute(&mut connection).await.unwrap();
            }
        }
    }
    let store = Store::open(url.as_deref(), dir.path()).await.unwrap();
    let retried = [
        ("by-a-rule", 2, 9),
        ("by-both", 1, 8),
        ("by-a-metric", 0, 4),
    ];
    let first = store
        .claim_metric_ids(
            "metrics",
            &retried
                .iter()
                .map(|&(id, p, o)| (id, p, o, 4_000_000))
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    assert_eq!(
        first,
        Claimed::Positions(traitline::store::FirstRecords::from_iter([
            ("by-a-rule".to_owned(), (2, 7)),
            ("by-both".to_owned(), (1, 3)),
            ("by-a-metric".to_owned(), (0, 1)),
        ]))
    );
    assert_eq!(
        store
            .claim_metric_ids("rules", &[("by-a-rule", 2, 9, 4_000_000)])
            .await
            .unwrap(),
        Claimed::AllFirst,
        "no claim is left under the rules' name"
    );
}

async fn a_snapshot_carries_metrics_and_rules_and_an_old_one_leaves_them_be(backend: Backend) {
    use traitline::store::DefinitionKind;
    let dir = TestDir::new();
    let store = open(backend, &dir).await;
    let body = r#"{"aggregate":"count","group_by":"userId","window":{"kind":"tumbling","size":"1h"},"trait":"orders_1h"}"#;
    store
        .put_definition(DefinitionKind::Metric, "orders_hourly", body)
        .await
        .unwrap();
    let processor = traitline::process::metrics::processor_name("orders_hourly", 1);
    // A claim as the rules made theirs before migration 21, and one of
    // the metrics' (on SQLite both are in runs, written out as rows).
    store
        .claim_metric_ids("rules", &[("by-a-rule", 3, 5, 4_000_000)])
        .await
        .unwrap();
    store
        .claim_metric_ids("metrics", &[("by-a-metric", 2, 4, 4_000_000)])
        .await
        .unwrap();
    let state = GroupRow {
        state: r#"{"slices":{}}"#.to_owned(),
        due: Some(12_000_000),
    };
    let mut window = closed("u1", 0, 4);
    window.version = 1;
    let batch = MetricBatch {
        processor: &processor,
        metric: "orders_hourly",
        topic: "user_events",
        offsets: vec![OffsetAdvance {
            partition: 3,
            expected: None,
            next: 10,
        }],
        clocks: vec![(3, 9_000_000)],
        states: vec![(3, "u2".to_owned(), Some(state.clone()))],
        windows: vec![window.clone()],
        late: vec![],
        traits: vec![ComputedTrait {
            metric: "orders_hourly".to_owned(),
            version: 1,
            name: "orders_1h".to_owned(),
            group: "u2".to_owned(),
            value: "3".to_owned(),
            at: 1,
            seq: 0,
        }],
        deleted: vec![],
        combine: None,
        merges: vec![],
        merged: vec![],
    };
    store.apply_metric_batch(&batch).await.unwrap();
    let rule_body =
        r#"{"steps": [{"name": "big", "where": "properties.amount > 100"}], "within": "1m"}"#;
    store
        .put_definition(DefinitionKind::Rule, "big_spender", rule_body)
        .await
        .unwrap();
    let rule = "rule:big_spender:1";
    let alert = StoredAlert {
        id: "big_spender:1:u3:m1".to_owned(),
        rule: "big_spender".to_owned(),
        version: 1,
        key: "u3".to_owned(),
        at: 1_000,
        body: "{}".to_owned(),
    };
    let partial = (3, "u4".to_owned(), Some(r#"{"runs":[]}"#.to_owned()));
    // A batch of the rule's on partition 3, from `expected` to `next`.
    let rule_batch = |expected, next, states, alerts| RuleBatch {
        processor: rule,
        rule: "big_spender",
        topic: "user_events",
        offsets: vec![OffsetAdvance {
            partition: 3,
            expected,
            next,
        }],
        clocks: vec![(3, 8_000_000)],
        states,
        deleted: vec![],
        alerts,
    };
    store
        .apply_rule_batch(&rule_batch(
            None,
            7,
            vec![partial.clone()],
            vec![alert.clone()],
        ))
        .await
        .unwrap();
    let mut snapshot = Vec::new();
    let info = store
        .write_snapshot("profiles", &mut snapshot)
        .await
        .unwrap();
    assert_eq!(info.format, 5);

    let other = TestDir::new();
    let restored = open(backend, &other).await;
    let topics = ["user_events".to_owned()];
    restored
        .restore_snapshot("profiles", &topics, snapshot.as_slice(), false)
        .await
        .unwrap();
    let definition = restored
        .definition(DefinitionKind::Metric, "orders_hourly")
        .await
        .unwrap()
        .expect("the definition is restored");
    assert_eq!((definition.version, definition.body.as_str()), (1, body));
    let offsets = restored.offsets(&processor, "user_events").await.unwrap();
    assert_eq!(offsets.get(&3), Some(&10));
    let (clock, states) = restored
        .metric_states(&processor, "user_events", 3)
        .await
        .unwrap();
    assert_eq!(
        (clock, states),
        (Some(9_000_000), vec![("u2".to_owned(), state)])
    );
    let query = WindowQuery {
        metric: "orders_hourly",
        version: 1,
        limit: 10,
        ..WindowQuery::default()
    };
    assert_eq!(restored.metric_windows(&query).await.unwrap(), vec![window]);
    let traits = restored.unpublished_traits(10).await.unwrap();
    assert_eq!(traits.len(), 1);
    assert_eq!(
        (traits[0].1.name.as_str(), traits[0].1.value.as_str()),
        ("orders_1h", "3")
    );
    let rule_state = || async {
        let offsets = restored.offsets(rule, "user_events").await.unwrap();
        let (clock, states) = restored.rule_states(rule, "user_events", 3).await.unwrap();
        let alerts = restored.unpublished_alerts(10).await.unwrap();
        (offsets.get(&3).copied(), clock, states, alerts.len())
    };
    let held = (
        Some(7),
        Some(8_000_000),
        vec![(partial.1.clone(), partial.2.clone().unwrap())],
        1,
    );
    assert_eq!(rule_state().await, held);
    assert_eq!(
        restored.unpublished_alerts(10).await.unwrap()[0].id,
        alert.id
    );
    assert!(
        restored
            .claim_metric_ids("metrics", &[("by-a-metric", 2, 8, 4_000_000)])
            .await
            .unwrap()
            .is_retry("by-a-metric", 2, 8),
        "the metrics' claims are restored, first at 2:4"
    );
    // Each restore rewrites the claims whole, so this claim goes with the
    // next one.
    let claimed_by_a_rule = |store: Store| async move {
        store
            .claim_metric_ids("metrics", &[("by-a-rule", 3, 9, 4_000_000)])
            .await
            .unwrap()
    };
    assert_eq!(
        claimed_by_a_rule(restored.clone()).await,
        Claimed::AllFirst,
        "format 5 holds the claims as they were"
    );

    // The same snapshot as format 2 wrote it: no rule rows.
    let text = String::from_utf8(snapshot).unwrap();
    let mut kept: BTreeMap<String, u64> = BTreeMap::new();
    let mut format_2: Vec<String> = text
        .lines()
        .filter_map(|line| {
            let mut value: Value = serde_json::from_str(line).unwrap();
            if let Some(info) = value.get_mut("snapshot") {
                info["format"] = 2.into();
                info["rows"] = serde_json::json!({});
            } else if value.get("end").is_some() {
                return None;
            } else {
                let table = value["row"]["table"].as_str().unwrap().to_owned();
                let of_rule = value["row"]["values"][0]
                    .as_str()
                    .is_some_and(|p| p.starts_with("rule:"));
                if ["rule_state", "alerts"].contains(&table.as_str())
                    || (table == "processor_offsets" && of_rule)
                {
                    return None;
                }
                *kept.entry(table).or_default() += 1;
            }
            Some(value.to_string())
        })
        .collect();
    format_2.push(serde_json::json!({"end": {"rows": kept}}).to_string());
    restored
        .apply_rule_batch(&rule_batch(Some(7), 9, vec![], vec![]))
        .await
        .unwrap();
    restored
        .restore_snapshot("profiles", &topics, format_2.join("\n").as_bytes(), false)
        .await
        .unwrap();
    assert_eq!(
        rule_state().await,
        (Some(9), held.1, held.2.clone(), held.3),
        "the rules are left as they were"
    );
    assert_eq!(
        restored
            .offsets(&processor, "user_events")
            .await
            .unwrap()
            .get(&3),
        Some(&10)
    );

    // The same snapshot as format 1 wrote it: the profile tables only.
    let profile_tables = [
        "profiles",
        "identities",
        "profile_changes",
        "events",
        "deleted_ids",
    ];
    let old: Vec<String> = text
        .lines()
        .filter_map(|line| {
            let mut value: Value = serde_json::from_str(line).unwrap();
            if let Some(info) = value.get_mut("snapshot") {
                info["format"] = 1.into();
                info["rows"] = serde_json::json!({});
            } else if let Some(rows) = value.pointer_mut("/end/rows") {
                rows.as_object_mut()
                    .unwrap()
                    .retain(|table, _| profile_tables.contains(&table.as_str()));
            } else if !profile_tables.contains(&value["row"]["table"].as_str().unwrap()) {
                return None;
            }
            Some(value.to_string())
        })
        .collect();
    restored
        .restore_snapshot("profiles", &topics, old.join("\n").as_bytes(), false)
        .await
        .unwrap();
    let offsets = restored.offsets(&processor, "user_events").await.unwrap();
    assert_eq!(
        offsets.get(&3),
        Some(&10),
        "the metrics are left as they were"
    );
    assert!(
        restored
            .definition(DefinitionKind::Metric, "orders_hourly")
            .await
            .unwrap()
            .is_some()
    );

    // As the build before pattern states could hold spans wrote it
    // (format 3, the same tables): restored whole, the rules' claims
    // joining the metrics'. A format this build does not know is refused,
    // naming it: it may hold what this build cannot read.
    let as_format = |format: u32| -> String {
        text.lines()
            .map(|line| {
                let mut value: Value = serde_json::from_str(line).unwrap();
                if let Some(info) = value.get_mut("snapshot") {
                    info["format"] = format.into();
                }
                value.to_string()
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    restored
        .restore_snapshot("profiles", &topics, as_format(3).as_bytes(), false)
        .await
        .unwrap();
    assert_eq!(rule_state().await, held);
    assert_eq!(
        claimed_by_a_rule(restored.clone()).await,
        Claimed::Positions(traitline::store::FirstRecords::from_iter([(
            "by-a-rule".to_owned(),
            (3, 5)
        )])),
        "a rule's claim of an older snapshot is the metrics' now"
    );
    let refused = restored
        .restore_snapshot("profiles", &topics, as_format(6).as_bytes(), false)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("format 6"), "{refused}");
    assert_eq!(rule_state().await, held, "nothing changed");
}

/// A rule version's batch: states and alerts commit with its offsets; a
/// stale batch (fenced) writes nothing; a batch tried again writes its
/// alerts once; alerts read newest first, by rule, key and time, a page
/// at a time; published ones leave the relay's list.
async fn a_rule_batch_commits_its_states_and_alerts_with_its_offsets_once(backend: Backend) {
    let dir = TestDir::new();
    let store = open(backend, &dir).await;
    let processor = "rule:card_testing:1";
    let alert = |key: &str, first: &str, at| StoredAlert {
        id: format!("card_testing:1:{key}:{first}"),
        rule: "card_testing".to_owned(),
        version: 1,
        key: key.to_owned(),
        at,
        body: format!(r#"{{"key":"{key}","at":{at}}}"#),
    };
    let batch = |expected, next, states, alerts| RuleBatch {
        processor,
        rule: "card_testing",
        deleted: vec![],
        topic: "user_events",
        offsets: vec![OffsetAdvance {
            partition: 2,
            expected,
            next,
        }],
        clocks: vec![(2, 9_000)],
        states,
        alerts,
    };
    let first = batch(
        None,
        5,
        vec![
            (2, "u1".to_owned(), Some(r#"{"runs":[1]}"#.to_owned())),
            (2, "u2".to_owned(), Some(r#"{"runs":[2]}"#.to_owned())),
        ],
        vec![alert("u3", "m1", 1_000), alert("u4", "m2", 2_000)],
    );
    store.apply_rule_batch(&first).await.unwrap();
    // Tried again from the same offset: fenced, nothing written twice.
    let again = store.apply_rule_batch(&first).await;
    assert!(matches!(again, Err(StoreError::Fenced { .. })), "{again:?}");
    let second = batch(
        Some(5),
        9,
        vec![
            (2, "u1".to_owned(), None),
            (2, "u2".to_owned(), Some(r#"{"runs":[3]}"#.to_owned())),
        ],
        // The same alert as the first batch's (a retry after a failed
        // commit makes the same ids), and a new one.
        vec![alert("u4", "m2", 2_000), alert("u4", "m7", 3_000)],
    );
    store.apply_rule_batch(&second).await.unwrap();

    let (clock, states) = store
        .rule_states(processor, "user_events", 2)
        .await
        .unwrap();
    assert_eq!(clock, Some(9_000));
    assert_eq!(
        states,
        vec![("u2".to_owned(), r#"{"runs":[3]}"#.to_owned())]
    );
    let offsets = store.offsets(processor, "user_events").await.unwrap();
    assert_eq!(offsets, HashMap::from([(2, 9)]));

    let ids = |alerts: Vec<StoredAlert>| alerts.into_iter().map(|a| a.id).collect::<Vec<_>>();
    let query = |rule, key, from, before, limit| AlertQuery {
        rule,
        key,
        from,
        before,
        limit,
    };
    let all = store
        .alerts(&query(Some("card_testing"), None, None, None, 10))
        .await
        .unwrap();
    assert_eq!(
        ids(all.clone()),
        vec![
            "card_testing:1:u4:m7",
            "card_testing:1:u4:m2",
            "card_testing:1:u3:m1"
        ]
    );
    assert_eq!(all[0].body, r#"{"key":"u4","at":3000}"#);
    assert_eq!(
        ids(store
            .alerts(&query(None, Some("u4"), None, None, 10))
            .await
            .unwrap())
        .len(),
        2
    );
    assert_eq!(
        ids(store
            .alerts(&query(None, None, Some(2_000), None, 10))
            .await
            .unwrap())
        .len(),
        2
    );
    let page = store
        .alerts(&query(None, None, None, None, 2))
        .await
        .unwrap();
    let last = page.last().unwrap();
    let next = store
        .alerts(&query(None, None, None, Some((last.at, &last.id)), 2))
        .await
        .unwrap();
    assert_eq!(ids(next), vec!["card_testing:1:u3:m1"]);
    assert!(
        store
            .alerts(&query(Some("other"), None, None, None, 10))
            .await
            .unwrap()
            .is_empty()
    );

    let unpublished = store.unpublished_alerts(10).await.unwrap();
    assert_eq!(unpublished.len(), 3);
    let published: Vec<&str> = unpublished[..2].iter().map(|a| a.id.as_str()).collect();
    store.mark_alerts_published(&published).await.unwrap();
    assert_eq!(
        ids(store.unpublished_alerts(10).await.unwrap()),
        vec![unpublished[2].id.clone()]
    );

    // A GDPR deletion of u4: its alerts go, but one the same batch made
    // after the deletion stays.
    let deletion = RuleBatch {
        deleted: vec!["u4".to_owned()],
        ..batch(Some(9), 12, vec![], vec![alert("u4", "m9", 4_000)])
    };
    store.apply_rule_batch(&deletion).await.unwrap();
    assert_eq!(
        ids(store
            .alerts(&query(None, None, None, None, 10))
            .await
            .unwrap()),
        vec!["card_testing:1:u4:m9", "card_testing:1:u3:m1"]
    );

    // The rule changes (version 2 runs): version 1's partial matches and
    // offsets go, its alerts stay.
    let rule = |over: u32| {
        format!(
            r#"{{"steps": [{{"name": "big", "where": "properties.amount > {over}"}}], "within": "1m"}}"#
        )
    };
    for over in [100, 200] {
        store
            .put_definition(
                traitline::store::DefinitionKind::Rule,
                "card_testing",
                &rule(over),
            )
            .await
            .unwrap();
    }
    let current = RuleBatch {
        processor: "rule:card_testing:2",
        ..batch(
            None,
            3,
            vec![(2, "u9".to_owned(), Some("{}".to_owned()))],
            vec![],
        )
    };
    store.apply_rule_batch(&current).await.unwrap();
    let purge = || traitline::process::rules::purge_superseded(&store);
    assert_eq!(purge().await.unwrap(), 1);
    assert_eq!(purge().await.unwrap(), 0, "nothing left to purge");
    assert_eq!(
        store.rule_processors().await.unwrap(),
        vec!["rule:card_testing:2".to_owned()]
    );
    let (clock, states) = store
        .rule_states(processor, "user_events", 2)
        .await
        .unwrap();
    assert_eq!((clock, states), (None, vec![]));
    let (_, states) = store
        .rule_states("rule:card_testing:2", "user_events", 2)
        .await
        .unwrap();
    assert_eq!(states.len(), 1, "the running version's state stays");
    assert_eq!(
        store
            .alerts(&query(Some("card_testing"), None, None, None, 10))
            .await
            .unwrap()
            .len(),
        2
    );
}

/// Alerts of several rules, read without a rule or key (each rule's
/// newest merged, or, past 64 rules or 20,000 alerts to merge, one
/// statement over them all): newest first, equal times by id, a page at
/// a time with nothing skipped or repeated, from a time on.
async fn alerts_of_every_rule_read_newest_first_a_page_at_a_time(backend: Backend) {
    let dir = TestDir::new();
    let store = open(backend, &dir).await;
    let write = |rule: String, alerts: Vec<(&'static str, i64)>| {
        let store = &store;
        async move {
            let processor = format!("rule:{rule}:1");
            let alerts = alerts
                .into_iter()
                .map(|(first, at)| StoredAlert {
                    id: format!("{rule}:1:u1:{first}"),
                    rule: rule.clone(),
                    version: 1,
                    key: "u1".to_owned(),
                    at,
                    body: "{}".to_owned(),
                })
                .collect();
            let batch = RuleBatch {
                processor: &processor,
                rule: &rule,
                topic: "user_events",
                offsets: vec![OffsetAdvance {
                    partition: 0,
                    expected: None,
                    next: 1,
                }],
                clocks: vec![],
                states: vec![],
                deleted: vec![],
                alerts,
            };
            store.apply_rule_batch(&batch).await.unwrap();
        }
    };
    // Every page of `limit` from `from` on, as ids.
    let pages = |from: Option<i64>, limit: u32| {
        let store = &store;
        async move {
            let mut seen: Vec<(i64, String)> = Vec::new();
            loop {
                let query = AlertQuery {
                    from,
                    before: seen.last().map(|(at, id)| (*at, id.as_str())),
                    limit,
                    ..AlertQuery::default()
                };
                let page = store.alerts(&query).await.unwrap();
                assert!(page.len() <= limit as usize);
                if page.is_empty() {
                    break seen.into_iter().map(|(_, id)| id).collect::<Vec<_>>();
                }
                seen.extend(page.into_iter().map(|a| (a.at, a.id)));
            }
        }
    };

    write(
        "b".into(),
        vec![("m2", 3_000), ("m4", 4_000), ("m6", 6_000)],
    )
    .await;
    write(
        "a".into(),
        vec![("m1", 1_000), ("m3", 3_000), ("m5", 5_000)],
    )
    .await;
    write("c".into(), vec![("m3", 3_000), ("m7", 7_000)]).await;
    let newest_first = vec![
        "c:1:u1:m7",
        "b:1:u1:m6",
        "a:1:u1:m5",
        "b:1:u1:m4",
        "c:1:u1:m3",
        "b:1:u1:m2",
        "a:1:u1:m3",
        "a:1:u1:m1",
    ];
    // 7,000 a page: more than 20,000 alerts to read for three rules' pages,
    // so one statement.
    for limit in [1, 2, 3, 10, 7_000] {
        assert_eq!(pages(None, limit).await, newest_first, "pages of {limit}");
    }
    assert_eq!(pages(Some(3_000), 2).await, newest_first[..7]);

    // Past 64 rules, one statement sorts them all, alike.
    for n in 0..64 {
        write(format!("r{n:02}"), vec![("m0", 2_000 + n)]).await;
    }
    let all = pages(None, 5).await;
    assert_eq!(all.len(), 8 + 64);
    assert_eq!(all[..7], newest_first[..7]);
    assert_eq!(all[7..9], ["r63:1:u1:m0", "r62:1:u1:m0"]);
    assert_eq!(all[70..], ["r00:1:u1:m0", "a:1:u1:m1"]);
    assert_eq!(pages(Some(3_000), 3).await, newest_first[..7]);
}

fn outcome(id: &str, attempt: i32, what: &str, at: i64, dead: &[&str]) -> DeliveryOutcome {
    DeliveryOutcome {
        attempt_id: format!("{id}-{attempt}"),
        destination: "crm".into(),
        version: 1,
        delivery_id: id.into(),
        attempt,
        partition: 0,
        offset: 7,
        key: Some("u1".into()),
        outcome: what.into(),
        status: Some(503),
        latency_ms: i64::from(attempt) * 10,
        response: "answered 503".into(),
        at,
        dead_letters: dead
            .iter()
            .map(|d| DeadLetter {
                delivery_id: (*d).into(),
                partition: 0,
                offset: 7,
                key: Some("u1".into()),
                body: format!(r#"{{"messageId": "{d}"}}"#),
            })
            .collect(),
    }
}

async fn delivery_outcomes_dead_letters_and_positions_are_kept_and_purged(backend: Backend) {
    let dir = TestDir::new();
    let store = open(backend, &dir).await;
    let now = traitline::store::now_ms();
    let day = 86_400_000;
    store
        .record_deliveries(&[
            outcome("old", 1, "retrying", now - 10 * day, &[]),
            outcome("m1", 1, "retrying", now - 2000, &[]),
            outcome("m1", 2, "dead_letter", now - 1000, &["m1"]),
            // A batch given up on: each record a dead letter of its own.
            outcome("batch-m2-2", 1, "dead_letter", now - 500, &["m2", "m3"]),
        ])
        .await
        .unwrap();
    let failures = store
        .delivery_failures("crm", None, None, 100)
        .await
        .unwrap();
    let ids: Vec<&str> = failures.iter().map(|f| f.delivery_id.as_str()).collect();
    assert_eq!(ids, vec!["m1", "m2", "m3"]);
    assert_eq!(
        (failures[0].attempts, failures[0].body.as_str()),
        (2, r#"{"messageId": "m1"}"#)
    );
    // Paged by the cursor of the page before.
    let next = store
        .delivery_failures("crm", None, Some((failures[0].failed_at, "m1")), 100)
        .await
        .unwrap();
    assert_eq!(next.len(), 2);

    // A replay delivers m1: it is no longer a dead letter.
    store
        .record_deliveries(&[outcome("m1", 3, "delivered", now, &[])])
        .await
        .unwrap();
    let left: Vec<String> = store
        .delivery_failures("crm", None, None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.delivery_id)
        .collect();
    assert_eq!(left, vec!["m2", "m3"]);
    let summary = store.delivery_summary("crm", now - day).await.unwrap();
    assert_eq!(
        (summary.delivered, summary.retried, summary.dead_letters),
        (1, 3, 2)
    );
    assert_eq!(summary.p95_latency_ms, Some(30));

    // Positions with the work finished above them; a stale save is fenced.
    let advance = |expected, next| {
        vec![OffsetAdvance {
            partition: 0,
            expected,
            next,
        }]
    };
    let done = HashMap::from([(0, vec![(12, 15), (20, 21)])]);
    store
        .save_positions("destination:crm", "user_events", &advance(None, 10), &done)
        .await
        .unwrap();
    assert_eq!(
        store
            .done_above("destination:crm", "user_events")
            .await
            .unwrap(),
        done
    );
    let fenced = store
        .save_positions(
            "destination:crm",
            "user_events",
            &advance(Some(5), 21),
            &HashMap::new(),
        )
        .await;
    assert!(
        matches!(fenced, Err(StoreError::Fenced { .. })),
        "{fenced:?}"
    );
    store
        .save_positions(
            "destination:crm",
            "user_events",
            &advance(Some(10), 21),
            &HashMap::new(),
        )
        .await
        .unwrap();
    assert!(
        store
            .done_above("destination:crm", "user_events")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .offsets("destination:crm", "user_events")
            .await
            .unwrap()[&0],
        21
    );

    // Only attempts on user_deliveries and past the retention go.
    assert_eq!(
        store.purge_delivery_attempts(now - day).await.unwrap(),
        0,
        "not yet published"
    );
    let unpublished = store.unpublished_deliveries(100).await.unwrap();
    assert_eq!(unpublished.len(), 5);
    let ids: Vec<&str> = unpublished.iter().map(|o| o.attempt_id.as_str()).collect();
    store.mark_deliveries_published(&ids).await.unwrap();
    assert_eq!(store.purge_delivery_attempts(now - day).await.unwrap(), 1);
    let kept = store.delivery_attempts("crm", 100).await.unwrap();
    assert_eq!(kept.len(), 4);
    assert_eq!(kept[0].outcome, "delivered", "newest first");
    assert_eq!(
        store
            .delivery_failures("crm", None, None, 100)
            .await
            .unwrap()
            .len(),
        2,
        "dead letters stay"
    );
}

fn archived(partition: i32, first: i64, last: i64) -> ArchivedObject {
    ArchivedObject {
        partition,
        first,
        last,
        key: format!("raw/p{partition}-{first}-{last}.jsonl.gz"),
        records: last - first + 1,
        bytes: 100,
        first_at: 1_000,
        uploaded_at: None,
    }
}

async fn the_archive_manifest_refuses_overlaps_and_keeps_what_is_above_the_position(
    backend: Backend,
) {
    let dir = TestDir::new();
    let store = open(backend, &dir).await;
    for object in [archived(0, 0, 9), archived(0, 10, 19), archived(1, 0, 4)] {
        assert!(store.claim_archive_object("raw", &object).await.unwrap());
    }
    // The same range again (an upload tried again) is taken; one that
    // overlaps another object is refused and stores nothing.
    assert!(
        store
            .claim_archive_object("raw", &archived(0, 10, 19))
            .await
            .unwrap()
    );
    assert!(
        !store
            .claim_archive_object("raw", &archived(0, 10, 14))
            .await
            .unwrap()
    );
    assert!(
        !store
            .claim_archive_object("raw", &archived(0, 15, 25))
            .await
            .unwrap()
    );
    assert!(
        store
            .claim_archive_object("other", &archived(0, 15, 25))
            .await
            .unwrap()
    );
    store.archive_uploaded("raw", 0, 0, 2_000).await.unwrap();

    let all = store.archived_objects("raw", None, 0).await.unwrap();
    let ranges: Vec<(i32, i64, i64, Option<i64>)> = all
        .iter()
        .map(|o| (o.partition, o.first, o.last, o.uploaded_at))
        .collect();
    assert_eq!(
        ranges,
        [(0, 0, 9, Some(2_000)), (0, 10, 19, None), (1, 0, 4, None)]
    );
    assert_eq!(store.archived_partitions("raw").await.unwrap().len(), 2);

    // Above the stored position: what a restart must close at again.
    store
        .save_positions(
            "destination:raw",
            "user_events",
            &[OffsetAdvance {
                partition: 0,
                expected: None,
                next: 10,
            }],
            &HashMap::new(),
        )
        .await
        .unwrap();
    let above = store
        .archived_above("raw", "destination:raw", "user_events")
        .await
        .unwrap();
    let ranges: Vec<(i32, i64)> = above.iter().map(|o| (o.partition, o.first)).collect();
    assert_eq!(
        ranges,
        [(0, 10), (1, 0)],
        "partition 1 has no position: all of it"
    );
}

/// A connection to a new PostgreSQL database the store has migrated.
async fn migrated_postgresql() -> sqlx::PgConnection {
    let url = test_database().await;
    let dir = TestDir::new();
    Store::open(Some(&url), dir.path())
        .await
        .expect("the store opens");
    <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap()
}

/// Window and partial-match states, rewritten by every batch, are
/// compressed with lz4 on PostgreSQL (migration 16), not pglz.
#[tokio::test]
async fn postgresql_compresses_states_with_lz4() {
    let mut connection = migrated_postgresql().await;
    let methods: Vec<(String, String)> = sqlx::query_as(
        "SELECT attrelid::regclass::text, attcompression::text FROM pg_attribute \
         WHERE attname = 'state' AND attrelid IN ('rule_state'::regclass, 'metric_state'::regclass) \
         ORDER BY 1",
    )
    .fetch_all(&mut connection)
    .await
    .unwrap();
    let lz4 = |table: &str| (table.to_owned(), "l".to_owned());
    assert_eq!(methods, [lz4("metric_state"), lz4("rule_state")]);
}

/// The start-up advice reads PostgreSQL's memory settings in their own
/// units, as PostgreSQL converts them, and SQLite gets none.
#[tokio::test]
async fn the_database_advice_reads_postgresqls_settings_as_it_does() {
    let url = test_database().await;
    let dir = TestDir::new();
    let store = Store::open(Some(&url), dir.path()).await.unwrap();
    let mut connection = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    let (shared_buffers, max_wal_size): (i64, i64) = sqlx::query_as(
        "SELECT pg_size_bytes(current_setting('shared_buffers')), \
                pg_size_bytes(current_setting('max_wal_size'))",
    )
    .fetch_one(&mut connection)
    .await
    .unwrap();
    let advice = store.database_advice().await.unwrap();
    let says = |what: &str| advice.iter().any(|a| a.text.contains(what));
    assert_eq!(
        says(&format!("{} MB of shared_buffers", shared_buffers >> 20)),
        shared_buffers < 1 << 30,
        "shared_buffers {shared_buffers} bytes: {advice:?}"
    );
    assert_eq!(
        says("of WAL (max_wal_size)"),
        max_wal_size < 4 << 30,
        "max_wal_size {max_wal_size} bytes: {advice:?}"
    );
    assert!(
        advice.iter().all(|a| !a.risk),
        "the test server is safe: {advice:?}"
    );

    let embedded = TestDir::new();
    let sqlite = Store::open(None, embedded.path()).await.unwrap();
    assert_eq!(sqlite.database_advice().await.unwrap(), Vec::new());
}

/// Every text column in a key or an index of the PostgreSQL store compares
/// byte by byte (COLLATE "C", migrations 1 and 18), as SQLite's do: the
/// stores order and page alike, and no index comparison goes through the
/// locale.
#[tokio::test]
async fn postgresql_keys_compare_bytes() {
    let mut connection = migrated_postgresql().await;
    let indexed: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT DISTINCT c.relname::text || '.' || a.attname::text, co.collname::text \
         FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = current_schema() \
         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY(i.indkey) \
         JOIN pg_type t ON t.oid = a.atttypid AND t.typname = 'text' \
         LEFT JOIN pg_collation co ON co.oid = a.attcollation \
         ORDER BY 1",
    )
    .fetch_all(&mut connection)
    .await
    .unwrap();
    assert!(
        indexed
            .iter()
            .any(|(column, _)| column == "metric_seen.message_id"),
        "the query finds the indexed text columns: {indexed:?}"
    );
    let by_locale: Vec<&(String, Option<String>)> = indexed
        .iter()
        .filter(|(_, collation)| collation.as_deref() != Some("C"))
        .collect();
    assert!(
        by_locale.is_empty(),
        "compared by the locale: {by_locale:?}"
    );
}

/// SQLite keeps the message-id claims in their key's B-tree (migration 19,
/// `WITHOUT ROWID`), and an older store's claims move there: a client's
/// retry made before the upgrade is still found after it.
#[tokio::test]
async fn sqlite_claims_move_into_their_key_btree_and_are_kept() {
    use sqlx::Connection;
    let dir = TestDir::new();
    let store = Store::open(None, dir.path()).await.unwrap();
    let first = [("m1", 3, 5, 4_000_000), ("m2", 0, 1, 4_000_000)];
    assert_eq!(
        store.claim_metric_ids("metrics", &first).await.unwrap(),
        Claimed::AllFirst
    );
    store.close().await;
    // The store as it was before migration 19: claims in a rowid table.
    let url = format!("sqlite://{}", dir.path().join("traitline.db").display());
    let mut connection = sqlx::SqliteConnection::connect(&url).await.unwrap();
    for statement in [
        "CREATE TABLE seen_before AS SELECT * FROM metric_seen",
        "DROP TABLE metric_seen",
        "CREATE TABLE metric_seen (processor TEXT NOT NULL, message_id TEXT NOT NULL, \
         received_at BIGINT NOT NULL, partition INTEGER, record_offset BIGINT, \
         PRIMARY KEY (processor, message_id))",
        "INSERT INTO metric_seen SELECT processor, message_id, received_at, partition, \
         record_offset FROM seen_before",
        "DROP TABLE seen_before",
        "DELETE FROM _sqlx_migrations WHERE version = 19",
    ] {
        sqlx::query(statement)
            .execute(&mut connection)
            .await
            .unwrap();
    }
    let schema = || async {
        let mut connection = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query_scalar::<_, String>("SELECT sql FROM sqlite_master WHERE name = 'metric_seen'")
            .fetch_one(&mut connection)
            .await
            .unwrap()
    };
    assert!(!schema().await.contains("WITHOUT ROWID"), "the old shape");
    connection.close().await.unwrap();

    let store = Store::open(None, dir.path()).await.unwrap();
    assert!(
        schema().await.contains("WITHOUT ROWID"),
        "{}",
        schema().await
    );
    let again = store
        .claim_metric_ids(
            "metrics",
            &[("m1", 4, 9, 4_100_000), ("m3", 1, 1, 4_100_000)],
        )
        .await
        .unwrap();
    assert!(again.is_retry("m1", 4, 9), "m1's first record is kept");
    assert!(!again.is_retry("m3", 1, 1));
}

/// A store a newer version migrated (a migration this build does not
/// know) is refused at start-up, naming the migration and the setting:
/// the newer version may store what this one cannot read (pattern states
/// since migration 20).
#[tokio::test]
async fn a_store_migrated_by_a_newer_version_is_refused_at_start() {
    use sqlx::Connection;
    let dir = TestDir::new();
    let store = Store::open(None, dir.path()).await.unwrap();
    store.close().await;
    let url = format!("sqlite://{}", dir.path().join("traitline.db").display());
    let mut connection = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (9999, 'a later release', true, x'00', 0)",
    )
    .execute(&mut connection)
    .await
    .unwrap();
    connection.close().await.unwrap();
    let Err(refused) = Store::open(None, dir.path()).await else {
        panic!("a store a newer version migrated was opened");
    };
    let message = refused.to_string();
    assert!(
        message.contains("a newer Traitline updated this store")
            && message.contains("migration 9999")
            && message.contains("data-dir"),
        "{message}"
    );
}
