//! PRODUCER and CONSUMER spans for RabbitMQ, named and attributed per OpenTelemetry semantic
//! conventions 1.44 (messaging, "Development"), and the consumer's parent-or-link choice.
//!
//! | span | name | kind |
//! |---|---|---|
//! | publish | `publish {exchange}:{routing key}` | PRODUCER |
//! | process | `process {exchange}:{routing key}:{queue}` | CONSUMER |
//!
//! An empty exchange is spelled `amq.default`. Attributes the conventions do not define for
//! RabbitMQ (redelivery, attempt count) use the `tracehop.` prefix.
//!
//! The `record_*` functions record the messaging metrics of [`crate::metrics`] with the same
//! destination and broker, and only the conventions' low-cardinality attributes.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use opentelemetry::baggage::{BaggageExt, KeyValueMetadata};
use opentelemetry::trace::{SpanBuilder, SpanKind, TraceContextExt};
use opentelemetry::{Context, KeyValue, StringValue};
use opentelemetry_semantic_conventions::attribute::{
    ERROR_TYPE, MESSAGING_DESTINATION_NAME, MESSAGING_MESSAGE_BODY_SIZE, MESSAGING_MESSAGE_ID,
    MESSAGING_OPERATION_NAME, MESSAGING_OPERATION_TYPE, MESSAGING_RABBITMQ_DESTINATION_ROUTING_KEY,
    MESSAGING_RABBITMQ_MESSAGE_DELIVERY_TAG, MESSAGING_SYSTEM, SERVER_ADDRESS, SERVER_PORT,
};

use crate::Telemetry;
use crate::metrics::{AttributeSet, same_str};
use crate::propagation::{AmqpHeaderExtractor, AmqpHeaderInjector};
use crate::spans::{SpanNames, links_to};

/// `tracehop.message.redelivered`: the broker flagged the delivery as a redelivery.
pub const REDELIVERED: &str = "tracehop.message.redelivered";
/// `tracehop.message.attempt`: 1 for the first delivery, counting broker redeliveries and
/// trips through a retry queue.
pub const ATTEMPT: &str = "tracehop.message.attempt";
/// Header a consumer sets when it republishes a message for a delayed retry: how many retries
/// the message has had. (Not `x-death`: recent RabbitMQ versions ignore a client's `x-death`.)
pub const RETRY_COUNT_HEADER: &str = "x-retry-count";

/// The broker a span talks to (`server.address`, `server.port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerPeer {
    /// Host name or IP (shared: spans reference it, never copy it).
    pub address: Arc<str>,
    /// AMQP port.
    pub port: u16,
}

impl From<&lapin::uri::AMQPUri> for BrokerPeer {
    /// The host and port a connection to `uri` talks to.
    fn from(uri: &lapin::uri::AMQPUri) -> Self {
        Self { address: Arc::from(uri.authority.host.as_str()), port: uri.authority.port }
    }
}

/// Where messages are published (`{exchange}:{routing key}`), or where a queue receives them
/// from (`{exchange}:{routing key}:{queue}`), with its span name and attribute values built
/// once: spans of every message share them instead of formatting and copying strings.
#[derive(Debug, Clone)]
pub struct Destination {
    /// `messaging.destination.name`.
    name: StringValue,
    /// `messaging.rabbitmq.destination.routing_key`.
    routing_key: StringValue,
    /// `publish <name>` or `process <name>`: one of [`DESTINATION_NAMES`], or past its bound,
    /// this destination's own.
    span_name: Cow<'static, str>,
}

/// The span names of every destination made in the process, kept for its life: a service makes
/// a handful, at startup. A program that made one per message (a routing key per tenant, say)
/// keeps the first [`crate::spans::MAX_NAMES`] and copies the others' names into each span.
static DESTINATION_NAMES: SpanNames = SpanNames::new();

impl Destination {
    fn new(operation: &'static str, name: &str, routing_key: &str) -> Self {
        let (span_name, name) = DESTINATION_NAMES.get(operation, name);
        Self { name: StringValue::from(name), routing_key: StringValue::from(Arc::<str>::from(routing_key)), span_name }
    }

