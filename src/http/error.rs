//! The JSON body of every error answer, and the one list of its codes.
//!
//! Every error a route answers is an [`ApiError`]: a status, a code from
//! [`ErrorCode`], a sentence, and the field it concerns. [`respond`] turns
//! one into the answer, with `Retry-After` where waiting helps, so every
//! API says the same thing the same way.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// The JSON body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong, for a person and for a program.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable, machine-readable code; the OpenAPI document lists them
    /// all.
    #[schema(value_type = ErrorCode)]
    pub code: &'static str,
    /// What is wrong, in a sentence.
    pub message: String,
    /// Where in the request, as a path (`batch[3].userId`), when it is one
    /// field.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "batch[3].userId")]
    pub field: Option<String>,
}

/// Every error code an answer can carry, with its status and meaning.
/// The one list: the OpenAPI document and the README show it, and a test
/// checks each stage's errors against it.
pub const CODES: &[(&str, u16, &str)] = &[
    (
        "invalid_json",
        400,
        "the body is not JSON, or not the route's JSON shape",
    ),
    (
        "invalid_gzip",
        400,
        "a body sent as gzip that does not decompress",
    ),
    (
        "invalid_parameter",
        400,
        "a query parameter that does not parse (`field` names it)",
    ),
    (
        "missing_key",
        401,
        "no API key in `Authorization` (nor `writeKey` in a Segment body)",
    ),
    (
        "unknown_key",
        401,
        "an API key Traitline does not know, or an unreadable `Authorization` header",
    ),
    (
        "wrong_key_scope",
        403,
        "a known key that may not do this (a read key sending events, a write key reading profiles)",
    ),
    ("not_found", 404, "no such profile or definition"),
    ("event_too_large", 413, "an event over `max-event-bytes`"),
    ("batch_too_large", 413, "a body over `max-batch-bytes`"),
    (
        "over_burst",
        413,
        "more events in one request than `rate-limit-burst`",
    ),
    (
        "unsupported_encoding",
        415,
        "a `Content-Encoding` other than gzip",
    ),
    (
        "missing_field",
        422,
        "a required field is absent (`field` names it)",
    ),
    (
        "invalid_type",
        422,
        "a field of the wrong JSON type (`field` names it)",
    ),
    (
        "invalid_value",
        422,
        "a field whose value breaks a rule (`field` names it)",
    ),
    (
        "rate_limited",
        429,
        "the write key is over `rate-limit-events`; retry after `Retry-After`",
    ),
    (
        "too_many_failed_authentications",
        429,
        "this address failed to authenticate more than `auth-failures-per-minute` times; retry after `Retry-After`",
    ),
    (
        "log_rejected",
        500,
        "the event log refused the events for good",
    ),
    (
        "overloaded",
        503,
        "too many requests in flight; retry after `Retry-After`",
    ),
    (
        "log_unavailable",
        503,
        "the event log cannot store the events in time; retry after `Retry-After`",
    ),
    (
        "store_unavailable",
        503,
        "the store cannot answer now; retry after `Retry-After`",
    ),
];

/// The codes as a schema: an enum, so a client generator (and
/// schemathesis) knows every value.
pub struct ErrorCode;

impl utoipa::PartialSchema for ErrorCode {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        let described: Vec<String> = CODES
            .iter()
            .map(|(code, status, what)| format!("`{code}` ({status}): {what}"))
            .collect();
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .enum_values(Some(CODES.iter().map(|(code, _, _)| *code)))
            .description(Some(format!(
                "A stable, machine-readable code:\n\n- {}",
                described.join("\n- ")
            )))
            .into()
    }
}

impl ToSchema for ErrorCode {}

/// An error a route answers with.
pub trait ApiError: std::fmt::Display {
    fn status(&self) -> StatusCode;
    /// One of [`CODES`].
    fn code(&self) -> &'static str;
    /// The field it concerns, as a path.
    fn field(&self) -> Option<String> {
        None
    }
    /// How long the client should wait before it retries, when waiting
    /// helps.
    fn retry_after(&self) -> Option<Duration> {
        (self.status() == StatusCode::SERVICE_UNAVAILABLE).then_some(RETRY_AFTER)
    }
}

/// How long a client should wait before retrying a 503.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// `Retry-After` in whole seconds, rounded up: at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

/// The answer for `error`: its status, the JSON body, and `Retry-After`
/// when it has one.
pub fn respond(error: &impl ApiError) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: error.code(),
            message: error.to_string(),
            field: error.field(),
        },
    };
    let mut response = (error.status(), Json(body)).into_response();
    if let Some(wait) = error.retry_after() {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(retry_after_secs(wait)),
        );
    }
    response
}

#[cfg(test)]
pub use tests::assert_listed;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for (code, status, _) in CODES {
            assert!(seen.insert(code), "{code} twice");
            assert!(code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
            assert!(StatusCode::from_u16(*status).is_ok());
        }
    }

    #[test]
    fn the_readme_lists_every_code() {
        let readme = include_str!("../../README.md");
        for (code, status, _) in CODES {
            assert!(
                readme.contains(&format!("| `{code}` | {status} |")),
                "README.md lists {code}"
            );
        }
    }

    /// Every stage's errors use a listed code with the listed status.
    pub fn assert_listed(error: &impl ApiError) {
        let listed = CODES
            .iter()
            .find(|(code, _, _)| *code == error.code())
            .unwrap_or_else(|| panic!("{} is not in CODES", error.code()));
        assert_eq!(listed.1, error.status().as_u16(), "{}", error.code());
    }

    #[test]
    fn auth_errors_are_listed() {
        use crate::http::AuthError;
        for error in [
            AuthError::MissingKey,
            AuthError::UnknownKey,
            AuthError::WrongScope {
                needs: crate::http::Need::Write,
            },
        ] {
            assert_listed(&error);
        }
    }
}
