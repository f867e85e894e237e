//! `POST /api/checkout`: validate, call checkout over gRPC inside the request's trace, and
//! return the trace to the caller.

use std::future::Future;
use std::time::Duration;

use axum::Json;
use axum::extract::{FromRequest, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use opentelemetry::Context;
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::TraceContextExt;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tracehop_proto::{CheckoutRequest, LineItem};
use tracehop_telemetry::propagation::{TraceIdHex, trace_id_hex};
use tracehop_telemetry::spans::{set_baggage_attributes, with_baggage_entry};

use crate::AppState;
use crate::error::AppError;
use crate::link::{Links, UNREACHABLE_WITHIN};

/// Most lines one order may have.
pub const MAX_ITEMS: usize = 100;
/// Longest customer id accepted: it travels as baggage to every hop.
pub const MAX_CUSTOMER_ID: usize = 128;
/// Longest SKU accepted: checkout's and stock's bound (`tracehop_broker::event::MAX_ID`, a crate
/// the gateway does not depend on), said here before a call; an error quotes the SKU, and
/// checkout's answer carries it in `grpc-message`, whose trailer HTTP/2 bounds (16 KiB in hyper).
pub const MAX_SKU: usize = 255;

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
    if body.items.iter().any(|item| item.sku.len() > MAX_SKU) {
        return Err(AppError::Invalid(format!("a sku is longer than {MAX_SKU} bytes")));
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
    set_baggage_attributes(&cx, &state.baggage_span_attributes);
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
    let trace_id = span_context.is_valid().then(|| trace_id_hex(span_context.trace_id()));
    let body = accepted(&response.order_id, response.total_cents, trace_id.as_ref(), &state.trace_url_json);
    Ok((StatusCode::ACCEPTED, [(CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response())
}

/// The 202's body, `{"order_id":..,"total_cents":..,"trace_id":..,"trace_url":..}`, the trace's
/// fields `null` when the request has no trace (telemetry off). Written into one buffer: the
/// trace id's hex digits and the UI's address (escaped once, at startup: `trace_url_json`, see
/// [`json_string_inside`]) need no escaping, where serializing them checked each of their
/// bytes and made, then freed, two `String`s per order. The order id comes from checkout, and
/// is escaped as any string.
fn accepted(order_id: &str, total_cents: i64, trace_id: Option<&TraceIdHex>, trace_url_json: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(128 + order_id.len() + trace_url_json.len());
    body.extend_from_slice(b"{\"order_id\":");
    serde_json::to_writer(&mut body, order_id).expect("a string serializes");
    body.extend_from_slice(b",\"total_cents\":");
    serde_json::to_writer(&mut body, &total_cents).expect("an integer serializes");
    match trace_id {
        Some(trace_id) => {
            let hex = trace_id.as_bytes();
            body.extend_from_slice(b",\"trace_id\":\"");
            body.extend_from_slice(hex);
            body.extend_from_slice(b"\",\"trace_url\":\"");
            body.extend_from_slice(trace_url_json.as_bytes());
            body.extend_from_slice(hex);
            body.extend_from_slice(b"\"}");
        }
        None => body.extend_from_slice(b",\"trace_id\":null,\"trace_url\":null}"),
    }
    body
}

/// `text` as it reads between the quotes of a JSON string.
pub(crate) fn json_string_inside(text: &str) -> String {
    let quoted = serde_json::to_string(text).expect("a string serializes");
    quoted[1..quoted.len() - 1].to_owned()
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

/// A path the gateway has, with a method it does not take (axum adds `Allow`).
pub async fn method_not_allowed() -> (StatusCode, Json<serde_json::Value>) {
    (StatusCode::METHOD_NOT_ALLOWED, Json(json!({ "error": "method not allowed" })))
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TraceId;
    use serde_json::{Value, json};
    use tracehop_telemetry::propagation::trace_id_hex;

    use super::{accepted, json_string_inside};

    fn parsed(body: &[u8]) -> Value {
        serde_json::from_slice(body).expect("the body is JSON")
    }

    #[test]
    fn the_accepted_body_names_its_trace_or_says_null() {
        let trace_id = trace_id_hex(TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("trace id"));
        let prefix = json_string_inside("http://localhost:16686/trace/");
        let traced = accepted("0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", 4900, Some(&trace_id), &prefix);
        assert_eq!(
            parsed(&traced),
            json!({
                "order_id": "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
                "total_cents": 4900,
                "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
                "trace_url": "http://localhost:16686/trace/4bf92f3577b34da6a3ce929d0e0e4736",
            })
        );
        assert_eq!(
            parsed(&accepted("o-1", -5, None, &prefix)),
            json!({ "order_id": "o-1", "total_cents": -5, "trace_id": null, "trace_url": null })
        );
    }

    #[test]
    fn what_the_accepted_body_carries_is_escaped() {
        // An order id and a UI address with what JSON must escape: quotes, a backslash, a
        // control character; and text beyond ASCII.
        let trace_id = trace_id_hex(TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").expect("trace id"));
        let order_id = "o-\"1\"\\\n\u{1}é";
        let ui = "http://jaeger.example/\"ui\"\\x\té/trace/";
        let body = accepted(order_id, 1, Some(&trace_id), &json_string_inside(ui));
        let value = parsed(&body);
        assert_eq!(value["order_id"], order_id);
        assert_eq!(value["trace_url"], [ui, "0af7651916cd43dd8448eb211c80319c"].concat());
        assert_eq!(value["trace_id"], "0af7651916cd43dd8448eb211c80319c");
    }
}
