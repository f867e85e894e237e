//! What checkout and stock share across RabbitMQ.
//!
//! # Layout
//! - [`catalog`]: the demo catalog (prices for checkout, seed for stock).
//! - [`event`]: the `checkout.processed` message body.
//! - [`topology`]: exchanges and queues, declared identically by both services.

pub mod catalog;
pub mod event;
pub mod topology;
