//! `traitline bench latency`: how long after a 2xx an event shows in its
//! profile, under a steady background load; with `--windows`, how long
//! after a window's end its final value is on `user_metrics`.
//!
//! A background sender keeps `--rate` events/s flowing (batches every
//! 10 ms). Every 100 ms a probe sends one event for a user of its own,
//! waits for the 2xx, then polls `GET /v1/profiles/{user}` every 2 ms until
//! the profile is there: that time is one sample.
//!
//! With `--windows` it defines a global one-second count (no lateness),
//! reads `user_metrics` from its end beside the service (the log the
//! configuration names, as `events tail` does), and takes each of the
//! metric's windows as a sample: the time it arrived less its end. A
//! global window waits for every partition's clock, so this is the whole
//! path: the watermark passing the end, the combining commit, the relay.
//!
//! With `--alerts` it defines a one-step pattern rule (no lateness) that
//! every probe event matches, reads `user_alerts` from its end, and takes
//! as a sample the time from a probe's 2xx to its alert's arrival there:
//! the watermark passing the event, the rule's commit, the relay.

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
    /// Measure closed windows on `user_metrics` instead of profiles
    #[arg(long)]
    pub windows: bool,
    /// Measure alerts on `user_alerts` instead of profiles
    #[arg(long, conflicts_with = "windows")]
    pub alerts: bool,
    /// Admin key, to define the measured metric with `--windows`
    /// [default: configured or generated in the data directory]
    #[arg(long, env = "TRAITLINE_BENCH_ADMIN_KEY")]
    pub admin_key: Option<String>,
}

/// The metric `--windows` defines and measures.
const WINDOW_METRIC: &str = "bench_window_latency";

/// The rule `--alerts` defines and measures.
const ALERT_RULE: &str = "bench_alert_latency";

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

    if args.windows {
        let samples = window_samples(config, &args, &client, &base, end).await?;
        let sent = load.await.unwrap_or(0);
        report(
            &base,
            &args,
            sent,
            "window end to its value on user_metrics",
            samples,
        );
        return Ok(());
    }

    if args.alerts {
        let samples = alert_samples(config, &args, &client, &base, &write, end).await?;
        let sent = load.await.unwrap_or(0);
        report(
            &base,
            &args,
            sent,
            "2xx to its alert on user_alerts",
            samples,
        );
        return Ok(());
    }

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
    report(&base, &args, sent, "2xx to visible profile", samples);
    Ok(())
}

