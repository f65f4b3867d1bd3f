//! Replays (`POST /v1/destinations/{name}/replay`): a destination's dead
//! letters, or the records its topic stored in a time range (a backfill
//! of a destination added later), delivered again by the instance that
//! runs it, with the same ids, signatures, retries and breaker as live
//! deliveries. A dead letter delivered is no longer one; one that fails
//! again is a dead letter again. Progress is stored every second, which
//! also tells other instances the replay is alive; one whose instance
//! stopped is taken over and run again from its start (at least once: the
//! ids are the same, so a receiver deduplicates).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::task::JoinSet;

use super::Destination;
use crate::config::Config;
use crate::log::{StartAt, StoredRecord};
use crate::store::{Store, StoredReplay};

/// Dead letters read from the store at a time.
const PAGE: u32 = 500;
/// How often a running replay stores its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// A running replay not touched for this long is taken over.
pub const STALE_AFTER: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Counts {
    delivered: AtomicI64,
    failed: AtomicI64,
}

/// Runs `replay` to its end.
pub async fn run(
    replay: StoredReplay,
    destination: Arc<Destination>,
    store: Store,
    config: Config,
) {
    let name = destination.spec().name.clone();
    tracing::info!(
        "destination {name}: replaying {} (replay {})",
        what(&replay),
        replay.replay_id
    );
    let counts = Arc::new(Counts::default());
    let work = async {
        match replay.what.as_str() {
            "log" => log_range(&replay, &destination, &config, &counts).await,
            _ => dead_letters(&replay, &destination, &store, &counts).await,
        }
    };
    tokio::pin!(work);
    let outcome = loop {
        tokio::select! {
            outcome = &mut work => break outcome,
            () = tokio::time::sleep(PROGRESS_EVERY) => {
                let (delivered, failed) = counts.get();
                if let Err(e) = store.replay_progress(&replay.replay_id, delivered, failed, false).await {
                    tracing::warn!("cannot store the progress of replay {}: {e}", replay.replay_id);
                }
            }
        }
    };
    let (delivered, failed) = counts.get();
    match outcome {
        Ok(()) => {
            tracing::info!(
                "destination {name}: replay {} is done: {delivered} delivered, {failed} dead letters",
                replay.replay_id
            );
            while let Err(e) = store
                .replay_progress(&replay.replay_id, delivered, failed, true)
                .await
            {
                tracing::warn!(
                    "cannot store that replay {} is done: {e}; trying again",
                    replay.replay_id
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        // Taken over once it goes stale.
        Err(e) => tracing::warn!(
            "destination {name}: replay {} stopped: {e}; it is run again",
            replay.replay_id
        ),
    }
}

impl Counts {
    fn get(&self) -> (i64, i64) {
        (
            self.delivered.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    fn add(&self, delivered: bool) {
        let count = if delivered {
            &self.delivered
        } else {
            &self.failed
        };
        count.fetch_add(1, Ordering::Relaxed);
    }
}

fn what(replay: &StoredReplay) -> String {
    let time = |ms| crate::admin::time(ms).to_rfc3339();
    match replay.what.as_str() {
        "log" => format!(
            "the records stored from {} to {}",
            time(replay.from_ms),
            time(replay.to_ms)
        ),
        _ => "the dead letters".to_owned(),
    }
}

/// Delivers each dead letter of the range once more, as many at once as
/// the destination allows.
async fn dead_letters(
    replay: &StoredReplay,
    destination: &Arc<Destination>,
    store: &Store,
    counts: &Arc<Counts>,
) -> Result<(), String> {
    let spec = destination.spec();
    let mut tasks = JoinSet::new();
    let mut after: Option<(i64, String)> = None;
    loop {
        let page = store
            .delivery_failures(
                &spec.name,
                Some((replay.from_ms, replay.to_ms)),
                after.as_ref().map(|(at, id)| (*at, id.as_str())),
                PAGE,
            )
            .await
            .map_err(|e| e.to_string())?;
        let Some(last) = page.last() else { break };
        after = Some((last.failed_at, last.delivery_id.clone()));
        for failure in page {
            while tasks.len() >= spec.max_in_flight {
                tasks.join_next().await;
            }
            let record = StoredRecord {
                topic: spec.source.into(),
                partition: failure.partition,
                offset: failure.offset,
                timestamp_ms: failure.failed_at,
                key: failure.key.clone().map(Into::into),
                value: failure.body.into(),
            };
            let (destination, counts) = (destination.clone(), counts.clone());
            tasks.spawn(async move {
                let delivered = destination
                    .deliver(failure.delivery_id, record, failure.key)
                    .await;
                counts.add(delivered);
            });
        }
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Delivers the records the source topic stored in the range that the
/// destination's filter takes, reading the topic from its beginning.
async fn log_range(
    replay: &StoredReplay,
    destination: &Arc<Destination>,
    config: &Config,
    counts: &Arc<Counts>,
) -> Result<(), String> {
    let spec = destination.spec();
    let topic = crate::log::Topics::new(&config.topic_prefix).named(spec.source);
    let mut reader =
        crate::log::open_reader(config, &topic, StartAt::Beginning).map_err(|e| e.to_string())?;
    let mut tasks = JoinSet::new();
    loop {
        let polled = reader
            .poll(1_000, Duration::from_millis(500))
            .await
            .map_err(|e| e.to_string())?;
        let done = polled.caught_up && polled.records.is_empty();
        for record in polled.records {
            if !(replay.from_ms..replay.to_ms).contains(&record.timestamp_ms) {
                continue;
            }
            let Ok(Some((id, key))) = destination.take(&record) else {
                continue;
            };
            while tasks.len() >= spec.max_in_flight {
                tasks.join_next().await;
            }
            let (destination, counts) = (destination.clone(), counts.clone());
            tasks.spawn(async move {
                let delivered = destination.deliver(id, record, key).await;
                counts.add(delivered);
            });
        }
        if done {
            break;
        }
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}
