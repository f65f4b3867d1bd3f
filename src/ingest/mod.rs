//! Ingest: events in over HTTP, answered only once they are durable in the
//! log.
//!
//! Every route runs the same steps: admit the request (bounded in-flight
//! work), authenticate it with a write key, read the body within its size
//! limit, parse and check every event, normalize each into an
//! [`EventEnvelope`], append them all to `user_events`, and answer 200 only
//! when the log has stored every one. A bad request changes nothing.

pub mod body;
pub mod error;
pub mod object;
pub mod seed;
pub mod segment;

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::routing::post;
use chrono::Utc;
use serde::Serialize;
use tokio::sync::Semaphore;
use utoipa::ToSchema;

use self::body::BodyLimit;
use self::error::IngestError;
use self::segment::{BatchRequest, BodyKey, SegmentMessage, Shared};
use crate::config::{Limits, RateLimit};
use crate::envelope::{EventEnvelope, EventType, JsonObject};
use crate::http::{ErrorBody, Need, authorize, key_from_headers};
use crate::keys::ApiKeys;
use crate::log::{EventLog, Record, Topics};

/// What the ingest routes share (behind one `Arc`).
pub struct Ingest {
    pub log: Arc<dyn EventLog>,
    pub keys: Arc<ApiKeys>,
    pub limits: Limits,
    /// The full name of the events topic.
    pub topic: String,
    /// How long a request may wait for the log before it gets 503.
    pub append_timeout: Duration,
    /// One permit a request being handled; none left means 503 at once.
    pub in_flight: Arc<Semaphore>,
    /// One permit a KiB of request body being handled.
    in_flight_kib: Arc<Semaphore>,
    /// Where a hot user's excess events go.
    overflow_topic: String,
    /// Each user's allowance before the overflow topic, when on.
    hot_users: Option<Arc<governor::DefaultKeyedRateLimiter<String>>>,
    /// Checks made, to forget idle users now and then.
    hot_checks: Arc<std::sync::atomic::AtomicUsize>,
    /// The per-write-key rate limiter, when `rate-limit-events` is set.
    rate: Option<(Arc<governor::DefaultKeyedRateLimiter<String>>, RateLimit)>,
}

/// The log record of an envelope: keyed by its user, the envelope as JSON.
///
/// `json_bytes` is the size of the client's JSON for it: the envelope is
/// about that plus its times and ids, so it is written with one allocation.
pub fn record<O: serde::Serialize + JsonObject>(
    event: EventEnvelope<O>,
    json_bytes: usize,
) -> Result<Record, IngestError> {
    let mut value = Vec::with_capacity(json_bytes + 192);
    serde_json::to_writer(&mut value, &event).map_err(|e| {
        tracing::error!("cannot serialize an event envelope: {e}");
        IngestError::LogRejected
    })?;
    Ok(Record {
        key: event.record_key().map(str::to_owned),
        value,
    })
}

/// A request's share of the in-flight bounds, given back when dropped.
struct Admitted {
    _request: tokio::sync::OwnedSemaphorePermit,
    _body: tokio::sync::OwnedSemaphorePermit,
}

/// The answer to an accepted request.
#[derive(Debug, Serialize, ToSchema)]
pub struct Accepted {
    /// Always true: every event of the request is stored.
    pub success: bool,
}

