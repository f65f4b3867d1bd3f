//! Metric definitions, in the shape DESIGN.md fixes:
//!
//! ```json
//! {"event": "order.create", "type": "track", "where": "properties.amount > 100",
//!  "group_by": "userId", "aggregate": "count",
//!  "window": {"kind": "tumbling", "size": "1h"}, "lateness": "5m"}
//! ```

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Condition, DefinitionError, FieldPath, check_name, millis};
use crate::envelope::EventType;
use crate::windows::{Aggregate, CalendarUnit, Millis, WindowKind};

/// A metric as written: JSON through the admin API, or a `[[metrics]]`
/// table of `traitline.toml` (which also carries the `name`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricDefinition {
    /// In the file only; the API takes the name from the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, rename = "where", skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_by: Option<String>,
    #[schema(pattern = "^(count|sum|avg|min|max|distinct|most_frequent|first|last|unique)$")]
    pub aggregate: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub window: WindowDefinition,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^([0-9]+(ms|s|m|h|d|w))+$")]
    pub lateness: Option<String>,
    #[serde(default, rename = "trait", skip_serializing_if = "Option::is_none")]
    pub computed_trait: Option<String>,
}

/// A window as written; which fields apply depends on `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WindowDefinition {
    #[schema(pattern = "^(tumbling|hopping|session|calendar|trailing)$")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^([0-9]+(ms|s|m|h|d|w))+$")]
    pub size: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^([0-9]+(ms|s|m|h|d|w))+$")]
    pub slide: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^([0-9]+(ms|s|m|h|d|w))+$")]
    pub gap: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^([0-9]+(ms|s|m|h|d|w))+$")]
    pub max: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^(day|week|month)$")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Trailing windows: how often the window moves [default: a thirtieth
    /// of its size].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^([0-9]+(ms|s|m|h|d|w))+$")]
    pub step: Option<String>,
}

/// What a metric groups by.
#[derive(Debug, Clone, PartialEq)]
pub enum GroupBy {
    /// One value for all events.
    Global,
    /// The user (`userId`): every event of a group is in one partition.
    User,
    /// Another envelope field or property: groups span partitions, so a
    /// window is final only when every partition has passed it.
    Field(FieldPath),
}

/// A checked, compiled metric definition.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricSpec {
    pub name: String,
    pub event: Option<String>,
    pub kind: Option<EventType>,
    pub condition: Option<Condition>,
    pub group_by: GroupBy,
    pub aggregate: Aggregate,
    pub field: Option<FieldPath>,
    pub window: WindowKind,
    pub lateness: Millis,
    pub computed_trait: Option<String>,
}

impl MetricSpec {
    /// The envelope fields it reads of an event, beyond what every
    /// metric reads (its type, name, ids and times).
    pub fn reads(&self) -> super::Reads {
        let group = match &self.group_by {
            GroupBy::Field(path) => path.reads(),
            GroupBy::Global | GroupBy::User => super::Reads::NONE,
        };
        self.condition
            .as_ref()
            .map_or(super::Reads::NONE, Condition::reads)
            .with(group)
            .with(
                self.field
                    .as_ref()
                    .map_or(super::Reads::NONE, FieldPath::reads),
            )
    }
}

/// The default allowed lateness.
const DEFAULT_LATENESS_MS: Millis = 0;

impl MetricDefinition {
    /// Reads a definition from a JSON body; a field of the wrong type or an
    /// unknown field is named.
    pub fn from_json(body: &[u8]) -> Result<MetricDefinition, DefinitionError> {
        super::from_json(body)
    }

