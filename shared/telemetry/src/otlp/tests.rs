//! The encoder against the SDK's own conversion: both decoded into `opentelemetry-proto`'s
//! structs must be equal, field for field.

use std::time::{Duration, UNIX_EPOCH};

use opentelemetry::trace::{Event, Link, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{Array, InstrumentationScope, KeyValue, StringValue, Value};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use prost::Message as _;

use super::{
    EncodedBatch, ExportRequest, GrpcSpanExporter, encode_resource, encode_span, encode_span_entry, jittered, nested,
};
use crate::setup::SpanTransport;

fn context(trace: u128, span: u64, remote: bool, state: &str) -> SpanContext {
    let state: TraceState = state.parse().expect("tracestate");
    SpanContext::new(TraceId::from(trace), SpanId::from(span), TraceFlags::SAMPLED, remote, state)
}

fn every_value() -> Vec<KeyValue> {
    vec![
        KeyValue::new("string", "checkout.processed"),
        KeyValue::new("empty", ""),
        KeyValue::new("unicode", "caf\u{e9} \u{1f6d2}"),
        KeyValue::new("true", true),
        KeyValue::new("false", false),
        KeyValue::new("zero", 0_i64),
        KeyValue::new("negative", -42_i64),
        KeyValue::new("large", i64::MAX),
        KeyValue::new("float", 2.5_f64),
        KeyValue::new("nan-free negative float", -0.125_f64),
        KeyValue::new("bools", Value::Array(Array::Bool(vec![true, false]))),
        KeyValue::new("ints", Value::Array(Array::I64(vec![1, -1, 0]))),
        KeyValue::new("floats", Value::Array(Array::F64(vec![0.5, 0.0]))),
        KeyValue::new("strings", Value::Array(Array::String(vec![StringValue::from("a"), StringValue::from("")]))),
        KeyValue::new("empty array", Value::Array(Array::I64(Vec::new()))),
        // Either side of the short-string path's bound (a `KeyValue` of 127 bytes and of 128),
        // a value whose length needs a two-byte varint, and an empty key (omitted on the wire).
        KeyValue::new("boundary", "x".repeat(113)),
        KeyValue::new("boundary", "y".repeat(114)),
        KeyValue::new("long", "z".repeat(300)),
        KeyValue::new("", "no key"),
    ]
}

pub(super) fn span(name: &'static str, kind: SpanKind, scope: &InstrumentationScope) -> SpanData {
    SpanData {
        span_context: context(0x0af7651916cd43dd8448eb211c80319c, 0xb7ad6b7169203331, false, ""),
        parent_span_id: SpanId::INVALID,
        parent_span_is_remote: false,
        span_kind: kind,
        name: name.into(),
        start_time: UNIX_EPOCH + Duration::from_nanos(1_764_979_200_123_456_789),
        end_time: UNIX_EPOCH + Duration::from_nanos(1_764_979_200_125_000_000),
        attributes: Vec::new(),
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: Status::Unset,
        instrumentation_scope: scope.clone(),
    }
}

/// Spans covering every field: each kind, remote and local parents, every attribute type,
/// events and links with attributes and drop counts, each status, two scopes interleaved.
fn batch() -> Vec<SpanData> {
    let tracehop = InstrumentationScope::builder("tracehop").build();
    let other = InstrumentationScope::builder("other")
        .with_version("1.2.3")
        .with_schema_url("https://opentelemetry.io/schemas/1.39.0")
        .with_attributes([KeyValue::new("scope.attribute", 7_i64)])
        .build();

    let mut server = span("POST /api/checkout", SpanKind::Server, &tracehop);
    server.attributes = every_value();
    server.dropped_attributes_count = 3;
    server.status = Status::Ok;

    let mut consumer = span("checkout.processed process", SpanKind::Consumer, &other);
    consumer.span_context = context(1, 2, false, "vendor=value,other=x");
    consumer.parent_span_id = SpanId::from(0x1122334455667788);
    consumer.parent_span_is_remote = true;
    consumer.status = Status::error("stock unavailable");
    let mut events = SpanEvents::default();
    events.events.push(Event::new("exception", UNIX_EPOCH + Duration::from_secs(5), every_value(), 1));
    events.events.push(Event::new("", UNIX_EPOCH, Vec::new(), 0));
    events.dropped_count = 4;
    consumer.events = events;
    let mut links = SpanLinks::default();
    links.links.push(Link::new(context(3, 4, true, "k=v"), vec![KeyValue::new("link", "yes")], 2));
    links.links.push(Link::new(context(5, 6, false, ""), Vec::new(), 0));
    links.dropped_count = 1;
    consumer.links = links;

    let mut client = span("checkout.v1.CheckoutService/Checkout", SpanKind::Client, &tracehop);
    client.parent_span_id = SpanId::from(0xb7ad6b7169203331);
    client.status = Status::error("");
    let internal = span("reserve", SpanKind::Internal, &other);
    let producer = span("publish checkout.processed", SpanKind::Producer, &tracehop);
    vec![server, consumer, client, internal, producer]
}

fn resource() -> Resource {
    Resource::builder_empty()
        .with_service_name("stock")
        .with_attributes([KeyValue::new("service.instance.id", "a1"), KeyValue::new("host.count", 3_i64)])
        .with_schema_url(Vec::<KeyValue>::new(), "https://opentelemetry.io/schemas/1.39.0")
        .build()
}

/// The request the processor sends for `batch`, its spans encoded one by one as they end.
fn encoded(resource: &[u8], batch: &[SpanData]) -> Vec<u8> {
    let mut encoded = EncodedBatch::default();
    batch.iter().for_each(|span| encoded.push(span));
    assert_eq!(encoded.len(), batch.len());
    encoded.request(resource)
}

fn decoded(request: &[u8]) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest::decode(request).expect("our bytes decode as an export request")
}

