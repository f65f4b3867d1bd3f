//! SQLite's message-id claims, written through SQLite's own C API.
//!
//! A backlog claims every id it counts in one write when its hold ends
//! (880,000 in the million-event bench), and through sqlx's `Any` driver
//! each claim costs as much again as SQLite's B-tree work: every text is
//! copied into an `Arc<String>` and again by SQLite (bound as transient),
//! and every statement is bound anew from an argument list. Here a
//! connection of its own keeps the insert prepared and binds the ids
//! where they lie, for as long as the statement runs.
//!
//! Only the common case is written here: every id new. When one was
//! claimed before (a retry, an id given twice), the write is rolled back
//! and [`super::Store::claim_metric_ids`] claims the batch the long way,
//! which also reads the ids' first records.

use std::ffi::{CStr, CString, c_int};
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::{Arc, Mutex};

use libsqlite3_sys as ffi;

use super::StoreError;

/// Claims a statement: SQLite's B-tree takes the rows of one statement
/// as fast as those of a larger one (100,000 claims among 100,000: 117 ms
/// at 64 rows, 127 ms at 499), and a smaller statement leaves fewer
/// claims to insert one by one at a batch's end.
const ROWS: usize = 64;

/// The claims' connection, opened on first use (after the pool has
/// created the file and run the migrations).
#[derive(Debug)]
pub(super) struct NativeClaims {
    path: PathBuf,
    connection: Mutex<State>,
}

#[derive(Debug)]
enum State {
    Unopened,
    Open(Connection),
    /// The store was closed: claims go the long way, whose pool says so.
    Closed,
}

impl NativeClaims {
    pub(super) fn new(path: &Path) -> NativeClaims {
        NativeClaims {
            path: path.to_owned(),
            connection: Mutex::new(State::Unopened),
        }
    }

    /// Closes the connection (the store is closing); claims made after
    /// it are left to the pool, closed too. On a blocking thread: the last
    /// connection to close checkpoints the WAL.
    pub(super) async fn close(self: &Arc<Self>) {
        let native = self.clone();
        // Interrupted only as the runtime shuts down, when nothing is
        // left to claim.
        let _ = on_blocking_thread(move || {
            *native.connection.lock().unwrap_or_else(|e| e.into_inner()) = State::Closed;
        })
        .await;
    }

    /// Claims `claims` for `processor` in one transaction when every id
    /// is new: `Ok(true)`. `Ok(false)` when an id was claimed before (by
    /// an earlier batch or earlier in `claims`), or the store is closed:
    /// nothing is written then.
    /// SQLite works on a blocking thread (which also waits out another
    /// writer of the file, up to the busy timeout), on a copy of the
    /// claims: blocking the caller's instead would stall the runtime,
    /// and with it a task that holds the write lock this one waits for.
    pub(super) async fn claim_all_new(
        self: &Arc<Self>,
        processor: &str,
        claims: &[(&str, i32, i64, i64)],
    ) -> Result<bool, StoreError> {
        let native = self.clone();
        let processor = processor.to_owned();
        let owned = OwnedClaims::of(claims);
        on_blocking_thread(move || native.claim_blocking(&processor, &owned.claims())).await?
    }

    fn claim_blocking(
        &self,
        processor: &str,
        claims: &[(&str, i32, i64, i64)],
    ) -> Result<bool, StoreError> {
        let mut state = self.connection.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(*state, State::Unopened) {
            *state = State::Open(Connection::open(&self.path)?);
        }
        let State::Open(connection) = &mut *state else {
            return Ok(false);
        };
        let outcome = connection.claim_all_new(processor, claims);
        // Whatever happened, no statement may keep a pointer into
        // `claims`, and no transaction may stay open.
        connection.settle(outcome.as_ref().is_ok_and(|all_new| *all_new))?;
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

/// One SQLite connection and its two prepared inserts.
#[derive(Debug)]
struct Connection {
    db: *mut ffi::sqlite3,
    /// [`ROWS`] claims a statement.
    rows: *mut ffi::sqlite3_stmt,
    /// One claim a statement, for a batch's last few.
    one: *mut ffi::sqlite3_stmt,
}

// SAFETY: a connection opened with SQLITE_OPEN_NOMUTEX may be used from
// any thread, one at a time; the `Mutex` in `NativeClaims` sees to that,
// and the statements are only used with their connection.
unsafe impl Send for Connection {}

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
        let mut connection = Connection {
            db,
            rows: ptr::null_mut(),
            one: ptr::null_mut(),
        };
        if rc != ffi::SQLITE_OK {
            return Err(connection.error(rc));
        }
        for pragma in super::SQLITE_PRAGMAS {
            connection.execute(pragma)?;
        }
        connection.rows = connection.prepare(&insert(ROWS))?;
        connection.one = connection.prepare(&insert(1))?;
        Ok(connection)
    }

