//! The archive (DESIGN.md, "Destinations"): every record of its topic
//! that the filter takes, as gzip'd JSON lines in S3-compatible object
//! storage, through the at-least-once runner. A partition's records are
//! held in the object being filled ([`objects`]); the object's upload is
//! the work that finishes them, so the stored position moves only past
//! uploaded objects. Before an upload its range goes into the manifest
//! (`archive_objects`): a retry after a crash closes the object at the
//! same offsets and rewrites the same key, so the bucket never holds two
//! objects that overlap. `traitline archive verify` ([`verify`]) checks
//! the bucket against the manifest.

pub mod objects;
pub mod verify;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

use super::processor::backoff;
use super::recorder::Recorder;
use crate::definitions::destination::ArchiveSpec;
use crate::definitions::{Condition, DestinationSpec};
use crate::log::StoredRecord;
use crate::process::profiles::commit_error;
use crate::process::{
    AtLeastOnce, Checkpoints, CommitError, Group, OffsetAdvance, Rejected, Undone,
};
use crate::store::{ArchivedObject, DeliveryOutcome, Store, now_ms};
use objects::{Closed, Objects};

/// Most records an archive holds at once (in objects being filled and
/// uploading): bounds its memory whatever the bucket's speed.
pub const MOST_IN_FLIGHT: usize = 400_000;

/// One version of an archive, archiving.
pub struct Archive {
    name: String,
    version: i64,
    /// Its positions' name in the store (`destination:{name}`).
    processor: String,
    /// Records the log stored before the archive was created are not its
    /// to archive, up to its first object of each partition.
    since_ms: i64,
    filter: Option<Condition>,
    spec: ArchiveSpec,
    bucket: Arc<dyn ObjectStore>,
    store: Store,
    recorder: Recorder,
    objects: Mutex<Objects>,
    /// Per partition, whether the archive began objects of it (in the
    /// manifest, or in this run): no record of it is skipped any more.
    begun: Mutex<HashSet<i32>>,
}

impl Archive {
    pub fn new(
        spec: &DestinationSpec,
        archive: ArchiveSpec,
        version: i64,
        since_ms: i64,
        store: Store,
        recorder: Recorder,
    ) -> Result<Archive, String> {
        Ok(Archive {
            name: spec.name.clone(),
            version,
            processor: super::processor_name(&spec.name),
            since_ms,
            filter: spec.filter.clone(),
            bucket: bucket(&archive)?,
            objects: Mutex::new(Objects::new(
                &archive.prefix,
                archive.roll_bytes,
                archive.roll_after,
            )),
            spec: archive,
            store,
            recorder,
            begun: Mutex::new(HashSet::new()),
        })
    }

    /// The line `record` is archived as (its value), `None` when the
    /// filter leaves it out.
    fn line(&self, record: StoredRecord) -> Result<Option<Bytes>, Rejected> {
        let compact = !record.value.contains(&b'\n');
        if self.filter.is_none() && compact {
            return Ok(Some(record.value));
        }
        let value: serde_json::Value = match serde_json::from_slice(&record.value) {
            Ok(value) => value,
            Err(e) => {
                return Err(Rejected {
                    reason: format!("archive {} cannot read the record as JSON: {e}", self.name),
                    record: Box::new(record),
                });
            }
        };
        if let Some(filter) = &self.filter
            && !filter.matches(&value)
        {
            return Ok(None);
        }
        // A JSON line has no line break inside: a record written with
        // some is written again compactly.
        Ok(Some(if compact {
            record.value
        } else {
            serde_json::to_vec(&value).unwrap_or_default().into()
        }))
    }

    fn group(self: &Arc<Self>, closed: Closed) -> Group {
        let this = self.clone();
        Group {
            through: closed.last,
            work: Box::pin(async move { this.upload(closed).await }),
        }
    }

