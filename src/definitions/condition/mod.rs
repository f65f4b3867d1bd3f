//! Conditions: CEL expressions over the envelope by its JSON names
//! (`event == "payment" && properties.amount < 100`), compiled once per
//! definition version. A field the event lacks makes the condition false,
//! not an error: CEL reports a missing key or variable as an evaluation
//! error, which a condition reads as "does not match".

use std::sync::Arc;

use serde_json::Value;

use super::{DefinitionError, ENVELOPE_FIELDS};

mod native;

use cel::extractors::Arguments;
use native::{Fault, Native};
pub(super) use native::{Field, Fields};

/// A compiled condition.
#[derive(Clone)]
pub struct Condition {
    source: String,
    /// What it asks of the event alone: every part must be true. A plain
    /// condition is one part; one that reads earlier steps is split at
    /// its top-level `&&`s, and these are the parts that do not.
    own: Arc<Vec<Part>>,
    /// The parts that read earlier steps' events (a rule step's
    /// condition), answered when a partial match could take the event.
    across: Arc<Vec<Part>>,
    /// The earlier steps it reads.
    steps: Vec<String>,
    /// CEL's standard functions, built once: building
    /// them is most of the cost of a fresh context, and each event gets
    /// one.
    env: Arc<cel::Env>,
}

