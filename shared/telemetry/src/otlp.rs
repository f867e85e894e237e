//! OTLP/gRPC span export that encodes each span straight from the SDK's `SpanData` into
//! protobuf bytes, once, as it ends ([`EncodingSpanProcessor`]), and sends the batches
//! ([`GrpcSpanExporter`]).
//!
//! The SDK's exporter clones the whole batch (so it can retry), converts every span into the
//! `opentelemetry-proto` structs (a `String` per attribute key and per string value), then encodes
//! those structs and frees them: about 15,000 instructions per span, on the batch thread and the
//! service's runtime. Writing the wire format directly from the borrowed spans allocates nothing
//! per span; each attempt, a retry too, writes the same bytes into the call's buffer straight from
//! the batch. The equivalence test decodes these bytes with `opentelemetry-proto` and compares them
//! with the SDK's own conversion.
//!
//! Scope: OTLP/gRPC without compression over `http://` (what Jaeger and collectors take on
//! 4317, and the default here). `http/protobuf` goes through the SDK's exporter, and so does
//! `https://`, which that exporter, built here without TLS, refuses at startup; `gzip` is
//! refused by the configuration (see [`crate::setup`]). The exporter honours
//! `OTEL_EXPORTER_OTLP_HEADERS` and `_TIMEOUT` (and their `_TRACES_` forms) and retries the
//! codes the OTLP spec calls retryable, with jittered exponential backoff, until the timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::uri::PathAndQuery;
use opentelemetry::trace::{SpanId, SpanKind, Status, TraceState};
use opentelemetry::{Array, InstrumentationScope, KeyValue, Value};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::SpanData;
use prost::bytes::{BufMut, Bytes};
use prost::encoding::{WireType, encoded_len_varint};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};

use crate::setup::SpanTransport;

mod processor;

pub use processor::{BatchError, EncodingSpanProcessor};

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Why the exporter could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GrpcExportError {
    /// The endpoint is not a URI tonic accepts.
    #[error("invalid OTLP endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What tonic said.
        reason: String,
    },
    /// A header name or value cannot go into gRPC metadata.
    #[error("OTLP header {0:?} is not a valid gRPC metadata entry")]
    Header(String),
}

/// The OTLP/gRPC span exporter; see the module documentation.
#[derive(Debug)]
pub struct GrpcSpanExporter {
    client: tonic::client::Grpc<tonic::transport::Channel>,
    runtime: tokio::runtime::Handle,
    metadata: MetadataMap,
    timeout: Duration,
    /// Spans lost so far, shared with whatever counts the failed exports (see
    /// [`counting_lost_spans_in`](Self::counting_lost_spans_in)).
    lost: LostSpans,
    /// Keeps `runtime` running while this exporter may still send (see [`Self::keeping`]).
    _runtime: Option<RuntimeGuard>,
}

/// Keeps the runtime an exporter sends on running for as long as the exporter lives: a clone
/// of the sender whose drop, once the last clone goes, stops that runtime's thread.
#[derive(Debug, Clone)]
pub(crate) struct RuntimeGuard(
    #[allow(dead_code, reason = "held, never read: its drop is the point")]
    pub(crate)  Arc<tokio::sync::oneshot::Sender<()>>,
);

/// The running count of spans lost on their way out (a full queue, failed exports, spans a backend
/// rejects), shared by its clones, so the log gives one total however they were lost.
#[derive(Debug, Clone, Default)]
pub(crate) struct LostSpans(Arc<AtomicU64>);

impl LostSpans {
    /// Adds `spans` lost; the total so far.
    pub(crate) fn add(&self, spans: u64) -> u64 {
        self.0.fetch_add(spans, Ordering::Relaxed) + spans
    }

