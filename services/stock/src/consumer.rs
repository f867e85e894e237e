//! The `checkout.processed` consumer: continue the trace, reserve, then settle the delivery.
//!
//! A delivery is acked only after its reservation committed. What can never succeed (a body
//! that is not the event, a `message_id` that differs from the body's order id, an unknown SKU)
//! is republished to the dead-letter exchange with its trace headers and the reason, then
//! acked. A transient failure (the store is unreachable) goes to the retry queue, which sends
//! it back after a delay, at most `MAX_RETRIES` times. Insufficient stock is a business
//! outcome, recorded and acked. If even the republish fails the delivery is requeued: the
//! broker's delivery limit then dead-letters it. The consumer itself never exits on a message.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};
use opentelemetry::context::FutureExt as _;
use opentelemetry::metrics::{Counter, Meter};
use opentelemetry::trace::{SpanBuilder, SpanKind, TraceContextExt};
use opentelemetry::{Context, KeyValue};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracehop_broker::confirm::ConfirmChannels;
use tracehop_broker::connection::Broker;
use tracehop_broker::event::CheckoutProcessed;
use tracehop_broker::topology;
use tracehop_telemetry::Telemetry;
use tracehop_telemetry::messaging::{self, ConsumerContext, Destination, RETRY_COUNT_HEADER, Settle};
use tracehop_telemetry::spans::{error_chain, record_error, set_baggage_attributes};

use crate::store::{OrderLine, Outcome, Store};

/// How long forwarding a message (retry, dead letter) may wait for the broker's confirm, and an
/// ack or nack for the connection.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Channels for retries and dead letters: copies past this many at once (a store outage fails
/// a whole prefetch) wait for one, within the forward's timeout (5 s).
pub const FORWARD_CHANNELS: usize = 8;

/// `tracehop.reservation.outcome`: reserved, rejected, duplicate, dead_lettered, retried.
pub const OUTCOME: &str = "tracehop.reservation.outcome";
/// Header of a dead-lettered message: a low-cardinality reason (`invalid_json`, `unknown_sku`...).
pub const DEAD_LETTER_REASON: &str = "x-dead-letter-reason";
/// Header of a dead-lettered message: the error in words, at most [`MAX_ERROR_TEXT`] bytes.
pub const DEAD_LETTER_ERROR: &str = "x-dead-letter-error";
/// Longest error text a dead letter's header (and the span and log line beside it) carries. The
/// text may quote the message's own values (serde quotes a wrong-typed string whole), and a
/// header frame over the broker's `frame_max` closes the whole connection, so one such message
/// would drop it again at every redelivery.
pub const MAX_ERROR_TEXT: usize = 1024;
/// Longest order id and SKU stock accepts: the event's bound.
pub use tracehop_broker::event::MAX_ID;

/// What processing a delivery concluded.
#[derive(Debug)]
enum Verdict {
    Settled(Outcome),
    /// Can never succeed.
    Poison {
        reason: &'static str,
        error: String,
    },
    /// Might succeed later.
    Transient {
        reason: &'static str,
        error: String,
    },
}

impl Verdict {
    /// `error.type` of the processing metric: why the delivery was not handled.
    fn error_type(&self) -> Option<&'static str> {
        match self {
            Self::Settled(_) => None,
            Self::Poison { reason, .. } | Self::Transient { reason, .. } => Some(reason),
        }
    }
}

/// `tracehop.orders.reserved`: orders whose stock was reserved.
pub const ORDERS_RESERVED: &str = "tracehop.orders.reserved";
/// `tracehop.orders.rejected`: orders refused for want of stock (a business outcome).
pub const ORDERS_REJECTED: &str = "tracehop.orders.rejected";
/// `tracehop.orders.dead_lettered`: messages sent to the dead-letter queue, by
/// [`DEAD_LETTER_REASON_ATTRIBUTE`].
pub const ORDERS_DEAD_LETTERED: &str = "tracehop.orders.dead_lettered";
/// Attribute of [`ORDERS_DEAD_LETTERED`]: the reason, as in the `x-dead-letter-reason` header.
pub const DEAD_LETTER_REASON_ATTRIBUTE: &str = "tracehop.dead_letter.reason";

/// The business counters stock keeps. A duplicate delivery reserves and counts nothing; a
/// message dead-lettered twice (its ack lost after the copy was confirmed) is two messages in
/// the dead-letter queue and counts twice.
#[derive(Debug, Clone)]
pub struct OrderCounters {
    reserved: Counter<u64>,
    rejected: Counter<u64>,
    dead_lettered: Counter<u64>,
}

