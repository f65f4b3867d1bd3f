//! Supervised stages: every long-running task of a process (each runner,
//! the change relay, the purge, the snapshot timer) runs under a
//! [`Supervisor`], so none dies silently.
//!
//! A stage that returns without being asked to, fails, or panics is
//! logged with its cause as a sentence, counted
//! (`traitline_stage_restarts_total`), shown in `/readyz` (503 naming the
//! stage until it runs again), and started again after a backoff that
//! doubles from half a second to 30 s (and starts over once a stage has
//! run for a minute). A stage that cannot be built at start-up fails the
//! start-up instead, naming it, so the process exits non-zero.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use utoipa::ToSchema;

/// How a stage ends: `Ok` when it was asked to stop (or finished its
/// work), else why it cannot go on.
pub type StageResult = Result<(), String>;

/// A running stage.
pub type StageFuture = Pin<Box<dyn Future<Output = StageResult> + Send>>;

/// A future that resolves when the process stops.
pub type StopSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What `/readyz` shows of one stage.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StageState {
    /// `running`, or `restarting` while it waits to be started again.
    #[schema(example = "running")]
    pub status: &'static str,
    /// Times it was restarted since the process started.
    pub restarts: u64,
    /// Why it last stopped, while it is restarting, and after.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
}

/// Every stage's state, by name.
pub type Stages = Arc<Mutex<BTreeMap<&'static str, StageState>>>;

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A stage that ran this long is taken to have recovered: its next
/// failure waits the first backoff again.
const RECOVERED_AFTER: Duration = Duration::from_secs(60);

/// Starts stages, restarts the ones that stop, and stops them all.
pub struct Supervisor {
    stages: Stages,
    stop: watch::Receiver<bool>,
    loops: Vec<JoinHandle<()>>,
}

impl Supervisor {
    /// Stages supervised until `stop` turns true.
    pub fn new(stop: watch::Receiver<bool>) -> Supervisor {
        Supervisor {
            stages: Stages::default(),
            stop,
            loops: Vec::new(),
        }
    }

    /// What `/readyz` reads.
    pub fn stages(&self) -> Stages {
        self.stages.clone()
    }

    /// Runs the stage `name`, made by `start` (given the stop signal),
    /// and makes it again whenever it stops on its own. An error from the
    /// first `start` is returned: the stage cannot be built at all.
    pub fn spawn<F>(&mut self, name: &'static str, mut start: F) -> Result<(), String>
    where
        F: FnMut(StopSignal) -> Result<StageFuture, String> + Send + 'static,
    {
        let first = start(stop_signal(self.stop.clone()))
            .map_err(|e| format!("cannot start the {name} stage: {e}"))?;
        set(&self.stages, name, "running", None, 0);
        let stages = self.stages.clone();
        let stop = self.stop.clone();
        self.loops.push(tokio::spawn(async move {
            let mut stage = Some(first);
            let mut backoff = FIRST_BACKOFF;
            let mut restarts = 0;
            loop {
                let running = match stage.take() {
                    Some(stage) => stage,
                    None => match start(stop_signal(stop.clone())) {
                        Ok(stage) => stage,
                        Err(e) => {
                            let cause = format!("it cannot be started again: {e}");
                            if !wait(&stages, name, &cause, restarts, &mut backoff, &stop).await {
                                return;
                            }
                            continue;
                        }
                    },
                };
                set(&stages, name, "running", None, restarts);
                let started = Instant::now();
                let ended = tokio::spawn(running).await;
                if *stop.borrow() {
                    return;
                }
                let cause = match ended {
                    Ok(Ok(())) => "it returned although it was not asked to stop".to_owned(),
                    Ok(Err(cause)) => cause,
                    Err(e) if e.is_panic() => format!(
                        "it panicked: {}",
                        crate::process::panic_message(e.into_panic().as_ref())
                    ),
                    Err(_) => "it was cancelled".to_owned(),
                };
                if started.elapsed() >= RECOVERED_AFTER {
                    backoff = FIRST_BACKOFF;
                }
                restarts += 1;
                metrics::counter!(crate::metrics::STAGE_RESTARTS, "stage" => name).increment(1);
                if !wait(&stages, name, &cause, restarts, &mut backoff, &stop).await {
                    return;
                }
            }
        }));
        Ok(())
    }

    /// [`Supervisor::spawn`] for a stage that runs until the stop and has
    /// no failure of its own to report (it logs and retries its errors):
    /// its returning or panicking is the failure.
    pub fn spawn_until_stop<F, Fut>(
        &mut self,
        name: &'static str,
        mut start: F,
    ) -> Result<(), String>
    where
        F: FnMut(StopSignal) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.spawn(name, move |stop| {
            let running = start(stop);
            Ok(Box::pin(async move {
                running.await;
                Ok(())
            }))
        })
    }

