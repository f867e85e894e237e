//! Checkout's errors, mapped once to gRPC statuses: an opaque message for the caller, the full
//! cause chain in the log.

use tonic::{Code, Status};

use crate::publisher::PublishError;

/// Why a checkout failed.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The order has no items, a zero quantity, or no customer.
    #[error("{0}")]
    InvalidOrder(String),
    /// An item names a SKU the catalog does not have.
    #[error("unknown SKU {0:?}")]
    UnknownSku(String),
    /// The broker did not durably accept the event.
    #[error("cannot publish the order")]
    Publish(#[from] PublishError),
}

impl From<AppError> for Status {
    fn from(error: AppError) -> Self {
        match &error {
            AppError::InvalidOrder(message) => Status::new(Code::InvalidArgument, message.clone()),
            AppError::UnknownSku(_) => Status::new(Code::NotFound, error.to_string()),
            AppError::Publish(cause) => {
                tracing::warn!(error = cause as &dyn std::error::Error, "checkout failed: the order was not published");
                Status::new(Code::Unavailable, "the order could not be queued; retry later")
            }
        }
    }
}
