//! Pattern rule definitions, in the shape DESIGN.md fixes:
//!
//! ```json
//! {"key": "userId",
//!  "steps": [{"name": "small", "where": "event == \"payment\" && properties.amount < 100", "times": {"min": 3}},
//!            {"name": "large", "where": "event == \"payment\" && properties.amount > 1000"}],
//!  "within": "5m", "lateness": "1m"}
//! ```

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Condition, DefinitionError, FieldPath, check_name, millis};
use serde_json::Value;

use crate::patterns::{Earlier, Guard, Guarded, Input, MAX_STEPS, Pattern, Skip, Step};

/// A rule as written: JSON through the admin API, or a `[[rules]]` table
/// of `traitline.toml` (which also carries the `name`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleDefinition {
    /// In the file only; the API takes the name from the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Whose events a match is made of: `userId` (the default) or an
    /// envelope path such as `properties.card_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub steps: Vec<StepDefinition>,
    /// Longest time from a match's first event to its last (with a `not`
    /// step, how long to wait for none to come).
    #[schema(pattern = "^([0-9]+(ms|s|m|h|d|w))+$")]
    pub within: String,
    /// How late (behind the watermark) an event may come and still be
    /// taken in order; a match waits this long for stragglers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^([0-9]+(ms|s|m|h|d|w))+$")]
    pub lateness: Option<String>,
    /// After a match: `skip_past_last` (the default: partial matches that
    /// began before its last event go, so a burst makes one alert) or
    /// `skip_to_next` (only those that began with its first event go).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^(skip_past_last|skip_to_next)$")]
    pub after_match: Option<String>,
    /// Most partial matches a key holds (default 100); beyond it the
    /// oldest goes, counted in `traitline_rule_partials_dropped_total`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 10000)]
    pub max_partial_matches: Option<usize>,
}

/// One step as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StepDefinition {
    pub name: String,
    /// A CEL condition over the envelope, which may also read the
    /// events earlier steps took: `small.amount` is the list of the
    /// `amount` property of each, with `avg`, `sum`, `min`, `max` and
    /// `size` (`properties.amount > 10.0 * avg(small.amount)`).
    #[serde(rename = "where")]
    pub condition: String,
    /// How many events it takes: a number, or `{"min": N}` / `{"min": N,
    /// "max": M}` (default: once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times: Option<Times>,
    /// `relaxed` (the default: other events of the key may come between)
    /// or `strict` (its events come right after the previous one taken).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^(relaxed|strict)$")]
    pub contiguity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
    /// A final "not followed by" step: a match is its earlier steps with
    /// no event meeting this one within `within` of the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not: Option<bool>,
}

/// A step's count as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Times {
    Exactly(u32),
    Range {
        min: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max: Option<u32>,
    },
}

/// Whose events a rule matches.
#[derive(Debug, Clone, PartialEq)]
pub enum RuleKey {
    /// The user (`userId`): every event of a key is in one partition.
    User,
    /// Another envelope field or property.
    Field(FieldPath),
}

/// A checked, compiled rule.
#[derive(Debug, Clone)]
pub struct RuleSpec {
    pub name: String,
    pub key: RuleKey,
    pub pattern: Arc<Pattern>,
    /// Each step's condition (bit `i` of an event's [`Input::meets`] for
    /// step `i`), then the `not` step's.
    ///
    /// [`Input::meets`]: crate::patterns::Input::meets
    pub conditions: Vec<Condition>,
    /// The envelope fields an event keeps for the conditions that read
    /// earlier steps' events ([`Input::values`]); none when no condition
    /// does.
    ///
    /// [`Input::values`]: crate::patterns::Input::values
    pub keeps: Vec<&'static str>,
}

impl RuleSpec {
    /// The envelope fields it reads of an event, beyond what every rule
    /// reads (its type, name, ids and times).
    pub fn reads(&self) -> super::Reads {
        let key = match &self.key {
            RuleKey::Field(path) => path.reads(),
            RuleKey::User => super::Reads::NONE,
        };
        self.conditions
            .iter()
            .fold(key, |reads, c| reads.with(c.reads()))
            .with(super::Reads::of(self.keeps.iter().copied()))
    }
}

