//! A trace backend that refuses connections, rejects spans in a partial success, or is too slow
//! for the spans coming is not silent: the number of spans lost is logged with a running total.
//! (A test binary of its own: it installs the process-wide subscriber the export thread logs
//! through, once, for all its tests.)

use std::io;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};

use opentelemetry::trace::{Span, Tracer};
use tracehop_telemetry::logging::{CorrelatedFormat, LogFormat};
use tracehop_telemetry::setup::{BatchLimits, SpanTransport};
use tracehop_telemetry::{Telemetry, TelemetryConfig};
use tracing_subscriber::fmt::MakeWriter;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().map_err(|_| io::Error::other("poisoned"))?.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// What the process's WARN logs wrote (JSON lines), captured from the first call on.
fn captured() -> &'static Captured {
    static CAPTURED: OnceLock<Captured> = OnceLock::new();
    CAPTURED.get_or_init(|| {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .with_max_level(tracing::Level::WARN)
            .event_format(CorrelatedFormat { format: LogFormat::Json })
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
        captured
    })
}

/// The first log line `wanted` picks, as JSON, waiting up to 5 s for it. (Both tests log into
/// one capture when they share a process, as under `cargo test`.)
async fn logged(wanted: impl Fn(&str) -> bool) -> serde_json::Value {
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let text = String::from_utf8(captured().0.lock().expect("lock").clone()).expect("utf8");
        if let Some(line) = text.lines().find(|line| wanted(line)) {
            return serde_json::from_str(line).expect("json");
        }
    }
    panic!("no such log line in:\n{}", String::from_utf8_lossy(&captured().0.lock().expect("lock")));
}

/// Serves `backend` as an OTLP/gRPC trace receiver on a port of its own: its endpoint.
async fn serve(backend: impl TraceService) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(backend))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    endpoint
}

/// How the partial-success backends below refuse exports, once they have answered one.
const NO_MORE: &str = "no more spans accepted";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_export_is_logged_with_the_spans_it_dropped() {
    captured();
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    // A short export timeout: refused connections are retried (UNAVAILABLE) until it.
    let config = TelemetryConfig {
        batch: BatchLimits { delay: Duration::from_millis(50), ..BatchLimits::default() },
        span_transport: SpanTransport { timeout: Duration::from_millis(300), ..SpanTransport::default() },
        ..TelemetryConfig::otlp_grpc("refused", &endpoint)
    };
    let telemetry = Telemetry::new(&config).expect("telemetry");
    for _ in 0..3 {
        telemetry.tracer().start("lost").end();
    }
    let json = logged(|line| line.contains("span export failed") && !line.contains(NO_MORE)).await;
    assert_eq!(json["level"], "WARN");
    assert_eq!(json["dropped_spans"], 3, "{json}");
    assert!(json["dropped_spans_total"].as_u64().unwrap_or(0) >= 3, "{json}");
    telemetry.shutdown().await;
}

/// A backend that answers its first export with a partial success (`rejected` spans rejected,
/// `message`), then refuses every export for good (a status not retried) with `refusal`, which
/// starts with [`NO_MORE`].
struct PartialThenRefuse {
    rejected: i64,
    message: &'static str,
    refusal: &'static str,
    exports: std::sync::atomic::AtomicUsize,
}

#[tonic::async_trait]
impl TraceService for PartialThenRefuse {
    async fn export(
        &self,
        _request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if self.exports.fetch_add(1, std::sync::atomic::Ordering::Relaxed) > 0 {
            return Err(tonic::Status::invalid_argument(self.refusal));
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: Some(ExportTracePartialSuccess {
                rejected_spans: self.rejected,
                error_message: self.message.to_owned(),
            }),
        }))
    }
}

