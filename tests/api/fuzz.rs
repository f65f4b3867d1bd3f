//! Random bytes and random JSON on every route: never a panic, never a 5xx
//! other than 503, and the service keeps answering.

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use serde_json::{Map, Value, json};

use crate::helpers::{Backend, INGEST_ROUTES as ROUTES, WRITE_KEY, spawn_app};

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
        // Strings that look like the values the routes care about.
        prop_oneof![
            Just("2026-11-20T10:00:00Z"),
            Just("track"),
            Just("identify"),
            Just("batch"),
            Just("landing.user.home.click"),
            Just(""),
            Just("x.y")
        ]
        .prop_map(|s| Value::String(s.to_owned())),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        let keys = prop_oneof![
            Just("userId".to_owned()),
            Just("anonymousId".to_owned()),
            Just("event".to_owned()),
            Just("type".to_owned()),
            Just("batch".to_owned()),
            Just("key".to_owned()),
            Just("payload".to_owned()),
            Just("timestamp".to_owned()),
            Just("sentAt".to_owned()),
            Just("properties".to_owned()),
            Just("context".to_owned()),
            Just("client_os".to_owned()),
            Just("previousId".to_owned()),
            Just("groupId".to_owned()),
            Just("writeKey".to_owned()),
            "[a-z]{1,6}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((keys, inner), 0..8)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Sends each generated body to a random route and checks the answer.
fn check_route_answers(strategy: impl Strategy<Value = (usize, Vec<u8>, bool)>, cases: u32) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = runtime.block_on(spawn_app(Backend::Embedded));
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        ..ProptestConfig::default()
    });
    runner
        .run(&strategy, |(route, body, with_key)| {
            let key = with_key.then_some(WRITE_KEY);
            let status = runtime
                .block_on(app.post_raw(ROUTES[route], key, body, None))
                .status();
            prop_assert!(
                status.is_success() || status.is_client_error() || status.as_u16() == 503,
                "{} answered {status}",
                ROUTES[route]
            );
            Ok(())
        })
        .unwrap();
    // Sent inside the runtime: the client's timeout needs its timer.
    let health = runtime
        .block_on(async { app.client.get(app.url("/healthz")).send().await })
        .unwrap();
    assert!(health.status().is_success(), "the service still answers");
}

#[test]
fn random_bytes_never_crash_a_route() {
    check_route_answers(
        (
            0..ROUTES.len(),
            prop::collection::vec(any::<u8>(), 0..2048),
            any::<bool>(),
        ),
        300,
    );
}

#[test]
fn random_json_never_crashes_a_route() {
    check_route_answers(
        (
            0..ROUTES.len(),
            any_json().prop_map(|v| v.to_string().into_bytes()),
            Just(true),
        ),
        600,
    );
}

#[test]
fn random_batches_never_crash() {
    let batch = prop::collection::vec(any_json(), 0..10)
        .prop_map(|items| json!({"batch": items}).to_string().into_bytes());
    check_route_answers((Just(7usize), batch, Just(true)), 300);
}
