//! Log output and traces.
//!
//! Logs: human-readable lines by default, JSON lines on request; `RUST_LOG`
//! refines the levels (default: info).
//!
//! Traces: with `otlp-endpoint` set, Traitline's spans are exported over
//! OTLP/HTTP to an OpenTelemetry collector. An event's trace has two hops:
//! the HTTP request with its `log append`, and, in the processor, the
//! `store commit` that applied it. The event carries the request's W3C
//! `traceparent` in its envelope across the log, which is how the second
//! hop joins the first (a batch commit joins the trace of each distinct
//! request in it). Nothing of this runs when export is off.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, Otlp};

/// Whether spans are exported (set once, by [`init`]).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// The share of new traces sampled, as `f64` bits (set once, by [`init`]).
static SAMPLE_RATIO: AtomicU64 = AtomicU64::new(0);

/// The target of the spans that are exported. Only a sampled request
/// makes them, so an unsampled one costs no more than with export off.
pub const TRACE_TARGET: &str = "traitline::trace";

/// Whether spans are exported: the tracing work of the hot paths is done
/// only then.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// What [`init`] set up that needs stopping.
#[must_use = "call shutdown() at exit, or buffered spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered, waiting at most 5 s for the
    /// collector. Call outside the async runtime (the exporter's HTTP
    /// client blocks).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown_with_timeout(std::time::Duration::from_secs(5))
        {
            eprintln!("traitline: the last spans were not exported: {e}");
        }
    }
}

/// Installs the global subscriber, and the span exporter when `otlp` is
/// set; call once, first thing in `main`, outside the async runtime.
pub fn init(format: LogFormat, otlp: Option<&Otlp>) -> Result<Telemetry, String> {
    // The exporter's HTTP client needs it.
    crate::install_tls();
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn,librdkafka=warn"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let provider = otlp.map(tracer_provider).transpose()?;
    // Only Traitline's own spans are exported, whatever RUST_LOG says.
    let spans = provider.as_ref().map(|provider| {
        // No per-span source location, thread, target or busy/idle time:
        // the request span is entered on every poll, and timing each
        // entry was a measurable share of a request.
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("traitline"))
            .with_tracked_inactivity(false)
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_filter(Targets::new().with_target(TRACE_TARGET, tracing::Level::INFO))
    });
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(spans)
        .init();
    if let Some(otlp) = otlp {
        SAMPLE_RATIO.store(otlp.sample_ratio.to_bits(), Ordering::Relaxed);
        EXPORTING.store(true, Ordering::Relaxed);
        tracing::info!(
            "exporting spans to {} (sampling {} of new traces)",
            otlp.traces_url,
            otlp.sample_ratio
        );
    }
    Ok(Telemetry { provider })
}

fn tracer_provider(otlp: &Otlp) -> Result<SdkTracerProvider, String> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(&otlp.traces_url)
        .with_timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| {
            format!(
                "cannot export spans to {} (setting otlp-endpoint): {e}",
                otlp.traces_url
            )
        })?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("traitline")
        .build();
    // The batch processor's own settings (queue size, delay) come from the
    // standard OTEL_BSP_* variables. Which requests are traced is decided
    // before their spans are made ([`request_sampling`]).
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
        .with_resource(resource)
        .build())
}

/// Whether the current span is one that is exported: the work under it
/// (a log append) gets a span of its own.
pub fn in_trace() -> bool {
    exporting()
        && tracing::Span::current()
            .metadata()
            .is_some_and(|m| m.target() == TRACE_TARGET)
}

/// Whether a request is traced, and under which parent: a caller's
/// `traceparent` decides for its trace (sampled or not); without one, the
/// request starts a new trace with the chance `otlp-sample-ratio`.
fn request_sampling(headers: &axum::http::HeaderMap) -> Option<opentelemetry::Context> {
    use opentelemetry::trace::TraceContextExt;
    if !exporting() {
        return None;
    }
    if headers.contains_key("traceparent") {
        let caller = TraceContextPropagator::new().extract(&Headers(headers));
        let span = caller.span().span_context().clone();
        // A traceparent that does not parse starts a new trace.
        if span.is_valid() {
            return span.is_sampled().then_some(caller);
        }
    }
    let ratio = f64::from_bits(SAMPLE_RATIO.load(Ordering::Relaxed));
    (chance() < ratio).then(opentelemetry::Context::new)
}

