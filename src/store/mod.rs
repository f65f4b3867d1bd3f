//! The store: where processors keep what they make of the log (profiles,
//! their changes, the raw events sink) together with the log offsets that
//! produced it. PostgreSQL in production, a SQLite file in the data
//! directory when embedded.
//!
//! One implementation serves both through sqlx's `Any` driver: the SQL is
//! written once in the subset both databases share (`$n` parameters,
//! `ON CONFLICT`, `RETURNING`, row values), the schema once per dialect
//! (`migrations/`), and [`Dialect`] holds the few differences (row locks,
//! how a write transaction begins, which errors mean "try again"). The
//! shared test suite runs against both.

pub use archive::ArchivedObject;
pub use definitions::{DefinitionKind, Put, StoredDefinition};
pub use deliveries::{DeadLetter, DeliveryOutcome, DeliverySummary, StoredFailure, StoredReplay};
pub use metric_windows::{
    Claimed, Combine, ComputedTrait, FirstRecords, GroupRow, LateEvent, MergeRow, MetricBatch,
    OpenGroup, StateSummary, StoredPart, StoredWindow, WindowQuery,
};
pub use profiles::{BatchOutcome, ChangeRecord, EventPage, ProfileBatch, ProfilePage};
pub use rules::{AlertQuery, RuleBatch, StoredAlert};
pub use settings::Advice;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sqlx::ConnectOptions;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AnyPool, PgPool, Row};

use cache::StateCache;

/// The SQLite store's file in the data directory.
const SQLITE_FILE: &str = "traitline.db";

/// Every SQLite connection's settings.
const SQLITE_PRAGMAS: [&str; 4] = [
    // Process crashes lose nothing with synchronous=NORMAL in WAL mode; a
    // power loss may drop the last commits, and with them their offsets,
    // so they are redone from the log: never half a batch.
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = NORMAL",
    "PRAGMA busy_timeout = 10000",
    // 32 MiB of pages a connection, not SQLite's 2 MiB: a batch's commit
    // of profiles, claims and window states touches more than that, and
    // would read them back from the OS (profiles + 10 metrics 7% faster,
    // 100 MiB more at peak: docs/benchmarks.md).
    "PRAGMA cache_size = -32768",
];

/// Which database a store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Sqlite,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or opened at start-up.
    #[error("cannot open the store ({setting}): {reason}")]
    Open {
        setting: &'static str,
        reason: String,
    },
    /// Another reader of this partition has committed past where this
    /// processor started: this processor's batch is stale and was not
    /// written.
    #[error(
        "partition {partition} of {topic} was processed elsewhere (stored offset moved); the batch was not written"
    )]
    Fenced { topic: String, partition: i32 },
    /// The database failed; the transaction was rolled back.
    #[error("the store failed: {0}")]
    Database(#[from] sqlx::Error),
    /// Stored JSON that does not parse: a bug or a manual edit.
    #[error("the store holds a row that does not parse: {0}")]
    Corrupt(String),
    /// A concurrent transaction changed rows this one read; it was rolled
    /// back and may be run again.
    #[error("a concurrent change conflicted with this transaction")]
    Conflict,
    /// The work was stopped before it finished (the process is shutting
    /// down); nothing was committed.
    #[error("interrupted before the commit: {0}")]
    Interrupted(String),
    /// SQLite failed, through its own API rather than sqlx's; the
    /// transaction was rolled back.
    #[error("the store failed: {message} (SQLite code {code})")]
    Native { code: i32, message: String },
}

/// Profile states the processor keeps in memory unless configured.
pub const DEFAULT_PROFILE_CACHE: usize = 20_000;

/// How often a transaction that hit a conflict (deadlock, serialization,
/// a concurrent insert of the same id, SQLite busy) is tried again.
const MAX_ATTEMPTS: u32 = 20;

