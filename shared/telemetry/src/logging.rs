//! Log lines that carry the trace: every event logged inside a span gets `trace_id` and
//! `span_id`, so a log search leads to the trace in Jaeger and back.
//!
//! The services start spans with the OpenTelemetry API and carry them across `.await`s with
//! `FutureExt::with_context`, so the active span is `Context::current()` whenever a log line is
//! written; the formatter reads it from there. Human-readable lines by default, one JSON object
//! per line with `LOG_FORMAT=json`. `RUST_LOG` filters as usual ([`LogFilter`]).

use std::fmt;

use opentelemetry::trace::TraceContextExt;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::env::{ConfigError, Env};

/// How log lines are written (`LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// `2026-11-22T10:00:00.000000Z  INFO target: message key=value trace_id=… span_id=…`
    Text,
    /// `{"timestamp":…,"level":…,"target":…,"message":…,"trace_id":…,"span_id":…}`
    Json,
}

impl LogFormat {
    /// Reads `LOG_FORMAT` (`text`, the default, or `json`).
    pub fn from_lookup(env: &Env<'_>) -> Result<Self, ConfigError> {
        env.choice_or("LOG_FORMAT", &[("text", LogFormat::Text), ("json", LogFormat::Json)], LogFormat::Text)
    }
}

/// What is logged when `RUST_LOG` is unset: our own info, other crates' warnings.
const DEFAULT_FILTER: &str = "info,h2=warn,hyper=warn,hyper_util=warn,tower=warn,sqlx=warn";

/// Which log lines are written (`RUST_LOG`).
#[derive(Debug)]
pub struct LogFilter(EnvFilter);

impl LogFilter {
    /// Reads `RUST_LOG`: unset (or empty) is our own info and other crates' warnings; a filter
    /// that does not parse is an error, rather than silently the default (or, empty, no logs).
    pub fn from_lookup(env: &Env<'_>) -> Result<Self, ConfigError> {
        match env.get("RUST_LOG") {
            None => Ok(Self(EnvFilter::new(DEFAULT_FILTER))),
            Some(value) => EnvFilter::builder()
                .parse(&value)
                .map(Self)
                .map_err(|error| ConfigError::new("RUST_LOG", format!("cannot use {value:?}: {error}"))),
        }
    }
}

/// Installs the process-wide log subscriber. Call once, first thing in `main`.
///
/// Returns an error when a subscriber is already installed.
pub fn init_logging(format: LogFormat, filter: LogFilter) -> Result<(), tracing_subscriber::util::TryInitError> {
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::fmt().with_env_filter(filter.0).event_format(CorrelatedFormat { format }).finish().try_init()
}

/// A [`FormatEvent`] that appends the active trace and span ids.
#[derive(Debug, Clone, Copy)]
pub struct CorrelatedFormat {
    /// Text or JSON.
    pub format: LogFormat,
}

impl<S, N> FormatEvent<S, N> for CorrelatedFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let cx = opentelemetry::Context::current();
        let span = cx.span();
        let ids = span.span_context().is_valid().then(|| {
            let span_context = span.span_context();
            (span_context.trace_id().to_string(), span_context.span_id().to_string())
        });
        let metadata = event.metadata();
        match self.format {
            LogFormat::Text => {
                SystemTime.format_time(&mut writer)?;
                write!(writer, " {:>5} {}: {}", metadata.level(), metadata.target(), fields.message)?;
                for (key, value) in &fields.others {
                    match value {
                        Value::String(text) => write!(writer, " {key}={text:?}")?,
                        other => write!(writer, " {key}={other}")?,
                    }
                }
                if let Some((trace_id, span_id)) = ids {
                    write!(writer, " trace_id={trace_id} span_id={span_id}")?;
                }
                writeln!(writer)
            }
            LogFormat::Json => {
                let mut timestamp = String::new();
                SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
                let mut line = Map::new();
                line.insert("timestamp".into(), Value::String(timestamp));
                line.insert("level".into(), Value::String(metadata.level().to_string()));
                line.insert("target".into(), Value::String(metadata.target().to_owned()));
                line.insert("message".into(), Value::String(fields.message));
                for (key, value) in fields.others {
                    line.insert(key, value);
                }
                if let Some((trace_id, span_id)) = ids {
                    line.insert("trace_id".into(), Value::String(trace_id));
                    line.insert("span_id".into(), Value::String(span_id));
                }
                writeln!(writer, "{}", Value::Object(line))
            }
        }
    }
}

