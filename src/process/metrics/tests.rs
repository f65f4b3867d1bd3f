//! The metrics processor through the runner, on the embedded log and a
//! SQLite store: a restart between two halves of the log, and a second
//! pass over it, count every event once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;

use super::*;
use crate::definitions::MetricDefinition;
use crate::log::embedded::{EmbeddedLog, EmbeddedReader};
use crate::log::{EventLog, Record, StartAt};
use crate::process::metric_set::testing::{self, run_to_end};
use crate::process::{Checkpoints, Runner, RunnerSettings};
use crate::store::WindowQuery;

const TOPIC: &str = "events";
const HOUR: i64 = 3_600_000;

fn spec() -> MetricSpec {
    let definition: MetricDefinition = serde_json::from_value(json!({
        "event": "order.create", "group_by": "userId", "aggregate": "count",
        "window": {"kind": "tumbling", "size": "1h"}, "lateness": "5m"
    }))
    .unwrap();
    definition.compile("orders_hourly").unwrap()
}

/// Events for 5 users over 3 hours starting at `base` (an hour boundary),
/// every fourth one a page view the metric does not take.
fn events(base: i64, range: std::ops::Range<usize>) -> Vec<(String, i64, bool)> {
    range
        .map(|i| {
            let at = base + (i as i64 * 7_919_000) % (3 * HOUR);
            (format!("u{}", i % 5), at, i % 4 != 3)
        })
        .collect()
}

async fn append(log: &EmbeddedLog, base: i64, range: std::ops::Range<usize>) {
    append_each(log, base, range).await;
}

/// Appends the events `numbers` of [`events`] (again, for a client's
/// retry: the same message id, user and time).
async fn append_each(log: &EmbeddedLog, base: i64, numbers: impl IntoIterator<Item = usize>) {
    let records = numbers
        .into_iter()
        .map(|i| {
            let (user, at, order) = events(base, i..i + 1).remove(0);
            let envelope = json!({
                "type": if order { "track" } else { "page" },
                "event": if order { Some("order.create") } else { None },
                "userId": user, "messageId": format!("m{i}"),
                "timestamp": DateTime::<Utc>::from_timestamp_millis(at).unwrap().to_rfc3339(),
            });
            Record {
                key: Some(user),
                value: envelope.to_string().into_bytes(),
            }
        })
        .collect();
    log.append(TOPIC, records).await.unwrap();
}

fn runner(
    dir: &std::path::Path,
    log: &Arc<EmbeddedLog>,
    processor: &Arc<MetricProcessor>,
) -> Runner<MetricSet> {
    set_runner(dir, log, std::slice::from_ref(processor))
}

/// A runner of a set of `members`, read from the store's offsets.
fn set_runner(
    dir: &std::path::Path,
    log: &Arc<EmbeddedLog>,
    members: &[Arc<MetricProcessor>],
) -> Runner<MetricSet> {
    let store = members[0].store.clone();
    let set = Arc::new(MetricSet::new("metrics".into(), store, members.to_vec()));
    let reader = Box::new(EmbeddedReader::open(dir, TOPIC, StartAt::Beginning).unwrap());
    let settings = RunnerSettings {
        max_batch: 7,
        max_wait: Duration::from_millis(10),
        stop_when_caught_up: true,
        parallel_commits: 1,
        tick: Duration::ZERO,
        ..RunnerSettings::new("metrics", TOPIC.to_owned(), "rejected".to_owned())
    };
    Runner::new(set, reader, log.clone(), settings)
}

/// The time hook of a caught-up runner: `partitions`' clocks at `time_ms`,
/// their offsets where the store has them (an empty partition's at 0).
async fn tick(
    store: &Store,
    processor: &Arc<MetricProcessor>,
    partitions: std::ops::Range<i32>,
    time_ms: i64,
) {
    testing::tick(store, processor, TOPIC, partitions, time_ms).await;
}