    /// The total so far.
    #[cfg(test)]
    pub(crate) fn total(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl GrpcSpanExporter {
    /// An exporter to `endpoint` (`http://host:port`) with `transport`'s headers and timeout,
    /// whose connection lives on `runtime` (connected lazily, on first export).
    pub fn new(
        endpoint: &str,
        transport: &SpanTransport,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Self, GrpcExportError> {
        let invalid = |error: tonic::transport::Error| GrpcExportError::Endpoint {
            endpoint: endpoint.to_owned(),
            reason: error.to_string(),
        };
        // Exporters identify themselves (OTLP spec, "User Agent").
        let endpoint = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
            .and_then(|e| {
                e.user_agent(concat!("OTel-OTLP-Exporter-Rust tracehop-telemetry/", env!("CARGO_PKG_VERSION")))
            })
            .map_err(invalid)?;
        let channel = {
            let _entered = runtime.enter();
            endpoint.connect_lazy()
        };
        let mut metadata = MetadataMap::new();
        for (key, value) in &transport.headers {
            let name = MetadataKey::from_bytes(key.to_ascii_lowercase().as_bytes())
                .map_err(|_| GrpcExportError::Header(key.clone()))?;
            let value = MetadataValue::try_from(value.as_str()).map_err(|_| GrpcExportError::Header(key.clone()))?;
            // Repeated keys are all sent, as the variable lists them.
            metadata.append(name, value);
        }
        Ok(Self {
            client: tonic::client::Grpc::new(channel),
            runtime: runtime.clone(),
            metadata,
            timeout: transport.timeout,
            lost: LostSpans::default(),
            _runtime: None,
        })
    }

    /// Keeps the runtime `guard` stands for running while this exporter lives: it sends there
    /// until its processor's last export, which may come after everything else let go.
    pub(crate) fn keeping(mut self, guard: RuntimeGuard) -> Self {
        self._runtime = Some(guard);
        self
    }

    /// Adds the spans a backend rejects in a partial success to `lost`, the count of spans
    /// lost to failed exports, so the log's running total covers both.
    pub(crate) fn counting_lost_spans_in(mut self, lost: LostSpans) -> Self {
        self.lost = lost;
        self
    }

    /// Sends an encoded request on the export runtime and waits for the outcome: for the
    /// batch processor's thread, which is not a runtime thread. tonic's channel and tokio's
    /// timers live on that runtime; the caller only waits, a second past the export's own
    /// timeout at most (should the runtime be stuck or gone).
    ///
    /// The batch comes back with the outcome, for its buffers to take the next spans, unless
    /// something still holds it: the runtime did not answer in time, or the send ended (at its
    /// deadline, or on an answer that came before the request was written) while tonic's
    /// channel or hyper still held a request not yet written. The next batch then starts with
    /// fresh buffers.
    pub(crate) fn export_blocking(&self, request: ExportRequest) -> (OTelSdkResult, Option<EncodedBatch>) {
        let request = Arc::new(request);
        let (answer, outcome) = std::sync::mpsc::sync_channel(1);
        let send = self.send(request.clone());
        self.runtime.spawn(async move {
            // The send future, and with it its own hold on the request, is gone before the answer.
            let result = send.await;
            let _ = answer.send(result);
        });
        let result = outcome.recv_timeout(self.timeout + Duration::from_secs(1)).unwrap_or_else(|_| {
            Err(OTelSdkError::InternalFailure("the OTLP export runtime did not answer in time".into()))
        });
        (result, Arc::into_inner(request).map(|request| request.batch))
    }

    /// Sends `body` until it is accepted, a non-retryable error comes back, or the timeout.
    fn send(&self, body: Arc<ExportRequest>) -> impl Future<Output = OTelSdkResult> + Send + 'static {
        let (mut client, metadata, timeout) = (self.client.clone(), self.metadata.clone(), self.timeout);
        let lost = self.lost.clone();
        // From now, not from the task's first poll: `export_blocking` waits for the answer
        // from now too, so the send cannot outlast the wait and land after being counted lost.
        let deadline = tokio::time::Instant::now() + timeout;
        async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let mut request = tonic::Request::new(body.clone());
                *request.metadata_mut() = metadata.clone();
                // `grpc-timeout`: the backend learns how long this attempt may take.
                request.set_timeout(deadline.saturating_duration_since(tokio::time::Instant::now()));
                let call = async {
                    client.ready().await.map_err(|error| tonic::Status::unavailable(error.to_string()))?;
                    client.unary(request, PathAndQuery::from_static(EXPORT_PATH), RawCodec).await
                };
                let status = match tokio::time::timeout_at(deadline, call).await {
                    Ok(Ok(response)) => {
                        // A partial success: spans rejected, or a warning (no spans rejected, a
                        // message). The spec asks for both to be logged and for neither to be
                        // retried; rejected spans are lost spans, and counted as such.
                        if let Some(partial) = response.into_inner().partial_success {
                            let rejected = u64::try_from(partial.rejected_spans).unwrap_or(0);
                            if rejected > 0 {
                                let total = lost.add(rejected);
                                tracing::warn!(
                                    dropped_spans = rejected,
                                    dropped_spans_total = total,
                                    error_message = partial.error_message,
                                    "the trace backend rejected spans (a partial success)"
                                );
                            } else if !partial.error_message.is_empty() {
                                tracing::warn!(
                                    error_message = partial.error_message,
                                    "the trace backend accepted the spans with a warning"
                                );
                            }
                        }
                        return Ok(());
                    }
                    Ok(Err(status)) => status,
                    Err(_) => return Err(OTelSdkError::Timeout(timeout)),
                };
                let wait = jittered(backoff, rand::random());
                if !retryable(status.code()) || tokio::time::Instant::now() + wait >= deadline {
                    return Err(OTelSdkError::InternalFailure(format!("OTLP export failed: {status}")));
                }
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The wait before the next attempt: `backoff` less up to half of it at random (`random` is
/// uniform in [0, 1)). The OTLP specification asks for exponential backoff with jitter: services
/// that lost the same backend at once then retry out of step instead of all together.
fn jittered(backoff: Duration, random: f64) -> Duration {
    backoff.mul_f64(1.0 - random / 2.0)
}

/// The codes the OTLP specification says a client retries (RESOURCE_EXHAUSTED is retried only
/// with a retry delay from the server, which we do not read: not retried).
fn retryable(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::OutOfRange
            | Code::Unavailable
            | Code::DataLoss
    )
}

/// Writes a batch's pre-encoded spans into tonic's buffer and decodes the response with prost.
#[derive(Debug, Clone, Copy)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Arc<ExportRequest>;
    type Decode = ExportTraceServiceResponse;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Arc<ExportRequest>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Arc<ExportRequest>, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        item.batch.write_request(&item.resource, dst);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = ExportTraceServiceResponse;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        prost::Message::decode(src)
            .map(Some)
            .map_err(|error| tonic::Status::internal(format!("undecodable OTLP export response: {error}")))
    }
}

// The wire format. Field numbers are those of opentelemetry-proto's `trace.proto`,
// `common.proto` and `resource.proto`; defaults are omitted as prost omits them, and messages
// the SDK conversion always sets (`status`, `resource`, `scope`, `value`) are always written.

/// A varint, on a `Vec` directly (prost's writer goes through `BufMut` a byte at a time, with
/// a capacity check per byte; tags and lengths here are mostly a single byte).
fn encode_varint(mut value: u64, buf: &mut Vec<u8>) {
    while value >= 0x80 {
        buf.push((value as u8) | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

fn encode_key(tag: u32, wire_type: WireType, buf: &mut Vec<u8>) {
    encode_varint(u64::from(tag << 3 | wire_type as u32), buf);
}

/// Writes a length-delimited field: the body is written in place, then its length is put in
/// front of it (one move of the body; no length pre-computation, no scratch buffers).
fn nested(buf: &mut Vec<u8>, tag: u32, body: impl FnOnce(&mut Vec<u8>)) {
    encode_key(tag, WireType::LengthDelimited, buf);
    let start = buf.len();
    body(buf);
    let len = buf.len() - start;
    encode_varint(len as u64, buf);
    let prefix_len = buf.len() - start - len;
    buf[start..].rotate_right(prefix_len);
}

/// A string or bytes field, written even when empty (a oneof member).
fn length_delimited(buf: &mut Vec<u8>, tag: u32, value: &[u8]) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(value.len() as u64, buf);
    buf.extend_from_slice(value);
}

/// A string or bytes field, omitted when empty (proto3's default).
fn bytes_field(buf: &mut Vec<u8>, tag: u32, value: &[u8]) {
    if !value.is_empty() {
        length_delimited(buf, tag, value);
    }
}

fn varint_field(buf: &mut Vec<u8>, tag: u32, value: u64) {
    if value != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(value, buf);
    }
}

fn fixed32_field(buf: &mut Vec<u8>, tag: u32, value: u32) {
    if value != 0 {
        encode_key(tag, WireType::ThirtyTwoBit, buf);
        buf.extend_from_slice(&value.to_le_bytes());
    }
}

fn fixed64_field(buf: &mut Vec<u8>, tag: u32, value: u64) {
    if value != 0 {
        encode_key(tag, WireType::SixtyFourBit, buf);
        buf.extend_from_slice(&value.to_le_bytes());
    }
}

fn nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64
}

/// Spans encoded as they end, grouped by instrumentation scope in the order the scopes first
/// appear, waiting to go out as one `ExportTraceServiceRequest`. A span costs its encoded bytes
/// here (250-700 for these services' spans) instead of a `SpanData` in a queue.
#[derive(Debug, Default)]
pub(crate) struct EncodedBatch {
    groups: Vec<ScopeGroup>,
    spans: usize,
}

/// One `ScopeSpans`: its scope and its spans, each already framed as field 2.
#[derive(Debug)]
struct ScopeGroup {
    scope: InstrumentationScope,
    spans: Vec<u8>,
}

impl EncodedBatch {
    /// Adds a span [`encode_span_entry`] wrote, to its scope's group. A scope like none before
    /// it (even one unequal to itself, with a NaN attribute) gets a group of its own, so no
    /// span can fall between groups.
    pub(crate) fn push_encoded(&mut self, scope: &InstrumentationScope, entry: &[u8]) {
        let index = match self.groups.iter().position(|group| same_scope(&group.scope, scope)) {
            Some(index) => index,
            None => {
                self.groups.push(ScopeGroup { scope: scope.clone(), spans: Vec::new() });
                self.groups.len() - 1
            }
        };
        self.groups[index].spans.extend_from_slice(entry);
        self.spans += 1;
    }

    /// Encodes `span` and adds it (what the tests use; the processor encodes outside its lock).
    #[cfg(test)]
    pub(crate) fn push(&mut self, span: &SpanData) {
        let mut buf = Vec::new();
        let entry = encode_span_entry(&mut buf, span);
        self.push_encoded(&span.instrumentation_scope, entry);
    }

    /// How many spans it holds.
    pub(crate) fn len(&self) -> usize {
        self.spans
    }

    /// Whether it holds no span.
    pub(crate) fn is_empty(&self) -> bool {
        self.spans == 0
    }

    /// Empties it, keeping the first group's buffer (the usual batch has one scope) for the
    /// next spans.
    pub(crate) fn clear(&mut self) {
        self.groups.truncate(1);
        if let Some(group) = self.groups.first_mut() {
            group.spans.clear();
        }
        self.spans = 0;
    }

    /// [`Self::write_request`]'s bytes in a `Vec` of their own (what the tests decode), which
    /// checks that the length reserved was the length written.
    #[cfg(test)]
    pub(crate) fn request(&self, resource: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        self.write_request(resource, &mut buf);
        assert_eq!(buf.len(), buf.capacity(), "the request's length, reserved first, is what was written");
        buf
    }

    /// Writes the request, one `ResourceSpans` with `resource` (from [`encode_resource`]) and a
    /// `ScopeSpans` per group that holds spans, into `dst`, its whole length reserved first
    /// (see [`Reserve`]): the spans are copied from the batch once, straight into the buffer
    /// that is sent.
    pub(crate) fn write_request(&self, resource: &[u8], dst: &mut impl Reserve) {
        let (framed, resource_spans_len) = self.framing(resource);
        let mut head = Vec::with_capacity(12);
        encode_key(1, WireType::LengthDelimited, &mut head);
        encode_varint(resource_spans_len as u64, &mut head);
        encode_key(1, WireType::LengthDelimited, &mut head);
        dst.reserve_total(head.len() + resource_spans_len - 1);
        dst.put_slice(&head);
        dst.put_slice(resource);
        for entry in &framed {
            head.clear();
            encode_key(2, WireType::LengthDelimited, &mut head);
            encode_varint(entry.len() as u64, &mut head);
            dst.put_slice(&head);
            dst.put_slice(&entry.scope);
            dst.put_slice(entry.spans);
            dst.put_slice(&entry.schema_url);
        }
    }

    /// Each group's scope (field 1) and schema URL (field 3), around its spans (field 2); and
    /// the length of the `ResourceSpans` they make with `resource`.
    fn framing(&self, resource: &[u8]) -> (Vec<FramedGroup<'_>>, usize) {
        let framed: Vec<FramedGroup<'_>> = self
            .groups
            .iter()
            .filter(|group| !group.spans.is_empty())
            .map(|group| {
                let (mut scope, mut schema_url) = (Vec::new(), Vec::new());
                nested(&mut scope, 1, |buf| encode_scope(buf, &group.scope));
                bytes_field(&mut schema_url, 3, group.scope.schema_url().unwrap_or_default().as_bytes());
                FramedGroup { scope, spans: group.spans.as_slice(), schema_url }
            })
            .collect();
        let resource_spans_len = 1
            + resource.len()
            + framed.iter().map(|group| 1 + encoded_len_varint(group.len() as u64) + group.len()).sum::<usize>();
        (framed, resource_spans_len)
    }
}

/// One group's `ScopeSpans`, its spans borrowed from the batch.
struct FramedGroup<'a> {
    scope: Vec<u8>,
    spans: &'a [u8],
    schema_url: Vec<u8>,
}

impl FramedGroup<'_> {
    /// The `ScopeSpans` message's length.
    fn len(&self) -> usize {
        self.scope.len() + self.spans.len() + self.schema_url.len()
    }
}