/// `in_write_transaction!(store, begin, |tx| work)`: runs `work` (an
/// expression using `tx`, the connection of the transaction `begin` opens)
/// and commits it; a transaction that conflicted with a concurrent one
/// ([`Store::is_conflict`]) is rolled back and run again, up to
/// [`MAX_ATTEMPTS`] times. (A macro: an async closure borrowing `tx` cannot
/// be required to be `Send`.)
macro_rules! in_write_transaction {
    ($store:expr, $begin:expr, |$tx:ident| $work:expr) => {{
        let store: &$crate::store::Store = $store;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let started = std::time::Instant::now();
            let mut transaction = $begin.await?;
            let $tx = &mut *transaction;
            let result = match $work.await {
                Ok(value) => transaction
                    .commit()
                    .await
                    .map(|()| value)
                    .map_err(StoreError::from),
                Err(e) => {
                    let _ = transaction.rollback().await;
                    Err(e)
                }
            };
            let outcome = match &result {
                Ok(_) => "committed",
                Err(e) if store.is_conflict(e) => "conflict",
                Err(_) => "failed",
            };
            metrics::histogram!($crate::metrics::STORE_TRANSACTION_SECONDS, "outcome" => outcome)
                .record(started.elapsed().as_secs_f64());
            match result {
                Err(e) if store.is_conflict(&e) && attempt < $crate::store::MAX_ATTEMPTS => {
                    tracing::debug!(
                        attempt,
                        "a transaction conflicted with a concurrent one; trying again"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(5 * u64::from(attempt)))
                        .await;
                }
                other => break other,
            }
        }
    }};
}
pub(crate) use in_write_transaction;

mod archive;
mod batch;
mod cache;
pub mod claim_runs;
mod definitions;
mod deliveries;
mod metric_windows;
mod native_claims;
mod profiles;
mod rules;
mod settings;
pub mod snapshot;

/// The store of one deployment. Cheap to clone (a pool inside).
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
    /// PostgreSQL's own driver, for the batch writes that bind arrays
    /// (`Any` cannot); `None` for SQLite.
    pg: Option<PgPool>,
    /// The profile processor's states between batches.
    states: Arc<StateCache>,
    /// Message-id claims still to make with `ON CONFLICT` on PostgreSQL
    /// before a plain insert is tried again (see `claim_pg`).
    careful_claims: Arc<Careful>,
    /// Profile batches still to look their message ids up in `events` on
    /// PostgreSQL before one goes without (see `try_apply`).
    careful_events: Arc<Careful>,
    /// SQLite's claims through its own API (see [`native_claims`]);
    /// `None` for PostgreSQL.
    native_claims: Option<Arc<native_claims::NativeClaims>>,
}

/// How many more batches of a kind go the careful way (a lookup, an
/// `ON CONFLICT`) rather than the fast one, which fails whole on a message
/// id stored before: once one did, the next [`Careful::BATCHES`] (a
/// client's burst of retries, a backfill's ids, come batch after batch).
#[derive(Debug, Default)]
pub(crate) struct Careful(AtomicU32);

impl Careful {
    const BATCHES: u32 = 16;

    /// One whose next `batches` go carefully.
    pub(crate) fn new(batches: u32) -> Careful {
        Careful(AtomicU32::new(batches))
    }

