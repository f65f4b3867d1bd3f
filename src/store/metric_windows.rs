//! Window state and closed windows of the metrics processors (migration
//! 5). A batch's state changes, closed windows, partition clocks and
//! offsets commit in one transaction, fenced like the profile batches: a
//! crash, a rebalance or a redelivery never counts an event twice in a
//! window, and a closed window is written once.

use std::collections::{BTreeSet, HashMap, HashSet};

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::batch::Conn;
use super::{OffsetAdvance, Store, StoreError, now_ms};
use crate::metric::combine::Combiner;
use crate::windows::{Aggregate, Closed, Span};

/// One commit of a metric version's runner.
#[derive(Debug, Clone)]
pub struct MetricBatch<'a> {
    /// The runner's name, its offsets' and states' key.
    pub processor: &'a str,
    /// The metric's name.
    pub metric: &'a str,
    pub topic: &'a str,
    pub offsets: Vec<OffsetAdvance>,
    /// Each partition's watermark after the batch, stored beside its
    /// offset (the partition must be among `offsets` or already stored).
    pub clocks: Vec<(i32, i64)>,
    /// Group states to write, by partition: `None` removes the group
    /// (nothing left open).
    pub states: Vec<(i32, String, Option<GroupRow>)>,
    /// Windows the batch closed, final (a per-user metric: a user's
    /// events are in one partition).
    pub windows: Vec<StoredWindow>,
    /// Events the batch found late for a window that had closed.
    pub late: Vec<LateEvent>,
    /// Groups (user ids) deleted by a GDPR deletion the batch read:
    /// their windows of every version of the metric, computed traits and
    /// late events go (their open state goes through `states`).
    pub deleted: Vec<String>,
    /// Computed traits the batch changed (a per-user metric with a trait
    /// name): written only when the value differs from the last one.
    pub traits: Vec<ComputedTrait>,
    /// For a metric combined across partitions (grouped globally or by a
    /// property): the parts of windows the batch's partitions closed, and
    /// how to make them final.
    pub combine: Option<Combine>,
    /// Merge requests and handovers the batch writes (one already there
    /// is left as it is: a retried linking event).
    pub merges: Vec<MergeRow>,
    /// Merge rows the batch acted on, to delete: (partition, message id,
    /// group).
    pub merged: Vec<(i32, String, String)>,
}

/// A per-user group's open windows moving into another group in another
/// partition (an alias or identify merge): a request to the group's
/// partition (`state` `None`), then a handover of its state to the
/// partition of the group it joins.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeRow {
    /// The partition whose runner acts on it next.
    pub partition: i32,
    /// The linking event's message id.
    pub message_id: String,
    /// The group that moves.
    pub group: String,
    pub into_group: String,
    pub into_partition: i32,
    /// When the linking event was received (ms): the group's partition
    /// acts once its clock has passed it.
    pub at: i64,
    /// The moving group's state, as JSON, once its partition took it out.
    pub state: Option<String>,
}

/// The parts of a combined metric's windows one batch closed.
#[derive(Debug, Clone)]
pub struct Combine {
    pub version: i64,
    pub aggregate: Aggregate,
    pub lateness_ms: i64,
    /// Every partition of the topic: a window is final when each of
    /// them has a stored watermark past it.
    pub partitions: i32,
    pub parts: Vec<(i32, Closed)>,
}

/// Each claimed message id's first record (partition, offset).
pub type FirstRecords = HashMap<String, (i32, i64), crate::KeyHasher>;

/// What a claim of a batch's message ids found.
#[derive(Debug, Clone, PartialEq)]
pub enum Claimed {
    /// Every claim was its id's first record: no event is a retry. The
    /// common case costs no answer from the store, only a row count.
    AllFirst,
    /// Some id was claimed before (a client's retry, a batch tried again,
    /// a backfill) or twice in the batch: every id's first record, as
    /// stored.
    Positions(FirstRecords),
}

impl Claimed {
    /// Whether the record at `partition`, `offset` of message `id` is a
    /// client's retry: its id's first record is another.
    pub fn is_retry(&self, id: &str, partition: i32, offset: i64) -> bool {
        match self {
            Claimed::AllFirst => false,
            Claimed::Positions(first) => first.get(id).is_some_and(|at| *at != (partition, offset)),
        }
    }
}

/// One group's stored open window state.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupRow {
    /// The engine's state of the group, as JSON.
    pub state: String,
    /// The limit (watermark less lateness) at which the group next has
    /// something to close: a runner that evicted the group reads it back
    /// before its watermark passes this. `None` for states written before
    /// it was kept: read back at the first watermark move.
    pub due: Option<i64>,
}

/// What a partition of a metric version has stored of its groups.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StateSummary {
    pub groups: i64,
    /// The length of their states' JSON.
    pub bytes: i64,
    /// The earliest `due` (a state without one counts as due now).
    pub first_due: Option<i64>,
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

