//! W3C Trace Context (`traceparent`, `tracestate`), written and read byte by byte.
//!
//! The SDK's `TraceContextPropagator` formats `traceparent` through `format!` and the `LowerHex`
//! of a `u128`, and parses it by splitting into a `Vec` and `from_str_radix`: about 4,000
//! instructions per inject or extract under callgrind, on every hop of every order. This one
//! writes the 55 bytes from a table and reads them with [`super::w3c::parse_traceparent`], which
//! checks and decodes in one pass. It behaves as the SDK's does, except that it accepts only what
//! [`super::w3c::is_valid_traceparent`] accepts (the SDK takes forms W3C rejects): only the
//! sampled flag is kept, an unparsable `tracestate` is dropped whole, the
//! extracted context is remote, and nothing is injected for an invalid span context.

use std::str::FromStr;
use std::sync::LazyLock;

use opentelemetry::Context;
use opentelemetry::propagation::text_map_propagator::FieldIter;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};

use super::w3c::{TRACEPARENT, TRACESTATE, parse_traceparent};

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Writes `bytes` as lowercase hex into `out` (two digits per byte).
fn hex_into(out: &mut [u8], bytes: &[u8]) {
    for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0x0f)];
    }
}

/// A `String` of bytes [`hex_into`] wrote: ASCII, so the UTF-8 check cannot fail (and is cheap,
/// ASCII being its fast path).
fn ascii(bytes: &[u8]) -> String {
    std::str::from_utf8(bytes).expect("hex digits are ASCII").to_owned()
}

/// `00-<trace id>-<span id>-<flags>` of `span_context`, the sampled flag alone.
pub fn traceparent(span_context: &SpanContext) -> String {
    ascii(&traceparent_bytes(span_context))
}

/// What [`traceparent`] writes, as ASCII bytes on the stack: for a writer that puts it beside
/// other bytes in a buffer of its own.
pub fn traceparent_bytes(span_context: &SpanContext) -> [u8; 55] {
    let mut value = *b"00-00000000000000000000000000000000-0000000000000000-00";
    hex_into(&mut value[3..35], &span_context.trace_id().to_bytes());
    hex_into(&mut value[36..52], &span_context.span_id().to_bytes());
    hex_into(&mut value[53..55], &[(span_context.trace_flags() & TraceFlags::SAMPLED).to_u8()]);
    value
}

/// The 32 lowercase hex digits of a trace id (what Jaeger's URLs and the logs show), on the
/// stack: [`trace_id_hex`] makes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceIdHex([u8; 32]);

impl TraceIdHex {
    /// The digits.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits are ASCII")
    }

    /// The digits' ASCII bytes, for a writer that takes bytes (no UTF-8 check).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// The 32 lowercase hex digits of `trace_id`, written without an allocation.
pub fn trace_id_hex(trace_id: TraceId) -> TraceIdHex {
    let mut value = [0u8; 32];
    hex_into(&mut value, &trace_id.to_bytes());
    TraceIdHex(value)
}

/// The span context a valid `traceparent` (and its `tracestate`) describe.
fn span_context(traceparent: &str, tracestate: Option<&str>) -> Option<SpanContext> {
    let fields = parse_traceparent(traceparent.trim())?;
    let trace_state = tracestate.and_then(|value| TraceState::from_str(value).ok()).unwrap_or_default();
    Some(SpanContext::new(
        TraceId::from_bytes(fields.trace_id),
        SpanId::from_bytes(fields.parent_id),
        TraceFlags::new(fields.flags) & TraceFlags::SAMPLED,
        true,
        trace_state,
    ))
}

/// W3C Trace Context propagation; see the module documentation.
#[derive(Debug, Default, Clone, Copy)]
pub struct W3cTraceContextPropagator;

impl W3cTraceContextPropagator {
    /// A new propagator.
    pub fn new() -> Self {
        Self
    }
}

static FIELDS: LazyLock<[String; 2]> = LazyLock::new(|| [TRACEPARENT.to_owned(), TRACESTATE.to_owned()]);

