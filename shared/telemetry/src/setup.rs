//! Tracer and meter setup from the standard `OTEL_*` variables: one call per service, one guard
//! to flush.
//!
//! [`TelemetryConfig::from_env`] reads and validates what the Rust SDK ignores or reads leniently
//! (`OTEL_PROPAGATORS`, `OTEL_SDK_DISABLED`, the sampler, the protocol, the resource, the
//! exporters and the metric interval); a bad value stops startup naming the variable. The OTLP
//! exporter itself reads `OTEL_EXPORTER_OTLP_HEADERS`, `_TIMEOUT` and `_COMPRESSION` (and their
//! `_TRACES_` / `_METRICS_` forms), as the spec describes. [`Telemetry::new`] builds a tracer and propagator
//! that are passed to the services, never installed globally, so three services can share one
//! test process under three service names.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Meter, MeterProvider as _, noop::NoopMeterProvider};
use opentelemetry::propagation::{Extractor, TextMapCompositePropagator, TextMapPropagator};
use opentelemetry::trace::{TracerProvider as _, noop::NoopTracer};
use opentelemetry_otlp::{MetricExporter, Protocol, WithExportConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider, Temporality};
use opentelemetry_sdk::resource::{Resource, TelemetryResourceDetector};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, SpanData, SpanExporter, TracerProviderBuilder,
};

use crate::env::{ConfigError, Env};
use crate::metrics::Instruments;
use crate::otlp::{BatchError, EncodingSpanProcessor, GrpcExportError, GrpcSpanExporter, LostSpans, RuntimeGuard};
use crate::propagation::CheckedPropagator;
use crate::propagators::{self, DEFAULT_PROPAGATORS, PropagatorKind};
use crate::tracer::ServiceTracer;

/// Which sampler `OTEL_TRACES_SAMPLER` (+ `_ARG`) asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerChoice {
    /// `always_on`
    AlwaysOn,
    /// `always_off`
    AlwaysOff,
    /// `traceidratio` with its ratio
    TraceIdRatio(f64),
    /// `parentbased_always_on` (the default)
    ParentBasedAlwaysOn,
    /// `parentbased_always_off`
    ParentBasedAlwaysOff,
    /// `parentbased_traceidratio` with its ratio
    ParentBasedTraceIdRatio(f64),
}

impl SamplerChoice {
    fn sampler(self) -> Sampler {
        match self {
            Self::AlwaysOn => Sampler::AlwaysOn,
            Self::AlwaysOff => Sampler::AlwaysOff,
            Self::TraceIdRatio(ratio) => Sampler::TraceIdRatioBased(ratio),
            Self::ParentBasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            Self::ParentBasedAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            Self::ParentBasedTraceIdRatio(ratio) => Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))),
        }
    }
}

/// The OTLP wire protocol (`OTEL_EXPORTER_OTLP_PROTOCOL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// `grpc` (the default here: Jaeger and collectors listen on 4317).
    Grpc,
    /// `http/protobuf` (port 4318, path `/v1/traces`).
    HttpProtobuf,
}

/// Where a signal (spans, metrics) goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Export {
    /// Nowhere (`OTEL_TRACES_EXPORTER=none`, `OTEL_METRICS_EXPORTER=none`): spans are still
    /// sampled and propagated, metrics not collected.
    None,
    /// OTLP. `endpoint: None` lets the exporter use its default (`http://localhost:4317`, or
    /// `:4318/v1/<signal>` over HTTP); `Some` is used as given (tests point it at their receiver).
    Otlp {
        /// Explicit endpoint, e.g. `http://127.0.0.1:4317`.
        endpoint: Option<String>,
        /// Wire protocol.
        protocol: OtlpProtocol,
    },
}

/// Everything the telemetry setup needs, read once at startup.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// `service.name` (`OTEL_SERVICE_NAME`, else the service's own name).
    pub service_name: String,
    /// Extra resource attributes (`OTEL_RESOURCE_ATTRIBUTES`). A `service.instance.id` is
    /// generated when none is given, so replicas are told apart in Jaeger, and `host.name` is
    /// the kernel's host name unless given.
    pub resource_attributes: Vec<(String, String)>,
    /// `OTEL_SDK_DISABLED=true`: no spans at all; incoming context is passed on untouched.
    pub sdk_disabled: bool,
    /// Where spans go.
    pub export: Export,
    /// Where metrics go (`OTEL_METRICS_EXPORTER`, the `_METRICS_` endpoint and protocol).
    pub metrics: Export,
    /// How often metrics are exported (`OTEL_METRIC_EXPORT_INTERVAL`, milliseconds; 60 s).
    pub metric_interval: Duration,
    /// The sampler.
    pub sampler: SamplerChoice,
    /// The propagators, in order (`OTEL_PROPAGATORS`); empty means none.
    pub propagators: Vec<PropagatorKind>,
    /// How long shutdown may spend flushing spans before it gives up on them.
    pub shutdown_timeout: Duration,
    /// The batch span processor's delay, queue bound and batch size (`OTEL_BSP_*`). Tests
    /// shorten the delay to see spans sooner.
    pub batch: BatchLimits,
    /// How spans travel over OTLP/gRPC: headers, timeout, compression.
    pub span_transport: SpanTransport,
}

/// The `OTEL_EXPORTER_OTLP_(TRACES_)HEADERS` and `_TIMEOUT` of span export. `_COMPRESSION` is
/// checked too: only `none` is accepted, since the exporters are built without compression.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanTransport {
    /// Extra request headers, percent-decoded.
    pub headers: Vec<(String, String)>,
    /// How long one export may take, retries included (the spec's default: 10 s).
    pub timeout: Duration,
}

impl Default for SpanTransport {
    fn default() -> Self {
        Self { headers: Vec::new(), timeout: Duration::from_secs(10) }
    }
}

