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
    let doc: Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
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
