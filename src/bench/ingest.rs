//! `traitline bench ingest`: a load generator for a running service.
//!
//! It keeps `--concurrency` requests in flight for `--duration-secs`
//! (after a warm-up that is not counted), each a single `track` event or a
//! `/v1/batch` of `--batch-size` events, and reports requests/s, events/s,
//! latency percentiles and any non-2xx answers.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::config::Config;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchIngestArgs {
    /// Base URL of the service
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Write key [default: the first configured write key, else the one
    /// generated in the data directory]
    #[arg(long, env = "TRAITLINE_BENCH_WRITE_KEY")]
    pub write_key: Option<String>,
    /// Requests in flight at once (connections)
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Measured seconds
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Seconds of load before measuring
    #[arg(long, default_value_t = 2)]
    pub warmup_secs: u64,
    /// Events a request: 1 sends /v1/track, more sends /v1/batch
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Distinct user ids the events spread over
    #[arg(long, default_value_t = 10_000)]
    pub users: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(
        "no API key: pass --write-key / --read-key, or run where the service's data directory is"
    )]
    NoKey,
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    #[error("the service at {0} did not accept a single request: {1}")]
    Unreachable(String, String),
}

/// The outcome of one run.
#[derive(Debug, Default)]
pub struct Report {
    pub requests: u64,
    pub events: u64,
    pub elapsed: Duration,
    /// Latencies of successful requests, microseconds, sorted.
    pub latencies_us: Vec<u32>,
    /// Answers other than 2xx, by status (0: transport error).
    pub failures: BTreeMap<u16, u64>,
}

impl Report {
    fn percentile(&self, p: f64) -> Duration {
        if self.latencies_us.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        Duration::from_micros(u64::from(self.latencies_us[i]))
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        writeln!(
            f,
            "requests: {} ({:.0}/s)   events: {} ({:.0}/s)",
            self.requests,
            self.requests as f64 / secs,
            self.events,
            self.events as f64 / secs
        )?;
        writeln!(
            f,
            "latency: p50 {:.2} ms   p90 {:.2} ms   p99 {:.2} ms   max {:.2} ms",
            ms(self.percentile(0.50)),
            ms(self.percentile(0.90)),
            ms(self.percentile(0.99)),
            ms(self.percentile(1.0))
        )?;
        if self.failures.is_empty() {
            write!(f, "failures: none")
        } else {
            write!(f, "failures (status: count): {:?}", self.failures)
        }
    }
}

fn write_key(config: &Config, args: &BenchIngestArgs) -> Result<String, BenchError> {
    super::key(config, args.write_key.as_ref(), &config.keys.write, |k| {
        k.write
    })
}

/// One request body: a `track` event, or a batch of them.
fn body(batch_size: usize, users: u64, run: &str, worker: usize, seq: u64) -> String {
    let event = |i: usize| {
        let n = seq * batch_size as u64 + i as u64;
        let user = (n.wrapping_mul(2_654_435_761) ^ worker as u64) % users.max(1);
        format!(
            r#"{{"type":"track","userId":"user-{user}","event":"bench.product.view","messageId":"{run}-{worker}-{n}","properties":{{"product":"p-{}","price":19.99,"currency":"EUR"}},"context":{{"library":{{"name":"traitline-bench","version":"1"}},"client_os":"iOS","client_version":"1.0.0"}}}}"#,
            n % 1000
        )
    };
    if batch_size <= 1 {
        event(0)
    } else {
        let events: Vec<String> = (0..batch_size).map(event).collect();
        format!(r#"{{"batch":[{}]}}"#, events.join(","))
    }
}

/// Runs the load and prints the report.
pub async fn run_ingest(config: &Config, args: BenchIngestArgs) -> Result<(), BenchError> {
    let key = write_key(config, &args)?;
    // One thread, like wrk -t1: the client leaves the other core to the
    // service instead of contending for both.
    let report = {
        let args = args.clone();
        tokio::task::spawn_blocking(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| BenchError::Client(e.to_string()))?
                .block_on(load(&args, &key))
        })
        .await
        .map_err(|e| BenchError::Client(e.to_string()))??
    };
    let route = if args.batch_size <= 1 {
        "/v1/track"
    } else {
        "/v1/batch"
    };
    println!(
        "{} {route}: {} connections, {} event(s) a request, {} s measured",
        args.url,
        args.concurrency,
        args.batch_size.max(1),
        args.duration_secs
    );
    println!("{report}");
    Ok(())
}

