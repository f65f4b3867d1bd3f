//! `traitline bench metrics`: metric processing throughput beside profile
//! processing, with 1 and with 10 definitions (mixed windows and
//! aggregates, per-user and global), into the configured store
//! (PostgreSQL with `--database-url`, else SQLite), with the process's
//! peak memory. With as many users as events it is also the test of the
//! state budget: a million open per-user windows held within
//! `metric-state-budget-mb`.
//!
//! Like `bench process` it works in a scratch space: an embedded log in a
//! temporary directory (or, with `--kafka-brokers`, new topics on the
//! broker, for a peer measured on the same one) and a new store for each
//! measurement.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::task::JoinSet;

use super::process::{MessageIds, discard, fresh_store, scratch_log};
use crate::config::Config;
use crate::definitions::{MetricDefinition, MetricSpec};
use crate::definitions::{RuleDefinition, RuleSpec};
use crate::log::{LogReader, Polled, ReadError};
use crate::process::defined::Defined;
use crate::process::metrics::{Member, StateBudget, member, runner as metric_runner};
use crate::process::profiles::{ProfileInput, runner as profile_runner};
use crate::process::rules::{RuleProcessor, Set};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchMetricsArgs {
    /// Events in the log to process
    #[arg(long, default_value_t = 400_000)]
    pub events: usize,
    /// Distinct users the events spread over
    #[arg(long, default_value_t = 10_000)]
    pub users: usize,
    /// How many definitions run (the first N of the ten below), one
    /// measurement each, comma-separated (0: none, to measure rules
    /// alone)
    #[arg(long, value_delimiter = ',', default_values_t = [1, 10])]
    pub definitions: Vec<usize>,
    /// Instead of the first N: these definitions (by name, below), in
    /// one measurement
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Run the metrics alone, without the profile processor
    #[arg(long)]
    pub without_profiles: bool,
    /// Give the events random UUIDs as message ids, as the Segment SDKs
    /// do, rather than `bench-{n}` (whose neighbours sort together)
    #[arg(long)]
    pub random_message_ids: bool,
    /// Also run the first N of the ten pattern rules below, in a runner of
    /// their own beside the metrics' (0: none)
    #[arg(long, default_value_t = 0)]
    pub rules: usize,
    /// Then, in the same store, the same definitions as new versions from
    /// the log's beginning (a changed definition computed from history,
    /// each of its message ids claimed already), measured alone
    #[arg(long)]
    pub backfill: bool,
}

/// The rules measured with `--rules`, in order: sequences, counts,
/// strict steps, an absent step, per user and per anonymous id, over the
/// bench events (product views, identifies, anonymous page views).
const RULES: [(&str, &str); 10] = [
    (
        "views_then_identify",
        r#"{"steps": [{"name": "view", "where": "event == \"bench.product.view\"", "times": {"min": 3}}, {"name": "identify", "where": "type == \"identify\""}], "within": "10m"}"#,
    ),
    (
        "identify_then_view",
        r#"{"steps": [{"name": "identify", "where": "type == \"identify\""}, {"name": "view", "where": "event == \"bench.product.view\"", "contiguity": "strict"}], "within": "1m"}"#,
    ),
    (
        "pro_then_view",
        r#"{"steps": [{"name": "pro", "where": "type == \"identify\" && traits.plan == \"pro\""}, {"name": "view", "where": "event == \"bench.product.view\""}], "within": "5m"}"#,
    ),
    (
        "five_views",
        r#"{"steps": [{"name": "view", "where": "event == \"bench.product.view\"", "times": 5}], "within": "1m"}"#,
    ),
    (
        "view_without_identify",
        r#"{"steps": [{"name": "view", "where": "event == \"bench.product.view\""}, {"name": "identify", "where": "type == \"identify\"", "not": true}], "within": "1m"}"#,
    ),
    (
        "ios_views_then_identify",
        r#"{"steps": [{"name": "view", "where": "context.client_os == \"iOS\" && event == \"bench.product.view\"", "times": {"min": 2, "max": 4}}, {"name": "identify", "where": "type == \"identify\""}], "within": "2m"}"#,
    ),
    (
        "cheap_then_pricey",
        r#"{"steps": [{"name": "cheap", "where": "properties.price < 10.0"}, {"name": "pricey", "where": "properties.price > 100.0"}], "within": "5m"}"#,
    ),
    (
        "product_one_then_two",
        r#"{"steps": [{"name": "one", "where": "properties.product == \"p-1\""}, {"name": "two", "where": "properties.product == \"p-2\""}], "within": "10m"}"#,
    ),
    (
        "anonymous_pages",
        r#"{"key": "anonymousId", "steps": [{"name": "page", "where": "type == \"page\"", "times": {"min": 2}}, {"name": "again", "where": "type == \"page\""}], "within": "10m"}"#,
    ),
    (
        "view_optional_identify_view",
        r#"{"steps": [{"name": "view", "where": "event == \"bench.product.view\""}, {"name": "identify", "where": "type == \"identify\"", "optional": true}, {"name": "again", "where": "event == \"bench.product.view\""}], "within": "1m", "after_match": "skip_to_next"}"#,
    ),
];

