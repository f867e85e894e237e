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

/// `N` distinct free ports, outside the kernel's ephemeral range, for servers a test starts as
/// other processes (services, throw-away RabbitMQ nodes) and tells which port to bind.
///
/// A port from `bind(":0")` is an ephemeral one: once released it can go to any outgoing
/// connection (rabbitmqctl's, another test's) before the server binds it; a RabbitMQ node whose
/// distribution port was taken that way died without a line of log, and CI lost a cluster test
/// to it. Ports outside the range go only to listeners that ask for them by number. The probes
/// are all held until every port is known, so no port comes back twice.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let band = outside_the_ephemeral_range();
    let mut held: Vec<std::net::TcpListener> = Vec::new();
    for _ in 0..10_000 {
        if held.len() == N {
            return std::array::from_fn(|i| held[i].local_addr().expect("a bound address").port());
        }
        let offset = (uuid::Uuid::new_v4().as_u128() % u128::from(band.end - band.start)) as u16;
        // Servers here bind loopback or every interface; a free wildcard port is free on both.
        if let Ok(listener) = std::net::TcpListener::bind(("0.0.0.0", band.start + offset)) {
            held.push(listener);
        }
    }
    panic!("no {N} free ports in {band:?} after 10,000 tries (can this process bind 0.0.0.0?)")
}

/// The ports tests hand out: from 10,000 up to the kernel's ephemeral range, or above it where
/// it starts too low to leave room below (Linux's default, 32768-60999, where the range cannot
/// be read).
fn outside_the_ephemeral_range() -> std::ops::Range<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut bounds = range.split_whitespace().map(|bound| bound.parse::<u16>().ok());
    let (low, high) = match (bounds.next().flatten(), bounds.next().flatten()) {
        (Some(low), Some(high)) => (low, high),
        _ => (32768, 60999),
    };
    if low >= 15_000 {
        10_000..low
    } else if high <= 60_000 {
        high + 1..65_535
    } else {
        panic!("the ephemeral port range {low}-{high} leaves no room for the tests' servers")
    }
}

/// A name no other test in any process is using.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_free_and_outside_the_ephemeral_range() {
        let ports: [u16; 8] = free_ports();

        let band = outside_the_ephemeral_range();
        for (i, port) in ports.iter().enumerate() {
            assert!(band.contains(port), "{port} not in {band:?}");
            assert!(!ports[..i].contains(port), "{port} twice in {ports:?}");
            std::net::TcpListener::bind(("0.0.0.0", *port)).expect("the port is free");
        }
    }
}