/// A buffer a request is written into, its whole length reserved at once: a buffer grown by
/// doubling as the spans arrive would copy them again on the way.
pub(crate) trait Reserve: BufMut {
    /// Makes room for `additional` more bytes.
    fn reserve_total(&mut self, additional: usize);
}

impl Reserve for Vec<u8> {
    fn reserve_total(&mut self, additional: usize) {
        self.reserve_exact(additional);
    }
}

impl Reserve for EncodeBuf<'_> {
    fn reserve_total(&mut self, additional: usize) {
        self.reserve(additional);
    }
}

/// A batch on its way out, with the resource it goes with: shared by the attempts to send it,
/// then handed back, so its buffers take the next spans.
#[derive(Debug)]
pub(crate) struct ExportRequest {
    pub(crate) batch: EncodedBatch,
    pub(crate) resource: Bytes,
}

impl ExportRequest {
    /// The request's bytes (what a test's backend decodes).
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> Vec<u8> {
        self.batch.request(&self.resource)
    }
}

/// Room for a `ScopeSpans` entry's key (one byte) and the longest varint length.
const ENTRY_HEAD: usize = 1 + 10;

/// A span as a `ScopeSpans` entry (field 2), length-prefixed, ready for
/// [`EncodedBatch::push_encoded`]: the entry is the slice returned, at the end of `buf`.
///
/// The span is written after room for the entry's head, and the head, once the length is known,
/// just in front of it: [`nested`] would move the whole span (some 600 bytes) to make room.
pub(crate) fn encode_span_entry<'a>(buf: &'a mut Vec<u8>, span: &SpanData) -> &'a [u8] {
    let start = buf.len();
    buf.resize(start + ENTRY_HEAD, 0);
    encode_span(buf, span);
    let len = buf.len() - start - ENTRY_HEAD;
    // The key, then the length as a varint, on the stack (no allocation per span).
    let mut head = [0u8; ENTRY_HEAD];
    let mut free = &mut head[..];
    prost::encoding::encode_key(2, WireType::LengthDelimited, &mut free);
    prost::encoding::encode_varint(len as u64, &mut free);
    let used = ENTRY_HEAD - free.len();
    let entry = start + ENTRY_HEAD - used;
    buf[entry..start + ENTRY_HEAD].copy_from_slice(&head[..used]);
    &buf[entry..]
}

