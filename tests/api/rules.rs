//! Pattern rule definitions through the admin API, on both deployments:
//! defined, versioned, read, deleted; a bad one refused naming its field
//! with the running version untouched; only an admin key changes them;
//! the configuration file's `[[rules]]` stored at start-up.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{ADMIN_KEY, Backend, READ_KEY, TestApp, spawn_app, spawn_app_with};

both_logs!(
    a_rule_is_defined_versioned_read_and_deleted,
    a_bad_rule_is_refused_naming_its_field_and_the_running_version_stays,
    the_configuration_files_rules_are_stored_at_start
);

/// Seed 004's fraud rule, in DESIGN.md's shape.
fn card_testing() -> Value {
    json!({"key": "userId",
           "steps": [{"name": "small", "where": "event == \"payment\" && properties.amount < 100", "times": {"min": 3}},
                     {"name": "large", "where": "event == \"payment\" && properties.amount > 1000"}],
           "within": "5m", "lateness": "1m"})
}

async fn send(
    app: &TestApp,
    method: reqwest::Method,
    name: &str,
    key: &str,
    body: Option<&Value>,
) -> (StatusCode, Value) {
    let mut request = app
        .client
        .request(method, app.url(&format!("/v1/rules/{name}")))
        .basic_auth(key, Some(""));
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.expect("the service answers");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn put(app: &TestApp, body: Value) -> (StatusCode, Value) {
    send(
        app,
        reqwest::Method::PUT,
        "card_testing",
        ADMIN_KEY,
        Some(&body),
    )
    .await
}

async fn a_rule_is_defined_versioned_read_and_deleted(backend: Backend) {
    let app = spawn_app(backend).await;
    let put = |key, body| send(&app, reqwest::Method::PUT, "card_testing", key, Some(body));
    let rule = card_testing();
    let (status, created) = put(ADMIN_KEY, &rule).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(
        (created["version"].clone(), created["definition"].clone()),
        (json!(1), rule.clone())
    );
    let (status, same) = put(ADMIN_KEY, &rule).await;
    assert_eq!(
        (status, same["version"].clone()),
        (StatusCode::OK, json!(1))
    );

    let (status, refused) = put(READ_KEY, &rule).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{refused}");

    let mut changed = rule.clone();
    changed["within"] = json!("10m");
    let (status, second) = put(ADMIN_KEY, &changed).await;
    assert_eq!(
        (status, second["version"].clone()),
        (StatusCode::OK, json!(2))
    );
    let (status, read) = app.get_as("/v1/rules/card_testing", READ_KEY).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (
            read["version"].clone(),
            read["definition"]["within"].clone()
        ),
        (json!(2), json!("10m"))
    );
    let (_, list) = app.get_as("/v1/rules", READ_KEY).await;
    assert_eq!(list["rules"].as_array().unwrap().len(), 1, "{list}");
    let (_, metrics) = app.get_as("/v1/metrics", READ_KEY).await;
    assert_eq!(metrics["metrics"], json!([]), "rules are not metrics");

    let (status, _) = send(
        &app,
        reqwest::Method::DELETE,
        "card_testing",
        ADMIN_KEY,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, gone) = app.get_as("/v1/rules/card_testing", READ_KEY).await;
    assert_eq!(
        (status, gone["error"]["code"].clone()),
        (StatusCode::NOT_FOUND, json!("not_found"))
    );
    assert!(
        gone["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no rule"),
        "{gone}"
    );
    let (status, _) = send(
        &app,
        reqwest::Method::DELETE,
        "card_testing",
        ADMIN_KEY,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    app.stop().await;
}

async fn a_bad_rule_is_refused_naming_its_field_and_the_running_version_stays(backend: Backend) {
    let app = spawn_app(backend).await;
    assert_eq!(put(&app, card_testing()).await.0, StatusCode::CREATED);
    let mut typo = card_testing();
    typo["steps"][1]["where"] = json!("event == \"payment\" && propertes.amount > 1000");
    let mut not_first = card_testing();
    not_first["steps"][0]["not"] = json!(true);
    let mut no_bound = card_testing();
    no_bound.as_object_mut().unwrap().remove("within");
    for (body, field) in [
        (typo, "steps[1].where"),
        (not_first, "steps[0].not"),
        (no_bound, "within"),
    ] {
        let (status, error) = put(&app, body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
        assert_eq!(error["error"]["field"], field, "{error}");
    }
    let (_, read) = app.get_as("/v1/rules/card_testing", READ_KEY).await;
    assert_eq!(
        (read["version"].clone(), read["definition"].clone()),
        (json!(1), card_testing())
    );
    app.stop().await;
}

async fn the_configuration_files_rules_are_stored_at_start(backend: Backend) {
    let file: traitline::config::Settings = toml::from_str(
        r#"
        [[rules]]
        name = "abandoned_checkout"
        key = "properties.cart_id"
        within = "30m"
        steps = [
          { name = "checkout", where = "event == 'checkout.started'" },
          { name = "order", where = "event == 'order.create'", not = true },
        ]
        "#,
    )
    .unwrap();
    let app = spawn_app_with(backend, |s| s.rules = file.rules.clone()).await;
    let (status, read) = app.get_as("/v1/rules/abandoned_checkout", READ_KEY).await;
    assert_eq!(status, StatusCode::OK, "{read}");
    assert_eq!(read["version"], 1);
    assert_eq!(read["definition"]["steps"][1]["not"], true);
    assert!(
        read["definition"].get("name").is_none(),
        "the name is the path's"
    );
    app.stop().await;
}
