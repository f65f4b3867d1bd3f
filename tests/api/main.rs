//! Integration tests: one binary, so the service is built once. Each module
//! specifies one area of behaviour; `helpers` starts services.

/// Runs each named scenario against both deployments: the embedded log
/// with SQLite, and Kafka (the tansu broker) with PostgreSQL.
macro_rules! both_logs {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            use crate::helpers::Backend;
            $( #[tokio::test] async fn $name() { super::$name(Backend::Embedded).await } )*
        }
        mod kafka {
            use crate::helpers::Backend;
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(Backend::Kafka).await } )*
        }
    };
}

mod helpers;

mod archive;
mod auth;
mod bench;
mod definitions;
mod destinations;
mod durability;
mod fuzz;
mod kafka_faults;
mod limits;
mod log_suite;
mod metrics;
mod openapi;
mod operations;
mod overflow;
pub mod profiles;
mod rate_limits;
mod rules;
mod seed;
mod segment;
mod snapshots;
mod store;
mod traces;
