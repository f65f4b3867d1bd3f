//! Criterion benchmarks of the ingest hot path, without HTTP:
//! parse + check + normalize + serialize a message and a 100-message batch,
//! the murmur2 partitioner, an embedded-log group commit, the profile
//! rules on a batch, a metric's window engine and a rule's pattern engine,
//! parsing a stored event for a set of definitions, and SQLite's write of
//! a backlog's message-id claims.
//!
//! Run: `cargo bench --bench hot_paths`

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::Utc;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use traitline::envelope::EventType;
use traitline::ingest;
use traitline::ingest::segment::{self, Shared};
use traitline::log::embedded::EmbeddedLog;
use traitline::log::partitioner::murmur2;
use traitline::log::{EventLog, Record};
use traitline::profile::{Book, Profile};

/// The binary's allocator, so the figures match the service.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const MESSAGE: &str = r#"{"userId":"user-4711","event":"Product Viewed","messageId":"bench-1","timestamp":"2026-11-21T09:30:00.250Z","sentAt":"2026-11-21T09:30:01Z","properties":{"product":"p-17","price":19.99,"currency":"EUR"},"context":{"library":{"name":"analytics.js","version":"5.0.0"},"locale":"en-GB","userAgent":"Mozilla/5.0"}}"#;

fn batch_body(n: usize) -> String {
    let items: Vec<String> = (0..n)
        .map(|i| {
            MESSAGE
                .replacen(
                    '{',
                    &format!("{{\"type\":\"track\",\"messageId\":\"m{i}\","),
                    1,
                )
                .replace("\"messageId\":\"bench-1\",", "")
        })
        .collect();
    format!(r#"{{"batch":[{}]}}"#, items.join(","))
}

fn normalize(c: &mut Criterion) {
    let mut group = c.benchmark_group("normalize");
    group.throughput(Throughput::Elements(1));
    group.bench_function("track", |b| {
        b.iter(|| {
            let message = segment::parse_message(MESSAGE.as_bytes()).unwrap();
            let event =
                segment::normalize(message, EventType::Track, &Shared::default(), Utc::now())
                    .unwrap();
            ingest::record(event, MESSAGE.len()).unwrap()
        })
    });
    let body = batch_body(100);
    group.throughput(Throughput::Elements(100));
    group.bench_function("batch_100", |b| {
        b.iter(|| {
            let batch = segment::parse_batch(body.as_bytes()).unwrap();
            segment::normalize_batch_into(&batch, 32 * 1024, Utc::now(), ingest::record).unwrap()
        })
    });
    group.finish();
}

/// A stored track event as analytics.js sends it, its `context` most of
/// its bytes: what a set of definitions parses once an event.
const STORED_EVENT: &str = r#"{"type":"track","event":"Order Completed","userId":"user-4711","anonymousId":"a6f1c2d4-5e3b-4f7a-9c1d-2b8e0f6a7d35","messageId":"ajs-next-1732181400250-5e3b4f7a","timestamp":"2026-11-21T09:30:00.250Z","originalTimestamp":"2026-11-21T09:30:01.002Z","sentAt":"2026-11-21T09:30:01.010Z","receivedAt":"2026-11-21T09:30:00.258Z","properties":{"order_id":"o-50314","total":27.5,"revenue":25.0,"currency":"EUR","products":[{"product_id":"p-17","sku":"45790-32","name":"Monopoly","price":19.99,"quantity":1},{"product_id":"p-18","sku":"46493-32","name":"Uno","price":7.51,"quantity":1}]},"context":{"library":{"name":"analytics.js","version":"next-1.70.0"},"page":{"path":"/checkout","referrer":"https://shop.example.com/cart","search":"","title":"Checkout","url":"https://shop.example.com/checkout"},"userAgent":"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36","userAgentData":{"brands":[{"brand":"Chromium","version":"131"},{"brand":"Google Chrome","version":"131"}],"mobile":false,"platform":"macOS"},"locale":"en-GB","timezone":"Europe/London","ip":"203.0.113.7","campaign":{"name":"winter","source":"newsletter","medium":"email"},"screen":{"width":1512,"height":982,"density":2}},"integrations":{}}"#;

fn event_reads(c: &mut Criterion) {
    use traitline::definitions::{Envelope, Reads};
    let mut group = c.benchmark_group("event_reads");
    group.throughput(Throughput::Elements(1));
    let every = Reads::of(traitline::definitions::HEAD);
    for (name, reads) in [
        ("whole", Reads::ALL),
        ("properties", every.with(Reads::of(["properties"]))),
        ("head_only", every),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| Envelope::parse(STORED_EVENT.as_bytes(), reads).unwrap())
        });
    }
    group.finish();
}