impl Ingest {
    pub fn new(
        log: Arc<dyn EventLog>,
        keys: Arc<ApiKeys>,
        limits: Limits,
        topics: &Topics,
        append_timeout: Duration,
    ) -> Ingest {
        Ingest {
            log,
            keys,
            limits,
            topic: topics.events(),
            overflow_topic: topics.overflow(),
            hot_users: limits.hot_user_events_per_second.map(|per_second| {
                Arc::new(governor::RateLimiter::dashmap(governor::Quota::per_second(
                    per_second,
                )))
            }),
            hot_checks: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            append_timeout,
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight)),
            in_flight_kib: Arc::new(Semaphore::new(limits.max_in_flight_bytes.div_ceil(1024))),
            rate: limits.rate_limit.map(|limit| {
                let quota = governor::Quota::per_second(limit.per_second).allow_burst(limit.burst);
                (Arc::new(governor::RateLimiter::dashmap(quota)), limit)
            }),
        }
    }

    /// The ingest routes.
    pub fn routes(self) -> Router {
        Router::new()
            .route("/event/user/track", post(seed_track))
            .route("/v1/track", post(track))
            .route("/v1/identify", post(identify))
            .route("/v1/page", post(page))
            .route("/v1/screen", post(screen))
            .route("/v1/group", post(group))
            .route("/v1/alias", post(alias))
            .route("/v1/batch", post(batch))
            .route_layer(axum::middleware::from_fn(crate::metrics::ingest_requests))
            // Shared, not cloned: axum hands every request its own copy of
            // the state, and this one has strings and a handful of `Arc`s.
            .with_state(Arc::new(self))
    }

    /// Takes an in-flight slot, or refuses at once when all are taken: a
    /// client faster than the log gets 503 instead of growing a queue.
    ///
    /// The body's bytes are taken from a budget too (`max-in-flight-bytes`),
    /// before the body is read: a body's size is what it declares, or its
    /// route's limit when it is gzip or declares nothing. Parsed events
    /// take a few times their JSON, so this is what bounds memory when the
    /// log stalls under large batches.
    fn admit(&self, headers: &HeaderMap, limit: BodyLimit) -> Result<Admitted, IngestError> {
        let request = self
            .in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| IngestError::Overloaded)?;
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .filter(|_| !headers.contains_key(header::CONTENT_ENCODING));
        let bytes = declared.unwrap_or(limit.bytes()).min(limit.bytes());
        let kib = u32::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
        let body = self
            .in_flight_kib
            .clone()
            .try_acquire_many_owned(kib)
            .map_err(|_| IngestError::Overloaded)?;
        Ok(Admitted {
            _request: request,
            _body: body,
        })
    }

    /// Takes `events` from `key`'s rate (GCRA, per write key), or refuses:
    /// 429 with the wait when the key is over its rate, 413 when the
    /// request alone is over the burst. The keys are the configured write
    /// keys, so the limiter's memory is bounded.
    fn within_rate(&self, key: &str, events: usize) -> Result<(), IngestError> {
        use governor::clock::{Clock, DefaultClock};
        let Some((limiter, limit)) = &self.rate else {
            return Ok(());
        };
        let n = u32::try_from(events)
            .ok()
            .and_then(std::num::NonZeroU32::new)
            .unwrap_or(std::num::NonZeroU32::MAX);
        match limiter.check_key_n(&key.to_owned(), n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(IngestError::RateLimited {
                per_second: limit.per_second.get(),
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            }),
            Err(_) => Err(IngestError::OverBurst {
                events,
                burst: limit.burst.get(),
            }),
        }
    }

    /// Authenticates by header when there is one; the body's `writeKey` is
    /// checked after parsing otherwise.
    fn header_key(&self, headers: &HeaderMap) -> Result<Option<String>, IngestError> {
        let key = key_from_headers(headers)?;
        if let Some(key) = &key {
            authorize(&self.keys, Some(key), Need::Write)?;
        }
        Ok(key)
    }

    /// The request's write key: the header's (checked by [`Self::header_key`]),
    /// else the body's `writeKey`, checked here.
    fn write_key(
        &self,
        header_key: Option<String>,
        body_key: impl FnOnce() -> Option<String>,
    ) -> Result<String, IngestError> {
        if let Some(key) = header_key {
            return Ok(key);
        }
        let key = body_key();
        authorize(&self.keys, key.as_deref(), Need::Write)?;
        Ok(key.unwrap_or_default())
    }

    /// Appends the records and waits until all are durable.
    async fn store(
        &self,
        route: &'static str,
        records: Vec<Record>,
    ) -> Result<Json<Accepted>, IngestError> {
        let count = records.len() as u64;
        let started = std::time::Instant::now();
        let stored = self.append(records).await;
        let status = if stored.is_ok() {
            metrics::histogram!(crate::metrics::LOG_APPEND_SECONDS)
                .record(started.elapsed().as_secs_f64());
            "200"
        } else {
            "503"
        };
        metrics::counter!(crate::metrics::INGEST_EVENTS, "route" => route, "status" => status)
            .increment(count);
        stored
    }

    /// Splits off the events of users over their per-user rate: they go to
    /// the overflow topic, the rest to `user_events`.
    fn route_hot_users(&self, records: Vec<Record>) -> (Vec<Record>, Vec<Record>) {
        use std::sync::atomic::Ordering;
        let Some(hot_users) = &self.hot_users else {
            return (records, Vec::new());
        };
        if self.hot_checks.fetch_add(records.len(), Ordering::Relaxed) % 65_536 < records.len() {
            hot_users.retain_recent();
            hot_users.shrink_to_fit();
        }
        let (mut normal, mut overflow) = (Vec::with_capacity(records.len()), Vec::new());
        for record in records {
            match &record.key {
                Some(user) if hot_users.check_key(user).is_err() => overflow.push(record),
                _ => normal.push(record),
            }
        }
        if !overflow.is_empty() {
            metrics::counter!(crate::metrics::INGEST_OVERFLOW_EVENTS)
                .increment(overflow.len() as u64);
        }
        (normal, overflow)
    }

    async fn append(&self, records: Vec<Record>) -> Result<Json<Accepted>, IngestError> {
        let count = records.len();
        let (normal, overflow) = self.route_hot_users(records);
        let both = async {
            let (normal, overflow) = tokio::join!(
                async {
                    if normal.is_empty() {
                        Ok(())
                    } else {
                        self.log.append(&self.topic, normal).await
                    }
                },
                async {
                    if overflow.is_empty() {
                        Ok(())
                    } else {
                        self.log.append(&self.overflow_topic, overflow).await
                    }
                }
            );
            normal.and(overflow)
        };
        let span = if crate::telemetry::in_trace() {
            tracing::info_span!(
                target: crate::telemetry::TRACE_TARGET,
                "log append",
                otel.kind = "producer",
                messaging.destination.name = %self.topic,
                messaging.batch.message_count = count,
            )
        } else {
            tracing::Span::none()
        };
        let both = tracing::Instrument::instrument(both, span);
        match tokio::time::timeout(self.append_timeout, both).await {
            Ok(result) => result?,
            Err(_) => {
                tracing::warn!(
                    "answered 503: the {} did not store {} events within {:?}",
                    self.log.describe(),
                    count,
                    self.append_timeout
                );
                return Err(IngestError::LogUnavailable);
            }
        }
        Ok(Json(Accepted { success: true }))
    }

    /// One Segment message of type `kind`.
    async fn single(
        &self,
        kind: EventType,
        route: &'static str,
        headers: HeaderMap,
        body: Body,
    ) -> Result<Json<Accepted>, IngestError> {
        let _admitted = self.admit(&headers, BodyLimit::Event(self.limits.max_event_bytes))?;
        let header_key = self.header_key(&headers)?;
        let bytes = body::read(
            body,
            &headers,
            BodyLimit::Event(self.limits.max_event_bytes),
        )
        .await?;
        let received_at = Utc::now();
        let message = segment::parse_message(&bytes);
        let key = self.write_key(header_key, || match &message {
            Ok(m) => m.write_key.clone(),
            Err(_) => body_key(&bytes),
        })?;
        let mut event = segment::normalize(message?, kind, &Shared::default(), received_at)?;
        event.traceparent = crate::telemetry::traceparent();
        self.within_rate(&key, 1)?;
        self.store(route, vec![record(event, bytes.len())?]).await
    }
}

