//! Property tests of the carriers: any valid context round-trips through each of them, and no
//! header table or metadata map, however strange, makes extraction panic or yield an invalid
//! context.

use std::collections::BTreeMap;

use http::HeaderMap;
use lapin::types::{AMQPValue, ByteArray, FieldArray, FieldTable, LongString, ShortString};
use opentelemetry::baggage::BaggageExt;
use opentelemetry::propagation::{TextMapCompositePropagator, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracehop_telemetry::propagation::w3c::is_valid_traceparent;
use tracehop_telemetry::propagation::{
    AmqpHeaderExtractor, AmqpHeaderInjector, CheckedPropagator, HeaderExtractor, HeaderInjector, MetadataExtractor,
    MetadataInjector, W3cBaggagePropagator,
};
use tracehop_telemetry::propagators::{DEFAULT_PROPAGATORS, composite};

/// The services' propagator (ours: `OTEL_PROPAGATORS`' default) and the same checks in front of
/// the SDK's Trace Context propagator: every property holds for both.
fn propagators() -> [CheckedPropagator<TextMapCompositePropagator>; 2] {
    [
        CheckedPropagator::new(composite(&DEFAULT_PROPAGATORS)),
        CheckedPropagator::new(TextMapCompositePropagator::new(vec![
            Box::new(TraceContextPropagator::new()),
            Box::new(W3cBaggagePropagator::new()),
        ])),
    ]
}

/// A context as a caller could legitimately send it: valid ids, a tracestate and baggage
/// within the W3C limits.
#[derive(Debug, Clone)]
struct Sent {
    trace_id: u128,
    span_id: u64,
    sampled: bool,
    trace_state: Vec<(String, String)>,
    baggage: BTreeMap<String, String>,
}

impl Sent {
    fn context(&self) -> Context {
        let state = TraceState::from_key_value(self.trace_state.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .expect("valid tracestate");
        let flags = if self.sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
        let span_context =
            SpanContext::new(TraceId::from(self.trace_id), SpanId::from(self.span_id), flags, true, state);
        Context::new()
            .with_remote_span_context(span_context)
            .with_baggage(self.baggage.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())))
    }

    fn check(&self, received: &Context) {
        let span = received.span();
        let span_context = span.span_context();
        assert!(span_context.is_valid());
        assert_eq!(span_context.trace_id(), TraceId::from(self.trace_id));
        assert_eq!(span_context.span_id(), SpanId::from(self.span_id));
        assert_eq!(span_context.is_sampled(), self.sampled);
        let expected_state: Vec<String> = self.trace_state.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(span_context.trace_state().header(), expected_state.join(","));
        let baggage: BTreeMap<String, String> =
            received.baggage().iter().map(|(k, (v, _))| (k.to_string(), v.as_str().to_owned())).collect();
        assert_eq!(baggage, self.baggage);
    }
}

fn sent() -> impl Strategy<Value = Sent> {
    let state_key = "[a-z][a-z0-9_*/-]{0,20}";
    // Printable ASCII except ',' and '=', not ending in a space (W3C nblk-chr).
    let state_value = "[!-+\\--<>-~][ !-+\\--<>-~]{0,30}[!-+\\--<>-~]";
    let baggage_key = "[A-Za-z0-9_.-]{1,16}";
    // Values are percent-encoded on the wire: any printable text round-trips (trimmed).
    let baggage_value = "[!-~]([ -~]{0,30}[!-~])?";
    (
        1..=u128::MAX,
        1..=u64::MAX,
        any::<bool>(),
        btree_map(state_key, state_value, 0..8),
        btree_map(baggage_key, baggage_value, 0..8),
    )
        .prop_map(|(trace_id, span_id, sampled, state, baggage)| Sent {
            trace_id,
            span_id,
            sampled,
            trace_state: state.into_iter().collect(),
            baggage,
        })
}

