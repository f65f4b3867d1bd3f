//! What the rules need beside the [definition
//! stage](super::definition_stage), which runs them with the metrics (a
//! new or changed version reads the log's history from its beginning, its
//! partial matches afresh, in a backfill of its own): the purge of
//! superseded versions.

use std::collections::BTreeSet;

use crate::store::{DefinitionKind, Store};

/// Deletes the partial matches and offsets of rule versions that no
/// longer run (a changed or deleted rule); returns how many. Their
/// alerts stay.
pub async fn purge_superseded(store: &Store) -> Result<usize, crate::store::StoreError> {
    let current: BTreeSet<String> = store
        .definitions(DefinitionKind::Rule)
        .await?
        .iter()
        .map(|d| super::rules::processor_name(&d.name, d.version))
        .collect();
    let mut purged = 0;
    for processor in store.rule_processors().await? {
        if !current.contains(&processor) {
            store.forget_rule_processor(&processor).await?;
            purged += 1;
        }
    }
    Ok(purged)
}
