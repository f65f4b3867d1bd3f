//! Profiles end to end: events in over HTTP, processed from the log into
//! the store, read back through the query API; for both deployments.

use reqwest::StatusCode;
use serde_json::{Value, json};

use std::sync::Arc;
use std::time::Duration;

use traitline::config::Config;
use traitline::log::{Record, Topics};

use crate::helpers::{
    ADMIN_KEY, Backend, READ_KEY, TestDir, WRITE_KEY, read_all, spawn_app, spawn_app_with, start,
    test_database, test_settings,
};

both_logs!(
    a_profile_is_built_from_every_call_type,
    identify_merges_anonymous_history_and_both_ids_resolve,
    client_retries_with_the_same_message_id_count_once,
    profiles_page_in_a_stable_order,
    delete_removes_the_profile_and_later_events_start_a_new_one,
    a_poison_record_goes_to_rejected_and_later_records_are_processed,
    changes_are_published_in_order_and_a_delete_publishes_a_tombstone,
    replay_rebuilds_the_same_profiles_as_live_processing,
    a_profiles_events_and_changes_page_newest_first,
    a_deletion_holds_through_replay_snapshot_restore_and_a_rebuild_into_a_new_store,
);

async fn a_profile_is_built_from_every_call_type(backend: Backend) {
    let app = spawn_app(backend).await;
    let sends = [
        (
            "/event/user/track",
            json!({"key": "landing.user.home.click", "user_id": "u1", "timestamp": "2026-11-20T10:00:00Z",
            "payload": {"client_os": "Android", "client_version": "0.9"}}),
        ),
        (
            "/v1/track",
            json!({"userId": "u1", "event": "order.create", "timestamp": "2026-11-21T09:30:00Z",
            "properties": {"$set": {"plan": "pro"}, "$set_once": {"first_plan": "pro"}},
            "context": {"client_os": "iOS", "client_version": "1.0.0"}}),
        ),
        (
            "/v1/identify",
            json!({"userId": "u1", "timestamp": "2026-11-20T12:00:00Z", "traits": {"email": "u1@example.com", "plan": "free"}}),
        ),
        (
            "/v1/page",
            json!({"userId": "u1", "name": "Home", "timestamp": "2026-11-20T11:00:00Z"}),
        ),
    ];
    for (route, body) in &sends {
        assert_eq!(
            app.post(route, body).await.status(),
            StatusCode::OK,
            "{route}"
        );
    }
    let profile = app.wait_for_profile("u1", |p| p["event_count"] == 4).await;
    assert_eq!(
        profile,
        json!({
            "user_id": "u1", "anonymous_ids": [],
            "first_seen": "2026-11-20T10:00:00Z", "last_seen": "2026-11-21T09:30:00Z",
            "event_count": 4,
            "event_counts": {"landing.user.home.click": 1, "order.create": 1, "$identify": 1, "$page": 1},
            "context": {"client_os": "iOS", "client_version": "1.0.0"},
            // `plan`: the $set of 2026-11-21 is later than the identify.
            "traits": {"email": "u1@example.com", "plan": "pro", "first_plan": "pro"}
        })
    );
}

/// The body RudderStack's Python SDK (2.1.9) sends for
/// `rudderstack.analytics.identify("u-rs", {"plan": "pro"})`: the traits
/// in `context.traits`, nothing in top-level `traits`.
#[tokio::test]
async fn a_rudderstack_identify_sets_the_traits_it_sends_in_context() {
    let app = spawn_app(Backend::Embedded).await;
    let body = json!({
        "batch": [{
            "type": "identify", "userId": "u-rs", "anonymousId": null,
            "messageId": "6f1c0b6e-6b8e-4a55-9d55-2a3c4c9e0001",
            "timestamp": "2026-11-20T10:00:00.000000+00:00",
            "context": {
                "traits": {"plan": "pro", "email": "rs@example.com"},
                "library": {"name": "analytics-python", "version": "2.1.9"}
            },
            "integrations": {}
        }],
        "sentAt": "2026-11-20T10:00:00.100000+00:00"
    });
    assert_eq!(app.post("/v1/batch", &body).await.status(), StatusCode::OK);
    let profile = app
        .wait_for_profile("u-rs", |p| p["event_count"] == 1)
        .await;
    assert_eq!(
        profile["traits"],
        json!({"plan": "pro", "email": "rs@example.com"})
    );
}

