//! Every way an ingest request can fail, and the one place each becomes an
//! HTTP answer.
//!
//! Client mistakes (4xx) say exactly what is wrong and where; the log being
//! unavailable (503) says when to come back. No answer carries internal
//! detail: those go to the log line.

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::http::{ApiError, AuthError};
use crate::log::AppendError;

/// Why an ingest request was not accepted. Nothing of a failed request is
/// acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The body is not JSON, or not the JSON shape of the route.
    #[error("{message}")]
    InvalidJson {
        message: String,
        field: Option<String>,
    },
    /// A required field is absent or empty.
    #[error("{field}: required{}", hint.map(|h| format!(" ({h})")).unwrap_or_default())]
    MissingField {
        field: String,
        hint: Option<&'static str>,
    },
    /// A field has the wrong JSON type.
    #[error("{field}: {message}")]
    InvalidType { field: String, message: String },
    /// A field has the right type but a value that breaks a rule.
    #[error("{field}: {message}")]
    InvalidValue { field: String, message: String },
    /// One event is larger than `max-event-bytes`.
    #[error("{}event is {size} bytes; the limit is {limit} bytes (setting max-event-bytes)", field.as_ref().map(|f| format!("{f}: ")).unwrap_or_default())]
    EventTooLarge {
        field: Option<String>,
        size: usize,
        limit: usize,
    },
    /// The request body is larger than `max-batch-bytes`.
    #[error("request body is over the limit of {limit} bytes (setting max-batch-bytes)")]
    BatchTooLarge { limit: usize },
    /// A `Content-Encoding` other than gzip or identity.
    #[error("Content-Encoding `{0}` is not supported; send gzip or no encoding")]
    UnsupportedEncoding(String),
    /// A gzip body that does not decompress.
    #[error("the gzip body cannot be decompressed: {0}")]
    InvalidGzip(String),
    /// No write key, or one that may not send events.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// Too many requests in flight: the log is slower than the clients.
    #[error("Traitline is busy storing earlier events; retry shortly")]
    Overloaded,
    /// The write key sent more events than its rate allows.
    #[error(
        "this write key sent more than its {per_second} events a second (setting rate-limit-events); retry after {}s",
        crate::http::error::retry_after_secs(*retry_after)
    )]
    RateLimited {
        per_second: u32,
        retry_after: Duration,
    },
    /// One request holds more events than a key's burst: it can never pass.
    #[error(
        "this request holds {events} events, more than the {burst} a write key may send at once (setting rate-limit-burst); send smaller batches"
    )]
    OverBurst { events: usize, burst: u32 },
    /// The log could not store the events in time.
    #[error("the event log cannot store events right now; retry shortly")]
    LogUnavailable,
    /// The log refused the events for good (a bug or a broker limit).
    #[error("the event log refused these events")]
    LogRejected,
}

