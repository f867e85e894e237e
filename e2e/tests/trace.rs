//! One checkout, one trace: SERVER(gateway) -> CLIENT(gateway) -> SERVER(checkout) ->
//! PRODUCER(checkout) -> CONSUMER(stock), with the names and attributes the README shows.

use std::time::Duration;

use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use serde_json::{Value, json};
use tracehop_e2e::{Options, Pipeline, dependency_edges};
use tracehop_testkit::otlp::{Attr, ReceivedSpan};

fn find<'a>(spans: &'a [ReceivedSpan], service: &str, kind: SpanKind, name: &str) -> &'a ReceivedSpan {
    spans
        .iter()
        .find(|s| s.service_name == service && s.kind == kind && s.name == name)
        .unwrap_or_else(|| panic!("no {kind:?} span {name:?} from {service}"))
}

fn assert_attr(span: &ReceivedSpan, key: &str, expected: Attr) {
    assert_eq!(span.attr(key), Some(&expected), "{} {key}: {:#?}", span.name, span.attributes);
}

fn s(value: &str) -> Attr {
    Attr::Str(value.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_checkout_is_one_trace_across_three_services() {
    let pipeline = Pipeline::start(Options::default()).await;
    let before = pipeline.stock("SKU-001").await;

    let response =
        pipeline.checkout(&json!({"customer_id": "c-42", "items": [{"sku": "SKU-001", "quantity": 2}]}), &[]).await;
    assert_eq!(response.status().as_u16(), 202);
    assert_eq!(response.headers()["content-type"], "application/json");
    let server_timing = response.headers()["server-timing"].to_str().expect("ascii").to_owned();
    let traceresponse = response.headers()["traceresponse"].to_str().expect("ascii").to_owned();
    let body: Value = serde_json::from_slice(&response.bytes().await.expect("body")).expect("json");
    let trace_id = body["trace_id"].as_str().expect("trace_id").to_owned();
    let order_id = body["order_id"].as_str().expect("order_id").to_owned();
    assert_eq!(body["total_cents"], 4900);
    assert_eq!(trace_id.len(), 32);
    assert_eq!(body["trace_url"], format!("http://localhost:16686/trace/{trace_id}"));

    // The stock effect.
    assert_eq!(pipeline.wait_for_order(&order_id).await, "reserved");
    assert_eq!(pipeline.stock("SKU-001").await, (before.0 - 2, before.1 + 2));

    let spans = pipeline
        .receiver
        .wait_for(Duration::from_secs(10), |spans| spans.iter().filter(|s| s.trace_id == trace_id).count() >= 6)
        .await;
    let trace: Vec<ReceivedSpan> = spans.into_iter().filter(|s| s.trace_id == trace_id).collect();

    let http = find(&trace, "gateway", SpanKind::Server, "POST /api/checkout");
    let rpc_client = find(&trace, "gateway", SpanKind::Client, "checkout.v1.CheckoutService/Checkout");
    let rpc_server = find(&trace, "checkout", SpanKind::Server, "checkout.v1.CheckoutService/Checkout");
    let publish = find(&trace, "checkout", SpanKind::Producer, "publish checkout:checkout.processed");
    let process =
        find(&trace, "stock", SpanKind::Consumer, "process checkout:checkout.processed:stock.checkout-processed");
    let query = find(&trace, "stock", SpanKind::Client, "UPDATE stock INSERT orders");

    // The chain.
    assert_eq!(http.parent_span_id, "", "a new trace starts at the gateway");
    assert_eq!(rpc_client.parent_span_id, http.span_id);
    assert_eq!(rpc_server.parent_span_id, rpc_client.span_id);
    assert_eq!(publish.parent_span_id, rpc_server.span_id);
    assert_eq!(process.parent_span_id, publish.span_id);
    assert_eq!(query.parent_span_id, process.span_id);

    // The trace handed back is this one, ending at the gateway's SERVER span.
    let expected = format!("00-{trace_id}-{}-01", http.span_id);
    assert_eq!(server_timing, format!("trace;desc={expected}"));
    assert_eq!(traceresponse, expected);

    // Attributes.
    assert_attr(http, "http.request.method", s("POST"));
    assert_attr(http, "http.route", s("/api/checkout"));
    assert_attr(http, "url.path", s("/api/checkout"));
    assert_attr(http, "http.response.status_code", Attr::Int(202));
    assert_attr(http, "customer.id", s("c-42"));
    for rpc in [rpc_client, rpc_server] {
        assert_attr(rpc, "rpc.system.name", s("grpc"));
        assert_attr(rpc, "rpc.method", s("checkout.v1.CheckoutService/Checkout"));
        assert_attr(rpc, "rpc.response.status_code", s("OK"));
        assert_attr(rpc, "server.address", s("127.0.0.1"));
        assert!(matches!(rpc.attr("server.port"), Some(Attr::Int(port)) if *port > 0), "{:?}", rpc.attributes);
    }
    assert_attr(publish, "messaging.system", s("rabbitmq"));
    assert_attr(publish, "messaging.operation.name", s("publish"));
    assert_attr(publish, "messaging.operation.type", s("send"));
    assert_attr(publish, "messaging.destination.name", s("checkout:checkout.processed"));
    assert_attr(publish, "messaging.rabbitmq.destination.routing_key", s("checkout.processed"));
    assert_attr(publish, "messaging.message.id", s(&order_id));
    assert_attr(publish, "server.address", s("127.0.0.1"));
    assert_attr(publish, "server.port", Attr::Int(5672));
    assert_attr(process, "messaging.system", s("rabbitmq"));
    assert_attr(process, "messaging.operation.name", s("process"));
    assert_attr(process, "messaging.operation.type", s("process"));
    assert_attr(process, "messaging.destination.name", s("checkout:checkout.processed:stock.checkout-processed"));
    assert_attr(process, "messaging.message.id", s(&order_id));
    assert!(matches!(process.attr("messaging.rabbitmq.message.delivery_tag"), Some(Attr::Int(tag)) if *tag >= 1));
    assert_attr(process, "tracehop.message.redelivered", Attr::Bool(false));
    assert_attr(process, "tracehop.message.attempt", Attr::Int(1));
    assert_attr(process, "tracehop.reservation.outcome", s("reserved"));
    assert_attr(process, "customer.id", s("c-42"));
    assert_attr(query, "db.system.name", s("sqlite"));
    assert_attr(query, "tracehop.reservation.outcome", s("reserved"));

    // What Jaeger's System Architecture draws.
    let edges: Vec<(String, String)> = dependency_edges(&trace).into_iter().collect();
    assert_eq!(edges, vec![("checkout".to_owned(), "stock".to_owned()), ("gateway".to_owned(), "checkout".to_owned())]);

    // Each service reports under its own name, with an instance id.
    for span in &trace {
        assert!(span.resource.contains_key("service.instance.id"), "{}", span.service_name);
        assert!(span.resource.contains_key("host.name"), "{}", span.service_name);
    }
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_traceparent_is_continued() {
    let pipeline = Pipeline::start(Options::default()).await;
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{caller_trace}-{caller_span}-01");
    let response = pipeline
        .checkout(
            &json!({"customer_id": "c-7", "items": [{"sku": "SKU-003", "quantity": 1}]}),
            &[("traceparent", &traceparent)],
        )
        .await;
    assert_eq!(response.status().as_u16(), 202);
    let body: Value = serde_json::from_slice(&response.bytes().await.expect("body")).expect("json");
    assert_eq!(body["trace_id"], caller_trace);
    let order_id = body["order_id"].as_str().expect("order id").to_owned();
    pipeline.wait_for_order(&order_id).await;
    let spans = pipeline
        .receiver
        .wait_for(Duration::from_secs(10), |spans| {
            let of_trace = || spans.iter().filter(|s| s.trace_id == caller_trace);
            of_trace().any(|s| s.kind == SpanKind::Consumer)
                && of_trace().any(|s| s.kind == SpanKind::Server && s.service_name == "gateway")
        })
        .await;
    let http = find(&spans, "gateway", SpanKind::Server, "POST /api/checkout");
    assert_eq!(http.trace_id, caller_trace);
    assert_eq!(http.parent_span_id, caller_span);
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_sku_is_422_and_blames_the_caller_not_the_server() {
    let pipeline = Pipeline::start(Options::default()).await;
    let response =
        pipeline.checkout(&json!({"customer_id": "c-9", "items": [{"sku": "SKU-404", "quantity": 1}]}), &[]).await;
    assert_eq!(response.status().as_u16(), 422);
    let trace_id = response.headers()["traceresponse"].to_str().expect("ascii")[3..35].to_owned();
    let body: Value = serde_json::from_slice(&response.bytes().await.expect("body")).expect("json");
    assert_eq!(body["error"], "unknown SKU \"SKU-404\"");
    let spans = pipeline
        .receiver
        .wait_for(Duration::from_secs(10), |spans| spans.iter().filter(|s| s.trace_id == trace_id).count() >= 3)
        .await;
    let trace: Vec<ReceivedSpan> = spans.into_iter().filter(|s| s.trace_id == trace_id).collect();
    let http = find(&trace, "gateway", SpanKind::Server, "POST /api/checkout");
    let rpc_client = find(&trace, "gateway", SpanKind::Client, "checkout.v1.CheckoutService/Checkout");
    let rpc_server = find(&trace, "checkout", SpanKind::Server, "checkout.v1.CheckoutService/Checkout");
    use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
    // A client-caused 4xx / NOT_FOUND is no error of a SERVER span; the CLIENT span did fail.
    assert_eq!(http.status, StatusCode::Unset);
    assert_attr(http, "http.response.status_code", Attr::Int(422));
    assert_eq!(rpc_server.status, StatusCode::Unset);
    assert_attr(rpc_server, "rpc.response.status_code", s("NOT_FOUND"));
    assert_eq!(rpc_client.status, StatusCode::Error);
    assert_attr(rpc_client, "error.type", s("NOT_FOUND"));
    assert!(!trace.iter().any(|s| s.kind == SpanKind::Producer), "nothing was published");
    pipeline.stop().await;
}

/// The gateway alone, traced to `receiver`, calling checkout at `checkout_url`.
async fn traced_gateway(
    receiver: &tracehop_testkit::otlp::OtlpReceiver,
    checkout_url: &str,
    checkout_timeout: Duration,
) -> (String, tracehop_telemetry::Telemetry) {
    use tracehop_telemetry::setup::{BatchLimits, Export, TelemetryConfig};
    let config = TelemetryConfig {
        batch: BatchLimits { delay: Duration::from_millis(100), ..BatchLimits::default() },
        metrics: Export::None,
        ..TelemetryConfig::otlp_grpc("gateway", receiver.endpoint())
    };
    let telemetry = tracehop_telemetry::Telemetry::new(&config).expect("telemetry");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let gateway = gateway::Config {
        addr,
        checkout_url: checkout_url.parse().expect("uri"),
        body_limit: 1024,
        checkout_timeout,
        jaeger_ui_url: "http://localhost:16686".to_owned(),
        inbound_context: tracehop_telemetry::http::InboundContext::Continue,
        cors_origins: vec!["*".to_owned()],
        baggage_span_attributes: vec![],
        drain_timeout: Duration::from_secs(1),
        header_timeout: Duration::from_secs(10),
    };
    tokio::spawn(gateway::run(listener, gateway, telemetry.clone(), std::future::pending()));
    (format!("http://{addr}/api/checkout"), telemetry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_server_span_fails_on_5xx_only() {
    use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
    let receiver = tracehop_testkit::otlp::OtlpReceiver::start().await;
    // Checkout down (a port nobody listens on), and checkout silent (accepts, never answers).
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let closed_url = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let silent_url = tracehop_testkit::silent_endpoint().await;
    let (down, down_telemetry) = traced_gateway(&receiver, &closed_url, Duration::from_secs(2)).await;
    let (slow, slow_telemetry) = traced_gateway(&receiver, &silent_url, Duration::from_millis(300)).await;
    let http = reqwest::Client::new();
    let order = json!({"customer_id": "c-1", "items": [{"sku": "SKU-001", "quantity": 1}]}).to_string();
    let cases: [(&str, &str, String, u16); 6] = [
        (&down, "application/json", order.clone(), 503),
        (&slow, "application/json", order.clone(), 504),
        (&down, "application/json", "{not json".to_owned(), 400),
        (&down, "text/plain", order.clone(), 415),
        (&down, "application/json", format!("{{\"customer_id\":\"{}\"}}", "x".repeat(2048)), 413),
        (&down, "application/json", json!({"customer_id": "c-1", "items": []}).to_string(), 422),
    ];
    let mut traces = Vec::new();
    for (url, content_type, body, expected) in cases {
        let response =
            http.post(url).header("content-type", content_type).body(body).send().await.expect("gateway answers");
        assert_eq!(response.status().as_u16(), expected);
        let trace_id = response.headers()["traceresponse"].to_str().expect("ascii")[3..35].to_owned();
        traces.push((trace_id, expected));
    }
    down_telemetry.flush().await;
    slow_telemetry.flush().await;
    let spans = receiver
        .wait_for(Duration::from_secs(10), |spans| {
            traces.iter().all(|(id, _)| spans.iter().any(|s| &s.trace_id == id && s.kind == SpanKind::Server))
        })
        .await;
    for (trace_id, status) in &traces {
        let trace: Vec<ReceivedSpan> = spans.iter().filter(|s| &s.trace_id == trace_id).cloned().collect();
        let server = find(&trace, "gateway", SpanKind::Server, "POST /api/checkout");
        assert_attr(server, "http.response.status_code", Attr::Int(i64::from(*status)));
        if *status >= 500 {
            assert_eq!(server.status, StatusCode::Error, "{status}");
            assert_attr(server, "error.type", s(&status.to_string()));
            // The call failed too: refused, or dropped at the gateway's deadline.
            let client = find(&trace, "gateway", SpanKind::Client, "checkout.v1.CheckoutService/Checkout");
            assert_eq!(client.status, StatusCode::Error, "{status}");
            // 504: the gateway's timer drops the call, or tonic's channel, enforcing the same
            // deadline sent as `grpc-timeout`, ends it first; CANCELLED either way, as tonic says.
            let (expected, causes) = if *status == 504 {
                ("CANCELLED", &["Timeout expired", "dropped before it completed"][..])
            } else {
                ("UNAVAILABLE", &["Connection refused"][..])
            };
            assert_attr(client, "error.type", s(expected));
            let message = client.event_attributes[0].get("exception.message");
            let says = |m: &str| causes.iter().any(|cause| m.contains(cause));
            assert!(matches!(message, Some(Attr::Str(m)) if says(m)), "{status}: {message:?}");
        } else {
            assert_eq!(server.status, StatusCode::Unset, "{status}: the caller's doing, no error of the server");
            assert_eq!(server.attr("error.type"), None, "{status}");
            assert!(!trace.iter().any(|s| s.kind == SpanKind::Client), "{status}: checkout was not called");
        }
    }
}