fn partitioner(c: &mut Criterion) {
    c.bench_function("murmur2/user_id", |b| b.iter(|| murmur2(b"user-4711-2f9c")));
}

fn embedded_append(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(EmbeddedLog::open(dir.path(), 8, &["user_events".to_owned()]).unwrap());
    let mut group = c.benchmark_group("embedded_append");
    for (requests, per_request) in [(1usize, 1usize), (64, 1), (1, 100)] {
        group.throughput(Throughput::Elements((requests * per_request) as u64));
        group.bench_with_input(
            BenchmarkId::new("requests_x_events", format!("{requests}x{per_request}")),
            &(requests, per_request),
            |b, &(requests, per_request)| {
                b.to_async(&runtime).iter(|| {
                    let log = log.clone();
                    async move {
                        let appends = (0..requests).map(|r| {
                            let records = (0..per_request)
                                .map(|i| Record {
                                    key: Some(format!("user-{r}-{i}")),
                                    value: MESSAGE.as_bytes().to_vec(),
                                })
                                .collect();
                            let log = log.clone();
                            async move { log.append("user_events", records).await.unwrap() }
                        });
                        futures_join_all(appends).await;
                    }
                })
            },
        );
    }
    group.finish();
}

/// Awaits all futures concurrently (a tiny join_all, to keep dependencies few).
async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    for handle in handles {
        handle.await.unwrap();
    }
}

/// The profile rules on a batch: identity resolution, applying 1,000
/// events to 100 users' profiles, and the change records; and the JSON
/// round trip of a profile's state, which the store pays per profile.
fn profiles(c: &mut Criterion) {
    let events: Vec<_> = (0..1000)
        .map(|n| traitline::bench::process::event(n, 100))
        .collect();
    let mut group = c.benchmark_group("profile");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("apply_1000_events_100_users", |b| {
        b.iter(|| {
            let mut book = Book::default();
            for event in &events {
                book.apply(event);
            }
            book.finish()
        })
    });
    let mut book = Book::default();
    for event in &events {
        book.apply(event);
    }
    let (_, profile) = book.finish().profiles.swap_remove(0);
    group.throughput(Throughput::Elements(1));
    group.bench_function("state_json_round_trip", |b| {
        b.iter(|| {
            let text = serde_json::to_string(&profile).unwrap();
            serde_json::from_str::<Profile>(&text).unwrap()
        })
    });
    group.finish();
}

/// The processor's own work on one 5,000-event batch over 10,000 users,
/// as the store does it in a transaction, without the database: parse the
/// stored state of each profile the batch touches, apply the events, and
/// write each changed profile's state and its change record (the views
/// before and after, the causes) as JSON.
fn profile_batch(c: &mut Criterion) {
    const USERS: usize = 10_000;
    let mut book = Book::default();
    for n in 0..50_000 {
        book.apply(&traitline::bench::process::event(n, USERS));
    }
    let stored: HashMap<String, String> = book
        .finish()
        .profiles
        .into_iter()
        .map(|(id, profile)| (id, serde_json::to_string(&profile).unwrap()))
        .collect();
    let events: Vec<_> = (50_000..55_000)
        .map(|n| traitline::bench::process::event(n, USERS))
        .collect();
    let mut group = c.benchmark_group("profile");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.sample_size(20);
    group.bench_function("batch_5000_events_10000_users_with_state_json", |b| {
        b.iter(|| {
            let mut book = Book::default();
            let ids: HashSet<&str> = events.iter().flat_map(Book::ids_of).collect();
            for id in ids {
                match stored.get(id) {
                    Some(state) => {
                        book.load_profile(id.to_owned(), serde_json::from_str(state).unwrap())
                    }
                    None => book.load_id(id.to_owned(), None),
                }
            }
            for event in &events {
                book.apply(event);
            }
            let applied = book.finish();
            let mut bytes = 0;
            for (_, profile) in &applied.profiles {
                bytes += serde_json::to_string(profile).unwrap().len();
            }
            for change in &applied.changes {
                bytes += change.before.as_ref().map_or(0, String::len);
                bytes += change.after.as_ref().map_or(0, String::len);
                bytes += serde_json::to_string(&change.causes).unwrap().len();
            }
            bytes
        })
    });
    group.finish();
}

