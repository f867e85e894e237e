//! Publishing `checkout.processed` so that a returned `Ok` means the broker has it durably.
//!
//! Publisher confirms, `mandatory`, persistent delivery, `message_id` = order id. A nack, an
//! unroutable return (lapin: `Ack(Some(returned))`) or no confirm before the deadline is an
//! error. A connection lost before or mid-publish is waited out (the broker's supervisor
//! replaces it) and the message published on the new one: at-least-once, which stock's
//! idempotency turns into exactly-once.
//!
//! Each publish has a channel of its own for its duration, from a pool
//! ([`tracehop_broker::confirm`]): one outstanding publish per channel makes every return and
//! every nack unambiguous.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lapin::options::BasicPublishOptions;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation};
use opentelemetry::Context;
use opentelemetry::trace::TraceContextExt;
use tracehop_broker::confirm::{ConfirmChannels, Lease, LeaseError};
use tracehop_broker::connection::{Broker, CLOSE_WITHIN};
use tracehop_broker::event::{CONTENT_TYPE, CheckoutProcessed, EVENT_TYPE};
use tracehop_broker::topology;
use tracehop_telemetry::Telemetry;
use tracehop_telemetry::messaging::{self, Destination, Publish};
use tracehop_telemetry::spans::record_error;

/// AMQP `delivery_mode` of a message the broker writes to disk.
const PERSISTENT: u8 = 2;

/// Why a publish did not end in a confirm.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Nothing is bound to the exchange with this routing key.
    #[error("unroutable: the broker returned the message ({0})")]
    Unroutable(String),
    /// The broker refused the message (queue over its limits, node failure).
    #[error("the broker nacked the message")]
    Nacked,
    /// No confirm within the deadline (including time spent waiting for a reconnection).
    #[error("no confirm within {0:?}")]
    Timeout(Duration),
    /// The channel failed on a connection still up, or no channel could be opened.
    #[error("broker connection")]
    Broker(#[from] lapin::Error),
    /// The event could not be serialised (a bug, never bad input).
    #[error("cannot serialise the event")]
    Encode(#[from] serde_json::Error),
    /// The publisher is shutting down.
    #[error("the publisher is closed")]
    Closed,
    /// The connection was replaced under the publish (`Publisher::lease` leases again instead).
    #[error("the broker connection was replaced")]
    Replaced,
}

impl From<LeaseError> for PublishError {
    fn from(error: LeaseError) -> Self {
        match error {
            LeaseError::Closed => Self::Closed,
            LeaseError::Broker(error) => Self::Broker(error),
            LeaseError::Replaced => Self::Replaced,
        }
    }
}

impl PublishError {
    /// Low-cardinality `error.type` for spans.
    fn kind(&self) -> &'static str {
        match self {
            Self::Unroutable(_) => "unroutable",
            Self::Nacked => "nacked",
            Self::Timeout(_) => "timeout",
            Self::Broker(_) | Self::Replaced => "broker_unavailable",
            Self::Encode(_) => "encode",
            Self::Closed => "closed",
        }
    }
}

/// Publishes at most this many events at once; more wait for a channel (backpressure).
pub const CHANNELS: usize = 64;

/// Ends a publish's PRODUCER span and records its metrics exactly once: with the outcome, or,
/// when the caller gives up first (checkout's gRPC deadline drops the handler), as `cancelled`:
/// the message may still be confirmed and reserved, and the metrics must not pretend it was
/// never sent.
struct Finish<'a> {
    publisher: &'a Publisher,
    cx: Option<Context>,
    started: Instant,
}

impl Finish<'_> {
    fn finish(&mut self, error: Option<(&'static str, &str)>) {
        let Some(cx) = self.cx.take() else { return };
        let span = cx.span();
        if let Some((kind, message)) = error {
            record_error(&span, kind, message);
        }
        span.end();
        let publisher = self.publisher;
        let peer = publisher.broker.peer();
        let error_type = error.map(|(kind, _)| kind);
        messaging::record_publish(
            &publisher.telemetry,
            &publisher.destination,
            &peer,
            self.started.elapsed(),
            error_type,
        );
    }
}

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        self.finish(Some(("cancelled", "the caller gave up before the broker's confirm")));
    }
}

/// Publishes events, each on a confirm-mode channel of its own.
#[derive(Debug, Clone)]
pub struct Publisher {
    broker: Broker,
    pool: std::sync::Arc<ConfirmChannels>,
    telemetry: Telemetry,
    timeout: Duration,
    /// The PRODUCER span's destination, built once.
    destination: Destination,
}

impl Publisher {
    /// Declares the shared topology (on the pool's first channel) and opens the pool.
    pub async fn open(broker: Broker, telemetry: Telemetry, timeout: Duration) -> Result<Self, PublishError> {
        let pool = std::sync::Arc::new(ConfirmChannels::new(broker.clone(), CHANNELS).declaring_topology());
        drop(pool.lease(broker.generation()).await?);
        Ok(Self { broker, pool, telemetry, timeout, destination: topology::publish_destination() })
    }

