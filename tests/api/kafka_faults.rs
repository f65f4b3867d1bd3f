//! Kafka faults, injected with librdkafka's mock cluster: a broker that is
//! down gives 503 with Retry-After within the append bound, never a 2xx and
//! never a hang; after recovery, requests succeed again.

use std::time::Duration;

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use reqwest::StatusCode;
use serde_json::json;
use traitline::config::Settings;
use traitline::log::Topics;

use crate::helpers::{Backend, TestApp, eventually, spawn_app_with};

/// A service on a one-broker mock cluster (not the broker the test command
/// started), its events topic created with `partitions` partitions.
async fn app_on_mock_cluster(
    partitions: i32,
    adjust: impl FnOnce(&mut Settings),
) -> (MockCluster<'static, DefaultProducerContext>, TestApp) {
    let cluster = MockCluster::new(1).expect("a mock cluster starts");
    let prefix = format!("mock{}_", uuid::Uuid::new_v4().simple());
    for (topic, _) in Topics::new(&prefix).all() {
        cluster
            .create_topic(&topic, partitions, 1)
            .expect("the topic is created");
    }
    let brokers = cluster.bootstrap_servers();
    // Embedded settings, turned to Kafka on the mock cluster.
    let app = spawn_app_with(Backend::Embedded, |s| {
        s.kafka_brokers = Some(brokers);
        s.kafka_replication_factor = Some(1);
        s.topic_prefix = Some(prefix);
        s.partitions = Some(partitions);
        // Ingest only: a consumer on the mock cluster can hang on drop.
        s.roles = Some(vec!["ingest".into()]);
        adjust(s);
    })
    .await;
    (cluster, app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_gives_503_and_recovery_brings_2xx_back() {
    tokio::time::timeout(Duration::from_secs(120), outage_and_recovery())
        .await
        .expect("the fault test finishes (a mock cluster can hang a client on drop)");
}

async fn outage_and_recovery() {
    let (cluster, app) = app_on_mock_cluster(4, |s| s.append_timeout_ms = Some(1500)).await;
    let client = hang_guarded_client();
    let send = |i: u32| {
        client
            .post(app.url("/v1/track"))
            .basic_auth(crate::helpers::WRITE_KEY, Some(""))
            .json(&json!({"userId": "u1", "event": "e", "messageId": format!("m{i}")}))
            .send()
    };
    assert_eq!(send(0).await.unwrap().status(), StatusCode::OK);

    cluster.broker_down(1).unwrap();
    for i in 1..=3 {
        let response = send(i).await.expect("answered, not hung");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["retry-after"], "1");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "log_unavailable");
    }
    let ready = client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);

    cluster.broker_up(1).unwrap();
    let mut i = 100;
    eventually(
        "a 2xx after the broker is back",
        Duration::from_secs(60),
        || {
            i += 1;
            let request = send(i);
            async move {
                request
                    .await
                    .map(|r| r.status() == StatusCode::OK)
                    .unwrap_or(false)
            }
        },
    )
    .await;
    drop(app);
    drop(cluster);
}

/// A client that gives up after 15 s: a hang guard, far past the 1.5 s
/// append bound these tests set.
fn hang_guarded_client() -> reqwest::Client {
    crate::helpers::client_builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap()
}

/// In-flight work is bounded: with every slot held by requests waiting on a
/// stalled log, the next request is refused at once with 503 `overloaded`
/// instead of queueing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_in_flight_bound_get_503_at_once() {
    tokio::time::timeout(Duration::from_secs(120), overload())
        .await
        .expect("the overload test finishes");
}

