//! Snapshots of what the processors made: every profile, id, change and
//! stored event, the deleted ids and the profile processor's offsets; the
//! definitions with each metric version's offsets, clocks, window state
//! and closed windows; and each rule version's offsets, clocks, partial
//! matches and alerts. All read in one consistent
//! transaction. Restored, they put a store where the processors were when
//! the snapshot was taken, so they read the log on from those offsets
//! instead of from the beginning (which the log may no longer hold).
//!
//! The format is JSON lines: a `snapshot` line (when, which processor,
//! its offsets), one `row` line a table row, and an `end` line with the row
//! counts, which is how a cut-off snapshot is told from a whole one.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};

use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, AssertSqlSafe, Row};

use super::{Dialect, Store, StoreError, now_ms};

/// How a column is read and bound.
#[derive(Clone, Copy)]
enum Kind {
    Text,
    NullableText,
    Int,
    NullableInt,
}

/// A table a snapshot holds, and its columns in order.
struct Table {
    name: &'static str,
    columns: &'static [(&'static str, Kind)],
    /// Which of its rows (`WHERE ...`), when not all.
    rows: &'static str,
}

use Kind::{Int, NullableInt, NullableText, Text};

/// The rows of the metric and rule versions' offsets and clocks.
const VERSION_OFFSETS: &str = "WHERE processor LIKE 'metric:%' OR processor LIKE 'rule:%'";

/// Those a format-2 snapshot holds: the metric versions'.
const METRIC_OFFSETS: &str = "WHERE processor LIKE 'metric:%'";

/// The first tables, the profile processor's: all a format-1 snapshot
/// holds.
const PROFILE_TABLES: usize = 5;

/// The first tables up to the metrics': all a format-2 snapshot holds.
const METRIC_TABLES: usize = 15;

/// What a snapshot holds, in the order it is restored.
const TABLES: [Table; 17] = [
    Table {
        name: "profiles",
        columns: &[
            ("profile_id", Text),
            ("user_id", NullableText),
            ("state_json", Text),
            ("updated_at", Int),
        ],
        rows: "",
    },
    Table {
        name: "identities",
        columns: &[("distinct_id", Text), ("profile_id", Text)],
        rows: "",
    },
    Table {
        name: "profile_changes",
        columns: &[
            ("change_id", Int),
            ("profile_id", Text),
            ("user_id", NullableText),
            ("before_view", NullableText),
            ("after_view", NullableText),
            ("causes", Text),
            ("changed_at", Int),
            ("published", Int),
        ],
        rows: "",
    },
    Table {
        name: "events",
        columns: &[
            ("message_id", Text),
            ("profile_id", Text),
            ("type", Text),
            ("event", NullableText),
            ("occurred_at", Int),
            ("received_at", Int),
            ("body", Text),
        ],
        rows: "",
    },
    Table {
        name: "deleted_ids",
        columns: &[("distinct_id", Text), ("deleted_at", Int)],
        rows: "",
    },
    Table {
        name: "definitions",
        columns: &[
            ("kind", Text),
            ("name", Text),
            ("version", Int),
            ("body", NullableText),
            ("changed_at", Int),
        ],
        rows: "",
    },
    Table {
        name: "processor_offsets",
        columns: &[
            ("processor", Text),
            ("topic", Text),
            ("partition", Int),
            ("next_offset", Int),
            ("updated_at", Int),
            ("clock", NullableInt),
        ],
        rows: VERSION_OFFSETS,
    },
    Table {
        name: "metric_state",
        columns: &[
            ("processor", Text),
            ("partition", Int),
            ("grp", Text),
            ("state", Text),
            ("due", NullableInt),
        ],
        rows: "",
    },
    Table {
        name: "metric_windows",
        columns: &[
            ("metric", Text),
            ("version", Int),
            ("grp", Text),
            ("start_ms", Int),
            ("end_ms", Int),
            ("value", Text),
            ("events", Int),
            ("closed_at", Int),
            ("published", Int),
        ],
        rows: "",
    },
    Table {
        name: "metric_parts",
        columns: &[
            ("processor", Text),
            ("end_ms", Int),
            ("grp", Text),
            ("start_ms", Int),
            ("partition", Int),
            ("part", Text),
            ("events", Int),
        ],
        rows: "",
    },
    Table {
        name: "metric_combine",
        columns: &[("processor", Text), ("final_until", Int)],
        rows: "",
    },
    Table {
        name: "metric_late",
        columns: &[
            ("processor", Text),
            ("message_id", Text),
            ("metric", Text),
            ("version", Int),
            ("grp", Text),
            ("start_ms", Int),
            ("end_ms", Int),
            ("late_by_ms", Int),
            ("event", Text),
            ("recorded_at", Int),
            ("published", Int),
        ],
        rows: "",
    },
    Table {
        name: "metric_merges",
        columns: &[
            ("processor", Text),
            ("partition", Int),
            ("message_id", Text),
            ("grp", Text),
            ("into_grp", Text),
            ("into_partition", Int),
            ("at", Int),
            ("state", NullableText),
        ],
        rows: "",
    },
    Table {
        name: "metric_seen",
        columns: &[
            ("processor", Text),
            ("message_id", Text),
            ("received_at", Int),
            ("partition", NullableInt),
            ("record_offset", NullableInt),
        ],
        rows: "",
    },
    Table {
        name: "computed_traits",
        columns: &[
            ("processor", Text),
            ("grp", Text),
            ("name", Text),
            ("metric", Text),
            ("version", Int),
            ("value", Text),
            ("at", Int),
            ("seq", Int),
            ("published", Int),
        ],
        rows: "",
    },
    Table {
        name: "rule_state",
        columns: &[
            ("processor", Text),
            ("partition", Int),
            ("rule_key", Text),
            ("state", Text),
        ],
        rows: "",
    },
    Table {
        name: "alerts",
        columns: &[
            ("alert_id", Text),
            ("rule", Text),
            ("version", Int),
            ("rule_key", Text),
            ("body", Text),
            ("at", Int),
            ("created_at", Int),
            ("published", Int),
        ],
        rows: "",
    },
];

