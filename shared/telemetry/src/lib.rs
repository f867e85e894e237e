//! tracehop's telemetry crate: one trace across HTTP, gRPC and RabbitMQ.
//!
//! # Layout
//! - [`propagation`]: carriers for AMQP headers, gRPC metadata and HTTP headers, behind the
//!   strict W3C checks of [`propagation::CheckedPropagator`].
//!
//! Nothing here reads the environment except the `from_env` constructors; services build the
//! values once at startup and pass them in, so several services can share one process.

pub mod propagation;
