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

/// `N` distinct free ports, below the kernel's ephemeral range, for servers a test starts as
/// other processes (services, throw-away RabbitMQ nodes) and tells which port to bind.
///
/// A port from `bind(":0")` is an ephemeral one: once released it can go to any outgoing
/// connection (rabbitmqctl's, another test's) before the server binds it; a RabbitMQ node whose
/// distribution port was taken that way died without a line of log, and CI lost a cluster test
/// to it. Ports below the range go only to listeners that ask for them by number. The probes
/// are all held until every port is known, so no port comes back twice.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let band = 10_000..ephemeral_from().max(20_000);
    let mut held: Vec<std::net::TcpListener> = Vec::new();
    while held.len() < N {
        let offset = (uuid::Uuid::new_v4().as_u128() % u128::from(band.end - band.start)) as u16;
        // Servers here bind loopback or every interface; a free wildcard port is free on both.
        if let Ok(listener) = std::net::TcpListener::bind(("0.0.0.0", band.start + offset)) {
            held.push(listener);
        }
    }
    std::array::from_fn(|i| held[i].local_addr().expect("a bound address").port())
}

/// The first port of the kernel's ephemeral range (Linux's default where it cannot be read).
fn ephemeral_from() -> u16 {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    range.split_whitespace().next().and_then(|low| low.parse().ok()).unwrap_or(32768)
}

/// A name no other test in any process is using.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_free_and_below_the_ephemeral_range() {
        let ports: [u16; 8] = free_ports();

        let below = 10_000..ephemeral_from();
        for (i, port) in ports.iter().enumerate() {
            assert!(below.contains(port), "{port} not in {below:?}");
            assert!(!ports[..i].contains(port), "{port} twice in {ports:?}");
            std::net::TcpListener::bind(("0.0.0.0", *port)).expect("the port is free");
        }
    }
}
