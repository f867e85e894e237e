//! Stock's configuration, read once from the environment (README, "Configuration").

use std::net::SocketAddr;
use std::time::Duration;

use tracehop_broker::connection::BrokerNodes;
use tracehop_telemetry::messaging::ConsumerContext;
use tracehop_telemetry::{ConfigError, Env};

use crate::store::StoreLocation;

/// Everything stock needs besides telemetry.
#[derive(Debug, Clone)]
pub struct Config {
    /// `STOCK_ADDR`: where the admin HTTP API listens.
    pub addr: SocketAddr,
    /// `AMQP_ADDR`: the broker, or the nodes of a cluster.
    pub amqp: BrokerNodes,
    /// `STOCK_DB`: a SQLite file path (default `stock.db`) or a `postgres://` URL.
    pub store: StoreLocation,
    /// `STOCK_SEED_UNITS`: units per SKU a new, empty store starts with.
    pub seed_units: u32,
    /// `STOCK_PREFETCH`: deliveries in flight at once (unacked), i.e. the consumer's concurrency.
    pub prefetch: u16,
    /// `CONSUMER_CONTEXT`: `parent` (one trace across the broker) or `link` (a new trace linked
    /// to the producer span).
    pub consumer_context: ConsumerContext,
    /// `BAGGAGE_SPAN_ATTRIBUTES`: baggage keys copied onto the consumer's spans.
    pub baggage_span_attributes: Vec<String>,
    /// `BROKER_GIVE_UP_SECS`: how long the broker may stay unreachable before the process exits
    /// non-zero for its supervisor to restart it.
    pub broker_give_up: Duration,
    /// `SHUTDOWN_DRAIN_SECS`: how long shutdown waits for deliveries and admin requests in
    /// progress.
    pub drain_timeout: Duration,
    /// `STOCK_HEADER_TIMEOUT_MS`: how long an admin API client may take to send a request's
    /// headers, and leave its connection idle between requests.
    pub header_timeout: Duration,
}

impl Config {
    /// Every variable [`Config::from_lookup`] reads (the compose file sets each one explicitly).
    pub const VARIABLES: &'static [&'static str] = &[
        "STOCK_ADDR",
        "AMQP_ADDR",
        "STOCK_DB",
        "STOCK_SEED_UNITS",
        "STOCK_PREFETCH",
        "CONSUMER_CONTEXT",
        "BAGGAGE_SPAN_ATTRIBUTES",
        "BROKER_GIVE_UP_SECS",
        "SHUTDOWN_DRAIN_SECS",
        "STOCK_HEADER_TIMEOUT_MS",
    ];

    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&Env::process())
    }

    /// Reads `env`.
    pub fn from_lookup(env: &Env<'_>) -> Result<Self, ConfigError> {
        let amqp = env.string_or("AMQP_ADDR", "amqp://guest:guest@127.0.0.1:5672/%2f");
        let prefetch: u16 = env.parse_or("STOCK_PREFETCH", 32)?;
        if prefetch == 0 {
            return Err(ConfigError::new("STOCK_PREFETCH", "must be at least 1 (0 would mean unlimited)"));
        }
        Ok(Self {
            addr: env.parse_or("STOCK_ADDR", SocketAddr::from(([0, 0, 0, 0], 8082)))?,
            amqp: BrokerNodes::parse(&amqp).map_err(|e| ConfigError::new("AMQP_ADDR", e))?,
            store: StoreLocation::parse(&env.string_or("STOCK_DB", "stock.db"))
                .map_err(|e| ConfigError::new("STOCK_DB", e))?,
            seed_units: env.parse_or("STOCK_SEED_UNITS", 1000)?,
            prefetch,
            consumer_context: env.choice_or(
                "CONSUMER_CONTEXT",
                &[("parent", ConsumerContext::Parent), ("link", ConsumerContext::Link)],
                ConsumerContext::Parent,
            )?,
            baggage_span_attributes: env.list_or("BAGGAGE_SPAN_ATTRIBUTES", "customer.id"),
            broker_give_up: env.secs_or("BROKER_GIVE_UP_SECS", 120)?,
            drain_timeout: env.secs_or("SHUTDOWN_DRAIN_SECS", 5)?,
            header_timeout: env.millis_or("STOCK_HEADER_TIMEOUT_MS", 10_000)?,
        })
    }
}