/// An event's fields: the message apart, the rest in order.
#[derive(Default)]
struct Fields {
    message: String,
    others: Vec<(String, Value)>,
}

impl Fields {
    fn push(&mut self, field: &Field, value: Value) {
        self.others.push((field.name().to_owned(), value));
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else {
            self.push(field, Value::String(value.to_owned()));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push(field, Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.push(field, Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.push(field, Value::from(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.push(field, Value::from(value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // The whole cause chain: "cannot publish: connection reset: broken pipe".
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        self.push(field, Value::String(text));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.push(field, Value::String(format!("{value:?}")));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use opentelemetry::Context;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    #[test]
    fn rust_log_unset_or_empty_is_the_default_and_a_bad_one_names_the_variable() {
        use std::collections::HashMap;

        let read = |value: Option<&str>| {
            let map: HashMap<String, String> =
                value.map(|v| ("RUST_LOG".to_owned(), v.to_owned())).into_iter().collect();
            LogFilter::from_lookup(&Env::from_map(&map)).map(|filter| filter.0.to_string())
        };
        let default = read(None).expect("unset");
        assert!(default.contains("h2=warn"), "{default}");
        assert_eq!(read(Some("")).expect("empty"), default, "empty is unset, not 'log nothing'");
        assert!(read(Some("debug,lapin=warn")).expect("valid").contains("lapin=warn"));
        let error = read(Some("info,foo=bogus")).expect_err("a level that does not exist");
        assert_eq!(error.variable, "RUST_LOG");
        assert!(error.message.contains("info,foo=bogus"), "{error}");
    }

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().map_err(|_| io::Error::other("poisoned"))?.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    fn log_inside_a_span(format: LogFormat) -> String {
        let captured = Captured::default();
        let subscriber =
            tracing_subscriber::fmt().with_writer(captured.clone()).event_format(CorrelatedFormat { format }).finish();
        let span_context = SpanContext::new(
            TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").expect("hex"),
            SpanId::from_hex("b7ad6b7169203331").expect("hex"),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside");
            let _guard = Context::new().with_remote_span_context(span_context).attach();
            tracing::info!(order_id = "o-1", units = 3, "reserved");
        });
        let bytes = captured.0.lock().expect("lock").clone();
        String::from_utf8(bytes).expect("utf8")
    }

    #[test]
    fn text_lines_inside_a_span_carry_trace_and_span_ids() {
        let output = log_inside_a_span(LogFormat::Text);
        let lines: Vec<&str> = output.lines().collect();
        assert_eq!(lines.len(), 2, "{output}");
        assert!(!lines[0].contains("trace_id"), "{}", lines[0]);
        assert!(lines[1].contains("reserved order_id=\"o-1\" units=3"), "{}", lines[1]);
        assert!(
            lines[1].ends_with("trace_id=0af7651916cd43dd8448eb211c80319c span_id=b7ad6b7169203331"),
            "{}",
            lines[1]
        );
    }

    #[test]
    fn json_lines_inside_a_span_carry_trace_and_span_ids() {
        let output = log_inside_a_span(LogFormat::Json);
        let lines: Vec<Value> = output.lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
        assert_eq!(lines[0].get("trace_id"), None);
        assert_eq!(lines[1]["message"], "reserved");
        assert_eq!(lines[1]["order_id"], "o-1");
        assert_eq!(lines[1]["units"], 3);
        assert_eq!(lines[1]["level"], "INFO");
        assert_eq!(lines[1]["trace_id"], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(lines[1]["span_id"], "b7ad6b7169203331");
    }
}
