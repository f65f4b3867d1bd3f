//! `traitline bench process`: profile processing throughput into the
//! configured store (PostgreSQL with `--database-url`, else SQLite), for a
//! sweep of batch sizes, beside a naive consumer that commits one
//! transaction per event (the shape of seed 001's consumer), in one run.
//!
//! It works in a scratch space and never touches the service's data: an
//! embedded log in a temporary directory filled with generated events, and
//! a store of its own (a new PostgreSQL database on the configured server,
//! dropped at the end, or a SQLite file in the temporary directory).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use sqlx::Connection;

use crate::config::{Config, LogBackend};
use crate::envelope::{EventEnvelope, EventType};
use crate::log::{self, EventLog, LogReader, Record, StartAt, Topics};
use crate::process::profiles::{ProfileInput, runner as profile_runner};
use crate::store::{OffsetAdvance, ProfileBatch, Store};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchProcessArgs {
    /// Events in the log to process
    #[arg(long, default_value_t = 400_000)]
    pub events: usize,
    /// Distinct users the events spread over
    #[arg(long, default_value_t = 10_000)]
    pub users: usize,
    /// Batch sizes (events a transaction) to measure, comma-separated
    #[arg(long, value_delimiter = ',', default_values_t = [1000, 5000, 20_000, 40_000])]
    pub batch_sizes: Vec<usize>,
    /// Events the naive one-transaction-per-event consumer processes (it
    /// is slow; its rate does not depend on the count)
    #[arg(long, default_value_t = 5_000)]
    pub naive_events: usize,
}

/// One generated event (also used by the criterion benchmarks): mostly
/// `track` with properties and context, every
/// tenth an `identify` with traits, every fiftieth an anonymous page view.
pub fn event(n: usize, users: usize) -> EventEnvelope {
    let user = format!("user-{}", (n.wrapping_mul(2_654_435_761)) % users.max(1));
    let now = Utc::now();
    let mut event = EventEnvelope::new(EventType::Track, format!("bench-{n}"), now)
        .user(user)
        .named("bench.product.view")
        .properties(serde_json::json!({"product": format!("p-{}", n % 1000), "price": 19.99, "$set": {"last_product": n % 1000}}))
        .context(serde_json::json!({"library": {"name": "traitline-bench", "version": "1"}, "client_os": "iOS", "client_version": "1.0.0"}));
    if n.is_multiple_of(10) {
        event.kind = EventType::Identify;
        event.event = None;
        event = event.traits(serde_json::json!({"plan": if n.is_multiple_of(20) { "pro" } else { "free" }, "email": format!("u{n}@example.com")}));
    } else if n % 50 == 1 {
        event.kind = EventType::Page;
        event.event = None;
        event.user_id = None;
        event.anonymous_id = Some(format!("anon-{}", n % (users.max(1) * 2)));
    }
    event
}

/// The scratch store: a new database on the configured PostgreSQL server,
/// or a SQLite file; `Some(url, name)` when a database must be dropped.
pub(super) async fn scratch_store(
    config: &Config,
    dir: &std::path::Path,
) -> Result<(Store, Option<(String, String)>), String> {
    match &config.database_url {
        None => Ok((
            Store::open(None, dir).await.map_err(|e| e.to_string())?,
            None,
        )),
        Some(url) => {
            let name = format!("traitline_bench_{}", uuid::Uuid::new_v4().simple());
            let mut admin = sqlx::PgConnection::connect(url)
                .await
                .map_err(|e| e.to_string())?;
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut admin)
                .await
                .map_err(|e| e.to_string())?;
            // The measurement before left pages to write back: a
            // checkpoint now writes them, rather than at some point of
            // this measurement (a swing of a fifth between runs).
            if let Err(e) = sqlx::query("CHECKPOINT").execute(&mut admin).await {
                tracing::warn!(
                    "the bench cannot checkpoint PostgreSQL before a measurement ({e}): its figures swing more; a superuser or the pg_checkpoint role can"
                );
            }
            let (server, _) = url
                .rsplit_once('/')
                .ok_or("the database URL names no database")?;
            let store = Store::open(Some(&format!("{server}/{name}")), dir)
                .await
                .map_err(|e| e.to_string())?;
            Ok((store, Some((url.clone(), name))))
        }
    }
}

/// A store for one measurement: new and empty, so no measurement runs on
/// the dead rows of the one before.
pub(super) async fn fresh_store(
    config: &Config,
    dir: &std::path::Path,
    name: &str,
) -> Result<(Store, Option<(String, String)>), String> {
    let (store, drop_db) = scratch_store(config, &dir.join(name)).await?;
    Ok((store.with_profile_cache(config.profile_cache), drop_db))
}

/// Closes a measurement's store and drops its database.
pub(super) async fn discard(store: Store, drop_db: Option<(String, String)>) -> Result<(), String> {
    store.close().await;
    if let Some((url, name)) = drop_db {
        let mut admin = sqlx::PgConnection::connect(&url)
            .await
            .map_err(|e| e.to_string())?;
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {name}")))
            .execute(&mut admin)
            .await;
    }
    Ok(())
}

/// The message ids of a scratch log's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MessageIds {
    /// `bench-{n}`: consecutive events' ids sort near each other.
    Counted,
    /// Random UUIDs, as the Segment SDKs send: each id lands anywhere in
    /// an index of them.
    Random,
}

