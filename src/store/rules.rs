//! Pattern rules in the store (migration 12): each version's partial
//! matches per key beside its offsets and clocks, and the alerts they
//! make, written in one transaction a batch; the alerts read newest first
//! and relayed to `user_alerts`.

use sqlx::{AnyConnection, PgConnection, Row};

use super::batch::{BinaryCopy, Conn};
use super::metric_windows::{
    ROWS, delete_partition_keys, delete_rows_of, keys_recordset, write_rows,
};
use super::{OffsetAdvance, Store, StoreError, now_ms};

/// One batch of a rule version: where its offsets and clocks go, the keys
/// whose state changed (`None`: nothing left), the alerts it made.
#[derive(Debug)]
pub struct RuleBatch<'a> {
    /// The version's name, its offsets' and states' key
    /// (`rule:{name}:{version}`).
    pub processor: &'a str,
    /// The rule's name.
    pub rule: &'a str,
    pub topic: &'a str,
    pub offsets: Vec<OffsetAdvance>,
    pub clocks: Vec<(i32, i64)>,
    pub states: Vec<(i32, String, Option<String>)>,
    /// Keys a GDPR deletion removed: the rule's alerts of them go (those
    /// of this batch, made after the deletion, stay).
    pub deleted: Vec<String>,
    pub alerts: Vec<StoredAlert>,
}

/// An alert as stored: its identity, where to find it, and the record
/// `user_alerts` and the API show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAlert {
    /// The rule, version, key and first event's message id.
    pub id: String,
    pub rule: String,
    pub version: i64,
    pub key: String,
    /// When the match was complete (ms).
    pub at: i64,
    /// The alert record (JSON).
    pub body: String,
}

/// Most rules whose alerts a listing of every rule's merges from each
/// rule's own, and most alerts it reads to merge (a page of each); with
/// more, one statement sorts them all.
const MERGED_RULES: usize = 64;
const MERGED_ROWS: usize = 20_000;

/// Which alerts to read, newest first.
#[derive(Debug, Default, Clone, Copy)]
pub struct AlertQuery<'a> {
    pub rule: Option<&'a str>,
    pub key: Option<&'a str>,
    /// Alerts completed at or after this (ms).
    pub from: Option<i64>,
    /// Alerts before this one in the order (a page's cursor): its time
    /// and id.
    pub before: Option<(i64, &'a str)>,
    pub limit: u32,
}

impl Store {
    /// Writes a rule version's batch and moves its offsets, in one
    /// transaction; fenced when an offset is not where the batch expects.
    pub async fn apply_rule_batch(&self, batch: &RuleBatch<'_>) -> Result<(), StoreError> {
        match &self.pg {
            Some(pg) => {
                super::in_write_transaction!(self, pg.begin(), |tx| write_rule_batch_pg(tx, batch))
            }
            None => {
                let dialect = self.dialect;
                super::in_write_transaction!(self, self.begin_write(), |tx| write_rule_batch(
                    tx, dialect, batch
                ))
            }
        }
    }

