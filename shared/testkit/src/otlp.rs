//! An OTLP/gRPC receiver inside the test: the real exporters, the real protocol, spans and
//! metrics kept in memory for assertions. Built on `opentelemetry-proto`'s tonic server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as ProtoValue;
use opentelemetry_proto::tonic::metrics::v1::NumberDataPoint;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value as NumberValue;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};
use tonic::transport::server::TcpIncoming;

/// An attribute value, flattened to what assertions need.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// A float.
    Double(f64),
    /// Anything else (arrays, maps, bytes), debug-printed.
    Other(String),
}

impl Attr {
    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Attr::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One span as it arrived over OTLP.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// `service.name` of the resource that sent it.
    pub service_name: String,
    /// All resource attributes.
    pub resource: HashMap<String, Attr>,
    /// Trace id, 32 lowercase hex.
    pub trace_id: String,
    /// Span id, 16 lowercase hex.
    pub span_id: String,
    /// Parent span id, empty for a root span.
    pub parent_span_id: String,
    /// Span name.
    pub name: String,
    /// Span kind.
    pub kind: SpanKind,
    /// Attributes.
    pub attributes: HashMap<String, Attr>,
    /// Links as (trace id, span id).
    pub links: Vec<(String, String)>,
    /// Event names, in order.
    pub events: Vec<String>,
    /// Event attributes, in the order of `events`.
    pub event_attributes: Vec<HashMap<String, Attr>>,
    /// Status code.
    pub status: StatusCode,
}

impl ReceivedSpan {
    /// The attribute `key`, if set.
    pub fn attr(&self, key: &str) -> Option<&Attr> {
        self.attributes.get(key)
    }

    /// The string attribute `key`, if set.
    pub fn str_attr(&self, key: &str) -> Option<&str> {
        self.attr(key).and_then(Attr::as_str)
    }
}

/// What kind of instrument a metric came from, as OTLP tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// An explicit-bucket histogram.
    Histogram,
    /// A sum; `monotonic` for a counter.
    Sum {
        /// Only goes up.
        monotonic: bool,
    },
    /// A gauge.
    Gauge,
    /// Anything else (exponential histograms, summaries).
    Other,
}

/// One data point: its attributes and what it counted.
#[derive(Debug, Clone)]
pub struct MetricPoint {
    /// Attributes.
    pub attributes: HashMap<String, Attr>,
    /// A histogram's count of measurements; a sum's or gauge's value, truncated.
    pub count: u64,
    /// A histogram's sum; a sum's or gauge's value.
    pub value: f64,
}

/// One metric of one export.
#[derive(Debug, Clone)]
pub struct ReceivedMetric {
    /// `service.name` of the resource that sent it.
    pub service_name: String,
    /// Resource attributes.
    pub resource: HashMap<String, Attr>,
    /// Instrument name.
    pub name: String,
    /// Unit.
    pub unit: String,
    /// Kind.
    pub kind: MetricKind,
    /// Data points.
    pub points: Vec<MetricPoint>,
}

impl ReceivedMetric {
    /// The points whose attributes include every `(key, value)` of `filter` (string values).
    pub fn points_with(&self, filter: &[(&str, &str)]) -> Vec<&MetricPoint> {
        self.points
            .iter()
            .filter(|p| filter.iter().all(|(k, v)| p.attributes.get(*k).and_then(Attr::as_str) == Some(*v)))
            .collect()
    }
}

