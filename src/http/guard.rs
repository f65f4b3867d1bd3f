//! Failed authentications limited per client address: a client that keeps
//! sending wrong keys (guessing, or a misconfigured SDK in a retry loop)
//! gets 429 with Retry-After on every route until its allowance refills,
//! instead of costing a key lookup and a log line each time.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use governor::clock::{Clock, DefaultClock};

use super::error::{ApiError, respond};

/// The allowance of failed authentications per client address, and the
/// addresses that used theirs up.
pub struct AuthGuard {
    failures: governor::DefaultKeyedRateLimiter<IpAddr>,
    per_minute: NonZeroU32,
    /// Blocked addresses and until when; `blocked_count` lets the common
    /// case (nobody blocked) skip the lock.
    blocked: Mutex<HashMap<IpAddr, Instant>>,
    blocked_count: AtomicUsize,
    /// Failures seen, to forget idle addresses now and then.
    seen: AtomicUsize,
}

impl AuthGuard {
    pub fn new(per_minute: NonZeroU32) -> AuthGuard {
        AuthGuard {
            failures: governor::RateLimiter::dashmap(governor::Quota::per_minute(per_minute)),
            per_minute,
            blocked: Mutex::new(HashMap::new()),
            blocked_count: AtomicUsize::new(0),
            seen: AtomicUsize::new(0),
        }
    }

    /// How long `ip` must still wait, if it is blocked.
    fn blocked_for(&self, ip: IpAddr) -> Option<Duration> {
        if self.blocked_count.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        blocked.retain(|_, until| *until > now);
        self.blocked_count.store(blocked.len(), Ordering::Relaxed);
        blocked.get(&ip).map(|until| *until - now)
    }

    /// Counts a failed authentication from `ip`; past the allowance the
    /// address is blocked until a failure would be allowed again.
    fn failed(&self, ip: IpAddr) {
        if self.seen.fetch_add(1, Ordering::Relaxed) % 1024 == 1023 {
            self.failures.retain_recent();
            self.failures.shrink_to_fit();
        }
        if let Err(not_until) = self.failures.check_key(&ip) {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            tracing::warn!(
                "{ip} failed to authenticate more than {} times a minute; it gets 429 for {wait:?} (setting auth-failures-per-minute)",
                self.per_minute
            );
            let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
            blocked.insert(ip, Instant::now() + wait);
            self.blocked_count.store(blocked.len(), Ordering::Relaxed);
        }
    }
}

/// Middleware: answers a blocked address 429 at once; counts every 401.
pub async fn limit_auth_failures(
    State(guard): State<Arc<AuthGuard>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let ip = peer.ip();
    if let Some(wait) = guard.blocked_for(ip) {
        return respond(&Blocked(wait));
    }
    let response = next.run(request).await;
    if response.status() == StatusCode::UNAUTHORIZED {
        guard.failed(ip);
    }
    response
}

/// An address that used up its allowance, and for how long.
#[derive(Debug)]
struct Blocked(Duration);

impl std::fmt::Display for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "too many requests from this address had a missing or wrong key (setting auth-failures-per-minute); retry after {}s",
            super::error::retry_after_secs(self.0)
        )
    }
}

impl ApiError for Blocked {
    fn status(&self) -> StatusCode {
        StatusCode::TOO_MANY_REQUESTS
    }

    fn code(&self) -> &'static str {
        "too_many_failed_authentications"
    }

    fn retry_after(&self) -> Option<Duration> {
        Some(self.0)
    }
}
