//! The archive end to end, against a real S3-compatible server (moto's
//! server mode, started by `scripts/test`): every event the log stored
//! after the archive's creation is in exactly one object, read back
//! through the S3 API equal to the log, in objects named by their
//! partition and offsets; an upload that reached the bucket but was never
//! answered, and a SIGKILL, leave no gap and no overlap (the retry
//! rewrites the same object); `traitline archive verify` finds a removed
//! object.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use reqwest::Method;
use serde_json::{Value, json};
use traitline::log::{StoredRecord, Topics};

use crate::helpers::{
    ADMIN_KEY, Backend, READ_KEY, ServiceProcess, TestApp, TestDir, WRITE_KEY, embedded_env,
    env_refs, eventually, read_all, send, spawn_app,
};

both_logs!(every_event_is_archived_once_equal_to_the_log);

#[tokio::test]
async fn an_unavailable_bucket_delays_the_archive_and_loses_nothing() {
    let (name, bucket) = new_bucket().await;
    let proxy = Proxy::default();
    proxy.failing.store(true, Ordering::SeqCst);
    let address = serve_proxy(proxy.clone()).await;
    let app = spawn_app(Backend::Embedded).await;
    define_archive(&app, &format!("http://{address}"), &name).await;
    send_events(
        async |body| app.post("/v1/batch", &body).await.status(),
        "d",
        200,
    )
    .await;
    // The failures are visible: retried attempts, records undelivered.
    let shown = eventually("failed uploads shown", Duration::from_secs(30), || async {
        let shown = read(&app, "/v1/destinations/archive").await;
        (shown["status"]["failed_attempts"].as_i64() > Some(1)
            && shown["status"]["oldest_undelivered_seconds"].is_number())
        .then_some(shown)
    })
    .await;
    assert_eq!(shown["status"]["delivered"], json!(0), "{shown}");
    assert!(
        shown["status"]["archive"]["uploading"].as_i64() >= Some(1),
        "{shown}"
    );
    assert_eq!(
        shown["status"]["archive"]["last_object"],
        Value::Null,
        "{shown}"
    );
    let attempts = read(&app, "/v1/destinations/archive/attempts").await;
    assert_eq!(
        attempts["attempts"][0]["outcome"],
        json!("retrying"),
        "{attempts}"
    );
    assert!(objects(bucket.as_ref()).await.is_empty());

    proxy.failing.store(false, Ordering::SeqCst);
    let log = read_all(&app.config, &Topics::new(&app.config.topic_prefix).events()).await;
    all_archived(
        bucket.as_ref(),
        &log,
        "every event archived once the bucket is back",
    )
    .await;
}

/// The S3 server the test command started.
fn s3_endpoint() -> String {
    std::env::var("TRAITLINE_TEST_S3_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "TRAITLINE_TEST_S3_ENDPOINT is not set: run the tests with ./scripts/test, which starts an S3 server"
        )
    })
}

/// A new bucket of its own, and a client of it.
async fn new_bucket() -> (String, Arc<dyn ObjectStore>) {
    let name = format!("archive-{}", uuid::Uuid::new_v4().simple());
    let created = crate::helpers::client()
        .put(format!("{}/{name}", s3_endpoint()))
        .send()
        .await
        .expect("the S3 server answers");
    assert!(created.status().is_success(), "{}", created.status());
    let bucket = AmazonS3Builder::new()
        .with_endpoint(s3_endpoint())
        .with_allow_http(true)
        .with_bucket_name(&name)
        .with_region("us-east-1")
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .build()
        .unwrap();
    (name, Arc::new(bucket))
}

fn archive(endpoint: &str, bucket: &str) -> Value {
    json!({"kind": "s3", "source": "user_events", "endpoint": endpoint, "bucket": bucket,
           "prefix": "raw", "region": "us-east-1", "access_key_id": "test",
           "secret_access_key": "test", "roll_bytes": 4096, "roll_after": "1s",
           "backoff": "50ms", "backoff_max": "200ms"})
}

