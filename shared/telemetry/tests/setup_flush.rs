//! The telemetry guard: shutdown flushes what is pending, within its timeout, even from a
//! current-thread runtime (where the SDK's own blocking shutdown would stall the exporter); a
//! span that outlives the guard is still exported when the provider it keeps alive shuts down.

use std::time::{Duration, Instant};

use opentelemetry::trace::{Span, Tracer};
use tracehop_telemetry::{Telemetry, TelemetryConfig};
use tracehop_testkit::otlp::OtlpReceiver;

#[tokio::test]
async fn shutdown_flushes_pending_spans_from_a_current_thread_runtime() {
    let receiver = OtlpReceiver::start().await;
    // The default batch delay is 5 s: only shutdown can deliver these spans sooner.
    let telemetry = Telemetry::new(&TelemetryConfig::otlp_grpc("flush-test", receiver.endpoint())).expect("telemetry");
    for i in 0..10 {
        telemetry.tracer().start(format!("span {i}")).end();
    }
    let started = Instant::now();
    telemetry.shutdown().await;
    let took = started.elapsed();
    let spans = receiver.spans();
    assert_eq!(spans.len(), 10, "every pending span was exported by shutdown");
    assert!(spans.iter().all(|s| s.service_name == "flush-test"));
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
}

#[tokio::test]
async fn shutdown_gives_up_within_its_timeout_when_the_backend_hangs() {
    // A backend that accepts the connection and never answers.
    let endpoint = tracehop_testkit::silent_endpoint().await;
    let config = TelemetryConfig {
        shutdown_timeout: Duration::from_secs(2),
        ..TelemetryConfig::otlp_grpc("hang-test", &endpoint)
    };
    let telemetry = Telemetry::new(&config).expect("telemetry");
    let mut span = telemetry.tracer().start("never delivered");
    span.end();
    let started = Instant::now();
    telemetry.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(4), "shutdown took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_span_that_outlives_its_telemetry_is_still_exported() {
    let receiver = OtlpReceiver::start().await;
    let telemetry = Telemetry::new(&TelemetryConfig::otlp_grpc("outlived", receiver.endpoint())).expect("telemetry");
    let mut span = telemetry.tracer().start("ended after its telemetry was dropped");
    // The provider lives on in the span's tracer: ending and dropping the span shuts it down,
    // and its last export still needs the export runtime `Telemetry` started.
    drop(telemetry);
    span.end();
    tokio::task::spawn_blocking(move || drop(span)).await.expect("dropped");
    let spans = receiver.wait_for(Duration::from_secs(10), |spans| !spans.is_empty()).await;
    assert_eq!(spans.len(), 1, "{spans:?}");
    assert_eq!(spans[0].name, "ended after its telemetry was dropped");
}
