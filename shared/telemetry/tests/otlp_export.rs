//! The OTLP/gRPC span exporter against a real receiver (opentelemetry-proto's tonic server):
//! what it sends decodes and carries the configured headers, a backend that comes up late still gets the batch (UNAVAILABLE is
//! retried within the timeout), a full batch goes out without waiting for the delay, and a
//! header gRPC cannot carry stops startup.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::{Span, TraceContextExt, Tracer};
use tracehop_telemetry::setup::{BatchLimits, SetupError, SpanTransport};
use tracehop_telemetry::{Telemetry, TelemetryConfig};
use tracehop_testkit::otlp::OtlpReceiver;

#[tokio::test]
async fn spans_arrive_with_their_attributes_and_parentage() {
    let receiver = OtlpReceiver::start().await;
    let config = TelemetryConfig {
        span_transport: SpanTransport { headers: vec![("x-tenant".into(), "a b".into())], ..SpanTransport::default() },
        ..TelemetryConfig::otlp_grpc("export-test", receiver.endpoint())
    };
    let telemetry = Telemetry::new(&config).expect("telemetry");
    let tracer = telemetry.tracer();
    let mut parent = tracer.start("parent");
    parent.set_attribute(KeyValue::new("order.lines", 3_i64));
    let cx = opentelemetry::Context::current_with_span(parent);
    tracer.start_with_context("child", &cx).end();
    drop(cx);
    telemetry.shutdown().await;

    let spans = receiver.spans();
    assert_eq!(spans.len(), 2, "{spans:?}");
    let parent = spans.iter().find(|s| s.name == "parent").expect("parent");
    let child = spans.iter().find(|s| s.name == "child").expect("child");
    assert_eq!(child.trace_id, parent.trace_id);
    assert_eq!(child.parent_span_id, parent.span_id);
    assert_eq!(parent.attr("order.lines"), Some(&tracehop_testkit::otlp::Attr::Int(3)));
    assert!(spans.iter().all(|s| s.service_name == "export-test"));
    // OTEL_EXPORTER_OTLP_HEADERS, the exporter's user agent and the attempt's deadline.
    let headers = receiver.span_export_headers();
    assert_eq!(headers.get("x-tenant").map(String::as_str), Some("a b"), "{headers:?}");
    assert!(headers.get("user-agent").is_some_and(|ua| ua.starts_with("OTel-OTLP-Exporter-Rust")), "{headers:?}");
    assert!(headers.contains_key("grpc-timeout"), "{headers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_comes_up_late_still_gets_the_batch() {
    // Outside the ephemeral range: no outgoing connection takes it while it is unbound.
    let [port] = tracehop_testkit::free_ports();
    let config = TelemetryConfig {
        batch: BatchLimits { delay: Duration::from_millis(20), ..BatchLimits::default() },
        ..TelemetryConfig::otlp_grpc("late-test", &format!("http://127.0.0.1:{port}"))
    };
    let telemetry = Telemetry::new(&config).expect("telemetry");
    telemetry.tracer().start("sent before the backend was up").end();
    // The first attempts are refused; the exporter backs off and tries again.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("the port is still free");
    let receiver = OtlpReceiver::start_on(listener);
    let spans = receiver.wait_for(Duration::from_secs(8), |spans| !spans.is_empty()).await;
    assert_eq!(spans.len(), 1, "{spans:?}");
    assert_eq!(spans[0].name, "sent before the backend was up");
    telemetry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_batch_goes_out_at_once_and_the_rest_at_a_flush() {
    let receiver = OtlpReceiver::start().await;
    // An hour's delay: only a full batch or a flush sends anything.
    let config = TelemetryConfig {
        batch: BatchLimits { delay: Duration::from_secs(3600), max_queue: 2048, max_batch: 4 },
        ..TelemetryConfig::otlp_grpc("batch-test", receiver.endpoint())
    };
    let telemetry = Telemetry::new(&config).expect("telemetry");
    for i in 0..7 {
        telemetry.tracer().start(format!("span {i}")).end();
    }
    let full = receiver.wait_for(Duration::from_secs(5), |spans| !spans.is_empty()).await;
    let names =
        |spans: &[tracehop_testkit::otlp::ReceivedSpan]| spans.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&full), ["span 0", "span 1", "span 2", "span 3"], "the first four, as one batch");
    // The three left wait for the delay, or a flush.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.spans().len(), 4);
    telemetry.flush().await;
    assert_eq!(names(&receiver.spans())[4..], ["span 4", "span 5", "span 6"]);
    telemetry.shutdown().await;
}

#[tokio::test]
async fn a_header_grpc_cannot_carry_stops_startup() {
    let config = TelemetryConfig {
        span_transport: SpanTransport {
            headers: vec![("bad header".into(), "value".into())],
            ..SpanTransport::default()
        },
        ..TelemetryConfig::otlp_grpc("header-test", "http://127.0.0.1:4317")
    };
    let error = Telemetry::new(&config).expect_err("an invalid header name");
    assert!(matches!(error, SetupError::GrpcExporter(_)), "{error}");
    assert!(error.to_string().contains("bad header"), "{error}");
}
