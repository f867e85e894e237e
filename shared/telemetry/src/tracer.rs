//! The tracer a service starts its spans with: the SDK's, or a no-op one when the SDK is
//! disabled, as one concrete type.
//!
//! The API's `BoxedTracer` would do the same behind a `Box<dyn ..>`, but every span it starts
//! is a boxed span, and `Context::with_span` boxes whatever span it is given once more: two
//! allocations and two virtual calls per span operation where one of each will do. An enum
//! costs a branch instead (callgrind, span start with its two spans per service and order:
//! 1.29-1.38k -> 1.05-1.20k instructions).

use std::borrow::Cow;
use std::time::SystemTime;

use opentelemetry::trace::noop::{NoopSpan, NoopTracer};
use opentelemetry::trace::{Span, SpanBuilder, SpanContext, Status, Tracer};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::SdkTracer;

/// Starts a service's spans: recording through the SDK, or not at all (`OTEL_SDK_DISABLED`),
/// in which case its spans only carry their parent's context on.
#[derive(Debug, Clone)]
pub enum ServiceTracer {
    /// The SDK's tracer.
    Sdk(SdkTracer),
    /// Spans that record nothing.
    Noop(NoopTracer),
}

/// A span [`ServiceTracer`] started.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "boxing the SDK's span is the allocation this type saves; a no-op span is moved once into its context"
)]
pub enum ServiceSpan {
    /// Recorded by the SDK.
    Sdk(opentelemetry_sdk::trace::Span),
    /// Records nothing.
    Noop(NoopSpan),
}

impl ServiceTracer {
    /// Starts a span under `parent` from the builder `build` makes, calling `build` only for the
    /// SDK's tracer (whose sampler is given the name, kind, attributes and links). With the SDK
    /// disabled the span only carries `parent`'s context on: its attributes (a vector, shared
    /// strings cloned, values copied) and links would be made to be thrown away on every request.
    pub fn start_lazily(&self, parent: &Context, build: impl FnOnce() -> SpanBuilder) -> ServiceSpan {
        match self {
            Self::Sdk(tracer) => ServiceSpan::Sdk(tracer.build_with_context(build(), parent)),
            // The no-op tracer reads only the parent; `NoopSpan` has no public constructor.
            Self::Noop(tracer) => ServiceSpan::Noop(tracer.build_with_context(SpanBuilder::from_name(""), parent)),
        }
    }
}

impl Tracer for ServiceTracer {
    type Span = ServiceSpan;

    fn build_with_context(&self, builder: SpanBuilder, parent_cx: &Context) -> Self::Span {
        match self {
            Self::Sdk(tracer) => ServiceSpan::Sdk(tracer.build_with_context(builder, parent_cx)),
            Self::Noop(tracer) => ServiceSpan::Noop(tracer.build_with_context(builder, parent_cx)),
        }
    }
}

/// Calls `$method` on whichever span `$span` holds.
macro_rules! either {
    ($span:expr, $inner:ident => $call:expr) => {
        match $span {
            ServiceSpan::Sdk($inner) => $call,
            ServiceSpan::Noop($inner) => $call,
        }
    };
}

impl Span for ServiceSpan {
    fn add_event<T>(&mut self, name: T, attributes: Vec<KeyValue>)
    where
        T: Into<Cow<'static, str>>,
    {
        // Delegated, not the trait's default: a no-op span then reads no clock.
        either!(self, span => span.add_event(name, attributes));
    }

    fn add_event_with_timestamp<T>(&mut self, name: T, timestamp: SystemTime, attributes: Vec<KeyValue>)
    where
        T: Into<Cow<'static, str>>,
    {
        either!(self, span => span.add_event_with_timestamp(name, timestamp, attributes));
    }

    fn span_context(&self) -> &SpanContext {
        either!(self, span => span.span_context())
    }

    fn is_recording(&self) -> bool {
        either!(self, span => span.is_recording())
    }

    fn set_attribute(&mut self, attribute: KeyValue) {
        either!(self, span => span.set_attribute(attribute));
    }

    fn set_attributes(&mut self, attributes: impl IntoIterator<Item = KeyValue>) {
        either!(self, span => span.set_attributes(attributes));
    }

