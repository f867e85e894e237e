//! Small span helpers every service uses: recording an error the same way everywhere, and
//! copying allow-listed baggage onto spans.

use opentelemetry::baggage::BaggageExt;
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