/// A new embedded log of `partitions` partitions in a temporary
/// directory (kept while the first value lives), its directory, and a
/// SQLite store beside it.
async fn scratch(
    partitions: i32,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    Arc<EmbeddedLog>,
    Store,
) {
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("log");
    let topics = [TOPIC.to_owned(), "rejected".to_owned()];
    let log = Arc::new(EmbeddedLog::open(&log_dir, partitions, &topics).unwrap());
    let store = Store::open(None, dir.path()).await.unwrap();
    (dir, log_dir, log, store)
}

fn unlimited() -> StateBudget {
    StateBudget::new(usize::MAX)
}

/// Version 1 of [`spec`] over three partitions.
fn hourly_orders_member(store: &Store, budget: &StateBudget) -> Arc<MetricProcessor> {
    Arc::new(MetricProcessor::new(store.clone(), spec(), 1, 3, budget))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_between_two_halves_and_a_second_pass_count_every_event_once() {
    let (held, stored) = restart_between_two_halves_and_a_second_pass(unlimited()).await;
    assert_eq!(held.0, stored, "every open group in memory");
}

/// The same with a budget that holds about one group: every batch evicts
/// the groups it did not use last, and a group is read back from the
/// store for its next event, and for its window's close on the tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_over_its_state_budget_evicts_groups_and_counts_the_same() {
    let share = GROUP_BYTES + 100;
    let ((groups, bytes), stored) =
        restart_between_two_halves_and_a_second_pass(StateBudget::new(share)).await;
    assert!(bytes <= share, "{bytes} bytes held, over the share");
    assert!(
        groups < stored,
        "{groups} of {stored} open groups in memory"
    );
}

/// Counts a log in two runs and a second pass; before the tick that
/// closes every window, the groups and bytes the second processor held
/// and the open groups in the store.
async fn restart_between_two_halves_and_a_second_pass(
    budget: StateBudget,
) -> ((usize, usize), usize) {
    let (_dir, log_dir, log, store) = scratch(3).await;
    // Windows in the future of the log's clock (its append times), so
    // they stay open through both runs and close only on the tick below.
    let base = (crate::store::now_ms() / HOUR + 2) * HOUR;

    append(&log, base, 0..60).await;
    let first = hourly_orders_member(&store, &budget);
    run_to_end(runner(&log_dir, &log, &first)).await;
    drop(first);

    // A restart: a new processor, nothing in memory, the same store.
    append(&log, base, 60..130).await;
    let second = hourly_orders_member(&store, &budget);
    run_to_end(runner(&log_dir, &log, &second)).await;
    // And a second pass over the whole log: every offset is stored.
    run_to_end(runner(&log_dir, &log, &second)).await;

    let held = second.held().await;
    let mut open = 0;
    for partition in 0..3 {
        let (_, states) = store
            .metric_states(second.name(), TOPIC, partition)
            .await
            .unwrap();
        open += states.len();
    }

    // The clocks move past every window on a quiet log (the time hook).
    tick(&store, &second, 0..3, base + 4 * HOUR).await;

    assert_eq!(closed_windows(&store, 1).await, hourly_orders(base, 0..130));
    // Closed windows leave the stored state.
    for partition in 0..3 {
        let (clock, states) = store
            .metric_states(&processor_name("orders_hourly", 1), TOPIC, partition)
            .await
            .unwrap();
        assert_eq!((clock, states), (Some(base + 4 * HOUR), vec![]));
    }
    (held, open)
}

/// Batches held back under a backlog (every batch of 7 is full) whose
/// write the store refuses, as a database that went away would: the
/// runner reads them again from the store's offsets, over and over while
/// the fault lasts, and once the store takes writes every window counts
/// every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_held_back_whose_write_fails_are_read_again_and_count_once() {
    held_back_write_refused("metric_state", 2).await;
}