async fn overload() {
    let (cluster, app) = app_on_mock_cluster(1, |s| {
        s.append_timeout_ms = Some(3000);
        s.max_in_flight = Some(2);
    })
    .await;
    cluster.broker_down(1).unwrap();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut hogs = Vec::new();
    for _ in 0..2 {
        let (client, url, stop) = (app.client.clone(), app.url("/v1/track"), stop.clone());
        hogs.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let response = client
                    .post(&url)
                    .basic_auth(crate::helpers::WRITE_KEY, Some(""))
                    .json(&json!({"userId": "u1", "event": "slow"}))
                    .send()
                    .await
                    .unwrap();
                statuses.push(response.status());
            }
            statuses
        }));
    }
    eventually(
        "a request refused as overloaded",
        Duration::from_secs(30),
        || {
            let request = app
                .client
                .post(app.url("/v1/track"))
                .basic_auth(crate::helpers::WRITE_KEY, Some(""))
                .json(&json!({"userId": "u2", "event": "probe"}))
                .send();
            async move {
                let response = request.await.unwrap();
                assert_ne!(
                    response.status(),
                    StatusCode::OK,
                    "nothing is stored while the broker is down"
                );
                let body: serde_json::Value = response.json().await.unwrap();
                body["error"]["code"] == "overloaded"
            }
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for hog in hogs {
        let statuses = hog.await.unwrap();
        assert!(
            statuses
                .iter()
                .all(|s| *s == StatusCode::SERVICE_UNAVAILABLE),
            "{statuses:?}"
        );
    }
    drop(app);
    drop(cluster);
}

/// A tansu broker of the test's own (the shared one must not be stopped),
/// killed when dropped.
struct OwnBroker {
    child: std::process::Child,
    brokers: String,
    log: std::path::PathBuf,
}

impl OwnBroker {
    async fn start(dir: &std::path::Path) -> OwnBroker {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = dir.join("tansu.log");
        let child = std::process::Command::new("tansu")
            .args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::process::Stdio::from(
                std::fs::File::options().append(true).open(&log).unwrap(),
            ))
            .spawn()
            .expect("tansu is on PATH (./scripts/test installs it)");
        let brokers = format!("127.0.0.1:{port}");
        let address = brokers.clone();
        eventually(
            "the test's own tansu to listen",
            Duration::from_secs(30),
            || {
                let address = address.clone();
                async move { tokio::net::TcpStream::connect(address).await.is_ok() }
            },
        )
        .await;
        OwnBroker {
            child,
            brokers,
            log,
        }
    }

    /// Sends `signal` (STOP or CONT) to the broker process.
    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} tansu");
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("the test's tansu log is {}", self.log.display());
        }
    }
}

/// The tansu process frozen (SIGSTOP) under the full pipeline: requests get
/// 503 within the append bound and never a 2xx; after SIGCONT a client that
/// retries its 503s with the same messageIds, as Segment's SDKs do, gets
/// every event counted exactly once in the profile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_broker_process_gives_503_and_retries_count_once() {
    tokio::time::timeout(Duration::from_secs(180), stopped_broker_process())
        .await
        .expect("the fault test finishes");
}

async fn stopped_broker_process() {
    let dir = tempfile::tempdir().unwrap();
    let broker = OwnBroker::start(dir.path()).await;
    let app = spawn_app_with(Backend::Kafka, |s| {
        s.kafka_brokers = Some(broker.brokers.clone());
        s.append_timeout_ms = Some(1500);
    })
    .await;
    let client = hang_guarded_client();
    let send = |i: u32| {
        client
            .post(app.url("/v1/track"))
            .basic_auth(crate::helpers::WRITE_KEY, Some(""))
            .json(&json!({"userId": "frozen", "event": "e", "messageId": format!("m{i}")}))
            .send()
    };
    for i in 0..10 {
        assert_eq!(send(i).await.unwrap().status(), StatusCode::OK);
    }

    broker.signal("STOP");
    for i in 10..13 {
        let response = send(i).await.expect("answered, not hung");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["retry-after"], "1");
    }
    let ready = client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);

    broker.signal("CONT");
    for i in 10..20 {
        eventually(
            &format!("a 2xx for m{i} after the broker resumed"),
            Duration::from_secs(60),
            || async move {
                send(i)
                    .await
                    .map(|r| r.status() == StatusCode::OK)
                    .unwrap_or(false)
            },
        )
        .await;
    }
    // A marker behind every event of this user's partition: once it is
    // counted, so is everything the broker stored before it.
    let marker = json!({"userId": "frozen", "event": "marker", "messageId": "marker"});
    assert_eq!(
        app.post("/v1/track", &marker).await.status(),
        StatusCode::OK
    );
    let profile = app
        .wait_for_profile("frozen", |p| p["event_counts"]["marker"] == 1)
        .await;
    assert_eq!(profile["event_count"], 21, "{profile}");
    // Stopped while its broker is alive: a consumer whose broker is gone
    // can block the runtime's shutdown.
    app.stop().await;
    drop(broker);
}