impl OrderCounters {
    /// The counters, on `meter`.
    pub fn new(meter: &Meter) -> Self {
        let orders = |name: &'static str, description: &'static str| {
            meter.u64_counter(name).with_unit("{order}").with_description(description).build()
        };
        Self {
            reserved: orders(ORDERS_RESERVED, "Orders whose stock was reserved."),
            rejected: orders(ORDERS_REJECTED, "Orders refused for want of stock."),
            dead_lettered: orders(ORDERS_DEAD_LETTERED, "Messages sent to the dead-letter queue."),
        }
    }
}

/// Everything a delivery's processing needs.
#[derive(Debug)]
pub struct Handler {
    /// The reservations.
    pub store: Store,
    /// The connection: deliveries arrive on it, retries and dead letters leave on it.
    pub broker: Broker,
    /// The channels retries and dead letters leave on, one copy per channel at a time (on the
    /// consuming channel, concurrent copies' returns could land on one another's confirms: an
    /// unroutable copy taken for delivered, its message acked and lost).
    pub forwards: ConfirmChannels,
    /// Tracer and propagator.
    pub telemetry: Telemetry,
    /// Parent or link.
    pub mode: ConsumerContext,
    /// Baggage keys copied onto the consumer span.
    pub baggage_keys: Vec<String>,
    /// True while a consumer is registered with the broker (readiness: `/healthz`).
    pub consuming: watch::Sender<bool>,
    /// The CONSUMER span's destination, built once.
    pub source: Destination,
    /// Reserved, rejected, dead-lettered.
    pub orders: OrderCounters,
    /// Where retries are republished: the retry queue, through the default exchange.
    pub retry: Forward,
    /// Where dead letters are republished: the dead-letter exchange.
    pub dead_letter: Forward,
}

/// Where stock republishes a delivery, and that destination as the publish metrics name it
/// (built once).
#[derive(Debug)]
pub struct Forward {
    exchange: &'static str,
    routing_key: &'static str,
    destination: Destination,
}

impl Forward {
    fn new(exchange: &'static str, routing_key: &'static str) -> Self {
        Self { exchange, routing_key, destination: Destination::publish(exchange, routing_key) }
    }

    /// The retry queue, through the default exchange.
    pub fn retry() -> Self {
        Self::new("", topology::RETRY_QUEUE)
    }

    /// The dead-letter exchange (fanout).
    pub fn dead_letter() -> Self {
        Self::new(topology::DEAD_LETTER_EXCHANGE, "")
    }
}