    /// What a producer publishes to: exchange (empty: the default exchange) and routing key
    /// (empty, as for a fanout exchange: the name is the exchange's alone).
    pub fn publish(exchange: &str, routing_key: &str) -> Self {
        let exchange = if exchange.is_empty() { "amq.default" } else { exchange };
        let name = if routing_key.is_empty() { exchange.to_owned() } else { format!("{exchange}:{routing_key}") };
        Self::new("publish", &name, routing_key)
    }

    /// What a consumer processes: the binding (exchange, routing key) its queue receives the
    /// messages through, and the queue. Named after the binding, not after each delivery's own
    /// exchange and routing key, which change when a message comes back through a retry queue.
    pub fn process(exchange: &str, routing_key: &str, queue: &str) -> Self {
        let exchange = if exchange.is_empty() { "amq.default" } else { exchange };
        Self::new("process", &format!("{exchange}:{routing_key}:{queue}"), routing_key)
    }
}

/// How a CONSUMER span relates to the PRODUCER span whose context the message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConsumerContext {
    /// The CONSUMER span is a child of the PRODUCER span: one trace, and Jaeger draws the
    /// `checkout -> stock` edge (the default here).
    #[default]
    Parent,
    /// The CONSUMER span starts a new trace with a link to the PRODUCER span (the semantic
    /// conventions' default for asynchronous hops). Baggage still crosses.
    Link,
}

fn common_attributes(
    operation: &'static str,
    operation_type: &'static str,
    destination: &Destination,
    peer: &BrokerPeer,
) -> Vec<KeyValue> {
    // Room for the most a span adds to these (a CONSUMER span: 5 more at its start, then the
    // baggage, its outcome and `error.type`), so its vector is not grown, copied and freed.
    let mut attributes = Vec::with_capacity(16);
    attributes.extend([
        KeyValue::new(MESSAGING_SYSTEM, "rabbitmq"),
        KeyValue::new(MESSAGING_OPERATION_NAME, operation),
        KeyValue::new(MESSAGING_OPERATION_TYPE, operation_type),
        KeyValue::new(MESSAGING_DESTINATION_NAME, destination.name.clone()),
        KeyValue::new(MESSAGING_RABBITMQ_DESTINATION_ROUTING_KEY, destination.routing_key.clone()),
        KeyValue::new(SERVER_ADDRESS, StringValue::from(peer.address.clone())),
        KeyValue::new(SERVER_PORT, i64::from(peer.port)),
    ]);
    attributes
}

/// What a publish span describes.
#[derive(Debug, Clone, Copy)]
pub struct Publish<'a> {
    /// Where it goes.
    pub destination: &'a Destination,
    /// `message_id` of the message.
    pub message_id: &'a str,
    /// Body size in bytes.
    pub body_size: usize,
}

/// Starts the PRODUCER span of a publish as a child of `parent`, and writes its context (and
/// `parent`'s baggage) into `headers`. End the span once the broker confirmed the message.
pub fn start_publish(
    telemetry: &Telemetry,
    parent: &Context,
    publish: &Publish<'_>,
    peer: &BrokerPeer,
    headers: &mut FieldTable,
) -> Context {
    let span = telemetry.tracer().start_lazily(parent, || {
        let mut attributes = common_attributes("publish", "send", publish.destination, peer);
        attributes.extend([
            KeyValue::new(MESSAGING_MESSAGE_ID, publish.message_id.to_owned()),
            KeyValue::new(MESSAGING_MESSAGE_BODY_SIZE, publish.body_size as i64),
        ]);
        SpanBuilder::from_name(publish.destination.span_name.clone())
            .with_kind(SpanKind::Producer)
            .with_attributes(attributes)
    });
    let cx = parent.with_span(span);
    drop_context_headers(telemetry, headers);
    telemetry.propagator().inject_context(&cx, &mut AmqpHeaderInjector(headers));
    cx
}

