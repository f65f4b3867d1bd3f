//! The seed route, `POST /event/user/track`: the seed's own two controller
//! tests (with a write key added, as every ingest route needs one), and the
//! rules it grew since.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Backend, WRITE_KEY, spawn_app};

/// The seed's `event(key, payload)` helper.
fn event(key: &str, payload: Value) -> Value {
    json!({ "key": key, "payload": payload })
}

fn empty_payload() -> Value {
    json!({})
}

fn invalid_payload() -> Value {
    json!({ "client_os": 33 })
}

#[tokio::test]
async fn track_empty_payload() {
    let app = spawn_app(Backend::Embedded).await;
    let payload = event("landing.user.home.click", empty_payload());
    let response = app.post("/event/user/track", &payload).await;

    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn track_invalid_payload() {
    let app = spawn_app(Backend::Embedded).await;
    let payload = event("landing.user.home.click", invalid_payload());
    let response = app.post("/event/user/track", &payload).await;

    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_type");
    assert_eq!(body["error"]["field"], "payload.client_os");
    assert!(
        app.stored_events().await.is_empty(),
        "a refused event is not stored"
    );
}

#[tokio::test]
async fn a_seed_event_is_stored_as_a_track_envelope() {
    let app = spawn_app(Backend::Embedded).await;
    let response = app
        .post(
            "/event/user/track",
            &json!({
                "key": "landing.user.home.click",
                "payload": {"client_os": "iOS", "client_version": "1.0.0", "button": "signup"},
                "user_id": "u1",
                "message_id": "seed-m1",
                "timestamp": "2026-11-20T10:00:00Z"
            }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);

    let events = app.stored_events().await;
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(e.event.as_deref(), Some("landing.user.home.click"));
    assert_eq!(e.user_id.as_deref(), Some("u1"));
    assert_eq!(e.message_id, "seed-m1");
    assert_eq!(e.timestamp.to_rfc3339(), "2026-11-20T10:00:00+00:00");
    assert_eq!(e.properties["button"], "signup");
    assert_eq!(e.context["client_os"], "iOS");
    assert_eq!(e.context["client_version"], "1.0.0");
}

/// Seed 000 gives `v1.landing.user.order.create` as the shape of a good
/// key: version, page, actor, object, action.
#[tokio::test]
async fn the_seeds_versioned_example_key_is_accepted() {
    let app = spawn_app(Backend::Embedded).await;
    let response = app
        .post(
            "/event/user/track",
            &event("v1.landing.user.order.create", empty_payload()),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let events = app.stored_events().await;
    assert_eq!(
        events[0].event.as_deref(),
        Some("v1.landing.user.order.create")
    );
}

#[tokio::test]
async fn a_key_outside_the_naming_rule_gets_422_naming_the_rule() {
    let app = spawn_app(Backend::Embedded).await;
    let response = app
        .post(
            "/event/user/track",
            &event("Landing.User.order-create", empty_payload()),
        )
        .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["field"], "key");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("dot-separated") && message.contains("lowercase"),
        "{message}"
    );
}

#[tokio::test]
async fn malformed_json_gets_400() {
    let app = spawn_app(Backend::Embedded).await;
    let response = app
        .post_raw(
            "/event/user/track",
            Some(WRITE_KEY),
            b"{\"key\": \"a.b\", ".to_vec(),
            None,
        )
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_json");
}

#[tokio::test]
async fn the_seed_route_needs_a_write_key() {
    let app = spawn_app(Backend::Embedded).await;
    let body = event("landing.user.home.click", empty_payload())
        .to_string()
        .into_bytes();
    let response = app.post_raw("/event/user/track", None, body, None).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}
