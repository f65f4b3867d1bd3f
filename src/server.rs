//! One Traitline process: opens the log, builds the routes of its roles,
//! serves until the shutdown future resolves, then drains.
//!
//! Shutdown order: stop accepting connections, let in-flight requests
//! finish (each is answered only once its events are durable or failed),
//! then close the log (the Kafka producer flushes what it holds).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use utoipa::ToSchema;

use crate::config::{Config, LogBackend};
use crate::ingest::Ingest;
use crate::keys::{ApiKeys, KeyFileError, KeySource};
use crate::log::{self, EventLog, OpenError, ReadError, Topics};
use crate::process::SharedStats;
use crate::process::metrics::{DefinitionState, MetricRunners};
use crate::process::profiles::ProfileInput;
use crate::process::relay::ChangeRelay;
use crate::query::QueryState;
use crate::store::{Store, StoreError};
use crate::supervisor::{StageState, Stages, Supervisor};

/// Why a process could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Keys(#[from] KeyFileError),
    #[error(transparent)]
    Log(#[from] OpenError),
    #[error("the HTTP server failed: {0}")]
    Http(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("{0} (setting snapshot-dir; move the file away to start from the log instead)")]
    Snapshot(String),
    #[error("{0}")]
    Stage(String),
    #[error("{0}")]
    Definitions(String),
}

/// How long the log may take to write out what it holds at shutdown.
const CLOSE_DEADLINE: Duration = Duration::from_secs(10);

/// Says what the database server's settings mean for the processors
/// once, at start-up: a setting that risks the store or publishes outputs
/// twice as a warning, one that only slows them down as information.
async fn advise_on_database(store: &Store) {
    match store.database_advice().await {
        Ok(advice) => {
            for advice in advice {
                if advice.risk {
                    tracing::warn!("{}", advice.text);
                } else {
                    tracing::info!("{}", advice.text);
                }
            }
        }
        Err(e) => tracing::info!("cannot read PostgreSQL's settings to advise on them: {e}"),
    }
}

/// Runs the configured roles on `listener` until `shutdown` resolves.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    // Before anything records a metric: without a recorder they are lost.
    crate::metrics::handle();
    let (keys, key_source) = ApiKeys::load_or_generate(&config.keys, &config.data_dir)?;
    let log = log::open(&config).await?;
    let store = if config.roles.process || config.roles.query {
        Some(
            Store::open(config.database_url.as_deref(), &config.data_dir)
                .await?
                .with_profile_cache(config.profile_cache),
        )
    } else {
        None
    };
    if !config.roles.process
        && let Some(store) = &store
    {
        store_file_definitions(&config.metrics, store).await?;
        store_file_definitions(&config.rules, store).await?;
        store_file_definitions(&config.destinations, store).await?;
    }
    let address = listener.local_addr()?;
    let (stop_stages, stopped) = watch::channel(false);
    let mut supervisor = Supervisor::new(stopped);
    let mut processing = Vec::new();
    let mut metric_runners = None;
    let mut rule_runners = None;
    let mut destination_runners = None;
    if config.roles.process
        && let Some(store) = &store
    {
        advise_on_database(store).await;
        // First: a snapshot restored brings its metric definitions, and the
        // configuration file's are stored over them.
        start_from_snapshot(&config, store).await?;
        store_file_definitions(&config.metrics, store).await?;
        store_file_definitions(&config.rules, store).await?;
        store_file_definitions(&config.destinations, store).await?;
        for input in [ProfileInput::Events, ProfileInput::Overflow] {
            let stats =
                crate::process::profiles::spawn(&mut supervisor, &config, store, &log, input)
                    .map_err(ServeError::Stage)?;
            processing.push(stats);
        }
        let (metrics, rules) =
            crate::process::defined::spawn(&mut supervisor, &config, store, &log)
                .map_err(ServeError::Stage)?;
        metric_runners = Some(metrics);
        rule_runners = Some(rules);
        destination_runners = Some(
            crate::destinations::spawn(&mut supervisor, &config, store, &log)
                .map_err(ServeError::Stage)?,
        );
        let relay = ChangeRelay::new(
            store.clone(),
            log.clone(),
            Topics::new(&config.topic_prefix),
        );
        supervisor
            .spawn_until_stop("change relay", move |stop| relay.clone().run(stop))
            .map_err(ServeError::Stage)?;
        let purged = store.clone();
        let retention = Retention {
            events: config.events_retention,
            windows: config.metric_windows_retention,
            attempts: config.delivery_attempts_retention,
        };
        supervisor
            .spawn_until_stop("purge", move |stop| purge(purged.clone(), retention, stop))
            .map_err(ServeError::Stage)?;
        if let Some(interval) = config.snapshot_interval {
            let (config, store) = (config.clone(), store.clone());
            supervisor
                .spawn_until_stop("snapshot timer", move |stop| {
                    crate::snapshot::every(config.clone(), store.clone(), interval, stop)
                })
                .map_err(ServeError::Stage)?;
        }
    }
    let state = Readying {
        log: log.clone(),
        processing,
        metrics: metric_runners,
        rules: rule_runners,
        destinations: destination_runners,
        stages: supervisor.stages(),
    };
    let router = router(&config, state, Arc::new(keys), store.clone());
    announce(&config, address, &key_source, log.as_ref());

    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await?;
    tracing::info!("stopped accepting requests; finishing the processors' batches");
    let _ = stop_stages.send(true);
    supervisor.join().await;
    tracing::info!("closing the {}", log.describe());
    log.close(CLOSE_DEADLINE).await;
    if let Some(store) = store {
        store.close().await;
    }
    tracing::info!("Traitline stopped");
    Ok(())
}