/// A scratch log filled with `events` generated events for `users`
/// users: an embedded log in a new temporary directory, or with
/// `on_kafka` and a configured broker, new topics there (a prefix of their
/// own). The configuration that reads it, the log, and how long the
/// filling took.
pub(super) async fn scratch_log(
    config: &Config,
    events: usize,
    users: usize,
    on_kafka: bool,
    ids: MessageIds,
) -> Result<(Config, Arc<dyn EventLog>, Duration), String> {
    let mut scratch = config.clone();
    scratch.data_dir = tempfile_dir()?;
    if on_kafka && matches!(config.log, LogBackend::Kafka(_)) {
        let run = uuid::Uuid::new_v4().simple().to_string();
        scratch.topic_prefix = format!("bench-{}-", &run[..8]);
        scratch.kafka_group = format!("traitline-bench-{}", &run[..8]);
    } else {
        scratch.log = LogBackend::Embedded;
        scratch.topic_prefix = String::new();
    }
    let log = log::open(&scratch).await.map_err(|e| e.to_string())?;
    let topic = Topics::new(&scratch.topic_prefix).events();
    let started = Instant::now();
    for chunk in (0..events).collect::<Vec<_>>().chunks(10_000) {
        let records = chunk
            .iter()
            .map(|n| {
                let mut event = event(*n, users);
                if ids == MessageIds::Random {
                    event.message_id = uuid::Uuid::new_v4().to_string();
                }
                Record {
                    key: event.record_key().map(str::to_owned),
                    value: serde_json::to_vec(&event).unwrap_or_default(),
                }
            })
            .collect();
        log.append(&topic, records)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok((scratch, log, started.elapsed()))
}

/// Fills, measures and prints.
pub async fn run(config: &Config, args: BenchProcessArgs) -> Result<(), String> {
    let (mut scratch, log, filled) =
        scratch_log(config, args.events, args.users, false, MessageIds::Counted).await?;
    let dir = scratch.data_dir.clone();
    let topic = Topics::new("").events();

    let mut best: f64 = 0.0;
    for (i, batch) in args.batch_sizes.iter().enumerate() {
        let (store, drop_db) = fresh_store(config, &dir, &format!("store-{batch}")).await?;
        if i == 0 {
            println!(
                "{}; {} events for {} users written to a scratch log in {:.1} s; each measurement on a new, empty store",
                store.describe(),
                args.events,
                args.users,
                filled.as_secs_f64()
            );
            println!("| consumer | batch | events | seconds | events/s |");
            println!("|---|---|---|---|---|");
        }
        scratch.process_batch = *batch;
        let runner = profile_runner(
            &scratch,
            store.clone(),
            log.clone(),
            true,
            ProfileInput::Events,
        )
        .map_err(|e| e.to_string())?;
        let stats = runner.stats();
        let t = Instant::now();
        runner.run(std::future::pending()).await?;
        let elapsed = t.elapsed();
        let applied = stats.lock().unwrap_or_else(|e| e.into_inner()).applied;
        let rate = applied as f64 / elapsed.as_secs_f64();
        best = best.max(rate);
        println!(
            "| runner | {batch} | {applied} | {:.2} | {rate:.0} |",
            elapsed.as_secs_f64()
        );
        discard(store, drop_db).await?;
    }

    let (store, drop_db) = fresh_store(config, &dir, "store-naive").await?;
    let naive = naive(&store, &scratch, &topic, args.naive_events).await?;
    discard(store, drop_db).await?;
    let naive_rate = args.naive_events as f64 / naive.as_secs_f64();
    println!(
        "| naive (one transaction per event) | 1 | {} | {:.2} | {naive_rate:.0} |",
        args.naive_events,
        naive.as_secs_f64()
    );
    println!("best runner / naive: {:.1}x", best / naive_rate.max(1e-9));

    log.close(Duration::from_secs(10)).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Reads records one at a time and commits each in its own transaction
/// (its effects and its offset), as a consumer without batching does.
async fn naive(
    store: &Store,
    config: &Config,
    topic: &str,
    events: usize,
) -> Result<Duration, String> {
    let mut reader = crate::log::embedded::EmbeddedReader::open(
        &config.data_dir.join("log"),
        topic,
        StartAt::Beginning,
    )
    .map_err(|e| e.to_string())?;
    let mut offsets = std::collections::HashMap::new();
    let mut done = 0;
    let t = Instant::now();
    while done < events {
        let polled = reader
            .poll(events - done, Duration::from_millis(100))
            .await
            .map_err(|e| e.to_string())?;
        if polled.records.is_empty() {
            break;
        }
        for record in polled.records {
            let event: EventEnvelope =
                serde_json::from_slice(&record.value).map_err(|e| e.to_string())?;
            let text = String::from_utf8_lossy(&record.value).into_owned();
            let events = [(event, text)];
            let advance = OffsetAdvance {
                partition: record.partition,
                expected: offsets.get(&record.partition).copied(),
                next: record.offset + 1,
            };
            let batch = ProfileBatch {
                processor: "naive",
                topic,
                offsets: vec![advance],
                events: &events,
            };
            store
                .apply_profile_batch(&batch)
                .await
                .map_err(|e| e.to_string())?;
            offsets.insert(record.partition, record.offset + 1);
            done += 1;
        }
    }
    Ok(t.elapsed())
}

pub(super) fn tempfile_dir() -> Result<std::path::PathBuf, String> {
    let dir =
        std::env::temp_dir().join(format!("traitline-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}
