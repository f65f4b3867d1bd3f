//! The admin API for definitions: `PUT/GET/DELETE /v1/metrics/{name}`,
//! `GET /v1/metrics`, and the same for `/v1/rules` ([`rules`]). An admin
//! key writes; a read or admin key reads. A
//! definition is checked and compiled before it is stored, so a bad one is
//! a 422 naming its field and the running version stays; a change is a new
//! version in the store, which every instance sharing it reads.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

pub mod destinations;
pub mod rules;

pub use rules::{AlertList, RuleEntry, RuleList};

use crate::definitions::{
    Definition, DefinitionError, DestinationDefinition, GroupBy, MetricDefinition, MetricSpec,
    RuleDefinition,
};
use crate::destinations::DestinationRunners;
use crate::http::{ApiError, AuthError, ErrorBody, Need, authorize_request};
use crate::keys::ApiKeys;
use crate::metric::GLOBAL_GROUP;
use crate::process::metrics::MetricRunners;
use crate::store::{
    DefinitionKind, OpenGroup, Put, Store, StoreError, StoredDefinition, StoredWindow, WindowQuery,
};
use crate::windows::{OpenWindow, Span};

/// What the admin routes need.
#[derive(Clone)]
pub struct AdminState {
    store: Store,
    keys: Arc<ApiKeys>,
    /// The events topic, whose partitions the metrics' states are kept by.
    events_topic: String,
    /// This process's metric runners, when it runs them.
    runners: Option<MetricRunners>,
    /// This process's destinations, when it runs them.
    destinations: Option<DestinationRunners>,
    /// Destinations may name private and loopback addresses.
    allow_private: bool,
}

/// Why an admin request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    #[error("the definition is refused, the running version stays: {0}")]
    Invalid(DefinitionError),
    #[error("no {noun} is named {name:?}")]
    NotFound { noun: &'static str, name: String },
    #[error("{0}")]
    BadParameter(String),
    #[error("the store is unavailable; try again")]
    Unavailable,
}

impl ApiError for AdminError {
    fn status(&self) -> StatusCode {
        match self {
            AdminError::Auth(auth) => auth.status(),
            AdminError::NotJson(_) | AdminError::BadParameter(_) => StatusCode::BAD_REQUEST,
            AdminError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AdminError::NotFound { .. } => StatusCode::NOT_FOUND,
            AdminError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            AdminError::Auth(auth) => auth.code(),
            AdminError::NotJson(_) => "invalid_json",
            AdminError::BadParameter(_) => "invalid_parameter",
            AdminError::Invalid(_) => "invalid_value",
            AdminError::NotFound { .. } => "not_found",
            AdminError::Unavailable => "store_unavailable",
        }
    }

    fn field(&self) -> Option<String> {
        match self {
            AdminError::Invalid(e) if !e.field.is_empty() => Some(e.field.clone()),
            _ => None,
        }
    }
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        tracing::error!("a definition could not be read or stored: {e}");
        AdminError::Unavailable
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        crate::http::error::respond(&self)
    }
}

/// The `{name}` of a definition route; a path that is not UTF-8 names
/// nothing.
pub struct DefinitionName(String);

impl<S: Send + Sync> FromRequestParts<S> for DefinitionName {
    type Rejection = AdminError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &S,
    ) -> Result<DefinitionName, AdminError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(name)| DefinitionName(name))
            .map_err(|rejection| {
                AdminError::Invalid(DefinitionError::new("name", rejection.body_text()))
            })
    }
}

/// A metric definition as stored: its name, version and body.
#[derive(Debug, Serialize, ToSchema)]
pub struct MetricEntry {
    pub name: String,
    /// 1 for the first definition of a name; every change adds one.
    pub version: i64,
    /// When this version was stored.
    pub changed_at: DateTime<Utc>,
    /// The definition as accepted (DESIGN.md, "Definitions").
    #[schema(value_type = MetricDefinition)]
    pub definition: Value,
    /// How far the current version has computed (on `GET
    /// /v1/metrics/{name}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
}

