//! checkout: prices orders over gRPC and publishes `checkout.processed` to RabbitMQ, carrying
//! the trace from the gateway across the broker.
//!
//! # Layout
//! - [`config`]: `Config::from_env()`, every variable the service reads.
//! - [`service`]: the `checkout.v1.CheckoutService` implementation (validate, price, publish).
//! - [`publisher`]: confirmed, traced publishing that survives a broker reconnection.
//! - [`error`]: `AppError` and its mapping to gRPC statuses.
//!
//! [`run`] serves until `shutdown` completes, then drains in-flight calls for at most
//! `SHUTDOWN_DRAIN_SECS`; `main` flushes telemetry after it returns.

pub mod config;
pub mod error;
pub mod publisher;
pub mod service;

use std::future::Future;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tracehop_broker::connection::{Broker, BrokerHealth};
use tracehop_proto::{CHECKOUT_SERVICE, CheckoutServiceServer};
use tracehop_telemetry::Telemetry;
use tracehop_telemetry::grpc::GrpcServerLayer;
use tracehop_telemetry::shutdown::serve_draining;

pub use config::Config;

use crate::publisher::Publisher;
use crate::service::CheckoutApi;

/// Why checkout stopped other than by a shutdown signal.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The broker could not be reached at startup.
    #[error("cannot connect to the broker")]
    Connect(#[source] lapin::Error),
    /// The publisher could not be set up (topology, channels).
    #[error("cannot set up publishing")]
    Publisher(#[source] crate::publisher::PublishError),
    /// The broker stayed unreachable longer than `BROKER_GIVE_UP_SECS`.
    #[error("the broker connection was lost and did not recover")]
    BrokerLost,
    /// The gRPC server failed.
    #[error("gRPC server")]
    Serve(#[from] tonic::transport::Error),
}

/// Serves checkout on `listener` until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    config: Config,
    telemetry: Telemetry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let broker =
        Broker::connect(config.amqp.clone(), "checkout", config.broker_give_up).await.map_err(RunError::Connect)?;
    let publisher = Publisher::open(broker.clone(), telemetry.clone(), config.publish_timeout)
        .await
        .map_err(RunError::Publisher)?;
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let mut health = broker.health();
    let lost = {
        let reporter = reporter.clone();
        async move { report_health(&reporter, &mut health).await }
    };
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "checkout listening");
    }
    let (stopped, mut stopped_by) = watch::channel(false);
    let stop = async move {
        tokio::select! {
            () = shutdown => {}
            () = lost => { let _ = stopped.send(true); }
        }
    };
    let server = tonic::transport::Server::builder()
        .layer(GrpcServerLayer::new(telemetry.clone()).baggage_attributes(&config.baggage_span_attributes))
        .add_service(health_service)
        .add_service(CheckoutServiceServer::new(CheckoutApi::new(publisher.clone(), telemetry.meter())));
    let served = serve_draining(stop, config.drain_timeout, |stop| {
        server.serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), stop)
    })
    .await;
    // Whatever ended the serving, the broker sees a clean close.
    publisher.close().await;
    broker.close().await;
    served.transpose()?;
    if *stopped_by.borrow_and_update() { Err(RunError::BrokerLost) } else { Ok(()) }
}

/// Keeps grpc.health.v1 in step with the broker: SERVING only while the connection is up.
/// Returns when the connection is lost for good.
async fn report_health(reporter: &tonic_health::server::HealthReporter, health: &mut watch::Receiver<BrokerHealth>) {
    loop {
        let state = *health.borrow_and_update();
        let status = if state == BrokerHealth::Up { ServingStatus::Serving } else { ServingStatus::NotServing };
        reporter.set_service_status("", status).await;
        reporter.set_service_status(CHECKOUT_SERVICE, status).await;
        match state {
            BrokerHealth::Up => tracing::info!("broker connection up"),
            BrokerHealth::Recovering => tracing::warn!("broker connection lost; recovering"),
            BrokerHealth::Lost => {
                tracing::error!("broker connection did not recover; exiting so a supervisor restarts checkout");
                return;
            }
        }
        if health.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Asks grpc.health.v1 on `addr` (0.0.0.0 means this host) whether checkout is SERVING.
pub async fn healthcheck(addr: std::net::SocketAddr) -> bool {
    use tonic_health::pb::health_check_response::ServingStatus as Status;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let timeout = std::time::Duration::from_secs(2);
    let probe = async {
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("http://{}", tracehop_telemetry::probe::local(addr)))
                .ok()?
                .connect_timeout(timeout);
        let mut client = HealthClient::new(endpoint.connect().await.ok()?);
        let response = client.check(HealthCheckRequest { service: String::new() }).await.ok()?;
        Some(response.into_inner().status() == Status::Serving)
    };
    matches!(tokio::time::timeout(timeout, probe).await, Ok(Some(true)))
}