/// A computed trait's value for one user.
#[derive(Debug, Clone, PartialEq)]
pub struct ComputedTrait {
    pub metric: String,
    pub version: i64,
    /// The trait's name in the profile.
    pub name: String,
    pub group: String,
    /// The value, as JSON.
    pub value: String,
    /// The watermark it was computed at.
    pub at: i64,
    /// Its change number (set by the store).
    pub seq: i64,
}

/// What a metric version holds of one group's open windows.
#[derive(Debug, Clone, Default)]
pub struct OpenGroup {
    /// Each partition's state of the group (JSON), with the partition's
    /// clock.
    pub states: Vec<(String, Option<i64>)>,
    /// Parts of windows waiting for other partitions.
    pub parts: Vec<StoredPart>,
}

/// A partition's part of a window combined across partitions.
#[derive(Debug, Clone)]
pub struct StoredPart {
    pub start_ms: i64,
    pub end_ms: i64,
    /// The partial, as JSON.
    pub part: String,
    pub events: i64,
}

/// An event that came after a window it belongs to closed.
#[derive(Debug, Clone, PartialEq)]
pub struct LateEvent {
    pub metric: String,
    pub version: i64,
    pub group: String,
    pub message_id: String,
    /// The (latest) window it missed.
    pub start_ms: i64,
    pub end_ms: i64,
    /// How long after that window closed it came, by the watermark.
    pub late_by_ms: i64,
    /// The event's envelope, as JSON.
    pub event: String,
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
    /// Commits a metric batch: offsets (fenced), clocks, states, windows;
    /// how many windows it made final.
    pub async fn apply_metric_batch(&self, batch: &MetricBatch<'_>) -> Result<usize, StoreError> {
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
    ) -> Result<(Option<i64>, Vec<(String, GroupRow)>), StoreError> {
        let clock = self.metric_clock(processor, topic, partition).await?;
        let rows = sqlx::query(
            "SELECT grp, state, due FROM metric_state WHERE processor = $1 AND partition = $2 ORDER BY grp",
        )
        .bind(processor)
        .bind(partition)
        .fetch_all(&self.pool)
        .await?;
        let states = rows.iter().map(group_row).collect::<Result<_, _>>()?;
        Ok((clock, states))
    }