/// Every archive object in the bucket: key → its lines.
async fn objects(bucket: &dyn ObjectStore) -> BTreeMap<String, Vec<String>> {
    let mut listing = bucket.list(Some(&Path::from("raw")));
    let mut keys = Vec::new();
    while let Some(meta) = listing.next().await {
        keys.push(meta.unwrap().location.to_string());
    }
    let mut objects = BTreeMap::new();
    for key in keys {
        let body = bucket
            .get(&Path::from(key.as_str()))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let mut text = String::new();
        flate2::read::GzDecoder::new(&body[..])
            .read_to_string(&mut text)
            .unwrap();
        objects.insert(key, text.lines().map(str::to_owned).collect());
    }
    objects
}

/// `(partition, first, last)` of an object's key.
fn range_of(key: &str) -> (i32, i64, i64) {
    let name = key
        .rsplit('/')
        .next()
        .unwrap()
        .strip_suffix(".jsonl.gz")
        .unwrap();
    let mut parts = name.strip_prefix('p').unwrap().splitn(3, '-');
    let mut next = || parts.next().unwrap().parse::<i64>().unwrap();
    (next() as i32, next(), next())
}

/// Checks the objects against the log: per partition, the ranges follow
/// each other with no gap and no overlap from the first archived record,
/// and each object's lines are its range's records; the records
/// archived.
fn check_against_log(
    objects: &BTreeMap<String, Vec<String>>,
    log: &[StoredRecord],
) -> Result<usize, String> {
    let mut by_partition: BTreeMap<i32, Vec<(i64, i64, &String)>> = BTreeMap::new();
    for key in objects.keys() {
        let (partition, first, last) = range_of(key);
        by_partition
            .entry(partition)
            .or_default()
            .push((first, last, key));
    }
    let mut archived = 0;
    for (partition, mut ranges) in by_partition {
        ranges.sort();
        for pair in ranges.windows(2) {
            if pair[1].0 != pair[0].1 + 1 {
                return Err(format!(
                    "partition {partition}: {} then {} (a gap or an overlap)",
                    pair[0].2, pair[1].2
                ));
            }
        }
        for (first, last, key) in &ranges {
            let expected: Vec<String> = log
                .iter()
                .filter(|r| r.partition == partition && (*first..=*last).contains(&r.offset))
                .map(|r| String::from_utf8(r.value.to_vec()).unwrap())
                .collect();
            if objects[*key] != expected {
                return Err(format!("{key} does not hold its records"));
            }
            let stamped = log
                .iter()
                .find(|r| r.partition == partition && r.offset == *first)
                .unwrap()
                .timestamp_ms;
            let at = chrono::DateTime::from_timestamp_millis(stamped).unwrap();
            let folder = at.format("raw/dt=%Y-%m-%d/hh=%H/").to_string();
            if !key.starts_with(&folder) {
                return Err(format!("{key} is not under {folder}"));
            }
            archived += expected.len();
        }
        let last_archived = ranges.last().unwrap().1;
        if log
            .iter()
            .any(|r| r.partition == partition && r.offset > last_archived)
        {
            return Err(format!(
                "partition {partition}: records after offset {last_archived} not archived yet"
            ));
        }
    }
    Ok(archived)
}