/// Removes the headers the propagators write, in any letter case: headers copied from another
/// message (a republish) would otherwise keep what this context lacks (its `tracestate`, its
/// baggage) beside the new `traceparent`, another trace's state on this one.
fn drop_context_headers(telemetry: &Telemetry, headers: &mut FieldTable) {
    let propagator = telemetry.propagator();
    let is_context = |key: &ShortString| propagator.fields().any(|field| key.as_str().eq_ignore_ascii_case(field));
    if headers.inner().keys().any(is_context) {
        let kept = headers.inner().iter().filter(|(key, _)| !is_context(key));
        *headers = FieldTable::from(kept.map(|(key, value)| (key.clone(), value.clone())).collect::<BTreeMap<_, _>>());
    }
}

/// Starts the CONSUMER span that processes `delivery`, continuing the context its headers
/// carry as `mode` says. A missing or unusable context starts a new trace; it never fails.
pub fn start_process(
    telemetry: &Telemetry,
    mode: ConsumerContext,
    source: &Destination,
    delivery: &Delivery,
    peer: &BrokerPeer,
) -> Context {
    let empty = FieldTable::default();
    let headers = delivery.properties.headers().as_ref().unwrap_or(&empty);
    let extracted = telemetry.extract_incoming(&AmqpHeaderExtractor(headers));
    let build = || {
        let mut attributes = common_attributes("process", "process", source, peer);
        attributes.extend([
            KeyValue::new(MESSAGING_RABBITMQ_MESSAGE_DELIVERY_TAG, delivery.delivery_tag as i64),
            KeyValue::new(MESSAGING_MESSAGE_BODY_SIZE, delivery.data.len() as i64),
            KeyValue::new(REDELIVERED, delivery.redelivered),
            KeyValue::new(ATTEMPT, attempt(delivery.redelivered, headers)),
        ]);
        if let Some(message_id) = delivery.properties.message_id() {
            attributes.push(KeyValue::new(MESSAGING_MESSAGE_ID, message_id.as_str().to_owned()));
        }
        SpanBuilder::from_name(source.span_name.clone()).with_kind(SpanKind::Consumer).with_attributes(attributes)
    };
    match mode {
        ConsumerContext::Parent => {
            let span = telemetry.tracer().start_lazily(&extracted, build);
            extracted.with_span(span)
        }
        ConsumerContext::Link => {
            // A new root that keeps the baggage: only the span relationship changes.
            let baggage = extracted
                .baggage()
                .iter()
                .map(|(key, (value, metadata))| KeyValueMetadata::new(key.clone(), value.clone(), metadata.clone()));
            let root = Context::new().with_baggage(baggage);
            let span = telemetry
                .tracer()
                .start_lazily(&root, || build().with_links(links_to(extracted.span().span_context())));
            root.with_span(span)
        }
    }
}

/// How a delivery was settled, for `messaging.client.operation.duration`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// `basic.ack`: done with it.
    Ack,
    /// `basic.nack`: back to the queue (or to its dead-letter exchange).
    Nack,
}

/// The attributes of a messaging measurement (the conventions' low-cardinality ones: no message
/// id, no delivery tag; `messaging.operation.type` only on the operation-duration histogram),
/// by their parts: found among an instrument's bound sets by comparing the parts (shared strings
/// by address), so a measurement builds no attributes, clones no string and allocates nothing
/// once its set is bound.
pub(crate) struct MessagingSet<'a> {
    /// `messaging.operation.name`.
    operation: &'static str,
    /// `messaging.operation.type`, which the counters leave out.
    operation_type: Option<&'static str>,
    destination: &'a Destination,
    peer: &'a BrokerPeer,
    /// `error.type`, when the operation failed.
    error_type: Option<&'static str>,
}

/// What a bound [`MessagingSet`] keeps: its parts, the strings shared with the caller's.
#[derive(Debug)]
pub(crate) struct MessagingKey {
    operation: &'static str,
    operation_type: Option<&'static str>,
    destination: StringValue,
    address: Arc<str>,
    port: u16,
    error_type: Option<&'static str>,
}

impl<'a> MessagingSet<'a> {
    fn new(operation: &'static str, destination: &'a Destination, peer: &'a BrokerPeer) -> Self {
        Self { operation, operation_type: None, destination, peer, error_type: None }
    }

    fn failed(self, error_type: Option<&'static str>) -> Self {
        Self { error_type, ..self }
    }

    fn typed(self, operation_type: &'static str) -> Self {
        Self { operation_type: Some(operation_type), ..self }
    }
}