/// The same when the claims the batches held back made in memory are
/// what the store refuses (SQLite writes them through its own API).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_held_back_whose_claims_fail_are_read_again_and_count_once() {
    // Read again, the batches claim their ids a batch at a time, which
    // fails too and is retried after a pause: one failed write is seen.
    held_back_write_refused("claim_blocks", 1).await;
}

/// Refuses inserts into `table` until the runner has failed to write
/// what it held back `failures` times.
async fn held_back_write_refused(table: &str, failures: u64) {
    let (_dir, log_dir, log, store) = scratch(3).await;
    let base = (crate::store::now_ms() / HOUR + 2) * HOUR;
    append(&log, base, 0..130).await;
    store.refuse_inserts(table).await;

    let member = hourly_orders_member(&store, &unlimited());
    let runner = runner(&log_dir, &log, &member);
    let stats = runner.stats();
    let running = tokio::spawn(runner.run(std::future::pending()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while stats.lock().unwrap().fenced < failures {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the failed writes of held-back batches are read again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stored = store.offsets(member.name(), TOPIC).await.unwrap();
    assert!(stored.is_empty(), "nothing written: {stored:?}");
    store.allow_inserts().await;
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the runner reads the log to its end once the store takes writes")
        .unwrap()
        .expect("the runner does not fail");

    let stored = store.offsets(member.name(), TOPIC).await.unwrap();
    assert_eq!(stored.values().sum::<i64>(), 130);
    tick(&store, &member, 0..3, base + 4 * HOUR).await;
    assert_eq!(closed_windows(&store, 1).await, hourly_orders(base, 0..130));
}

/// Under a backlog the ids are claimed in memory and written once for
/// the batches held back; a client's retry of an id written earlier
/// shows only then. The batches held back are read again, their ids
/// claimed through the store, and every window counts every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_an_id_claimed_in_an_earlier_write_is_found_and_counted_once() {
    let (_dir, log_dir, log, store) = scratch(3).await;
    let base = (crate::store::now_ms() / HOUR + 2) * HOUR;
    append(&log, base, 0..130).await;
    // Retries, then more events after them in every partition.
    append_each(&log, base, [1, 2, 5, 40]).await;
    append(&log, base, 130..200).await;

    let member = hourly_orders_member(&store, &unlimited());
    let runner = runner(&log_dir, &log, &member);
    let stats = runner.stats();
    run_to_end(runner).await;
    assert!(
        stats.lock().unwrap().fenced >= 1,
        "a retry claimed in memory is found when the claims are written"
    );
    let stored = store.offsets(member.name(), TOPIC).await.unwrap();
    assert_eq!(stored.values().sum::<i64>(), 204);
    tick(&store, &member, 0..3, base + 4 * HOUR).await;
    assert_eq!(closed_windows(&store, 1).await, hourly_orders(base, 0..200));
}

/// Each user's orders per hour among `events(base, range)`.
fn hourly_orders(base: i64, range: std::ops::Range<usize>) -> BTreeMap<(String, i64), i64> {
    hourly_orders_of(base, range)
}

/// Each user's orders per hour among the events `numbers` of [`events`].
fn hourly_orders_of(
    base: i64,
    numbers: impl IntoIterator<Item = usize>,
) -> BTreeMap<(String, i64), i64> {
    let mut expected: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for i in numbers {
        let (user, at, order) = events(base, i..i + 1).remove(0);
        if order {
            *expected.entry((user, at - at % HOUR)).or_default() += 1;
        }
    }
    expected
}

/// What one action of [`claims_in_memory_count_every_event_once`] does.
#[derive(Debug, Clone, Copy)]
enum Action {
    /// Appends the next new event.
    New,
    /// Appends a client's retry of an event appended before (the one at
    /// this index, modulo how many there are).
    Retry(usize),
    /// Runs a runner to the log's end: the claims made in memory are
    /// written at its flush.
    Run,
}

fn action() -> impl proptest::strategy::Strategy<Value = Action> {
    use proptest::prelude::*;
    prop_oneof![
        14 => Just(Action::New),
        4 => any::<usize>().prop_map(Action::Retry),
        1 => Just(Action::Run),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(10))]

    /// Retries anywhere, of ids claimed in memory in the same hold or
    /// written by an earlier run, with runs between them: every window
    /// counts each message id once.
    #[test]
    fn claims_in_memory_count_every_event_once(
        actions in proptest::collection::vec(action(), 40..140),
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (_dir, log_dir, log, store) = scratch(3).await;
            let base = (crate::store::now_ms() / HOUR + 2) * HOUR;
            let member = hourly_orders_member(&store, &unlimited());
            let mut appended = 0;
            for action in actions {
                match action {
                    Action::New => {
                        append_each(&log, base, [appended]).await;
                        appended += 1;
                    }
                    Action::Retry(_) if appended == 0 => {}
                    Action::Retry(i) => append_each(&log, base, [i % appended]).await,
                    Action::Run => run_to_end(runner(&log_dir, &log, &member)).await,
                }
            }
            run_to_end(runner(&log_dir, &log, &member)).await;
            tick(&store, &member, 0..3, base + 4 * HOUR).await;
            assert_eq!(
                closed_windows(&store, 1).await,
                hourly_orders_of(base, 0..appended)
            );
        });
    }
}