async fn identify_merges_anonymous_history_and_both_ids_resolve(backend: Backend) {
    let app = spawn_app(backend).await;
    for i in 0..3 {
        let body = json!({"anonymousId": "anon-7", "event": "Viewed", "properties": {"i": i}});
        assert_eq!(app.post("/v1/track", &body).await.status(), StatusCode::OK);
    }
    app.wait_for_profile("anon-7", |p| p["event_count"] == 3)
        .await;
    let body = json!({"userId": "u7", "anonymousId": "anon-7", "traits": {"name": "Ada"}});
    assert_eq!(
        app.post("/v1/identify", &body).await.status(),
        StatusCode::OK
    );
    let body = json!({"userId": "u7", "previousId": "old-login-7"});
    assert_eq!(app.post("/v1/alias", &body).await.status(), StatusCode::OK);

    let merged = app.wait_for_profile("u7", |p| p["event_count"] == 5).await;
    assert_eq!(merged["user_id"], "u7");
    assert_eq!(merged["anonymous_ids"], json!(["anon-7", "old-login-7"]));
    assert_eq!(merged["traits"], json!({"name": "Ada"}));
    for id in ["anon-7", "old-login-7"] {
        let (status, profile) = app.get_as(&format!("/v1/profiles/{id}"), READ_KEY).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(profile, merged, "{id} resolves to the merged profile");
    }
    let (_, events) = app
        .get_as("/v1/profiles/u7/events?limit=10", READ_KEY)
        .await;
    assert_eq!(
        events["events"].as_array().map(Vec::len),
        Some(5),
        "the anonymous events moved with the merge"
    );
}

async fn client_retries_with_the_same_message_id_count_once(backend: Backend) {
    let app = spawn_app(backend).await;
    let event = json!({"userId": "u-retry", "event": "Paid", "messageId": "pay-1"});
    for _ in 0..3 {
        assert_eq!(app.post("/v1/track", &event).await.status(), StatusCode::OK);
    }
    let batch = json!({"batch": [
        {"type": "track", "userId": "u-retry", "event": "Paid", "messageId": "pay-1"},
        {"type": "track", "userId": "u-retry", "event": "Paid", "messageId": "pay-2"},
    ]});
    assert_eq!(app.post("/v1/batch", &batch).await.status(), StatusCode::OK);
    let marker = json!({"userId": "u-retry", "event": "Done", "messageId": "done-1"});
    assert_eq!(
        app.post("/v1/track", &marker).await.status(),
        StatusCode::OK
    );

    let profile = app
        .wait_for_profile("u-retry", |p| p["event_counts"]["Done"] == 1)
        .await;
    assert_eq!(profile["event_counts"], json!({"Paid": 2, "Done": 1}));
    assert_eq!(
        app.stored_events().await.len(),
        6,
        "the log keeps every request; the profile counts each message once"
    );
}

async fn profiles_page_in_a_stable_order(backend: Backend) {
    let app = spawn_app(backend).await;
    let batch: Vec<Value> = (0..25)
        .map(|i| json!({"type": "track", "userId": format!("pager-{i:02}"), "event": "Seen"}))
        .collect();
    assert_eq!(
        app.post("/v1/batch", &json!({"batch": batch}))
            .await
            .status(),
        StatusCode::OK
    );
    app.wait_for_profile("pager-24", |_| true).await;
    crate::helpers::eventually(
        "all 25 profiles",
        std::time::Duration::from_secs(30),
        || async {
            app.get_as("/v1/profiles?limit=1000", READ_KEY).await.1["profiles"]
                .as_array()
                .map(Vec::len)
                == Some(25)
        },
    )
    .await;

    let seen: Vec<String> = every_page(&app, "/v1/profiles", "profiles")
        .await
        .iter()
        .map(|p| p["user_id"].as_str().unwrap().to_owned())
        .collect();
    let expected: Vec<String> = (0..25).map(|i| format!("pager-{i:02}")).collect();
    assert_eq!(seen, expected, "every profile once, in order, across pages");

    let (status, error) = app.get_as("/v1/profiles?limit=0", READ_KEY).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error["error"]["field"], "limit");
    let (status, _) = app.get_as("/v1/profiles?cursor=%%%", READ_KEY).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