/// The batch processor's limits (`OTEL_BSP_SCHEDULE_DELAY`, `_MAX_QUEUE_SIZE`,
/// `_MAX_EXPORT_BATCH_SIZE`; the defaults are the spec's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// The longest a span waits for a batch to fill before the batch goes anyway.
    pub delay: Duration,
    /// Spans waiting at most (those of the batch being sent are not counted, as in the SDK's
    /// processor); past it, spans are dropped (and, over OTLP/gRPC, counted and logged) so that
    /// a slow backend costs spans, never the service's memory.
    pub max_queue: usize,
    /// Spans per export request, at most (never more than `max_queue`).
    pub max_batch: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self { delay: Duration::from_secs(5), max_queue: 2048, max_batch: 512 }
    }
}

impl SpanTransport {
    fn from_lookup(env: &Env<'_>) -> Result<Self, ConfigError> {
        let pick = |specific: &'static str, general: &'static str| {
            if env.get(specific).is_some() { specific } else { general }
        };
        // Every form is checked, as the spans' exporter (the `_TRACES_` form, else the general
        // one) and the metric exporter (the `_METRICS_` form, else the general one) may read it.
        for var in
            ["OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_METRICS_HEADERS"]
        {
            checked_headers(env, var)?;
        }
        for var in
            ["OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT"]
        {
            env.millis_or(var, 10_000)?;
        }
        let headers = checked_headers(env, pick("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"))?;
        let timeout = env.millis_or(pick("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"), 10_000)?;
        let compression_var = pick("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION");
        if env.choice_or(compression_var, &[("none", false), ("gzip", true)], false)? {
            // Said here, by name, rather than by the SDK's exporter at first use.
            return Err(ConfigError::new(
                compression_var,
                "gzip is not available: the OTLP exporters are built without compression; use \"none\" \
                 (a collector next to the service can compress onward)",
            ));
        }
        Ok(Self { headers, timeout })
    }
}

/// The headers `var` lists, each one a header can carry as text. Said here, by name, rather
/// than by our gRPC exporter at startup without it, or never (the SDK's exporters drop such a
/// header); a `-bin` name would ask gRPC for a binary value.
fn checked_headers(env: &Env<'_>, var: &'static str) -> Result<Vec<(String, String)>, ConfigError> {
    let Some(value) = env.get(var) else { return Ok(Vec::new()) };
    let headers = parse_key_values(var, &value)?;
    for (key, value) in &headers {
        let name = key.to_ascii_lowercase();
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() || name.ends_with("-bin") {
            return Err(ConfigError::new(var, format!("{key:?} is not a header name a text value can go under")));
        }
        if http::HeaderValue::from_str(value).is_err() {
            return Err(ConfigError::new(var, format!("the value of {key:?} cannot be sent in a header")));
        }
    }
    Ok(headers)
}

impl TelemetryConfig {
    /// The variables [`TelemetryConfig::from_lookup`] reads (the metric exporter reads the
    /// `_METRICS_` forms of the headers, timeout and compression itself; the headers and timeout
    /// are checked here too).
    pub const VARIABLES: &'static [&'static str] = &[
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
        "OTEL_SDK_DISABLED",
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_TRACES_SAMPLER",
        "OTEL_TRACES_SAMPLER_ARG",
        "OTEL_PROPAGATORS",
        "OTEL_METRICS_EXPORTER",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
        "OTEL_METRIC_EXPORT_INTERVAL",
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_COMPRESSION",
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
        "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
        "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT",
        "OTEL_BSP_SCHEDULE_DELAY",
        "OTEL_BSP_MAX_QUEUE_SIZE",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    ];

    /// Defaults for `service_name`: export over OTLP/gRPC to the exporter's default endpoint.
    pub fn new(service_name: &str) -> Self {
        Self {
            service_name: service_name.to_owned(),
            resource_attributes: Vec::new(),
            sdk_disabled: false,
            export: Export::Otlp { endpoint: None, protocol: OtlpProtocol::Grpc },
            metrics: Export::Otlp { endpoint: None, protocol: OtlpProtocol::Grpc },
            metric_interval: DEFAULT_METRIC_INTERVAL,
            sampler: SamplerChoice::ParentBasedAlwaysOn,
            propagators: DEFAULT_PROPAGATORS.to_vec(),
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            batch: BatchLimits::default(),
            span_transport: SpanTransport::default(),
        }
    }

    /// Exports to `endpoint` over OTLP/gRPC: what tests use with their in-process receiver.
    pub fn otlp_grpc(service_name: &str, endpoint: &str) -> Self {
        Self {
            export: Export::Otlp { endpoint: Some(endpoint.to_owned()), protocol: OtlpProtocol::Grpc },
            metrics: Export::Otlp { endpoint: Some(endpoint.to_owned()), protocol: OtlpProtocol::Grpc },
            ..Self::new(service_name)
        }
    }

    /// Reads the `OTEL_*` variables of the process environment.
    pub fn from_env(default_service_name: &str) -> Result<Self, ConfigError> {
        Self::from_lookup(default_service_name, &Env::process())
    }

    /// Reads the `OTEL_*` variables from `env`.
    pub fn from_lookup(default_service_name: &str, env: &Env<'_>) -> Result<Self, ConfigError> {
        let mut resource_attributes = match env.get("OTEL_RESOURCE_ATTRIBUTES") {
            Some(value) => parse_key_values("OTEL_RESOURCE_ATTRIBUTES", &value)?,
            None => Vec::new(),
        };
        // OTEL_SERVICE_NAME wins over a service.name in OTEL_RESOURCE_ATTRIBUTES (spec).
        let from_attributes = resource_attributes.iter().position(|(k, _)| k == "service.name");
        let service_name = match (env.get("OTEL_SERVICE_NAME"), from_attributes) {
            (Some(name), _) => name,
            (None, Some(index)) => resource_attributes[index].1.clone(),
            (None, None) => default_service_name.to_owned(),
        };
        resource_attributes.retain(|(k, _)| k != "service.name");

        let export = Signal::Traces.export(env)?;
        let metrics = Signal::Metrics.export(env)?;
        let metric_interval =
            env.millis_or("OTEL_METRIC_EXPORT_INTERVAL", DEFAULT_METRIC_INTERVAL.as_millis() as u64)?;
        let propagators = match env.get(propagators::OTEL_PROPAGATORS) {
            Some(value) => propagators::parse_propagators(&value)?,
            None => DEFAULT_PROPAGATORS.to_vec(),
        };
        Ok(Self {
            service_name,
            resource_attributes,
            sdk_disabled: env.flag_or("OTEL_SDK_DISABLED", false)?,
            export,
            metrics,
            metric_interval,
            sampler: parse_sampler(env)?,
            propagators,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            batch: batch_limits(env)?,
            span_transport: SpanTransport::from_lookup(env)?,
        })
    }
}