    /// Checks every field and compiles the metric `name`.
    pub fn compile(&self, name: &str) -> Result<MetricSpec, DefinitionError> {
        check_name("name", name)?;
        let kind = match self.kind.as_deref() {
            None => None,
            Some(text) => Some(
                serde_json::from_value::<EventType>(Value::String(text.to_owned()))
                    .ok()
                    .filter(|k| k.is_segment_call())
                    .ok_or_else(|| {
                        DefinitionError::new(
                            "type",
                            format!(
                                "`{text}` is not an event type (track, identify, page, screen, group or alias)"
                            ),
                        )
                    })?,
            ),
        };
        if let Some(event) = &self.event
            && event.trim().is_empty()
        {
            return Err(DefinitionError::new("event", "must not be empty"));
        }
        let condition = self
            .condition
            .as_deref()
            .map(|source| Condition::compile("where", source))
            .transpose()?;
        let group_by = match self.group_by.as_deref() {
            None => GroupBy::Global,
            Some("userId") => GroupBy::User,
            Some(path) => GroupBy::Field(FieldPath::parse("group_by", path)?),
        };
        let aggregate: Aggregate =
            serde_json::from_value(Value::String(self.aggregate.clone())).map_err(|_| {
                DefinitionError::new(
                    "aggregate",
                    format!(
                        "`{}` is not an aggregate (count, sum, avg, min, max, distinct, most_frequent, first, last, unique)",
                        self.aggregate
                    ),
                )
            })?;
        let field = match (&self.field, aggregate.needs_field()) {
            (Some(path), _) => Some(FieldPath::parse("field", path)?),
            (None, true) => {
                return Err(DefinitionError::new(
                    "field",
                    format!(
                        "`{}` needs the field it reads, like \"properties.amount\"",
                        self.aggregate
                    ),
                ));
            }
            (None, false) => None,
        };
        let window = self.window.compile()?;
        let lateness = self
            .lateness
            .as_deref()
            .map_or(Ok(DEFAULT_LATENESS_MS), |t| millis("lateness", t))?;
        // Sessions and trailing windows follow one user's activity; across
        // partitions their spans would not line up.
        if matches!(
            window,
            WindowKind::Session { .. } | WindowKind::Trailing { .. }
        ) && group_by != GroupBy::User
        {
            return Err(DefinitionError::new(
                "group_by",
                format!(
                    "a {} window needs a per-user metric (`group_by`: \"userId\")",
                    self.window.kind
                ),
            ));
        }
        if let Some(name) = &self.computed_trait {
            check_name("trait", name)?;
            if group_by != GroupBy::User {
                return Err(DefinitionError::new(
                    "trait",
                    "a computed trait needs a per-user metric (`group_by`: \"userId\")",
                ));
            }
        }
        Ok(MetricSpec {
            name: name.to_owned(),
            event: self.event.clone(),
            kind,
            condition,
            group_by,
            aggregate,
            field,
            window,
            lateness,
            computed_trait: self.computed_trait.clone(),
        })
    }
}

impl WindowDefinition {
    fn compile(&self) -> Result<WindowKind, DefinitionError> {
        // The fields each kind takes; any other given is refused by name.
        let allowed: &[&str] = match self.kind.as_str() {
            "tumbling" => &["size"],
            "hopping" => &["size", "slide"],
            "session" => &["gap", "max"],
            "calendar" => &["unit", "timezone"],
            "trailing" => &["size", "step"],
            other => {
                return Err(DefinitionError::new(
                    "window.kind",
                    format!(
                        "`{other}` is not a window kind (tumbling, hopping, session, calendar or trailing)"
                    ),
                ));
            }
        };
        let given = [
            ("size", &self.size),
            ("slide", &self.slide),
            ("gap", &self.gap),
            ("max", &self.max),
            ("unit", &self.unit),
            ("timezone", &self.timezone),
            ("step", &self.step),
        ];
        if let Some((name, _)) = given
            .iter()
            .find(|(name, value)| value.is_some() && !allowed.contains(name))
        {
            return Err(DefinitionError::new(
                format!("window.{name}"),
                format!("a {} window has no `{name}`", self.kind),
            ));
        }
        let optional = |name: &'static str, value: &Option<String>| {
            value
                .as_deref()
                .map(|t| millis(&format!("window.{name}"), t))
                .transpose()
        };
        let required = |name: &'static str, value: &Option<String>| {
            optional(name, value)?.ok_or_else(|| {
                DefinitionError::new(
                    format!("window.{name}"),
                    format!("a {} window needs `{name}`", self.kind),
                )
            })
        };
        let kind = match self.kind.as_str() {
            "tumbling" => WindowKind::Tumbling {
                size: required("size", &self.size)?,
            },
            "hopping" => WindowKind::Hopping {
                size: required("size", &self.size)?,
                slide: required("slide", &self.slide)?,
            },
            "session" => WindowKind::Session {
                gap: required("gap", &self.gap)?,
                max: optional("max", &self.max)?,
            },
            "calendar" => WindowKind::Calendar {
                unit: match self.unit.as_deref() {
                    Some("day") => CalendarUnit::Day,
                    Some("week") => CalendarUnit::Week,
                    Some("month") => CalendarUnit::Month,
                    other => {
                        let given = other.map_or("nothing".into(), |u| format!("`{u}`"));
                        return Err(DefinitionError::new(
                            "window.unit",
                            format!(
                                "a calendar window needs `unit` day, week or month, not {given}"
                            ),
                        ));
                    }
                },
                zone: match self.timezone.as_deref() {
                    None => chrono_tz::UTC,
                    Some(name) => name.parse().map_err(|_| {
                        DefinitionError::new(
                            "window.timezone",
                            format!("`{name}` is not an IANA time zone like \"Europe/Berlin\""),
                        )
                    })?,
                },
            },
            _ => {
                let size = required("size", &self.size)?;
                let step = optional("step", &self.step)?
                    .unwrap_or_else(|| WindowKind::trailing_step(size));
                WindowKind::Trailing { size, step }
            }
        };
        kind.validate().map_err(|e| {
            let field = match e {
                crate::windows::WindowError::NotPositive(name)
                | crate::windows::WindowError::NotAMultiple(name) => format!("window.{name}"),
                crate::windows::WindowError::SlideLongerThanSize => "window.slide".into(),
                crate::windows::WindowError::MaxShorterThanGap => "window.max".into(),
            };
            DefinitionError::new(field, e.to_string())
        })?;
        Ok(kind)
    }
}

