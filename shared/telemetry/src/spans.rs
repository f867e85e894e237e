//! Small span helpers every service uses: recording an error the same way everywhere, copying
//! allow-listed baggage onto spans, and span names made once.

use std::borrow::Cow;
use std::sync::{Arc, PoisonError, RwLock};

use opentelemetry::baggage::{BaggageExt, KeyValueMetadata};
use opentelemetry::trace::{Link, SpanContext, SpanRef, Status, TraceContextExt};
use opentelemetry::{Context, KeyValue};
use opentelemetry_semantic_conventions::attribute::ERROR_TYPE;

use crate::propagation::baggage::encoded_len;
use crate::propagation::w3c::{MAX_BAGGAGE_LEN, MAX_BAGGAGE_MEMBERS};

/// Marks `span` failed: `error.type`, status Error with `message`, and an `exception` event
/// carrying the message (semantic conventions: "Recording errors on spans").
///
/// `error_type` is low-cardinality (an enum variant or a status code), `message` may be detailed.
pub fn record_error(span: &SpanRef<'_>, error_type: &str, message: &str) {
    span.set_attribute(KeyValue::new(ERROR_TYPE, error_type.to_owned()));
    span.add_event(
        "exception",
        vec![
            KeyValue::new("exception.type", error_type.to_owned()),
            KeyValue::new("exception.message", message.to_owned()),
        ],
    );
    span.set_status(Status::error(message.to_owned()));
}

/// `error` and its causes, joined by `: `, each said once: wrappers often print their cause as
/// their own text (tonic's transport error says only "transport error"; sqlx's repeats the
/// database's message).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    for cause in std::iter::successors(error.source(), |cause| cause.source()) {
        let said = cause.to_string();
        if !text.ends_with(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
    }
    text
}

/// The baggage entries of `cx` whose keys are in `allowed`, as span attributes under the same
/// key (`customer.id`), as OpenTelemetry's baggage span processors name them. An allow-list,
/// because baggage arrives from callers and span attributes are stored and indexed.
pub fn baggage_attributes(cx: &Context, allowed: &[String]) -> Vec<KeyValue> {
    if allowed.is_empty() {
        return Vec::new();
    }
    let baggage = cx.baggage();
    allowed
        .iter()
        .filter_map(|key| baggage.get(key).map(|value| KeyValue::new(key.clone(), value.as_str().to_owned())))
        .collect()
}

/// Puts [`baggage_attributes`] on `cx`'s span, if it records: a span that does not (the SDK
/// disabled, or not sampled) would drop them, after a copy of each value.
pub fn set_baggage_attributes(cx: &Context, allowed: &[String]) {
    if allowed.is_empty() {
        return;
    }
    let span = cx.span();
    if span.is_recording() {
        span.set_attributes(baggage_attributes(cx, allowed));
    }
}

/// A link to `remote`, the span a new trace starts from (`link` modes), or none when there is no
/// valid span to link to.
pub(crate) fn links_to(remote: &SpanContext) -> Vec<Link> {
    if remote.is_valid() { vec![Link::with_context(remote.clone())] } else { Vec::new() }
}

/// `cx` with `key=value` added to its baggage; the entries already there are kept (the SDK's
/// `with_baggage` alone would replace them all) as far as the W3C limits allow once this one is
/// in: 64 members and 8192 bytes of header, as [`W3cBaggagePropagator`](crate::propagation::W3cBaggagePropagator)
/// writes it. The new entry comes first, so a caller's full baggage cannot crowd it out (the
/// SDK drops a 65th entry silently, and an injection over the limits is trimmed).
pub fn with_baggage_entry(cx: &Context, key: &str, value: &str) -> Context {
    let entry = KeyValueMetadata::new(key.to_owned(), value.to_owned(), "");
    if cx.baggage().is_empty() {
        // The usual case: nothing to make room beside.
        return cx.with_baggage([entry]);
    }
    let mut room = MAX_BAGGAGE_LEN.saturating_sub(encoded_len(key, value, ""));
    let mut entries = vec![entry];
    for (existing, (value, metadata)) in cx.baggage() {
        if entries.len() == MAX_BAGGAGE_MEMBERS {
            break;
        }
        // A comma before it.
        let len = 1 + encoded_len(existing.as_str(), value.as_str(), metadata.as_str());
        if existing.as_str() == key || len > room {
            continue;
        }
        room -= len;
        entries.push(KeyValueMetadata::new(existing.clone(), value.clone(), metadata.clone()));
    }
    cx.with_baggage(entries)
}

/// Most names a [`SpanNames`] keeps; past it, names are made per span.
pub(crate) const MAX_NAMES: usize = 64;

/// Longest part a [`SpanNames`] keeps a name for: a gRPC method path comes from the caller.
const MAX_KEPT_PART: usize = 256;

/// Span names made once and kept for the process's life (as
/// [`crate::messaging::Destination`]'s are), each with the part it was made from as a shared
/// string: a layer's spans then build no name and copy no route or method. For names from a
/// small, fixed set (a router's route templates, a server's methods); the first
/// [`MAX_NAMES`] are kept, any others made per span.
#[derive(Debug, Default)]
pub(crate) struct SpanNames {
    names: RwLock<Vec<(&'static str, Arc<str>, &'static str)>>,
}

