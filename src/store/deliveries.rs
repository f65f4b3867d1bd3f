//! Destinations in the store (migration 13): every delivery attempt, the
//! dead letters a destination gave up on, and a destination's state when
//! an endpoint stopped it. Positions live in `processor_offsets` as every
//! processor's do (processor `destination:{name}`).

use std::collections::HashMap;

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::batch::Conn;
use super::metric_windows::{ROWS, write_rows};
use super::{OffsetAdvance, Store, StoreError};

/// One attempt's outcome as stored and on `user_deliveries`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryOutcome {
    pub attempt_id: String,
    pub destination: String,
    pub version: i64,
    /// The id the receiver sees (`webhook-id`), the same on every attempt.
    pub delivery_id: String,
    /// 1 for the first attempt of a record in this run.
    pub attempt: i32,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    /// `delivered`, `retrying` or `dead_letter`.
    pub outcome: String,
    pub status: Option<i32>,
    pub latency_ms: i64,
    /// The start of the endpoint's answer, or why there was none.
    pub response: String,
    pub at: i64,
    /// For a dead letter: the records given up on (one, or a batch's),
    /// each kept for a replay.
    pub dead_letters: Vec<DeadLetter>,
}

/// A record given up on, as the outcome that gave up names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The record's own delivery id (a replay sends it alone).
    pub delivery_id: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    /// The record (JSON).
    pub body: String,
}

/// A dead letter: a record a destination gave up on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFailure {
    pub delivery_id: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub body: String,
    pub attempts: i32,
    pub reason: String,
    pub failed_at: i64,
}

/// A replay of a destination's dead letters or of a time range of its
/// topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredReplay {
    pub replay_id: String,
    pub destination: String,
    /// `dead_letters` or `log`.
    pub what: String,
    /// Dead letters that failed, or records the log stored, in
    /// `[from_ms, to_ms)`.
    pub from_ms: i64,
    pub to_ms: i64,
    pub requested_at: i64,
    /// `pending`, `running` or `done`.
    pub state: String,
    pub delivered: i64,
    pub failed: i64,
    pub finished_at: Option<i64>,
}

/// What a destination has done lately.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeliverySummary {
    /// Records delivered since `since`.
    pub delivered: i64,
    /// Attempts that failed and were retried since `since`.
    pub retried: i64,
    /// Dead letters held now.
    pub dead_letters: i64,
    /// The 95th percentile of the latency of the attempts since `since`.
    pub p95_latency_ms: Option<i64>,
    pub last_attempt_at: Option<i64>,
}

/// Most recent attempts a summary's percentile is taken over.
const PERCENTILE_SAMPLE: i64 = 10_000;

impl Store {
    /// Moves an at-least-once processor's positions (fenced as a batch's
    /// offsets are), with the ranges of offsets finished above each.
    pub async fn save_positions(
        &self,
        processor: &str,
        topic: &str,
        offsets: &[OffsetAdvance],
        done: &HashMap<i32, Vec<(i64, i64)>>,
    ) -> Result<(), StoreError> {
        let dialect = self.dialect;
        super::in_write_transaction!(self, self.begin_write(), |tx| save_in(
            tx, dialect, processor, topic, offsets, done
        ))
    }

    /// The ranges of offsets finished above each partition's position.
    pub async fn done_above(
        &self,
        processor: &str,
        topic: &str,
    ) -> Result<HashMap<i32, Vec<(i64, i64)>>, StoreError> {
        let rows = sqlx::query(
            "SELECT partition, done_above FROM processor_offsets \
             WHERE processor = $1 AND topic = $2 AND done_above IS NOT NULL",
        )
        .bind(processor)
        .bind(topic)
        .fetch_all(&self.pool)
        .await?;
        let mut done = HashMap::new();
        for row in rows {
            let text: String = row.try_get(1)?;
            let ranges: Vec<(i64, i64)> = serde_json::from_str(&text)
                .map_err(|e| StoreError::Corrupt(format!("done_above of {processor}: {e}")))?;
            done.insert(row.try_get(0)?, ranges);
        }
        Ok(done)
    }

    /// Stores attempts' outcomes: a dead letter is kept until replayed,
    /// and a record delivered (by a replay) is no longer one.
    pub async fn record_deliveries(&self, outcomes: &[DeliveryOutcome]) -> Result<(), StoreError> {
        if outcomes.is_empty() {
            return Ok(());
        }
        let dialect = self.dialect;
        super::in_write_transaction!(self, self.begin_write(), |tx| record_in(
            tx, dialect, outcomes
        ))
    }

