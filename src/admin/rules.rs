//! `PUT/GET/DELETE /v1/rules/{name}` and `GET /v1/rules`: pattern rules
//! (DESIGN.md, "Pattern rules and alerts"), versioned like metrics; and
//! the alerts they make, `GET /v1/alerts` and `GET
//! /v1/profiles/{id}/alerts`, newest first.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::{
    AdminError, AdminState, DefinitionName, all_definitions, current_definition, delete_definition,
    put_definition,
};
use crate::definitions::RuleDefinition;
use crate::http::{ErrorBody, Need, authorize_request};
use crate::store::{AlertQuery, StoredAlert, StoredDefinition};

/// A rule definition as stored: its name, version and body.
#[derive(Debug, Serialize, ToSchema)]
pub struct RuleEntry {
    pub name: String,
    /// 1 for the first definition of a name; every change adds one.
    pub version: i64,
    /// When this version was stored.
    pub changed_at: DateTime<Utc>,
    /// The definition as accepted (DESIGN.md, "Definitions").
    #[schema(value_type = RuleDefinition)]
    pub definition: Value,
}

/// Every rule definition.
#[derive(Debug, Serialize, ToSchema)]
pub struct RuleList {
    pub rules: Vec<RuleEntry>,
}

fn entry(stored: StoredDefinition) -> RuleEntry {
    RuleEntry {
        definition: serde_json::from_str(&stored.body).unwrap_or(Value::Null),
        changed_at: DateTime::from_timestamp_millis(stored.changed_at).unwrap_or_default(),
        name: stored.name,
        version: stored.version,
    }
}

/// Defines a rule, or changes it: a new version, whose partial matches
/// start afresh.
#[utoipa::path(put, path = "/v1/rules/{name}", tag = "rules",
    params(("name" = String, Path, description = "Lowercase letters, digits and `_`")),
    request_body(content = RuleDefinition, description = "A rule definition (DESIGN.md, \"Definitions\")"),
    security(("basic" = []), ("bearer" = [])),
    responses(
        (status = 201, description = "The first version of this rule", body = RuleEntry),
        (status = 200, description = "A new version, or the same definition again (no new version)", body = RuleEntry),
        (status = 400, description = "The body is not JSON", body = ErrorBody),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 422, description = "The definition is refused; `field` names what to fix", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address; retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ))]
pub async fn put_rule(
    State(state): State<AdminState>,
    headers: HeaderMap,
    DefinitionName(name): DefinitionName,
    body: Bytes,
) -> Result<(StatusCode, Json<RuleEntry>), AdminError> {
    let (status, stored) = put_definition::<RuleDefinition>(&state, &headers, &name, &body).await?;
    Ok((status, Json(entry(stored))))
}

/// A rule definition, current version.
#[utoipa::path(get, path = "/v1/rules/{name}", tag = "rules",
    params(("name" = String, Path, description = "The rule's name")),
    security(("basic" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "The definition", body = RuleEntry),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "Not a read or admin key", body = ErrorBody),
        (status = 404, description = "No rule has this name", body = ErrorBody),
        (status = 422, description = "A name that is not UTF-8", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address; retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ))]
pub async fn get_rule(
    State(state): State<AdminState>,
    headers: HeaderMap,
    DefinitionName(name): DefinitionName,
) -> Result<Json<RuleEntry>, AdminError> {
    let stored = current_definition::<RuleDefinition>(&state, &headers, name).await?;
    Ok(Json(entry(stored)))
}

/// Every rule definition, by name.
#[utoipa::path(get, path = "/v1/rules", tag = "rules",
    security(("basic" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "The definitions", body = RuleList),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "Not a read or admin key", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address; retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ))]
pub async fn list_rules(
    State(state): State<AdminState>,
    headers: HeaderMap,
) -> Result<Json<RuleList>, AdminError> {
    let rules = all_definitions::<RuleDefinition>(&state, &headers)
        .await?
        .into_iter()
        .map(entry)
        .collect();
    Ok(Json(RuleList { rules }))
}

/// Deletes a rule definition (a version of its own: the history and the
/// alerts it made stay).
#[utoipa::path(delete, path = "/v1/rules/{name}", tag = "rules",
    params(("name" = String, Path, description = "The rule's name")),
    security(("basic" = []), ("bearer" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 404, description = "No rule has this name", body = ErrorBody),
        (status = 422, description = "A name that is not UTF-8", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address; retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ))]