/// A store the profile processor has never committed to starts from the
/// newest snapshot, when there is one, instead of the log's beginning.
async fn start_from_snapshot(config: &Config, store: &Store) -> Result<(), ServeError> {
    let Some(path) = crate::snapshot::latest(config) else {
        return Ok(());
    };
    match crate::snapshot::restore(config, store, &path, true).await {
        Ok(Some(info)) => tracing::info!(
            "the store was empty: restored the snapshot {} ({}); processing the log from there",
            path.display(),
            crate::snapshot::describe(&info)
        ),
        Ok(None) => {}
        Err(reason) => return Err(ServeError::Snapshot(reason)),
    }
    Ok(())
}

/// Deletes, once an hour, stored events past `events_retention` (and with
/// them the record of their message ids), closed metric windows past
/// `windows_retention`, and the working state of metric versions that no
/// longer run.
/// How long the store keeps what it keeps for a while.
#[derive(Debug, Clone, Copy)]
struct Retention {
    events: Duration,
    windows: Duration,
    attempts: Duration,
}

async fn purge(store: Store, retention: Retention, stop: impl Future<Output = ()>) {
    tokio::pin!(stop);
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    let before = |age: Duration| {
        crate::store::now_ms().saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX))
    };
    loop {
        tokio::select! {
            biased;
            () = &mut stop => return,
            _ = every.tick() => {}
        }
        match store.purge(before(retention.events)).await {
            Ok(0) => {}
            Ok(rows) => tracing::info!(
                rows,
                "deleted {rows} stored events past the events retention"
            ),
            Err(e) => tracing::warn!("cannot delete old events: {e}; trying again in an hour"),
        }
        match store
            .purge_delivery_attempts(before(retention.attempts))
            .await
        {
            Ok(0) => {}
            Ok(rows) => tracing::info!(
                rows,
                "deleted {rows} delivery attempts past delivery-attempts-retention-days"
            ),
            Err(e) => {
                tracing::warn!("cannot delete old delivery attempts: {e}; trying again in an hour")
            }
        }
        match store.purge_metric_windows(before(retention.windows)).await {
            Ok(0) => {}
            Ok(rows) => tracing::info!(
                rows,
                "deleted {rows} closed metric windows past metric-windows-retention-days"
            ),
            Err(e) => {
                tracing::warn!("cannot delete old metric windows: {e}; trying again in an hour")
            }
        }
        match crate::process::metrics::purge_superseded(&store).await {
            Ok(0) => {}
            Ok(versions) => tracing::info!(
                versions,
                "deleted the working state of {versions} metric versions that no longer run"
            ),
            Err(e) => tracing::warn!(
                "cannot delete the state of old metric versions: {e}; trying again in an hour"
            ),
        }
        match crate::process::rules::purge_superseded(&store).await {
            Ok(0) => {}
            Ok(versions) => tracing::info!(
                versions,
                "deleted the partial matches of {versions} rule versions that no longer run"
            ),
            Err(e) => tracing::warn!(
                "cannot delete the state of old rule versions: {e}; trying again in an hour"
            ),
        }
    }
}

