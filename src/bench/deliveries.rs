//! `traitline bench deliveries`: webhook deliveries a second through the
//! destination runner, from a scratch log to a receiver in this process
//! that answers each request after `--answer-ms`, with `--in-flight`
//! deliveries at once; then the same beside a second destination whose
//! endpoint accepts connections and never answers, to show what a dead
//! endpoint costs another destination.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::process::{discard, fresh_store, scratch_log};
use crate::config::Config;
use crate::definitions::DestinationDefinition;
use crate::definitions::destination::Target;
use crate::destinations::recorder::Recorder;
use crate::destinations::{Destination, Sender};
use crate::log::{EventLog, Topics};
use crate::process::profiles::group_reader;
use crate::process::{InFlightRunner, InFlightSettings, RunnerSettings};
use crate::store::Store;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchDeliveriesArgs {
    /// Events in the scratch log, each one delivery
    #[arg(long, default_value_t = 100_000)]
    pub events: usize,
    /// Distinct users among them
    #[arg(long, default_value_t = 10_000)]
    pub users: usize,
    /// How long the receiver takes to answer a request, in milliseconds
    #[arg(long, default_value_t = 50)]
    pub answer_ms: u64,
    /// Deliveries in flight at once (the destination's `max_in_flight`)
    #[arg(long, default_value_t = 1000)]
    pub in_flight: usize,
}

/// Fills, measures and prints.
pub async fn run(config: &Config, args: BenchDeliveriesArgs) -> Result<(), String> {
    let (scratch, log, filled) = scratch_log(
        config,
        args.events,
        args.users,
        false,
        super::process::MessageIds::Counted,
    )
    .await?;
    let dir = scratch.data_dir.clone();
    let answered = Arc::new(AtomicU64::new(0));
    let receiver = receiver(answered.clone(), Duration::from_millis(args.answer_ms)).await?;
    let black_hole = black_hole().await?;
    println!(
        "{} events written to a scratch embedded log in {:.1} s; a receiver answering in {} ms; {} in flight",
        args.events,
        filled.as_secs_f64(),
        args.answer_ms,
        args.in_flight
    );
    println!("| store | beside | seconds | deliveries/s | deliveries per CPU-second |");
    println!("|---|---|---|---|---|");
    for beside_dead in [false, true] {
        let name = if beside_dead { "beside" } else { "alone" };
        let (store, drop_db) = fresh_store(config, &dir, name).await?;
        let described = store.describe();
        let (recorder, outcomes) = Recorder::new();
        let writer = tokio::spawn(outcomes.run(
            store.clone(),
            log.clone(),
            Topics::new(&scratch.topic_prefix).deliveries(),
        ));
        let (stop_dead, dead_stopped) = watch::channel(false);
        let dead = if beside_dead {
            let runner = runner(
                &scratch,
                &store,
                &log,
                &recorder,
                "dead",
                &black_hole,
                &args,
                false,
            )?;
            Some(tokio::spawn(
                runner.run(crate::supervisor::stop_signal(dead_stopped)),
            ))
        } else {
            None
        };
        let fast = runner(
            &scratch, &store, &log, &recorder, "fast", &receiver, &args, true,
        )?;
        answered.store(0, Ordering::Relaxed);
        let (started, cpu) = (Instant::now(), super::metrics::cpu_seconds());
        fast.run(std::future::pending()).await?;
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = super::metrics::cpu_seconds() - cpu;
        let delivered = answered.load(Ordering::Relaxed) as f64;
        println!(
            "| {described} | {} | {elapsed:.2} | {:.0} | {:.0} |",
            if beside_dead {
                "a destination whose endpoint never answers"
            } else {
                "nothing"
            },
            delivered / elapsed,
            delivered / cpu.max(0.01)
        );
        let _ = stop_dead.send(true);
        if let Some(dead) = dead {
            let _ = dead.await;
        }
        drop(recorder);
        let _ = writer.await;
        discard(store, drop_db).await?;
    }
    log.close(Duration::from_secs(10)).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A destination's runner over the scratch events, from their beginning;
/// with `replay` it stops once every record is done.
#[allow(clippy::too_many_arguments)]
fn runner(
    scratch: &Config,
    store: &Store,
    log: &Arc<dyn EventLog>,
    recorder: &Recorder,
    name: &str,
    url: &str,
    args: &BenchDeliveriesArgs,
    replay: bool,
) -> Result<InFlightRunner<Destination>, String> {
    let definition = DestinationDefinition::from_json(
        serde_json::json!({"kind": "webhook", "source": "user_events", "url": url,
            "max_in_flight": args.in_flight, "timeout": "5m"})
        .to_string()
        .as_bytes(),
    )
    .and_then(|d| d.compile(name))
    .map_err(|e| e.to_string())?;
    let topics = Topics::new(&scratch.topic_prefix);
    let topic = topics.events();
    let reader = group_reader(scratch, &topic, name).map_err(|e| e.to_string())?;
    let Target::Webhook(webhook) = definition.target.clone() else {
        return Err("a webhook definition compiled as another kind".to_owned());
    };
    let destination = Destination::new(
        definition,
        webhook,
        1,
        0,
        Sender::new(true)?,
        store.clone(),
        recorder.clone(),
    );
    let settings = InFlightSettings {
        runner: RunnerSettings {
            max_batch: args.in_flight,
            stop_when_caught_up: replay,
            ..RunnerSettings::new("destination", topic, topics.rejected())
        },
        max_in_flight: args.in_flight,
        save_every: Duration::from_millis(200),
    };
    Ok(InFlightRunner::new(
        Arc::new(destination),
        reader,
        log.clone(),
        settings,
    ))
}

/// A webhook receiver that answers 200 after `delay`, counting answers;
/// its URL.
async fn receiver(answered: Arc<AtomicU64>, delay: Duration) -> Result<String, String> {
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let answered = answered.clone();
            async move {
                tokio::time::sleep(delay).await;
                answered.fetch_add(1, Ordering::Relaxed);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{address}/hook"))
}

/// An endpoint that accepts connections and never answers; its URL.
async fn black_hole() -> Result<String, String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    Ok(format!("http://{address}/hook"))
}
