//! Prometheus metrics, served at `GET /metrics`.
//!
//! Code records through the `metrics` facade (`counter!`, `histogram!`,
//! `gauge!`) with the names below; one Prometheus recorder is installed per
//! process, the first time a service starts. Names follow Prometheus
//! conventions: a `traitline_` prefix, `_total` for counters, base units
//! (`_seconds`, `_bytes`) in the name.

use std::sync::OnceLock;

use axum::extract::{MatchedPath, Request};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// HTTP requests to the ingest routes, by `route` and `status`.
pub const INGEST_REQUESTS: &str = "traitline_ingest_requests_total";
/// Ingest requests being handled now.
pub const INGEST_IN_FLIGHT: &str = "traitline_ingest_requests_in_flight";
/// Events that reached the log, by `route` and `status` (200: stored;
/// 503: the log did not take them).
pub const INGEST_EVENTS: &str = "traitline_ingest_events_total";
/// Events of hot users sent to the overflow topic.
pub const INGEST_OVERFLOW_EVENTS: &str = "traitline_ingest_overflow_events_total";
/// Time from a request's arrival to its answer, by `route`.
pub const INGEST_REQUEST_SECONDS: &str = "traitline_ingest_request_duration_seconds";
/// Body size of ingest requests as sent (before decompression), by `route`.
pub const INGEST_REQUEST_BYTES: &str = "traitline_ingest_request_size_bytes";
/// Time for the log to make one request's events durable.
pub const LOG_APPEND_SECONDS: &str = "traitline_log_append_duration_seconds";
/// Messages waiting in the Kafka producer's queue (librdkafka statistics).
pub const KAFKA_QUEUE_MESSAGES: &str = "traitline_kafka_producer_queue_messages";
/// 1 while the Kafka producer's connection to `broker` is up, else 0.
pub const KAFKA_BROKER_UP: &str = "traitline_kafka_broker_up";
/// Round-trip time to `broker`, average over the statistics interval.
pub const KAFKA_BROKER_RTT_SECONDS: &str = "traitline_kafka_broker_rtt_seconds";
/// Records of `partition` not yet processed by `processor`.
pub const PROCESSOR_LAG: &str = "traitline_processor_lag_records";
/// Records in each batch a processor takes from the log.
pub const PROCESSOR_BATCH_RECORDS: &str = "traitline_processor_batch_records";
/// Time to process and commit one batch, by `processor`.
pub const PROCESSOR_BATCH_SECONDS: &str = "traitline_processor_batch_duration_seconds";
/// Time from an event's receipt at ingest to its commit by `processor`.
pub const PROCESSOR_EVENT_LATENCY_SECONDS: &str = "traitline_processor_event_latency_seconds";
/// Events applied, skipped as duplicates, or rejected, by `processor` and
/// `outcome` (`applied`, `duplicate`, `rejected`).
pub const PROCESSOR_EVENTS: &str = "traitline_processor_events_total";
/// Profiles a batch read, by `outcome`: `hit` (the processor's cached state
/// was the stored one), `miss` (read and parsed from the store).
pub const PROFILE_CACHE_LOOKUPS: &str = "traitline_profile_cache_lookups_total";
/// Profile states the processor holds in memory.
pub const PROFILE_CACHE_PROFILES: &str = "traitline_profile_cache_profiles";
/// One store transaction (a batch's effects and its offsets), by `outcome`.
pub const STORE_TRANSACTION_SECONDS: &str = "traitline_store_transaction_duration_seconds";
/// Times a stage (a processor, the change relay, ...) stopped without
/// being asked to and was restarted, by `stage`.
pub const STAGE_RESTARTS: &str = "traitline_stage_restarts_total";
/// 1 while a stage runs, 0 while it waits to be restarted, by `stage`.
pub const STAGE_UP: &str = "traitline_stage_up";
/// Windows a metric made final, by `metric`.
pub const METRIC_WINDOWS_CLOSED: &str = "traitline_metric_windows_closed_total";
/// Events that came after a window they belong to closed, by `metric`
/// (each is on `user_events_late`).
pub const METRIC_LATE_EVENTS: &str = "traitline_metric_late_events_total";
/// Groups with open windows a metric holds in memory, by `metric`.
pub const METRIC_OPEN_GROUPS: &str = "traitline_metric_open_groups";
/// How far a metric's watermark is behind the wall clock, by `metric` and
/// `partition`.
pub const METRIC_WATERMARK_LAG_SECONDS: &str = "traitline_metric_watermark_lag_seconds";
/// The estimated memory of the open window state a metric holds, by
/// `metric` (kept within its share of `metric-state-budget-mb`).
pub const METRIC_STATE_BYTES: &str = "traitline_metric_state_bytes";
/// Message-id claims SQLite keeps as sorted runs (the deduplication
/// window's), by `claims` (the name they are kept under).
pub const CLAIMS_KEPT: &str = "traitline_claims_kept";
/// The memory those claims' filters and block indexes hold, by `claims`.
pub const CLAIMS_MEMORY_BYTES: &str = "traitline_claims_memory_bytes";
/// Groups a metric evicted from memory to stay within its budget (their
/// state is in the store, read back when needed), by `metric`.
pub const METRIC_GROUPS_EVICTED: &str = "traitline_metric_groups_evicted_total";
/// Matches a rule made (each an alert), by `rule`.
pub const RULE_MATCHES: &str = "traitline_rule_matches_total";
/// Partial matches a rule holds in memory, by `rule`.
pub const RULE_PARTIALS: &str = "traitline_rule_partial_matches";
/// Partial matches whose time bound passed before they completed, by
/// `rule`.
pub const RULE_TIMEOUTS: &str = "traitline_rule_timeouts_total";
/// Partial matches dropped at a key's `max_partial_matches`, and events
/// taken before the watermark passed them at a key's bound of waiting
/// events, by `rule` and `bound`.
pub const RULE_BOUND_HITS: &str = "traitline_rule_bound_hits_total";
/// Events that came after the watermark less the lateness had passed
/// them, taken by no rule, by `rule`.
pub const RULE_LATE_EVENTS: &str = "traitline_rule_late_events_total";
/// Delivery attempts of destinations, by `destination` and `outcome`
/// (delivered, retrying, dead_letter, disabled).
pub const DELIVERY_ATTEMPTS: &str = "traitline_delivery_attempts_total";
/// How long delivery attempts took, by `destination`.
pub const DELIVERY_SECONDS: &str = "traitline_delivery_duration_seconds";