pub async fn delete_rule(
    State(state): State<AdminState>,
    headers: HeaderMap,
    DefinitionName(name): DefinitionName,
) -> Result<StatusCode, AdminError> {
    delete_definition::<RuleDefinition>(&state, &headers, name).await
}

/// An alert as `user_alerts` and the API show it: the stored record
/// with its id.
pub fn alert_view(alert: &StoredAlert) -> Value {
    let mut view: Value = serde_json::from_str(&alert.body).unwrap_or_else(|_| json!({}));
    if let Some(fields) = view.as_object_mut() {
        fields.insert("id".to_owned(), Value::String(alert.id.clone()));
    }
    view
}

/// Which alerts to list, newest first.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AlertsQuery {
    /// Only this rule's.
    pub rule: Option<String>,
    /// Only this key's (a user id for a rule keyed by user).
    pub key: Option<String>,
    /// Alerts completed at or after this time (RFC 3339).
    pub from: Option<DateTime<Utc>>,
    /// Most alerts, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the page before.
    pub cursor: Option<String>,
}

/// A page of alerts, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct AlertList {
    /// Each: `id`, `rule`, `version`, `key`, `message_ids`, `first`,
    /// `last`, `at`, and `steps` (each step's events).
    #[schema(value_type = Vec<Object>)]
    pub alerts: Vec<Value>,
    /// Pass as `cursor` for the next page; `null` on the last.
    pub next_cursor: Option<String>,
}

/// The alerts pattern rules made, newest first.
#[utoipa::path(get, path = "/v1/alerts", tag = "rules",
    params(AlertsQuery),
    security(("basic" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "A page of alerts", body = AlertList),
        (status = 400, description = "A parameter is not valid", body = ErrorBody),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "Not a read or admin key", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address; retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ))]
pub async fn list_alerts(
    State(state): State<AdminState>,
    headers: HeaderMap,
    query: Result<Query<AlertsQuery>, QueryRejection>,
) -> Result<Json<AlertList>, AdminError> {
    authorize_request(&state.keys, &headers, Need::Read)?;
    let Query(query) = query.map_err(|e| AdminError::BadParameter(e.body_text()))?;
    page(&state, &query, query.key.as_deref()).await
}

/// The alerts of one profile (rules keyed by user), newest first.
#[utoipa::path(get, path = "/v1/profiles/{id}/alerts", tag = "rules",
    params(("id" = String, Path, description = "The user id"), AlertsQuery),
    security(("basic" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "A page of the user's alerts", body = AlertList),
        (status = 400, description = "A parameter is not valid", body = ErrorBody),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "Not a read or admin key", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address; retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ))]
pub async fn profile_alerts(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    query: Result<Query<AlertsQuery>, QueryRejection>,
) -> Result<Json<AlertList>, AdminError> {
    authorize_request(&state.keys, &headers, Need::Read)?;
    let Query(query) = query.map_err(|e| AdminError::BadParameter(e.body_text()))?;
    page(&state, &query, Some(&id)).await
}

/// One page of alerts of `key` (any, for `None`).
async fn page(
    state: &AdminState,
    query: &AlertsQuery,
    key: Option<&str>,
) -> Result<Json<AlertList>, AdminError> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(AdminError::BadParameter(
            "limit: must be between 1 and 1000".into(),
        ));
    }
    let before = match query.cursor.as_deref() {
        None => None,
        Some(cursor) => Some(
            cursor
                .split_once('.')
                .and_then(|(at, id)| Some((at.parse::<i64>().ok()?, id)))
                .ok_or_else(|| {
                    AdminError::BadParameter("cursor: not a cursor this API gave".into())
                })?,
        ),
    };
    let alerts = state
        .store
        .alerts(&AlertQuery {
            rule: query.rule.as_deref(),
            key,
            from: query.from.map(|t| t.timestamp_millis()),
            before,
            limit,
        })
        .await?;
    let next_cursor = (alerts.len() == limit as usize)
        .then(|| alerts.last().map(|a| format!("{}.{}", a.at, a.id)))
        .flatten();
    Ok(Json(AlertList {
        alerts: alerts.iter().map(alert_view).collect(),
        next_cursor,
    }))
}
