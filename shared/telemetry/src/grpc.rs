//! Tower layers that trace gRPC calls: [`GrpcClientLayer`] (CLIENT span, inject) around a
//! tonic `Channel`, [`GrpcServerLayer`] (extract, SERVER span) around a tonic server.
//!
//! Span name and `rpc.method` are the fully-qualified method (`checkout.v1.CheckoutService/Checkout`),
//! `rpc.system.name` is `grpc`, `rpc.response.status_code` the status name (`OK`, `NOT_FOUND`).
//! A server's call that ends UNIMPLEMENTED is taken for a method the server does not have (any
//! path a caller sends): `rpc.method` `_OTHER`, the path in `rpc.method_original`, span name
//! `grpc`, as the conventions ask of a method the server does not recognise.
//! The status of a unary call usually arrives in the trailers, so the span ends when the
//! response body does; a call dropped before that (a caller's timeout) ends it as `CANCELLED`,
//! and so does a call whose own deadline (`grpc-timeout`, enforced by tonic's channel) expired.
//! Span status follows the conventions: every non-OK code fails a CLIENT span; a SERVER span
//! fails only for codes that are the server's fault (UNKNOWN, DEADLINE_EXCEEDED,
//! UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS), never for a caller's bad input.
//! When the span ends, the call's duration goes to `rpc.client.call.duration` /
//! `rpc.server.call.duration` with the same status (and `error.type` where the span failed).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, ready};
use std::time::Instant;

use http_body::{Body, Frame};
use opentelemetry::context::{FutureExt as _, WithContext};
use opentelemetry::trace::{SpanBuilder, SpanKind, TraceContextExt};
use opentelemetry::{Context, KeyValue, StringValue};
use opentelemetry_semantic_conventions::attribute::{
    ERROR_TYPE, RPC_METHOD, RPC_METHOD_ORIGINAL, RPC_RESPONSE_STATUS_CODE, RPC_SYSTEM_NAME, SERVER_ADDRESS, SERVER_PORT,
};
use pin_project_lite::pin_project;
use tonic::Code;
use tower::{Layer, Service};

use crate::Telemetry;
use crate::metrics::{AttributeSet, Durations, same_str};
use crate::propagation::{HeaderExtractor, HeaderInjector};
use crate::spans::{SpanNames, baggage_attributes, error_chain, record_error};

/// `rpc.method` of a method the server does not have.
const OTHER_METHOD: &str = "_OTHER";

/// Calls under this path (grpc.health.v1) are not traced.
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// Which end of the call a span describes; a server's side carries what its span completes
/// when the call ends.
#[derive(Debug)]
enum Side {
    Client,
    Server(ServerCall),
}

/// Traces outgoing calls: a CLIENT span per call, its context injected into the metadata.
///
/// The headers the propagator writes (its fields: `traceparent`, `tracestate`, `baggage`, the
/// B3 headers) are marked sensitive, which HTTP/2 sends as a literal never indexed (RFC 7541,
/// 6.2.3; h2's only way to keep a value out of the connection's HPACK table). `traceparent` and
/// most baggage differ from call to call: indexed, each would evict the headers that do repeat
/// (`content-type`, `te`, `user-agent`, the authority) and lengthen the chain of same-name values
/// h2's encoder compares every new value with. Baggage can carry user data, too. A field whose
/// value repeats (`x-b3-sampled`) costs its few bytes on every call instead of an index.
#[derive(Debug, Clone)]
pub struct GrpcClientLayer {
    telemetry: Telemetry,
    /// `server.address` (shared by every span, never copied) and `server.port`.
    peer: Peer,
    /// Span names by method, shared by every clone.
    names: Arc<SpanNames>,
    /// The headers the propagator writes, parsed once.
    injected: Arc<[http::HeaderName]>,
}

impl GrpcClientLayer {
    /// `server_address` / `server_port`: the server the channel talks to.
    pub fn new(telemetry: Telemetry, server_address: impl Into<String>, server_port: u16) -> Self {
        let address: Arc<str> = Arc::from(server_address.into());
        let injected = telemetry
            .propagator()
            .fields()
            .filter_map(|field| http::HeaderName::from_bytes(field.as_bytes()).ok())
            .collect();
        Self { telemetry, peer: (address.into(), server_port), names: Arc::default(), injected }
    }
}

impl<S> Layer<S> for GrpcClientLayer {
    type Service = GrpcClientService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcClientService { inner, layer: self.clone() }
    }
}