async fn delete_removes_the_profile_and_later_events_start_a_new_one(backend: Backend) {
    let app = spawn_app(backend).await;
    let body = json!({"userId": "gone", "anonymousId": "gone-anon", "traits": {"email": "gone@example.com"}});
    assert_eq!(
        app.post("/v1/identify", &body).await.status(),
        StatusCode::OK
    );
    app.wait_for_profile("gone", |p| p["event_count"] == 1)
        .await;

    let delete = |key: &'static str| {
        app.client
            .delete(app.url("/v1/profiles/gone-anon"))
            .basic_auth(key, Some(""))
            .send()
    };
    assert_eq!(
        delete(READ_KEY).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    let response = delete(ADMIN_KEY).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let deleted: Value = response.json().await.unwrap();
    assert_eq!(deleted["user_id"], "gone");
    for path in [
        "/v1/profiles/gone",
        "/v1/profiles/gone-anon",
        "/v1/profiles/gone/events",
        "/v1/profiles/gone/changes",
    ] {
        assert_eq!(
            app.get_as(path, READ_KEY).await.0,
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    assert_eq!(
        delete(ADMIN_KEY).await.unwrap().status(),
        StatusCode::NOT_FOUND
    );

    let body = json!({"userId": "gone", "event": "Came Back"});
    assert_eq!(app.post("/v1/track", &body).await.status(), StatusCode::OK);
    let fresh = app.wait_for_profile("gone", |_| true).await;
    assert_eq!(fresh["event_count"], 1);
    assert_eq!(
        fresh["traits"],
        json!({}),
        "nothing of the deleted profile comes back"
    );
}

#[tokio::test]
async fn keys_only_do_what_their_scope_allows() {
    let app = spawn_app_with(Backend::Embedded, |_| {}).await;
    assert_eq!(
        app.post("/v1/track", &json!({"userId": "s1", "event": "E"}))
            .await
            .status(),
        StatusCode::OK
    );
    app.wait_for_profile("s1", |_| true).await;

    assert_eq!(
        app.get_as("/v1/profiles/s1", WRITE_KEY).await.0,
        StatusCode::FORBIDDEN,
        "a write key cannot read"
    );
    assert_eq!(
        app.get_as("/v1/profiles/s1", ADMIN_KEY).await.0,
        StatusCode::OK,
        "an admin key can read"
    );
    assert_eq!(
        app.get_as("/v1/profiles/s1", "tlr_unknown").await.0,
        StatusCode::UNAUTHORIZED
    );
    let anonymous = app
        .client
        .get(app.url("/v1/profiles/s1"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let write_delete = app
        .client
        .delete(app.url("/v1/profiles/s1"))
        .basic_auth(WRITE_KEY, Some(""))
        .send()
        .await
        .unwrap();
    assert_eq!(
        write_delete.status(),
        StatusCode::FORBIDDEN,
        "a write key cannot delete"
    );
    let read_send = app
        .post_raw(
            "/v1/track",
            Some(READ_KEY),
            br#"{"userId":"s1","event":"E"}"#.to_vec(),
            None,
        )
        .await;
    assert_eq!(
        read_send.status(),
        StatusCode::FORBIDDEN,
        "a read key cannot send"
    );
    assert_eq!(
        app.get_as("/v1/profiles/s1", READ_KEY).await.1["event_count"],
        1
    );
}

async fn a_poison_record_goes_to_rejected_and_later_records_are_processed(backend: Backend) {
    let dir = Arc::new(TestDir::new());
    let mut settings = test_settings(backend, dir.path());
    if backend == Backend::Kafka {
        settings.database_url = Some(test_database().await);
    }
    // Write straight to the log, before the service starts: a record that
    // is not an envelope, then a good event of the same user.
    let config = Config::from_settings(settings.clone()).unwrap();
    let topics = Topics::new(&config.topic_prefix);
    let log = traitline::log::open(&config).await.unwrap();
    let good = json!({"type": "track", "event": "After", "userId": "p1", "messageId": "good-1",
        "timestamp": "2026-11-20T10:00:00Z", "receivedAt": "2026-11-20T10:00:00Z", "source": "segment"});
    let records = vec![
        Record {
            key: Some("p1".into()),
            value: b"{not an envelope".to_vec(),
        },
        Record {
            key: Some("p1".into()),
            value: good.to_string().into_bytes(),
        },
    ];
    log.append(&topics.events(), records).await.unwrap();
    log.close(Duration::from_secs(5)).await;
    drop(log);

    let app = start(settings, dir).await;
    let profile = app.wait_for_profile("p1", |_| true).await;
    assert_eq!(profile["event_counts"], json!({"After": 1}));
    let rejected = read_all(&app.config, &topics.rejected()).await;
    assert_eq!(rejected.len(), 1, "the poison record, once");
    let dead: Value = serde_json::from_slice(&rejected[0].value).unwrap();
    assert_eq!(dead["value"], "{not an envelope");
    assert!(
        dead["reason"]
            .as_str()
            .unwrap()
            .contains("not an event envelope"),
        "{dead}"
    );
    assert_eq!(rejected[0].key.as_deref(), Some(&b"p1"[..]));
}

async fn changes_are_published_in_order_and_a_delete_publishes_a_tombstone(backend: Backend) {
    let app = spawn_app(backend).await;
    for (i, plan) in ["free", "pro", "team"].iter().enumerate() {
        let body = json!({"userId": "cdc-1", "traits": {"plan": plan}, "timestamp": format!("2026-11-20T10:00:0{i}Z")});
        assert_eq!(
            app.post("/v1/identify", &body).await.status(),
            StatusCode::OK
        );
        // One batch per event, so each makes its own change.
        app.wait_for_profile("cdc-1", |p| p["traits"]["plan"] == *plan)
            .await;
    }
    let (status, changes) = app.get_as("/v1/profiles/cdc-1/changes", READ_KEY).await;
    assert_eq!(status, StatusCode::OK);
    let plans: Vec<&Value> = changes["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["after"]["traits"]["plan"])
        .collect();
    assert_eq!(
        plans,
        [&json!("team"), &json!("pro"), &json!("free")],
        "newest first"
    );
    let first = changes["changes"].as_array().unwrap().last().unwrap();
    assert!(
        first["before"].is_null(),
        "the first change creates the profile"
    );

    let topics = Topics::new(&app.config.topic_prefix);
    let published_at_least = |n: usize| {
        let (config, topic) = (&app.config, topics.profile_changes());
        async move {
            crate::helpers::eventually(
                &format!("{n} published changes"),
                Duration::from_secs(30),
                || async { read_all(config, &topic).await.len() >= n },
            )
            .await
        }
    };
    // A delete also removes changes not yet published: wait for them first.
    published_at_least(3).await;
    let response = app
        .client
        .delete(app.url("/v1/profiles/cdc-1"))
        .basic_auth(ADMIN_KEY, Some(""))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    published_at_least(4).await;
    let published = read_all(&app.config, &topics.profile_changes()).await;
    let published: Vec<Value> = published
        .iter()
        .map(|r| serde_json::from_slice(&r.value).unwrap())
        .collect();
    let ids: Vec<i64> = published
        .iter()
        .map(|c| c["change_id"].as_i64().unwrap())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "in change order: {ids:?}"
    );
    assert_eq!(published[2]["after"]["traits"]["plan"], "team");
    assert_eq!(published[3]["causes"], json!(["$delete"]));

    let snapshots = read_all(&app.config, &topics.profiles()).await;
    assert_eq!(snapshots.len(), 4);
    assert!(
        snapshots
            .iter()
            .all(|r| r.key.as_deref() == Some(&b"cdc-1"[..])),
        "keyed by user id"
    );
    let latest: Value = serde_json::from_slice(&snapshots[2].value).unwrap();
    assert_eq!(latest["traits"]["plan"], "team");
    assert!(snapshots[3].value.is_empty(), "the delete is a tombstone");
}

/// Every profile the store holds, in a stable order.
pub async fn all_profiles(app: &crate::helpers::TestApp) -> Vec<Value> {
    let (status, page) = app.get_as("/v1/profiles?limit=1000", READ_KEY).await;
    assert_eq!(status, StatusCode::OK);
    let mut profiles = page["profiles"].as_array().unwrap().clone();
    profiles.sort_by_key(|p| p.to_string());
    profiles
}

/// Events `range` of a mix for 20 users: anonymous browsing, identifies
/// that link it (merges), trait sets and unsets, aliases, page views.
pub fn mixed_events(range: std::ops::Range<usize>) -> Vec<Value> {
    range
        .map(|i| {
            let user = format!("r{}", i % 20);
            let anon = format!("ra{}", i % 20);
            match i % 6 {
                0 => json!({"type": "track", "anonymousId": anon, "event": "Browse", "messageId": format!("r-{i}")}),
                1 => json!({"type": "identify", "userId": user, "anonymousId": anon, "traits": {"n": i}, "messageId": format!("r-{i}")}),
                2 => json!({"type": "track", "userId": user, "event": "Buy", "properties": {"$set": {"last": i}}, "messageId": format!("r-{i}")}),
                3 => json!({"type": "alias", "userId": user, "previousId": format!("old-{}", i % 7), "messageId": format!("r-{i}")}),
                4 => json!({"type": "track", "userId": user, "event": "Buy", "properties": {"$unset": ["n"]}, "messageId": format!("r-{i}")}),
                _ => json!({"type": "page", "userId": user, "name": "Home", "messageId": format!("r-{i}")}),
            }
        })
        .collect()
}

/// Sends `events` in batches of 50 and waits until the profiles count
/// `applied` events in all.
pub async fn send_and_wait(app: &crate::helpers::TestApp, events: &[Value], applied: usize) {
    for chunk in events.chunks(50) {
        assert_eq!(
            app.post("/v1/batch", &json!({"batch": chunk}))
                .await
                .status(),
            StatusCode::OK
        );
    }
    crate::helpers::eventually(
        "every unique event applied",
        Duration::from_secs(60),
        || async {
            let total: u64 = all_profiles(app)
                .await
                .iter()
                .map(|p| p["event_count"].as_u64().unwrap())
                .sum();
            total == applied as u64
        },
    )
    .await;
}

async fn replay_rebuilds_the_same_profiles_as_live_processing(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut batch = mixed_events(0..300);
    // Client retries: one event in ten sent again, the same event with the
    // same message id.
    let resent: Vec<Value> = batch.iter().step_by(10).cloned().collect();
    batch.extend(resent);
    let unique: std::collections::HashSet<&str> = batch
        .iter()
        .map(|e| e["messageId"].as_str().unwrap())
        .collect();
    send_and_wait(&app, &batch, unique.len()).await;
    let live = all_profiles(&app).await;
    let config = app.config.clone();
    let settings_dir = app.stop().await;

    let mut progress = Vec::new();
    let report = traitline::replay::run(&config, &Default::default(), &mut progress)
        .await
        .expect("the replay runs");
    assert_eq!(report.applied as usize, unique.len());
    assert_eq!(report.duplicates as usize, batch.len() - unique.len());
    let progress = String::from_utf8(progress).unwrap();
    assert!(progress.contains("events/s"), "{progress}");

    let store = traitline::store::Store::open(config.database_url.as_deref(), &config.data_dir)
        .await
        .unwrap();
    let page = store.profiles(1000, None).await.unwrap();
    let mut replayed: Vec<Value> = page
        .profiles
        .iter()
        .map(|p| serde_json::to_value(p).unwrap())
        .collect();
    replayed.sort_by_key(|p| p.to_string());
    assert_eq!(replayed, live);
    drop(settings_dir);
}

/// PostgreSQL goes away (connections refused, open ones cut) while events
/// keep coming: ingest goes on, reads say 503, and once the database is back
/// every event is in its profile exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_loses_and_doubles_nothing() {
    let app = spawn_app(Backend::Kafka).await;
    let url = app.config.database_url.clone().expect("a PostgreSQL store");
    let (server, name) = url.rsplit_once('/').unwrap();
    let admin_url = format!("{server}/postgres");
    let admin = |sql: String| {
        let admin_url = admin_url.clone();
        async move {
            let mut connection = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url)
                .await
                .unwrap();
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut connection)
                .await
                .unwrap();
        }
    };
    let send = |from: usize, to: usize| {
        let batch: Vec<Value> = (from..to)
            .map(|i| json!({"type": "track", "userId": format!("o{}", i % 5), "event": "E", "messageId": format!("o-{i}")}))
            .collect();
        let app = &app;
        async move { app.post("/v1/batch", &json!({"batch": batch})).await }
    };
    assert_eq!(send(0, 50).await.status(), StatusCode::OK);
    app.wait_for_profile("o4", |p| p["event_count"] == 10).await;

    admin(format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false")).await;
    admin(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    ))
    .await;
    for from in (50..250).step_by(50) {
        assert_eq!(
            send(from, from + 50).await.status(),
            StatusCode::OK,
            "ingest does not need the database"
        );
    }
    crate::helpers::eventually(
        "reads to fail while the database is down",
        Duration::from_secs(30),
        || async {
            app.get_as("/v1/profiles/o1", READ_KEY).await.0 == StatusCode::SERVICE_UNAVAILABLE
        },
    )
    .await;
    crate::helpers::eventually(
        "the processor to report the outage",
        Duration::from_secs(30),
        || async {
            let (_, ready) = app.get_as("/readyz", READ_KEY).await;
            ready["processing"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("not currently accepting connections"))
        },
    )
    .await;
    admin(format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true")).await;

    for user in 0..5 {
        app.wait_for_profile(&format!("o{user}"), |p| {
            p["event_count"].as_u64() >= Some(50)
        })
        .await;
    }
    let (_, page) = app.get_as("/v1/profiles?limit=100", READ_KEY).await;
    let counts: Vec<&Value> = page["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["event_count"])
        .collect();
    assert_eq!(counts, vec![&json!(50); 5], "every event once");
    let (_, ready) = app.get_as("/readyz", READ_KEY).await;
    assert!(
        ready["processing"]["error"].is_null(),
        "the error clears once a commit succeeds: {ready}"
    );
}

/// Follows `next_cursor` through every page of `path` (a list under `field`).
async fn every_page(app: &crate::helpers::TestApp, path: &str, field: &str) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(c) => format!("{path}?limit=10&cursor={c}"),
            None => format!("{path}?limit=10"),
        };
        let (status, page) = app.get_as(&url, READ_KEY).await;
        assert_eq!(status, StatusCode::OK, "{url}: {page}");
        let got = page[field].as_array().unwrap();
        assert!(got.len() <= 10);
        items.extend(got.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return items,
        }
    }
}

