//! Propagation at the edges: the gateway's inbound policy, baggage across every hop, B3,
//! the consumer's parent-or-link choice, sampling end to end, oversize inbound context, and
//! untraced health checks.

use std::time::Duration;

use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use serde_json::{Value, json};
use tracehop_e2e::{Options, Pipeline};
use tracehop_telemetry::http::InboundContext;
use tracehop_telemetry::messaging::ConsumerContext;
use tracehop_telemetry::propagators::PropagatorKind;
use tracehop_telemetry::setup::SamplerChoice;
use tracehop_testkit::otlp::ReceivedSpan;

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn order(customer: &str) -> Value {
    json!({"customer_id": customer, "items": [{"sku": "SKU-002", "quantity": 1}]})
}

/// Places an order with `headers`; returns (status, body).
async fn checkout(pipeline: &Pipeline, customer: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let response = pipeline.checkout(&order(customer), headers).await;
    let status = response.status().as_u16();
    (status, serde_json::from_slice(&response.bytes().await.expect("body")).expect("json"))
}

/// Waits for the whole chain of `trace_id` (gateway SERVER ... stock CONSUMER).
async fn chain(pipeline: &Pipeline, trace_id: &str) -> Vec<ReceivedSpan> {
    let spans = pipeline
        .receiver
        .wait_for(Duration::from_secs(10), |spans| {
            let of = |service: &str, kind: SpanKind| {
                spans.iter().any(|s| s.trace_id == trace_id && s.service_name == service && s.kind == kind)
            };
            of("gateway", SpanKind::Server) && of("checkout", SpanKind::Producer) && of("stock", SpanKind::Consumer)
        })
        .await;
    spans.into_iter().filter(|s| s.trace_id == trace_id).collect()
}

fn one<'a>(spans: &'a [ReceivedSpan], service: &str, kind: SpanKind) -> &'a ReceivedSpan {
    spans
        .iter()
        .find(|s| s.service_name == service && s.kind == kind)
        .unwrap_or_else(|| panic!("no {kind:?} span from {service}"))
}

