//! `PUT/GET/DELETE /v1/destinations/{name}`, `GET /v1/destinations`:
//! destinations (DESIGN.md, "Destinations"), versioned like metrics, with
//! secrets write-only; and what they did: `GET
//! /v1/destinations/{name}/attempts` (newest first) and `GET
//! /v1/destinations/{name}/failures` (the dead letters).

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::{
    AdminError, AdminState, DefinitionName, all_definitions, current_definition, delete_definition,
    put_checked, time,
};
use crate::definitions::destination::Secrets;
use crate::definitions::{DefinitionError, DestinationDefinition};
use crate::destinations::DestinationState;
use crate::http::{ErrorBody, Need, authorize_request};
use crate::store::{DefinitionKind, DeliverySummary, StoredDefinition, now_ms};

/// A destination as stored: its name, version and body (secrets hidden).
#[derive(Debug, Serialize, ToSchema)]
pub struct DestinationEntry {
    pub name: String,
    /// 1 for the first definition of a name; every change adds one.
    pub version: i64,
    pub changed_at: DateTime<Utc>,
    /// The definition as accepted, secrets shown as `whsec_********`.
    #[schema(value_type = DestinationDefinition)]
    pub definition: Value,
    /// How it is doing (on `GET /v1/destinations/{name}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<DestinationStatus>,
}

/// What a destination is doing and did in the last hour.
#[derive(Debug, Serialize, ToSchema)]
pub struct DestinationStatus {
    /// `active`, `paused` (its circuit breaker is open: one probe at a
    /// time until the endpoint answers), `disabled` (an endpoint answered
    /// 410; a new version resumes) or `failed` (its runner is being
    /// restarted).
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Records of its topic not yet done, when this process runs it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag: Option<i64>,
    /// How long ago the log stored the oldest record being delivered
    /// (retries included), when this process runs it and one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_undelivered_seconds: Option<f64>,
    /// Records delivered in the last hour.
    pub delivered: i64,
    /// Attempts that failed in the last hour (each retried or given up).
    pub failed_attempts: i64,
    /// Dead letters held (`GET .../failures`).
    pub dead_letters: i64,
    /// The 95th percentile of the last hour's attempt latencies.
    pub p95_latency_ms: Option<i64>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// An archive's objects (its counts above are of uploads).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archive: Option<ArchiveStatus>,
}

/// How an archive's uploads go.
#[derive(Debug, Serialize, ToSchema)]
pub struct ArchiveStatus {
    /// The newest object uploaded, and when.
    pub last_object: Option<String>,
    pub last_uploaded_at: Option<DateTime<Utc>>,
    /// Objects whose upload is under way (retried while the bucket fails).
    pub uploading: i64,
}

/// Every destination.
#[derive(Debug, Serialize, ToSchema)]
pub struct DestinationList {
    pub destinations: Vec<DestinationEntry>,
}

fn entry(stored: StoredDefinition) -> DestinationEntry {
    let definition = DestinationDefinition::from_json(stored.body.as_bytes())
        .ok()
        .and_then(|d| serde_json::to_value(d.redacted()).ok())
        .unwrap_or(Value::Null);
    DestinationEntry {
        definition,
        changed_at: DateTime::from_timestamp_millis(stored.changed_at).unwrap_or_default(),
        name: stored.name,
        version: stored.version,
        status: None,
    }
}

/// Defines a destination, or changes it (a new version, which goes on
/// from where the last one got). A body without `secret` keeps the
/// current secret(s).
#[utoipa::path(put, path = "/v1/destinations/{name}", tag = "destinations",
    params(("name" = String, Path, description = "Lowercase letters, digits and `_`")),
    request_body(content = DestinationDefinition, description = "A destination (DESIGN.md, \"Definitions\")"),
    security(("basic" = []), ("bearer" = [])),
    responses(
        (status = 201, description = "The first version of this destination", body = DestinationEntry),
        (status = 200, description = "A new version, or the same definition again (no new version)", body = DestinationEntry),
        (status = 400, description = "The body is not JSON", body = ErrorBody),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 422, description = "The definition is refused (a private or loopback URL among the reasons); `field` names what to fix", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address; retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ))]
