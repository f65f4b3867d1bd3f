//! Metric definitions through the admin API, on both deployments: defined,
//! versioned, read, deleted; a bad one refused naming its field with the
//! running version untouched; only an admin key changes them; the
//! configuration file's `[[metrics]]` stored at start-up.

use reqwest::StatusCode;
use serde_json::{Value, json};

use std::time::Duration;

use traitline::log::Topics;

use crate::helpers::{
    ADMIN_KEY, Backend, READ_KEY, TestApp, WRITE_KEY, eventually, read_all, spawn_app,
    spawn_app_with,
};

both_logs!(
    a_metric_is_defined_versioned_read_and_deleted,
    a_bad_definition_is_refused_naming_its_field_and_the_running_version_stays,
    only_an_admin_key_changes_definitions_and_a_read_key_reads_them,
    concurrent_changes_each_get_a_version_of_their_own,
    the_configuration_files_metrics_are_stored_at_start,
    a_metric_defined_after_its_events_counts_them_from_history_exactly,
    global_and_property_metrics_over_eight_partitions_are_exact,
    a_computed_trait_is_in_the_profile_and_goes_down_as_events_age_out,
    a_deleted_user_leaves_no_metric_windows,
    an_alias_merges_the_anonymous_windows_into_the_users,
    a_metric_changed_and_deleted_while_events_flow_needs_no_restart,
    a_failing_metric_runner_shows_in_readyz_and_recovers,
    windows_close_when_traffic_stops
);

fn orders_hourly() -> Value {
    json!({"event": "order.create", "type": "track",
           "where": "properties.amount > 100",
           "group_by": "userId", "aggregate": "count",
           "window": {"kind": "tumbling", "size": "1h"},
           "lateness": "5m"})
}

/// A service whose log clock moves on a quiet log half a second behind
/// the wall clock (a short bound on late appends), so windows close and
/// linked windows move quickly once traffic stops.
async fn spawn_with_quick_clock(backend: Backend) -> TestApp {
    spawn_app_with(backend, |s| {
        s.append_timeout_ms = Some(500);
        s.clock_skew_ms = Some(0);
    })
    .await
}

/// A per-user hourly order count with a computed trait of its name.
fn orders_hourly_trait() -> Value {
    json!({"event": "order.create", "group_by": "userId", "aggregate": "count",
           "window": {"kind": "tumbling", "size": "1h"}, "trait": "orders_hourly"})
}

async fn put(app: &TestApp, name: &str, key: &str, body: &Value) -> (StatusCode, Value) {
    let response = app
        .client
        .put(app.url(&format!("/v1/metrics/{name}")))
        .basic_auth(key, Some(""))
        .json(body)
        .send()
        .await
        .expect("the service answers");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn delete(app: &TestApp, name: &str, key: &str) -> StatusCode {
    app.client
        .delete(app.url(&format!("/v1/metrics/{name}")))
        .basic_auth(key, Some(""))
        .send()
        .await
        .expect("the service answers")
        .status()
}

async fn a_metric_is_defined_versioned_read_and_deleted(backend: Backend) {
    let app = spawn_app(backend).await;
    let (status, created) = put(&app, "orders_hourly", ADMIN_KEY, &orders_hourly()).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["version"], 1);
    assert_eq!(created["definition"], orders_hourly());

    // The same definition again stores nothing new.
    let (status, same) = put(&app, "orders_hourly", ADMIN_KEY, &orders_hourly()).await;
    assert_eq!(
        (status, same["version"].clone()),
        (StatusCode::OK, json!(1))
    );

    let mut changed = orders_hourly();
    changed["lateness"] = json!("10m");
    let (status, second) = put(&app, "orders_hourly", ADMIN_KEY, &changed).await;
    assert_eq!(
        (status, second["version"].clone()),
        (StatusCode::OK, json!(2))
    );

    let (status, read) = app.get_as("/v1/metrics/orders_hourly", READ_KEY).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (
            read["version"].clone(),
            read["definition"]["lateness"].clone()
        ),
        (json!(2), json!("10m"))
    );
    let (_, list) = app.get_as("/v1/metrics", READ_KEY).await;
    assert_eq!(list["metrics"].as_array().unwrap().len(), 1);

    assert_eq!(
        delete(&app, "orders_hourly", ADMIN_KEY).await,
        StatusCode::NO_CONTENT
    );
    let (status, gone) = app.get_as("/v1/metrics/orders_hourly", READ_KEY).await;
    assert_eq!(
        (status, gone["error"]["code"].clone()),
        (StatusCode::NOT_FOUND, json!("not_found"))
    );
    assert_eq!(
        delete(&app, "orders_hourly", ADMIN_KEY).await,
        StatusCode::NOT_FOUND
    );
    let (_, list) = app.get_as("/v1/metrics", READ_KEY).await;
    assert_eq!(list["metrics"], json!([]));

    // Defined again after a deletion: a new definition, its version after
    // the deletion's, so no instance mistakes it for the old one.
    let (status, again) = put(&app, "orders_hourly", ADMIN_KEY, &orders_hourly()).await;
    assert_eq!(
        (status, again["version"].clone()),
        (StatusCode::CREATED, json!(4))
    );
    app.stop().await;
}

