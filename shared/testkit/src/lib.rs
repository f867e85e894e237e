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

/// `N` distinct free loopback ports. The listeners are all held until every port is known:
/// ports asked for one at a time can come back the same, once the previous listener is gone
/// (a benchmark run lost its gateway to exactly that).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<std::net::TcpListener> =
        (0..N).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port")).collect();
    std::array::from_fn(|i| listeners[i].local_addr().expect("a bound address").port())
}

/// A name no other test in any process is using.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}
