//! Where an order's time goes: the spans the benchmark's receiver wrote to a file
//! (`bench --dump-spans`), each order's six joined by trace, and the time between them.
//!
//! An order's spans, by service and kind: the gateway's SERVER span (the POST) and its CLIENT
//! span (the gRPC call), checkout's SERVER and PRODUCER spans (the publish, from `basic.publish`
//! to the broker's confirm), stock's CONSUMER and CLIENT spans (the store write). Each part
//! below is the time from one of these edges to the next.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;

use crate::report::histogram;

/// The six spans of an order, in the order of `SPANS`: (start, end), ns since the epoch.
type Order = [Option<(u64, u64)>; 6];

const SPANS: [(&str, SpanKind); 6] = [
    ("gateway", SpanKind::Server),
    ("gateway", SpanKind::Client),
    ("checkout", SpanKind::Server),
    ("checkout", SpanKind::Producer),
    ("stock", SpanKind::Consumer),
    ("stock", SpanKind::Client),
];
const GATEWAY: usize = 0;
const CALL: usize = 1;
const CHECKOUT: usize = 2;
const PUBLISH: usize = 3;
const PROCESS: usize = 4;
const STORE: usize = 5;

/// A span's start (`false`) or end (`true`).
type Edge = (usize, bool);

/// The parts of an order, each from one edge of a span to an edge of another: (name, from, to).
const PARTS: [(&str, Edge, Edge); 10] = [
    ("POST (the gateway's span)", (GATEWAY, false), (GATEWAY, true)),
    ("gateway, before the call", (GATEWAY, false), (CALL, false)),
    ("gRPC to checkout", (CALL, false), (CHECKOUT, false)),
    ("checkout, before publishing", (CHECKOUT, false), (PUBLISH, false)),
    ("publish -> confirm", (PUBLISH, false), (PUBLISH, true)),
    ("checkout, after the confirm", (PUBLISH, true), (CHECKOUT, true)),
    ("gRPC back to the gateway", (CHECKOUT, true), (CALL, true)),
    ("gateway, after the call", (CALL, true), (GATEWAY, true)),
    ("publish -> stock's delivery", (PUBLISH, false), (PROCESS, false)),
    ("stock's store write", (STORE, false), (STORE, true)),
];

/// Reads a dump: each export body behind its length (`u32`, little-endian), each body one or
/// more gRPC messages (a flag byte, a big-endian `u32` length, an `ExportTraceServiceRequest`).
fn orders(dump: &[u8]) -> anyhow::Result<Vec<Order>> {
    let mut orders: HashMap<Vec<u8>, Order> = HashMap::new();
    let mut rest = dump;
    while !rest.is_empty() {
        let (body, after) = take(rest, 4, |len| u32::from_le_bytes(len.try_into().unwrap_or_default()))?;
        rest = after;
        let mut messages = body;
        while !messages.is_empty() {
            anyhow::ensure!(messages[0] == 0, "a compressed export: run the services with no OTLP compression");
            let (message, after) =
                take(&messages[1..], 4, |len| u32::from_be_bytes(len.try_into().unwrap_or_default()))?;
            messages = after;
            for resource in ExportTraceServiceRequest::decode(message)?.resource_spans {
                let service = resource.resource.iter().flat_map(|r| &r.attributes).find_map(|a| {
                    match a.value.as_ref().and_then(|v| v.value.as_ref()) {
                        Some(Value::StringValue(name)) if a.key == "service.name" => Some(name.clone()),
                        _ => None,
                    }
                });
                for span in resource.scope_spans.into_iter().flat_map(|scope| scope.spans) {
                    let slot = SPANS
                        .iter()
                        .position(|(name, kind)| service.as_deref() == Some(*name) && span.kind == *kind as i32);
                    if let Some(slot) = slot {
                        orders.entry(span.trace_id).or_default()[slot] =
                            Some((span.start_time_unix_nano, span.end_time_unix_nano));
                    }
                }
            }
        }
    }
    Ok(orders.into_values().filter(|order| order.iter().all(Option::is_some)).collect())
}

/// Splits `len_bytes` bytes of length (decoded by `len`) and that many bytes off `input`.
fn take(input: &[u8], len_bytes: usize, len: impl Fn(&[u8]) -> u32) -> anyhow::Result<(&[u8], &[u8])> {
    anyhow::ensure!(input.len() >= len_bytes, "the dump ends inside a length");
    let (prefix, rest) = input.split_at(len_bytes);
    let n = len(prefix) as usize;
    anyhow::ensure!(rest.len() >= n, "the dump ends inside a message ({n} bytes announced, {} left)", rest.len());
    Ok(rest.split_at(n))
}

/// The table: each part's p50, p99 and p99.9, and its mean over the slowest 1% of POSTs.
fn table(orders: &[Order]) -> String {
    let edge = |order: &Order, (span, end): Edge| {
        let (start, finish) = order[span].unwrap_or_default();
        if end { finish } else { start }
    };
    let part = |order: &Order, (_, from, to): (&str, Edge, Edge)| edge(order, to).saturating_sub(edge(order, from));
    let mut post: Vec<u64> = orders.iter().map(|order| part(order, PARTS[0])).collect();
    post.sort_unstable();
    let slow_from = post.get(post.len() * 99 / 100).copied().unwrap_or(u64::MAX);
    let slowest: Vec<&Order> = orders.iter().filter(|order| part(order, PARTS[0]) >= slow_from).collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} orders with all six spans; the slowest 1%: POST >= {:.2} ms\n",
        orders.len(),
        slow_from as f64 / 1e6
    );
    let _ = writeln!(out, "| part | p50 | p99 | p99.9 | mean, slowest 1% |");
    let _ = writeln!(out, "|---|---|---|---|---|");
    for spec in PARTS {
        let mut histogram = histogram();
        for order in orders {
            let _ = histogram.record((part(order, spec) / 1000).max(1));
        }
        let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
        let mean = slowest.iter().map(|order| part(order, spec) as f64).sum::<f64>() / slowest.len().max(1) as f64;
        let _ = writeln!(
            out,
            "| {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
            spec.0,
            ms(0.5),
            ms(0.99),
            ms(0.999),
            mean / 1e6
        );
    }
    out
}