    /// A rule version's stored watermark of `partition` and its keys'
    /// states there.
    pub async fn rule_states(
        &self,
        processor: &str,
        topic: &str,
        partition: i32,
    ) -> Result<(Option<i64>, Vec<(String, String)>), StoreError> {
        let clock = self.metric_clock(processor, topic, partition).await?;
        let rows = sqlx::query(
            "SELECT rule_key, state FROM rule_state WHERE processor = $1 AND partition = $2 ORDER BY rule_key",
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

    /// Alerts, newest first.
    pub async fn alerts(&self, query: &AlertQuery<'_>) -> Result<Vec<StoredAlert>, StoreError> {
        // Each rule's page is read whole: at most `MERGED_ROWS` of them.
        let most = (MERGED_ROWS / query.limit.max(1) as usize).min(MERGED_RULES);
        if query.rule.is_none()
            && query.key.is_none()
            && let Some(rules) = self.alerting_rules(most).await?
        {
            return self.alerts_of(&rules, query).await;
        }
        self.alerts_matching(query).await
    }

    /// Every rule with alerts stored, in one statement that steps through
    /// the index by rule a rule at a time; `None` when there are more than
    /// `most`.
    async fn alerting_rules(&self, most: usize) -> Result<Option<Vec<String>>, StoreError> {
        let rules: Vec<String> = sqlx::query_scalar(
            "WITH RECURSIVE rules(rule) AS ( \
               SELECT (SELECT rule FROM alerts ORDER BY rule LIMIT 1) \
               UNION ALL \
               SELECT (SELECT a.rule FROM alerts a WHERE a.rule > r.rule ORDER BY a.rule LIMIT 1) \
               FROM rules r WHERE r.rule IS NOT NULL) \
             SELECT rule FROM rules WHERE rule IS NOT NULL LIMIT $1",
        )
        .bind(i64::try_from(most).unwrap_or(i64::MAX).saturating_add(1))
        .fetch_all(&self.pool)
        .await?;
        Ok((rules.len() <= most).then_some(rules))
    }

    /// The newest alerts of any of `rules` (which `query` does not name):
    /// each rule's newest from the index by rule, merged. Without a rule
    /// or key, the order by time has no index of its own (another index
    /// would slow every alert's insert, as each of the four does by
    /// 15-35%), and one statement scans and sorts every alert: about
    /// 200 ms a page on a million, against 3 ms merged from ten rules
    /// (benches/alerts_listing.sql).
    async fn alerts_of(
        &self,
        rules: &[String],
        query: &AlertQuery<'_>,
    ) -> Result<Vec<StoredAlert>, StoreError> {
        let mut alerts = Vec::new();
        for rule in rules {
            let of_rule = AlertQuery {
                rule: Some(rule),
                ..*query
            };
            alerts.extend(self.alerts_matching(&of_rule).await?);
        }
        alerts.sort_unstable_by(|a, b| (b.at, &b.id).cmp(&(a.at, &a.id)));
        alerts.truncate(query.limit as usize);
        Ok(alerts)
    }

    /// Alerts `query` names, newest first, in one statement.
    async fn alerts_matching(
        &self,
        query: &AlertQuery<'_>,
    ) -> Result<Vec<StoredAlert>, StoreError> {
        let rows = sqlx::query(
            "SELECT alert_id, rule, version, rule_key, at, body FROM alerts \
             WHERE ($1 IS NULL OR rule = $1) AND ($2 IS NULL OR rule_key = $2) \
               AND ($3 IS NULL OR at >= $3) \
               AND ($4 IS NULL OR at < $4 OR (at = $4 AND alert_id < $5)) \
             ORDER BY at DESC, alert_id DESC LIMIT $6",
        )
        .bind(query.rule)
        .bind(query.key)
        .bind(query.from)
        .bind(query.before.map(|(at, _)| at))
        .bind(query.before.map_or("", |(_, id)| id))
        .bind(i64::from(query.limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(alert).collect()
    }

    /// The oldest alerts not yet on `user_alerts`.
    pub async fn unpublished_alerts(&self, limit: u32) -> Result<Vec<StoredAlert>, StoreError> {
        let rows = sqlx::query(
            "SELECT alert_id, rule, version, rule_key, at, body FROM alerts \
             WHERE published = 0 ORDER BY created_at, alert_id LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(alert).collect()
    }

    /// The rule versions with offsets stored.
    pub async fn rule_processors(&self) -> Result<Vec<String>, StoreError> {
        self.processors_of("rule").await
    }

    /// Deletes what a rule version kept to match (its partial matches,
    /// offsets and clocks); its alerts stay.
    pub async fn forget_rule_processor(&self, processor: &str) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        delete_rows_of(&mut tx, processor, &["rule_state", "processor_offsets"]).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Marks alerts as on `user_alerts`.
    pub async fn mark_alerts_published(&self, ids: &[&str]) -> Result<(), StoreError> {
        self.mark_rows_published("alerts", "alert_id", ids).await
    }

    /// Sets `published` on the rows of `table` whose `id_column` is one
    /// of `ids` (what a relay sent to the log).
    pub(super) async fn mark_rows_published(
        &self,
        table: &str,
        id_column: &str,
        ids: &[&str],
    ) -> Result<(), StoreError> {
        for chunk in ids.chunks(ROWS) {
            let sql = format!(
                "UPDATE {table} SET published = 1 WHERE {id_column} IN ({})",
                self.dialect.params(chunk.len(), 1)
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for id in chunk {
                query = query.bind(*id);
            }
            query.execute(&self.pool).await?;
        }
        Ok(())
    }
}

fn alert(row: &sqlx::any::AnyRow) -> Result<StoredAlert, StoreError> {
    Ok(StoredAlert {
        id: row.try_get(0)?,
        rule: row.try_get(1)?,
        version: row.try_get(2)?,
        key: row.try_get(3)?,
        at: row.try_get(4)?,
        body: row.try_get(5)?,
    })
}

async fn write_rule_batch(
    tx: &mut AnyConnection,
    dialect: super::Dialect,
    batch: &RuleBatch<'_>,
) -> Result<(), StoreError> {
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
        "INSERT INTO rule_state (processor, partition, rule_key, state) VALUES",
        "ON CONFLICT (processor, partition, rule_key) DO UPDATE SET state = excluded.state",
        4,
        &written,
        |query, (partition, key, state)| {
            query
                .bind(batch.processor)
                .bind(*partition)
                .bind(key.as_str())
                .bind(state.as_deref().expect("partitioned above"))
        },
    )
    .await?;
    let removed: Vec<(i32, &str)> = removed.iter().map(|(p, k, _)| (*p, k.as_str())).collect();
    delete_partition_keys(
        tx,
        dialect,
        "rule_state",
        "rule_key",
        batch.processor,
        &removed,
    )
    .await?;
    for chunk in batch.deleted.chunks(ROWS) {
        let sql = format!(
            "DELETE FROM alerts WHERE rule = {} AND rule_key IN ({})",
            dialect.params(1, 1),
            dialect.params(chunk.len(), 2)
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(batch.rule);
        for key in chunk {
            query = query.bind(key.as_str());
        }
        query.execute(&mut *tx).await?;
    }
    // A batch tried again after a failed commit makes the same alerts:
    // their ids are taken already.
    write_rows(
        tx,
        dialect,
        "INSERT INTO alerts (alert_id, rule, version, rule_key, body, at, created_at) VALUES",
        "ON CONFLICT (alert_id) DO NOTHING",
        7,
        &batch.alerts,
        |query, a| {
            query
                .bind(a.id.as_str())
                .bind(a.rule.as_str())
                .bind(a.version)
                .bind(a.key.as_str())
                .bind(a.body.as_str())
                .bind(a.at)
                .bind(now)
        },
    )
    .await?;
    Ok(())
}

/// Most bytes of states bound to one statement.
const STATE_BYTES: usize = 4 << 20;

/// [`write_rule_batch`] on PostgreSQL's own driver: the states bound as
/// arrays (a statement a batch, prepared once), the alerts copied in bulk.
/// A rule that matches often makes an alert for most events, and as
/// `VALUES` lists of 285 alerts, each statement parsed and planned, their
/// writes were most of a backlog's final commit.
async fn write_rule_batch_pg(
    tx: &mut PgConnection,
    batch: &RuleBatch<'_>,
) -> Result<(), StoreError> {
    let now = now_ms();
    let mut conn = Conn::Pg(&mut *tx);
    conn.advance_offsets(batch.processor, batch.topic, &batch.offsets, now)
        .await?;
    conn.store_clocks(batch.processor, batch.topic, &batch.clocks)
        .await?;
    let (mut partitions, mut keys, mut states) = (Vec::new(), Vec::new(), Vec::new());
    let mut removed = Vec::new();
    for (partition, key, state) in &batch.states {
        match state {
            Some(state) => {
                partitions.push(*partition);
                keys.push(key.as_str());
                states.push(state.as_str());
            }
            None => removed.push((*partition, key.as_str())),
        }
    }
    // In statements of a few megabytes: a key's state can be kilobytes,
    // and a backlog's batch holds every key its rule saw.
    let mut start = 0;
    while start < keys.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < keys.len() && (end == start || bytes < STATE_BYTES) {
            bytes += states[end].len();
            end += 1;
        }
        sqlx::query(
            "INSERT INTO rule_state (processor, partition, rule_key, state) \
             SELECT $1, s.p, s.k, s.st FROM UNNEST($2::int4[], $3::text[], $4::text[]) AS s(p, k, st) \
             ON CONFLICT (processor, partition, rule_key) DO UPDATE SET state = excluded.state",
        )
        .bind(batch.processor)
        .bind(&partitions[start..end])
        .bind(&keys[start..end])
        .bind(&states[start..end])
        .execute(&mut *tx)
        .await?;
        start = end;
    }
    if !removed.is_empty() {
        let (sql, keys) = keys_recordset("rule_state", "rule_key", &removed);
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(batch.processor)
            .bind(keys)
            .execute(&mut *tx)
            .await?;
    }
    if !batch.deleted.is_empty() {
        sqlx::query("DELETE FROM alerts WHERE rule = $1 AND rule_key = ANY($2)")
            .bind(batch.rule)
            .bind(&batch.deleted)
            .execute(&mut *tx)
            .await?;
    }
    insert_alerts_pg(tx, &batch.alerts, now).await
}

/// Copies `alerts` in; if one is there already, inserts them instead
/// without those there. An alert's id is taken once (its first event
/// starts no other match of its key, and a batch's offsets are fenced
/// before its alerts are written), so a copy meets one only if a rule
/// version's history is read again with its alerts kept; the copy, which
/// cannot skip a row, runs in a savepoint to be undone then.
async fn insert_alerts_pg(
    tx: &mut PgConnection,
    alerts: &[StoredAlert],
    now: i64,
) -> Result<(), StoreError> {
    if alerts.is_empty() {
        return Ok(());
    }
    // In id order (the rule, its version, then the key), the primary key
    // and the index by key take the rows page by page rather than at
    // random.
    let mut order: Vec<usize> = (0..alerts.len()).collect();
    order.sort_unstable_by_key(|&i| alerts[i].id.as_str());
    sqlx::query("SAVEPOINT alerts").execute(&mut *tx).await?;
    let into = "alerts (alert_id, rule, version, rule_key, body, at, created_at)";
    let copied = BinaryCopy::stream(tx, into, alerts.len(), |copy, i| {
        let a = &alerts[order[i]];
        copy.row(7)
            .text(Some(&a.id))
            .text(Some(&a.rule))
            .int8(a.version)
            .text(Some(&a.key))
            .text(Some(&a.body))
            .int8(a.at)
            .int8(now);
    })
    .await;
    match copied {
        Ok(()) => {
            sqlx::query("RELEASE SAVEPOINT alerts")
                .execute(&mut *tx)
                .await?;
            Ok(())
        }
        Err(StoreError::Database(sqlx::Error::Database(e))) if e.is_unique_violation() => {
            sqlx::query("ROLLBACK TO SAVEPOINT alerts")
                .execute(&mut *tx)
                .await?;
            for part in alerts.chunks(10_000) {
                let column =
                    |f: fn(&StoredAlert) -> &str| -> Vec<&str> { part.iter().map(f).collect() };
                sqlx::query(
                    "INSERT INTO alerts (alert_id, rule, version, rule_key, body, at, created_at) \
                     SELECT a.id, a.rule, a.version, a.k, a.body, a.at, $7 \
                     FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::int8[]) \
                       AS a(id, rule, version, k, body, at) \
                     ON CONFLICT (alert_id) DO NOTHING",
                )
                .bind(column(|a| &a.id))
                .bind(column(|a| &a.rule))
                .bind(part.iter().map(|a| a.version).collect::<Vec<_>>())
                .bind(column(|a| &a.key))
                .bind(column(|a| &a.body))
                .bind(part.iter().map(|a| a.at).collect::<Vec<_>>())
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}
