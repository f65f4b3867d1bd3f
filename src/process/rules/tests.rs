//! A rule through the runner, on the embedded log and a SQLite store:
//! seed 004's fraud rule makes exactly the alerts it should, across a
//! restart mid-pattern and a second pass over the log.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;

use super::*;
use crate::definitions::RuleDefinition;
use crate::log::embedded::{EmbeddedLog, EmbeddedReader};
use crate::log::{EventLog, Record, StartAt};
use crate::process::metric_set::Set;
use crate::process::metric_set::testing::{self, run_to_end};
use crate::process::{Runner, RunnerSettings};
use crate::store::AlertQuery;

const TOPIC: &str = "events";
const MINUTE: i64 = 60_000;

fn fraud() -> RuleSpec {
    card_testing(json!({
        "steps": [{"name": "small", "where": "event == \"payment\" && properties.amount < 100", "times": {"min": 3}},
                  {"name": "large", "where": "event == \"payment\" && properties.amount > 1000"}],
        "within": "5m", "lateness": "1m"
    }))
}

fn card_testing(definition: Value) -> RuleSpec {
    let definition: RuleDefinition = serde_json::from_value(definition).unwrap();
    definition.compile("card_testing").unwrap()
}

/// A new embedded log of three partitions in a temporary directory
/// (kept while the first value lives), its directory, and a SQLite store
/// beside it.
async fn scratch() -> (
    tempfile::TempDir,
    std::path::PathBuf,
    Arc<EmbeddedLog>,
    Store,
) {
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("log");
    let topics = [TOPIC.to_owned(), "rejected".to_owned()];
    let log = Arc::new(EmbeddedLog::open(&log_dir, 3, &topics).unwrap());
    let store = Store::open(None, dir.path()).await.unwrap();
    (dir, log_dir, log, store)
}

/// Payments: (user, seconds after `base`, amount, message id).
async fn pay(log: &EmbeddedLog, base: i64, payments: &[(&str, i64, u32, &str)]) {
    let records = payments
        .iter()
        .map(|(user, after, amount, id)| {
            let at = DateTime::<Utc>::from_timestamp_millis(base + after * 1_000).unwrap();
            let envelope = json!({
                "type": "track", "event": "payment", "userId": user, "messageId": id,
                "properties": {"amount": amount}, "timestamp": at.to_rfc3339(),
            });
            Record {
                key: Some((*user).to_owned()),
                value: envelope.to_string().into_bytes(),
            }
        })
        .collect();
    log.append(TOPIC, records).await.unwrap();
}

fn runner(
    dir: &std::path::Path,
    log: &Arc<EmbeddedLog>,
    rule: &Arc<RuleProcessor>,
) -> Runner<Set<RuleProcessor>> {
    let set = Set::new("rules".into(), rule.store.clone(), vec![rule.clone()]);
    set_runner(dir, log, set)
}

/// A runner of `set` that reads the log to its end in small batches.
fn set_runner<M: crate::process::metric_set::Member>(
    dir: &std::path::Path,
    log: &Arc<EmbeddedLog>,
    set: Set<M>,
) -> Runner<Set<M>> {
    let reader = Box::new(EmbeddedReader::open(dir, TOPIC, StartAt::Beginning).unwrap());
    let settings = RunnerSettings {
        max_batch: 3,
        max_wait: Duration::from_millis(10),
        stop_when_caught_up: true,
        tick: Duration::ZERO,
        ..RunnerSettings::new(M::RUNNER, TOPIC.to_owned(), "rejected".to_owned())
    };
    Runner::new(Arc::new(set), reader, log.clone(), settings)
}

/// The time hook on a quiet log: `partitions`' clocks at `time_ms`.
async fn tick(rule: &Arc<RuleProcessor>, partitions: std::ops::Range<i32>, time_ms: i64) {
    testing::tick(&rule.store, rule, TOPIC, partitions, time_ms).await;
}

fn partition_of(user: &str) -> i32 {
    crate::log::partitioner::partition_for_key(user.as_bytes(), 3)
}

