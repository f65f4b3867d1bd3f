//! Profiles in the store: applying a batch of events in one transaction
//! with its offsets, and the reads and deletes of the query API.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};
use utoipa::ToSchema;

use super::batch::{ChangeRows, Conn, EventRows, ProfileRows, ROWS_PER_INSERT};
use super::cache::{CachedState, StateCache};
use super::{Careful, OffsetAdvance, Store, StoreError, now_ms};
use crate::envelope::EventEnvelope;
use crate::profile::{Applied, Book, Profile, ProfileView};

/// One batch for the profile processor: events in log order with their
/// stored bytes, and where the batch takes each partition's offset.
#[derive(Debug)]
pub struct ProfileBatch<'a> {
    pub processor: &'a str,
    pub topic: &'a str,
    pub offsets: Vec<OffsetAdvance>,
    /// Each event with the record value it came in (kept in `events`).
    pub events: &'a [(EventEnvelope, String)],
}

/// What a committed batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Events applied to profiles.
    pub applied: usize,
    /// Events whose message id was applied before (client retries,
    /// redelivery): they changed nothing.
    pub duplicates: usize,
    /// Events of deleted profiles received before the deletion.
    pub skipped_deleted: usize,
    /// Profiles changed (one change record each).
    pub changed_profiles: usize,
    /// Profiles deleted by deletion records (GDPR) in the batch.
    pub deleted_profiles: usize,
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Serializing these plain structs and maps cannot fail.
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(e.to_string()))
}

impl Store {
    /// Applies a batch and moves its offsets in one transaction, retrying
    /// on conflicts with concurrent transactions. Fails with
    /// [`StoreError::Fenced`] (nothing written) when a partition's stored
    /// offset is not where the batch expects it.
    pub async fn apply_profile_batch(
        &self,
        batch: &ProfileBatch<'_>,
    ) -> Result<BatchOutcome, StoreError> {
        let states = &self.states;
        let careful = &self.careful_events;
        let (outcome, written) = match &self.pg {
            Some(pg) => super::in_write_transaction!(self, pg.begin(), |tx| try_apply(
                Conn::Pg(tx),
                states,
                careful,
                batch
            )),
            None => super::in_write_transaction!(self, self.begin_write(), |tx| try_apply(
                Conn::Any(tx, self.dialect),
                states,
                careful,
                batch
            )),
        }?;
        // Committed: these are the stored states now.
        self.states.put(written);
        Ok(outcome)
    }

