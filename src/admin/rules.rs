//! `PUT/GET/DELETE /v1/rules/{name}` and `GET /v1/rules`: pattern rules
//! (DESIGN.md, "Pattern rules and alerts"), versioned like metrics.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::{
    AdminError, AdminState, DefinitionName, all_definitions, current_definition, delete_definition,
    put_definition,
};
use crate::definitions::RuleDefinition;
use crate::http::ErrorBody;
use crate::store::StoredDefinition;

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