async fn a_profiles_events_and_changes_page_newest_first(backend: Backend) {
    let app = spawn_app(backend).await;
    // 25 events; the last sent happened at second 22, like step-22: event
    // time orders them, then the message id.
    for i in 0..25 {
        let second = if i == 24 { 22 } else { i };
        let body = json!({"userId": "pg-1", "event": "Step", "messageId": format!("step-{i:02}"),
            "timestamp": format!("2026-11-20T10:00:{second:02}Z"), "properties": {"$set": {"step": i}}});
        assert_eq!(app.post("/v1/track", &body).await.status(), StatusCode::OK);
    }
    app.wait_for_profile("pg-1", |p| p["event_count"] == 25)
        .await;

    let events = every_page(&app, "/v1/profiles/pg-1/events", "events").await;
    let ids: Vec<&str> = events
        .iter()
        .map(|e| e["messageId"].as_str().unwrap())
        .collect();
    let mut expected: Vec<String> = (0..24).rev().map(|i| format!("step-{i:02}")).collect();
    expected.insert(1, "step-24".to_owned());
    assert_eq!(ids, expected, "newest first, each once, across pages");

    let changes = every_page(&app, "/v1/profiles/pg-1/changes", "changes").await;
    let change_ids: Vec<i64> = changes
        .iter()
        .map(|c| c["change_id"].as_i64().unwrap())
        .collect();
    assert!(
        change_ids.windows(2).all(|w| w[0] > w[1]),
        "newest first: {change_ids:?}"
    );
    let caused: usize = changes
        .iter()
        .map(|c| c["causes"].as_array().unwrap().len())
        .sum();
    assert_eq!(caused, 25, "every event caused exactly one change record");
    // The latest $set by event time is step 23's.
    assert_eq!(changes[0]["after"]["traits"]["step"], 23);
}

