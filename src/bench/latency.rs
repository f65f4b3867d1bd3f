//! `traitline bench latency`: how long after a 2xx an event shows in its
//! profile, under a steady background load.
//!
//! A background sender keeps `--rate` events/s flowing (batches every
//! 10 ms). Every 100 ms a probe sends one event for a user of its own,
//! waits for the 2xx, then polls `GET /v1/profiles/{user}` every 2 ms until
//! the profile is there: that time is one sample.

use std::time::{Duration, Instant};

use super::{BenchError, key};
use crate::config::Config;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchLatencyArgs {
    /// Base URL of the service (all roles)
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Write key [default: configured or generated in the data directory]
    #[arg(long, env = "TRAITLINE_BENCH_WRITE_KEY")]
    pub write_key: Option<String>,
    /// Read key [default: configured or generated in the data directory]
    #[arg(long, env = "TRAITLINE_BENCH_READ_KEY")]
    pub read_key: Option<String>,
    /// Background events a second
    #[arg(long, default_value_t = 5000)]
    pub rate: u64,
    /// Measured seconds
    #[arg(long, default_value_t = 20)]
    pub duration_secs: u64,
}

/// Sends the background load until `end`; returns the events sent.
async fn background(
    client: reqwest::Client,
    url: String,
    key: String,
    rate: u64,
    end: Instant,
) -> u64 {
    let per_tick = (rate / 100).max(1) as usize;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0u64;
    let mut seq = 0u64;
    while Instant::now() < end {
        tick.tick().await;
        let events: Vec<String> = (0..per_tick)
            .map(|_| {
                seq += 1;
                format!(
                    r#"{{"type":"track","userId":"load-{}","event":"bench.view","messageId":"{run}-{seq}","properties":{{"i":{seq}}}}}"#,
                    seq % 10_000
                )
            })
            .collect();
        let body = format!(r#"{{"batch":[{}]}}"#, events.join(","));
        let request = client
            .post(&url)
            .basic_auth(&key, Some(""))
            .header("content-type", "application/json")
            .body(body);
        // Fire and forget, so a slow answer does not lower the rate.
        let client_sent = per_tick as u64;
        tokio::spawn(async move {
            let _ = request.send().await;
        });
        sent += client_sent;
    }
    sent
}

/// Runs the probes and prints the latency percentiles.
pub async fn run(config: &Config, args: BenchLatencyArgs) -> Result<(), BenchError> {
    let write = key(config, args.write_key.as_ref(), &config.keys.write, |k| {
        k.write
    })?;
    let read = key(config, args.read_key.as_ref(), &config.keys.read, |k| {
        k.read
    })?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| BenchError::Client(e.to_string()))?;
    let base = args.url.trim_end_matches('/').to_owned();
    let end = Instant::now() + Duration::from_secs(args.duration_secs);
    let load = tokio::spawn(background(
        client.clone(),
        format!("{base}/v1/batch"),
        write.clone(),
        args.rate,
        end,
    ));

    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut samples = Vec::new();
    let mut probe = 0;
    while Instant::now() < end {
        probe += 1;
        let user = format!("probe-{run}-{probe}");
        let body = format!(r#"{{"userId":"{user}","event":"bench.probe"}}"#);
        let answer = client
            .post(format!("{base}/v1/track"))
            .basic_auth(&write, Some(""))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| BenchError::Unreachable(base.clone(), e.to_string()))?;
        if !answer.status().is_success() {
            return Err(BenchError::Unreachable(
                base.clone(),
                format!("a probe got {}", answer.status()),
            ));
        }
        let acknowledged = Instant::now();
        let deadline = acknowledged + Duration::from_secs(30);
        loop {
            let found = client
                .get(format!("{base}/v1/profiles/{user}"))
                .basic_auth(&read, Some(""))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if found {
                samples.push(acknowledged.elapsed());
                break;
            }
            if Instant::now() > deadline {
                return Err(BenchError::Unreachable(
                    base.clone(),
                    format!("the profile of {user} did not appear within 30 s"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sent = load.await.unwrap_or(0);
    samples.sort();
    let at = |p: f64| {
        samples[((samples.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1000.0
    };
    println!(
        "{base}: {} background events/s ({sent} sent), {} probes: 2xx to visible profile p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        args.rate,
        samples.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    );
    Ok(())
}
