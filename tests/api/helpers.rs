//! The test harness: a Traitline service on port 0 with its own data
//! directory (embedded) or its own topics (Kafka on the broker the test
//! command started), a typed client, and a way to read back what the log
//! stored.
//!
//! When a test fails, its data directory is kept and its path printed, and
//! the service's log lines are in the test's captured output.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use traitline::config::{Config, Settings};
use traitline::envelope::EventEnvelope;
use traitline::log::{self, StartAt, StoredRecord, Topics};

/// Every ingest route; `/v1/batch` is last.
pub const INGEST_ROUTES: [&str; 8] = [
    "/event/user/track",
    "/v1/track",
    "/v1/identify",
    "/v1/page",
    "/v1/screen",
    "/v1/group",
    "/v1/alias",
    "/v1/batch",
];

/// Which event log a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Kafka,
}

pub const WRITE_KEY: &str = "tlw_test_write_key_0001";
pub const READ_KEY: &str = "tlr_test_read_key_00001";
pub const ADMIN_KEY: &str = "tla_test_admin_key_0001";

/// The broker the test command started (`scripts/test`).
pub fn kafka_brokers() -> String {
    std::env::var("TRAITLINE_TEST_KAFKA_BROKERS").unwrap_or_else(|_| {
        panic!(
            "TRAITLINE_TEST_KAFKA_BROKERS is not set: run the tests with ./scripts/test, which starts a tansu broker"
        )
    })
}

fn init_logs() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info,librdkafka=warn,rdkafka=warn".into()),
            )
            .with_test_writer()
            .try_init();
    });
}

/// A data directory kept when the test fails.
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
}

impl TestDir {
    pub fn new() -> TestDir {
        TestDir {
            dir: Some(
                tempfile::Builder::new()
                    .prefix("traitline-test-")
                    .tempdir()
                    .unwrap(),
            ),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("present until drop").path()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            let kept = dir.keep();
            eprintln!(
                "test failed: its data directory is kept at {}",
                kept.display()
            );
        }
    }
}

/// Settings for a test service of `backend`: port 0, a fresh data
/// directory, known keys, and topics no other test uses.
pub fn test_settings(backend: Backend, data_dir: &Path) -> Settings {
    let mut s = Settings {
        listen: Some("127.0.0.1:0".into()),
        data_dir: Some(data_dir.to_owned()),
        write_keys: Some(vec![WRITE_KEY.into()]),
        read_keys: Some(vec![READ_KEY.into()]),
        admin_keys: Some(vec![ADMIN_KEY.into()]),
        partitions: Some(4),
        ..Settings::default()
    };
    if backend == Backend::Kafka {
        s.kafka_brokers = Some(kafka_brokers());
        s.kafka_replication_factor = Some(1);
        s.topic_prefix = Some(format!("t{}_", uuid::Uuid::new_v4().simple()));
    }
    s
}

/// A running service.
pub struct TestApp {
    pub base: String,
    pub config: Config,
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), traitline::server::ServeError>>>,
    pub dir: Arc<TestDir>,
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(backend, |_| {}).await
}

/// Starts a service whose settings `adjust` may change. On Kafka it is the
/// production deployment: its store is a fresh PostgreSQL database.
pub async fn spawn_app_with(backend: Backend, adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let dir = Arc::new(TestDir::new());
    let mut settings = test_settings(backend, dir.path());
    if backend == Backend::Kafka {
        settings.database_url = Some(test_database().await);
    }
    adjust(&mut settings);
    start(settings, dir).await
}

/// A fresh PostgreSQL database for one test, on the server the test
/// command started.
pub async fn test_database() -> String {
    let base = std::env::var("TRAITLINE_TEST_DATABASE_URL").unwrap_or_else(|_| {
        panic!("TRAITLINE_TEST_DATABASE_URL is not set: run the tests with ./scripts/test, which starts PostgreSQL")
    });
    let name = format!("traitline_test_{}", uuid::Uuid::new_v4().simple());
    let mut connection = <sqlx::PgConnection as sqlx::Connection>::connect(&base)
        .await
        .expect("the test PostgreSQL answers");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut connection)
        .await
        .expect("a test database is created");
    let (server, _) = base.rsplit_once('/').expect("the URL names a database");
    format!("{server}/{name}")
}

