//! Per-write-key rate limits (GCRA): past a key's rate, 429 with
//! Retry-After and nothing stored; a request larger than the burst, 413;
//! other keys unaffected; after the wait, requests pass again.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Backend, WRITE_KEY, eventually, spawn_app_with};

const OTHER_KEY: &str = "tlw_test_write_key_0002";

#[tokio::test]
async fn a_key_past_its_rate_gets_429_with_retry_after_and_recovers() {
    let app = spawn_app_with(Backend::Embedded, |s| {
        s.write_keys = Some(vec![WRITE_KEY.into(), OTHER_KEY.into()]);
        s.rate_limit_events = Some(2);
        s.rate_limit_burst = Some(5);
    })
    .await;
    let event = |i: u32| json!({"userId": "u1", "event": "e", "messageId": format!("m{i}")});
    // The burst passes at once (batch of 3, then 2 singles)...
    let batch = json!({"batch": [
        {"type": "track", "userId": "u1", "event": "e", "messageId": "b0"},
        {"type": "track", "userId": "u1", "event": "e", "messageId": "b1"},
        {"type": "track", "userId": "u1", "event": "e", "messageId": "b2"},
    ]});
    assert_eq!(app.post("/v1/batch", &batch).await.status(), StatusCode::OK);
    for i in 0..2 {
        assert_eq!(
            app.post("/v1/track", &event(i)).await.status(),
            StatusCode::OK
        );
    }
    // ...and the next event is over the rate.
    let refused = app.post("/v1/track", &event(2)).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=1).contains(&retry_after),
        "half a second, rounded up: {retry_after}"
    );
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("rate-limit-events"), "{message}");

    // Another key has its own rate.
    let other = app
        .post_raw(
            "/v1/track",
            Some(OTHER_KEY),
            event(100).to_string().into_bytes(),
            None,
        )
        .await;
    assert_eq!(other.status(), StatusCode::OK);

    // More events in one request than the burst can never pass: 413.
    let messages: Vec<Value> = (0..6)
        .map(|i| json!({"type": "track", "userId": "u2", "event": "e", "messageId": format!("big{i}")}))
        .collect();
    let too_big = app.post("/v1/batch", &json!({"batch": messages})).await;
    assert_eq!(too_big.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = too_big.json().await.unwrap();
    assert_eq!(body["error"]["code"], "over_burst");

    // After the wait the key sends again.
    eventually(
        "a 2xx after Retry-After",
        Duration::from_secs(10),
        || async { app.post("/v1/track", &event(3)).await.status() == StatusCode::OK },
    )
    .await;
    let stored: Vec<String> = app
        .stored_events()
        .await
        .into_iter()
        .map(|e| e.message_id)
        .collect();
    assert!(!stored.contains(&"m2".to_owned()), "a 429 stored nothing");
    assert!(
        !stored.iter().any(|m| m.starts_with("big")),
        "a 413 stored nothing"
    );
    assert_eq!(stored.len(), 7, "{stored:?}");
}

#[tokio::test]
async fn without_a_rate_setting_nothing_is_limited() {
    let app = spawn_app_with(Backend::Embedded, |_| {}).await;
    for i in 0..50 {
        let event = json!({"userId": "u1", "event": "e", "messageId": format!("m{i}")});
        assert_eq!(app.post("/v1/track", &event).await.status(), StatusCode::OK);
    }
}

/// A client address that keeps failing to authenticate gets 429 with
/// Retry-After on the keyed routes, even with a right key, until its
/// allowance refills; other addresses and the health routes are not
/// affected.
#[tokio::test]
async fn an_address_with_too_many_failed_authentications_gets_429() {
    let app = spawn_app_with(Backend::Embedded, |s| {
        s.auth_failures_per_minute = Some(60); // one a second, 60 at once
    })
    .await;
    let event = json!({"userId": "u1", "event": "e"})
        .to_string()
        .into_bytes();
    // 60 failures use the allowance up, and the 61st goes past it.
    for _ in 0..=60 {
        let wrong = app
            .post_raw(
                "/v1/track",
                Some("tlw_wrong_key_000000001"),
                event.clone(),
                None,
            )
            .await;
        assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    }
    let blocked = app
        .post("/v1/track", &json!({"userId": "u1", "event": "e"}))
        .await;
    assert_eq!(
        blocked.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "even with a right key"
    );
    assert!(blocked.headers().contains_key("retry-after"));
    let body: Value = blocked.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_failed_authentications");
    let (status, _) = app
        .get_as("/v1/profiles/u1", crate::helpers::READ_KEY)
        .await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "the query routes too"
    );
    let health = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(
        health.status(),
        StatusCode::OK,
        "health checks still answer"
    );

    // Another address (127.0.0.2 is loopback too) is not blocked.
    let other = crate::helpers::client_builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let from_other = other
        .post(app.url("/v1/track"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&json!({"userId": "u1", "event": "e"}))
        .send()
        .await
        .unwrap();
    assert_eq!(from_other.status(), StatusCode::OK);

    eventually(
        "the address to be let in again",
        Duration::from_secs(10),
        || async {
            app.post("/v1/track", &json!({"userId": "u1", "event": "e"}))
                .await
                .status()
                == StatusCode::OK
        },
    )
    .await;
}