/// `OTEL_BSP_SCHEDULE_DELAY` (ms), `_MAX_QUEUE_SIZE` and `_MAX_EXPORT_BATCH_SIZE`, the spec's
/// defaults where unset. A batch larger than the queue is cut to it, as the spec asks; a zero
/// is refused by name (the SDK alone would ignore a value it cannot parse, silently).
/// The largest `OTEL_BSP_MAX_QUEUE_SIZE`: the SDK's processor (the `http/protobuf` path) makes
/// room for that many spans at startup, some 360 bytes each (36 MB here; 10 million asked for
/// 3.6 GB).
const MAX_QUEUE_SIZE: u64 = 100_000;

fn batch_limits(env: &Env<'_>) -> Result<BatchLimits, ConfigError> {
    let defaults = BatchLimits::default();
    let positive = |name: &'static str, default: u64| match env.parse_or::<u64>(name, default)? {
        0 => Err(ConfigError::new(name, "must be at least 1")),
        value => Ok(value),
    };
    let delay = env.millis_or("OTEL_BSP_SCHEDULE_DELAY", defaults.delay.as_millis() as u64)?;
    let max_queue = match positive("OTEL_BSP_MAX_QUEUE_SIZE", defaults.max_queue as u64)? {
        too_many if too_many > MAX_QUEUE_SIZE => {
            return Err(ConfigError::new(
                "OTEL_BSP_MAX_QUEUE_SIZE",
                format!(
                    "at most {MAX_QUEUE_SIZE}: the http/protobuf exporter's queue takes room for every span up front"
                ),
            ));
        }
        max_queue => max_queue as usize,
    };
    let max_batch = positive("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", defaults.max_batch as u64)? as usize;
    Ok(BatchLimits { delay, max_queue, max_batch: max_batch.min(max_queue) })
}

/// How long shutdown may spend flushing telemetry: with stock's 5 s drain of deliveries in
/// progress, a service exits within 10 s of SIGTERM even with a hung trace backend.
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(4);

/// The default of `OTEL_METRIC_EXPORT_INTERVAL` (the spec's 60 s).
const DEFAULT_METRIC_INTERVAL: Duration = Duration::from_secs(60);

/// A signal with an exporter of its own: its variables and its path over OTLP/HTTP.
#[derive(Debug, Clone, Copy)]
enum Signal {
    Traces,
    Metrics,
}

impl Signal {
    /// `OTEL_<SIGNAL>_EXPORTER` (`otlp` or `none`) and, for OTLP, the endpoint and protocol.
    fn export(self, env: &Env<'_>) -> Result<Export, ConfigError> {
        let (exporter, protocol_var) = match self {
            Self::Traces => ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
            Self::Metrics => ("OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"),
        };
        match env.string_or(exporter, "otlp").to_ascii_lowercase().as_str() {
            "otlp" => {}
            "none" => return Ok(Export::None),
            other => return Err(ConfigError::new(exporter, format!("expected otlp or none, got {other:?}"))),
        }
        let protocol_var = if env.get(protocol_var).is_some() { protocol_var } else { "OTEL_EXPORTER_OTLP_PROTOCOL" };
        let protocol = env.choice_or(
            protocol_var,
            &[("grpc", OtlpProtocol::Grpc), ("http/protobuf", OtlpProtocol::HttpProtobuf)],
            OtlpProtocol::Grpc,
        )?;
        Ok(Export::Otlp { endpoint: self.endpoint(env, protocol)?, protocol })
    }

    /// The endpoint per the spec: `OTEL_EXPORTER_OTLP_<SIGNAL>_ENDPOINT` as given, else
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (with `/v1/<signal>` appended for http/protobuf), else
    /// `None` (the exporter's default).
    fn endpoint(self, env: &Env<'_>, protocol: OtlpProtocol) -> Result<Option<String>, ConfigError> {
        let (variable, path) = match self {
            Self::Traces => ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "/v1/traces"),
            Self::Metrics => ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "/v1/metrics"),
        };
        let checked = |variable: &str, value: String| -> Result<String, ConfigError> {
            match value.parse::<http::Uri>() {
                Ok(uri) if uri.scheme_str() == Some("http") && uri.host().is_some() => Ok(value),
                // Refused here, by name, for both protocols: the gRPC exporter would stop startup
                // with a message naming no variable, the HTTP one fail every export.
                Ok(uri) if uri.scheme_str() == Some("https") => Err(ConfigError::new(
                    variable,
                    format!(
                        "{value:?}: https:// needs TLS, which the exporters are built without; export over \
                         http:// to a collector beside the service (it can forward over TLS)"
                    ),
                )),
                _ => Err(ConfigError::new(variable, format!("expected an http:// URL, got {value:?}"))),
            }
        };
        if let Some(value) = env.get(variable) {
            return checked(variable, value).map(Some);
        }
        let Some(base) = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") else { return Ok(None) };
        let base = checked("OTEL_EXPORTER_OTLP_ENDPOINT", base)?;
        Ok(Some(match protocol {
            OtlpProtocol::Grpc => base,
            OtlpProtocol::HttpProtobuf => format!("{}{path}", base.trim_end_matches('/')),
        }))
    }
}

