//! RED metrics beside the spans, named per OpenTelemetry semantic conventions 1.44, recorded by
//! the same layers and helpers that make the spans, so every service gets them from one setup.
//!
//! | metric | kind, unit | recorded by |
//! |---|---|---|
//! | `http.server.request.duration` | histogram, `s` | [`crate::http::HttpServerLayer`] |
//! | `rpc.server.call.duration` | histogram, `s` | [`crate::grpc::GrpcServerLayer`] |
//! | `rpc.client.call.duration` | histogram, `s` | [`crate::grpc::GrpcClientLayer`] |
//! | `messaging.client.operation.duration` | histogram, `s` | [`crate::messaging::record_publish`], [`crate::messaging::record_settle`] |
//! | `messaging.client.sent.messages` | counter, `{message}` | [`crate::messaging::record_publish`] |
//! | `messaging.client.consumed.messages` | counter, `{message}` | [`crate::messaging::record_consumed`] |
//! | `messaging.process.duration` | histogram, `s` | [`crate::messaging::record_process`] |
//!
//! The RPC histograms are the conventions' current names: `rpc.server.duration` and
//! `rpc.client.duration` (milliseconds) were renamed in 1.39, with the unit changed to seconds.
//! Attributes are the conventions' low-cardinality ones (method, route, status, destination,
//! `error.type`); never an id. Histograms use the conventions' recommended boundaries plus 0.5,
//! 1, 2.5 and 7.5 ms, where this pipeline's calls land.
//!
//! The Rust SDK (0.33) records no exemplars, so a histogram bucket cannot name a trace; the
//! span metrics of the `monitoring` compose profile can (see the README).

use opentelemetry::metrics::{Counter, Histogram, Meter};

/// Seconds: 0.5 ms to 10 s. The conventions' recommendation starts at 5 ms, then 10 ms, which
/// would put nearly every call of this pipeline in one bucket; 0.5, 1, 2.5 and 7.5 ms are added.
pub const DURATION_BOUNDARIES: [f64; 18] =
    [0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0];

/// The instruments the layers and messaging helpers record into, created once per service
/// that exports metrics (none otherwise, so callers build no attributes nobody aggregates).
#[derive(Debug, Clone)]
pub(crate) struct Instruments {
    pub(crate) http_server_duration: Histogram<f64>,
    pub(crate) rpc_server_duration: Histogram<f64>,
    pub(crate) rpc_client_duration: Histogram<f64>,
    pub(crate) messaging_operation_duration: Histogram<f64>,
    pub(crate) messaging_sent: Counter<u64>,
    pub(crate) messaging_consumed: Counter<u64>,
    pub(crate) messaging_process_duration: Histogram<f64>,
}

impl Instruments {
    pub(crate) fn new(meter: &Meter) -> Self {
        let seconds = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(DURATION_BOUNDARIES.to_vec())
                .build()
        };
        let messages = |name: &'static str, description: &'static str| {
            meter.u64_counter(name).with_unit("{message}").with_description(description).build()
        };
        Self {
            http_server_duration: seconds("http.server.request.duration", "Duration of HTTP server requests."),
            rpc_server_duration: seconds("rpc.server.call.duration", "Duration of incoming RPCs."),
            rpc_client_duration: seconds("rpc.client.call.duration", "Duration of outgoing RPCs."),
            messaging_operation_duration: seconds(
                "messaging.client.operation.duration",
                "Duration of messaging operations (publish, ack, nack).",
            ),
            messaging_sent: messages("messaging.client.sent.messages", "Messages the producer attempted to send."),
            messaging_consumed: messages(
                "messaging.client.consumed.messages",
                "Messages delivered to the application.",
            ),
            messaging_process_duration: seconds(
                "messaging.process.duration",
                "Duration of processing a delivered message.",
            ),
        }
    }
}