impl super::Definition for MetricDefinition {
    type Spec = MetricSpec;
    const NOUN: &'static str = "metric";
    const TABLE: &'static str = "metrics";

    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn unnamed(&self) -> Self {
        MetricDefinition {
            name: None,
            ..self.clone()
        }
    }

    fn compile(&self, name: &str) -> Result<MetricSpec, DefinitionError> {
        MetricDefinition::compile(self, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(body: &str) -> Result<MetricSpec, DefinitionError> {
        MetricDefinition::from_json(body.as_bytes())?.compile("orders_hourly")
    }

    fn field_of(body: &str) -> String {
        compile(body).unwrap_err().field
    }

    #[test]
    fn the_design_example_compiles() {
        let spec = compile(
            r#"{"event": "order.create", "type": "track",
                "where": "properties.amount > 100",
                "group_by": "userId", "aggregate": "count",
                "window": {"kind": "tumbling", "size": "1h"},
                "lateness": "5m"}"#,
        )
        .unwrap();
        assert_eq!(spec.kind, Some(EventType::Track));
        assert_eq!(spec.group_by, GroupBy::User);
        assert_eq!(spec.aggregate, Aggregate::Count);
        assert_eq!(spec.window, WindowKind::Tumbling { size: 3_600_000 });
        assert_eq!(spec.lateness, 300_000);
        assert_eq!(spec.condition.unwrap().source(), "properties.amount > 100");
    }

    #[test]
    fn every_window_kind_compiles() {
        let window = |w: &str| {
            compile(&format!(
                r#"{{"aggregate": "avg", "field": "properties.price", "group_by": "userId", "window": {w}}}"#
            ))
            .map(|s| s.window)
        };
        assert_eq!(
            window(r#"{"kind": "hopping", "size": "10m", "slide": "5m"}"#),
            Ok(WindowKind::Hopping {
                size: 600_000,
                slide: 300_000
            })
        );
        assert_eq!(
            window(r#"{"kind": "session", "gap": "30m", "max": "4h"}"#),
            Ok(WindowKind::Session {
                gap: 1_800_000,
                max: Some(14_400_000)
            })
        );
        assert_eq!(
            window(r#"{"kind": "calendar", "unit": "day", "timezone": "Europe/Berlin"}"#),
            Ok(WindowKind::Calendar {
                unit: CalendarUnit::Day,
                zone: chrono_tz::Europe::Berlin
            })
        );
        assert_eq!(
            window(r#"{"kind": "trailing", "size": "30d"}"#),
            Ok(WindowKind::Trailing {
                size: 2_592_000_000,
                step: 86_400_000
            })
        );
    }

    #[test]
    fn a_bad_definition_names_the_field() {
        let cases = [
            (r#"{"aggregate": "count"}"#, "window"),
            (
                r#"{"aggregate": "count", "window": {"kind": "tumbling"}, "extra": 1}"#,
                "extra",
            ),
            (
                r#"{"aggregate": "count", "window": {"kind": "tumbling", "size": 5}}"#,
                "window.size",
            ),
            (
                r#"{"aggregate": "count", "window": {"kind": "tumbling"}}"#,
                "window.size",
            ),
            (
                r#"{"aggregate": "count", "window": {"kind": "tumbling", "size": "1x"}}"#,
                "window.size",
            ),
            (
                r#"{"aggregate": "count", "window": {"kind": "tumbling", "size": "0s"}}"#,
                "window.size",
            ),
            (
                r#"{"aggregate": "count", "window": {"kind": "tumbling", "size": "1h", "gap": "1m"}}"#,
                "window.gap",
            ),
            (
                r#"{"aggregate": "count", "window": {"kind": "hopping", "size": "1m", "slide": "5m"}}"#,
                "window.slide",
            ),
            (
                r#"{"aggregate": "count", "group_by": "userId", "window": {"kind": "session", "gap": "5m", "max": "1m"}}"#,
                "window.max",
            ),
            (
                r#"{"aggregate": "count", "window": {"kind": "session", "gap": "5m"}}"#,
                "group_by",
            ),
            (
                r#"{"aggregate": "count", "group_by": "properties.country", "window": {"kind": "trailing", "size": "30d"}}"#,
                "group_by",
            ),
            (
                r#"{"aggregate": "count", "window": {"kind": "calendar", "unit": "year"}}"#,
                "window.unit",
            ),
            (
                r#"{"aggregate": "count", "window": {"kind": "calendar", "unit": "day", "timezone": "Mars/Olympus"}}"#,
                "window.timezone",
            ),
            (
                r#"{"aggregate": "count", "window": {"kind": "sliding", "size": "1h"}}"#,
                "window.kind",
            ),
            (
                r#"{"aggregate": "median", "window": {"kind": "tumbling", "size": "1h"}}"#,
                "aggregate",
            ),
            (
                r#"{"aggregate": "sum", "window": {"kind": "tumbling", "size": "1h"}}"#,
                "field",
            ),
            (
                r#"{"aggregate": "sum", "field": "amount", "window": {"kind": "tumbling", "size": "1h"}}"#,
                "field",
            ),
            (
                r#"{"aggregate": "count", "type": "purchase", "window": {"kind": "tumbling", "size": "1h"}}"#,
                "type",
            ),
            (
                r#"{"aggregate": "count", "where": "properties.amount >", "window": {"kind": "tumbling", "size": "1h"}}"#,
                "where",
            ),
            (
                r#"{"aggregate": "count", "group_by": "properties..x", "window": {"kind": "tumbling", "size": "1h"}}"#,
                "group_by",
            ),
            (
                r#"{"aggregate": "count", "lateness": "soon", "window": {"kind": "tumbling", "size": "1h"}}"#,
                "lateness",
            ),
            (
                r#"{"aggregate": "count", "trait": "orders_1h", "window": {"kind": "tumbling", "size": "1h"}}"#,
                "trait",
            ),
            (
                r#"{"aggregate": "count", "group_by": "userId", "trait": "Orders", "window": {"kind": "tumbling", "size": "1h"}}"#,
                "trait",
            ),
        ];
        for (body, field) in cases {
            assert_eq!(field_of(body), field, "{body}");
        }
        let bad_name = MetricDefinition::from_json(
            br#"{"aggregate": "count", "window": {"kind": "tumbling", "size": "1h"}}"#,
        )
        .unwrap()
        .compile("Orders Hourly")
        .unwrap_err();
        assert_eq!(bad_name.field, "name");
    }

    #[test]
    fn a_definition_reads_back_as_written() {
        let body = r#"{"event":"order.create","group_by":"properties.country","aggregate":"sum","field":"properties.amount","window":{"kind":"calendar","unit":"day","timezone":"Europe/Berlin"},"lateness":"1h"}"#;
        let definition = MetricDefinition::from_json(body.as_bytes()).unwrap();
        assert_eq!(serde_json::to_string(&definition).unwrap(), body);
        let from_toml: MetricDefinition = toml::from_str(
            r#"
            name = "revenue_daily"
            event = "order.create"
            group_by = "properties.country"
            aggregate = "sum"
            field = "properties.amount"
            lateness = "1h"
            window = { kind = "calendar", unit = "day", timezone = "Europe/Berlin" }
            "#,
        )
        .unwrap();
        assert_eq!(from_toml.name.as_deref(), Some("revenue_daily"));
        assert_eq!(
            from_toml.compile("revenue_daily").unwrap(),
            definition.compile("revenue_daily").unwrap()
        );
    }
}
