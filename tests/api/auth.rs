//! Keys: every ingest route needs a write key; a missing or unknown one is
//! 401, a key of another scope 403, and nothing is stored either way.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Backend, INGEST_ROUTES as ROUTES, READ_KEY, WRITE_KEY, spawn_app};

fn valid_body(route: &str) -> Value {
    match route {
        "/event/user/track" => json!({"key": "landing.user.home.click", "payload": {}}),
        "/v1/batch" => json!({"batch": [{"type": "track", "userId": "u", "event": "e"}]}),
        _ => json!({"userId": "u", "previousId": "p", "groupId": "g", "event": "e"}),
    }
}

#[tokio::test]
async fn missing_and_unknown_keys_get_401_on_every_route() {
    let app = spawn_app(Backend::Embedded).await;
    for route in ROUTES {
        let body = valid_body(route).to_string().into_bytes();
        let response = app.post_raw(route, None, body.clone(), None).await;
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "{route} without a key"
        );
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"]["code"], "missing_key");

        let response = app
            .post_raw(route, Some("tlw_not_a_key_of_ours"), body, None)
            .await;
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "{route} with an unknown key"
        );
    }
    let mut with_bad_body_key = valid_body("/v1/track");
    with_bad_body_key["writeKey"] = json!("nope");
    let response = app
        .post_raw(
            "/v1/track",
            None,
            with_bad_body_key.to_string().into_bytes(),
            None,
        )
        .await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(app.stored_events().await.is_empty());
}

#[tokio::test]
async fn a_read_key_cannot_send_events() {
    let app = spawn_app(Backend::Embedded).await;
    for route in ROUTES {
        let body = valid_body(route).to_string().into_bytes();
        let response = app.post_raw(route, Some(READ_KEY), body, None).await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{route}");
    }
    assert!(app.stored_events().await.is_empty());
}

#[tokio::test]
async fn a_malformed_authorization_header_is_refused() {
    let app = spawn_app(Backend::Embedded).await;
    let response = app
        .client
        .post(app.url("/v1/track"))
        .header("authorization", "Basic !!!")
        .json(&valid_body("/v1/track"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    // Without a key, a malformed body says 401, not what is wrong with it.
    let response = app
        .post_raw("/v1/track", None, b"{oops".to_vec(), None)
        .await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    // With the key it says what is wrong.
    let response = app
        .post_raw("/v1/track", Some(WRITE_KEY), b"{oops".to_vec(), None)
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

/// The same mistake gets the same answer from ingest and the query API.
#[tokio::test]
async fn every_api_answers_the_same_key_mistake_with_the_same_code() {
    let app = spawn_app(Backend::Embedded).await;
    let body = valid_body("/v1/track").to_string().into_bytes();
    let code = |value: Value| {
        value["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };

    let sent = app
        .post_raw("/v1/track", Some("tlw_unknown"), body.clone(), None)
        .await;
    assert_eq!(sent.status(), StatusCode::UNAUTHORIZED);
    let read = app.get_as("/v1/profiles/u", "tlr_unknown").await;
    assert_eq!(read.0, StatusCode::UNAUTHORIZED);
    assert_eq!(code(sent.json().await.unwrap()), "unknown_key");
    assert_eq!(code(read.1), "unknown_key");

    let sent = app.post_raw("/v1/track", Some(READ_KEY), body, None).await;
    assert_eq!(sent.status(), StatusCode::FORBIDDEN);
    let read = app.get_as("/v1/profiles/u", WRITE_KEY).await;
    assert_eq!(read.0, StatusCode::FORBIDDEN);
    assert_eq!(code(sent.json().await.unwrap()), "wrong_key_scope");
    assert_eq!(code(read.1), "wrong_key_scope");

    let response = app
        .client
        .get(app.url("/v1/profiles/u"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(code(response.json().await.unwrap()), "missing_key");
}