    fn set_status(&mut self, status: Status) {
        either!(self, span => span.set_status(status));
    }

    fn update_name<T>(&mut self, new_name: T)
    where
        T: Into<Cow<'static, str>>,
    {
        either!(self, span => span.update_name(new_name));
    }

    fn add_link(&mut self, span_context: SpanContext, attributes: Vec<KeyValue>) {
        either!(self, span => span.add_link(span_context, attributes));
    }

    fn end_with_timestamp(&mut self, timestamp: SystemTime) {
        either!(self, span => span.end_with_timestamp(timestamp));
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanKind, TraceContextExt, TracerProvider as _};
    use opentelemetry_sdk::trace::SdkTracerProvider;

    use super::*;
    use crate::testing::Ended;

    #[test]
    fn the_sdk_tracer_records_what_its_spans_are_told() {
        let ended = Ended::default();
        let provider = SdkTracerProvider::builder().with_span_processor(ended.clone()).build();
        let tracer = ServiceTracer::Sdk(provider.tracer("test"));
        let parent = tracer.start("parent");
        let parent_context = parent.span_context().clone();
        let cx = Context::new().with_span(parent);
        let mut child = tracer.span_builder("child").with_kind(SpanKind::Client).start_with_context(&tracer, &cx);
        assert!(child.is_recording());
        child.set_attribute(KeyValue::new("a", 1));
        child.set_attributes([KeyValue::new("b", "two")]);
        child.add_event("happened", vec![KeyValue::new("c", true)]);
        child.add_link(parent_context.clone(), Vec::new());
        child.update_name("renamed");
        child.set_status(Status::error("broken"));
        child.end();
        cx.span().end();

        let spans = ended.take();
        let child = spans.iter().find(|span| span.name == "renamed").expect("the child span");
        assert_eq!(child.parent_span_id, parent_context.span_id());
        assert_eq!(child.span_context.trace_id(), parent_context.trace_id());
        assert_eq!(child.span_kind, SpanKind::Client);
        assert_eq!(child.attributes, vec![KeyValue::new("a", 1), KeyValue::new("b", "two")]);
        assert_eq!(child.events.events[0].name, "happened");
        assert_eq!(child.links.links[0].span_context, parent_context);
        assert_eq!(child.status, Status::error("broken"));
        assert_eq!(spans.len(), 2);
    }

    #[test]
    fn a_lazy_start_builds_the_span_only_for_the_sdk() {
        let ended = Ended::default();
        let provider = SdkTracerProvider::builder().with_span_processor(ended.clone()).build();
        let remote = Context::new().with_span(provider.tracer("test").start("remote parent"));
        let built = std::cell::Cell::new(0);
        let build = || {
            built.set(built.get() + 1);
            SpanBuilder::from_name("lazy").with_kind(SpanKind::Producer).with_attributes([KeyValue::new("a", 1)])
        };

        let noop = ServiceTracer::Noop(NoopTracer::new()).start_lazily(&remote, build);
        assert_eq!(built.get(), 0, "the no-op tracer never calls the builder");
        assert!(!noop.is_recording());
        assert_eq!(noop.span_context(), remote.span().span_context(), "and still carries the parent on");

        let mut sdk = ServiceTracer::Sdk(provider.tracer("test")).start_lazily(&remote, build);
        assert_eq!(built.get(), 1);
        sdk.end();
        let spans = ended.take();
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].name, "lazy");
        assert_eq!(spans[0].span_kind, SpanKind::Producer);
        assert_eq!(spans[0].attributes, vec![KeyValue::new("a", 1)]);
        assert_eq!(spans[0].parent_span_id, remote.span().span_context().span_id());
    }

    #[test]
    fn the_noop_tracer_records_nothing_and_carries_the_parent_on() {
        let sdk = SdkTracerProvider::builder().build().tracer("test");
        let parent = Context::new().with_span(sdk.start("remote parent"));
        let tracer = ServiceTracer::Noop(NoopTracer::new());
        let mut span = tracer.start_with_context("ignored", &parent);
        assert!(!span.is_recording());
        span.set_attribute(KeyValue::new("a", 1));
        assert_eq!(span.span_context(), parent.span().span_context());
    }
}
