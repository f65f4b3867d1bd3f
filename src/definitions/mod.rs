//! Definitions: metrics (and, later, rules, destinations and sources) are
//! data, not code (DESIGN.md, "Definitions"). This module turns a
//! definition as a user writes it (JSON through the admin API, or a
//! `[[metrics]]` table in `traitline.toml`) into a checked, compiled form,
//! or into an error naming the field to fix. Pure code, no I/O.

mod condition;
mod duration;
pub mod metric;

pub use condition::Condition;
pub use duration::parse_duration;
pub use metric::{GroupBy, MetricDefinition, MetricSpec};

/// A definition that cannot be used: which field, and why. The admin API
/// answers it as a 422 naming `field`; the running version stays.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}`: {reason}")]
pub struct DefinitionError {
    /// The field's path in the definition (`window.size`, `where`).
    pub field: String,
    pub reason: String,
}

impl DefinitionError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> DefinitionError {
        DefinitionError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// The envelope's fields by their JSON names, the roots of every path a
/// definition may name (`properties.amount`, `context.os.name`).
pub const ENVELOPE_FIELDS: &[&str] = &[
    "type",
    "event",
    "name",
    "userId",
    "anonymousId",
    "groupId",
    "previousId",
    "messageId",
    "timestamp",
    "originalTimestamp",
    "receivedAt",
    "sentAt",
    "properties",
    "traits",
    "context",
];

/// A dotted path into the envelope, checked: its root is an envelope
/// field and no segment is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath {
    segments: Vec<String>,
}

impl FieldPath {
    /// Parses `text` as the value of definition field `field`.
    pub fn parse(field: &str, text: &str) -> Result<FieldPath, DefinitionError> {
        let segments: Vec<String> = text.split('.').map(str::to_owned).collect();
        if segments.iter().any(String::is_empty) {
            return Err(DefinitionError::new(
                field,
                format!("`{text}` is not a path like `properties.amount`"),
            ));
        }
        if !ENVELOPE_FIELDS.contains(&segments[0].as_str()) {
            return Err(DefinitionError::new(
                field,
                format!(
                    "`{text}` does not start with an envelope field (one of {})",
                    ENVELOPE_FIELDS.join(", ")
                ),
            ));
        }
        Ok(FieldPath { segments })
    }

    /// The value at this path in an envelope as JSON; `None` when a part
    /// of the path is missing.
    pub fn get<'v>(&self, envelope: &'v serde_json::Value) -> Option<&'v serde_json::Value> {
        self.segments
            .iter()
            .try_fold(envelope, |value, segment| value.get(segment))
    }

    pub fn as_string(&self) -> String {
        self.segments.join(".")
    }
}
