//! Definitions in the store: each change a new version (migration 4), so
//! every instance sharing the store sees the same versions in the same
//! order, and a definition's history stays.

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::{Store, StoreError, now_ms};

/// What kind of definition: one table holds them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefinitionKind {
    Metric,
    Rule,
    Destination,
}

impl DefinitionKind {
    fn as_str(self) -> &'static str {
        match self {
            DefinitionKind::Metric => "metric",
            DefinitionKind::Rule => "rule",
            DefinitionKind::Destination => "destination",
        }
    }
}

/// A definition's current version as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDefinition {
    pub name: String,
    pub version: i64,
    /// The definition as JSON, as it was accepted.
    pub body: String,
    /// When this version was stored, in milliseconds since the epoch.
    pub changed_at: i64,
}

/// What a put did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// The first version of a name (or the first after a deletion).
    Created(i64),
    /// A new version of a definition that existed.
    Changed(i64),
    /// The same body as the current version: nothing stored.
    Unchanged(i64),
}

impl Put {
    pub fn version(self) -> i64 {
        match self {
            Put::Created(v) | Put::Changed(v) | Put::Unchanged(v) => v,
        }
    }
}

impl Store {
    /// Stores `body` as the next version of definition `name`, unless it is
    /// the current one already; answers with the version this put made (or
    /// found), not whatever another put made since.
    pub async fn put_definition(
        &self,
        kind: DefinitionKind,
        name: &str,
        body: &str,
    ) -> Result<(Put, StoredDefinition), StoreError> {
        super::in_write_transaction!(self, self.begin_write(), |tx| put_in(tx, kind, name, body))
    }

    /// Deletes definition `name` (a version without a body); the version
    /// of the deletion, or `None` when there was no such definition.
    pub async fn delete_definition(
        &self,
        kind: DefinitionKind,
        name: &str,
    ) -> Result<Option<i64>, StoreError> {
        super::in_write_transaction!(self, self.begin_write(), |tx| delete_in(tx, kind, name))
    }

    /// The current version of definition `name`, unless it was deleted.
    pub async fn definition(
        &self,
        kind: DefinitionKind,
        name: &str,
    ) -> Result<Option<StoredDefinition>, StoreError> {
        let mut connection = self.pool.acquire().await?;
        Ok(current(&mut connection, kind, name)
            .await?
            .filter(|d| !d.body.is_empty()))
    }

    /// Every current definition of `kind`, by name.
    pub async fn definitions(
        &self,
        kind: DefinitionKind,
    ) -> Result<Vec<StoredDefinition>, StoreError> {
        let rows = sqlx::query(
            "SELECT d.name, d.version, d.body, d.changed_at FROM definitions d \
             WHERE d.kind = $1 AND d.body IS NOT NULL AND d.version = \
               (SELECT MAX(version) FROM definitions WHERE kind = d.kind AND name = d.name) \
             ORDER BY d.name",
        )
        .bind(kind.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(stored).collect()
    }

    /// When definition `name` was created: its first version after its
    /// last deletion (ms).
    pub async fn definition_created_at(
        &self,
        kind: DefinitionKind,
        name: &str,
    ) -> Result<Option<i64>, StoreError> {
        let row = sqlx::query(
            "SELECT MIN(changed_at) FROM definitions WHERE kind = $1 AND name = $2 AND version >                COALESCE((SELECT MAX(version) FROM definitions                          WHERE kind = $1 AND name = $2 AND body IS NULL), 0)",
        )
        .bind(kind.as_str())
        .bind(name)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<Option<i64>, _>(0)?)
    }

    /// How many changes definitions of `kind` have had: it grows with every
    /// change, so an instance reloads only when it moved.
    pub async fn definitions_changes(&self, kind: DefinitionKind) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) FROM definitions WHERE kind = $1")
            .bind(kind.as_str())
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>(0)?)
    }
}

/// The newest row of `name`: a deletion reads with an empty body.
async fn current(
    tx: &mut AnyConnection,
    kind: DefinitionKind,
    name: &str,
) -> Result<Option<StoredDefinition>, StoreError> {
    let row = sqlx::query(
        "SELECT name, version, COALESCE(body, ''), changed_at FROM definitions \
         WHERE kind = $1 AND name = $2 ORDER BY version DESC LIMIT 1",
    )
    .bind(kind.as_str())
    .bind(name)
    .fetch_optional(&mut *tx)
    .await?;
    row.as_ref().map(stored).transpose()
}

fn stored(row: &AnyRow) -> Result<StoredDefinition, StoreError> {
    Ok(StoredDefinition {
        name: row.try_get(0)?,
        version: row.try_get(1)?,
        body: row.try_get(2)?,
        changed_at: row.try_get(3)?,
    })
}

async fn insert(
    tx: &mut AnyConnection,
    kind: DefinitionKind,
    name: &str,
    version: i64,
    body: Option<&str>,
) -> Result<i64, StoreError> {
    let changed_at = now_ms();
    sqlx::query(
        "INSERT INTO definitions (kind, name, version, body, changed_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(kind.as_str())
    .bind(name)
    .bind(version)
    .bind(body)
    .bind(changed_at)
    .execute(&mut *tx)
    .await?;
    Ok(changed_at)
}

async fn put_in(
    tx: &mut AnyConnection,
    kind: DefinitionKind,
    name: &str,
    body: &str,
) -> Result<(Put, StoredDefinition), StoreError> {
    let (version, existed) = match current(tx, kind, name).await? {
        Some(d) if d.body == body => return Ok((Put::Unchanged(d.version), d)),
        Some(d) => (d.version + 1, !d.body.is_empty()),
        None => (1, false),
    };
    // Two puts storing a version at once: the primary key refuses the
    // second, and its write is retried on the new current version.
    let changed_at = insert(tx, kind, name, version, Some(body)).await?;
    let put = if existed {
        Put::Changed(version)
    } else {
        Put::Created(version)
    };
    let stored = StoredDefinition {
        name: name.to_owned(),
        version,
        body: body.to_owned(),
        changed_at,
    };
    Ok((put, stored))
}

async fn delete_in(
    tx: &mut AnyConnection,
    kind: DefinitionKind,
    name: &str,
) -> Result<Option<i64>, StoreError> {
    match current(tx, kind, name).await? {
        Some(d) if !d.body.is_empty() => {
            insert(tx, kind, name, d.version + 1, None).await?;
            Ok(Some(d.version + 1))
        }
        _ => Ok(None),
    }
}