impl ApiError for IngestError {
    fn status(&self) -> StatusCode {
        use IngestError::*;
        match self {
            InvalidJson { .. } | InvalidGzip(_) => StatusCode::BAD_REQUEST,
            MissingField { .. } | InvalidType { .. } | InvalidValue { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            EventTooLarge { .. } | BatchTooLarge { .. } | OverBurst { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Auth(auth) => auth.status(),
            Overloaded | LogUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            LogRejected => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        use IngestError::*;
        match self {
            InvalidJson { .. } => "invalid_json",
            MissingField { .. } => "missing_field",
            InvalidType { .. } => "invalid_type",
            InvalidValue { .. } => "invalid_value",
            EventTooLarge { .. } => "event_too_large",
            BatchTooLarge { .. } => "batch_too_large",
            UnsupportedEncoding(_) => "unsupported_encoding",
            InvalidGzip(_) => "invalid_gzip",
            Auth(auth) => auth.code(),
            Overloaded => "overloaded",
            RateLimited { .. } => "rate_limited",
            OverBurst { .. } => "over_burst",
            LogUnavailable => "log_unavailable",
            LogRejected => "log_rejected",
        }
    }

    fn field(&self) -> Option<String> {
        use IngestError::*;
        match self {
            InvalidJson { field, .. } | EventTooLarge { field, .. } => field.clone(),
            MissingField { field, .. } | InvalidType { field, .. } | InvalidValue { field, .. } => {
                Some(field.clone())
            }
            _ => None,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            IngestError::RateLimited { retry_after, .. } => Some(*retry_after),
            IngestError::Overloaded | IngestError::LogUnavailable => {
                Some(crate::http::error::RETRY_AFTER)
            }
            _ => None,
        }
    }
}

impl IngestError {
    /// Puts `prefix` before the field path (`userId` in item 3 of a batch
    /// becomes `batch[3].userId`).
    pub fn within(self, prefix: &str) -> IngestError {
        let join = |field: String| {
            if field.is_empty() {
                prefix.to_owned()
            } else if field.starts_with('[') {
                format!("{prefix}{field}")
            } else {
                format!("{prefix}.{field}")
            }
        };
        use IngestError::*;
        match self {
            InvalidJson { message, field } => InvalidJson {
                message,
                field: Some(join(field.unwrap_or_default())),
            },
            MissingField { field, hint } => MissingField {
                field: join(field),
                hint,
            },
            InvalidType { field, message } => InvalidType {
                field: join(field),
                message,
            },
            InvalidValue { field, message } => InvalidValue {
                field: join(field),
                message,
            },
            EventTooLarge { field, size, limit } => EventTooLarge {
                field: Some(join(field.unwrap_or_default())),
                size,
                limit,
            },
            other => other,
        }
    }
}

impl From<AppendError> for IngestError {
    fn from(error: AppendError) -> Self {
        if error.is_retryable() {
            tracing::warn!("answered 503: {error}");
            IngestError::LogUnavailable
        } else {
            tracing::error!("answered 500: {error}");
            IngestError::LogRejected
        }
    }
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        crate::http::error::respond(&self)
    }
}

/// Parses a whole body as `T`. The fast path tracks no field path; only
/// when it fails is the body parsed again with the path tracked, so that
/// the error can name the field. Trailing bytes after the JSON value are an
/// error.
pub fn parse_json<'de, T: serde::Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, IngestError> {
    parse_with(|| serde_json::Deserializer::from_slice(bytes))
}

/// [`parse_json`] of text already known to be UTF-8 (a batch's message),
/// which is not checked again.
pub fn parse_json_str<'de, T: serde::Deserialize<'de>>(text: &'de str) -> Result<T, IngestError> {
    parse_with(|| serde_json::Deserializer::from_str(text))
}

fn parse_with<'de, R: serde_json::de::Read<'de>, T: serde::Deserialize<'de>>(
    deserializer: impl Fn() -> serde_json::Deserializer<R>,
) -> Result<T, IngestError> {
    let mut de = deserializer();
    let parsed = T::deserialize(&mut de).and_then(|value| de.end().map(|()| value));
    parsed.or_else(|_| {
        let mut again = deserializer();
        let value = serde_path_to_error::deserialize::<_, T>(&mut again).map_err(from_serde)?;
        again.end().map_err(|e| IngestError::InvalidJson {
            message: format!(
                "the body is not valid JSON: {}",
                strip_position(&e.to_string())
            ),
            field: None,
        })?;
        Ok(value)
    })
}

/// Turns a serde error at `path` into the client's error: a syntax error is
/// 400, a well-formed body of the wrong shape 422 naming the field.
fn from_serde(error: serde_path_to_error::Error<serde_json::Error>) -> IngestError {
    let path = error.path().to_string();
    let field = if path == "." { String::new() } else { path };
    let inner = error.into_inner();
    let message = strip_position(&inner.to_string());
    use serde_json::error::Category;
    match inner.classify() {
        Category::Syntax | Category::Eof | Category::Io => IngestError::InvalidJson {
            message: format!("the body is not valid JSON: {message}"),
            field: None,
        },
        Category::Data => {
            if let Some(name) = message
                .strip_prefix("missing field `")
                .and_then(|m| m.strip_suffix('`'))
            {
                let field = if field.is_empty() {
                    name.to_owned()
                } else {
                    format!("{field}.{name}")
                };
                IngestError::MissingField { field, hint: None }
            } else if message.starts_with("invalid type") {
                if field.is_empty() {
                    IngestError::InvalidJson {
                        message: format!("the body must be a JSON object: {message}"),
                        field: None,
                    }
                } else {
                    IngestError::InvalidType { field, message }
                }
            } else {
                IngestError::InvalidValue { field, message }
            }
        }
    }
}

/// serde_json ends its messages with "at line 1 column 20", which means
/// little to a client; the field path says where.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::error::assert_listed;

    #[test]
    fn every_ingest_error_has_a_listed_code_and_status() {
        let field = || "f".to_owned();
        for error in [
            IngestError::InvalidJson {
                message: field(),
                field: None,
            },
            IngestError::MissingField {
                field: field(),
                hint: None,
            },
            IngestError::InvalidType {
                field: field(),
                message: field(),
            },
            IngestError::InvalidValue {
                field: field(),
                message: field(),
            },
            IngestError::EventTooLarge {
                field: None,
                size: 2,
                limit: 1,
            },
            IngestError::BatchTooLarge { limit: 1 },
            IngestError::UnsupportedEncoding(field()),
            IngestError::InvalidGzip(field()),
            IngestError::Auth(AuthError::MissingKey),
            IngestError::Overloaded,
            IngestError::RateLimited {
                per_second: 1,
                retry_after: Duration::from_secs(1),
            },
            IngestError::OverBurst {
                events: 2,
                burst: 1,
            },
            IngestError::LogUnavailable,
            IngestError::LogRejected,
        ] {
            assert_listed(&error);
        }
    }
}