    /// Stores the object's range in the manifest, uploads it (retrying
    /// with backoff until the bucket takes it: an archive gives nothing
    /// up), and marks it uploaded. Refused by the manifest (another
    /// object over its offsets), its partition is read again.
    async fn upload(&self, closed: Closed) -> Result<(), Undone> {
        let object = ArchivedObject {
            partition: closed.partition,
            first: closed.first,
            last: closed.last,
            key: closed.key.clone(),
            records: closed.records as i64,
            bytes: closed.body.len() as i64,
            first_at: closed.first_ms,
            uploaded_at: (closed.records == 0).then(now_ms),
        };
        let mut attempt = 0;
        loop {
            match self.store.claim_archive_object(&self.name, &object).await {
                Ok(true) => break,
                Ok(false) => {
                    // Another instance closed an object over these
                    // offsets (a rebalance): the partition is read again
                    // with the manifest as it is now, so its objects
                    // close where that one did.
                    return Err(Undone::Reread(format!(
                        "archive {} does not upload {}: the manifest has another object over offsets {} to {}",
                        self.name, object.key, object.first, object.last
                    )));
                }
                Err(e) => {
                    attempt += 1;
                    tracing::warn!(
                        "archive {} cannot store object {} in its manifest: {e}; trying again",
                        self.name,
                        object.key
                    );
                    tokio::time::sleep(backoff(self.spec.backoff, self.spec.backoff_max, attempt))
                        .await;
                }
            }
        }
        if closed.records == 0 {
            return Ok(());
        }
        let path = Path::from(closed.key.as_str());
        let payload = PutPayload::from(closed.body);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let started = Instant::now();
            let put = self.bucket.put(&path, payload.clone()).await;
            let (what, response) = match &put {
                Ok(_) => (
                    "delivered",
                    format!(
                        "{} records, {} bytes ({} before gzip)",
                        closed.records, object.bytes, closed.raw_bytes
                    ),
                ),
                Err(e) => ("retrying", e.to_string()),
            };
            let outcome = DeliveryOutcome {
                attempt_id: uuid::Uuid::new_v4().to_string(),
                destination: self.name.clone(),
                version: self.version,
                delivery_id: closed.key.clone(),
                attempt,
                partition: closed.partition,
                offset: closed.first,
                key: None,
                outcome: what.to_owned(),
                status: None,
                latency_ms: started.elapsed().as_millis() as i64,
                response,
                at: now_ms(),
                dead_letters: Vec::new(),
            };
            if put.is_ok() {
                self.recorder.record_final(outcome).await;
                break;
            }
            let delay = backoff(self.spec.backoff, self.spec.backoff_max, attempt);
            tracing::warn!(
                "archive {} cannot upload {} ({}); trying again in {delay:?}",
                self.name,
                closed.key,
                outcome.response
            );
            self.recorder.record(outcome).await;
            tokio::time::sleep(delay).await;
        }
        let mut attempt = 0;
        while let Err(e) = self
            .store
            .archive_uploaded(&self.name, closed.partition, closed.first, now_ms())
            .await
        {
            attempt += 1;
            tracing::warn!(
                "archive {} cannot mark {} uploaded in its manifest: {e}; trying again",
                self.name,
                closed.key
            );
            tokio::time::sleep(backoff(self.spec.backoff, self.spec.backoff_max, attempt)).await;
        }
        Ok(())
    }

    /// Whether `record` is one the archive starts after: stored before
    /// the archive was created, before its partition's first object.
    fn before_start(&self, record: &StoredRecord) -> bool {
        if record.timestamp_ms >= self.since_ms {
            return false;
        }
        let begun = self.begun.lock().unwrap_or_else(|e| e.into_inner());
        !begun.contains(&record.partition)
    }
}

/// The archive's bucket client: the definition's settings over the
/// standard AWS variables.
pub fn bucket(spec: &ArchiveSpec) -> Result<Arc<dyn ObjectStore>, String> {
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(&spec.bucket)
        .with_client_options(ClientOptions::new().with_timeout(Duration::from_secs(120)))
        // A few quick retries here; the archive's own backoff (and its
        // recorded attempts) beyond them.
        .with_retry(RetryConfig {
            max_retries: 2,
            retry_timeout: Duration::from_secs(30),
            ..RetryConfig::default()
        });
    if let Some(endpoint) = &spec.endpoint {
        builder = builder
            .with_endpoint(endpoint)
            .with_allow_http(endpoint.starts_with("http://"));
    }
    match &spec.region {
        Some(region) => builder = builder.with_region(region),
        None if std::env::var_os("AWS_REGION").is_none()
            && std::env::var_os("AWS_DEFAULT_REGION").is_none() =>
        {
            builder = builder.with_region("us-east-1");
        }
        None => {}
    }
    if let Some((id, secret)) = &spec.credentials {
        builder = builder
            .with_access_key_id(id)
            .with_secret_access_key(secret);
    }
    let bucket = builder
        .build()
        .map_err(|e| format!("cannot set up the bucket {}: {e}", spec.bucket))?;
    Ok(Arc::new(bucket))
}