async fn a_bad_definition_is_refused_naming_its_field_and_the_running_version_stays(
    backend: Backend,
) {
    let app = spawn_app(backend).await;
    put(&app, "orders_hourly", ADMIN_KEY, &orders_hourly()).await;
    let cases = [
        (json!({"size": "1h"}), "window", "window.kind"),
        (
            json!({"kind": "tumbling", "size": "an hour"}),
            "window",
            "window.size",
        ),
        (json!("properties.amount >"), "where", "where"),
        (json!("propertes.amount > 1"), "where", "where"),
        (json!("median"), "aggregate", "aggregate"),
        (json!("Mars/Olympus"), "lateness", "lateness"),
    ];
    for (value, key, field) in cases {
        let mut bad = orders_hourly();
        bad[key] = value;
        let (status, body) = put(&app, "orders_hourly", ADMIN_KEY, &bad).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(body["error"]["code"], "invalid_value", "{body}");
        assert_eq!(body["error"]["field"], field, "{body}");
    }
    let (status, body) = put(&app, "Orders-Hourly", ADMIN_KEY, &orders_hourly()).await;
    assert_eq!(
        (status, body["error"]["field"].clone()),
        (StatusCode::UNPROCESSABLE_ENTITY, json!("name"))
    );
    let not_json = app
        .client
        .put(app.url("/v1/metrics/orders_hourly"))
        .basic_auth(ADMIN_KEY, Some(""))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), StatusCode::BAD_REQUEST);
    let (_, read) = app.get_as("/v1/metrics/orders_hourly", READ_KEY).await;
    assert_eq!(
        (read["version"].clone(), read["definition"].clone()),
        (json!(1), orders_hourly())
    );
    let (_, list) = app.get_as("/v1/metrics", READ_KEY).await;
    assert_eq!(
        list["metrics"].as_array().unwrap().len(),
        1,
        "nothing else stored"
    );
    app.stop().await;
}

async fn only_an_admin_key_changes_definitions_and_a_read_key_reads_them(backend: Backend) {
    let app = spawn_app(backend).await;
    for key in [READ_KEY, WRITE_KEY] {
        let (status, body) = put(&app, "orders_hourly", key, &orders_hourly()).await;
        assert_eq!(
            (status, body["error"]["code"].clone()),
            (StatusCode::FORBIDDEN, json!("wrong_key_scope"))
        );
    }
    put(&app, "orders_hourly", ADMIN_KEY, &orders_hourly()).await;
    assert_eq!(
        delete(&app, "orders_hourly", READ_KEY).await,
        StatusCode::FORBIDDEN
    );
    let (status, _) = app.get_as("/v1/metrics/orders_hourly", WRITE_KEY).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    for key in [READ_KEY, ADMIN_KEY] {
        let (status, _) = app.get_as("/v1/metrics/orders_hourly", key).await;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, body) = app.get_as("/v1/metrics", "tlr_nobody").await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::UNAUTHORIZED, json!("unknown_key"))
    );
    app.stop().await;
}

async fn concurrent_changes_each_get_a_version_of_their_own(backend: Backend) {
    let app = spawn_app(backend).await;
    let puts = (1..=8).map(|minutes| {
        let mut definition = orders_hourly();
        definition["lateness"] = json!(format!("{minutes}m"));
        let app = &app;
        async move { put(app, "orders_hourly", ADMIN_KEY, &definition).await }
    });
    let answers = futures_util::future::join_all(puts).await;
    let mut versions: Vec<i64> = answers
        .iter()
        .map(|(status, body)| {
            assert!(status.is_success(), "{body}");
            body["version"].as_i64().unwrap()
        })
        .collect();
    versions.sort();
    assert_eq!(versions, (1..=8).collect::<Vec<_>>());
    app.stop().await;
}

async fn the_configuration_files_metrics_are_stored_at_start(backend: Backend) {
    let file: traitline::config::Settings = toml::from_str(
        r#"
        [[metrics]]
        name = "revenue_daily"
        event = "order.create"
        group_by = "userId"
        aggregate = "sum"
        field = "properties.amount"
        window = { kind = "calendar", unit = "day", timezone = "Europe/Berlin" }
        "#,
    )
    .unwrap();
    let app = spawn_app_with(backend, |s| s.metrics = file.metrics.clone()).await;
    let (status, read) = app.get_as("/v1/metrics/revenue_daily", READ_KEY).await;
    assert_eq!(status, StatusCode::OK, "{read}");
    assert_eq!(read["version"], 1);
    assert_eq!(read["definition"]["window"]["timezone"], "Europe/Berlin");
    assert!(
        read["definition"].get("name").is_none(),
        "the name is the path's"
    );
    app.stop().await;
}