pub async fn put_destination(
    State(state): State<AdminState>,
    headers: HeaderMap,
    DefinitionName(name): DefinitionName,
    body: Bytes,
) -> Result<(StatusCode, Json<DestinationEntry>), AdminError> {
    let allow_private = state.allow_private;
    let store = state.store.clone();
    let (status, stored) = put_checked(
        &state,
        &headers,
        &name,
        &body,
        |mut d: DestinationDefinition| {
            let (store, name) = (store.clone(), name.clone());
            async move {
                keep_secrets(&store, &name, &mut d).await?;
                if let Some(url) = d.url.as_deref().and_then(|u| reqwest::Url::parse(u).ok()) {
                    crate::destinations::address::check_host(&url, allow_private)
                        .map_err(|why| AdminError::Invalid(DefinitionError::new("url", why)))?;
                }
                Ok(d)
            }
        },
    )
    .await?;
    Ok((status, Json(entry(stored))))
}

/// A `PUT` without secrets keeps the current version's: they are never
/// shown, so a client changing something else cannot send them back.
async fn keep_secrets(
    store: &crate::store::Store,
    name: &str,
    definition: &mut DestinationDefinition,
) -> Result<(), AdminError> {
    if definition.secret.is_some() && definition.secret_access_key.is_some() {
        return Ok(());
    }
    let Some(current) = store.definition(DefinitionKind::Destination, name).await? else {
        return Ok(());
    };
    if let Ok(current) = DestinationDefinition::from_json(current.body.as_bytes()) {
        if definition.secret.is_none() {
            definition.secret = current
                .secret
                .filter(|s| !matches!(s, Secrets::Many(l) if l.is_empty()));
        }
        if definition.secret_access_key.is_none() {
            definition.secret_access_key = current.secret_access_key;
        }
    }
    Ok(())
}

/// A destination, current version, with how it is doing.
#[utoipa::path(get, path = "/v1/destinations/{name}", tag = "destinations",
    params(("name" = String, Path, description = "The destination's name")),
    security(("basic" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "The definition and its status", body = DestinationEntry),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "Not a read or admin key", body = ErrorBody),
        (status = 404, description = "No destination has this name", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address; retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ))]
pub async fn get_destination(
    State(state): State<AdminState>,
    headers: HeaderMap,
    DefinitionName(name): DefinitionName,
) -> Result<Json<DestinationEntry>, AdminError> {
    let stored =
        current_definition::<DestinationDefinition>(&state, &headers, name.clone()).await?;
    let version = stored.version;
    let mut shown = entry(stored);
    let summary = state
        .store
        .delivery_summary(&name, now_ms() - 3_600_000)
        .await?;
    let running = state.destinations.as_ref().and_then(|d| d.state(&name));
    let stopped = state
        .store
        .destination_state(&name)
        .await?
        .filter(|(v, ..)| *v == version);
    let mut status = status(running, stopped, summary);
    if shown.definition["kind"] == "s3" {
        let (newest, uploading) = state.store.archive_progress(&name).await?;
        status.archive = Some(ArchiveStatus {
            last_uploaded_at: newest.as_ref().map(|(_, at)| time(*at)),
            last_object: newest.map(|(key, _)| key),
            uploading,
        });
    }
    shown.status = Some(status);
    Ok(Json(shown))
}

fn status(
    running: Option<DestinationState>,
    stopped: Option<(i64, String, String, i64)>,
    summary: DeliverySummary,
) -> DestinationStatus {
    let (state, reason) = match (&stopped, &running) {
        (Some((_, state, why, _)), _) => (state.clone(), Some(why.clone())),
        (None, Some(running)) => (running.state.to_owned(), running.reason.clone()),
        (None, None) => ("active".to_owned(), None),
    };
    DestinationStatus {
        state,
        reason,
        lag: running.as_ref().and_then(|r| r.lag),
        oldest_undelivered_seconds: running.and_then(|r| r.oldest_undelivered_seconds),
        delivered: summary.delivered,
        failed_attempts: summary.retried,
        dead_letters: summary.dead_letters,
        p95_latency_ms: summary.p95_latency_ms,
        last_attempt_at: summary.last_attempt_at.map(time),
        archive: None,
    }
}

/// Every destination, by name.
#[utoipa::path(get, path = "/v1/destinations", tag = "destinations",
    security(("basic" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "The definitions", body = DestinationList),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "Not a read or admin key", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address; retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ))]
pub async fn list_destinations(
    State(state): State<AdminState>,
    headers: HeaderMap,
) -> Result<Json<DestinationList>, AdminError> {
    let destinations = all_definitions::<DestinationDefinition>(&state, &headers)
        .await?
        .into_iter()
        .map(entry)
        .collect();
    Ok(Json(DestinationList { destinations }))
}