/// How far a metric version has computed, from the store: what every
/// instance computing it has committed.
#[derive(Debug, Serialize, ToSchema)]
pub struct Progress {
    /// `backfilling`, `live` or `failed`, when this process runs the
    /// metric (else see `/readyz` of the instances that do).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<&'static str>,
    /// Records of the log read, over every partition.
    pub records_read: i64,
    /// Events of the log not yet read, when this process knows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag: Option<i64>,
    /// The slowest partition's watermark: windows ending before it (less
    /// the lateness) are closed.
    pub watermark: Option<DateTime<Utc>>,
    /// How far that watermark is behind now, in seconds: large while the
    /// history is computed, a few seconds once live.
    pub behind_seconds: Option<f64>,
}

/// Every metric definition.
#[derive(Debug, Serialize, ToSchema)]
pub struct MetricList {
    pub metrics: Vec<MetricEntry>,
}

fn entry(stored: StoredDefinition) -> MetricEntry {
    MetricEntry {
        definition: serde_json::from_str(&stored.body).unwrap_or(Value::Null),
        changed_at: DateTime::from_timestamp_millis(stored.changed_at).unwrap_or_default(),
        name: stored.name,
        version: stored.version,
        progress: None,
    }
}

impl AdminState {
    pub fn new(
        store: Store,
        keys: Arc<ApiKeys>,
        events_topic: String,
        runners: Option<MetricRunners>,
        destinations: Option<DestinationRunners>,
        allow_private: bool,
    ) -> AdminState {
        AdminState {
            store,
            keys,
            events_topic,
            runners,
            destinations,
            allow_private,
        }
    }

    pub fn routes(self) -> Router {
        Router::new()
            .route("/v1/metrics", get(list_metrics))
            .route(
                "/v1/metrics/{name}",
                get(get_metric).put(put_metric).delete(delete_metric),
            )
            .route("/v1/metrics/{name}/values", get(metric_values))
            .route("/v1/rules", get(rules::list_rules))
            .route(
                "/v1/rules/{name}",
                get(rules::get_rule)
                    .put(rules::put_rule)
                    .delete(rules::delete_rule),
            )
            .route("/v1/destinations", get(destinations::list_destinations))
            .route(
                "/v1/destinations/{name}",
                get(destinations::get_destination)
                    .put(destinations::put_destination)
                    .delete(destinations::delete_destination),
            )
            .route(
                "/v1/destinations/{name}/attempts",
                get(destinations::list_attempts),
            )
            .route(
                "/v1/destinations/{name}/failures",
                get(destinations::list_failures),
            )
            .route(
                "/v1/destinations/{name}/replay",
                axum::routing::post(destinations::replay),
            )
            .route(
                "/v1/destinations/{name}/replays",
                get(destinations::list_replays),
            )
            .route("/v1/alerts", get(rules::list_alerts))
            .route("/v1/profiles/{id}/alerts", get(rules::profile_alerts))
            .with_state(self)
    }
}

/// A kind of definition as the store keeps it.
pub trait Stored: Definition {
    const KIND: DefinitionKind;
}

impl Stored for MetricDefinition {
    const KIND: DefinitionKind = DefinitionKind::Metric;
}

impl Stored for RuleDefinition {
    const KIND: DefinitionKind = DefinitionKind::Rule;
}

impl Stored for DestinationDefinition {
    const KIND: DefinitionKind = DefinitionKind::Destination;
}

/// Checks a definition and stores it as `name`'s next version (unless it
/// equals the current one): the form a `PUT` body, a file's table and the
/// store share.
pub async fn store_definition<D: Stored>(
    store: &Store,
    name: &str,
    definition: &D,
) -> Result<(Put, StoredDefinition), AdminError> {
    definition.compile(name).map_err(AdminError::Invalid)?;
    let text = serde_json::to_string(&definition.unnamed()).expect("a definition serializes");
    Ok(store.put_definition(D::KIND, name, &text).await?)
}

/// A `PUT` of a definition: checked, compiled and stored as the next
/// version; 201 for a name's first.
async fn put_definition<D: Stored>(
    state: &AdminState,
    headers: &HeaderMap,
    name: &str,
    body: &[u8],
) -> Result<(StatusCode, StoredDefinition), AdminError> {
    put_checked(state, headers, name, body, |d: D| async move { Ok(d) }).await
}