/// A header value as foreign clients may send it.
fn amqp_value() -> impl Strategy<Value = AMQPValue> {
    let leaf = prop_oneof![
        ".*".prop_map(|s: String| AMQPValue::LongString(LongString::from(s))),
        vec(any::<u8>(), 0..80).prop_map(|b| AMQPValue::LongString(LongString::from(b))),
        vec(any::<u8>(), 0..80).prop_map(|b| AMQPValue::ByteArray(ByteArray::from(b))),
        "[ -~]{0,60}".prop_map(|s: String| AMQPValue::ShortString(ShortString::from(s))),
        "00-[0-9a-fA-F+-]{28,34}-[0-9a-f]{14,18}-[0-9a-f+]{1,3}-?"
            .prop_map(|s: String| AMQPValue::LongString(LongString::from(s))),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<bool>().prop_map(AMQPValue::Boolean),
        Just(AMQPValue::Void),
    ];
    leaf.prop_recursive(2, 16, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
            btree_map(header_key(), inner, 0..4).prop_map(|m| AMQPValue::FieldTable(table(m))),
        ]
    })
}

fn header_key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("traceparent".to_owned()),
        Just("Traceparent".to_owned()),
        Just("TRACEPARENT".to_owned()),
        Just("tracestate".to_owned()),
        Just("baggage".to_owned()),
        Just("Baggage".to_owned()),
        "[a-zA-Z-]{1,20}",
    ]
}

fn table(entries: BTreeMap<String, AMQPValue>) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in entries {
        table.insert(ShortString::from(key), value);
    }
    table
}

fn extracted_is_valid(cx: &Context) {
    let span = cx.span();
    let span_context = span.span_context();
    if span_context.is_valid() {
        let traceparent = format!(
            "00-{}-{}-{:02x}",
            span_context.trace_id(),
            span_context.span_id(),
            span_context.trace_flags().to_u8()
        );
        assert!(is_valid_traceparent(&traceparent), "{traceparent}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_valid_context_round_trips_through_amqp_headers(sent in sent()) {
        for propagator in propagators() {
            let mut headers = FieldTable::default();
            propagator.inject_context(&sent.context(), &mut AmqpHeaderInjector(&mut headers));
            for (_, value) in &headers {
                prop_assert!(matches!(value, AMQPValue::LongString(_)), "only long strings are written");
            }
            sent.check(&propagator.extract(&AmqpHeaderExtractor(&headers)));
        }
    }

    #[test]
    fn any_valid_context_round_trips_through_grpc_metadata(sent in sent()) {
        for propagator in propagators() {
            let mut metadata = MetadataMap::new();
            propagator.inject_context(&sent.context(), &mut MetadataInjector(&mut metadata));
            sent.check(&propagator.extract(&MetadataExtractor(&metadata)));
        }
    }

    #[test]
    fn any_valid_context_round_trips_through_http_headers(sent in sent()) {
        for propagator in propagators() {
            let mut headers = HeaderMap::new();
            propagator.inject_context(&sent.context(), &mut HeaderInjector(&mut headers));
            sent.check(&propagator.extract(&HeaderExtractor(&headers)));
        }
    }

    #[test]
    fn extraction_from_any_field_table_never_panics(entries in btree_map(header_key(), amqp_value(), 0..8)) {
        let headers = table(entries);
        for propagator in propagators() {
            extracted_is_valid(&propagator.extract(&AmqpHeaderExtractor(&headers)));
        }
    }

    #[test]
    fn extraction_from_any_metadata_map_never_panics(
        ascii in btree_map(header_key().prop_map(|k| k.to_ascii_lowercase()), "[ -~]{0,120}", 0..6),
        binary in btree_map("[a-z]{1,10}-bin", vec(any::<u8>(), 0..40), 0..3),
    ) {
        let mut metadata = MetadataMap::new();
        for (key, value) in ascii {
            if let (Ok(key), Ok(value)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value.as_str())) {
                metadata.append(key, value);
            }
        }
        for (key, value) in binary {
            if let Ok(key) = MetadataKey::from_bytes(key.as_bytes()) {
                metadata.append_bin(key, MetadataValue::from_bytes(&value));
            }
        }
        for propagator in propagators() {
            extracted_is_valid(&propagator.extract(&MetadataExtractor(&metadata)));
        }
    }
}