/// The closed windows of `orders_hourly` `version`, each written once.
async fn closed_windows(store: &Store, version: i64) -> BTreeMap<(String, i64), i64> {
    let stored = store
        .metric_windows(&WindowQuery {
            metric: "orders_hourly",
            version,
            limit: 1000,
            ..WindowQuery::default()
        })
        .await
        .unwrap();
    let got: BTreeMap<(String, i64), i64> = stored
        .iter()
        .map(|w| {
            assert_eq!(w.end_ms - w.start_ms, HOUR);
            assert_eq!(w.value, w.events.to_string());
            ((w.group.clone(), w.start_ms), w.events)
        })
        .collect();
    assert_eq!(stored.len(), got.len(), "each window written once");
    got
}

/// A version that joins a set behind the others (a backfill that has
/// caught up, or a member whose commit failed): the set reads from its
/// offsets, it counts the history, and the members ahead skip what they
/// counted; every version ends exact, and at the same offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_behind_the_others_catches_up_and_the_others_count_nothing_twice() {
    let (_dir, log_dir, log, store) = scratch(3).await;
    let base = (crate::store::now_ms() / HOUR + 2) * HOUR;
    let member = |version| {
        Arc::new(MetricProcessor::new(
            store.clone(),
            spec(),
            version,
            3,
            &unlimited(),
        ))
    };

    append(&log, base, 0..60).await;
    let ahead = member(1);
    run_to_end(runner(&log_dir, &log, &ahead)).await;
    append(&log, base, 60..130).await;
    let behind = member(2);
    let set = [ahead.clone(), behind.clone()];
    let runner = set_runner(&log_dir, &log, &set);
    let lowest = runner_offsets(&store, &set).await;
    assert!(lowest.is_empty(), "read from the beginning: {lowest:?}");
    run_to_end(runner).await;

    let one = store.offsets(ahead.name(), TOPIC).await.unwrap();
    let two = store.offsets(behind.name(), TOPIC).await.unwrap();
    assert_eq!(one, two);
    assert_eq!(one.values().sum::<i64>(), 130);
    for member in &set {
        tick(&store, member, 0..3, base + 4 * HOUR).await;
    }
    let expected = hourly_orders(base, 0..130);
    assert_eq!(closed_windows(&store, 1).await, expected);
    assert_eq!(closed_windows(&store, 2).await, expected);
}

/// Where a set of `members` starts reading.
async fn runner_offsets(store: &Store, members: &[Arc<MetricProcessor>]) -> HashMap<i32, i64> {
    MetricSet::new("metrics".into(), store.clone(), members.to_vec())
        .stored_offsets(TOPIC)
        .await
        .unwrap()
}

