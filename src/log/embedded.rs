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

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use super::partitioner::partition_for_key;
use super::{AppendError, EventLog, LogReader, Polled, ReadError, Record, StartAt, StoredRecord};

const HEADER_LEN: usize = 8;
const FIXED_BODY_LEN: usize = 8 + 8 + 4;
/// Larger frames are treated as corruption; no accepted request comes near.
const MAX_FRAME: usize = 64 * 1024 * 1024;
/// Appends waiting for the writer; a full queue makes appends wait, and the
/// ingest timeout turns a long wait into 503.
const QUEUE_REQUESTS: usize = 4096;
/// Most appends committed with one fsync round.
const MAX_GROUP: usize = 1024;

/// Records between two entries of a partition's sparse index.
pub const INDEX_EVERY: u64 = 1024;

/// Appends an index entry for the frame of `offset` at byte `position`.
fn index_entry(buf: &mut Vec<u8>, offset: u64, position: u64) {
    buf.extend_from_slice(&offset.to_le_bytes());
    buf.extend_from_slice(&position.to_le_bytes());
}

fn index_path(partition_path: &Path) -> PathBuf {
    partition_path.with_extension("index")
}

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

/// The writer's open partitions, by topic.
struct TopicFiles {
    dir: PathBuf,
    default_partitions: i32,
    topics: HashMap<String, Topic>,
}

struct Topic {
    partitions: Vec<Partition>,
    /// Next partition for records without a key.
    round_robin: usize,
}

/// The synced length of each partition file this process writes, by its
/// canonical path. Readers in this process stop there: a frame written
/// but not yet synced is not read, so no processor commits an event a
/// power loss could still take from the log (and the store's offsets can
/// never get ahead of the log's). Readers in another process (`events
/// tail`) find no entry and read what is in the file.
static SYNCED: LazyLock<Mutex<HashMap<PathBuf, Arc<AtomicU64>>>> = LazyLock::new(Default::default);

/// Woken after every group a writer of this process syncs, so this
/// process's readers wait for new records instead of looking again on a
/// timer (readers of another process's log still look every 20 ms).
static SYNCED_NOW: LazyLock<tokio::sync::Notify> = LazyLock::new(tokio::sync::Notify::new);

/// `path` with its directory made canonical (the file may not exist yet).
fn synced_key(path: &Path) -> PathBuf {
    path.parent()
        .and_then(|dir| dir.canonicalize().ok())
        .zip(path.file_name())
        .map_or_else(|| path.to_owned(), |(dir, name)| dir.join(name))
}

/// The synced length of the file at `path`, when this process writes it.
fn synced_len(path: &Path) -> Option<Arc<AtomicU64>> {
    let registry = SYNCED.lock().unwrap_or_else(|e| e.into_inner());
    registry.get(&synced_key(path)).cloned()
}

struct Partition {
    path: PathBuf,
    /// Shared with the fsync threads ([`Syncer`]).
    file: Arc<File>,
    next_offset: u64,
    len: u64,
    /// `len` for this process's readers, updated after each sync.
    synced: Arc<AtomicU64>,
    /// Frames encoded in the current group, not yet written.
    pending: Vec<u8>,
    pending_records: u64,
    /// The sparse index, and its entries for the pending frames.
    index: File,
    pending_index: Vec<u8>,
}

impl TopicFiles {
    fn new(dir: PathBuf, default_partitions: i32) -> TopicFiles {
        TopicFiles {
            dir,
            default_partitions,
            topics: HashMap::new(),
        }
    }