/// Stores the configuration file's definitions (`[[metrics]]`,
/// `[[rules]]`): each that differs from the stored version becomes its
/// next version (so the file wins at each start; the admin API changes
/// definitions in between).
async fn store_file_definitions<D: crate::admin::Stored>(
    definitions: &[(String, D)],
    store: &Store,
) -> Result<(), ServeError> {
    for (name, definition) in definitions {
        match crate::admin::store_definition(store, name, definition).await {
            Ok((crate::store::Put::Unchanged(_), _)) => {}
            Ok((put, _)) => tracing::info!(
                "{} {name} from the configuration file is stored as version {}",
                D::NOUN,
                put.version()
            ),
            Err(e) => {
                return Err(ServeError::Definitions(format!(
                    "cannot store {} {name} from the configuration file: {e}",
                    D::NOUN
                )));
            }
        }
    }
    Ok(())
}

/// The routes of the configured roles, plus health, readiness and the
/// OpenAPI document.
pub fn router(
    config: &Config,
    readying: Readying,
    keys: Arc<ApiKeys>,
    store: Option<Store>,
) -> Router {
    let log = readying.log.clone();
    // The routes that take a key.
    let mut api = Router::new();
    if config.roles.query
        && let Some(store) = store
    {
        let topics = Topics::new(&config.topic_prefix);
        api =
            api.merge(QueryState::new(store.clone(), keys.clone(), log.clone(), &topics).routes());
        api = api.merge(
            crate::admin::AdminState::new(
                store,
                keys.clone(),
                topics.events(),
                readying.metrics.clone(),
                readying.destinations.clone(),
                config.destinations_allow_private,
            )
            .routes(),
        );
    }
    if config.roles.ingest {
        let ingest = Ingest::new(
            log,
            keys,
            config.limits,
            &Topics::new(&config.topic_prefix),
            config.append_timeout,
        );
        api = api.merge(ingest.routes());
    }
    // Only they count failed authentications: health checks and scrapes
    // from an address behind which clients misbehave must still answer.
    if let Some(per_minute) = config.limits.auth_failures_per_minute
        && (config.roles.ingest || config.roles.query)
    {
        let guard = Arc::new(crate::http::guard::AuthGuard::new(per_minute));
        api = api.route_layer(axum::middleware::from_fn_with_state(
            guard,
            crate::http::guard::limit_auth_failures,
        ));
    }
    let home = Arc::new(crate::home::Home::new(&config.roles));
    let router = Router::new()
        .route("/", get(crate::home::home).with_state(home))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz).with_state(readying))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(crate::metrics::render))
        .merge(api);
    let router = if crate::telemetry::exporting() {
        router.route_layer(axum::middleware::from_fn(crate::telemetry::matched_route))
    } else {
        router
    };
    router.layer(axum::middleware::from_fn(crate::telemetry::request_span))
}

/// The process is alive.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// What `/readyz` looks at: the log, and the profile processor when this
/// process runs one.
#[derive(Clone)]
pub struct Readying {
    pub log: Arc<dyn EventLog>,
    /// The profile runners' stats (events and overflow topics); empty
    /// when this process does not process.
    pub processing: Vec<SharedStats>,
    /// The metric runners, when this process runs them.
    pub metrics: Option<MetricRunners>,
    /// The rule runner, when this process runs it.
    pub rules: Option<crate::process::rules::RuleRunners>,
    /// The destinations, when this process delivers them.
    pub destinations: Option<crate::destinations::DestinationRunners>,
    /// Every supervised stage of this process.
    pub stages: Stages,
}

/// Whether the process can take events now.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `unavailable`.
    pub status: &'static str,
    /// Which log this process writes to.
    pub log: String,
    /// Why it is unavailable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The profile processor of this process, if it runs one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processing: Option<Processing>,
    /// Each metric definition this process computes, by name: its
    /// version and whether it is backfilling, live or failed. A failed
    /// one does not make the process unready; it shows here.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, DefinitionState>,
    /// Each pattern rule this process runs, by name, the same way.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub rules: BTreeMap<String, DefinitionState>,
    /// Each destination this process delivers, by name: its version,
    /// whether it is active, disabled (by its endpoint) or failed, and
    /// its lag. Neither makes the process unready; it shows here.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(value_type = BTreeMap<String, Object>)]
    pub destinations: BTreeMap<String, crate::destinations::DestinationState>,
    /// Every supervised stage of this process (processors, the change
    /// relay, ...) by name: a stage that is not running makes the
    /// process unavailable.
    #[schema(value_type = BTreeMap<String, StageState>)]
    pub stages: BTreeMap<&'static str, StageState>,
}