/// Deletes a destination: it stops delivering; its attempts and dead
/// letters stay.
#[utoipa::path(delete, path = "/v1/destinations/{name}", tag = "destinations",
    params(("name" = String, Path, description = "The destination's name")),
    security(("basic" = []), ("bearer" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 404, description = "No destination has this name", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address; retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ))]
pub async fn delete_destination(
    State(state): State<AdminState>,
    headers: HeaderMap,
    DefinitionName(name): DefinitionName,
) -> Result<StatusCode, AdminError> {
    delete_definition::<DestinationDefinition>(&state, &headers, name).await
}

/// How many to list.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Most entries, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

fn limit(query: Result<Query<ListQuery>, QueryRejection>) -> Result<u32, AdminError> {
    let Query(query) = query.map_err(|e| AdminError::BadParameter(e.body_text()))?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(AdminError::BadParameter(
            "limit: must be between 1 and 1000".into(),
        ));
    }
    Ok(limit)
}

/// A destination's delivery attempts.
#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptList {
    /// Each: `delivery_id` (the receiver's `webhook-id`), `attempt`,
    /// `partition`, `offset`, `key`, `outcome` (delivered, retrying,
    /// dead_letter, disabled), `status`, `latency_ms`, `response` (the
    /// start of the answer, or why there was none), `at`.
    #[schema(value_type = Vec<Object>)]
    pub attempts: Vec<Value>,
}

/// A destination's delivery attempts, newest first.
#[utoipa::path(get, path = "/v1/destinations/{name}/attempts", tag = "destinations",
    params(("name" = String, Path, description = "The destination's name"), ListQuery),
    security(("basic" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "The newest attempts", body = AttemptList),
        (status = 400, description = "A parameter is not valid", body = ErrorBody),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "Not a read or admin key", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address; retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ))]
pub async fn list_attempts(
    State(state): State<AdminState>,
    headers: HeaderMap,
    DefinitionName(name): DefinitionName,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<AttemptList>, AdminError> {
    authorize_request(&state.keys, &headers, Need::Read)?;
    let limit = limit(query)?;
    let attempts = state.store.delivery_attempts(&name, limit).await?;
    Ok(Json(AttemptList {
        attempts: attempts
            .iter()
            .map(crate::destinations::recorder::view)
            .collect(),
    }))
}

/// A destination's dead letters.
#[derive(Debug, Serialize, ToSchema)]
pub struct FailureList {
    /// Each: `delivery_id`, `partition`, `offset`, `key`, `attempts`,
    /// `reason` (the last attempt's answer), `failed_at` and `record` (what
    /// was to be delivered).
    #[schema(value_type = Vec<Object>)]
    pub failures: Vec<Value>,
}

/// The records a destination gave up on after its retry budget, oldest
/// first.
#[utoipa::path(get, path = "/v1/destinations/{name}/failures", tag = "destinations",
    params(("name" = String, Path, description = "The destination's name"), ListQuery),
    security(("basic" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "The dead letters", body = FailureList),
        (status = 400, description = "A parameter is not valid", body = ErrorBody),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "Not a read or admin key", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address; retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ))]
pub async fn list_failures(
    State(state): State<AdminState>,
    headers: HeaderMap,
    DefinitionName(name): DefinitionName,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<FailureList>, AdminError> {
    authorize_request(&state.keys, &headers, Need::Read)?;
    let limit = limit(query)?;
    let failures = state
        .store
        .delivery_failures(&name, None, None, limit)
        .await?;
    Ok(Json(FailureList {
        failures: failures
            .into_iter()
            .map(|f| {
                serde_json::json!({
                    "delivery_id": f.delivery_id,
                    "partition": f.partition,
                    "offset": f.offset,
                    "key": f.key,
                    "attempts": f.attempts,
                    "reason": f.reason,
                    "failed_at": time(f.failed_at),
                    "record": serde_json::from_str::<Value>(&f.body).unwrap_or(Value::String(f.body)),
                })
            })
            .collect(),
    }))
}

/// What to deliver again.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// `dead_letters` (the default): the records given up on; `log`: the
    /// records the source topic stored in the range (a backfill).
    #[serde(default)]
    #[schema(pattern = "^(dead_letters|log)$")]
    pub what: Option<String>,
    /// Dead letters that failed, or records stored, at or after this
    /// (default: all).
    pub from: Option<DateTime<Utc>>,
    /// ... and before this (default and at most: now).
    pub to: Option<DateTime<Utc>>,
}