#[async_trait]
impl Checkpoints for Archive {
    // Positions are stored under the processor's name, not the archive's.
    #[allow(clippy::misnamed_getters)]
    fn name(&self) -> &str {
        &self.processor
    }

    /// The stored positions; the manifest's objects above them are taken
    /// as they are (the runner reads from these positions next).
    async fn stored_offsets(&self, topic: &str) -> Result<HashMap<i32, i64>, CommitError> {
        let positions = self
            .store
            .offsets(&self.processor, topic)
            .await
            .map_err(commit_error)?;
        let above = self
            .store
            .archived_above(&self.name, &self.processor, topic)
            .await
            .map_err(commit_error)?;
        let partitions = self
            .store
            .archived_partitions(&self.name)
            .await
            .map_err(commit_error)?;
        let mut objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        for object in above {
            objects.closed_before(object.partition, object.first, object.last, object.key);
        }
        let mut begun = self.begun.lock().unwrap_or_else(|e| e.into_inner());
        for partition in partitions {
            begun.insert(partition);
        }
        Ok(positions)
    }
}

#[async_trait]
impl AtLeastOnce for Archive {
    async fn handle(&self, _record: StoredRecord) -> Result<(), Rejected> {
        // Every record is begun (`begin`), never handled alone.
        Ok(())
    }

    fn begin(self: Arc<Self>, record: StoredRecord) -> Option<Group> {
        let (partition, offset, timestamp_ms) =
            (record.partition, record.offset, record.timestamp_ms);
        let alone = |outcome: Result<(), Rejected>| Group {
            through: offset,
            work: Box::pin(std::future::ready(outcome.map_err(Undone::Rejected))),
        };
        let filling = {
            let objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
            objects.filling(partition)
        };
        if !filling && self.before_start(&record) {
            return Some(alone(Ok(())));
        }
        let line = match self.line(record) {
            Ok(line) => line,
            // Only when nothing is held: a reject finishes its record
            // alone (else it is left out of the object).
            Err(rejected) if !filling => return Some(alone(Err(rejected))),
            Err(rejected) => {
                tracing::warn!("{}; it is left out of its object", rejected.reason);
                None
            }
        };
        self.begun
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(partition);
        let closed = self.objects.lock().unwrap_or_else(|e| e.into_inner()).add(
            partition,
            offset,
            timestamp_ms,
            line.as_deref(),
            Instant::now(),
        );
        closed.map(|closed| self.group(closed))
    }

    fn due(self: &Arc<Self>) -> Vec<(i32, Group)> {
        let due = self
            .objects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .due(Instant::now(), MOST_IN_FLIGHT / 2);
        due.into_iter()
            .map(|closed| (closed.partition, self.group(closed)))
            .collect()
    }

    fn forget(&self, partition: i32) {
        self.objects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget(partition);
    }

    async fn save_positions(
        &self,
        topic: &str,
        offsets: Vec<OffsetAdvance>,
        done: &HashMap<i32, Vec<(i64, i64)>>,
    ) -> Result<(), CommitError> {
        self.store
            .save_positions(&self.processor, topic, &offsets, done)
            .await
            .map_err(commit_error)?;
        let mut objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        for advance in &offsets {
            objects.passed(advance.partition, advance.next);
        }
        Ok(())
    }

    async fn stored_done(&self, topic: &str) -> Result<HashMap<i32, Vec<(i64, i64)>>, CommitError> {
        self.store
            .done_above(&self.processor, topic)
            .await
            .map_err(commit_error)
    }
}
