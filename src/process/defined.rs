//! A metric or a rule version as one kind of [`Member`], so the live
//! metrics and rules share one runner: each batch is read and parsed once
//! for all of them, and its message ids claimed once (docs/benchmarks.md,
//! "One runner for the metrics and rules").

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;

use super::definition_stage::{DefinitionState, Runners, Staged, compiled};
use super::metric_set::{Hold, Member, member};
use super::metric_stage::kept_traits;
use super::metrics::{Event, MetricProcessor, StateBudget, Step};
use super::rules::{RuleProcessor, RuleStep};
use super::{CommitError, OffsetAdvance, PartitionTime};
use crate::config::Config;
use crate::definitions::{Envelope, MetricDefinition, MetricSpec, Reads, RuleDefinition, RuleSpec};
use crate::log::EventLog;
use crate::metric::Head;
use crate::store::{DefinitionKind, Store};
use crate::supervisor::Supervisor;

/// A version of a metric or of a rule.
#[derive(Debug)]
pub enum Defined {
    Metric(Arc<MetricProcessor>),
    Rule(Arc<RuleProcessor>),
}

/// A batch's steps of one [`Defined`], of its kind.
pub enum DefinedSteps {
    Metric(Vec<Step>),
    Rule(Vec<RuleStep>),
}

impl Defined {
    /// Its processor name (`metric:{name}:{version}`, `rule:...`).
    pub fn name(&self) -> &str {
        match self {
            Defined::Metric(m) => m.name(),
            Defined::Rule(r) => r.name(),
        }
    }
}

/// Steps handed to a member of the other kind: a set makes each member's
/// steps with that member, so this is a bug.
fn mismatched() -> ! {
    unreachable!("a member's steps are made by that member, of its kind")
}

#[async_trait]
impl Member for Defined {
    type Steps = DefinedSteps;
    const RUNNER: &'static str = "definitions";
    // The metrics' name, under which migration 21 puts the rules' claims
    // of older releases too.
    const CLAIMS: &'static str = "metrics";

    fn definition(&self) -> &str {
        match self {
            Defined::Metric(m) => m.definition(),
            Defined::Rule(r) => r.definition(),
        }
    }

    fn name(&self) -> &str {
        Defined::name(self)
    }

    fn reads(&self) -> Reads {
        match self {
            Defined::Metric(m) => Member::reads(&**m),
            Defined::Rule(r) => Member::reads(&**r),
        }
    }

    fn version(&self) -> i64 {
        match self {
            Defined::Metric(m) => Member::version(&**m),
            Defined::Rule(r) => Member::version(&**r),
        }
    }

    /// With its kind: a metric and a rule may share a name.
    fn label(&self) -> String {
        let (kind, name) = (Staged::noun(self), self.definition());
        format!("{kind} {name} version {}", self.version())
    }

    fn no_steps(&self, capacity: usize) -> DefinedSteps {
        match self {
            Defined::Metric(m) => DefinedSteps::Metric(m.no_steps(capacity)),
            Defined::Rule(r) => DefinedSteps::Rule(r.no_steps(capacity)),
        }
    }

    fn step(&self, head: &Head, event: &Envelope, steps: &mut DefinedSteps) {
        match (self, steps) {
            (Defined::Metric(m), DefinedSteps::Metric(steps)) => {
                Member::step(&**m, head, event, steps);
            }
            (Defined::Rule(r), DefinedSteps::Rule(steps)) => Member::step(&**r, head, event, steps),
            _ => mismatched(),
        }
    }

    fn append(steps: &mut DefinedSteps, more: DefinedSteps) {
        match (steps, more) {
            (DefinedSteps::Metric(steps), DefinedSteps::Metric(more)) => {
                MetricProcessor::append(steps, more);
            }
            (DefinedSteps::Rule(steps), DefinedSteps::Rule(more)) => {
                RuleProcessor::append(steps, more);
            }
            _ => mismatched(),
        }
    }

    fn counts(steps: &DefinedSteps, i: usize) -> bool {
        match steps {
            DefinedSteps::Metric(steps) => MetricProcessor::counts(steps, i),
            DefinedSteps::Rule(steps) => RuleProcessor::counts(steps, i),
        }
    }

    async fn refresh(&self, topic: &str) -> Result<HashMap<i32, i64>, CommitError> {
        match self {
            Defined::Metric(m) => Member::refresh(&**m, topic).await,
            Defined::Rule(r) => Member::refresh(&**r, topic).await,
        }
    }

    async fn apply(
        &self,
        topic: &str,
        events: &[Event],
        steps: &DefinedSteps,
        retries: &[bool],
        advances: &[OffsetAdvance],
        clocks: &[PartitionTime],
        tick: bool,
        hold: Hold,
    ) -> Result<usize, CommitError> {
        match (self, steps) {
            (Defined::Metric(m), DefinedSteps::Metric(steps)) => {
                Member::apply(
                    &**m, topic, events, steps, retries, advances, clocks, tick, hold,
                )
                .await
            }
            (Defined::Rule(r), DefinedSteps::Rule(steps)) => {
                Member::apply(
                    &**r, topic, events, steps, retries, advances, clocks, tick, hold,
                )
                .await
            }
            _ => mismatched(),
        }
    }

    async fn would_hold(&self, steps: &DefinedSteps) -> bool {
        match (self, steps) {
            (Defined::Metric(m), DefinedSteps::Metric(steps)) => {
                Member::would_hold(&**m, steps).await
            }
            (Defined::Rule(r), DefinedSteps::Rule(steps)) => Member::would_hold(&**r, steps).await,
            _ => mismatched(),
        }
    }