/// A shutdown that cannot finish (a request waiting on a frozen broker)
/// does not keep the process alive past `shutdown-timeout-secs`: it exits
/// with status 1, saying why, and the request got no 2xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_shutdown_exits_at_its_deadline() {
    let dir = crate::helpers::TestDir::new();
    let broker = OwnBroker::start(dir.path()).await;
    let mut env = crate::helpers::embedded_env(dir.path());
    env.extend([
        ("TRAITLINE_KAFKA_BROKERS", broker.brokers.clone()),
        ("TRAITLINE_KAFKA_REPLICATION_FACTOR", "1".into()),
        ("TRAITLINE_ROLES", "ingest".into()),
        ("TRAITLINE_APPEND_TIMEOUT_MS", "20000".into()),
        ("TRAITLINE_SHUTDOWN_TIMEOUT_SECS", "1".into()),
    ]);
    let mut service = crate::helpers::ServiceProcess::start(
        dir.path(),
        "service",
        &[],
        &crate::helpers::env_refs(&env),
    )
    .await;
    let client = crate::helpers::client();
    let send = |id: &str| {
        client
            .post(service.url("/v1/track"))
            .basic_auth(crate::helpers::WRITE_KEY, Some(""))
            .json(&json!({"userId": "u1", "event": "e", "messageId": id}))
            .send()
    };
    assert_eq!(send("m0").await.unwrap().status(), StatusCode::OK);

    broker.signal("STOP");
    let hung = tokio::spawn(send("m1"));
    let metrics_url = service.url("/metrics");
    eventually(
        "the request to be in flight",
        Duration::from_secs(30),
        || {
            let scrape = client.get(&metrics_url).send();
            async move {
                let text = scrape.await.unwrap().text().await.unwrap();
                text.lines().any(|l| {
                    l.starts_with("traitline_ingest_requests_in_flight ") && !l.ends_with(" 0")
                })
            }
        },
    )
    .await;
    // The watchdog, not the 20 s append timeout, ends it: status 1.
    let status = service.terminate().await;
    assert_eq!(status.code(), Some(1), "exit status {status}");
    let stderr = std::fs::read_to_string(dir.path().join("service.stderr")).unwrap();
    assert!(stderr.contains("shutdown-timeout-secs"), "{stderr}");
    let answer = hung.await.unwrap();
    assert!(
        answer.is_err() || !answer.unwrap().status().is_success(),
        "no 2xx for an event the log did not confirm"
    );
    broker.signal("CONT");
}

/// Runs the load generator against `service` with `[concurrency,
/// batch-size, duration-secs]`, sampling the service's resident memory
/// every 200 ms: its output, the highest sample (KiB) and the samples.
async fn flood(
    service: &crate::helpers::ServiceProcess,
    [concurrency, batch_size, seconds]: &[&str; 3],
) -> (std::process::Output, u64, u32) {
    let pid = service.child.id();
    let resident_kib = || -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let run = tokio::process::Command::new(crate::helpers::binary())
        .args(["bench", "ingest", "--url", &service.base])
        .args(["--write-key", crate::helpers::WRITE_KEY])
        .args(["--concurrency", concurrency, "--batch-size", batch_size])
        .args(["--duration-secs", seconds, "--warmup-secs", "0"])
        .env_remove("TRAITLINE_LISTEN")
        .output();
    tokio::pin!(run);
    let (mut highest, mut samples) = (0, 0);
    loop {
        tokio::select! {
            output = &mut run => return (output.unwrap(), highest, samples),
            () = tokio::time::sleep(Duration::from_millis(200)) => {
                highest = highest.max(resident_kib());
                samples += 1;
            }
        }
    }
}

