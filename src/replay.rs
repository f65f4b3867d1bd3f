//! `traitline replay`: rebuilds every profile from the log (event
//! sourcing). The profile store is set to the newest snapshot when there is
//! one (see [`crate::snapshot`]), else emptied (deleted ids stay deleted);
//! then the profile processor reads `user_events` from there to its end
//! with a consumer group of its own, showing progress as it goes.
//!
//! Run it with the service's process role stopped: in embedded mode the
//! log refuses a second writer, so replay cannot run beside a service.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::cli::ReplayArgs;
use crate::config::Config;
use crate::log;
use crate::process::RunnerStats;
use crate::process::profiles::PROCESSOR;
use crate::process::profiles::{ProfileInput, runner as profile_runner};
use crate::store::Store;

/// How long the log may take to write out rejects at the end.
const CLOSE_DEADLINE: Duration = Duration::from_secs(10);

/// What a replay did.
#[derive(Debug, Clone)]
pub struct ReplayReport {
    pub applied: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub elapsed: Duration,
}

impl ReplayReport {
    pub fn events_per_second(&self) -> f64 {
        self.applied as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Rebuilds the profiles, writing progress lines to `progress`.
pub async fn run(
    config: &Config,
    args: &ReplayArgs,
    progress: &mut (impl Write + Send),
) -> Result<ReplayReport, String> {
    let store = Store::open(config.database_url.as_deref(), &config.data_dir)
        .await
        .map_err(|e| e.to_string())?
        .with_profile_cache(config.profile_cache);
    let log = log::open(config)
        .await
        .map_err(|e| format!("{e} (is the service still running?)"))?;
    match crate::snapshot::latest(config).filter(|_| !args.from_beginning) {
        Some(path) => {
            let info = crate::snapshot::restore(config, &store, &path, false)
                .await?
                .ok_or("the snapshot was not restored")?;
            let _ = writeln!(
                progress,
                "replay: restored the snapshot {} ({}); rebuilding the rest from the log",
                path.display(),
                crate::snapshot::describe(&info)
            );
        }
        None => {
            store
                .reset_profiles(PROCESSOR)
                .await
                .map_err(|e| e.to_string())?;
            let _ = writeln!(
                progress,
                "replay: profiles cleared; rebuilding them from the log"
            );
        }
    }

    let started = Instant::now();
    let mut totals = RunnerStats::default();
    // The events topic, then the hot users' overflow topic: the profile
    // rules do not depend on the order events arrive in.
    for input in [ProfileInput::Events, ProfileInput::Overflow] {
        let runner = profile_runner(config, store.clone(), log.clone(), true, input)
            .map_err(|e| e.to_string())?;
        let stats = runner.stats();
        let task = tokio::spawn(runner.run(std::future::pending()));
        tokio::pin!(task);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let finished = loop {
            tokio::select! {
                finished = &mut task => break finished,
                _ = tick.tick() => {
                    let mut snapshot = stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    snapshot.applied += totals.applied;
                    let _ = writeln!(progress, "{}", progress_line(&snapshot, started.elapsed()));
                }
            }
        };
        finished
            .map_err(|e| e.to_string())
            .and_then(|ran| ran)
            .map_err(|e| format!("the replay stopped: {e}"))?;
        let done = stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
        totals.applied += done.applied;
        totals.duplicates += done.duplicates;
        totals.rejected += done.rejected;
    }
    log.close(CLOSE_DEADLINE).await;
    store.close().await;
    let report = ReplayReport {
        applied: totals.applied,
        duplicates: totals.duplicates,
        rejected: totals.rejected,
        elapsed: started.elapsed(),
    };
    let _ = writeln!(
        progress,
        "replay: done: {} events applied, {} duplicates, {} rejected in {:.1} s ({:.0} events/s)",
        report.applied,
        report.duplicates,
        report.rejected,
        report.elapsed.as_secs_f64(),
        report.events_per_second()
    );
    Ok(report)
}

/// `replay: [#####-----]  52%  120000 events  48000 events/s  lag 110000`
fn progress_line(stats: &RunnerStats, elapsed: Duration) -> String {
    let done: i64 = stats
        .partitions
        .values()
        .filter_map(|p| p.next_offset)
        .sum();
    let lag: Option<i64> = stats.partitions.values().map(|p| p.lag()).sum();
    let rate = stats.applied as f64 / elapsed.as_secs_f64().max(1e-9);
    let bar = match lag {
        Some(lag) if done + lag > 0 => {
            let share = done as f64 / (done + lag) as f64;
            let filled = (share * 20.0).round() as usize;
            format!(
                "[{}{}] {:>3.0}%  ",
                "#".repeat(filled),
                "-".repeat(20 - filled),
                share * 100.0
            )
        }
        _ => String::new(),
    };
    let lag = lag.map(|l| format!("  lag {l}")).unwrap_or_default();
    format!(
        "replay: {bar}{} events  {rate:.0} events/s{lag}",
        stats.applied
    )
}
