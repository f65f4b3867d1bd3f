//! Window state and closed windows of the metrics processors (migration
//! 5). A batch's state changes, closed windows, partition clocks and
//! offsets commit in one transaction, fenced like the profile batches: a
//! crash, a rebalance or a redelivery never counts an event twice in a
//! window, and a closed window is written once.

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::batch::Conn;
use super::{OffsetAdvance, Store, StoreError, now_ms};

/// One commit of a metric version's runner.
#[derive(Debug, Clone)]
pub struct MetricBatch<'a> {
    /// The runner's name, its offsets' and states' key.
    pub processor: &'a str,
    pub topic: &'a str,
    pub offsets: Vec<OffsetAdvance>,
    /// Each partition's watermark after the batch, stored beside its
    /// offset (the partition must be among `offsets` or already stored).
    pub clocks: Vec<(i32, i64)>,
    /// Group states to write, by partition: `None` removes the group
    /// (nothing left open).
    pub states: Vec<(i32, String, Option<String>)>,
    /// Windows the batch closed.
    pub windows: Vec<StoredWindow>,
    /// The message ids the batch counted, with their receive time.
    pub seen: Vec<(String, i64)>,
}

/// A closed window, as stored and served.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredWindow {
    pub metric: String,
    pub version: i64,
    pub group: String,
    pub start_ms: i64,
    pub end_ms: i64,
    /// The value as JSON.
    pub value: String,
    pub events: i64,
}

/// Which closed windows to read.
#[derive(Debug, Clone, Default)]
pub struct WindowQuery<'a> {
    pub metric: &'a str,
    pub version: i64,
    pub group: Option<&'a str>,
    /// Windows ending after this (ms).
    pub from_ms: Option<i64>,
    /// Windows starting before this (ms).
    pub to_ms: Option<i64>,
    pub limit: u32,
}

impl Store {
    /// Commits a metric batch: offsets (fenced), clocks, states, windows.
    pub async fn apply_metric_batch(&self, batch: &MetricBatch<'_>) -> Result<(), StoreError> {
        let dialect = self.dialect;
        super::in_write_transaction!(self, self.begin_write(), |tx| write_batch(
            tx, dialect, batch
        ))
    }

    /// The stored states of `processor`'s groups in `partition`, with the
    /// partition's stored clock.
    pub async fn metric_states(
        &self,
        processor: &str,
        topic: &str,
        partition: i32,
    ) -> Result<(Option<i64>, Vec<(String, String)>), StoreError> {
        let clock = sqlx::query(
            "SELECT clock FROM processor_offsets WHERE processor = $1 AND topic = $2 AND partition = $3",
        )
        .bind(processor)
        .bind(topic)
        .bind(partition)
        .fetch_optional(&self.pool)
        .await?
        .map(|row| row.try_get::<Option<i64>, _>(0))
        .transpose()?
        .flatten();
        let rows = sqlx::query(
            "SELECT grp, state FROM metric_state WHERE processor = $1 AND partition = $2 ORDER BY grp",
        )
        .bind(processor)
        .bind(partition)
        .fetch_all(&self.pool)
        .await?;
        let states = rows
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<Result<_, sqlx::Error>>()?;
        Ok((clock, states))
    }

    /// Which of `message_ids` `processor` has counted before.
    pub async fn metric_seen(
        &self,
        processor: &str,
        message_ids: &[&str],
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        let mut known = std::collections::HashSet::new();
        for chunk in message_ids.chunks(super::batch::ROWS_PER_INSERT) {
            let sql = format!(
                "SELECT message_id FROM metric_seen WHERE processor = $1 AND message_id IN ({})",
                self.dialect.params(chunk.len(), 2)
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(processor);
            for id in chunk {
                query = query.bind(*id);
            }
            for row in query.fetch_all(&self.pool).await? {
                known.insert(row.try_get::<String, _>(0)?);
            }
        }
        Ok(known)
    }

    /// Closed windows of a metric version, oldest first.
    pub async fn metric_windows(
        &self,
        query: &WindowQuery<'_>,
    ) -> Result<Vec<StoredWindow>, StoreError> {
        let rows = sqlx::query(
            "SELECT metric, version, grp, start_ms, end_ms, value, events FROM metric_windows \
             WHERE metric = $1 AND version = $2 AND ($3 IS NULL OR grp = $3) \
               AND ($4 IS NULL OR end_ms > $4) AND ($5 IS NULL OR start_ms < $5) \
             ORDER BY start_ms, grp, end_ms LIMIT $6",
        )
        .bind(query.metric)
        .bind(query.version)
        .bind(query.group)
        .bind(query.from_ms)
        .bind(query.to_ms)
        .bind(i64::from(query.limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(window).collect()
    }
}

fn window(row: &AnyRow) -> Result<StoredWindow, StoreError> {
    Ok(StoredWindow {
        metric: row.try_get(0)?,
        version: row.try_get(1)?,
        group: row.try_get(2)?,
        start_ms: row.try_get(3)?,
        end_ms: row.try_get(4)?,
        value: row.try_get(5)?,
        events: row.try_get(6)?,
    })
}

async fn write_batch(
    tx: &mut AnyConnection,
    dialect: super::Dialect,
    batch: &MetricBatch<'_>,
) -> Result<(), StoreError> {
    let now = now_ms();
    Conn::Any(&mut *tx, dialect)
        .advance_offsets(batch.processor, batch.topic, &batch.offsets, now)
        .await?;
    for (partition, clock) in &batch.clocks {
        sqlx::query(
            "UPDATE processor_offsets SET clock = $1 \
             WHERE processor = $2 AND topic = $3 AND partition = $4",
        )
        .bind(*clock)
        .bind(batch.processor)
        .bind(batch.topic)
        .bind(*partition)
        .execute(&mut *tx)
        .await?;
    }
    for (partition, group, state) in &batch.states {
        match state {
            Some(state) => sqlx::query(
                "INSERT INTO metric_state (processor, partition, grp, state) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (processor, partition, grp) DO UPDATE SET state = excluded.state",
            )
            .bind(batch.processor)
            .bind(*partition)
            .bind(group.as_str())
            .bind(state.as_str())
            .execute(&mut *tx)
            .await?,
            None => sqlx::query(
                "DELETE FROM metric_state WHERE processor = $1 AND partition = $2 AND grp = $3",
            )
            .bind(batch.processor)
            .bind(*partition)
            .bind(group.as_str())
            .execute(&mut *tx)
            .await?,
        };
    }
    for (message_id, received_at) in &batch.seen {
        sqlx::query(
            "INSERT INTO metric_seen (processor, message_id, received_at) VALUES ($1, $2, $3)",
        )
        .bind(batch.processor)
        .bind(message_id.as_str())
        .bind(*received_at)
        .execute(&mut *tx)
        .await?;
    }
    for w in &batch.windows {
        sqlx::query(
            "INSERT INTO metric_windows (metric, version, grp, start_ms, end_ms, value, events, closed_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(w.metric.as_str())
        .bind(w.version)
        .bind(w.group.as_str())
        .bind(w.start_ms)
        .bind(w.end_ms)
        .bind(w.value.as_str())
        .bind(w.events)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}
