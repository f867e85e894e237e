//! Small span helpers every service uses: recording an error the same way everywhere, and
//! copying allow-listed baggage onto spans.

use opentelemetry::baggage::{BaggageExt, KeyValueMetadata};
use opentelemetry::trace::{SpanRef, Status};
use opentelemetry::{Context, KeyValue};
use opentelemetry_semantic_conventions::attribute::ERROR_TYPE;

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

/// `cx` with `key=value` added to its baggage; the entries already there are kept (the SDK's
/// `with_baggage` alone would replace them all).
pub fn with_baggage_entry(cx: &Context, key: &str, value: &str) -> Context {
    let entries: Vec<KeyValueMetadata> = cx
        .baggage()
        .iter()
        .filter(|(existing, _)| existing.as_str() != key)
        .map(|(existing, (value, metadata))| KeyValueMetadata::new(existing.clone(), value.clone(), metadata.clone()))
        .chain(std::iter::once(KeyValueMetadata::new(key.to_owned(), value.to_owned(), "")))
        .collect();
    cx.with_baggage(entries)
}

#[cfg(test)]
mod tests {
    use opentelemetry::baggage::BaggageExt;

    use super::*;

    #[test]
    fn adding_a_baggage_entry_keeps_the_others_and_replaces_its_own() {
        let cx = Context::new().with_baggage([KeyValue::new("team", "a"), KeyValue::new("customer.id", "old")]);
        let cx = with_baggage_entry(&cx, "customer.id", "c-42");
        assert_eq!(cx.baggage().get("team").map(|v| v.as_str().to_owned()), Some("a".into()));
        assert_eq!(cx.baggage().get("customer.id").map(|v| v.as_str().to_owned()), Some("c-42".into()));
        assert_eq!(cx.baggage().len(), 2);
    }

    #[test]
    fn only_allow_listed_baggage_becomes_attributes() {
        let cx = Context::new().with_baggage([KeyValue::new("customer.id", "c-42"), KeyValue::new("secret", "x")]);
        let attributes = baggage_attributes(&cx, &["customer.id".to_owned(), "absent".to_owned()]);
        assert_eq!(attributes, vec![KeyValue::new("customer.id", "c-42")]);
    }
}
