//! The statements of a profile batch, for each driver.
//!
//! SQLite goes through sqlx's `Any` driver, a batch's rows bound one value
//! at a time into multi-row `VALUES` lists. PostgreSQL has a connection of
//! its own driver for this, which binds a whole column as one array: every
//! lookup is `= ANY($1)` and the profile upsert `INSERT ... SELECT FROM
//! UNNEST`, so a batch of any size is the same few statements, each
//! prepared once (a 500-row `VALUES` list of 3,500 parameters is parsed and
//! planned on every call, and each of its sizes fills the statement cache).
//! Plain appends (events, changes, new ids) go as binary `COPY`, which
//! PostgreSQL stores in bulk, with nothing to parse on either side.

use std::collections::{HashMap, HashSet};
use std::fmt::Write;

use sqlx::{AnyConnection, AssertSqlSafe, PgConnection};

use super::{Dialect, OffsetAdvance, StoreError};

/// Rows written by one multi-row `INSERT` (the `Any` path), well under
/// both databases' limits on bound parameters.
pub(super) const ROWS_PER_INSERT: usize = 500;

/// A write transaction's connection.
pub(super) enum Conn<'t> {
    Any(&'t mut AnyConnection, Dialect),
    Pg(&'t mut PgConnection),
}

/// Executes `$query` (built the same way for either driver) on the
/// connection; yields the rows it affected.
macro_rules! execute {
    ($conn:expr, $query:expr) => {
        match $conn {
            Conn::Any(c, _) => $query.execute(&mut **c).await?.rows_affected(),
            Conn::Pg(c) => $query.execute(&mut **c).await?.rows_affected(),
        }
    };
}

/// Profile rows to insert or update, a column each.
#[derive(Debug, Default)]
pub(super) struct ProfileRows {
    pub profile_id: Vec<String>,
    pub user_id: Vec<Option<String>>,
    pub state_json: Vec<String>,
    pub version: Vec<i64>,
}

/// Change records to insert, a column each.
#[derive(Debug, Default)]
pub(super) struct ChangeRows {
    pub profile_id: Vec<String>,
    pub user_id: Vec<Option<String>>,
    pub before_view: Vec<Option<String>>,
    pub after_view: Vec<Option<String>>,
    pub causes: Vec<String>,
}

/// `events` rows to insert, a column each.
#[derive(Debug, Default)]
pub(super) struct EventRows<'a> {
    pub message_id: Vec<&'a str>,
    pub profile_id: Vec<&'a str>,
    pub kind: Vec<&'static str>,
    pub event: Vec<Option<&'a str>>,
    pub occurred_at: Vec<i64>,
    pub received_at: Vec<i64>,
    pub body: Vec<&'a str>,
}

impl Dialect {
    /// `count` placeholders for parameters `start..`: `$3, $4` for
    /// PostgreSQL; plain `?` for SQLite, whose driver looks numbered
    /// parameters up one by one (quadratic in a 3,000-parameter insert).
    pub(super) fn params(self, count: usize, start: usize) -> String {
        let mut sql = String::with_capacity(count * 7);
        self.push_params(&mut sql, count, start);
        sql
    }

    /// `($1, $2), ($3, $4), ...`: `rows` tuples of `columns` placeholders
    /// for parameters `start..`. Written into one string: a batch's insert
    /// is tens of thousands of placeholders, and a string for each was a
    /// few per cent of a metric runner's CPU.
    pub(super) fn rows(self, rows: usize, columns: usize, start: usize) -> String {
        let mut sql = String::with_capacity(rows * (columns * 7 + 4));
        for row in 0..rows {
            if row > 0 {
                sql.push_str(", ");
            }
            sql.push('(');
            self.push_params(&mut sql, columns, start + row * columns);
            sql.push(')');
        }
        sql
    }

    /// [`Dialect::rows`] from the first parameter.
    pub(super) fn tuples(self, rows: usize, columns: usize) -> String {
        self.rows(rows, columns, 1)
    }

    fn push_params(self, sql: &mut String, count: usize, start: usize) {
        for n in start..start + count {
            if n > start {
                sql.push_str(", ");
            }
            match self {
                Dialect::Postgres => {
                    // Writing to a string cannot fail.
                    let _ = write!(sql, "${n}");
                }
                Dialect::Sqlite => sql.push('?'),
            }
        }
    }
}

