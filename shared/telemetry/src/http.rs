//! A tower layer for HTTP SERVER spans in axum, with the inbound trust policy of a public edge
//! and the trace id handed back to the caller.
//!
//! It also records `http.server.request.duration` (see [`crate::metrics`]).
//!
//! Add it with `Router::route_layer`, so it runs after routing and names the span after the
//! route template (`POST /api/checkout`), never the raw path: a path with ids in it would give
//! every request a span name of its own. Routes added outside it (health checks) stay untraced.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, ready};
use std::time::Instant;

use axum::extract::MatchedPath;
use http::header::{HOST, USER_AGENT};
use http::{HeaderName, HeaderValue, Request, Response};
use opentelemetry::context::{FutureExt as _, WithContext};
use opentelemetry::trace::{SpanBuilder, SpanContext, SpanKind, TraceContextExt};
use opentelemetry::{Context, KeyValue, StringValue};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_semantic_conventions::attribute::{
    ERROR_TYPE, HTTP_REQUEST_METHOD, HTTP_REQUEST_METHOD_ORIGINAL, HTTP_RESPONSE_STATUS_CODE, HTTP_ROUTE,
    NETWORK_PROTOCOL_VERSION, SERVER_ADDRESS, SERVER_PORT, URL_PATH, URL_SCHEME, USER_AGENT_ORIGINAL,
};
use pin_project_lite::pin_project;
use prost::bytes::Bytes;
use tower::{Layer, Service};

use crate::Telemetry;
use crate::metrics::{AttributeSet, Durations};
use crate::propagation::traceparent_bytes;
use crate::spans::{SpanNames, links_to, record_error};

/// What the edge does with a caller's trace context (`GATEWAY_INBOUND_CONTEXT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InboundContext {
    /// The SERVER span is a child of the caller's span, as a browser or another traced service
    /// expects; inbound baggage is kept.
    #[default]
    Continue,
    /// A new trace with a link to the caller's span: callers cannot join or steer our traces,
    /// and the relation is still navigable. Inbound baggage is dropped.
    Link,
    /// A new trace, no link, no inbound baggage.
    Ignore,
}

/// The `server-timing` response header (W3C Trace Context Level 3 draft).
pub const SERVER_TIMING: &str = "server-timing";
/// The `traceresponse` response header (the earlier draft HotROD uses).
pub const TRACERESPONSE: &str = "traceresponse";

static SERVER_TIMING_NAME: HeaderName = HeaderName::from_static(SERVER_TIMING);
static TRACERESPONSE_NAME: HeaderName = HeaderName::from_static(TRACERESPONSE);
/// What `server-timing`'s value starts with; the `traceparent` follows.
const TIMING_PREFIX: &[u8] = b"trace;desc=";

/// `http.request.method` of a method the HTTP spec does not define.
const OTHER_METHOD: &str = "_OTHER";

/// Traces requests as SERVER spans.
#[derive(Debug, Clone)]
pub struct HttpServerLayer {
    telemetry: Telemetry,
    inbound: InboundContext,
    trace_response_headers: bool,
    details: bool,
    /// Shared by every clone (axum clones the layer's service per connection).
    names: Arc<SpanNames>,
}

impl HttpServerLayer {
    /// Continues inbound context and adds no response headers.
    pub fn new(telemetry: Telemetry) -> Self {
        Self {
            telemetry,
            inbound: InboundContext::Continue,
            trace_response_headers: false,
            details: false,
            names: Arc::default(),
        }
    }

    /// Also records the recommended attributes: `server.address` / `server.port` (from `Host`),
    /// `user_agent.original`, `network.protocol.version`.
    pub fn with_details(mut self, enabled: bool) -> Self {
        self.details = enabled;
        self
    }

    /// Sets the inbound trust policy.
    pub fn inbound(mut self, inbound: InboundContext) -> Self {
        self.inbound = inbound;
        self
    }

    /// Returns the trace in `server-timing` and `traceresponse` headers, so a caller (a browser
    /// that did not start the trace, say) can find it.
    pub fn trace_response_headers(mut self, enabled: bool) -> Self {
        self.trace_response_headers = enabled;
        self
    }

