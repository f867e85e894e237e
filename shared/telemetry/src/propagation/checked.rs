//! [`CheckedPropagator`]: the W3C checks in front of any propagator, on every carrier.
//!
//! Wrapping the propagator rather than each carrier means the AMQP, gRPC and HTTP paths cannot
//! drift apart: whatever carrier a service uses, an invalid `traceparent` never reaches the SDK
//! parser and an oversize `tracestate` or `baggage` never reaches the next hop.

use std::borrow::Cow;
use std::cell::OnceCell;

use opentelemetry::Context;
use opentelemetry::propagation::text_map_propagator::FieldIter;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};

use super::counters::{Refusal, record};
use super::w3c::{BAGGAGE, Bounded, TRACEPARENT, TRACESTATE, bound_baggage, bound_tracestate, is_valid_traceparent};

/// A propagator whose extraction validates `traceparent` strictly and bounds `tracestate` and
/// `baggage`, and whose injection bounds them again and skips empty values.
#[derive(Debug, Clone)]
pub struct CheckedPropagator<P> {
    inner: P,
}

impl<P: TextMapPropagator> CheckedPropagator<P> {
    /// Puts the checks in front of `inner`.
    pub fn new(inner: P) -> Self {
        Self { inner }
    }
}

impl<P: TextMapPropagator> TextMapPropagator for CheckedPropagator<P> {
    fn inject_context(&self, cx: &Context, injector: &mut dyn Injector) {
        self.inner.inject_context(cx, &mut BoundedInjector { inner: injector });
    }

    fn extract_with_context(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
        self.inner.extract_with_context(cx, &CheckedExtractor::new(extractor))
    }

    fn fields(&self) -> FieldIter<'_> {
        self.inner.fields()
    }
}

/// Bounds what a propagator writes: baggage added in-process can be as large as the code that
/// added it, and the Rust propagator writes `tracestate: ""` when there is none.
struct BoundedInjector<'a> {
    inner: &'a mut dyn Injector,
}

impl Injector for BoundedInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if value.is_empty() {
            return;
        }
        let bounded = if key.eq_ignore_ascii_case(TRACESTATE) {
            checked(bound_tracestate(&value), TRACESTATE)
        } else if key.eq_ignore_ascii_case(BAGGAGE) {
            checked(bound_baggage(&value), BAGGAGE)
        } else {
            None
        };
        match bounded {
            None => self.inner.set(key, value),
            Some(None) => {}
            Some(Some(shorter)) => self.inner.set(key, shorter),
        }
    }

    fn reserve(&mut self, additional: usize) {
        self.inner.reserve(additional);
    }
}

/// `None`: the value passes as it is; `Some(None)`: drop it; `Some(Some(v))`: write `v`.
fn checked(bounded: Bounded<'_>, header: &str) -> Option<Option<String>> {
    match bounded {
        Bounded::Kept(_) => None,
        Bounded::Trimmed(shorter) => {
            record(trimmed(header), header);
            Some(Some(shorter))
        }
        Bounded::Dropped => {
            record(dropped(header), header);
            Some(None)
        }
    }
}

fn trimmed(header: &str) -> Refusal {
    if header == TRACESTATE { Refusal::TracestateTrimmed } else { Refusal::BaggageTrimmed }
}

fn dropped(header: &str) -> Refusal {
    if header == TRACESTATE { Refusal::TracestateDropped } else { Refusal::BaggageDropped }
}

/// Reads the W3C headers through the checks, lazily: a propagator that never asks for
/// `baggage` pays nothing for it.
struct CheckedExtractor<'a> {
    inner: &'a dyn Extractor,
    traceparent: OnceCell<Option<&'a str>>,
    tracestate: OnceCell<Option<Cow<'a, str>>>,
    baggage: OnceCell<Option<Cow<'a, str>>>,
}

impl<'a> CheckedExtractor<'a> {
    fn new(inner: &'a dyn Extractor) -> Self {
        Self { inner, traceparent: OnceCell::new(), tracestate: OnceCell::new(), baggage: OnceCell::new() }
    }