    fn get_or_open(&mut self, topic: &str) -> Result<&mut Topic, EmbeddedError> {
        if !self.topics.contains_key(topic) {
            let opened = open_topic(&self.dir, topic, self.default_partitions)?;
            self.topics.insert(topic.to_owned(), opened);
        }
        Ok(self.topics.get_mut(topic).expect("inserted above"))
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TopicMeta {
    partitions: i32,
}

fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn open_topic(dir: &Path, topic: &str, default_partitions: i32) -> Result<Topic, EmbeddedError> {
    if !valid_topic_name(topic) {
        return Err(EmbeddedError::Damaged {
            path: dir.to_owned(),
            reason: format!("`{topic}` is not a valid topic name"),
        });
    }
    let topic_dir = dir.join(topic);
    std::fs::create_dir_all(&topic_dir).map_err(io_err(&topic_dir))?;
    let meta_path = topic_dir.join("topic.json");
    let partitions = match std::fs::read(&meta_path) {
        Ok(bytes) => {
            let meta: TopicMeta =
                serde_json::from_slice(&bytes).map_err(|e| EmbeddedError::Damaged {
                    path: meta_path.clone(),
                    reason: e.to_string(),
                })?;
            if meta.partitions != default_partitions {
                tracing::warn!(
                    topic,
                    existing = meta.partitions,
                    configured = default_partitions,
                    "topic {topic} keeps its {} partitions; --partitions applies only to new topics",
                    meta.partitions
                );
            }
            meta.partitions
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let bytes = serde_json::to_vec(&TopicMeta {
                partitions: default_partitions,
            })
            .map_err(|e| io_err(&meta_path)(e.into()))?;
            std::fs::write(&meta_path, bytes).map_err(io_err(&meta_path))?;
            sync_dir(&topic_dir)?;
            sync_dir(dir)?;
            default_partitions
        }
        Err(e) => return Err(io_err(&meta_path)(e)),
    };
    let mut parts = Vec::with_capacity(partitions as usize);
    for p in 0..partitions {
        parts.push(open_partition(&partition_path(&topic_dir, p))?);
    }
    Ok(Topic {
        partitions: parts,
        round_robin: 0,
    })
}

fn partition_path(topic_dir: &Path, partition: i32) -> PathBuf {
    topic_dir.join(format!("{partition:05}.log"))
}

fn sync_dir(dir: &Path) -> Result<(), EmbeddedError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Opens a partition file, scans it, and cuts off a torn or corrupt tail.
fn open_partition(path: &Path) -> Result<Partition, EmbeddedError> {
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(io_err(path))?;
    let file_len = file.metadata().map_err(io_err(path))?.len();
    let mut scanner = FrameScanner::new(BufReader::with_capacity(1 << 20, &file), 0);
    let mut next_offset = 0u64;
    let mut index = Vec::new();
    let mut start = 0;
    // Up to the first frame that is not whole (the torn tail, if any).
    while let Scan::Frame(frame) = scanner.next_frame().map_err(io_err(path))? {
        if frame.offset.is_multiple_of(INDEX_EVERY) {
            index_entry(&mut index, frame.offset, start);
        }
        start = scanner.position;
        if frame.offset != next_offset {
            return Err(EmbeddedError::Damaged {
                path: path.to_owned(),
                reason: format!(
                    "offset {} follows {} at byte {}",
                    frame.offset,
                    next_offset.wrapping_sub(1),
                    scanner.position
                ),
            });
        }
        next_offset += 1;
    }
    let valid_len = scanner.position;
    if valid_len < file_len {
        tracing::warn!(
            path = %path.display(),
            cut_bytes = file_len - valid_len,
            "recovered {}: cut off {} bytes of an unfinished write (never acknowledged to a client)",
            path.display(),
            file_len - valid_len
        );
        file.set_len(valid_len).map_err(io_err(path))?;
        file.sync_all().map_err(io_err(path))?;
    }
    let index_file = index_path(path);
    std::fs::write(&index_file, &index).map_err(io_err(&index_file))?;
    let index = OpenOptions::new()
        .append(true)
        .open(&index_file)
        .map_err(io_err(&index_file))?;
    let synced = Arc::new(AtomicU64::new(valid_len));
    SYNCED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(synced_key(path), synced.clone());
    Ok(Partition {
        path: path.to_owned(),
        file: Arc::new(file),
        next_offset,
        len: valid_len,
        synced,
        pending: Vec::new(),
        pending_records: 0,
        index,
        pending_index: Vec::new(),
    })
}

fn encode_frame(
    buf: &mut Vec<u8>,
    offset: u64,
    timestamp_ms: i64,
    key: Option<&[u8]>,
    value: &[u8],
) {
    let key_len = key.map_or(0, <[u8]>::len);
    let body_len = FIXED_BODY_LEN + key_len + value.len();
    let start = buf.len();
    buf.extend_from_slice(&(body_len as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    let body_start = buf.len();
    buf.extend_from_slice(&offset.to_le_bytes());
    buf.extend_from_slice(&timestamp_ms.to_le_bytes());
    match key {
        Some(k) => {
            buf.extend_from_slice(&(k.len() as i32).to_le_bytes());
            buf.extend_from_slice(k);
        }
        None => buf.extend_from_slice(&(-1i32).to_le_bytes()),
    }
    buf.extend_from_slice(value);
    let crc = crc32fast::hash(&buf[body_start..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn run_writer(
    mut files: TopicFiles,
    mut queue: mpsc::Receiver<AppendRequest>,
    broken: Arc<AtomicBool>,
) {
    let syncer = Syncer::start();
    let mut group: Vec<AppendRequest> = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = queue.blocking_recv() {
        group.push(first);
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        commit_group(&mut files, &mut group, &broken, &syncer);
    }
}

/// Threads that fsync files side by side: each fsync takes a disk round
/// trip, and in series a group touching every partition waits for all of
/// them. The threads live as long as the writer (a thread started for
/// each fsync of each group cost about a tenth of the machine).
struct Syncer {
    jobs: std::sync::mpsc::Sender<SyncJob>,
}

type SyncJob = (Arc<File>, std::sync::mpsc::Sender<std::io::Result<()>>);

/// fsyncs one group can run at once (the default partition count).
const SYNC_THREADS: usize = 8;

impl Syncer {
    fn start() -> Syncer {
        let (jobs, queue) = std::sync::mpsc::channel::<SyncJob>();
        let queue = Arc::new(std::sync::Mutex::new(queue));
        for _ in 0..SYNC_THREADS {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new()
                .name("embedded-log-sync".into())
                .spawn(move || {
                    loop {
                        // The writer is gone when the queue closes.
                        let job = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok((file, done)) = job else { break };
                        let _ = done.send(file.sync_data());
                    }
                });
            if let Err(e) = spawned {
                // Fewer threads (or none: the writer syncs itself) is slower,
                // not wrong.
                tracing::warn!("cannot start an fsync thread for the embedded log: {e}");
            }
        }
        Syncer { jobs }
    }

    /// fsyncs `files`, at once where threads are free; the first error.
    fn sync_all(&self, files: Vec<Arc<File>>) -> std::io::Result<()> {
        if let [file] = files.as_slice() {
            return file.sync_data();
        }
        let (done, results) = std::sync::mpsc::channel();
        let mut waiting = 0;
        for file in files {
            match self.jobs.send((file, done.clone())) {
                Ok(()) => waiting += 1,
                // No thread to take it: sync here.
                Err(std::sync::mpsc::SendError((file, _))) => file.sync_data()?,
            }
        }
        drop(done);
        let mut outcome = Ok(());
        for _ in 0..waiting {
            let result = results
                .recv()
                .unwrap_or_else(|_| Err(std::io::Error::other("an fsync thread stopped")));
            if outcome.is_ok() {
                outcome = result;
            }
        }
        outcome
    }
}

/// Writes every request of `group`, fsyncs each touched partition once,
/// then answers them all.
fn commit_group(
    files: &mut TopicFiles,
    group: &mut Vec<AppendRequest>,
    broken: &AtomicBool,
    syncer: &Syncer,
) {
    if broken.load(Ordering::Relaxed) {
        for request in group.drain(..) {
            let _ = request.done.send(Err(AppendError::Unavailable(
                "the embedded log failed a write it could not undo; restart Traitline".into(),
            )));
        }
        return;
    }
    let timestamp_ms = now_ms();
    let mut outcomes: Vec<Result<(), AppendError>> = Vec::with_capacity(group.len());
    let mut touched: Vec<(String, usize)> = Vec::new();
    for request in group.iter() {
        let topic = match files.get_or_open(&request.topic) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!("{e}");
                outcomes.push(Err(AppendError::Rejected(format!(
                    "cannot open topic {}",
                    request.topic
                ))));
                continue;
            }
        };
        let partition_count = topic.partitions.len();
        for record in &request.records {
            let p = match &record.key {
                Some(key) => partition_for_key(key.as_bytes(), partition_count as i32) as usize,
                None => {
                    topic.round_robin = (topic.round_robin + 1) % partition_count;
                    topic.round_robin
                }
            };
            let part = &mut topic.partitions[p];
            if part.pending.is_empty() {
                touched.push((request.topic.clone(), p));
            }
            let offset = part.next_offset + part.pending_records;
            if offset.is_multiple_of(INDEX_EVERY) {
                let position = part.len + part.pending.len() as u64;
                index_entry(&mut part.pending_index, offset, position);
            }
            encode_frame(
                &mut part.pending,
                offset,
                timestamp_ms,
                record.key.as_deref().map(str::as_bytes),
                &record.value,
            );
            part.pending_records += 1;
        }
        outcomes.push(Ok(()));
    }

    let written = write_and_sync(files, &touched, syncer);
    if let Err(e) = &written {
        tracing::error!(
            "the embedded log could not store a write of {} requests: {e}; they were answered 503 and may be retried",
            group.len()
        );
        if !roll_back(files, &touched) {
            broken.store(true, Ordering::Relaxed);
        }
    }
    for (request, outcome) in group.drain(..).zip(outcomes) {
        let outcome = match (&written, outcome) {
            (Err(e), Ok(())) => Err(AppendError::Unavailable(format!("disk write failed: {e}"))),
            (_, outcome) => outcome,
        };
        let _ = request.done.send(outcome);
    }
}

fn write_and_sync(
    files: &mut TopicFiles,
    touched: &[(String, usize)],
    syncer: &Syncer,
) -> std::io::Result<()> {
    for (topic, p) in touched {
        let part = &mut files
            .topics
            .get_mut(topic)
            .expect("touched topics are open")
            .partitions[*p];
        (&*part.file).write_all(&part.pending)?;
    }
    syncer.sync_all(
        touched
            .iter()
            .map(|(topic, p)| files.topics[topic].partitions[*p].file.clone())
            .collect(),
    )?;
    for (topic, p) in touched {
        let part = &mut files
            .topics
            .get_mut(topic)
            .expect("touched topics are open")
            .partitions[*p];
        part.len += part.pending.len() as u64;
        part.synced.store(part.len, Ordering::Release);
        part.next_offset += part.pending_records;
        part.pending.clear();
        part.pending_records = 0;
        if !part.pending_index.is_empty() {
            // A hint: readers check it, so a failure here costs speed only.
            if let Err(e) = part.index.write_all(&part.pending_index) {
                tracing::warn!(path = %part.path.display(), "cannot extend the partition index: {e}");
            }
            part.pending_index.clear();
        }
    }
    SYNCED_NOW.notify_waiters();
    Ok(())
}

/// Undoes a failed group: cuts every touched file back to its last durable
/// length. Returns false when that fails too.
fn roll_back(files: &mut TopicFiles, touched: &[(String, usize)]) -> bool {
    let mut ok = true;
    for (topic, p) in touched {
        let part = &mut files
            .topics
            .get_mut(topic)
            .expect("touched topics are open")
            .partitions[*p];
        if !part.pending.is_empty() {
            if let Err(e) = part
                .file
                .set_len(part.len)
                .and_then(|_| part.file.sync_all())
            {
                tracing::error!(path = %part.path.display(), "cannot undo a failed write: {e}");
                ok = false;
            }
            part.pending.clear();
            part.pending_records = 0;
            part.pending_index.clear();
        }
    }
    ok
}

struct Frame {
    offset: u64,
    timestamp_ms: i64,
    key: Option<Vec<u8>>,
    value: Vec<u8>,
}

enum Scan {
    Frame(Frame),
    /// Clean end of file.
    End,
    /// A frame that is not all there yet (being written, or torn).
    Partial,
    /// A frame whose checksum or lengths are wrong.
    Corrupt,
}

/// Reads frames one after another from a byte position.
struct FrameScanner<R> {
    reader: R,
    position: u64,
    body: Vec<u8>,
}

impl<R: Read> FrameScanner<R> {
    fn new(reader: R, position: u64) -> Self {
        FrameScanner {
            reader,
            position,
            body: Vec::new(),
        }
    }

    /// The next frame; on `Partial` or `Corrupt` the position stays at the
    /// start of that frame (the reader must be re-seeked to retry).
    fn next_frame(&mut self) -> std::io::Result<Scan> {
        let mut header = [0u8; HEADER_LEN];
        let got = read_full(&mut self.reader, &mut header)?;
        if got == 0 {
            return Ok(Scan::End);
        }
        if got < HEADER_LEN {
            return Ok(Scan::Partial);
        }
        let body_len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        if !(FIXED_BODY_LEN..=MAX_FRAME).contains(&body_len) {
            return Ok(Scan::Corrupt);
        }
        self.body.resize(body_len, 0);
        if read_full(&mut self.reader, &mut self.body)? < body_len {
            return Ok(Scan::Partial);
        }
        if crc32fast::hash(&self.body) != crc {
            return Ok(Scan::Corrupt);
        }
        let b = &self.body;
        let offset = u64::from_le_bytes(b[0..8].try_into().expect("8 bytes"));
        let timestamp_ms = i64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
        let key_len = i32::from_le_bytes(b[16..20].try_into().expect("4 bytes"));
        let rest = &b[FIXED_BODY_LEN..];
        let (key, value) = if key_len < 0 {
            (None, rest.to_vec())
        } else {
            let key_len = key_len as usize;
            if key_len > rest.len() {
                return Ok(Scan::Corrupt);
            }
            (Some(rest[..key_len].to_vec()), rest[key_len..].to_vec())
        };
        self.position += (HEADER_LEN + body_len) as u64;
        Ok(Scan::Frame(Frame {
            offset,
            timestamp_ms,
            key,
            value,
        }))
    }
}

fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The byte position of the last indexed frame at or before `target`,
/// if the partition's index has one and the frame there is that record.
fn indexed_position(partition_path: &Path, target: i64) -> Option<u64> {
    let index = std::fs::read(index_path(partition_path)).ok()?;
    let (offset, position) = index
        .chunks_exact(16)
        .map(|e| {
            let offset = u64::from_le_bytes(e[..8].try_into().expect("8 bytes"));
            let position = u64::from_le_bytes(e[8..].try_into().expect("8 bytes"));
            (offset, position)
        })
        .take_while(|(offset, _)| (*offset as i64) <= target)
        .last()?;
    let mut file = File::open(partition_path).ok()?;
    file.seek(SeekFrom::Start(position)).ok()?;
    let mut scanner = FrameScanner::new(BufReader::new(file), position);
    match scanner.next_frame().ok()? {
        Scan::Frame(frame) if frame.offset == offset => Some(position),
        _ => None,
    }
}

/// Reads a topic of the embedded log, beside a running writer.
pub struct EmbeddedReader {
    topic: String,
    topic_dir: PathBuf,
    start: StartAt,
    /// Opened once the topic exists.
    partitions: Vec<PartitionReader>,
    next_partition: usize,
    /// How often a poll has looked at the files: a reader in the writer's
    /// process looks again only when woken.
    looks: u64,
}

struct PartitionReader {
    partition: i32,
    path: PathBuf,
    position: u64,
    /// How far the file is synced, when this process writes it.
    synced: Option<Arc<AtomicU64>>,
    scanner: Option<FrameScanner<BufReader<File>>>,
    /// Records below this offset are read past, not returned (a seek).
    skip_below: i64,
    /// The offset after the last record read.
    next_offset: i64,
    /// Whether the last read reached the end of the file.
    at_end: bool,
}

impl EmbeddedReader {
    pub fn open(dir: &Path, topic: &str, start: StartAt) -> Result<EmbeddedReader, ReadError> {
        let mut reader = EmbeddedReader {
            topic: topic.to_owned(),
            topic_dir: dir.join(topic),
            start,
            partitions: Vec::new(),
            next_partition: 0,
            looks: 0,
        };
        reader.open_partitions()?;
        Ok(reader)
    }

    fn error(&self, reason: impl ToString) -> ReadError {
        ReadError {
            topic: self.topic.clone(),
            reason: reason.to_string(),
        }
    }

    /// Opens the partitions once the topic exists (a writer may create it
    /// after the reader starts).
    fn open_partitions(&mut self) -> Result<(), ReadError> {
        if !self.partitions.is_empty() {
            return Ok(());
        }
        let meta_path = self.topic_dir.join("topic.json");
        let meta: TopicMeta = match std::fs::read(&meta_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| self.error(e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.error(e)),
        };
        for p in 0..meta.partitions {
            let path = partition_path(&self.topic_dir, p);
            let position = match self.start {
                StartAt::Beginning => 0,
                StartAt::End => std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
            };
            self.partitions.push(PartitionReader {
                partition: p,
                path,
                position,
                synced: None,
                scanner: None,
                skip_below: 0,
                next_offset: 0,
                at_end: false,
            });
        }
        Ok(())
    }

    /// Reads what is there now, up to `max` records, fairly across
    /// partitions. Returns whether every partition is at its end.
    fn read_available(
        &mut self,
        max: usize,
        out: &mut Vec<StoredRecord>,
    ) -> Result<bool, ReadError> {
        self.open_partitions()?;
        if self.partitions.is_empty() {
            return Ok(true);
        }
        let count = self.partitions.len();
        let mut at_end = vec![false; count];
        while out.len() < max && at_end.iter().any(|e| !e) {
            let i = self.next_partition;
            self.next_partition = (self.next_partition + 1) % count;
            if at_end[i] {
                continue;
            }
            let part = &mut self.partitions[i];
            if part.scanner.is_none() {
                if part.synced.is_none() {
                    part.synced = synced_len(&part.path);
                }
                match File::open(&part.path) {
                    Ok(mut f) => {
                        f.seek(SeekFrom::Start(part.position))
                            .map_err(|e| ReadError {
                                topic: self.topic.clone(),
                                reason: e.to_string(),
                            })?;
                        part.scanner = Some(FrameScanner::new(
                            BufReader::with_capacity(256 * 1024, f),
                            part.position,
                        ));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        at_end[i] = true;
                        continue;
                    }
                    Err(e) => return Err(self.error(e)),
                }
            }
            let scanner = part.scanner.as_mut().expect("opened above");
            // Read a run from this partition before moving on.
            for _ in 0..64 {
                if out.len() >= max {
                    break;
                }
                match scanner.next_frame().map_err(|e| ReadError {
                    topic: self.topic.clone(),
                    reason: e.to_string(),
                })? {
                    Scan::Frame(_)
                        if part.synced.as_ref().is_some_and(|synced| {
                            scanner.position > synced.load(Ordering::Acquire)
                        }) =>
                    {
                        // Written, not yet synced: read again later.
                        part.scanner = None;
                        part.at_end = true;
                        at_end[i] = true;
                        break;
                    }
                    Scan::Frame(frame) => {
                        part.position = scanner.position;
                        part.next_offset = frame.offset as i64 + 1;
                        part.at_end = false;
                        if (frame.offset as i64) < part.skip_below {
                            continue;
                        }
                        out.push(StoredRecord {
                            topic: self.topic.clone(),
                            partition: part.partition,
                            offset: frame.offset as i64,
                            timestamp_ms: frame.timestamp_ms,
                            key: frame.key,
                            value: frame.value,
                        });
                    }
                    Scan::End | Scan::Partial | Scan::Corrupt => {
                        // Re-open from the last good position next time: the
                        // frame may be mid-write.
                        part.scanner = None;
                        part.at_end = true;
                        at_end[i] = true;
                        break;
                    }
                }
            }
        }
        Ok(at_end.iter().all(|e| *e))
    }
}

#[async_trait]
impl LogReader for EmbeddedReader {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Polled, ReadError> {
        let deadline = Instant::now() + wait;
        let mut records = Vec::new();
        loop {
            // Listening before looking: a sync between the look and the
            // wait still wakes it.
            let synced = SYNCED_NOW.notified();
            tokio::pin!(synced);
            synced.as_mut().enable();
            self.looks += 1;
            let caught_up = self.read_available(max, &mut records)?;
            let now = Instant::now();
            if !records.is_empty() || now >= deadline {
                return Ok(Polled {
                    records,
                    caught_up,
                    reassigned: false,
                });
            }
            let written_here =
                !self.partitions.is_empty() && self.partitions.iter().all(|p| p.synced.is_some());
            if written_here {
                let _ = tokio::time::timeout(deadline - now, synced).await;
            } else {
                // The writer is another process: look again shortly.
                tokio::time::sleep(Duration::from_millis(20).min(deadline - now)).await;
            }
        }
    }

    /// Every partition: an embedded reader reads them all.
    fn assigned(&self) -> Vec<i32> {
        self.partitions.iter().map(|p| p.partition).collect()
    }

    fn seek(&mut self, partition: i32, offset: Option<i64>) -> Result<(), ReadError> {
        self.open_partitions()?;
        let Some(part) = self
            .partitions
            .iter_mut()
            .find(|p| p.partition == partition)
        else {
            return Err(self.error(format!("no partition {partition}")));
        };
        let target = offset.unwrap_or(0);
        // Start at the last indexed frame at or before the target, when
        // the index has one that checks out; else at the file's start.
        // Records below the target are read past.
        part.position = indexed_position(&part.path, target).unwrap_or(0);
        part.scanner = None;
        part.skip_below = target;
        part.at_end = false;
        Ok(())
    }

    fn high_watermark(&self, partition: i32) -> Option<i64> {
        self.partitions
            .iter()
            .find(|p| p.partition == partition && p.at_end)
            .map(|p| p.next_offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader in the writer's process waits for the writer's sync
    /// instead of looking again every 20 ms, and an append wakes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_in_the_writers_process_is_woken_by_its_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let topic = "t".to_owned();
        let log = Arc::new(EmbeddedLog::open(dir.path(), 1, std::slice::from_ref(&topic)).unwrap());
        let record = || Record {
            key: Some("k".into()),
            value: b"v".to_vec(),
        };
        log.append(&topic, vec![record()]).await.unwrap();
        let mut reader = EmbeddedReader::open(dir.path(), &topic, StartAt::Beginning).unwrap();
        let first = reader.poll(10, Duration::ZERO).await.unwrap();
        assert_eq!(first.records.len(), 1);

        let looks = reader.looks;
        let quiet = reader.poll(10, Duration::from_millis(300)).await.unwrap();
        assert!(quiet.records.is_empty());
        // One look, a wait to be woken, one last look at the deadline (a
        // timer would have looked about 15 times).
        assert!(reader.looks - looks <= 2, "{} looks", reader.looks - looks);

        let appending = {
            let log = log.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                log.append("t", vec![record()]).await.unwrap();
            })
        };
        let woken = reader.poll(10, Duration::from_secs(60)).await.unwrap();
        assert_eq!(woken.records.len(), 1, "the append woke the reader");
        appending.await.unwrap();
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_appends_continue_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("00000.log");
        let mut bytes = Vec::new();
        encode_frame(&mut bytes, 0, 1, Some(b"k"), b"first");
        encode_frame(&mut bytes, 1, 1, None, b"second");
        let good = bytes.len();
        encode_frame(&mut bytes, 2, 1, Some(b"k"), b"torn");
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&path, &bytes).unwrap();

        let part = open_partition(&path).unwrap();
        assert_eq!(part.next_offset, 2);
        assert_eq!(part.len, good as u64);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good as u64);
    }

    #[test]
    fn a_corrupt_frame_ends_the_valid_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("00000.log");
        let mut bytes = Vec::new();
        encode_frame(&mut bytes, 0, 1, Some(b"k"), b"first");
        let good = bytes.len();
        encode_frame(&mut bytes, 1, 1, Some(b"k"), b"flipped");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();

        let part = open_partition(&path).unwrap();
        assert_eq!(part.next_offset, 1);
        assert_eq!(part.len, good as u64);
    }

    #[tokio::test]
    async fn readers_in_the_writing_process_stop_at_the_synced_length() {
        let dir = tempfile::tempdir().unwrap();
        let topic = "t".to_owned();
        let log = EmbeddedLog::open(dir.path(), 1, std::slice::from_ref(&topic)).unwrap();
        let record = |value: &str| Record {
            key: None,
            value: value.as_bytes().to_vec(),
        };
        log.append(&topic, vec![record("a"), record("b")])
            .await
            .unwrap();
        // A frame written but not synced, as between a group's write and
        // its fsync.
        let path = dir.path().join("t").join("00000.log");
        let mut unsynced = Vec::new();
        encode_frame(&mut unsynced, 2, 1, None, b"c");
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&unsynced)
            .unwrap();

        let mut reader = EmbeddedReader::open(dir.path(), &topic, StartAt::Beginning).unwrap();
        let read = reader.poll(10, Duration::from_millis(50)).await.unwrap();
        let values: Vec<&[u8]> = read.records.iter().map(|r| r.value.as_slice()).collect();
        assert_eq!(values, [&b"a"[..], b"b"], "the unsynced frame is not read");

        // Synced: now it is.
        let synced = synced_len(&path).unwrap();
        synced.store(std::fs::metadata(&path).unwrap().len(), Ordering::Release);
        let read = reader.poll(10, Duration::from_millis(50)).await.unwrap();
        assert_eq!(read.records.len(), 1);
        assert_eq!(read.records[0].value, b"c");
    }

