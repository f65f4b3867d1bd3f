//! SQLite's message-id claims: sorted runs ([`super::claim_runs`]) in
//! the tables `claim_runs` and `claim_blocks` (migration 22), written and
//! read through SQLite's own C API on a connection of their own.
//!
//! A claim as a row of its own cost SQLite about a microsecond whatever
//! its key, a third of a per-user count's CPU; a run of claims costs a
//! few bytes each through the WAL, a hash and a look at each run's
//! filter. Every run's filter and block index stay in memory (about 2
//! bytes a claim kept), read at the first write; a lookup that
//! a filter lets through reads one block.
//!
//! Each processor's runs are merged size-tiered: [`FANOUT`] runs of one
//! size tier become one of the next, so a claim is rewritten once a tier
//! (a handful of times over the deduplication window) and an id is asked
//! of at most `FANOUT - 1` filters a tier. Claims past the window go
//! when their run is rewritten: a run all of whose claims are older goes
//! whole, and one with an eighth or more of them older is rewritten
//! without them.
//!
//! Rows of `metric_seen` (claims stored before migration 22, or restored
//! from a snapshot) are turned into runs at the next write.
//!
//! Another writer of the file (a second process on one data directory, a
//! snapshot restored through the pool) is seen through `claim_epoch`,
//! which every write that changes the runs moves: a write that finds it
//! moved reads the runs again before it looks anything up.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CStr, CString, c_int};
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::{Arc, Mutex};

use libsqlite3_sys as ffi;

use super::StoreError;
use super::claim_runs::{
    BlockCursor, Corrupt, Filter, OutOfOrder, OwnedClaim, Position, RunBuilder, RunSummary,
    id_hash, merge,
};
use super::metric_windows::{Claimed, FirstRecords};

/// Runs of one size tier merged into one of the next: more runs cost each
/// lookup more filters, fewer rewrite each claim more often.
const FANOUT: usize = 8;

/// The SQLite claims' connection and the runs it knows, opened on first
/// use (after the pool has created the file and run the migrations).
#[derive(Debug)]
pub(super) struct NativeClaims {
    path: PathBuf,
    state: Mutex<State>,
}

#[derive(Debug)]
enum State {
    Unopened,
    Open(Box<Claims>),
    /// The store was closed.
    Closed,
}

impl NativeClaims {
    pub(super) fn new(path: &Path) -> NativeClaims {
        NativeClaims {
            path: path.to_owned(),
            state: Mutex::new(State::Unopened),
        }
    }

    /// Closes the connection (the store is closing); a claim after it
    /// fails. On a blocking thread: the last connection to close
    /// checkpoints the WAL.
    pub(super) async fn close(self: &Arc<Self>) {
        let native = self.clone();
        // Interrupted only as the runtime shuts down, when nothing is
        // left to claim.
        let _ = on_blocking_thread(move || *native.lock() = State::Closed).await;
    }

    /// Claims each `(id, partition, offset, received_at)` for `processor`
    /// unless the id was claimed before, in one transaction, and says
    /// which records were their ids' first (see [`Claimed`]): the first
    /// of an id's records in `claims` when the id is new.
    /// SQLite works on a blocking thread (which also waits out another
    /// writer of the file, up to the busy timeout), on a copy of the
    /// claims: blocking the caller's instead would stall the runtime,
    /// and with it a task that holds the write lock this one waits for.
    pub(super) async fn claim(
        self: &Arc<Self>,
        processor: &str,
        claims: &[(&str, i32, i64, i64)],
    ) -> Result<Claimed, StoreError> {
        let native = self.clone();
        let processor = processor.to_owned();
        let owned = OwnedClaims::of(claims);
        on_blocking_thread(move || native.with_open(|open| open.claim(&processor, &owned.claims())))
            .await?
    }

    /// Drops the claims received before `before_ms` (the deduplication
    /// window), a run at a time: see the module's comment.
    pub(super) async fn expire(self: &Arc<Self>, before_ms: i64) -> Result<(), StoreError> {
        let native = self.clone();
        on_blocking_thread(move || native.with_open(|open| open.expire(before_ms))).await?
    }

