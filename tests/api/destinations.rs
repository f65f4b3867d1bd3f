//! Destinations end to end: webhooks defined through the admin API deliver
//! every matching record to a receiver in the test, which checks each
//! request's Standard Webhooks signature with an independent
//! implementation (the `standardwebhooks` crate); a receiver that fails
//! half the time or is down for a while loses nothing; a dead one makes
//! dead letters after the budget; a 410 disables; private addresses and
//! redirects to them are refused; secrets are never shown.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use reqwest::Method;
use serde_json::{Value, json};
use traitline::log::Topics;

use crate::helpers::{
    ADMIN_KEY, Backend, READ_KEY, ServiceProcess, TestApp, TestDir, WRITE_KEY, embedded_env,
    env_refs, eventually, read_all, send, spawn_app_with,
};

both_logs!(
    every_matching_event_is_delivered_signed_through_a_flaky_and_a_down_receiver,
    per_user_order_holds_for_a_delayed_user_and_others_go_on
);

/// Scenarios whose point does not depend on the log or the store: run on
/// the embedded deployment.
macro_rules! embedded_only {
    ($($name:ident),* $(,)?) => {
        mod embedded_only {
            use crate::helpers::Backend;
            $( #[tokio::test] async fn $name() { super::$name(Backend::Embedded).await } )*
        }
    };
}

embedded_only!(
    a_dead_endpoint_makes_dead_letters_after_the_budget,
    an_endpoint_answering_410_disables_its_destination_until_it_changes,
    a_replay_of_the_log_backfills_a_destination_added_later,
    alerts_reach_a_destination_that_reads_user_alerts,
    records_go_in_signed_batches_up_to_the_batch_size,
    a_failing_endpoint_is_paused_and_probed_then_resumes,
    private_addresses_and_redirects_to_them_are_refused,
    an_endpoint_that_never_answers_times_out_and_holds_up_no_other_destination,
);

/// Serves a test receiver on a free port; its address.
async fn serve(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    address
}

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// How the receiver answers.
const HEALTHY: u8 = 0;
/// Every other attempt fails (503), by a hash of the id and attempt.
const FLAKY: u8 = 1;
const DOWN: u8 = 2;
const GONE: u8 = 3;
/// 302 to the cloud metadata address.
const REDIRECT: u8 = 4;

#[derive(Default)]
struct Seen {
    /// Every request's `webhook-id`, in arrival order.
    attempts: Vec<String>,
    /// Ids answered 2xx, with their bodies.
    delivered: BTreeMap<String, Value>,
    /// How many times each id was answered 2xx.
    delivered_times: BTreeMap<String, usize>,
    /// Requests whose signature did not verify.
    bad_signatures: usize,
    in_flight: usize,
    /// Since [`Receiver::mark`]: requests, and most in flight at once.
    since_mark: usize,
    most_in_flight_since_mark: usize,
}

#[derive(Clone)]
struct Receiver {
    mode: Arc<AtomicU8>,
    seen: Arc<Mutex<Seen>>,
    verifier: Arc<standardwebhooks::Webhook>,
}

impl Receiver {
    async fn start(mode: u8) -> (Receiver, SocketAddr) {
        let receiver = Receiver {
            mode: Arc::new(AtomicU8::new(mode)),
            seen: Arc::default(),
            verifier: Arc::new(standardwebhooks::Webhook::new(SECRET).unwrap()),
        };
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(receiver.clone());
        let address = serve(app).await;
        (receiver, address)
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    fn seen<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.seen.lock().unwrap())
    }

    /// Waits until the count of ids answered 2xx is `enough`.
    async fn wait_delivered(&self, what: &str, deadline: Duration, enough: impl Fn(usize) -> bool) {
        eventually(what, deadline, || async {
            let delivered = self.seen(|s| s.delivered.len());
            enough(delivered)
                .then_some(())
                .ok_or(format!("{delivered} delivered"))
        })
        .await
    }

    fn mark(&self) {
        let mut seen = self.seen.lock().unwrap();
        seen.since_mark = 0;
        seen.most_in_flight_since_mark = 0;
    }
}