fn with_inbound_keys(options: Options) -> Options {
    Options { baggage_span_attributes: vec!["customer.id".into(), "inbound.key".into()], ..options }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continue_mode_carries_the_callers_trace_and_baggage_to_every_hop() {
    let pipeline = Pipeline::start(with_inbound_keys(Options::default())).await;
    let traceparent = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    let (status, body) =
        checkout(&pipeline, "c-1", &[("traceparent", &traceparent), ("baggage", "inbound.key=from-caller")]).await;
    assert_eq!(status, 202);
    assert_eq!(body["trace_id"], CALLER_TRACE);
    let spans = chain(&pipeline, CALLER_TRACE).await;
    assert_eq!(one(&spans, "gateway", SpanKind::Server).parent_span_id, CALLER_SPAN);
    for (service, kind) in
        [("gateway", SpanKind::Server), ("checkout", SpanKind::Server), ("stock", SpanKind::Consumer)]
    {
        let span = one(&spans, service, kind);
        assert_eq!(span.str_attr("inbound.key"), Some("from-caller"), "{service}: baggage crossed HTTP, gRPC and AMQP");
        assert_eq!(span.str_attr("customer.id"), Some("c-1"), "{service}: the gateway's own baggage too");
    }
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_mode_starts_a_new_trace_linked_to_the_caller_without_its_baggage() {
    let pipeline =
        Pipeline::start(with_inbound_keys(Options { inbound_context: InboundContext::Link, ..Options::default() }))
            .await;
    let traceparent = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    let (status, body) =
        checkout(&pipeline, "c-2", &[("traceparent", &traceparent), ("baggage", "inbound.key=from-caller")]).await;
    assert_eq!(status, 202);
    let trace_id = body["trace_id"].as_str().expect("trace id").to_owned();
    assert_ne!(trace_id, CALLER_TRACE, "a new trace");
    let spans = chain(&pipeline, &trace_id).await;
    let server = one(&spans, "gateway", SpanKind::Server);
    assert_eq!(server.parent_span_id, "", "the gateway span is a root");
    assert_eq!(server.links, vec![(CALLER_TRACE.to_owned(), CALLER_SPAN.to_owned())], "linked to the caller");
    for (service, kind) in
        [("gateway", SpanKind::Server), ("checkout", SpanKind::Server), ("stock", SpanKind::Consumer)]
    {
        let span = one(&spans, service, kind);
        assert_eq!(span.str_attr("inbound.key"), None, "{service}: the caller's baggage stopped at the edge");
        assert_eq!(span.str_attr("customer.id"), Some("c-2"), "{service}");
    }
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_mode_starts_a_new_trace_without_a_link() {
    let pipeline =
        Pipeline::start(with_inbound_keys(Options { inbound_context: InboundContext::Ignore, ..Options::default() }))
            .await;
    let traceparent = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    let (status, body) =
        checkout(&pipeline, "c-3", &[("traceparent", &traceparent), ("baggage", "inbound.key=from-caller")]).await;
    assert_eq!(status, 202);
    let trace_id = body["trace_id"].as_str().expect("trace id").to_owned();
    assert_ne!(trace_id, CALLER_TRACE);
    let spans = chain(&pipeline, &trace_id).await;
    let server = one(&spans, "gateway", SpanKind::Server);
    assert_eq!(server.parent_span_id, "");
    assert!(server.links.is_empty(), "no link: {:?}", server.links);
    assert_eq!(one(&spans, "stock", SpanKind::Consumer).str_attr("inbound.key"), None);
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_b3_request_is_one_trace_end_to_end() {
    let pipeline = Pipeline::start(Options {
        propagators: vec![PropagatorKind::B3Multi, PropagatorKind::Baggage],
        ..Options::default()
    })
    .await;
    let b3_trace = "80f198ee56343ba864fe8b2a57d3eff7";
    let b3_span = "e457b5a2e4d86bd1";
    let (status, body) =
        checkout(&pipeline, "c-4", &[("X-B3-TraceId", b3_trace), ("X-B3-SpanId", b3_span), ("X-B3-Sampled", "1")])
            .await;
    assert_eq!(status, 202);
    assert_eq!(body["trace_id"], b3_trace);
    // Only B3 is configured: every hop (gRPC metadata, AMQP headers) carried x-b3-* headers.
    let spans = chain(&pipeline, b3_trace).await;
    let server = one(&spans, "gateway", SpanKind::Server);
    assert_eq!(server.parent_span_id, b3_span);
    let producer = one(&spans, "checkout", SpanKind::Producer);
    assert_eq!(one(&spans, "stock", SpanKind::Consumer).parent_span_id, producer.span_id);
    assert_eq!(
        one(&spans, "checkout", SpanKind::Server).parent_span_id,
        one(&spans, "gateway", SpanKind::Client).span_id
    );
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_link_mode_starts_a_trace_linked_to_the_producer() {
    let pipeline = Pipeline::start(Options { consumer_context: ConsumerContext::Link, ..Options::default() }).await;
    let (status, body) = checkout(&pipeline, "c-5", &[]).await;
    assert_eq!(status, 202);
    let trace_id = body["trace_id"].as_str().expect("trace id").to_owned();
    let order_id = body["order_id"].as_str().expect("order id").to_owned();
    pipeline.wait_for_order(&order_id).await;
    let spans = pipeline
        .receiver
        .wait_for(Duration::from_secs(10), |spans| {
            spans.iter().any(|s| s.kind == SpanKind::Producer && s.trace_id == trace_id)
                && spans.iter().any(|s| {
                    s.kind == SpanKind::Consumer && s.str_attr("messaging.message.id") == Some(order_id.as_str())
                })
        })
        .await;
    let producer = spans.iter().find(|s| s.kind == SpanKind::Producer && s.trace_id == trace_id).expect("producer");
    let consumer = spans
        .iter()
        .find(|s| s.kind == SpanKind::Consumer && s.str_attr("messaging.message.id") == Some(order_id.as_str()))
        .expect("consumer");
    assert_ne!(consumer.trace_id, trace_id, "a trace of its own");
    assert_eq!(consumer.parent_span_id, "", "a root, not a child");
    assert_eq!(
        consumer.links,
        vec![(producer.trace_id.clone(), producer.span_id.clone())],
        "linked to the PRODUCER span"
    );
    assert_eq!(consumer.str_attr("customer.id"), Some("c-5"), "baggage still crosses");
    // With a link there is no parent: Jaeger draws no checkout -> stock edge.
    assert!(!tracehop_e2e::dependency_edges(&spans).contains(&("checkout".to_owned(), "stock".to_owned())));
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsampled_requests_leave_no_span_anywhere_through_the_broker() {
    let pipeline =
        Pipeline::start(Options { sampler: SamplerChoice::ParentBasedTraceIdRatio(0.0), ..Options::default() }).await;
    let mut orders = Vec::new();
    for i in 0..5 {
        let (status, body) = checkout(&pipeline, &format!("c-{i}"), &[]).await;
        assert_eq!(status, 202, "{body}");
        orders.push(body["order_id"].as_str().expect("order id").to_owned());
    }
    // A caller's unsampled decision is honoured too.
    let traceparent = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-00");
    let (status, body) = checkout(&pipeline, "c-9", &[("traceparent", &traceparent)]).await;
    assert_eq!(status, 202);
    orders.push(body["order_id"].as_str().expect("order id").to_owned());
    for order_id in &orders {
        assert_eq!(pipeline.wait_for_order(order_id).await, "reserved");
    }
    pipeline.flush().await;
    let exported = pipeline.receiver.spans();
    assert!(
        exported.is_empty(),
        "unsampled, yet exported: {:?}",
        exported.iter().map(|s| (&s.service_name, &s.name)).collect::<Vec<_>>()
    );
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_inbound_context_never_breaks_the_broker_connection() {
    let pipeline = Pipeline::start(Options::default()).await;
    let baggage: String = (0..300).map(|i| format!("key{i}={}", "v".repeat(40))).collect::<Vec<_>>().join(",");
    assert!(baggage.len() > 8 * 1024);
    let tracestate: String = (0..40).map(|i| format!("vendor{i}=value{i}")).collect::<Vec<_>>().join(",");
    let traceparent = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    let (status, body) = checkout(
        &pipeline,
        "c-big",
        &[("traceparent", &traceparent), ("tracestate", &tracestate), ("baggage", &baggage)],
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(pipeline.wait_for_order(body["order_id"].as_str().expect("id")).await, "reserved");
    // The caller's baggage, cut to 64 members on the way in, does not crowd out the gateway's own.
    let spans = chain(&pipeline, CALLER_TRACE).await;
    for (service, kind) in
        [("gateway", SpanKind::Server), ("checkout", SpanKind::Server), ("stock", SpanKind::Consumer)]
    {
        assert_eq!(one(&spans, service, kind).str_attr("customer.id"), Some("c-big"), "{service}");
    }
    // The connections survived: the next order goes through as usual.
    let (status, body) = checkout(&pipeline, "c-next", &[]).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(pipeline.wait_for_order(body["order_id"].as_str().expect("id")).await, "reserved");
    let huge = format!("k={}", "x".repeat(100 * 1024));
    let (status, _) = checkout(&pipeline, "c-huge", &[("baggage", &huge)]).await;
    assert!(status < 500, "an oversize header is never a 5xx (got {status})");
    pipeline.stop().await;
}

/// Every answer of both HTTP APIs is JSON, the router's own 404s and 405s included (axum's are
/// empty), and a 405 says what the path takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_methods_answer_json_errors() {
    let pipeline = Pipeline::start(Options::default()).await;
    let cases = [
        (reqwest::Method::GET, format!("{}/api/nope", pipeline.gateway_url), 404, None),
        (reqwest::Method::GET, format!("{}/api/checkout", pipeline.gateway_url), 405, Some("POST")),
        (reqwest::Method::GET, format!("{}/nope", pipeline.stock_url), 404, None),
        (reqwest::Method::POST, format!("{}/api/stock/SKU-001", pipeline.stock_url), 405, Some("GET,HEAD")),
        (reqwest::Method::DELETE, format!("{}/healthz", pipeline.stock_url), 405, Some("GET,HEAD")),
    ];
    for (method, url, status, allow) in cases {
        let response = pipeline.http.request(method.clone(), &url).send().await.expect("answer");
        assert_eq!(response.status().as_u16(), status, "{method} {url}");
        let allowed = response.headers().get("allow").map(|v| v.to_str().expect("ascii").replace(' ', ""));
        assert_eq!(allowed.as_deref(), allow, "{method} {url}");
        let body: Value = serde_json::from_slice(&response.bytes().await.expect("body")).expect("a JSON body");
        assert!(body["error"].is_string(), "{method} {url}: {body}");
    }
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_are_not_traced() {
    let pipeline = Pipeline::start(Options::default()).await;
    for _ in 0..3 {
        pipeline.get_json(&format!("{}/healthz", pipeline.gateway_url)).await;
        pipeline.get_json(&format!("{}/healthz", pipeline.stock_url)).await;
        assert!(checkout::healthcheck(pipeline.checkout_addr).await);
    }
    let (status, body) = checkout(&pipeline, "c-6", &[]).await;
    assert_eq!(status, 202);
    let trace_id = body["trace_id"].as_str().expect("trace id").to_owned();
    chain(&pipeline, &trace_id).await;
    let spans = pipeline.receiver.spans();
    let health: Vec<&str> =
        spans.iter().map(|s| s.name.as_str()).filter(|n| n.contains("healthz") || n.contains("Health")).collect();
    assert!(health.is_empty(), "{health:?}");
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_order_crosses_grpc_and_the_broker_whole() {
    // 100 lines (the gateway's limit): a gRPC request about three times the codec's initial
    // 512-byte buffer, which must grow rather than cut the message.
    let pipeline = Pipeline::start(Options::default()).await;
    let (status, small) = checkout(&pipeline, "c-small", &[]).await;
    assert_eq!(status, 202, "{small}");
    let items: Vec<Value> = (0..100).map(|_| json!({"sku": "SKU-002", "quantity": 1})).collect();
    let response = pipeline.checkout(&json!({"customer_id": "c-large", "items": items}), &[]).await;
    assert_eq!(response.status(), 202);
    let large: Value = serde_json::from_slice(&response.bytes().await.expect("body")).expect("json");
    assert_eq!(large["total_cents"].as_i64(), small["total_cents"].as_i64().map(|cents| cents * 100), "{large}");
    let order_id = large["order_id"].as_str().expect("order id");
    assert_eq!(pipeline.wait_for_order(order_id).await, "reserved");
    pipeline.stop().await;
}