fn parse_sampler(env: &Env<'_>) -> Result<SamplerChoice, ConfigError> {
    let ratio = || -> Result<f64, ConfigError> {
        let ratio: f64 = env.parse_or("OTEL_TRACES_SAMPLER_ARG", 1.0)?;
        if (0.0..=1.0).contains(&ratio) {
            Ok(ratio)
        } else {
            Err(ConfigError::new("OTEL_TRACES_SAMPLER_ARG", format!("a ratio must be within 0..=1, got {ratio}")))
        }
    };
    let Some(name) = env.get("OTEL_TRACES_SAMPLER") else { return Ok(SamplerChoice::ParentBasedAlwaysOn) };
    Ok(match name.to_ascii_lowercase().as_str() {
        "always_on" => SamplerChoice::AlwaysOn,
        "always_off" => SamplerChoice::AlwaysOff,
        "traceidratio" => SamplerChoice::TraceIdRatio(ratio()?),
        "parentbased_always_on" => SamplerChoice::ParentBasedAlwaysOn,
        "parentbased_always_off" => SamplerChoice::ParentBasedAlwaysOff,
        "parentbased_traceidratio" => SamplerChoice::ParentBasedTraceIdRatio(ratio()?),
        other => {
            return Err(ConfigError::new(
                "OTEL_TRACES_SAMPLER",
                format!(
                    "unsupported sampler {other:?}; use always_on, always_off, traceidratio, \
                     parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
                ),
            ));
        }
    })
}

/// The host name the kernel reports (Linux), if any.
fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

/// `key1=value1,key2=value2`, values percent-encoded (W3C Baggage octets), per the spec:
/// `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_EXPORTER_OTLP_HEADERS` alike.
fn parse_key_values(var: &'static str, value: &str) -> Result<Vec<(String, String)>, ConfigError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|member| !member.is_empty())
        .map(|member| {
            let (key, raw) =
                member.split_once('=').ok_or_else(|| ConfigError::new(var, format!("{member:?} is not key=value")))?;
            let key = key.trim();
            if key.is_empty() {
                return Err(ConfigError::new(var, format!("{member:?} has an empty key")));
            }
            let decoded = percent_encoding::percent_decode_str(raw.trim())
                .decode_utf8()
                .map_err(|_| ConfigError::new(var, format!("the value of {key:?} is not UTF-8 once decoded")))?;
            Ok((key.to_owned(), decoded.into_owned()))
        })
        .collect()
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The SDK's OTLP span exporter rejected its configuration (endpoint, headers, protocol).
    #[error("cannot build the OTLP span exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// The OTLP metric exporter rejected its configuration (`OTEL_EXPORTER_OTLP_METRICS_*` or
    /// `OTEL_EXPORTER_OTLP_*`: endpoint, headers, compression).
    #[error("cannot build the OTLP metric exporter: {0}")]
    MetricExporter(opentelemetry_otlp::ExporterBuildError),
    /// Our OTLP/gRPC span exporter rejected its configuration (endpoint, headers).
    #[error("cannot build the OTLP span exporter: {0}")]
    GrpcExporter(#[from] GrpcExportError),
    /// The batch span processor refused its limits, or its thread could not be started.
    #[error("cannot start span export: {0}")]
    Batch(#[from] BatchError),
    /// The exporters' runtime or its thread could not be started.
    #[error("cannot start the telemetry export thread: {0}")]
    Runtime(std::io::Error),
}

/// The tracer and propagator of one service, and the guard that flushes its spans.
///
/// Cheap to clone: every clone shares one provider.
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

struct Inner {
    service_name: String,
    tracer: ServiceTracer,
    propagator: CheckedPropagator<TextMapCompositePropagator>,
    /// `None` when the SDK is disabled: nothing to flush.
    provider: Option<SdkTracerProvider>,
    /// `None` when the SDK is disabled or metrics are off (`OTEL_METRICS_EXPORTER=none`).
    meter_provider: Option<SdkMeterProvider>,
    /// The meter services make their own instruments with (a no-op one without a provider).
    meter: Meter,
    /// `None` without a meter provider.
    instruments: Option<Instruments>,
    shutdown_timeout: Duration,
    /// Where the exporters' I/O runs (each gRPC exporter keeps it running as long as it needs).
    _runtime: Option<ExportRuntime>,
}

/// A current-thread tokio runtime on a thread of its own (`otlp-export`), on which the OTLP/gRPC
/// exporters' channels run: the batch processor's and the metric reader's threads hand each
/// export to it. The service's own runtime never sends or waits for an export, and a slow backend
/// never holds up a request.
///
/// The exporters that send on it keep a [`RuntimeGuard`]: the thread ends when the last of
/// `Telemetry` and those exporters lets go, so a provider kept alive by a span that outlived
/// `Telemetry` still exports at its final shutdown.
struct ExportRuntime {
    handle: tokio::runtime::Handle,
    /// Dropping the last clone ends the thread (and with it the runtime).
    stop: Arc<tokio::sync::oneshot::Sender<()>>,
}

impl ExportRuntime {
    /// Starts the thread, which builds its runtime there: a failure on either side leaves
    /// nothing behind on the caller's thread (dropping a runtime inside async code panics).
    fn start() -> Result<Self, SetupError> {
        let (ready, started) = std::sync::mpsc::sync_channel(1);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => {
                    let _ = ready.send(Ok(runtime.handle().clone()));
                    runtime.block_on(async move {
                        let _ = stopped.await;
                    });
                }
                Err(error) => {
                    let _ = ready.send(Err(error));
                }
            })
            .map_err(SetupError::Runtime)?;
        let handle = started
            .recv()
            .map_err(|_| SetupError::Runtime(std::io::Error::other("the otlp-export thread ended before it started")))?
            .map_err(SetupError::Runtime)?;
        Ok(Self { handle, stop: Arc::new(stop) })
    }

    /// The runtime's handle and a guard that keeps it running, starting it on first need:
    /// only gRPC exporters use it.
    fn handle(runtime: &mut Option<Self>) -> Result<(tokio::runtime::Handle, RuntimeGuard), SetupError> {
        let started = match runtime {
            Some(started) => started,
            None => runtime.insert(Self::start()?),
        };
        Ok((started.handle.clone(), RuntimeGuard(started.stop.clone())))
    }
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("service_name", &self.inner.service_name)
            .field("enabled", &self.inner.provider.is_some())
            .field("metrics", &self.inner.meter_provider.is_some())
            .finish()
    }
}

