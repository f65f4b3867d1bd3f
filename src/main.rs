//! The `traitline` binary: parse the configuration, set up logging, and run
//! the chosen subcommand. Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;
use tokio::net::TcpListener;

use traitline::cli::{ArchiveCommand, BenchCommand, Cli, Command, EventsCommand};
use traitline::config::Config;
use traitline::{bench, replay, server, snapshot, tail, telemetry};

/// mimalloc, not the system allocator: ingest allocates and frees many
/// small strings per event, where glibc malloc is slow (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's numbers for the options `purge_delay` and `allow_thp`
/// (`mi_option_purge_delay`, `mi_option_allow_thp` in mimalloc.h; the
/// crate names no constants for them).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// How long memory freed stays the process's before it goes back to the
/// OS, unless `MIMALLOC_PURGE_DELAY` says otherwise. A runner frees a
/// batch's hundreds of megabytes and allocates the next's about once a
/// second: with mimalloc's 1 s, every batch faults its pages in afresh
/// (150,000 page faults in a 12 s run of profiles and 10 metrics, a tenth
/// of the process's CPU); with 10 s, a tenth as many, and memory still
/// goes back within seconds of the load ending (docs/benchmarks.md).
const PURGE_DELAY_MS: std::ffi::c_long = 10_000;

/// Sets the allocator up for batches that come and go, unless the
/// environment sets the same options (mimalloc reads `MIMALLOC_*`).
///
/// Transparent huge pages go too: mimalloc asks for them, and a 64 KiB
/// stretch of a 2 MiB page given back and used again faults the whole
/// page in afresh, zeroed by the kernel. With them the whole pipeline's
/// system CPU was 3 to 3.4 s a 20 s run (6.5% of the machine clearing
/// pages), with 4 KiB pages 1.1 to 1.3 s: 5% fewer CPU-seconds an event,
/// and an eighth fewer for one metric on Kafka (docs/benchmarks.md).
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: `mi_option_set` stores the option's value (mimalloc reads
        // it each time it schedules a purge); any value is valid.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, PURGE_DELAY_MS) };
    }
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: as above; mimalloc reads it each time it maps memory.
        unsafe { libmimalloc_sys::mi_option_set(ALLOW_THP, 0) };
        // mimalloc disables them for the process only as it starts, from
        // the environment, and memory it mapped before `main` asked for
        // them: the process's flag covers every mapping. Its result is
        // not checked: where the kernel lacks the flag, the option keeps
        // mimalloc from asking for them.
        #[cfg(target_os = "linux")]
        // SAFETY: `PR_SET_THP_DISABLE` takes an integer and touches no
        // memory of the process.
        unsafe {
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
        }
    }
}

fn main() -> ExitCode {
    tune_allocator();
    traitline::install_tls();
    let cli = Cli::parse();
    let config = match Config::resolve(cli.settings, cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("traitline: {e}");
            return ExitCode::from(2);
        }
    };
    // Before the runtime: the span exporter's HTTP client blocks.
    let telemetry = match telemetry::init(config.log_format, config.otlp.as_ref()) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("traitline: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("traitline: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(cli.command.unwrap_or(Command::Serve), config));
    drop(runtime);
    telemetry.shutdown();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("traitline: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a subcommand; an error is logged and returned for the exit code.
async fn run(command: Command, config: Config) -> Result<(), String> {
    let outcome = match command {
        Command::Serve => serve(config).await,
        Command::Events {
            command: EventsCommand::Tail(args),
        } => tail::run(&config, &args, &mut std::io::stdout().lock())
            .await
            .map_err(|e| e.to_string()),
        Command::Replay(args) => replay::run(&config, &args, &mut std::io::stderr())
            .await
            .map(|_| ()),
        Command::Snapshot => snapshot::run(&config).await,
        Command::Archive {
            command: ArchiveCommand::Verify(args),
        } => {
            traitline::destinations::archive::verify::run(&config, args.destination.as_deref())
                .await
        }
        Command::Bench {
            command: BenchCommand::Ingest(args),
        } => bench::run_ingest(&config, args)
            .await
            .map_err(|e| e.to_string()),
        Command::Bench {
            command: BenchCommand::Process(args),
        } => bench::process::run(&config, args).await,
        Command::Bench {
            command: BenchCommand::Metrics(args),
        } => bench::metrics::run(&config, args).await,
        Command::Bench {
            command: BenchCommand::Archive(args),
        } => bench::archive::run(&config, args).await,
        Command::Bench {
            command: BenchCommand::Deliveries(args),
        } => bench::deliveries::run(&config, args).await,
        Command::Bench {
            command: BenchCommand::Latency(args),
        } => bench::latency::run(&config, args)
            .await
            .map_err(|e| e.to_string()),
    };
    if let Err(message) = &outcome {
        tracing::error!("{message}");
    }
    outcome
}

async fn serve(config: Config) -> Result<(), String> {
    let listener = TcpListener::bind(config.listen).await.map_err(|e| {
        format!(
            "cannot listen on {} (setting listen / TRAITLINE_LISTEN): {e}",
            config.listen
        )
    })?;
    let deadline = config.shutdown_timeout;
    // Listen before the service says it is listening: a SIGTERM sent the
    // moment the banner appears must start the shutdown, not be lost (or,
    // before any handler exists, kill the process outright).
    let signals =
        ShutdownSignals::listen().map_err(|e| format!("cannot listen for SIGTERM: {e}"))?;
    let shutdown = async move {
        signals.recv().await;
        // The watchdog: a shutdown that hangs (a broker or database that
        // does not answer) must not keep the process from stopping.
        tokio::spawn(async move {
            tokio::time::sleep(deadline).await;
            tracing::error!(
                "shutdown did not finish within {deadline:?} (setting shutdown-timeout-secs); exiting now: requests not yet answered got no 2xx, and batches not yet committed will be processed again from the log"
            );
            std::process::exit(1);
        });
    };
    server::serve(config, listener, shutdown)
        .await
        .map_err(|e| e.to_string())
}

/// SIGINT (Ctrl-C) and SIGTERM, caught from the moment [`ShutdownSignals::listen`]
/// returns.
struct ShutdownSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn listen() -> std::io::Result<ShutdownSignals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(ShutdownSignals {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        Ok(ShutdownSignals {})
    }

    /// Resolves on the first of the two.
    async fn recv(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => tracing::info!("interrupted; shutting down"),
            _ = self.terminate.recv() => tracing::info!("SIGTERM received; shutting down"),
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("interrupted; shutting down");
        }
    }
}