/// Drives the load and collects the measured part.
pub async fn load(args: &BenchIngestArgs, key: &str) -> Result<Report, BenchError> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| BenchError::Client(e.to_string()))?;
    let route = if args.batch_size <= 1 {
        "/v1/track"
    } else {
        "/v1/batch"
    };
    let url = format!("{}{route}", args.url.trim_end_matches('/'));
    let run = format!("bench-{}", uuid::Uuid::new_v4().simple());

    // One request first, so a wrong URL or key fails fast and clearly.
    let probe = client
        .post(&url)
        .basic_auth(key, Some(""))
        .header("content-type", "application/json")
        .body(body(args.batch_size, args.users, &run, usize::MAX, 0))
        .send()
        .await
        .map_err(|e| BenchError::Unreachable(url.clone(), e.to_string()))?;
    if probe.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE {
        // Reachable and authenticated, but its log is not taking events:
        // go on (an overload test wants exactly that) and count the 503s.
        tracing::warn!("the service answered the first request 503; measuring anyway");
    } else if !probe.status().is_success() {
        let status = probe.status();
        let text = probe.text().await.unwrap_or_default();
        return Err(BenchError::Unreachable(url, format!("{status}: {text}")));
    }

    let target = Target::new(&url, key)?;
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(args.warmup_secs);
    let end = measure_from + Duration::from_secs(args.duration_secs);
    let mut workers = Vec::with_capacity(args.concurrency);
    for worker in 0..args.concurrency {
        let target = target.clone();
        let run = run.clone();
        let (batch_size, users) = (args.batch_size, args.users);
        workers.push(tokio::spawn(async move {
            let mut report = Report::default();
            let mut connection: Option<Connection> = None;
            let mut seq = 1u64;
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let request = target.request(&body(batch_size, users, &run, worker, seq));
                seq += 1;
                let status = match send(&target, &mut connection, &request).await {
                    Ok(status) => status,
                    Err(_) => {
                        connection = None; // reconnect on the next request
                        0
                    }
                };
                let done = Instant::now();
                if sent < measure_from || done > end {
                    continue;
                }
                if (200..300).contains(&status) {
                    report.requests += 1;
                    report.events += batch_size.max(1) as u64;
                    report
                        .latencies_us
                        .push((done - sent).as_micros().min(u32::MAX as u128) as u32);
                } else {
                    *report.failures.entry(status).or_default() += 1;
                }
            }
            report
        }));
    }
    let mut total = Report::default();
    for worker in workers {
        if let Ok(report) = worker.await {
            total.requests += report.requests;
            total.events += report.events;
            total.latencies_us.extend(report.latencies_us);
            for (status, n) in report.failures {
                *total.failures.entry(status).or_default() += n;
            }
        }
    }
    total.elapsed = Duration::from_secs(args.duration_secs);
    total.latencies_us.sort_unstable();
    Ok(total)
}

/// Where the load goes, and the request head every request shares.
#[derive(Clone)]
struct Target {
    address: String,
    /// `POST <path> HTTP/1.1` and the fixed headers, up to `Content-Length: `.
    head: std::sync::Arc<Vec<u8>>,
}

impl Target {
    fn new(url: &str, key: &str) -> Result<Target, BenchError> {
        use base64::Engine;
        let parsed = reqwest::Url::parse(url).map_err(|e| BenchError::Client(e.to_string()))?;
        if parsed.scheme() != "http" {
            return Err(BenchError::Client(format!(
                "the load generator speaks plain http, not {}",
                parsed.scheme()
            )));
        }
        let host = parsed.host_str().unwrap_or("127.0.0.1");
        let port = parsed.port_or_known_default().unwrap_or(80);
        let credentials = base64::engine::general_purpose::STANDARD.encode(format!("{key}:"));
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Basic {credentials}\r\nContent-Type: application/json\r\nContent-Length: ",
            parsed.path()
        );
        Ok(Target {
            address: format!("{host}:{port}"),
            head: std::sync::Arc::new(head.into_bytes()),
        })
    }

    /// The bytes of one request with `body`.
    fn request(&self, body: &str) -> Vec<u8> {
        let mut request = Vec::with_capacity(self.head.len() + 24 + body.len());
        request.extend_from_slice(&self.head);
        request.extend_from_slice(body.len().to_string().as_bytes());
        request.extend_from_slice(b"\r\n\r\n");
        request.extend_from_slice(body.as_bytes());
        request
    }
}

/// One keep-alive HTTP/1.1 connection. The load generator shares the
/// machine with the service, so it speaks just enough HTTP to send a
/// request and read its answer, as wrk does, and leaves the CPU to the
/// service.
struct Connection {
    stream: tokio::net::TcpStream,
    buffer: Vec<u8>,
}

/// Sends `request` on `connection` (opened first if there is none) and
/// reads the answer's status.
async fn send(
    target: &Target,
    connection: &mut Option<Connection>,
    request: &[u8],
) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if connection.is_none() {
        let stream = tokio::net::TcpStream::connect(&target.address).await?;
        stream.set_nodelay(true)?;
        *connection = Some(Connection {
            stream,
            buffer: Vec::with_capacity(4096),
        });
    }
    let Connection { stream, buffer } = connection.as_mut().expect("opened above");
    stream.write_all(request).await?;
    buffer.clear();
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head_len) = response
            .parse(buffer)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?
        {
            let status = response.code.unwrap_or(0);
            let length: usize = response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                .unwrap_or(0);
            while buffer.len() < head_len + length {
                if stream.read_buf(buffer).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
            return Ok(status);
        }
        if stream.read_buf(buffer).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}
