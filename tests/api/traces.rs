//! OTLP span export: a collector stub in the test receives the spans, and
//! an event's trace covers both hops (the HTTP request with its log append,
//! and the processor's store commit).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::json;

use crate::helpers::{ServiceProcess, TestDir, WRITE_KEY, embedded_env, env_refs, eventually};

type Received = Arc<Mutex<Vec<Span>>>;

/// An OTLP/HTTP collector: keeps every span posted to `/v1/traces`.
async fn collector() -> (String, Received) {
    async fn traces(State(received): State<Received>, body: Bytes) -> Vec<u8> {
        let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf body");
        let mut received = received.lock().unwrap();
        for resource in request.resource_spans {
            for scope in resource.scope_spans {
                received.extend(scope.spans);
            }
        }
        ExportTraceServiceResponse::default().encode_to_vec()
    }
    let received = Received::default();
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(traces))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The spans of one trace, by name.
fn trace_spans(received: &Received, trace_id: &str) -> Vec<Span> {
    received
        .lock()
        .unwrap()
        .iter()
        .filter(|span| hex(&span.trace_id) == trace_id)
        .cloned()
        .collect()
}

fn named<'a>(spans: &'a [Span], name: &str) -> Option<&'a Span> {
    spans.iter().find(|span| span.name == name)
}

/// The server span, and its `log append` and `store commit` children.
fn both_hops(spans: &[Span], server_name: &str) -> Option<(Span, Span, Span)> {
    let server = named(spans, server_name)?;
    let child = |name: &str| {
        spans
            .iter()
            .find(|span| span.name == name && span.parent_span_id == server.span_id)
            .cloned()
    };
    Some((server.clone(), child("log append")?, child("store commit")?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_events_trace_covers_the_request_the_log_append_and_the_store_commit() {
    let (collector, received) = collector().await;
    let dir = TestDir::new();
    let mut env = embedded_env(dir.path());
    env.push(("TRAITLINE_OTLP_ENDPOINT", collector));
    let mut refs = env_refs(&env);
    refs.push(("OTEL_BSP_SCHEDULE_DELAY", "100"));
    let service = ServiceProcess::start(dir.path(), "service", &[], &refs).await;
    let client = crate::helpers::client();

    // A caller's trace, continued.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let answer = client
        .post(service.url("/v1/track"))
        .basic_auth(WRITE_KEY, Some(""))
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .json(&json!({"userId": "traced", "event": "Traced", "messageId": "t1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    // A caller's trace it chose not to sample: nothing of it is exported.
    let unsampled = "0af7651916cd43dd8448eb211c80319c";
    let answer = client
        .post(service.url("/v1/track"))
        .basic_auth(WRITE_KEY, Some(""))
        .header("traceparent", format!("00-{unsampled}-b7ad6b7169203331-00"))
        .json(&json!({"userId": "unsampled", "event": "Untraced"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    // A new trace, for a batch of two users.
    let answer = client
        .post(service.url("/v1/batch"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&json!({"batch": [
            {"type": "track", "userId": "b1", "event": "Batched"},
            {"type": "identify", "userId": "b2", "traits": {"plan": "pro"}},
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);

    eventually(
        "both hops of the caller's trace",
        Duration::from_secs(30),
        || {
            let spans = trace_spans(&received, trace_id);
            async move { both_hops(&spans, "POST /v1/track").is_some() }
        },
    )
    .await;
    let spans = trace_spans(&received, trace_id);
    let (server, append, commit) = both_hops(&spans, "POST /v1/track").unwrap();
    assert_eq!(
        hex(&server.parent_span_id),
        caller_span,
        "the caller's span is the parent"
    );
    assert_eq!(server.kind, 2, "a server span");
    assert_eq!(append.kind, 4, "a producer span");
    assert_eq!(commit.kind, 5, "a consumer span");
    // (Not "ends after": the embedded log's readers see a record once it
    // is written, and the append ends only after its fsync.)
    assert!(
        commit.start_time_unix_nano >= append.start_time_unix_nano,
        "the commit starts after the append"
    );
    let attribute = |span: &Span, key: &str| {
        span.attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.clone())
            .and_then(|v| v.value)
            .map(|v| format!("{v:?}"))
    };
    assert!(
        attribute(&server, "http.response.status_code").is_some_and(|v| v.contains("200")),
        "{:?}",
        server.attributes
    );
    assert!(
        attribute(&append, "messaging.destination.name").is_some_and(|v| v.contains("user_events")),
        "{:?}",
        append.attributes
    );

    // The batch's request started its own trace; its commit joined it.
    eventually(
        "both hops of the batch's trace",
        Duration::from_secs(30),
        || {
            let received = received.clone();
            async move {
                let batch = received
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|span| span.name == "POST /v1/batch")
                    .cloned();
                batch.is_some_and(|batch| {
                    let spans = trace_spans(&received, &hex(&batch.trace_id));
                    batch.parent_span_id.is_empty() && both_hops(&spans, "POST /v1/batch").is_some()
                })
            }
        },
    )
    .await;
    // Exported in order: by now the unsampled request's would be here.
    assert!(trace_spans(&received, unsampled).is_empty());
}

#[tokio::test]
async fn without_an_endpoint_no_trace_context_is_stored() {
    let dir = TestDir::new();
    let env = embedded_env(dir.path());
    let service = ServiceProcess::start(dir.path(), "service", &[], &env_refs(&env)).await;
    let answer = crate::helpers::client()
        .post(service.url("/v1/track"))
        .basic_auth(WRITE_KEY, Some(""))
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .json(&json!({"userId": "u", "event": "e"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    drop(service);
    let records = crate::operations::tail(dir.path(), &["--from-beginning", "--exit"]);
    assert_eq!(records.len(), 1);
    assert!(
        records[0]["value"].get("traceparent").is_none(),
        "{}",
        records[0]
    );
}