/// The service [`GrpcClientLayer`] produces.
#[derive(Debug, Clone)]
pub struct GrpcClientService<S> {
    inner: S,
    layer: GrpcClientLayer,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for GrpcClientService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Error: std::fmt::Display + 'static,
{
    type Response = http::Response<TracedBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let telemetry = &self.layer.telemetry;
        let parent = Context::current();
        let (name, method) = self.layer.names.get("", request.uri().path().trim_start_matches('/'));
        let (address, port) = &self.layer.peer;
        let metric =
            RpcMetric::start(telemetry.instruments().map(|i| &i.rpc_client_duration), &method, Some(&self.layer.peer));
        let span = telemetry.tracer().start_lazily(&parent, || {
            // Room for what the call's end adds (the status, and `error.type` on failure), so
            // the span's vector is not grown, copied and freed then.
            let mut attributes = Vec::with_capacity(6);
            attributes.extend([
                KeyValue::new(RPC_SYSTEM_NAME, "grpc"),
                KeyValue::new(RPC_METHOD, StringValue::from(method.clone())),
                KeyValue::new(SERVER_ADDRESS, address.clone()),
                KeyValue::new(SERVER_PORT, i64::from(*port)),
            ]);
            SpanBuilder::from_name(name).with_kind(SpanKind::Client).with_attributes(attributes)
        });
        let cx = parent.with_span(span);
        let headers = request.headers_mut();
        telemetry.propagator().inject_context(&cx, &mut HeaderInjector(headers));
        for name in self.layer.injected.iter() {
            if let Some(value) = headers.get_mut(name) {
                value.set_sensitive(true);
            }
        }
        let future = self.inner.call(request).with_context(cx.clone());
        ResponseFuture { inner: future, span: Some(RpcSpan { cx: Some(cx), side: Side::Client, metric }) }
    }
}

/// Traces incoming calls: extracts the caller's context and runs the handler inside a SERVER
/// span, so `Context::current()` in the handler is that span. Health checks are not traced.
#[derive(Debug, Clone)]
pub struct GrpcServerLayer {
    telemetry: Telemetry,
    baggage_keys: Arc<[String]>,
    /// Span names by method, shared by every service the layer makes.
    names: Arc<SpanNames>,
}

impl GrpcServerLayer {
    /// A layer that traces with `telemetry`.
    pub fn new(telemetry: Telemetry) -> Self {
        Self { telemetry, baggage_keys: Arc::new([]), names: Arc::default() }
    }

    /// Copies these baggage keys of the caller onto the SERVER span (an allow-list).
    pub fn baggage_attributes(mut self, keys: &[String]) -> Self {
        self.baggage_keys = keys.into();
        self
    }
}

impl<S> Layer<S> for GrpcServerLayer {
    type Service = GrpcServerService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcServerService {
            inner,
            telemetry: self.telemetry.clone(),
            baggage_keys: self.baggage_keys.clone(),
            names: self.names.clone(),
        }
    }
}

/// The service [`GrpcServerLayer`] produces.
#[derive(Debug, Clone)]
pub struct GrpcServerService<S> {
    inner: S,
    telemetry: Telemetry,
    baggage_keys: Arc<[String]>,
    names: Arc<SpanNames>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for GrpcServerService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Error: std::fmt::Display + 'static,
{
    type Response = http::Response<TracedBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        // Health probes every few seconds would bury the traces people look for.
        if request.uri().path().starts_with(HEALTH_PREFIX) {
            let future = self.inner.call(request).with_context(Context::current());
            return ResponseFuture { inner: future, span: None };
        }
        let parent = self.telemetry.extract_incoming(&HeaderExtractor(request.headers()));
        // Any path a caller sends arrives here: whether the server has the method shows only when
        // the call ends (UNIMPLEMENTED or not), so `rpc.method` is set then, and the method's
        // name kept only then.
        let (name, method, kept) = self.names.get_unkept("", request.uri().path().trim_start_matches('/'));
        let server = ServerCall { method: method.clone(), names: (!kept).then(|| self.names.clone()) };
        // server.address / server.port are opt-in for the server metric: left out.
        let metric = RpcMetric::start(self.telemetry.instruments().map(|i| &i.rpc_server_duration), &method, None);
        let span = self.telemetry.tracer().start_lazily(&parent, || {
            // Room for the baggage and what the call's end adds (the status, the method or
            // `_OTHER` and the path, `error.type`), so the span's vector is not grown, copied and
            // freed then.
            let mut attributes = Vec::with_capacity(7 + self.baggage_keys.len());
            attributes.push(KeyValue::new(RPC_SYSTEM_NAME, "grpc"));
            if let Some(authority) = request.uri().authority() {
                attributes.push(KeyValue::new(SERVER_ADDRESS, authority.host().to_owned()));
                if let Some(port) = authority.port_u16() {
                    attributes.push(KeyValue::new(SERVER_PORT, i64::from(port)));
                }
            }
            attributes.extend(baggage_attributes(&parent, &self.baggage_keys));
            SpanBuilder::from_name(name).with_kind(SpanKind::Server).with_attributes(attributes)
        });
        let cx = parent.with_span(span);
        let future = {
            let _attached = cx.clone().attach();
            self.inner.call(request)
        }
        .with_context(cx.clone());
        ResponseFuture { inner: future, span: Some(RpcSpan { cx: Some(cx), side: Side::Server(server), metric }) }
    }
}