    /// The SERVER span's parent, and the caller's span to link to (`link` mode; otherwise none).
    fn parent(&self, extracted: Context) -> (Context, SpanContext) {
        match self.inbound {
            InboundContext::Continue => (extracted, SpanContext::NONE),
            InboundContext::Link => (Context::new(), extracted.span().span_context().clone()),
            InboundContext::Ignore => (Context::new(), SpanContext::NONE),
        }
    }
}

impl<S> Layer<S> for HttpServerLayer {
    type Service = HttpServerService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpServerService { inner, layer: self.clone() }
    }
}

/// The service [`HttpServerLayer`] produces.
#[derive(Debug, Clone)]
pub struct HttpServerService<S> {
    inner: S,
    layer: HttpServerLayer,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for HttpServerService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = HttpResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let telemetry = &self.layer.telemetry;
        let extracted = telemetry.extract_incoming(&HeaderExtractor(request.headers()));
        let (parent, linked) = self.layer.parent(extracted);
        let method = known_method(request.method());
        let name_method = if method == OTHER_METHOD { "HTTP" } else { method };
        let (name, route) = match request.extensions().get::<MatchedPath>() {
            Some(route) => {
                let (name, route) = self.layer.names.get(name_method, route.as_str());
                (name, Some(route))
            }
            None => (Cow::Borrowed(name_method), None),
        };
        // The duration histogram's attributes: the conventions' low-cardinality subset. Timed
        // from before the span starts, as the gRPC layers time their calls.
        let duration = telemetry.instruments().map(|instruments| {
            let request =
                HttpRequestParts { method, version: protocol_version(request.version()), route: route.clone() };
            (instruments.http_server_duration.clone(), request, Instant::now())
        });
        let span = telemetry.tracer().start_lazily(&parent, || {
            let path = request.uri().path();
            // The conventions' required attributes and the route; the recommended ones
            // (server.address, user_agent.original, ...) cost a copy per request and tell little
            // here: opt in with `with_details`.
            let mut attributes = Vec::with_capacity(8);
            attributes.extend([
                KeyValue::new(HTTP_REQUEST_METHOD, method),
                // A route without parameters is its path: shared, not copied.
                match &route {
                    Some(route) if **route == *path => KeyValue::new(URL_PATH, StringValue::from(route.clone())),
                    _ => KeyValue::new(URL_PATH, path.to_owned()),
                },
                KeyValue::new(URL_SCHEME, "http"),
            ]);
            if method == OTHER_METHOD {
                attributes.push(KeyValue::new(HTTP_REQUEST_METHOD_ORIGINAL, request.method().as_str().to_owned()));
            }
            if let Some(route) = &route {
                attributes.push(KeyValue::new(HTTP_ROUTE, StringValue::from(route.clone())));
            }
            if self.layer.details {
                attributes.push(KeyValue::new(NETWORK_PROTOCOL_VERSION, protocol_version(request.version())));
                if let Some(host) = request.headers().get(HOST).and_then(|h| h.to_str().ok()) {
                    let (address, port) = split_host(host);
                    attributes.push(KeyValue::new(SERVER_ADDRESS, address.to_owned()));
                    if let Some(port) = port {
                        attributes.push(KeyValue::new(SERVER_PORT, i64::from(port)));
                    }
                }
                if let Some(agent) = request.headers().get(USER_AGENT).and_then(|h| h.to_str().ok()) {
                    attributes.push(KeyValue::new(USER_AGENT_ORIGINAL, agent.to_owned()));
                }
            }
            let links = links_to(&linked);
            SpanBuilder::from_name(name).with_kind(SpanKind::Server).with_attributes(attributes).with_links(links)
        });
        let cx = parent.with_span(span);
        let future = {
            let _attached = cx.clone().attach();
            self.inner.call(request)
        }
        .with_context(cx.clone());
        HttpResponseFuture {
            inner: future,
            cx: Some(cx),
            trace_response_headers: self.layer.trace_response_headers,
            duration,
        }
    }
}

/// The request's part of a duration measurement's attributes: the conventions'
/// low-cardinality subset.
#[derive(Debug)]
struct HttpRequestParts {
    /// `http.request.method`, `_OTHER` for methods not in the HTTP spec.
    method: &'static str,
    /// `network.protocol.version`.
    version: &'static str,
    /// `http.route`, shared with the span's attribute.
    route: Option<Arc<str>>,
}