impl TextMapPropagator for W3cTraceContextPropagator {
    fn inject_context(&self, cx: &Context, injector: &mut dyn Injector) {
        let span = cx.span();
        let span_context = span.span_context();
        if !span_context.is_valid() {
            return;
        }
        injector.set(TRACEPARENT, traceparent(span_context));
        if *span_context.trace_state() != TraceState::NONE {
            injector.set(TRACESTATE, span_context.trace_state().header());
        }
    }

    fn extract_with_context(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
        match extractor.get(TRACEPARENT).and_then(|value| span_context(value, extractor.get(TRACESTATE))) {
            Some(remote) => cx.with_remote_span_context(remote),
            None => cx.clone(),
        }
    }

    fn fields(&self) -> FieldIter<'_> {
        FieldIter::new(FIELDS.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use opentelemetry_sdk::propagation::TraceContextPropagator;

    use super::*;

    const SPEC_EXAMPLE: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn extract(propagator: &dyn TextMapPropagator, headers: &[(&str, &str)]) -> SpanContext {
        let carrier: HashMap<String, String> =
            headers.iter().map(|(key, value)| ((*key).to_owned(), (*value).to_owned())).collect();
        propagator.extract(&carrier).span().span_context().clone()
    }

    fn inject(propagator: &dyn TextMapPropagator, span_context: SpanContext) -> HashMap<String, String> {
        let mut carrier = HashMap::new();
        propagator.inject_context(&Context::new().with_remote_span_context(span_context), &mut carrier);
        carrier
    }

    #[test]
    fn extracts_what_the_sdk_extracts_from_valid_headers() {
        let cases: [&[(&str, &str)]; 6] = [
            &[(TRACEPARENT, SPEC_EXAMPLE)],
            &[(TRACEPARENT, SPEC_EXAMPLE), (TRACESTATE, "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")],
            &[(TRACEPARENT, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")],
            // Unknown flags are zeroed; only sampled is kept.
            &[(TRACEPARENT, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-09")],
            // A future version with a field more.
            &[(TRACEPARENT, "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-the-future-holds")],
            // An invalid tracestate is dropped, the parent is kept.
            &[(TRACEPARENT, SPEC_EXAMPLE), (TRACESTATE, "not a tracestate")],
        ];
        for headers in cases {
            let ours = extract(&W3cTraceContextPropagator::new(), headers);
            assert!(ours.is_valid() && ours.is_remote(), "{headers:?}");
            assert_eq!(ours, extract(&TraceContextPropagator::new(), headers), "{headers:?}");
        }
    }

    #[test]
    fn invalid_traceparent_leaves_the_context_as_it_was() {
        for value in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
        ] {
            assert_eq!(
                extract(&W3cTraceContextPropagator::new(), &[(TRACEPARENT, value)]),
                SpanContext::empty_context()
            );
        }
    }

    #[test]
    fn injects_what_the_sdk_injects() {
        let state = TraceState::from_str("rojo=00f067aa0ba902b7").expect("tracestate");
        for (flags, trace_state) in [(TraceFlags::SAMPLED, TraceState::NONE), (TraceFlags::new(0x09), state)] {
            let context = SpanContext::new(
                TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").expect("trace id"),
                SpanId::from_hex("b7ad6b7169203331").expect("span id"),
                flags,
                true,
                trace_state,
            );
            let mut sdk = inject(&TraceContextPropagator::new(), context.clone());
            // The SDK writes an empty `tracestate`; this propagator leaves it out.
            sdk.retain(|_, value| !value.is_empty());
            assert_eq!(inject(&W3cTraceContextPropagator::new(), context), sdk);
        }
        assert!(inject(&W3cTraceContextPropagator::new(), SpanContext::empty_context()).is_empty());
    }

    #[test]
    fn names_the_fields_it_uses() {
        assert_eq!(W3cTraceContextPropagator::new().fields().collect::<Vec<_>>(), ["traceparent", "tracestate"]);
    }

    #[test]
    fn trace_ids_print_as_32_hex_digits() {
        let trace_id = TraceId::from_hex("000f651916cd43dd8448eb211c80319c").expect("trace id");
        assert_eq!(trace_id_hex(trace_id).as_str(), trace_id.to_string());
        assert_eq!(trace_id_hex(trace_id).as_bytes(), trace_id.to_string().as_bytes());
    }
}
