//! Metrics beside the traces: after a few checkouts (one refused for an unknown SKU, one
//! rejected by stock for want of units) and one poison message, every service's OTLP metrics
//! carry the conventions' names, units, kinds and low-cardinality attributes, and the business
//! counters count each outcome once.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{Value, json};
use tracehop_broker::topology;
use tracehop_e2e::{Options, Pipeline};
use tracehop_testkit::otlp::{Attr, MetricKind, OtlpReceiver, ReceivedMetric};

const HISTOGRAM: MetricKind = MetricKind::Histogram;
const COUNTER: MetricKind = MetricKind::Sum { monotonic: true };

/// The latest export of `name` from `service`, checked for unit and kind.
fn metric(receiver: &OtlpReceiver, service: &str, name: &str, unit: &str, kind: MetricKind) -> ReceivedMetric {
    let metric = receiver.latest_metric(service, name).unwrap_or_else(|| {
        let seen: Vec<String> = receiver.metrics().iter().map(|m| format!("{} {}", m.service_name, m.name)).collect();
        panic!("{service} exported no {name}; received: {seen:#?}")
    });
    assert_eq!(metric.unit, unit, "{name}");
    assert_eq!(metric.kind, kind, "{name}");
    metric
}

/// The total (histogram counts, counter values) of the points matching `filter`.
fn total(metric: &ReceivedMetric, filter: &[(&str, &str)]) -> u64 {
    metric.points_with(filter).iter().map(|p| p.count).sum()
}

/// No attribute of any point is one of the high-cardinality ones a metric must never carry.
fn assert_low_cardinality(metric: &ReceivedMetric) {
    for point in &metric.points {
        for key in ["messaging.message.id", "url.path", "messaging.rabbitmq.message.delivery_tag", "customer.id"] {
            assert!(!point.attributes.contains_key(key), "{} carries {key}: {:?}", metric.name, point.attributes);
        }
    }
}