    /// Whether this batch goes the careful way (and counts it).
    pub(crate) fn take(&self) -> bool {
        self.0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    /// A batch met an id stored before: the next ones go carefully.
    pub(crate) fn arm(&self) {
        self.0.store(Self::BATCHES, Ordering::Relaxed);
    }
}

impl Store {
    /// Opens the store the configuration names: PostgreSQL at `database_url`,
    /// else `traitline.db` (SQLite) in `data_dir`. Applies the migrations.
    pub async fn open(database_url: Option<&str>, data_dir: &Path) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let (url, dialect, setting) = match database_url {
            Some(url) => (url.to_owned(), Dialect::Postgres, "database-url"),
            None => {
                std::fs::create_dir_all(data_dir).map_err(|e| StoreError::Open {
                    setting: "data-dir",
                    reason: format!("cannot create {}: {e}", data_dir.display()),
                })?;
                let path = data_dir.join(SQLITE_FILE);
                (
                    format!("sqlite://{}?mode=rwc", path.display()),
                    Dialect::Sqlite,
                    "data-dir",
                )
            }
        };
        let open_error = |e: &dyn std::fmt::Display| StoreError::Open {
            setting,
            reason: e.to_string(),
        };
        let options = match dialect {
            Dialect::Postgres => AnyPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(10)),
            // One file, one writer at a time: a few connections let the
            // query API read while a processor writes (WAL).
            Dialect::Sqlite => AnyPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(10))
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        for pragma in SQLITE_PRAGMAS {
                            sqlx::query(pragma).execute(&mut *conn).await?;
                        }
                        Ok(())
                    })
                }),
        };
        // sqlx logs every statement at debug and a slow one (over 1 s) as a
        // warning with its whole text; a slow statement here is a batch
        // waiting for a lock, which the processor's own logs explain.
        let connect = url
            .parse::<AnyConnectOptions>()
            .map_err(|e| open_error(&e))?
            .log_statements(log::LevelFilter::Trace)
            .log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(1));
        let pool = options
            .connect_with(connect)
            .await
            .map_err(|e| open_error(&e))?;
        let pg = match dialect {
            Dialect::Postgres => {
                let connect = url
                    .parse::<PgConnectOptions>()
                    .map_err(|e| open_error(&e))?
                    .log_statements(log::LevelFilter::Trace)
                    .log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(1))
                    // Plan each batch statement for its own arguments. A
                    // cached generic plan made while the tables were small
                    // (a new deployment) scans them whole, and keeps doing
                    // so as they grow until autovacuum analyzes them: commits
                    // 15 times slower for the first minute or so. No
                    // parallel workers: the runner already commits several
                    // batches at once, and workers started for a statement
                    // only compete with them for the cores.
                    .options([
                        ("plan_cache_mode", "force_custom_plan"),
                        ("max_parallel_workers_per_gather", "0"),
                    ]);
                // The processors' batches: the profile runner's parallel
                // commits, and the overflow runner's beside them.
                Some(
                    PgPoolOptions::new()
                        .max_connections(6)
                        .acquire_timeout(Duration::from_secs(10))
                        .connect_lazy_with(connect),
                )
            }
            Dialect::Sqlite => None,
        };
        let migrator = Migrator::with_migrations(migrations(dialect));
        let started = std::time::Instant::now();
        let pending = announce_migrations(&pool, &migrator).await;
        migrator.run(&pool).await.map_err(|e| match e {
            // A newer release may store what this one cannot read.
            sqlx::migrate::MigrateError::VersionMissing(version) => open_error(&format!(
                "a newer Traitline updated this store (its migration {version} is unknown to \
                 version {}); run that release or a later one",
                env!("CARGO_PKG_VERSION")
            )),
            e => open_error(&e),
        })?;
        if pending > 0 {
            tracing::info!(
                migrations = pending,
                seconds = started.elapsed().as_secs_f64(),
                "the store's schema is up to date"
            );
        }
        Ok(Store {
            pool,
            dialect,
            pg,
            states: Arc::new(StateCache::new(DEFAULT_PROFILE_CACHE)),
            careful_claims: Arc::default(),
            careful_events: Arc::default(),
            native_claims: (dialect == Dialect::Sqlite).then(|| {
                Arc::new(native_claims::NativeClaims::new(
                    &data_dir.join(SQLITE_FILE),
                ))
            }),
        })
    }

    /// The store with a cache of `profiles` profile states for the profile
    /// processor (0: none), instead of the default's
    /// [`DEFAULT_PROFILE_CACHE`].
    pub fn with_profile_cache(mut self, profiles: usize) -> Store {
        self.states = Arc::new(StateCache::new(profiles));
        self
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// A one-line description for start-up messages.
    pub fn describe(&self) -> String {
        match self.dialect {
            Dialect::Postgres => "PostgreSQL store".to_owned(),
            Dialect::Sqlite => "SQLite store".to_owned(),
        }
    }

    /// Makes every insert into `table` fail (SQLite), as a database that
    /// went away would, until [`Store::allow_inserts`]: faults injected by
    /// tests.
    #[cfg(test)]
    pub async fn refuse_inserts(&self, table: &str) {
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS fault (on_ INTEGER); \
             CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} WHEN EXISTS (SELECT 1 FROM fault) \
             BEGIN SELECT RAISE(ABORT, 'injected fault'); END; \
             INSERT INTO fault VALUES (1);"
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&self.pool)
            .await
            .expect("the fault is set");
    }

    /// Lifts [`Store::refuse_inserts`].
    #[cfg(test)]
    pub async fn allow_inserts(&self) {
        sqlx::raw_sql("DELETE FROM fault")
            .execute(&self.pool)
            .await
            .expect("the fault is lifted");
    }

    /// Closes every connection.
    pub async fn close(&self) {
        if let Some(native) = &self.native_claims {
            native.close().await;
        }
        self.pool.close().await;
        if let Some(pg) = &self.pg {
            pg.close().await;
        }
    }

    /// Begins a transaction that will write. SQLite takes the write lock at
    /// once, so two writers wait for each other instead of failing later.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.dialect {
            Dialect::Postgres => self.pool.begin().await,
            Dialect::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
        }
    }

    /// Whether a failed transaction may succeed when run again: a deadlock,
    /// a serialization failure, a concurrent insert of the same key, or
    /// SQLite's busy and locked answers.
    fn is_conflict(&self, error: &StoreError) -> bool {
        let StoreError::Database(sqlx::Error::Database(db)) = error else {
            return matches!(error, StoreError::Conflict);
        };
        let code = db.code().unwrap_or_default();
        match self.dialect {
            Dialect::Postgres => matches!(code.as_ref(), "40001" | "40P01" | "23505"),
            Dialect::Sqlite => {
                let primary = code.parse::<i32>().map(|c| c & 0xff).unwrap_or(0);
                primary == 5 || primary == 6
            }
        }
    }

    /// The next offset of every partition of `topic` that `processor` has
    /// committed.
    pub async fn offsets(
        &self,
        processor: &str,
        topic: &str,
    ) -> Result<HashMap<i32, i64>, StoreError> {
        let rows = sqlx::query("SELECT partition, next_offset FROM processor_offsets WHERE processor = $1 AND topic = $2")
            .bind(processor)
            .bind(topic)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row: &AnyRow| Ok((row.try_get::<i32, _>(0)?, row.try_get::<i64, _>(1)?)))
            .collect()
    }

    /// Deletes the events received before `before_ms` (the retention):
    /// with an event goes the record that its message id was applied, so
    /// a retry of it is counted again from then on. Returns the rows
    /// deleted.
    pub async fn purge(&self, before_ms: i64) -> Result<u64, StoreError> {
        let events = sqlx::query("DELETE FROM events WHERE received_at < $1")
            .bind(before_ms)
            .execute(&self.pool)
            .await?;
        // The metrics' record of counted message ids goes with them.
        sqlx::query("DELETE FROM metric_seen WHERE received_at < $1")
            .bind(before_ms)
            .execute(&self.pool)
            .await?;
        if let Some(native) = &self.native_claims {
            native.expire(before_ms).await?;
        }
        sqlx::query("DELETE FROM metric_late WHERE recorded_at < $1 AND published = 1")
            .bind(before_ms)
            .execute(&self.pool)
            .await?;
        Ok(events.rows_affected())
    }
}