/// Answers for the steps whose conditions read earlier steps' events:
/// the condition's parts that do, with each earlier step it names bound
/// to the properties of the events that step took (`small.amount`: the
/// list of their `amount`s).
struct StepGuard {
    /// Each step's condition, then the `not` step's.
    conditions: Vec<Condition>,
    /// The positive steps' names.
    names: Vec<String>,
}

impl Guard for StepGuard {
    fn allows(&self, step: usize, taken: &[Earlier<'_>], input: &Input) -> bool {
        let Some(kept) = input.values.as_deref() else {
            return false;
        };
        let condition = &self.conditions[step];
        let bound: Vec<(&str, Value)> = condition
            .steps()
            .iter()
            .filter_map(|name| {
                let index = self.names.iter().position(|n| n == name)?;
                Some((name.as_str(), step_properties(index, taken)))
            })
            .collect();
        condition.allows(kept, &bound)
    }
}

/// `{property: [value of each event step took that has it]}`.
fn step_properties(step: usize, taken: &[Earlier<'_>]) -> Value {
    let mut lists = serde_json::Map::new();
    for t in taken.iter().filter(|t| t.step == step) {
        let properties = t.values.and_then(|v| v.get("properties"));
        if let Some(Value::Object(properties)) = properties {
            for (name, value) in properties {
                if let Value::Array(list) = lists
                    .entry(name.clone())
                    .or_insert_with(|| Value::Array(Vec::new()))
                {
                    list.push(value.clone());
                }
            }
        }
    }
    Value::Object(lists)
}

/// Partial matches a key holds unless the rule says otherwise.
const DEFAULT_MAX_PARTIALS: usize = 100;

/// Events a key holds waiting for the watermark before the earliest are
/// taken early.
const MAX_WAITING: usize = 10_000;

impl RuleDefinition {
    /// Reads a definition from a JSON body; a field of the wrong type or an
    /// unknown field is named.
    pub fn from_json(body: &[u8]) -> Result<RuleDefinition, DefinitionError> {
        super::from_json(body)
    }

    /// Checks every field and compiles the rule `name`.
    pub fn compile(&self, name: &str) -> Result<RuleSpec, DefinitionError> {
        check_name("name", name)?;
        let key = match self.key.as_deref() {
            None | Some("userId") => RuleKey::User,
            Some(path) => RuleKey::Field(FieldPath::parse("key", path)?),
        };
        if self.steps.is_empty() {
            return Err(DefinitionError::new(
                "steps",
                "a rule needs at least one step",
            ));
        }
        if self.steps.len() > MAX_STEPS {
            return Err(DefinitionError::new(
                "steps",
                format!("a rule has at most {MAX_STEPS} steps"),
            ));
        }
        let within = millis("within", &self.within)?;
        if within <= 0 {
            return Err(DefinitionError::new("within", "must be longer than zero"));
        }
        let lateness = self
            .lateness
            .as_deref()
            .map_or(Ok(0), |t| millis("lateness", t))?;
        let skip = match self.after_match.as_deref() {
            None | Some("skip_past_last") => Skip::PastLast,
            Some("skip_to_next") => Skip::ToNext,
            Some(other) => {
                return Err(DefinitionError::new(
                    "after_match",
                    format!("`{other}` is not `skip_past_last` or `skip_to_next`"),
                ));
            }
        };
        let max_partials = self.max_partial_matches.unwrap_or(DEFAULT_MAX_PARTIALS);
        if !(1..=10_000).contains(&max_partials) {
            return Err(DefinitionError::new(
                "max_partial_matches",
                format!("{max_partials} is out of range; use 1 to 10000"),
            ));
        }
        let mut steps = Vec::new();
        let mut conditions = Vec::new();
        let mut absent = None;
        for (i, step) in self.steps.iter().enumerate() {
            let field = |name: &str| format!("steps[{i}].{name}");
            check_name(&field("name"), &step.name)?;
            if self.steps[..i].iter().any(|s| s.name == step.name) {
                return Err(DefinitionError::new(
                    field("name"),
                    format!("another step is named `{}`", step.name),
                ));
            }
            let earlier: Vec<&str> = steps.iter().map(|s: &Step| s.name.as_str()).collect();
            conditions.push(Condition::compile_after(
                &field("where"),
                &step.condition,
                &earlier,
            )?);
            if step.not == Some(true) {
                if i + 1 != self.steps.len() || i == 0 {
                    return Err(DefinitionError::new(
                        field("not"),
                        "only the last step, after at least one other, may be a `not` step",
                    ));
                }
                if let Some((name, _)) = [
                    ("times", step.times.is_some()),
                    ("contiguity", step.contiguity.is_some()),
                    ("optional", step.optional.is_some()),
                ]
                .into_iter()
                .find(|(_, given)| *given)
                {
                    return Err(DefinitionError::new(
                        field(name),
                        format!("a `not` step has no `{name}`"),
                    ));
                }
                absent = Some(step.name.clone());
                continue;
            }
            let (min, max) = match step.times {
                None => (1, Some(1)),
                Some(Times::Exactly(n)) => (n, Some(n)),
                Some(Times::Range { min, max }) => (min, max),
            };
            if min == 0 {
                return Err(DefinitionError::new(
                    field("times"),
                    "a step takes at least one event (`optional: true` lets a rule go on without it)",
                ));
            }
            if max.is_some_and(|max| max < min) {
                return Err(DefinitionError::new(
                    field("times"),
                    "`max` must not be less than `min`",
                ));
            }
            let strict = match step.contiguity.as_deref() {
                None | Some("relaxed") => false,
                Some("strict") => true,
                Some(other) => {
                    return Err(DefinitionError::new(
                        field("contiguity"),
                        format!("`{other}` is not `relaxed` or `strict`"),
                    ));
                }
            };
            steps.push(Step {
                name: step.name.clone(),
                min,
                max,
                optional: step.optional == Some(true),
                strict,
            });
        }
        let last = steps.len() - 1;
        if steps[last].optional {
            return Err(DefinitionError::new(
                format!("steps[{last}].optional"),
                "the last step a match needs cannot be optional",
            ));
        }
        let guarded = conditions
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.steps().is_empty())
            .fold(0u64, |bits, (i, _)| bits | 1 << i);
        let mut keeps: Vec<&'static str> = Vec::new();
        if guarded != 0 {
            keeps.push("properties");
            keeps.extend(conditions.iter().flat_map(Condition::reads_later));
            keeps.sort_unstable();
            keeps.dedup();
        }
        let guarded = (guarded != 0).then(|| Guarded {
            steps: guarded,
            guard: Arc::new(StepGuard {
                conditions: conditions.clone(),
                names: steps.iter().map(|s| s.name.clone()).collect(),
            }),
        });
        Ok(RuleSpec {
            name: name.to_owned(),
            key,
            pattern: Arc::new(Pattern {
                steps,
                absent,
                within,
                lateness,
                skip,
                max_partials,
                max_waiting: MAX_WAITING,
                guarded,
            }),
            conditions,
            keeps,
        })
    }
}

impl super::Definition for RuleDefinition {
    type Spec = RuleSpec;
    const NOUN: &'static str = "rule";
    const TABLE: &'static str = "rules";

    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn unnamed(&self) -> Self {
        RuleDefinition {
            name: None,
            ..self.clone()
        }
    }

