//! The demo catalog: what checkout prices and stock seeds (README, "API").

/// One product of the demo catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Product {
    /// Stock-keeping unit, as clients send it.
    pub sku: &'static str,
    /// Unit price in cents.
    pub price_cents: i64,
}

/// Every product the demo sells.
pub const CATALOG: [Product; 3] = [
    Product { sku: "SKU-001", price_cents: 2450 },
    Product { sku: "SKU-002", price_cents: 5900 },
    Product { sku: "SKU-003", price_cents: 1200 },
];

/// The product with this SKU, if the catalog has it.
pub fn product(sku: &str) -> Option<&'static Product> {
    CATALOG.iter().find(|product| product.sku == sku)
}

/// Every SKU of the catalog, for seeding a store.
pub fn skus() -> [&'static str; CATALOG.len()] {
    CATALOG.map(|product| product.sku)
}
