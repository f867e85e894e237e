//! Free TCP ports for servers a program starts as other processes and tells which port to bind
//! (the services and throw-away RabbitMQ nodes of the tests, the benchmarks' services).
//!
//! A port from `bind(":0")` is an ephemeral one: once released it can go to any outgoing
//! connection (rabbitmqctl's, another test's) before the server binds it; a RabbitMQ node whose
//! distribution port was taken that way died without a line of log, and CI lost a cluster test
//! to it. Ports outside the kernel's ephemeral range go only to listeners that ask for them by
//! number, so these are drawn from outside it.

use std::net::TcpListener;
use std::ops::Range;

/// Where the kernel says its ephemeral range is.
const EPHEMERAL_RANGE_FILE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// Random ports probed before giving up.
const TRIES: usize = 10_000;

/// Why no ports could be picked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The ephemeral range covers nearly every port.
    #[error(
        "the kernel's ephemeral port range {low}-{high} ({EPHEMERAL_RANGE_FILE}) leaves no room for servers' \
         ports: it must start at 15000 or above, or end at 60000 or below"
    )]
    NoRoom {
        /// The range's first port.
        low: u16,
        /// The range's last port.
        high: u16,
    },
    /// Too few ports in the band could be bound.
    #[error("no {count} free ports in {start}-{end} after {TRIES} tries (can this process bind 0.0.0.0?)")]
    NotFound {
        /// Ports asked for.
        count: usize,
        /// The band's first port.
        start: u16,
        /// The band's last port.
        end: u16,
        /// Why the last probe that failed did (none when every probe bound).
        #[source]
        last_failure: Option<std::io::Error>,
    },
}

/// `N` distinct free ports, outside the kernel's ephemeral range, for code that names each one
/// (`let [gateway, checkout, stock] = free_ports()?`).
pub fn free_ports<const N: usize>() -> Result<[u16; N], Error> {
    let ports = free_port_list(N)?;
    Ok(std::array::from_fn(|i| ports[i]))
}

/// `count` distinct free ports, outside the kernel's ephemeral range. The probes are all held
/// until every port is known, so no port comes back twice.
pub fn free_port_list(count: usize) -> Result<Vec<u16>, Error> {
    let band = outside_the_ephemeral_range()?;
    let mut held: Vec<(u16, TcpListener)> = Vec::with_capacity(count);
    let mut last_failure = None;
    for _ in 0..TRIES {
        if held.len() == count {
            break;
        }
        let port = rand::random_range(band.clone());
        // Servers here bind loopback or every interface; a free wildcard port is free on both.
        match TcpListener::bind(("0.0.0.0", port)) {
            Ok(listener) => held.push((port, listener)),
            Err(error) => last_failure = Some(error),
        }
    }
    if held.len() < count {
        return Err(Error::NotFound { count, start: band.start, end: band.end - 1, last_failure });
    }
    Ok(held.into_iter().map(|(port, _listener)| port).collect())
}

/// The ports handed out: from 10,000 up to the kernel's ephemeral range, or above it where it
/// starts too low to leave room below (Linux's default, 32768-60999, where the range cannot be
/// read).
pub fn outside_the_ephemeral_range() -> Result<Range<u16>, Error> {
    band(&std::fs::read_to_string(EPHEMERAL_RANGE_FILE).unwrap_or_default())
}

/// The band for an ephemeral range as the kernel writes it (`"32768\t60999\n"`).
fn band(ephemeral_range: &str) -> Result<Range<u16>, Error> {
    let mut bounds = ephemeral_range.split_whitespace().map(|bound| bound.parse::<u16>().ok());
    let (low, high) = match (bounds.next().flatten(), bounds.next().flatten()) {
        (Some(low), Some(high)) => (low, high),
        _ => (32768, 60999),
    };
    if low >= 15_000 {
        Ok(10_000..low)
    } else if high <= 60_000 {
        Ok(high + 1..65_535)
    } else {
        Err(Error::NoRoom { low, high })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_band_lies_below_the_ephemeral_range_or_above_it() {
        assert_eq!(band("32768\t60999\n").expect("Linux's default"), 10_000..32_768);
        assert_eq!(band("15000 64000").expect("room below"), 10_000..15_000);
        assert_eq!(band("1024 50000").expect("room above"), 50_001..65_535);
        assert_eq!(band("").expect("unreadable: Linux's default"), 10_000..32_768);
        assert_eq!(band("low high").expect("unparsable: Linux's default"), 10_000..32_768);
        assert!(matches!(band("1024 65000"), Err(Error::NoRoom { low: 1024, high: 65_000 })));
    }

    #[test]
    fn free_ports_are_distinct_free_and_outside_the_ephemeral_range() {
        let ports: [u16; 8] = free_ports().expect("free ports");

        let band = outside_the_ephemeral_range().expect("room outside the ephemeral range");
        for (i, port) in ports.iter().enumerate() {
            assert!(band.contains(port), "{port} not in {band:?}");
            assert!(!ports[..i].contains(port), "{port} twice in {ports:?}");
            TcpListener::bind(("0.0.0.0", *port)).expect("the port is free");
        }
    }
}