impl AttributeSet for MessagingSet<'_> {
    type Key = MessagingKey;

    fn matches(&self, key: &MessagingKey) -> bool {
        key.operation == self.operation
            && key.operation_type == self.operation_type
            && key.error_type == self.error_type
            && key.port == self.peer.port
            && same_str(&key.address, &self.peer.address)
            && same_str(key.destination.as_str(), self.destination.name.as_str())
    }

    fn key(&self) -> MessagingKey {
        MessagingKey {
            operation: self.operation,
            operation_type: self.operation_type,
            destination: self.destination.name.clone(),
            address: self.peer.address.clone(),
            port: self.peer.port,
            error_type: self.error_type,
        }
    }

    fn attributes(&self) -> Vec<KeyValue> {
        let mut attributes = Vec::with_capacity(7);
        attributes.extend([
            KeyValue::new(MESSAGING_SYSTEM, "rabbitmq"),
            KeyValue::new(MESSAGING_OPERATION_NAME, self.operation),
            KeyValue::new(MESSAGING_DESTINATION_NAME, self.destination.name.clone()),
            KeyValue::new(SERVER_ADDRESS, StringValue::from(self.peer.address.clone())),
            KeyValue::new(SERVER_PORT, i64::from(self.peer.port)),
        ]);
        if let Some(error_type) = self.error_type {
            attributes.push(KeyValue::new(ERROR_TYPE, error_type));
        }
        if let Some(operation_type) = self.operation_type {
            attributes.push(KeyValue::new(MESSAGING_OPERATION_TYPE, operation_type));
        }
        attributes
    }
}

/// Records a publish that took `elapsed` (until the confirm, or the failure named by
/// `error_type`): `messaging.client.sent.messages` and `messaging.client.operation.duration`.
pub fn record_publish(
    telemetry: &Telemetry,
    destination: &Destination,
    peer: &BrokerPeer,
    elapsed: Duration,
    error_type: Option<&'static str>,
) {
    let Some(instruments) = telemetry.instruments() else { return };
    let set = MessagingSet::new("publish", destination, peer).failed(error_type);
    instruments.messaging_sent.add(1, &set);
    instruments.messaging_operation_duration.record(elapsed.as_secs_f64(), &set.typed("send"));
}

/// Counts a delivery handed to the application: `messaging.client.consumed.messages`.
pub fn record_consumed(telemetry: &Telemetry, source: &Destination, peer: &BrokerPeer) {
    let Some(instruments) = telemetry.instruments() else { return };
    instruments.messaging_consumed.add(1, &MessagingSet::new("process", source, peer));
}

/// Records the processing of a delivery (`messaging.process.duration`); `error_type` names
/// why it failed (it was retried or dead-lettered), `None` when it was handled.
pub fn record_process(
    telemetry: &Telemetry,
    source: &Destination,
    peer: &BrokerPeer,
    elapsed: Duration,
    error_type: Option<&'static str>,
) {
    let Some(instruments) = telemetry.instruments() else { return };
    let set = MessagingSet::new("process", source, peer).failed(error_type);
    instruments.messaging_process_duration.record(elapsed.as_secs_f64(), &set);
}

/// Records an ack or nack that took `elapsed`: `messaging.client.operation.duration` with
/// operation type `settle`.
pub fn record_settle(
    telemetry: &Telemetry,
    settle: Settle,
    source: &Destination,
    peer: &BrokerPeer,
    elapsed: Duration,
    error_type: Option<&'static str>,
) {
    let Some(instruments) = telemetry.instruments() else { return };
    let operation = match settle {
        Settle::Ack => "ack",
        Settle::Nack => "nack",
    };
    let set = MessagingSet::new(operation, source, peer).failed(error_type).typed("settle");
    instruments.messaging_operation_duration.record(elapsed.as_secs_f64(), &set);
}

/// 1 + broker redeliveries (`x-delivery-count`, set by quorum queues; else 1 when flagged
/// redelivered) + delayed retries ([`RETRY_COUNT_HEADER`]).
fn attempt(redelivered: bool, headers: &FieldTable) -> i64 {
    let redeliveries = header_int(headers, "x-delivery-count").unwrap_or(i64::from(redelivered));
    // Saturating: both counts come from headers a sender may forge.
    1i64.saturating_add(redeliveries.max(0)).saturating_add(retry_count(headers))
}

