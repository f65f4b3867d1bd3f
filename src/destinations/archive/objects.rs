//! Which records go into which archive object (pure: no I/O). Each
//! partition fills one object at a time, in offset order, as gzip'd JSON
//! lines; an object closes when it holds `roll_bytes` of lines, when its
//! first record is `roll_after` old, before a record of another hour (an
//! object never spans two `dt=`/`hh=` folders), or exactly where the
//! manifest says an earlier run closed it (so a retry after a crash
//! rewrites the same object, never one that overlaps it).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use flate2::Compression;
use flate2::write::GzEncoder;

const HOUR_MS: i64 = 3_600_000;

/// An object closed and ready to upload.
#[derive(Debug)]
pub struct Closed {
    pub partition: i32,
    pub first: i64,
    pub last: i64,
    pub key: String,
    pub records: u64,
    /// The lines' size before gzip.
    pub raw_bytes: usize,
    pub first_ms: i64,
    /// The gzip'd lines.
    pub body: Vec<u8>,
}

/// An object being filled.
struct Filling {
    first: i64,
    last: i64,
    first_ms: i64,
    opened: Instant,
    records: u64,
    raw_bytes: usize,
    gzip: GzEncoder<Vec<u8>>,
    /// Where an earlier run closed the object that starts here, and its
    /// key: it closes there again, whatever its size or age.
    until: Option<(i64, String)>,
    /// It is to close at once.
    full: bool,
}

/// The objects of one archive, as its records arrive.
pub struct Objects {
    prefix: String,
    roll_bytes: usize,
    roll_after: Duration,
    filling: HashMap<i32, Filling>,
    /// Per partition, the objects closed above the stored position (by
    /// an earlier run, from the manifest, or by this one): first offset
    /// → (last offset, key). An object starting at one of them closes
    /// there again, should its records come again.
    closed: HashMap<i32, BTreeMap<i64, (i64, String)>>,
    /// Records in the objects being filled.
    held: usize,
}

impl Objects {
    pub fn new(prefix: &str, roll_bytes: usize, roll_after: Duration) -> Objects {
        Objects {
            prefix: prefix.to_owned(),
            roll_bytes,
            roll_after,
            filling: HashMap::new(),
            closed: HashMap::new(),
            held: 0,
        }
    }

    /// An object closed before (from the manifest): the one that starts
    /// at `first` closes at `last` again, under `key`.
    pub fn closed_before(&mut self, partition: i32, first: i64, last: i64, key: String) {
        self.closed
            .entry(partition)
            .or_default()
            .insert(first, (last, key));
    }

    /// The stored position of `partition` is `next`: the objects below it
    /// are never read again.
    pub fn passed(&mut self, partition: i32, next: i64) {
        if let Some(ranges) = self.closed.get_mut(&partition) {
            ranges.retain(|_, (last, _)| *last >= next);
        }
    }

    /// Whether `partition` has an object being filled.
    pub fn filling(&self, partition: i32) -> bool {
        self.filling.contains_key(&partition)
    }

    /// Records held in objects being filled.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Adds the record at `offset` (its `line`, or `None` when the filter
    /// leaves it out): the object it closes, if any. The record is in the
    /// closed object when that object's `last` is `offset`, else it is
    /// held in the next one.
    pub fn add(
        &mut self,
        partition: i32,
        offset: i64,
        timestamp_ms: i64,
        line: Option<&[u8]>,
        now: Instant,
    ) -> Option<Closed> {
        let mut closed = None;
        if let Some(filling) = self.filling.get(&partition) {
            let other_hour = filling.until.is_none()
                && timestamp_ms.div_euclid(HOUR_MS) != filling.first_ms.div_euclid(HOUR_MS);
            let past_its_end = filling
                .until
                .as_ref()
                .is_some_and(|(last, _)| offset > *last);
            if other_hour || past_its_end {
                closed = self.close(partition);
            }
        }
        if !self.filling.contains_key(&partition) {
            let until = self
                .closed
                .get(&partition)
                .and_then(|ranges| ranges.get(&offset))
                .cloned();
            self.filling.insert(
                partition,
                Filling {
                    first: offset,
                    last: offset,
                    first_ms: timestamp_ms,
                    opened: now,
                    records: 0,
                    raw_bytes: 0,
                    gzip: GzEncoder::new(Vec::new(), Compression::fast()),
                    until,
                    full: false,
                },
            );
        }
        let filling = self.filling.get_mut(&partition).expect("inserted above");
        filling.last = offset;
        self.held += 1;
        if let Some(line) = line {
            // Writes to a Vec cannot fail.
            let _ = filling.gzip.write_all(line);
            let _ = filling.gzip.write_all(b"\n");
            filling.records += 1;
            filling.raw_bytes += line.len() + 1;
        }
        filling.full = match &filling.until {
            Some((last, _)) => offset >= *last,
            None => filling.raw_bytes >= self.roll_bytes,
        };
        if filling.full && closed.is_none() {
            return self.close(partition);
        }
        // A record closes one object at most: one that closed the object
        // before and fills its own at once leaves it to `due`.
        closed
    }