fn flatten_metric(
    service_name: &str,
    resource: &HashMap<String, Attr>,
    metric: opentelemetry_proto::tonic::metrics::v1::Metric,
) -> ReceivedMetric {
    // Sums and gauges: one number per point.
    let numbers = |points: Vec<NumberDataPoint>| -> Vec<MetricPoint> {
        points
            .into_iter()
            .map(|p| {
                let value = match p.value {
                    Some(NumberValue::AsInt(i)) => i as f64,
                    Some(NumberValue::AsDouble(d)) => d,
                    None => 0.0,
                };
                MetricPoint { attributes: flatten(&p.attributes), count: value as u64, value }
            })
            .collect()
    };
    let (kind, points) = match metric.data {
        Some(Data::Histogram(h)) => (
            MetricKind::Histogram,
            h.data_points
                .into_iter()
                .map(|p| MetricPoint {
                    attributes: flatten(&p.attributes),
                    count: p.count,
                    value: p.sum.unwrap_or_default(),
                })
                .collect(),
        ),
        Some(Data::Sum(sum)) => (MetricKind::Sum { monotonic: sum.is_monotonic }, numbers(sum.data_points)),
        Some(Data::Gauge(gauge)) => (MetricKind::Gauge, numbers(gauge.data_points)),
        _ => (MetricKind::Other, Vec::new()),
    };
    ReceivedMetric {
        service_name: service_name.to_owned(),
        resource: resource.clone(),
        name: metric.name,
        unit: metric.unit,
        kind,
        points,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn flatten(attributes: &[KeyValue]) -> HashMap<String, Attr> {
    attributes
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(ProtoValue::StringValue(s)) => Attr::Str(s.clone()),
                Some(ProtoValue::IntValue(i)) => Attr::Int(*i),
                Some(ProtoValue::BoolValue(b)) => Attr::Bool(*b),
                Some(ProtoValue::DoubleValue(d)) => Attr::Double(*d),
                other => Attr::Other(format!("{other:?}")),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

#[derive(Debug, Default)]
struct Shared {
    spans: Mutex<Vec<ReceivedSpan>>,
    /// The request headers (gRPC metadata) of the latest span export.
    span_headers: Mutex<HashMap<String, String>>,
    metrics: Mutex<Vec<ReceivedMetric>>,
    arrived: Notify,
}

#[derive(Debug, Clone)]
struct Collector(Arc<Shared>);

impl Collector {
    /// Adds what one export brought and wakes the waiters.
    fn keep<T>(&self, list: &Mutex<Vec<T>>, received: Vec<T>) {
        list.lock().unwrap_or_else(PoisonError::into_inner).extend(received);
        self.0.arrived.notify_waiters();
    }
}

/// A resource's attributes, flattened, and its `service.name`.
fn resource_of(resource: Option<&Resource>) -> (HashMap<String, Attr>, String) {
    let attributes = flatten(resource.map_or(&[][..], |r| &r.attributes));
    let service_name = attributes.get("service.name").and_then(Attr::as_str).unwrap_or_default().to_owned();
    (attributes, service_name)
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let headers = request.metadata().clone().into_headers();
        *self.0.span_headers.lock().unwrap_or_else(PoisonError::into_inner) = headers
            .iter()
            .filter_map(|(name, value)| Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned())))
            .collect();
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let (resource, service_name) = resource_of(resource_spans.resource.as_ref());
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    received.push(ReceivedSpan {
                        service_name: service_name.clone(),
                        resource: resource.clone(),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        name: span.name.clone(),
                        kind: SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified),
                        attributes: flatten(&span.attributes),
                        links: span.links.iter().map(|l| (hex(&l.trace_id), hex(&l.span_id))).collect(),
                        events: span.events.iter().map(|e| e.name.clone()).collect(),
                        event_attributes: span.events.iter().map(|e| flatten(&e.attributes)).collect(),
                        status: span
                            .status
                            .as_ref()
                            .and_then(|s| StatusCode::try_from(s.code).ok())
                            .unwrap_or(StatusCode::Unset),
                    });
                }
            }
        }
        self.keep(&self.0.spans, received);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_metrics in request.into_inner().resource_metrics {
            let (resource, service_name) = resource_of(resource_metrics.resource.as_ref());
            for scope_metrics in resource_metrics.scope_metrics {
                for metric in scope_metrics.metrics {
                    received.push(flatten_metric(&service_name, &resource, metric));
                }
            }
        }
        self.keep(&self.0.metrics, received);
        Ok(tonic::Response::new(ExportMetricsServiceResponse { partial_success: None }))
    }
}

/// A running receiver on a loopback port; stops when dropped.
#[derive(Debug)]
pub struct OtlpReceiver {
    endpoint: String,
    shared: Arc<Shared>,
    _stop: oneshot::Sender<()>,
}

impl OtlpReceiver {
    /// Starts a receiver on `127.0.0.1:0`.
    pub async fn start() -> Self {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.expect("bind the OTLP receiver"))
    }

    /// Starts a receiver on `listener` (a port chosen before the receiver comes up: exporters
    /// that retry are tested with it).
    pub fn start_on(listener: TcpListener) -> Self {
        let endpoint = format!("http://{}", listener.local_addr().expect("local addr"));
        let shared = Arc::new(Shared::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let traces = TraceServiceServer::new(Collector(shared.clone()));
        let metrics = MetricsServiceServer::new(Collector(shared.clone()));
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(traces)
                .add_service(metrics)
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                    let _ = stopped.await;
                })
                .await;
        });
        Self { endpoint, shared, _stop: stop }
    }

    /// The URL to give the exporter, e.g. `http://127.0.0.1:43123`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The request headers of the latest span export (ASCII values only), by lower-case name.
    pub fn span_export_headers(&self) -> HashMap<String, String> {
        self.shared.span_headers.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.shared.spans.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Every metric received so far, export after export (cumulative: a later export of the
    /// same metric supersedes an earlier one).
    pub fn metrics(&self) -> Vec<ReceivedMetric> {
        self.shared.metrics.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The latest export of metric `name` from `service`, if any arrived.
    pub fn latest_metric(&self, service: &str, name: &str) -> Option<ReceivedMetric> {
        let metrics = self.shared.metrics.lock().unwrap_or_else(PoisonError::into_inner);
        metrics.iter().rev().find(|m| m.service_name == service && m.name == name).cloned()
    }

    /// Waits until `done` holds for the spans received, or panics after `timeout` with what
    /// did arrive.
    pub async fn wait_for(&self, timeout: Duration, done: impl Fn(&[ReceivedSpan]) -> bool) -> Vec<ReceivedSpan> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let arrived = self.shared.arrived.notified();
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                let summary: Vec<String> = spans
                    .iter()
                    .map(|s| {
                        format!(
                            "{} {:?} {:?} trace {} parent {}",
                            s.service_name, s.kind, s.name, s.trace_id, s.parent_span_id
                        )
                    })
                    .collect();
                panic!("spans did not arrive within {timeout:?}; received: {summary:#?}");
            }
        }
    }
}