/// Opens the consuming channel on the current connection: prefetch, topology, consume.
/// `opening` gets the channel as soon as it exists, so that a caller who drops this midway
/// (shutdown) can still close it before the connection.
async fn open(
    broker: &Broker,
    prefetch: u16,
    opening: &mut Option<Channel>,
) -> lapin::Result<(Channel, lapin::Consumer, u64)> {
    let (channel, generation) = broker.channel().await?;
    *opening = Some(channel.clone());
    channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
    topology::declare(&channel).await?;
    let tag = format!("stock-{}", uuid::Uuid::new_v4().simple());
    let consumer = channel
        .basic_consume(
            topology::QUEUE.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((channel, consumer, generation))
}

/// Why consuming stopped other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    /// The consumer could not be set up on the broker.
    #[error("cannot start consuming")]
    Open(#[source] lapin::Error),
    /// The broker cancelled the consumer (the queue was deleted).
    #[error("the broker cancelled the consumer")]
    Cancelled,
}

/// How a consuming session on one connection ended.
enum Session {
    Shutdown,
    /// The connection or the channel was lost: consume again, on a new channel (of the new
    /// connection, once the supervisor has replaced it).
    Interrupted,
    Failed(ConsumeError),
}

/// Consumes until `shutdown`, then stops taking deliveries and waits up to `drain` for those in
/// progress; those still running then are dropped, and the channel is closed (the broker
/// requeues what they did not settle). Follows connection replacements; never stops on a bad
/// message. Stops with an error when the consumer cannot be set up: at once the first time, else
/// after `give_up` of trying.
pub async fn consume(
    handler: Arc<Handler>,
    prefetch: u16,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
    give_up: Duration,
) -> Result<(), ConsumeError> {
    let mut in_flight = JoinSet::new();
    let mut consumed_before = false;
    let mut failing_since: Option<Instant> = None;
    // The channel of the last session, and its consumer's tag when it is still to cancel.
    let mut last = None;
    tokio::pin!(shutdown);
    let outcome = loop {
        let link = handler.broker.link();
        let (current, was_up) = (link.generation, link.connection.status().connected());
        drop(link);
        // A broker that blocks its clients (a resource alarm) stalls the open: shutdown wins.
        // The channel being opened, kept here: should shutdown win, it is closed below.
        let mut opening = None;
        let opened = tokio::select! {
            () = &mut shutdown => None,
            opened = open(&handler.broker, prefetch, &mut opening) => Some(opened),
        };
        let Some(opened) = opened else {
            last = opening.map(|channel| (channel, None));
            break Ok(());
        };
        let (channel, consumer, generation) = match opened {
            Ok(opened) => opened,
            // Only a first open that fails is a startup failure.
            Err(error) if !consumed_before && current == 0 => break Err(ConsumeError::Open(error)),
            Err(error) => {
                // Later, the broker restarted, or a frame lapin cannot parse killed the
                // connection: keep trying. Opens that fail on a connection that was up (also
                // when the broker closes the connection over them) stop stock after `give_up`;
                // time without any connection is the broker health's to judge (`Lost` stops
                // stock).
                if was_up && failing_since.get_or_insert_with(Instant::now).elapsed() >= give_up {
                    break Err(ConsumeError::Open(error));
                }
                if handler.broker.lost(current).await {
                    tracing::warn!(%error, "broker connection lost; consuming again once it is replaced");
                    tokio::select! {
                        () = &mut shutdown => break Ok(()),
                        () = handler.broker.replaced(current) => continue,
                    }
                }
                // The connection is up, the consumer not (yet): try again shortly.
                tracing::warn!(%error, "cannot consume yet; retrying");
                tokio::select! {
                    () = &mut shutdown => break Ok(()),
                    () = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        };
        consumed_before = true;
        failing_since = None;
        handler.consuming.send_replace(true);
        let tag = consumer.tag();
        let session = session(&handler, consumer, generation, &mut in_flight, &mut shutdown).await;
        handler.consuming.send_replace(false);
        match session {
            Session::Shutdown => {
                last = Some((channel, Some(tag)));
                break Ok(());
            }
            Session::Interrupted => tracing::warn!("consuming again, on a new channel"),
            Session::Failed(error) => {
                // The broker cancelled the consumer already.
                last = Some((channel, None));
                break Err(error);
            }
        }
    };
    // One deadline for the cancel and the deliveries in progress: a broker that blocks its
    // clients (a resource alarm) answers neither the cancel nor the acks.
    let deadline = Instant::now() + drain;
    if let Some((channel, Some(tag))) = &last {
        // Stop taking work; deliveries not yet started go back to the queue.
        let cancelled = channel.basic_cancel(tag.clone(), BasicCancelOptions::default());
        match tokio::time::timeout_at(deadline.into(), cancelled).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::debug!(%error, "cancelling the consumer"),
            Err(_) => tracing::warn!("the broker did not confirm the consumer's cancel; shutting down anyway"),
        }
    }
    let pending = in_flight.len();
    let drained = async { while in_flight.join_next().await.is_some() {} };
    if tokio::time::timeout_at(deadline.into(), drained).await.is_err() {
        tracing::warn!(
            pending = in_flight.len(),
            "deliveries still in progress at the drain deadline; the broker will redeliver them"
        );
    } else if pending > 0 {
        tracing::info!(pending, "deliveries in progress finished before shutdown");
    }
    // Before the connection's close (waiting for its confirm within the drain only): the
    // broker requeues what a delivery still in progress did not settle.
    in_flight.abort_all();
    // Aborted, each task ends at its next poll: a lease it held (a copy still waiting for its
    // confirm) is dropped now, its channel's close sent while the channels below close.
    while in_flight.join_next().await.is_some() {}
    // The forwards' idle channels too.
    let forwards = handler.forwards.close();
    handler.broker.close_channels(last.map(|(channel, _)| channel).into_iter().chain(forwards), deadline).await;
    outcome
}

async fn session(
    handler: &Arc<Handler>,
    mut consumer: lapin::Consumer,
    generation: u64,
    in_flight: &mut JoinSet<()>,
    shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> Session {
    loop {
        tokio::select! {
            () = shutdown.as_mut() => return Session::Shutdown,
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
            () = handler.broker.replaced(generation) => return Session::Interrupted,
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    in_flight.spawn(delivery_task(handler.clone(), delivery, generation));
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "consumer interrupted");
                    return Session::Interrupted;
                }
                None if handler.broker.lost(generation).await => return Session::Interrupted,
                None => return Session::Failed(ConsumeError::Cancelled),
            },
        }
    }
}

