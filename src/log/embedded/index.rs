//! The sparse index of a partition: an entry every [`INDEX_EVERY`]th
//! record, a hint for readers that seek.

use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::*;

/// Records between two entries of a partition's sparse index.
pub const INDEX_EVERY: u64 = 1024;

/// Appends an index entry for the frame of `offset` at byte `position`.
pub(super) fn index_entry(buf: &mut Vec<u8>, offset: u64, position: u64) {
    buf.extend_from_slice(&offset.to_le_bytes());
    buf.extend_from_slice(&position.to_le_bytes());
}

pub(super) fn index_path(partition_path: &Path) -> PathBuf {
    partition_path.with_extension("index")
}

/// The byte position of the last indexed frame at or before `target`,
/// if the partition's index has one and the frame there is that record.
pub(super) fn indexed_position(partition_path: &Path, target: i64) -> Option<u64> {
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