/// Bucket bounds for durations, in seconds: 0.5 ms to 30 s.
const SECONDS_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
    30.0,
];
/// Bucket bounds for sizes, in bytes: 256 B to 4 MB.
const BYTES_BUCKETS: [f64; 8] = [
    256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
];
/// Bucket bounds for record counts.
const RECORDS_BUCKETS: [f64; 10] = [
    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

/// The process's recorder, installed on first use.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Suffix("_bytes".into()), &BYTES_BUCKETS)
            })
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Suffix("_records".into()), &RECORDS_BUCKETS)
            })
            .expect("the bucket lists are not empty");
        let handle = match builder.install_recorder() {
            Ok(handle) => handle,
            Err(e) => {
                // Another recorder is installed (an embedding program's):
                // serve an empty page rather than fail to start.
                tracing::warn!("metrics are not collected: {e}");
                PrometheusBuilder::new().build_recorder().handle()
            }
        };
        describe();
        handle
    })
}

/// The help text each metric shows in the scrape.
fn describe() {
    describe_counter!(
        METRIC_WINDOWS_CLOSED,
        "Windows a metric made final, by metric"
    );
    describe_counter!(
        METRIC_LATE_EVENTS,
        "Events after a window they belong to closed (on user_events_late), by metric"
    );
    describe_gauge!(
        METRIC_OPEN_GROUPS,
        "Groups with open windows a metric holds in memory, by metric"
    );
    describe_gauge!(
        METRIC_WATERMARK_LAG_SECONDS,
        Unit::Seconds,
        "How far a metric's watermark is behind the wall clock, by metric and partition"
    );
    describe_gauge!(
        METRIC_STATE_BYTES,
        Unit::Bytes,
        "Estimated memory of the open window state a metric holds, by metric"
    );
    describe_gauge!(
        CLAIMS_KEPT,
        "Message-id claims SQLite keeps as sorted runs, by the name they are kept under"
    );
    describe_gauge!(
        CLAIMS_MEMORY_BYTES,
        Unit::Bytes,
        "Memory of the filters and block indexes of SQLite's message-id claims, by the name they are kept under"
    );
    describe_counter!(
        METRIC_GROUPS_EVICTED,
        "Groups a metric evicted from memory to stay within its state budget, by metric"
    );
    describe_counter!(RULE_MATCHES, "Matches a rule made (each an alert), by rule");
    describe_gauge!(
        RULE_PARTIALS,
        "Partial matches a rule holds in memory, by rule"
    );
    describe_counter!(
        RULE_TIMEOUTS,
        "Partial matches whose time bound passed before they completed, by rule"
    );
    describe_counter!(
        RULE_BOUND_HITS,
        "Partial matches dropped at max_partial_matches (bound=partials) and events taken early at a key's bound of waiting events (bound=waiting), by rule"
    );
    describe_counter!(
        RULE_LATE_EVENTS,
        "Events behind a rule's watermark less its lateness, taken by no match, by rule"
    );
    describe_counter!(
        DELIVERY_ATTEMPTS,
        "Delivery attempts of destinations, by destination and outcome (delivered, retrying, dead_letter, disabled)"
    );
    describe_histogram!(
        DELIVERY_SECONDS,
        Unit::Seconds,
        "Delivery attempt duration, by destination"
    );
    describe_counter!(
        STAGE_RESTARTS,
        "Times a stage stopped without being asked to and was restarted, by stage"
    );
    describe_gauge!(
        STAGE_UP,
        "1 while a stage runs, 0 while it waits to be restarted, by stage"
    );
    describe_counter!(
        INGEST_OVERFLOW_EVENTS,
        "Events of users over hot-user-events-per-second, sent to the overflow topic"
    );
    describe_gauge!(INGEST_IN_FLIGHT, "Ingest requests being handled now");
    describe_counter!(INGEST_REQUESTS, "Ingest HTTP requests, by route and status");
    describe_counter!(
        INGEST_EVENTS,
        "Events that reached the log, by route and status (200 stored, 503 not taken)"
    );
    describe_histogram!(
        INGEST_REQUEST_SECONDS,
        Unit::Seconds,
        "Ingest request duration, arrival to answer"
    );
    describe_histogram!(
        INGEST_REQUEST_BYTES,
        Unit::Bytes,
        "Ingest request body size as sent"
    );
    describe_histogram!(
        LOG_APPEND_SECONDS,
        Unit::Seconds,
        "Time for the log to make a request's events durable"
    );
    describe_gauge!(
        KAFKA_QUEUE_MESSAGES,
        "Messages in the Kafka producer queue (librdkafka statistics)"
    );
    describe_gauge!(
        KAFKA_BROKER_UP,
        "1 while the Kafka producer's connection to the broker is up"
    );
    describe_gauge!(
        KAFKA_BROKER_RTT_SECONDS,
        Unit::Seconds,
        "Average round-trip time to the broker"
    );
    describe_gauge!(PROCESSOR_LAG, "Records of a partition not yet processed");
    describe_histogram!(PROCESSOR_BATCH_RECORDS, "Records in a processor batch");
    describe_histogram!(
        PROCESSOR_BATCH_SECONDS,
        Unit::Seconds,
        "Time to process and commit a batch"
    );
    describe_histogram!(
        PROCESSOR_EVENT_LATENCY_SECONDS,
        Unit::Seconds,
        "Time from an event's receipt at ingest to its commit"
    );
    describe_counter!(
        PROCESSOR_EVENTS,
        "Processed events, by processor and outcome (applied, duplicate, rejected)"
    );
    describe_counter!(
        PROFILE_CACHE_LOOKUPS,
        "Profiles a batch read, by outcome: hit (from the cache) or miss"
    );
    describe_gauge!(
        PROFILE_CACHE_PROFILES,
        "Profile states the processor holds in memory"
    );
    describe_histogram!(
        STORE_TRANSACTION_SECONDS,
        Unit::Seconds,
        "Store transaction duration, by outcome"
    );
}