/// A delivery's task: its handling, under the panic guard. A task is moved whole, so its size is
/// paid per order; a test holds it.
/// (The handling and the panic's recorder borrow the one handler this owns: no second clone
/// per delivery.)
#[allow(clippy::manual_async_fn, reason = "as an `async fn` the task was 2,952 bytes, against 2,384")]
fn delivery_task(handler: Arc<Handler>, delivery: Delivery, generation: u64) -> impl Future<Output = ()> + Send {
    async move {
        let acker = delivery.acker.clone();
        let record = |started, error_type| handler.record_settle(Settle::Nack, started, error_type);
        requeued_on_panic(acker, handler.handle(delivery, generation), record).await;
    }
}

/// Runs `handling`; should it panic (a bug), its delivery goes back to the queue at once rather
/// than hold one of the consumer's prefetch slots until the channel closes (panic after panic
/// would stall the consumer). The queue's delivery limit dead-letters a message that keeps
/// failing. A delivery already settled stays settled (lapin's acker is used once). `record`
/// gets a nack that was sent, or that failed or timed out on the wire, for the settle metrics;
/// not one lapin did not send (`Ok(false)`: the delivery was already settled, whose settle was
/// recorded then, or its channel was lost, and lapin cannot say which).
/// (Combinators rather than an `async fn`, which would keep `handling` twice in its state, as its
/// argument and inside the `catch_unwind`: a task is moved whole, so its size is paid per order.)
fn requeued_on_panic(
    acker: lapin::Acker,
    handling: impl Future<Output = ()>,
    record: impl FnOnce(Instant, Option<&'static str>),
) -> impl Future<Output = ()> {
    use futures_util::FutureExt as _;
    std::panic::AssertUnwindSafe(handling).catch_unwind().then(async move |handled| {
        if handled.is_ok() {
            return;
        }
        let started = Instant::now();
        let requeued = settle_bounded(acker.nack(REQUEUE)).await;
        match &requeued {
            Settled::Sent => tracing::error!("handling a delivery panicked; it goes back to the queue"),
            // Nothing sent, and possibly nothing to record: its settle was recorded when made.
            Settled::NotSent => {
                tracing::error!("handling a delivery panicked after it was settled, or its channel was lost");
                return;
            }
            Settled::Failed(error) => tracing::error!(
                %error,
                "handling a delivery panicked and its nack failed; the broker redelivers it when the channel closes"
            ),
            Settled::TimedOut => tracing::error!(
                "handling a delivery panicked and its nack timed out; the broker redelivers it when the channel closes"
            ),
        }
        record(started, requeued.error_type("nack_failed"));
    })
}

/// A nack that puts its delivery back on the queue.
const REQUEUE: BasicNackOptions = BasicNackOptions { requeue: true, multiple: false };

/// What became of an ack or a nack.
enum Settled {
    /// Written to the connection (the broker does not answer either).
    Sent,
    /// lapin sent nothing (`Ok(false)`): the delivery was already settled, or its channel was
    /// lost; lapin cannot say which.
    NotSent,
    /// lapin could not send it.
    Failed(lapin::Error),
    /// Not written within [`FORWARD_TIMEOUT`] (a connection that hangs).
    TimedOut,
}

impl Settled {
    /// Its `error.type`; `failed` names a failure (`ack_failed`, `nack_failed`).
    fn error_type(&self, failed: &'static str) -> Option<&'static str> {
        match self {
            Self::Sent => None,
            Self::NotSent => Some("channel_lost"),
            Self::Failed(_) => Some(failed),
            Self::TimedOut => Some("timeout"),
        }
    }
}

/// An ack or a nack, bounded: on a connection that hangs it would wait forever.
async fn settle_bounded(settling: impl Future<Output = lapin::Result<bool>>) -> Settled {
    match tokio::time::timeout(FORWARD_TIMEOUT, settling).await {
        Ok(Ok(true)) => Settled::Sent,
        Ok(Ok(false)) => Settled::NotSent,
        Ok(Err(error)) => Settled::Failed(error),
        Err(_) => Settled::TimedOut,
    }
}

impl Handler {
    /// Processes one delivery, which came on connection `generation`, under its CONSUMER span,
    /// and settles it.
    pub async fn handle(&self, delivery: Delivery, generation: u64) {
        let started = Instant::now();
        let peer = self.broker.peer();
        messaging::record_consumed(&self.telemetry, &self.source, &peer);
        let cx = messaging::start_process(&self.telemetry, self.mode, &self.source, &delivery, &peer);
        set_baggage_attributes(&cx, &self.baggage_keys);
        let error_type = async {
            let verdict = self.decide(&delivery).await;
            let error_type = verdict.error_type();
            self.settle(&delivery, verdict, generation).await;
            error_type
        }
        .with_context(cx.clone())
        .await;
        cx.span().end();
        messaging::record_process(&self.telemetry, &self.source, &peer, started.elapsed(), error_type);
    }

    async fn decide(&self, delivery: &Delivery) -> Verdict {
        let event: CheckoutProcessed = match serde_json::from_slice(&delivery.data) {
            Ok(event) => event,
            Err(error) => {
                return Verdict::Poison {
                    reason: "invalid_json",
                    error: format!("the body is not a checkout.processed event: {error}"),
                };
            }
        };
        if let Some(message_id) = delivery.properties.message_id()
            && message_id.as_str() != event.order_id
        {
            return Verdict::Poison {
                reason: "message_id_mismatch",
                error: format!("message_id {message_id:?} differs from the body's order_id {:?}", event.order_id),
            };
        }
        if let Err(error) = check_ids(&event) {
            return Verdict::Poison { reason: "invalid_order", error };
        }
        if event.items.is_empty() || event.items.iter().any(|item| item.quantity == 0) {
            return Verdict::Poison {
                reason: "invalid_order",
                error: "an order needs items with quantities of at least 1".into(),
            };
        }
        let lines: Vec<OrderLine> =
            event.items.iter().map(|item| OrderLine { sku: item.sku.clone(), quantity: item.quantity }).collect();
        match self.reserve(&event.order_id, &lines).await {
            Ok(outcome) => Verdict::Settled(outcome),
            Err(error) if error.is_permanent() => Verdict::Poison { reason: error.reason(), error: error.to_string() },
            Err(error) => Verdict::Transient { reason: error.reason(), error: error_chain(&error) },
        }
    }

    /// The reservation under a CLIENT span (the store's transaction, shared with the other
    /// reservations of its group).
    async fn reserve(&self, order_id: &str, lines: &[OrderLine]) -> Result<Outcome, crate::store::StoreError> {
        let summary = "UPDATE stock INSERT orders";
        let parent = Context::current();
        let span = self.telemetry.tracer().start_lazily(&parent, || {
            // Room for the outcome or `error.type` set when it ends, so the span's vector is not
            // grown, copied and freed then.
            let mut attributes = Vec::with_capacity(3);
            attributes.extend([
                KeyValue::new("db.system.name", self.store.db_system()),
                KeyValue::new("db.query.summary", summary),
            ]);
            SpanBuilder::from_name(summary).with_kind(SpanKind::Client).with_attributes(attributes)
        });
        let cx = parent.with_span(span);
        let result = self.store.reserve(order_id, lines).with_context(cx.clone()).await;
        let span = cx.span();
        match &result {
            Ok(outcome) => span.set_attribute(KeyValue::new(OUTCOME, outcome_name(outcome))),
            Err(error) => {
                let kind = error.reason();
                record_error(&span, kind, &error_chain(error));
            }
        }
        span.end();
        result
    }

    async fn settle(&self, delivery: &Delivery, verdict: Verdict, generation: u64) {
        let cx = Context::current();
        let span = cx.span();
        let tag = delivery.delivery_tag;
        match verdict {
            Verdict::Settled(outcome) => {
                span.set_attribute(KeyValue::new(OUTCOME, outcome_name(&outcome)));
                match &outcome {
                    Outcome::Reserved => {
                        self.orders.reserved.add(1, &[]);
                        tracing::debug!(delivery_tag = tag, "stock reserved");
                    }
                    Outcome::Rejected { sku, requested, available } => {
                        self.orders.rejected.add(1, &[]);
                        span.add_event(
                            "stock rejected",
                            vec![
                                KeyValue::new("tracehop.sku", sku.clone()),
                                KeyValue::new("tracehop.requested", *requested as i64),
                                KeyValue::new("tracehop.available", *available),
                            ],
                        );
                        tracing::warn!(%sku, requested, available, "order rejected: not enough stock");
                    }
                    Outcome::AlreadyProcessed(status) => {
                        span.add_event(
                            "duplicate delivery",
                            vec![KeyValue::new("tracehop.previous_outcome", status.as_str())],
                        );
                        tracing::info!(
                            previous = status.as_str(),
                            "redelivered order already handled; nothing reserved"
                        );
                    }
                }
                self.ack(delivery).await;
            }
            Verdict::Poison { reason, error } => {
                let error = bounded(error);
                record_error(&span, reason, &error);
                span.set_attribute(KeyValue::new(OUTCOME, "dead_lettered"));
                tracing::warn!(reason, %error, "message can never succeed; dead-lettering it");
                let headers = dead_letter_headers(reason, &error);
                if self.forward(delivery, generation, &self.dead_letter, headers).await {
                    self.count_dead_letter(reason);
                }
            }
            Verdict::Transient { reason, error } => {
                let error = bounded(error);
                record_error(&span, reason, &error);
                let headers = delivery.properties.headers().clone().unwrap_or_default();
                let retries = messaging::retry_count(&headers);
                if retries < i64::from(topology::MAX_RETRIES) {
                    span.set_attribute(KeyValue::new(OUTCOME, "retried"));
                    tracing::warn!(reason, %error, retry = retries + 1, "processing failed; retrying after a delay");
                    let extra = [(RETRY_COUNT_HEADER, AMQPValue::LongLongInt(retries + 1))];
                    self.forward(delivery, generation, &self.retry, extra.to_vec()).await;
                } else {
                    span.set_attribute(KeyValue::new(OUTCOME, "dead_lettered"));
                    tracing::error!(reason, %error, retries, "retries exhausted; dead-lettering the message");
                    let headers = dead_letter_headers("retries_exhausted", &bounded(format!("{reason}: {error}")));
                    if self.forward(delivery, generation, &self.dead_letter, headers).await {
                        self.count_dead_letter("retries_exhausted");
                    }
                }
            }
        }
    }

    fn count_dead_letter(&self, reason: &'static str) {
        self.orders.dead_lettered.add(1, &[KeyValue::new(DEAD_LETTER_REASON_ATTRIBUTE, reason)]);
    }

    /// Records an ack or nack in `messaging.client.operation.duration`.
    fn record_settle(&self, settle: Settle, started: Instant, error_type: Option<&'static str>) {
        messaging::record_settle(
            &self.telemetry,
            settle,
            &self.source,
            &self.broker.peer(),
            started.elapsed(),
            error_type,
        );
    }

    async fn ack(&self, delivery: &Delivery) {
        // The broker redelivers an unacked message; the store's order-id record makes the
        // redelivery reserve nothing. lapin answers Ok(false) when the delivery's channel was
        // lost in between: that ack never reached the broker either.
        let started = Instant::now();
        let acked = settle_bounded(delivery.acker.ack(BasicAckOptions::default())).await;
        match &acked {
            Settled::Sent => {}
            Settled::NotSent => tracing::warn!("ack not sent: the channel was lost; the broker will redeliver"),
            Settled::Failed(error) => {
                tracing::warn!(%error, "ack failed; the broker will redeliver, the store deduplicates")
            }
            Settled::TimedOut => tracing::warn!("ack timed out; the broker will redeliver, the store deduplicates"),
        }
        let error_type = acked.error_type("ack_failed");
        self.record_settle(Settle::Ack, started, error_type);
    }

    /// Republishes `delivery` (body, properties and trace headers, plus `extra` headers) and
    /// acks it once the broker confirmed the copy; true then. On failure the delivery is
    /// requeued, so nothing is lost; the queue's delivery limit stops that from looping forever.
    /// Its future is boxed: a publish and its confirm, it would otherwise make up most of the
    /// size of every delivery's task (moved whole, byte by byte), where only a message that
    /// failed needs it.
    fn forward<'a>(
        &'a self,
        delivery: &'a Delivery,
        generation: u64,
        target: &'a Forward,
        extra: Vec<(&'a str, AMQPValue)>,
    ) -> std::pin::Pin<Box<impl Future<Output = bool> + Send + 'a>> {
        Box::pin(self.forward_unboxed(delivery, generation, target, extra))
    }

    /// [`Self::forward`]'s work, unboxed.
    async fn forward_unboxed(
        &self,
        delivery: &Delivery,
        generation: u64,
        target: &Forward,
        extra: Vec<(&str, AMQPValue)>,
    ) -> bool {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        for (key, value) in extra {
            headers.insert(ShortString::from(key), value);
        }
        let properties: BasicProperties = delivery.properties.clone().with_headers(headers);
        // Returned if the retry or dead-letter queue is gone: the delivery is then requeued, where
        // without `mandatory` the broker would confirm the copy it dropped and the message would
        // be lost.
        let options = BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() };
        let publish = async {
            // On the delivery's own connection: its ack goes there once the copy is confirmed, and
            // a copy confirmed on a newer one, its delivery redelivered, would be sent twice.
            let mut lease = self.forwards.lease(generation).await?;
            lease.publish(target.exchange, target.routing_key, options, &delivery.data, properties).await
        };
        // A confirm that never comes (a connection that hangs) must not pin the delivery
        // forever; nor a wait for one of the forwards' channels.
        let started = Instant::now();
        let confirmed = tokio::time::timeout(FORWARD_TIMEOUT, publish).await;
        let error_type = match &confirmed {
            Ok(Ok(Confirmation::Ack(None))) => None,
            Ok(Ok(Confirmation::Ack(Some(_)))) => Some("unroutable"),
            Ok(Ok(Confirmation::Nack(_) | Confirmation::NotRequested)) => Some("nacked"),
            Ok(Err(_)) => Some("publish_failed"),
            Err(_) => Some("timeout"),
        };
        messaging::record_publish(
            &self.telemetry,
            &target.destination,
            &self.broker.peer(),
            started.elapsed(),
            error_type,
        );
        match confirmed {
            Ok(Ok(Confirmation::Ack(None))) => {
                self.ack(delivery).await;
                true
            }
            other => {
                let why = match other {
                    Ok(confirmed) => format!("{confirmed:?}"),
                    Err(_) => format!("no confirm within {FORWARD_TIMEOUT:?}"),
                };
                let cx = Context::current();
                record_error(&cx.span(), "forward_failed", &why);
                tracing::error!(
                    why,
                    exchange = target.exchange,
                    routing_key = target.routing_key,
                    "could not forward the message; requeueing it"
                );
                let started = Instant::now();
                let requeued = settle_bounded(delivery.acker.nack(REQUEUE)).await;
                match &requeued {
                    Settled::Failed(error) => tracing::warn!(%error, "nack failed; the broker will redeliver"),
                    Settled::TimedOut => tracing::warn!("nack timed out; the broker will redeliver"),
                    Settled::Sent | Settled::NotSent => {}
                }
                let error_type = requeued.error_type("nack_failed");
                self.record_settle(Settle::Nack, started, error_type);
                false
            }
        }
    }
}

