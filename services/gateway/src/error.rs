//! The gateway's errors, mapped once to HTTP responses `{"error": "..."}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tonic::Code;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The body could not be read as the expected JSON (status chosen by axum: 400 malformed,
    /// 413 too large, 415 wrong content type, 422 wrong shape).
    #[error("{message}")]
    Body {
        /// The HTTP status.
        status: StatusCode,
        /// What was wrong.
        message: String,
    },
    /// Well-formed but unacceptable (no items, zero quantity, unknown SKU).
    #[error("{0}")]
    Invalid(String),
    /// Checkout answered with an error status.
    #[error("checkout call failed: {}", .0.message())]
    Checkout(tonic::Status),
    /// Checkout did not answer within `CHECKOUT_TIMEOUT_MS`.
    #[error("checkout did not answer in time")]
    Timeout,
    /// No connection to checkout could be opened in time: the call's failure, if it failed
    /// rather than ran out of time (a refused connect, a name that does not resolve).
    #[error("checkout is unreachable; retry later")]
    Unreachable(Option<tonic::Status>),
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, message) = match &self {
            AppError::Body { status, message } => (*status, message.clone()),
            AppError::Invalid(message) => (StatusCode::UNPROCESSABLE_ENTITY, message.clone()),
            AppError::Checkout(status) => match status.code() {
                // The caller's mistakes, as checkout judged them.
                Code::NotFound | Code::InvalidArgument => {
                    (StatusCode::UNPROCESSABLE_ENTITY, status.message().to_owned())
                }
                Code::Unavailable => {
                    tracing::warn!(code = ?status.code(), message = status.message(), "checkout unavailable");
                    (StatusCode::SERVICE_UNAVAILABLE, "checkout is unavailable; retry later".to_owned())
                }
                Code::DeadlineExceeded | Code::Cancelled => {
                    (StatusCode::GATEWAY_TIMEOUT, "checkout did not answer in time".to_owned())
                }
                _ => {
                    tracing::error!(code = ?status.code(), message = status.message(), "checkout failed");
                    (StatusCode::BAD_GATEWAY, "checkout failed".to_owned())
                }
            },
            AppError::Timeout => (StatusCode::GATEWAY_TIMEOUT, self.to_string()),
            AppError::Unreachable(cause) => {
                match cause {
                    Some(status) => tracing::warn!(
                        code = ?status.code(),
                        message = status.message(),
                        source = ?std::error::Error::source(status),
                        "checkout unreachable"
                    ),
                    None => tracing::warn!("checkout unreachable: no connection to it opened in time"),
                }
                (StatusCode::SERVICE_UNAVAILABLE, self.to_string())
            }
        };
        (status, Json(json!({ "error": message }))).into_response()
    }
}