/// A metric's CPU work on 10,000 events of 1,000 users (parsed, as the
/// metrics processor hands them over): selection with a CEL condition, the
/// group, the event time, the window engine, and the windows closed at
/// the end; for three window kinds.
fn metrics(c: &mut Criterion) {
    use traitline::definitions::{Envelope, MetricDefinition, Reads};
    use traitline::metric::Metric;
    let events: Vec<String> = (0..10_000)
        .map(|i| {
            let at = 1_790_000_000_000_i64 + i * 3_600;
            serde_json::json!({
                "type": "track", "event": "order.create", "userId": format!("u{}", i % 1000),
                "messageId": format!("m{i}"),
                "timestamp": chrono::DateTime::<Utc>::from_timestamp_millis(at).unwrap().to_rfc3339(),
                "properties": {"amount": (i % 500) as f64 * 0.5, "country": "DE"}
            })
            .to_string()
        })
        .collect();
    let envelopes: Vec<Envelope> = events
        .iter()
        .map(|event| Envelope::parse(event.as_bytes(), Reads::of(["properties"])).unwrap())
        .collect();
    let mut group = c.benchmark_group("metric");
    group.throughput(Throughput::Elements(events.len() as u64));
    for (name, window) in [
        (
            "tumbling_1h_sum",
            serde_json::json!({"kind": "tumbling", "size": "1h"}),
        ),
        (
            "hopping_5m_1m_sum",
            serde_json::json!({"kind": "hopping", "size": "5m", "slide": "1m"}),
        ),
        (
            "trailing_30d_sum",
            serde_json::json!({"kind": "trailing", "size": "30d", "step": "1d"}),
        ),
        (
            "tumbling_1h_sum_no_where",
            serde_json::json!({"kind": "tumbling", "size": "1h"}),
        ),
    ] {
        let mut definition = serde_json::json!({
            "event": "order.create", "where": "properties.amount > 10",
            "group_by": "userId", "aggregate": "sum", "field": "properties.amount",
            "window": window
        });
        if name.ends_with("no_where") {
            definition.as_object_mut().unwrap().remove("where");
        }
        let definition: MetricDefinition = serde_json::from_value(definition).unwrap();
        let spec = definition.compile("bench").unwrap();
        group.bench_function(format!("10000_events_1000_users_{name}"), |b| {
            b.iter(|| {
                let mut metric = Metric::new(spec.clone(), 1);
                for event in &envelopes {
                    metric.observe(event);
                }
                metric.advance(i64::MAX / 2).len()
            })
        });
    }
    group.finish();
}

/// One pattern rule's CPU work on 10,000 parsed events of 1,000 users, as
/// the rules processor does it: which steps' conditions each event meets,
/// the engine (every event waits for the watermark, then is taken in
/// event-time order), and each changed key's state serialized for the
/// store. `views_then_identify` starts a partial match at every view and
/// keeps them (three or more views, then an identify, within 10
/// minutes); `fraud` is seed 004's rule (three small payments, then a
/// large one, within 5 minutes).
fn patterns(c: &mut Criterion) {
    use traitline::definitions::RuleDefinition;
    use traitline::patterns::{Engine, Input};
    let events: Vec<serde_json::Value> = (0..10_000)
        .map(|i| {
            let at = 1_790_000_000_000_i64 + i * 10;
            // Each user's ten events, a round of the users each: views,
            // an identify in rounds 3 and 7, a large amount in 4 and 9.
            let round = i / 1000;
            let (kind, event) = if round % 4 == 3 {
                ("identify", None)
            } else {
                ("track", Some("view"))
            };
            let amount = if round % 5 == 4 { 2000 } else { 20 };
            serde_json::json!({
                "type": kind, "event": event, "userId": format!("u{}", i % 1000),
                "messageId": format!("m{i}"), "at": at,
                "properties": {"amount": amount}
            })
        })
        .collect();
    let mut group = c.benchmark_group("pattern");
    group.throughput(Throughput::Elements(events.len() as u64));
    for (name, rule) in [
        (
            "views_then_identify",
            r#"{"steps": [{"name": "view", "where": "event == \"view\"", "times": {"min": 3}}, {"name": "identify", "where": "type == \"identify\""}], "within": "10m"}"#,
        ),
        (
            "fraud",
            r#"{"steps": [{"name": "small", "where": "event == \"view\" && properties.amount < 100", "times": {"min": 3}}, {"name": "large", "where": "event == \"view\" && properties.amount > 1000"}], "within": "5m"}"#,
        ),
    ] {
        let spec = RuleDefinition::from_json(rule.as_bytes())
            .and_then(|d| d.compile(name))
            .unwrap();
        group.bench_function(format!("10000_events_1000_users_{name}"), |b| {
            b.iter(|| {
                let mut engine = Engine::new(spec.pattern.clone());
                for event in &events {
                    let meets = spec
                        .conditions
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| c.matches(event))
                        .fold(0u64, |bits, (i, _)| bits | 1 << i);
                    if meets == 0 {
                        continue;
                    }
                    let input = Input {
                        time: event["at"].as_i64().unwrap(),
                        id: event["messageId"].as_str().unwrap().into(),
                        meets,
                        values: None,
                    };
                    engine.observe(event["userId"].as_str().unwrap(), input);
                }
                let matches = engine.advance(1_790_000_000_000 + 100_000).len();
                let stored: usize = engine
                    .take_changed()
                    .iter()
                    .filter_map(|key| engine.state(key))
                    .map(|state| serde_json::to_string(state).unwrap().len())
                    .sum();
                (matches, stored)
            })
        });
    }
    group.finish();
}

