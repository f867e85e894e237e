//! A trace backend that refuses connections is not silent: the failed export and the number of
//! spans it cost are logged. (Its own test binary: it installs the process-wide subscriber the
//! SDK's export thread logs through.)

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::trace::{Span, Tracer};
use tracehop_telemetry::logging::{CorrelatedFormat, LogFormat};
use tracehop_telemetry::setup::SpanTransport;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_export_is_logged_with_the_spans_it_dropped() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_max_level(tracing::Level::WARN)
        .event_format(CorrelatedFormat { format: LogFormat::Json })
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect("first subscriber");

    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    // A short export timeout: refused connections are retried (UNAVAILABLE) until it.
    let config = TelemetryConfig {
        batch_delay: Some(Duration::from_millis(50)),
        span_transport: SpanTransport { timeout: Duration::from_millis(300), ..SpanTransport::default() },
        ..TelemetryConfig::otlp_grpc("refused", &endpoint)
    };
    let telemetry = Telemetry::new(&config).expect("telemetry");
    for _ in 0..3 {
        telemetry.tracer().start("lost").end();
    }
    let mut found = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let text = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf8");
        if let Some(line) = text.lines().find(|line| line.contains("span export failed")) {
            found = Some(line.to_owned());
            break;
        }
    }
    let line = found.expect("a warning about the failed export");
    let json: serde_json::Value = serde_json::from_str(&line).expect("json");
    assert_eq!(json["level"], "WARN");
    assert_eq!(json["dropped_spans"], 3, "{line}");
    assert!(json["dropped_spans_total"].as_u64().unwrap_or(0) >= 3, "{line}");
    telemetry.shutdown().await;
}