/// [`put_definition`] with a last look at the definition before it is
/// checked and stored (`prepare` may complete it, or refuse it).
async fn put_checked<D: Stored, F, Fut>(
    state: &AdminState,
    headers: &HeaderMap,
    name: &str,
    body: &[u8],
    prepare: F,
) -> Result<(StatusCode, StoredDefinition), AdminError>
where
    F: FnOnce(D) -> Fut,
    Fut: std::future::Future<Output = Result<D, AdminError>>,
{
    authorize_request(&state.keys, headers, Need::Admin)?;
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(body) {
        return Err(AdminError::NotJson(e.to_string()));
    }
    let definition: D = crate::definitions::from_json(body).map_err(AdminError::Invalid)?;
    if definition.name().is_some_and(|n| n != name) {
        return Err(AdminError::Invalid(DefinitionError::new(
            "name",
            "differs from the name in the path (leave it out of the body)",
        )));
    }
    let definition = prepare(definition).await?;
    let (put, stored) = store_definition(&state.store, name, &definition).await?;
    let noun = D::NOUN;
    match put {
        Put::Created(v) => tracing::info!("{noun} {name} is defined (version {v})"),
        Put::Changed(v) => tracing::info!("{noun} {name} changed (version {v})"),
        Put::Unchanged(_) => {}
    }
    let status = match put {
        Put::Created(_) => StatusCode::CREATED,
        _ => StatusCode::OK,
    };
    Ok((status, stored))
}

/// The current version of a definition, for a read key.
async fn current_definition<D: Stored>(
    state: &AdminState,
    headers: &HeaderMap,
    name: String,
) -> Result<StoredDefinition, AdminError> {
    authorize_request(&state.keys, headers, Need::Read)?;
    match state.store.definition(D::KIND, &name).await? {
        Some(stored) => Ok(stored),
        None => Err(AdminError::NotFound {
            noun: D::NOUN,
            name,
        }),
    }
}

/// Every definition of a kind, by name, for a read key.
async fn all_definitions<D: Stored>(
    state: &AdminState,
    headers: &HeaderMap,
) -> Result<Vec<StoredDefinition>, AdminError> {
    authorize_request(&state.keys, headers, Need::Read)?;
    Ok(state.store.definitions(D::KIND).await?)
}

/// A `DELETE` of a definition: a version of its own, so the history
/// stays.
async fn delete_definition<D: Stored>(
    state: &AdminState,
    headers: &HeaderMap,
    name: String,
) -> Result<StatusCode, AdminError> {
    authorize_request(&state.keys, headers, Need::Admin)?;
    match state.store.delete_definition(D::KIND, &name).await? {
        Some(version) => {
            tracing::info!("{} {name} is deleted (version {version})", D::NOUN);
            Ok(StatusCode::NO_CONTENT)
        }
        None => Err(AdminError::NotFound {
            noun: D::NOUN,
            name,
        }),
    }
}

/// Defines a metric, or changes it: a new version.
#[utoipa::path(put, path = "/v1/metrics/{name}", tag = "metrics",
    params(("name" = String, Path, description = "Lowercase letters, digits and `_`")),
    request_body(content = MetricDefinition, description = "A metric definition (DESIGN.md, \"Definitions\")"),
    security(("basic" = []), ("bearer" = [])),
    responses(
        (status = 201, description = "The first version of this metric", body = MetricEntry),
        (status = 200, description = "A new version, or the same definition again (no new version)", body = MetricEntry),
        (status = 400, description = "The body is not JSON", body = ErrorBody),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 422, description = "The definition is refused; `field` names what to fix", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address; retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ))]
pub async fn put_metric(
    State(state): State<AdminState>,
    headers: HeaderMap,
    DefinitionName(name): DefinitionName,
    body: Bytes,
) -> Result<(StatusCode, Json<MetricEntry>), AdminError> {
    let (status, stored) =
        put_definition::<MetricDefinition>(&state, &headers, &name, &body).await?;
    Ok((status, Json(entry(stored))))
}

/// A metric definition, current version.
#[utoipa::path(get, path = "/v1/metrics/{name}", tag = "metrics",
    params(("name" = String, Path, description = "The metric's name")),
    security(("basic" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "The definition", body = MetricEntry),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "Not a read or admin key", body = ErrorBody),
        (status = 404, description = "No metric has this name", body = ErrorBody),
        (status = 422, description = "A name that is not UTF-8", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address; retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ))]
