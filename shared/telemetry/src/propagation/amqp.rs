//! Trace context in AMQP 0-9-1 message headers (lapin's [`FieldTable`]).
//!
//! Write side: lowercase keys, values as long strings (`S`), empty values skipped. RabbitMQ
//! rejects short-string (`s`) values in headers with a channel error, and the Rust propagator
//! writes `tracestate: ""` when there is no trace state.
//!
//! Read side: long strings and byte arrays (`x`, what some clients send for `bytes`) holding
//! UTF-8; the exact key first, then any letter case (other clients write `Traceparent`); any
//! other value type or invalid UTF-8 reads as absent, counted, and never panics. Strict
//! `traceparent` validation and the size bounds live in [`super::CheckedPropagator`].

use lapin::types::{AMQPValue, FieldTable, ShortString};
use opentelemetry::propagation::{Extractor, Injector};

use super::counters::{Refusal, record};

/// Writes trace context into message headers.
///
/// ```
/// use lapin::types::FieldTable;
/// use opentelemetry::propagation::TextMapPropagator;
/// use opentelemetry_sdk::propagation::TraceContextPropagator;
/// use tracehop_telemetry::propagation::{AmqpHeaderInjector, CheckedPropagator};
///
/// let propagator = CheckedPropagator::new(TraceContextPropagator::new());
/// let mut headers = FieldTable::default();
/// propagator.inject_context(&opentelemetry::Context::current(), &mut AmqpHeaderInjector(&mut headers));
/// ```
#[derive(Debug)]
pub struct AmqpHeaderInjector<'a>(pub &'a mut FieldTable);

impl Injector for AmqpHeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if value.is_empty() {
            return;
        }
        // A field name is a short string: over 255 bytes it cannot be written at all.
        let Ok(key) = ShortString::try_new(key.to_ascii_lowercase()) else {
            return;
        };
        self.0.insert(key, AMQPValue::LongString(value.into()));
    }
}

/// Reads trace context from message headers.
#[derive(Debug, Clone, Copy)]
pub struct AmqpHeaderExtractor<'a>(pub &'a FieldTable);

impl Extractor for AmqpHeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let headers = self.0.inner();
        let value = match headers.get(key) {
            Some(value) => value,
            None => headers.iter().find(|(name, _)| name.as_str().eq_ignore_ascii_case(key))?.1,
        };
        let text = header_text(value);
        if text.is_none() {
            record(Refusal::UnreadableHeader, key);
        }
        text
    }

    fn keys(&self) -> Vec<&str> {
        self.0.inner().keys().map(ShortString::as_str).collect()
    }
}