/// The body's `writeKey` when the body is JSON but not a valid message
/// (so the client learns what is wrong only once it is authenticated).
fn body_key(bytes: &[u8]) -> Option<String> {
    serde_json::from_slice::<BodyKey>(bytes)
        .ok()
        .and_then(|k| k.write_key)
}

/// Track an event (seed API).
///
/// The original trait service's route. Needs a write key.
#[utoipa::path(
    post, path = "/event/user/track", tag = "seed",
    request_body = seed::SeedEvent,
    responses(
        (status = 200, description = "The event is stored", body = Accepted),
        (status = 400, description = "Not JSON, or not the route's shape", body = ErrorBody),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "The key may not send events", body = ErrorBody),
        (status = 413, description = "Over a size limit", body = ErrorBody),
        (status = 415, description = "Unsupported Content-Encoding", body = ErrorBody),
        (status = 422, description = "A field is missing or wrong; `field` names it", body = ErrorBody),
        (status = 429, description = "The write key is over rate-limit-events, or this address had too many failed authentications; retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The log cannot store events now; retry after Retry-After", body = ErrorBody),
    ),
    security(("basic" = []), ("bearer" = []))
)]
pub async fn seed_track(
    State(ingest): State<Arc<Ingest>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Accepted>, IngestError> {
    let _admitted = ingest.admit(&headers, BodyLimit::Event(ingest.limits.max_event_bytes))?;
    let key = key_from_headers(&headers)?;
    authorize(&ingest.keys, key.as_deref(), Need::Write)?;
    let key = key.unwrap_or_default();
    let bytes = body::read(
        body,
        &headers,
        BodyLimit::Event(ingest.limits.max_event_bytes),
    )
    .await?;
    let mut event = seed::parse(&bytes, Utc::now())?;
    event.traceparent = crate::telemetry::traceparent();
    ingest.within_rate(&key, 1)?;
    ingest
        .store("/event/user/track", vec![record(event, bytes.len())?])
        .await
}

/// Declares a Segment single-message route.
macro_rules! segment_route {
    ($name:ident, $path:literal, $kind:expr, $summary:literal) => {
        #[doc = $summary]
        #[utoipa::path(
            post, path = $path, tag = "segment",
            request_body = SegmentMessage,
            responses(
                (status = 200, description = "The event is stored", body = Accepted),
                (status = 400, description = "Not JSON, or not the route's shape", body = ErrorBody),
                (status = 401, description = "Missing or unknown key", body = ErrorBody),
                (status = 403, description = "The key may not send events", body = ErrorBody),
                (status = 413, description = "Over max-event-bytes", body = ErrorBody),
                (status = 415, description = "Unsupported Content-Encoding", body = ErrorBody),
                (status = 422, description = "A field is missing or wrong; `field` names it", body = ErrorBody),
                (status = 429, description = "The write key is over rate-limit-events, or this address had too many failed authentications; retry after Retry-After", body = ErrorBody),
                (status = 503, description = "The log cannot store events now; retry after Retry-After", body = ErrorBody),
            ),
            security(("basic" = []), ("bearer" = []), ())
        )]
        pub async fn $name(
            State(ingest): State<Arc<Ingest>>,
            headers: HeaderMap,
            body: Body,
        ) -> Result<Json<Accepted>, IngestError> {
            ingest.single($kind, $path, headers, body).await
        }
    };
}

