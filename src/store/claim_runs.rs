//! Message-id claims kept as sorted runs rather than a row each: the
//! format, the filter and the merge, with no I/O (the store writes and
//! reads the bytes).
//!
//! A claim inserted as a SQLite row costs about a microsecond (its
//! statement, its key's search, the cell's insert and the page splits),
//! whatever the key's type: a third of a per-user count's CPU
//! (docs/benchmarks.md, "Where the count's CPU goes"). A backlog claims
//! up to a million ids at once, sorted; as a run they are a few bytes
//! each, prefix-compressed in blocks, which SQLite takes at about 3.5 ns
//! a byte, and a filter in memory.
//!
//! A run is one processor's claims in order of id, cut into blocks of
//! about [`BLOCK_BYTES`]. An id is looked for in a run through the run's
//! filter (a split-block Bloom filter of [`FILTER_BITS_PER_ID`] bits an
//! id, which says "maybe" for about one id in a thousand it does not
//! hold) and then in the one block whose first id is the last at or
//! before it. Runs are merged as they add up ([`merge`]), which keeps the
//! number of filters an id is asked of small, and drops the claims that
//! have left the deduplication window.
//!
//! The filter's hash ([`id_hash`]) and the block's encoding are stored:
//! neither may change without a migration of the stored runs.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// A block is closed once it holds this many bytes: a lookup reads and
/// decodes one block (some 150 claims of UUIDs).
pub const BLOCK_BYTES: usize = 4096;

/// Bits of filter an id. At 16 a split-block Bloom filter says "maybe"
/// for about one absent id in a thousand, and each "maybe" costs a
/// block's read; memory is 2 bytes a claim kept.
pub const FILTER_BITS_PER_ID: usize = 16;

/// Where an id's first record lies in the log, and when the log stored
/// it (what a claim records).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub partition: i32,
    pub offset: i64,
    pub received: i64,
}

/// A claim read out of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedClaim {
    pub id: String,
    pub position: Position,
}

/// A stored run that does not decode: the store's file was changed under
/// it, or the format was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a stored run of message-id claims is corrupt: {0}")]
pub struct Corrupt(pub &'static str);

/// The 64-bit hash of an id that the filters hold. Stored in every run's
/// filter, so fixed here rather than taken from a hasher whose output may
/// change between releases.
pub fn id_hash(id: &str) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let bytes = id.as_bytes();
    let mut hash = (bytes.len() as u64).wrapping_mul(K);
    let mut words = bytes.chunks_exact(8);
    let mix = |hash: u64, word: u64| (hash ^ word).wrapping_mul(K).rotate_left(29);
    for word in &mut words {
        hash = mix(
            hash,
            u64::from_le_bytes(word.try_into().expect("eight bytes")),
        );
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut word = [0; 8];
        word[..rest.len()].copy_from_slice(rest);
        hash = mix(hash, u64::from_le_bytes(word));
    }
    // MurmurHash3's finalizer: every bit of the input moves every bit of
    // the output, which the filter's block choice and bits rely on.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

/// A split-block Bloom filter (Parquet's): an id sets one bit in each of
/// the eight 32-bit words of one 32-byte block, so a lookup reads one
/// cache line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    words: Vec<u32>,
}

/// Parquet's salts: each spreads the hash's low half over one word.
const SALT: [u32; 8] = [
    0x47b6_137b,
    0x4497_4d91,
    0x8824_ad5b,
    0xa2b7_289d,
    0x7054_95c7,
    0x2df1_424b,
    0x9efc_4947,
    0x5c6b_fb31,
];

impl Filter {
    /// A filter sized for `ids` ids.
    pub fn for_ids(ids: usize) -> Filter {
        let blocks = (ids * FILTER_BITS_PER_ID).div_ceil(256).max(1);
        Filter {
            words: vec![0; blocks * 8],
        }
    }

    fn block(&self, hash: u64) -> usize {
        let blocks = (self.words.len() / 8) as u64;
        (((hash >> 32) * blocks) >> 32) as usize * 8
    }

    fn bits(hash: u64) -> impl Iterator<Item = u32> {
        let key = hash as u32;
        SALT.iter()
            .map(move |salt| 1 << (key.wrapping_mul(*salt) >> 27))
    }

    pub fn insert(&mut self, hash: u64) {
        let block = self.block(hash);
        for (word, bit) in self.words[block..block + 8]
            .iter_mut()
            .zip(Self::bits(hash))
        {
            *word |= bit;
        }
    }

    /// False only when the id of `hash` was never inserted.
    pub fn may_contain(&self, hash: u64) -> bool {
        let block = self.block(hash);
        self.words[block..block + 8]
            .iter()
            .zip(Self::bits(hash))
            .all(|(word, bit)| word & bit != 0)
    }