/// The attributes of a request-duration measurement, by their parts (`url.scheme` is always
/// `http`; `error.type` is the status of a 5xx): found among the bound sets without building
/// them.
pub(crate) struct HttpSet<'a> {
    request: &'a HttpRequestParts,
    status: http::StatusCode,
}

/// What a bound [`HttpSet`] keeps.
#[derive(Debug)]
pub(crate) struct HttpKey {
    method: &'static str,
    version: &'static str,
    route: Option<Arc<str>>,
    status: http::StatusCode,
}

impl AttributeSet for HttpSet<'_> {
    type Key = HttpKey;

    fn matches(&self, key: &HttpKey) -> bool {
        key.status == self.status
            && key.method == self.request.method
            && key.version == self.request.version
            && key.route.as_deref() == self.request.route.as_deref()
    }

    fn key(&self) -> HttpKey {
        HttpKey {
            method: self.request.method,
            version: self.request.version,
            route: self.request.route.clone(),
            status: self.status,
        }
    }

    fn attributes(&self) -> Vec<KeyValue> {
        let mut attributes = Vec::with_capacity(6);
        attributes.extend([
            KeyValue::new(HTTP_REQUEST_METHOD, self.request.method),
            KeyValue::new(URL_SCHEME, "http"),
            KeyValue::new(NETWORK_PROTOCOL_VERSION, self.request.version),
        ]);
        if let Some(route) = &self.request.route {
            attributes.push(KeyValue::new(HTTP_ROUTE, StringValue::from(route.clone())));
        }
        attributes.push(KeyValue::new(HTTP_RESPONSE_STATUS_CODE, i64::from(self.status.as_u16())));
        if self.status.is_server_error() {
            attributes.push(KeyValue::new(ERROR_TYPE, self.status.as_str().to_owned()));
        }
        attributes
    }
}

/// The method as `http.request.method` spells it on spans and metrics: the conventions' known
/// ones (RFC 9110's, PATCH and QUERY), else `_OTHER` (a client inventing methods must not invent
/// span names or time series).
fn known_method(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::PATCH => "PATCH",
        http::Method::CONNECT => "CONNECT",
        http::Method::TRACE => "TRACE",
        ref other if other.as_str() == "QUERY" => "QUERY",
        _ => OTHER_METHOD,
    }
}

fn protocol_version(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "0.9",
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

fn split_host(host: &str) -> (&str, Option<u16>) {
    match host.rsplit_once(':') {
        Some((address, port)) if !address.ends_with(']') || host.starts_with('[') => match port.parse() {
            Ok(port) => (address.trim_start_matches('[').trim_end_matches(']'), Some(port)),
            Err(_) => (host, None),
        },
        _ => (host, None),
    }
}

pin_project! {
    /// The response future of [`HttpServerService`].
    pub struct HttpResponseFuture<F> {
        #[pin]
        inner: WithContext<F>,
        cx: Option<Context>,
        trace_response_headers: bool,
        // The histogram, the request's part of its attributes and the start: `None` when
        // metrics are off.
        duration: Option<(Durations<HttpKey>, HttpRequestParts, Instant)>,
    }

    impl<F> PinnedDrop for HttpResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            // The client went away before the response: the span still ends.
            if let Some(cx) = this.project().cx.take() {
                cx.span().end();
            }
        }
    }
}