/// The memory bound the README promises under overload: the Kafka log
/// stalled (tansu frozen) while 512 connections send 1,000-event batches
/// for 30 s. Every answer is 503, resident memory stays under 512 MiB,
/// and once the broker is back requests succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_while_a_stalled_log_is_flooded() {
    const BOUND_KIB: u64 = 512 * 1024;
    let dir = crate::helpers::TestDir::new();
    let broker = OwnBroker::start(dir.path()).await;
    let mut env = crate::helpers::embedded_env(dir.path());
    env.extend([
        ("TRAITLINE_KAFKA_BROKERS", broker.brokers.clone()),
        ("TRAITLINE_KAFKA_REPLICATION_FACTOR", "1".into()),
        ("TRAITLINE_ROLES", "ingest".into()),
    ]);
    let service = crate::helpers::ServiceProcess::start(
        dir.path(),
        "service",
        &[],
        &crate::helpers::env_refs(&env),
    )
    .await;
    broker.signal("STOP");
    let (output, highest, samples) = flood(&service, &["512", "1000", "30"]).await;
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("highest resident memory during the flood: {highest} KiB ({samples} samples)");
    assert!(samples >= 100, "sampled through the flood: {samples}");
    assert!(
        report.contains("requests: 0 "),
        "no 2xx while the log is stalled:\n{report}"
    );
    assert!(report.contains("503"), "refused with 503:\n{report}");
    assert!(
        highest < BOUND_KIB,
        "resident memory reached {highest} KiB, over the {BOUND_KIB} KiB bound"
    );

    broker.signal("CONT");
    let client = crate::helpers::client();
    eventually(
        "a 2xx once the broker is back",
        Duration::from_secs(60),
        || {
            let request = client
                .post(service.url("/v1/track"))
                .basic_auth(crate::helpers::WRITE_KEY, Some(""))
                .json(&json!({"userId": "u1", "event": "after"}))
                .send();
            async move { request.await.is_ok_and(|r| r.status() == StatusCode::OK) }
        },
    )
    .await;
}

/// Seed 001's back-pressure: a store that stops committing (its offsets
/// table locked) pauses the processor, and with it the consumer's fetching
/// once librdkafka's bounded prefetch is full, while ingest goes on into a
/// backlog far larger than that bound. Resident memory stays under a bound
/// the backlog alone would break; once the store is back, processing
/// resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_store_pauses_the_processor_and_memory_stays_bounded() {
    const BOUND_KIB: u64 = 192 * 1024;
    let dir = crate::helpers::TestDir::new();
    let broker = OwnBroker::start(dir.path()).await;
    let database = crate::helpers::test_database().await;
    let mut env = crate::helpers::embedded_env(dir.path());
    env.extend([
        ("TRAITLINE_KAFKA_BROKERS", broker.brokers.clone()),
        ("TRAITLINE_KAFKA_REPLICATION_FACTOR", "1".into()),
        ("TRAITLINE_DATABASE_URL", database.clone()),
    ]);
    let service = crate::helpers::ServiceProcess::start(
        dir.path(),
        "service",
        &[],
        &crate::helpers::env_refs(&env),
    )
    .await;
    let client = crate::helpers::client();
    let applied = || async {
        let text = client
            .get(service.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| {
                l.starts_with("traitline_processor_events_total")
                    && l.contains(r#"outcome="applied""#)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    let answer = client
        .post(service.url("/v1/track"))
        .basic_auth(crate::helpers::WRITE_KEY, Some(""))
        .json(&json!({"userId": "first", "event": "e"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    eventually("the processor to run", Duration::from_secs(60), || async {
        applied().await == 1
    })
    .await;

    // The store stalls: every commit waits on the offsets table.
    let mut lock = <sqlx::PgConnection as sqlx::Connection>::connect(&database)
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut lock).await.unwrap();
    sqlx::query("LOCK TABLE processor_offsets IN ACCESS EXCLUSIVE MODE")
        .execute(&mut lock)
        .await
        .unwrap();

    // Floods until the backlog is larger than the bound (the machine's
    // speed varies): an envelope of the load generator's is about 400
    // bytes; 350 is counted.
    let mut highest = 0;
    let mut stored = 0u64;
    for _round in 0..8 {
        let (output, round_highest, _) = flood(&service, &["16", "500", "6"]).await;
        highest = highest.max(round_highest);
        let report = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{report}");
        stored += report
            .split("events: ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no event count in:\n{report}"));
        if stored * 350 / 1024 > BOUND_KIB {
            break;
        }
    }
    let backlog_kib = stored * 350 / 1024;
    eprintln!(
        "stalled store: {stored} events stored (~{backlog_kib} KiB) unprocessed; highest resident memory {highest} KiB"
    );
    assert!(
        backlog_kib > BOUND_KIB,
        "the backlog ({backlog_kib} KiB) must exceed the bound to show anything"
    );
    assert_eq!(
        applied().await,
        1,
        "nothing is applied while the store is stalled"
    );
    assert!(
        highest < BOUND_KIB,
        "resident memory reached {highest} KiB, over the {BOUND_KIB} KiB bound"
    );

    sqlx::query("ROLLBACK").execute(&mut lock).await.unwrap();
    eventually("processing to resume", Duration::from_secs(60), || async {
        applied().await > 1_000
    })
    .await;
}
