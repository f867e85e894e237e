//! What recording an order's messaging metrics costs: the publish (duration and count), the
//! delivery (consumed, process duration) and the ack, with the attributes the services use,
//! into the SDK's aggregation; beside the same calls with metrics off (the no-op meter). Run
//! with `cargo bench -p tracehop-telemetry --bench metrics`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use tracehop_telemetry::messaging::{self, BrokerPeer, Destination, Settle};
use tracehop_telemetry::setup::{Export, OtlpProtocol};
use tracehop_telemetry::{Telemetry, TelemetryConfig};

fn telemetry(metrics: bool) -> Telemetry {
    // Spans off; metrics over OTLP/HTTP to a port nobody listens on, exported once a minute:
    // the benchmark measures recording, not exporting.
    let metrics = if metrics {
        Export::Otlp { endpoint: Some("http://127.0.0.1:9/v1/metrics".into()), protocol: OtlpProtocol::HttpProtobuf }
    } else {
        Export::None
    };
    let config = TelemetryConfig { export: Export::None, metrics, ..TelemetryConfig::new("bench") };
    Telemetry::new(&config).expect("telemetry")
}

fn one_order(telemetry: &Telemetry, publish: &Destination, process: &Destination, peer: &BrokerPeer) {
    let elapsed = Duration::from_micros(700);
    messaging::record_publish(telemetry, publish, peer, elapsed, None);
    messaging::record_consumed(telemetry, process, peer);
    messaging::record_settle(telemetry, Settle::Ack, process, peer, elapsed, None);
    messaging::record_process(telemetry, process, peer, elapsed, None);
}

fn metrics(c: &mut Criterion) {
    let publish = Destination::publish("checkout", "checkout.processed");
    let process = Destination::process("checkout", "checkout.processed", "stock.checkout-processed");
    let peer = BrokerPeer { address: "rabbitmq".into(), port: 5672 };
    let mut group = c.benchmark_group("messaging metrics of one order (5 measurements)");
    for (name, enabled) in [("metrics off (no-op meter)", false), ("metrics on (SDK aggregation)", true)] {
        let telemetry = telemetry(enabled);
        group.bench_function(name, |b| b.iter(|| one_order(black_box(&telemetry), &publish, &process, &peer)));
    }
    group.finish();
}

criterion_group!(benches, metrics);
criterion_main!(benches);