fn ours(resource: &Resource, batch: &[SpanData]) -> ExportTraceServiceRequest {
    decoded(&encoded(&encode_resource(resource), batch))
}

fn sdks(resource: &Resource, batch: Vec<SpanData>) -> ExportTraceServiceRequest {
    let resource = ResourceAttributesWithSchema::from(resource);
    ExportTraceServiceRequest { resource_spans: group_spans_by_resource_and_scope(batch, &resource) }
}

#[test]
fn the_bytes_decode_to_what_the_sdk_conversion_builds() {
    let (resource, batch) = (resource(), batch());
    let ours = ours(&resource, &batch);
    assert_eq!(ours, sdks(&resource, batch));
    // Not equal by being empty: two scopes, five spans, the attributes all there.
    let scopes = &ours.resource_spans[0].scope_spans;
    assert_eq!(scopes.iter().map(|s| s.spans.len()).collect::<Vec<_>>(), [3, 2]);
    assert_eq!(scopes[0].spans[0].attributes.len(), every_value().len());
}

#[test]
fn an_empty_resource_and_a_single_span_match_too() {
    let resource = Resource::builder_empty().build();
    let batch = vec![span("only", SpanKind::Internal, &InstrumentationScope::builder("s").build())];
    assert_eq!(ours(&resource, &batch), sdks(&resource, batch));
}

#[test]
fn the_same_bytes_come_out_of_the_same_batch() {
    let (resource, batch) = (encode_resource(&resource()), batch());
    let (first, second) = (encoded(&resource, &batch), encoded(&resource, &batch));
    assert_eq!(first, second);
    assert!(first.len() > 500, "a five-span request is not {} bytes", first.len());
}

#[test]
fn a_span_entry_is_the_span_behind_its_key_and_length() {
    // Lengths needing a varint of one byte, two and three; and a scratch holding earlier bytes,
    // which the entry is written after and leaves alone.
    let scope = InstrumentationScope::builder("tracehop").build();
    let sized = |len: usize| SpanData {
        attributes: if len == 0 { Vec::new() } else { vec![KeyValue::new("pad", "p".repeat(len))] },
        ..span("s", SpanKind::Internal, &scope)
    };
    for (span, head) in [(sized(0), 2), (sized(200), 3), (sized(20_000), 4)] {
        let mut expected = Vec::new();
        nested(&mut expected, 2, |buf| encode_span(buf, &span));
        let mut scratch = b"earlier".to_vec();
        let entry = encode_span_entry(&mut scratch, &span).to_vec();
        assert_eq!(entry, expected);
        assert!(scratch.starts_with(b"earlier") && scratch.ends_with(&entry));
        let mut body = Vec::new();
        encode_span(&mut body, &span);
        assert_eq!(expected.len(), body.len() + head, "the head of a {}-byte span", body.len());
    }
}