impl Telemetry {
    /// Builds the tracer provider (batch export on its own thread), the meter provider
    /// (periodic export on its own thread), the runtime their gRPC exporters send on, and the
    /// propagator.
    pub fn new(config: &TelemetryConfig) -> Result<Self, SetupError> {
        let propagator = CheckedPropagator::new(propagators::composite(&config.propagators));
        if config.sdk_disabled {
            return Ok(Self::assemble(config, ServiceTracer::Noop(NoopTracer::new()), propagator, None, None, None));
        }
        let mut resource = Resource::builder_empty()
            .with_detector(Box::new(TelemetryResourceDetector))
            .with_service_name(config.service_name.clone())
            .with_attributes(config.resource_attributes.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())));
        if !config.resource_attributes.iter().any(|(k, _)| k == "service.instance.id") {
            resource = resource.with_attribute(KeyValue::new("service.instance.id", uuid::Uuid::new_v4().to_string()));
        }
        if !config.resource_attributes.iter().any(|(k, _)| k == "host.name")
            && let Some(host) = host_name()
        {
            // In a container this is the container id `docker compose ps` shows, which ties a
            // replica's spans to its logs.
            resource = resource.with_attribute(KeyValue::new("host.name", host));
        }
        let resource = resource.build();
        let mut runtime = None;
        let meter_provider = meter_provider(config, &resource, &mut runtime)?;
        let mut builder = SdkTracerProvider::builder().with_resource(resource).with_sampler(config.sampler.sampler());
        if let Export::Otlp { endpoint, protocol } = &config.export {
            builder = with_span_export(builder, config, endpoint, *protocol, &mut runtime)?;
        }
        let provider = builder.build();
        let tracer = ServiceTracer::Sdk(provider.tracer("tracehop"));
        Ok(Self::assemble(config, tracer, propagator, Some(provider), meter_provider, runtime))
    }

    /// Telemetry that records nothing but still propagates context: for tests of other things.
    pub fn disabled(service_name: &str) -> Self {
        let config = TelemetryConfig { sdk_disabled: true, ..TelemetryConfig::new(service_name) };
        let propagator = CheckedPropagator::new(propagators::composite(&config.propagators));
        Self::assemble(&config, ServiceTracer::Noop(NoopTracer::new()), propagator, None, None, None)
    }

    fn assemble(
        config: &TelemetryConfig,
        tracer: ServiceTracer,
        propagator: CheckedPropagator<TextMapCompositePropagator>,
        provider: Option<SdkTracerProvider>,
        meter_provider: Option<SdkMeterProvider>,
        runtime: Option<ExportRuntime>,
    ) -> Self {
        let meter = match &meter_provider {
            Some(provider) => provider.meter("tracehop"),
            None => NoopMeterProvider::new().meter("tracehop"),
        };
        let instruments = meter_provider.is_some().then(|| Instruments::new(&meter));
        let inner = Inner {
            service_name: config.service_name.clone(),
            tracer,
            propagator,
            provider,
            meter_provider,
            meter,
            instruments,
            shutdown_timeout: config.shutdown_timeout,
            _runtime: runtime,
        };
        Self { inner: Arc::new(inner) }
    }

    /// The meter for a service's own instruments (business counters): exported with the
    /// layers' metrics, a no-op when metrics are off.
    pub fn meter(&self) -> &Meter {
        &self.inner.meter
    }

    /// The layers' and helpers' instruments; `None` when metrics are off.
    pub(crate) fn instruments(&self) -> Option<&Instruments> {
        self.inner.instruments.as_ref()
    }

    /// `service.name` of this service.
    pub fn service_name(&self) -> &str {
        &self.inner.service_name
    }

    /// The tracer that starts this service's spans.
    pub fn tracer(&self) -> &ServiceTracer {
        &self.inner.tracer
    }

    /// The configured propagators, behind the W3C checks.
    pub fn propagator(&self) -> &(dyn TextMapPropagator + Send + Sync) {
        &self.inner.propagator
    }

    /// The context an incoming request or message carries, on its own: nothing of the current
    /// context (the span or baggage of the task that serves or consumes) is taken on, so a
    /// missing or unusable context starts a new trace, as DESIGN says.
    pub fn extract_incoming(&self, extractor: &dyn Extractor) -> opentelemetry::Context {
        self.inner.propagator.extract_with_context(&opentelemetry::Context::new(), extractor)
    }

    /// Exports the spans ended so far and the metrics as they stand, now (off the runtime and
    /// bounded, like [`Telemetry::shutdown`]).
    pub async fn flush(&self) {
        self.on_both_providers("flush", |p| p.force_flush(), |p| p.force_flush()).await;
    }

    /// Flushes and stops span and metric export, giving up after the configured timeout (the
    /// metrics SDK ignores the timeout it is given and waits up to its own 5 s).
    pub async fn shutdown(&self) {
        let timeout = self.inner.shutdown_timeout;
        self.on_both_providers(
            "shutdown",
            move |p| p.shutdown_with_timeout(timeout),
            move |p| p.shutdown_with_timeout(timeout),
        )
        .await;
    }

    /// Runs `spans` and `metrics` on their providers side by side and waits for them until the
    /// configured timeout, logging what failed.
    ///
    /// The SDK's calls block their caller until the export thread is done; on a tokio worker
    /// (or a current-thread test runtime) that would stall the service for as long as the
    /// backend takes, so they run on threads of their own. Not on tokio's blocking pool: a runtime waits
    /// for its blocking tasks when it is dropped, so a hung export would hold the process past
    /// the deadline anyway.
    async fn on_both_providers(
        &self,
        what: &'static str,
        spans: impl FnOnce(SdkTracerProvider) -> OTelSdkResult + Send + 'static,
        metrics: impl FnOnce(SdkMeterProvider) -> OTelSdkResult + Send + 'static,
    ) {
        let timeout = self.inner.shutdown_timeout;
        let spans = self.inner.provider.clone().map(|p| ("spans", detached(move || spans(p))));
        let metrics = self.inner.meter_provider.clone().map(|p| ("metrics", detached(move || metrics(p))));
        let deadline = tokio::time::Instant::now() + timeout;
        for (signal, task) in [spans, metrics].into_iter().flatten() {
            match tokio::time::timeout_at(deadline, task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(error))) => tracing::warn!(%error, signal, what, "telemetry did not flush everything"),
                Ok(Err(_)) => tracing::warn!(signal, what, "the telemetry thread ended without an answer"),
                Err(_) => tracing::warn!(?timeout, signal, what, "telemetry gave up at its deadline"),
            }
        }
    }
}

