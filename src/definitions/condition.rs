//! Conditions: CEL expressions over the envelope by its JSON names
//! (`event == "payment" && properties.amount < 100`), compiled once per
//! definition version. A field the event lacks makes the condition false,
//! not an error: CEL reports a missing key or variable as an evaluation
//! error, which a condition reads as "does not match".

use std::sync::Arc;

use serde_json::Value;

use super::{DefinitionError, ENVELOPE_FIELDS};

/// A compiled condition.
#[derive(Clone)]
pub struct Condition {
    source: String,
    program: Arc<cel::Program>,
    /// The envelope fields the expression reads: only these are handed to
    /// CEL for each event.
    reads: Vec<&'static str>,
    /// CEL's standard functions, built once: building them is most of
    /// the cost of a fresh context, and each event gets one.
    env: Arc<cel::Env>,
}

impl std::fmt::Debug for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Condition").field(&self.source).finish()
    }
}

impl PartialEq for Condition {
    fn eq(&self, other: &Condition) -> bool {
        self.source == other.source
    }
}

impl Condition {
    /// Compiles `source`, the value of definition field `field`. Refused:
    /// what does not parse, and names that are not envelope fields (a typo
    /// such as `propertes.amount` would otherwise never match).
    pub fn compile(field: &str, source: &str) -> Result<Condition, DefinitionError> {
        let program = cel::Program::compile(source).map_err(|e| {
            DefinitionError::new(field, format!("not a CEL expression: {}", first_line(&e)))
        })?;
        let references = program.references();
        let mut unknown: Vec<&str> = references
            .variables()
            .into_iter()
            .filter(|v| !ENVELOPE_FIELDS.contains(v))
            .collect();
        if !unknown.is_empty() {
            unknown.sort();
            return Err(DefinitionError::new(
                field,
                format!(
                    "unknown name {}: a condition reads the envelope's fields ({})",
                    unknown
                        .iter()
                        .map(|u| format!("`{u}`"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    ENVELOPE_FIELDS.join(", ")
                ),
            ));
        }
        let reads = ENVELOPE_FIELDS
            .iter()
            .copied()
            .filter(|f| references.has_variable(f))
            .collect();
        Ok(Condition {
            source: source.to_owned(),
            program: Arc::new(program),
            reads,
            env: Arc::new(cel::Env::stdlib()),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the event (its envelope as JSON) matches.
    pub fn matches(&self, envelope: &Value) -> bool {
        let mut context = cel::Context::with_env(self.env.clone());
        for name in &self.reads {
            if let Some(value) = envelope.get(*name)
                && context.add_variable(*name, value).is_err()
            {
                return false;
            }
        }
        matches!(self.program.execute(&context), Ok(cel::Value::Bool(true)))
    }
}

fn first_line(error: &impl std::fmt::Display) -> String {
    error
        .to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn event() -> Value {
        json!({
            "type": "track", "event": "payment", "userId": "u1",
            "properties": {"amount": 150, "price": 19.99, "currency": "EUR"},
            "context": {"os": {"name": "iOS"}}
        })
    }

    #[test]
    fn a_condition_reads_the_envelope_by_its_json_names() {
        let c = |s| Condition::compile("where", s).unwrap().matches(&event());
        assert!(c(r#"event == "payment" && properties.amount > 100"#));
        assert!(c(r#"properties.amount > 100 && context.os.name == "iOS""#));
        assert!(!c("properties.amount < 100"));
        assert!(c("properties.price < 20.0"));
        assert!(c(r#"type == "track" && userId.startsWith("u")"#));
        assert!(c(r#"properties.currency in ["EUR", "USD"]"#));
    }

    #[test]
    fn a_missing_field_makes_the_condition_false() {
        let c = |s| Condition::compile("where", s).unwrap().matches(&event());
        assert!(!c("properties.discount > 0"));
        assert!(!c(r#"anonymousId == "a1""#));
        assert!(!c("traits.plan == \"pro\""));
        assert!(c(r#"!has(properties.discount)"#));
    }

    #[test]
    fn a_bad_expression_is_refused_naming_the_field() {
        let error = Condition::compile("where", "properties.amount >").unwrap_err();
        assert_eq!(error.field, "where");
        assert!(error.reason.starts_with("not a CEL expression"), "{error}");
        let typo = Condition::compile("steps[0].where", "propertes.amount > 1").unwrap_err();
        assert_eq!(typo.field, "steps[0].where");
        assert!(typo.reason.contains("`propertes`"), "{typo}");
    }
}
