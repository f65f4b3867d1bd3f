//! The query API: profiles, their changes and their events, read from the
//! store; and deletion (GDPR).
//!
//! Read keys and admin keys may read; only admin keys may delete; write
//! keys may only send events.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use crate::envelope::EventEnvelope;
use crate::http::{ApiError, AuthError, ErrorBody, Need, authorize_request};
use crate::keys::ApiKeys;
use crate::log::{EventLog, Record, Topics};
use crate::profile::ProfileView;
use crate::store::{ChangeRecord, Store};

/// Largest page a client may ask for.
const MAX_LIMIT: u32 = 1000;
const DEFAULT_LIMIT: u32 = 50;

/// What the query routes need.
#[derive(Clone)]
pub struct QueryState {
    store: Store,
    keys: Arc<ApiKeys>,
    /// Where a deletion is recorded, so every rebuild from the log
    /// deletes again.
    log: Arc<dyn EventLog>,
    events_topic: String,
}

/// Why a query was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("no profile has the id {0:?}")]
    NotFound(String),
    #[error("{field}: {message}")]
    BadParameter {
        field: &'static str,
        message: String,
    },
    #[error("the store is unavailable; try again")]
    Unavailable,
    #[error("the event log cannot record the deletion now; nothing was deleted; try again")]
    LogUnavailable,
}

impl ApiError for QueryError {
    fn status(&self) -> StatusCode {
        match self {
            QueryError::Auth(auth) => auth.status(),
            QueryError::NotFound(_) => StatusCode::NOT_FOUND,
            QueryError::BadParameter { .. } => StatusCode::BAD_REQUEST,
            QueryError::Unavailable | QueryError::LogUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            QueryError::Auth(auth) => auth.code(),
            QueryError::NotFound(_) => "not_found",
            QueryError::BadParameter { .. } => "invalid_parameter",
            QueryError::Unavailable => "store_unavailable",
            QueryError::LogUnavailable => "log_unavailable",
        }
    }

    fn field(&self) -> Option<String> {
        match self {
            QueryError::BadParameter { field, .. } => Some((*field).to_owned()),
            _ => None,
        }
    }
}

impl From<crate::store::StoreError> for QueryError {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!("a query failed: {e}");
        QueryError::Unavailable
    }
}

impl IntoResponse for QueryError {
    fn into_response(self) -> Response {
        crate::http::error::respond(&self)
    }
}

/// Paging parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Paging {
    /// Items per page, 1 to 1000 (default 50).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A query string that does not parse is a JSON 400 naming the parameter,
/// like every other error of this API (axum's own rejection is plain text).
impl<S: Send + Sync> FromRequestParts<S> for Paging {
    type Rejection = QueryError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Paging, QueryError> {
        match Query::<Paging>::from_request_parts(parts, state).await {
            Ok(Query(paging)) => Ok(paging),
            Err(rejection) => {
                let text = rejection.body_text();
                let detail = text
                    .rsplit_once("query string: ")
                    .map_or(&*text, |(_, d)| d);
                let field = ["limit", "cursor"]
                    .into_iter()
                    .find(|f| {
                        detail.starts_with(&format!("{f}:")) || detail.contains(&format!("`{f}`"))
                    })
                    .unwrap_or("query");
                Err(QueryError::BadParameter {
                    field,
                    message: format!(
                        "cannot be read ({detail}); limit is a whole number from 1 to {MAX_LIMIT}, given once"
                    ),
                })
            }
        }
    }
}

/// The `{id}` of a profile route; a path that is not UTF-8 is a JSON 400.
pub struct ProfileId(String);

impl<S: Send + Sync> FromRequestParts<S> for ProfileId {
    type Rejection = QueryError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<ProfileId, QueryError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| ProfileId(id))
            .map_err(|rejection| QueryError::BadParameter {
                field: "id",
                message: rejection.body_text(),
            })
    }
}

impl Paging {
    fn limit(&self) -> Result<u32, QueryError> {
        match self.limit {
            None => Ok(DEFAULT_LIMIT),
            Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            Some(_) => Err(QueryError::BadParameter {
                field: "limit",
                message: format!("must be between 1 and {MAX_LIMIT}"),
            }),
        }
    }