/// Starts a service from `settings` in `dir` (a restart reuses both).
pub async fn start(settings: Settings, dir: Arc<TestDir>) -> TestApp {
    init_logs();
    let config = Config::from_settings(settings).expect("valid test settings");
    let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
    let address = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(traitline::server::serve(config.clone(), listener, async {
        let _ = rx.await;
    }));
    let app = TestApp {
        base: format!("http://{address}"),
        config,
        client: client(),
        shutdown: Some(tx),
        server: Some(server),
        dir,
    };
    app.wait_ready().await;
    app
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn wait_ready(&self) {
        eventually("the service ready", Duration::from_secs(30), || async {
            let answer = self.client.get(self.url("/readyz")).send().await;
            matches!(answer, Ok(r) if r.status().is_success())
        })
        .await
    }

    /// POSTs a JSON body with the write key as HTTP Basic user name.
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        self.post_raw(path, Some(WRITE_KEY), body.to_string().into_bytes(), None)
            .await
    }

    /// POSTs raw bytes, with an optional key and `Content-Encoding`.
    pub async fn post_raw(
        &self,
        path: &str,
        key: Option<&str>,
        body: Vec<u8>,
        encoding: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body);
        if let Some(key) = key {
            request = request.basic_auth(key, Some(""));
        }
        if let Some(encoding) = encoding {
            request = request.header("content-encoding", encoding);
        }
        request.send().await.expect("the service answers")
    }

    /// GETs `path` with `key` (Basic user name); the status and JSON body.
    pub async fn get_as(&self, path: &str, key: &str) -> (reqwest::StatusCode, serde_json::Value) {
        let response = self
            .client
            .get(self.url(path))
            .basic_auth(key, Some(""))
            .send()
            .await
            .expect("the service answers");
        let status = response.status();
        (
            status,
            response.json().await.unwrap_or(serde_json::Value::Null),
        )
    }

    /// Waits until the profile of `id` satisfies `done`, and returns it.
    pub async fn wait_for_profile(
        &self,
        id: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let what = format!("the profile of {id} in the expected state");
        eventually(&what, Duration::from_secs(30), || async {
            let (status, body) = self.get_as(&format!("/v1/profiles/{id}"), READ_KEY).await;
            if status == reqwest::StatusCode::OK && done(&body) {
                Ok(body)
            } else {
                Err(format!("{status} {body}"))
            }
        })
        .await
    }

    /// GETs `path` without a key and reads the answer as JSON.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.client
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The full name of the events topic.
    pub fn events_topic(&self) -> String {
        Topics::new(&self.config.topic_prefix).events()
    }

    /// Every record of the events topic, read from the beginning to the end.
    pub async fn stored_records(&self) -> Vec<StoredRecord> {
        read_all(&self.config, &self.events_topic()).await
    }

    /// Every stored event envelope.
    pub async fn stored_events(&self) -> Vec<EventEnvelope> {
        self.stored_records()
            .await
            .iter()
            .map(|r| serde_json::from_slice(&r.value).expect("the log holds envelopes"))
            .collect()
    }

    /// Stops the service gracefully and waits for it.
    pub async fn stop(mut self) -> Arc<TestDir> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(30), server)
                .await
                .expect("the service stops within 30 s")
                .expect("the server task does not panic")
                .expect("the server exits cleanly");
        }
        self.dir.clone()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// An HTTP client for the tests (the TLS provider installed first, as
/// the service's `main` does).
/// Sends `method` to `path` of `app` with `key` and a JSON `body`; the
/// answer's status and body (`null` when not JSON).
pub async fn send(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    key: &str,
    body: Option<&serde_json::Value>,
) -> (reqwest::StatusCode, serde_json::Value) {
    let mut request = app
        .client
        .request(method, app.url(path))
        .basic_auth(key, Some(""));
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.expect("the service answers");
    let status = response.status();
    (
        status,
        response.json().await.unwrap_or(serde_json::Value::Null),
    )
}

pub fn client() -> reqwest::Client {
    // A request that never answers fails its test naming the request,
    // inside nextest's three minutes, rather than hanging until nextest
    // kills the test with nothing to show where it waited.
    client_builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("an HTTP client builds")
}

pub fn client_builder() -> reqwest::ClientBuilder {
    traitline::install_tls();
    reqwest::Client::builder()
}

/// Reads a whole topic from the beginning until the reader is caught up.
pub async fn read_all(config: &Config, topic: &str) -> Vec<StoredRecord> {
    let mut reader = log::open_reader(config, topic, StartAt::Beginning).expect("a reader opens");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut records = Vec::new();
    loop {
        let polled = reader
            .poll(10_000, Duration::from_millis(500))
            .await
            .expect("the log reads");
        let done = polled.caught_up && polled.records.is_empty();
        records.extend(polled.records);
        if done {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "reading {topic} did not reach its end within 30 s"
        );
    }
}

/// The path of the built `traitline` binary.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_traitline"))
}

/// What one look of [`eventually`] found: done (with what it found), or
/// not yet (with what it saw instead, for the failure message).
pub trait Check {
    type Done;
    fn done(self) -> Result<Self::Done, String>;
}

impl Check for bool {
    type Done = ();
    fn done(self) -> Result<(), String> {
        if self { Ok(()) } else { Err(String::new()) }
    }
}

impl<T> Check for Option<T> {
    type Done = T;
    fn done(self) -> Result<T, String> {
        self.ok_or_else(String::new)
    }
}

impl<T> Check for Result<T, String> {
    type Done = T;
    fn done(self) -> Result<T, String> {
        self
    }
}

