//! `POST /api/checkout`: validate, call checkout over gRPC inside the request's trace, and
//! return the trace to the caller.

use std::future::Future;
use std::time::Duration;

use axum::Json;
use axum::extract::{FromRequest, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use opentelemetry::Context;
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::TraceContextExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracehop_proto::{CheckoutRequest, LineItem};
use tracehop_telemetry::propagation::trace_id_hex;
use tracehop_telemetry::spans::{baggage_attributes, with_baggage_entry};

use crate::AppState;
use crate::error::AppError;
use crate::link::{Links, UNREACHABLE_WITHIN};

/// Most lines one order may have.
pub const MAX_ITEMS: usize = 100;
/// Longest customer id accepted: it travels as baggage to every hop.
pub const MAX_CUSTOMER_ID: usize = 128;

/// The request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckoutBody {
    /// Who orders.
    pub customer_id: String,
    /// What is ordered.
    pub items: Vec<ItemBody>,
}

/// One line of the request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemBody {
    /// Catalog SKU.
    pub sku: String,
    /// Units, at least 1.
    pub quantity: u32,
}

/// `Json<T>` whose rejections answer `{"error": ...}` with axum's status: 400 malformed JSON,
/// 413 body over the limit, 415 not `application/json`, 422 well-formed but the wrong shape.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = AppError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(AppError::Body { status: rejection.status(), message: rejection.body_text() }),
        }
    }
}

fn validate(body: &CheckoutBody) -> Result<(), AppError> {
    if body.customer_id.trim().is_empty() {
        return Err(AppError::Invalid("customer_id must not be empty".into()));
    }
    if body.customer_id.len() > MAX_CUSTOMER_ID {
        return Err(AppError::Invalid(format!("customer_id is longer than {MAX_CUSTOMER_ID} bytes")));
    }
    if body.items.is_empty() {
        return Err(AppError::Invalid("items must not be empty".into()));
    }
    if body.items.len() > MAX_ITEMS {
        return Err(AppError::Invalid(format!("an order has at most {MAX_ITEMS} items")));
    }
    if let Some(item) = body.items.iter().find(|item| item.quantity == 0) {
        return Err(AppError::Invalid(format!("quantity of {} must be at least 1", item.sku)));
    }
    Ok(())
}

/// Handles `POST /api/checkout`. The state is this request's own copy: its client is moved out,
/// not cloned again.
pub async fn checkout(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CheckoutBody>,
) -> Result<Response, AppError> {
    validate(&body)?;
    // The SERVER span is current (HttpServerLayer). customer.id rides along as baggage, so
    // every hop can tag its spans with it.
    let cx = with_baggage_entry(&Context::current(), "customer.id", body.customer_id.trim());
    cx.span().set_attributes(baggage_attributes(&cx, &state.baggage_span_attributes));
    let mut request = tonic::Request::new(CheckoutRequest {
        customer_id: body.customer_id.trim().to_owned(),
        items: body.items.into_iter().map(|item| LineItem { sku: item.sku, quantity: item.quantity }).collect(),
    });
    // Tell checkout the deadline too, so it stops work nobody waits for.
    request.set_timeout(state.checkout_timeout);
    let mut client = state.client;
    let call = client.checkout(request).with_context(cx.clone());
    let response = answer(call, state.checkout_timeout, &state.checkout_links).await?.into_inner();
    let span = cx.span();
    let span_context = span.span_context();
    let (trace_id, trace_url) = if span_context.is_valid() {
        let trace_id = trace_id_hex(span_context.trace_id());
        let url = [&*state.jaeger_ui_url, "/trace/", &trace_id].concat();
        (Some(trace_id), Some(url))
    } else {
        (None, None)
    };
    let body = Accepted {
        order_id: &response.order_id,
        total_cents: response.total_cents,
        trace_id: trace_id.as_deref(),
        trace_url: trace_url.as_deref(),
    };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// The 202's body. Serialized from borrowed fields: a `json!` value built a map, a `String` per
/// key and a copy of every value, then freed them, on every order.
#[derive(Debug, Serialize)]
struct Accepted<'a> {
    order_id: &'a str,
    total_cents: i64,
    /// `null` when the request has no trace (telemetry off).
    trace_id: Option<&'a str>,
    trace_url: Option<&'a str>,
}

/// Waits for checkout's answer: at most `timeout` (504 after it), and while no connection to
/// checkout is open at most [`UNREACHABLE_WITHIN`] (503: unreachable, not slow). A call that
/// failed without a connection is 503 too: tonic reports a connect that timed out as UNKNOWN.
async fn answer<T>(
    call: impl Future<Output = Result<T, tonic::Status>>,
    timeout: Duration,
    links: &Links,
) -> Result<T, AppError> {
    let failed = |status: tonic::Status| {
        let transport = matches!(status.code(), tonic::Code::Unknown | tonic::Code::Unavailable);
        if transport && !links.connected() { AppError::Unreachable(Some(status)) } else { AppError::Checkout(status) }
    };
    tokio::pin!(call);
    let mut left = timeout;
    if !links.connected() && timeout > UNREACHABLE_WITHIN {
        match tokio::time::timeout(UNREACHABLE_WITHIN, &mut call).await {
            Ok(answer) => return answer.map_err(failed),
            Err(_) if !links.connected() => return Err(AppError::Unreachable(None)),
            // Connected meanwhile: checkout is slow, not unreachable; the full timeout holds.
            Err(_) => left -= UNREACHABLE_WITHIN,
        }
    }
    tokio::time::timeout(left, call).await.map_err(|_| AppError::Timeout)?.map_err(failed)
}

/// Handles `GET /healthz` (not traced): the process is up and serving.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Any other path.
pub async fn not_found() -> (StatusCode, Json<serde_json::Value>) {
    (StatusCode::NOT_FOUND, Json(json!({ "error": "not found" })))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::Accepted;

    #[test]
    fn the_accepted_body_names_its_trace_or_says_null() {
        let traced = Accepted {
            order_id: "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
            total_cents: 4900,
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            trace_url: Some("http://localhost:16686/trace/4bf92f3577b34da6a3ce929d0e0e4736"),
        };
        assert_eq!(
            serde_json::to_value(&traced).expect("serializes"),
            json!({
                "order_id": "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
                "total_cents": 4900,
                "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
                "trace_url": "http://localhost:16686/trace/4bf92f3577b34da6a3ce929d0e0e4736",
            })
        );
        let untraced = Accepted { order_id: "o-1", total_cents: 0, trace_id: None, trace_url: None };
        assert_eq!(
            serde_json::to_value(&untraced).expect("serializes"),
            json!({ "order_id": "o-1", "total_cents": 0, "trace_id": null, "trace_url": null })
        );
    }
}