    /// Waits for every stage to finish after the stop (each finishes the
    /// work in hand first).
    pub async fn join(self) {
        for stage in self.loops {
            let _ = stage.await;
        }
    }
}

/// Shows a stopped stage as restarting and waits out its backoff; false
/// when the process stops meanwhile.
async fn wait(
    stages: &Stages,
    name: &'static str,
    cause: &str,
    restarts: u64,
    backoff: &mut Duration,
    stop: &watch::Receiver<bool>,
) -> bool {
    tracing::error!(
        stage = name,
        "the {name} stage stopped: {cause}; restarting it in {:.1} s (restart {restarts})",
        backoff.as_secs_f64()
    );
    set(stages, name, "restarting", Some(cause.to_owned()), restarts);
    let waited = tokio::select! {
        biased;
        () = stop_signal(stop.clone()) => false,
        () = tokio::time::sleep(*backoff) => true,
    };
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    waited
}

fn set(
    stages: &Stages,
    name: &'static str,
    status: &'static str,
    failure: Option<String>,
    restarts: u64,
) {
    metrics::gauge!(crate::metrics::STAGE_UP, "stage" => name).set(if status == "running" {
        1.0
    } else {
        0.0
    });
    let mut stages = stages.lock().unwrap_or_else(|e| e.into_inner());
    let state = stages.entry(name).or_insert(StageState {
        status,
        restarts,
        last_failure: None,
    });
    state.status = status;
    state.restarts = restarts;
    if failure.is_some() {
        state.last_failure = failure;
    }
}

/// Resolves when `stop` turns true (or its sender is gone).
pub fn stop_signal(mut stop: watch::Receiver<bool>) -> StopSignal {
    Box::pin(async move {
        let _ = stop.wait_for(|stop| *stop).await;
    })
}

/// The first stage that is not running, and why, for `/readyz`.
pub fn problem(stages: &Stages) -> Option<String> {
    let stages = stages.lock().unwrap_or_else(|e| e.into_inner());
    stages
        .iter()
        .find(|(_, state)| state.status != "running")
        .map(|(name, state)| {
            format!(
                "the {name} stage stopped ({}) and is being restarted",
                state.last_failure.as_deref().unwrap_or("no cause given")
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn eventually(what: &str, check: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(Instant::now() < deadline, "{what} within 10 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A stage that fails, then panics, then runs: each stop is shown
    /// and counted, and it is restarted until it runs.
    #[tokio::test]
    async fn a_stage_that_stops_is_shown_and_restarted() {
        let (stop, stopped) = watch::channel(false);
        let mut supervisor = Supervisor::new(stopped);
        let starts = Arc::new(Mutex::new(0));
        let counted = starts.clone();
        supervisor
            .spawn("flaky", move |stop| {
                let mut starts = counted.lock().unwrap();
                *starts += 1;
                let attempt = *starts;
                Ok(Box::pin(async move {
                    match attempt {
                        1 => Err("the store is gone".to_owned()),
                        2 => panic!("a bug on record 7"),
                        _ => {
                            stop.await;
                            Ok(())
                        }
                    }
                }))
            })
            .unwrap();
        let stages = supervisor.stages();
        eventually("a third start", || *starts.lock().unwrap() == 3).await;
        eventually("the stage running again", || problem(&stages).is_none()).await;
        let state = stages.lock().unwrap()["flaky"].clone();
        assert_eq!(state.restarts, 2);
        assert!(
            state
                .last_failure
                .as_deref()
                .unwrap()
                .contains("a bug on record 7"),
            "{state:?}"
        );
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), supervisor.join())
            .await
            .expect("a stop ends every stage");
    }

    #[tokio::test]
    async fn a_stage_that_cannot_be_built_fails_the_start() {
        let (_stop, stopped) = watch::channel(false);
        let mut supervisor = Supervisor::new(stopped);
        let err = supervisor
            .spawn("relay", |_| Err("no broker".to_owned()))
            .unwrap_err();
        assert!(err.contains("relay") && err.contains("no broker"), "{err}");
    }

    #[tokio::test]
    async fn a_restarting_stage_is_a_readiness_problem_naming_it() {
        let stages = Stages::default();
        set(&stages, "profiles", "running", None, 0);
        assert_eq!(problem(&stages), None);
        set(
            &stages,
            "profiles",
            "restarting",
            Some("it panicked: boom".into()),
            1,
        );
        let problem = problem(&stages).unwrap();
        assert!(
            problem.contains("profiles") && problem.contains("boom"),
            "{problem}"
        );
    }
}