    /// The cursor, decoded and read by `read`; a cursor this API did not
    /// give is a 400 naming `cursor`.
    fn cursor<T>(&self, read: impl FnOnce(String) -> Option<T>) -> Result<Option<T>, QueryError> {
        self.cursor
            .as_deref()
            .filter(|c| !c.is_empty())
            .map(|c| {
                URL_SAFE_NO_PAD
                    .decode(c)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .and_then(read)
                    .ok_or(QueryError::BadParameter {
                        field: "cursor",
                        message: "is not a cursor this API gave".to_owned(),
                    })
            })
            .transpose()
    }
}

fn encode_cursor(text: &str) -> String {
    URL_SAFE_NO_PAD.encode(text)
}

/// A page of profiles.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProfileList {
    pub profiles: Vec<ProfileView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// A page of a profile's changes, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChangeList {
    pub changes: Vec<ChangeRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// A page of a profile's events, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventList {
    #[schema(value_type = Vec<Object>)]
    pub events: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// What a delete removed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Deleted {
    pub deleted: bool,
    /// The deleted profile's user id.
    pub user_id: Option<String>,
    /// Every id that resolved to it; later events for them start a new profile.
    pub ids: Vec<String>,
}

impl QueryState {
    pub fn new(
        store: Store,
        keys: Arc<ApiKeys>,
        log: Arc<dyn EventLog>,
        topics: &Topics,
    ) -> QueryState {
        QueryState {
            store,
            keys,
            log,
            events_topic: topics.events(),
        }
    }

    pub fn routes(self) -> Router {
        Router::new()
            .route("/v1/profiles", get(list_profiles))
            .route("/v1/profiles/{id}", get(get_profile).delete(delete_profile))
            .route("/v1/profiles/{id}/changes", get(profile_changes))
            .route("/v1/profiles/{id}/events", get(profile_events))
            .with_state(self)
    }
}

/// A profile, by user id or any linked anonymous id.
#[utoipa::path(get, path = "/v1/profiles/{id}", tag = "profiles",
    params(("id" = String, Path, description = "A user id or a linked anonymous id")),
    security(("basic" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "The profile", body = ProfileView),
        (status = 400, description = "An id that is not UTF-8", body = ErrorBody),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "Not a read or admin key", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address; retry after Retry-After", body = ErrorBody),
        (status = 404, description = "No profile has this id", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ))]
pub async fn get_profile(
    State(state): State<QueryState>,
    headers: HeaderMap,
    ProfileId(id): ProfileId,
) -> Result<Json<ProfileView>, QueryError> {
    authorize_request(&state.keys, &headers, Need::Read)?;
    state
        .store
        .profile(&id)
        .await?
        .map(Json)
        .ok_or(QueryError::NotFound(id))
}

/// Every profile, in a stable order, a page at a time.
#[utoipa::path(get, path = "/v1/profiles", tag = "profiles",
    params(Paging),
    security(("basic" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "A page of profiles", body = ProfileList),
        (status = 400, description = "A bad limit or cursor", body = ErrorBody),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "Not a read or admin key", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address; retry after Retry-After", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ))]
pub async fn list_profiles(
    State(state): State<QueryState>,
    headers: HeaderMap,
    paging: Paging,
) -> Result<Json<ProfileList>, QueryError> {
    authorize_request(&state.keys, &headers, Need::Read)?;
    let page = state
        .store
        .profiles(paging.limit()?, paging.cursor(Some)?.as_deref())
        .await?;
    Ok(Json(ProfileList {
        profiles: page.profiles,
        next_cursor: page.next.as_deref().map(encode_cursor),
    }))
}

/// A profile's change history (change data capture), newest first.
#[utoipa::path(get, path = "/v1/profiles/{id}/changes", tag = "profiles",
    params(("id" = String, Path, description = "A user id or a linked anonymous id"), Paging),
    security(("basic" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "A page of changes", body = ChangeList),
        (status = 400, description = "A bad limit or cursor", body = ErrorBody),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "Not a read or admin key", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address; retry after Retry-After", body = ErrorBody),
        (status = 404, description = "No profile has this id", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ))]
pub async fn profile_changes(
    State(state): State<QueryState>,
    headers: HeaderMap,
    ProfileId(id): ProfileId,
    paging: Paging,
) -> Result<Json<ChangeList>, QueryError> {
    authorize_request(&state.keys, &headers, Need::Read)?;
    let before = paging.cursor(|c| c.parse::<i64>().ok())?;
    let (changes, next) = state
        .store
        .changes(&id, paging.limit()?, before)
        .await?
        .ok_or(QueryError::NotFound(id))?;
    Ok(Json(ChangeList {
        changes,
        next_cursor: next.map(|n| encode_cursor(&n.to_string())),
    }))
}

