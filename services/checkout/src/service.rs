//! The `checkout.v1.CheckoutService` implementation: validate, price, publish.

use opentelemetry::metrics::{Counter, Meter};
use tonic::{Request, Response, Status};
use tracehop_broker::catalog;
use tracehop_broker::event::{CheckoutProcessed, Item};
use tracehop_proto::{CheckoutRequest, CheckoutResponse, CheckoutService};

use crate::error::AppError;
use crate::publisher::Publisher;

/// Most lines one order may have: an order is a message, and a message has a size.
pub const MAX_ITEMS: usize = 100;
/// Longest customer id accepted (it travels as baggage and span attributes).
pub const MAX_CUSTOMER_ID: usize = 128;
/// Longest SKU accepted, the event's bound on an id (stock's): besides, an error quotes the SKU
/// in `grpc-message`, and a trailer past HTTP/2's header-list bound (16 KiB in hyper) fails the
/// whole call.
pub const MAX_SKU: usize = tracehop_broker::event::MAX_ID;

/// `tracehop.orders.accepted`: orders published and confirmed (the gateway answers 202).
pub const ORDERS_ACCEPTED: &str = "tracehop.orders.accepted";

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct CheckoutApi {
    publisher: Publisher,
    accepted: Counter<u64>,
}

impl CheckoutApi {
    /// A service that publishes through `publisher` and counts accepted orders on `meter`.
    pub fn new(publisher: Publisher, meter: &Meter) -> Self {
        let accepted = meter
            .u64_counter(ORDERS_ACCEPTED)
            .with_unit("{order}")
            .with_description("Orders published and confirmed by the broker.")
            .build();
        Self { publisher, accepted }
    }
}

#[tonic::async_trait]
impl CheckoutService for CheckoutApi {
    async fn checkout(&self, request: Request<CheckoutRequest>) -> Result<Response<CheckoutResponse>, Status> {
        let order = price(request.into_inner())?;
        self.publisher.publish(&order).await.map_err(AppError::from)?;
        self.accepted.add(1, &[]);
        tracing::debug!(order_id = %order.order_id, total_cents = order.total_cents, "order published");
        Ok(Response::new(CheckoutResponse { order_id: order.order_id, total_cents: order.total_cents }))
    }
}

/// Validates an order against the catalog and prices it under a new order id: a UUIDv7, whose
/// text sorts by the millisecond it was made, so the stores' order-id index grows at its end
/// (stock's SQLite commits a group of reservations into one or two index pages, where random
/// v4 ids dirtied a page per order, each written to the WAL and copied back by the checkpoint).
pub fn price(request: CheckoutRequest) -> Result<CheckoutProcessed, AppError> {
    let customer_id = request.customer_id.trim().to_owned();
    if customer_id.is_empty() {
        return Err(AppError::InvalidOrder("customer_id must not be empty".into()));
    }
    if customer_id.len() > MAX_CUSTOMER_ID {
        return Err(AppError::InvalidOrder(format!("customer_id is longer than {MAX_CUSTOMER_ID} bytes")));
    }
    if request.items.is_empty() {
        return Err(AppError::InvalidOrder("an order needs at least one item".into()));
    }
    if request.items.len() > MAX_ITEMS {
        return Err(AppError::InvalidOrder(format!("an order has at most {MAX_ITEMS} items")));
    }
    if request.items.iter().any(|item| item.sku.len() > MAX_SKU) {
        return Err(AppError::InvalidOrder(format!("a sku is longer than {MAX_SKU} bytes")));
    }
    let mut total_cents: i64 = 0;
    let mut items = Vec::with_capacity(request.items.len());
    for item in request.items {
        if item.quantity == 0 {
            return Err(AppError::InvalidOrder(format!("quantity of {} must be at least 1", item.sku)));
        }
        let product = catalog::product(&item.sku).ok_or_else(|| AppError::UnknownSku(item.sku.clone()))?;
        total_cents += product.price_cents * i64::from(item.quantity);
        items.push(Item { sku: item.sku, quantity: item.quantity });
    }
    Ok(CheckoutProcessed { order_id: uuid::Uuid::now_v7().to_string(), customer_id, items, total_cents })
}

#[cfg(test)]
mod tests {
    use tracehop_proto::LineItem;

    use super::*;

    fn request(items: &[(&str, u32)]) -> CheckoutRequest {
        CheckoutRequest {
            customer_id: "c-42".into(),
            items: items.iter().map(|(sku, quantity)| LineItem { sku: sku.to_string(), quantity: *quantity }).collect(),
        }
    }

    #[test]
    fn prices_the_demo_order() {
        let order = price(request(&[("SKU-001", 2)])).expect("valid");
        assert_eq!(order.total_cents, 4900);
        assert_eq!(order.customer_id, "c-42");
        assert_eq!(order.order_id.len(), 36);
    }

    #[test]
    fn order_ids_are_uuid_v7_in_the_order_they_were_made() {
        let ids: Vec<String> = (0..200)
            .map(|_| {
                // Across at least one millisecond tick, not only within one.
                std::thread::sleep(std::time::Duration::from_micros(50));
                price(request(&[("SKU-001", 1)])).expect("valid").order_id
            })
            .collect();
        for id in &ids {
            let parsed = uuid::Uuid::parse_str(id).expect("a UUID");
            assert_eq!(parsed.get_version_num(), 7, "{id}");
        }
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(sorted, ids, "ids sort as they were made");
    }

    #[test]
    fn rejects_what_the_contract_rejects() {
        assert!(matches!(price(request(&[])), Err(AppError::InvalidOrder(_))));
        assert!(matches!(price(request(&[("SKU-001", 0)])), Err(AppError::InvalidOrder(_))));
        assert!(matches!(price(request(&[("SKU-404", 1)])), Err(AppError::UnknownSku(sku)) if sku == "SKU-404"));
        let nobody = CheckoutRequest { customer_id: " ".into(), ..request(&[("SKU-001", 1)]) };
        assert!(matches!(price(nobody), Err(AppError::InvalidOrder(_))));
        let many = vec![("SKU-001", 1); MAX_ITEMS + 1];
        assert!(matches!(price(request(&many)), Err(AppError::InvalidOrder(_))));
        let long = "S".repeat(MAX_SKU + 1);
        assert!(
            matches!(price(request(&[(&long, 1)])), Err(AppError::InvalidOrder(message)) if message == "a sku is longer than 255 bytes")
        );
        let longest = "S".repeat(MAX_SKU);
        assert!(matches!(price(request(&[(&longest, 1)])), Err(AppError::UnknownSku(_))), "the bound is inclusive");
    }
}
