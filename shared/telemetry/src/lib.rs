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
//! This crate's own code reads the environment only in the `from_env` constructors; services
//! build the values once at startup and pass them in, so several services can share one
//! process. The SDK reads a few variables itself, whatever the constructor: the span limits
//! (`OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT` and its siblings), and, on the `http/protobuf` path, its
//! exporters' `OTEL_EXPORTER_OTLP_*` and its batch processor's `OTEL_BSP_*`; the metric exporters
//! read `OTEL_EXPORTER_OTLP_*` too, and [`logging`] reads `RUST_LOG`.
//!
//! # Quick start: one trace across a RabbitMQ hop
//!
//! The producer starts a PRODUCER span and writes its context (and, with the default
//! propagators, the baggage) into the message's AMQP headers; the consumer continues the trace
//! from them, or starts a new one when they are missing or unusable. (`no_run`: it needs a
//! broker, with the exchange, the queue and its binding declared, as `shared/broker`'s topology
//! does. Checkout and stock do more around the same calls: `mandatory` publishes, retries,
//! recovery, the messaging metrics through [`messaging::record_publish`] and its siblings, and
//! baggage as span attributes.)
//!
//! ```no_run
//! use futures_util::StreamExt;
//! use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
//! use lapin::types::FieldTable;
//! use lapin::uri::AMQPUri;
//! use lapin::{BasicProperties, Connection, ConnectionProperties};
//! use opentelemetry::Context;
//! use opentelemetry::trace::{FutureExt, TraceContextExt};
//! use tracehop_telemetry::messaging::{self, BrokerPeer, ConsumerContext, Destination, Publish};
//! use tracehop_telemetry::spans::record_error;
//! use tracehop_telemetry::{Telemetry, TelemetryConfig, shutdown};
//!
//! # async fn quick_start() -> Result<(), Box<dyn std::error::Error>> {
//! // OTEL_SERVICE_NAME, OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_PROPAGATORS, ... read as the spec says.
//! let telemetry = Telemetry::new(&TelemetryConfig::from_env("orders")?)?;
//! let uri: AMQPUri = "amqp://localhost:5672".parse()?;
//! let peer = BrokerPeer::from(&uri); // server.address / server.port of the spans
//! let connection = Connection::connect_uri(uri, ConnectionProperties::default()).await?;
//! let channel = connection.create_channel().await?;
//! channel.confirm_select(ConfirmSelectOptions::default()).await?;
//!
//! // Producer: the span's context goes into the headers; the span ends once the broker answered.
//! let destination = Destination::publish("checkout", "checkout.processed");
//! let body = br#"{"order_id":"42"}"#;
//! let publish = Publish { destination: &destination, message_id: "42", body_size: body.len() };
//! let mut headers = FieldTable::default();
//! let cx = messaging::start_publish(&telemetry, &Context::current(), &publish, &peer, &mut headers);
//! let properties = BasicProperties::default().with_message_id("42".into()).with_headers(headers);
//! let options = BasicPublishOptions::default();
//! let confirm = channel.basic_publish("checkout".into(), "checkout.processed".into(), options, body, properties);
//! if !confirm.await?.await?.is_ack() {
//!     record_error(&cx.span(), "nacked", "the broker did not take the message");
//! }
//! cx.span().end();
//!
//! // Consumer: each delivery's CONSUMER span is the child of the PRODUCER span in its headers,
//! // and the work and the ack run inside it; until SIGINT or SIGTERM.
//! let source = Destination::process("checkout", "checkout.processed", "stock.checkout-processed");
//! let options = BasicConsumeOptions::default();
//! let mut deliveries =
//!     channel.basic_consume("stock.checkout-processed".into(), "stock".into(), options, FieldTable::default()).await?;
//! let consume = async {
//!     while let Some(delivery) = deliveries.next().await {
//!         let delivery = delivery?;
//!         let cx = messaging::start_process(&telemetry, ConsumerContext::Parent, &source, &delivery, &peer);
//!         async {
//!             // ... the work: its spans, and its log lines (with `logging::init_logging`), join the trace.
//!             delivery.acker.ack(BasicAckOptions::default()).await
//!         }
//!         .with_context(cx.clone())
//!         .await?;
//!         cx.span().end();
//!     }
//!     Ok::<_, lapin::Error>(())
//! };
//! let outcome = tokio::select! {
//!     outcome = consume => outcome,
//!     () = shutdown::signal() => Ok(()),
//! };
//! // On every way out, so the spans still waiting are exported.
//! telemetry.shutdown().await;
//! outcome?;
//! # Ok(())
//! # }
//! ```
//!
//! For the other hops: [`http::HttpServerLayer`] (axum), [`grpc::GrpcClientLayer`] and
//! [`grpc::GrpcServerLayer`] (tonic); `services/` shows all three in use.

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
