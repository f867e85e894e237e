//! What checkout and stock share across RabbitMQ.
//!
//! # Layout
//! - [`catalog`]: the demo catalog (prices for checkout, seed for stock).
//! - [`confirm`]: confirm-mode channels, each lent to one publish at a time.
//! - [`connection`]: one connection that replaces itself when lost, to a broker or any node of a cluster.
//! - [`event`]: the `checkout.processed` message body.
//! - [`topology`]: exchanges and queues, declared identically by both services.

pub mod catalog;
pub mod confirm;
pub mod connection;
pub mod event;
pub mod topology;