/// How the profile processor is doing. Its trouble does not make the
/// process unready (ingest goes on without it); it shows here.
#[derive(Debug, Serialize, ToSchema)]
pub struct Processing {
    /// Events applied since start.
    pub applied: u64,
    /// Events skipped as already applied (retries, redelivery).
    pub duplicates: u64,
    /// Records sent to `user_events_rejected`.
    pub rejected: u64,
    /// Records in the log not yet processed, when known.
    pub lag: Option<i64>,
    /// Why the last read or commit failed, until one succeeds again.
    pub error: Option<String>,
}

impl Readying {
    /// The runners' stats added up: counts and lag summed, the first error.
    fn processing(&self) -> Option<Processing> {
        let mut total: Option<Processing> = None;
        for stats in &self.processing {
            let stats = stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let sum = total.get_or_insert(Processing {
                applied: 0,
                duplicates: 0,
                rejected: 0,
                lag: None,
                error: None,
            });
            sum.applied += stats.applied;
            sum.duplicates += stats.duplicates;
            sum.rejected += stats.rejected;
            if let Some(lag) = stats.lag() {
                *sum.lag.get_or_insert(0) += lag;
            }
            sum.error = sum.error.take().or(stats.last_error);
        }
        total
    }
}

/// Liveness: answers while the process runs.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Readiness: 200 when the log can take writes and every stage runs,
/// else 503 with the reason.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "The log takes writes and every stage runs", body = Readiness),
        (status = 503, description = "The log cannot take writes, or a stage stopped and is being restarted; `reason` says which", body = Readiness),
    ))]
pub async fn readyz(State(readying): State<Readying>) -> Response {
    let log = &readying.log;
    let reason = match log.check_ready().await {
        Ok(()) => crate::supervisor::problem(&readying.stages),
        Err(reason) => Some(reason),
    };
    let readiness = Readiness {
        status: if reason.is_none() {
            "ready"
        } else {
            "unavailable"
        },
        log: log.describe(),
        processing: readying.processing(),
        metrics: readying
            .metrics
            .as_ref()
            .map(MetricRunners::states)
            .unwrap_or_default(),
        rules: readying
            .rules
            .as_ref()
            .map(crate::process::rules::RuleRunners::states)
            .unwrap_or_default(),
        destinations: readying
            .destinations
            .as_ref()
            .map(crate::destinations::DestinationRunners::states)
            .unwrap_or_default(),
        stages: readying
            .stages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
        reason,
    };
    if readiness.reason.is_none() {
        Json(readiness).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            Json(readiness),
        )
            .into_response()
    }
}

async fn openapi() -> Response {
    static DOCUMENT: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| crate::openapi::document().to_string());
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT.as_str(),
    )
        .into_response()
}

/// Tells the user, on standard output, where to send events and how.
fn announce(config: &Config, address: SocketAddr, keys: &KeySource, log: &dyn EventLog) {
    let host = if address.ip().is_unspecified() {
        format!("127.0.0.1:{}", address.port())
    } else {
        address.to_string()
    };
    let mode = match &config.log {
        LogBackend::Embedded => "embedded mode",
        LogBackend::Kafka(_) => "Kafka mode",
    };
    println!(
        "Traitline is listening on http://{host} ({mode}: {}).",
        log.describe()
    );
    if let Some(file) = &keys.file {
        let verb = if keys.created {
            "generated and saved"
        } else {
            "read"
        };
        println!("API keys ({verb}): {}", file.display());
    }
    let key = keys
        .example_write_key
        .clone()
        .unwrap_or_else(|| "$TRAITLINE_WRITE_KEY".to_owned());
    println!("Send an event:");
    println!(
        "  curl -u '{key}:' http://{host}/v1/track -H 'Content-Type: application/json' \\\n    -d '{{\"userId\": \"u1\", \"event\": \"Signed Up\", \"properties\": {{\"plan\": \"pro\"}}}}'"
    );
    println!("Or with the seed API:");
    println!(
        "  curl -u '{key}:' http://{host}/event/user/track -H 'Content-Type: application/json' \\\n    -d '{{\"key\": \"landing.user.home.click\", \"user_id\": \"u1\", \"payload\": {{\"client_os\": \"iOS\", \"client_version\": \"1.0.0\"}}}}'"
    );
    if config.roles.query {
        let read = keys
            .example_read_key
            .clone()
            .unwrap_or_else(|| "$TRAITLINE_READ_KEY".to_owned());
        println!("Read the profile the events make:");
        println!("  curl -u '{read}:' http://{host}/v1/profiles/u1");
    }
    println!("See what was stored: traitline events tail --from-beginning");
    println!("  (from the source tree: cargo run --release -- events tail --from-beginning)");
    println!("Every route: http://{host}/openapi.json");
}