/// A number in [0, 1), different each call: a counter through splitmix64
/// (no system call, unlike a UUID).
fn chance() -> f64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
    let mut z = COUNTER.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// The W3C `traceparent` of the current span, when it is exported.
pub fn traceparent() -> Option<String> {
    if !in_trace() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&tracing::Span::current().context(), &mut carrier);
    carrier.remove("traceparent")
}

/// Spans made by `make`, one for each distinct trace of `traceparents`,
/// each a child of its trace's span: how work on many events (a processor
/// batch) shows in each of their traces. They last until dropped. None
/// when spans are not exported.
pub fn spans_following<'a>(
    traceparents: impl IntoIterator<Item = &'a str>,
    make: impl Fn() -> tracing::Span,
) -> Vec<tracing::Span> {
    if !exporting() {
        return Vec::new();
    }
    let mut seen = std::collections::HashSet::new();
    traceparents
        .into_iter()
        .filter(|traceparent| seen.insert(*traceparent))
        .filter_map(|traceparent| {
            let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
            let parent = TraceContextPropagator::new().extract(&carrier);
            let span = make();
            span.set_parent(parent).ok()?;
            Some(span)
        })
        .collect()
}

/// Reads a W3C trace context from request headers.
struct Headers<'a>(&'a axum::http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The request id header: taken from the client when it sends one (so a
/// caller's id follows the request), else generated; answered back.
pub const REQUEST_ID: &str = "x-request-id";

/// Middleware: runs each request inside a span carrying its request id,
/// so every log line written while handling it names the request; answers
/// the id in `x-request-id`. When the request is traced
/// ([`request_sampling`]), the span is its exported server span
/// (continuing a caller's `traceparent`).
pub async fn request_span(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument;
    let id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map_or_else(next_request_id, str::to_owned);
    let started = std::time::Instant::now();
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let span = match request_sampling(request.headers()) {
        Some(parent) => {
            let span = tracing::info_span!(
                target: TRACE_TARGET,
                "request",
                id = %id,
                otel.name = %format!("{method} {path}"),
                otel.kind = "server",
                otel.status_code = tracing::field::Empty,
                http.request.method = %method,
                url.path = %path,
                http.route = tracing::field::Empty,
                http.response.status_code = tracing::field::Empty,
            );
            let _ = span.set_parent(parent);
            span
        }
        // One field only: the span's fields are formatted for every
        // request, and this is the hot path (the method and path are in
        // the answer line).
        None => tracing::info_span!("request", id = %id),
    };
    let traced = span.metadata().is_some_and(|m| m.target() == TRACE_TARGET);
    let mut response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    if traced {
        if let Some(route) = response.extensions().get::<axum::extract::MatchedPath>() {
            span.record("otel.name", format!("{method} {}", route.as_str()));
            span.record("http.route", route.as_str());
        }
        span.record("http.response.status_code", status.as_u16());
        if status.is_server_error() {
            span.record("otel.status_code", "error");
        }
    }
    span.in_scope(|| {
        tracing::debug!(
            status = status.as_u16(),
            "answered {method} {path} {} in {:.1} ms",
            status.as_u16(),
            started.elapsed().as_secs_f64() * 1000.0
        );
    });
    if let Ok(value) = axum::http::HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// A request id unique to this process run and cheap to make: a random
/// prefix drawn at start-up and a counter (32 hex digits, like a UUID).
fn next_request_id() -> String {
    use std::sync::LazyLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static PREFIX: LazyLock<u64> = LazyLock::new(|| uuid::Uuid::new_v4().as_u64_pair().0);
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{:016x}{:016x}",
        *PREFIX,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Middleware, inside the router: hands the route that matched (the
/// template, `/v1/profiles/{id}`) out with the response, so the request
/// span can be named by it rather than by the path.
pub async fn matched_route(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .cloned();
    let mut response = next.run(request).await;
    if let Some(route) = route {
        response.extensions_mut().insert(route);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chance_is_spread_over_zero_to_one() {
        let draws: Vec<f64> = (0..10_000).map(|_| chance()).collect();
        assert!(draws.iter().all(|x| (0.0..1.0).contains(x)));
        let below_a_tenth = draws.iter().filter(|x| **x < 0.1).count();
        assert!((800..1200).contains(&below_a_tenth), "{below_a_tenth}");
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((0.47..0.53).contains(&mean), "{mean}");
    }
}
