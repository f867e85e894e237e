//! Fixtures for tracehop's tests, all on real parts (see the README, "Testing").
//!
//! # Layout
//! - [`rabbit`]: a RabbitMQ vhost of its own per test, on the machine's broker.
//! - [`postgres`]: a PostgreSQL database of its own per test.
//! - [`node`]: throw-away RabbitMQ nodes to stop, kill and restart.
//! - [`process`]: the services as child processes (SIGKILL, SIGTERM, memory).
//! - [`otlp`]: an OTLP/gRPC trace receiver, so tests see what the real exporter sends.
//!
//! Where the infrastructure is missing, fixtures panic with what to start: a test that quietly
//! skips because its broker is absent would pass while proving nothing.

pub mod node;
pub mod otlp;
pub mod postgres;
pub mod process;
pub mod rabbit;

/// A name no other test in any process is using.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}