/// Runs `work` on a detached thread of its own; the answer arrives on the receiver (which
/// reports an error if the thread could not be started or panicked).
fn detached<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> tokio::sync::oneshot::Receiver<T> {
    let (answer, receiver) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name("telemetry-flush".into()).spawn(move || {
        let _ = answer.send(work());
    });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot start a telemetry flush thread");
    }
    receiver
}

/// Adds the batch processor of OTLP span export to `builder`. OTLP/gRPC goes through
/// [`EncodingSpanProcessor`] (each span encoded as it ends, batches sent by
/// [`GrpcSpanExporter`]); `http/protobuf` through the SDK's batch processor and exporter. Both
/// take their limits from `config.batch`. (The configuration refuses `https://` and gzip: the
/// workspace builds neither TLS nor compression.)
fn with_span_export(
    builder: TracerProviderBuilder,
    config: &TelemetryConfig,
    endpoint: &Option<String>,
    protocol: OtlpProtocol,
    runtime: &mut Option<ExportRuntime>,
) -> Result<TracerProviderBuilder, SetupError> {
    let limits = config.batch;
    let endpoint_or_default = endpoint.as_deref().unwrap_or(DEFAULT_GRPC_ENDPOINT);
    Ok(match protocol {
        OtlpProtocol::Grpc => {
            let (handle, guard) = ExportRuntime::handle(runtime)?;
            let exporter = GrpcSpanExporter::new(endpoint_or_default, &config.span_transport, &handle)?.keeping(guard);
            builder.with_span_processor(EncodingSpanProcessor::new(exporter, limits)?)
        }
        OtlpProtocol::HttpProtobuf => builder.with_span_processor(batched(
            configured(opentelemetry_otlp::SpanExporter::builder().with_http(), endpoint, protocol).build()?,
            limits,
        )),
    })
}

/// `exporter` behind the SDK's batch processor, with `limits`, its failures counted and logged.
fn batched<E: SpanExporter + 'static>(exporter: E, limits: BatchLimits) -> BatchSpanProcessor {
    let batch = BatchConfigBuilder::default()
        .with_scheduled_delay(limits.delay)
        .with_max_queue_size(limits.max_queue)
        .with_max_export_batch_size(limits.max_batch)
        .build();
    BatchSpanProcessor::builder(CountingExporter { inner: exporter, lost: LostSpans::default() })
        .with_batch_config(batch)
        .build()
}

/// Where OTLP/gRPC goes when no endpoint is given (the spec's default).
const DEFAULT_GRPC_ENDPOINT: &str = "http://localhost:4317";

/// An OTLP exporter builder (spans or metrics, gRPC or HTTP) with our endpoint, if one was
/// given, and protocol.
fn configured<B: WithExportConfig>(builder: B, endpoint: &Option<String>, protocol: OtlpProtocol) -> B {
    let builder = match endpoint {
        Some(endpoint) => builder.with_endpoint(endpoint),
        None => builder,
    };
    builder.with_protocol(match protocol {
        OtlpProtocol::Grpc => Protocol::Grpc,
        OtlpProtocol::HttpProtobuf => Protocol::HttpBinary,
    })
}

/// The meter provider: OTLP export every `metric_interval`, cumulative temporality (what
/// Prometheus ingests), on the reader's own thread. `None` when metrics are off.
fn meter_provider(
    config: &TelemetryConfig,
    resource: &Resource,
    runtime: &mut Option<ExportRuntime>,
) -> Result<Option<SdkMeterProvider>, SetupError> {
    let Export::Otlp { endpoint, protocol } = &config.metrics else { return Ok(None) };
    let (exporter, runtime) = match protocol {
        OtlpProtocol::Grpc => {
            let (handle, guard) = ExportRuntime::handle(runtime)?;
            let _entered = handle.enter();
            let exporter = configured(MetricExporter::builder().with_tonic(), endpoint, *protocol).build();
            (exporter.map_err(SetupError::MetricExporter)?, Some(guard))
        }
        OtlpProtocol::HttpProtobuf => {
            let exporter = configured(MetricExporter::builder().with_http(), endpoint, *protocol).build();
            (exporter.map_err(SetupError::MetricExporter)?, None)
        }
    };
    let reader = PeriodicReader::builder(LoggingMetricExporter { inner: exporter, _runtime: runtime })
        .with_interval(config.metric_interval)
        .build();
    Ok(Some(SdkMeterProvider::builder().with_resource(resource.clone()).with_reader(reader).build()))
}

