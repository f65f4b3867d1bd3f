//! Benchmarks of a running service and of the pipeline's stages:
//! `traitline bench ingest` (HTTP load), `bench process` (profile
//! processing throughput into the store, beside a naive consumer),
//! `bench metrics` (metric processing beside profiles, with peak memory),
//! `bench latency` (from a 2xx to the profile being visible) and `bench
//! deliveries` (webhook deliveries a second).

pub mod archive;
pub mod deliveries;
pub mod ingest;
pub mod latency;
pub mod metrics;
pub mod process;

pub use ingest::{BenchError, BenchIngestArgs, Report, run_ingest};

use crate::config::Config;
use crate::keys::StoredKeys;

/// The key of `scope` a benchmark uses: given, else the first configured,
/// else the one generated in the data directory.
fn key(
    config: &Config,
    given: Option<&String>,
    configured: &[String],
    pick: fn(StoredKeys) -> Vec<String>,
) -> Result<String, BenchError> {
    if let Some(key) = given.or(configured.first()) {
        return Ok(key.clone());
    }
    let stored: StoredKeys = std::fs::read(config.data_dir.join("keys.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(BenchError::NoKey)?;
    pick(stored).into_iter().next().ok_or(BenchError::NoKey)
}