/// Whether two spans' scopes are one, without the allocations of `InstrumentationScope`'s `==`
/// (it sorts copies of both attribute lists on every call; here it would run once per span).
/// Attributes compare in order: every span of a tracer carries a clone of its scope, so equal
/// scopes list them alike, and two equal scopes told apart would only mean two `ScopeSpans`.
fn same_scope(a: &InstrumentationScope, b: &InstrumentationScope) -> bool {
    a.name() == b.name()
        && a.version() == b.version()
        && a.schema_url() == b.schema_url()
        && a.attributes().eq(b.attributes())
}

/// What the resource contributes to every `ResourceSpans`, encoded once: the length of the
/// `Resource` message and the message (field 1's value), then the schema URL (field 3).
pub(crate) fn encode_resource(resource: &Resource) -> Bytes {
    let mut message = Vec::new();
    for (key, value) in resource.iter() {
        encode_key_value(&mut message, 1, key.as_str(), value);
    }
    let mut framed = Vec::with_capacity(message.len() + 10);
    encode_varint(message.len() as u64, &mut framed);
    framed.extend_from_slice(&message);
    if let Some(schema_url) = resource.schema_url() {
        bytes_field(&mut framed, 3, schema_url.as_bytes());
    }
    Bytes::from(framed)
}

