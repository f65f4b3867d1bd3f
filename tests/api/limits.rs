//! Size limits and gzip: refused with 413 naming the limit, applied after
//! decompression, and a gzip bomb is refused without inflating it all.

use std::io::Write;

use flate2::Compression;
use flate2::write::GzEncoder;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Backend, WRITE_KEY, spawn_app};

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn padded_track(size: usize) -> Vec<u8> {
    let base = json!({"userId": "u1", "event": "big", "properties": {"pad": ""}}).to_string();
    let pad = "x".repeat(size.saturating_sub(base.len()));
    json!({"userId": "u1", "event": "big", "properties": {"pad": pad}})
        .to_string()
        .into_bytes()
}

#[tokio::test]
async fn an_event_over_32_kb_gets_413_naming_the_limit() {
    let app = spawn_app(Backend::Embedded).await;
    let response = app
        .post_raw("/v1/track", Some(WRITE_KEY), padded_track(33 * 1024), None)
        .await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "event_too_large");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("32768") && message.contains("max-event-bytes"),
        "{message}"
    );

    let response = app
        .post_raw("/v1/track", Some(WRITE_KEY), padded_track(31 * 1024), None)
        .await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "just under the limit is fine"
    );
    assert_eq!(app.stored_events().await.len(), 1);
}

#[tokio::test]
async fn a_batch_over_500_kb_gets_413_and_an_oversized_item_is_named() {
    let app = spawn_app(Backend::Embedded).await;
    let item = |i: usize| json!({"type": "track", "userId": "u1", "event": "e", "properties": {"pad": "y".repeat(10_000), "i": i}});
    let batch = json!({"batch": (0..60).map(item).collect::<Vec<_>>()});
    let response = app.post("/v1/batch", &batch).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "batch_too_large");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max-batch-bytes")
    );

    let big: Value = serde_json::from_slice(&padded_track(40 * 1024)).unwrap();
    let mut big_item = big.clone();
    big_item["type"] = json!("track");
    let batch = json!({"batch": [item(0), big_item]});
    let response = app.post("/v1/batch", &batch).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["field"], "batch[1]");
    assert!(app.stored_events().await.is_empty());
}

#[tokio::test]
async fn limits_are_configurable() {
    let app = crate::helpers::spawn_app_with(Backend::Embedded, |s| {
        s.max_event_bytes = Some(1024);
        s.max_batch_bytes = Some(4096);
    })
    .await;
    let response = app
        .post_raw("/v1/track", Some(WRITE_KEY), padded_track(2000), None)
        .await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("1024"));
}

#[tokio::test]
async fn gzip_bodies_are_accepted() {
    let app = spawn_app(Backend::Embedded).await;
    let batch = json!({"batch": (0..50).map(|i| json!({"type": "track", "userId": format!("u{i}"), "event": "zipped"})).collect::<Vec<_>>()});
    let response = app
        .post_raw(
            "/v1/batch",
            Some(WRITE_KEY),
            gzip(batch.to_string().as_bytes()),
            Some("gzip"),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(app.stored_events().await.len(), 50);
}

#[tokio::test]
async fn the_limit_applies_after_decompression() {
    let app = spawn_app(Backend::Embedded).await;
    // 40 KB of JSON that gzips to well under 32 KB.
    let body = padded_track(40 * 1024);
    let compressed = gzip(&body);
    assert!(compressed.len() < 2048);
    let response = app
        .post_raw("/v1/track", Some(WRITE_KEY), compressed, Some("gzip"))
        .await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn a_gzip_bomb_is_refused_without_inflating_it() {
    let app = spawn_app(Backend::Embedded).await;
    // 1 GB of zeros compresses to about 1 MB; stream it in 64 KB chunks.
    let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
    let zeros = vec![b' '; 1 << 20];
    for _ in 0..1024 {
        encoder.write_all(&zeros).unwrap();
    }
    let bomb = encoder.finish().unwrap();
    assert!(bomb.len() < 2 << 20);
    // The compressed bomb is larger than the batch limit: refused unread.
    let response = app
        .post_raw("/v1/batch", Some(WRITE_KEY), bomb, Some("gzip"))
        .await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // A small bomb (100 MB inflated from ~100 KB) under the raw limit is cut
    // off at the limit while inflating.
    let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
    for _ in 0..100 {
        encoder.write_all(&zeros).unwrap();
    }
    let small_bomb = encoder.finish().unwrap();
    assert!(small_bomb.len() < 500 * 1024);
    let response = app
        .post_raw("/v1/batch", Some(WRITE_KEY), small_bomb, Some("gzip"))
        .await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "batch_too_large");
}

#[tokio::test]
async fn broken_gzip_and_unknown_encodings_are_refused() {
    let app = spawn_app(Backend::Embedded).await;
    let response = app
        .post_raw(
            "/v1/track",
            Some(WRITE_KEY),
            b"not gzip at all".to_vec(),
            Some("gzip"),
        )
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let response = app
        .post_raw("/v1/track", Some(WRITE_KEY), b"{}".to_vec(), Some("br"))
        .await;
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
}
