//! What the crate's unit tests share.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanProcessor};

use crate::{ConfigError, Env, TelemetryConfig};

/// The gateway's configuration read from `pairs` as its environment.
pub(crate) fn config(pairs: &[(&str, &str)]) -> Result<TelemetryConfig, ConfigError> {
    let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    TelemetryConfig::from_lookup("gateway", &Env::from_map(&map))
}

/// A span processor that keeps every span that ends, in the order they end.
#[derive(Debug, Clone, Default)]
pub(crate) struct Ended(Arc<Mutex<Vec<SpanData>>>);

impl Ended {
    /// The spans ended so far, taken.
    pub(crate) fn take(&self) -> Vec<SpanData> {
        std::mem::take(&mut self.0.lock().expect("the test's lock"))
    }
}

impl SpanProcessor for Ended {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        self.0.lock().expect("the test's lock").push(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}