impl Conn<'_> {
    /// Moves the stored offsets of `topic`, failing with
    /// [`StoreError::Fenced`] when one is not where the batch expects it:
    /// another reader of the partition committed first, so this batch is
    /// stale.
    pub async fn advance_offsets(
        &mut self,
        processor: &str,
        topic: &str,
        advances: &[OffsetAdvance],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        for advance in advances {
            let moved = match advance.expected {
                Some(expected) => execute!(
                    self,
                    sqlx::query(
                        "UPDATE processor_offsets SET next_offset = $1, updated_at = $2 \
                         WHERE processor = $3 AND topic = $4 AND partition = $5 AND next_offset = $6",
                    )
                    .bind(advance.next)
                    .bind(now_ms)
                    .bind(processor)
                    .bind(topic)
                    .bind(advance.partition)
                    .bind(expected)
                ),
                None => execute!(
                    self,
                    sqlx::query(
                        "INSERT INTO processor_offsets (processor, topic, partition, next_offset, updated_at) \
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                    )
                    .bind(processor)
                    .bind(topic)
                    .bind(advance.partition)
                    .bind(advance.next)
                    .bind(now_ms)
                ),
            };
            if moved != 1 {
                return Err(StoreError::Fenced {
                    topic: topic.to_owned(),
                    partition: advance.partition,
                });
            }
        }
        Ok(())
    }

    /// Stores each partition's watermark beside its offset (the
    /// partition's offset row must be there).
    pub async fn store_clocks(
        &mut self,
        processor: &str,
        topic: &str,
        clocks: &[(i32, i64)],
    ) -> Result<(), StoreError> {
        for (partition, clock) in clocks {
            // A partition's new owner may start its clock behind the
            // stored one: a watermark never goes back.
            execute!(
                self,
                sqlx::query(
                    "UPDATE processor_offsets SET clock = CASE WHEN clock IS NULL OR clock < $1 THEN $1 ELSE clock END \
                     WHERE processor = $2 AND topic = $3 AND partition = $4",
                )
                .bind(*clock)
                .bind(processor)
                .bind(topic)
                .bind(*partition)
            );
        }
        Ok(())
    }

    /// Which of `message_ids` the `events` table holds (applied before).
    pub async fn known_message_ids(
        &mut self,
        message_ids: &[&str],
    ) -> Result<HashSet<String, crate::KeyHasher>, StoreError> {
        let select = "SELECT message_id FROM events WHERE message_id";
        let rows: Vec<(String,)> = self.rows_in(select, "", message_ids).await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// When each of `ids` was deleted, for the ids that were.
    pub async fn deleted_at(
        &mut self,
        ids: &[&str],
    ) -> Result<HashMap<String, i64, crate::KeyHasher>, StoreError> {
        let select = "SELECT distinct_id, deleted_at FROM deleted_ids WHERE distinct_id";
        Ok(self.rows_in(select, "", ids).await?.into_iter().collect())
    }

    /// The profile each of `ids` resolves to, for the ids the store has.
    pub async fn identities(
        &mut self,
        ids: &[&str],
    ) -> Result<HashMap<String, String, crate::KeyHasher>, StoreError> {
        let select = "SELECT distinct_id, profile_id FROM identities WHERE distinct_id";
        Ok(self.rows_in(select, "", ids).await?.into_iter().collect())
    }

    /// The stored version of each of `profile_ids` (sorted), locked for
    /// update on PostgreSQL so concurrent batches touching the same
    /// profile take turns, in one order.
    pub async fn lock_profiles(
        &mut self,
        profile_ids: &[&str],
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let select = "SELECT profile_id, version FROM profiles WHERE profile_id";
        let suffix = match self {
            Conn::Any(_, Dialect::Sqlite) => " ORDER BY profile_id",
            _ => " ORDER BY profile_id FOR UPDATE",
        };
        self.rows_in(select, suffix, profile_ids).await
    }

    /// The stored state of each of `profile_ids`.
    pub async fn profile_states(
        &mut self,
        profile_ids: &[&str],
    ) -> Result<Vec<(String, String)>, StoreError> {
        let select = "SELECT profile_id, state_json FROM profiles WHERE profile_id";
        self.rows_in(select, "", profile_ids).await
    }

    /// The rows of `select ... IN (values)` (then `suffix`): one statement
    /// with an array on PostgreSQL, chunks of bound values otherwise.
    pub(super) async fn rows_in<T>(
        &mut self,
        select: &str,
        suffix: &str,
        values: &[&str],
    ) -> Result<Vec<T>, StoreError>
    where
        T: Send + Unpin,
        T: for<'r> sqlx::FromRow<'r, sqlx::any::AnyRow>,
        T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
    {
        match self {
            Conn::Pg(c) => {
                let sql = format!("{select} = ANY($1){suffix}");
                Ok(sqlx::query_as(AssertSqlSafe(sql))
                    .bind(values)
                    .fetch_all(&mut **c)
                    .await?)
            }
            Conn::Any(c, dialect) => {
                let mut rows = Vec::new();
                for chunk in values.chunks(ROWS_PER_INSERT) {
                    let sql = format!("{select} IN ({}){suffix}", dialect.params(chunk.len(), 1));
                    let mut query = sqlx::query_as(AssertSqlSafe(sql));
                    for value in chunk {
                        query = query.bind(*value);
                    }
                    rows.extend(query.fetch_all(&mut **c).await?);
                }
                Ok(rows)
            }
        }
    }

    /// Deletes profile `profile_id` and everything of it.
    pub async fn delete_profile_rows(&mut self, profile_id: &str) -> Result<(), StoreError> {
        for table in ["profiles", "identities", "profile_changes", "events"] {
            let sql = format!("DELETE FROM {table} WHERE profile_id = $1");
            execute!(self, sqlx::query(AssertSqlSafe(sql)).bind(profile_id));
        }
        Ok(())
    }

    /// The change a deletion makes: no before, no after (a tombstone).
    pub async fn insert_deletion_change(
        &mut self,
        profile_id: &str,
        user_id: Option<String>,
        at: i64,
    ) -> Result<(), StoreError> {
        execute!(
            self,
            sqlx::query(
                "INSERT INTO profile_changes (profile_id, user_id, before_view, after_view, causes, changed_at) \
                 VALUES ($1, $2, NULL, NULL, $3, $4)",
            )
            .bind(profile_id)
            .bind(user_id)
            .bind("[\"$delete\"]")
            .bind(at)
        );
        Ok(())
    }

    /// Records `ids` as deleted at `at` (a later deletion moves the time).
    pub async fn mark_deleted(&mut self, ids: &[String], at: i64) -> Result<(), StoreError> {
        for id in ids {
            execute!(
                self,
                sqlx::query(
                    "INSERT INTO deleted_ids (distinct_id, deleted_at) VALUES ($1, $2) \
                     ON CONFLICT (distinct_id) DO UPDATE SET deleted_at = excluded.deleted_at \
                     WHERE excluded.deleted_at > deleted_ids.deleted_at",
                )
                .bind(id.as_str())
                .bind(at)
            );
        }
        Ok(())
    }

    /// Moves everything of profile `from` to profile `into`, which it was
    /// merged into, and deletes `from`.
    pub async fn merge(&mut self, from: &str, into: &str) -> Result<(), StoreError> {
        execute!(
            self,
            sqlx::query("DELETE FROM profiles WHERE profile_id = $1").bind(from)
        );
        for table in ["identities", "events", "profile_changes"] {
            let sql = format!("UPDATE {table} SET profile_id = $1 WHERE profile_id = $2");
            execute!(
                self,
                sqlx::query(AssertSqlSafe(sql.clone()))
                    .bind(into)
                    .bind(from)
            );
        }
        Ok(())
    }

    /// Inserts ids first seen, with the profile each resolves to.
    pub async fn insert_ids(&mut self, ids: &[(String, String)]) -> Result<(), StoreError> {
        match self {
            Conn::Pg(c) => {
                let into = "identities (distinct_id, profile_id)";
                BinaryCopy::stream(c, into, ids.len(), |copy, i| {
                    copy.row(2).text(Some(&ids[i].0)).text(Some(&ids[i].1));
                })
                .await?;
            }
            Conn::Any(c, dialect) => {
                for chunk in ids.chunks(ROWS_PER_INSERT) {
                    let sql = format!(
                        "INSERT INTO identities (distinct_id, profile_id) VALUES {}",
                        dialect.tuples(chunk.len(), 2)
                    );
                    let mut query = sqlx::query(AssertSqlSafe(sql));
                    for (id, profile_id) in chunk {
                        query = query.bind(id.as_str()).bind(profile_id.as_str());
                    }
                    query.execute(&mut **c).await?;
                }
            }
        }
        Ok(())
    }

    /// Inserts or replaces profiles.
    pub async fn upsert_profiles(
        &mut self,
        rows: &ProfileRows,
        now: i64,
    ) -> Result<(), StoreError> {
        let update = "ON CONFLICT (profile_id) DO UPDATE SET user_id = excluded.user_id, \
                      state_json = excluded.state_json, version = excluded.version, \
                      updated_at = excluded.updated_at";
        match self {
            Conn::Pg(c) => {
                let sql = format!(
                    "INSERT INTO profiles (profile_id, user_id, state_json, version, updated_at) \
                     SELECT u.*, $5 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[]) AS u {update}"
                );
                sqlx::query(AssertSqlSafe(sql))
                    .bind(&rows.profile_id)
                    .bind(&rows.user_id)
                    .bind(&rows.state_json)
                    .bind(&rows.version)
                    .bind(now)
                    .execute(&mut **c)
                    .await?;
            }
            Conn::Any(c, dialect) => {
                for chunk in chunks(rows.profile_id.len()) {
                    let sql = format!(
                        "INSERT INTO profiles (profile_id, user_id, state_json, version, updated_at) VALUES {} {update}",
                        dialect.tuples(chunk.len(), 5)
                    );
                    let mut query = sqlx::query(AssertSqlSafe(sql));
                    for i in chunk {
                        query = query
                            .bind(rows.profile_id[i].as_str())
                            .bind(rows.user_id[i].as_deref())
                            .bind(rows.state_json[i].as_str())
                            .bind(rows.version[i])
                            .bind(now);
                    }
                    query.execute(&mut **c).await?;
                }
            }
        }
        Ok(())
    }

    /// Appends change records, their change ids in the order given.
    pub async fn insert_changes(&mut self, rows: &ChangeRows, now: i64) -> Result<(), StoreError> {
        let into = "profile_changes \
                    (profile_id, user_id, before_view, after_view, causes, changed_at)";
        match self {
            Conn::Pg(c) => {
                BinaryCopy::stream(c, into, rows.profile_id.len(), |copy, i| {
                    copy.row(6)
                        .text(Some(&rows.profile_id[i]))
                        .text(rows.user_id[i].as_deref())
                        .text(rows.before_view[i].as_deref())
                        .text(rows.after_view[i].as_deref())
                        .text(Some(&rows.causes[i]))
                        .int8(now);
                })
                .await?;
            }
            Conn::Any(c, dialect) => {
                for chunk in chunks(rows.profile_id.len()) {
                    let sql = format!(
                        "INSERT INTO {into} VALUES {}",
                        dialect.tuples(chunk.len(), 6)
                    );
                    let mut query = sqlx::query(AssertSqlSafe(sql));
                    for i in chunk {
                        query = query
                            .bind(rows.profile_id[i].as_str())
                            .bind(rows.user_id[i].as_deref())
                            .bind(rows.before_view[i].as_deref())
                            .bind(rows.after_view[i].as_deref())
                            .bind(rows.causes[i].as_str())
                            .bind(now);
                    }
                    query.execute(&mut **c).await?;
                }
            }
        }
        Ok(())
    }

    /// Inserts `events` rows (a message id already there fails the
    /// transaction as a conflict).
    pub async fn insert_events(&mut self, rows: &EventRows<'_>) -> Result<(), StoreError> {
        let into = "events (message_id, profile_id, type, event, occurred_at, received_at, body)";
        match self {
            Conn::Pg(c) => {
                BinaryCopy::stream(c, into, rows.message_id.len(), |copy, i| {
                    copy.row(7)
                        .text(Some(rows.message_id[i]))
                        .text(Some(rows.profile_id[i]))
                        .text(Some(rows.kind[i]))
                        .text(rows.event[i])
                        .int8(rows.occurred_at[i])
                        .int8(rows.received_at[i])
                        .text(Some(rows.body[i]));
                })
                .await?;
            }
            Conn::Any(c, dialect) => {
                // In key order, the message ids' index takes the rows page
                // by page rather than at random (the SDKs' ids are random
                // UUIDs), within SQLite's small page cache.
                let mut order: Vec<usize> = (0..rows.message_id.len()).collect();
                order.sort_unstable_by_key(|&i| rows.message_id[i]);
                for chunk in order.chunks(ROWS_PER_INSERT) {
                    let sql = format!(
                        "INSERT INTO {into} VALUES {}",
                        dialect.tuples(chunk.len(), 7)
                    );
                    let mut query = sqlx::query(AssertSqlSafe(sql));
                    for &i in chunk {
                        query = query
                            .bind(rows.message_id[i])
                            .bind(rows.profile_id[i])
                            .bind(rows.kind[i])
                            .bind(rows.event[i])
                            .bind(rows.occurred_at[i])
                            .bind(rows.received_at[i])
                            .bind(rows.body[i]);
                    }
                    query.execute(&mut **c).await?;
                }
            }
        }
        Ok(())
    }
}

/// The row indexes `0..rows` in chunks of [`ROWS_PER_INSERT`].
fn chunks(rows: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..rows)
        .step_by(ROWS_PER_INSERT)
        .map(move |start| start..(start + ROWS_PER_INSERT).min(rows))
}