    /// Drops every claim of `processor`.
    pub(super) async fn forget(self: &Arc<Self>, processor: &str) -> Result<(), StoreError> {
        let native = self.clone();
        let processor = processor.to_owned();
        on_blocking_thread(move || native.with_open(|open| open.forget(&processor))).await?
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `work` on the open claims, opening them first if need be.
    fn with_open<T>(
        &self,
        work: impl FnOnce(&mut Claims) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut state = self.lock();
        if matches!(*state, State::Unopened) {
            *state = State::Open(Box::new(Claims::open(&self.path)?));
        }
        let State::Open(open) = &mut *state else {
            return Err(StoreError::Native {
                code: ffi::SQLITE_MISUSE,
                message: "the store is closed".to_owned(),
            });
        };
        let outcome = work(open);
        // Whatever happened, no transaction may stay open; after a
        // failure the runs in memory may be ahead of the file's, and are
        // read again.
        if outcome.is_err() {
            open.epoch = -1;
        }
        open.connection.roll_back_if_open()?;
        outcome
    }
}

/// Runs `work` on a blocking thread; a panic there goes on here.
async fn on_blocking_thread<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(done) => Ok(done),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(StoreError::Interrupted(e.to_string())),
    }
}

/// Claims as a blocking thread takes them: the ids one after another in
/// one string, as they come.
struct OwnedClaims {
    ids: String,
    /// Where each id ends in `ids`, and its record.
    rows: Vec<(usize, i32, i64, i64)>,
}

impl OwnedClaims {
    fn of(claims: &[(&str, i32, i64, i64)]) -> OwnedClaims {
        let mut ids = String::with_capacity(claims.iter().map(|c| c.0.len()).sum());
        let rows = claims
            .iter()
            .map(|(id, partition, offset, received_at)| {
                ids.push_str(id);
                (ids.len(), *partition, *offset, *received_at)
            })
            .collect();
        OwnedClaims { ids, rows }
    }

    fn claims(&self) -> Vec<(&str, i32, i64, i64)> {
        let mut start = 0;
        self.rows
            .iter()
            .map(|&(end, partition, offset, received_at)| {
                let id = &self.ids[start..end];
                start = end;
                (id, partition, offset, received_at)
            })
            .collect()
    }
}

/// One stored run: its number (its key beside the processor) and what
/// is kept of it in memory.
#[derive(Debug)]
struct Run {
    number: i64,
    summary: RunSummary,
}

/// The open claims: the connection and every processor's runs, oldest
/// first.
#[derive(Debug)]
struct Claims {
    connection: Connection,
    runs: HashMap<String, Vec<Run>>,
    next_run: i64,
    /// The `claim_epoch` the runs in memory are of: every transaction
    /// that changes the runs moves it, so a writer of the file other than
    /// this connection (another process, a restore) is seen at the next
    /// transaction's start, and the runs are read again.
    epoch: i64,
}

impl Claims {
    fn open(path: &Path) -> Result<Claims, StoreError> {
        let connection = Connection::open(path)?;
        // The runs are read at the first write (no epoch is negative).
        Ok(Claims {
            connection,
            runs: HashMap::new(),
            next_run: 1,
            epoch: -1,
        })
    }

    /// Sets the gauges of `processor`'s claims.
    fn report(&self, processor: &str) {
        let runs = self.runs.get(processor).map_or(&[][..], Vec::as_slice);
        let kept: u64 = runs.iter().map(|r| r.summary.claims).sum();
        let bytes: usize = runs.iter().map(|r| r.summary.bytes()).sum();
        let name = processor.to_owned();
        metrics::gauge!(crate::metrics::CLAIMS_KEPT, "claims" => name.clone()).set(kept as f64);
        metrics::gauge!(crate::metrics::CLAIMS_MEMORY_BYTES, "claims" => name).set(bytes as f64);
    }

    /// Begins a write, with the runs in memory those of the file, and
    /// the rows of `metric_seen` turned into runs.
    fn begin(&mut self) -> Result<(), StoreError> {
        self.connection.execute("BEGIN IMMEDIATE")?;
        if self.connection.epoch()? != self.epoch {
            self.load()?;
            self.take_rows()?;
        }
        Ok(())
    }

    /// Reads the runs again if another writer changed them (outside a
    /// write: what is read may be changed before the next).
    fn sync(&mut self) -> Result<(), StoreError> {
        if self.connection.epoch()? != self.epoch {
            self.load()?;
        }
        Ok(())
    }