/// The rows of a table restored with one statement.
const ROWS_PER_INSERT: usize = 200;

/// The snapshot format this build writes. Formats 1 (profiles only) and
/// 2 (profiles and metrics) are read too: what they lack is computed from
/// the log again. Format 4 holds what 3 does, its partial matches maybe
/// stored as spans (migration 20), which a build that reads only up to 3
/// then refuses rather than restores. Format 5 holds the rules' message-id
/// claims with the metrics' (migration 21): a build that reads up to 4
/// would find no claims of its rules and count a retry again.
const FORMAT: u32 = 5;

/// What a snapshot is of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub format: u32,
    /// When it was taken, in milliseconds since the Unix epoch.
    pub taken_at_ms: i64,
    /// The processor whose work it holds (`profiles`).
    pub processor: String,
    /// Where that processor was: the next offset of each partition.
    pub offsets: Vec<SnapshotOffset>,
    /// Rows of each table; known once it is written or read whole.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rows: BTreeMap<String, u64>,
}

impl SnapshotInfo {
    /// Records the snapshot covers: the sum of its next offsets.
    pub fn records(&self) -> i64 {
        self.offsets.iter().map(|o| o.next_offset).sum()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotOffset {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    Snapshot(SnapshotInfo),
    Row { table: String, values: Vec<Value> },
    End { rows: BTreeMap<String, u64> },
}

/// Why a snapshot could not be written or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write the snapshot: {0}")]
    Write(std::io::Error),
    #[error("the snapshot cannot be read: {0}")]
    Invalid(String),
}

impl From<sqlx::Error> for SnapshotError {
    fn from(e: sqlx::Error) -> Self {
        SnapshotError::Store(StoreError::Database(e))
    }
}

fn invalid(reason: impl Into<String>) -> SnapshotError {
    SnapshotError::Invalid(reason.into())
}

fn write_line(out: &mut impl Write, line: &Line) -> Result<(), SnapshotError> {
    serde_json::to_writer(&mut *out, line).map_err(|e| SnapshotError::Write(e.into()))?;
    out.write_all(b"\n").map_err(SnapshotError::Write)
}

impl Store {
    /// Writes a snapshot of `processor`'s work to `out`, read in one
    /// transaction that sees a single committed state, so the rows and the
    /// offsets agree even while processors commit beside it.
    pub async fn write_snapshot(
        &self,
        processor: &str,
        out: &mut impl Write,
    ) -> Result<SnapshotInfo, SnapshotError> {
        let mut tx = match self.dialect {
            Dialect::Postgres => {
                self.pool
                    .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .await?
            }
            // A read transaction in WAL mode reads one state throughout.
            Dialect::Sqlite => self.pool.begin_with("BEGIN DEFERRED").await?,
        };
        let offsets = sqlx::query(
            "SELECT topic, partition, next_offset FROM processor_offsets \
             WHERE processor = $1 ORDER BY topic, partition",
        )
        .bind(processor)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|row| {
            Ok(SnapshotOffset {
                topic: row.try_get(0)?,
                partition: row.try_get(1)?,
                next_offset: row.try_get(2)?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
        let mut info = SnapshotInfo {
            format: FORMAT,
            taken_at_ms: now_ms(),
            processor: processor.to_owned(),
            offsets,
            rows: BTreeMap::new(),
        };
        write_line(out, &Line::Snapshot(info.clone()))?;
        for table in &TABLES {
            let columns: Vec<&str> = table.columns.iter().map(|(name, _)| *name).collect();
            // Integers read as 64 bits whatever their column's width.
            let selected: Vec<String> = table
                .columns
                .iter()
                .map(|(name, kind)| match kind {
                    Int | NullableInt => format!("CAST({name} AS BIGINT)"),
                    Text | NullableText => (*name).to_owned(),
                })
                .collect();
            let sql = format!(
                "SELECT {} FROM {} {} ORDER BY {}",
                selected.join(", "),
                table.name,
                table.rows,
                columns[0]
            );
            let mut rows = sqlx::query(AssertSqlSafe(sql)).fetch(&mut *tx);
            let mut count = 0u64;
            while let Some(row) = rows.try_next().await? {
                let values = read_row(&row, table)?;
                write_line(
                    out,
                    &Line::Row {
                        table: table.name.to_owned(),
                        values,
                    },
                )?;
                count += 1;
            }
            drop(rows);
            if table.name == "metric_seen" && self.dialect == Dialect::Sqlite {
                count += write_claim_runs(&mut tx, out).await?;
            }
            info.rows.insert(table.name.to_owned(), count);
        }
        drop(tx);
        write_line(
            out,
            &Line::End {
                rows: info.rows.clone(),
            },
        )?;
        out.flush().map_err(SnapshotError::Write)?;
        Ok(info)
    }

    /// Replaces `processor`'s work in this store with the snapshot read
    /// from `input`, in one transaction: every row, and the offsets the
    /// processor goes on from. Deleted ids are added to the ones here.
    /// Refused (nothing changed) when the snapshot is of another processor,
    /// of topics other than `topics`, or cut off.
    ///
    /// With `only_into_empty`, a store where the processor has stored
    /// offsets is left as it is and `None` returned: how a new instance
    /// starts from a snapshot while instances that share its database and
    /// start at the same time restore it once.
    pub async fn restore_snapshot(
        &self,
        processor: &str,
        topics: &[String],
        input: impl BufRead,
        only_into_empty: bool,
    ) -> Result<Option<SnapshotInfo>, SnapshotError> {
        let mut lines = input.lines();
        let mut next_line = move || -> Result<Option<Line>, SnapshotError> {
            match lines.next() {
                None => Ok(None),
                Some(line) => {
                    let line = line.map_err(|e| invalid(e.to_string()))?;
                    serde_json::from_str(&line)
                        .map(Some)
                        .map_err(|e| invalid(format!("a line is not snapshot JSON ({e})")))
                }
            }
        };
        let Some(Line::Snapshot(mut info)) = next_line()? else {
            return Err(invalid("it does not start with a snapshot line"));
        };
        if !(1..=FORMAT).contains(&info.format) {
            return Err(invalid(format!(
                "format {} (this build reads formats 1 to {FORMAT})",
                info.format
            )));
        }
        if info.processor != processor {
            return Err(invalid(format!(
                "it holds the work of processor `{}`, not `{processor}`",
                info.processor
            )));
        }
        if let Some(other) = info.offsets.iter().find(|o| !topics.contains(&o.topic)) {
            return Err(invalid(format!(
                "it was taken from topic `{}`, which is not one of this configuration's ({}); is topic-prefix the same?",
                other.topic,
                topics.join(", ")
            )));
        }

        let mut tx = self.begin_write().await?;
        if self.dialect == Dialect::Postgres {
            // Instances restoring at once take turns; the later ones then
            // see the offsets the first stored.
            sqlx::query("LOCK TABLE processor_offsets IN SHARE ROW EXCLUSIVE MODE")
                .execute(&mut *tx)
                .await?;
        }
        if only_into_empty {
            let stored: i64 =
                sqlx::query("SELECT COUNT(*) FROM processor_offsets WHERE processor = $1")
                    .bind(processor)
                    .fetch_one(&mut *tx)
                    .await?
                    .try_get(0)?;
            if stored > 0 {
                return Ok(None);
            }
        }
        // An older snapshot holds no metrics (format 1) or no rules
        // (format 2): theirs stay as they are here, to be computed on from
        // where they are.
        let held = match info.format {
            1 => &TABLES[..PROFILE_TABLES],
            2 => &TABLES[..METRIC_TABLES],
            _ => &TABLES[..],
        };
        for table in held.iter().filter(|t| t.name != "deleted_ids") {
            let rows = if table.rows == VERSION_OFFSETS && info.format == 2 {
                METRIC_OFFSETS
            } else {
                table.rows
            };
            let sql = format!("DELETE FROM {} {rows}", table.name);
            sqlx::query(AssertSqlSafe(sql)).execute(&mut *tx).await?;
        }
        sqlx::query("DELETE FROM processor_offsets WHERE processor = $1")
            .bind(processor)
            .execute(&mut *tx)
            .await?;
        let now = now_ms();
        for offset in &info.offsets {
            sqlx::query(
                "INSERT INTO processor_offsets (processor, topic, partition, next_offset, updated_at) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(processor)
            .bind(&offset.topic)
            .bind(offset.partition)
            .bind(offset.next_offset)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }

        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        let mut pending: Vec<Vec<Value>> = Vec::new();
        let mut pending_table: Option<&Table> = None;
        let end = loop {
            let line = next_line()?;
            let row_table = match &line {
                Some(Line::Row { table, .. }) => Some(
                    TABLES
                        .iter()
                        .find(|t| t.name == table)
                        .ok_or_else(|| invalid(format!("unknown table `{table}`")))?,
                ),
                _ => None,
            };
            let switching =
                pending_table.is_some_and(|p| row_table.is_none_or(|t| t.name != p.name));
            if let Some(table) = pending_table
                && (switching || pending.len() >= ROWS_PER_INSERT)
            {
                insert_rows(&mut tx, self.dialect, table, &pending).await?;
                pending.clear();
            }
            match line {
                Some(Line::Row { values, .. }) => {
                    let table = row_table.unwrap_or(&TABLES[0]);
                    if values.len() != table.columns.len() {
                        return Err(invalid(format!(
                            "a `{}` row has {} values, not {}",
                            table.name,
                            values.len(),
                            table.columns.len()
                        )));
                    }
                    *counts.entry(table.name.to_owned()).or_default() += 1;
                    pending.push(values);
                    pending_table = Some(table);
                }
                Some(Line::End { rows }) => break rows,
                Some(Line::Snapshot(_)) => return Err(invalid("a second snapshot line")),
                None => return Err(invalid("it is cut off (no end line)")),
            }
        };
        counts.retain(|_, n| *n > 0);
        let mut expected = end.clone();
        expected.retain(|_, n| *n > 0);
        if counts != expected {
            return Err(invalid(format!(
                "its end line counts {expected:?} rows, but it holds {counts:?}"
            )));
        }
        if info.format < 5 {
            // Its rules' claims join the metrics', as migration 21 moved
            // those of the store.
            sqlx::raw_sql(include_str!("migrations/version_21.sql"))
                .execute(&mut *tx)
                .await?;
        }
        if self.dialect == Dialect::Postgres {
            // Change ids go on after the restored ones, never back.
            sqlx::query(
                "SELECT setval('profile_changes_change_id_seq', m) FROM \
                 (SELECT MAX(change_id) AS m FROM profile_changes) AS restored \
                 WHERE m > (SELECT last_value FROM profile_changes_change_id_seq)",
            )
            .execute(&mut *tx)
            .await?;
        }
        if self.dialect == Dialect::Sqlite && held.iter().any(|t| t.name == "metric_seen") {
            // The restored claims replace the runs, and become runs at
            // the claims' next write, which the epoch's move tells.
            sqlx::raw_sql(
                "DELETE FROM claim_blocks; DELETE FROM claim_runs; \
                 UPDATE claim_epoch SET epoch = epoch + 1",
            )
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        info.rows = end;
        Ok(Some(info))
    }
}

/// Writes SQLite's claims kept as runs as `metric_seen` rows, which is
/// how every store restores them: the number written.
async fn write_claim_runs(
    tx: &mut AnyConnection,
    out: &mut impl Write,
) -> Result<u64, SnapshotError> {
    use super::claim_runs::BlockCursor;
    let mut blocks =
        sqlx::query("SELECT processor, claims FROM claim_blocks ORDER BY processor, run, block")
            .fetch(&mut *tx);
    let mut count = 0;
    while let Some(row) = blocks.try_next().await? {
        let processor: String = row.try_get(0)?;
        let bytes: Vec<u8> = row.try_get(1)?;
        let mut cursor = BlockCursor::new(&bytes);
        while let Some((id, at)) = cursor
            .next_claim()
            .map_err(|e| SnapshotError::Store(StoreError::Corrupt(e.to_string())))?
        {
            // -1: a claim stored before its position was kept (NULL).
            let known = |n: i64| (n != -1).then_some(n).map_or(Value::Null, Value::from);
            let values = vec![
                Value::from(processor.as_str()),
                Value::from(id),
                Value::from(at.received),
                known(i64::from(at.partition)),
                known(at.offset),
            ];
            write_line(
                out,
                &Line::Row {
                    table: "metric_seen".to_owned(),
                    values,
                },
            )?;
            count += 1;
        }
    }
    Ok(count)
}

fn read_row(row: &AnyRow, table: &Table) -> Result<Vec<Value>, sqlx::Error> {
    table
        .columns
        .iter()
        .enumerate()
        .map(|(i, (_, kind))| {
            Ok(match kind {
                Kind::Text => Value::from(row.try_get::<String, _>(i)?),
                Kind::NullableText => row
                    .try_get::<Option<String>, _>(i)?
                    .map_or(Value::Null, Value::from),
                Kind::Int => Value::from(row.try_get::<i64, _>(i)?),
                Kind::NullableInt => row
                    .try_get::<Option<i64>, _>(i)?
                    .map_or(Value::Null, Value::from),
            })
        })
        .collect()
}

/// Inserts `rows` into `table`; deleted ids keep the later deletion time.
async fn insert_rows(
    tx: &mut AnyConnection,
    dialect: Dialect,
    table: &Table,
    rows: &[Vec<Value>],
) -> Result<(), SnapshotError> {
    let columns: Vec<&str> = table.columns.iter().map(|(name, _)| *name).collect();
    let conflict = if table.name == "deleted_ids" {
        " ON CONFLICT (distinct_id) DO UPDATE SET deleted_at = CASE \
         WHEN excluded.deleted_at > deleted_ids.deleted_at THEN excluded.deleted_at \
         ELSE deleted_ids.deleted_at END"
    } else {
        ""
    };
    let sql = format!(
        "INSERT INTO {} ({}) VALUES {}{conflict}",
        table.name,
        columns.join(", "),
        dialect.tuples(rows.len(), columns.len())
    );
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for values in rows {
        for (value, (column, kind)) in values.iter().zip(table.columns) {
            let wrong = || invalid(format!("`{}.{column}` holds {value}", table.name));
            query = match kind {
                Kind::Text => query.bind(value.as_str().ok_or_else(wrong)?.to_owned()),
                Kind::NullableText => match value {
                    Value::Null => query.bind(None::<String>),
                    Value::String(s) => query.bind(Some(s.clone())),
                    _ => return Err(wrong()),
                },
                Kind::Int => query.bind(value.as_i64().ok_or_else(wrong)?),
                Kind::NullableInt => match value {
                    Value::Null => query.bind(None::<i64>),
                    _ => query.bind(Some(value.as_i64().ok_or_else(wrong)?)),
                },
            };
        }
    }
    query.execute(&mut *tx).await?;
    Ok(())
}