/// A conjunct of a condition.
struct Part {
    expr: cel::IdedExpr,
    /// The envelope fields it reads: only these are handed to CEL.
    reads: Vec<&'static str>,
    /// The part compiled for evaluation on the JSON directly, when it has
    /// the common shape ([`native`]).
    native: Option<Native>,
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
        Condition::compile_after(field, source, &[])
    }

    /// Compiles a condition over records whose top-level fields are
    /// `roots` (a destination's filter reads alerts, metric windows or
    /// profile changes as well as envelopes).
    pub fn compile_over(
        field: &str,
        source: &str,
        roots: &'static [&'static str],
    ) -> Result<Condition, DefinitionError> {
        Condition::compile_with(field, source, &[], roots)
    }

    /// Compiles a rule step's condition, which may also read the events
    /// earlier steps (`steps`) took: `small.amount` is the list of the
    /// `amount` property of each, as in `properties.amount > 10.0 *
    /// avg(small.amount)`.
    pub fn compile_after(
        field: &str,
        source: &str,
        steps: &[&str],
    ) -> Result<Condition, DefinitionError> {
        Condition::compile_with(field, source, steps, ENVELOPE_FIELDS)
    }

    fn compile_with(
        field: &str,
        source: &str,
        steps: &[&str],
        roots: &'static [&'static str],
    ) -> Result<Condition, DefinitionError> {
        let program = cel::Program::compile(source).map_err(|e| {
            DefinitionError::new(field, format!("not a CEL expression: {}", first_line(&e)))
        })?;
        let references = program.references();
        let mut unknown: Vec<&str> = references
            .variables()
            .into_iter()
            .filter(|v| !roots.contains(v) && !steps.contains(v))
            .collect();
        if !unknown.is_empty() {
            unknown.sort();
            let earlier = if steps.is_empty() {
                String::new()
            } else {
                format!(", or an earlier step ({})", steps.join(", "))
            };
            return Err(DefinitionError::new(
                field,
                format!(
                    "unknown name {}: a condition reads the fields {}{earlier}",
                    unknown
                        .iter()
                        .map(|u| format!("`{u}`"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    roots.join(", ")
                ),
            ));
        }
        let read: Vec<String> = steps
            .iter()
            .filter(|s| references.has_variable(s))
            .map(|s| (*s).to_owned())
            .collect();
        let (own, across) = if read.is_empty() {
            (
                vec![Part::new(program.expression().clone(), roots)],
                Vec::new(),
            )
        } else {
            let mut conjuncts = Vec::new();
            conjuncts_of(program.expression(), &mut conjuncts);
            conjuncts
                .into_iter()
                .map(|expr| Part::new(expr, roots))
                .partition(|part| !read.iter().any(|s| part.expr.references().has_variable(s)))
        };
        Ok(Condition {
            source: source.to_owned(),
            own: Arc::new(own),
            across: Arc::new(across),
            steps: read,
            env: Arc::new(env()),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the event (its envelope as JSON) matches; for a condition
    /// that reads earlier steps, the parts that read the event alone.
    pub fn matches(&self, envelope: &Value) -> bool {
        self.own
            .iter()
            .all(|part| part.matches(&self.env, envelope, &[]))
    }

    /// [`Condition::matches`] on an event as the runners read it.
    pub fn matches_event(&self, event: &super::Envelope) -> bool {
        self.own
            .iter()
            .all(|part| part.matches_event(&self.env, event))
    }

    /// The envelope fields it reads of an event, its parts that read
    /// earlier steps' events too.
    pub fn reads(&self) -> super::Reads {
        super::Reads::of(
            self.own
                .iter()
                .chain(self.across.iter())
                .flat_map(|part| part.reads.iter().copied()),
        )
    }

    /// The earlier steps it reads.
    pub fn steps(&self) -> &[String] {
        &self.steps
    }

    /// The envelope fields the parts that read earlier steps read of the
    /// event itself: what the event keeps until a match could take it.
    pub fn reads_later(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.across
            .iter()
            .flat_map(|part| part.reads.iter().copied())
    }

    /// Whether the parts that read earlier steps hold for an event (its
    /// kept fields, `kept`) after the earlier steps' events (`steps`:
    /// each step's name and the lists it binds).
    pub fn allows(&self, kept: &Value, steps: &[(&str, Value)]) -> bool {
        self.across
            .iter()
            .all(|part| part.matches(&self.env, kept, steps))
    }
}

impl Part {
    fn new(expr: cel::IdedExpr, roots: &'static [&'static str]) -> Part {
        let references = expr.references();
        let reads = roots
            .iter()
            .copied()
            .filter(|f| references.has_variable(f))
            .collect();
        Part {
            native: Native::compile(&expr),
            reads,
            expr,
        }
    }

    fn matches(&self, env: &Arc<cel::Env>, envelope: &Value, steps: &[(&str, Value)]) -> bool {
        match self.native.as_ref().map(|n| n.eval(envelope)) {
            Some(Ok(matches)) => matches,
            Some(Err(Fault::Error)) => false,
            Some(Err(Fault::Ask)) | None => self.interpret(env, envelope, steps),
        }
    }

    /// [`Part::matches`] on an event as the runners read it: natively on
    /// its head's text, and by the interpreter on its JSON.
    fn matches_event(&self, env: &Arc<cel::Env>, event: &super::Envelope) -> bool {
        match self.native.as_ref().map(|n| n.eval(event)) {
            Some(Ok(matches)) => matches,
            Some(Err(Fault::Error)) => false,
            Some(Err(Fault::Ask)) | None => {
                let reads = super::Reads::of(self.reads.iter().copied());
                self.interpret(env, event.json(reads), &[])
            }
        }
    }

    /// Whether the event matches, by CEL's interpreter.
    fn interpret(&self, env: &Arc<cel::Env>, envelope: &Value, steps: &[(&str, Value)]) -> bool {
        let mut context = cel::Context::with_env(env.clone());
        for name in &self.reads {
            if let Some(value) = envelope.get(*name)
                && context.add_variable(*name, value).is_err()
            {
                return false;
            }
        }
        if !steps.is_empty() {
            add_aggregates(&mut context);
        }
        for (name, value) in steps {
            if context.add_variable(*name, value).is_err() {
                return false;
            }
        }
        matches!(
            cel::Value::resolve(&self.expr, &context),
            Ok(cel::Value::Bool(true))
        )
    }
}

/// The top-level conjuncts of `expr` (`a && (b && c)`: a, b, c): the
/// whole is true exactly when each is.
fn conjuncts_of(expr: &cel::IdedExpr, into: &mut Vec<cel::IdedExpr>) {
    match &expr.expr {
        cel::common::ast::Expr::Call(call)
            if call.target.is_none()
                && call.args.len() == 2
                && call.func_name == cel::common::ast::operators::LOGICAL_AND =>
        {
            conjuncts_of(&call.args[0], into);
            conjuncts_of(&call.args[1], into);
        }
        _ => into.push(expr.clone()),
    }
}

/// CEL's standard library.
fn env() -> cel::Env {
    cel::Env::stdlib()
}

/// `avg`, `sum`, `min` and `max` of a list of numbers, for earlier
/// steps' values (`size` is standard): each a double, so `10.0 *
/// avg(small.amount)` needs no conversion; an empty list (but for `sum`)
/// or one with something else is an error (the condition does not
/// hold).
fn add_aggregates(context: &mut cel::Context) {
    fn numbers(args: &[cel::Value]) -> Result<Vec<f64>, cel::ExecutionError> {
        let [cel::Value::List(items)] = args else {
            return Err(cel::ExecutionError::function_error(
                "aggregate",
                "takes one list",
            ));
        };
        items
            .iter()
            .map(|item| match item {
                cel::Value::Int(i) => Ok(*i as f64),
                cel::Value::UInt(u) => Ok(*u as f64),
                cel::Value::Float(f) => Ok(*f),
                other => Err(cel::ExecutionError::function_error(
                    "aggregate",
                    format!("{other:?} is not a number"),
                )),
            })
            .collect()
    }
    let sum = |Arguments(args): Arguments| -> Result<cel::Value, cel::ExecutionError> {
        Ok(cel::Value::Float(numbers(&args)?.iter().sum()))
    };
    let avg = |Arguments(args): Arguments| -> Result<cel::Value, cel::ExecutionError> {
        let values = numbers(&args)?;
        if values.is_empty() {
            return Err(cel::ExecutionError::function_error("avg", "of no values"));
        }
        Ok(cel::Value::Float(
            values.iter().sum::<f64>() / values.len() as f64,
        ))
    };
    let extreme = |pick: fn(f64, f64) -> f64| {
        move |Arguments(args): Arguments| -> Result<cel::Value, cel::ExecutionError> {
            numbers(&args)?
                .into_iter()
                .reduce(pick)
                .map(cel::Value::Float)
                .ok_or_else(|| cel::ExecutionError::function_error("aggregate", "of no values"))
        }
    };
    // None of these names is in CEL's standard library, so none clashes.
    let _ = context.add_function("sum", sum);
    let _ = context.add_function("avg", avg);
    let _ = context.add_function("min", extreme(f64::min));
    let _ = context.add_function("max", extreme(f64::max));
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
        let native = |s| {
            Condition::compile("where", s).unwrap().own[0]
                .native
                .is_some()
        };
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
                let part = &condition.own[0];
                prop_assert!(part.native.is_some(), "{source} is not native");
                for event in &events {
                    prop_assert_eq!(
                        condition.matches(event),
                        part.interpret(&condition.env, event, &[]),
                        "{} on {}", source, event
                    );
                }
            }
        }
    }
}