/// A replay and how far it got.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReplayView {
    pub replay_id: String,
    pub what: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub requested_at: DateTime<Utc>,
    /// `pending` (no instance running the destination took it yet),
    /// `running` or `done`.
    pub state: String,
    /// Records delivered so far.
    pub delivered: i64,
    /// Records that became dead letters (again).
    pub failed: i64,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A destination's replays, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReplayList {
    pub replays: Vec<ReplayView>,
}

fn replay_view(r: crate::store::StoredReplay) -> ReplayView {
    ReplayView {
        replay_id: r.replay_id,
        what: r.what,
        from: time(r.from_ms),
        to: time(r.to_ms),
        requested_at: time(r.requested_at),
        state: r.state,
        delivered: r.delivered,
        failed: r.failed,
        finished_at: r.finished_at.map(time),
    }
}

/// Delivers again a destination's dead letters, or the records of a time
/// range of its topic (also how a destination added later gets the
/// history). Runs on the instance that runs the destination; its
/// progress is at `GET .../replays`.
#[utoipa::path(post, path = "/v1/destinations/{name}/replay", tag = "destinations",
    params(("name" = String, Path, description = "The destination's name")),
    request_body(content = ReplayRequest, description = "What to deliver again (an empty object: every dead letter)"),
    security(("basic" = []), ("bearer" = [])),
    responses(
        (status = 202, description = "The replay is asked for", body = ReplayView),
        (status = 400, description = "The body is not JSON", body = ErrorBody),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 404, description = "No destination has this name", body = ErrorBody),
        (status = 422, description = "A field is not valid; `field` names it", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address; retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ))]
pub async fn replay(
    State(state): State<AdminState>,
    headers: HeaderMap,
    DefinitionName(name): DefinitionName,
    body: Bytes,
) -> Result<(StatusCode, Json<ReplayView>), AdminError> {
    authorize_request(&state.keys, &headers, Need::Admin)?;
    let body: &[u8] = if body.is_empty() { b"{}" } else { &body };
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(body) {
        return Err(AdminError::NotJson(e.to_string()));
    }
    let request: ReplayRequest =
        crate::definitions::from_json(body).map_err(AdminError::Invalid)?;
    let what = request.what.as_deref().unwrap_or("dead_letters");
    if !matches!(what, "dead_letters" | "log") {
        return Err(AdminError::Invalid(DefinitionError::new(
            "what",
            format!("`{what}` is not dead_letters or log"),
        )));
    }
    let now = now_ms();
    let from = request.from.map_or(0, |t| t.timestamp_millis());
    let to = request.to.map_or(now, |t| t.timestamp_millis().min(now));
    if from >= to {
        return Err(AdminError::Invalid(DefinitionError::new(
            "to",
            "must be after `from` (and `from` before now)",
        )));
    }
    let Some(current) = state
        .store
        .definition(DefinitionKind::Destination, &name)
        .await?
    else {
        return Err(AdminError::NotFound {
            noun: "destination",
            name,
        });
    };
    if DestinationDefinition::from_json(current.body.as_bytes()).is_ok_and(|d| d.kind == "s3") {
        // An archive retries each object until it is stored: it has no
        // dead letters, and its objects are named by their offsets.
        return Err(AdminError::Invalid(DefinitionError::new(
            "what",
            "an archive (`kind: \"s3\"`) has no dead letters and is not replayed; it archives every record from its creation",
        )));
    }
    let asked = state.store.request_replay(&name, what, from, to).await?;
    tracing::info!(
        "destination {name}: a replay of {what} is asked for ({})",
        asked.replay_id
    );
    Ok((StatusCode::ACCEPTED, Json(replay_view(asked))))
}

/// A destination's replays and their progress, newest first.
#[utoipa::path(get, path = "/v1/destinations/{name}/replays", tag = "destinations",
    params(("name" = String, Path, description = "The destination's name"), ListQuery),
    security(("basic" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "The replays", body = ReplayList),
        (status = 400, description = "A parameter is not valid", body = ErrorBody),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "Not a read or admin key", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address; retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ))]
pub async fn list_replays(
    State(state): State<AdminState>,
    headers: HeaderMap,
    DefinitionName(name): DefinitionName,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<ReplayList>, AdminError> {
    authorize_request(&state.keys, &headers, Need::Read)?;
    let limit = limit(query)?;
    let replays = state.store.replays(&name, limit).await?;
    Ok(Json(ReplayList {
        replays: replays.into_iter().map(replay_view).collect(),
    }))
}