/// The UTF-8 text of a string-like header value.
fn header_text(value: &AMQPValue) -> Option<&str> {
    match value {
        AMQPValue::LongString(text) => std::str::from_utf8(text.as_bytes()).ok(),
        AMQPValue::ByteArray(bytes) => std::str::from_utf8(bytes.as_slice()).ok(),
        AMQPValue::ShortString(text) => Some(text.as_str()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::{ByteArray, FieldArray, LongString};
    use opentelemetry::Context;
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
    use opentelemetry_sdk::propagation::TraceContextPropagator;

    use super::*;
    use crate::propagation::CheckedPropagator;

    const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn propagator() -> CheckedPropagator<TraceContextPropagator> {
        CheckedPropagator::new(TraceContextPropagator::new())
    }

    fn headers(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
        let mut table = FieldTable::default();
        for (key, value) in entries {
            table.insert(key.into(), value);
        }
        table
    }

    fn long(text: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(text))
    }

    /// The trace id the propagator extracts, if it extracts one.
    fn extracted_trace_id(table: &FieldTable) -> Option<TraceId> {
        let cx = propagator().extract(&AmqpHeaderExtractor(table));
        let span = cx.span();
        let span_context = span.span_context();
        span_context.is_valid().then(|| span_context.trace_id())
    }

    fn expected_trace_id() -> TraceId {
        TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").expect("valid hex")
    }

    fn sampled_context(trace_state: TraceState) -> Context {
        Context::new().with_remote_span_context(SpanContext::new(
            expected_trace_id(),
            SpanId::from_hex("b7ad6b7169203331").expect("valid hex"),
            TraceFlags::SAMPLED,
            true,
            trace_state,
        ))
    }

    #[test]
    fn injector_writes_lowercase_long_strings_and_skips_empty_tracestate() {
        let mut table = FieldTable::default();
        propagator().inject_context(&sampled_context(TraceState::default()), &mut AmqpHeaderInjector(&mut table));
        assert_eq!(table.inner().get("traceparent"), Some(&long(TRACEPARENT)));
        assert!(!table.contains_key("tracestate"), "empty tracestate must not be written");
        assert_eq!(table.inner().len(), 1);
    }

    #[test]
    fn injector_lowercases_keys_itself() {
        let mut table = FieldTable::default();
        AmqpHeaderInjector(&mut table).set("TraceParent", TRACEPARENT.to_owned());
        assert_eq!(table.inner().get("traceparent"), Some(&long(TRACEPARENT)));
    }

    #[test]
    fn injector_skips_keys_no_amqp_field_name_can_hold() {
        let mut table = FieldTable::default();
        AmqpHeaderInjector(&mut table).set(&"k".repeat(256), "v".to_owned());
        assert!(table.inner().is_empty());
    }

    #[test]
    fn injector_writes_a_non_empty_tracestate() {
        let state: TraceState = "rojo=00f067aa0ba902b7".parse().expect("valid tracestate");
        let mut table = FieldTable::default();
        propagator().inject_context(&sampled_context(state), &mut AmqpHeaderInjector(&mut table));
        assert_eq!(table.inner().get("tracestate"), Some(&long("rojo=00f067aa0ba902b7")));
    }

    #[test]
    fn extracts_a_long_string() {
        let table = headers(vec![("traceparent", long(TRACEPARENT))]);
        assert_eq!(extracted_trace_id(&table), Some(expected_trace_id()));
    }

    #[test]
    fn extracts_a_byte_array_holding_utf8() {
        let table = headers(vec![("traceparent", AMQPValue::ByteArray(ByteArray::from(TRACEPARENT.as_bytes())))]);
        assert_eq!(extracted_trace_id(&table), Some(expected_trace_id()));
    }

    #[test]
    fn extracts_an_upper_case_key() {
        let table = headers(vec![("TRACEPARENT", long(TRACEPARENT))]);
        assert_eq!(extracted_trace_id(&table), Some(expected_trace_id()));
        let table = headers(vec![("Traceparent", long(TRACEPARENT))]);
        assert_eq!(extracted_trace_id(&table), Some(expected_trace_id()));
    }

    #[test]
    fn exact_key_wins_over_other_letter_cases() {
        let other = "00-11111111111111111111111111111111-b7ad6b7169203331-01";
        let table = headers(vec![("Traceparent", long(other)), ("traceparent", long(TRACEPARENT))]);
        assert_eq!(extracted_trace_id(&table), Some(expected_trace_id()));
    }

    #[test]
    fn absent_headers_give_a_new_trace() {
        assert_eq!(extracted_trace_id(&FieldTable::default()), None);
    }

    #[test]
    fn non_string_values_give_a_new_trace() {
        let mut nested = FieldTable::default();
        nested.insert("traceparent".into(), long(TRACEPARENT));
        let values = [
            AMQPValue::LongLongInt(42),
            AMQPValue::LongInt(42),
            AMQPValue::Boolean(true),
            AMQPValue::FieldTable(nested),
            AMQPValue::FieldArray(FieldArray::from(vec![long(TRACEPARENT)])),
            AMQPValue::Void,
        ];
        for value in values {
            let before = super::super::counters::count(Refusal::UnreadableHeader);
            let table = headers(vec![("traceparent", value.clone())]);
            assert_eq!(extracted_trace_id(&table), None, "{value:?}");
            assert!(super::super::counters::count(Refusal::UnreadableHeader) > before);
        }
    }

    #[test]
    fn invalid_utf8_gives_a_new_trace() {
        let mut bytes = TRACEPARENT.as_bytes().to_vec();
        bytes[10] = 0xff;
        for value in
            [AMQPValue::LongString(LongString::from(bytes.clone())), AMQPValue::ByteArray(ByteArray::from(bytes))]
        {
            assert_eq!(extracted_trace_id(&headers(vec![("traceparent", value)])), None);
        }
    }

    #[test]
    fn oversize_traceparent_gives_a_new_trace() {
        let huge = format!("{TRACEPARENT}{}", "0".repeat(1 << 20));
        assert_eq!(extracted_trace_id(&headers(vec![("traceparent", long(&huge))])), None);
    }

    #[test]
    fn malformed_traceparents_the_sdk_would_accept_give_a_new_trace() {
        let cases = [
            "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",
            "00-+af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "0-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
        ];
        for case in cases {
            assert_eq!(extracted_trace_id(&headers(vec![("traceparent", long(case))])), None, "{case}");
        }
    }

    #[test]
    fn tracestate_is_dropped_when_traceparent_is_invalid() {
        let table = headers(vec![("traceparent", long("00-junk")), ("tracestate", long("rojo=00f067aa0ba902b7"))]);
        let cx = propagator().extract(&AmqpHeaderExtractor(&table));
        assert!(cx.span().span_context().trace_state().header().is_empty());
    }

    #[test]
    fn oversize_tracestate_is_dropped_but_the_trace_continues() {
        let state = (0..40).map(|i| format!("k{i}=v")).collect::<Vec<_>>().join(",");
        let table = headers(vec![("traceparent", long(TRACEPARENT)), ("tracestate", long(&state))]);
        let cx = propagator().extract(&AmqpHeaderExtractor(&table));
        assert_eq!(cx.span().span_context().trace_id(), expected_trace_id());
        assert!(cx.span().span_context().trace_state().header().is_empty());
    }
}
