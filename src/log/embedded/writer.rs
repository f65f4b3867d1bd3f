//! The one writer thread: group commit of queued appends.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::mpsc;

use crate::log::AppendError;
use crate::log::partitioner::partition_for_key;

use super::*;

/// Appends waiting for the writer; a full queue makes appends wait, and the
/// ingest timeout turns a long wait into 503.
pub(super) const QUEUE_REQUESTS: usize = 4096;
/// Most appends committed with one fsync round.
pub(super) const MAX_GROUP: usize = 1024;

/// A record's timestamp: when the writer appends it.
pub(super) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub(super) fn run_writer(
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

/// Writes every request of `group`, fsyncs each touched partition once,
/// then answers them all.
pub(super) fn commit_group(
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

pub(super) fn write_and_sync(
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
pub(super) fn roll_back(files: &mut TopicFiles, touched: &[(String, usize)]) -> bool {
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
