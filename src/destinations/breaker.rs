//! A destination's circuit breaker: after [`OPENS_AFTER`] attempts in a
//! row fail, the endpoint is paused; when the pause ends one attempt
//! (the probe) goes, and the others wait for its answer. A delivered
//! probe closes the breaker; a failed one pauses again, twice as long,
//! up to the destination's longest backoff. A failing endpoint then gets
//! a probe now and then instead of every in-flight record's retries.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Failed attempts in a row that pause an endpoint.
pub const OPENS_AFTER: u32 = 20;

/// What an attempt may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go; `probe` when it is the one attempt of a pause's end.
    Go { probe: bool },
    /// The deadline came while the endpoint was paused.
    Expired,
}

pub struct Breaker {
    state: Mutex<State>,
    changed: Notify,
    first_pause: Duration,
    longest_pause: Duration,
}

struct State {
    failures: u32,
    /// Paused until then, while open.
    open_until: Option<Instant>,
    probing: bool,
    pause: Duration,
}

impl Breaker {
    /// A breaker whose first pause is `first_pause`, doubling up to
    /// `longest_pause`.
    pub fn new(first_pause: Duration, longest_pause: Duration) -> Breaker {
        Breaker {
            state: Mutex::new(State {
                failures: 0,
                open_until: None,
                probing: false,
                pause: first_pause,
            }),
            changed: Notify::new(),
            first_pause,
            longest_pause: longest_pause.max(first_pause),
        }
    }

    /// Waits until an attempt may go, or `deadline` passes while the
    /// endpoint is paused.
    pub async fn admit(&self, deadline: Instant) -> Admission {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let until = {
                let mut state = self.lock();
                match state.open_until {
                    None => return Admission::Go { probe: false },
                    Some(until) if !state.probing && Instant::now() >= until => {
                        state.probing = true;
                        return Admission::Go { probe: true };
                    }
                    // A probe is out: wait for its answer.
                    Some(_) if state.probing => deadline,
                    Some(until) => until.min(deadline),
                }
            };
            if Instant::now() >= deadline {
                return Admission::Expired;
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// Takes an attempt's answer: `delivered` or not, and whether it was
    /// the probe.
    pub fn record(&self, delivered: bool, probe: bool) {
        let mut state = self.lock();
        if delivered {
            let was_open = state.open_until.is_some();
            *state = State {
                failures: 0,
                open_until: None,
                probing: false,
                pause: self.first_pause,
            };
            if was_open {
                self.changed.notify_waiters();
            }
            return;
        }
        state.failures = state.failures.saturating_add(1);
        if probe {
            state.probing = false;
            state.pause = (state.pause * 2).min(self.longest_pause);
            state.open_until = Some(Instant::now() + state.pause);
            self.changed.notify_waiters();
        } else if state.open_until.is_none() && state.failures >= OPENS_AFTER {
            state.open_until = Some(Instant::now() + state.pause);
        }
    }

    /// A probe that was not answered (its task ended): another may go.
    pub fn abandon_probe(&self) {
        let mut state = self.lock();
        if state.probing {
            state.probing = false;
            self.changed.notify_waiters();
        }
    }

    /// Whether the endpoint is paused now.
    pub fn paused(&self) -> bool {
        self.lock().open_until.is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const FAR: Duration = Duration::from_secs(3600);

    fn breaker() -> Arc<Breaker> {
        Arc::new(Breaker::new(Duration::from_secs(1), Duration::from_secs(8)))
    }

    async fn go(b: &Breaker) -> Admission {
        b.admit(Instant::now() + FAR).await
    }

    #[tokio::test(start_paused = true)]
    async fn failures_in_a_row_pause_the_endpoint_and_a_delivered_probe_resumes_it() {
        let b = breaker();
        for _ in 0..OPENS_AFTER - 1 {
            assert_eq!(go(&b).await, Admission::Go { probe: false });
            b.record(false, false);
        }
        // A success in between starts the count again.
        b.record(true, false);
        for _ in 0..OPENS_AFTER {
            b.record(false, false);
        }
        assert!(b.paused());
        let started = Instant::now();
        assert_eq!(go(&b).await, Admission::Go { probe: true });
        assert_eq!(started.elapsed(), Duration::from_secs(1), "the first pause");

        // The others wait for the probe's answer.
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { go(&b).await }
        });
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!waiting.is_finished(), "no attempt while the probe is out");
        b.record(true, true);
        assert_eq!(waiting.await.unwrap(), Admission::Go { probe: false });
        assert!(!b.paused());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_pauses_twice_as_long_up_to_the_longest() {
        let b = breaker();
        for _ in 0..OPENS_AFTER {
            b.record(false, false);
        }
        let mut pauses = Vec::new();
        for _ in 0..5 {
            let started = Instant::now();
            assert_eq!(go(&b).await, Admission::Go { probe: true });
            pauses.push(started.elapsed().as_secs());
            b.record(false, true);
        }
        assert_eq!(pauses, vec![1, 2, 4, 8, 8]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_passing_while_paused_expires_the_wait() {
        let b = breaker();
        for _ in 0..OPENS_AFTER {
            b.record(false, false);
        }
        assert_eq!(go(&b).await, Admission::Go { probe: true });
        let deadline = Instant::now() + Duration::from_millis(300);
        assert_eq!(b.admit(deadline).await, Admission::Expired);
        // An abandoned probe lets the next attempt be the probe.
        b.abandon_probe();
        assert_eq!(go(&b).await, Admission::Go { probe: true });
    }
}
