//! `traitline archive verify`: shows that an archive's bucket holds every
//! object of its manifest, whole, and nothing that overlaps: per
//! partition, the manifest's ranges follow each other with no gap and no
//! overlap, every uploaded object is in the bucket with the size it was
//! uploaded with, and every archive object in the bucket is one of the
//! manifest's.

use std::collections::{BTreeMap, HashMap};

use futures_util::StreamExt;
use object_store::ObjectStore;
use object_store::path::Path;

use super::objects::parse_key;
use crate::config::Config;
use crate::definitions::DestinationDefinition;
use crate::definitions::destination::{ArchiveSpec, Target};
use crate::store::{ArchivedObject, DefinitionKind, Store};

/// What verify found of one archive.
#[derive(Debug, Default)]
pub struct Report {
    /// Per partition: objects, records, and the offsets covered.
    pub partitions: BTreeMap<i32, Covered>,
    /// Objects whose upload is under way.
    pub uploading: usize,
    /// What is wrong, one sentence each.
    pub problems: Vec<String>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Covered {
    pub objects: usize,
    pub records: i64,
    pub first: i64,
    pub last: i64,
}

/// Checks `name`'s bucket against its manifest.
pub async fn verify(
    store: &Store,
    name: &str,
    bucket: &dyn ObjectStore,
    prefix: &str,
) -> Result<Report, String> {
    let manifest = store
        .archived_objects(name, None, 0)
        .await
        .map_err(|e| format!("cannot read the manifest of archive {name}: {e}"))?;
    let listed = list(bucket, prefix).await?;
    Ok(compare(&manifest, &listed))
}

/// The archive objects under `prefix`: key → size.
async fn list(bucket: &dyn ObjectStore, prefix: &str) -> Result<HashMap<String, u64>, String> {
    let prefix = (!prefix.is_empty()).then(|| Path::from(prefix));
    let mut listing = bucket.list(prefix.as_ref());
    let mut objects = HashMap::new();
    while let Some(meta) = listing.next().await {
        let meta = meta.map_err(|e| format!("cannot list the bucket: {e}"))?;
        let key = meta.location.to_string();
        if parse_key(&key).is_some() {
            objects.insert(key, meta.size);
        }
    }
    Ok(objects)
}

/// The manifest (by partition and first offset) against the listing.
pub fn compare(manifest: &[ArchivedObject], listed: &HashMap<String, u64>) -> Report {
    let mut report = Report::default();
    let mut previous: Option<&ArchivedObject> = None;
    for object in manifest {
        let covered = report
            .partitions
            .entry(object.partition)
            .or_insert(Covered {
                first: object.first,
                ..Covered::default()
            });
        covered.objects += 1;
        covered.records += object.records;
        covered.last = object.last;
        if let Some(before) = previous.filter(|p| p.partition == object.partition) {
            if object.first > before.last + 1 {
                report.problems.push(format!(
                    "partition {}: offsets {} to {} are in no object (a gap between {} and {})",
                    object.partition,
                    before.last + 1,
                    object.first - 1,
                    before.key,
                    object.key
                ));
            } else if object.first <= before.last {
                report.problems.push(format!(
                    "partition {}: {} and {} overlap",
                    object.partition, before.key, object.key
                ));
            }
        }
        previous = Some(object);
        if object.uploaded_at.is_none() {
            report.uploading += 1;
            continue;
        }
        if object.records == 0 {
            continue;
        }
        match listed.get(&object.key) {
            None => report.problems.push(format!(
                "{} (partition {}, offsets {} to {}, {} records) is missing from the bucket",
                object.key, object.partition, object.first, object.last, object.records
            )),
            Some(&size) if size != object.bytes as u64 => report.problems.push(format!(
                "{} has {size} bytes in the bucket, {} when it was uploaded",
                object.key, object.bytes
            )),
            Some(_) => {}
        }
    }
    let known: HashMap<&str, ()> = manifest.iter().map(|o| (o.key.as_str(), ())).collect();
    let mut strays: Vec<&String> = listed
        .keys()
        .filter(|key| !known.contains_key(key.as_str()))
        .collect();
    strays.sort();
    for key in strays {
        report.problems.push(format!(
            "{key} is in the bucket but not in the manifest (an object another archive or an overlapping upload left)"
        ));
    }
    report
}

/// The command: verifies each archive (or the one named) and prints what
/// it found; an error when any problem is found.
pub async fn run(config: &Config, only: Option<&str>) -> Result<(), String> {
    crate::install_tls();
    let store = Store::open(config.database_url.as_deref(), &config.data_dir)
        .await
        .map_err(|e| e.to_string())?;
    let archives: Vec<(String, ArchiveSpec)> =
        crate::process::compiled::<DestinationDefinition>(&store, DefinitionKind::Destination)
            .await?
            .into_iter()
            .filter_map(|(name, (_, spec))| match spec.target {
                Target::Archive(archive) => Some((name, archive)),
                Target::Webhook(_) => None,
            })
            .filter(|(name, _)| only.is_none_or(|only| only == name))
            .collect();
    if archives.is_empty() {
        store.close().await;
        return Err(match only {
            Some(name) => format!("no archive (`kind: \"s3\"` destination) is named {name}"),
            None => "no archive (`kind: \"s3\"` destination) is defined".to_owned(),
        });
    }
    let mut failed = 0;
    for (name, spec) in &archives {
        let bucket = super::bucket(spec)?;
        let report = verify(&store, name, bucket.as_ref(), &spec.prefix).await?;
        println!(
            "archive {name} (bucket {}, prefix {:?}):",
            spec.bucket, spec.prefix
        );
        for (partition, c) in &report.partitions {
            println!(
                "  partition {partition}: {} objects, {} records, offsets {} to {}",
                c.objects, c.records, c.first, c.last
            );
        }
        if report.uploading > 0 {
            println!("  {} objects being uploaded", report.uploading);
        }
        for problem in &report.problems {
            println!("  PROBLEM: {problem}");
        }
        if report.problems.is_empty() {
            println!("  ok: no gaps, no overlaps, every object in the bucket");
        } else {
            failed += 1;
        }
    }
    store.close().await;
    if failed > 0 {
        return Err(format!("{failed} archive(s) failed verification"));
    }
    Ok(())
}
