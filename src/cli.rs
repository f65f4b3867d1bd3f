//! The `traitline` command line: settings shared by every subcommand, and
//! the subcommands.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::bench::BenchIngestArgs;
use crate::bench::archive::BenchArchiveArgs;
use crate::bench::deliveries::BenchDeliveriesArgs;
use crate::bench::latency::BenchLatencyArgs;
use crate::bench::metrics::BenchMetricsArgs;
use crate::bench::process::BenchProcessArgs;
use crate::config::Settings;

/// Traitline: user-activity events in over HTTP, durable in an event log
/// (embedded, or Apache Kafka), turned into user profiles.
///
/// With no subcommand, `serve` runs. Every setting can also come from a
/// `TRAITLINE_*` environment variable or from `traitline.toml` (keys are
/// the flag names without `--`); flags win over environment, environment
/// over the file.
#[derive(Parser, Debug)]
#[command(name = "traitline", version, about, long_about)]
pub struct Cli {
    #[command(flatten)]
    pub settings: Settings,

    /// Configuration file [default: traitline.toml when present]
    #[arg(long, env = "TRAITLINE_CONFIG", global = true)]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the service (the default)
    Serve,
    /// Work with the events in the log
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Rebuild every profile from the newest snapshot and the log after it,
    /// or from the log's first record (stop the service's process role
    /// first)
    Replay(ReplayArgs),
    /// Write a snapshot of every profile and the log offsets they reach
    /// into snapshot-dir (safe while the service runs)
    Snapshot,
    /// Work with the archives (`kind: "s3"` destinations)
    Archive {
        #[command(subcommand)]
        command: ArchiveCommand,
    },
    /// Measure a running service
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct ReplayArgs {
    /// Ignore the snapshots: rebuild from the first record of the log
    #[arg(long)]
    pub from_beginning: bool,
}

#[derive(Subcommand, Debug)]
pub enum ArchiveCommand {
    /// Check each archive's bucket against its manifest: no gaps, no
    /// overlaps, every object there with its size (exits 1 on a problem)
    Verify(ArchiveVerifyArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct ArchiveVerifyArgs {
    /// Only this archive [default: every one]
    #[arg(long)]
    pub destination: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum EventsCommand {
    /// Print stored records as JSON lines, like kcat: one object a record
    /// with topic, partition, offset, timestamp, key and value
    Tail(TailArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct TailArgs {
    /// Start at the oldest record instead of only printing new ones
    #[arg(long)]
    pub from_beginning: bool,
    /// Topic to read, without the prefix [default: user_events]
    #[arg(long, default_value = "user_events")]
    pub topic: String,
    /// Exit once every partition is read to its end instead of waiting for
    /// more (kcat -e)
    #[arg(long, short = 'e')]
    pub exit: bool,
    /// Exit after this many records
    #[arg(long, short = 'c')]
    pub count: Option<u64>,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Send events to a running service at a chosen concurrency and report
    /// requests/s, events/s and latency percentiles
    Ingest(BenchIngestArgs),
    /// Measure profile processing throughput into the configured store
    /// (a scratch database and log), beside a one-transaction-per-event
    /// consumer
    Process(BenchProcessArgs),
    /// Measure metric processing throughput (1 and 10 definitions) beside
    /// profile processing into the configured store, with peak memory
    Metrics(BenchMetricsArgs),
    /// Measure the time from a 2xx to the profile being visible, under a
    /// steady background load, against a running service
    Latency(BenchLatencyArgs),
    /// Measure events a second archived to an S3-compatible server
    /// (gzip'd JSON lines, every object uploaded and in the manifest)
    Archive(BenchArchiveArgs),
    /// Measure webhook deliveries a second to a receiver in this process
    /// that answers after a delay, alone and beside a destination whose
    /// endpoint never answers
    Deliveries(BenchDeliveriesArgs),
}
