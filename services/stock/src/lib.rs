//! stock: consumes `checkout.processed`, continues the trace across the broker, reserves stock
//! exactly once per order, and answers an admin HTTP API.
//!
//! # Layout
//! - [`config`]: `Config::from_env()`, every variable the service reads.
//! - [`consumer`]: the traced consumer and how each delivery is settled (ack, retry, DLQ).
//! - [`store`]: the stock store, SQLite or PostgreSQL.
//! - [`admin`]: `GET /api/stock/{sku}`, `GET /api/orders/{id}`, `GET /healthz`.
//!
//! [`run`] consumes and serves until `shutdown`, then stops taking deliveries, finishes those
//! and the admin requests in progress (for at most `SHUTDOWN_DRAIN_SECS`) and returns; `main`
//! flushes telemetry after it.

pub mod admin;
pub mod config;
pub mod consumer;
pub mod store;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracehop_broker::catalog;
use tracehop_broker::confirm::ConfirmChannels;
use tracehop_broker::connection::{Broker, BrokerHealth};
use tracehop_telemetry::Telemetry;
use tracehop_telemetry::shutdown::{serve_draining, serve_http};

pub use config::Config;

use crate::admin::AdminState;
use crate::consumer::{ConsumeError, Handler};
use crate::store::{Store, StoreError};

/// Why stock stopped other than by a shutdown signal.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The store could not be opened.
    #[error("cannot open the stock store")]
    Store(#[from] StoreError),
    /// The broker could not be reached at startup.
    #[error("cannot connect to the broker")]
    Connect(#[source] lapin::Error),
    /// The broker stayed unreachable longer than `BROKER_GIVE_UP_SECS`.
    #[error("the broker connection was lost and did not recover")]
    BrokerLost,
    /// Consuming stopped for good.
    #[error("consumer")]
    Consume(#[from] ConsumeError),
}

/// Consumes and serves the admin API on `listener` until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    config: Config,
    telemetry: Telemetry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let store = Store::open(&config.store, &catalog::skus(), config.seed_units).await?;
    let broker =
        Broker::connect(config.amqp.clone(), "stock", config.broker_give_up).await.map_err(RunError::Connect)?;
    let health = broker.health();

    // One stop signal for both halves: the caller's shutdown, or the broker lost for good.
    let (stop, stopped) = watch::channel(None::<bool>);
    let stop_serving = stop.clone();
    let mut lost = health.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = shutdown => { let _ = stop.send(Some(false)); }
            Ok(()) = lost.wait_for(|h| *h == BrokerHealth::Lost).map(|r| r.map(|_| ())) => {
                tracing::error!("broker connection did not recover; exiting so a supervisor restarts stock");
                let _ = stop.send(Some(true));
            }
        }
    });
    let until_stopped = |mut stopped: watch::Receiver<Option<bool>>| async move {
        let _ = stopped.wait_for(Option::is_some).await;
    };

    let (consuming, consuming_now) = watch::channel(false);
    let handler = Arc::new(Handler {
        store: store.clone(),
        broker: broker.clone(),
        forwards: ConfirmChannels::new(broker.clone(), consumer::FORWARD_CHANNELS),
        telemetry: telemetry.clone(),
        mode: config.consumer_context,
        baggage_keys: config.baggage_span_attributes.clone(),
        consuming,
        source: tracehop_broker::topology::process_destination(),
        orders: consumer::OrderCounters::new(telemetry.meter()),
        retry: consumer::Forward::retry(),
        dead_letter: consumer::Forward::dead_letter(),
    });
    let router =
        admin::router(AdminState { store: store.clone(), broker: health, consuming: consuming_now }, telemetry);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "stock admin API listening");
    }
    let serving = serve_draining(until_stopped(stopped.clone()), config.drain_timeout, |stop| {
        serve_http(listener, router, config.header_timeout, stop)
    });
    let consuming = async {
        let shutdown = until_stopped(stopped.clone());
        let consumed =
            consumer::consume(handler, config.prefetch, shutdown, config.drain_timeout, config.broker_give_up).await;
        if consumed.is_err() {
            // Consuming is what stock is for: without it, stop serving and exit non-zero (its
            // supervisor restarts it) rather than answer 503 forever.
            stop_serving.send_modify(|stop| {
                stop.get_or_insert(false);
            });
        }
        consumed
    };
    // The admin API's accept loop only ends at shutdown (it waits out accept errors).
    let (_, consumed) = tokio::join!(serving, consuming);
    // Both bounded: an admin request still running past the drain deadline can hold a
    // PostgreSQL connection the pool's close waits for.
    let closing_store = async {
        if tokio::time::timeout(Duration::from_secs(1), store.close()).await.is_err() {
            tracing::warn!("the store did not close within a second; exiting anyway");
        }
    };
    tokio::join!(broker.close(), closing_store);
    if *stopped.borrow() == Some(true) {
        return Err(RunError::BrokerLost);
    }
    consumed?;
    Ok(())
}
