//! The `metrics` stage: every defined metric's current version, run by
//! the [definition stage](super::definition_stage) (a new or changed
//! version reads the log's history in a backfill of its own, then joins
//! the live metrics). A version that leaves takes its computed trait out
//! of the profiles once no runner here has it.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;

use super::definition_stage::{Runners, Staged};
use super::metric_set::member;
use super::metrics::{MetricProcessor, StateBudget, processor_name};
use crate::config::Config;
use crate::definitions::{MetricDefinition, MetricSpec};
use crate::log::EventLog;
use crate::store::{DefinitionKind, Store};
use crate::supervisor::Supervisor;

pub use super::definition_stage::DefinitionState;

/// The metric runners of this process, for `/readyz` and `GET
/// /v1/metrics/{name}`.
pub type MetricRunners = Runners<MetricProcessor>;

/// Runs every defined metric's current version as one supervised stage,
/// `metrics`.
pub fn spawn(
    supervisor: &mut Supervisor,
    config: &Config,
    store: &Store,
    log: &Arc<dyn EventLog>,
) -> Result<MetricRunners, String> {
    let budget = StateBudget::new(config.metric_state_budget);
    super::definition_stage::spawn(supervisor, config, store, log, budget)
}

#[async_trait]
impl Staged for MetricProcessor {
    type Definition = MetricDefinition;
    type Context = StateBudget;
    const KIND: DefinitionKind = DefinitionKind::Metric;

    fn create(
        budget: &StateBudget,
        config: &Config,
        store: Store,
        spec: MetricSpec,
        version: i64,
    ) -> Arc<MetricProcessor> {
        member(config, store, spec, version, budget)
    }

    fn name(&self) -> &str {
        MetricProcessor::name(self)
    }

    fn counted(&self) -> u64 {
        MetricProcessor::counted(self)
    }

    fn retires(&self) -> bool {
        self.computed_trait().is_some()
    }

    /// Takes its computed trait out of the profiles (unless a current
    /// version keeps a trait of that name).
    async fn retire(&self, store: &Store, current: &[Arc<MetricProcessor>]) -> bool {
        let kept = kept_traits(current.iter().map(|m| m.computed_trait()));
        match store.remove_computed_traits(self.name(), &kept).await {
            Ok(removed) => {
                tracing::info!(
                    "metric {} version {} no longer runs: its computed trait {:?} leaves {removed} profiles",
                    self.metric(),
                    self.version(),
                    self.computed_trait().unwrap_or_default()
                );
                true
            }
            Err(e) => {
                tracing::warn!(
                    "cannot take the computed trait of metric {} version {} out of the profiles: {e}; trying again",
                    self.metric(),
                    self.version()
                );
                false
            }
        }
    }
}

/// The computed trait names of `traits`, the current metrics'.
fn kept_traits<'a>(traits: impl Iterator<Item = Option<&'a str>>) -> BTreeSet<String> {
    traits.flatten().map(str::to_owned).collect()
}

/// Deletes the working state of metric versions that no longer run (a
/// changed or deleted definition); returns how many. Their runners stop
/// within a poll of the change, long before the hourly purge comes. A
/// computed trait the stage could not take out of the profiles (it
/// restarted before the version's runner stopped) is taken out here.
pub async fn purge_superseded(store: &Store) -> Result<usize, crate::store::StoreError> {
    let definitions = store.definitions(DefinitionKind::Metric).await?;
    let current: BTreeSet<String> = definitions
        .iter()
        .map(|d| processor_name(&d.name, d.version))
        .collect();
    let specs: Vec<MetricSpec> = definitions
        .iter()
        .filter_map(|d| {
            MetricDefinition::from_json(d.body.as_bytes())
                .and_then(|m| m.compile(&d.name))
                .ok()
        })
        .collect();
    let kept = kept_traits(specs.iter().map(|s| s.computed_trait.as_deref()));
    let mut purged = 0;
    for processor in store.metric_processors().await? {
        if !current.contains(&processor) {
            store.remove_computed_traits(&processor, &kept).await?;
            store.forget_metric_processor(&processor).await?;
            purged += 1;
        }
    }
    store.purge_published_removals().await?;
    Ok(purged)
}