/// Prints where the orders in `dump` spent their time.
pub fn run(dump: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(dump).map_err(|e| anyhow::anyhow!("{}: {e}", dump.display()))?;
    let orders = orders(&bytes)?;
    anyhow::ensure!(!orders.is_empty(), "{}: no order with all six spans", dump.display());
    println!("{}", table(&orders));
    Ok(())
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    use super::*;

    /// One service's export, as the SDK sends it: its resource (`service.name`) and its spans.
    fn export(service: &str, spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![KeyValue {
                        key: "service.name".to_owned(),
                        value: Some(AnyValue { value: Some(Value::StringValue(service.to_owned())) }),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans { spans, ..Default::default() }],
                ..Default::default()
            }],
        }
    }

    fn span(trace: u8, kind: SpanKind, start_us: u64, end_us: u64) -> Span {
        Span {
            trace_id: vec![trace; 16],
            kind: kind as i32,
            start_time_unix_nano: start_us * 1000,
            end_time_unix_nano: end_us * 1000,
            ..Default::default()
        }
    }

    /// One order's exports, one per service, its six spans at these (start, end) µs, in the
    /// order of `SPANS`.
    fn order_exports(trace: u8, times: [(u64, u64); 6]) -> [ExportTraceServiceRequest; 3] {
        let mut spans = SPANS.iter().zip(times).map(|((_, kind), (start, end))| span(trace, *kind, start, end));
        ["gateway", "checkout", "stock"].map(|service| export(service, spans.by_ref().take(2).collect()))
    }

    /// One export per service, as the dump holds them (length, gRPC frame, message).
    fn dump(exports: &[ExportTraceServiceRequest]) -> Vec<u8> {
        let mut out = Vec::new();
        for export in exports {
            let message = export.encode_to_vec();
            let mut body = vec![0];
            body.extend((message.len() as u32).to_be_bytes());
            body.extend(message);
            out.extend((body.len() as u32).to_le_bytes());
            out.extend(body);
        }
        out
    }

    #[test]
    fn an_orders_six_spans_are_joined_and_measured_edge_to_edge() -> anyhow::Result<()> {
        // Trace 1 is complete; trace 2 lacks stock's spans and is left out; a lookup span
        // (stock, SERVER) is not one of the six.
        let mut exports =
            order_exports(1, [(0, 5_000), (100, 4_900), (400, 4_500), (500, 4_400), (3_000, 3_600), (3_100, 3_400)]);
        exports[0].resource_spans[0].scope_spans[0].spans.push(span(2, SpanKind::Server, 0, 1));
        exports[2].resource_spans[0].scope_spans[0].spans.push(span(9, SpanKind::Server, 0, 9));
        let orders = orders(&dump(&exports))?;
        assert_eq!(orders.len(), 1);
        let table = table(&orders);
        for row in [
            "| POST (the gateway's span) | 5.00 ms |",
            "| gateway, before the call | 0.10 ms |",
            "| gRPC to checkout | 0.30 ms |",
            "| checkout, before publishing | 0.10 ms |",
            "| publish -> confirm | 3.90 ms |",
            "| checkout, after the confirm | 0.10 ms |",
            "| gRPC back to the gateway | 0.40 ms |",
            "| gateway, after the call | 0.10 ms |",
            "| publish -> stock's delivery | 2.50 ms |",
            "| stock's store write | 0.30 ms |",
        ] {
            assert!(table.contains(row), "{row} not in\n{table}");
        }
        Ok(())
    }

    /// The sink's dump, written as it answers real OTLP/gRPC exports, read back here. The sink
    /// runs as the benchmark runs it: on a thread and runtime of its own.
    #[tokio::test]
    async fn what_the_sink_dumps_is_what_breakdown_reads() -> anyhow::Result<()> {
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("spans.dump");
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let address = listener.local_addr()?;
        let bytes = crate::sink::spawn_on_own_thread(listener, Some(std::fs::File::create(&path)?))?;
        let mut client = TraceServiceClient::connect(format!("http://{address}")).await?;
        let exports =
            order_exports(7, [(0, 3_000), (10, 2_990), (20, 2_980), (30, 2_970), (1_000, 1_500), (1_100, 1_400)]);
        for request in exports.clone() {
            client.export(request).await?;
        }
        assert!(bytes.load(std::sync::atomic::Ordering::Relaxed) > 0);
        let dumped = std::fs::read(&path)?;
        assert_eq!(dumped, dump(&exports), "the dump is each body behind its length, as breakdown reads it");
        let orders = orders(&dumped)?;
        assert_eq!(orders.len(), 1);
        assert!(table(&orders).contains("| publish -> confirm | 2.94 ms |"), "{}", table(&orders));
        Ok(())
    }

    #[test]
    fn a_truncated_dump_is_an_error_not_a_panic() {
        let whole = dump(&[ExportTraceServiceRequest::default()]);
        for cut in 1..whole.len() {
            assert!(orders(&whole[..cut]).is_err(), "cut at {cut}");
        }
    }
}