fn encode_scope(buf: &mut Vec<u8>, scope: &InstrumentationScope) {
    bytes_field(buf, 1, scope.name().as_bytes());
    bytes_field(buf, 2, scope.version().unwrap_or_default().as_bytes());
    encode_attributes(buf, 3, scope.attributes());
}

fn encode_attributes<'a>(buf: &mut Vec<u8>, tag: u32, attributes: impl IntoIterator<Item = &'a KeyValue>) {
    for attribute in attributes {
        encode_key_value(buf, tag, attribute.key.as_str(), &attribute.value);
    }
}

/// A `KeyValue` as field `tag`. Scalars (nearly every attribute) have their lengths worked out
/// first and are written front to back; arrays go through [`nested`].
fn encode_key_value(buf: &mut Vec<u8>, tag: u32, key: &str, value: &Value) {
    if let Value::String(text) = value
        && short_string_key_value(buf, tag, key.as_bytes(), text.as_str().as_bytes())
    {
        return;
    }
    let key_len = if key.is_empty() { 0 } else { 1 + encoded_len_varint(key.len() as u64) + key.len() };
    let Some(value_len) = scalar_len(value) else {
        nested(buf, tag, |buf| {
            bytes_field(buf, 1, key.as_bytes());
            nested(buf, 2, |buf| encode_any_value(buf, value));
        });
        return;
    };
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint((key_len + 1 + encoded_len_varint(value_len as u64) + value_len) as u64, buf);
    bytes_field(buf, 1, key.as_bytes());
    encode_key(2, WireType::LengthDelimited, buf);
    encode_varint(value_len as u64, buf);
    encode_any_value(buf, value);
}