    #[tokio::test]
    async fn a_seek_starts_at_the_indexed_frame_before_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let topic = "t".to_owned();
        let records = |from: u64, to: u64| {
            (from..to)
                .map(|i| Record {
                    key: Some("one-key".into()),
                    value: format!("v{i}").into_bytes(),
                })
                .collect::<Vec<_>>()
        };
        // Written over two writer lifetimes: the index is rebuilt on open
        // and extended by appends.
        let log = EmbeddedLog::open(dir.path(), 1, std::slice::from_ref(&topic)).unwrap();
        log.append(&topic, records(0, 1500)).await.unwrap();
        log.close(Duration::from_secs(5)).await;
        drop(log);
        let log = EmbeddedLog::open(dir.path(), 1, std::slice::from_ref(&topic)).unwrap();
        log.append(&topic, records(1500, 2600)).await.unwrap();
        let index = std::fs::read(dir.path().join("t").join("00000.index")).unwrap();
        assert_eq!(index.len(), 3 * 16, "entries for offsets 0, 1024 and 2048");

        let mut reader = EmbeddedReader::open(dir.path(), &topic, StartAt::Beginning).unwrap();
        reader.seek(0, Some(2100)).unwrap();
        assert!(
            reader.partitions[0].position > 0,
            "the seek starts at the entry of 2048, not the file start"
        );
        let polled = reader.poll(10, Duration::from_secs(1)).await.unwrap();
        assert_eq!(polled.records[0].offset, 2100);
        assert_eq!(polled.records[0].value, b"v2100");

