//! What the crate's unit tests share.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanProcessor};

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
