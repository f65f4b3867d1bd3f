//! The writer's files: topics, their partitions, and the synced length of
//! each that this process's readers stop at.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, LazyLock, Mutex};

use super::*;

/// The writer's open partitions, by topic.
pub(super) struct TopicFiles {
    pub(super) dir: PathBuf,
    pub(super) default_partitions: i32,
    pub(super) topics: HashMap<String, Topic>,
}

pub(super) struct Topic {
    pub(super) partitions: Vec<Partition>,
    /// Next partition for records without a key.
    pub(super) round_robin: usize,
}

/// The synced length of each partition file this process writes, by its
/// canonical path. Readers in this process stop there: a frame written
/// but not yet synced is not read, so no processor commits an event a
/// power loss could still take from the log (and the store's offsets can
/// never get ahead of the log's). Readers in another process (`events
/// tail`) find no entry and read what is in the file.
pub(super) static SYNCED: LazyLock<Mutex<HashMap<PathBuf, Arc<AtomicU64>>>> =
    LazyLock::new(Default::default);

/// Woken after every group a writer of this process syncs, so this
/// process's readers wait for new records instead of looking again on a
/// timer (readers of another process's log still look every 20 ms).
pub(super) static SYNCED_NOW: LazyLock<tokio::sync::Notify> =
    LazyLock::new(tokio::sync::Notify::new);

/// `path` with its directory made canonical (the file may not exist yet).
pub(super) fn synced_key(path: &Path) -> PathBuf {
    path.parent()
        .and_then(|dir| dir.canonicalize().ok())
        .zip(path.file_name())
        .map_or_else(|| path.to_owned(), |(dir, name)| dir.join(name))
}

/// The synced length of the file at `path`, when this process writes it.
pub(super) fn synced_len(path: &Path) -> Option<Arc<AtomicU64>> {
    let registry = SYNCED.lock().unwrap_or_else(|e| e.into_inner());
    registry.get(&synced_key(path)).cloned()
}

pub(super) struct Partition {
    pub(super) path: PathBuf,
    /// Shared with the fsync threads ([`Syncer`]).
    pub(super) file: Arc<File>,
    pub(super) next_offset: u64,
    pub(super) len: u64,
    /// `len` for this process's readers, updated after each sync.
    pub(super) synced: Arc<AtomicU64>,
    /// Frames encoded in the current group, not yet written.
    pub(super) pending: Vec<u8>,
    pub(super) pending_records: u64,
    /// The sparse index, and its entries for the pending frames.
    pub(super) index: File,
    pub(super) pending_index: Vec<u8>,
}

impl TopicFiles {
    pub(super) fn new(dir: PathBuf, default_partitions: i32) -> TopicFiles {
        TopicFiles {
            dir,
            default_partitions,
            topics: HashMap::new(),
        }
    }

    pub(super) fn get_or_open(&mut self, topic: &str) -> Result<&mut Topic, EmbeddedError> {
        if !self.topics.contains_key(topic) {
            let opened = open_topic(&self.dir, topic, self.default_partitions)?;
            self.topics.insert(topic.to_owned(), opened);
        }
        Ok(self.topics.get_mut(topic).expect("inserted above"))
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct TopicMeta {
    pub(super) partitions: i32,
}

pub(super) fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

pub(super) fn open_topic(
    dir: &Path,
    topic: &str,
    default_partitions: i32,
) -> Result<Topic, EmbeddedError> {
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

pub(super) fn partition_path(topic_dir: &Path, partition: i32) -> PathBuf {
    topic_dir.join(format!("{partition:05}.log"))
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), EmbeddedError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Opens a partition file, scans it, and cuts off a torn or corrupt tail.
pub(super) fn open_partition(path: &Path) -> Result<Partition, EmbeddedError> {
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
