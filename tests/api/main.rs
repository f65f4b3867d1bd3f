//! Integration tests: one binary, so the service is built once. Each module
//! specifies one area of behaviour; `helpers` starts services.

mod helpers;

mod auth;
mod durability;
mod fuzz;
mod kafka_faults;
mod limits;
mod log_suite;
mod openapi;
mod operations;
mod seed;
mod segment;