async fn a_metric_defined_after_its_events_counts_them_from_history_exactly(backend: Backend) {
    let app = spawn_app(backend).await;
    const HOUR: i64 = 3_600_000;
    // Two whole hours that ended before now: the log's clock (the time
    // events are received) has passed them, so they close at once.
    let base = (chrono::Utc::now().timestamp_millis() / HOUR - 3) * HOUR;
    let at = |ms: i64| {
        chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
            .unwrap()
            .to_rfc3339()
    };
    let order = |i: usize, user: &str, ms: i64, amount: i64| {
        json!({"type": "track", "event": "order.create", "userId": user,
               "messageId": format!("order-{i}"), "timestamp": at(ms),
               "properties": {"amount": amount}})
    };
    let batch = json!({"batch": [
        order(1, "u1", base + 60_000, 150),
        order(2, "u1", base + 120_000, 500),
        order(3, "u1", base + HOUR - 1, 101),
        order(4, "u1", base + HOUR, 200),
        order(5, "u1", base + HOUR + 5, 300),
        order(6, "u1", base + 30_000, 50),
        order(7, "u2", base + 10, 1_000),
        // A retry of an event already sent: counted once.
        order(7, "u2", base + 10, 1_000),
    ]});
    let sent = app.post("/v1/batch", &batch).await;
    assert!(sent.status().is_success());
    let (status, _) = put(
        &app,
        "orders_hourly",
        ADMIN_KEY,
        &json!({
            "event": "order.create", "type": "track", "where": "properties.amount > 100",
            "group_by": "userId", "aggregate": "count",
            "window": {"kind": "tumbling", "size": "1h"}
        }),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let values = |group: &'static str| {
        let app = &app;
        async move {
            let (status, body) = app
                .get_as(
                    &format!("/v1/metrics/orders_hourly/values?group={group}"),
                    READ_KEY,
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{body}");
            body
        }
    };
    let u1 = eventually(
        "u1's two windows closed",
        Duration::from_secs(30),
        || async {
            let body = values("u1").await;
            (body["values"].as_array().unwrap().len() == 2).then_some(body)
        },
    )
    .await;
    let windows: Vec<(String, Value, bool)> = u1["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["start"].as_str().unwrap().to_owned(),
                w["value"].clone(),
                w["final"].as_bool().unwrap(),
            )
        })
        .collect();
    let start = |ms: i64| {
        chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
    };
    assert_eq!(
        windows,
        vec![
            (start(base), json!(3), true),
            (start(base + HOUR), json!(2), true)
        ]
    );
    // u2's events are in another partition, maybe committed later.
    let u2 = eventually("u2's window closed", Duration::from_secs(30), || async {
        let body = values("u2").await;
        (!body["values"].as_array().unwrap().is_empty()).then_some(body)
    })
    .await;
    assert_eq!(
        u2["values"][0]["value"],
        json!(1),
        "the retry is not counted: {u2}"
    );
    assert_eq!(u2["values"].as_array().unwrap().len(), 1);
    assert_eq!(u1["version"], 1);

    // Its progress: read through the log, live, its watermark near now;
    // /readyz lists it too.
    let progress = eventually("the metric live", Duration::from_secs(30), || async {
        let (status, body) = app.get_as("/v1/metrics/orders_hourly", READ_KEY).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        (body["progress"]["state"] == "live").then_some(body["progress"].clone())
    })
    .await;
    assert_eq!(progress["records_read"], 8, "{progress}");
    assert!(
        progress["behind_seconds"].as_f64().unwrap() < 600.0,
        "{progress}"
    );
    let ready = app.get_json("/readyz").await;
    assert_eq!(ready["metrics"]["orders_hourly"]["version"], 1, "{ready}");
    assert_eq!(
        ready["metrics"]["orders_hourly"]["state"], "live",
        "{ready}"
    );

    // An order for u1's first hour, now closed: late. It is on
    // user_events_late with the window it missed, counted in /metrics,
    // and the window keeps its value.
    let late = json!({"batch": [order(8, "u1", base + 90_000, 900)]});
    assert!(app.post("/v1/batch", &late).await.status().is_success());
    let topics = Topics::new(&app.config.topic_prefix);
    let reported = eventually(
        "the late event reported",
        Duration::from_secs(30),
        || async {
            let records = read_all(&app.config, &topics.late()).await;
            (!records.is_empty()).then_some(records)
        },
    )
    .await;
    assert_eq!(reported.len(), 1);
    assert_eq!(reported[0].key.as_deref(), Some(&b"orders_hourly:u1"[..]));
    let record: Value = serde_json::from_slice(&reported[0].value).unwrap();
    assert_eq!(record["metric"], "orders_hourly");
    assert_eq!(record["version"], 1);
    assert_eq!(record["message_id"], "order-8");
    assert_eq!(record["window"]["start"], json!(start(base)));
    assert_eq!(record["event"]["properties"]["amount"], 900);
    assert!(record["late_by_ms"].as_i64().unwrap() > 0, "{record}");
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"traitline_metric_late_events_total{metric="orders_hourly"} 1"#),
        "{metrics}"
    );
    assert_eq!(values("u1").await["values"][0]["value"], json!(3));

    // A window two hours ahead of the log's clock is open: served, marked
    // not final, and not on user_metrics.
    let ahead = json!({"batch": [order(9, "u3", base + 5 * HOUR + 1_000, 150)]});
    assert!(app.post("/v1/batch", &ahead).await.status().is_success());
    let u3 = eventually("u3's open window", Duration::from_secs(30), || async {
        let body = values("u3").await;
        (!body["values"].as_array().unwrap().is_empty()).then_some(body)
    })
    .await;
    assert_eq!(
        u3["values"],
        json!([{"group": "u3", "start": start(base + 5 * HOUR), "end": start(base + 6 * HOUR),
                "value": 1, "events": 1, "final": false}])
    );

    // Each closed window is on user_metrics once, as the API shows it.
    let published = eventually("3 windows published", Duration::from_secs(30), || async {
        let records = read_all(&app.config, &topics.metrics()).await;
        (records.len() >= 3).then_some(records)
    })
    .await;
    let mut published: Vec<(Option<Vec<u8>>, Value, Value, Value)> = published
        .iter()
        .map(|r| {
            let w: Value = serde_json::from_slice(&r.value).unwrap();
            assert_eq!(
                (w["metric"].clone(), w["version"].clone()),
                (json!("orders_hourly"), json!(1))
            );
            assert_eq!(w["final"], true);
            (
                r.key.as_deref().map(<[u8]>::to_vec),
                w["start"].clone(),
                w["value"].clone(),
                w["events"].clone(),
            )
        })
        .collect();
    published.sort_by_key(|(key, start, ..)| (key.clone(), start.to_string()));
    assert_eq!(
        published,
        vec![
            (
                Some(b"orders_hourly:u1".to_vec()),
                json!(start(base)),
                json!(3),
                json!(3)
            ),
            (
                Some(b"orders_hourly:u1".to_vec()),
                json!(start(base + HOUR)),
                json!(2),
                json!(2)
            ),
            (
                Some(b"orders_hourly:u2".to_vec()),
                json!(start(base)),
                json!(1),
                json!(1)
            ),
        ]
    );
    app.stop().await;
}

