//! `OTEL_PROPAGATORS`, which the Rust SDK does not read: parsed here, strictly.
//!
//! | name | propagator | crate |
//! |---|---|---|
//! | `tracecontext` | W3C Trace Context | [`W3cTraceContextPropagator`] (the SDK's, without `format!` and radix parsing) |
//! | `baggage` | W3C Baggage | [`W3cBaggagePropagator`] (the SDK's reading, with less copying; its writing encodes `%`, which the SDK's does not) |
//! | `b3` | B3 single header (`b3:`) | opentelemetry-zipkin |
//! | `b3multi` | B3 multiple headers (`x-b3-*`) | opentelemetry-zipkin |
//! | `none` | nothing is injected or extracted | - |
//!
//! B3 comes from opentelemetry-zipkin 0.33: released by the OpenTelemetry Rust project for 0.33,
//! but the crate as a whole is marked deprecated (for its Zipkin *exporter*; Zipkin ingests OTLP
//! now). It is still the only B3 propagator for this SDK version, hence the `allow(deprecated)`.
//!
//! `jaeger`, `xray` and `ottrace` are valid names in the spec, but no maintained crate provides
//! them for opentelemetry 0.33 (opentelemetry-jaeger-propagator stopped at 0.32): asking for
//! one stops startup rather than silently not propagating.

use opentelemetry::propagation::{TextMapCompositePropagator, TextMapPropagator};
#[allow(deprecated)]
use opentelemetry_zipkin::{B3Encoding, Propagator as B3Propagator};

use crate::env::ConfigError;
use crate::propagation::{W3cBaggagePropagator, W3cTraceContextPropagator};

/// The variable this module reads.
pub const OTEL_PROPAGATORS: &str = "OTEL_PROPAGATORS";

/// One propagator name from `OTEL_PROPAGATORS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropagatorKind {
    /// W3C `traceparent` / `tracestate`.
    TraceContext,
    /// W3C `baggage`.
    Baggage,
    /// B3 single header.
    B3,
    /// B3 multiple headers.
    B3Multi,
}

/// The spec's default: `tracecontext,baggage`.
pub const DEFAULT_PROPAGATORS: [PropagatorKind; 2] = [PropagatorKind::TraceContext, PropagatorKind::Baggage];

/// Parses an `OTEL_PROPAGATORS` value. `none` alone means no propagation.
pub fn parse_propagators(value: &str) -> Result<Vec<PropagatorKind>, ConfigError> {
    let names: Vec<String> =
        value.split(',').map(|name| name.trim().to_ascii_lowercase()).filter(|name| !name.is_empty()).collect();
    if names.iter().any(|name| name == "none") {
        return if names.len() == 1 {
            Ok(Vec::new())
        } else {
            Err(ConfigError::new(OTEL_PROPAGATORS, "\"none\" cannot be combined with other propagators"))
        };
    }
    let mut kinds = Vec::new();
    for name in &names {
        let kind = match name.as_str() {
            "tracecontext" => PropagatorKind::TraceContext,
            "baggage" => PropagatorKind::Baggage,
            "b3" => PropagatorKind::B3,
            "b3multi" => PropagatorKind::B3Multi,
            "jaeger" | "xray" | "ottrace" => {
                return Err(ConfigError::new(
                    OTEL_PROPAGATORS,
                    format!(
                        "{name:?} has no maintained implementation for opentelemetry 0.33; use tracecontext, baggage, b3, b3multi or none"
                    ),
                ));
            }
            other => {
                return Err(ConfigError::new(
                    OTEL_PROPAGATORS,
                    format!("unknown propagator {other:?}; known: tracecontext, baggage, b3, b3multi, none"),
                ));
            }
        };
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    if kinds.is_empty() {
        return Err(ConfigError::new(OTEL_PROPAGATORS, "no propagator named; use \"none\" to turn propagation off"));
    }
    Ok(kinds)
}

#[allow(deprecated)] // opentelemetry-zipkin, see the module documentation.
/// The composite propagator for `kinds`, in the order given (extraction: later ones win).
pub fn composite(kinds: &[PropagatorKind]) -> TextMapCompositePropagator {
    let propagators: Vec<Box<dyn TextMapPropagator + Send + Sync>> = kinds
        .iter()
        .map(|kind| -> Box<dyn TextMapPropagator + Send + Sync> {
            match kind {
                PropagatorKind::TraceContext => Box::new(W3cTraceContextPropagator::new()),
                PropagatorKind::Baggage => Box::new(W3cBaggagePropagator::new()),
                PropagatorKind::B3 => Box::new(B3Propagator::with_encoding(B3Encoding::SingleHeader)),
                PropagatorKind::B3Multi => Box::new(B3Propagator::with_encoding(B3Encoding::MultipleHeader)),
            }
        })
        .collect();
    TextMapCompositePropagator::new(propagators)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_names_in_any_case_and_order() {
        assert_eq!(parse_propagators("tracecontext,baggage"), Ok(DEFAULT_PROPAGATORS.to_vec()));
        assert_eq!(
            parse_propagators(" B3 , tracecontext,b3multi,b3"),
            Ok(vec![PropagatorKind::B3, PropagatorKind::TraceContext, PropagatorKind::B3Multi])
        );
        assert_eq!(parse_propagators("none"), Ok(vec![]));
    }

    #[test]
    fn unknown_and_unavailable_names_stop_startup() {
        for (value, expected) in [
            ("tracecontext,w3c", "unknown propagator \"w3c\""),
            ("jaeger", "no maintained implementation"),
            ("xray", "no maintained implementation"),
            ("none,baggage", "cannot be combined"),
            (",", "no propagator named"),
        ] {
            let error = parse_propagators(value).expect_err(value);
            assert_eq!(error.variable, OTEL_PROPAGATORS);
            assert!(error.message.contains(expected), "{value}: {error}");
        }
    }
}