/// A global metric over 8 partitions (three of them empty), two
/// instances ticking their own partitions: a window is final only once
/// every partition's watermark has passed it, and then exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_window_is_final_only_when_every_partition_has_passed_it() {
    let (_dir, log_dir, log, store) = scratch(8).await;
    let base = (crate::store::now_ms() / HOUR + 2) * HOUR;
    let definition: MetricDefinition = serde_json::from_value(json!({
        "event": "order.create", "aggregate": "distinct", "field": "userId",
        "window": {"kind": "tumbling", "size": "1h"}, "lateness": "5m"
    }))
    .unwrap();
    let spec = definition.compile("buyers_hourly").unwrap();
    assert_eq!(spec.group_by, GroupBy::Global);

    append(&log, base, 0..130).await;
    let first = Arc::new(MetricProcessor::new(
        store.clone(),
        spec.clone(),
        1,
        8,
        &unlimited(),
    ));
    run_to_end(runner(&log_dir, &log, &first)).await;
    let query = WindowQuery {
        metric: "buyers_hourly",
        version: 1,
        limit: 1000,
        ..WindowQuery::default()
    };

    // One instance's partitions pass every window: nothing is final.
    tick(&store, &first, 0..5, base + 4 * HOUR).await;
    assert_eq!(store.metric_windows(&query).await.unwrap(), vec![]);
    // The other instance's partitions pass the first two hours only.
    let second = Arc::new(MetricProcessor::new(
        store.clone(),
        spec,
        1,
        8,
        &unlimited(),
    ));
    tick(&store, &second, 5..8, base + 2 * HOUR + 5 * 60_000).await;
    let got = store.metric_windows(&query).await.unwrap();
    assert_eq!(got.len(), 2, "the first two hours are final: {got:?}");
    tick(&store, &second, 5..8, base + 4 * HOUR).await;

    let mut expected: BTreeMap<i64, (BTreeSet<String>, i64)> = BTreeMap::new();
    for (user, at, order) in events(base, 0..130) {
        if order {
            let (users, events) = expected.entry(at - at % HOUR).or_default();
            users.insert(user);
            *events += 1;
        }
    }
    let got: BTreeMap<i64, (String, i64)> = store
        .metric_windows(&query)
        .await
        .unwrap()
        .into_iter()
        .map(|w| {
            assert_eq!(w.group, crate::metric::GLOBAL_GROUP);
            (w.start_ms, (w.value, w.events))
        })
        .collect();
    let expected: BTreeMap<i64, (String, i64)> = expected
        .into_iter()
        .map(|(start, (users, events))| (start, (users.len().to_string(), events)))
        .collect();
    assert_eq!(got, expected);
    assert_eq!(got.len(), 3);
}

#[test]
fn runners_at_their_part_of_the_budget_split_what_the_others_leave() {
    let budget = StateBudget::new(1_000);
    let mut parts: Vec<BudgetShare> = (0..4).map(|_| budget.share()).collect();
    // Under its even part, a runner may grow to it and no further.
    assert_eq!(parts[0].bytes(), 250);
    parts[0].hold(250);
    parts[1].hold(400);
    parts[2].hold(50);
    // The two at their part split what the other two leave: 200 + 250.
    assert_eq!(parts[0].bytes(), 250 + 225);
    assert_eq!(parts[1].bytes(), 250 + 225);
    assert_eq!(parts[2].bytes(), 250);
    // A runner that grows to its part takes its room back.
    parts[3].hold(250);
    assert_eq!(parts[1].bytes(), 250 + 200 / 3);
    // A runner that stops gives its part to the rest.
    drop(parts.remove(2));
    assert_eq!(parts[1].bytes(), 333 + 2 * 83);
    assert_eq!(
        budget.runners().values().copied().collect::<Vec<_>>(),
        vec![250, 400, 250]
    );
    let newcomer = budget.share();
    assert_eq!(newcomer.bytes(), 250);
}