    fn traceparent(&self) -> Option<&'a str> {
        *self.traceparent.get_or_init(|| {
            // HTTP strips optional whitespace around a field value; do the same for every carrier.
            let value = self.inner.get(TRACEPARENT)?.trim_matches([' ', '\t']);
            if is_valid_traceparent(value) {
                Some(value)
            } else {
                record(Refusal::InvalidTraceparent, TRACEPARENT);
                None
            }
        })
    }

    fn tracestate(&self) -> Option<&str> {
        self.tracestate
            .get_or_init(|| {
                // W3C §3.3.1: tracestate means nothing without a valid traceparent.
                self.traceparent()?;
                // Several header lines (HTTP; gRPC metadata too) are one list, joined with
                // commas (W3C §3.3.1.1, RFC 9110 §5.3). One line, the usual case, is read as
                // is: a carrier's `get_all` allocates.
                let first = self.inner.get(TRACESTATE)?;
                match self.inner.get_all(TRACESTATE) {
                    Some(lines) if lines.len() > 1 => {
                        let joined = lines.join(",");
                        bounded(bound_tracestate(&joined), TRACESTATE).map(|value| Cow::Owned(value.into_owned()))
                    }
                    _ => bounded(bound_tracestate(first), TRACESTATE),
                }
            })
            .as_deref()
    }

    fn baggage(&self) -> Option<&str> {
        self.baggage.get_or_init(|| bounded(bound_baggage(self.inner.get(BAGGAGE)?), BAGGAGE)).as_deref()
    }
}

fn bounded<'a>(bounded: Bounded<'a>, header: &str) -> Option<Cow<'a, str>> {
    match &bounded {
        Bounded::Kept(_) => {}
        Bounded::Trimmed(_) => record(trimmed(header), header),
        Bounded::Dropped => record(dropped(header), header),
    }
    bounded.into_value()
}

impl Extractor for CheckedExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        if key.eq_ignore_ascii_case(TRACEPARENT) {
            self.traceparent()
        } else if key.eq_ignore_ascii_case(TRACESTATE) {
            self.tracestate()
        } else if key.eq_ignore_ascii_case(BAGGAGE) {
            self.baggage()
        } else {
            self.inner.get(key)
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.inner.keys()
    }

    fn get_all(&self, key: &str) -> Option<Vec<&str>> {
        // Repeated W3C headers would bypass the bounds; the checked single value stands for all.
        let w3c = [TRACEPARENT, TRACESTATE, BAGGAGE].iter().any(|h| key.eq_ignore_ascii_case(h));
        if w3c { self.get(key).map(|value| vec![value]) } else { self.inner.get_all(key) }
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;
    use opentelemetry::trace::TraceContextExt as _;

    use super::*;
    use crate::propagation::{HeaderExtractor, W3cTraceContextPropagator};

    #[test]
    fn tracestate_lines_are_one_list_and_one_line_is_read_as_is() {
        let propagator = CheckedPropagator::new(W3cTraceContextPropagator::new());
        let extract = |lines: &[&str]| {
            let mut headers = HeaderMap::new();
            headers.insert(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".parse().expect("ascii"),
            );
            for line in lines {
                headers.append("tracestate", line.parse().expect("ascii"));
            }
            let cx = propagator.extract(&HeaderExtractor(&headers));
            cx.span().span_context().trace_state().header()
        };
        assert_eq!(extract(&["rojo=00f067aa0ba902b7", "congo=t61rcWkgMzE"]), "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE");
        assert_eq!(extract(&["rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"]), "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE");
        // The bounds hold over the lines together: 33 members in all is too many (§3.3.1.1).
        let sixteen = (0..16).map(|i| format!("k{i}=v")).collect::<Vec<_>>().join(",");
        let seventeen = (16..33).map(|i| format!("k{i}=v")).collect::<Vec<_>>().join(",");
        assert_eq!(extract(&[&sixteen, &seventeen]), "");
    }
}