/// `server.address` (shared, never copied) and `server.port` of a client's calls.
type Peer = (StringValue, u16);

/// The call-duration histogram of one call, the call's method and, for a client, its server:
/// recorded when its span ends; `None` inside when metrics are off.
#[derive(Debug)]
struct RpcMetric(Option<CallDuration>);

#[derive(Debug)]
struct CallDuration {
    histogram: Durations<RpcKey>,
    /// The method as the span names keep it, once kept (a server's first call of a method
    /// records under the string kept when it ends), shared with the bound sets.
    method: StringValue,
    peer: Option<Peer>,
    started: Instant,
}

impl RpcMetric {
    fn start(histogram: Option<&Durations<RpcKey>>, method: &Arc<str>, peer: Option<&Peer>) -> Self {
        Self(histogram.map(|histogram| CallDuration {
            histogram: histogram.clone(),
            method: StringValue::from(method.clone()),
            peer: peer.cloned(),
            started: Instant::now(),
        }))
    }
}

/// The attributes of a call-duration measurement, by their parts (`rpc.system.name` is always
/// `grpc`): found among the bound sets without building them.
pub(crate) struct RpcSet<'a> {
    method: &'a StringValue,
    /// The server, on the client's side (the server's metric leaves it out).
    peer: Option<&'a Peer>,
    status: &'static str,
    /// `error.type`, when the span failed.
    error_type: Option<&'static str>,
}

/// What a bound [`RpcSet`] keeps.
#[derive(Debug, Clone)]
pub(crate) struct RpcKey {
    method: StringValue,
    peer: Option<Peer>,
    status: &'static str,
    error_type: Option<&'static str>,
}

impl AttributeSet for RpcSet<'_> {
    type Key = RpcKey;

    fn matches(&self, key: &RpcKey) -> bool {
        key.status == self.status
            && key.error_type == self.error_type
            && same_str(key.method.as_str(), self.method.as_str())
            && match (&key.peer, self.peer) {
                (None, None) => true,
                (Some((address, port)), Some((other_address, other_port))) => {
                    port == other_port && same_str(address.as_str(), other_address.as_str())
                }
                _ => false,
            }
    }

    fn key(&self) -> RpcKey {
        RpcKey {
            method: self.method.clone(),
            peer: self.peer.cloned(),
            status: self.status,
            error_type: self.error_type,
        }
    }

    fn attributes(&self) -> Vec<KeyValue> {
        let mut attributes =
            vec![KeyValue::new(RPC_SYSTEM_NAME, "grpc"), KeyValue::new(RPC_METHOD, self.method.clone())];
        if let Some((address, port)) = self.peer {
            attributes.push(KeyValue::new(SERVER_ADDRESS, address.clone()));
            attributes.push(KeyValue::new(SERVER_PORT, i64::from(*port)));
        }
        attributes.push(KeyValue::new(RPC_RESPONSE_STATUS_CODE, self.status));
        if let Some(error_type) = self.error_type {
            attributes.push(KeyValue::new(ERROR_TYPE, error_type));
        }
        attributes
    }
}

/// A call's span, ended exactly once: by the status, or as CANCELLED when dropped unfinished.
#[derive(Debug)]
struct RpcSpan {
    cx: Option<Context>,
    side: Side,
    metric: RpcMetric,
}

/// What a server's span completes when the call ends: its method, known to exist only then.
#[derive(Debug)]
struct ServerCall {
    /// The path the caller sent.
    method: Arc<str>,
    /// Where to keep the method's span name, if not kept yet.
    names: Option<Arc<SpanNames>>,
}