/// A profile's stored events, newest first.
#[utoipa::path(get, path = "/v1/profiles/{id}/events", tag = "profiles",
    params(("id" = String, Path, description = "A user id or a linked anonymous id"), Paging),
    security(("basic" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "A page of events", body = EventList),
        (status = 400, description = "A bad limit or cursor", body = ErrorBody),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "Not a read or admin key", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address; retry after Retry-After", body = ErrorBody),
        (status = 404, description = "No profile has this id", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ))]
pub async fn profile_events(
    State(state): State<QueryState>,
    headers: HeaderMap,
    ProfileId(id): ProfileId,
    paging: Paging,
) -> Result<Json<EventList>, QueryError> {
    authorize_request(&state.keys, &headers, Need::Read)?;
    let before = paging.cursor(|c| {
        let (at, message_id) = c.split_once(':')?;
        Some((at.parse::<i64>().ok()?, message_id.to_owned()))
    })?;
    let page = state
        .store
        .events(&id, paging.limit()?, before)
        .await?
        .ok_or(QueryError::NotFound(id))?;
    Ok(Json(EventList {
        events: page.events,
        next_cursor: page
            .next
            .map(|(at, message_id)| encode_cursor(&format!("{at}:{message_id}"))),
    }))
}

/// Deletes a profile (GDPR): the profile, its change history and its
/// stored events; a tombstone is published to `user_profiles`. Later
/// events for its ids start a new profile. The deletion is recorded in
/// `user_events` first, so every rebuild from the log deletes again.
#[utoipa::path(delete, path = "/v1/profiles/{id}", tag = "profiles",
    params(("id" = String, Path, description = "A user id or a linked anonymous id")),
    security(("basic" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 400, description = "An id that is not UTF-8", body = ErrorBody),
        (status = 503, description = "The store or the event log is unavailable; nothing was deleted when the log did not record it", body = ErrorBody),
        (status = 401, description = "Missing or unknown key", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 429, description = "Too many failed authentications from this address; retry after Retry-After", body = ErrorBody),
        (status = 404, description = "No profile has this id", body = ErrorBody),
    ))]
pub async fn delete_profile(
    State(state): State<QueryState>,
    headers: HeaderMap,
    ProfileId(id): ProfileId,
) -> Result<Json<Deleted>, QueryError> {
    authorize_request(&state.keys, &headers, Need::Admin)?;
    let found = state
        .store
        .profile(&id)
        .await?
        .ok_or_else(|| QueryError::NotFound(id.clone()))?;
    // Recorded in the log first, keyed like the user's events: a replay,
    // a snapshot restore or a rebuild into a new store reaches the
    // deletion in order and deletes again. Only then is the store told.
    let mut ids: Vec<String> = found.user_id.iter().cloned().collect();
    ids.extend(found.anonymous_ids.iter().cloned());
    let at = chrono::Utc::now();
    let record = EventEnvelope::deletion(found.user_id.clone(), ids, at);
    let value = serde_json::to_vec(&record).map_err(|_| QueryError::LogUnavailable)?;
    let key = record.record_key().map(str::to_owned);
    if let Err(e) = state
        .log
        .append(&state.events_topic, vec![Record { key, value }])
        .await
    {
        tracing::warn!("cannot record the deletion of a profile in the log: {e}");
        return Err(QueryError::LogUnavailable);
    }
    let view = state
        .store
        .delete_profile(&id, at.timestamp_millis())
        .await?
        // Deleted meanwhile: the recorded deletion stands.
        .unwrap_or(found);
    tracing::info!(user_id = ?view.user_id, "deleted a profile and its history");
    let mut ids = view.anonymous_ids.clone();
    ids.extend(view.user_id.clone());
    Ok(Json(Deleted {
        deleted: true,
        user_id: view.user_id,
        ids,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::error::assert_listed;

    #[test]
    fn every_query_error_has_a_listed_code_and_status() {
        for error in [
            QueryError::Auth(AuthError::UnknownKey),
            QueryError::NotFound("x".into()),
            QueryError::BadParameter {
                field: "limit",
                message: "x".into(),
            },
            QueryError::Unavailable,
            QueryError::LogUnavailable,
        ] {
            assert_listed(&error);
        }
    }
}
