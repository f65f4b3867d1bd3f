//! Profile snapshots as files: `traitline snapshot` writes one, a process
//! role can take them on a timer, and `traitline replay` or a process role
//! starting on an empty store begins from the newest instead of the first
//! record of the log (which Kafka may no longer hold).
//!
//! A snapshot is `snapshot-<taken-at-ms>.jsonl.gz` in `snapshot-dir`
//! ([`crate::store::snapshot`] has its format). It is written under a
//! temporary name, synced, then renamed, so a snapshot that is there is
//! whole; the newest [`KEPT`] are kept.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;

use crate::config::Config;
use crate::log::Topics;
use crate::process::profiles::PROCESSOR;
use crate::store::Store;
use crate::store::snapshot::SnapshotInfo;

/// Snapshots kept in the directory; older ones are deleted.
pub const KEPT: usize = 3;

const PREFIX: &str = "snapshot-";
const SUFFIX: &str = ".jsonl.gz";

/// Writes a snapshot of the profiles in `store` into the snapshot
/// directory; returns its path and what it holds.
pub async fn take(config: &Config, store: &Store) -> Result<(PathBuf, SnapshotInfo), String> {
    let dir = &config.snapshot_dir;
    let io_error = |what: &str, path: &Path, e: std::io::Error| {
        format!(
            "cannot {what} {} (setting snapshot-dir): {e}",
            path.display()
        )
    };
    std::fs::create_dir_all(dir).map_err(|e| io_error("create", dir, e))?;
    let partial = dir.join(format!(
        ".{PREFIX}{}.partial",
        uuid::Uuid::new_v4().simple()
    ));
    let file = File::create(&partial).map_err(|e| io_error("create", &partial, e))?;
    let mut out = GzEncoder::new(BufWriter::new(file), Compression::fast());
    let written = store.write_snapshot(PROCESSOR, &mut out).await;
    let info = match written {
        Ok(info) => info,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e.to_string());
        }
    };
    let synced = out
        .finish()
        .and_then(|buffered| buffered.into_inner().map_err(|e| e.into_error()))
        .and_then(|file| file.sync_all());
    let path = dir.join(format!("{PREFIX}{}{SUFFIX}", info.taken_at_ms));
    if let Err(e) = synced.and_then(|()| std::fs::rename(&partial, &path)) {
        let _ = std::fs::remove_file(&partial);
        return Err(io_error("write", &path, e));
    }
    // The rename is durable once the directory is.
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
    for old in snapshots(dir).into_iter().rev().skip(KEPT) {
        if let Err(e) = std::fs::remove_file(&old) {
            tracing::warn!("cannot delete the old snapshot {}: {e}", old.display());
        }
    }
    Ok((path, info))
}

/// The snapshots in `dir`, oldest first.
fn snapshots(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<(i64, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let taken = name
                .strip_prefix(PREFIX)?
                .strip_suffix(SUFFIX)?
                .parse()
                .ok()?;
            Some((taken, entry.path()))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, path)| path).collect()
}

/// The newest snapshot in the snapshot directory, if any.
pub fn latest(config: &Config) -> Option<PathBuf> {
    snapshots(&config.snapshot_dir).pop()
}

/// Restores `path` into `store` (see [`Store::restore_snapshot`]);
/// `None` when `only_into_empty` and the store already has offsets.
pub async fn restore(
    config: &Config,
    store: &Store,
    path: &Path,
    only_into_empty: bool,
) -> Result<Option<SnapshotInfo>, String> {
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let topics = Topics::new(&config.topic_prefix);
    store
        .restore_snapshot(
            PROCESSOR,
            &[topics.events(), topics.overflow()],
            BufReader::new(GzDecoder::new(BufReader::new(file))),
            only_into_empty,
        )
        .await
        .map_err(|e| format!("cannot restore {}: {e}", path.display()))
}

/// One line about a snapshot: when, how much, how far into the log.
pub fn describe(info: &SnapshotInfo) -> String {
    let taken = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(info.taken_at_ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default();
    let rows = |table: &str| info.rows.get(table).copied().unwrap_or(0);
    format!(
        "taken {taken}: {} profiles, {} ids, {} stored events, {} changes, through {} log records",
        rows("profiles"),
        rows("identities"),
        rows("events"),
        rows("profile_changes"),
        info.records()
    )
}

/// `traitline snapshot`: takes one now and says what it holds.
pub async fn run(config: &Config) -> Result<(), String> {
    let store = Store::open(config.database_url.as_deref(), &config.data_dir)
        .await
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let taken = take(config, &store).await;
    store.close().await;
    let (path, info) = taken?;
    println!(
        "snapshot: wrote {} in {:.1} s ({})",
        path.display(),
        started.elapsed().as_secs_f64(),
        describe(&info)
    );
    Ok(())
}

/// Takes a snapshot every `every` until `stop`.
pub async fn every(config: Config, store: Store, every: Duration, stop: impl Future<Output = ()>) {
    tokio::pin!(stop);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            biased;
            () = &mut stop => return,
            _ = tick.tick() => {}
        }
        match take(&config, &store).await {
            Ok((path, info)) => {
                tracing::info!(
                    "wrote the snapshot {} ({})",
                    path.display(),
                    describe(&info)
                );
            }
            Err(e) => {
                tracing::warn!("cannot take the scheduled snapshot: {e}; trying again in {every:?}")
            }
        }
    }
}
