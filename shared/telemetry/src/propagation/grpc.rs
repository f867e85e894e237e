//! Trace context in gRPC metadata (tonic's [`MetadataMap`]).
//!
//! gRPC metadata is HTTP/2 headers, so keys are lowercase ASCII; binary (`-bin`) entries are
//! never trace context and read as absent. A key or value the metadata map cannot hold is
//! skipped rather than panicking the request. Injected values are marked sensitive, which HTTP/2
//! sends as a literal never indexed: most differ from call to call, and indexing them in the
//! connection's HPACK table would evict the headers that repeat (see
//! [`crate::grpc::GrpcClientLayer`]).

use opentelemetry::propagation::{Extractor, Injector};
use tonic::metadata::{KeyAndValueRef, MetadataKey, MetadataMap, MetadataValue};

/// Writes trace context into request or response metadata, e.g. from a tonic interceptor.
#[derive(Debug)]
pub struct MetadataInjector<'a>(pub &'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if value.is_empty() {
            return;
        }
        // `from_bytes` lowercases as it validates, as HTTP/2 requires.
        let (Ok(key), Ok(mut value)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value)) else {
            return;
        };
        value.set_sensitive(true);
        self.0.insert(key, value);
    }
}

/// Reads trace context from request metadata.
#[derive(Debug, Clone, Copy)]
pub struct MetadataExtractor<'a>(pub &'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .iter()
            .filter_map(|entry| match entry {
                KeyAndValueRef::Ascii(key, _) => Some(key.as_str()),
                KeyAndValueRef::Binary(..) => None,
            })
            .collect()
    }

    fn get_all(&self, key: &str) -> Option<Vec<&str>> {
        let values: Vec<&str> = self.0.get_all(key).iter().filter_map(|value| value.to_str().ok()).collect();
        (!values.is_empty()).then_some(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_metadata_cannot_hold_are_skipped_not_panicked_on() {
        let mut metadata = MetadataMap::new();
        let mut injector = MetadataInjector(&mut metadata);
        injector.set("traceparent", "line\nbreak".to_owned());
        injector.set("bad key", "v".to_owned());
        injector.set("tracestate", String::new());
        injector.set("Baggage", "k=v".to_owned());
        assert_eq!(metadata.len(), 1);
        assert_eq!(MetadataExtractor(&metadata).get("baggage"), Some("k=v"));
    }

    #[test]
    fn injected_values_are_sent_never_indexed() {
        let mut metadata = MetadataMap::new();
        MetadataInjector(&mut metadata)
            .set("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        assert!(metadata.get("traceparent").expect("injected").is_sensitive(), "marked never to be indexed by HPACK");
        assert_eq!(
            MetadataExtractor(&metadata).get("traceparent"),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            "and read as any value"
        );
    }

    #[test]
    fn binary_entries_are_never_trace_context() {
        let mut metadata = MetadataMap::new();
        metadata.insert_bin("traceparent-bin", tonic::metadata::MetadataValue::from_bytes(b"\xff"));
        metadata
            .insert("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".parse().expect("ascii"));
        assert_eq!(MetadataExtractor(&metadata).keys(), vec!["traceparent"]);
    }
}