    /// The profile `id` (a user id or any linked id) resolves to.
    pub async fn profile(&self, id: &str) -> Result<Option<ProfileView>, StoreError> {
        let row = sqlx::query(
            "SELECT p.state_json FROM identities i JOIN profiles p ON p.profile_id = i.profile_id WHERE i.distinct_id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| Ok(parse::<Profile>(&row.try_get::<String, _>(0)?)?.view()))
            .transpose()
    }

    /// Profiles in a stable order (their profile id), `limit` at a time,
    /// after the profile id `after`.
    pub async fn profiles(
        &self,
        limit: u32,
        after: Option<&str>,
    ) -> Result<ProfilePage, StoreError> {
        let rows = sqlx::query(
            "SELECT profile_id, state_json FROM profiles WHERE profile_id > $1 ORDER BY profile_id LIMIT $2",
        )
        .bind(after.unwrap_or(""))
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        let mut profiles = Vec::with_capacity(rows.len());
        let mut last = None;
        for row in rows.iter().take(limit as usize) {
            last = Some(row.try_get::<String, _>(0)?);
            profiles.push(parse::<Profile>(&row.try_get::<String, _>(1)?)?.view());
        }
        let next = if rows.len() > limit as usize {
            last
        } else {
            None
        };
        Ok(ProfilePage { profiles, next })
    }

    async fn profile_id_of(&self, id: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT profile_id FROM identities WHERE distinct_id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// A profile's changes, newest first, `limit` at a time, before the
    /// change id `before`. `None` when no profile has the id.
    pub async fn changes(
        &self,
        id: &str,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Option<(Vec<ChangeRecord>, Option<i64>)>, StoreError> {
        let Some(profile_id) = self.profile_id_of(id).await? else {
            return Ok(None);
        };
        let rows = sqlx::query(
            "SELECT change_id, profile_id, user_id, before_view, after_view, causes, changed_at FROM profile_changes \
             WHERE profile_id = $1 AND change_id < $2 ORDER BY change_id DESC LIMIT $3",
        )
        .bind(profile_id)
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        let mut changes = rows
            .iter()
            .take(limit as usize)
            .map(change_record)
            .collect::<Result<Vec<_>, _>>()?;
        let next = (rows.len() > limit as usize)
            .then(|| changes.last().map(|c| c.change_id))
            .flatten();
        changes.truncate(limit as usize);
        Ok(Some((changes, next)))
    }

    /// A profile's stored events, newest first (event time, then message
    /// id), `limit` at a time, after the cursor. `None` when no profile has
    /// the id.
    pub async fn events(
        &self,
        id: &str,
        limit: u32,
        before: Option<(i64, String)>,
    ) -> Result<Option<EventPage>, StoreError> {
        let Some(profile_id) = self.profile_id_of(id).await? else {
            return Ok(None);
        };
        let newest_first = "ORDER BY occurred_at DESC, message_id DESC LIMIT";
        let query = match before {
            None => sqlx::query(AssertSqlSafe(format!(
                "SELECT message_id, occurred_at, body FROM events WHERE profile_id = $1 {newest_first} $2"
            )))
            .bind(profile_id),
            Some((at, message_id)) => sqlx::query(AssertSqlSafe(format!(
                "SELECT message_id, occurred_at, body FROM events WHERE profile_id = $1 \
                 AND (occurred_at < $2 OR (occurred_at = $2 AND message_id < $3)) {newest_first} $4"
            )))
            .bind(profile_id)
            .bind(at)
            .bind(message_id),
        };
        let rows = query
            .bind(i64::from(limit) + 1)
            .fetch_all(&self.pool)
            .await?;
        let mut events = Vec::with_capacity(rows.len());
        let mut last = None;
        for row in rows.iter().take(limit as usize) {
            let message_id: String = row.try_get(0)?;
            let occurred_at: i64 = row.try_get(1)?;
            events.push(parse(&row.try_get::<String, _>(2)?)?);
            last = Some((occurred_at, message_id));
        }
        let next = if rows.len() > limit as usize {
            last
        } else {
            None
        };
        Ok(Some(EventPage { events, next }))
    }

    /// Deletes a profile (GDPR): the profile, its ids, its change history
    /// and its stored events; records its ids as deleted and leaves one
    /// change without a body for the relay to publish as a tombstone.
    /// Returns the deleted profile's last view, or `None` when no profile
    /// has the id.
    pub async fn delete_profile(
        &self,
        id: &str,
        deleted_at: i64,
    ) -> Result<Option<ProfileView>, StoreError> {
        let dialect = self.dialect;
        let deleted = super::in_write_transaction!(self, self.begin_write(), |tx| delete_in(
            &mut Conn::Any(tx, dialect),
            &[id],
            deleted_at
        ))?;
        Ok(deleted.first().map(Profile::view))
    }

    /// Changes not yet published by the relay, oldest first.
    pub async fn unpublished_changes(&self, limit: u32) -> Result<Vec<ChangeRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT change_id, profile_id, user_id, before_view, after_view, causes, changed_at FROM profile_changes \
             WHERE published = 0 ORDER BY change_id LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(change_record).collect()
    }

    /// Marks changes as published.
    pub async fn mark_published(&self, change_ids: &[i64]) -> Result<(), StoreError> {
        for chunk in change_ids.chunks(ROWS_PER_INSERT) {
            let sql = format!(
                "UPDATE profile_changes SET published = 1 WHERE change_id IN ({})",
                self.dialect.params(chunk.len(), 1)
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for id in chunk {
                query = query.bind(*id);
            }
            query.execute(&self.pool).await?;
        }
        Ok(())
    }

    /// Forgets everything the profile processor made, so a replay can
    /// rebuild it from the log. Deleted ids stay deleted.
    pub async fn reset_profiles(&self, processor: &str) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        for table in ["profiles", "identities", "profile_changes", "events"] {
            let sql = format!("DELETE FROM {table}");
            sqlx::query(AssertSqlSafe(sql)).execute(&mut *tx).await?;
        }
        sqlx::query("DELETE FROM processor_offsets WHERE processor = $1")
            .bind(processor)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Applies a batch in the transaction of `conn`; returns what it did and
/// the states it wrote, for the cache once the transaction commits.
///
/// On PostgreSQL most batches skip the lookup of their message ids in
/// `events` (an index probe an event, about a tenth of the profiles'
/// statement time in the pipeline benchmark): a batch that holds an id
/// stored before then fails at its `events` insert, as a conflict, and
/// is run again, looking its ids up, as are the next ones ([`Careful`])
/// and every batch while they keep finding one.
async fn try_apply(
    mut conn: Conn<'_>,
    states: &StateCache,
    careful_events: &Careful,
    batch: &ProfileBatch<'_>,
) -> Result<(BatchOutcome, Vec<(String, CachedState)>), StoreError> {
    let now = now_ms();
    conn.advance_offsets(batch.processor, batch.topic, &batch.offsets, now)
        .await?;

    // Deletions first: the events of a deleted id received before its
    // deletion are then skipped below, wherever they are in the batch,
    // and later ones start a new profile, as they did live.
    let (deletions, batch_events): (Vec<&(EventEnvelope, String)>, Vec<_>) = batch
        .events
        .iter()
        .partition(|(e, _)| e.kind == crate::envelope::EventType::Delete);
    let mut deleted_profiles = 0;
    for (deletion, _) in &deletions {
        let ids = deletion.deleted_ids();
        let at = deletion.received_at.timestamp_millis();
        deleted_profiles += delete_in(&mut conn, &ids, at).await?.len();
    }

    // Deduplicate: first within the batch, then against the `events`
    // table, which holds every applied event's message id for at least
    // the deduplication window. A concurrent batch inserting one of
    // these ids too makes the insert below fail, and this batch is run
    // again (then it sees the id).
    let mut seen: HashSet<&str, crate::KeyHasher> = HashSet::default();
    let candidates: Vec<&(EventEnvelope, String)> = batch_events
        .into_iter()
        .filter(|(e, _)| seen.insert(e.message_id.as_str()))
        .collect();
    let message_ids: Vec<&str> = candidates
        .iter()
        .map(|(e, _)| e.message_id.as_str())
        .collect();
    let careful = !matches!(conn, Conn::Pg(_)) || careful_events.take();
    let known = if careful {
        conn.known_message_ids(&message_ids).await?
    } else {
        HashSet::default()
    };
    if !known.is_empty() {
        careful_events.arm();
    }
    let events: Vec<&(EventEnvelope, String)> = candidates
        .into_iter()
        .filter(|(e, _)| !known.contains(e.message_id.as_str()))
        .collect();
    let fresh = events.len();
    let mut outcome = BatchOutcome {
        duplicates: batch.events.len() - deletions.len() - fresh,
        deleted_profiles,
        ..BatchOutcome::default()
    };
    if events.is_empty() {
        return Ok((outcome, Vec::new()));
    }

    let ids: Vec<&str> = {
        let mut ids: Vec<&str> = events.iter().flat_map(|(e, _)| Book::ids_of(e)).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    };
    let deleted = conn.deleted_at(&ids).await?;
    let events: Vec<&(EventEnvelope, String)> = events
        .into_iter()
        .filter(|(e, _)| {
            let received = e.received_at.timestamp_millis();
            !Book::ids_of(e).any(|id| deleted.get(id).is_some_and(|at| received <= *at))
        })
        .collect();
    outcome.skipped_deleted = fresh - events.len();

    let mut book = load_book(&mut conn, states, &ids).await?;
    for (event, _) in &events {
        book.apply(event);
    }
    let targets: Vec<String> = events
        .iter()
        .map(|(e, _)| {
            let primary = e
                .user_id
                .as_deref()
                .or(e.anonymous_id.as_deref())
                .unwrap_or_default();
            book.profile_of(primary).unwrap_or(primary).to_owned()
        })
        .collect();
    let applied = book.finish();
    outcome.applied = events.len();
    outcome.changed_profiles = applied.changes.iter().filter(|c| c.after.is_some()).count();
    let written = write_applied(&mut conn, states, applied, now).await?;
    let inserted = conn.insert_events(&event_rows(&events, &targets)).await;
    if let Err(StoreError::Database(sqlx::Error::Database(e))) = &inserted
        && e.is_unique_violation()
    {
        // An id stored before (or by a concurrent batch): the batch runs
        // again and looks its ids up.
        careful_events.arm();
    }
    inserted?;
    Ok((outcome, written))
}

/// Loads the ids and the profiles they resolve to, locking the profile
/// rows (PostgreSQL) so concurrent batches touching the same profile take
/// turns. A profile whose stored version is the cached one comes from the
/// cache; the others are read and parsed.
async fn load_book(
    conn: &mut Conn<'_>,
    states: &StateCache,
    ids: &[&str],
) -> Result<Book, StoreError> {
    let mut book = Book::default();
    let mut mapped = conn.identities(ids).await?;
    let mut profile_ids: Vec<&str> = mapped.values().map(String::as_str).collect();
    // Sorted, so two transactions lock shared rows in one order.
    profile_ids.sort_unstable();
    profile_ids.dedup();
    let versions = conn.lock_profiles(&profile_ids).await?;
    if versions.len() != profile_ids.len() {
        // A concurrent merge removed a profile between the two reads.
        return Err(StoreError::Conflict);
    }
    let mut cached = states.take(&versions);
    let unknown: Vec<&str> = versions
        .iter()
        .map(|(profile_id, _)| profile_id.as_str())
        .filter(|profile_id| !cached.contains_key(*profile_id))
        .collect();
    if !unknown.is_empty() {
        let stored = conn.profile_states(&unknown).await?;
        if stored.len() != unknown.len() {
            return Err(StoreError::Conflict);
        }
        for (profile_id, state) in stored {
            book.load_profile(profile_id, parse(&state)?);
        }
    }
    for (profile_id, state) in cached.drain() {
        book.load_profile_with_view(profile_id, state.profile, state.view);
    }
    for id in ids {
        let profile_id = mapped.remove(*id);
        book.load_id((*id).to_owned(), profile_id);
    }
    Ok(book)
}

/// Writes what a batch did to the profiles: merges first (so moved rows
/// point at the survivor), then ids, profiles and change records. Returns
/// each written profile's state, version and view.
async fn write_applied(
    conn: &mut Conn<'_>,
    states: &StateCache,
    applied: Applied,
    now: i64,
) -> Result<Vec<(String, CachedState)>, StoreError> {
    for merge in &applied.merges {
        conn.merge(&merge.from, &merge.into).await?;
    }
    conn.insert_ids(&applied.new_ids).await?;
    let mut profiles = ProfileRows::default();
    for (profile_id, profile) in &applied.profiles {
        profiles.profile_id.push(profile_id.clone());
        profiles
            .user_id
            .push(profile.user_id.as_ref().map(|u| u.value.clone()));
        profiles.state_json.push(to_json(profile));
        profiles.version.push(states.next_version());
    }
    conn.upsert_profiles(&profiles, now).await?;
    let mut changes = ChangeRows::default();
    let mut views: HashMap<String, String, crate::KeyHasher> = HashMap::default();
    for change in applied.changes {
        if let Some(view) = &change.after {
            views.insert(change.profile_id.clone(), view.clone());
        }
        changes.profile_id.push(change.profile_id);
        changes.user_id.push(change.user_id);
        changes.before_view.push(change.before);
        changes.after_view.push(change.after);
        changes.causes.push(to_json(&change.causes));
    }
    conn.insert_changes(&changes, now).await?;
    Ok(applied
        .profiles
        .into_iter()
        .zip(profiles.version)
        .filter_map(|((profile_id, profile), version)| {
            let view = views.remove(&profile_id)?;
            Some((
                profile_id,
                CachedState {
                    version,
                    profile,
                    view,
                },
            ))
        })
        .collect())
}

/// The raw events sink's rows: each applied event under the profile it
/// went to.
fn event_rows<'a>(events: &[&'a (EventEnvelope, String)], targets: &'a [String]) -> EventRows<'a> {
    let mut rows = EventRows::default();
    for ((event, body), profile_id) in events.iter().zip(targets) {
        rows.message_id.push(event.message_id.as_str());
        rows.profile_id.push(profile_id.as_str());
        rows.kind.push(event.kind.as_str());
        rows.event.push(event.event.as_deref());
        rows.occurred_at.push(event.timestamp.timestamp_millis());
        rows.received_at.push(event.received_at.timestamp_millis());
        rows.body.push(body.as_str());
    }
    rows
}

fn change_record(row: &AnyRow) -> Result<ChangeRecord, StoreError> {
    let json = |i: usize| -> Result<Option<ProfileView>, StoreError> {
        row.try_get::<Option<String>, _>(i)?
            .map(|t| parse(&t))
            .transpose()
    };
    let changed_at: i64 = row.try_get(6)?;
    Ok(ChangeRecord {
        change_id: row.try_get(0)?,
        profile_id: row.try_get(1)?,
        user_id: row.try_get(2)?,
        before: json(3)?,
        after: json(4)?,
        causes: parse(&row.try_get::<String, _>(5)?)?,
        changed_at: DateTime::<Utc>::from_timestamp_millis(changed_at).unwrap_or_default(),
    })
}

/// One profile change, as `profile_changes` keeps it and the relay
/// publishes it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChangeRecord {
    /// Increasing; a stable identity for consumers that deduplicate.
    pub change_id: i64,
    pub profile_id: String,
    pub user_id: Option<String>,
    /// The profile before; `null` for a new profile.
    pub before: Option<ProfileView>,
    /// The profile after; `null` when it was merged into another or deleted.
    pub after: Option<ProfileView>,
    /// Message ids of the events that caused it (`$delete` for a deletion).
    pub causes: Vec<String>,
    pub changed_at: DateTime<Utc>,
}

/// A page of profiles and the cursor of the next one.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfilePage {
    pub profiles: Vec<ProfileView>,
    /// The last profile id of this page when more follow.
    pub next: Option<String>,
}

/// A page of events and the cursor of the next one.
#[derive(Debug, Clone, PartialEq)]
pub struct EventPage {
    /// Each event's envelope, as it was in the log.
    pub events: Vec<Value>,
    pub next: Option<(i64, String)>,
}

/// Deletes the profiles `ids` resolve to, with their ids, change history
/// and stored events, in the transaction of `conn`; records every id of
/// them (and `ids`) as deleted at `deleted_at`, so their events received
/// until then are never applied again; writes a `$delete` change (a
/// tombstone for the relay) for each. Returns the deleted profiles.
async fn delete_in(
    conn: &mut Conn<'_>,
    ids: &[&str],
    deleted_at: i64,
) -> Result<Vec<Profile>, StoreError> {
    let mapped = conn.identities(ids).await?;
    let mut profile_ids: Vec<&str> = mapped.values().map(String::as_str).collect();
    profile_ids.sort_unstable();
    profile_ids.dedup();
    let rows: Vec<(String, String)> = if profile_ids.is_empty() {
        Vec::new()
    } else {
        // Row locks where there are any: SQLite's write transaction
        // already excludes other writers.
        let suffix = match conn {
            Conn::Pg(_) | Conn::Any(_, super::Dialect::Postgres) => " FOR UPDATE",
            Conn::Any(_, super::Dialect::Sqlite) => "",
        };
        conn.rows_in(
            "SELECT profile_id, state_json FROM profiles WHERE profile_id",
            suffix,
            &profile_ids,
        )
        .await?
    };
    let mut deleted = Vec::with_capacity(rows.len());
    let mut every_id: Vec<String> = ids.iter().map(|id| (*id).to_owned()).collect();
    for (profile_id, state_json) in rows {
        let state: Profile = parse(&state_json)?;
        conn.delete_profile_rows(&profile_id).await?;
        conn.insert_deletion_change(&profile_id, state.view().user_id, deleted_at)
            .await?;
        every_id.extend(state.ids.iter().cloned());
        deleted.push(state);
    }
    every_id.sort_unstable();
    every_id.dedup();
    conn.mark_deleted(&every_id, deleted_at).await?;
    Ok(deleted)
}