fn report(base: &str, args: &BenchLatencyArgs, sent: u64, what: &str, mut samples: Vec<Duration>) {
    if samples.is_empty() {
        println!("{base}: no samples");
        return;
    }
    samples.sort();
    let at = |p: f64| {
        samples[((samples.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1000.0
    };
    println!(
        "{base}: {} background events/s ({sent} sent), {} samples: {what} p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        args.rate,
        samples.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    );
}

/// Opens a reader at the end of `topic`, then defines the measured
/// metric or rule (`definition` put at `url`): its output from then on.
/// The admin key, to delete it at the end, and the reader.
async fn define(
    config: &Config,
    args: &BenchLatencyArgs,
    client: &reqwest::Client,
    url: &str,
    definition: &serde_json::Value,
    topic: &str,
) -> Result<(String, Box<dyn crate::log::LogReader>), BenchError> {
    let admin = key(config, args.admin_key.as_ref(), &config.keys.admin, |k| {
        k.admin
    })?;
    let reader = crate::log::open_reader(config, topic, crate::log::StartAt::End)
        .map_err(|e| BenchError::Unreachable(topic.to_owned(), e.to_string()))?;
    let defined = client
        .put(url)
        .basic_auth(&admin, Some(""))
        .json(definition)
        .send()
        .await
        .map_err(|e| BenchError::Unreachable(url.to_owned(), e.to_string()))?;
    if !defined.status().is_success() {
        return Err(BenchError::Unreachable(
            url.to_owned(),
            format!("defining it got {}", defined.status()),
        ));
    }
    Ok((admin, reader))
}

/// Defines the measured metric, reads its windows off `user_metrics`
/// until `end`, and deletes it: each window's delay after its end.
async fn window_samples(
    config: &Config,
    args: &BenchLatencyArgs,
    client: &reqwest::Client,
    base: &str,
    end: Instant,
) -> Result<Vec<Duration>, BenchError> {
    let topic = crate::log::Topics::new(&config.topic_prefix).metrics();
    let url = format!("{base}/v1/metrics/{WINDOW_METRIC}");
    let definition =
        serde_json::json!({"aggregate": "count", "window": {"kind": "tumbling", "size": "1s"}});
    let (admin, mut reader) = define(config, args, client, &url, &definition, &topic).await?;
    // Windows that close while the new version reads the log's history
    // (before it is live, and a second after) are not samples of live
    // processing.
    let read = key(config, args.read_key.as_ref(), &config.keys.read, |k| {
        k.read
    })?;
    let mut live_from = i64::MAX;
    let mut samples = Vec::new();
    while Instant::now() < end {
        if live_from == i64::MAX {
            let progress: serde_json::Value =
                match client.get(&url).basic_auth(&read, Some("")).send().await {
                    Ok(response) => response.json().await.unwrap_or_default(),
                    Err(_) => serde_json::Value::Null,
                };
            if progress["progress"]["state"] == "live" {
                live_from = chrono::Utc::now().timestamp_millis() + 1_000;
            }
        }
        let polled = reader
            .poll(1000, Duration::from_millis(20))
            .await
            .map_err(|e| BenchError::Unreachable(topic.clone(), e.to_string()))?;
        let arrived = chrono::Utc::now().timestamp_millis();
        for record in polled.records {
            let Ok(window) = serde_json::from_slice::<serde_json::Value>(&record.value) else {
                continue;
            };
            let window_end = window["end"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.timestamp_millis());
            if window["metric"] == WINDOW_METRIC
                && let Some(window_end) = window_end
                && window_end >= live_from
            {
                let delay = u64::try_from(arrived - window_end).unwrap_or(0);
                samples.push(Duration::from_millis(delay));
            }
        }
    }
    let _ = client
        .delete(&url)
        .basic_auth(&admin, Some(""))
        .send()
        .await;
    Ok(samples)
}

/// Defines the measured rule, waits until it is live, sends a probe
/// event every 100 ms until `end` and takes each one's alert off
/// `user_alerts`; deletes the rule. Each sample is a probe's 2xx to its
/// alert's arrival.
async fn alert_samples(
    config: &Config,
    args: &BenchLatencyArgs,
    client: &reqwest::Client,
    base: &str,
    write: &str,
    end: Instant,
) -> Result<Vec<Duration>, BenchError> {
    let unreachable = |e: String| BenchError::Unreachable(base.to_owned(), e);
    let topic = crate::log::Topics::new(&config.topic_prefix).alerts();
    let url = format!("{base}/v1/rules/{ALERT_RULE}");
    let rule = serde_json::json!({
        "steps": [{"name": "probe", "where": "event == \"bench.alert.probe\""}],
        "within": "1m"});
    let (admin, mut reader) = define(config, args, client, &url, &rule, &topic).await?;
    // Probes start once the rule has read the log's history.
    let live_by = Instant::now() + Duration::from_secs(120);
    loop {
        let ready: serde_json::Value = match client.get(format!("{base}/readyz")).send().await {
            Ok(response) => response.json().await.unwrap_or_default(),
            Err(_) => serde_json::Value::Null,
        };
        if ready["rules"][ALERT_RULE]["state"] == "live" {
            break;
        }
        if Instant::now() > live_by {
            return Err(unreachable(format!(
                "{ALERT_RULE} was not live within 120 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut waiting: std::collections::HashMap<String, Instant> = std::collections::HashMap::new();
    let mut samples = Vec::new();
    let mut probe = 0;
    let mut next_probe = Instant::now();
    // After `end`, a few seconds for the last probes' alerts.
    let drain = end + Duration::from_secs(5);
    while Instant::now() < drain && (Instant::now() < end || !waiting.is_empty()) {
        if Instant::now() >= next_probe && Instant::now() < end {
            probe += 1;
            let user = format!("alert-{run}-{probe}");
            let body = format!(
                r#"{{"userId":"{user}","event":"bench.alert.probe","messageId":"{user}"}}"#
            );
            let answer = client
                .post(format!("{base}/v1/track"))
                .basic_auth(write, Some(""))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            if !answer.status().is_success() {
                return Err(unreachable(format!("a probe got {}", answer.status())));
            }
            waiting.insert(format!("{ALERT_RULE}:{user}"), Instant::now());
            next_probe += Duration::from_millis(100);
        }
        let polled = reader
            .poll(1000, Duration::from_millis(5))
            .await
            .map_err(|e| BenchError::Unreachable(topic.clone(), e.to_string()))?;
        for record in polled.records {
            let key = record.key.as_deref().map(String::from_utf8_lossy);
            if let Some(acknowledged) = key.and_then(|k| waiting.remove(k.as_ref())) {
                samples.push(acknowledged.elapsed());
            }
        }
    }
    if !waiting.is_empty() {
        println!(
            "{} probes' alerts did not arrive within 5 s of the end",
            waiting.len()
        );
    }
    let _ = client
        .delete(&url)
        .basic_auth(&admin, Some(""))
        .send()
        .await;
    Ok(samples)
}
