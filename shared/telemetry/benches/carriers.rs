//! Inject and extract per carrier, beside the bare SDK propagator over a `HashMap` (the
//! baseline every Rust OpenTelemetry user pays already). The carriers run with what the
//! services use, [`CheckedPropagator`] over [`W3cTraceContextPropagator`]; the AMQP carrier
//! also runs with the checks over the SDK's propagator. Run with
//! `cargo bench -p tracehop-telemetry --bench carriers`.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use http::HeaderMap;
use lapin::types::FieldTable;
use opentelemetry::Context;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::MetadataMap;
use tracehop_telemetry::propagation::{
    AmqpHeaderExtractor, AmqpHeaderInjector, CheckedPropagator, HeaderExtractor, HeaderInjector, MetadataExtractor,
    MetadataInjector, W3cTraceContextPropagator,
};

fn context() -> Context {
    let state: TraceState = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE".parse().expect("tracestate");
    Context::new().with_remote_span_context(SpanContext::new(
        TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").expect("hex"),
        SpanId::from_hex("b7ad6b7169203331").expect("hex"),
        TraceFlags::SAMPLED,
        true,
        state,
    ))
}

fn carriers(c: &mut Criterion) {
    let cx = context();
    let sdk = TraceContextPropagator::new();
    let checked = CheckedPropagator::new(W3cTraceContextPropagator::new());
    let checked_sdk = CheckedPropagator::new(TraceContextPropagator::new());

    let mut group = c.benchmark_group("inject");
    group.bench_function("baseline: sdk propagator, HashMap", |b| {
        b.iter(|| {
            let mut carrier: HashMap<String, String> = HashMap::new();
            sdk.inject_context(black_box(&cx), &mut carrier);
            carrier
        })
    });
    group.bench_function("amqp: checked propagator, FieldTable", |b| {
        b.iter(|| {
            let mut headers = FieldTable::default();
            checked.inject_context(black_box(&cx), &mut AmqpHeaderInjector(&mut headers));
            headers
        })
    });
    group.bench_function("amqp: checked sdk propagator, FieldTable", |b| {
        b.iter(|| {
            let mut headers = FieldTable::default();
            checked_sdk.inject_context(black_box(&cx), &mut AmqpHeaderInjector(&mut headers));
            headers
        })
    });
    group.bench_function("grpc: checked propagator, MetadataMap", |b| {
        b.iter(|| {
            let mut metadata = MetadataMap::new();
            checked.inject_context(black_box(&cx), &mut MetadataInjector(&mut metadata));
            metadata
        })
    });
    group.bench_function("http: checked propagator, HeaderMap", |b| {
        b.iter(|| {
            let mut headers = HeaderMap::new();
            checked.inject_context(black_box(&cx), &mut HeaderInjector(&mut headers));
            headers
        })
    });
    group.finish();

    let mut map: HashMap<String, String> = HashMap::new();
    sdk.inject_context(&cx, &mut map);
    let mut table = FieldTable::default();
    checked.inject_context(&cx, &mut AmqpHeaderInjector(&mut table));
    let mut metadata = MetadataMap::new();
    checked.inject_context(&cx, &mut MetadataInjector(&mut metadata));
    let mut headers = HeaderMap::new();
    checked.inject_context(&cx, &mut HeaderInjector(&mut headers));

    let mut group = c.benchmark_group("extract");
    group.bench_function("baseline: sdk propagator, HashMap", |b| b.iter(|| sdk.extract(black_box(&map))));
    group.bench_function("amqp: checked propagator, FieldTable", |b| {
        b.iter(|| checked.extract(&AmqpHeaderExtractor(black_box(&table))))
    });
    group.bench_function("amqp: checked sdk propagator, FieldTable", |b| {
        b.iter(|| checked_sdk.extract(&AmqpHeaderExtractor(black_box(&table))))
    });
    group.bench_function("grpc: checked propagator, MetadataMap", |b| {
        b.iter(|| checked.extract(&MetadataExtractor(black_box(&metadata))))
    });
    group.bench_function("http: checked propagator, HeaderMap", |b| {
        b.iter(|| checked.extract(&HeaderExtractor(black_box(&headers))))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = carriers
}
criterion_main!(benches);