    fn compile(&self, name: &str) -> Result<RuleSpec, DefinitionError> {
        RuleDefinition::compile(self, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(body: &str) -> Result<RuleSpec, DefinitionError> {
        RuleDefinition::from_json(body.as_bytes())?.compile("card_testing")
    }

    fn refused(body: &str) -> (String, String) {
        let e = compile(body).unwrap_err();
        (e.field, e.reason)
    }

    #[test]
    fn the_design_example_compiles() {
        let spec = compile(
            r#"{"key": "userId",
                "steps": [{"name": "small", "where": "event == \"payment\" && properties.amount < 100", "times": {"min": 3}},
                          {"name": "large", "where": "event == \"payment\" && properties.amount > 1000"}],
                "within": "5m", "lateness": "1m"}"#,
        )
        .unwrap();
        assert_eq!(spec.key, RuleKey::User);
        let p = &spec.pattern;
        assert_eq!(
            p.steps.iter().map(|s| (s.min, s.max)).collect::<Vec<_>>(),
            vec![(3, None), (1, Some(1))]
        );
        assert_eq!(
            (p.within, p.lateness, p.skip),
            (300_000, 60_000, Skip::PastLast)
        );
        assert_eq!(spec.conditions.len(), 2);
    }

    #[test]
    fn a_not_step_ends_the_rule_and_its_condition_comes_last() {
        let spec = compile(
            r#"{"steps": [{"name": "checkout", "where": "event == \"checkout.started\""},
                          {"name": "order", "where": "event == \"order.create\"", "not": true}],
                "within": "30m", "key": "properties.cart_id", "after_match": "skip_to_next"}"#,
        )
        .unwrap();
        assert_eq!(spec.pattern.absent.as_deref(), Some("order"));
        assert_eq!(spec.pattern.steps.len(), 1);
        assert_eq!(spec.conditions[1].source(), "event == \"order.create\"");
        assert_eq!(spec.pattern.skip, Skip::ToNext);
        assert!(matches!(spec.key, RuleKey::Field(_)));
    }

