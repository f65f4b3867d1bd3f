//! `/metrics`: the Prometheus names move as events flow through ingest,
//! the log, the processor and the store (scrape, send, scrape).

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{Backend, TestApp, spawn_app};

/// The scrape's value of `name` with every one of `labels` (summed over the
/// series that match), or None when no series matches.
fn sample(scrape: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in scrape.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
        if series_name != name
            || !labels
                .iter()
                .all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\"")))
        {
            continue;
        }
        *total.get_or_insert(0.0) += value.parse::<f64>().unwrap();
    }
    total
}

async fn scrape(app: &TestApp) -> String {
    let response = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    response.text().await.unwrap()
}

/// Scrapes until `done` holds for a scrape (30 s at most), and returns it.
async fn scrape_until(app: &TestApp, what: &str, done: impl Fn(&str) -> bool) -> String {
    crate::helpers::eventually(what, Duration::from_secs(30), || async {
        let now = scrape(app).await;
        if done(&now) {
            Ok(now)
        } else {
            Err(format!("the scrape:\n{now}"))
        }
    })
    .await
}

/// How much `name{labels}` grew between two scrapes (absent counts as 0).
fn grew(before: &str, after: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(after, name, labels).unwrap_or(0.0) - sample(before, name, labels).unwrap_or(0.0)
}

async fn metrics_follow_the_events(backend: Backend) {
    let app = spawn_app(backend).await;
    let before = scrape(&app).await;
    for i in 0..3 {
        let event = json!({"userId": "m1", "event": "Viewed", "messageId": format!("t{i}")});
        assert_eq!(app.post("/v1/track", &event).await.status(), StatusCode::OK);
    }
    let bad = json!({"event": "no user"});
    assert_eq!(
        app.post("/v1/track", &bad).await.status(),
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let batch = json!({"batch": [
        {"type": "identify", "userId": "m1", "traits": {"plan": "pro"}, "messageId": "b1"},
        {"type": "track", "userId": "m2", "event": "Paid", "messageId": "b2"},
    ]});
    assert_eq!(app.post("/v1/batch", &batch).await.status(), StatusCode::OK);

    let applied = [("processor", "profiles"), ("outcome", "applied")];
    let latency = "traitline_processor_event_latency_seconds_count";
    // The runner counts a batch's events as each transaction commits and
    // records their latency once all have: a scrape can fall between.
    let after = scrape_until(&app, "the processor's counts in /metrics", |after| {
        grew(&before, after, "traitline_processor_events_total", &applied) >= 5.0
            && grew(&before, after, latency, &[("processor", "profiles")]) >= 5.0
    })
    .await;
    let track = ("route", "/v1/track");
    let requests = "traitline_ingest_requests_total";
    assert_eq!(
        grew(&before, &after, requests, &[track, ("status", "200")]),
        3.0
    );
    assert_eq!(
        grew(&before, &after, requests, &[track, ("status", "422")]),
        1.0
    );
    let events = "traitline_ingest_events_total";
    assert_eq!(
        grew(&before, &after, events, &[track, ("status", "200")]),
        3.0
    );
    assert_eq!(
        grew(
            &before,
            &after,
            events,
            &[("route", "/v1/batch"), ("status", "200")]
        ),
        2.0
    );
    let durations = "traitline_ingest_request_duration_seconds_count";
    assert_eq!(grew(&before, &after, durations, &[track]), 4.0);
    let under_30s = [track, ("le", "30")];
    let bucket = "traitline_ingest_request_duration_seconds_bucket";
    assert_eq!(
        grew(&before, &after, bucket, &under_30s),
        4.0,
        "a real histogram"
    );
    assert_eq!(
        grew(
            &before,
            &after,
            "traitline_ingest_request_size_bytes_count",
            &[track]
        ),
        4.0
    );
    assert_eq!(
        grew(
            &before,
            &after,
            "traitline_log_append_duration_seconds_count",
            &[]
        ),
        4.0,
        "one append a stored request"
    );
    let profiles = [("processor", "profiles")];
    assert_eq!(
        grew(
            &before,
            &after,
            "traitline_processor_events_total",
            &[profiles[0], ("outcome", "applied")]
        ),
        5.0
    );
    assert!(
        grew(
            &before,
            &after,
            "traitline_processor_batch_records_sum",
            &profiles
        ) >= 5.0
    );
    assert!(grew(&before, &after, latency, &profiles) >= 5.0);
    assert!(
        grew(
            &before,
            &after,
            "traitline_store_transaction_duration_seconds_count",
            &[("outcome", "committed")]
        ) >= 1.0
    );
    // Kafka's high watermarks come with librdkafka's statistics (every
    // second) and are read every few seconds, so its lag series may come a
    // little later.
    scrape_until(&app, "a lag of 0 on every partition", |now| {
        sample(now, "traitline_processor_lag_records", &profiles) == Some(0.0)
    })
    .await;

    // A resent event is counted as a duplicate, not applied again.
    let resent = json!({"userId": "m1", "event": "Viewed", "messageId": "t0"});
    assert_eq!(
        app.post("/v1/track", &resent).await.status(),
        StatusCode::OK
    );
    let duplicate = [profiles[0], ("outcome", "duplicate")];
    scrape_until(&app, "the duplicate counted", |now| {
        grew(&after, now, "traitline_processor_events_total", &duplicate) == 1.0
    })
    .await;
}

both_logs!(metrics_follow_the_events);

/// On Kafka, librdkafka's statistics feed the broker and queue gauges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_statistics_show_the_broker_up() {
    let app = spawn_app(Backend::Kafka).await;
    let event = json!({"userId": "k1", "event": "Viewed"});
    assert_eq!(app.post("/v1/track", &event).await.status(), StatusCode::OK);
    scrape_until(&app, "the broker gauge", |now| {
        sample(now, "traitline_kafka_broker_up", &[]) >= Some(1.0)
            && sample(now, "traitline_kafka_producer_queue_messages", &[]).is_some()
    })
    .await;
}

/// Embedded, the metrics' message-id claims are SQLite's sorted runs:
/// how many are kept, and the memory their filters hold, are gauges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_claims_kept_and_their_memory_are_gauges() {
    let app = spawn_app(Backend::Embedded).await;
    let metric = json!({"event": "Viewed", "group_by": "userId", "aggregate": "count",
                        "window": {"kind": "tumbling", "size": "1h"}});
    let defined = app
        .client
        .put(app.url("/v1/metrics/views_hourly"))
        .basic_auth(crate::helpers::ADMIN_KEY, Some(""))
        .json(&metric)
        .send()
        .await
        .unwrap();
    assert!(defined.status().is_success(), "{}", defined.status());
    for i in 0..4 {
        let event = json!({"userId": "c1", "event": "Viewed", "messageId": format!("claimed-{i}")});
        assert_eq!(app.post("/v1/track", &event).await.status(), StatusCode::OK);
    }
    let claims = [("claims", "metrics")];
    scrape_until(&app, "the claims' gauges", |now| {
        sample(now, "traitline_claims_kept", &claims) >= Some(4.0)
            && sample(now, "traitline_claims_memory_bytes", &claims) > Some(0.0)
    })
    .await;
}