/// The definitions measured, in order: the first is a per-user hourly
/// count (the one a single-definition run uses); the others mix every
/// window kind and most aggregates, per user, per property and global.
const DEFINITIONS: [(&str, &str); 10] = [
    (
        "views_hourly",
        r#"{"type": "track", "event": "bench.product.view", "group_by": "userId", "aggregate": "count", "window": {"kind": "tumbling", "size": "1h"}}"#,
    ),
    (
        "revenue_by_product",
        r#"{"type": "track", "group_by": "properties.product", "aggregate": "sum", "field": "properties.price", "window": {"kind": "tumbling", "size": "1h"}}"#,
    ),
    (
        "events_per_minute",
        r#"{"aggregate": "count", "window": {"kind": "tumbling", "size": "1m"}}"#,
    ),
    (
        "price_moving_average",
        r#"{"group_by": "userId", "aggregate": "avg", "field": "properties.price", "window": {"kind": "hopping", "size": "5m", "slide": "1m"}}"#,
    ),
    (
        "sessions",
        r#"{"group_by": "userId", "aggregate": "count", "window": {"kind": "session", "gap": "30m", "max": "4h"}}"#,
    ),
    (
        "views_30d",
        r#"{"type": "track", "group_by": "userId", "aggregate": "count", "window": {"kind": "trailing", "size": "30d"}, "trait": "views_30d"}"#,
    ),
    (
        "daily_users",
        r#"{"aggregate": "distinct", "field": "userId", "window": {"kind": "calendar", "unit": "day", "timezone": "Europe/Berlin"}}"#,
    ),
    (
        "top_price_daily",
        r#"{"group_by": "userId", "aggregate": "max", "field": "properties.price", "where": "properties.price > 10.0", "window": {"kind": "tumbling", "size": "1d"}}"#,
    ),
    (
        "favourite_product",
        r#"{"group_by": "userId", "aggregate": "most_frequent", "field": "properties.product", "window": {"kind": "tumbling", "size": "1h"}}"#,
    ),
    (
        "products_by_os",
        r#"{"group_by": "context.client_os", "aggregate": "unique", "field": "properties.product", "window": {"kind": "hopping", "size": "1h", "slide": "15m"}}"#,
    ),
];

/// The first `count` definitions, or those named in `only`.
fn specs(count: usize, only: &[String]) -> Result<Vec<MetricSpec>, String> {
    if let Some(unknown) = only
        .iter()
        .find(|n| !DEFINITIONS.iter().any(|(name, _)| name == n))
    {
        return Err(format!("--only: no bench definition is named {unknown}"));
    }
    DEFINITIONS
        .iter()
        .filter(|(name, _)| only.is_empty() || only.iter().any(|n| n == name))
        .take(if only.is_empty() { count } else { usize::MAX })
        .map(|(name, body)| {
            MetricDefinition::from_json(body.as_bytes())
                .and_then(|d| d.compile(name))
                .map_err(|e| format!("bench definition {name}: {e}"))
        })
        .collect()
}