/// Rejects the ids no store should hold: an order id that is empty or could not be the
/// message's `message_id`, a SKU that is empty or over [`MAX_ID`], and a NUL in either
/// (PostgreSQL's text cannot hold one: the group's whole transaction would fail, again at every
/// retry).
fn check_ids(event: &CheckoutProcessed) -> Result<(), String> {
    let check = |what: &str, value: &str| {
        if value.is_empty() {
            Err(format!("the {what} is empty"))
        } else if value.len() > MAX_ID {
            Err(format!("the {what} is {} bytes long, over {MAX_ID}", value.len()))
        } else if value.contains('\0') {
            Err(format!("the {what} holds a NUL character"))
        } else {
            Ok(())
        }
    };
    check("order id", &event.order_id)?;
    event.items.iter().try_for_each(|item| check("SKU", &item.sku))
}

/// `text` cut to at most [`MAX_ERROR_TEXT`] bytes, on a character boundary, with an ellipsis.
fn bounded(mut text: String) -> String {
    if text.len() > MAX_ERROR_TEXT {
        let mut end = MAX_ERROR_TEXT - '…'.len_utf8();
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

fn dead_letter_headers(reason: &str, error: &str) -> Vec<(&'static str, AMQPValue)> {
    vec![
        (DEAD_LETTER_REASON, AMQPValue::LongString(LongString::from(reason))),
        (DEAD_LETTER_ERROR, AMQPValue::LongString(LongString::from(error))),
    ]
}

fn outcome_name(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Reserved => "reserved",
        Outcome::Rejected { .. } => "rejected",
        Outcome::AlreadyProcessed(_) => "duplicate",
    }
}

#[cfg(test)]
mod tests {
    use tracehop_broker::event::Item;

    use super::*;

    #[tokio::test]
    async fn a_delivery_whose_handling_panics_goes_back_to_the_queue_at_once() {
        use lapin::options::QueueDeclareOptions;
        let vhost = tracehop_testkit::rabbit::TestVhost::create();
        let connection =
            lapin::Connection::connect(vhost.url(), lapin::ConnectionProperties::default()).await.expect("connect");
        let channel = connection.create_channel().await.expect("channel");
        let queue = "panics";
        channel
            .queue_declare(queue.into(), QueueDeclareOptions::default(), FieldTable::default())
            .await
            .expect("declare");
        channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                b"order",
                BasicProperties::default(),
            )
            .await
            .expect("publish");
        // One delivery at a time: a slot the panic kept would keep the message from coming back.
        channel.basic_qos(1, BasicQosOptions::default()).await.expect("qos");
        let mut consumer = channel
            .basic_consume(queue.into(), "stock".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .expect("consume");
        let next = async |consumer: &mut lapin::Consumer| {
            let next = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await;
            next.expect("no delivery within 5 s").expect("the consumer ended").expect("a delivery")
        };
        // What the settle metrics were given: a nack sent, and nothing for a delivery already
        // settled.
        let recorded = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = || {
            let recorded = recorded.clone();
            move |_, error_type| recorded.lock().expect("not poisoned").push(error_type)
        };
        let first = next(&mut consumer).await;
        let panicking = requeued_on_panic(first.acker.clone(), async { panic!("a bug in the handler") }, record());
        tokio::spawn(panicking).await.expect("the panic is caught");
        assert_eq!(*recorded.lock().expect("not poisoned"), [None]);
        let again = next(&mut consumer).await;
        assert!(again.redelivered, "another message came instead");
        assert_eq!(again.data, b"order");
        // A handler that settled before it panicked: the delivery stays settled.
        let acker = again.acker.clone();
        let settled = async move {
            acker.ack(BasicAckOptions::default()).await.expect("ack");
            panic!("a bug after the ack");
        };
        tokio::spawn(requeued_on_panic(again.acker.clone(), settled, record())).await.expect("the panic is caught");
        assert_eq!(*recorded.lock().expect("not poisoned"), [None], "a nack recorded that was never sent");
        let back = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await;
        assert!(back.is_err(), "the acked delivery came back: {back:?}");
        assert!(channel.status().connected(), "the channel closed");
    }

    /// A delivery's task is moved whole, byte by byte: at 8 KB (a panic guard that kept the
    /// handling twice) it cost stock 70k instructions per order. Its size, without building one.
    #[test]
    fn a_delivery_task_stays_small() {
        fn output_size<A, B, C, F>(_: fn(A, B, C) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let size = output_size(delivery_task);
        assert!(size <= TASK_BOUND, "a delivery's task is {size} bytes, over {TASK_BOUND}");
    }

    /// The task's bound: 2,384 bytes in the test build when it was set (2,272 since the channel
    /// left the task for a connection generation), and room for a little more state; a copy of
    /// the handling, or a publish kept inline, is well over it.
    const TASK_BOUND: usize = 3 * 1024;

    fn event(order_id: &str, sku: &str) -> CheckoutProcessed {
        CheckoutProcessed {
            order_id: order_id.into(),
            customer_id: "c".into(),
            items: vec![Item { sku: sku.into(), quantity: 1 }],
            total_cents: 1,
        }
    }

    #[test]
    fn ids_a_store_cannot_hold_are_refused() {
        assert_eq!(check_ids(&event("o-1", "SKU-001")), Ok(()));
        assert_eq!(check_ids(&event(&"o".repeat(MAX_ID), &"S".repeat(MAX_ID))), Ok(()));
        for (order_id, sku, error) in [
            ("", "SKU-001", "the order id is empty"),
            (&*"o".repeat(MAX_ID + 1), "SKU-001", "the order id is 256 bytes long, over 255"),
            ("o\0", "SKU-001", "the order id holds a NUL character"),
            ("o-1", "", "the SKU is empty"),
            ("o-1", &*"S".repeat(MAX_ID + 1), "the SKU is 256 bytes long, over 255"),
            ("o-1", "SKU\u{0}001", "the SKU holds a NUL character"),
        ] {
            assert_eq!(check_ids(&event(order_id, sku)), Err(error.to_owned()), "{order_id:?} / {sku:?}");
        }
    }

    #[test]
    fn error_texts_are_bounded_on_a_character_boundary() {
        assert_eq!(bounded("short".into()), "short");
        let exact = "a".repeat(MAX_ERROR_TEXT);
        assert_eq!(bounded(exact.clone()), exact);
        // Three-byte characters: the cut falls inside one unless it steps back.
        let long = bounded("€".repeat(MAX_ERROR_TEXT));
        assert!(long.len() <= MAX_ERROR_TEXT, "{}", long.len());
        assert!(long.ends_with("€…"));
    }
}
