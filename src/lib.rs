//! Traitline: user-activity events in over HTTP, durable in an event log,
//! turned into profiles by stream processors.
//!
//! The modules follow the pipeline: [`ingest`] takes events over HTTP and
//! appends them to the [`log`] (Kafka or the embedded log); [`server`] wires
//! the stages into one process. [`config`] holds the one typed configuration
//! every stage reads; [`keys`] the API keys that guard the routes;
//! [`metrics`] what every stage counts, served at `/metrics`. [`windows`] is
//! the pure window engine the metrics processor is built on.

pub mod admin;
pub mod bench;
pub mod cli;
pub mod config;
pub mod definitions;
pub mod destinations;
pub mod envelope;
pub mod home;
pub mod http;
pub mod ingest;
pub mod keys;
pub mod log;
pub mod metric;
pub mod metrics;
pub mod openapi;
pub mod patterns;
pub mod process;
pub mod profile;
pub mod query;
pub mod replay;
pub mod server;
pub mod snapshot;
pub mod store;
pub mod supervisor;
pub mod tail;
pub mod telemetry;
pub mod windows;

/// The hasher of the engines' tables of keys and groups, looked up for
/// every event: foldhash, several times faster than the standard
/// library's SipHash on short keys, seeded per table.
pub type KeyHasher = foldhash::fast::RandomState;

/// Makes ring the process's TLS provider: HTTP clients (webhooks, span
/// export, the load generators) are built with it. Call before building
/// one; calling again does nothing.
pub fn install_tls() {
    // Only the first call installs; later ones find it there.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