        // An entry that points at the wrong place is not trusted: the
        // seek reads from the start and still lands right.
        let mut wrong = Vec::new();
        index_entry(&mut wrong, 1024, 5);
        std::fs::write(dir.path().join("t").join("00000.index"), wrong).unwrap();
        reader.seek(0, Some(1030)).unwrap();
        assert_eq!(reader.partitions[0].position, 0);
        let polled = reader.poll(1, Duration::from_secs(1)).await.unwrap();
        assert_eq!(polled.records[0].offset, 1030);
    }

    #[test]
    fn frames_round_trip_with_and_without_keys() {
        let mut bytes = Vec::new();
        encode_frame(&mut bytes, 7, 42, Some(b"user-1"), b"{\"a\":1}");
        encode_frame(&mut bytes, 8, 43, None, b"");
        let mut scanner = FrameScanner::new(&bytes[..], 0);
        let Scan::Frame(a) = scanner.next_frame().unwrap() else {
            panic!("frame expected")
        };
        assert_eq!(
            (
                a.offset,
                a.timestamp_ms,
                a.key.as_deref(),
                a.value.as_slice()
            ),
            (7, 42, Some(&b"user-1"[..]), &b"{\"a\":1}"[..])
        );
        let Scan::Frame(b) = scanner.next_frame().unwrap() else {
            panic!("frame expected")
        };
        assert_eq!((b.offset, b.key, b.value.len()), (8, None, 0));
        assert!(matches!(scanner.next_frame().unwrap(), Scan::End));
    }
}