/// Looks with `check` until it is done, at most `deadline`, and returns
/// what it found; fails naming `what` and what the last look saw. The one
/// way a test waits for a condition.
pub async fn eventually<C, F, Fut>(what: &str, deadline: Duration, mut check: F) -> C::Done
where
    C: Check,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = C>,
{
    let until = Instant::now() + deadline;
    loop {
        match check().await.done() {
            Ok(done) => return done,
            Err(last) => assert!(
                Instant::now() < until,
                "{what} did not happen within {deadline:?}{}",
                if last.is_empty() {
                    String::new()
                } else {
                    format!("; last: {last}")
                }
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The service as a separate process, for what needs a real process:
/// SIGKILL, SIGTERM, start-up messages.
pub struct ServiceProcess {
    pub child: std::process::Child,
    pub base: String,
    pub stdout: PathBuf,
}

impl ServiceProcess {
    /// Starts `traitline` with `args` and `env` (on top of a clean
    /// environment of `TRAITLINE_*`), its output in files in `dir`, and
    /// waits until it prints where it listens.
    pub async fn start(
        dir: &Path,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> ServiceProcess {
        let stdout = dir.join(format!("{name}.stdout"));
        let stderr = dir.join(format!("{name}.stderr"));
        let mut command = std::process::Command::new(binary());
        command
            .args(args)
            .current_dir(dir)
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap());
        for (key, _) in std::env::vars() {
            if key.starts_with("TRAITLINE_") {
                command.env_remove(key);
            }
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("the binary starts");
        let base = eventually("traitline listening", Duration::from_secs(30), || {
            let printed = std::fs::read_to_string(&stdout).unwrap_or_default();
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "traitline exited with {status} before listening:\n{}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                );
            }
            let url = printed
                .split("listening on ")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_owned);
            std::future::ready(url)
        })
        .await;
        ServiceProcess {
            child,
            base,
            stdout,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Every profile the process serves (up to 1,000), read with the read key.
    pub async fn profiles(&self, client: &reqwest::Client) -> Vec<serde_json::Value> {
        let response = client
            .get(self.url("/v1/profiles?limit=1000"))
            .basic_auth(READ_KEY, Some(""))
            .send()
            .await
            .expect("the service answers");
        let page: serde_json::Value = response.json().await.unwrap_or_default();
        page["profiles"].as_array().cloned().unwrap_or_default()
    }

    /// Kills the process at once (SIGKILL): no flush, no cleanup.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        self.wait_exit().await
    }

    /// Waits for the process to exit (after a SIGTERM sent), for its
    /// status.
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        eventually(
            "traitline's exit after SIGTERM",
            Duration::from_secs(30),
            || std::future::ready(self.child.try_wait().unwrap()),
        )
        .await
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A mock Kafka cluster (librdkafka's: it hands a dead member's
/// partitions over, which tansu 0.6.0 does not) with the topics of a new
/// prefix (`{tag}…_`, 4 partitions), and the environment of processes
/// that share it and one new PostgreSQL database, in one consumer group.
pub async fn consumer_group_env(
    dir: &Path,
    tag: &str,
) -> (
    rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    String,
    Vec<(&'static str, String)>,
) {
    let cluster = rdkafka::mocking::MockCluster::new(1).expect("a mock cluster starts");
    let prefix = format!("{tag}{}_", uuid::Uuid::new_v4().simple());
    for (topic, _) in Topics::new(&prefix).all() {
        cluster
            .create_topic(&topic, 4, 1)
            .expect("the topic is created");
    }
    let mut env = embedded_env(dir);
    env.extend([
        ("TRAITLINE_KAFKA_BROKERS", cluster.bootstrap_servers()),
        ("TRAITLINE_DATABASE_URL", test_database().await),
        ("TRAITLINE_TOPIC_PREFIX", prefix.clone()),
        ("TRAITLINE_PARTITIONS", "4".to_owned()),
        ("TRAITLINE_KAFKA_REPLICATION_FACTOR", "1".to_owned()),
        // Notice a dead member within seconds, not the default 45 s.
        (
            "TRAITLINE_KAFKA_OPTIONS",
            "session.timeout.ms=6000,heartbeat.interval.ms=500".to_owned(),
        ),
    ]);
    (cluster, prefix, env)
}

/// Environment for a process on the embedded log in `dir` with the test keys.
pub fn embedded_env(dir: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("TRAITLINE_LISTEN", "127.0.0.1:0".into()),
        ("TRAITLINE_DATA_DIR", dir.join("data").display().to_string()),
        ("TRAITLINE_WRITE_KEYS", WRITE_KEY.into()),
        ("TRAITLINE_READ_KEYS", READ_KEY.into()),
        ("TRAITLINE_ADMIN_KEYS", ADMIN_KEY.into()),
    ]
}

/// Borrows an owned environment list as `(&str, &str)` pairs.
pub fn env_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}
