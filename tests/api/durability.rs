//! Durability of the embedded log: a 2xx means the event is on disk, so a
//! SIGKILL during concurrent load loses no acknowledged event, and recovery
//! after it stores none twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;
use tokio::sync::Mutex;
use traitline::config::{Config, Settings};
use traitline::log::Topics;

use crate::helpers::{
    ServiceProcess, TestDir, WRITE_KEY, embedded_env, env_refs, eventually, read_all,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_event() {
    let dir = TestDir::new();
    let env = embedded_env(dir.path());
    let mut service = ServiceProcess::start(dir.path(), "first", &[], &env_refs(&env)).await;

    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let answered = Arc::new(AtomicU64::new(0));
    let client = crate::helpers::client_builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut workers = Vec::new();
    for worker in 0..16 {
        let (client, url) = (client.clone(), service.url("/v1/batch"));
        let (acknowledged, answered) = (acknowledged.clone(), answered.clone());
        workers.push(tokio::spawn(async move {
            for i in 0.. {
                let ids: Vec<String> = (0..5).map(|j| format!("w{worker}-r{i}-e{j}")).collect();
                let batch: Vec<_> = ids
                    .iter()
                    .map(|id| json!({"type": "track", "userId": format!("u{worker}"), "event": "e", "messageId": id}))
                    .collect();
                let response = client
                    .post(&url)
                    .basic_auth(WRITE_KEY, Some(""))
                    .json(&json!({"batch": batch}))
                    .send()
                    .await;
                match response {
                    Ok(r) if r.status().is_success() => {
                        acknowledged.lock().await.extend(ids);
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => panic!("unexpected answer {} before the kill", r.status()),
                    Err(_) => return, // the service is gone
                }
            }
        }));
    }
    // Kill in the middle of the load, once plenty has been acknowledged.
    eventually("500 acknowledged requests", Duration::from_secs(60), || {
        let n = answered.load(Ordering::Relaxed);
        async move { n >= 500 }
    })
    .await;
    service.kill();
    for worker in workers {
        worker.await.unwrap();
    }

    // Restart on the same data directory: recovery cuts any torn write.
    let restarted = ServiceProcess::start(dir.path(), "second", &[], &env_refs(&env)).await;
    let config = Config::from_settings(Settings {
        data_dir: Some(dir.path().join("data")),
        ..Settings::default()
    })
    .unwrap();
    let records = read_all(&config, &Topics::new("").events()).await;
    let mut copies: HashMap<String, u32> = HashMap::new();
    for record in &records {
        let event: serde_json::Value = serde_json::from_slice(&record.value).unwrap();
        *copies
            .entry(event["messageId"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let acknowledged = acknowledged.lock().await;
    assert!(acknowledged.len() >= 2500);
    for id in acknowledged.iter() {
        assert_eq!(
            copies.get(id),
            Some(&1),
            "acknowledged event {id} is stored exactly once"
        );
    }
    assert!(copies.values().all(|n| *n == 1), "no event is stored twice");

    // And the restarted service appends after the recovered records.
    let response = client
        .post(restarted.url("/v1/track"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&json!({"userId": "after", "event": "e", "messageId": "after-restart"}))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let after = read_all(&config, &Topics::new("").events()).await;
    assert_eq!(after.len(), records.len() + 1);
}

/// Sends one batch until the service answers 2xx, as an SDK retries: the
/// same events, the same message ids.
async fn send_until_accepted(client: &reqwest::Client, url: &str, batch: &serde_json::Value) {
    crate::helpers::eventually("a batch accepted", Duration::from_secs(60), || async {
        let response = client
            .post(url)
            .basic_auth(WRITE_KEY, Some(""))
            .json(batch)
            .send()
            .await;
        match response {
            Ok(r) if r.status().is_success() => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

/// Sends `sends` in three parts, killing the service (SIGKILL) after the
/// first two while its processors are still working through them, and
/// starting it again on the same data; the service as it runs after.
async fn send_killing_twice(
    mut service: ServiceProcess,
    dir: &TestDir,
    env: &[(&'static str, String)],
    client: &reqwest::Client,
    sends: &[&serde_json::Value],
) -> ServiceProcess {
    for (round, part) in sends.chunks(sends.len().div_ceil(3)).enumerate() {
        for batch in part {
            send_until_accepted(client, &service.url("/v1/batch"), batch).await;
        }
        if round < 2 {
            service.kill();
            service =
                ServiceProcess::start(dir.path(), &format!("restart-{round}"), &[], &env_refs(env))
                    .await;
        }
    }
    service
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_count_every_event_once_across_two_sigkills() {
    const USERS: usize = 500;
    const PER_USER: usize = 100;
    let dir = TestDir::new();
    let env = embedded_env(dir.path());
    let client = crate::helpers::client_builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    // 50,000 events in 100-event batches, user-major within each batch;
    // one batch in ten is sent a second time (a client retry).
    let batches: Vec<serde_json::Value> = (0..USERS * PER_USER / 100)
        .map(|b| {
            let events: Vec<_> = (0..100)
                .map(|j| {
                    let n = b * 100 + j;
                    let event = if n % 3 == 0 { "Buy" } else { "View" };
                    json!({"type": "track", "userId": format!("k{}", n % USERS), "event": event, "messageId": format!("k-{n}")})
                })
                .collect();
            json!({"batch": events})
        })
        .collect();
    let mut sends: Vec<&serde_json::Value> = Vec::new();
    for (i, batch) in batches.iter().enumerate() {
        sends.push(batch);
        if i % 10 == 0 {
            sends.push(batch);
        }
    }

    let service = ServiceProcess::start(dir.path(), "first", &[], &env_refs(&env)).await;
    let service = send_killing_twice(service, &dir, &env, &client, &sends).await;

    eventually(
        "every event processed",
        Duration::from_secs(120),
        || async { processed(&service.profiles(&client).await) >= (USERS * PER_USER) as u64 },
    )
    .await;
    let profiles = service.profiles(&client).await;
    assert_eq!(profiles.len(), USERS);
    for profile in &profiles {
        let user: usize = profile["user_id"].as_str().unwrap()[1..].parse().unwrap();
        let buys = (0..PER_USER)
            .filter(|k| (k * USERS + user).is_multiple_of(3))
            .count() as u64;
        assert_eq!(profile["event_count"], PER_USER as u64, "{profile}");
        assert_eq!(
            profile["event_counts"]["Buy"].as_u64().unwrap_or(0),
            buys,
            "{profile}"
        );
    }
}

/// Two processes in one consumer group share one PostgreSQL store; one is
/// killed mid-stream and the survivor takes over its partitions: the
/// profiles and two metrics (per user and global, each a runner of every
/// instance in a group of its own) count every event once.
///
/// The broker is librdkafka's mock cluster (its TCP listener, shared by the
/// two processes), not tansu: tansu 0.6.0 does not give a dead member's
/// partitions to the survivors (its JoinGroup keeps generation 1 and
/// SyncGroup returns the old assignment), so a failover cannot happen on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_in_one_consumer_group_lose_and_double_nothing_when_one_is_killed() {
    tokio::time::timeout(Duration::from_secs(240), failover())
        .await
        .expect("the failover test finishes");
}

async fn failover() {
    const USERS: usize = 200;
    const PER_USER: usize = 100;
    let dir = TestDir::new();
    let (_cluster, _prefix, env) = crate::helpers::consumer_group_env(dir.path(), "cg").await;
    let first = ServiceProcess::start(dir.path(), "first", &[], &env_refs(&env)).await;
    let client = crate::helpers::client_builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    // A day's lateness: every window stays open, so the totals read are
    // the window state the instances committed.
    for (name, definition) in [
        (
            "events_per_user",
            json!({"group_by": "userId", "aggregate": "count",
                   "window": {"kind": "tumbling", "size": "1d"}, "lateness": "1d"}),
        ),
        (
            "events_total",
            json!({"aggregate": "count", "window": {"kind": "tumbling", "size": "1d"}, "lateness": "1d"}),
        ),
    ] {
        define_metric(
            &client,
            &first.url(&format!("/v1/metrics/{name}")),
            &definition,
        )
        .await;
    }
    let mut second = ServiceProcess::start(dir.path(), "second", &[], &env_refs(&env)).await;
    let batches = USERS * PER_USER / 100;
    for b in 0..batches {
        let events: Vec<_> = (0..100)
            .map(|j| {
                let n = b * 100 + j;
                json!({"type": "track", "userId": format!("g{}", n % USERS), "event": "E", "messageId": format!("g-{n}")})
            })
            .collect();
        // Ingest alternates between the two instances until one is killed.
        let target = if b % 2 == 0 || b > batches / 2 {
            &first
        } else {
            &second
        };
        send_until_accepted(&client, &target.url("/v1/batch"), &json!({"batch": events})).await;
        if b == batches / 2 {
            // Both process once the group has settled; then one dies.
            let half = (b as u64 + 1) * 100;
            eventually(
                "both instances to process",
                Duration::from_secs(60),
                || async { processed(&first.profiles(&client).await) >= half / 2 },
            )
            .await;
            second.kill();
        }
    }

    eventually(
        "the survivor to process every event",
        Duration::from_secs(120),
        || async { processed(&first.profiles(&client).await) >= (USERS * PER_USER) as u64 },
    )
    .await;
    let profiles = first.profiles(&client).await;
    assert_eq!(profiles.len(), USERS);
    assert!(
        profiles.iter().all(|p| p["event_count"] == PER_USER as u64),
        "every user counted exactly"
    );
    let counted = |query: String| {
        let (client, url) = (client.clone(), first.url(&query));
        async move {
            window_values(&client, &url)
                .await
                .iter()
                .filter_map(|w| w["value"].as_u64())
                .sum::<u64>()
        }
    };
    let total = eventually(
        "the global metric to count every event",
        Duration::from_secs(120),
        || async {
            let got = counted("/v1/metrics/events_total/values".to_owned()).await;
            (got >= (USERS * PER_USER) as u64).then_some(got)
        },
    )
    .await;
    assert_eq!(total, (USERS * PER_USER) as u64, "every event counted once");
    for user in 0..USERS {
        let query = format!("/v1/metrics/events_per_user/values?group=g{user}");
        let got = eventually("the user's windows", Duration::from_secs(60), || async {
            let got = counted(query.clone()).await;
            (got >= PER_USER as u64).then_some(got)
        })
        .await;
        assert_eq!(got, PER_USER as u64, "user g{user} counted exactly");
    }
    let log =
        |name: &str| std::fs::read_to_string(dir.path().join(format!("{name}.stderr"))).unwrap();
    assert!(
        log("second").contains("gave this instance partitions ["),
        "the second instance had partitions"
    );
    let first = log("first");
    let after_revoke = first
        .split_once("took partitions")
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    assert!(
        after_revoke.contains("gave this instance partitions [0, 1, 2, 3]"),
        "the survivor got every partition after the kill:\n{first}"
    );
}

/// Defines a metric through the admin API at `url`.
async fn define_metric(client: &reqwest::Client, url: &str, definition: &serde_json::Value) {
    let response = client
        .put(url)
        .basic_auth(crate::helpers::ADMIN_KEY, Some(""))
        .json(definition)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
}

/// The windows a metric values URL answers (closed, then open).
async fn window_values(client: &reqwest::Client, url: &str) -> Vec<serde_json::Value> {
    let response = client
        .get(url)
        .basic_auth(crate::helpers::READ_KEY, Some(""))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = response.json().await.unwrap();
    body["values"].as_array().cloned().unwrap_or_default()
}

/// Events applied over all `profiles`.
fn processed(profiles: &[serde_json::Value]) -> u64 {
    profiles
        .iter()
        .map(|p| p["event_count"].as_u64().unwrap_or(0))
        .sum()
}

/// Two metrics, per user and global, through two SIGKILLs while events
/// (with client retries) stream in: every window counts every event once,
/// as computed from the events sent. A day's lateness keeps the windows
/// open (none of the events is late), so what is checked is the window
/// state each commit stored and each restart read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_every_event_once_across_two_sigkills() {
    use std::collections::BTreeMap;
    const HOUR: i64 = 3_600_000;
    const USERS: usize = 200;
    const EVENTS: usize = 30_000;
    let dir = TestDir::new();
    let env = embedded_env(dir.path());
    let client = crate::helpers::client_builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let base = (chrono::Utc::now().timestamp_millis() / HOUR - 3) * HOUR;
    let mut per_user: BTreeMap<(String, i64), u64> = BTreeMap::new();
    let mut global: BTreeMap<i64, f64> = BTreeMap::new();
    let batches: Vec<serde_json::Value> = (0..EVENTS / 100)
        .map(|b| {
            let events: Vec<_> = (0..100)
                .map(|j| {
                    let n = b * 100 + j;
                    let user = format!("k{}", n % USERS);
                    let at = base + (n as i64 * 7_919) % (2 * HOUR);
                    let hour = at - at % HOUR;
                    *per_user.entry((user.clone(), hour)).or_default() += 1;
                    *global.entry(hour).or_default() += (n % 7) as f64;
                    json!({"type": "track", "userId": user, "event": "order.create",
                           "messageId": format!("m-{n}"), "properties": {"amount": n % 7},
                           "timestamp": chrono::DateTime::<chrono::Utc>::from_timestamp_millis(at)
                               .unwrap().to_rfc3339()})
                })
                .collect();
            json!({"batch": events})
        })
        .collect();
    let mut sends: Vec<&serde_json::Value> = Vec::new();
    for (i, batch) in batches.iter().enumerate() {
        sends.push(batch);
        if i % 10 == 0 {
            sends.push(batch);
        }
    }

    let service = ServiceProcess::start(dir.path(), "first", &[], &env_refs(&env)).await;
    for (name, definition) in [
        (
            "orders_hourly",
            json!({"event": "order.create", "group_by": "userId",
            "aggregate": "count", "window": {"kind": "tumbling", "size": "1h"}, "lateness": "1d"}),
        ),
        (
            "revenue_hourly",
            json!({"event": "order.create", "aggregate": "sum",
            "field": "properties.amount", "window": {"kind": "tumbling", "size": "1h"}, "lateness": "1d"}),
        ),
    ] {
        define_metric(
            &client,
            &service.url(&format!("/v1/metrics/{name}")),
            &definition,
        )
        .await;
    }
    let service = send_killing_twice(service, &dir, &env, &client, &sends).await;

    let values = |query: String| {
        let (client, url) = (client.clone(), service.url(&query));
        async move { window_values(&client, &url).await }
    };
    let start_of = |w: &serde_json::Value| {
        chrono::DateTime::parse_from_rfc3339(w["start"].as_str().unwrap())
            .unwrap()
            .timestamp_millis()
    };
    let read_all_windows = || async {
        let mut got: BTreeMap<(String, i64), u64> = BTreeMap::new();
        for user in 0..USERS {
            let query = format!("/v1/metrics/orders_hourly/values?group=k{user}");
            for w in values(query).await {
                got.insert(
                    (format!("k{user}"), start_of(&w)),
                    w["value"].as_u64().unwrap(),
                );
            }
        }
        got
    };
    let expected_total: u64 = per_user.values().sum();
    let got = eventually(
        "every event in the per-user windows",
        Duration::from_secs(120),
        || async {
            let got = read_all_windows().await;
            (got.values().sum::<u64>() >= expected_total).then_some(got)
        },
    )
    .await;
    assert_eq!(got, per_user);
    let expected_revenue: f64 = global.values().sum();
    let got = eventually(
        "every event in the global windows",
        Duration::from_secs(60),
        || async {
            let windows = values("/v1/metrics/revenue_hourly/values".to_owned()).await;
            let got: BTreeMap<i64, f64> = windows
                .iter()
                .map(|w| (start_of(w), w["value"].as_f64().unwrap()))
                .collect();
            (got.values().sum::<f64>() >= expected_revenue).then_some(got)
        },
    )
    .await;
    assert_eq!(got, global);
}

/// Seed 004's fraud rule through a SIGKILL mid-pattern: each of 50 users
/// makes two small payments, the rule takes them (its partial matches
/// are stored), the service is killed; after the restart each user's
/// third small payment and a large one make exactly one alert, on the API
/// and on `user_alerts`, none doubled. The clients' retries of a batch
/// (the same message ids) change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_alerts_once_across_a_sigkill_mid_pattern() {
    const USERS: usize = 50;
    let dir = TestDir::new();
    let mut env = embedded_env(dir.path());
    // A quiet log's clock follows the wall clock closely, so the last
    // payments are taken without further traffic.
    env.push(("TRAITLINE_APPEND_TIMEOUT_MS", "500".to_owned()));
    env.push(("TRAITLINE_CLOCK_SKEW_MS", "0".to_owned()));
    let client = crate::helpers::client_builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let payments = |from: usize, amounts: &[u32]| {
        let events: Vec<_> = (0..USERS)
            .flat_map(|u| {
                amounts.iter().enumerate().map(move |(i, amount)| {
                    json!({"type": "track", "event": "payment", "userId": format!("p{u}"),
                           "messageId": format!("p{u}-{}", from + i),
                           "properties": {"amount": amount}})
                })
            })
            .collect();
        json!({"batch": events})
    };
    let mut service = ServiceProcess::start(dir.path(), "first", &[], &env_refs(&env)).await;
    let rule = json!({
        "steps": [{"name": "small", "where": "event == \"payment\" && properties.amount < 100", "times": {"min": 3}},
                  {"name": "large", "where": "event == \"payment\" && properties.amount > 1000"}],
        "within": "5m"});
    let response = client
        .put(service.url("/v1/rules/card_testing"))
        .basic_auth(crate::helpers::ADMIN_KEY, Some(""))
        .json(&rule)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let first = payments(0, &[20, 30]);
    send_until_accepted(&client, &service.url("/v1/batch"), &first).await;
    send_until_accepted(&client, &service.url("/v1/batch"), &first).await;
    let ready = service.url("/readyz");
    eventually(
        "the two small payments taken",
        Duration::from_secs(30),
        || async {
            let ready: serde_json::Value =
                client.get(&ready).send().await.ok()?.json().await.ok()?;
            (ready["rules"]["card_testing"]["applied"].as_u64() >= Some(2 * USERS as u64))
                .then_some(())
        },
    )
    .await;
    service.kill();

    let service = ServiceProcess::start(dir.path(), "restarted", &[], &env_refs(&env)).await;
    let second = payments(2, &[40, 5_000]);
    send_until_accepted(&client, &service.url("/v1/batch"), &second).await;
    send_until_accepted(&client, &service.url("/v1/batch"), &second).await;
    let alerts_url = service.url("/v1/alerts?rule=card_testing&limit=1000");
    let alerts = eventually(
        "an alert for every user",
        Duration::from_secs(60),
        || async {
            let page: serde_json::Value = client
                .get(&alerts_url)
                .basic_auth(crate::helpers::READ_KEY, Some(""))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let alerts = page["alerts"].as_array()?.clone();
            (alerts.len() >= USERS).then_some(alerts)
        },
    )
    .await;
    let mut keys: Vec<&str> = alerts.iter().map(|a| a["key"].as_str().unwrap()).collect();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(
        (alerts.len(), keys.len()),
        (USERS, USERS),
        "one alert a user"
    );
    for alert in &alerts {
        let user = alert["key"].as_str().unwrap();
        let ids: Vec<String> = (0..4).map(|i| format!("{user}-{i}")).collect();
        assert_eq!(alert["message_ids"], json!(ids), "{alert}");
    }
    let config = Config::from_settings(Settings {
        data_dir: Some(dir.path().join("data")),
        ..Settings::default()
    })
    .unwrap();
    let topic = Topics::new(&config.topic_prefix).alerts();
    let published = eventually(
        "every alert on user_alerts",
        Duration::from_secs(30),
        || async {
            let records = read_all(&config, &topic).await;
            (records.len() >= USERS).then_some(records)
        },
    )
    .await;
    assert_eq!(published.len(), USERS);
    drop(service);
}
