//! The OpenAPI document describes every route the service answers.

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{Backend, INGEST_ROUTES, spawn_app};

#[tokio::test]
async fn the_openapi_document_lists_every_route_and_each_one_answers() {
    let app = spawn_app(Backend::Embedded).await;
    let response = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let doc: Value = response.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));

    for path in INGEST_ROUTES {
        let op = &doc["paths"][path]["post"];
        assert!(op.is_object(), "{path} is documented");
        assert!(op["requestBody"].is_object(), "{path} documents its body");
        for status in ["200", "401", "413", "422", "503"] {
            assert!(
                op["responses"][status].is_object(),
                "{path} documents {status}"
            );
        }
        // The route exists: without a key it is 401, not 404.
        let answer = app.post_raw(path, None, b"{}".to_vec(), None).await;
        assert_eq!(answer.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    for path in ["/healthz", "/readyz"] {
        assert!(
            doc["paths"][path]["get"].is_object(),
            "{path} is documented"
        );
        let answer = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK, "{path}");
    }
    let schemas = &doc["components"]["schemas"];
    for name in [
        "SegmentMessage",
        "BatchRequest",
        "SeedEvent",
        "ErrorBody",
        "EventEnvelope",
    ] {
        assert!(schemas[name].is_object(), "schema {name}");
    }
    assert!(doc["components"]["securitySchemes"]["basic"].is_object());
}

#[tokio::test]
async fn the_query_routes_are_documented_with_their_security_and_answer_without_a_key_401() {
    let app = spawn_app(Backend::Embedded).await;
    let doc = app.get_json("/openapi.json").await;
    let routes = [
        ("get", "/v1/profiles", "/v1/profiles"),
        ("get", "/v1/profiles/{id}", "/v1/profiles/u1"),
        ("delete", "/v1/profiles/{id}", "/v1/profiles/u1"),
        (
            "get",
            "/v1/profiles/{id}/changes",
            "/v1/profiles/u1/changes",
        ),
        ("get", "/v1/profiles/{id}/events", "/v1/profiles/u1/events"),
    ];
    for (method, documented, concrete) in routes {
        let op = &doc["paths"][documented][method];
        assert!(op.is_object(), "{method} {documented} is documented");
        assert!(
            op["security"].is_array(),
            "{method} {documented} documents its keys"
        );
        for status in ["200", "401", "403"] {
            assert!(
                op["responses"][status].is_object(),
                "{method} {documented} documents {status}"
            );
        }
        let request = match method {
            "delete" => app.client.delete(app.url(concrete)),
            _ => app.client.get(app.url(concrete)),
        };
        assert_eq!(
            request.send().await.unwrap().status(),
            StatusCode::UNAUTHORIZED,
            "{method} {concrete}"
        );
    }
    assert!(doc["components"]["schemas"]["ProfileView"].is_object());
}

/// The fields the document says each Segment call requires are exactly the
/// ones the service requires: a body with only those is stored, and one
/// without any of them is refused naming it. So a schema-driven tester
/// (schemathesis) sees a valid body accepted and an invalid one refused.
#[tokio::test]
async fn each_calls_documented_required_fields_are_the_ones_the_service_requires() {
    let app = spawn_app(Backend::Embedded).await;
    let doc = app.get_json("/openapi.json").await;
    for kind in ["track", "identify", "page", "screen", "group", "alias"] {
        let path = format!("/v1/{kind}");
        let reference = doc["paths"][&path]["post"]["requestBody"]["content"]["application/json"]
            ["schema"]["$ref"]
            .as_str()
            .unwrap_or_else(|| panic!("{path} names its body schema"));
        let name = reference.rsplit('/').next().unwrap();
        let rules = doc["components"]["schemas"][name]["allOf"]
            .as_array()
            .unwrap_or_else(|| panic!("{name} states its rules"));
        let required: Vec<&str> = rules
            .iter()
            .flat_map(|r| r["required"].as_array().into_iter().flatten())
            .map(|f| f.as_str().unwrap())
            .collect();
        let either_id = rules.iter().any(|r| r["anyOf"].is_array());
        assert_eq!(either_id, kind != "alias", "{name}: userId or anonymousId");

        let mut body = serde_json::Map::new();
        for field in &required {
            body.insert((*field).into(), "x1".into());
        }
        if either_id {
            body.insert("anonymousId".into(), "a1".into());
        }
        let accepted = app.post(&path, &Value::Object(body.clone())).await;
        assert_eq!(accepted.status(), StatusCode::OK, "{path} {body:?}");
        let mut in_batch = body.clone();
        in_batch.insert("type".into(), kind.into());
        let batch = serde_json::json!({"batch": [in_batch]});
        assert_eq!(app.post("/v1/batch", &batch).await.status(), StatusCode::OK);

        let mut missing: Vec<&str> = required.clone();
        if either_id {
            missing.push("anonymousId");
        }
        for field in missing {
            let mut without = body.clone();
            without.remove(field);
            let refused = app.post(&path, &Value::Object(without)).await;
            assert_eq!(
                refused.status(),
                StatusCode::UNPROCESSABLE_ENTITY,
                "{path} without {field}"
            );
            let error: Value = refused.json().await.unwrap();
            let named = error["error"]["field"].as_str().unwrap();
            // Without either id the service names userId, the usual one.
            let expected = if field == "anonymousId" {
                "userId"
            } else {
                field
            };
            assert_eq!(named, expected, "{path} without {field}: {error}");
        }
    }
}

/// A query string or path the API cannot read is a JSON 400 naming the
/// parameter, as the document says, never axum's plain-text rejection.
#[tokio::test]
async fn an_unreadable_query_or_path_is_a_json_400_naming_it() {
    let app = spawn_app(Backend::Embedded).await;
    for (path, field) in [
        ("/v1/profiles?limit=many", "limit"),
        ("/v1/profiles?limit=0", "limit"),
        ("/v1/profiles/u1/events?limit=1&limit=2", "limit"),
        ("/v1/profiles?cursor=bm90LWEtY3Vyc29y%FF", "cursor"),
        ("/v1/profiles/%FF", "id"),
        ("/v1/profiles/%FF/changes", "id"),
    ] {
        let (status, body) = app.get_as(path, crate::helpers::READ_KEY).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(body["error"]["code"], "invalid_parameter", "{path}: {body}");
        assert_eq!(body["error"]["field"], field, "{path}: {body}");
    }
    let (status, _) = app
        .get_as("/v1/profiles?cursor=", crate::helpers::READ_KEY)
        .await;
    assert_eq!(status, StatusCode::OK, "an empty cursor is the first page");
}
