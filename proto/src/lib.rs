//! The `checkout.v1` gRPC contract shared by the gateway (client) and checkout (server).

/// `package checkout.v1` from `checkout/v1/checkout.proto`.
#[allow(missing_docs, clippy::all)]
pub mod checkout_v1 {
    tonic::include_proto!("checkout.v1");
}

pub use checkout_v1::checkout_service_client::CheckoutServiceClient;
pub use checkout_v1::checkout_service_server::{CheckoutService, CheckoutServiceServer};
pub use checkout_v1::{CheckoutRequest, CheckoutResponse, LineItem};

/// The fully-qualified gRPC service name, as grpc.health.v1 and span names spell it.
pub const CHECKOUT_SERVICE: &str = "checkout.v1.CheckoutService";