    /// Bytes held: what a run costs in memory beside its block index.
    pub fn bytes(&self) -> usize {
        self.words.len() * 4
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Filter, Corrupt> {
        if bytes.is_empty() || !bytes.len().is_multiple_of(32) {
            return Err(Corrupt("a filter is not whole 32-byte blocks"));
        }
        Ok(Filter {
            words: bytes
                .chunks_exact(4)
                .map(|w| u32::from_le_bytes(w.try_into().expect("four bytes")))
                .collect(),
        })
    }
}

/// What a run keeps in memory: its filter and the first id of each of
/// its blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSummary {
    pub filter: Filter,
    /// The first id of each block, in order.
    pub firsts: Vec<Box<str>>,
    pub claims: u64,
    /// The newest and oldest `received` of its claims: a run whose newest
    /// has left the deduplication window goes whole.
    pub newest_received: i64,
    pub oldest_received: i64,
}

impl RunSummary {
    /// The block that holds `id` if the run does: `None` when the filter
    /// rules it out or it sorts before the run's first id.
    pub fn block_for(&self, id: &str, hash: u64) -> Option<usize> {
        if !self.filter.may_contain(hash) {
            return None;
        }
        self.firsts
            .partition_point(|first| **first <= *id)
            .checked_sub(1)
    }

    /// The memory the summary holds: its filter and first ids.
    pub fn bytes(&self) -> usize {
        self.filter.bytes()
            + self
                .firsts
                .iter()
                .map(|first| first.len() + std::mem::size_of::<Box<str>>())
                .sum::<usize>()
    }

    /// The first ids, each after a varint of its length: how the store
    /// keeps them beside the filter.
    pub fn firsts_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for first in &self.firsts {
            put_varint(&mut out, first.len() as u64);
            out.extend_from_slice(first.as_bytes());
        }
        out
    }

    pub fn firsts_from_bytes(mut bytes: &[u8]) -> Result<Vec<Box<str>>, Corrupt> {
        let mut firsts = Vec::new();
        while !bytes.is_empty() {
            let len = take_varint(&mut bytes)? as usize;
            let (text, rest) = bytes
                .split_at_checked(len)
                .ok_or(Corrupt("a block's first id runs past its list"))?;
            let text = std::str::from_utf8(text).map_err(|_| Corrupt("an id is not UTF-8"))?;
            firsts.push(text.into());
            bytes = rest;
        }
        Ok(firsts)
    }
}

/// A run being written: claims go in in order of id.
#[derive(Debug)]
pub struct RunBuilder {
    filter: Filter,
    firsts: Vec<Box<str>>,
    blocks: Vec<Vec<u8>>,
    block: Vec<u8>,
    /// The last id put in (the next must sort after it; within a block
    /// the next shares a prefix with it).
    last: String,
    last_received: i64,
    claims: u64,
    newest_received: i64,
    oldest_received: i64,
}

/// A claim that does not sort after the one before it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("message id {0:?} does not sort after the claim before it")]
pub struct OutOfOrder(pub String);

impl RunBuilder {
    /// A builder whose filter is sized for `ids` claims (more may go in,
    /// at a higher rate of false "maybe").
    pub fn new(ids: usize) -> RunBuilder {
        RunBuilder {
            filter: Filter::for_ids(ids),
            firsts: Vec::new(),
            blocks: Vec::new(),
            block: Vec::with_capacity(BLOCK_BYTES + 64),
            last: String::new(),
            last_received: 0,
            claims: 0,
            newest_received: i64::MIN,
            oldest_received: i64::MAX,
        }
    }

    pub fn push(&mut self, id: &str, position: Position) -> Result<(), OutOfOrder> {
        if self.claims > 0 && *id <= *self.last {
            return Err(OutOfOrder(id.to_owned()));
        }
        if self.block.len() >= BLOCK_BYTES {
            self.blocks.push(std::mem::take(&mut self.block));
            self.block.reserve(BLOCK_BYTES + 64);
        }
        let shared = if self.block.is_empty() {
            self.firsts.push(id.into());
            self.last_received = 0;
            0
        } else {
            shared_prefix(&self.last, id)
        };
        put_varint(&mut self.block, shared as u64);
        put_varint(&mut self.block, (id.len() - shared) as u64);
        self.block.extend_from_slice(&id.as_bytes()[shared..]);
        put_varint(&mut self.block, zigzag(i64::from(position.partition)));
        put_varint(&mut self.block, zigzag(position.offset));
        put_varint(
            &mut self.block,
            zigzag(position.received.wrapping_sub(self.last_received)),
        );
        self.last_received = position.received;
        self.last.clear();
        self.last.push_str(id);
        self.filter.insert(id_hash(id));
        self.claims += 1;
        self.newest_received = self.newest_received.max(position.received);
        self.oldest_received = self.oldest_received.min(position.received);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.claims == 0
    }

    pub fn claims(&self) -> u64 {
        self.claims
    }

    /// The blocks closed since the last call, in order: a long run is
    /// written as it is built rather than held whole.
    pub fn take_blocks(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.blocks)
    }

    /// The run's summary and its blocks not yet taken, in order.
    pub fn finish(mut self) -> (RunSummary, Vec<Vec<u8>>) {
        if !self.block.is_empty() {
            self.blocks.push(self.block);
        }
        let summary = RunSummary {
            filter: self.filter,
            firsts: self.firsts,
            claims: self.claims,
            newest_received: self.newest_received,
            oldest_received: self.oldest_received,
        };
        (summary, self.blocks)
    }
}