async fn receive(
    State(receiver): State<Receiver>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, HeaderMap, &'static str) {
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let mode = receiver.mode.load(Ordering::SeqCst);
    let tries = {
        let mut seen = receiver.seen.lock().unwrap();
        if receiver.verifier.verify(&body, &headers).is_err() {
            seen.bad_signatures += 1;
            return (StatusCode::UNAUTHORIZED, HeaderMap::new(), "bad signature");
        }
        seen.attempts.push(id.clone());
        seen.in_flight += 1;
        seen.since_mark += 1;
        seen.most_in_flight_since_mark = seen.most_in_flight_since_mark.max(seen.in_flight);
        seen.attempts.iter().filter(|a| **a == id).count()
    };
    if mode == DOWN {
        // Slow to fail, so attempts that overlap show.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut seen = receiver.seen.lock().unwrap();
    seen.in_flight -= 1;
    let mut answer = HeaderMap::new();
    let status = match mode {
        HEALTHY => StatusCode::OK,
        FLAKY if (tries + id.len()) % 2 == 0 => StatusCode::SERVICE_UNAVAILABLE,
        FLAKY => StatusCode::OK,
        DOWN => StatusCode::SERVICE_UNAVAILABLE,
        GONE => StatusCode::GONE,
        _ => {
            answer.insert(
                "location",
                "http://169.254.169.254/latest/meta-data/".parse().unwrap(),
            );
            StatusCode::FOUND
        }
    };
    if status.is_success() {
        *seen.delivered_times.entry(id.clone()).or_default() += 1;
        seen.delivered
            .insert(id, serde_json::from_slice(&body).unwrap_or(Value::Null));
    }
    (status, answer, "answered")
}

async fn define(app: &TestApp, name: &str, body: &Value) -> Value {
    let (status, stored) = send(
        app,
        Method::PUT,
        &format!("/v1/destinations/{name}"),
        ADMIN_KEY,
        Some(body),
    )
    .await;
    assert!(status.is_success(), "{status}: {stored}");
    stored
}

async fn status_of(app: &TestApp, name: &str) -> Value {
    let shown = read(app, &format!("/v1/destinations/{name}")).await;
    assert!(shown["status"].is_object(), "{shown}");
    shown["status"].clone()
}

/// A receiver in `mode`, a service allowed to reach it, and destination
/// `name` (the webhook of [`webhook`] with `extra`) delivering to it;
/// with the receiver's address and what the service stored.
async fn delivering_to(
    backend: Backend,
    mode: u8,
    name: &str,
    extra: Value,
) -> (Receiver, SocketAddr, TestApp, Value) {
    let (receiver, address) = Receiver::start(mode).await;
    let app = spawn_app_with(backend, |s| s.destinations_allow_private = Some(true)).await;
    let stored = define(&app, name, &webhook(address, extra)).await;
    wait_active(&app, name).await;
    (receiver, address, app, stored)
}

/// Waits until destination `name` delivers: records the log stores
/// before are not its own.
async fn wait_active(app: &TestApp, name: &str) {
    eventually(
        "the destination active",
        Duration::from_secs(10),
        || async { status_of(app, name).await["state"] == json!("active") },
    )
    .await
}

/// GETs `path` with the read key; the answer's body.
async fn read(app: &TestApp, path: &str) -> Value {
    send(app, Method::GET, path, READ_KEY, None).await.1
}

/// Waits for destination `name`'s first attempt to be listed.
async fn first_attempt(app: &TestApp, name: &str, what: &str) -> Value {
    let path = format!("/v1/destinations/{name}/attempts");
    eventually(what, Duration::from_secs(20), || async {
        read(app, &path).await["attempts"]
            .as_array()
            .and_then(|a| a.first().cloned())
    })
    .await
}

/// Asks for a replay of destination `name` and waits until it is done;
/// the replay as listed.
async fn replay_to_end(app: &TestApp, name: &str, request: Value) -> Value {
    let (status, asked) = send(
        app,
        Method::POST,
        &format!("/v1/destinations/{name}/replay"),
        ADMIN_KEY,
        Some(&request),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{asked}");
    let path = format!("/v1/destinations/{name}/replays");
    eventually("the replay done", Duration::from_secs(30), || async {
        let first = read(app, &path).await["replays"][0].clone();
        (first["state"] == json!("done")).then_some(first)
    })
    .await
}

/// Sends `events` track events of `event` for users `{tag}-u0` to
/// `{tag}-u9`; their message ids.
async fn track(app: &TestApp, event: &str, events: usize, tag: &str) -> Vec<String> {
    let batch: Vec<Value> = (0..events)
        .map(|i| {
            json!({"type": "track", "event": event, "userId": format!("{tag}-u{}", i % 10),
                   "messageId": format!("{tag}-{i}"), "properties": {"i": i}})
        })
        .collect();
    let response = app.post("/v1/batch", &json!({"batch": batch})).await;
    assert!(response.status().is_success(), "{}", response.status());
    (0..events).map(|i| format!("{tag}-{i}")).collect()
}

fn webhook(address: SocketAddr, extra: Value) -> Value {
    let mut body = json!({"kind": "webhook", "source": "user_events",
        "url": format!("http://{address}/hook"), "secret": SECRET,
        "backoff": "20ms", "backoff_max": "100ms"});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

async fn every_matching_event_is_delivered_signed_through_a_flaky_and_a_down_receiver(
    backend: Backend,
) {
    let (receiver, _, app, stored) = delivering_to(
        backend,
        FLAKY,
        "crm",
        json!({"where": "event == \"order.create\""}),
    )
    .await;
    assert_eq!(
        stored["definition"]["secret"],
        json!("whsec_********"),
        "{stored}"
    );
    assert!(
        !stored.to_string().contains("MfKQ9r8"),
        "the secret is never shown"
    );

    // Half the attempts fail.
    let mut orders = track(&app, "order.create", 40, "flaky").await;
    track(&app, "page.view", 40, "other").await;
    receiver
        .wait_delivered(
            "the orders delivered through the flaky receiver",
            Duration::from_secs(60),
            |n| n >= orders.len(),
        )
        .await;

    // Down for a while: every attempt fails until it is back. Not every
    // event need be tried while it is down: after `OPENS_AFTER` failures
    // in a row the breaker lets one probe through at a time, and which
    // waiting attempt is the probe is not fixed.
    receiver.set(DOWN);
    let down = track(&app, "order.create", 20, "down").await;
    eventually(
        "retries while the receiver is down",
        Duration::from_secs(30),
        || async {
            receiver.seen(|s| {
                let tried: Vec<&String> = s
                    .attempts
                    .iter()
                    .filter(|a| a.starts_with("down"))
                    .collect();
                tried
                    .iter()
                    .any(|a| tried.iter().filter(|b| *b == a).count() > 1)
            })
        },
    )
    .await;
    receiver.set(HEALTHY);
    orders.extend(down);
    receiver
        .wait_delivered("every order delivered", Duration::from_secs(60), |n| {
            n == orders.len()
        })
        .await;

    receiver.seen(|seen| {
        assert_eq!(seen.bad_signatures, 0, "every request verifies");
        let delivered: BTreeSet<&String> = seen.delivered.keys().collect();
        let expected: BTreeSet<&String> = orders.iter().collect();
        assert_eq!(
            delivered, expected,
            "exactly the orders, under their message ids"
        );
        for (id, body) in &seen.delivered {
            assert_eq!(body["messageId"], json!(id), "the body is the event");
            assert_eq!(body["event"], json!("order.create"));
        }
        let retried = seen
            .attempts
            .iter()
            .filter(|a| seen.attempts.iter().filter(|b| b == a).count() > 1)
            .count();
        assert!(
            retried > 0,
            "some ids came again: the same id on every retry"
        );
    });

    // Outcomes are stored just after the receiver answers.
    let status = eventually(
        "every delivery recorded",
        Duration::from_secs(10),
        || async {
            let status = status_of(&app, "crm").await;
            (status["delivered"] == json!(orders.len())).then_some(status)
        },
    )
    .await;
    assert!(status["failed_attempts"].as_i64().unwrap() > 0, "{status}");
    assert_eq!(status["dead_letters"], json!(0), "{status}");
    let attempts = read(&app, "/v1/destinations/crm/attempts?limit=1000").await;
    let outcomes: BTreeSet<&str> = attempts["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["outcome"].as_str())
        .collect();
    assert_eq!(
        outcomes,
        BTreeSet::from(["delivered", "retrying"]),
        "{attempts}"
    );

    // Each outcome is on user_deliveries, keyed by destination and user.
    let topic = Topics::new(&app.config.topic_prefix).deliveries();
    let delivered = eventually(
        "the outcomes on user_deliveries",
        Duration::from_secs(20),
        || async {
            let records = read_all(&app.config, &topic).await;
            let delivered: BTreeSet<String> = records
                .iter()
                .filter_map(|r| serde_json::from_slice::<Value>(&r.value).ok())
                .filter(|v| v["outcome"] == json!("delivered"))
                .map(|v| v["delivery_id"].as_str().unwrap_or_default().to_owned())
                .collect();
            (delivered.len() == orders.len()).then_some(records)
        },
    )
    .await;
    let key = String::from_utf8(delivered[0].key.as_deref().unwrap().to_vec()).unwrap();
    assert!(key.starts_with("crm:") && key.contains("-u"), "{key}");
    app.stop().await;
}

async fn a_dead_endpoint_makes_dead_letters_after_the_budget(backend: Backend) {
    let (receiver, _, app, _) =
        delivering_to(backend, DOWN, "dead", json!({"retry_for": "300ms"})).await;
    let sent = track(&app, "order.create", 3, "dead").await;
    let failures = eventually("three dead letters", Duration::from_secs(30), || async {
        let failures = read(&app, "/v1/destinations/dead/failures").await;
        let list = failures["failures"].as_array().cloned().unwrap_or_default();
        (list.len() == 3).then_some(list)
    })
    .await;
    let ids: BTreeSet<&str> = failures
        .iter()
        .filter_map(|f| f["delivery_id"].as_str())
        .collect();
    assert_eq!(ids, sent.iter().map(String::as_str).collect());
    for failure in &failures {
        assert!(failure["attempts"].as_i64().unwrap() >= 2, "{failure}");
        assert_eq!(
            failure["record"]["event"],
            json!("order.create"),
            "{failure}"
        );
        assert!(
            failure["reason"].as_str().unwrap().contains("answered"),
            "{failure}"
        );
    }
    let status = status_of(&app, "dead").await;
    assert_eq!(status["dead_letters"], json!(3), "{status}");
    assert_eq!(status["delivered"], json!(0), "{status}");
    // Given up on is done: the position moves past them.
    eventually(
        "the destination caught up",
        Duration::from_secs(10),
        || async { status_of(&app, "dead").await["lag"] == json!(0) },
    )
    .await;
    assert!(receiver.seen(|s| s.delivered.is_empty()));

    // The endpoint is back: a replay delivers each dead letter once.
    receiver.set(HEALTHY);
    let done = replay_to_end(&app, "dead", json!({})).await;
    assert_eq!(
        (done["delivered"].clone(), done["failed"].clone()),
        (json!(3), json!(0)),
        "{done}"
    );
    receiver.seen(|s| {
        let times: Vec<usize> = sent
            .iter()
            .map(|id| s.delivered_times.get(id).copied().unwrap_or(0))
            .collect();
        assert_eq!(times, vec![1, 1, 1], "each dead letter delivered once");
    });
    eventually("no dead letter left", Duration::from_secs(10), || async {
        let failures = read(&app, "/v1/destinations/dead/failures").await;
        failures["failures"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    let (status, refused) = send(
        &app,
        Method::POST,
        "/v1/destinations/dead/replay",
        ADMIN_KEY,
        Some(&json!({"what": "everything"})),
    )
    .await;
    assert_eq!(
        (status, refused["error"]["field"].clone()),
        (StatusCode::UNPROCESSABLE_ENTITY, json!("what"))
    );
    let (status, _) = send(
        &app,
        Method::POST,
        "/v1/destinations/nowhere/replay",
        ADMIN_KEY,
        Some(&json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    app.stop().await;
}

async fn an_endpoint_answering_410_disables_its_destination_until_it_changes(backend: Backend) {
    let (receiver, address, app, _) = delivering_to(backend, GONE, "gone", json!({})).await;
    let sent = track(&app, "order.create", 5, "gone").await;
    let status = eventually(
        "the destination disabled",
        Duration::from_secs(20),
        || async {
            let status = status_of(&app, "gone").await;
            (status["state"] == json!("disabled")).then_some(status)
        },
    )
    .await;
    assert!(
        status["reason"].as_str().unwrap().contains("410"),
        "{status}"
    );
    let ready = app.get_json("/readyz").await;
    assert_eq!(
        ready["destinations"]["gone"]["state"],
        json!("disabled"),
        "{ready}"
    );
    let attempts_when_disabled = receiver.seen(|s| s.attempts.len());
    // Nothing more goes to it, and nothing was given up on: records stored
    // and processed since are not attempted.
    track(&app, "order.create", 2, "later").await;
    app.wait_for_profile("later-u1", |_| true).await;
    assert_eq!(receiver.seen(|s| s.attempts.len()), attempts_when_disabled);
    assert_eq!(status_of(&app, "gone").await["dead_letters"], json!(0));

    // The endpoint is back and the destination is defined again: every
    // record comes, the ones sent while it was disabled too.
    receiver.set(HEALTHY);
    define(&app, "gone", &webhook(address, json!({"timeout": "5s"}))).await;
    receiver
        .wait_delivered(
            "every record delivered after the change",
            Duration::from_secs(30),
            |n| n == sent.len() + 2,
        )
        .await;
    assert_eq!(status_of(&app, "gone").await["state"], json!("active"));
    app.stop().await;
}

async fn private_addresses_and_redirects_to_them_are_refused(backend: Backend) {
    let (receiver, address) = Receiver::start(HEALTHY).await;
    let app = spawn_app_with(backend, |_| {}).await;
    for url in [
        format!("http://{address}/hook"),
        format!("http://[::ffff:127.0.0.1]:{}/hook", address.port()),
        "http://[::1]/hook".to_owned(),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://10.1.2.3/hook".to_owned(),
    ] {
        let (status, refused) = send(
            &app,
            Method::PUT,
            "/v1/destinations/inside",
            ADMIN_KEY,
            Some(&json!({"kind": "webhook", "source": "user_events", "url": url})),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {refused}");
        assert_eq!(refused["error"]["field"], json!("url"), "{refused}");
    }
    // A name is checked on the addresses it resolves to, when connecting.
    define(
        &app,
        "named",
        &json!({"kind": "webhook", "source": "user_events",
                "url": format!("http://localhost:{}/hook", address.port()),
                "backoff": "20ms", "backoff_max": "50ms", "retry_for": "1h"}),
    )
    .await;
    track(&app, "order.create", 1, "named").await;
    let refused = first_attempt(&app, "named", "an attempt refused at connect time").await;
    let why = refused["response"].as_str().unwrap();
    assert!(
        why.contains("loopback") && why.contains("destinations-allow-private"),
        "{refused}"
    );
    assert_eq!(refused["status"], Value::Null, "{refused}");
    assert!(
        receiver.seen(|s| s.attempts.is_empty()),
        "nothing reached the receiver"
    );
    app.stop().await;

    // Allowed to reach the test's receiver, whose redirect to the metadata
    // address is not followed.
    receiver.set(REDIRECT);
    let app = spawn_app_with(backend, |s| s.destinations_allow_private = Some(true)).await;
    define(&app, "redirected", &webhook(address, json!({}))).await;
    track(&app, "order.create", 1, "redirected").await;
    let attempt = first_attempt(&app, "redirected", "a redirect not followed").await;
    assert_eq!(attempt["status"], json!(302), "{attempt}");
    assert_eq!(attempt["outcome"], json!("retrying"), "{attempt}");
    assert!(
        attempt["response"]
            .as_str()
            .unwrap()
            .contains("not followed"),
        "{attempt}"
    );
    app.stop().await;
}

/// A receiver that holds the requests of user `slow` until the test lets
/// them through (and fails the first), recording each user's arrivals and
/// whether two of a user's requests were ever in flight at once.
#[derive(Clone)]
struct OrderReceiver {
    gate: Arc<tokio::sync::Semaphore>,
    seen: Arc<Mutex<OrderSeen>>,
}

#[derive(Default)]
struct OrderSeen {
    /// Per user, the message ids in the order their requests arrived.
    arrivals: BTreeMap<String, Vec<String>>,
    delivered: BTreeSet<String>,
    in_flight: BTreeMap<String, usize>,
    overlaps: usize,
}

async fn receive_in_order(State(receiver): State<OrderReceiver>, body: Bytes) -> StatusCode {
    let event: Value = serde_json::from_slice(&body).unwrap();
    let user = event["userId"].as_str().unwrap().to_owned();
    let id = event["messageId"].as_str().unwrap().to_owned();
    let first_of_slow = {
        let mut seen = receiver.seen.lock().unwrap();
        let arrivals = seen.arrivals.entry(user.clone()).or_default();
        arrivals.push(id.clone());
        let first = user == "slow" && arrivals.len() == 1;
        let in_flight = seen.in_flight.entry(user.clone()).or_default();
        *in_flight += 1;
        if *in_flight > 1 {
            seen.overlaps += 1;
        }
        first
    };
    if user == "slow" {
        receiver.gate.acquire().await.unwrap().forget();
    }
    let mut seen = receiver.seen.lock().unwrap();
    *seen.in_flight.get_mut(&user).unwrap() -= 1;
    if first_of_slow {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    seen.delivered.insert(id);
    StatusCode::OK
}

async fn per_user_order_holds_for_a_delayed_user_and_others_go_on(backend: Backend) {
    let receiver = OrderReceiver {
        gate: Arc::new(tokio::sync::Semaphore::new(0)),
        seen: Arc::default(),
    };
    let router = axum::Router::new()
        .route("/hook", axum::routing::post(receive_in_order))
        .with_state(receiver.clone());
    let address = serve(router).await;
    let app = spawn_app_with(backend, |s| s.destinations_allow_private = Some(true)).await;
    define(
        &app,
        "ordered",
        &json!({"kind": "webhook", "source": "user_events", "ordering": "per-user",
                "url": format!("http://{address}/hook"), "backoff": "20ms", "backoff_max": "50ms"}),
    )
    .await;
    let event = |user: String, id: String| json!({"type": "track", "event": "order.create", "userId": user, "messageId": id});
    let mut batch = Vec::new();
    for i in 0..5 {
        batch.push(event("slow".into(), format!("s-{i}")));
        for u in 0..10 {
            batch.push(event(format!("fast-{u}"), format!("f-{u}-{i}")));
        }
    }
    let response = app.post("/v1/batch", &json!({"batch": batch})).await;
    assert!(response.status().is_success());

    // Every other user's records arrive while the slow user's first is
    // held, and its next ones wait behind it.
    eventually(
        "the other users delivered",
        Duration::from_secs(30),
        || async {
            let delivered = receiver.seen.lock().unwrap().delivered.len();
            (delivered == 50)
                .then_some(())
                .ok_or(format!("{delivered} delivered"))
        },
    )
    .await;
    assert_eq!(
        receiver.seen.lock().unwrap().arrivals["slow"],
        vec!["s-0"],
        "the slow user's later records wait for its first"
    );

    receiver.gate.add_permits(100);
    eventually(
        "the slow user delivered",
        Duration::from_secs(30),
        || async { receiver.seen.lock().unwrap().delivered.len() == 55 },
    )
    .await;
    let (overlaps, arrivals) = {
        let seen = receiver.seen.lock().unwrap();
        (seen.overlaps, seen.arrivals.clone())
    };
    assert_eq!(overlaps, 0, "one request of a user in flight at a time");
    assert_eq!(
        arrivals["slow"],
        vec!["s-0", "s-0", "s-1", "s-2", "s-3", "s-4"],
        "a failed record is retried before the user's next"
    );
    for u in 0..10 {
        let expected: Vec<String> = (0..5).map(|i| format!("f-{u}-{i}")).collect();
        assert_eq!(arrivals[&format!("fast-{u}")], expected);
    }
    app.stop().await;
}

async fn a_failing_endpoint_is_paused_and_probed_then_resumes(backend: Backend) {
    let (receiver, _, app, _) =
        delivering_to(backend, DOWN, "failing", json!({"retry_for": "1h"})).await;
    let sent = track(&app, "order.create", 30, "paused").await;
    eventually("the endpoint paused", Duration::from_secs(30), || async {
        status_of(&app, "failing").await["state"] == json!("paused")
    })
    .await;
    let attempts_before = receiver.seen(|s| s.attempts.len());
    assert!(
        attempts_before >= 20,
        "{attempts_before} attempts paused it"
    );
    // While paused, one probe at a time, each after a pause.
    receiver.mark();
    eventually("two probes", Duration::from_secs(30), || async {
        receiver.seen(|s| s.since_mark >= 2)
    })
    .await;
    receiver.seen(|s| assert_eq!(s.most_in_flight_since_mark, 1, "one probe at a time"));
    let status = status_of(&app, "failing").await;
    assert_eq!(status["dead_letters"], json!(0), "{status}");
    assert!(
        status["oldest_undelivered_seconds"]
            .as_f64()
            .is_some_and(|age| age > 0.0),
        "the oldest undelivered record's age shows: {status}"
    );

    // The endpoint is back: the next probe resumes every delivery.
    receiver.set(HEALTHY);
    receiver
        .wait_delivered("every record delivered", Duration::from_secs(30), |n| {
            n == sent.len()
        })
        .await;
    assert_eq!(status_of(&app, "failing").await["state"], json!("active"));
    app.stop().await;
}

/// Counts each id's deliveries; every answer takes 400 ms, so deliveries
/// are in flight when the service is killed.
#[derive(Clone, Default)]
struct SlowReceiver {
    delivered: Arc<Mutex<BTreeMap<String, usize>>>,
}

async fn receive_slowly(State(receiver): State<SlowReceiver>, headers: HeaderMap) -> StatusCode {
    tokio::time::sleep(Duration::from_millis(400)).await;
    let id = headers["webhook-id"].to_str().unwrap().to_owned();
    *receiver.delivered.lock().unwrap().entry(id).or_default() += 1;
    StatusCode::OK
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_with_deliveries_in_flight_skips_none_and_repeats_only_those() {
    const IN_FLIGHT: usize = 10;
    let receiver = SlowReceiver::default();
    let router = axum::Router::new()
        .route("/hook", axum::routing::post(receive_slowly))
        .with_state(receiver.clone());
    let address = serve(router).await;

    let dir = TestDir::new();
    let mut env = embedded_env(dir.path());
    env.push(("TRAITLINE_DESTINATIONS_ALLOW_PRIVATE", "true".into()));
    let mut service = ServiceProcess::start(dir.path(), "first", &[], &env_refs(&env)).await;
    let client = crate::helpers::client();
    let defined = client
        .put(service.url("/v1/destinations/slow"))
        .basic_auth(ADMIN_KEY, Some(""))
        .json(&json!({"kind": "webhook", "source": "user_events",
                      "url": format!("http://{address}/hook"), "max_in_flight": IN_FLIGHT}))
        .send()
        .await
        .unwrap();
    assert!(defined.status().is_success());
    // Records stored before a destination exists are not its own: wait
    // until it is running.
    eventually(
        "the destination running",
        Duration::from_secs(10),
        || async {
            let ready: Value = client
                .get(service.url("/readyz"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            ready["destinations"]["slow"]["state"] == json!("active")
        },
    )
    .await;
    let ids: Vec<String> = (0..150).map(|i| format!("k-{i}")).collect();
    let batch: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            json!({"type": "track", "event": "order.create",
                              "userId": format!("u{}", i % 7), "messageId": id})
        })
        .collect();
    let sent = client
        .post(service.url("/v1/batch"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&json!({"batch": batch}))
        .send()
        .await
        .unwrap();
    assert!(sent.status().is_success());
    eventually("deliveries under way", Duration::from_secs(30), || async {
        receiver.delivered.lock().unwrap().len() >= 40
    })
    .await;
    service.kill();

    let _restarted = ServiceProcess::start(dir.path(), "second", &[], &env_refs(&env)).await;
    let delivered = eventually(
        "every record delivered after the restart",
        Duration::from_secs(60),
        || async {
            let delivered = receiver.delivered.lock().unwrap().clone();
            let count = delivered.len();
            (count == ids.len())
                .then_some(delivered)
                .ok_or(format!("{count} delivered"))
        },
    )
    .await;
    let expected: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(
        delivered.keys().collect::<BTreeSet<_>>(),
        expected,
        "none skipped"
    );
    let repeated = delivered.values().filter(|n| **n > 1).count();
    // In flight at the kill, or finished since the last save (every
    // 200 ms, while one delivery takes 400 ms).
    assert!(
        repeated <= 2 * IN_FLIGHT,
        "{repeated} records delivered twice: only those in flight at the kill are repeated"
    );
    assert!(delivered.values().all(|n| *n <= 2), "{delivered:?}");
}

async fn a_replay_of_the_log_backfills_a_destination_added_later(backend: Backend) {
    let (receiver, address) = Receiver::start(HEALTHY).await;
    let app = spawn_app_with(backend, |s| s.destinations_allow_private = Some(true)).await;
    let before = track(&app, "order.create", 5, "before").await;
    app.wait_for_profile("before-u4", |_| true).await;
    define(&app, "late", &webhook(address, json!({}))).await;
    wait_active(&app, "late").await;
    let after = track(&app, "order.create", 2, "after").await;
    eventually(
        "the records sent after it was defined",
        Duration::from_secs(20),
        || async { receiver.seen(|s| s.delivered.len() == 2) },
    )
    .await;
    assert!(
        receiver.seen(|s| before.iter().all(|id| !s.delivered.contains_key(id))),
        "a new destination starts from its creation"
    );

    let done = replay_to_end(&app, "late", json!({"what": "log"})).await;
    assert_eq!(done["delivered"], json!(7), "{done}");
    receiver.seen(|s| {
        for id in &before {
            assert_eq!(s.delivered_times.get(id), Some(&1), "{id} backfilled once");
        }
        for id in &after {
            // Live, then again by the replay: the same id to deduplicate on.
            assert_eq!(s.delivered_times.get(id), Some(&2), "{id}");
        }
    });
    app.stop().await;
}

/// A request's `webhook-id` and the message ids its batch carried.
type BatchRequest = (String, Vec<String>);

/// Batches as they arrived.
#[derive(Clone)]
struct BatchReceiver {
    verifier: Arc<standardwebhooks::Webhook>,
    requests: Arc<Mutex<Vec<BatchRequest>>>,
}

async fn receive_batch(
    State(receiver): State<BatchReceiver>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    if receiver.verifier.verify(&body, &headers).is_err() {
        return StatusCode::UNAUTHORIZED;
    }
    let payload: Value = serde_json::from_slice(&body).unwrap();
    let ids = payload["batch"]
        .as_array()
        .map(|batch| {
            batch
                .iter()
                .map(|e| e["messageId"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default();
    let id = headers["webhook-id"].to_str().unwrap().to_owned();
    receiver.requests.lock().unwrap().push((id, ids));
    StatusCode::OK
}

async fn records_go_in_signed_batches_up_to_the_batch_size(backend: Backend) {
    let receiver = BatchReceiver {
        verifier: Arc::new(standardwebhooks::Webhook::new(SECRET).unwrap()),
        requests: Arc::default(),
    };
    let router = axum::Router::new()
        .route("/hook", axum::routing::post(receive_batch))
        .with_state(receiver.clone());
    let address = serve(router).await;
    let app = spawn_app_with(backend, |s| s.destinations_allow_private = Some(true)).await;
    define(
        &app,
        "batched",
        &webhook(address, json!({"batch_size": 10})),
    )
    .await;
    wait_active(&app, "batched").await;
    let sent = track(&app, "order.create", 25, "batched").await;
    let requests = eventually(
        "every record delivered",
        Duration::from_secs(20),
        || async {
            let requests = receiver.requests.lock().unwrap().clone();
            let delivered: usize = requests.iter().map(|(_, ids)| ids.len()).sum();
            (delivered >= sent.len()).then_some(requests)
        },
    )
    .await;
    let mut delivered: Vec<String> = requests.iter().flat_map(|(_, ids)| ids.clone()).collect();
    delivered.sort();
    let mut expected = sent.clone();
    expected.sort();
    assert_eq!(delivered, expected, "each record once, in a batch");
    assert!(
        requests.len() < sent.len(),
        "{} requests carried them",
        requests.len()
    );
    for (id, ids) in &requests {
        assert!(!ids.is_empty() && ids.len() <= 10, "{id}: {ids:?}");
        assert_eq!(
            id,
            &format!("batch-{}-{}", ids[0], ids.len()),
            "a batch is named by its first record"
        );
    }
    app.stop().await;
}

async fn alerts_reach_a_destination_that_reads_user_alerts(backend: Backend) {
    let (receiver, address) = Receiver::start(HEALTHY).await;
    let app = spawn_app_with(backend, |s| s.destinations_allow_private = Some(true)).await;
    for rule in ["alarm", "other"] {
        let (status, body) = send(
            &app,
            Method::PUT,
            &format!("/v1/rules/{rule}"),
            ADMIN_KEY,
            Some(
                &json!({"steps": [{"name": "hit", "where": format!("event == \"{rule}\"")}],
                         "within": "1m"}),
            ),
        )
        .await;
        assert!(status.is_success(), "{body}");
    }
    define(
        &app,
        "pager",
        &webhook(
            address,
            json!({"source": "user_alerts", "where": "rule == \"alarm\""}),
        ),
    )
    .await;
    wait_active(&app, "pager").await;
    track(&app, "other", 1, "o").await;
    track(&app, "alarm", 1, "a").await;
    let alerts = eventually(
        "the alarm's alert stored",
        Duration::from_secs(30),
        || async {
            let alerts = read(&app, "/v1/alerts?rule=alarm").await["alerts"].clone();
            alerts
                .as_array()
                .is_some_and(|a| !a.is_empty())
                .then_some(alerts)
        },
    )
    .await;
    let id = alerts[0]["id"].as_str().unwrap().to_owned();
    eventually("the alert delivered", Duration::from_secs(30), || async {
        receiver.seen(|s| s.delivered.contains_key(&id))
    })
    .await;
    // The other rule's alert is on user_alerts too, read and not
    // delivered.
    let topic = Topics::new(&app.config.topic_prefix).alerts();
    eventually(
        "both alerts on user_alerts",
        Duration::from_secs(30),
        || async { read_all(&app.config, &topic).await.len() == 2 },
    )
    .await;
    eventually(
        "the destination past both",
        Duration::from_secs(30),
        || async {
            let status = status_of(&app, "pager").await;
            (status["lag"] == json!(0))
                .then_some(())
                .ok_or(status.to_string())
        },
    )
    .await;
    receiver.seen(|s| {
        assert_eq!(s.delivered.len(), 1, "only the alarm rule's alerts");
        assert_eq!(s.delivered[&id]["rule"], json!("alarm"));
        assert_eq!(s.delivered[&id]["message_ids"], json!(["a-0"]));
    });
    app.stop().await;
}

async fn an_endpoint_that_never_answers_times_out_and_holds_up_no_other_destination(
    backend: Backend,
) {
    // Accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_address = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let (receiver, _, app, _) = delivering_to(backend, HEALTHY, "working", json!({})).await;
    define(
        &app,
        "silent",
        &webhook(
            silent_address,
            json!({"timeout": "300ms", "max_in_flight": 5}),
        ),
    )
    .await;
    wait_active(&app, "silent").await;
    let sent = track(&app, "order.create", 50, "iso").await;
    receiver
        .wait_delivered(
            "every record delivered to the working endpoint",
            Duration::from_secs(20),
            |n| n == sent.len(),
        )
        .await;
    let attempt = first_attempt(&app, "silent", "an attempt that timed out").await;
    assert_eq!(attempt["outcome"], json!("retrying"), "{attempt}");
    assert_eq!(attempt["status"], Value::Null, "{attempt}");
    assert!(
        attempt["response"]
            .as_str()
            .unwrap()
            .contains("no answer within 300ms"),
        "{attempt}"
    );
    let silent_status = status_of(&app, "silent").await;
    assert_eq!(silent_status["delivered"], json!(0), "{silent_status}");
    assert!(
        silent_status["oldest_undelivered_seconds"].is_number(),
        "its records wait: {silent_status}"
    );
    app.stop().await;
}
