//! The gateway's configuration, read once from the environment (README, "Configuration").

use std::net::SocketAddr;
use std::time::Duration;

use http::Uri;
use tracehop_telemetry::http::InboundContext;
use tracehop_telemetry::{ConfigError, Env};

/// Everything the gateway needs besides telemetry.
#[derive(Debug, Clone)]
pub struct Config {
    /// `GATEWAY_ADDR`: where the HTTP server listens.
    pub addr: SocketAddr,
    /// `CHECKOUT_URL`: the checkout gRPC server.
    pub checkout_url: Uri,
    /// `GATEWAY_BODY_LIMIT`: largest request body accepted, in bytes (413 above).
    pub body_limit: usize,
    /// `CHECKOUT_TIMEOUT_MS`: how long a checkout call may take before the caller gets 504.
    pub checkout_timeout: Duration,
    /// `JAEGER_UI_URL`: base of the `trace_url` returned to callers.
    pub jaeger_ui_url: String,
    /// `GATEWAY_INBOUND_CONTEXT`: continue, link or ignore a caller's trace context.
    pub inbound_context: InboundContext,
    /// `GATEWAY_CORS_ORIGINS`: origins allowed to call the API from a browser (`*` for any).
    pub cors_origins: Vec<String>,
    /// `BAGGAGE_SPAN_ATTRIBUTES`: baggage keys copied onto the gateway's spans.
    pub baggage_span_attributes: Vec<String>,
    /// `SHUTDOWN_DRAIN_SECS`: how long shutdown waits for requests in progress.
    pub drain_timeout: Duration,
    /// `GATEWAY_HEADER_TIMEOUT_MS`: how long a client may take to send a request's headers, and
    /// a connection may stay idle between requests, before it is closed.
    pub header_timeout: Duration,
}

impl Config {
    /// Every variable [`Config::from_lookup`] reads (the compose file sets each one explicitly).
    pub const VARIABLES: &'static [&'static str] = &[
        "GATEWAY_ADDR",
        "CHECKOUT_URL",
        "GATEWAY_BODY_LIMIT",
        "CHECKOUT_TIMEOUT_MS",
        "JAEGER_UI_URL",
        "GATEWAY_INBOUND_CONTEXT",
        "GATEWAY_CORS_ORIGINS",
        "BAGGAGE_SPAN_ATTRIBUTES",
        "SHUTDOWN_DRAIN_SECS",
        "GATEWAY_HEADER_TIMEOUT_MS",
    ];

    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&Env::process())
    }

    /// Reads `env`.
    pub fn from_lookup(env: &Env<'_>) -> Result<Self, ConfigError> {
        let checkout_url: Uri = env.parse_or("CHECKOUT_URL", Uri::from_static("http://127.0.0.1:50051"))?;
        if checkout_url.scheme_str() != Some("http") || checkout_url.host().is_none() {
            return Err(ConfigError::new("CHECKOUT_URL", format!("expected http://host:port, got {checkout_url}")));
        }
        let body_limit: usize = env.parse_or("GATEWAY_BODY_LIMIT", 64 * 1024)?;
        if body_limit == 0 {
            return Err(ConfigError::new("GATEWAY_BODY_LIMIT", "must be at least 1 byte"));
        }
        let cors_origins = env.list_or("GATEWAY_CORS_ORIGINS", "*");
        // Checked with the rest, before telemetry starts and the port is bound.
        crate::cors(&cors_origins).map(drop)?;
        Ok(Self {
            addr: env.parse_or("GATEWAY_ADDR", SocketAddr::from(([0, 0, 0, 0], 8080)))?,
            checkout_url,
            body_limit,
            checkout_timeout: env.millis_or("CHECKOUT_TIMEOUT_MS", 2000)?,
            jaeger_ui_url: env.string_or("JAEGER_UI_URL", "http://localhost:16686").trim_end_matches('/').to_owned(),
            inbound_context: env.choice_or(
                "GATEWAY_INBOUND_CONTEXT",
                &[
                    ("continue", InboundContext::Continue),
                    ("link", InboundContext::Link),
                    ("ignore", InboundContext::Ignore),
                ],
                InboundContext::Continue,
            )?,
            cors_origins,
            baggage_span_attributes: env.list_or("BAGGAGE_SPAN_ATTRIBUTES", "customer.id"),
            drain_timeout: env.secs_or("SHUTDOWN_DRAIN_SECS", 5)?,
            header_timeout: env.millis_or("GATEWAY_HEADER_TIMEOUT_MS", 10_000)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_deadline_is_read_from_its_variable() {
        let map = [("GATEWAY_HEADER_TIMEOUT_MS".to_owned(), "250".to_owned())].into();
        let config = Config::from_lookup(&Env::from_map(&map)).expect("config");
        assert_eq!(config.header_timeout, Duration::from_millis(250));
    }

    #[test]
    fn deadlines_of_zero_are_refused_at_startup() {
        // 0 would fail every checkout, or close every connection, at once.
        for name in ["CHECKOUT_TIMEOUT_MS", "GATEWAY_HEADER_TIMEOUT_MS"] {
            let map = [(name.to_owned(), "0".to_owned())].into();
            let error = Config::from_lookup(&Env::from_map(&map)).expect_err(name);
            assert!(error.to_string().contains(name), "{error}");
        }
    }

    #[test]
    fn an_origin_a_header_cannot_hold_is_refused_with_the_rest_of_the_configuration() {
        let map = [("GATEWAY_CORS_ORIGINS".to_owned(), "https://a.example, https://b\u{7f}.example".to_owned())].into();
        let error = Config::from_lookup(&Env::from_map(&map)).expect_err("not a header value");
        assert_eq!(error.variable, "GATEWAY_CORS_ORIGINS");
        let map = [("GATEWAY_CORS_ORIGINS".to_owned(), "https://a.example".to_owned())].into();
        assert_eq!(Config::from_lookup(&Env::from_map(&map)).expect("valid").cors_origins, ["https://a.example"]);
    }
}