/// The claims of one block, in order. Not an `Iterator`: each id is
/// rebuilt in one buffer from the one before it.
pub struct BlockCursor<'a> {
    bytes: &'a [u8],
    id: String,
    received: i64,
}

impl<'a> BlockCursor<'a> {
    pub fn new(block: &'a [u8]) -> BlockCursor<'a> {
        BlockCursor {
            bytes: block,
            id: String::new(),
            received: 0,
        }
    }

    /// The next claim: its id (valid until the next call) and position.
    pub fn next_claim(&mut self) -> Result<Option<(&str, Position)>, Corrupt> {
        if self.bytes.is_empty() {
            return Ok(None);
        }
        let shared = take_varint(&mut self.bytes)? as usize;
        let len = take_varint(&mut self.bytes)? as usize;
        let (suffix, rest) = self
            .bytes
            .split_at_checked(len)
            .ok_or(Corrupt("an id runs past its block"))?;
        self.bytes = rest;
        if shared > self.id.len() || !self.id.is_char_boundary(shared) {
            return Err(Corrupt("an id shares more than the id before it"));
        }
        self.id.truncate(shared);
        self.id
            .push_str(std::str::from_utf8(suffix).map_err(|_| Corrupt("an id is not UTF-8"))?);
        let partition = i32::try_from(unzigzag(take_varint(&mut self.bytes)?))
            .map_err(|_| Corrupt("a partition is out of range"))?;
        let offset = unzigzag(take_varint(&mut self.bytes)?);
        self.received = self
            .received
            .wrapping_add(unzigzag(take_varint(&mut self.bytes)?));
        Ok(Some((
            &self.id,
            Position {
                partition,
                offset,
                received: self.received,
            },
        )))
    }

    /// The position claimed for `id` in this block, if it is there.
    pub fn find(block: &[u8], id: &str) -> Result<Option<Position>, Corrupt> {
        let mut cursor = BlockCursor::new(block);
        while let Some((found, position)) = cursor.next_claim()? {
            match (*found).cmp(id) {
                Ordering::Less => {}
                Ordering::Equal => return Ok(Some(position)),
                Ordering::Greater => return Ok(None),
            }
        }
        Ok(None)
    }
}

/// Merges runs, each source giving one run's claims in order of id, the
/// oldest run first: `out` takes the claims in order of id. An id in more
/// than one run (which the claims never write, as an id is looked for
/// before it is claimed) keeps the oldest run's position: the first
/// record is the one claimed first. A claim `keep` refuses (one past the
/// deduplication window) is left out.
pub fn merge<E>(
    mut sources: Vec<impl FnMut() -> Result<Option<OwnedClaim>, E>>,
    keep: impl Fn(&Position) -> bool,
    mut out: impl FnMut(&str, Position) -> Result<(), E>,
) -> Result<(), E> {
    /// A source's next claim; the heap's top is the least id, and of
    /// equal ids the oldest source's.
    struct Head {
        claim: OwnedClaim,
        source: usize,
    }
    impl PartialEq for Head {
        fn eq(&self, other: &Self) -> bool {
            self.cmp(other) == Ordering::Equal
        }
    }
    impl Eq for Head {}
    impl PartialOrd for Head {
        fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
            Some(self.cmp(other))
        }
    }
    impl Ord for Head {
        fn cmp(&self, other: &Self) -> Ordering {
            (&other.claim.id, other.source).cmp(&(&self.claim.id, self.source))
        }
    }
    let mut heap = BinaryHeap::with_capacity(sources.len());
    for (source, next) in sources.iter_mut().enumerate() {
        if let Some(claim) = next()? {
            heap.push(Head { claim, source });
        }
    }
    let mut last: Option<String> = None;
    while let Some(Head { claim, source }) = heap.pop() {
        if let Some(next) = sources[source]()? {
            heap.push(Head {
                claim: next,
                source,
            });
        }
        if last.as_deref() == Some(claim.id.as_str()) {
            continue;
        }
        if keep(&claim.position) {
            out(&claim.id, claim.position)?;
        }
        last = Some(claim.id);
    }
    Ok(())
}

fn shared_prefix(a: &str, b: &str) -> usize {
    let mut shared = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    // The suffix must be text on its own.
    while !b.is_char_boundary(shared) {
        shared -= 1;
    }
    shared
}

fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn unzigzag(n: u64) -> i64 {
    ((n >> 1) as i64) ^ -((n & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn take_varint(bytes: &mut &[u8]) -> Result<u64, Corrupt> {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes
            .split_first()
            .ok_or(Corrupt("a number runs past its block"))?;
        *bytes = rest;
        n |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Ok(n);
        }
    }
    Err(Corrupt("a number is longer than ten bytes"))
}

#[cfg(test)]
mod tests;
