//! Reading a request body within a limit, gzip included.
//!
//! The limit applies to the decompressed bytes, and decompression stops one
//! byte past it, so a gzip bomb costs at most the limit in memory and time.

use std::io::Read;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, header};
use http_body_util::BodyExt;

use super::error::IngestError;

/// Which limit a route's body is held to.
#[derive(Debug, Clone, Copy)]
pub enum BodyLimit {
    /// A single-event route: `max-event-bytes`.
    Event(usize),
    /// The batch route: `max-batch-bytes`.
    Batch(usize),
}

impl BodyLimit {
    pub(super) fn bytes(self) -> usize {
        match self {
            BodyLimit::Event(n) | BodyLimit::Batch(n) => n,
        }
    }

    fn exceeded(self, size: usize) -> IngestError {
        match self {
            BodyLimit::Event(limit) => IngestError::EventTooLarge {
                field: None,
                size,
                limit,
            },
            BodyLimit::Batch(limit) => IngestError::BatchTooLarge { limit },
        }
    }
}

/// Reads the whole body, decompressing gzip, and refuses it as soon as it
/// passes `limit`.
pub async fn read(body: Body, headers: &HeaderMap, limit: BodyLimit) -> Result<Bytes, IngestError> {
    let gzip = match headers.get(header::CONTENT_ENCODING).map(|v| v.to_str()) {
        None => false,
        Some(Ok(v)) if v.trim().is_empty() || v.trim().eq_ignore_ascii_case("identity") => false,
        Some(Ok(v)) if v.trim().eq_ignore_ascii_case("gzip") => true,
        Some(Ok(v)) => return Err(IngestError::UnsupportedEncoding(v.to_owned())),
        Some(Err(_)) => return Err(IngestError::UnsupportedEncoding("(not text)".into())),
    };
    let raw = read_limited(body, limit).await?;
    if !gzip {
        if raw.len() > limit.bytes() {
            return Err(limit.exceeded(raw.len()));
        }
        return Ok(raw);
    }
    let mut decoded = Vec::with_capacity((raw.len() * 4).min(limit.bytes() + 1));
    flate2::read::MultiGzDecoder::new(&raw[..])
        .take(limit.bytes() as u64 + 1)
        .read_to_end(&mut decoded)
        .map_err(|e| IngestError::InvalidGzip(e.to_string()))?;
    if decoded.len() > limit.bytes() {
        return Err(limit.exceeded(decoded.len()));
    }
    Ok(Bytes::from(decoded))
}

/// Collects the body frames, stopping past the limit. Compressed data is
/// held to the same limit: JSON never grows when gzipped by more than a few
/// bytes, and those are allowed for.
async fn read_limited(mut body: Body, limit: BodyLimit) -> Result<Bytes, IngestError> {
    let cap = limit.bytes() + 64;
    let mut collected: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| IngestError::InvalidJson {
            message: format!("the request body could not be read: {e}"),
            field: None,
        })?;
        if let Ok(data) = frame.into_data() {
            if collected.len() + data.len() > cap {
                return Err(limit.exceeded(collected.len() + data.len()));
            }
            if collected.is_empty() && body_is_done(&body) {
                // The common case: one frame, no copy.
                return Ok(data);
            }
            collected.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(collected))
}

fn body_is_done(body: &Body) -> bool {
    http_body::Body::is_end_stream(body)
}