impl RpcSpan {
    fn finish(&mut self, code: Code, message: &str) {
        let Some(cx) = self.cx.take() else { return };
        let span = cx.span();
        span.set_attribute(KeyValue::new(RPC_RESPONSE_STATUS_CODE, code_name(code)));
        let failed = is_error(&self.side, code);
        if failed {
            record_error(&span, code_name(code), if message.is_empty() { code.description() } else { message });
        }
        // The method a server's call records under, when not the one it started with.
        let mut metric_method = None;
        if let Side::Server(ServerCall { method, names }) = &self.side {
            if code == Code::Unimplemented {
                // A method the server does not have: any path a caller sends (conventions:
                // `_OTHER`, the path in `rpc.method_original`, the span named after the system;
                // one metric series for all).
                span.set_attribute(KeyValue::new(RPC_METHOD, OTHER_METHOD));
                span.set_attribute(KeyValue::new(RPC_METHOD_ORIGINAL, StringValue::from(method.clone())));
                span.update_name("grpc");
                metric_method = Some(StringValue::from(OTHER_METHOD));
            } else {
                span.set_attribute(KeyValue::new(RPC_METHOD, StringValue::from(method.clone())));
                if let Some(names) = names {
                    // A method's first call binds its set under the string its span name is
                    // kept with from now on (not this call's own), so later calls find it by
                    // address.
                    metric_method = Some(StringValue::from(names.keep("", method).1));
                }
            }
        }
        span.end();
        if let Some(CallDuration { histogram, method, peer, started }) = self.metric.0.take() {
            let method = metric_method.unwrap_or(method);
            let set = RpcSet {
                method: &method,
                peer: peer.as_ref(),
                status: code_name(code),
                error_type: failed.then(|| code_name(code)),
            };
            histogram.record(started.elapsed().as_secs_f64(), &set);
        }
    }
}

impl Drop for RpcSpan {
    fn drop(&mut self) {
        self.finish(Code::Cancelled, "the call was dropped before it completed");
    }
}

fn is_error(side: &Side, code: Code) -> bool {
    match side {
        Side::Client => code != Code::Ok,
        Side::Server(_) => matches!(
            code,
            Code::Unknown
                | Code::DeadlineExceeded
                | Code::Unimplemented
                | Code::Internal
                | Code::Unavailable
                | Code::DataLoss
        ),
    }
}

/// The canonical status name, as `rpc.response.status_code` spells it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The code tonic's client reports for a failed call, and the error with its causes: CANCELLED
/// when the request's own deadline (`grpc-timeout`, which tonic's channel enforces) expired on
/// the way, as tonic's `Status::from_error` says; UNAVAILABLE for the rest of its transport
/// failures (no connection, a connection lost). tonic's transport error says only "transport
/// error": its causes say which.
fn transport_failure<E: std::fmt::Display + 'static>(error: &E) -> (Code, String) {
    let any: &dyn std::any::Any = error;
    let Some(error) = any.downcast_ref::<tonic::transport::Error>() else {
        return (Code::Unavailable, error.to_string());
    };
    let error: &(dyn std::error::Error + 'static) = error;
    let deadline =
        std::iter::successors(Some(error), |cause| cause.source()).any(|cause| cause.is::<tonic::TimeoutExpired>());
    (if deadline { Code::Cancelled } else { Code::Unavailable }, error_chain(error))
}

pin_project! {
    /// The response future of the traced services.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: WithContext<F>,
        span: Option<RpcSpan>,
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
    E: std::fmt::Display + 'static,
{
    type Output = Result<http::Response<TracedBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, task: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(task));
        let mut span = this.span.take();
        Poll::Ready(match result {
            Ok(response) => {
                // A trailers-only response (any error tonic returns) has the status in the headers.
                if let (Some(status), Some(span)) = (tonic::Status::from_header_map(response.headers()), span.as_mut())
                {
                    span.finish(status.code(), status.message());
                }
                Ok(response.map(|inner| TracedBody { inner, span }))
            }
            Err(error) => {
                if let Some(span) = span.as_mut() {
                    let (code, message) = transport_failure(&error);
                    span.finish(code, &message);
                }
                Err(error)
            }
        })
    }
}

pin_project! {
    /// A response body that ends the call's span when its trailers (the gRPC status) pass.
    pub struct TracedBody<B> {
        #[pin]
        inner: B,
        span: Option<RpcSpan>,
    }
}

