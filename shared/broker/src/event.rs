//! The `checkout.processed` event: the JSON body checkout publishes and stock consumes.

use serde::{Deserialize, Serialize};

/// AMQP `type` property of the event.
pub const EVENT_TYPE: &str = "checkout.processed";
/// AMQP `content_type` property of the event.
pub const CONTENT_TYPE: &str = "application/json";
/// Longest order id and SKU an event may carry. The order id is also the message's
/// `message_id`, an AMQP short string (at most 255 bytes); no catalog SKU comes near it. Checkout
/// refuses a longer SKU, stock dead-letters an event that holds one.
pub const MAX_ID: usize = 255;

/// An order that checkout accepted and priced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckoutProcessed {
    /// Order id (a UUID), also the message's `message_id`: the idempotency key of stock.
    pub order_id: String,
    /// The customer who placed the order.
    pub customer_id: String,
    /// What was ordered.
    pub items: Vec<Item>,
    /// Order total in cents.
    pub total_cents: i64,
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// Catalog SKU.
    pub sku: String,
    /// Units ordered.
    pub quantity: u32,
}