/// Says in the log when a metric export fails (the SDK alone only reports it through its
/// internal logs). Metrics are cumulative: the next export carries what this one lost.
#[derive(Debug)]
struct LoggingMetricExporter<E> {
    inner: E,
    /// Keeps the export runtime running for the reader's last export (gRPC only).
    _runtime: Option<RuntimeGuard>,
}

impl<E: PushMetricExporter> PushMetricExporter for LoggingMetricExporter<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let result = self.inner.export(metrics).await;
        if let Err(error) = &result {
            tracing::warn!(%error, "metric export failed; the next export carries the totals");
        }
        result
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

/// Counts spans lost to failed exports and says so in the log (the SDK alone is silent): for
/// the exporters behind the SDK's batch processor (OTLP/gRPC over `http://` counts its own).
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    lost: LostSpans,
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len() as u64;
        let result = self.inner.export(batch).await;
        if let Err(error) = &result {
            let total = self.lost.add(spans);
            tracing::warn!(%error, dropped_spans = spans, dropped_spans_total = total, "span export failed");
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::config;

    #[test]
    fn defaults_follow_the_spec() {
        let config = config(&[]).expect("defaults");
        assert_eq!(config, TelemetryConfig::new("gateway"));
    }

    #[test]
    fn reads_the_standard_variables() {
        let config = config(&[
            ("OTEL_SERVICE_NAME", "edge"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=demo, team=a%20b"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            ("OTEL_PROPAGATORS", "b3multi"),
            ("OTEL_SDK_DISABLED", "true"),
        ])
        .expect("valid");
        assert_eq!(config.service_name, "edge");
        assert_eq!(
            config.resource_attributes,
            vec![("deployment.environment.name".into(), "demo".into()), ("team".into(), "a b".into())]
        );
        assert_eq!(config.export, Export::Otlp { endpoint: None, protocol: OtlpProtocol::HttpProtobuf });
        assert_eq!(config.sampler, SamplerChoice::ParentBasedTraceIdRatio(0.25));
        assert_eq!(config.propagators, vec![PropagatorKind::B3Multi]);
        assert!(config.sdk_disabled);
    }

    #[test]
    fn the_endpoint_follows_the_spec_per_protocol() {
        let grpc = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://jaeger:4317")]).expect("valid");
        assert_eq!(
            grpc.export,
            Export::Otlp { endpoint: Some("http://jaeger:4317".into()), protocol: OtlpProtocol::Grpc }
        );
        let http = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://jaeger:4318/"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ])
        .expect("valid");
        let expected = Some("http://jaeger:4318/v1/traces".to_owned());
        assert_eq!(http.export, Export::Otlp { endpoint: expected, protocol: OtlpProtocol::HttpProtobuf });
        let signal = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://ignored:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://collector:4318/custom"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ])
        .expect("valid");
        let expected = Some("http://collector:4318/custom".to_owned());
        assert_eq!(signal.export, Export::Otlp { endpoint: expected, protocol: OtlpProtocol::HttpProtobuf });
        let error = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "jaeger:4317")]).expect_err("no scheme");
        assert_eq!(error.variable, "OTEL_EXPORTER_OTLP_ENDPOINT");
        for (variable, protocol) in [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "grpc"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "grpc"),
            ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http/protobuf"),
        ] {
            let error = config(&[(variable, "https://api.example.com"), ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)])
                .expect_err("no TLS");
            assert_eq!(error.variable, variable);
            assert!(error.to_string().contains("https:// needs TLS"), "{error}");
        }
    }

    #[test]
    fn span_transport_reads_headers_timeout_and_compression_traces_first() {
        assert_eq!(config(&[]).expect("defaults").span_transport, SpanTransport::default());
        let general = config(&[
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=s%20ecret, x-tenant=a"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "none"),
        ])
        .expect("valid")
        .span_transport;
        assert_eq!(general.headers, [("api-key".to_owned(), "s ecret".to_owned()), ("x-tenant".into(), "a".into())]);
        assert_eq!(general.timeout, Duration::from_millis(2500));
        let traces = config(&[
            ("OTEL_EXPORTER_OTLP_HEADERS", "a=1"),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "b=2"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "none"),
        ])
        .expect("the traces' own none wins over the general gzip")
        .span_transport;
        assert_eq!(traces.headers, [("b".to_owned(), "2".to_owned())]);
        let error = config(&[("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")]).expect_err("gzip");
        assert!(error.message.contains("built without compression"), "{error}");
        for (variable, value) in [
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "0"),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "soon"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd"),
            ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "no-equals-sign"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "a key=1"),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "api-key=line%0Abreak"),
            ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "token-bin=AAAA"),
            ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "99999999999999"),
        ] {
            let error = config(&[(variable, value)]).expect_err(value);
            assert_eq!(error.variable, variable, "{error}");
        }
    }

    #[test]
    fn metrics_have_their_own_exporter_endpoint_protocol_and_interval() {
        let defaults = config(&[]).expect("defaults");
        assert_eq!(defaults.metrics, Export::Otlp { endpoint: None, protocol: OtlpProtocol::Grpc });
        assert_eq!(defaults.metric_interval, Duration::from_secs(60));
        let shared = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "5000"),
        ])
        .expect("valid");
        let expected = Some("http://collector:4318/v1/metrics".to_owned());
        assert_eq!(shared.metrics, Export::Otlp { endpoint: expected, protocol: OtlpProtocol::HttpProtobuf });
        assert_eq!(shared.metric_interval, Duration::from_secs(5));
        // Metrics straight to Prometheus's OTLP receiver, spans to Jaeger over gRPC.
        let split = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://jaeger:4317"),
            ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://prometheus:9090/api/v1/otlp/v1/metrics"),
            ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf"),
        ])
        .expect("valid");
        assert_eq!(
            split.export,
            Export::Otlp { endpoint: Some("http://jaeger:4317".into()), protocol: OtlpProtocol::Grpc }
        );
        let expected = Some("http://prometheus:9090/api/v1/otlp/v1/metrics".to_owned());
        assert_eq!(split.metrics, Export::Otlp { endpoint: expected, protocol: OtlpProtocol::HttpProtobuf });
        let off = config(&[("OTEL_METRICS_EXPORTER", "none")]).expect("valid");
        assert_eq!((off.metrics, off.export), (Export::None, defaults.export));
    }

    #[test]
    fn sdk_disabled_turns_metrics_off_too() {
        let config = config(&[("OTEL_SDK_DISABLED", "true")]).expect("valid");
        assert!(matches!(config.metrics, Export::Otlp { .. }), "the exporter is configured");
        let telemetry = Telemetry::new(&config).expect("telemetry");
        assert!(telemetry.inner.meter_provider.is_none() && telemetry.instruments().is_none());
    }

    #[test]
    fn the_batch_limits_follow_otel_bsp() {
        assert_eq!(config(&[]).expect("defaults").batch, BatchLimits::default());
        let set = config(&[
            ("OTEL_BSP_SCHEDULE_DELAY", "250"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "40"),
        ])
        .expect("valid");
        assert_eq!(set.batch, BatchLimits { delay: Duration::from_millis(250), max_queue: 100, max_batch: 40 });
        let oversize = config(&[("OTEL_BSP_MAX_QUEUE_SIZE", "100"), ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "500")]);
        assert_eq!(oversize.expect("valid").batch.max_batch, 100, "a batch is never larger than the queue");
        for variable in ["OTEL_BSP_SCHEDULE_DELAY", "OTEL_BSP_MAX_QUEUE_SIZE", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"] {
            for bad in ["0", "many"] {
                assert_eq!(config(&[(variable, bad)]).expect_err(bad).variable, variable);
            }
        }
        assert_eq!(config(&[("OTEL_BSP_MAX_QUEUE_SIZE", "100000")]).expect("the bound").batch.max_queue, 100_000);
        let error = config(&[("OTEL_BSP_MAX_QUEUE_SIZE", "10000000")]).expect_err("over the bound");
        assert_eq!(error.variable, "OTEL_BSP_MAX_QUEUE_SIZE");
    }

    #[test]
    fn the_export_thread_starts_only_for_grpc_exporters() {
        let http = config(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]).expect("valid");
        assert!(Telemetry::new(&http).expect("telemetry").inner._runtime.is_none(), "nothing would run on it");
        let grpc_metrics_only = config(&[("OTEL_TRACES_EXPORTER", "none")]).expect("valid");
        assert!(Telemetry::new(&grpc_metrics_only).expect("telemetry").inner._runtime.is_some());
        let grpc_spans_only = config(&[("OTEL_METRICS_EXPORTER", "none")]).expect("valid");
        assert!(Telemetry::new(&grpc_spans_only).expect("telemetry").inner._runtime.is_some());
    }

    #[test]
    fn service_name_falls_back_to_the_resource_attribute() {
        let config = config(&[("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attrs")]).expect("valid");
        assert_eq!(config.service_name, "from-attrs");
        assert!(config.resource_attributes.is_empty());
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (pairs, variable) in [
            (&[("OTEL_TRACES_SAMPLER", "sometimes")][..], "OTEL_TRACES_SAMPLER"),
            (
                &[("OTEL_TRACES_SAMPLER", "traceidratio"), ("OTEL_TRACES_SAMPLER_ARG", "2")][..],
                "OTEL_TRACES_SAMPLER_ARG",
            ),
            (
                &[("OTEL_TRACES_SAMPLER", "traceidratio"), ("OTEL_TRACES_SAMPLER_ARG", "half")][..],
                "OTEL_TRACES_SAMPLER_ARG",
            ),
            (&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")][..], "OTEL_EXPORTER_OTLP_PROTOCOL"),
            (&[("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "udp")][..], "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
            (&[("OTEL_PROPAGATORS", "tracecontext,nope")][..], "OTEL_PROPAGATORS"),
            (&[("OTEL_SDK_DISABLED", "yes")][..], "OTEL_SDK_DISABLED"),
            (&[("OTEL_TRACES_EXPORTER", "zipkin")][..], "OTEL_TRACES_EXPORTER"),
            (&[("OTEL_RESOURCE_ATTRIBUTES", "novalue")][..], "OTEL_RESOURCE_ATTRIBUTES"),
            (&[("OTEL_RESOURCE_ATTRIBUTES", "k=%ff")][..], "OTEL_RESOURCE_ATTRIBUTES"),
            (&[("OTEL_METRICS_EXPORTER", "prometheus")][..], "OTEL_METRICS_EXPORTER"),
            (&[("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "udp")][..], "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"),
            (&[("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "prometheus:9090")][..], "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"),
            (&[("OTEL_METRIC_EXPORT_INTERVAL", "0")][..], "OTEL_METRIC_EXPORT_INTERVAL"),
            (&[("OTEL_METRIC_EXPORT_INTERVAL", "soon")][..], "OTEL_METRIC_EXPORT_INTERVAL"),
        ] {
            let error = config(pairs).expect_err(variable);
            assert_eq!(error.variable, variable, "{error}");
        }
    }
}