#[test]
fn a_batch_emptied_for_reuse_sends_only_its_new_spans() {
    let (resource, batch) = (resource(), batch());
    let mut reused = EncodedBatch::default();
    batch.iter().for_each(|span| reused.push(span));
    reused.clear();
    assert_eq!(reused.len(), 0);
    // Only spans of the second scope now: the first scope's emptied group sends no ScopeSpans.
    let second_scope: Vec<SpanData> = batch.into_iter().filter(|s| s.instrumentation_scope.name() == "other").collect();
    assert_eq!(second_scope.len(), 2);
    second_scope.iter().for_each(|span| reused.push(span));
    let request = decoded(&reused.request(&encode_resource(&resource)));
    assert_eq!(request, sdks(&resource, second_scope));
    assert_eq!(request.resource_spans[0].scope_spans.len(), 1);
}

#[test]
fn a_scope_unequal_to_itself_loses_no_span() {
    // A NaN attribute makes the scope unequal to itself: each span gets a group of its own.
    let odd = InstrumentationScope::builder("odd").with_attributes([KeyValue::new("ratio", f64::NAN)]).build();
    let batch = vec![span("first", SpanKind::Internal, &odd), span("second", SpanKind::Internal, &odd)];
    let request = ours(&Resource::builder_empty().build(), &batch);
    let names: Vec<&str> =
        request.resource_spans[0].scope_spans.iter().flat_map(|s| &s.spans).map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["first", "second"]);
}

#[test]
fn retries_wait_between_half_the_backoff_and_all_of_it_and_out_of_step() {
    let backoff = Duration::from_millis(400);
    assert_eq!(jittered(backoff, 0.0), backoff);
    assert_eq!(jittered(backoff, 0.5), Duration::from_millis(300));
    assert!(jittered(backoff, 0.999_999) > Duration::from_millis(200));

    let waits: Vec<Duration> = (0..1_000).map(|_| jittered(backoff, rand::random())).collect();
    assert!(waits.iter().all(|wait| (Duration::from_millis(200)..=backoff).contains(wait)));
    // Spread over the whole range, not bunched: each quarter of it gets its share.
    for quarter in 0..4 {
        let from = Duration::from_millis(200 + 50 * quarter);
        let count = waits.iter().filter(|wait| (from..from + Duration::from_millis(50)).contains(wait)).count();
        assert!((150..=350).contains(&count), "{count} of 1,000 waits in the quarter from {from:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_writes_the_batch_into_the_call_and_hands_it_back_for_reuse() {
    let receiver = tracehop_testkit::otlp::OtlpReceiver::start().await;
    let exporter =
        GrpcSpanExporter::new(receiver.endpoint(), &SpanTransport::default(), &tokio::runtime::Handle::current())
            .expect("exporter");
    let (resource, batch) = (resource(), batch());
    let mut encoded = EncodedBatch::default();
    batch.iter().for_each(|span| encoded.push(span));
    let request = ExportRequest { batch: encoded, resource: encode_resource(&resource) };
    // Blocking, as on the batch thread; the call runs on this test's runtime.
    let (result, returned) =
        tokio::task::spawn_blocking(move || exporter.export_blocking(request)).await.expect("export thread");
    result.expect("the receiver accepts the batch");
    assert_eq!(returned.map(|batch| batch.len()), Some(batch.len()), "the batch comes back, its spans still in it");
    // Both scopes' spans arrive whole: the request was written right into the call's buffer.
    let received = receiver.wait_for(Duration::from_secs(10), |spans| spans.len() >= batch.len()).await;
    let mut names: Vec<&str> = received.iter().map(|span| span.name.as_str()).collect();
    let mut sent: Vec<&str> = batch.iter().map(|span| span.name.as_ref()).collect();
    names.sort_unstable();
    sent.sort_unstable();
    assert_eq!(names, sent);
    assert!(received.iter().all(|span| span.service_name == "stock"));
}
