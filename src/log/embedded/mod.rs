//! The embedded event log: durable, append-only, in the data directory.
//!
//! Layout: `<dir>/<topic>/topic.json` records the partition count and
//! `<dir>/<topic>/<partition>.log` holds the partition's records as frames:
//!
//! ```text
//! u32 LE  body length
//! u32 LE  CRC-32 of the body
//! body:   u64 LE offset | i64 LE timestamp (ms) | i32 LE key length (-1: no key) | key | value
//! ```
//!
//! One writer thread owns every file. Appends from many requests queue on
//! a bounded channel; the writer takes all that are waiting, writes them,
//! and fsyncs each touched file once (the files in parallel) before it
//! answers any of them (group commit), so concurrent requests share an
//! fsync and no request is answered before its records are on disk. On open, each partition is
//! scanned and a torn or corrupt tail (a crash mid-write) is cut off.
//!
//! `<partition>.index` is a sparse index, a hint for readers that seek: a
//! 16-byte entry (u64 LE offset, u64 LE byte position) for every
//! [`INDEX_EVERY`]th record. The writer rebuilds it from its scan on open
//! and appends to it after each group commit, without fsync; a reader
//! checks the frame an entry points at before trusting it.
//!
//! A process-wide lock file keeps a second writer out; readers
//! ([`EmbeddedReader`]) take no lock and stop at a partial frame.

mod files;
mod frame;
mod index;
mod reader;
mod syncer;
#[cfg(test)]
mod tests;
mod writer;

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use crate::log::{AppendError, EventLog, Record};

use files::*;
use frame::*;
use index::*;
use syncer::*;
use writer::*;

pub use index::INDEX_EVERY;
pub use reader::EmbeddedReader;

/// A log that cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("cannot open the embedded log in {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the embedded log in {0} is in use by another Traitline process; stop it or choose another --data-dir"
    )]
    Locked(PathBuf),
    #[error("the embedded log in {path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> EmbeddedError + '_ {
    move |source| EmbeddedError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The embedded log's writer side. Cheap to share: appends go through a
/// channel to the one writer thread.
pub struct EmbeddedLog {
    dir: PathBuf,
    queue: Mutex<Option<mpsc::Sender<AppendRequest>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Set when the writer could not undo a failed write; appends then fail
    /// until restart, which recovers the files.
    broken: Arc<AtomicBool>,
    _lock: File,
}

struct AppendRequest {
    topic: String,
    records: Vec<Record>,
    done: oneshot::Sender<Result<(), AppendError>>,
}

impl EmbeddedLog {
    /// Opens (creating when missing) the log in `dir` and the given topics,
    /// each with `partitions` partitions unless it exists already.
    pub fn open(
        dir: &Path,
        partitions: i32,
        topics: &[String],
    ) -> Result<EmbeddedLog, EmbeddedError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock_path = dir.join("writer.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(EmbeddedError::Locked(dir.to_owned()));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
        }

        let mut files = TopicFiles::new(dir.to_owned(), partitions);
        for topic in topics {
            files.get_or_open(topic)?;
        }
        let broken = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel(QUEUE_REQUESTS);
        let writer_broken = broken.clone();
        let writer = std::thread::Builder::new()
            .name("embedded-log-writer".into())
            .spawn(move || run_writer(files, rx, writer_broken))
            .map_err(io_err(dir))?;
        Ok(EmbeddedLog {
            dir: dir.to_owned(),
            queue: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            broken,
            _lock: lock,
        })
    }

    fn sender(&self) -> Option<mpsc::Sender<AppendRequest>> {
        self.queue.lock().ok().and_then(|q| q.clone())
    }
}

#[async_trait]
impl EventLog for EmbeddedLog {
    async fn append(&self, topic: &str, records: Vec<Record>) -> Result<(), AppendError> {
        if records.is_empty() {
            return Ok(());
        }
        let Some(queue) = self.sender() else {
            return Err(AppendError::Unavailable("the log is shutting down".into()));
        };
        let (done, answer) = oneshot::channel();
        let request = AppendRequest {
            topic: topic.to_owned(),
            records,
            done,
        };
        queue
            .send(request)
            .await
            .map_err(|_| AppendError::Unavailable("the log writer has stopped".into()))?;
        answer.await.unwrap_or_else(|_| {
            Err(AppendError::Unavailable(
                "the log writer has stopped".into(),
            ))
        })
    }

    async fn check_ready(&self) -> Result<(), String> {
        if self.broken.load(Ordering::Relaxed) {
            return Err(format!(
                "the embedded log in {} failed a write it could not undo; restart to recover it",
                self.dir.display()
            ));
        }
        match self.sender() {
            Some(q) if !q.is_closed() => Ok(()),
            _ => Err("the embedded log is closed".into()),
        }
    }

    async fn close(&self, _deadline: Duration) {
        // Dropping the sender lets the writer finish what is queued and exit.
        if let Ok(mut q) = self.queue.lock() {
            q.take();
        }
        let handle = self.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }

    fn describe(&self) -> String {
        format!("embedded log in {}", self.dir.display())
    }
}
