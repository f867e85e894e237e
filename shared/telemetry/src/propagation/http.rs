//! [`HeaderInjector`]: writes a propagator's fields into an `http::HeaderMap` (HTTP requests,
//! and the metadata of a gRPC call on the wire).
//!
//! `opentelemetry-http`'s injector parses a `HeaderName` from the key and copies the value on
//! every call; the W3C names here are constants and the value `String` becomes the header
//! value without a copy.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::Injector;

use super::w3c::{BAGGAGE, TRACEPARENT, TRACESTATE};

const TRACEPARENT_NAME: HeaderName = HeaderName::from_static(TRACEPARENT);
const TRACESTATE_NAME: HeaderName = HeaderName::from_static(TRACESTATE);
const BAGGAGE_NAME: HeaderName = HeaderName::from_static(BAGGAGE);

/// Injects into `http::HeaderMap`, replacing a header of the same name. A name or value HTTP
/// cannot carry is skipped, as `opentelemetry-http`'s injector does.
#[derive(Debug)]
pub struct HeaderInjector<'a>(pub &'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        let name = match key {
            TRACEPARENT => TRACEPARENT_NAME,
            TRACESTATE => TRACESTATE_NAME,
            BAGGAGE => BAGGAGE_NAME,
            other => match HeaderName::from_bytes(other.as_bytes()) {
                Ok(name) => name,
                Err(_) => return,
            },
        };
        if let Ok(value) = HeaderValue::try_from(value) {
            self.0.insert(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_w3c_and_other_names_and_skips_what_http_cannot_carry() {
        let mut headers = HeaderMap::new();
        let mut injector = HeaderInjector(&mut headers);
        injector.set(TRACEPARENT, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned());
        injector.set("X-B3-TraceId", "0af7651916cd43dd8448eb211c80319c".to_owned());
        injector.set(BAGGAGE, "a=1".to_owned());
        injector.set(BAGGAGE, "a=2".to_owned());
        injector.set("bad name", "x".to_owned());
        injector.set(TRACESTATE, "bad\nvalue".to_owned());
        assert_eq!(headers.len(), 3, "{headers:?}");
        assert_eq!(headers["traceparent"], "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        assert_eq!(headers["x-b3-traceid"], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(headers["baggage"], "a=2", "a second value replaces the first");
    }
}
