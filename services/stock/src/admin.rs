//! The admin HTTP API: stock levels, order outcomes, health.
//!
//! | route | answer |
//! |---|---|
//! | `GET /api/stock/{sku}` | `{"sku","available","reserved"}`, 404 for an unknown SKU |
//! | `GET /api/orders/{order_id}` | `{"order_id","status","recorded_at_us"}`, 404 if not seen |
//! | `GET /healthz` | 200 while the broker connection is up and the consumer registered, else 503 (not traced) |
//!
//! A store error is a 503; another path a 404, another method a 405 (with `Allow`); every
//! answer is JSON (`{"error": ...}` for those).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::watch;
use tracehop_broker::connection::BrokerHealth;
use tracehop_telemetry::Telemetry;
use tracehop_telemetry::http::HttpServerLayer;

use crate::store::{Store, StoreError};

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// Where stock and orders live.
    pub store: Store,
    /// The broker connection's health, for `/healthz`.
    pub broker: watch::Receiver<BrokerHealth>,
    /// Whether the consumer is registered, for `/healthz`.
    pub consuming: watch::Receiver<bool>,
}

/// The admin router; `/api` routes are traced, `/healthz` is not.
pub fn router(state: AdminState, telemetry: Telemetry) -> Router {
    let api = Router::new()
        .route("/api/stock/{sku}", get(stock_level))
        .route("/api/orders/{order_id}", get(order))
        .route_layer(HttpServerLayer::new(telemetry));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Any other path: JSON, as every other answer.
async fn not_found() -> Response {
    AdminError::NotFound("not found").into_response()
}

/// A path the API has, with a method it does not take (axum adds `Allow`).
async fn method_not_allowed() -> Response {
    (StatusCode::METHOD_NOT_ALLOWED, Json(json!({ "error": "method not allowed" }))).into_response()
}

/// An admin API failure: an opaque message for the caller, the cause in the log.
#[derive(Debug, thiserror::Error)]
enum AdminError {
    #[error("not found")]
    NotFound(&'static str),
    #[error("the stock store is unavailable")]
    Store(#[from] StoreError),
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        match self {
            AdminError::NotFound(what) => (StatusCode::NOT_FOUND, Json(json!({ "error": what }))).into_response(),
            AdminError::Store(error) => {
                tracing::error!(error = &error as &dyn std::error::Error, "admin API: store error");
                (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "error": "the stock store is unavailable" })))
                    .into_response()
            }
        }
    }
}

async fn stock_level(State(state): State<AdminState>, Path(sku): Path<String>) -> Result<Response, AdminError> {
    let level = state.store.level(&sku).await?.ok_or(AdminError::NotFound("unknown SKU"))?;
    Ok(Json(json!({ "sku": level.sku, "available": level.available, "reserved": level.reserved })).into_response())
}

async fn order(State(state): State<AdminState>, Path(order_id): Path<String>) -> Result<Response, AdminError> {
    let record = state.store.order(&order_id).await?.ok_or(AdminError::NotFound("unknown order"))?;
    let body = json!({ "order_id": record.order_id, "status": record.status.as_str(), "recorded_at_us": record.recorded_at_us });
    Ok(Json(body).into_response())
}

async fn healthz(State(state): State<AdminState>) -> Response {
    if *state.broker.borrow() != BrokerHealth::Up {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "broker unavailable" }))).into_response()
    } else if !*state.consuming.borrow() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "not consuming yet" }))).into_response()
    } else {
        Json(json!({ "status": "ok" })).into_response()
    }
}
