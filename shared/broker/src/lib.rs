//! What checkout and stock share across RabbitMQ.
//!
//! # Layout
//! - [`catalog`]: the demo catalog (prices for checkout, seed for stock).
//! - [`event`]: the `checkout.processed` message body.

pub mod catalog;
pub mod event;