/// The common attribute, a string under a non-empty key, whose lengths all fit one-byte
/// varints (field tag below 16, the whole `KeyValue` under 128 bytes): written as two 4-byte
/// headers and the two strings, after one capacity check. False, having written nothing, for
/// anything else. The same bytes as the general path (the equivalence tests cover both).
fn short_string_key_value(buf: &mut Vec<u8>, tag: u32, key: &[u8], value: &[u8]) -> bool {
    // KeyValue { key (1), value (2): AnyValue { string_value (1) } }
    let any_value_len = 2 + value.len();
    let key_value_len = 2 + key.len() + 2 + any_value_len;
    if tag >= 16 || key.is_empty() || key_value_len >= 128 {
        return false;
    }
    const LENGTH_DELIMITED: u8 = 2;
    buf.reserve(2 + key_value_len);
    buf.extend_from_slice(&[
        (tag as u8) << 3 | LENGTH_DELIMITED,
        key_value_len as u8,
        1 << 3 | LENGTH_DELIMITED,
        key.len() as u8,
    ]);
    buf.extend_from_slice(key);
    buf.extend_from_slice(&[
        2 << 3 | LENGTH_DELIMITED,
        any_value_len as u8,
        1 << 3 | LENGTH_DELIMITED,
        value.len() as u8,
    ]);
    buf.extend_from_slice(value);
    true
}

/// The encoded length of a scalar `AnyValue` (see [`encode_any_value`]); `None` for arrays
/// and kinds of value added after this was written.
fn scalar_len(value: &Value) -> Option<usize> {
    match value {
        Value::String(value) => Some(1 + encoded_len_varint(value.as_str().len() as u64) + value.as_str().len()),
        Value::Bool(_) => Some(2),
        Value::I64(value) => Some(1 + encoded_len_varint(*value as u64)),
        Value::F64(_) => Some(9),
        _ => None,
    }
}