    /// Marks the runs changed by the write under way.
    fn changed(&mut self) -> Result<(), StoreError> {
        let connection = &self.connection;
        connection.query(connection.bump_epoch, &[], |_| Ok(()))?;
        self.epoch = connection.epoch()?;
        Ok(())
    }

    /// Reads every run's summary.
    fn load(&mut self) -> Result<(), StoreError> {
        self.epoch = self.connection.epoch()?;
        let connection = &self.connection;
        let mut runs: HashMap<String, Vec<Run>> = HashMap::new();
        let mut next_run = 1;
        connection.query(connection.load_runs, &[], |row| {
            let number = row.int(1);
            next_run = next_run.max(number + 1);
            let summary = RunSummary {
                claims: u64::try_from(row.int(2))
                    .map_err(|_| corrupt(Corrupt("a run's count is negative")))?,
                newest_received: row.int(3),
                oldest_received: row.int(4),
                filter: Filter::from_bytes(row.blob(5)).map_err(corrupt)?,
                firsts: RunSummary::firsts_from_bytes(row.blob(6)).map_err(corrupt)?,
            };
            runs.entry(row.text(0)?.to_owned())
                .or_default()
                .push(Run { number, summary });
            Ok(())
        })?;
        self.runs = runs;
        self.next_run = next_run;
        let processors: Vec<String> = self.runs.keys().cloned().collect();
        for processor in processors {
            self.report(&processor);
        }
        Ok(())
    }