    async fn discard(&self) {
        match self {
            Defined::Metric(m) => Member::discard(&**m).await,
            Defined::Rule(r) => Member::discard(&**r).await,
        }
    }

    async fn flush(&self) -> Result<(), CommitError> {
        match self {
            Defined::Metric(m) => Member::flush(&**m).await,
            Defined::Rule(r) => Member::flush(&**r).await,
        }
    }
}

/// A compiled metric or rule.
pub enum DefinedSpec {
    Metric(MetricSpec),
    Rule(RuleSpec),
}

/// The definitions' runners of one kind in this process, for `/readyz`
/// and the definitions' API.
#[derive(Debug, Clone)]
pub struct KindRunners {
    runners: Runners<Defined>,
    kind: DefinitionKind,
}

impl KindRunners {
    /// Every definition of the kind this process computes, by name.
    pub fn states(&self) -> BTreeMap<String, DefinitionState> {
        self.runners.states(self.kind)
    }

    /// How `name` is computed here, if it is.
    pub fn state(&self, name: &str) -> Option<DefinitionState> {
        self.runners.state(self.kind, name)
    }
}

/// The metric runners of this process.
pub type MetricRunners = KindRunners;
/// The rule runners of this process.
pub type RuleRunners = KindRunners;

/// Runs every defined metric's and rule's current version as one
/// supervised stage, `definitions`.
pub fn spawn(
    supervisor: &mut Supervisor,
    config: &Config,
    store: &Store,
    log: &Arc<dyn EventLog>,
) -> Result<(MetricRunners, RuleRunners), String> {
    let budget = StateBudget::new(config.metric_state_budget);
    let runners =
        super::definition_stage::spawn::<Defined>(supervisor, config, store, log, budget)?;
    let of = |kind| KindRunners {
        runners: runners.clone(),
        kind,
    };
    Ok((of(DefinitionKind::Metric), of(DefinitionKind::Rule)))
}

#[async_trait]
impl Staged for Defined {
    type Spec = DefinedSpec;
    type Context = StateBudget;
    type Changes = (i64, i64);

    async fn changes(store: &Store) -> Result<(i64, i64), String> {
        let changes = |kind| store.definitions_changes(kind);
        let metrics = changes(DefinitionKind::Metric).await;
        let rules = changes(DefinitionKind::Rule).await;
        Ok((
            metrics.map_err(|e| e.to_string())?,
            rules.map_err(|e| e.to_string())?,
        ))
    }

    async fn current(store: &Store) -> Result<HashMap<String, (i64, DefinedSpec)>, String> {
        let metrics = compiled::<MetricDefinition>(store, DefinitionKind::Metric).await?;
        let rules = compiled::<RuleDefinition>(store, DefinitionKind::Rule).await?;
        let metrics = metrics
            .into_iter()
            .map(|(name, (v, spec))| (key("metric", &name), (v, DefinedSpec::Metric(spec))));
        let rules = rules
            .into_iter()
            .map(|(name, (v, spec))| (key("rule", &name), (v, DefinedSpec::Rule(spec))));
        Ok(metrics.chain(rules).collect())
    }

    fn create(
        budget: &StateBudget,
        config: &Config,
        store: Store,
        spec: DefinedSpec,
        version: i64,
    ) -> Arc<Defined> {
        Arc::new(match spec {
            DefinedSpec::Metric(spec) => {
                Defined::Metric(member(config, store, spec, version, budget))
            }
            DefinedSpec::Rule(spec) => {
                Defined::Rule(Arc::new(RuleProcessor::new(store, spec, version)))
            }
        })
    }

    fn key(&self) -> String {
        key(self.noun(), self.definition())
    }

    fn kind(&self) -> DefinitionKind {
        match self {
            Defined::Metric(_) => DefinitionKind::Metric,
            Defined::Rule(_) => DefinitionKind::Rule,
        }
    }

    fn noun(&self) -> &'static str {
        match self {
            Defined::Metric(_) => "metric",
            Defined::Rule(_) => "rule",
        }
    }

    fn counted(&self) -> u64 {
        match self {
            Defined::Metric(m) => m.counted(),
            Defined::Rule(r) => r.counted(),
        }
    }

    fn retires(&self) -> bool {
        matches!(self, Defined::Metric(m) if m.computed_trait().is_some())
    }

    /// Takes a metric's computed trait out of the profiles (unless a
    /// current version keeps a trait of that name).
    async fn retire(&self, store: &Store, current: &[Arc<Defined>]) -> bool {
        let Defined::Metric(metric) = self else {
            return true;
        };
        let kept = kept_traits(current.iter().map(|d| match &**d {
            Defined::Metric(m) => m.computed_trait(),
            Defined::Rule(_) => None,
        }));
        match store.remove_computed_traits(metric.name(), &kept).await {
            Ok(removed) => {
                tracing::info!(
                    "metric {} version {} no longer runs: its computed trait {:?} leaves {removed} profiles",
                    metric.metric(),
                    metric.version(),
                    metric.computed_trait().unwrap_or_default()
                );
                true
            }
            Err(e) => {
                tracing::warn!(
                    "cannot take the computed trait of metric {} version {} out of the profiles: {e}; trying again",
                    metric.metric(),
                    metric.version()
                );
                false
            }
        }
    }
}

/// A definition's key among the stage's.
fn key(noun: &str, name: &str) -> String {
    format!("{noun} {name}")
}