/// Defines archive `archive` of `bucket` at `endpoint` and waits until
/// it runs; what the API stored.
async fn define_archive(app: &TestApp, endpoint: &str, bucket: &str) -> Value {
    let (status, stored) = send(
        app,
        Method::PUT,
        "/v1/destinations/archive",
        ADMIN_KEY,
        Some(&archive(endpoint, bucket)),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{stored}");
    eventually("the archive active", Duration::from_secs(10), || async {
        read(app, "/v1/destinations/archive").await["status"]["state"] == json!("active")
    })
    .await;
    stored
}

/// Waits until every record of `log` is archived, exactly, in `bucket`.
async fn all_archived(bucket: &dyn ObjectStore, log: &[StoredRecord], what: &str) {
    eventually(what, Duration::from_secs(60), || async {
        check_against_log(&objects(bucket).await, log).and_then(|n| {
            if n == log.len() {
                Ok(())
            } else {
                Err(format!("{n} archived"))
            }
        })
    })
    .await
}

async fn send_events(post: impl AsyncFn(Value) -> StatusCode, tag: &str, count: usize) {
    for chunk in 0..count / 50 {
        let batch: Vec<Value> = (0..50)
            .map(|i| {
                let n = chunk * 50 + i;
                json!({"type": "track", "event": "order.create", "userId": format!("{tag}-u{}", n % 17),
                       "messageId": format!("{tag}-{n}"), "properties": {"n": n, "pad": "x".repeat(n % 40)}})
            })
            .collect();
        let status = post(json!({"batch": batch})).await;
        assert!(status.is_success(), "{status}");
    }
}

/// GETs `path` of `app` with the read key; the answer's body.
async fn read(app: &TestApp, path: &str) -> Value {
    send(app, Method::GET, path, READ_KEY, None).await.1
}

/// Defines on `service` an archive of `bucket` at `endpoint` whose objects
/// close on age (1 s), well below `roll_bytes`, and waits until it runs.
async fn define_by_age(
    client: &reqwest::Client,
    service: &ServiceProcess,
    endpoint: &str,
    bucket: &str,
) {
    let mut by_age = archive(endpoint, bucket);
    by_age["roll_bytes"] = json!(1 << 20);
    let defined = client
        .put(service.url("/v1/destinations/archive"))
        .basic_auth(ADMIN_KEY, Some(""))
        .json(&by_age)
        .send()
        .await
        .unwrap();
    assert!(defined.status().is_success(), "{}", defined.status());
    wait_running(client, service).await;
}

/// Waits until `service` runs the archive.
async fn wait_running(client: &reqwest::Client, service: &ServiceProcess) {
    eventually("the archive running", Duration::from_secs(30), || async {
        let ready: Value = client
            .get(service.url("/readyz"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ready["destinations"]["archive"]["state"] == json!("active")
    })
    .await
}

/// [`send_events`] to a service process.
async fn send_to(client: &reqwest::Client, service: &ServiceProcess, tag: &str, count: usize) {
    let post = async |body: Value| {
        client
            .post(service.url("/v1/batch"))
            .basic_auth(WRITE_KEY, Some(""))
            .json(&body)
            .send()
            .await
            .map_or(StatusCode::SERVICE_UNAVAILABLE, |r| r.status())
    };
    send_events(post, tag, count).await;
}

async fn every_event_is_archived_once_equal_to_the_log(backend: Backend) {
    let (name, bucket) = new_bucket().await;
    let app = spawn_app(backend).await;
    let stored = define_archive(&app, &s3_endpoint(), &name).await;
    assert_eq!(
        stored["definition"]["secret_access_key"],
        json!("********"),
        "{stored}"
    );
    send_events(
        async |body| app.post("/v1/batch", &body).await.status(),
        "a",
        600,
    )
    .await;

    let topic = Topics::new(&app.config.topic_prefix).events();
    let log = read_all(&app.config, &topic).await;
    assert_eq!(log.len(), 600);
    all_archived(bucket.as_ref(), &log, "every event archived").await;
    let found = objects(bucket.as_ref()).await;
    assert!(found.len() > 4, "objects rolled by size: {}", found.len());

    // Every upload marked done: none under way, the newest shown.
    let shown = eventually("no upload under way", Duration::from_secs(10), || async {
        let shown = read(&app, "/v1/destinations/archive").await;
        (shown["status"]["archive"]["uploading"] == json!(0)).then_some(shown)
    })
    .await;
    assert_eq!(shown["status"]["state"], json!("active"), "{shown}");
    let newest = shown["status"]["archive"]["last_object"].as_str().unwrap();
    assert!(found.contains_key(newest), "{shown}");
    let attempts = read(&app, "/v1/destinations/archive/attempts").await;
    let uploaded: Vec<&Value> = attempts["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["outcome"] == json!("delivered"))
        .collect();
    assert!(!uploaded.is_empty(), "{attempts}");
    assert!(
        found.contains_key(uploaded[0]["delivery_id"].as_str().unwrap()),
        "{attempts}"
    );
    let (status, refused) = send(
        &app,
        Method::POST,
        "/v1/destinations/archive/replay",
        ADMIN_KEY,
        Some(&json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
}

/// A proxy in front of the S3 server. Holding, it forwards each upload
/// and never answers it: the object is in the bucket, and the archive
/// does not know.
#[derive(Clone, Default)]
struct Proxy {
    holding: Arc<AtomicBool>,
    /// Every request answered 503 without reaching the server.
    failing: Arc<AtomicBool>,
    /// Every object key uploaded through it, in order, and whether it was
    /// held.
    puts: Arc<Mutex<Vec<(String, bool)>>>,
}

async fn forward(State(proxy): State<Proxy>, request: Request) -> Response {
    if proxy.failing.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "down for the test").into_response();
    }
    let (parts, body) = request.into_parts();
    let body: Bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let url = format!("{}{}", s3_endpoint(), parts.uri.path_and_query().unwrap());
    let method = reqwest::Method::from_bytes(parts.method.as_str().as_bytes()).unwrap();
    let mut forwarded = crate::helpers::client()
        .request(method.clone(), url)
        .body(body.to_vec());
    for (name, value) in &parts.headers {
        if name != "host" {
            forwarded = forwarded.header(name.as_str(), value.as_bytes());
        }
    }
    let answer = forwarded.send().await.unwrap();
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap();
    let headers: Vec<(String, Vec<u8>)> = answer
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect();
    let bytes = answer.bytes().await.unwrap();
    if method == reqwest::Method::PUT {
        let held = proxy.holding.load(Ordering::SeqCst);
        let key = parts
            .uri
            .path()
            .splitn(3, '/')
            .nth(2)
            .unwrap_or("")
            .to_owned();
        proxy.puts.lock().unwrap().push((key, held));
        if held {
            std::future::pending::<()>().await;
        }
    }
    let mut response = (status, bytes.to_vec()).into_response();
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (
            axum::http::HeaderName::from_bytes(k.as_bytes()),
            axum::http::HeaderValue::from_bytes(&v),
        ) && k != "content-length"
            && k != "transfer-encoding"
        {
            response.headers_mut().insert(k, v);
        }
    }
    response
}

async fn serve_proxy(proxy: Proxy) -> SocketAddr {
    let router = axum::Router::new().fallback(forward).with_state(proxy);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    address
}

/// The service is killed while an upload it made is in the bucket but
/// unanswered, and others wait: after a restart every event is archived
/// once, the unanswered object is written again under the same key (no
/// overlapping object), and `archive verify` passes, then finds an
/// object removed from the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_mid_upload_leaves_no_gap_and_no_overlap() {
    let (name, bucket) = new_bucket().await;
    let proxy = Proxy::default();
    let address = serve_proxy(proxy.clone()).await;
    let dir = TestDir::new();
    let env = embedded_env(dir.path());
    let mut service = ServiceProcess::start(dir.path(), "first", &[], &env_refs(&env)).await;
    let client = crate::helpers::client();
    define_by_age(&client, &service, &format!("http://{address}"), &name).await;
    // Objects close on age (1 s) well below `roll_bytes`.
    send_to(&client, &service, "b", 300).await;
    eventually("objects uploaded", Duration::from_secs(30), || async {
        proxy.puts.lock().unwrap().len() >= 3
    })
    .await;
    proxy.holding.store(true, Ordering::SeqCst);
    send_to(&client, &service, "c", 300).await;
    let held = eventually(
        "an upload in the bucket, unanswered",
        Duration::from_secs(30),
        || async {
            proxy
                .puts
                .lock()
                .unwrap()
                .iter()
                .find(|(_, held)| *held)
                .map(|(key, _)| key.clone())
        },
    )
    .await;
    // A new version rolling at 1 KiB goes on from the same positions:
    // the object under way still closes where it did, under its key.
    let mut smaller = archive(&format!("http://{address}"), &name);
    smaller["roll_bytes"] = json!(1024);
    let changed = client
        .put(service.url("/v1/destinations/archive"))
        .basic_auth(ADMIN_KEY, Some(""))
        .json(&smaller)
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), StatusCode::OK);
    let times_put = |key: &str| {
        proxy
            .puts
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k == key)
            .count()
    };
    eventually(
        "the new version uploading the same object",
        Duration::from_secs(30),
        || async { times_put(&held) >= 2 },
    )
    .await;
    service.kill();
    proxy.holding.store(false, Ordering::SeqCst);

    let service = ServiceProcess::start(dir.path(), "second", &[], &env_refs(&env)).await;
    let config = traitline::config::Config::from_settings(traitline::config::Settings {
        data_dir: Some(dir.path().join("data")),
        ..Default::default()
    })
    .unwrap();
    let log = read_all(&config, &Topics::new(&config.topic_prefix).events()).await;
    assert_eq!(log.len(), 600);
    all_archived(
        bucket.as_ref(),
        &log,
        "every event archived after the restart",
    )
    .await;
    assert!(
        times_put(&held) >= 3,
        "the unanswered object {held} is written again after the restart"
    );
    drop(service);

    let verify = |expect_ok: bool| {
        let output = std::process::Command::new(crate::helpers::binary())
            .args(["archive", "verify"])
            .env_clear()
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert_eq!(
            output.status.success(),
            expect_ok,
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    };
    let fine = verify(true);
    assert!(fine.contains("ok: no gaps, no overlaps"), "{fine}");
    let removed = objects(bucket.as_ref()).await.into_keys().nth(1).unwrap();
    bucket.delete(&Path::from(removed.as_str())).await.unwrap();
    let found = verify(false);
    assert!(
        found.contains(&format!("{removed} (partition"))
            && found.contains("missing from the bucket"),
        "{found}"
    );
}

