//! Trace-context carriers and the checks every carrier goes through.
//!
//! | carrier | inject | extract |
//! |---|---|---|
//! | AMQP headers (lapin) | [`AmqpHeaderInjector`] | [`AmqpHeaderExtractor`] |
//! | gRPC metadata (tonic) | [`MetadataInjector`] | [`MetadataExtractor`] |
//! | HTTP headers | [`HeaderInjector`] (from `opentelemetry-http`) | [`HeaderExtractor`] (from `opentelemetry-http`) |
//!
//! Use them with a [`CheckedPropagator`] (what [`crate::Telemetry`] hands out): it validates
//! `traceparent` strictly and bounds `tracestate` and `baggage` to the W3C limits.

mod amqp;
pub(crate) mod baggage;
mod checked;
pub mod counters;
mod grpc;
mod trace_context;
pub mod w3c;

pub use amqp::{AmqpHeaderExtractor, AmqpHeaderInjector};
pub use baggage::W3cBaggagePropagator;
pub use checked::CheckedPropagator;
pub use grpc::{MetadataExtractor, MetadataInjector};
pub use opentelemetry_http::{HeaderExtractor, HeaderInjector};
pub use trace_context::{TraceIdHex, W3cTraceContextPropagator, trace_id_hex, traceparent, traceparent_bytes};
