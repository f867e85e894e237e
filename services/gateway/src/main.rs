//! gateway's entry point (`gateway`, or `gateway healthcheck` for the container probe): logging,
//! configuration, telemetry, serve, flush.

use anyhow::Context as _;
use std::time::Duration;
use tracehop_telemetry::logging::{self, LogFilter, LogFormat};

use tracehop_telemetry::{Env, Telemetry, TelemetryConfig, probe, shutdown};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let env = Env::process();
    logging::init_logging(LogFormat::from_lookup(&env)?, LogFilter::from_lookup(&env)?)?;
    let config = gateway::Config::from_lookup(&env)?;
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        // The container healthcheck: the image has no curl, the binary probes itself.
        let healthy = probe::http_ok(config.addr, "/healthz", Duration::from_secs(2)).await;
        std::process::exit(if healthy { 0 } else { 1 });
    }
    let telemetry = Telemetry::new(&TelemetryConfig::from_lookup("gateway", &env)?)?;
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.addr))?;
    let outcome = gateway::run(listener, config, telemetry.clone(), shutdown::signal()).await;
    // Flush last, so the spans of the requests drained above are exported too.
    telemetry.shutdown().await;
    outcome.context("gateway stopped")
}