    /// Outcomes not yet on `user_deliveries`, oldest first.
    pub async fn unpublished_deliveries(
        &self,
        limit: u32,
    ) -> Result<Vec<DeliveryOutcome>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ATTEMPT_COLUMNS} FROM delivery_attempts WHERE published = 0 \
             ORDER BY at, attempt_id LIMIT $1"
        )))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(outcome).collect()
    }

    /// Marks outcomes as on `user_deliveries`.
    pub async fn mark_deliveries_published(&self, ids: &[&str]) -> Result<(), StoreError> {
        self.mark_rows_published("delivery_attempts", "attempt_id", ids)
            .await
    }

    /// A destination's attempts, newest first.
    pub async fn delivery_attempts(
        &self,
        destination: &str,
        limit: u32,
    ) -> Result<Vec<DeliveryOutcome>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ATTEMPT_COLUMNS} FROM delivery_attempts WHERE destination = $1 \
             ORDER BY at DESC, attempt_id DESC LIMIT $2"
        )))
        .bind(destination)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(outcome).collect()
    }

    /// A destination's dead letters, oldest first; with `failed`, only
    /// those that failed in `[from, to)` (ms); with `after`, only those
    /// after that one (its failure time and id: a page's cursor).
    pub async fn delivery_failures(
        &self,
        destination: &str,
        failed: Option<(i64, i64)>,
        after: Option<(i64, &str)>,
        limit: u32,
    ) -> Result<Vec<StoredFailure>, StoreError> {
        let (from, to) = failed.unwrap_or((i64::MIN, i64::MAX));
        let (after_at, after_id) = after.unwrap_or((i64::MIN, ""));
        let rows = sqlx::query(
            "SELECT delivery_id, partition, record_offset, record_key, body, attempts, reason, failed_at \
             FROM delivery_failures WHERE destination = $1 AND failed_at >= $2 AND failed_at < $3 \
             AND (failed_at > $4 OR (failed_at = $4 AND delivery_id > $5)) \
             ORDER BY failed_at, delivery_id LIMIT $6",
        )
        .bind(destination)
        .bind(from)
        .bind(to)
        .bind(after_at)
        .bind(after_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(StoredFailure {
                    delivery_id: row.try_get(0)?,
                    partition: row.try_get(1)?,
                    offset: row.try_get(2)?,
                    key: row.try_get(3)?,
                    body: row.try_get(4)?,
                    attempts: row.try_get(5)?,
                    reason: row.try_get(6)?,
                    failed_at: row.try_get(7)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// What `destination` did since `since` (ms).
    pub async fn delivery_summary(
        &self,
        destination: &str,
        since: i64,
    ) -> Result<DeliverySummary, StoreError> {
        let counts = sqlx::query(
            "SELECT \
               COALESCE(SUM(CASE WHEN outcome = 'delivered' THEN 1 ELSE 0 END), 0), \
               COALESCE(SUM(CASE WHEN outcome <> 'delivered' THEN 1 ELSE 0 END), 0), \
               MAX(at) \
             FROM delivery_attempts WHERE destination = $1 AND at >= $2",
        )
        .bind(destination)
        .bind(since)
        .fetch_one(&self.pool)
        .await?;
        let dead_letters =
            sqlx::query("SELECT COUNT(*) FROM delivery_failures WHERE destination = $1")
                .bind(destination)
                .fetch_one(&self.pool)
                .await?;
        let mut latencies: Vec<i64> = sqlx::query(
            "SELECT latency_ms FROM delivery_attempts WHERE destination = $1 AND at >= $2 \
             ORDER BY at DESC LIMIT $3",
        )
        .bind(destination)
        .bind(since)
        .bind(PERCENTILE_SAMPLE)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, sqlx::Error>>()?;
        latencies.sort_unstable();
        let p95 = (!latencies.is_empty())
            .then(|| latencies[((latencies.len() * 95).div_ceil(100)).saturating_sub(1)]);
        Ok(DeliverySummary {
            delivered: counts.try_get(0)?,
            retried: counts.try_get(1)?,
            dead_letters: dead_letters.try_get(0)?,
            p95_latency_ms: p95,
            last_attempt_at: counts.try_get(2)?,
        })
    }

    /// Deletes the delivery attempts made before `before_ms` that are on
    /// `user_deliveries`, and replays finished before it; the rows
    /// deleted.
    pub async fn purge_delivery_attempts(&self, before_ms: i64) -> Result<u64, StoreError> {
        let attempts = sqlx::query("DELETE FROM delivery_attempts WHERE at < $1 AND published = 1")
            .bind(before_ms)
            .execute(&self.pool)
            .await?;
        sqlx::query("DELETE FROM destination_replays WHERE state = 'done' AND finished_at < $1")
            .bind(before_ms)
            .execute(&self.pool)
            .await?;
        Ok(attempts.rows_affected())
    }

    /// Asks for a replay; it is pending until an instance running the
    /// destination takes it.
    pub async fn request_replay(
        &self,
        destination: &str,
        what: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<StoredReplay, StoreError> {
        let now = super::now_ms();
        let id = uuid::Uuid::new_v4().to_string();
        sqlx::query(
            "INSERT INTO destination_replays (replay_id, destination, what, from_ms, to_ms, \
             requested_at, state, updated_at) VALUES ($1, $2, $3, $4, $5, $6, 'pending', $6)",
        )
        .bind(id.as_str())
        .bind(destination)
        .bind(what)
        .bind(from_ms)
        .bind(to_ms)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(StoredReplay {
            replay_id: id,
            destination: destination.to_owned(),
            what: what.to_owned(),
            from_ms,
            to_ms,
            requested_at: now,
            state: "pending".to_owned(),
            delivered: 0,
            failed: 0,
            finished_at: None,
        })
    }

    /// A destination's replays, newest first.
    pub async fn replays(
        &self,
        destination: &str,
        limit: u32,
    ) -> Result<Vec<StoredReplay>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {REPLAY_COLUMNS} FROM destination_replays WHERE destination = $1 \
             ORDER BY requested_at DESC LIMIT $2"
        )))
        .bind(destination)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(replay).collect()
    }

    /// Takes a replay of `destination` to run: a pending one, or a
    /// running one not touched since `stale_before` (its instance
    /// stopped). Each is taken by one instance.
    pub async fn take_replay(
        &self,
        destination: &str,
        stale_before: i64,
    ) -> Result<Option<StoredReplay>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {REPLAY_COLUMNS}, updated_at FROM destination_replays WHERE destination = $1 \
             AND (state = 'pending' OR (state = 'running' AND updated_at < $2)) \
             ORDER BY requested_at LIMIT 1"
        )))
        .bind(destination)
        .bind(stale_before)
        .fetch_all(&self.pool)
        .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let mut found = replay(row)?;
        let seen: i64 = row.try_get(10)?;
        let taken = sqlx::query(
            "UPDATE destination_replays SET state = 'running', updated_at = $1 \
             WHERE replay_id = $2 AND updated_at = $3 AND state = $4",
        )
        .bind(super::now_ms())
        .bind(found.replay_id.as_str())
        .bind(seen)
        .bind(found.state.as_str())
        .execute(&self.pool)
        .await?
        .rows_affected();
        found.state = "running".to_owned();
        Ok((taken == 1).then_some(found))
    }

    /// Records a running replay's progress (`done`: it finished).
    pub async fn replay_progress(
        &self,
        replay_id: &str,
        delivered: i64,
        failed: i64,
        done: bool,
    ) -> Result<(), StoreError> {
        let now = super::now_ms();
        sqlx::query(
            "UPDATE destination_replays SET delivered = $1, failed = $2, updated_at = $3, \
             state = CASE WHEN $4 = 1 THEN 'done' ELSE state END, \
             finished_at = CASE WHEN $4 = 1 THEN $3 ELSE finished_at END \
             WHERE replay_id = $5",
        )
        .bind(delivered)
        .bind(failed)
        .bind(now)
        .bind(i32::from(done))
        .bind(replay_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A destination's state when something other than its definition
    /// set it (`disabled` by a 410): the version it is of, the state,
    /// why, since when.
    pub async fn destination_state(
        &self,
        destination: &str,
    ) -> Result<Option<(i64, String, String, i64)>, StoreError> {
        let row = sqlx::query(
            "SELECT version, state, reason, since FROM destination_states WHERE destination = $1",
        )
        .bind(destination)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok((
                row.try_get(0)?,
                row.try_get(1)?,
                row.try_get(2)?,
                row.try_get(3)?,
            ))
        })
        .transpose()
        .map_err(|e: sqlx::Error| StoreError::from(e))
    }

    pub async fn set_destination_state(
        &self,
        destination: &str,
        version: i64,
        state: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO destination_states (destination, version, state, reason, since) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (destination) DO UPDATE SET \
             version = excluded.version, state = excluded.state, reason = excluded.reason, \
             since = excluded.since",
        )
        .bind(destination)
        .bind(version)
        .bind(state)
        .bind(reason)
        .bind(super::now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

async fn save_in(
    tx: &mut AnyConnection,
    dialect: super::Dialect,
    processor: &str,
    topic: &str,
    offsets: &[OffsetAdvance],
    done: &HashMap<i32, Vec<(i64, i64)>>,
) -> Result<(), StoreError> {
    Conn::Any(&mut *tx, dialect)
        .advance_offsets(processor, topic, offsets, super::now_ms())
        .await?;
    for advance in offsets {
        let ranges = done.get(&advance.partition).filter(|r| !r.is_empty());
        sqlx::query(
            "UPDATE processor_offsets SET done_above = $1 \
             WHERE processor = $2 AND topic = $3 AND partition = $4",
        )
        .bind(ranges.map(|r| serde_json::to_string(r).expect("ranges serialize")))
        .bind(processor)
        .bind(topic)
        .bind(advance.partition)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

const REPLAY_COLUMNS: &str = "replay_id, destination, what, from_ms, to_ms, requested_at, state, \
     delivered, failed, finished_at";

fn replay(row: &AnyRow) -> Result<StoredReplay, StoreError> {
    Ok(StoredReplay {
        replay_id: row.try_get(0)?,
        destination: row.try_get(1)?,
        what: row.try_get(2)?,
        from_ms: row.try_get(3)?,
        to_ms: row.try_get(4)?,
        requested_at: row.try_get(5)?,
        state: row.try_get(6)?,
        delivered: row.try_get(7)?,
        failed: row.try_get(8)?,
        finished_at: row.try_get(9)?,
    })
}

const ATTEMPT_COLUMNS: &str = "attempt_id, destination, version, delivery_id, attempt, partition, \
     record_offset, record_key, outcome, status, latency_ms, response, at";

fn outcome(row: &AnyRow) -> Result<DeliveryOutcome, StoreError> {
    Ok(DeliveryOutcome {
        attempt_id: row.try_get(0)?,
        destination: row.try_get(1)?,
        version: row.try_get(2)?,
        delivery_id: row.try_get(3)?,
        attempt: row.try_get(4)?,
        partition: row.try_get(5)?,
        offset: row.try_get(6)?,
        key: row.try_get(7)?,
        outcome: row.try_get(8)?,
        status: row.try_get(9)?,
        latency_ms: row.try_get(10)?,
        response: row.try_get(11)?,
        at: row.try_get(12)?,
        dead_letters: Vec::new(),
    })
}

async fn record_in(
    tx: &mut AnyConnection,
    dialect: super::Dialect,
    outcomes: &[DeliveryOutcome],
) -> Result<(), StoreError> {
    write_rows(
        tx,
        dialect,
        "INSERT INTO delivery_attempts (attempt_id, destination, version, delivery_id, attempt, \
         partition, record_offset, record_key, outcome, status, latency_ms, response, at) VALUES",
        "ON CONFLICT (attempt_id) DO NOTHING",
        13,
        outcomes,
        |query, o| {
            query
                .bind(o.attempt_id.as_str())
                .bind(o.destination.as_str())
                .bind(o.version)
                .bind(o.delivery_id.as_str())
                .bind(o.attempt)
                .bind(o.partition)
                .bind(o.offset)
                .bind(o.key.as_deref())
                .bind(o.outcome.as_str())
                .bind(o.status)
                .bind(o.latency_ms)
                .bind(o.response.as_str())
                .bind(o.at)
        },
    )
    .await?;
    let dead: Vec<(&DeliveryOutcome, &DeadLetter)> = outcomes
        .iter()
        .flat_map(|o| o.dead_letters.iter().map(move |d| (o, d)))
        .collect();
    write_rows(
        tx,
        dialect,
        "INSERT INTO delivery_failures (destination, delivery_id, partition, record_offset, \
         record_key, body, attempts, reason, failed_at) VALUES",
        "ON CONFLICT (destination, delivery_id) DO UPDATE SET attempts = excluded.attempts, \
         reason = excluded.reason, failed_at = excluded.failed_at",
        9,
        &dead,
        |query, (o, d)| {
            query
                .bind(o.destination.as_str())
                .bind(d.delivery_id.as_str())
                .bind(d.partition)
                .bind(d.offset)
                .bind(d.key.as_deref())
                .bind(d.body.as_str())
                .bind(o.attempt)
                .bind(o.response.as_str())
                .bind(o.at)
        },
    )
    .await?;
    let delivered: Vec<&DeliveryOutcome> = outcomes
        .iter()
        .filter(|o| o.outcome == "delivered")
        .collect();
    for chunk in delivered.chunks(ROWS / 2) {
        let sql = format!(
            "DELETE FROM delivery_failures WHERE (destination, delivery_id) {}",
            super::metric_windows::in_rows(dialect, chunk.len(), 2, 1)
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for o in chunk {
            query = query
                .bind(o.destination.as_str())
                .bind(o.delivery_id.as_str());
        }
        query.execute(&mut *tx).await?;
    }
    Ok(())
}
