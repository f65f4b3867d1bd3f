//! The Segment Tracking API routes, as a Segment SDK calls them.

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};
use traitline::envelope::EventType;

use crate::helpers::{Backend, WRITE_KEY, spawn_app};

#[tokio::test]
async fn every_call_type_is_accepted_on_its_route() {
    let app = spawn_app(Backend::Embedded).await;
    let calls = [
        (
            "/v1/track",
            json!({"userId": "u1", "event": "Order Completed", "properties": {"total": 30}}),
        ),
        (
            "/v1/identify",
            json!({"userId": "u1", "traits": {"plan": "pro"}}),
        ),
        (
            "/v1/page",
            json!({"anonymousId": "a1", "name": "Pricing", "properties": {"path": "/pricing"}}),
        ),
        ("/v1/screen", json!({"userId": "u1", "name": "Home"})),
        (
            "/v1/group",
            json!({"userId": "u1", "groupId": "g1", "traits": {"name": "Acme"}}),
        ),
        ("/v1/alias", json!({"userId": "u1", "previousId": "a1"})),
    ];
    for (route, body) in &calls {
        let response = app.post(route, body).await;
        assert_eq!(response.status(), StatusCode::OK, "{route}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["success"], true);
    }
    let events = app.stored_events().await;
    let mut kinds: Vec<EventType> = events.iter().map(|e| e.kind).collect();
    kinds.sort_by_key(|k| format!("{k:?}"));
    assert_eq!(
        kinds,
        vec![
            EventType::Alias,
            EventType::Group,
            EventType::Identify,
            EventType::Page,
            EventType::Screen,
            EventType::Track
        ]
    );
    let group = events.iter().find(|e| e.kind == EventType::Group).unwrap();
    assert_eq!(group.group_id.as_deref(), Some("g1"));
    assert_eq!(group.traits["name"], "Acme");
    let alias = events.iter().find(|e| e.kind == EventType::Alias).unwrap();
    assert_eq!(alias.previous_id.as_deref(), Some("a1"));
    let page = events.iter().find(|e| e.kind == EventType::Page).unwrap();
    assert_eq!(
        (page.name.as_deref(), page.anonymous_id.as_deref()),
        (Some("Pricing"), Some("a1"))
    );
}

#[tokio::test]
async fn a_mixed_batch_is_stored_whole() {
    let app = spawn_app(Backend::Embedded).await;
    let response = app
        .post(
            "/v1/batch",
            &json!({
                "batch": [
                    {"type": "identify", "userId": "u1", "traits": {"email": "u1@example.com"}, "messageId": "b1"},
                    {"type": "track", "userId": "u1", "event": "Signed Up", "messageId": "b2"},
                    {"type": "page", "anonymousId": "a9", "name": "Docs", "messageId": "b3"},
                    {"type": "alias", "userId": "u1", "previousId": "a9", "messageId": "b4"}
                ],
                "context": {"library": {"name": "analytics-node", "version": "6.0.0"}}
            }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut events = app.stored_events().await;
    events.sort_by(|a, b| a.message_id.cmp(&b.message_id));
    let ids: Vec<&str> = events.iter().map(|e| e.message_id.as_str()).collect();
    assert_eq!(ids, ["b1", "b2", "b3", "b4"]);
    assert!(
        events
            .iter()
            .all(|e| e.context["library"]["name"] == "analytics-node")
    );
}

#[tokio::test]
async fn one_bad_message_refuses_the_whole_batch_and_names_it() {
    let app = spawn_app(Backend::Embedded).await;
    let response = app
        .post(
            "/v1/batch",
            &json!({"batch": [
                {"type": "track", "userId": "u1", "event": "a"},
                {"type": "track", "userId": "u1", "event": "b"},
                {"type": "identify", "userId": "u1"},
                {"type": "track", "event": "no identity"}
            ]}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "missing_field");
    assert_eq!(body["error"]["field"], "batch[3].userId");
    assert!(
        app.stored_events().await.is_empty(),
        "nothing of a refused batch is stored"
    );
}

#[tokio::test]
async fn missing_ids_are_named() {
    let app = spawn_app(Backend::Embedded).await;
    let cases = [
        ("/v1/track", json!({"event": "x"}), "userId"),
        ("/v1/track", json!({"userId": "u1"}), "event"),
        ("/v1/group", json!({"userId": "u1"}), "groupId"),
        ("/v1/alias", json!({"userId": "u1"}), "previousId"),
        ("/v1/alias", json!({"previousId": "a1"}), "userId"),
        (
            "/v1/batch",
            json!({"batch": [{"userId": "u1", "event": "x"}]}),
            "batch[0].type",
        ),
        ("/v1/batch", json!({"context": {}}), "batch"),
    ];
    for (route, body, field) in cases {
        let response = app.post(route, &body).await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{route} {body}"
        );
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"]["field"], field, "{route} {body}: {answer}");
    }
    assert!(app.stored_events().await.is_empty());
}

#[tokio::test]
async fn a_missing_message_id_is_generated_and_a_given_one_kept() {
    let app = spawn_app(Backend::Embedded).await;
    app.post("/v1/track", &json!({"userId": "u1", "event": "a"}))
        .await;
    app.post(
        "/v1/track",
        &json!({"userId": "u1", "event": "b", "messageId": "mine"}),
    )
    .await;
    let events = app.stored_events().await;
    let a = events
        .iter()
        .find(|e| e.event.as_deref() == Some("a"))
        .unwrap();
    let b = events
        .iter()
        .find(|e| e.event.as_deref() == Some("b"))
        .unwrap();
    assert!(!a.message_id.is_empty() && a.message_id != "mine");
    assert_eq!(b.message_id, "mine");
}

#[tokio::test]
async fn client_clock_skew_is_corrected_from_sent_at() {
    let app = spawn_app(Backend::Embedded).await;
    // The client's clock is two hours ahead; the event happened 5 s before
    // it was sent.
    let client_now = Utc::now() + ChronoDuration::hours(2);
    let before = Utc::now();
    let response = app
        .post(
            "/v1/track",
            &json!({
                "userId": "u1", "event": "skewed",
                "timestamp": (client_now - ChronoDuration::seconds(5)).to_rfc3339(),
                "sentAt": client_now.to_rfc3339(),
            }),
        )
        .await;
    let after = Utc::now();
    assert_eq!(response.status(), StatusCode::OK);
    let e = &app.stored_events().await[0];
    assert!(e.received_at >= before && e.received_at <= after);
    assert_eq!(e.received_at - e.timestamp, ChronoDuration::seconds(5));
    let original: DateTime<Utc> = e.original_timestamp.unwrap();
    assert!(
        original > after + ChronoDuration::minutes(100),
        "the client's own timestamp is kept"
    );
}

#[tokio::test]
async fn the_write_key_may_come_in_the_body_or_as_a_bearer_token() {
    let app = spawn_app(Backend::Embedded).await;
    let body = json!({"userId": "u1", "event": "a", "writeKey": WRITE_KEY}).to_string();
    let response = app
        .post_raw("/v1/track", None, body.into_bytes(), None)
        .await;
    assert_eq!(response.status(), StatusCode::OK);

    let response = app
        .client
        .post(app.url("/v1/track"))
        .bearer_auth(WRITE_KEY)
        .json(&json!({"userId": "u1", "event": "b"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let batch =
        json!({"writeKey": WRITE_KEY, "batch": [{"type": "track", "userId": "u1", "event": "c"}]});
    let response = app
        .post_raw("/v1/batch", None, batch.to_string().into_bytes(), None)
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(app.stored_events().await.len(), 3);
}

#[tokio::test]
async fn events_of_one_user_share_a_partition_in_order() {
    let app = spawn_app(Backend::Embedded).await;
    for i in 0..20 {
        let response = app
            .post(
                "/v1/track",
                &json!({"userId": "same-user", "event": "step", "properties": {"i": i}}),
            )
            .await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    let records = app.stored_records().await;
    let partitions: std::collections::HashSet<i32> = records.iter().map(|r| r.partition).collect();
    assert_eq!(partitions.len(), 1);
    let order: Vec<i64> = records
        .iter()
        .map(|r| {
            serde_json::from_slice::<Value>(&r.value).unwrap()["properties"]["i"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(order, (0..20).collect::<Vec<_>>());
}

#[tokio::test]
async fn stored_events_survive_a_restart_and_new_ones_follow_them() {
    let app = spawn_app(Backend::Embedded).await;
    for i in 0..5 {
        app.post(
            "/v1/track",
            &json!({"userId": "u1", "event": "before", "messageId": format!("b{i}")}),
        )
        .await;
    }
    let settings = crate::helpers::test_settings(Backend::Embedded, app.dir.path());
    let dir = app.stop().await;
    let app = crate::helpers::start(settings, dir).await;
    app.post(
        "/v1/track",
        &json!({"userId": "u1", "event": "after", "messageId": "a0"}),
    )
    .await;
    let records = app.stored_records().await;
    let offsets: Vec<i64> = records.iter().map(|r| r.offset).collect();
    assert_eq!(
        offsets,
        (0..6).collect::<Vec<_>>(),
        "one user, one partition, offsets continue"
    );
    let last: Value = serde_json::from_slice(&records[5].value).unwrap();
    assert_eq!(last["messageId"], "a0");
}