/// Every window of `metric`, once as many as `count` are final.
async fn final_windows(app: &TestApp, metric: &str, count: usize) -> Vec<Value> {
    let path = format!("/v1/metrics/{metric}/values?limit=1000");
    eventually(
        &format!("{count} windows of {metric} final"),
        Duration::from_secs(60),
        || async {
            let (status, body) = app.get_as(&path, READ_KEY).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let values = body["values"].as_array().unwrap();
            let done = values.iter().filter(|w| w["final"] == json!(true)).count();
            assert!(done <= count, "more windows than expected: {body}");
            (done == count).then(|| values.clone())
        },
    )
    .await
}

/// Metrics grouped globally and by a property span the 8 partitions:
/// revenue per hour, orders per country per hour, and seed 003's moving
/// average (a 5-minute average of a price every minute, per symbol), each
/// against values the test computes from the events it sends.
async fn global_and_property_metrics_over_eight_partitions_are_exact(backend: Backend) {
    use std::collections::BTreeMap;
    const HOUR: i64 = 3_600_000;
    const MINUTE: i64 = 60_000;
    let app = spawn_app_with(backend, |s| s.partitions = Some(8)).await;
    // Hours that ended before now: the log's clock has passed them.
    let base = (chrono::Utc::now().timestamp_millis() / HOUR - 3) * HOUR;
    let at = |ms: i64| {
        chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
            .unwrap()
            .to_rfc3339()
    };
    let start = |ms: i64| {
        chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
    };
    let mut revenue: BTreeMap<String, (f64, i64)> = BTreeMap::new();
    let mut per_country: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut prices: Vec<(String, i64, f64)> = Vec::new();
    let mut events = Vec::new();
    for i in 0..240_i64 {
        let ms = base + (i * 29_000) % (2 * HOUR);
        let amount = (i * 37) % 500 + 1;
        let country = ["DE", "FR", "US"][(i % 3) as usize];
        let hour = start(ms - ms % HOUR);
        let slot = revenue.entry(hour.clone()).or_default();
        slot.0 += amount as f64;
        slot.1 += 1;
        *per_country.entry((country.to_owned(), hour)).or_default() += 1;
        events.push(json!({"type": "track", "event": "order.create",
            "userId": format!("u{}", i % 40), "messageId": format!("order-{i}"),
            "timestamp": at(ms), "properties": {"amount": amount, "country": country}}));
        let symbol = ["AAPL", "MSFT"][(i % 2) as usize];
        let (tick_ms, price) = (base + i * 15_000, 100.0 + ((i * 13) % 50) as f64 * 0.25);
        prices.push((symbol.to_owned(), tick_ms, price));
        events.push(json!({"type": "track", "event": "price",
            "userId": format!("feed-{}", i % 16), "messageId": format!("price-{i}"),
            "timestamp": at(tick_ms), "properties": {"symbol": symbol, "price": price}}));
    }
    for chunk in events.chunks(100) {
        let sent = app.post("/v1/batch", &json!({ "batch": chunk })).await;
        assert!(sent.status().is_success());
    }
    for (name, definition) in [
        (
            "revenue_hourly",
            json!({"event": "order.create", "aggregate": "sum",
            "field": "properties.amount", "window": {"kind": "tumbling", "size": "1h"}}),
        ),
        (
            "orders_by_country",
            json!({"event": "order.create", "aggregate": "count",
            "group_by": "properties.country", "window": {"kind": "tumbling", "size": "1h"}}),
        ),
        (
            "price_5m_avg",
            json!({"event": "price", "aggregate": "avg",
            "field": "properties.price", "group_by": "properties.symbol",
            "window": {"kind": "hopping", "size": "5m", "slide": "1m"}}),
        ),
    ] {
        let (status, body) = put(&app, name, ADMIN_KEY, &definition).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    let got: BTreeMap<String, (f64, i64)> = final_windows(&app, "revenue_hourly", revenue.len())
        .await
        .iter()
        .map(|w| {
            assert_eq!(w["group"], "*");
            let value = (w["value"].as_f64().unwrap(), w["events"].as_i64().unwrap());
            (w["start"].as_str().unwrap().to_owned(), value)
        })
        .collect();
    assert_eq!(got, revenue);

    let got: BTreeMap<(String, String), i64> =
        final_windows(&app, "orders_by_country", per_country.len())
            .await
            .iter()
            .map(|w| {
                let key = (w["group"].as_str().unwrap(), w["start"].as_str().unwrap());
                assert_eq!(w["value"], w["events"]);
                (
                    (key.0.to_owned(), key.1.to_owned()),
                    w["value"].as_i64().unwrap(),
                )
            })
            .collect();
    assert_eq!(got, per_country);

    // The moving average, computed directly: each minute-aligned window
    // of five minutes that holds a price.
    let mut average: BTreeMap<(String, String), f64> = BTreeMap::new();
    for symbol in ["AAPL", "MSFT"] {
        let ticks: Vec<(i64, f64)> = prices
            .iter()
            .filter(|(s, _, _)| s == symbol)
            .map(|(_, ms, p)| (*ms, *p))
            .collect();
        let (first, last) = (ticks[0].0, ticks[ticks.len() - 1].0);
        let mut window = (first - 5 * MINUTE).div_euclid(MINUTE) * MINUTE + MINUTE;
        while window <= last {
            let inside: Vec<f64> = ticks
                .iter()
                .filter(|(ms, _)| (window..window + 5 * MINUTE).contains(ms))
                .map(|(_, p)| *p)
                .collect();
            if !inside.is_empty() {
                let mean = inside.iter().sum::<f64>() / inside.len() as f64;
                average.insert((symbol.to_owned(), start(window)), mean);
            }
            window += MINUTE;
        }
    }
    let got = final_windows(&app, "price_5m_avg", average.len()).await;
    assert_eq!(got.len(), average.len());
    for w in &got {
        let key = (
            w["group"].as_str().unwrap().to_owned(),
            w["start"].as_str().unwrap().to_owned(),
        );
        let expected = average
            .get(&key)
            .unwrap_or_else(|| panic!("an unexpected window {w}"));
        let value = w["value"].as_f64().unwrap();
        assert!(
            (value - expected).abs() < 1e-9,
            "{key:?}: {value} vs {expected}"
        );
    }

    // An order two hours ahead of the log's clock: the global metric's
    // open window, served without a group and marked not final.
    let ahead = json!({"batch": [{"type": "track", "event": "order.create", "userId": "u1",
        "messageId": "order-ahead", "timestamp": at(base + 5 * HOUR),
        "properties": {"amount": 7, "country": "DE"}}]});
    assert!(app.post("/v1/batch", &ahead).await.status().is_success());
    let open = eventually("the open window", Duration::from_secs(30), || async {
        let (_, body) = app
            .get_as("/v1/metrics/revenue_hourly/values?limit=1000", READ_KEY)
            .await;
        let values = body["values"].as_array().unwrap().clone();
        values.into_iter().find(|w| w["final"] == json!(false))
    })
    .await;
    assert_eq!(
        open,
        json!({"group": "*", "start": start(base + 5 * HOUR), "end": start(base + 6 * HOUR),
               "value": 7.0, "events": 1, "final": false})
    );

    // Each final window is on user_metrics once.
    let total = revenue.len() + per_country.len() + average.len();
    let topic = Topics::new(&app.config.topic_prefix).metrics();
    let published = eventually(
        "every window published",
        Duration::from_secs(30),
        || async {
            let records = read_all(&app.config, &topic).await;
            (records.len() >= total).then_some(records)
        },
    )
    .await;
    let distinct: std::collections::BTreeSet<(String, String, String)> = published
        .iter()
        .map(|r| {
            let w: Value = serde_json::from_slice(&r.value).unwrap();
            let text = |v: &Value| v.as_str().unwrap().to_owned();
            (text(&w["metric"]), text(&w["group"]), text(&w["start"]))
        })
        .collect();
    assert_eq!((published.len(), distinct.len()), (total, total));
    app.stop().await;
}

/// A trailing count with a trait name: the profile shows it, as a change
/// like any other, and it goes back to 0 as the events age out of the
/// window although the user sends nothing more (the log's clock moves on
/// a quiet log; a short idle bound makes that quick).
async fn a_computed_trait_is_in_the_profile_and_goes_down_as_events_age_out(backend: Backend) {
    let app = spawn_with_quick_clock(backend).await;
    let (status, body) = put(
        &app,
        "recent_orders",
        ADMIN_KEY,
        &json!({"event": "order.create", "group_by": "userId", "aggregate": "count",
                "window": {"kind": "trailing", "size": "20s", "step": "1s"},
                "trait": "recent_orders"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let now = chrono::Utc::now();
    let ago = |secs: i64| (now - chrono::Duration::seconds(secs)).to_rfc3339();
    let batch = json!({"batch": [
        {"type": "identify", "userId": "u1", "messageId": "id-1", "timestamp": ago(16),
         "traits": {"plan": "pro"}},
        {"type": "track", "event": "order.create", "userId": "u1", "messageId": "o-1", "timestamp": ago(15)},
        {"type": "track", "event": "order.create", "userId": "u1", "messageId": "o-2", "timestamp": ago(14)},
        {"type": "track", "event": "page", "userId": "u1", "messageId": "p-1", "timestamp": ago(13)},
    ]});
    assert!(app.post("/v1/batch", &batch).await.status().is_success());
    let computed = |want: i64| {
        let app = &app;
        async move {
            eventually(
                &format!("recent_orders = {want} in the profile"),
                Duration::from_secs(60),
                || async {
                    let (status, profile) = app.get_as("/v1/profiles/u1", READ_KEY).await;
                    (status == StatusCode::OK
                        && profile["computed"]["recent_orders"] == json!(want))
                    .then_some(profile)
                },
            )
            .await
        }
    };
    let profile = computed(2).await;
    assert_eq!(profile["traits"]["plan"], "pro");
    assert_eq!(
        profile["event_count"], 4,
        "a computed value is not an event: {profile}"
    );
    computed(0).await;
    let (status, changes) = app.get_as("/v1/profiles/u1/changes", READ_KEY).await;
    assert_eq!(status, StatusCode::OK);
    let computed_changes: Vec<Value> = changes["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| {
            c["causes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m.as_str().unwrap().starts_with("tl-computed-"))
        })
        .map(|c| c["after"]["computed"]["recent_orders"].clone())
        .collect();
    assert!(
        computed_changes.contains(&json!(2)) && computed_changes.first() == Some(&json!(0)),
        "the trait's values are changes, newest first: {computed_changes:?}"
    );

    // A deleted metric's trait leaves the profile.
    assert_eq!(
        delete(&app, "recent_orders", ADMIN_KEY).await,
        StatusCode::NO_CONTENT
    );
    let profile = eventually(
        "recent_orders gone from the profile",
        Duration::from_secs(60),
        || async {
            let (status, profile) = app.get_as("/v1/profiles/u1", READ_KEY).await;
            (status == StatusCode::OK
                && profile
                    .get("computed")
                    .is_none_or(|c| c.get("recent_orders").is_none()))
            .then_some(profile)
        },
    )
    .await;
    assert_eq!(profile["traits"]["plan"], "pro", "{profile}");
    app.stop().await;
}

/// A GDPR deletion of a user reaches every per-user metric in order with
/// the user's events: their windows and computed trait go, other users'
/// stay, and the user's later events count afresh.
async fn a_deleted_user_leaves_no_metric_windows(backend: Backend) {
    const HOUR: i64 = 3_600_000;
    let app = spawn_app(backend).await;
    let base = (chrono::Utc::now().timestamp_millis() / HOUR - 3) * HOUR;
    let at = |ms: i64| {
        chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
            .unwrap()
            .to_rfc3339()
    };
    let order = |i: usize, user: &str, ms: i64| {
        json!({"type": "track", "event": "order.create", "userId": user,
               "messageId": format!("order-{i}"), "timestamp": at(ms)})
    };
    let (status, body) = put(&app, "orders_hourly", ADMIN_KEY, &orders_hourly_trait()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let batch = json!({"batch": [
        order(1, "u1", base + 1_000), order(2, "u1", base + 2_000),
        order(3, "u2", base + 3_000),
        // Ahead of the log's clock: u1's window still open.
        order(4, "u1", base + 5 * HOUR),
    ]});
    assert!(app.post("/v1/batch", &batch).await.status().is_success());
    let windows = |group: &'static str| {
        let app = &app;
        async move {
            let path = format!("/v1/metrics/orders_hourly/values?group={group}");
            let (status, body) = app.get_as(&path, READ_KEY).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            body["values"].as_array().unwrap().len()
        }
    };
    // The profiles have a runner of their own, which may commit after
    // the metrics'.
    eventually(
        "u1's windows and profile",
        Duration::from_secs(30),
        || async {
            let profile = app.get_as("/v1/profiles/u1", READ_KEY).await.0;
            (windows("u1").await == 2 && windows("u2").await == 1 && profile == StatusCode::OK)
                .then_some(())
        },
    )
    .await;
    let (status, profile) = app.get_as("/v1/profiles/u1", READ_KEY).await;
    assert_eq!(status, StatusCode::OK, "{profile}");

    let deleted = app
        .client
        .delete(app.url("/v1/profiles/u1"))
        .basic_auth(ADMIN_KEY, Some(""))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::OK);
    eventually("u1's windows gone", Duration::from_secs(30), || async {
        (windows("u1").await == 0).then_some(())
    })
    .await;
    assert_eq!(windows("u2").await, 1, "another user's window stays");

    // After the deletion, u1's events count afresh.
    let again = json!({"batch": [order(5, "u1", base + 5 * HOUR + 1)]});
    assert!(app.post("/v1/batch", &again).await.status().is_success());
    let (_, body) = eventually("u1 counted afresh", Duration::from_secs(30), || async {
        let answer = app
            .get_as("/v1/metrics/orders_hourly/values?group=u1", READ_KEY)
            .await;
        (answer.1["values"].as_array().unwrap().len() == 1).then_some(answer)
    })
    .await;
    assert_eq!(body["values"][0]["value"], 1, "{body}");
    assert_eq!(body["values"][0]["final"], false);
    app.stop().await;
}

/// Anonymous activity joins the user's windows when an identify or an
/// alias links the ids, whether the anonymous id's events are in the
/// user's partition or another: the user's open window and computed
/// trait count them all, and the anonymous groups keep nothing open.
async fn an_alias_merges_the_anonymous_windows_into_the_users(backend: Backend) {
    const HOUR: i64 = 3_600_000;
    let app = spawn_with_quick_clock(backend).await;
    let partition = |id: &str| traitline::log::partitioner::partition_for_key(id.as_bytes(), 4);
    let user = "merge-user";
    let id_in = |same: bool| {
        (0..)
            .map(|i| format!("anon-{i}"))
            .find(|id| (partition(id) == partition(user)) == same)
            .unwrap()
    };
    let (near, far) = (id_in(true), id_in(false));
    let (status, body) = put(&app, "orders_hourly", ADMIN_KEY, &orders_hourly_trait()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // Ahead of the log's clock: every window stays open.
    let at = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(
        (chrono::Utc::now().timestamp_millis() / HOUR + 5) * HOUR,
    )
    .unwrap()
    .to_rfc3339();
    let order = |i: usize, field: &str, id: &str| {
        let mut order = json!({"type": "track", "event": "order.create",
                               "messageId": format!("order-{i}"), "timestamp": at});
        order[field] = json!(id);
        order
    };
    let anonymous = json!({"batch": [
        order(1, "anonymousId", &near), order(2, "anonymousId", &near),
        order(3, "anonymousId", &far), order(4, "anonymousId", &far),
        order(5, "anonymousId", &far), order(6, "userId", user),
    ]});
    assert!(
        app.post("/v1/batch", &anonymous)
            .await
            .status()
            .is_success()
    );
    let open = |group: String| {
        let app = &app;
        async move {
            let path = format!("/v1/metrics/orders_hourly/values?group={group}");
            let (status, body) = app.get_as(&path, READ_KEY).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            body["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| w["value"].as_i64().unwrap())
                .sum::<i64>()
        }
    };
    eventually(
        "the anonymous orders counted",
        Duration::from_secs(30),
        || async { (open(near.clone()).await == 2 && open(far.clone()).await == 3).then_some(()) },
    )
    .await;

    let links = json!({"batch": [
        {"type": "identify", "userId": user, "anonymousId": near, "messageId": "link-1"},
        {"type": "alias", "userId": user, "previousId": far, "messageId": "link-2"},
    ]});
    assert!(app.post("/v1/batch", &links).await.status().is_success());
    eventually(
        "every order in the user's window",
        Duration::from_secs(60),
        || async { (open(user.to_owned()).await == 6).then_some(()) },
    )
    .await;
    assert_eq!(open(near.clone()).await, 0, "nothing left open for {near}");
    assert_eq!(open(far.clone()).await, 0, "nothing left open for {far}");
    eventually(
        "the merged trait in the profile",
        Duration::from_secs(30),
        || async {
            let (status, profile) = app.get_as(&format!("/v1/profiles/{user}"), READ_KEY).await;
            (status == StatusCode::OK && profile["computed"]["orders_hourly"] == json!(6))
                .then_some(())
        },
    )
    .await;
    app.stop().await;
}

/// A metric changed and then deleted while events flow, with no restart:
/// the new version computes from the log's beginning (history, then
/// live) and equals a count of every event sent; the deleted metric stops
/// on the instance, and events keep being taken.
async fn a_metric_changed_and_deleted_while_events_flow_needs_no_restart(backend: Backend) {
    const HOUR: i64 = 3_600_000;
    let app = spawn_app(backend).await;
    let at = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(
        (chrono::Utc::now().timestamp_millis() / HOUR + 5) * HOUR,
    )
    .unwrap()
    .to_rfc3339();
    let mut expected: std::collections::BTreeMap<String, i64> = Default::default();
    let mut send = |b: usize| {
        let events: Vec<Value> = (0..20)
            .map(|j| {
                let n = b * 20 + j;
                let (user, amount) = (format!("f{}", n % 7), (n % 11) as i64);
                *expected.entry(user.clone()).or_default() += amount;
                json!({"type": "track", "event": "order.create", "userId": user,
                       "messageId": format!("flow-{n}"), "timestamp": at,
                       "properties": {"amount": amount}})
            })
            .collect();
        json!({"batch": events})
    };
    let body = |aggregate: &str| {
        json!({"event": "order.create", "group_by": "userId", "aggregate": aggregate,
               "field": "properties.amount", "window": {"kind": "tumbling", "size": "1h"}})
    };
    let (status, answer) = put(&app, "amounts", ADMIN_KEY, &body("count")).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    for b in 0..30 {
        assert!(app.post("/v1/batch", &send(b)).await.status().is_success());
        if b == 10 {
            let (status, answer) = put(&app, "amounts", ADMIN_KEY, &body("sum")).await;
            assert_eq!(
                (status, answer["version"].clone()),
                (StatusCode::OK, json!(2))
            );
        }
    }
    for (user, sum) in &expected {
        let path = format!("/v1/metrics/amounts/values?group={user}");
        let values = eventually(
            "the new version's sums",
            Duration::from_secs(60),
            || async {
                let (status, body) = app.get_as(&path, READ_KEY).await;
                assert_eq!(status, StatusCode::OK, "{body}");
                (body["version"] == 2
                    && body["values"].as_array().unwrap().len() == 1
                    && body["values"][0]["value"].as_f64() >= Some(*sum as f64))
                .then_some(body)
            },
        )
        .await;
        assert_eq!(
            values["values"][0]["value"].as_f64(),
            Some(*sum as f64),
            "{user}: {values}"
        );
    }

    assert_eq!(
        delete(&app, "amounts", ADMIN_KEY).await,
        StatusCode::NO_CONTENT
    );
    eventually(
        "the deleted metric stopped",
        Duration::from_secs(30),
        || async {
            let ready = app.get_json("/readyz").await;
            ready["metrics"].get("amounts").is_none().then_some(())
        },
    )
    .await;
    let (status, _) = app.get_as("/v1/metrics/amounts", READ_KEY).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let after = json!({"type": "track", "event": "order.create", "userId": "f1",
                       "messageId": "flow-after", "properties": {"amount": 1}});
    assert!(app.post("/v1/track", &after).await.status().is_success());
    app.stop().await;
}

/// A metric runner that cannot go on (here: window state handed over to
/// it that does not parse) fails visibly: `/readyz` answers 503 naming
/// the metric and why, the stage restarts with backoff, and once the
/// cause is gone the metric is live again and counts.
async fn a_failing_metric_runner_shows_in_readyz_and_recovers(backend: Backend) {
    use traitline::store::{MergeRow, MetricBatch, Store};
    let app = spawn_app(backend).await;
    let (status, body) = put(&app, "orders", ADMIN_KEY, &orders_hourly()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let user = "broken-user";
    let partition = traitline::log::partitioner::partition_for_key(user.as_bytes(), 4);
    let store = Store::open(app.config.database_url.as_deref(), &app.config.data_dir)
        .await
        .unwrap();
    let garbage = MergeRow {
        partition,
        message_id: "garbage".to_owned(),
        group: "anon".to_owned(),
        into_group: user.to_owned(),
        into_partition: partition,
        at: 0,
        state: Some("not a window state".to_owned()),
    };
    let batch = |merges, merged| MetricBatch {
        processor: "metric:orders:1",
        metric: "orders",
        topic: "",
        offsets: vec![],
        clocks: vec![],
        states: vec![],
        windows: vec![],
        late: vec![],
        deleted: vec![],
        traits: vec![],
        combine: None,
        merges,
        merged,
    };
    store
        .apply_metric_batch(&batch(vec![garbage], vec![]))
        .await
        .unwrap();
    let order = json!({"type": "track", "event": "order.create", "userId": user,
                       "messageId": "broken-1", "properties": {"amount": 500}});
    assert!(app.post("/v1/track", &order).await.status().is_success());

    let ready = eventually(
        "the failure in /readyz",
        Duration::from_secs(30),
        || async {
            let response = app.client.get(app.url("/readyz")).send().await.unwrap();
            let status = response.status();
            let body: Value = response.json().await.unwrap();
            (status == StatusCode::SERVICE_UNAVAILABLE
                && body["metrics"]["orders"]["state"] == "failed")
                .then_some(body)
        },
    )
    .await;
    let error = ready["metrics"]["orders"]["error"].as_str().unwrap();
    assert!(
        error.contains("metric orders version 1") && error.contains("unreadable"),
        "{ready}"
    );
    assert!(
        ready["stages"]["definitions"]["restarts"].as_u64() >= Some(1),
        "{ready}"
    );

    store
        .apply_metric_batch(&batch(
            vec![],
            vec![(partition, "garbage".to_owned(), "anon".to_owned())],
        ))
        .await
        .unwrap();
    eventually(
        "the metric live and counting again",
        Duration::from_secs(60),
        || async {
            let path = format!("/v1/metrics/orders/values?group={user}");
            let (_, body) = app.get_as(&path, READ_KEY).await;
            let response = app.client.get(app.url("/readyz")).send().await.unwrap();
            (response.status() == StatusCode::OK && body["values"][0]["value"] == 1).then_some(())
        },
    )
    .await;
    store.close().await;
    app.stop().await;
}

/// Quiet streams: traffic stops and every window still closes. The log's
/// clock moves on quiet and idle partitions (the time hook), so per-user
/// windows and a global window combined over every partition (most of
/// them without an event) become final with no event after them.
async fn windows_close_when_traffic_stops(backend: Backend) {
    let app = spawn_with_quick_clock(backend).await;
    for (name, group_by) in [("per_user", json!("userId")), ("total", Value::Null)] {
        let mut body = json!({"aggregate": "count", "window": {"kind": "tumbling", "size": "2s"}});
        if !group_by.is_null() {
            body["group_by"] = group_by;
        }
        let (status, answer) = put(&app, name, ADMIN_KEY, &body).await;
        assert_eq!(status, StatusCode::CREATED, "{answer}");
    }
    let events: Vec<Value> = (0..8)
        .map(|i| {
            json!({"type": "track", "event": "E", "userId": if i < 5 { "q1" } else { "q2" },
                        "messageId": format!("quiet-{i}")})
        })
        .collect();
    assert!(
        app.post("/v1/batch", &json!({"batch": events}))
            .await
            .status()
            .is_success()
    );
    for (path, want) in [
        ("/v1/metrics/per_user/values?group=q1", 5),
        ("/v1/metrics/per_user/values?group=q2", 3),
        ("/v1/metrics/total/values", 8),
    ] {
        eventually(
            &format!("every window of {path} final"),
            Duration::from_secs(30),
            || async {
                let (status, body) = app.get_as(path, READ_KEY).await;
                assert_eq!(status, StatusCode::OK, "{body}");
                let windows = body["values"].as_array().unwrap().clone();
                let total: i64 = windows.iter().filter_map(|w| w["value"].as_i64()).sum();
                (total == want && windows.iter().all(|w| w["final"] == true)).then_some(())
            },
        )
        .await;
    }
    app.stop().await;
}