segment_route!(
    track,
    "/v1/track",
    EventType::Track,
    "Record an action a user performed (Segment `track`)."
);
segment_route!(
    identify,
    "/v1/identify",
    EventType::Identify,
    "Tie a user to their traits (Segment `identify`)."
);
segment_route!(
    page,
    "/v1/page",
    EventType::Page,
    "Record a page view (Segment `page`)."
);
segment_route!(
    screen,
    "/v1/screen",
    EventType::Screen,
    "Record a mobile screen view (Segment `screen`)."
);
segment_route!(
    group,
    "/v1/group",
    EventType::Group,
    "Tie a user to a group or account (Segment `group`)."
);
segment_route!(
    alias,
    "/v1/alias",
    EventType::Alias,
    "Merge a previous id into a user id (Segment `alias`)."
);

/// Send many messages of any type at once (Segment `batch`).
///
/// All or nothing: the first bad message refuses the whole batch, named by
/// its index (`batch[3].userId`).
#[utoipa::path(
    post, path = "/v1/batch", tag = "segment",
    request_body = BatchRequest,
    responses(
        (status = 200, description = "Every message is stored", body = Accepted),
        (status = 400, description = "Not JSON, or not the route's shape", body = ErrorBody),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "The key may not send events", body = ErrorBody),
        (status = 413, description = "Over max-batch-bytes, a message over max-event-bytes, or more events than rate-limit-burst", body = ErrorBody),
        (status = 415, description = "Unsupported Content-Encoding", body = ErrorBody),
        (status = 422, description = "A field is missing or wrong; `field` names it", body = ErrorBody),
        (status = 429, description = "The write key is over rate-limit-events, or this address had too many failed authentications; retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The log cannot store events now; retry after Retry-After", body = ErrorBody),
    ),
    security(("basic" = []), ("bearer" = []), ())
)]
pub async fn batch(
    State(ingest): State<Arc<Ingest>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Accepted>, IngestError> {
    let _admitted = ingest.admit(&headers, BodyLimit::Batch(ingest.limits.max_batch_bytes))?;
    let header_key = ingest.header_key(&headers)?;
    let bytes = body::read(
        body,
        &headers,
        BodyLimit::Batch(ingest.limits.max_batch_bytes),
    )
    .await?;
    let received_at = Utc::now();
    let parsed: Result<BatchRequest, IngestError> = segment::parse_batch(&bytes);
    let key = ingest.write_key(header_key, || match &parsed {
        Ok(b) => b.write_key.clone(),
        Err(_) => body_key(&bytes),
    })?;
    let traceparent = crate::telemetry::traceparent();
    let records = segment::normalize_batch_into(
        &parsed?,
        ingest.limits.max_event_bytes,
        received_at,
        |mut event, json_bytes| {
            event.traceparent.clone_from(&traceparent);
            record(event, json_bytes)
        },
    )?;
    // Only the records wait on the log, not the body they came from.
    drop(bytes);
    ingest.within_rate(&key, records.len())?;
    ingest.store("/v1/batch", records).await
}