/// Each alert's key and message ids, oldest first.
async fn alerts(store: &Store) -> Vec<(String, Vec<String>)> {
    let query = AlertQuery {
        rule: Some("card_testing"),
        limit: 100,
        ..AlertQuery::default()
    };
    let mut got: Vec<(String, Vec<String>)> = store
        .alerts(&query)
        .await
        .unwrap()
        .into_iter()
        .map(|a| {
            let body: Value = serde_json::from_str(&a.body).unwrap();
            let ids = body["message_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect();
            (a.key, ids)
        })
        .collect();
    got.sort();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fraud_rule_alerts_once_across_a_restart_mid_pattern_and_a_second_pass() {
    let (_dir, log_dir, log, store) = scratch().await;
    // Event times ahead of the log's clock (its append times): nothing is
    // late, and the tick below takes them all.
    let base = crate::store::now_ms() + 10 * MINUTE;

    // u1 makes two small payments, and the service stops.
    pay(
        &log,
        base,
        &[
            ("u1", 0, 20, "a1"),
            ("u1", 10, 30, "a2"),
            ("u2", 0, 50, "b1"),
        ],
    )
    .await;
    let first = Arc::new(RuleProcessor::new(store.clone(), fraud(), 1));
    run_to_end(runner(&log_dir, &log, &first)).await;
    // The watermark passes them: u1's partial match (two of three small
    // payments) is stored, and goes on after the restart.
    tick(&first, 0..3, base + 2 * MINUTE).await;
    let (_, held) = store
        .rule_states(first.name(), TOPIC, partition_of("u1"))
        .await
        .unwrap();
    assert!(held[0].1.contains("a2"), "{held:?}");
    drop(first);

    // After the restart: u1's third small payment and a large one (one
    // alert); u2 pays large after two small only; u3 after three small,
    // but six minutes after the first.
    pay(
        &log,
        base,
        &[
            ("u1", 90, 40, "a3"),
            ("u1", 100, 5_000, "a4"),
            ("u2", 90, 60, "b2"),
            ("u2", 100, 2_000, "b3"),
            ("u3", 90, 10, "c1"),
            ("u3", 100, 10, "c2"),
            ("u3", 110, 10, "c3"),
            ("u3", 450, 3_000, "c4"),
        ],
    )
    .await;
    let second = Arc::new(RuleProcessor::new(store.clone(), fraud(), 1));
    run_to_end(runner(&log_dir, &log, &second)).await;
    assert!(
        alerts(&store).await.is_empty(),
        "events wait for the watermark"
    );
    tick(&second, 0..3, base + 20 * MINUTE).await;
    let expected = vec![(
        "u1".to_owned(),
        vec!["a1".into(), "a2".into(), "a3".into(), "a4".into()],
    )];
    assert_eq!(alerts(&store).await, expected);

    // A second pass over the whole log, and a tick again: nothing new.
    run_to_end(runner(&log_dir, &log, &second)).await;
    tick(&second, 0..3, base + 30 * MINUTE).await;
    assert_eq!(alerts(&store).await, expected);
    // Every partial match is pruned or complete: nothing held.
    for partition in 0..3 {
        let (_, states) = store
            .rule_states(second.name(), TOPIC, partition)
            .await
            .unwrap();
        assert_eq!(states, vec![], "partition {partition}");
    }
}

/// Seed 004's rule as the issue words it: the large payment is large
/// against the small ones (more than ten times their average), so each
/// user's own habits set the bar. The small payments' amounts are kept
/// with the partial match across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_compares_with_the_values_of_earlier_steps_across_a_restart() {
    let (_dir, log_dir, log, store) = scratch().await;
    let base = crate::store::now_ms() + 10 * MINUTE;
    let relative = || {
        card_testing(json!({
            "steps": [{"name": "small", "where": "event == \"payment\" && properties.amount < 100", "times": {"min": 3}},
                      {"name": "large", "where": "event == \"payment\" && properties.amount > 10.0 * avg(small.amount)"}],
            "within": "5m"
        }))
    };
    pay(
        &log,
        base,
        &[
            ("u1", 0, 20, "a1"),
            ("u1", 1, 30, "a2"),
            ("u1", 2, 40, "a3"),
            ("u2", 0, 20, "b1"),
            ("u2", 1, 30, "b2"),
            ("u2", 2, 40, "b3"),
            ("u3", 0, 90, "c1"),
            ("u3", 1, 90, "c2"),
            ("u3", 2, 90, "c3"),
        ],
    )
    .await;
    let first = Arc::new(RuleProcessor::new(store.clone(), relative(), 1));
    run_to_end(runner(&log_dir, &log, &first)).await;
    tick(&first, 0..3, base + 10_000).await;
    drop(first);

    // u1: 500 is more than ten times 30. u2: 250 is not, 400 is. u3: 800
    // is not ten times 90, and is no small payment either.
    pay(
        &log,
        base,
        &[
            ("u1", 20, 500, "a4"),
            ("u2", 20, 250, "b4"),
            ("u2", 30, 400, "b5"),
            ("u3", 20, 800, "c4"),
        ],
    )
    .await;
    let second = Arc::new(RuleProcessor::new(store.clone(), relative(), 1));
    run_to_end(runner(&log_dir, &log, &second)).await;
    tick(&second, 0..3, base + 20 * MINUTE).await;
    let ids = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        alerts(&store).await,
        vec![
            ("u1".to_owned(), ids(&["a1", "a2", "a3", "a4"])),
            ("u2".to_owned(), ids(&["b1", "b2", "b3", "b5"])),
        ]
    );
    // Each step's events carry the values the rule compared.
    let query = AlertQuery {
        key: Some("u2"),
        limit: 1,
        ..AlertQuery::default()
    };
    let body: Value = serde_json::from_str(&store.alerts(&query).await.unwrap()[0].body).unwrap();
    let amounts = |step: &str| -> Vec<u64> {
        body["steps"][step]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["properties"]["amount"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(
        (amounts("small"), amounts("large")),
        (vec![20, 30, 40], vec![400])
    );
}

/// A GDPR deletion of a user, in order with its events: the payments
/// before it are forgotten (two small ones before and one after make no
/// match), and the rule's earlier alerts of the user go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_user_leaves_no_partial_match_and_no_alert() {
    let (_dir, log_dir, log, store) = scratch().await;
    let base = crate::store::now_ms() + 10 * MINUTE;
    let rule = Arc::new(RuleProcessor::new(store.clone(), fraud(), 1));

    // An alert for u1, then two small payments (a partial match), then
    // the deletion.
    pay(
        &log,
        base,
        &[
            ("u1", 0, 10, "a1"),
            ("u1", 1, 10, "a2"),
            ("u1", 2, 10, "a3"),
            ("u1", 3, 2_000, "a4"),
        ],
    )
    .await;
    run_to_end(runner(&log_dir, &log, &rule)).await;
    tick(&rule, 0..3, base + MINUTE + 30_000).await;
    assert_eq!(
        alerts(&store).await.len(),
        1,
        "the alert before the deletion"
    );
    pay(&log, base, &[("u1", 40, 10, "b1"), ("u1", 41, 10, "b2")]).await;
    run_to_end(runner(&log_dir, &log, &rule)).await;
    tick(&rule, 0..3, base + MINUTE + 50_000).await;
    let partition = partition_of("u1");
    let (_, held) = store
        .rule_states(rule.name(), TOPIC, partition)
        .await
        .unwrap();
    assert!(held[0].1.contains("b2"), "{held:?}");
    let deletion = json!({"type": "delete", "userId": "u1", "messageId": "d1",
                          "timestamp": DateTime::<Utc>::from_timestamp_millis(base + 62_000).unwrap().to_rfc3339()});
    log.append(
        TOPIC,
        vec![Record {
            key: Some("u1".to_owned()),
            value: deletion.to_string().into_bytes(),
        }],
    )
    .await
    .unwrap();
    run_to_end(runner(&log_dir, &log, &rule)).await;
    assert_eq!(alerts(&store).await, vec![], "the alert is gone");
    let (_, held) = store
        .rule_states(rule.name(), TOPIC, partition)
        .await
        .unwrap();
    assert_eq!(held, vec![], "the partial match is gone");

    // After the deletion: one small and a large payment.
    pay(&log, base, &[("u1", 70, 10, "c1"), ("u1", 71, 2_000, "c2")]).await;
    run_to_end(runner(&log_dir, &log, &rule)).await;
    tick(&rule, 0..3, base + 20 * MINUTE).await;
    assert_eq!(alerts(&store).await, vec![], "forgotten, and no new match");
}

/// Batches held back under a backlog (every batch of 3 is full) whose
/// write the store refuses: read again from the store's offsets while
/// the fault lasts; afterwards the rule alerts exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_held_back_whose_write_fails_are_read_again_and_alert_once() {
    let (_dir, log_dir, log, store) = scratch().await;
    let base = crate::store::now_ms() + 10 * MINUTE;
    pay(
        &log,
        base,
        &[
            ("u1", 0, 20, "a1"),
            ("u2", 0, 20, "b1"),
            ("u1", 10, 30, "a2"),
            ("u1", 20, 40, "a3"),
            ("u2", 10, 20, "b2"),
            ("u1", 30, 5_000, "a4"),
            ("u3", 0, 9_000, "c1"),
        ],
    )
    .await;
    store.refuse_inserts("rule_state").await;
    let rule = Arc::new(RuleProcessor::new(store.clone(), fraud(), 1));
    let runner = runner(&log_dir, &log, &rule);
    let stats = runner.stats();
    let running = tokio::spawn(runner.run(std::future::pending()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while stats.lock().unwrap().fenced < 2 {
        assert!(tokio::time::Instant::now() < deadline, "read again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(store.offsets(rule.name(), TOPIC).await.unwrap().is_empty());
    store.allow_inserts().await;
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the runner reads the log to its end once the store takes writes")
        .unwrap()
        .expect("the runner does not fail");
    tick(&rule, 0..3, base + 20 * MINUTE).await;
    assert_eq!(
        alerts(&store).await,
        vec![(
            "u1".to_owned(),
            vec!["a1".into(), "a2".into(), "a3".into(), "a4".into()]
        )]
    );
}

/// Under a backlog a rule holds its matches back with the batches that
/// made them, up to a bound: the batch that reaches it is written at
/// once, its alerts with its offsets; below it nothing is written until
/// the rule writes what it held back.
#[tokio::test]
async fn a_rule_writes_a_backlogs_batch_at_once_when_its_matches_reach_the_bound() {
    use crate::log::StoredRecord;
    use crate::process::{Checkpoint, OffsetAdvance, PartitionTime, Processor};

    let base = crate::store::now_ms() - 30 * MINUTE;
    // Two users' card testing, both complete in one batch.
    let payments = [
        ("u1", 0, 20, "a1"),
        ("u2", 0, 20, "b1"),
        ("u1", 10, 30, "a2"),
        ("u2", 10, 30, "b2"),
        ("u1", 20, 40, "a3"),
        ("u2", 20, 40, "b3"),
        ("u1", 30, 5_000, "a4"),
        ("u2", 30, 5_000, "b4"),
    ];
    let records = || {
        payments
            .iter()
            .enumerate()
            .map(|(offset, (user, after, amount, id))| {
                let at = DateTime::<Utc>::from_timestamp_millis(base + after * 1_000).unwrap();
                let envelope = json!({
                    "type": "track", "event": "payment", "userId": user, "messageId": id,
                    "properties": {"amount": amount}, "timestamp": at.to_rfc3339(),
                });
                StoredRecord {
                    topic: TOPIC.into(),
                    partition: 0,
                    offset: offset as i64,
                    timestamp_ms: base + after * 1_000,
                    key: Some(user.as_bytes().to_vec().into()),
                    value: envelope.to_string().into(),
                }
            })
            .collect()
    };
    // The clock far past the payments and the rule's lateness: the batch
    // completes both matches.
    let backlog = || Checkpoint {
        topic: TOPIC.into(),
        offsets: vec![OffsetAdvance {
            partition: 0,
            expected: None,
            next: payments.len() as i64,
        }],
        clocks: vec![PartitionTime {
            partition: 0,
            time_ms: base + 20 * MINUTE,
        }],
        backlog: true,
    };
    let both = vec![
        (
            "u1".to_owned(),
            vec!["a1".into(), "a2".into(), "a3".into(), "a4".into()],
        ),
        (
            "u2".to_owned(),
            vec!["b1".into(), "b2".into(), "b3".into(), "b4".into()],
        ),
    ];

    for (bound, written_at_once) in [(3, false), (2, true)] {
        let (_dir, _log_dir, _log, store) = scratch().await;
        let rule = Arc::new(RuleProcessor::new(store.clone(), fraud(), 1).holding_at_most(bound));
        let set = Set::new("rules".into(), store.clone(), vec![rule.clone()]);
        let (prepared, _) = set.prepare(records());
        set.commit(&prepared, backlog()).await.unwrap();
        let stored = store.offsets(rule.name(), TOPIC).await.unwrap();
        if written_at_once {
            assert_eq!(alerts(&store).await, both, "bound {bound}: written at once");
            assert_eq!(stored.get(&0), Some(&(payments.len() as i64)));
        } else {
            assert_eq!(alerts(&store).await, vec![], "bound {bound}: held back");
            assert!(stored.is_empty(), "bound {bound}: no offset stored yet");
            set.flush().await.unwrap();
            assert_eq!(
                alerts(&store).await,
                both,
                "bound {bound}: written by the flush"
            );
        }
    }
}

/// The live metrics and rules run as one set: each event is parsed once
/// and its message id claimed once for both kinds, so a client's retry of
/// a payment (its message id again, later in the log) is neither counted
/// by the metric nor taken by the rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metric_and_a_rule_in_one_set_each_take_a_retried_event_once() {
    use crate::definitions::MetricDefinition;
    use crate::process::defined::Defined;
    use crate::process::metrics::{MetricProcessor, StateBudget};
    use crate::store::WindowQuery;

    let (_dir, log_dir, log, store) = scratch().await;
    let base = crate::store::now_ms() + 10 * MINUTE;
    pay(
        &log,
        base,
        &[
            ("u1", 0, 20, "a1"),
            ("u1", 10, 30, "a2"),
            ("u1", 20, 40, "a3"),
            ("u1", 25, 30, "a2"),
            ("u1", 30, 5_000, "a4"),
        ],
    )
    .await;
    let payments: MetricDefinition = serde_json::from_value(json!({
        "type": "track", "event": "payment", "group_by": "userId",
        "aggregate": "count", "window": {"kind": "tumbling", "size": "1h"}
    }))
    .unwrap();
    let budget = StateBudget::new(usize::MAX);
    let metric = MetricProcessor::new(
        store.clone(),
        payments.compile("payments").unwrap(),
        1,
        3,
        &budget,
    );
    let members = vec![
        Arc::new(Defined::Metric(Arc::new(metric))),
        Arc::new(Defined::Rule(Arc::new(RuleProcessor::new(
            store.clone(),
            fraud(),
            1,
        )))),
    ];
    let set = Set::new("definitions".into(), store.clone(), members.clone());
    run_to_end(set_runner(&log_dir, &log, set)).await;
    // The watermark passes the hour the payments are in.
    for member in &members {
        testing::tick(&store, member, TOPIC, 0..3, base + 120 * MINUTE).await;
    }

    let expected = vec![(
        "u1".to_owned(),
        vec!["a1".into(), "a2".into(), "a3".into(), "a4".into()],
    )];
    assert_eq!(alerts(&store).await, expected);
    let query = WindowQuery {
        metric: "payments",
        version: 1,
        group: Some("u1"),
        limit: 10,
        ..WindowQuery::default()
    };
    let windows = store.metric_windows(&query).await.unwrap();
    assert!(!windows.is_empty(), "the payments' windows closed");
    assert_eq!(
        windows.iter().map(|w| w.events).sum::<i64>(),
        4,
        "{windows:?}"
    );
}