/// What a webhook delivery costs before the request: the Standard
/// Webhooks signature of one ~330-byte event (one secret, and two during
/// a rotation), and the address check of a resolved name.
fn destinations(c: &mut Criterion) {
    use traitline::destinations::{address, signature};
    let body = MESSAGE;
    let mut group = c.benchmark_group("destinations");
    group.throughput(Throughput::Elements(1));
    for keys in [1, 2] {
        let secrets: Vec<Vec<u8>> = (0..keys).map(|k| vec![k as u8; 24]).collect();
        group.bench_with_input(BenchmarkId::new("sign", keys), &secrets, |b, secrets| {
            b.iter(|| {
                signature::sign(
                    secrets,
                    "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W",
                    1_733_300_000,
                    body.as_bytes(),
                )
            })
        });
    }
    let addresses: Vec<std::net::IpAddr> = [
        "93.184.216.34",
        "10.0.0.1",
        "::ffff:127.0.0.1",
        "2606:4700::1111",
    ]
    .iter()
    .map(|a| a.parse().unwrap())
    .collect();
    group.throughput(Throughput::Elements(addresses.len() as u64));
    group.bench_function("address_check", |b| {
        b.iter(|| {
            addresses
                .iter()
                .filter(|a| address::forbidden(**a).is_some())
                .count()
        })
    });
    group.finish();
}

/// A backlog's held message-id claims written to SQLite at once (as
/// `Set::write_pending` does): 100,000 ids, sorted, into a store holding
/// 100,000 claims of the ids between them, as a second hold of the
/// bench's ids lands among the first's.
fn claims(c: &mut Criterion) {
    const CLAIMS: usize = 100_000;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let ids = |parity: usize| -> Vec<String> {
        let mut ids: Vec<String> = (0..CLAIMS)
            .map(|n| format!("bench-1a2b3c4d-{}-{}", n % 4, 2 * n + parity))
            .collect();
        ids.sort();
        ids
    };
    let (before, held) = (ids(0), ids(1));
    let positioned = |ids: &[String]| -> Vec<(String, i32, i64, i64)> {
        ids.iter()
            .enumerate()
            .map(|(n, id)| (id.clone(), (n % 8) as i32, n as i64, 1_764_000_000_000))
            .collect()
    };
    let (before, held) = (positioned(&before), positioned(&held));
    fn borrowed(claims: &[(String, i32, i64, i64)]) -> Vec<(&str, i32, i64, i64)> {
        claims
            .iter()
            .map(|(id, p, o, r)| (id.as_str(), *p, *o, *r))
            .collect()
    }
    let mut group = c.benchmark_group("claims");
    group.sample_size(10);
    group.throughput(Throughput::Elements(CLAIMS as u64));
    group.bench_function("sqlite_100000_among_100000", |b| {
        b.iter_batched(
            || {
                runtime.block_on(async {
                    let dir = tempfile::tempdir().unwrap();
                    let store = traitline::store::Store::open(None, dir.path())
                        .await
                        .unwrap();
                    store
                        .claim_metric_ids("metrics", &borrowed(&before))
                        .await
                        .unwrap();
                    (dir, store)
                })
            },
            |(dir, store)| {
                runtime.block_on(async {
                    store
                        .claim_metric_ids("metrics", &borrowed(&held))
                        .await
                        .unwrap();
                });
                (dir, store)
            },
            criterion::BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(
    benches,
    claims,
    destinations,
    normalize,
    event_reads,
    partitioner,
    embedded_append,
    profiles,
    profile_batch,
    metrics,
    patterns
);
criterion_main!(benches);
