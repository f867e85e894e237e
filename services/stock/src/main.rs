//! stock's entry point (`stock`, or `stock healthcheck` for the container probe): logging,
//! configuration, telemetry, run, flush.

use anyhow::Context as _;
use std::time::Duration;
use tracehop_telemetry::logging::{self, LogFilter, LogFormat};

use tracehop_telemetry::{Env, Telemetry, TelemetryConfig, probe, shutdown};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let env = Env::process();
    logging::init_logging(LogFormat::from_lookup(&env)?, LogFilter::from_lookup(&env)?)?;
    let config = stock::Config::from_lookup(&env)?;
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        // The container healthcheck: the image has no curl, the binary probes itself.
        let healthy = probe::http_ok(config.addr, "/healthz", Duration::from_secs(2)).await;
        std::process::exit(if healthy { 0 } else { 1 });
    }
    let telemetry = Telemetry::new(&TelemetryConfig::from_lookup("stock", &env)?)?;
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.addr))?;
    let outcome = stock::run(listener, config, telemetry.clone(), shutdown::signal()).await;
    // Flush last, so the spans of the deliveries drained above are exported too.
    telemetry.shutdown().await;
    outcome.context("stock stopped")
}
