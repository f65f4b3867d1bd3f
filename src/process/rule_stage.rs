//! The `rules` stage: every defined rule's current version, run by the
//! [definition stage](super::definition_stage). The live rules share one
//! runner; a new or changed version reads the log's history from its
//! beginning (its partial matches start afresh) in a backfill of its own,
//! so the live rules do not wait for it, then joins them.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::definition_stage::{Runners, Staged};
use super::rules::RuleProcessor;
use crate::config::Config;
use crate::definitions::{RuleDefinition, RuleSpec};
use crate::log::EventLog;
use crate::store::{DefinitionKind, Store};
use crate::supervisor::Supervisor;

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

/// The rule runners of this process, for `/readyz`.
pub type RuleRunners = Runners<RuleProcessor>;

/// Runs every defined rule's current version as one supervised stage,
/// `rules`.
pub fn spawn(
    supervisor: &mut Supervisor,
    config: &Config,
    store: &Store,
    log: &Arc<dyn EventLog>,
) -> Result<RuleRunners, String> {
    super::definition_stage::spawn(supervisor, config, store, log, ())
}

impl Staged for RuleProcessor {
    type Definition = RuleDefinition;
    type Context = ();
    const KIND: DefinitionKind = DefinitionKind::Rule;

    fn create(
        (): &(),
        _config: &Config,
        store: Store,
        spec: RuleSpec,
        version: i64,
    ) -> Arc<RuleProcessor> {
        Arc::new(RuleProcessor::new(store, spec, version))
    }

    fn name(&self) -> &str {
        RuleProcessor::name(self)
    }

    fn counted(&self) -> u64 {
        RuleProcessor::counted(self)
    }
}
