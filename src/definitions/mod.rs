//! Definitions: metrics (and, later, rules, destinations and sources) are
//! data, not code (DESIGN.md, "Definitions"). This module turns a
//! definition as a user writes it (JSON through the admin API, or a
//! `[[metrics]]` table in `traitline.toml`) into a checked, compiled form,
//! or into an error naming the field to fix. Pure code, no I/O.

mod condition;
pub mod destination;
mod duration;
mod envelope;
pub mod metric;
mod reads;
pub mod rule;

pub use condition::Condition;
pub use destination::{DestinationDefinition, DestinationSpec};
pub use duration::parse_duration;
pub use envelope::{Envelope, HEAD};
pub use metric::{GroupBy, MetricDefinition, MetricSpec};
pub use reads::Reads;
pub use rule::{RuleDefinition, RuleKey, RuleSpec};

use crate::windows::Millis;

/// What every kind of definition shares: the file's tables, the admin
/// API and the store read and check them alike.
pub trait Definition: Clone + serde::Serialize + serde::de::DeserializeOwned {
    type Spec;
    /// What one is called in messages (`metric`).
    const NOUN: &'static str;
    /// Its tables in `traitline.toml` (`metrics`).
    const TABLE: &'static str;

    /// The name a file's table gives it (the API's is in the path).
    fn name(&self) -> Option<&str>;

    /// It without that name, as stored.
    fn unnamed(&self) -> Self;

    /// Checks every field and compiles it as `name`.
    fn compile(&self, name: &str) -> Result<Self::Spec, DefinitionError>;
}

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

    /// The envelope field it starts at, and the segments after it.
    pub fn split_first(&self) -> (&str, &[String]) {
        let (root, inner) = self.segments.split_first().expect("a path has a segment");
        (root, inner)
    }

    pub fn as_string(&self) -> String {
        self.segments.join(".")
    }

    /// The envelope field it starts at.
    pub fn reads(&self) -> Reads {
        Reads::of([self.segments[0].as_str()])
    }
}

/// Reads a definition from a JSON body; a field of the wrong type or an
/// unknown field is named.
pub fn from_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, DefinitionError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let reason = e.inner().to_string();
        // A missing field is reported at its parent: name the field.
        let missing = reason
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next());
        let field = match (path.as_str(), missing) {
            (".", Some(name)) => name.to_owned(),
            (_, Some(name)) => format!("{path}.{name}"),
            (".", None) => String::new(),
            _ => path,
        };
        DefinitionError::new(field, reason)
    })
}

/// A duration field in milliseconds.
fn millis(field: &str, text: &str) -> Result<Millis, DefinitionError> {
    parse_duration(text)
        .map(|d| d.as_millis() as Millis)
        .map_err(|reason| DefinitionError::new(field, reason))
}

/// Names of definitions, steps and traits: they appear in URLs, topics
/// and profiles.
fn check_name(field: &str, name: &str) -> Result<(), DefinitionError> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(DefinitionError::new(
            field,
            format!(
                "`{name}`: use lowercase letters, digits and `_`, starting with a letter (up to 100)"
            ),
        ))
    }
}