impl<F, ResBody, E> Future for HttpResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, task: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut result = ready!(this.inner.poll(task));
        if let Some(cx) = this.cx.take() {
            let span = cx.span();
            if let Ok(response) = &mut result {
                let status = response.status();
                span.set_attribute(KeyValue::new(HTTP_RESPONSE_STATUS_CODE, i64::from(status.as_u16())));
                // Conventions: a SERVER span fails on 5xx only; 4xx is the caller's doing.
                if status.is_server_error() {
                    record_error(&span, status.as_str(), status.canonical_reason().unwrap_or("server error"));
                }
                if let Some((histogram, request, started)) = this.duration.take() {
                    histogram.record(started.elapsed().as_secs_f64(), &HttpSet { request: &request, status });
                }
                if *this.trace_response_headers && span.span_context().is_valid() {
                    // Values handed over as they were written, names parsed once. Both differ from
                    // response to response, so an HTTP/2 caller gets them never indexed: in its
                    // connection's HPACK table they would only evict headers that repeat.
                    // One buffer for both: `traceresponse` is the tail of `server-timing`.
                    let timing = Bytes::from([TIMING_PREFIX, &traceparent_bytes(span.span_context())].concat());
                    let value = timing.slice(TIMING_PREFIX.len()..);
                    if let Ok(mut timing) = HeaderValue::from_maybe_shared(timing) {
                        timing.set_sensitive(true);
                        response.headers_mut().insert(SERVER_TIMING_NAME.clone(), timing);
                    }
                    if let Ok(mut value) = HeaderValue::from_maybe_shared(value) {
                        value.set_sensitive(true);
                        response.headers_mut().insert(TRACERESPONSE_NAME.clone(), value);
                    }
                }
            }
            span.end();
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(route: Option<&str>) -> HttpRequestParts {
        HttpRequestParts { method: "POST", version: "1.1", route: route.map(Arc::from) }
    }

    #[test]
    fn methods_outside_the_conventions_list_are_other() {
        let method = |name: &str| http::Method::from_bytes(name.as_bytes()).expect("a method");
        assert_eq!(known_method(&http::Method::POST), "POST");
        assert_eq!(known_method(&method("QUERY")), "QUERY");
        assert_eq!(known_method(&method("BREW")), OTHER_METHOD);
        assert_eq!(known_method(&method("post")), OTHER_METHOD, "methods are case-sensitive");
    }

    #[test]
    fn a_request_set_matches_its_own_key_and_no_other_parts() {
        let checkout = request(Some("/api/checkout"));
        let key = HttpSet { request: &checkout, status: http::StatusCode::ACCEPTED }.key();
        let again = request(Some("/api/checkout"));
        assert!(
            HttpSet { request: &again, status: http::StatusCode::ACCEPTED }.matches(&key),
            "an equal route elsewhere"
        );
        let other_route = request(Some("/api/other"));
        let no_route = request(None);
        let get = HttpRequestParts { method: "GET", ..request(Some("/api/checkout")) };
        let http2 = HttpRequestParts { version: "2", ..request(Some("/api/checkout")) };
        let different = [
            HttpSet { request: &checkout, status: http::StatusCode::BAD_REQUEST },
            HttpSet { request: &other_route, status: http::StatusCode::ACCEPTED },
            HttpSet { request: &no_route, status: http::StatusCode::ACCEPTED },
            HttpSet { request: &get, status: http::StatusCode::ACCEPTED },
            HttpSet { request: &http2, status: http::StatusCode::ACCEPTED },
        ];
        for (index, other) in different.iter().enumerate() {
            assert!(!other.matches(&key), "set {index} shares the handle of another set");
        }
    }

    #[test]
    fn a_request_set_binds_the_conventions_attributes() {
        let checkout = request(Some("/api/checkout"));
        let set = HttpSet { request: &checkout, status: http::StatusCode::BAD_GATEWAY };
        assert_eq!(
            set.attributes(),
            vec![
                KeyValue::new(HTTP_REQUEST_METHOD, "POST"),
                KeyValue::new(URL_SCHEME, "http"),
                KeyValue::new(NETWORK_PROTOCOL_VERSION, "1.1"),
                KeyValue::new(HTTP_ROUTE, "/api/checkout"),
                KeyValue::new(HTTP_RESPONSE_STATUS_CODE, 502),
                KeyValue::new(ERROR_TYPE, "502"),
            ]
        );
        let accepted = HttpSet { request: &request(None), status: http::StatusCode::ACCEPTED }.attributes();
        assert_eq!(accepted.len(), 4, "no route, no error.type below 500: {accepted:?}");
    }

    #[test]
    fn host_headers_split_into_address_and_port() {
        assert_eq!(split_host("localhost:8080"), ("localhost", Some(8080)));
        assert_eq!(split_host("example.com"), ("example.com", None));
        assert_eq!(split_host("[::1]:8080"), ("::1", Some(8080)));
        assert_eq!(split_host("[::1]"), ("[::1]", None));
    }
}