/// Prometheus metrics.
///
/// Every metric of this process in the Prometheus text format, for a
/// scraper. Needs no key.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "The Prometheus text format", content_type = "text/plain", body = String)))]
pub async fn render() -> Response {
    let handle = handle();
    handle.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}

/// Middleware for the ingest routes: counts each request by route and
/// status, and records its duration and body size.
pub async fn ingest_requests(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let bytes = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<f64>().ok());
    let started = std::time::Instant::now();
    let in_flight = InFlight::start();
    let response = next.run(request).await;
    drop(in_flight);
    let status = response.status().as_u16().to_string();
    metrics::histogram!(INGEST_REQUEST_SECONDS, "route" => route.clone())
        .record(started.elapsed().as_secs_f64());
    if let Some(bytes) = bytes {
        metrics::histogram!(INGEST_REQUEST_BYTES, "route" => route.clone()).record(bytes);
    }
    metrics::counter!(INGEST_REQUESTS, "route" => route, "status" => status).increment(1);
    response
}

/// One request counted in [`INGEST_IN_FLIGHT`] until dropped, also when a
/// client goes away mid-request.
struct InFlight(metrics::Gauge);

impl InFlight {
    fn start() -> InFlight {
        let gauge = metrics::gauge!(INGEST_IN_FLIGHT);
        gauge.increment(1.0);
        InFlight(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