    #[test]
    fn bad_rules_are_refused_naming_the_field() {
        let one = r#"{"name": "a", "where": "event == \"a\""}"#;
        let cases = [
            (r#"{"steps": [], "within": "5m"}"#.to_owned(), "steps"),
            (format!(r#"{{"steps": [{one}]}}"#), "within"),
            (format!(r#"{{"steps": [{one}], "within": "soon"}}"#), "within"),
            (format!(r#"{{"steps": [{one}], "within": "5m", "lateness": "x"}}"#), "lateness"),
            (format!(r#"{{"steps": [{one}], "within": "5m", "key": "nope.x"}}"#), "key"),
            (format!(r#"{{"steps": [{one}], "within": "5m", "after_match": "all"}}"#), "after_match"),
            (format!(r#"{{"steps": [{one}], "within": "5m", "max_partial_matches": 0}}"#), "max_partial_matches"),
            (format!(r#"{{"steps": [{one}, {one}], "within": "5m"}}"#), "steps[1].name"),
            (r#"{"steps": [{"name": "a", "where": "propertes.x > 1"}], "within": "5m"}"#.to_owned(), "steps[0].where"),
            (r#"{"steps": [{"name": "a", "where": "true", "times": 0}], "within": "5m"}"#.to_owned(), "steps[0].times"),
            (r#"{"steps": [{"name": "a", "where": "true", "times": {"min": 3, "max": 2}}], "within": "5m"}"#.to_owned(), "steps[0].times"),
            (r#"{"steps": [{"name": "a", "where": "true", "contiguity": "loose"}], "within": "5m"}"#.to_owned(), "steps[0].contiguity"),
            (r#"{"steps": [{"name": "a", "where": "true", "optional": true}], "within": "5m"}"#.to_owned(), "steps[0].optional"),
            (r#"{"steps": [{"name": "a", "where": "true", "not": true}], "within": "5m"}"#.to_owned(), "steps[0].not"),
            (format!(r#"{{"steps": [{{"name": "b", "where": "true", "not": true}}, {one}], "within": "5m"}}"#), "steps[0].not"),
            (format!(r#"{{"steps": [{one}, {{"name": "b", "where": "true", "not": true, "times": 2}}], "within": "5m"}}"#), "steps[1].times"),
            (format!(r#"{{"steps": [{one}], "within": "5m", "windows": 1}}"#), "windows"),
            // A step reads earlier steps only: not itself, not a later one.
            (r#"{"steps": [{"name": "a", "where": "size(a.x) > 1"}], "within": "5m"}"#.to_owned(), "steps[0].where"),
            (format!(r#"{{"steps": [{{"name": "b", "where": "properties.x > avg(a.x)"}}, {one}], "within": "5m"}}"#), "steps[0].where"),
        ];
        for (body, field) in cases {
            let (got, reason) = refused(&body);
            assert_eq!(got, field, "{body}: {reason}");
        }
    }

    /// A guarded step's condition on an event, after `small` took events
    /// with these amounts.
    fn allows(spec: &RuleSpec, step: usize, amounts: &[u32], event: Value) -> bool {
        let values: Vec<Value> = amounts
            .iter()
            .map(|amount| serde_json::json!({"properties": {"amount": amount}}))
            .collect();
        let taken: Vec<Earlier<'_>> = values
            .iter()
            .map(|values| Earlier {
                step: 0,
                values: Some(values),
            })
            .collect();
        let kept: serde_json::Map<String, Value> = spec
            .keeps
            .iter()
            .filter_map(|f| Some(((*f).to_owned(), event.get(*f)?.clone())))
            .collect();
        let input = Input {
            time: 100,
            id: "e".into(),
            meets: 0,
            values: Some(Arc::new(Value::Object(kept))),
        };
        let guarded = spec.pattern.guarded.as_ref().unwrap();
        assert_ne!(guarded.steps & 1 << step, 0);
        guarded.guard.allows(step, &taken, &input)
    }

    #[test]
    fn a_step_may_compare_with_the_values_earlier_steps_took() {
        let spec = compile(
            r#"{"steps": [{"name": "small", "where": "properties.amount < 100", "times": {"min": 1}},
                          {"name": "large", "where": "event == \"payment\" && properties.amount > 10.0 * avg(small.amount)"},
                          {"name": "refund", "where": "event == \"refund\" && properties.amount >= max(small.amount) && size(small.amount) > 1 && sum(small.amount) < 1000.0", "not": true}],
                "within": "5m"}"#,
        )
        .unwrap();
        assert_eq!(spec.pattern.guarded.as_ref().unwrap().steps, 0b110);
        assert_eq!(spec.keeps, vec!["properties"]);
        // The part that reads the event alone decides its bit.
        let payment =
            |amount: u32| serde_json::json!({"event": "payment", "properties": {"amount": amount}});
        assert!(spec.conditions[1].matches(&payment(1)));
        assert!(!spec.conditions[1].matches(&serde_json::json!({"event": "refund"})));
        // avg(20, 40) is 30.
        assert!(allows(&spec, 1, &[20, 40], payment(301)));
        assert!(!allows(&spec, 1, &[20, 40], payment(300)));
        // No small payment taken: no average, no match.
        assert!(!allows(&spec, 1, &[], payment(5_000)));
        let refund =
            |amount: u32| serde_json::json!({"event": "refund", "properties": {"amount": amount}});
        assert!(allows(&spec, 2, &[20, 40], refund(40)));
        assert!(!allows(&spec, 2, &[20, 40], refund(39)));
        assert!(
            !allows(&spec, 2, &[40], refund(40)),
            "size(small.amount) > 1"
        );
        assert!(
            !allows(&spec, 2, &[600, 500], refund(600)),
            "sum under 1000"
        );
    }

    #[test]
    fn a_rule_without_such_steps_keeps_nothing_of_its_events() {
        let spec =
            compile(r#"{"steps": [{"name": "a", "where": "properties.x > 1"}], "within": "5m"}"#)
                .unwrap();
        assert!(spec.pattern.guarded.is_none());
        assert!(spec.keeps.is_empty());
    }
}