/// A reader that notes the process's CPU time when the first of the
/// measured readers hands out records.
struct FirstRecords {
    reader: Box<dyn LogReader>,
    first: Arc<OnceLock<f64>>,
}

impl FirstRecords {
    fn around(reader: Box<dyn LogReader>, first: &Arc<OnceLock<f64>>) -> Box<dyn LogReader> {
        Box::new(FirstRecords {
            reader,
            first: first.clone(),
        })
    }
}

#[async_trait]
impl LogReader for FirstRecords {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Polled, ReadError> {
        let polled = self.reader.poll(max, wait).await;
        if polled.as_ref().is_ok_and(|p| !p.records.is_empty()) {
            self.first.get_or_init(cpu_seconds);
        }
        polled
    }

    fn seek(&mut self, partition: i32, offset: Option<i64>) -> Result<(), ReadError> {
        self.reader.seek(partition, offset)
    }

    fn assigned(&self) -> Vec<i32> {
        self.reader.assigned()
    }

    fn note_committed(&mut self, partition: i32, next: i64) {
        self.reader.note_committed(partition, next);
    }

    fn high_watermark(&self, partition: i32) -> Option<i64> {
        self.reader.high_watermark(partition)
    }
}

/// The process's resident memory now, from /proc (0 where there is none).
fn resident_bytes() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// The CPU time this process has used (user and system), from /proc.
pub(super) fn cpu_seconds() -> f64 {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // The fields after the command name (which may hold spaces).
            let rest = s.rsplit_once(')')?.1.to_owned();
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let user = fields.get(11)?.parse::<u64>().ok()?;
            let system = fields.get(12)?.parse::<u64>().ok()?;
            Some(user + system)
        })
        .unwrap_or(0);
    ticks as f64 / 100.0
}