    /// See [`NativeClaims::claim_all_new`]; leaves the transaction open.
    fn claim_all_new(
        &mut self,
        processor: &str,
        claims: &[(&str, i32, i64, i64)],
    ) -> Result<bool, StoreError> {
        self.execute("BEGIN IMMEDIATE")?;
        let mut chunks = claims.chunks_exact(ROWS);
        for chunk in chunks.by_ref() {
            if !self.insert(self.rows, processor, chunk)? {
                return Ok(false);
            }
        }
        for claim in chunks.remainder() {
            if !self.insert(self.one, processor, std::slice::from_ref(claim))? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Runs `statement` (one row a claim) for `claims`: whether every
    /// claim went in.
    fn insert(
        &self,
        statement: *mut ffi::sqlite3_stmt,
        processor: &str,
        claims: &[(&str, i32, i64, i64)],
    ) -> Result<bool, StoreError> {
        let bound = |rc: c_int| match rc {
            ffi::SQLITE_OK => Ok(()),
            rc => Err(self.error(rc)),
        };
        // SAFETY: `statement` is one of this connection's, with a
        // parameter for the processor and four for each of `claims`. The
        // texts are bound SQLITE_STATIC: they outlive its run, and
        // `settle` clears the bindings before `claims` can go.
        unsafe {
            bound(bind_text(statement, 1, processor))?;
            for (i, (id, partition, offset, received_at)) in claims.iter().enumerate() {
                let at = 2 + 4 * i as c_int;
                bound(bind_text(statement, at, id))?;
                bound(ffi::sqlite3_bind_int(statement, at + 1, *partition))?;
                bound(ffi::sqlite3_bind_int64(statement, at + 2, *offset))?;
                bound(ffi::sqlite3_bind_int64(statement, at + 3, *received_at))?;
            }
        }
        // SAFETY: the statement is bound whole. Its error is read before
        // the reset, which keeps the bindings and readies it for the next
        // run.
        unsafe {
            let rc = ffi::sqlite3_step(statement);
            let failed = (rc != ffi::SQLITE_DONE).then(|| self.error(rc));
            ffi::sqlite3_reset(statement);
            if let Some(error) = failed {
                return Err(error);
            }
        }
        // SAFETY: a plain read of the connection's last count.
        let inserted = unsafe { ffi::sqlite3_changes64(self.db) };
        Ok(inserted == claims.len() as i64)
    }

    /// Ends the write: commits it when `commit`, else rolls back what
    /// is open; clears the bindings.
    fn settle(&mut self, commit: bool) -> Result<(), StoreError> {
        // SAFETY: the statements are this connection's (or null, which
        // SQLite ignores).
        unsafe {
            ffi::sqlite3_clear_bindings(self.rows);
            ffi::sqlite3_clear_bindings(self.one);
        }
        // SAFETY: a plain read of the connection's state.
        if unsafe { ffi::sqlite3_get_autocommit(self.db) } != 0 {
            return Ok(());
        }
        if commit {
            match self.execute("COMMIT") {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let _ = self.execute("ROLLBACK");
                    return Err(e);
                }
            }
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
            ffi::sqlite3_finalize(self.rows);
            ffi::sqlite3_finalize(self.one);
            ffi::sqlite3_close(self.db);
        }
    }
}

/// Binds `text` to parameter `at` of `statement` without a copy.
///
/// # Safety
///
/// `text` must stay where it is until the parameter is bound anew, the
/// bindings are cleared or the statement is finalized.
unsafe fn bind_text(statement: *mut ffi::sqlite3_stmt, at: c_int, text: &str) -> c_int {
    // SAFETY: the caller keeps `text` alive; its length is given, so it
    // needs no NUL.
    unsafe {
        ffi::sqlite3_bind_text64(
            statement,
            at,
            text.as_ptr().cast(),
            text.len() as u64,
            ffi::SQLITE_STATIC(),
            ffi::SQLITE_UTF8 as u8,
        )
    }
}

/// The insert of `rows` claims a statement, the processor its first
/// parameter. (`WHERE true` tells SQLite's parser that `ON` starts the
/// upsert, not a join.)
fn insert(rows: usize) -> String {
    let values: Vec<&str> = vec!["(?, ?, ?, ?)"; rows];
    format!(
        "INSERT INTO metric_seen (processor, message_id, partition, record_offset, received_at) \
         SELECT ?1, column1, column2, column3, column4 FROM (VALUES {}) WHERE true \
         ON CONFLICT DO NOTHING",
        values.join(", ")
    )
}
