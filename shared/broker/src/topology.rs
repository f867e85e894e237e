//! The AMQP topology, defined once and declared by both checkout and stock.
//!
//! Declaring it from both sides means start order never loses a message: whichever service
//! comes up first creates the queue, so a publish never lands on an exchange with nothing bound.
//! Both must declare identical arguments (RabbitMQ refuses a redeclaration that differs with
//! PRECONDITION_FAILED), hence one definition.
//!
//! ```text
//! [checkout] (topic) --checkout.processed--> [stock.checkout-processed] (quorum) --> stock
//!      stock, transient failure: publish --> [stock.checkout-processed.retry] (quorum, TTL)
//!                                   --(expires, dead-letters back)--> [stock.checkout-processed]
//!      stock, poison message: publish --> [stock.checkout-processed.dlx] (fanout)
//!                                   --> [stock.checkout-processed.dlq] (quorum)
//!      delivery limit exceeded (a message that crashes its consumer) --> the same DLX
//! ```

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

/// Exchange checkout publishes to.
pub const EXCHANGE: &str = "checkout";
/// Routing key of the `checkout.processed` event.
pub const ROUTING_KEY: &str = "checkout.processed";
/// Queue stock consumes.
pub const QUEUE: &str = "stock.checkout-processed";
/// Where retried messages wait before they come back.
pub const RETRY_QUEUE: &str = "stock.checkout-processed.retry";
/// Dead-letter exchange of [`QUEUE`].
pub const DEAD_LETTER_EXCHANGE: &str = "stock.checkout-processed.dlx";
/// Messages that can never succeed, with their trace headers and the reason.
pub const DEAD_LETTER_QUEUE: &str = "stock.checkout-processed.dlq";

/// How long a retried message waits before it is delivered again.
pub const RETRY_DELAY: Duration = Duration::from_secs(2);
/// Trips through the retry queue before a message is given up on and dead-lettered.
pub const MAX_RETRIES: u32 = 5;
/// Deliveries of one message (consumer crashes, requeues) before the broker dead-letters it:
/// what stops a message that kills its consumer from crash-looping it forever.
pub const DELIVERY_LIMIT: i64 = 10;

fn long(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in entries {
        table.insert(ShortString::from(*key), value.clone());
    }
    table
}

/// Arguments shared by every queue: replicated (quorum), and dead-lettering that cannot lose a
/// message on the way (at-least-once needs `reject-publish` overflow).
fn quorum(extra: &[(&str, AMQPValue)]) -> FieldTable {
    let mut arguments = table(&[("x-queue-type", long("quorum"))]);
    for (key, value) in extra {
        arguments.insert(ShortString::from(*key), value.clone());
    }
    arguments
}

fn main_queue_arguments() -> FieldTable {
    quorum(&[
        ("x-delivery-limit", AMQPValue::LongLongInt(DELIVERY_LIMIT)),
        ("x-dead-letter-exchange", long(DEAD_LETTER_EXCHANGE)),
        ("x-dead-letter-strategy", long("at-least-once")),
        ("x-overflow", long("reject-publish")),
    ])
}

fn retry_queue_arguments() -> FieldTable {
    quorum(&[
        ("x-message-ttl", AMQPValue::LongLongInt(RETRY_DELAY.as_millis() as i64)),
        // The default exchange routes by queue name: an expired message goes straight back to
        // the main queue and to no one else bound to `checkout`.
        ("x-dead-letter-exchange", long("")),
        ("x-dead-letter-routing-key", long(QUEUE)),
        ("x-dead-letter-strategy", long("at-least-once")),
        ("x-overflow", long("reject-publish")),
    ])
}

/// Declares the whole topology on `channel`. Idempotent; safe from any number of services.
pub async fn declare(channel: &Channel) -> lapin::Result<()> {
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    let durable_queue = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    channel.exchange_declare(EXCHANGE.into(), ExchangeKind::Topic, durable, FieldTable::default()).await?;
    channel.exchange_declare(DEAD_LETTER_EXCHANGE.into(), ExchangeKind::Fanout, durable, FieldTable::default()).await?;
    channel.queue_declare(QUEUE.into(), durable_queue, main_queue_arguments()).await?;
    channel.queue_declare(RETRY_QUEUE.into(), durable_queue, retry_queue_arguments()).await?;
    channel.queue_declare(DEAD_LETTER_QUEUE.into(), durable_queue, quorum(&[])).await?;
    channel
        .queue_bind(
            QUEUE.into(),
            EXCHANGE.into(),
            ROUTING_KEY.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            DEAD_LETTER_QUEUE.into(),
            DEAD_LETTER_EXCHANGE.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// The PRODUCER span destination of `checkout.processed` (`checkout:checkout.processed`).
pub fn publish_destination() -> tracehop_telemetry::messaging::Destination {
    tracehop_telemetry::messaging::Destination::publish(EXCHANGE, ROUTING_KEY)
}

/// The CONSUMER span destination of stock's queue
/// (`checkout:checkout.processed:stock.checkout-processed`).
pub fn process_destination() -> tracehop_telemetry::messaging::Destination {
    tracehop_telemetry::messaging::Destination::process(EXCHANGE, ROUTING_KEY, QUEUE)
}
