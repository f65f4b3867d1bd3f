//! `traitline bench archive`: events a second through the archive, from a
//! scratch log to an S3-compatible server (`--endpoint`), gzip'd JSON
//! lines in objects of `--roll-bytes`, every record's object uploaded and
//! in the manifest before the run ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::process::{discard, fresh_store, scratch_log};
use crate::config::Config;
use crate::definitions::DestinationDefinition;
use crate::definitions::destination::Target;
use crate::destinations::archive::{self, Archive};
use crate::destinations::recorder::Recorder;
use crate::log::Topics;
use crate::process::profiles::group_reader;
use crate::process::{InFlightRunner, InFlightSettings, RunnerSettings};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArchiveArgs {
    /// Events in the scratch log
    #[arg(long, default_value_t = 500_000)]
    pub events: usize,
    /// Distinct users among them
    #[arg(long, default_value_t = 10_000)]
    pub users: usize,
    /// The S3-compatible server (its bucket is created when missing)
    #[arg(long, default_value = "http://127.0.0.1:9000")]
    pub endpoint: String,
    #[arg(long, default_value = "traitline-bench")]
    pub bucket: String,
    /// An object's size before gzip (the archive's `roll_bytes`)
    #[arg(long, default_value_t = 64 << 20)]
    pub roll_bytes: usize,
}

/// Fills, measures and prints.
pub async fn run(config: &Config, args: BenchArchiveArgs) -> Result<(), String> {
    crate::install_tls();
    let (scratch, log, filled) = scratch_log(
        config,
        args.events,
        args.users,
        false,
        super::process::MessageIds::Counted,
    )
    .await?;
    let dir = scratch.data_dir.clone();
    // Unsigned, as moto and a local MinIO take it; an existing bucket
    // answers 409, which is as good.
    let _ = reqwest::Client::new()
        .put(format!(
            "{}/{}",
            args.endpoint.trim_end_matches('/'),
            args.bucket
        ))
        .send()
        .await;
    let prefix = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let definition = DestinationDefinition::from_json(
        serde_json::json!({"kind": "s3", "source": "user_events", "endpoint": args.endpoint,
            "bucket": args.bucket, "prefix": prefix, "roll_bytes": args.roll_bytes,
            "roll_after": "1s", "access_key_id": "bench", "secret_access_key": "bench"})
        .to_string()
        .as_bytes(),
    )
    .and_then(|d| d.compile("bench"))
    .map_err(|e| e.to_string())?;
    let Target::Archive(settings) = definition.target.clone() else {
        return Err("an archive definition compiled as another kind".to_owned());
    };
    let (store, drop_db) = fresh_store(config, &dir, "archive").await?;
    let described = store.describe();
    let topics = Topics::new(&scratch.topic_prefix);
    let (recorder, outcomes) = Recorder::new();
    let writer = tokio::spawn(outcomes.run(store.clone(), log.clone(), topics.deliveries()));
    let archive = Arc::new(Archive::new(
        &definition,
        settings,
        1,
        0,
        store.clone(),
        recorder.clone(),
    )?);
    let topic = topics.events();
    let reader = group_reader(&scratch, &topic, "bench-archive").map_err(|e| e.to_string())?;
    let runner = InFlightRunner::new(
        archive,
        reader,
        log.clone(),
        InFlightSettings {
            runner: RunnerSettings {
                max_batch: 5000,
                stop_when_caught_up: true,
                ..RunnerSettings::new("destination", topic, topics.rejected())
            },
            max_in_flight: archive::MOST_IN_FLIGHT,
            save_every: Duration::from_millis(200),
        },
    );
    println!(
        "{} events written to a scratch embedded log in {:.1} s; archiving to {} bucket {} (objects of {} bytes before gzip)",
        args.events,
        filled.as_secs_f64(),
        args.endpoint,
        args.bucket,
        args.roll_bytes
    );
    let (started, cpu) = (Instant::now(), super::metrics::cpu_seconds());
    runner.run(std::future::pending()).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = super::metrics::cpu_seconds() - cpu;
    let objects = store
        .archived_objects("bench", None, 0)
        .await
        .map_err(|e| e.to_string())?;
    let records: i64 = objects.iter().map(|o| o.records).sum();
    let bytes: i64 = objects.iter().map(|o| o.bytes).sum();
    if records != args.events as i64 {
        return Err(format!(
            "the manifest holds {records} records of {}",
            args.events
        ));
    }
    println!("| store | objects | MB gzip'd | seconds | events/s | events per CPU-second |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {described} | {} | {:.1} | {elapsed:.2} | {:.0} | {:.0} |",
        objects.len(),
        bytes as f64 / 1e6,
        records as f64 / elapsed,
        records as f64 / cpu.max(0.01)
    );
    drop(recorder);
    let _ = writer.await;
    discard(store, drop_db).await?;
    log.close(Duration::from_secs(10)).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