/// Exports three spans to `backend` and waits for the log line saying `what` of its partial
/// success, then four more, refused, and waits for that failure's line: the two lines.
async fn partial_success_then_refusal(
    backend: PartialThenRefuse,
    what: &str,
) -> (serde_json::Value, serde_json::Value) {
    assert!(backend.refusal.starts_with(NO_MORE), "the refused test would take this backend's refusal for its own");
    let (message, refusal) = (backend.message, backend.refusal);
    let endpoint = serve(backend).await;
    let config = TelemetryConfig {
        batch: BatchLimits { delay: Duration::from_millis(50), ..BatchLimits::default() },
        ..TelemetryConfig::otlp_grpc("partial", &endpoint)
    };
    let telemetry = Telemetry::new(&config).expect("telemetry");
    for _ in 0..3 {
        telemetry.tracer().start("answered").end();
    }
    let partial = logged(|line| line.contains(what) && line.contains(message)).await;
    for _ in 0..4 {
        telemetry.tracer().start("refused").end();
    }
    let failed = logged(|line| line.contains("span export failed") && line.contains(refusal)).await;
    telemetry.shutdown().await;
    (partial, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_a_backend_rejects_are_logged_and_counted_with_those_lost_to_failed_exports() {
    captured();
    let backend = PartialThenRefuse {
        rejected: 2,
        message: "two spans over the quota",
        refusal: "no more spans accepted, after a rejection",
        exports: Default::default(),
    };

    let (rejected, failed) = partial_success_then_refusal(backend, "the trace backend rejected spans").await;

    assert_eq!(rejected["level"], "WARN");
    assert_eq!(rejected["dropped_spans"], 2, "{rejected}");
    assert_eq!(rejected["dropped_spans_total"], 2, "{rejected}");
    assert_eq!(rejected["error_message"], "two spans over the quota", "{rejected}");
    // One running total: the failed export's spans come on top of the two rejected.
    let dropped = failed["dropped_spans"].as_u64().expect("dropped_spans");
    assert_eq!(failed["dropped_spans_total"], 2 + dropped, "{failed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_success_with_only_a_warning_is_logged_and_counts_nothing_lost() {
    captured();
    let backend = PartialThenRefuse {
        rejected: 0,
        message: "an unknown field was ignored",
        refusal: "no more spans accepted, after a warning",
        exports: Default::default(),
    };

    let (warned, failed) = partial_success_then_refusal(backend, "accepted the spans with a warning").await;

    assert_eq!(warned["level"], "WARN");
    assert_eq!(warned["error_message"], "an unknown field was ignored", "{warned}");
    assert!(warned.get("dropped_spans").is_none(), "{warned}");
    // Nothing lost before the refusal: the total is the refused export's spans alone.
    assert_eq!(failed["dropped_spans_total"], failed["dropped_spans"], "{failed}");
}

/// A backend that holds every export until the test opens its gate, saying when one arrives
/// and counting the spans it accepted.
struct Gated {
    arrived: tokio::sync::mpsc::UnboundedSender<()>,
    gate: Arc<tokio::sync::Semaphore>,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
}

#[tonic::async_trait]
impl TraceService for Gated {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let _ = self.arrived.send(());
        let _open = self.gate.acquire().await.map_err(|_| tonic::Status::unavailable("closed"))?;
        let spans =
            request.into_inner().resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum();
        self.accepted.fetch_add(spans, std::sync::atomic::Ordering::SeqCst);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_past_a_full_queue_are_dropped_counted_and_logged() {
    captured();
    let (arrived, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let backend = Gated { arrived, gate: gate.clone(), accepted: accepted.clone() };
    let endpoint = serve(backend).await;
    // Four spans may wait; the batch being sent is not counted among them.
    let config = TelemetryConfig {
        batch: BatchLimits { delay: Duration::from_secs(3600), max_queue: 4, max_batch: 2 },
        ..TelemetryConfig::otlp_grpc("full-queue", &endpoint)
    };
    let telemetry = Telemetry::new(&config).expect("telemetry");
    let end = |count: usize| (0..count).for_each(|_| telemetry.tracer().start("queued").end());
    end(2);
    tokio::time::timeout(Duration::from_secs(10), arrivals.recv()).await.expect("the first batch is being sent");
    // While the backend holds it: four spans find room, four do not.
    end(8);
    gate.add_permits(1_000);
    let json = logged(|line| line.contains("the span queue was full")).await;
    assert_eq!(json["level"], "WARN");
    assert_eq!(json["dropped_spans"], 4, "{json}");
    assert_eq!(json["dropped_spans_total"], 4, "{json}");
    // The queue is free again: a span ended now is exported too.
    end(1);
    telemetry.flush().await;
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2 + 4 + 1);
    telemetry.shutdown().await;
}