/// `AnyValue`: a oneof, so even a default value (`false`, `0`, `""`) is written.
fn encode_any_value(buf: &mut Vec<u8>, value: &Value) {
    match value {
        Value::String(value) => length_delimited(buf, 1, value.as_str().as_bytes()),
        Value::Bool(value) => {
            encode_key(2, WireType::Varint, buf);
            encode_varint(u64::from(*value), buf);
        }
        Value::I64(value) => {
            encode_key(3, WireType::Varint, buf);
            encode_varint(*value as u64, buf);
        }
        Value::F64(value) => {
            encode_key(4, WireType::SixtyFourBit, buf);
            buf.extend_from_slice(&value.to_le_bytes());
        }
        // `ArrayValue.values` (1): one `AnyValue` per element.
        Value::Array(array) => nested(buf, 5, |buf| match array {
            Array::Bool(values) => {
                values.iter().for_each(|v| nested(buf, 1, |buf| encode_any_value(buf, &Value::Bool(*v))))
            }
            Array::I64(values) => {
                values.iter().for_each(|v| nested(buf, 1, |buf| encode_any_value(buf, &Value::I64(*v))))
            }
            Array::F64(values) => {
                values.iter().for_each(|v| nested(buf, 1, |buf| encode_any_value(buf, &Value::F64(*v))))
            }
            Array::String(values) => {
                values.iter().for_each(|v| nested(buf, 1, |buf| length_delimited(buf, 1, v.as_str().as_bytes())))
            }
            // A kind of array added after this was written: its text, rather than nothing.
            other => nested(buf, 1, |buf| length_delimited(buf, 1, other.to_string().as_bytes())),
        }),
        // A kind of value added after this was written: its text, rather than nothing.
        other => length_delimited(buf, 1, other.to_string().as_bytes()),
    }
}

/// `Span.flags` and `Link.flags`: the W3C flags plus "whether the parent is remote is known"
/// (0x100) and "it is remote" (0x200).
fn span_flags(remote: bool, trace_flags: u8) -> u32 {
    u32::from(trace_flags) | 0x100 | if remote { 0x200 } else { 0 }
}

fn span_kind(kind: &SpanKind) -> u64 {
    match kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

/// Field 3 of a span or link; no `String` is made for the usual empty trace state.
fn encode_trace_state(buf: &mut Vec<u8>, trace_state: &TraceState) {
    if *trace_state != TraceState::NONE {
        bytes_field(buf, 3, trace_state.header().as_bytes());
    }
}

fn encode_span(buf: &mut Vec<u8>, span: &SpanData) {
    let context = &span.span_context;
    bytes_field(buf, 1, &context.trace_id().to_bytes());
    bytes_field(buf, 2, &context.span_id().to_bytes());
    encode_trace_state(buf, context.trace_state());
    if span.parent_span_id != SpanId::INVALID {
        bytes_field(buf, 4, &span.parent_span_id.to_bytes());
    }
    bytes_field(buf, 5, span.name.as_bytes());
    varint_field(buf, 6, span_kind(&span.span_kind));
    fixed64_field(buf, 7, nanos(span.start_time));
    fixed64_field(buf, 8, nanos(span.end_time));
    encode_attributes(buf, 9, &span.attributes);
    varint_field(buf, 10, u64::from(span.dropped_attributes_count));
    for event in &span.events.events {
        nested(buf, 11, |buf| {
            fixed64_field(buf, 1, nanos(event.timestamp));
            bytes_field(buf, 2, event.name.as_bytes());
            encode_attributes(buf, 3, &event.attributes);
            varint_field(buf, 4, u64::from(event.dropped_attributes_count));
        });
    }
    varint_field(buf, 12, u64::from(span.events.dropped_count));
    for link in &span.links.links {
        nested(buf, 13, |buf| {
            bytes_field(buf, 1, &link.span_context.trace_id().to_bytes());
            bytes_field(buf, 2, &link.span_context.span_id().to_bytes());
            encode_trace_state(buf, link.span_context.trace_state());
            encode_attributes(buf, 4, &link.attributes);
            varint_field(buf, 5, u64::from(link.dropped_attributes_count));
            fixed32_field(buf, 6, span_flags(link.span_context.is_remote(), link.span_context.trace_flags().to_u8()));
        });
    }
    varint_field(buf, 14, u64::from(span.links.dropped_count));
    nested(buf, 15, |buf| {
        let (code, message) = match &span.status {
            Status::Unset => (0, ""),
            Status::Ok => (1, ""),
            Status::Error { description } => (2, description.as_ref()),
        };
        bytes_field(buf, 2, message.as_bytes());
        varint_field(buf, 3, code);
    });
    fixed32_field(buf, 16, span_flags(span.parent_span_is_remote, context.trace_flags().to_u8()));
}

#[cfg(test)]
mod tests;