/// Fills, measures and prints.
pub async fn run(config: &Config, args: BenchMetricsArgs) -> Result<(), String> {
    let ids = if args.random_message_ids {
        MessageIds::Random
    } else {
        MessageIds::Counted
    };
    let (mut scratch, log, filled) =
        scratch_log(config, args.events, args.users, true, ids).await?;
    let dir = scratch.data_dir.clone();
    let group = scratch.kafka_group.clone();
    let budget_mb = config.metric_state_budget >> 20;
    let on = match &scratch.log {
        crate::config::LogBackend::Kafka(_) => format!("Kafka topics {}*", scratch.topic_prefix),
        crate::config::LogBackend::Embedded => "a scratch embedded log".to_owned(),
    };
    println!(
        "{} events for {} users written to {on} in {:.1} s; metric-state-budget-mb {budget_mb}; each measurement on a new, empty store",
        args.events,
        args.users,
        filled.as_secs_f64()
    );
    println!(
        "| store | profiles | definitions | rules | seconds | events/s | events per CPU-second | the same from the first record | peak RSS MiB | RSS before MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let counts = if args.only.is_empty() {
        args.definitions.clone()
    } else {
        vec![args.only.len()]
    };
    for count in counts {
        let specs = specs(count, &args.only)?;
        // Each measurement reads the topics afresh, in groups of its own.
        scratch.kafka_group = format!("{group}-{count}");
        let (store, drop_db) = fresh_store(config, &dir, &format!("store-{count}")).await?;
        let described = store.describe();
        let budget = StateBudget::new(config.metric_state_budget);
        let first = Arc::new(OnceLock::new());
        let timed = |reader| FirstRecords::around(reader, &first);
        let mut runners = JoinSet::new();
        if !args.without_profiles {
            let runner = profile_runner(
                &scratch,
                store.clone(),
                log.clone(),
                true,
                ProfileInput::Events,
            )
            .map_err(|e| e.to_string())?
            .map_reader(timed);
            runners.spawn(runner.run(std::future::pending()));
        }
        // Every metric and rule in one set, as the live definitions run;
        // with none, no runner (as the live stage starts none).
        let rules = rules(args.rules)?.into_iter().map(|spec| {
            Arc::new(Defined::Rule(Arc::new(RuleProcessor::new(
                store.clone(),
                spec,
                1,
            ))))
        });
        let members: Vec<Arc<Defined>> = metric_members(&scratch, &store, specs, 1, &budget)
            .chain(rules)
            .collect();
        if !members.is_empty() {
            let runner = set_runner(&scratch, &store, &log, members)?.map_reader(timed);
            runners.spawn(runner.run(std::future::pending()));
        }
        let before = resident_bytes();
        let peak = Arc::new(AtomicUsize::new(before));
        let done = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (peak, done) = (peak.clone(), done.clone());
            tokio::spawn(async move {
                while !done.load(Ordering::Relaxed) {
                    peak.fetch_max(resident_bytes(), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        let (t, cpu) = (Instant::now(), cpu_seconds());
        while let Some(ended) = runners.join_next().await {
            ended.map_err(|e| format!("a runner panicked: {e}"))??;
        }
        let elapsed = t.elapsed();
        let cpu_end = cpu_seconds();
        // From the first record read on, as quixstreams' script counts:
        // without the readers' start (joining the consumer group, finding
        // the offsets).
        let cpu_from_first = cpu_end - first.get().copied().unwrap_or(cpu);
        let cpu = cpu_end - cpu;
        done.store(true, Ordering::Relaxed);
        let _ = sampler.await;
        println!(
            "| {described} | {} | {count} | {} | {:.2} | {:.0} | {:.0} | {:.0} | {} | {} |",
            if args.without_profiles { "no" } else { "yes" },
            args.rules,
            elapsed.as_secs_f64(),
            args.events as f64 / elapsed.as_secs_f64(),
            args.events as f64 / cpu.max(0.01),
            args.events as f64 / cpu_from_first.max(0.01),
            peak.load(Ordering::Relaxed) >> 20,
            before >> 20,
        );
        if args.backfill && count > 0 {
            scratch.kafka_group = format!("{group}-{count}-backfill");
            let specs = self::specs(count, &args.only)?;
            let members = metric_members(&scratch, &store, specs, 2, &budget).collect();
            let runner = set_runner(&scratch, &store, &log, members)?;
            let (t, cpu) = (Instant::now(), cpu_seconds());
            runner.run(std::future::pending()).await?;
            let elapsed = t.elapsed();
            let cpu = cpu_seconds() - cpu;
            println!(
                "| {described} | backfill | {count} | 0 | {:.2} | {:.0} | {:.0} | - | - | - |",
                elapsed.as_secs_f64(),
                args.events as f64 / elapsed.as_secs_f64(),
                args.events as f64 / cpu.max(0.01),
            );
        }
        discard(store, drop_db).await?;
    }
    log.close(Duration::from_secs(10)).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The members for `specs` as `version`.
fn metric_members<'a>(
    scratch: &'a Config,
    store: &'a crate::store::Store,
    specs: Vec<MetricSpec>,
    version: i64,
    budget: &'a StateBudget,
) -> impl Iterator<Item = Arc<Defined>> + 'a {
    specs.into_iter().map(move |spec| {
        Arc::new(Defined::Metric(member(
            scratch,
            store.clone(),
            spec,
            version,
            budget,
        )))
    })
}

/// A runner of `members` in one set, as the live definitions run,
/// reading the scratch log to its end.
fn set_runner(
    scratch: &Config,
    store: &crate::store::Store,
    log: &Arc<dyn crate::log::EventLog>,
    members: Vec<Arc<Defined>>,
) -> Result<crate::process::Runner<Set<Defined>>, String> {
    let set = Arc::new(Set::new(Defined::RUNNER.into(), store.clone(), members));
    metric_runner(scratch, log.clone(), set, true).map_err(|e| e.to_string())
}

/// The first `count` of [`RULES`], compiled.
fn rules(count: usize) -> Result<Vec<RuleSpec>, String> {
    if count > RULES.len() {
        return Err(format!("--rules: at most {}", RULES.len()));
    }
    RULES[..count]
        .iter()
        .map(|(name, body)| {
            RuleDefinition::from_json(body.as_bytes())
                .and_then(|d| d.compile(name))
                .map_err(|e| format!("bench rule {name}: {e}"))
        })
        .collect()
}
