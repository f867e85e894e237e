//! The AMQP carrier against the real broker: what the injector writes is accepted by RabbitMQ,
//! read back, and extracted to the same context; what it must never write is refused.

use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use opentelemetry::baggage::BaggageExt;
use opentelemetry::propagation::{TextMapCompositePropagator, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::{Context, KeyValue};
use tracehop_telemetry::propagation::{AmqpHeaderExtractor, AmqpHeaderInjector, CheckedPropagator};
use tracehop_telemetry::propagators::{DEFAULT_PROPAGATORS, composite};
use tracehop_testkit::rabbit::TestVhost;

/// The services' propagator: `OTEL_PROPAGATORS`' default, behind the checks.
fn propagator() -> CheckedPropagator<TextMapCompositePropagator> {
    CheckedPropagator::new(composite(&DEFAULT_PROPAGATORS))
}

async fn open(vhost: &TestVhost) -> (Connection, Channel) {
    let connection = Connection::connect(vhost.url(), ConnectionProperties::default()).await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm mode");
    channel
        .queue_declare("carrier".into(), QueueDeclareOptions::default(), FieldTable::default())
        .await
        .expect("queue");
    (connection, channel)
}

async fn publish(channel: &Channel, headers: FieldTable) -> lapin::Result<Confirmation> {
    let properties = BasicProperties::default().with_headers(headers);
    channel.basic_publish("".into(), "carrier".into(), BasicPublishOptions::default(), b"{}", properties).await?.await
}

async fn read_back(channel: &Channel) -> FieldTable {
    for _ in 0..50 {
        if let Some(message) = channel.basic_get("carrier".into(), BasicGetOptions { no_ack: true }).await.expect("get")
        {
            return message.delivery.properties.headers().clone().unwrap_or_default();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the message did not arrive");
}

fn sent_context(baggage_value: &str) -> Context {
    let state: TraceState = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE".parse().expect("tracestate");
    let span_context = SpanContext::new(
        TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").expect("hex"),
        SpanId::from_hex("b7ad6b7169203331").expect("hex"),
        TraceFlags::SAMPLED,
        true,
        state,
    );
    Context::new()
        .with_remote_span_context(span_context)
        .with_baggage([KeyValue::new("customer.id", "c-42"), KeyValue::new("note", baggage_value.to_owned())])
}

#[tokio::test]
async fn injected_headers_cross_the_broker_and_extract_to_the_same_context() {
    let vhost = TestVhost::create();
    let (_connection, channel) = open(&vhost).await;
    let sent = sent_context("50% off, \"quoted\"");
    let mut headers = FieldTable::default();
    propagator().inject_context(&sent, &mut AmqpHeaderInjector(&mut headers));
    assert!(matches!(publish(&channel, headers).await, Ok(Confirmation::Ack(None))), "the broker accepted the headers");

    let received = propagator().extract(&AmqpHeaderExtractor(&read_back(&channel).await));
    let (sent_span, received_span) = (sent.span(), received.span());
    assert_eq!(received_span.span_context().trace_id(), sent_span.span_context().trace_id());
    assert_eq!(received_span.span_context().span_id(), sent_span.span_context().span_id());
    assert!(received_span.span_context().is_sampled());
    assert_eq!(received_span.span_context().trace_state().header(), "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE");
    assert_eq!(received.baggage().get("customer.id").map(|v| v.as_str().to_owned()).as_deref(), Some("c-42"));
    assert_eq!(received.baggage().get("note").map(|v| v.as_str().to_owned()).as_deref(), Some("50% off, \"quoted\""));
}

#[tokio::test]
async fn oversize_baggage_is_trimmed_so_the_broker_keeps_the_connection() {
    let vhost = TestVhost::create();
    let (connection, channel) = open(&vhost).await;
    // 200 KiB of baggage: untrimmed, this header frame would exceed RabbitMQ's default
    // frame_max (128 KiB) and the broker would close the whole connection.
    let sent = sent_context(&"x".repeat(200 * 1024));
    let mut headers = FieldTable::default();
    propagator().inject_context(&sent, &mut AmqpHeaderInjector(&mut headers));
    assert!(matches!(publish(&channel, headers).await, Ok(Confirmation::Ack(None))));
    let received = propagator().extract(&AmqpHeaderExtractor(&read_back(&channel).await));
    assert_eq!(received.baggage().get("customer.id").map(|v| v.as_str().to_owned()).as_deref(), Some("c-42"));
    assert!(received.baggage().get("note").is_none(), "the member over the limit was dropped whole");
    assert!(connection.status().connected());
}

#[tokio::test]
async fn rabbitmq_refuses_short_string_header_values() {
    // Why the injector writes long strings only: one short-string value costs the channel.
    let vhost = TestVhost::create();
    let (_connection, channel) = open(&vhost).await;
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::ShortString(ShortString::from("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")),
    );
    let outcome = publish(&channel, headers).await;
    assert!(!matches!(outcome, Ok(Confirmation::Ack(None))), "the broker took a short-string header: {outcome:?}");
}
