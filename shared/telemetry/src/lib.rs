//! tracehop's telemetry crate: one trace across HTTP, gRPC and RabbitMQ.
//!
//! # Layout
//! - [`propagation`]: carriers for AMQP headers, gRPC metadata and HTTP headers, behind the
//!   strict W3C checks of [`propagation::CheckedPropagator`].
//! - [`setup`]: [`TelemetryConfig`] from the `OTEL_*` variables and the [`Telemetry`] handle
//!   (tracer, meter, propagator, flush on shutdown).
//! - [`propagators`]: `OTEL_PROPAGATORS`, which the Rust SDK does not read.
//! - [`grpc`]: tower layers for gRPC CLIENT and SERVER spans (tonic).
//! - [`http`]: an axum layer for HTTP SERVER spans, with the inbound trust policy.
//! - [`messaging`]: PRODUCER / CONSUMER spans for RabbitMQ, parent or link, and their metrics.
//! - [`metrics`]: the RED metrics the layers and messaging helpers record.
//! - [`otlp`]: OTLP/gRPC span export: the batch processor that encodes each span as it ends, and
//!   the exporter that sends the batches.
//! - [`spans`]: recording errors, baggage as span attributes.
//! - [`tracer`]: the tracer services start spans with (the SDK's, or a no-op one).
//! - [`logging`]: log lines carrying `trace_id` / `span_id` (text or JSON).
//! - [`shutdown`]: the SIGINT / SIGTERM signal every service drains on.
//! - [`probe`]: self-probes for container healthchecks (`<service> healthcheck`).
//! - [`env`](mod@env): reading variables once, with errors that name the variable.
//!
//! Nothing here reads the environment except the `from_env` constructors; services build the
//! values once at startup and pass them in, so several services can share one process.

pub mod env;
pub mod grpc;
pub mod http;
pub mod logging;
pub mod messaging;
pub mod metrics;
pub mod otlp;
pub mod probe;
pub mod propagation;
pub mod propagators;
pub mod setup;
pub mod shutdown;
pub mod spans;
pub mod tracer;

#[cfg(test)]
mod testing;

pub use env::{ConfigError, Env};
pub use setup::{Telemetry, TelemetryConfig};
