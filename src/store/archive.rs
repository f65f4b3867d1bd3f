//! The archive's manifest (migration 15): one row per object, stored
//! before its upload (so a retry after a crash closes the object at the
//! same offsets and rewrites it) and marked uploaded after. `traitline
//! archive verify` compares it with the bucket.

use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};

use super::{Store, StoreError};

/// One archive object, as the manifest has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedObject {
    pub partition: i32,
    /// The offsets it covers, `[first, last]` (records the filter left
    /// out included).
    pub first: i64,
    pub last: i64,
    pub key: String,
    /// Lines it holds; 0: no object was written.
    pub records: i64,
    /// Its size as uploaded (gzip).
    pub bytes: i64,
    /// When the log stored its first record (its `dt=`/`hh=`).
    pub first_at: i64,
    /// `None` while its upload is under way.
    pub uploaded_at: Option<i64>,
}

const COLUMNS: &str =
    "partition, first_offset, last_offset, object_key, records, bytes, first_at, uploaded_at";

fn object(row: &AnyRow) -> Result<ArchivedObject, sqlx::Error> {
    Ok(ArchivedObject {
        partition: row.try_get(0)?,
        first: row.try_get(1)?,
        last: row.try_get(2)?,
        key: row.try_get(3)?,
        records: row.try_get(4)?,
        bytes: row.try_get(5)?,
        first_at: row.try_get(6)?,
        uploaded_at: row.try_get(7)?,
    })
}

fn objects(rows: &[AnyRow]) -> Result<Vec<ArchivedObject>, StoreError> {
    rows.iter()
        .map(object)
        .collect::<Result<_, _>>()
        .map_err(StoreError::from)
}

impl Store {
    /// Stores `object` in the manifest before its upload (with
    /// `uploaded_at` set when nothing is to be uploaded): false, and
    /// nothing stored, when another object over its offsets is there (one
    /// of the same range, an upload tried before, is replaced).
    pub async fn claim_archive_object(
        &self,
        destination: &str,
        object: &ArchivedObject,
    ) -> Result<bool, StoreError> {
        let overlapping = sqlx::query(
            "SELECT first_offset, last_offset FROM archive_objects WHERE destination = $1 \
             AND partition = $2 AND first_offset <= $3 AND last_offset >= $4",
        )
        .bind(destination)
        .bind(object.partition)
        .bind(object.last)
        .bind(object.first)
        .fetch_all(&self.pool)
        .await?;
        for row in &overlapping {
            let range: (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
            if range != (object.first, object.last) {
                return Ok(false);
            }
        }
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO archive_objects (destination, {COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (destination, partition, first_offset) DO UPDATE SET \
             last_offset = excluded.last_offset, object_key = excluded.object_key, \
             records = excluded.records, bytes = excluded.bytes, first_at = excluded.first_at, \
             uploaded_at = excluded.uploaded_at"
        )))
        .bind(destination)
        .bind(object.partition)
        .bind(object.first)
        .bind(object.last)
        .bind(&object.key)
        .bind(object.records)
        .bind(object.bytes)
        .bind(object.first_at)
        .bind(object.uploaded_at)
        .execute(&self.pool)
        .await?;
        Ok(true)
    }

    /// Marks the object starting at `first` of `partition` uploaded.
    pub async fn archive_uploaded(
        &self,
        destination: &str,
        partition: i32,
        first: i64,
        at: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE archive_objects SET uploaded_at = $1 \
             WHERE destination = $2 AND partition = $3 AND first_offset = $4",
        )
        .bind(at)
        .bind(destination)
        .bind(partition)
        .bind(first)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The objects of `destination` from the stored position of its
    /// processor's partition on (all of a partition with none stored).
    pub async fn archived_above(
        &self,
        destination: &str,
        processor: &str,
        topic: &str,
    ) -> Result<Vec<ArchivedObject>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM archive_objects a WHERE destination = $1 \
             AND last_offset >= COALESCE((SELECT next_offset FROM processor_offsets o \
               WHERE o.processor = $2 AND o.topic = $3 AND o.partition = a.partition), 0) \
             ORDER BY partition, first_offset"
        )))
        .bind(destination)
        .bind(processor)
        .bind(topic)
        .fetch_all(&self.pool)
        .await?;
        objects(&rows)
    }

    /// The newest object `destination` uploaded (key and when), and how
    /// many uploads are under way.
    pub async fn archive_progress(
        &self,
        destination: &str,
    ) -> Result<(Option<(String, i64)>, i64), StoreError> {
        let newest = sqlx::query(
            "SELECT object_key, uploaded_at FROM archive_objects \
             WHERE destination = $1 AND uploaded_at IS NOT NULL \
             ORDER BY uploaded_at DESC LIMIT 1",
        )
        .bind(destination)
        .fetch_optional(&self.pool)
        .await?
        .map(|row| Ok::<_, sqlx::Error>((row.try_get(0)?, row.try_get(1)?)))
        .transpose()?;
        let uploading: i64 = sqlx::query(
            "SELECT COUNT(*) FROM archive_objects WHERE destination = $1 AND uploaded_at IS NULL",
        )
        .bind(destination)
        .fetch_one(&self.pool)
        .await?
        .try_get(0)?;
        Ok((newest, uploading))
    }

    /// The partitions `destination` has objects of.
    pub async fn archived_partitions(&self, destination: &str) -> Result<Vec<i32>, StoreError> {
        let rows =
            sqlx::query("SELECT DISTINCT partition FROM archive_objects WHERE destination = $1")
                .bind(destination)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()
            .map_err(StoreError::from)
    }

    /// The manifest of `destination`, by partition and offset: of one
    /// partition from `first` on, or all of it.
    pub async fn archived_objects(
        &self,
        destination: &str,
        partition: Option<i32>,
        from_first: i64,
    ) -> Result<Vec<ArchivedObject>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM archive_objects WHERE destination = $1 \
             AND ($2 < 0 OR partition = $2) AND first_offset >= $3 \
             ORDER BY partition, first_offset"
        )))
        .bind(destination)
        .bind(partition.unwrap_or(-1))
        .bind(from_first)
        .fetch_all(&self.pool)
        .await?;
        objects(&rows)
    }
}