pub async fn get_metric(
    State(state): State<AdminState>,
    headers: HeaderMap,
    DefinitionName(name): DefinitionName,
) -> Result<Json<MetricEntry>, AdminError> {
    let stored = current_definition::<MetricDefinition>(&state, &headers, name.clone()).await?;
    let processor = crate::process::metrics::processor_name(&name, stored.version);
    let positions = state
        .store
        .metric_positions(&processor, &state.events_topic)
        .await?;
    let local = state
        .runners
        .as_ref()
        .and_then(|r| r.state(&name))
        .filter(|s| s.version == stored.version);
    let watermark = positions
        .iter()
        .map(|(_, _, clock)| *clock)
        .min()
        .flatten()
        .filter(|_| !positions.is_empty());
    let progress = Progress {
        state: local.as_ref().map(|s| s.state),
        records_read: positions.iter().map(|(_, next, _)| next).sum(),
        lag: local.and_then(|s| s.lag),
        watermark: watermark.map(time),
        behind_seconds: watermark.map(|w| (crate::store::now_ms() - w).max(0) as f64 / 1000.0),
    };
    let mut answer = entry(stored);
    answer.progress = Some(progress);
    Ok(Json(answer))
}

/// Every metric definition, by name.
#[utoipa::path(get, path = "/v1/metrics", tag = "metrics",
    security(("basic" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "The definitions", body = MetricList),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "Not a read or admin key", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address; retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ))]
pub async fn list_metrics(
    State(state): State<AdminState>,
    headers: HeaderMap,
) -> Result<Json<MetricList>, AdminError> {
    let metrics = all_definitions::<MetricDefinition>(&state, &headers)
        .await?
        .into_iter()
        .map(entry)
        .collect();
    Ok(Json(MetricList { metrics }))
}

/// Which windows of a metric to read.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ValuesQuery {
    /// Only this group (a user id, a property value, `*` for a global
    /// metric).
    pub group: Option<String>,
    /// Windows ending after this time (RFC 3339).
    pub from: Option<DateTime<Utc>>,
    /// Windows starting before this time (RFC 3339).
    pub to: Option<DateTime<Utc>>,
    /// Most windows, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// One window's value.
#[derive(Debug, Serialize, ToSchema)]
pub struct WindowValue {
    pub group: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    #[schema(value_type = Object)]
    pub value: Value,
    /// Events in the window.
    pub events: i64,
    /// Closed by the watermark: the value is final.
    #[serde(rename = "final")]
    pub is_final: bool,
}

impl WindowValue {
    /// A closed window as stored.
    pub fn closed(window: StoredWindow) -> WindowValue {
        WindowValue {
            start: time(window.start_ms),
            end: time(window.end_ms),
            value: serde_json::from_str(&window.value).unwrap_or(Value::Null),
            events: window.events,
            is_final: true,
            group: window.group,
        }
    }
}

/// The open windows of a group, from what the store holds of it.
fn open_windows(
    spec: &MetricSpec,
    group: &str,
    held: OpenGroup,
) -> Result<Vec<OpenWindow>, StoreError> {
    let unreadable = |e: serde_json::Error| {
        StoreError::Corrupt(format!("a stored window state of {}: {e}", spec.name))
    };
    let states = held
        .states
        .into_iter()
        .map(|(text, clock)| Ok((serde_json::from_str(&text).map_err(unreadable)?, clock)))
        .collect::<Result<_, StoreError>>()?;
    let parts = held
        .parts
        .into_iter()
        .map(|p| {
            let span = Span {
                start: p.start_ms,
                end: p.end_ms,
            };
            let events = u64::try_from(p.events).unwrap_or(0);
            Ok((
                span,
                serde_json::from_str(&p.part).map_err(unreadable)?,
                events,
            ))
        })
        .collect::<Result<_, StoreError>>()?;
    Ok(crate::metric::open_windows(spec, group, states, parts))
}

