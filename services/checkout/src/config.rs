//! Checkout's configuration, read once from the environment (README, "Configuration").

use std::net::SocketAddr;
use std::time::Duration;

use tracehop_broker::connection::BrokerNodes;
use tracehop_telemetry::{ConfigError, Env};

/// Everything checkout needs besides telemetry.
#[derive(Debug, Clone)]
pub struct Config {
    /// `CHECKOUT_ADDR`: where the gRPC server listens.
    pub addr: SocketAddr,
    /// `AMQP_ADDR`: the broker, or the nodes of a cluster.
    pub amqp: BrokerNodes,
    /// `PUBLISH_TIMEOUT_MS`: how long a publish may wait for the broker's confirm, including
    /// waiting out a reconnection and republishing. Shorter than the gateway's
    /// `CHECKOUT_TIMEOUT_MS`, so the caller gets UNAVAILABLE rather than a timeout.
    pub publish_timeout: Duration,
    /// `BROKER_GIVE_UP_SECS`: how long the broker may stay unreachable before the process
    /// exits non-zero for its supervisor to restart it.
    pub broker_give_up: Duration,
    /// `BAGGAGE_SPAN_ATTRIBUTES`: baggage keys copied onto checkout's spans.
    pub baggage_span_attributes: Vec<String>,
    /// `SHUTDOWN_DRAIN_SECS`: how long shutdown waits for calls in progress.
    pub drain_timeout: Duration,
}

impl Config {
    /// Every variable [`Config::from_lookup`] reads (the compose file sets each one explicitly).
    pub const VARIABLES: &'static [&'static str] = &[
        "CHECKOUT_ADDR",
        "AMQP_ADDR",
        "PUBLISH_TIMEOUT_MS",
        "BROKER_GIVE_UP_SECS",
        "BAGGAGE_SPAN_ATTRIBUTES",
        "SHUTDOWN_DRAIN_SECS",
    ];

    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&Env::process())
    }

    /// Reads `env`.
    pub fn from_lookup(env: &Env<'_>) -> Result<Self, ConfigError> {
        let amqp = env.string_or("AMQP_ADDR", "amqp://guest:guest@127.0.0.1:5672/%2f");
        Ok(Self {
            addr: env.parse_or("CHECKOUT_ADDR", SocketAddr::from(([0, 0, 0, 0], 50051)))?,
            amqp: BrokerNodes::parse(&amqp).map_err(|e| ConfigError::new("AMQP_ADDR", e))?,
            publish_timeout: env.millis_or("PUBLISH_TIMEOUT_MS", 1500)?,
            broker_give_up: env.secs_or("BROKER_GIVE_UP_SECS", 120)?,
            baggage_span_attributes: env.list_or("BAGGAGE_SPAN_ATTRIBUTES", "customer.id"),
            drain_timeout: env.secs_or("SHUTDOWN_DRAIN_SECS", 5)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_deadline_of_zero_is_refused_at_startup() {
        // 0 would fail every publish before its confirm could come.
        let map = [("PUBLISH_TIMEOUT_MS".to_owned(), "0".to_owned())].into();
        let error = Config::from_lookup(&Env::from_map(&map)).expect_err("0 is refused");
        assert!(error.to_string().contains("PUBLISH_TIMEOUT_MS"), "{error}");
        let map = [("PUBLISH_TIMEOUT_MS".to_owned(), "250".to_owned())].into();
        assert_eq!(
            Config::from_lookup(&Env::from_map(&map)).expect("config").publish_timeout,
            Duration::from_millis(250)
        );
    }
}