impl<B: Body> Body for TracedBody<B>
where
    B::Error: std::fmt::Display,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        task: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(task));
        if let Some(span) = this.span.as_mut() {
            match &frame {
                Some(Ok(frame)) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        match tonic::Status::from_header_map(trailers) {
                            Some(status) => span.finish(status.code(), status.message()),
                            None => span.finish(Code::Unknown, "trailers without grpc-status"),
                        }
                    }
                }
                Some(Err(error)) => span.finish(Code::Unknown, &error.to_string()),
                None => span.finish(Code::Unknown, "the response ended without a grpc-status"),
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::Tracer;

    use super::*;

    const METHOD: &str = "checkout.v1.CheckoutService/Checkout";

    #[test]
    fn a_call_set_matches_its_own_key_and_no_other_parts() {
        let method = StringValue::from(METHOD);
        let set = RpcSet { method: &method, peer: None, status: "OK", error_type: None };
        let key = set.key();
        let copy = StringValue::from(METHOD.to_owned());
        let other_method = StringValue::from("checkout.v1.CheckoutService/Other");
        assert!(
            RpcSet { method: &copy, peer: None, status: "OK", error_type: None }.matches(&key),
            "an equal method elsewhere"
        );
        let different = [
            RpcSet { method: &other_method, peer: None, status: "OK", error_type: None },
            RpcSet { method: &method, peer: None, status: "NOT_FOUND", error_type: None },
            RpcSet { method: &method, peer: None, status: "OK", error_type: Some("OK") },
        ];
        for (index, other) in different.iter().enumerate() {
            assert!(!other.matches(&key), "set {index} shares the handle of another set");
        }
        let checkout: Peer = (StringValue::from(Arc::<str>::from("checkout")), 50051);
        let client = RpcSet { method: &method, peer: Some(&checkout), status: "OK", error_type: None };
        let client_key = client.key();
        assert!(client.matches(&client_key) && !set.matches(&client_key) && !client.matches(&key), "a server's set");
        let other_address: Peer = (StringValue::from("checkout-2"), 50051);
        let other_port: Peer = (checkout.0.clone(), 50052);
        for peer in [&other_address, &other_port] {
            let other = RpcSet { method: &method, peer: Some(peer), status: "OK", error_type: None };
            assert!(!other.matches(&client_key), "another server shares the handle: {peer:?}");
        }
    }

    #[test]
    fn a_call_set_binds_the_conventions_attributes() {
        let checkout: Peer = (StringValue::from("checkout"), 50051);
        let method = StringValue::from(METHOD);
        let set =
            RpcSet { method: &method, peer: Some(&checkout), status: "UNAVAILABLE", error_type: Some("UNAVAILABLE") };
        assert_eq!(
            set.attributes(),
            vec![
                KeyValue::new(RPC_SYSTEM_NAME, "grpc"),
                KeyValue::new(RPC_METHOD, METHOD),
                KeyValue::new(SERVER_ADDRESS, "checkout"),
                KeyValue::new(SERVER_PORT, 50051),
                KeyValue::new(RPC_RESPONSE_STATUS_CODE, "UNAVAILABLE"),
                KeyValue::new(ERROR_TYPE, "UNAVAILABLE"),
            ]
        );
    }

    #[test]
    fn a_server_keeps_a_method_name_only_once_the_call_shows_it_has_the_method() {
        let names = Arc::new(SpanNames::default());
        let end = |code: Code, path: &str| {
            let mut span = RpcSpan {
                cx: Some(Context::new()),
                side: Side::Server(ServerCall { method: Arc::from(path), names: Some(names.clone()) }),
                metric: RpcMetric(None),
            };
            span.finish(code, "");
        };
        end(Code::Unimplemented, "scanner/Probe");
        assert!(!names.get_unkept("", "scanner/Probe").2, "a method the server does not have is not kept");
        end(Code::NotFound, METHOD);
        assert!(names.get_unkept("", METHOD).2, "a method that answered is kept");
    }

    #[test]
    fn a_servers_call_durations_are_bound_under_the_kept_name_of_their_method() {
        let meter = opentelemetry::metrics::MeterProvider::meter(
            &opentelemetry_sdk::metrics::SdkMeterProvider::default(),
            "test",
        );
        let histogram = crate::metrics::Instruments::new(&meter).rpc_server_duration;
        let names = Arc::new(SpanNames::default());
        let call = |path: &str, code: Code| {
            let (_, method, kept) = names.get_unkept("", path);
            let side = Side::Server(ServerCall { method: method.clone(), names: (!kept).then(|| names.clone()) });
            let metric = RpcMetric::start(Some(&histogram), &method, None);
            RpcSpan { cx: Some(Context::new()), side, metric }.finish(code, "");
        };
        call(METHOD, Code::Ok);
        call(METHOD, Code::Ok);
        let keys = histogram.keys();
        let (_, kept, _) = names.get_unkept("", METHOD);
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert!(std::ptr::eq(keys[0].method.as_str().as_ptr(), kept.as_ptr()), "the set holds the kept name's string");
        // Methods the server does not have share one series, whatever path a caller sends.
        call("scanner/Probe", Code::Unimplemented);
        call("scanner/Other", Code::Unimplemented);
        let keys = histogram.keys();
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert_eq!(keys[1].method.as_str(), OTHER_METHOD);
    }

    #[test]
    fn a_server_span_names_a_method_it_does_not_have_other() {
        let ended = crate::testing::Ended::default();
        let provider =
            opentelemetry_sdk::trace::SdkTracerProvider::builder().with_span_processor(ended.clone()).build();
        let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "test");
        let end = |code: Code, path: &str| {
            let span = tracer.span_builder(path.to_owned()).with_kind(SpanKind::Server).start(&tracer);
            let side = Side::Server(ServerCall { method: Arc::from(path), names: None });
            RpcSpan { cx: Some(Context::new().with_span(span)), side, metric: RpcMetric(None) }.finish(code, "");
        };
        end(Code::Unimplemented, "scanner/Probe");
        end(Code::NotFound, METHOD);
        let spans = ended.take();
        let attribute = |index: usize, key: &str| {
            spans[index].attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.as_str().into_owned())
        };
        assert_eq!(spans[0].name, "grpc");
        assert_eq!(attribute(0, RPC_METHOD).as_deref(), Some(OTHER_METHOD));
        assert_eq!(attribute(0, RPC_METHOD_ORIGINAL).as_deref(), Some("scanner/Probe"));
        assert_eq!(spans[1].name, METHOD);
        assert_eq!(attribute(1, RPC_METHOD).as_deref(), Some(METHOD));
        assert_eq!(attribute(1, RPC_METHOD_ORIGINAL), None);
        let methods = spans[1].attributes.iter().filter(|kv| kv.key.as_str() == RPC_METHOD).count();
        assert_eq!(methods, 1, "rpc.method once");
    }

    #[test]
    fn a_calls_injected_context_is_sent_never_indexed() {
        use std::sync::Mutex;

        use opentelemetry::baggage::BaggageExt as _;
        use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

        let config = crate::testing::config(&[
            ("OTEL_TRACES_EXPORTER", "none"),
            ("OTEL_METRICS_EXPORTER", "none"),
            ("OTEL_PROPAGATORS", "tracecontext,baggage,b3,b3multi"),
        ])
        .expect("config");
        let telemetry = Telemetry::new(&config).expect("telemetry");
        let sent = Arc::new(Mutex::new(http::HeaderMap::new()));
        let inner = {
            let sent = sent.clone();
            tower::service_fn(move |request: http::Request<()>| {
                *sent.lock().expect("headers") = request.headers().clone();
                std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(())))
            })
        };
        let mut client = GrpcClientLayer::new(telemetry, "checkout", 50051).layer(inner);
        let mut request = http::Request::new(());
        *request.uri_mut() = http::Uri::from_static("http://checkout:50051/checkout.v1.CheckoutService/Checkout");
        request.headers_mut().insert("content-type", http::HeaderValue::from_static("application/grpc"));
        let caller = SpanContext::new(
            TraceId::from(0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c),
            SpanId::from(0xb7ad_6b71_6920_3331),
            TraceFlags::SAMPLED,
            true,
            TraceState::from_key_value([("vendor", "opaque")]).expect("tracestate"),
        );
        let parent =
            Context::new().with_remote_span_context(caller).with_baggage([KeyValue::new("customer.id", "c-1")]);
        let _attached = parent.attach();
        drop(client.call(request));
        let sent = sent.lock().expect("headers");
        let injected: Vec<&str> =
            sent.keys().map(http::HeaderName::as_str).filter(|name| *name != "content-type").collect();
        for expected in ["traceparent", "tracestate", "baggage", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled"] {
            assert!(injected.contains(&expected), "{expected} is injected: {injected:?}");
        }
        for name in injected {
            assert!(sent[name].is_sensitive(), "{name} is marked never to be indexed");
        }
        assert!(!sent["content-type"].is_sensitive(), "the caller's own headers are left as they are");
    }
}