    /// Closes the idle channels, at shutdown, before the connection ([`Broker::close_channels`];
    /// [`CLOSE_WITHIN`] at most), and refuses later publishes ([`PublishError::Closed`]). A publish
    /// still under way keeps its channel until it ends.
    pub async fn close(&self) {
        let idle = self.pool.close();
        let deadline = Instant::now() + CLOSE_WITHIN;
        self.broker.close_channels(idle, deadline).await;
    }

    /// Publishes `event` under a PRODUCER span (child of the current span) and waits for the
    /// broker's confirm.
    pub async fn publish(&self, event: &CheckoutProcessed) -> Result<(), PublishError> {
        let body = serde_json::to_vec(event)?;
        let mut headers = FieldTable::default();
        let publish = Publish { destination: &self.destination, message_id: &event.order_id, body_size: body.len() };
        let cx =
            messaging::start_publish(&self.telemetry, &Context::current(), &publish, &self.broker.peer(), &mut headers);
        let properties = BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_type(EVENT_TYPE.into())
            .with_message_id(event.order_id.as_str().into())
            .with_delivery_mode(PERSISTENT)
            .with_timestamp(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
            .with_app_id("checkout".into())
            .with_headers(headers);
        let mut finish = Finish { publisher: self, cx: Some(cx), started: Instant::now() };
        let outcome = match tokio::time::timeout(self.timeout, self.publish_until_confirmed(&body, &properties)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(PublishError::Timeout(self.timeout)),
        };
        match &outcome {
            Ok(()) => finish.finish(None),
            Err(error) => finish.finish(Some((error.kind(), &error.to_string()))),
        }
        outcome
    }

    /// A channel from the pool; while the connection is lost, waits for its replacement (within
    /// the caller's deadline).
    async fn lease(&self) -> Result<Lease<'_>, PublishError> {
        loop {
            let generation = self.broker.generation();
            match self.pool.lease(generation).await {
                Err(LeaseError::Broker(error)) if self.broker.lost(generation).await => {
                    tracing::warn!(%error, "broker connection lost; waiting for its replacement to publish");
                    self.broker.replaced(generation).await;
                }
                // Replaced between reading the generation and the lease: lease on the new one.
                Err(LeaseError::Replaced) => {}
                leased => return Ok(leased?),
            }
        }
    }

    async fn publish_until_confirmed(&self, body: &[u8], properties: &BasicProperties) -> Result<(), PublishError> {
        let options = BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() };
        let mut lease = self.lease().await?;
        loop {
            let confirmed =
                lease.publish(topology::EXCHANGE, topology::ROUTING_KEY, options, body, properties.clone()).await;
            match confirmed {
                Ok(Confirmation::Ack(None)) => return Ok(()),
                Ok(Confirmation::Ack(Some(returned))) => {
                    return Err(PublishError::Unroutable(returned.reply_text.to_string()));
                }
                // Confirm mode is on for this channel: an unconfirmed publish is a broken promise.
                // (The lease has discarded the channel.)
                Ok(Confirmation::Nack(_) | Confirmation::NotRequested) => return Err(PublishError::Nacked),
                Err(other @ (LeaseError::Closed | LeaseError::Replaced)) => return Err(other.into()),
                // The connection dropped: wait until the supervisor replaces it, then publish
                // again on the new one (within the deadline the caller set). An error on a
                // channel of a connection still up is that channel's: given back.
                Err(LeaseError::Broker(error)) => {
                    // The broker closing the channel (a soft error) leaves the connection up.
                    if error.is_amqp_soft_error() || !self.broker.lost(lease.generation()).await {
                        return Err(error.into());
                    }
                    tracing::warn!(%error, "publish interrupted; waiting for the broker connection to be replaced");
                    // The lost connection's channel is not pooled again, and the permit is given
                    // back first: with every permit held by a waiting publish, none could take a
                    // second one.
                    lease.forget();
                    drop(lease);
                    lease = self.lease().await?;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tracehop_broker::connection::BrokerNodes;
    use tracehop_broker::event::Item;

    use super::*;

    /// At shutdown the pool's channels close before the connection (a channel only dropped is
    /// closed by lapin after the connection's close began: a logged connection error), and a
    /// publish that comes later is refused rather than opening a channel again.
    #[tokio::test]
    async fn a_closed_publisher_has_closed_its_channels_and_refuses_to_publish() {
        let vhost = tracehop_testkit::rabbit::TestVhost::create();
        let nodes = BrokerNodes::parse(vhost.url()).expect("nodes");
        let broker = Broker::connect(nodes, "publisher-test", Duration::from_secs(30)).await.expect("connect");
        let telemetry = Telemetry::disabled("checkout");
        let publisher = Publisher::open(broker.clone(), telemetry, Duration::from_secs(2)).await.expect("open");
        let event = CheckoutProcessed {
            order_id: "o-1".into(),
            customer_id: "c".into(),
            items: vec![Item { sku: "SKU-001".into(), quantity: 1 }],
            total_cents: 1,
        };
        publisher.publish(&event).await.expect("published");
        let pooled = publisher.pool.idle();
        assert!(!pooled.is_empty(), "no channel in the pool");

        publisher.close().await;

        assert!(pooled.iter().all(|channel| !channel.status().connected()), "a pooled channel is still open");
        let refused = publisher.publish(&event).await;
        assert!(matches!(refused, Err(PublishError::Closed)), "{refused:?}");
        broker.close().await;
    }
}
