//! Running the binary: start-up messages, a bad setting, graceful
//! shutdown, and `traitline events tail`.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{
    ServiceProcess, TestDir, WRITE_KEY, binary, embedded_env, env_refs, eventually,
};

#[tokio::test]
async fn first_start_generates_keys_and_prints_a_curl_that_works() {
    let dir = TestDir::new();
    let data = dir.path().join("data");
    let data_dir = data.display().to_string();
    let env = [
        ("TRAITLINE_LISTEN", "127.0.0.1:0"),
        ("TRAITLINE_DATA_DIR", data_dir.as_str()),
    ];
    let mut service = ServiceProcess::start(dir.path(), "first", &[], &env).await;
    let printed = std::fs::read_to_string(&service.stdout).unwrap();
    assert!(printed.contains("embedded mode"), "{printed}");
    let key = printed
        .split("curl -u '")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .expect("a curl command with the key is printed")
        .to_owned();
    assert!(key.starts_with("tlw_"), "{key}");
    let saved: Value =
        serde_json::from_slice(&std::fs::read(data.join("keys.json")).unwrap()).unwrap();
    assert_eq!(saved["write"][0], key.as_str());
    assert!(saved["read"][0].as_str().unwrap().starts_with("tlr_"));
    assert!(saved["admin"][0].as_str().unwrap().starts_with("tla_"));

    let response = crate::helpers::client()
        .post(service.url("/v1/track"))
        .basic_auth(&key, Some(""))
        .json(&json!({"userId": "u1", "event": "Signed Up"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::OK);

    // The printed read command works too: the event is in u1's profile.
    let read_key = printed
        .split("Read the profile the events make:")
        .nth(1)
        .and_then(|rest| rest.split("curl -u '").nth(1))
        .and_then(|rest| rest.split(':').next())
        .expect("a curl command to read a profile is printed")
        .to_owned();
    assert_eq!(saved["read"][0], read_key.as_str());
    crate::helpers::eventually(
        "the profile of u1",
        std::time::Duration::from_secs(30),
        || async {
            let response = crate::helpers::client()
                .get(service.url("/v1/profiles/u1"))
                .basic_auth(&read_key, Some(""))
                .send()
                .await
                .unwrap();
            response.status().is_success()
        },
    )
    .await;
    assert!(service.terminate().await.success());

    // A second start reads the same keys back, and the store as it was.
    let service = ServiceProcess::start(dir.path(), "second", &[], &env).await;
    let printed = std::fs::read_to_string(&service.stdout).unwrap();
    assert!(printed.contains(&key));
    let log = |name: &str| std::fs::read_to_string(dir.path().join(format!("{name}.stderr")));
    assert!(log("first").unwrap().contains("the store is new"));
    let second = log("second").unwrap();
    assert!(
        !second.contains("the store is new") && !second.contains("store's schema"),
        "{second}"
    );
}

#[test]
fn a_bad_setting_stops_start_up_naming_it() {
    let output = Command::new(binary())
        .env("TRAITLINE_LISTEN", "not-an-address")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("`listen`") && stderr.contains("TRAITLINE_LISTEN"),
        "{stderr}"
    );

    let output = Command::new(binary())
        .args(["--partitions", "0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("`partitions`"));
}

/// Also: the SASL password given is never printed.
#[test]
fn an_unreachable_kafka_stops_start_up_naming_the_setting() {
    let dir = TestDir::new();
    let output = Command::new(binary())
        .current_dir(dir.path())
        .env("TRAITLINE_KAFKA_SECURITY_PROTOCOL", "sasl_plaintext")
        .env("TRAITLINE_KAFKA_SASL_MECHANISM", "PLAIN")
        .env("TRAITLINE_KAFKA_SASL_USERNAME", "traitline")
        .env("TRAITLINE_KAFKA_SASL_PASSWORD", "s3cr3t-pw-value")
        .env("RUST_LOG", "debug")
        .args([
            "--kafka-brokers",
            "127.0.0.1:1",
            "--listen",
            "127.0.0.1:0",
            "--write-keys",
            WRITE_KEY,
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot reach Kafka") && stderr.contains("kafka-brokers"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        !stderr.contains("s3cr3t-pw-value") && !stdout.contains("s3cr3t-pw-value"),
        "the password is never printed: {stderr}"
    );
}

/// The topics exist (made by a first start with 3 partitions, which then
/// stops at its unreachable database); a start that says 5 stops naming
/// the setting and the count the topics have.
#[test]
fn topics_with_another_partition_count_stop_start_up_naming_the_setting() {
    let dir = TestDir::new();
    let prefix = format!("t{}_", uuid::Uuid::new_v4().simple());
    let start = |partitions: &str| {
        Command::new(binary())
            .current_dir(dir.path())
            .args([
                "--kafka-brokers",
                &crate::helpers::kafka_brokers(),
                "--topic-prefix",
                &prefix,
                "--partitions",
                partitions,
                "--database-url",
                "postgres://nobody@127.0.0.1:1/none",
                "--listen",
                "127.0.0.1:0",
                "--write-keys",
                WRITE_KEY,
            ])
            .output()
            .unwrap()
    };
    let first = start("3");
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(stderr.contains("database-url"), "{stderr}");
    let second = start("5");
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("has 3 partitions but the setting partitions is 5"),
        "{stderr}"
    );
}

#[test]
fn an_unreachable_database_stops_start_up_naming_the_setting() {
    let dir = TestDir::new();
    let output = Command::new(binary())
        .current_dir(dir.path())
        .args([
            "--database-url",
            "postgres://traitline:x@127.0.0.1:1/traitline",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot open the store (database-url)"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(":x@"),
        "the password is not printed: {stderr}"
    );
}

/// The banner says the service is listening: from then on a SIGTERM is a
/// graceful shutdown, however soon it comes. The signal is sent the moment
/// the banner's line is read from the pipe (the handlers must exist before
/// it is printed, not only once the server's first task runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_right_after_the_banner_is_a_graceful_shutdown() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
    for attempt in 0..5 {
        let dir = TestDir::new();
        let env = embedded_env(dir.path());
        let mut child = tokio::process::Command::new(binary())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the binary starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("listening on") {
                break;
            }
        }
        let pid = child.id().unwrap().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .expect("traitline exits within 30 s of SIGTERM")
            .unwrap();
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .await
            .unwrap();
        assert!(
            status.success(),
            "attempt {attempt}: exit status {status}; {stderr}"
        );
        assert!(
            stderr.contains("SIGTERM received; shutting down")
                && stderr.contains("Traitline stopped"),
            "attempt {attempt}: {stderr}"
        );
    }
}

/// Requests in flight when SIGTERM comes are finished and answered, then
/// the process exits 0. Each request here has sent its headers and half
/// its body when the signal is sent (the service counts them in flight),
/// and the rest after it: every one gets its 2xx and is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_and_exits_0() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const REQUESTS: usize = 16;
    let dir = TestDir::new();
    let env = embedded_env(dir.path());
    let mut service = ServiceProcess::start(dir.path(), "service", &[], &env_refs(&env)).await;
    let address = service.url("").trim_start_matches("http://").to_owned();
    let mut halves = Vec::new();
    for i in 0..REQUESTS {
        let body = json!({"userId": format!("u{i}"), "event": "e", "messageId": format!("m{i}")})
            .to_string();
        let (first, rest) = body.split_at(body.len() / 2);
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        let head = format!(
            "POST /v1/track HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {WRITE_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{first}",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        halves.push((stream, rest.to_owned()));
    }
    let client = crate::helpers::client();
    eventually(
        "every request in flight",
        Duration::from_secs(30),
        || async {
            let scrape = client
                .get(service.url("/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let in_flight = scrape
                .lines()
                .find_map(|l| l.strip_prefix("traitline_ingest_requests_in_flight "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0);
            if in_flight >= REQUESTS as f64 {
                Ok(())
            } else {
                Err(format!("{in_flight} in flight"))
            }
        },
    )
    .await;

    let pid = service.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut acknowledged = Vec::new();
    for (i, (mut stream, rest)) in halves.into_iter().enumerate() {
        stream.write_all(rest.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "request {i} after SIGTERM: {answer}"
        );
        acknowledged.push(format!("m{i}"));
    }
    let status = service.wait_exit().await;
    assert!(status.success(), "exit status {status}");
    assert_eq!(
        acknowledged.len(),
        REQUESTS,
        "every request in flight was answered"
    );
    let stored = tail(dir.path(), &["--from-beginning", "--exit"]);
    for id in &acknowledged {
        assert!(
            stored
                .iter()
                .any(|r| r["value"]["messageId"] == id.as_str()),
            "{id} is stored"
        );
    }
}

/// SIGTERM under steady load: in-flight requests are answered, the
/// processor commits what it took, and the process exits 0 within its
/// shutdown deadline. After a restart every 2xx event is stored, and every
/// stored event is counted in the profiles exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_nothing_and_counts_each_event_once() {
    let dir = TestDir::new();
    let mut env = embedded_env(dir.path());
    env.push(("TRAITLINE_SHUTDOWN_TIMEOUT_SECS", "20".into()));
    let mut service = ServiceProcess::start(dir.path(), "first", &[], &env_refs(&env)).await;
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut senders = Vec::new();
    for sender in 0..8 {
        let (client, url, acknowledged) = (
            crate::helpers::client(),
            service.url("/v1/track"),
            acknowledged.clone(),
        );
        senders.push(tokio::spawn(async move {
            for i in 0.. {
                let id = format!("s{sender}-{i}");
                let sent = client
                    .post(&url)
                    .basic_auth(WRITE_KEY, Some(""))
                    .json(&json!({"userId": format!("u{}", i % 20), "event": "e", "messageId": id}))
                    .send()
                    .await;
                match sent {
                    Ok(response) if response.status().is_success() => {
                        acknowledged.lock().unwrap().push(id);
                    }
                    Ok(_) => {}
                    Err(_) => return, // the service has stopped listening
                }
            }
        }));
    }
    eventually("load under way", Duration::from_secs(30), || async {
        acknowledged.lock().unwrap().len() >= 300
    })
    .await;
    let status = service.terminate().await;
    assert!(status.success(), "exit status {status}");
    for sender in senders {
        sender.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();

    let restarted = ServiceProcess::start(dir.path(), "second", &[], &env_refs(&env)).await;
    let stored: std::collections::HashSet<String> =
        tail(dir.path(), &["--from-beginning", "--exit"])
            .iter()
            .map(|r| r["value"]["messageId"].as_str().unwrap().to_owned())
            .collect();
    for id in &acknowledged {
        assert!(stored.contains(id), "{id} got a 2xx and is stored");
    }
    let client = crate::helpers::client();
    let counted = || async {
        let profiles = restarted.profiles(&client).await;
        profiles
            .iter()
            .map(|p| p["event_count"].as_u64().unwrap())
            .sum::<u64>()
    };
    eventually(
        "every stored event counted",
        Duration::from_secs(60),
        || async { counted().await >= stored.len() as u64 },
    )
    .await;
    assert_eq!(
        counted().await,
        stored.len() as u64,
        "each stored event counted once"
    );
}

/// Every log line written while a request is handled carries its request
/// id (the client's `x-request-id`, else a generated one, answered back);
/// with `--log-format json` each line is one JSON object.
#[tokio::test]
async fn log_lines_of_a_request_carry_its_request_id() {
    let dir = TestDir::new();
    let mut env = embedded_env(dir.path());
    env.push(("TRAITLINE_LOG_FORMAT", "json".into()));
    let mut refs = env_refs(&env);
    refs.push(("RUST_LOG", "info,traitline::telemetry=debug"));
    let service = ServiceProcess::start(dir.path(), "service", &[], &refs).await;
    let client = crate::helpers::client();
    let send = |id: Option<&str>| {
        let mut request = client
            .post(service.url("/v1/track"))
            .basic_auth(WRITE_KEY, Some(""))
            .json(&json!({"userId": "u1", "event": "e"}));
        if let Some(id) = id {
            request = request.header("x-request-id", id);
        }
        request.send()
    };
    let given = send(Some("test-rid-123")).await.unwrap();
    assert_eq!(given.headers()["x-request-id"], "test-rid-123");
    let generated = send(None).await.unwrap();
    let generated = generated.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(generated.len(), 32, "a generated id: {generated}");

    let stderr = dir.path().join("service.stderr");
    eventually(
        "an answered line with each request id",
        Duration::from_secs(10),
        || {
            let text = std::fs::read_to_string(&stderr).unwrap_or_default();
            let lines: Vec<Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
                .collect();
            let answered = |id: &str| {
                lines.iter().any(|line| {
                    line["span"]["id"] == id
                        && line["fields"]["message"]
                            .as_str()
                            .is_some_and(|m| m.starts_with("answered POST /v1/track 200"))
                })
            };
            let done = answered("test-rid-123") && answered(&generated);
            std::future::ready(if done { Ok(()) } else { Err(text) })
        },
    )
    .await;
}

/// Runs `traitline events tail` on the test's embedded log.
pub fn tail(dir: &std::path::Path, args: &[&str]) -> Vec<Value> {
    let output = Command::new(binary())
        .args(["events", "tail"])
        .args(args)
        .env("TRAITLINE_DATA_DIR", dir.join("data"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object a line"))
        .collect()
}

#[tokio::test]
async fn events_tail_prints_stored_records_as_json_lines() {
    let dir = TestDir::new();
    let env = embedded_env(dir.path());
    let service = ServiceProcess::start(dir.path(), "service", &[], &env_refs(&env)).await;
    let client = crate::helpers::client();
    for i in 0..3 {
        let response = client
            .post(service.url("/v1/identify"))
            .basic_auth(WRITE_KEY, Some(""))
            .json(&json!({"userId": "u7", "traits": {"n": i}, "messageId": format!("id-{i}")}))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
    }
    let records = tail(dir.path(), &["--from-beginning", "--exit"]);
    assert_eq!(records.len(), 3);
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record["topic"], "user_events");
        assert_eq!(record["key"], "u7");
        assert_eq!(record["offset"], i as i64);
        assert_eq!(record["value"]["messageId"], format!("id-{i}"));
        assert_eq!(record["value"]["type"], "identify");
    }
    // Without --from-beginning it starts at the end: nothing old is shown.
    assert!(tail(dir.path(), &["--exit"]).is_empty());
    assert_eq!(
        tail(dir.path(), &["--from-beginning", "--count", "2"]).len(),
        2
    );
}

/// Opening the address in a browser shows what Traitline is and where
/// to go; an API client gets the same as JSON.
#[tokio::test]
async fn the_front_page_says_what_traitline_is_and_where_its_routes_are() {
    let app = crate::helpers::spawn_app(crate::helpers::Backend::Embedded).await;
    let page = app
        .client
        .get(app.url("/"))
        .header("Accept", "text/html,application/xhtml+xml,*/*;q=0.8")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), reqwest::StatusCode::OK);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = page.text().await.unwrap();
    assert!(html.contains("Traitline"), "{html}");
    assert!(html.contains(r#"<a href="/openapi.json">"#), "{html}");

    let json: Value = app
        .client
        .get(app.url("/"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(json["name"], "Traitline");
    let routes: Vec<&str> = json["links"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["route"].as_str())
        .collect();
    for route in [
        "POST /v1/track",
        "GET /v1/profiles/{id}",
        "GET /openapi.json",
    ] {
        assert!(routes.contains(&route), "{route} in {routes:?}");
    }
}

/// Start-up names each migration an existing store is about to take (one
/// may rebuild large indexes, and start-up waits for it), and says when a
/// store is new.
#[tokio::test]
async fn start_up_names_the_store_migrations_it_applies() {
    let dir = TestDir::new();
    let database = crate::helpers::test_database().await;
    let mut env = embedded_env(dir.path());
    env.push(("TRAITLINE_DATABASE_URL", database.clone()));
    let log = |name: &str| {
        std::fs::read_to_string(dir.path().join(format!("{name}.stderr"))).unwrap_or_default()
    };
    let mut first = ServiceProcess::start(dir.path(), "first", &[], &env_refs(&env)).await;
    assert!(first.terminate().await.success());
    let first_log = log("first");
    assert!(first_log.contains("the store is new"), "{first_log}");
    assert!(
        !first_log.contains("updating the store's schema"),
        "{first_log}"
    );

    // The store as the release before migration 18 left it (its
    // statements can be applied again).
    let mut connection = <sqlx::PgConnection as sqlx::Connection>::connect(&database)
        .await
        .unwrap();
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = 18")
        .execute(&mut connection)
        .await
        .unwrap();
    let mut second = ServiceProcess::start(dir.path(), "second", &[], &env_refs(&env)).await;
    assert!(second.terminate().await.success());
    let second_log = log("second");
    let updating: Vec<&str> = second_log
        .lines()
        .filter(|line| line.contains("updating the store's schema"))
        .collect();
    assert_eq!(updating.len(), 1, "{second_log}");
    assert!(
        updating[0].contains("migration=18") && updating[0].contains("byte-wise keys"),
        "{}",
        updating[0]
    );
    assert!(!second_log.contains("the store is new"), "{second_log}");
    assert!(
        second_log.contains("the store's schema is up to date"),
        "{second_log}"
    );

    let mut third = ServiceProcess::start(dir.path(), "third", &[], &env_refs(&env)).await;
    assert!(third.terminate().await.success());
    let third_log = log("third");
    assert!(
        !third_log.contains("the store is new") && !third_log.contains("store's schema"),
        "an up-to-date store starts without a word of its schema: {third_log}"
    );
}