/// Rows in PostgreSQL's binary `COPY` format, sent with `COPY ... FROM
/// STDIN`: the server stores them in bulk (a WAL record a page of rows,
/// not a row), and nothing is parsed or escaped on either side.
pub(super) struct BinaryCopy {
    buf: Vec<u8>,
}

impl BinaryCopy {
    /// The format's signature, then flags and header extension length (0).
    const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

    fn new(capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity);
        buf.extend_from_slice(Self::HEADER);
        BinaryCopy { buf }
    }

    /// Starts a row of `columns` fields, to be followed by exactly that many.
    pub(super) fn row(&mut self, columns: i16) -> &mut Self {
        self.buf.extend_from_slice(&columns.to_be_bytes());
        self
    }

    /// A `text` field (UTF-8, its length first) or NULL.
    pub(super) fn text(&mut self, value: Option<&str>) -> &mut Self {
        match value {
            Some(value) => {
                let len = i32::try_from(value.len()).expect("a text field is under 2 GiB");
                self.buf.extend_from_slice(&len.to_be_bytes());
                self.buf.extend_from_slice(value.as_bytes());
            }
            None => self.buf.extend_from_slice(&(-1i32).to_be_bytes()),
        }
        self
    }

    /// An `int8` field.
    pub(super) fn int8(&mut self, value: i64) -> &mut Self {
        self.buf.extend_from_slice(&8i32.to_be_bytes());
        self.buf.extend_from_slice(&value.to_be_bytes());
        self
    }

    /// Copies `count` rows into `into` (`table (columns)`), `write`
    /// putting row `i`'s fields into the buffer, which goes to the server
    /// whenever it holds a megabyte or so: a backlog's batch can hold
    /// hundreds of megabytes of rows. No rows, no round trip.
    pub(super) async fn stream(
        conn: &mut PgConnection,
        into: &str,
        count: usize,
        mut write: impl FnMut(&mut BinaryCopy, usize),
    ) -> Result<(), StoreError> {
        const PART: usize = 1 << 20;
        if count == 0 {
            return Ok(());
        }
        let mut copy = conn
            .copy_in_raw(&format!("COPY {into} FROM STDIN (FORMAT binary)"))
            .await?;
        let mut rows = BinaryCopy::new(PART + PART / 4);
        for i in 0..count {
            write(&mut rows, i);
            if rows.buf.len() >= PART {
                let part = std::mem::replace(&mut rows.buf, Vec::with_capacity(PART + PART / 4));
                copy.send(part).await?;
            }
        }
        rows.buf.extend_from_slice(&(-1i16).to_be_bytes());
        copy.send(rows.buf).await?;
        copy.finish().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Dialect;

    #[test]
    fn placeholders_are_numbered_for_postgresql_and_plain_for_sqlite() {
        assert_eq!(Dialect::Postgres.params(3, 2), "$2, $3, $4");
        assert_eq!(Dialect::Sqlite.params(3, 2), "?, ?, ?");
        assert_eq!(Dialect::Postgres.rows(2, 2, 3), "($3, $4), ($5, $6)");
        assert_eq!(Dialect::Sqlite.rows(2, 3, 1), "(?, ?, ?), (?, ?, ?)");
        assert_eq!(Dialect::Postgres.tuples(1, 1), "($1)");
        assert_eq!(Dialect::Postgres.rows(0, 2, 1), "");
    }
}
