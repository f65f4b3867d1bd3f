//! Conditions: CEL expressions over the envelope by its JSON names
//! (`event == "payment" && properties.amount < 100`), compiled once per
//! definition version. A field the event lacks makes the condition false,
//! not an error: CEL reports a missing key or variable as an evaluation
//! error, which a condition reads as "does not match".

use std::sync::Arc;

use serde_json::Value;

use super::{DefinitionError, ENVELOPE_FIELDS};

mod native;

use native::{Fault, Native};

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
    /// The expression evaluated on the JSON directly, when it has the
    /// common shape ([`native`]).
    native: Option<Arc<Native>>,
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
            native: Native::compile(program.expression()).map(Arc::new),
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
        match self.native.as_ref().map(|n| n.eval(envelope)) {
            Some(Ok(matches)) => matches,
            Some(Err(Fault::Error)) => false,
            Some(Err(Fault::Ask)) | None => self.interpret(envelope),
        }
    }

    /// Whether the event matches, by CEL's interpreter.
    fn interpret(&self, envelope: &Value) -> bool {
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

    #[test]
    fn the_common_shapes_are_evaluated_natively() {
        let native = |s| Condition::compile("where", s).unwrap().native.is_some();
        assert!(native(r#"event == "payment" && properties.amount > 100"#));
        assert!(native(
            r#"!has(properties.discount) || properties.currency in ["EUR", "USD"]"#
        ));
        assert!(native("properties.vip"));
        assert!(!native(r#"userId.startsWith("u")"#));
        assert!(!native("properties.amount * 2 > 100"));
        assert!(!native(r#""a" in properties.tags"#));
    }

    mod native_agrees {
        use proptest::prelude::*;
        use serde_json::{Map, Value, json};

        use super::super::Condition;

        const FIELDS: &[&str] = &[
            "properties.a",
            "properties.b",
            "properties.a.x",
            "event",
            "context.os.name",
            "traits.plan",
        ];
        const LITERALS: &[&str] = &[
            "0",
            "1",
            "-1",
            "100",
            "5u",
            "18446744073709551615u",
            "1.5",
            "-2.0",
            "100.0",
            "\"x\"",
            "\"a\"",
            "\"\"",
            "true",
            "false",
            "null",
        ];
        const COMPARISONS: &[&str] = &["==", "!=", "<", "<=", ">", ">="];

        fn operand() -> impl Strategy<Value = String> {
            prop_oneof![
                proptest::sample::select(FIELDS).prop_map(str::to_owned),
                proptest::sample::select(LITERALS).prop_map(str::to_owned),
            ]
        }

        fn leaf() -> impl Strategy<Value = String> {
            prop_oneof![
                (operand(), proptest::sample::select(COMPARISONS), operand())
                    .prop_map(|(a, op, b)| format!("{a} {op} {b}")),
                (
                    operand(),
                    proptest::collection::vec(proptest::sample::select(LITERALS), 0..3)
                )
                    .prop_map(|(a, list)| format!("{a} in [{}]", list.join(", "))),
                proptest::sample::select(FIELDS)
                    .prop_filter("has() takes a selection", |f| f.contains('.'))
                    .prop_map(|f| format!("has({f})")),
                proptest::sample::select(FIELDS).prop_map(str::to_owned),
                Just("true".to_owned()),
                Just("false".to_owned()),
            ]
        }

        fn expression() -> impl Strategy<Value = String> {
            leaf().prop_recursive(3, 12, 2, |inner| {
                prop_oneof![
                    inner.clone().prop_map(|e| format!("!({e})")),
                    (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) && ({b})")),
                    (inner.clone(), inner).prop_map(|(a, b)| format!("({a}) || ({b})")),
                ]
            })
        }

        fn scalar() -> impl Strategy<Value = Option<Value>> {
            prop_oneof![
                Just(None),
                Just(Some(Value::Null)),
                any::<bool>().prop_map(|b| Some(json!(b))),
                (-3i64..200).prop_map(|i| Some(json!(i))),
                Just(Some(json!(u64::MAX))),
                Just(Some(json!(i64::MIN))),
                prop_oneof![Just(1.5), Just(-2.0), Just(100.0), Just(0.25)]
                    .prop_map(|f| Some(json!(f))),
                proptest::sample::select(&["x", "a", "", "pro"][..]).prop_map(|s| Some(json!(s))),
                Just(Some(json!([1, 2]))),
                Just(Some(json!({"x": 1}))),
                Just(Some(json!({"x": "a"}))),
            ]
        }

        fn event() -> impl Strategy<Value = Value> {
            (
                scalar(),
                scalar(),
                scalar(),
                scalar(),
                scalar(),
                any::<bool>(),
            )
                .prop_map(|(a, b, event, os, plan, nested)| {
                    let mut envelope = Map::new();
                    let mut properties = Map::new();
                    if let Some(a) = a {
                        properties.insert("a".into(), a);
                    }
                    if let Some(b) = b {
                        properties.insert("b".into(), b);
                    }
                    envelope.insert("properties".into(), Value::Object(properties));
                    if let Some(event) = event {
                        envelope.insert("event".into(), event);
                    }
                    if let Some(os) = os {
                        let os = if nested { json!({"name": os}) } else { os };
                        envelope.insert("context".into(), json!({"os": os}));
                    }
                    if let Some(plan) = plan {
                        envelope.insert("traits".into(), json!({"plan": plan}));
                    }
                    Value::Object(envelope)
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Any condition of the common shape on any event: the native
            /// evaluation answers as CEL's interpreter does.
            #[test]
            fn as_the_interpreter_does(source in expression(), events in proptest::collection::vec(event(), 8)) {
                let condition = Condition::compile("where", &source).unwrap();
                prop_assert!(condition.native.is_some(), "{source} is not native");
                for event in &events {
                    prop_assert_eq!(
                        condition.matches(event),
                        condition.interpret(event),
                        "{} on {}", source, event
                    );
                }
            }
        }
    }
}