impl SpanNames {
    /// None kept yet (for a `static`).
    pub(crate) const fn new() -> Self {
        Self { names: RwLock::new(Vec::new()) }
    }

    /// The name `{prefix} {part}` (`part` alone when `prefix` is empty) and `part`, kept on
    /// first sight while there is room.
    pub(crate) fn get(&self, prefix: &'static str, part: &str) -> (Cow<'static, str>, Arc<str>) {
        let full = {
            let names = self.names.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(kept) = find(&names, prefix, part) {
                return kept;
            }
            names.len() >= MAX_NAMES
        };
        if full { made(prefix, part) } else { self.keep(prefix, part) }
    }

    /// The kept name of `prefix` `part`, or one made for this span alone: for a part that is
    /// kept only once it proves to be one of the fixed set (a method the server has), through
    /// [`SpanNames::keep`]. The flag says whether it was kept.
    pub(crate) fn get_unkept(&self, prefix: &'static str, part: &str) -> (Cow<'static, str>, Arc<str>, bool) {
        match find(&self.names.read().unwrap_or_else(PoisonError::into_inner), prefix, part) {
            Some((name, part)) => (name, part, true),
            None => {
                let (name, part) = made(prefix, part);
                (name, part, false)
            }
        }
    }

    /// Keeps the name of `prefix` `part` if there is room, and returns it (made for this span
    /// alone when there is none).
    pub(crate) fn keep(&self, prefix: &'static str, part: &str) -> (Cow<'static, str>, Arc<str>) {
        if part.len() > MAX_KEPT_PART {
            return made(prefix, part);
        }
        let mut names = self.names.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(kept) = find(&names, prefix, part) {
            return kept;
        }
        if names.len() >= MAX_NAMES {
            return made(prefix, part);
        }
        let (name, part) = made(prefix, part);
        let name: &'static str = Box::leak(name.into_owned().into_boxed_str());
        names.push((prefix, part.clone(), name));
        (Cow::Borrowed(name), part)
    }
}

fn find(
    names: &[(&'static str, Arc<str>, &'static str)],
    prefix: &str,
    part: &str,
) -> Option<(Cow<'static, str>, Arc<str>)> {
    names
        .iter()
        .find(|(p, kept, _)| *p == prefix && **kept == *part)
        .map(|(_, kept, name)| (Cow::Borrowed(*name), kept.clone()))
}

/// The name of `prefix` `part`, made for one span.
fn made(prefix: &str, part: &str) -> (Cow<'static, str>, Arc<str>) {
    let name = if prefix.is_empty() { part.to_owned() } else { format!("{prefix} {part}") };
    (Cow::Owned(name), Arc::from(part))
}

#[cfg(test)]
mod tests {
    use opentelemetry::baggage::BaggageExt;
    use opentelemetry::trace::{Span as _, Tracer as _, TracerProvider as _};
    use opentelemetry_sdk::trace::SdkTracerProvider;

    use super::*;
    use crate::testing::Ended;

    #[test]
    fn adding_a_baggage_entry_keeps_the_others_and_replaces_its_own() {
        let cx = Context::new().with_baggage([KeyValue::new("team", "a"), KeyValue::new("customer.id", "old")]);
        let cx = with_baggage_entry(&cx, "customer.id", "c-42");
        assert_eq!(cx.baggage().get("team").map(|v| v.as_str().to_owned()), Some("a".into()));
        assert_eq!(cx.baggage().get("customer.id").map(|v| v.as_str().to_owned()), Some("c-42".into()));
        assert_eq!(cx.baggage().len(), 2);
    }

    #[test]
    fn a_full_baggage_makes_room_for_the_new_entry() {
        use std::collections::HashMap;

        use opentelemetry::propagation::TextMapPropagator;

        use crate::propagation::{CheckedPropagator, W3cBaggagePropagator};

        let propagator = CheckedPropagator::new(W3cBaggagePropagator::new());
        let header = |cx: &Context| {
            let mut carrier: HashMap<String, String> = HashMap::new();
            propagator.inject_context(cx, &mut carrier);
            carrier.remove("baggage").unwrap_or_default()
        };
        // 64 members, the most a caller may send; then members whose encoding (`é` is six
        // bytes) fills the 8192 bytes of header.
        let many = Context::new().with_baggage((0..64).map(|i| KeyValue::new(format!("k{i}"), "v")));
        let big = Context::new().with_baggage((0..8).map(|i| KeyValue::new(format!("k{i}"), "é".repeat(170))));
        for cx in [many, big] {
            let cx = with_baggage_entry(&cx, "customer.id", "c-42");
            assert_eq!(cx.baggage().get("customer.id").map(|v| v.as_str().to_owned()), Some("c-42".into()));
            assert!(cx.baggage().len() <= MAX_BAGGAGE_MEMBERS);
            let sent = header(&cx);
            assert!(sent.len() <= MAX_BAGGAGE_LEN, "{}", sent.len());
            assert!(sent.split(',').any(|member| member == "customer.id=c-42"), "{sent:.100}");
            assert_eq!(sent.split(',').count(), cx.baggage().len(), "nothing trimmed on the way out");
        }
    }