    /// Objects full, or whose first record is `roll_after` old (not those
    /// an earlier run closed: they wait for their last record), and, while
    /// more than `most_held` records are held, the largest objects.
    pub fn due(&mut self, now: Instant, most_held: usize) -> Vec<Closed> {
        let mut due: Vec<i32> = self
            .filling
            .iter()
            .filter(|(_, f)| {
                f.full || (f.until.is_none() && now.duration_since(f.opened) >= self.roll_after)
            })
            .map(|(&p, _)| p)
            .collect();
        let mut held = self.held - due.iter().map(|p| self.filling[p].held()).sum::<usize>();
        if held > most_held {
            let mut largest: Vec<(usize, i32)> = self
                .filling
                .iter()
                .filter(|(p, f)| f.until.is_none() && !due.contains(p))
                .map(|(&p, f)| (f.held(), p))
                .collect();
            largest.sort_unstable_by(|a, b| b.cmp(a));
            for (count, partition) in largest {
                if held <= most_held / 2 {
                    break;
                }
                due.push(partition);
                held -= count;
            }
        }
        due.into_iter().filter_map(|p| self.close(p)).collect()
    }

    /// Drops what `partition` holds (its records come again).
    pub fn forget(&mut self, partition: i32) {
        if let Some(filling) = self.filling.remove(&partition) {
            self.held -= filling.held();
        }
    }

    fn close(&mut self, partition: i32) -> Option<Closed> {
        let filling = self.filling.remove(&partition)?;
        self.held -= filling.held();
        let key = match filling.until {
            Some((_, key)) => key,
            None => object_key(
                &self.prefix,
                partition,
                filling.first,
                filling.last,
                filling.first_ms,
            ),
        };
        self.closed
            .entry(partition)
            .or_default()
            .insert(filling.first, (filling.last, key.clone()));
        let body = filling.gzip.finish().unwrap_or_default();
        Some(Closed {
            partition,
            first: filling.first,
            last: filling.last,
            key,
            records: filling.records,
            raw_bytes: filling.raw_bytes,
            first_ms: filling.first_ms,
            body,
        })
    }
}

impl Filling {
    /// Offsets it holds.
    fn held(&self) -> usize {
        (self.last - self.first + 1) as usize
    }
}

/// `<prefix>/dt=YYYY-MM-DD/hh=HH/p<partition>-<first>-<last>.jsonl.gz`,
/// the offsets zero-padded so a listing is in offset order.
pub fn object_key(prefix: &str, partition: i32, first: i64, last: i64, first_ms: i64) -> String {
    let at = DateTime::<Utc>::from_timestamp_millis(first_ms).unwrap_or_default();
    let folder = at.format("dt=%Y-%m-%d/hh=%H");
    let name = format!("{folder}/p{partition}-{first:020}-{last:020}.jsonl.gz");
    if prefix.is_empty() {
        name
    } else {
        format!("{prefix}/{name}")
    }
}