    /// Turns the rows of `metric_seen` into runs, a processor's rows into
    /// one, and deletes the rows, within the write under way.
    fn take_rows(&mut self) -> Result<(), StoreError> {
        let connection = &self.connection;
        let mut rows = 0u64;
        connection.query(connection.count_rows, &[], |row| {
            rows = row.int(0) as u64;
            Ok(())
        })?;
        if rows == 0 {
            return Ok(());
        }
        tracing::info!(
            "turning {rows} stored message-id claims into sorted runs (once, after an upgrade or a restore); claims wait until it is done"
        );
        let started = std::time::Instant::now();
        let mut written: Vec<(String, Run)> = Vec::new();
        let mut current: Option<(String, RunWriter)> = None;
        let mut next_run = self.next_run;
        connection.query(connection.read_rows, &[], |row| {
            let processor = row.text(0)?;
            if current.as_ref().is_none_or(|(p, _)| p != processor) {
                if let Some((done, writer)) = current.take() {
                    written.push((done.clone(), writer.finish(connection, &done)?));
                }
                current = Some((
                    processor.to_owned(),
                    RunWriter::new(next_run, rows as usize),
                ));
                next_run += 1;
            }
            let (processor, writer) = current.as_mut().expect("set above");
            let position = Position {
                partition: row.nullable_int(2).map_or(-1, |p| p as i32),
                offset: row.nullable_int(3).unwrap_or(-1),
                received: row.int(4),
            };
            writer.push(connection, processor, row.text(1)?, position)
        })?;
        if let Some((done, writer)) = current.take() {
            written.push((done.clone(), writer.finish(connection, &done)?));
        }
        connection.execute("DELETE FROM metric_seen")?;
        self.changed()?;
        tracing::info!(
            "turned {rows} stored message-id claims into sorted runs in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        self.next_run = next_run;
        for (processor, run) in written {
            self.runs.entry(processor.clone()).or_default().push(run);
            self.report(&processor);
        }
        Ok(())
    }

    fn claim(
        &mut self,
        processor: &str,
        claims: &[(&str, i32, i64, i64)],
    ) -> Result<Claimed, StoreError> {
        // In order of id, an id's records in the order given (a stable
        // sort): its first is the one a new id is claimed for.
        let mut order: Vec<usize> = (0..claims.len()).collect();
        if !claims.is_sorted_by(|a, b| a.0 < b.0) {
            order.sort_by(|&a, &b| claims[a].0.cmp(claims[b].0));
        }
        self.begin()?;
        let runs = self.runs.get(processor).map_or(&[][..], Vec::as_slice);
        let mut blocks = BlockReader::new(&self.connection, processor, runs);
        let mut writer = RunWriter::new(self.next_run, claims.len());
        // Ids claimed before, at their stored first record: with the
        // claims' own order they answer for every id when some are.
        let mut stored: Vec<(&str, (i32, i64))> = Vec::new();
        let mut all_first = true;
        let mut last: Option<&str> = None;
        for i in order {
            let (id, partition, offset, received) = claims[i];
            if last == Some(id) {
                // Another record of an id given before in `claims`.
                all_first = false;
                continue;
            }
            last = Some(id);
            match blocks.find(id)? {
                Some(at) => {
                    all_first = false;
                    stored.push((id, (at.partition, at.offset)));
                }
                None => {
                    let position = Position {
                        partition,
                        offset,
                        received,
                    };
                    writer.push(&self.connection, processor, id, position)?;
                }
            }
        }
        if !writer.is_empty() {
            let run = writer.finish(&self.connection, processor)?;
            self.changed()?;
            self.connection.execute("COMMIT")?;
            self.next_run += 1;
            self.runs.entry(processor.to_owned()).or_default().push(run);
            // The claims are in: a merge that fails leaves the runs as
            // they were, to be merged after a later claim.
            if let Err(e) = self.compact(processor) {
                self.connection.roll_back_if_open()?;
                self.epoch = -1;
                tracing::warn!(
                    "cannot merge the message-id claims of {processor} ({e}); they stay in more runs, which lookups read more slowly, until a later claim merges them"
                );
            }
            self.report(processor);
        } else {
            // Nothing claimed, but `begin` may have turned rows into runs.
            self.connection.execute("COMMIT")?;
        }
        if all_first {
            return Ok(Claimed::AllFirst);
        }
        let mut first = FirstRecords::default();
        for (id, partition, offset, _) in claims {
            first
                .entry((*id).to_owned())
                .or_insert((*partition, *offset));
        }
        for (id, at) in stored {
            first.insert(id.to_owned(), at);
        }
        Ok(Claimed::Positions(first))
    }

    /// Merges `processor`'s runs while some size tier holds [`FANOUT`].
    fn compact(&mut self, processor: &str) -> Result<(), StoreError> {
        loop {
            let Some(runs) = self.runs.get(processor) else {
                return Ok(());
            };
            let mut tiers: BTreeMap<u32, Vec<i64>> = BTreeMap::new();
            for run in runs {
                tiers
                    .entry(tier(run.summary.claims))
                    .or_default()
                    .push(run.number);
            }
            let Some(full) = tiers.into_values().find(|numbers| numbers.len() >= FANOUT) else {
                return Ok(());
            };
            self.rewrite(processor, &full, i64::MIN)?;
        }
    }

    /// Replaces the runs `numbers` of `processor` with one of their
    /// claims received at or after `keep_from`, in one transaction.
    fn rewrite(
        &mut self,
        processor: &str,
        numbers: &[i64],
        keep_from: i64,
    ) -> Result<(), StoreError> {
        self.begin()?;
        let runs = self.runs.get(processor).map_or(&[][..], Vec::as_slice);
        // Those another writer merged meanwhile are gone.
        let chosen: Vec<&Run> = runs
            .iter()
            .filter(|r| numbers.contains(&r.number))
            .collect();
        let total: u64 = chosen.iter().map(|r| r.summary.claims).sum();
        let connection = &self.connection;
        let mut writer = RunWriter::new(self.next_run, total as usize);
        let sources = chosen
            .iter()
            .map(|run| {
                let mut block = 0;
                let mut read: std::vec::IntoIter<OwnedClaim> = Vec::new().into_iter();
                move || -> Result<Option<OwnedClaim>, StoreError> {
                    loop {
                        if let Some(claim) = read.next() {
                            return Ok(Some(claim));
                        }
                        if block == run.summary.firsts.len() {
                            return Ok(None);
                        }
                        let bytes = connection.read_block(processor, run.number, block)?;
                        block += 1;
                        let mut cursor = BlockCursor::new(&bytes);
                        let mut claims = Vec::new();
                        while let Some((id, position)) = cursor.next_claim().map_err(corrupt)? {
                            claims.push(OwnedClaim {
                                id: id.to_owned(),
                                position,
                            });
                        }
                        read = claims.into_iter();
                    }
                }
            })
            .collect();
        merge(
            sources,
            |position| position.received >= keep_from,
            |id, position| writer.push(connection, processor, id, position),
        )?;
        for number in numbers {
            connection.delete_run(processor, *number)?;
        }
        let merged = if writer.is_empty() {
            None
        } else {
            Some(writer.finish(connection, processor)?)
        };
        self.changed()?;
        self.connection.execute("COMMIT")?;
        let runs = self.runs.entry(processor.to_owned()).or_default();
        runs.retain(|r| !numbers.contains(&r.number));
        if let Some(merged) = merged {
            self.next_run += 1;
            runs.push(merged);
        }
        self.report(processor);
        Ok(())
    }

    fn expire(&mut self, before_ms: i64) -> Result<(), StoreError> {
        self.sync()?;
        let mut due: Vec<(String, i64)> = Vec::new();
        for (processor, runs) in &self.runs {
            for run in runs {
                let s = &run.summary;
                // Claims are assumed spread evenly over the run's span.
                let expired = s.newest_received < before_ms
                    || (s.oldest_received < before_ms
                        && (before_ms - s.oldest_received) as f64
                            >= (s.newest_received - s.oldest_received) as f64 / 8.0);
                if expired {
                    due.push((processor.clone(), run.number));
                }
            }
        }
        for (processor, number) in due {
            self.rewrite(&processor, &[number], before_ms)?;
        }
        Ok(())
    }

    fn forget(&mut self, processor: &str) -> Result<(), StoreError> {
        self.begin()?;
        let numbers: Vec<i64> = self
            .runs
            .get(processor)
            .map(|runs| runs.iter().map(|r| r.number).collect())
            .unwrap_or_default();
        for number in numbers {
            self.connection.delete_run(processor, number)?;
        }
        self.changed()?;
        self.connection.execute("COMMIT")?;
        self.runs.remove(processor);
        self.report(processor);
        Ok(())
    }
}

/// A run's size tier: [`FANOUT`] runs of one tier hold about as many
/// claims as one of the next.
fn tier(claims: u64) -> u32 {
    claims.max(1).ilog(FANOUT as u64)
}

fn corrupt(e: Corrupt) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

impl From<OutOfOrder> for StoreError {
    fn from(e: OutOfOrder) -> StoreError {
        StoreError::Corrupt(e.to_string())
    }
}

/// A run being written inside an open transaction: blocks go to
/// `claim_blocks` as they close, the summary to `claim_runs` at the end.
struct RunWriter {
    number: i64,
    builder: RunBuilder,
    written: i64,
}

impl RunWriter {
    fn new(number: i64, claims: usize) -> RunWriter {
        RunWriter {
            number,
            builder: RunBuilder::new(claims),
            written: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.builder.is_empty()
    }

    fn push(
        &mut self,
        connection: &Connection,
        processor: &str,
        id: &str,
        position: Position,
    ) -> Result<(), StoreError> {
        self.builder.push(id, position)?;
        for block in self.builder.take_blocks() {
            connection.insert_block(processor, self.number, self.written, &block)?;
            self.written += 1;
        }
        Ok(())
    }

    fn finish(mut self, connection: &Connection, processor: &str) -> Result<Run, StoreError> {
        let (summary, blocks) = self.builder.finish();
        for block in blocks {
            connection.insert_block(processor, self.number, self.written, &block)?;
            self.written += 1;
        }
        connection.insert_run(processor, self.number, &summary)?;
        Ok(Run {
            number: self.number,
            summary,
        })
    }
}

/// Looks ids up in a processor's runs, in order of id, keeping each
/// run's last block read (the next ids often fall in it).
struct BlockReader<'a> {
    connection: &'a Connection,
    processor: &'a str,
    runs: &'a [Run],
    last: Vec<Option<(usize, Vec<u8>)>>,
}

impl<'a> BlockReader<'a> {
    fn new(connection: &'a Connection, processor: &'a str, runs: &'a [Run]) -> BlockReader<'a> {
        BlockReader {
            connection,
            processor,
            runs,
            last: runs.iter().map(|_| None).collect(),
        }
    }

    /// Where `id` was claimed, if it was.
    fn find(&mut self, id: &str) -> Result<Option<Position>, StoreError> {
        if self.runs.is_empty() {
            return Ok(None);
        }
        let hash = id_hash(id);
        for (run, last) in self.runs.iter().zip(&mut self.last) {
            let Some(block) = run.summary.block_for(id, hash) else {
                continue;
            };
            if last.as_ref().is_none_or(|(at, _)| *at != block) {
                let bytes = self
                    .connection
                    .read_block(self.processor, run.number, block)?;
                *last = Some((block, bytes));
            }
            let (_, bytes) = last.as_ref().expect("read above");
            if let Some(position) = BlockCursor::find(bytes, id).map_err(corrupt)? {
                return Ok(Some(position));
            }
        }
        Ok(None)
    }
}

/// One SQLite connection and its prepared statements.
#[derive(Debug)]
struct Connection {
    db: *mut ffi::sqlite3,
    insert_block: *mut ffi::sqlite3_stmt,
    read_block: *mut ffi::sqlite3_stmt,
    insert_run: *mut ffi::sqlite3_stmt,
    delete_blocks: *mut ffi::sqlite3_stmt,
    delete_run: *mut ffi::sqlite3_stmt,
    load_runs: *mut ffi::sqlite3_stmt,
    count_rows: *mut ffi::sqlite3_stmt,
    read_rows: *mut ffi::sqlite3_stmt,
    read_epoch: *mut ffi::sqlite3_stmt,
    bump_epoch: *mut ffi::sqlite3_stmt,
}

// SAFETY: a connection opened with SQLITE_OPEN_NOMUTEX may be used from
// any thread, one at a time; the `Mutex` in `NativeClaims` sees to that,
// and the statements are only used with their connection.
unsafe impl Send for Connection {}

/// A value bound to a statement's parameter.
enum Bound<'a> {
    Int(i64),
    Text(&'a str),
    Blob(&'a [u8]),
}

/// A row of a statement being stepped.
struct Row(*mut ffi::sqlite3_stmt);

impl Row {
    fn int(&self, column: c_int) -> i64 {
        // SAFETY: the statement is on a row; SQLite converts any value.
        unsafe { ffi::sqlite3_column_int64(self.0, column) }
    }

    fn nullable_int(&self, column: c_int) -> Option<i64> {
        // SAFETY: as `int`.
        let null = unsafe { ffi::sqlite3_column_type(self.0, column) } == ffi::SQLITE_NULL;
        (!null).then(|| self.int(column))
    }

    /// The column's bytes, valid until the statement steps again.
    fn blob(&self, column: c_int) -> &[u8] {
        // SAFETY: the pointer is read before the length, as SQLite asks;
        // both stay valid until the next step, which `&self` outlives not.
        unsafe {
            let data = ffi::sqlite3_column_blob(self.0, column);
            let len = ffi::sqlite3_column_bytes(self.0, column);
            if data.is_null() || len <= 0 {
                &[]
            } else {
                std::slice::from_raw_parts(data.cast(), len as usize)
            }
        }
    }

    fn text(&self, column: c_int) -> Result<&str, StoreError> {
        // SAFETY: as `blob`, for the text's bytes.
        let bytes = unsafe {
            let data = ffi::sqlite3_column_text(self.0, column);
            let len = ffi::sqlite3_column_bytes(self.0, column);
            if data.is_null() || len <= 0 {
                &[][..]
            } else {
                std::slice::from_raw_parts(data, len as usize)
            }
        };
        std::str::from_utf8(bytes)
            .map_err(|_| StoreError::Corrupt("a claim's text is not UTF-8".to_owned()))
    }
}

impl Connection {
    fn open(path: &Path) -> Result<Connection, StoreError> {
        let name =
            CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| StoreError::Native {
                code: ffi::SQLITE_CANTOPEN,
                message: format!("{} has a NUL byte in its name", path.display()),
            })?;
        let mut db = ptr::null_mut();
        // SAFETY: `name` is a NUL-terminated path; `db` receives a handle
        // (even on failure, when it must still be closed).
        let rc = unsafe {
            ffi::sqlite3_open_v2(
                name.as_ptr(),
                &mut db,
                ffi::SQLITE_OPEN_READWRITE | ffi::SQLITE_OPEN_NOMUTEX,
                ptr::null(),
            )
        };
        let null = ptr::null_mut();
        let mut connection = Connection {
            db,
            insert_block: null,
            read_block: null,
            insert_run: null,
            delete_blocks: null,
            delete_run: null,
            load_runs: null,
            count_rows: null,
            read_rows: null,
            read_epoch: null,
            bump_epoch: null,
        };
        if rc != ffi::SQLITE_OK {
            return Err(connection.error(rc));
        }
        for pragma in super::SQLITE_PRAGMAS {
            connection.execute(pragma)?;
        }
        connection.insert_block = connection.prepare(
            "INSERT INTO claim_blocks (processor, run, block, claims) VALUES (?1, ?2, ?3, ?4)",
        )?;
        connection.read_block = connection.prepare(
            "SELECT claims FROM claim_blocks WHERE processor = ?1 AND run = ?2 AND block = ?3",
        )?;
        connection.insert_run = connection.prepare(
            "INSERT INTO claim_runs \
             (processor, run, claims, newest_received, oldest_received, filter, firsts) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        connection.delete_blocks =
            connection.prepare("DELETE FROM claim_blocks WHERE processor = ?1 AND run = ?2")?;
        connection.delete_run =
            connection.prepare("DELETE FROM claim_runs WHERE processor = ?1 AND run = ?2")?;
        connection.load_runs = connection.prepare(
            "SELECT processor, run, claims, newest_received, oldest_received, filter, firsts \
             FROM claim_runs ORDER BY processor, run",
        )?;
        connection.count_rows = connection.prepare("SELECT COUNT(*) FROM metric_seen")?;
        connection.read_rows = connection.prepare(
            "SELECT processor, message_id, partition, record_offset, received_at \
             FROM metric_seen ORDER BY processor, message_id",
        )?;
        connection.read_epoch = connection.prepare("SELECT epoch FROM claim_epoch")?;
        connection.bump_epoch = connection.prepare("UPDATE claim_epoch SET epoch = epoch + 1")?;
        Ok(connection)
    }

    fn epoch(&self) -> Result<i64, StoreError> {
        let mut epoch = 0;
        self.query(self.read_epoch, &[], |row| {
            epoch = row.int(0);
            Ok(())
        })?;
        Ok(epoch)
    }

    fn insert_block(
        &self,
        processor: &str,
        run: i64,
        block: i64,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        let bound = [
            Bound::Text(processor),
            Bound::Int(run),
            Bound::Int(block),
            Bound::Blob(bytes),
        ];
        self.query(self.insert_block, &bound, |_| Ok(()))
    }

    fn read_block(&self, processor: &str, run: i64, block: usize) -> Result<Vec<u8>, StoreError> {
        let mut bytes = None;
        let bound = [
            Bound::Text(processor),
            Bound::Int(run),
            Bound::Int(block as i64),
        ];
        self.query(self.read_block, &bound, |row| {
            bytes = Some(row.blob(0).to_vec());
            Ok(())
        })?;
        bytes.ok_or_else(|| {
            StoreError::Corrupt(format!(
                "block {block} of claim run {run} of {processor} is missing"
            ))
        })
    }

    fn insert_run(
        &self,
        processor: &str,
        run: i64,
        summary: &RunSummary,
    ) -> Result<(), StoreError> {
        let filter = summary.filter.to_bytes();
        let firsts = summary.firsts_bytes();
        let bound = [
            Bound::Text(processor),
            Bound::Int(run),
            Bound::Int(summary.claims as i64),
            Bound::Int(summary.newest_received),
            Bound::Int(summary.oldest_received),
            Bound::Blob(&filter),
            Bound::Blob(&firsts),
        ];
        self.query(self.insert_run, &bound, |_| Ok(()))
    }

    fn delete_run(&self, processor: &str, run: i64) -> Result<(), StoreError> {
        let bound = [Bound::Text(processor), Bound::Int(run)];
        self.query(self.delete_blocks, &bound, |_| Ok(()))?;
        self.query(self.delete_run, &bound, |_| Ok(()))
    }

    /// Binds `bound` to `statement` (one of this connection's) and steps
    /// it to its end, `row` taking each row; then resets it and clears
    /// its bindings, whatever happened, so it keeps no pointer into
    /// `bound`.
    fn query(
        &self,
        statement: *mut ffi::sqlite3_stmt,
        bound: &[Bound<'_>],
        mut row: impl FnMut(&Row) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let outcome = (|| {
            for (at, value) in (1..).zip(bound) {
                // SAFETY: `statement` is this connection's and has these
                // parameters. Texts and blobs are bound SQLITE_STATIC:
                // they outlive the statement's run, and the bindings are
                // cleared below before `bound` can go.
                let rc = unsafe {
                    match value {
                        Bound::Int(n) => ffi::sqlite3_bind_int64(statement, at, *n),
                        Bound::Text(text) => ffi::sqlite3_bind_text64(
                            statement,
                            at,
                            text.as_ptr().cast(),
                            text.len() as u64,
                            ffi::SQLITE_STATIC(),
                            ffi::SQLITE_UTF8 as u8,
                        ),
                        Bound::Blob(bytes) => ffi::sqlite3_bind_blob64(
                            statement,
                            at,
                            bytes.as_ptr().cast(),
                            bytes.len() as u64,
                            ffi::SQLITE_STATIC(),
                        ),
                    }
                };
                if rc != ffi::SQLITE_OK {
                    return Err(self.error(rc));
                }
            }
            loop {
                // SAFETY: the statement is bound whole.
                match unsafe { ffi::sqlite3_step(statement) } {
                    ffi::SQLITE_ROW => row(&Row(statement))?,
                    ffi::SQLITE_DONE => return Ok(()),
                    rc => return Err(self.error(rc)),
                }
            }
        })();
        // SAFETY: the statement is this connection's; its error, if any,
        // was read above.
        unsafe {
            ffi::sqlite3_reset(statement);
            ffi::sqlite3_clear_bindings(statement);
        }
        outcome
    }

    /// Rolls back a transaction left open by a failure.
    fn roll_back_if_open(&self) -> Result<(), StoreError> {
        // SAFETY: a plain read of the connection's state.
        if unsafe { ffi::sqlite3_get_autocommit(self.db) } != 0 {
            return Ok(());
        }
        self.execute("ROLLBACK")
    }

    fn execute(&self, sql: &str) -> Result<(), StoreError> {
        let sql = CString::new(sql).expect("the store's SQL has no NUL byte");
        // SAFETY: `sql` is NUL-terminated; no callback, no error string
        // (the connection's message is read instead).
        let rc = unsafe {
            ffi::sqlite3_exec(
                self.db,
                sql.as_ptr(),
                None,
                ptr::null_mut(),
                ptr::null_mut(),
            )
        };
        if rc != ffi::SQLITE_OK {
            return Err(self.error(rc));
        }
        Ok(())
    }

    fn prepare(&self, sql: &str) -> Result<*mut ffi::sqlite3_stmt, StoreError> {
        let sql = CString::new(sql).expect("the store's SQL has no NUL byte");
        let mut statement = ptr::null_mut();
        // SAFETY: `sql` is NUL-terminated; the statement is finalized
        // when the connection is dropped.
        let rc = unsafe {
            ffi::sqlite3_prepare_v3(
                self.db,
                sql.as_ptr(),
                -1,
                ffi::SQLITE_PREPARE_PERSISTENT,
                &mut statement,
                ptr::null_mut(),
            )
        };
        if rc != ffi::SQLITE_OK {
            return Err(self.error(rc));
        }
        Ok(statement)
    }

    /// The error SQLite reports for `rc`, with its message.
    fn error(&self, rc: c_int) -> StoreError {
        // SAFETY: SQLite's message for the connection's last error is a
        // NUL-terminated string it owns until the next call; it is copied
        // at once. A null connection (out of memory at open) has none.
        let message = unsafe {
            let text = ffi::sqlite3_errmsg(self.db);
            if text.is_null() {
                CStr::from_ptr(ffi::sqlite3_errstr(rc))
            } else {
                CStr::from_ptr(text)
            }
            .to_string_lossy()
            .into_owned()
        };
        StoreError::Native { code: rc, message }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // SAFETY: the statements and the connection are used no more;
        // finalizing a null statement is a no-op, and close takes a
        // null connection.
        unsafe {
            for statement in [
                self.insert_block,
                self.read_block,
                self.insert_run,
                self.delete_blocks,
                self.delete_run,
                self.load_runs,
                self.count_rows,
                self.read_rows,
                self.read_epoch,
                self.bump_epoch,
            ] {
                ffi::sqlite3_finalize(statement);
            }
            ffi::sqlite3_close(self.db);
        }
    }
}