/// The profiles in the store `config` names, in a stable order.
async fn stored_profiles(config: &Config) -> Vec<Value> {
    let store = traitline::store::Store::open(config.database_url.as_deref(), &config.data_dir)
        .await
        .unwrap();
    let page = store.profiles(1000, None).await.unwrap();
    store.close().await;
    let mut profiles: Vec<Value> = page
        .profiles
        .iter()
        .map(|p| serde_json::to_value(p).unwrap())
        .collect();
    profiles.sort_by_key(|p| p.to_string());
    profiles
}

/// A GDPR deletion is recorded in the log, in order with the user's
/// events: replaying from the beginning, restoring a snapshot taken before
/// it, and rebuilding a new, empty store from the same log all end with
/// the user deleted, and the events sent after the deletion in a new
/// profile, as live processing had it.
async fn a_deletion_holds_through_replay_snapshot_restore_and_a_rebuild_into_a_new_store(
    backend: Backend,
) {
    let app = spawn_app(backend).await;
    let before = vec![
        json!({"type": "track", "anonymousId": "gone-anon", "event": "Browse", "messageId": "d-1"}),
        json!({"type": "identify", "userId": "gone", "anonymousId": "gone-anon", "traits": {"email": "gone@example.com"}, "messageId": "d-2"}),
        json!({"type": "track", "userId": "gone", "event": "Buy", "messageId": "d-3"}),
        json!({"type": "track", "userId": "kept", "event": "Buy", "messageId": "d-4"}),
    ];
    send_and_wait(&app, &before, 4).await;
    let store =
        traitline::store::Store::open(app.config.database_url.as_deref(), &app.config.data_dir)
            .await
            .unwrap();
    traitline::snapshot::take(&app.config, &store)
        .await
        .expect("a snapshot before the deletion");
    store.close().await;

    let response = app
        .client
        .delete(app.url("/v1/profiles/gone-anon"))
        .basic_auth(ADMIN_KEY, Some(""))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let after =
        vec![json!({"type": "track", "userId": "gone", "event": "Came Back", "messageId": "d-5"})];
    // Profiles count 2 events now: kept's, and gone's new one.
    send_and_wait(&app, &after, 2).await;
    let live = all_profiles(&app).await;
    let returned: Vec<&Value> = live.iter().filter(|p| p["user_id"] == "gone").collect();
    assert_eq!(returned.len(), 1);
    assert_eq!(
        returned[0]["event_count"], 1,
        "only the event after the deletion"
    );
    assert_eq!(returned[0]["traits"], json!({}));
    assert_eq!(returned[0]["anonymous_ids"], json!([]));
    let config = app.config.clone();
    let dir = app.stop().await;

    let replay = |from_beginning| {
        let config = config.clone();
        async move {
            let args = traitline::cli::ReplayArgs { from_beginning };
            traitline::replay::run(&config, &args, &mut Vec::new())
                .await
                .expect("the replay runs");
            stored_profiles(&config).await
        }
    };
    assert_eq!(replay(true).await, live, "replay from the beginning");
    assert_eq!(
        replay(false).await,
        live,
        "the snapshot taken before the deletion, then the log"
    );

    // A new deployment: an empty store (and no snapshots) on the same log.
    std::fs::remove_dir_all(&config.snapshot_dir).unwrap();
    let mut settings = crate::helpers::test_settings(backend, dir.path());
    settings.topic_prefix = Some(config.topic_prefix.clone());
    match backend {
        Backend::Kafka => settings.database_url = Some(test_database().await),
        Backend::Embedded => {
            for entry in std::fs::read_dir(&config.data_dir).unwrap() {
                let path = entry.unwrap().path();
                if path
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("traitline.db")
                {
                    std::fs::remove_file(path).unwrap();
                }
            }
        }
    }
    let rebuilt = start(settings, dir).await;
    let what = "the new store reaching the live profiles";
    crate::helpers::eventually(what, Duration::from_secs(60), || async {
        let profiles = all_profiles(&rebuilt).await;
        if profiles == live {
            Ok(())
        } else {
            Err(format!("{profiles:#?}"))
        }
    })
    .await;
}
