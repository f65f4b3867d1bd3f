//! Frames: how a record is laid out in a partition file, and the scanner
//! that reads them back and stops at a torn or corrupt one.

use std::io::Read;

/// The body length and its CRC.
pub(super) const HEADER_LEN: usize = 8;
/// Offset, timestamp and key length.
pub(super) const FIXED_BODY_LEN: usize = 8 + 8 + 4;
/// Larger frames are treated as corruption; no accepted request comes near.
pub(super) const MAX_FRAME: usize = 64 * 1024 * 1024;

/// Appends the frame of one record to `buf`.
pub(super) fn encode_frame(
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

pub(super) struct Frame {
    pub(super) offset: u64,
    pub(super) timestamp_ms: i64,
    pub(super) key: Option<Vec<u8>>,
    pub(super) value: Vec<u8>,
}

pub(super) enum Scan {
    Frame(Frame),
    /// Clean end of file.
    End,
    /// A frame that is not all there yet (being written, or torn).
    Partial,
    /// A frame whose checksum or lengths are wrong.
    Corrupt,
}

/// Reads frames one after another from a byte position.
pub(super) struct FrameScanner<R> {
    pub(super) reader: R,
    pub(super) position: u64,
    pub(super) body: Vec<u8>,
}

impl<R: Read> FrameScanner<R> {
    pub(super) fn new(reader: R, position: u64) -> Self {
        FrameScanner {
            reader,
            position,
            body: Vec::new(),
        }
    }

    /// The next frame; on `Partial` or `Corrupt` the position stays at the
    /// start of that frame (the reader must be re-seeked to retry).
    pub(super) fn next_frame(&mut self) -> std::io::Result<Scan> {
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

pub(super) fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
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