fn order(sku: &str, quantity: u32) -> Value {
    json!({"customer_id": "c-metrics", "items": [{"sku": sku, "quantity": quantity}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_reports_red_metrics_and_business_counters() {
    let pipeline = Pipeline::start(Options::default()).await;
    let mut accepted = Vec::new();
    for _ in 0..3 {
        let response = pipeline.checkout(&order("SKU-001", 1), &[]).await;
        assert_eq!(response.status(), 202);
        let body: Value = response.json().await.expect("json");
        accepted.push(body["order_id"].as_str().expect("order id").to_owned());
    }
    // Refused by checkout (NOT_FOUND -> 422): no message, no reservation.
    assert_eq!(pipeline.checkout(&order("SKU-404", 1), &[]).await.status(), 422);
    // Accepted, then rejected by stock: more than the 1,000 units seeded.
    let response = pipeline.checkout(&order("SKU-002", 5000), &[]).await;
    assert_eq!(response.status(), 202);
    let rejected: Value = response.json().await.expect("json");
    // A poison message straight onto the exchange: dead-lettered as invalid JSON.
    let connection = Connection::connect(&pipeline.amqp_url, ConnectionProperties::default()).await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirms");
    channel
        .basic_publish(
            topology::EXCHANGE.into(),
            topology::ROUTING_KEY.into(),
            BasicPublishOptions::default(),
            b"{not json",
            BasicProperties::default().with_message_id("poison".into()),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    for id in &accepted {
        assert_eq!(pipeline.wait_for_order(id).await, "reserved");
    }
    assert_eq!(pipeline.wait_for_order(rejected["order_id"].as_str().expect("id")).await, "rejected");
    // Stock records a delivery's ack and processing after the store write the checks above
    // saw, and the poison's only once its dead-letter copy is confirmed: export until they are in.
    let receiver = &pipeline.receiver;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        pipeline.flush().await;
        let processed = receiver.latest_metric("stock", "messaging.process.duration").map(|m| total(&m, &[]));
        let dead = receiver.latest_metric("stock", "tracehop.orders.dead_lettered").map(|m| total(&m, &[]));
        if processed == Some(5) && dead == Some(1) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "stock processed {processed:?}, dead-lettered {dead:?}");
    }

    // gateway: HTTP server duration per route and status; the gRPC client's call duration.
    let http = metric(receiver, "gateway", "http.server.request.duration", "s", HISTOGRAM);
    let route = [("http.route", "/api/checkout"), ("http.request.method", "POST"), ("url.scheme", "http")];
    assert_eq!(total(&http, &route), 5);
    let by_status = |status: i64| {
        http.points.iter().filter(|p| p.attributes.get("http.response.status_code") == Some(&Attr::Int(status))).count()
    };
    assert_eq!((by_status(202), by_status(422)), (1, 1), "one series per status: {:?}", http.points);
    let client = metric(receiver, "gateway", "rpc.client.call.duration", "s", HISTOGRAM);
    let call = [("rpc.system.name", "grpc"), ("rpc.method", "checkout.v1.CheckoutService/Checkout")];
    assert_eq!(total(&client, &call), 5);
    assert_eq!(total(&client, &[("rpc.response.status_code", "OK")]), 4);
    assert_eq!(total(&client, &[("rpc.response.status_code", "NOT_FOUND"), ("error.type", "NOT_FOUND")]), 1);
    assert!(client.points.iter().all(|p| p.attributes.contains_key("server.address")), "{:?}", client.points);

    // checkout: the server's call duration (a caller's NOT_FOUND is no server error), the
    // publish, the messages sent and the orders accepted.
    let server = metric(receiver, "checkout", "rpc.server.call.duration", "s", HISTOGRAM);
    assert_eq!(total(&server, &call), 5);
    assert_eq!(total(&server, &[("rpc.response.status_code", "NOT_FOUND")]), 1);
    assert!(server.points.iter().all(|p| !p.attributes.contains_key("error.type")), "{:?}", server.points);
    assert!(server.points.iter().all(|p| !p.attributes.contains_key("server.address")), "opt-in on the server");
    let destination = ("messaging.destination.name", "checkout:checkout.processed");
    let publish = metric(receiver, "checkout", "messaging.client.operation.duration", "s", HISTOGRAM);
    let sent_attributes = [("messaging.system", "rabbitmq"), ("messaging.operation.name", "publish"), destination];
    assert_eq!(total(&publish, &[sent_attributes.as_slice(), &[("messaging.operation.type", "send")]].concat()), 4);
    let sent = metric(receiver, "checkout", "messaging.client.sent.messages", "{message}", COUNTER);
    assert_eq!(total(&sent, &sent_attributes), 4);
    assert!(sent.points.iter().all(|p| !p.attributes.contains_key("messaging.operation.type")), "{:?}", sent.points);
    let orders_accepted = metric(receiver, "checkout", "tracehop.orders.accepted", "{order}", COUNTER);
    assert_eq!(total(&orders_accepted, &[]), 4);

    // stock: 5 deliveries consumed and processed (one failed as invalid JSON), 4 acks after
    // a reservation or rejection plus the poison's ack once its dead-letter copy was
    // confirmed; reserved 3, rejected 1, dead-lettered 1.
    let source = ("messaging.destination.name", "checkout:checkout.processed:stock.checkout-processed");
    let consumed = metric(receiver, "stock", "messaging.client.consumed.messages", "{message}", COUNTER);
    assert_eq!(
        total(&consumed, &[("messaging.system", "rabbitmq"), ("messaging.operation.name", "process"), source]),
        5
    );
    let process = metric(receiver, "stock", "messaging.process.duration", "s", HISTOGRAM);
    assert_eq!(total(&process, &[source]), 5);
    assert_eq!(total(&process, &[("error.type", "invalid_json")]), 1);
    let settle = metric(receiver, "stock", "messaging.client.operation.duration", "s", HISTOGRAM);
    assert_eq!(total(&settle, &[("messaging.operation.name", "ack"), ("messaging.operation.type", "settle")]), 5);
    // The dead-letter copy is a publish of stock's own, to the dead-letter exchange.
    let dead_letter =
        [("messaging.operation.name", "publish"), ("messaging.destination.name", topology::DEAD_LETTER_EXCHANGE)];
    assert_eq!(total(&settle, &dead_letter), 1);
    let stock_sent = metric(receiver, "stock", "messaging.client.sent.messages", "{message}", COUNTER);
    assert_eq!(total(&stock_sent, &[("messaging.destination.name", topology::DEAD_LETTER_EXCHANGE)]), 1);
    let counted =
        |name: &str, filter: &[(&str, &str)]| total(&metric(receiver, "stock", name, "{order}", COUNTER), filter);
    assert_eq!(counted("tracehop.orders.reserved", &[]), 3);
    assert_eq!(counted("tracehop.orders.rejected", &[]), 1);
    assert_eq!(counted("tracehop.orders.dead_lettered", &[("tracehop.dead_letter.reason", "invalid_json")]), 1);

    for metric in receiver.metrics() {
        assert_low_cardinality(&metric);
        assert!(metric.resource.contains_key("service.instance.id"), "{}: {:?}", metric.name, metric.resource);
    }
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_off_exports_no_metric_while_spans_still_flow() {
    let pipeline = Pipeline::start(Options { metrics: false, ..Options::default() }).await;
    assert_eq!(pipeline.checkout(&order("SKU-001", 1), &[]).await.status(), 202);
    pipeline.flush().await;
    let spans = pipeline.receiver.wait_for(Duration::from_secs(10), |spans| spans.len() >= 5).await;
    assert!(spans.iter().any(|s| s.service_name == "stock"), "spans still flow");
    let metrics = pipeline.receiver.metrics();
    assert!(metrics.is_empty(), "OTEL_METRICS_EXPORTER=none exported {} metrics", metrics.len());
    pipeline.stop().await;
}
