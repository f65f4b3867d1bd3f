//! The embedded log's own tests: frames, recovery, the index, readers.

use super::reader::*;
use super::*;
use std::io::Write;

use crate::log::{EventLog, LogReader, Record, StartAt};

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
    let values: Vec<&[u8]> = read.records.iter().map(|r| &r.value[..]).collect();
    assert_eq!(values, [&b"a"[..], b"b"], "the unsynced frame is not read");

    // Synced: now it is.
    let synced = synced_len(&path).unwrap();
    synced.store(std::fs::metadata(&path).unwrap().len(), Ordering::Release);
    let read = reader.poll(10, Duration::from_millis(50)).await.unwrap();
    assert_eq!(read.records.len(), 1);
    assert_eq!(read.records[0].value, &b"c"[..]);
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
    assert_eq!(polled.records[0].value, &b"v2100"[..]);

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