/// The partition and offsets an object's key names, if it is one.
pub fn parse_key(key: &str) -> Option<(i32, i64, i64)> {
    let name = key.rsplit('/').next()?.strip_suffix(".jsonl.gz")?;
    let mut parts = name.strip_prefix('p')?.splitn(3, '-');
    let partition = parts.next()?.parse().ok()?;
    let first = parts.next()?.parse().ok()?;
    let last = parts.next()?.parse().ok()?;
    Some((partition, first, last))
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use proptest::prelude::*;

    use super::*;

    const T0: i64 = 1_764_000_000_000 - 1_764_000_000_000 % HOUR_MS;

    fn lines(closed: &Closed) -> Vec<String> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(&closed.body[..])
            .read_to_string(&mut text)
            .unwrap();
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn an_object_closes_when_full_with_its_records_as_lines() {
        let mut objects = Objects::new("raw", 30, Duration::from_secs(60));
        let now = Instant::now();
        let mut closed = None;
        for offset in 0..10 {
            let line = format!(r#"{{"n":{offset}}}"#);
            if let Some(c) = objects.add(3, offset, T0 + offset, Some(line.as_bytes()), now) {
                closed = Some(c);
                break;
            }
            assert_eq!(objects.held(), offset as usize + 1);
        }
        let closed = closed.expect("closed at 30 bytes of lines");
        assert_eq!((closed.first, closed.last, closed.records), (0, 3, 4));
        assert_eq!(
            lines(&closed),
            [r#"{"n":0}"#, r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#]
        );
        assert_eq!(
            closed.key,
            object_key("raw", 3, 0, 3, T0),
            "named by partition and offsets"
        );
        assert_eq!(parse_key(&closed.key), Some((3, 0, 3)));
        assert!(
            closed.key.starts_with("raw/dt=2025-11-24/hh="),
            "{}",
            closed.key
        );
        assert_eq!(objects.held(), 0);
    }

    #[test]
    fn an_object_never_spans_two_hours() {
        let mut objects = Objects::new("", 1 << 20, Duration::from_secs(60));
        let now = Instant::now();
        assert!(
            objects
                .add(0, 7, T0 + HOUR_MS - 2, Some(b"a"), now)
                .is_none()
        );
        assert!(
            objects
                .add(0, 8, T0 + HOUR_MS - 1, Some(b"b"), now)
                .is_none()
        );
        let closed = objects.add(0, 9, T0 + HOUR_MS, Some(b"c"), now).unwrap();
        assert_eq!(
            (closed.first, closed.last),
            (7, 8),
            "the record of the next hour starts the next object"
        );
        assert_eq!(objects.held(), 1);
        let next = objects.due(now + Duration::from_secs(60), usize::MAX);
        assert_eq!(next.len(), 1);
        assert_eq!((next[0].first, next[0].last), (9, 9));
        assert_ne!(closed.key.split('/').nth(1), next[0].key.split('/').nth(1));
    }

    #[test]
    fn an_object_closed_before_closes_at_the_same_offsets_and_key() {
        let mut objects = Objects::new("raw", 10, Duration::from_secs(1));
        objects.closed_before(1, 100, 104, "raw/earlier.jsonl.gz".to_owned());
        let now = Instant::now();
        for offset in 100..104 {
            // Neither size, age nor another hour closes it early.
            let at = T0 + (offset - 100) * HOUR_MS;
            assert!(
                objects
                    .add(1, offset, at, Some(b"a long line"), now)
                    .is_none()
            );
            assert!(
                objects
                    .due(now + Duration::from_secs(5), usize::MAX)
                    .is_empty()
            );
        }
        let closed = objects.add(1, 104, T0, None, now).unwrap();
        assert_eq!((closed.first, closed.last, closed.records), (100, 104, 4));
        assert_eq!(closed.key, "raw/earlier.jsonl.gz");
        // Read again after a fence: the same object again.
        objects.forget(1);
        for offset in 100..104 {
            assert!(objects.add(1, offset, T0, Some(b"x"), now).is_none());
        }
        assert_eq!(objects.add(1, 104, T0, None, now).unwrap().last, 104);
        // Once the position passed it, the range is forgotten: size
        // closes an object again.
        objects.passed(1, 105);
        let alone = objects.add(1, 100, T0, Some(b"a long line"), now).unwrap();
        assert_eq!((alone.first, alone.last), (100, 100));
    }

    #[test]
    fn objects_close_on_age_and_the_largest_when_too_much_is_held() {
        let mut objects = Objects::new("", 1 << 20, Duration::from_secs(60));
        let now = Instant::now();
        for offset in 0..10 {
            objects.add(0, offset, T0, Some(b"x"), now);
        }
        for offset in 0..3 {
            objects.add(1, offset, T0, Some(b"x"), now + Duration::from_secs(30));
        }
        assert!(
            objects
                .due(now + Duration::from_secs(59), usize::MAX)
                .is_empty()
        );
        let bound = objects.due(now + Duration::from_secs(59), 8);
        assert_eq!(bound.len(), 1);
        assert_eq!(
            (bound[0].partition, bound[0].last),
            (0, 9),
            "the largest goes"
        );
        let aged = objects.due(now + Duration::from_secs(90), usize::MAX);
        assert_eq!((aged[0].partition, aged[0].last), (1, 2));
        assert_eq!(objects.held(), 0);
    }

    proptest! {
        /// Whatever the sizes, hours and times to close, a partition's
        /// objects cover its offsets in order with no gap and no overlap,
        /// and hold exactly the lines given.
        #[test]
        fn objects_tile_the_offsets(
            records in prop::collection::vec((0usize..40, 0i64..3, any::<bool>(), any::<bool>()), 1..200),
            roll in 16usize..200,
        ) {
            let mut objects = Objects::new("p", roll, Duration::from_secs(10));
            let start = Instant::now();
            let mut at = T0;
            let mut closed = Vec::new();
            let mut expected = Vec::new();
            for (offset, (len, hours, kept, tick)) in records.iter().enumerate() {
                at += hours * HOUR_MS / 2;
                let line = "x".repeat(*len);
                if *kept {
                    expected.push(line.clone());
                }
                let now = start + Duration::from_secs(offset as u64);
                closed.extend(objects.add(0, offset as i64, at, kept.then_some(line.as_bytes()), now));
                if *tick {
                    closed.extend(objects.due(now, usize::MAX));
                }
            }
            closed.extend(objects.due(start + Duration::from_secs(10_000), usize::MAX));
            prop_assert_eq!(objects.held(), 0);
            let mut next = 0;
            let mut got = Vec::new();
            for c in &closed {
                prop_assert_eq!(c.first, next);
                prop_assert!(c.last >= c.first);
                next = c.last + 1;
                got.extend(lines(c));
            }
            prop_assert_eq!(next, records.len() as i64);
            prop_assert_eq!(got, expected);
        }
    }
}