/// Two instances in one consumer group archive one topic; the second
/// takes partitions from the first (whose objects under way are in the
/// manifest), then is killed and the first takes them back: the objects
/// still cover every record once, with no gap and no overlap. On
/// librdkafka's mock cluster, as the profiles' failover test is (tansu
/// 0.6.0 does not hand a dead member's partitions over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_hand_partitions_over_without_gap_or_overlap() {
    tokio::time::timeout(Duration::from_secs(240), handover())
        .await
        .expect("the handover test finishes");
}

async fn handover() {
    let (name, bucket) = new_bucket().await;
    let dir = TestDir::new();
    let (cluster, prefix, env) = crate::helpers::consumer_group_env(dir.path(), "ar").await;
    let first = ServiceProcess::start(dir.path(), "first", &[], &env_refs(&env)).await;
    let client = crate::helpers::client_builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    // Objects close on age, so the instances' boundaries differ unless
    // the manifest makes them agree.
    define_by_age(&client, &first, &s3_endpoint(), &name).await;
    let mut second = ServiceProcess::start(dir.path(), "second", &[], &env_refs(&env)).await;
    let stderr = |name: &str| {
        std::fs::read_to_string(dir.path().join(format!("{name}.stderr"))).unwrap_or_default()
    };
    let mut sent = 0;
    let mut send = async |service: &ServiceProcess, tag: &str| {
        send_to(&client, service, &format!("{tag}{sent}"), 100).await;
        sent += 100;
    };
    // Sent while the group settles, then while both archive.
    send(&first, "h").await;
    eventually(
        "the second instance given partitions",
        Duration::from_secs(60),
        || async { stderr("second").contains("gave this instance partitions [") },
    )
    .await;
    for _ in 0..3 {
        send(&first, "h").await;
        send(&second, "h").await;
    }
    eventually("objects uploaded", Duration::from_secs(30), || async {
        objects(bucket.as_ref()).await.len() >= 4
    })
    .await;
    second.kill();
    for _ in 0..2 {
        send(&first, "h").await;
    }
    let config = traitline::config::Config::from_settings(traitline::config::Settings {
        data_dir: Some(dir.path().join("reader")),
        kafka_brokers: Some(cluster.bootstrap_servers()),
        topic_prefix: Some(prefix.clone()),
        kafka_replication_factor: Some(1),
        ..Default::default()
    })
    .unwrap();
    let log = read_all(&config, &Topics::new(&prefix).events()).await;
    assert_eq!(log.len(), sent);
    all_archived(
        bucket.as_ref(),
        &log,
        "every event archived by the survivor",
    )
    .await;
    assert!(
        stderr("first").contains("gave this instance partitions [0, 1, 2, 3]"),
        "the survivor got every partition back:\n{}",
        stderr("first")
    );
}