/// The [`RETRY_COUNT_HEADER`] of a message, 0 when absent or not an integer.
pub fn retry_count(headers: &FieldTable) -> i64 {
    header_int(headers, RETRY_COUNT_HEADER).unwrap_or(0).max(0)
}

fn header_int(headers: &FieldTable, key: &str) -> Option<i64> {
    match headers.inner().get(key)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(address: &str, port: u16) -> BrokerPeer {
        BrokerPeer { address: address.into(), port }
    }

    /// A sampled span context of another process, as a `traceparent` carries it.
    fn caller() -> opentelemetry::trace::SpanContext {
        use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
        SpanContext::new(
            TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").expect("hex"),
            SpanId::from_hex("b7ad6b7169203331").expect("hex"),
            TraceFlags::SAMPLED,
            true,
            TraceState::NONE,
        )
    }

    #[test]
    fn with_the_sdk_disabled_a_publish_still_carries_the_callers_context_and_baggage() {
        let caller = caller();
        let parent =
            crate::spans::with_baggage_entry(&Context::new().with_remote_span_context(caller), "customer.id", "c-1");
        let destination = Destination::publish("checkout", "checkout.processed");
        let publish = Publish { destination: &destination, message_id: "m-1", body_size: 2 };
        let mut headers = FieldTable::default();
        let cx =
            start_publish(&Telemetry::disabled("checkout"), &parent, &publish, &peer("rabbitmq", 5672), &mut headers);
        assert!(!cx.span().is_recording());
        let header = |key: &str| match headers.inner().get(key) {
            Some(AMQPValue::LongString(value)) => String::from_utf8_lossy(value.as_bytes()).into_owned(),
            other => panic!("{key}: {other:?}"),
        };
        assert_eq!(header("traceparent"), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        assert_eq!(header("baggage"), "customer.id=c-1");
    }

    #[test]
    fn a_message_without_a_context_starts_a_new_trace_whatever_the_consumer_runs_under() {
        let ambient = caller();
        let around =
            crate::spans::with_baggage_entry(&Context::new().with_remote_span_context(ambient), "customer.id", "c-0");
        let _attached = around.attach();
        let source = Destination::process("checkout", "checkout.processed", "stock.checkout-processed");
        let delivery = Delivery::mock(1, "checkout".into(), "checkout.processed".into(), false, b"{}".to_vec());
        let telemetry = Telemetry::disabled("stock");
        for mode in [ConsumerContext::Parent, ConsumerContext::Link] {
            let cx = start_process(&telemetry, mode, &source, &delivery, &peer("rabbitmq", 5672));
            assert!(!cx.span().span_context().is_valid(), "{mode:?}: continued the consumer's own context");
            assert_eq!(cx.baggage().len(), 0, "{mode:?}: took the consumer's baggage");
        }
    }

    #[test]
    fn destinations_made_per_message_keep_a_bounded_number_of_names() {
        let many = crate::spans::MAX_NAMES + 10;
        let destinations: Vec<Destination> =
            (0..many).map(|i| Destination::publish("tenants", &format!("t-{i}"))).collect();
        for (i, destination) in destinations.iter().enumerate() {
            assert_eq!(destination.span_name, format!("publish tenants:t-{i}"));
            assert_eq!(destination.name.as_str(), format!("tenants:t-{i}"));
        }
        assert!(matches!(destinations[many - 1].span_name, Cow::Owned(_)), "past the bound, a name is not kept");
        let again = Destination::publish("tenants", "t-0");
        assert_eq!(again.span_name, "publish tenants:t-0");
    }

    #[test]
    fn a_publish_replaces_every_context_header_it_is_given_and_keeps_the_others() {
        let caller = caller();
        // A delivery's headers, republished under another context (no trace state, no baggage).
        let mut headers = FieldTable::default();
        for (key, value) in [
            ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            ("Tracestate", "vendor=old"),
            ("baggage", "customer.id=someone-else"),
            ("x-custom", "kept"),
        ] {
            headers.insert(key.into(), AMQPValue::LongString(value.into()));
        }
        let destination = Destination::publish("checkout", "checkout.processed");
        let publish = Publish { destination: &destination, message_id: "m-1", body_size: 2 };
        let parent = Context::new().with_remote_span_context(caller);
        start_publish(&Telemetry::disabled("stock"), &parent, &publish, &peer("rabbitmq", 5672), &mut headers);
        let keys: Vec<&str> = headers.inner().keys().map(ShortString::as_str).collect();
        assert_eq!(keys, ["traceparent", "x-custom"]);
        assert_eq!(
            headers.inner()["traceparent"],
            AMQPValue::LongString("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into())
        );
    }

    #[test]
    fn the_attempt_counts_redeliveries_and_retries_and_saturates_on_forged_counts() {
        let headers = |entries: &[(&str, i64)]| {
            let mut table = FieldTable::default();
            for (key, value) in entries {
                table.insert((*key).into(), AMQPValue::LongLongInt(*value));
            }
            table
        };
        assert_eq!(attempt(false, &headers(&[])), 1);
        assert_eq!(attempt(true, &headers(&[])), 2);
        assert_eq!(attempt(true, &headers(&[("x-delivery-count", 3), (RETRY_COUNT_HEADER, 2)])), 6);
        assert_eq!(attempt(false, &headers(&[("x-delivery-count", -4)])), 1);
        assert_eq!(attempt(false, &headers(&[(RETRY_COUNT_HEADER, i64::MAX)])), i64::MAX);
        assert_eq!(
            attempt(true, &headers(&[("x-delivery-count", i64::MAX), (RETRY_COUNT_HEADER, i64::MAX)])),
            i64::MAX
        );
    }

    #[test]
    fn a_messaging_set_matches_its_own_key_and_no_other_parts() {
        let publish = Destination::publish("checkout", "checkout.processed");
        let dead_letters = Destination::publish("stock.dlx", "");
        let node = peer("rabbitmq", 5672);
        let set = MessagingSet::new("publish", &publish, &node).typed("send");
        let key = set.key();
        assert!(set.matches(&key));
        let same_address = peer("rabbitmq", 5672);
        assert!(
            MessagingSet::new("publish", &publish, &same_address).typed("send").matches(&key),
            "an equal address in another string"
        );
        let other_node = peer("rabbitmq-2", 5672);
        let other_port = peer("rabbitmq", 5673);
        let different = [
            MessagingSet::new("publish", &publish, &node),
            MessagingSet::new("publish", &publish, &node).typed("settle"),
            MessagingSet::new("ack", &publish, &node).typed("send"),
            MessagingSet::new("publish", &dead_letters, &node).typed("send"),
            MessagingSet::new("publish", &publish, &other_node).typed("send"),
            MessagingSet::new("publish", &publish, &other_port).typed("send"),
            MessagingSet::new("publish", &publish, &node).typed("send").failed(Some("nacked")),
        ];
        for (index, other) in different.iter().enumerate() {
            assert!(!other.matches(&key), "set {index} shares the handle of another set");
        }
    }

    #[test]
    fn a_messaging_set_binds_the_conventions_attributes() {
        let process = Destination::process("checkout", "checkout.processed", "stock.checkout-processed");
        let node = peer("rabbitmq", 5672);
        let set = MessagingSet::new("ack", &process, &node).failed(Some("broker_unavailable")).typed("settle");
        assert_eq!(
            set.attributes(),
            vec![
                KeyValue::new(MESSAGING_SYSTEM, "rabbitmq"),
                KeyValue::new(MESSAGING_OPERATION_NAME, "ack"),
                KeyValue::new(MESSAGING_DESTINATION_NAME, "checkout:checkout.processed:stock.checkout-processed"),
                KeyValue::new(SERVER_ADDRESS, "rabbitmq"),
                KeyValue::new(SERVER_PORT, 5672),
                KeyValue::new(ERROR_TYPE, "broker_unavailable"),
                KeyValue::new(MESSAGING_OPERATION_TYPE, "settle"),
            ]
        );
        assert_eq!(MessagingSet::new("process", &process, &node).attributes().len(), 5, "a counter's set");
    }
}
