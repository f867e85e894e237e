//! A tower layer for HTTP SERVER spans in axum, with the inbound trust policy of a public edge
//! and the trace id handed back to the caller.
//!
//! It also records `http.server.request.duration` (see [`crate::metrics`]).
//!
//! Add it with `Router::route_layer`, so it runs after routing and names the span after the
//! route template (`POST /api/checkout`), never the raw path: a path with ids in it would give
//! every request a span name of its own. Routes added outside it (health checks) stay untraced.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, ready};
use std::time::Instant;

use axum::extract::MatchedPath;
use http::header::{HOST, USER_AGENT};
use http::{HeaderValue, Request, Response};
use opentelemetry::context::{FutureExt as _, WithContext};
use opentelemetry::trace::{Link, SpanKind, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_semantic_conventions::attribute::{
    ERROR_TYPE, HTTP_REQUEST_METHOD, HTTP_RESPONSE_STATUS_CODE, HTTP_ROUTE, NETWORK_PROTOCOL_VERSION, SERVER_ADDRESS,
    SERVER_PORT, URL_PATH, URL_SCHEME, USER_AGENT_ORIGINAL,
};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::Telemetry;
use crate::metrics::Durations;
use crate::propagation::traceparent;
use crate::spans::record_error;

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

/// Traces requests as SERVER spans.
#[derive(Debug, Clone)]
pub struct HttpServerLayer {
    telemetry: Telemetry,
    inbound: InboundContext,
    trace_response_headers: bool,
    details: bool,
}

impl HttpServerLayer {
    /// Continues inbound context and adds no response headers.
    pub fn new(telemetry: Telemetry) -> Self {
        Self { telemetry, inbound: InboundContext::Continue, trace_response_headers: false, details: false }
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

    fn parent(&self, extracted: Context) -> (Context, Vec<Link>) {
        match self.inbound {
            InboundContext::Continue => (extracted, Vec::new()),
            InboundContext::Link => {
                let remote = extracted.span().span_context().clone();
                let links = if remote.is_valid() { vec![Link::with_context(remote)] } else { Vec::new() };
                (Context::new(), links)
            }
            InboundContext::Ignore => (Context::new(), Vec::new()),
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
        let extracted = telemetry.propagator().extract(&HeaderExtractor(request.headers()));
        let (parent, links) = self.layer.parent(extracted);
        let method = request.method().as_str().to_owned();
        let route = request.extensions().get::<MatchedPath>().map(|path| path.as_str().to_owned());
        let name = match &route {
            Some(route) => format!("{method} {route}"),
            None => method.clone(),
        };
        // The conventions' required attributes and the route; the recommended ones
        // (server.address, user_agent.original, ...) cost a copy per request and tell little
        // here: opt in with `with_details`.
        let mut attributes = Vec::with_capacity(8);
        attributes.extend([
            KeyValue::new(HTTP_REQUEST_METHOD, method),
            KeyValue::new(URL_PATH, request.uri().path().to_owned()),
            KeyValue::new(URL_SCHEME, "http"),
        ]);
        if let Some(route) = route {
            attributes.push(KeyValue::new(HTTP_ROUTE, route));
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
        // The duration histogram's attributes: the conventions' low-cardinality subset.
        let duration = telemetry.instruments().map(|instruments| {
            let mut metric_attributes = Vec::with_capacity(6);
            metric_attributes.extend([
                KeyValue::new(HTTP_REQUEST_METHOD, known_method(request.method())),
                KeyValue::new(URL_SCHEME, "http"),
                KeyValue::new(NETWORK_PROTOCOL_VERSION, protocol_version(request.version())),
            ]);
            if let Some(route) = attributes.iter().find(|kv| kv.key.as_str() == HTTP_ROUTE) {
                metric_attributes.push(route.clone());
            }
            (instruments.http_server_duration.clone(), metric_attributes, Instant::now())
        });
        let tracer = telemetry.tracer();
        let span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_attributes(attributes)
            .with_links(links)
            .start_with_context(tracer, &parent);
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

/// The method as `http.request.method` spells it in metrics: the known ones, else `_OTHER`
/// (a client inventing methods must not invent time series).
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
        _ => "_OTHER",
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
        // The histogram, its attributes so far and the start: `None` when metrics are off.
        duration: Option<(Durations, Vec<KeyValue>, Instant)>,
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
                let status_code = KeyValue::new(HTTP_RESPONSE_STATUS_CODE, i64::from(status.as_u16()));
                span.set_attribute(status_code.clone());
                // Conventions: a SERVER span fails on 5xx only; 4xx is the caller's doing.
                if status.is_server_error() {
                    record_error(&span, status.as_str(), status.canonical_reason().unwrap_or("server error"));
                }
                if let Some((histogram, mut attributes, started)) = this.duration.take() {
                    attributes.push(status_code);
                    if status.is_server_error() {
                        attributes.push(KeyValue::new(ERROR_TYPE, status.as_str().to_owned()));
                    }
                    histogram.record(started.elapsed().as_secs_f64(), attributes.as_slice());
                }
                if *this.trace_response_headers && span.span_context().is_valid() {
                    let value = traceparent(span.span_context());
                    if let Ok(timing) = HeaderValue::from_str(&["trace;desc=", value.as_str()].concat()) {
                        response.headers_mut().insert(SERVER_TIMING, timing);
                    }
                    if let Ok(value) = HeaderValue::from_str(&value) {
                        response.headers_mut().insert(TRACERESPONSE, value);
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
    use super::split_host;

    #[test]
    fn host_headers_split_into_address_and_port() {
        assert_eq!(split_host("localhost:8080"), ("localhost", Some(8080)));
        assert_eq!(split_host("example.com"), ("example.com", None));
        assert_eq!(split_host("[::1]:8080"), ("::1", Some(8080)));
        assert_eq!(split_host("[::1]"), ("[::1]", None));
    }
}
