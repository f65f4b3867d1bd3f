//! What the metrics need beside the [definition
//! stage](super::definition_stage), which runs them with the rules: the
//! purge of superseded versions, whose computed traits leave the
//! profiles.

use std::collections::BTreeSet;

use super::metrics::processor_name;
use crate::definitions::{MetricDefinition, MetricSpec};
use crate::store::{DefinitionKind, Store};

pub use super::definition_stage::DefinitionState;

/// The computed trait names of `traits`, the current metrics'.
pub(super) fn kept_traits<'a>(traits: impl Iterator<Item = Option<&'a str>>) -> BTreeSet<String> {
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