/// A time in milliseconds since the Unix epoch.
pub(crate) fn time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// Windows of a metric's current version: the closed ones oldest first,
/// then a group's open ones.
#[derive(Debug, Serialize, ToSchema)]
pub struct WindowValues {
    pub version: i64,
    pub values: Vec<WindowValue>,
    /// Always null for now: the answer holds up to `limit` windows.
    pub next_cursor: Option<String>,
}

/// The closed windows of a metric's current version, then the open
/// windows of the group asked for (or of a global metric).
#[utoipa::path(get, path = "/v1/metrics/{name}/values", tag = "metrics",
    params(("name" = String, Path, description = "The metric's name"), ValuesQuery),
    security(("basic" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "Closed windows, oldest first, then the group's open windows", body = WindowValues),
        (status = 400, description = "A parameter that does not parse", body = ErrorBody),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "Not a read or admin key", body = ErrorBody),
        (status = 404, description = "No metric has this name", body = ErrorBody),
        (status = 422, description = "A name that is not UTF-8", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address; retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ))]
pub async fn metric_values(
    State(state): State<AdminState>,
    headers: HeaderMap,
    DefinitionName(name): DefinitionName,
    query: Result<axum::extract::Query<ValuesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<WindowValues>, AdminError> {
    authorize_request(&state.keys, &headers, Need::Read)?;
    let axum::extract::Query(query) = query.map_err(|e| AdminError::BadParameter(e.body_text()))?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(AdminError::BadParameter(
            "limit: must be between 1 and 1000".into(),
        ));
    }
    let Some(current) = state
        .store
        .definition(DefinitionKind::Metric, &name)
        .await?
    else {
        return Err(AdminError::NotFound {
            noun: MetricDefinition::NOUN,
            name,
        });
    };
    let windows = state
        .store
        .metric_windows(&WindowQuery {
            metric: &name,
            version: current.version,
            group: query.group.as_deref(),
            from_ms: query.from.map(|t| t.timestamp_millis()),
            to_ms: query.to.map(|t| t.timestamp_millis()),
            limit,
        })
        .await?;
    let mut values: Vec<WindowValue> = windows.into_iter().map(WindowValue::closed).collect();
    // Open windows of one group: the one asked for, or a global metric's.
    let spec = MetricDefinition::from_json(current.body.as_bytes())
        .and_then(|d| d.compile(&name))
        .map_err(|e| {
            StoreError::Corrupt(format!("the stored metric {name} does not compile: {e}"))
        })?;
    let group = match (&query.group, &spec.group_by) {
        (Some(group), _) => Some(group.clone()),
        (None, GroupBy::Global) => Some(GLOBAL_GROUP.to_owned()),
        (None, _) => None,
    };
    if let Some(group) = group
        && values.len() < limit as usize
    {
        let processor = crate::process::metrics::processor_name(&name, current.version);
        let held = state
            .store
            .metric_group(&processor, &state.events_topic, &group)
            .await?;
        let open = open_windows(&spec, &group, held)?;
        let (from, to) = (
            query.from.map(|t| t.timestamp_millis()),
            query.to.map(|t| t.timestamp_millis()),
        );
        values.extend(
            open.into_iter()
                .filter(|w| {
                    from.is_none_or(|f| w.window.end > f) && to.is_none_or(|t| w.window.start < t)
                })
                .take(limit as usize - values.len())
                .map(|w| WindowValue {
                    group: group.clone(),
                    start: time(w.window.start),
                    end: time(w.window.end),
                    value: w.value,
                    events: i64::try_from(w.events).unwrap_or(i64::MAX),
                    is_final: false,
                }),
        );
    }
    Ok(Json(WindowValues {
        version: current.version,
        values,
        next_cursor: None,
    }))
}

/// Deletes a metric definition (a version of its own: the history stays).
#[utoipa::path(delete, path = "/v1/metrics/{name}", tag = "metrics",
    params(("name" = String, Path, description = "The metric's name")),
    security(("basic" = []), ("bearer" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 404, description = "No metric has this name", body = ErrorBody),
        (status = 422, description = "A name that is not UTF-8", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address; retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ))]
pub async fn delete_metric(
    State(state): State<AdminState>,
    headers: HeaderMap,
    DefinitionName(name): DefinitionName,
) -> Result<StatusCode, AdminError> {
    delete_definition::<MetricDefinition>(&state, &headers, name).await
}