/// Says which of `migrator`'s migrations the store is about to apply, and
/// returns how many: on an existing store one may rebuild indexes of
/// large tables, and start-up waits for it. A store with none applied
/// (or whose table of them cannot be read: then applying says what is
/// wrong) is new.
async fn announce_migrations(pool: &AnyPool, migrator: &Migrator) -> usize {
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await
            .unwrap_or_default();
    let pending: Vec<&Migration> = migrator
        .iter()
        .filter(|m| !applied.contains(&m.version))
        .collect();
    if applied.is_empty() {
        tracing::info!(
            migrations = pending.len(),
            "the store is new: creating its tables"
        );
    } else {
        for migration in &pending {
            tracing::info!(
                migration = migration.version,
                "updating the store's schema: {}; on a large store this can take minutes",
                migration.description
            );
        }
    }
    pending.len()
}

/// The store's schema, as numbered migrations (applied in order at start-up,
/// each once). Both dialects share the first; later ones may tune one only.
fn migrations(dialect: Dialect) -> Vec<Migration> {
    let migration = |version, description: &str, sql: &'static str| {
        Migration::new(
            version,
            description.to_owned().into(),
            MigrationType::Simple,
            sqlx::SqlSafeStr::into_sql_str(sql),
            false,
        )
    };
    const TABLES: &str = "profiles, identities, changes, events, offsets";
    let version = migration(
        3,
        "a version for every write of a profile",
        include_str!("migrations/version_3.sql"),
    );
    let definitions = migration(
        4,
        "definitions, every version kept",
        include_str!("migrations/version_4.sql"),
    );
    let windows = migration(
        5,
        "metric window state, closed windows, partition clocks",
        include_str!("migrations/version_5.sql"),
    );
    let combined = migration(
        6,
        "window parts of metrics combined across partitions",
        include_str!("migrations/version_6.sql"),
    );
    let due = migration(
        7,
        "when each stored window state closes next",
        include_str!("migrations/version_7.sql"),
    );
    let merges = migration(
        8,
        "open windows moving between partitions on an alias merge",
        include_str!("migrations/version_8.sql"),
    );
    let claims = migration(
        9,
        "the log position of each counted message id",
        include_str!("migrations/version_9.sql"),
    );
    let shared_claims = migration(
        10,
        "one claim of a message id for every metric",
        include_str!("migrations/version_10.sql"),
    );
    let deliveries = migration(
        13,
        "destinations' attempts, dead letters and states",
        include_str!("migrations/version_13.sql"),
    );
    let done_above = migration(
        14,
        "work finished above an at-least-once processor's position",
        include_str!("migrations/version_14.sql"),
    );
    let archive = migration(
        15,
        "the archive's manifest",
        include_str!("migrations/version_15.sql"),
    );
    let by_group = migration(
        17,
        "no index of metric states by group",
        include_str!("migrations/version_17.sql"),
    );
    let rules = migration(
        12,
        "pattern rules' partial matches and alerts",
        include_str!("migrations/version_12.sql"),
    );
    let spans = migration(
        20,
        "pattern states stored with spans of events (older versions refuse the store)",
        include_str!("migrations/version_20.sql"),
    );
    let one_claim = migration(
        21,
        "one message-id claim for the metrics and rules together",
        include_str!("migrations/version_21.sql"),
    );
    match dialect {
        Dialect::Postgres => vec![
            migration(1, TABLES, include_str!("migrations/postgres.sql")),
            migration(
                2,
                "BRIN index on events.received_at, profiles fillfactor 50",
                include_str!("migrations/postgres_2.sql"),
            ),
            version,
            definitions,
            windows,
            combined,
            due,
            merges,
            claims,
            shared_claims,
            migration(
                11,
                "room for in-place rewrites of metric state",
                include_str!("migrations/postgres_11.sql"),
            ),
            rules,
            deliveries,
            done_above,
            archive,
            migration(
                16,
                "lz4 for window and partial-match states",
                include_str!("migrations/postgres_16.sql"),
            ),
            by_group,
            migration(
                18,
                "byte-wise keys in the tables added since the first",
                include_str!("migrations/postgres_18.sql"),
            ),
            spans,
            one_claim,
        ],
        Dialect::Sqlite => vec![
            migration(1, TABLES, include_str!("migrations/sqlite.sql")),
            version,
            definitions,
            windows,
            combined,
            due,
            merges,
            claims,
            shared_claims,
            // SQLite has no migration 11 (PostgreSQL's page fill), 16
            // (its value compression) nor 18 (its collation: SQLite's
            // BINARY compares bytes already); PostgreSQL no 19 (its
            // tables are heaps beside their indexes, whatever the key).
            rules,
            deliveries,
            done_above,
            archive,
            by_group,
            migration(
                19,
                "message-id claims stored in their key's B-tree",
                include_str!("migrations/sqlite_19.sql"),
            ),
            spans,
            one_claim,
            migration(
                22,
                "message-id claims as sorted runs",
                include_str!("migrations/sqlite_22.sql"),
            ),
        ],
    }
}

/// Where a batch takes one partition: the runner's checkpoint.
pub use crate::process::OffsetAdvance;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
