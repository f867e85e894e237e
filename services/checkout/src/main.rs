//! checkout's entry point (`checkout`, or `checkout healthcheck` for the container probe): logging,
//! configuration, telemetry, serve, flush.

use anyhow::Context as _;
use tracehop_telemetry::logging::{self, LogFilter, LogFormat};
use tracehop_telemetry::{Env, Telemetry, TelemetryConfig, shutdown};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let env = Env::process();
    logging::init_logging(LogFormat::from_lookup(&env)?, LogFilter::from_lookup(&env)?)?;
    let config = checkout::Config::from_lookup(&env)?;
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        // The container healthcheck: grpc.health.v1 on our own port, SERVING or exit 1.
        std::process::exit(if checkout::healthcheck(config.addr).await { 0 } else { 1 });
    }
    let telemetry = Telemetry::new(&TelemetryConfig::from_lookup("checkout", &env)?)?;
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.addr))?;
    let outcome = checkout::run(listener, config, telemetry.clone(), shutdown::signal()).await;
    // Flush last, so the spans of the requests drained above are exported too.
    telemetry.shutdown().await;
    outcome.context("checkout stopped")
}