    #[test]
    fn an_error_chain_says_each_cause_once() {
        #[derive(Debug)]
        struct Layer(&'static str, Option<Box<Layer>>);
        impl std::fmt::Display for Layer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for Layer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|cause| cause as _)
            }
        }
        let refused = Layer("refused", None);
        // A wrapper that prints its cause as its own text, under one that does not.
        let error = Layer("transport error", Some(Box::new(Layer("refused", Some(Box::new(refused))))));
        assert_eq!(error_chain(&error), "transport error: refused");
        assert_eq!(error_chain(&Layer("alone", None)), "alone");
    }

    #[test]
    fn only_allow_listed_baggage_becomes_attributes() {
        let cx = Context::new().with_baggage([KeyValue::new("customer.id", "c-42"), KeyValue::new("secret", "x")]);
        let attributes = baggage_attributes(&cx, &["customer.id".to_owned(), "absent".to_owned()]);
        assert_eq!(attributes, vec![KeyValue::new("customer.id", "c-42")]);
    }

    #[test]
    fn a_link_goes_only_to_a_valid_span() {
        let remote = SdkTracerProvider::builder().build().tracer("test").start("caller").span_context().clone();
        let links = links_to(&remote);
        assert_eq!(links.len(), 1);
        assert_eq!(links[0].span_context, remote);
        assert!(links_to(&SpanContext::NONE).is_empty(), "no caller, no link");
    }

    #[test]
    fn baggage_attributes_go_on_a_recording_span() {
        let ended = Ended::default();
        let provider = SdkTracerProvider::builder().with_span_processor(ended.clone()).build();
        let allowed = ["customer.id".to_owned()];
        let baggage = Context::new().with_baggage([KeyValue::new("customer.id", "c-42")]);
        let recording = baggage.with_span(provider.tracer("test").start("recording"));
        set_baggage_attributes(&recording, &allowed);
        recording.span().end();
        let spans = ended.take();
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].attributes, vec![KeyValue::new("customer.id", "c-42")]);
    }

    #[test]
    fn span_names_are_made_once_per_prefix_and_part() {
        let names = SpanNames::default();
        let (first, route) = names.get("POST", "/api/checkout");
        assert_eq!((&*first, &*route), ("POST /api/checkout", "/api/checkout"));
        let (again, same_route) = names.get("POST", &String::from("/api/checkout"));
        assert!(std::ptr::eq(first.as_ptr(), again.as_ptr()), "the name is made once");
        assert!(Arc::ptr_eq(&route, &same_route), "the part is shared");
        assert_eq!(names.get("GET", "/api/checkout").0, "GET /api/checkout");
        assert_eq!(names.get("", "checkout.v1.CheckoutService/Checkout").0, "checkout.v1.CheckoutService/Checkout");
    }

    #[test]
    fn span_names_past_the_bounds_are_made_per_span() {
        let names = SpanNames::default();
        for index in 0..MAX_NAMES {
            assert!(matches!(names.get("GET", &format!("/r{index}")).0, Cow::Borrowed(_)));
        }
        let (name, route) = names.get("GET", "/one-more");
        assert!(matches!(name, Cow::Owned(_)), "not kept past the bound");
        assert_eq!((&*name, &*route), ("GET /one-more", "/one-more"));
        assert!(matches!(names.get("GET", "/r0").0, Cow::Borrowed(_)), "kept names still are");
        assert_eq!(names.names.read().expect("unpoisoned").len(), MAX_NAMES);

        let full = names.names.read().expect("unpoisoned").len();
        assert_eq!(names.keep("GET", "/kept-past-the-bound").0, "GET /kept-past-the-bound");
        assert_eq!(names.names.read().expect("unpoisoned").len(), full, "keep respects the bound too");

        let long = "x".repeat(MAX_KEPT_PART + 1);
        let fresh = SpanNames::default();
        let (name, part) = fresh.get("", &long);
        assert!(matches!(name, Cow::Owned(_)) && *part == *long, "a long part is not kept");
        assert!(fresh.names.read().expect("unpoisoned").is_empty());
    }

    #[test]
    fn a_part_looked_up_unkept_is_kept_only_when_asked() {
        let names = SpanNames::default();
        let (name, part, kept) = names.get_unkept("", "made.up/Method");
        assert!(!kept && matches!(name, Cow::Owned(_)) && *part == *"made.up/Method");
        assert!(names.names.read().expect("unpoisoned").is_empty(), "nothing kept on sight");
        let (kept_name, _) = names.keep("", "checkout.v1.CheckoutService/Checkout");
        let (name, _, kept) = names.get_unkept("", "checkout.v1.CheckoutService/Checkout");
        assert!(kept && std::ptr::eq(name.as_ptr(), kept_name.as_ptr()), "kept once asked");
    }
}