    /// `processor`'s stored watermark of `partition`.
    pub async fn metric_clock(
        &self,
        processor: &str,
        topic: &str,
        partition: i32,
    ) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query(
            "SELECT clock FROM processor_offsets WHERE processor = $1 AND topic = $2 AND partition = $3",
        )
        .bind(processor)
        .bind(topic)
        .bind(partition)
        .fetch_optional(&self.pool)
        .await?
        .map(|row| row.try_get::<Option<i64>, _>(0))
        .transpose()?
        .flatten())
    }

    /// How many groups `processor` stores in `partition`, their states'
    /// size and the earliest `due`, to decide whether to read them all.
    pub async fn metric_state_summary(
        &self,
        processor: &str,
        partition: i32,
    ) -> Result<StateSummary, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(state)), 0), MIN(COALESCE(due, $3)) \
             FROM metric_state WHERE processor = $1 AND partition = $2",
        )
        .bind(processor)
        .bind(partition)
        .bind(i64::MIN)
        .fetch_one(&self.pool)
        .await?;
        Ok(StateSummary {
            groups: row.try_get(0)?,
            bytes: row.try_get(1)?,
            first_due: row.try_get(2)?,
        })
    }

    /// The stored states of `groups` (those there are) of `processor` in
    /// `partition`.
    pub async fn metric_states_of(
        &self,
        processor: &str,
        partition: i32,
        groups: &[&str],
    ) -> Result<Vec<(String, GroupRow)>, StoreError> {
        if let Some(pg) = &self.pg {
            return metric_states_of_pg(pg, processor, partition, groups).await;
        }
        let mut out = Vec::new();
        for chunk in groups.chunks(super::batch::ROWS_PER_INSERT) {
            // One style of placeholder in a statement: SQLite's driver
            // binds nothing to `?` after `$N`.
            let sql = format!(
                "SELECT grp, state, due FROM metric_state \
                 WHERE processor = {} AND partition = {} AND grp IN ({})",
                self.dialect.params(1, 1),
                self.dialect.params(1, 2),
                self.dialect.params(chunk.len(), 3)
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(processor)
                .bind(partition);
            for group in chunk {
                query = query.bind(*group);
            }
            for row in query.fetch_all(&self.pool).await? {
                out.push(group_row(&row)?);
            }
        }
        Ok(out)
    }

    /// The stored states of `processor`'s groups in `partition` due by
    /// `limit` (or without a `due`), and the earliest `due` after it.
    pub async fn metric_states_due(
        &self,
        processor: &str,
        partition: i32,
        limit: i64,
    ) -> Result<(Vec<(String, GroupRow)>, Option<i64>), StoreError> {
        let rows = sqlx::query(
            "SELECT grp, state, due FROM metric_state \
             WHERE processor = $1 AND partition = $2 AND (due IS NULL OR due <= $3)",
        )
        .bind(processor)
        .bind(partition)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let due = rows.iter().map(group_row).collect::<Result<_, _>>()?;
        let next = sqlx::query(
            "SELECT MIN(due) FROM metric_state WHERE processor = $1 AND partition = $2 AND due > $3",
        )
        .bind(processor)
        .bind(partition)
        .bind(limit)
        .fetch_one(&self.pool)
        .await?
        .try_get(0)?;
        Ok((due, next))
    }

    /// `processor`'s merge rows waiting for a runner to act on them.
    pub async fn metric_merges(&self, processor: &str) -> Result<Vec<MergeRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT partition, message_id, grp, into_grp, into_partition, at, state FROM metric_merges \
             WHERE processor = $1 ORDER BY partition, message_id, grp",
        )
        .bind(processor)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(MergeRow {
                    partition: row.try_get(0)?,
                    message_id: row.try_get(1)?,
                    group: row.try_get(2)?,
                    into_group: row.try_get(3)?,
                    into_partition: row.try_get(4)?,
                    at: row.try_get(5)?,
                    state: row.try_get(6)?,
                })
            })
            .collect()
    }

    /// What `processor` holds of `group`'s open windows: each partition's
    /// state with the partition's clock, and the parts of windows that
    /// partitions closed but that are not final yet (combined metrics).
    pub async fn metric_group(
        &self,
        processor: &str,
        topic: &str,
        group: &str,
    ) -> Result<OpenGroup, StoreError> {
        // A state is committed with its partition's offset, so the
        // partitions with an offset are where the group's states can be:
        // one primary-key lookup each, and no index by group for every
        // state write to keep.
        let rows = sqlx::query(
            "SELECT s.state, o.clock FROM processor_offsets o JOIN metric_state s \
               ON s.processor = o.processor AND s.partition = o.partition AND s.grp = $3 \
             WHERE o.processor = $1 AND o.topic = $2 ORDER BY o.partition",
        )
        .bind(processor)
        .bind(topic)
        .bind(group)
        .fetch_all(&self.pool)
        .await?;
        let states = rows
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<Result<_, sqlx::Error>>()?;
        let rows = sqlx::query(
            "SELECT start_ms, end_ms, part, events FROM metric_parts \
             WHERE processor = $1 AND grp = $2 ORDER BY end_ms, start_ms",
        )
        .bind(processor)
        .bind(group)
        .fetch_all(&self.pool)
        .await?;
        let parts = rows
            .iter()
            .map(|row| {
                Ok(StoredPart {
                    start_ms: row.try_get(0)?,
                    end_ms: row.try_get(1)?,
                    part: row.try_get(2)?,
                    events: row.try_get(3)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?;
        Ok(OpenGroup { states, parts })
    }

    /// Each partition's stored next offset and watermark of `processor`.
    pub async fn metric_positions(
        &self,
        processor: &str,
        topic: &str,
    ) -> Result<Vec<(i32, i64, Option<i64>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT partition, next_offset, clock FROM processor_offsets \
             WHERE processor = $1 AND topic = $2 ORDER BY partition",
        )
        .bind(processor)
        .bind(topic)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
            .collect()
    }

    /// Deletes the closed windows that ended before `before_ms` and are
    /// on `user_metrics` (the retention); returns how many.
    pub async fn purge_metric_windows(&self, before_ms: i64) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM metric_windows WHERE end_ms < $1 AND published = 1")
            .bind(before_ms)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// The metric processors (`metric:{name}:{version}`) with stored
    /// offsets.
    pub async fn metric_processors(&self) -> Result<Vec<String>, StoreError> {
        self.processors_of("metric").await
    }

    /// The processors of a kind (`metric`, `rule`) with offsets stored.
    pub(super) async fn processors_of(&self, kind: &str) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT DISTINCT processor FROM processor_offsets WHERE processor LIKE $1 \
             ORDER BY processor",
        )
        .bind(format!("{kind}:%"))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Deletes what a metric processor kept to compute: offsets, clocks,
    /// open window state, waiting parts, counted message ids and published
    /// trait values (its closed windows stay, for their retention).
    pub async fn forget_metric_processor(&self, processor: &str) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        delete_rows_of(
            &mut tx,
            processor,
            &[
                "metric_state",
                "metric_merges",
                "metric_parts",
                "metric_combine",
                "metric_seen",
                "processor_offsets",
            ],
        )
        .await?;
        sqlx::query("DELETE FROM computed_traits WHERE processor = $1 AND published = 1")
            .bind(processor)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        if let Some(native) = &self.native_claims {
            native.forget(processor).await?;
        }
        Ok(())
    }

    /// Claims message ids for `processor`: each `(id, partition, offset,
    /// received_at)` records that the id's first record is at that log
    /// position, unless an earlier claim did. An event counts when it is
    /// its id's first record. On PostgreSQL a claim is an insert, and
    /// only when fewer rows go in than were claimed are the ids' first
    /// records read; on SQLite the claims are sorted runs, each id looked
    /// for through the runs' filters in memory (`src/store/native_claims.rs`).
    /// A claim is true of the log whether or not the batch commits, so it
    /// is made before the batch's transaction.
    pub async fn claim_metric_ids(
        &self,
        processor: &str,
        claims: &[(&str, i32, i64, i64)],
    ) -> Result<Claimed, StoreError> {
        match &self.pg {
            Some(pg) => claim_pg(pg, &self.careful_claims, processor, claims).await,
            None => match &self.native_claims {
                Some(native) => native.claim(processor, claims).await,
                None => Err(StoreError::Corrupt(
                    "a SQLite store without its claims' connection".to_owned(),
                )),
            },
        }
    }

    /// Closed windows not yet on `user_metrics`, in the order they
    /// closed.
    pub async fn unpublished_windows(&self, limit: u32) -> Result<Vec<StoredWindow>, StoreError> {
        let rows = sqlx::query(
            "SELECT metric, version, grp, start_ms, end_ms, value, events FROM metric_windows \
             WHERE published = 0 ORDER BY closed_at, metric, version, grp, start_ms LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(window).collect()
    }

    /// Marks closed windows as on `user_metrics`.
    pub async fn mark_windows_published(&self, windows: &[StoredWindow]) -> Result<(), StoreError> {
        // Five parameters a window.
        for chunk in windows.chunks(super::batch::ROWS_PER_INSERT / 5) {
            let sql = format!(
                "UPDATE metric_windows SET published = 1 \
                 WHERE (metric, version, grp, start_ms, end_ms) IN ({})",
                self.dialect.tuples(chunk.len(), 5)
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for w in chunk {
                query = query
                    .bind(w.metric.as_str())
                    .bind(w.version)
                    .bind(w.group.as_str())
                    .bind(w.start_ms)
                    .bind(w.end_ms);
            }
            query.execute(&self.pool).await?;
        }
        Ok(())
    }

    /// Takes `processor`'s computed trait out of the profiles, unless its
    /// name is one of `kept` (a current metric's): each user's value
    /// becomes `null` (which the profile processor applies as a removal)
    /// and waits to go on `user_events`; how many. Called once the
    /// version's runner has stopped; a value a runner of it elsewhere
    /// writes after this is taken out again when that runner stops, or by
    /// the hourly purge.
    pub async fn remove_computed_traits(
        &self,
        processor: &str,
        kept: &BTreeSet<String>,
    ) -> Result<u64, StoreError> {
        let names: Vec<String> = sqlx::query(
            "SELECT DISTINCT name FROM computed_traits WHERE processor = $1 AND value <> 'null'",
        )
        .bind(processor)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
        let mut removed = 0;
        for name in names.iter().filter(|n| !kept.contains(*n)) {
            removed += sqlx::query(
                "UPDATE computed_traits SET value = 'null', seq = seq + 1, published = 0, at = $1 \
                 WHERE processor = $2 AND name = $3 AND value <> 'null'",
            )
            .bind(now_ms())
            .bind(processor)
            .bind(name)
            .execute(&self.pool)
            .await?
            .rows_affected();
        }
        Ok(removed)
    }

    /// Deletes the removals of computed traits that are on `user_events`
    /// already; how many.
    pub async fn purge_published_removals(&self) -> Result<u64, StoreError> {
        let done =
            sqlx::query("DELETE FROM computed_traits WHERE published = 1 AND value = 'null'")
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected())
    }

    /// Computed trait values not yet on `user_events`, with the processor
    /// that computed each.
    pub async fn unpublished_traits(
        &self,
        limit: u32,
    ) -> Result<Vec<(String, ComputedTrait)>, StoreError> {
        let rows = sqlx::query(
            "SELECT processor, metric, version, name, grp, value, at, seq FROM computed_traits \
             WHERE published = 0 ORDER BY at, processor, grp LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let computed = ComputedTrait {
                    metric: row.try_get(1)?,
                    version: row.try_get(2)?,
                    name: row.try_get(3)?,
                    group: row.try_get(4)?,
                    value: row.try_get(5)?,
                    at: row.try_get(6)?,
                    seq: row.try_get(7)?,
                };
                Ok((row.try_get(0)?, computed))
            })
            .collect()
    }

    /// Marks computed trait values (processor, group, seq) as on
    /// `user_events`; a value changed since keeps waiting.
    pub async fn mark_traits_published(
        &self,
        published: &[(String, String, i64)],
    ) -> Result<(), StoreError> {
        for chunk in published.chunks(super::batch::ROWS_PER_INSERT / 3) {
            let sql = format!(
                "UPDATE computed_traits SET published = 1 WHERE (processor, grp, seq) IN ({})",
                self.dialect.tuples(chunk.len(), 3)
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (processor, group, seq) in chunk {
                query = query
                    .bind(processor.as_str())
                    .bind(group.as_str())
                    .bind(*seq);
            }
            query.execute(&self.pool).await?;
        }
        Ok(())
    }

    /// Late events not yet on `user_events_late`, oldest first, with the
    /// processor that found each.
    pub async fn unpublished_late(
        &self,
        limit: u32,
    ) -> Result<Vec<(String, LateEvent)>, StoreError> {
        let rows = sqlx::query(
            "SELECT processor, metric, version, grp, message_id, start_ms, end_ms, late_by_ms, event \
             FROM metric_late WHERE published = 0 ORDER BY recorded_at, processor, message_id LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let late = LateEvent {
                    metric: row.try_get(1)?,
                    version: row.try_get(2)?,
                    group: row.try_get(3)?,
                    message_id: row.try_get(4)?,
                    start_ms: row.try_get(5)?,
                    end_ms: row.try_get(6)?,
                    late_by_ms: row.try_get(7)?,
                    event: row.try_get(8)?,
                };
                Ok((row.try_get(0)?, late))
            })
            .collect()
    }

    /// Marks late events (processor, message id) as on `user_events_late`.
    pub async fn mark_late_published(&self, late: &[(String, String)]) -> Result<(), StoreError> {
        for chunk in late.chunks(super::batch::ROWS_PER_INSERT / 2) {
            let sql = format!(
                "UPDATE metric_late SET published = 1 WHERE (processor, message_id) IN ({})",
                self.dialect.tuples(chunk.len(), 2)
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (processor, message_id) in chunk {
                query = query.bind(processor.as_str()).bind(message_id.as_str());
            }
            query.execute(&self.pool).await?;
        }
        Ok(())
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

fn group_row(row: &AnyRow) -> Result<(String, GroupRow), StoreError> {
    let stored = GroupRow {
        state: row.try_get(1)?,
        due: row.try_get(2)?,
    };
    Ok((row.try_get(0)?, stored))
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
) -> Result<usize, StoreError> {
    let now = now_ms();
    Conn::Any(&mut *tx, dialect)
        .advance_offsets(batch.processor, batch.topic, &batch.offsets, now)
        .await?;
    Conn::Any(&mut *tx, dialect)
        .store_clocks(batch.processor, batch.topic, &batch.clocks)
        .await?;
    let (written, removed): (Vec<_>, Vec<_>) = batch
        .states
        .iter()
        .partition(|(_, _, state)| state.is_some());
    write_rows(
        tx,
        dialect,
        "INSERT INTO metric_state (processor, partition, grp, state, due) VALUES",
        "ON CONFLICT (processor, partition, grp) DO UPDATE SET state = excluded.state, due = excluded.due",
        5,
        &written,
        |query, (partition, group, state)| {
            let stored = state.as_ref().expect("partitioned above");
            query
                .bind(batch.processor)
                .bind(*partition)
                .bind(group.as_str())
                .bind(stored.state.as_str())
                .bind(stored.due)
        },
    )
    .await?;
    let removed: Vec<(i32, &str)> = removed.iter().map(|(p, g, _)| (*p, g.as_str())).collect();
    delete_partition_keys(
        tx,
        dialect,
        "metric_state",
        "grp",
        batch.processor,
        &removed,
    )
    .await?;
    insert_windows(tx, dialect, &batch.windows, now).await?;
    if !batch.deleted.is_empty() {
        forget_groups(tx, batch.metric, &batch.deleted).await?;
    }
    write_rows(
        tx,
        dialect,
        "INSERT INTO computed_traits (processor, grp, name, metric, version, value, at, seq) VALUES",
        "ON CONFLICT (processor, grp) DO UPDATE SET value = excluded.value, at = excluded.at, \
           seq = computed_traits.seq + 1, published = 0 \
         WHERE computed_traits.value <> excluded.value",
        8,
        &batch.traits,
        |query, t| {
            query
                .bind(batch.processor)
                .bind(t.group.as_str())
                .bind(t.name.as_str())
                .bind(t.metric.as_str())
                .bind(t.version)
                .bind(t.value.as_str())
                .bind(t.at)
                .bind(1i64)
        },
    )
    .await?;
    write_rows(
        tx,
        dialect,
        "INSERT INTO metric_late (processor, message_id, metric, version, grp, start_ms, end_ms, \
         late_by_ms, event, recorded_at) VALUES",
        "ON CONFLICT DO NOTHING",
        10,
        &batch.late,
        |query, l| {
            query
                .bind(batch.processor)
                .bind(l.message_id.as_str())
                .bind(l.metric.as_str())
                .bind(l.version)
                .bind(l.group.as_str())
                .bind(l.start_ms)
                .bind(l.end_ms)
                .bind(l.late_by_ms)
                .bind(l.event.as_str())
                .bind(now)
        },
    )
    .await?;
    for (partition, message_id, group) in &batch.merged {
        sqlx::query(
            "DELETE FROM metric_merges WHERE processor = $1 AND partition = $2 AND message_id = $3 AND grp = $4",
        )
        .bind(batch.processor)
        .bind(*partition)
        .bind(message_id.as_str())
        .bind(group.as_str())
        .execute(&mut *tx)
        .await?;
    }
    for m in &batch.merges {
        sqlx::query(
            "INSERT INTO metric_merges (processor, partition, message_id, grp, into_grp, into_partition, at, state) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
        )
        .bind(batch.processor)
        .bind(m.partition)
        .bind(m.message_id.as_str())
        .bind(m.group.as_str())
        .bind(m.into_group.as_str())
        .bind(m.into_partition)
        .bind(m.at)
        .bind(m.state.as_deref())
        .execute(&mut *tx)
        .await?;
    }
    let mut made_final = batch.windows.len();
    if let Some(combine) = &batch.combine {
        write_rows(
            tx,
            dialect,
            "INSERT INTO metric_parts (processor, end_ms, grp, start_ms, partition, part, events) VALUES",
            "",
            7,
            &combine.parts,
            |query, (partition, part)| {
                query
                    .bind(batch.processor)
                    .bind(part.window.end)
                    .bind(part.group.as_str())
                    .bind(part.window.start)
                    .bind(*partition)
                    .bind(serde_json::to_string(&part.partial).expect("a partial serializes"))
                    .bind(i64::try_from(part.events).unwrap_or(i64::MAX))
            },
        )
        .await?;
        if !batch.clocks.is_empty() {
            made_final += finalize(tx, dialect, batch, combine, now).await?;
        }
    }
    Ok(made_final)
}

/// Removes what `metric` (every version) stored of `groups`: closed
/// windows, computed trait values and late events.
async fn forget_groups(
    tx: &mut AnyConnection,
    metric: &str,
    groups: &[String],
) -> Result<(), StoreError> {
    for group in groups {
        sqlx::query("DELETE FROM metric_windows WHERE metric = $1 AND grp = $2")
            .bind(metric)
            .bind(group.as_str())
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM computed_traits WHERE metric = $1 AND grp = $2")
            .bind(metric)
            .bind(group.as_str())
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM metric_late WHERE metric = $1 AND grp = $2")
            .bind(metric)
            .bind(group.as_str())
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// Parameters in one statement of many rows: well under SQLite's and
/// PostgreSQL's limits.
pub(super) const ROWS: usize = 2_000;

/// `IN` a list of [`Dialect::rows`](super::Dialect::rows), for `(a, b)
/// IN ...`: as a `VALUES` list.
/// PostgreSQL plans `(a, b) IN ((..), (..))` as comparisons OR-ed
/// together, at a cost that grows with the square of the list (a
/// thousand pairs take it most of a second), and a `VALUES` list as a
/// hashed join, planned in milliseconds.
pub(super) fn in_rows(dialect: super::Dialect, rows: usize, width: usize, start: usize) -> String {
    format!("IN (VALUES {})", dialect.rows(rows, width, start))
}

/// PostgreSQL's deletion of `processor` (`$1`)'s rows of `table` at
/// `keys`, and the keys as the JSON recordset it binds as `$2`.
pub(super) fn keys_recordset(
    table: &str,
    key_column: &str,
    keys: &[(i32, &str)],
) -> (String, String) {
    #[derive(serde::Serialize)]
    struct Key<'a> {
        p: i32,
        k: &'a str,
    }
    let keys: Vec<Key> = keys.iter().map(|(p, k)| Key { p: *p, k }).collect();
    let sql = format!(
        "DELETE FROM {table} t USING jsonb_to_recordset($2::jsonb) AS d(p int4, k text) \
         WHERE t.processor = $1 AND t.partition = d.p AND t.{key_column} = d.k"
    );
    (sql, serde_json::to_string(&keys).expect("keys serialize"))
}

/// Deletes `processor`'s rows of `table` at `keys` (each a partition and
/// the value of `key_column`). On PostgreSQL the keys are one JSON
/// recordset joined to the table, found through its primary key whatever
/// the statistics say: the plan of a `VALUES` list hashed the processor's
/// every row when the table had grown since it was last analyzed (0.2 s
/// a call with 88,000 rule states, for rows that were never stored).
pub(super) async fn delete_partition_keys(
    tx: &mut AnyConnection,
    dialect: super::Dialect,
    table: &str,
    key_column: &str,
    processor: &str,
    keys: &[(i32, &str)],
) -> Result<(), StoreError> {
    if keys.is_empty() {
        return Ok(());
    }
    if dialect == super::Dialect::Postgres {
        let (sql, keys) = keys_recordset(table, key_column, keys);
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(processor)
            .bind(keys)
            .execute(&mut *tx)
            .await?;
        return Ok(());
    }
    for chunk in keys.chunks(ROWS / 2) {
        let sql = format!(
            "DELETE FROM {table} WHERE processor = {} AND (partition, {key_column}) {}",
            dialect.params(1, 1),
            in_rows(dialect, chunk.len(), 2, 2)
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(processor);
        for (partition, key) in chunk {
            query = query.bind(*partition).bind(*key);
        }
        query.execute(&mut *tx).await?;
    }
    Ok(())
}

/// Writes `rows` with statements of many rows each: `head` up to
/// `VALUES`, the rows (`width` parameters each, bound by `bind`), then
/// `tail` (an `ON CONFLICT` clause, or nothing). A batch's state,
/// counted ids and traits are thousands of rows; one statement a row made
/// metric commits the slowest part of processing.
pub(super) async fn write_rows<'a, T>(
    tx: &mut AnyConnection,
    dialect: super::Dialect,
    head: &str,
    tail: &str,
    width: usize,
    rows: &'a [T],
    bind: impl Fn(AnyQuery<'a>, &'a T) -> AnyQuery<'a>,
) -> Result<(), StoreError> {
    for chunk in rows.chunks(ROWS / width) {
        let sql = format!("{head} {} {tail}", dialect.tuples(chunk.len(), width));
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for row in chunk {
            query = bind(query, row);
        }
        query.execute(&mut *tx).await?;
    }
    Ok(())
}

pub(super) type AnyQuery<'a> = sqlx::query::Query<'a, sqlx::Any, sqlx::any::AnyArguments>;

async fn insert_windows(
    tx: &mut AnyConnection,
    dialect: super::Dialect,
    windows: &[StoredWindow],
    now: i64,
) -> Result<(), StoreError> {
    write_rows(
        tx,
        dialect,
        "INSERT INTO metric_windows (metric, version, grp, start_ms, end_ms, value, events, closed_at) VALUES",
        "",
        8,
        windows,
        |query, w| {
            query
                .bind(w.metric.as_str())
                .bind(w.version)
                .bind(w.group.as_str())
                .bind(w.start_ms)
                .bind(w.end_ms)
                .bind(w.value.as_str())
                .bind(w.events)
                .bind(now)
        },
    )
    .await
}

/// Makes final the windows of a combined metric that every partition's
/// stored watermark has passed: their parts merged, written once to
/// `metric_windows`, and removed. The `metric_combine` row is locked
/// first, so transactions of two instances take turns here and the later
/// one sees what the earlier one did.
async fn finalize(
    tx: &mut AnyConnection,
    dialect: super::Dialect,
    batch: &MetricBatch<'_>,
    combine: &Combine,
    now: i64,
) -> Result<usize, StoreError> {
    let (processor, topic) = (batch.processor, batch.topic);
    sqlx::query(
        "INSERT INTO metric_combine (processor, final_until) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(processor)
    .bind(i64::MIN)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE metric_combine SET final_until = final_until WHERE processor = $1")
        .bind(processor)
        .execute(&mut *tx)
        .await?;
    let final_until: i64 =
        sqlx::query("SELECT final_until FROM metric_combine WHERE processor = $1")
            .bind(processor)
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
    let row = sqlx::query(
        "SELECT COUNT(clock), MIN(clock) FROM processor_offsets \
         WHERE processor = $1 AND topic = $2 AND partition >= 0 AND partition < $3",
    )
    .bind(processor)
    .bind(topic)
    .bind(combine.partitions)
    .fetch_one(&mut *tx)
    .await?;
    let (clocked, slowest): (i64, Option<i64>) = (row.try_get(0)?, row.try_get(1)?);
    let Some(slowest) = slowest.filter(|_| clocked == i64::from(combine.partitions)) else {
        return Ok(0);
    };
    let limit = slowest.saturating_sub(combine.lateness_ms);
    if limit <= final_until {
        return Ok(0);
    }
    let rows = sqlx::query(
        "SELECT grp, start_ms, end_ms, part, events FROM metric_parts \
         WHERE processor = $1 AND end_ms <= $2",
    )
    .bind(processor)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    // One combiner over the parts read: every partition is past `limit`.
    let mut combiner = Combiner::new(combine.aggregate, 0, [0]);
    for row in &rows {
        let text: String = row.try_get(3)?;
        let partial = serde_json::from_str(&text).map_err(|e| {
            StoreError::Corrupt(format!(
                "a stored window part of {processor} is unreadable: {e}"
            ))
        })?;
        combiner.add(Closed {
            group: row.try_get(0)?,
            window: Span {
                start: row.try_get(1)?,
                end: row.try_get(2)?,
            },
            value: serde_json::Value::Null,
            partial,
            events: u64::try_from(row.try_get::<i64, _>(4)?).unwrap_or(0),
        });
    }
    let finals: Vec<StoredWindow> = combiner
        .advance(0, limit)
        .into_iter()
        .map(|closed| StoredWindow {
            metric: batch.metric.to_owned(),
            version: combine.version,
            group: closed.group,
            start_ms: closed.window.start,
            end_ms: closed.window.end,
            value: closed.value.to_string(),
            events: i64::try_from(closed.events).unwrap_or(i64::MAX),
        })
        .collect();
    insert_windows(tx, dialect, &finals, now).await?;
    let count = finals.len();
    sqlx::query("DELETE FROM metric_parts WHERE processor = $1 AND end_ms <= $2")
        .bind(processor)
        .bind(limit)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE metric_combine SET final_until = $1 WHERE processor = $2")
        .bind(limit)
        .bind(processor)
        .execute(&mut *tx)
        .await?;
    Ok(count)
}

/// Deletes `processor`'s rows from each of `tables`.
pub(super) async fn delete_rows_of(
    tx: &mut AnyConnection,
    processor: &str,
    tables: &[&str],
) -> Result<(), StoreError> {
    for table in tables {
        let sql = format!("DELETE FROM {table} WHERE processor = $1");
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(processor)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// [`Store::metric_states_of`] on PostgreSQL: the wanted groups as one
/// array joined to the states, so each is found through the primary key
/// whatever the statistics say. A table that grew since it was last
/// analyzed made the generic plan of `grp IN ($3, ...)` scan the
/// partition's every state and compare each with every wanted group
/// (half a second a call with 12,000 states and 500 wanted).
async fn metric_states_of_pg(
    pg: &sqlx::PgPool,
    processor: &str,
    partition: i32,
    groups: &[&str],
) -> Result<Vec<(String, GroupRow)>, StoreError> {
    let rows: Vec<(String, String, Option<i64>)> = sqlx::query_as(
        "SELECT m.grp, m.state, m.due FROM UNNEST($3::text[]) AS w(grp) \
         JOIN metric_state m ON m.processor = $1 AND m.partition = $2 AND m.grp = w.grp",
    )
    .bind(processor)
    .bind(partition)
    .bind(groups)
    .fetch_all(pg)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(group, state, due)| (group, GroupRow { state, due }))
        .collect())
}

/// [`Store::claim_metric_ids`] on PostgreSQL, each column bound as one
/// array: a batch's claims are one insert and, when some id was claimed
/// before, one lookup, each prepared once. Through `Any` the lookup is an `IN`
/// list of 2,000 parameters, planned on every call: ten times the cost,
/// and every id of a backfill (a new version reading the history) was
/// claimed before.
///
/// Most batches claim only new ids, so a claim is first a plain insert,
/// which fails whole on an id claimed before (or twice in the batch):
/// `ON CONFLICT DO NOTHING` looks each key up before it inserts and
/// confirms each insert in the WAL, a third of a claim's cost. When the
/// plain insert fails, the claim is made again with `ON CONFLICT`, and so
/// are the next [`super::Careful::BATCHES`] (a backfill's ids, and a client's burst
/// of retries, are claimed before, batch after batch).
async fn claim_pg(
    pg: &sqlx::PgPool,
    careful_claims: &super::Careful,
    processor: &str,
    claims: &[(&str, i32, i64, i64)],
) -> Result<Claimed, StoreError> {
    let ids: Vec<&str> = claims.iter().map(|c| c.0).collect();
    let partitions: Vec<i32> = claims.iter().map(|c| c.1).collect();
    let offsets: Vec<i64> = claims.iter().map(|c| c.2).collect();
    let received: Vec<i64> = claims.iter().map(|c| c.3).collect();
    if !careful_claims.take() {
        let plain = sqlx::query(
            "INSERT INTO metric_seen (processor, message_id, partition, record_offset, received_at) \
             SELECT $1, c.id, c.p, c.o, c.r FROM UNNEST($2::text[], $3::int4[], $4::int8[], $5::int8[]) AS c(id, p, o, r)",
        )
        .bind(processor)
        .bind(&ids)
        .bind(&partitions)
        .bind(&offsets)
        .bind(&received)
        .execute(pg)
        .await;
        match plain {
            Ok(_) => return Ok(Claimed::AllFirst),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                careful_claims.arm();
            }
            Err(e) => return Err(e.into()),
        }
    }
    let mut tx = pg.begin().await?;
    // `WITH ORDINALITY ... ORDER BY` inserts the rows in the batch's order,
    // so of an id twice in the batch the first is the one inserted.
    let inserted = sqlx::query(
        "INSERT INTO metric_seen (processor, message_id, partition, record_offset, received_at) \
         SELECT $1, c.id, c.p, c.o, c.r \
         FROM UNNEST($2::text[], $3::int4[], $4::int8[], $5::int8[]) WITH ORDINALITY AS c(id, p, o, r, n) \
         ORDER BY c.n ON CONFLICT DO NOTHING",
    )
    .bind(processor)
    .bind(&ids)
    .bind(&partitions)
    .bind(&offsets)
    .bind(&received)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let claimed = if inserted as usize == claims.len() {
        Claimed::AllFirst
    } else {
        let rows: Vec<(String, Option<i32>, Option<i64>)> = sqlx::query_as(
            "SELECT message_id, partition, record_offset FROM metric_seen \
             WHERE processor = $1 AND message_id = ANY($2)",
        )
        .bind(processor)
        .bind(distinct_ids(claims))
        .fetch_all(&mut *tx)
        .await?;
        Claimed::Positions(
            rows.into_iter()
                .map(|(id, partition, offset)| {
                    (id, (partition.unwrap_or(-1), offset.unwrap_or(-1)))
                })
                .collect(),
        )
    };
    tx.commit().await?;
    Ok(claimed)
}

/// The message ids of `claims`, each once.
fn distinct_ids<'a>(claims: &[(&'a str, i32, i64, i64)]) -> Vec<&'a str> {
    let mut seen = HashSet::with_capacity(claims.len());
    claims
        .iter()
        .map(|(id, ..)| *id)
        .filter(|id| seen.insert(*id))
        .collect()
}
