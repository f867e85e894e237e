//! gateway: the HTTP edge of tracehop. `POST /api/checkout` starts or continues a trace, calls
//! checkout over gRPC inside it, and returns the trace id to the caller.
//!
//! # Layout
//! - [`config`]: `Config::from_env()`, every variable the service reads.
//! - [`api`]: the checkout handler, the JSON extractor, health.
//! - [`error`]: `AppError` and its mapping to HTTP statuses.
//! - [`link`]: the connections to checkout, counted, to tell unreachable from slow.
//! - [`page`]: the demo page at `/`, which starts the trace in the browser.
//!
//! [`run`] serves until `shutdown` completes and drains in-flight requests; `main` flushes
//! telemetry after it returns.

pub mod api;
pub mod config;
pub mod error;
pub mod link;
pub mod page;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use http::header::{CONTENT_TYPE, HeaderName};
use http::{HeaderValue, Method};
use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint};
use tower::ServiceBuilder;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tracehop_proto::CheckoutServiceClient;
use tracehop_telemetry::grpc::{GrpcClientLayer, GrpcClientService};
use tracehop_telemetry::http::{HttpServerLayer, SERVER_TIMING, TRACERESPONSE};
use tracehop_telemetry::shutdown::{serve_draining, serve_http};
use tracehop_telemetry::{ConfigError, Telemetry};

pub use config::Config;
use link::Links;

/// How long connecting to checkout may take: an unreachable checkout answers 503 well within 1 s
/// (and a request waiting behind others' connects, at [`link::UNREACHABLE_WITHIN`]).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How often the channel pings checkout, and how long it waits for the answer before it drops
/// the connection.
const KEEPALIVE: Duration = Duration::from_secs(5);

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The traced gRPC client (one HTTP/2 connection, multiplexed).
    pub client: CheckoutServiceClient<GrpcClientService<Channel>>,
    /// `CHECKOUT_TIMEOUT_MS`.
    pub checkout_timeout: Duration,
    /// `JAEGER_UI_URL`, without a trailing slash.
    pub jaeger_ui_url: Arc<str>,
    /// `JAEGER_UI_URL` and `/trace/`, escaped once as the inside of a JSON string: what the
    /// 202's `trace_url` starts with.
    pub trace_url_json: Arc<str>,
    /// `BAGGAGE_SPAN_ATTRIBUTES`.
    pub baggage_span_attributes: Arc<[String]>,
    /// The channel's connections to checkout open now.
    pub checkout_links: Links,
}

impl AppState {
    /// Builds the state; the gRPC channel connects lazily, on the first request.
    pub fn new(config: &Config, telemetry: Telemetry) -> Self {
        let checkout_links = Links::default();
        // Keepalive pings, idle or not: a connection whose peer vanished without a word (no FIN,
        // no RST) is dropped within seconds, not after TCP's retransmissions (minutes).
        let channel = Endpoint::from(config.checkout_url.clone())
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE)
            .keep_alive_while_idle(true)
            .connect_with_connector_lazy(checkout_links.connector());
        let host = config.checkout_url.host().unwrap_or_default().to_owned();
        let port = config.checkout_url.port_u16().unwrap_or(80);
        let traced = ServiceBuilder::new().layer(GrpcClientLayer::new(telemetry, host, port)).service(channel);
        Self {
            client: CheckoutServiceClient::new(traced),
            checkout_timeout: config.checkout_timeout,
            jaeger_ui_url: config.jaeger_ui_url.as_str().into(),
            trace_url_json: api::json_string_inside(&[config.jaeger_ui_url.as_str(), "/trace/"].concat()).into(),
            baggage_span_attributes: config.baggage_span_attributes.as_slice().into(),
            checkout_links,
        }
    }
}

/// The gateway's routes. `/api` is traced (and returns the trace in `server-timing` and
/// `traceresponse`); `/healthz` and the demo page at `/` are not.
pub fn router(config: &Config, state: AppState, telemetry: Telemetry) -> Result<Router, ConfigError> {
    let traced = HttpServerLayer::new(telemetry).inbound(config.inbound_context).trace_response_headers(true);
    let api = Router::new()
        .route("/api/checkout", post(api::checkout))
        .route_layer(traced)
        .layer(DefaultBodyLimit::max(config.body_limit));
    Ok(Router::new()
        .route("/healthz", get(api::healthz))
        .route("/", get(page::index))
        .merge(api)
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .with_state(state)
        .layer(cors(&config.cors_origins)?))
}

/// CORS for browser callers on other origins: they may send trace context and read it back.
pub(crate) fn cors(origins: &[String]) -> Result<CorsLayer, ConfigError> {
    let allow_origin = if origins.iter().any(|origin| origin == "*") {
        AllowOrigin::any()
    } else {
        let parsed = origins
            .iter()
            .map(|origin| {
                HeaderValue::from_str(origin)
                    .map_err(|_| ConfigError::new("GATEWAY_CORS_ORIGINS", format!("{origin:?} is not a valid origin")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        AllowOrigin::list(parsed)
    };
    Ok(CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([
            CONTENT_TYPE,
            HeaderName::from_static("traceparent"),
            HeaderName::from_static("tracestate"),
            HeaderName::from_static("baggage"),
        ])
        .expose_headers([HeaderName::from_static(SERVER_TIMING), HeaderName::from_static(TRACERESPONSE)]))
}

/// Serves the gateway on `listener` until `shutdown` completes, then drains in-flight requests
/// for at most `SHUTDOWN_DRAIN_SECS`: a client that never finishes sending its request (hyper
/// reads it without a deadline) must not keep the process from flushing its telemetry and
/// exiting. Past the deadline `run` returns; the connections still open end with the process.
pub async fn run(
    listener: TcpListener,
    config: Config,
    telemetry: Telemetry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let state = AppState::new(&config, telemetry.clone());
    let app = router(&config, state, telemetry)?;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, checkout = %config.checkout_url, "gateway listening");
    }
    serve_draining(shutdown, config.drain_timeout, |shutdown| {
        serve_http(listener, app, config.header_timeout, shutdown)
    })
    .await;
    Ok(())
}

/// Why the gateway stopped other than by a shutdown signal.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A setting could not be applied.
    #[error(transparent)]
    Config(#[from] ConfigError),
}
