//! Reading a topic beside a running writer.

use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::log::{LogReader, Polled, ReadError, StartAt, StoredRecord};

use super::*;

/// Reads a topic of the embedded log, beside a running writer.
pub struct EmbeddedReader {
    pub(super) topic: std::sync::Arc<str>,
    pub(super) topic_dir: PathBuf,
    pub(super) start: StartAt,
    /// Opened once the topic exists.
    pub(super) partitions: Vec<PartitionReader>,
    pub(super) next_partition: usize,
    /// How often a poll has looked at the files: a reader in the writer's
    /// process looks again only when woken.
    pub(super) looks: u64,
}

pub(super) struct PartitionReader {
    pub(super) partition: i32,
    pub(super) path: PathBuf,
    pub(super) position: u64,
    /// How far the file is synced, when this process writes it.
    pub(super) synced: Option<Arc<AtomicU64>>,
    pub(super) scanner: Option<FrameScanner<BufReader<File>>>,
    /// Records below this offset are read past, not returned (a seek).
    pub(super) skip_below: i64,
    /// The offset after the last record read.
    pub(super) next_offset: i64,
    /// Whether the last read reached the end of the file.
    pub(super) at_end: bool,
}

impl EmbeddedReader {
    pub fn open(dir: &Path, topic: &str, start: StartAt) -> Result<EmbeddedReader, ReadError> {
        let mut reader = EmbeddedReader {
            topic: topic.into(),
            topic_dir: dir.join(topic),
            start,
            partitions: Vec::new(),
            next_partition: 0,
            looks: 0,
        };
        reader.open_partitions()?;
        Ok(reader)
    }

    pub(super) fn error(&self, reason: impl ToString) -> ReadError {
        ReadError {
            topic: self.topic.to_string(),
            reason: reason.to_string(),
        }
    }

    /// Opens the partitions once the topic exists (a writer may create it
    /// after the reader starts).
    pub(super) fn open_partitions(&mut self) -> Result<(), ReadError> {
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
    pub(super) fn read_available(
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
                                topic: self.topic.to_string(),
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
                    topic: self.topic.to_string(),
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
                            key: frame.key.map(Into::into),
                            value: frame.value.into(),
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
