//! RED metrics beside the spans, named per OpenTelemetry semantic conventions 1.44, recorded by
//! the same layers and helpers that make the spans, so every service gets them from one setup.
//!
//! | metric | kind, unit | recorded by |
//! |---|---|---|
//! | `http.server.request.duration` | histogram, `s` | [`crate::http::HttpServerLayer`] |
//! | `rpc.server.call.duration` | histogram, `s` | [`crate::grpc::GrpcServerLayer`] |
//! | `rpc.client.call.duration` | histogram, `s` | [`crate::grpc::GrpcClientLayer`] |
//! | `messaging.client.operation.duration` | histogram, `s` | [`crate::messaging::record_publish`], [`crate::messaging::record_settle`] |
//! | `messaging.client.sent.messages` | counter, `{message}` | [`crate::messaging::record_publish`] |
//! | `messaging.client.consumed.messages` | counter, `{message}` | [`crate::messaging::record_consumed`] |
//! | `messaging.process.duration` | histogram, `s` | [`crate::messaging::record_process`] |
//!
//! The RPC histograms are the conventions' current names: `rpc.server.duration` and
//! `rpc.client.duration` (milliseconds) were renamed in 1.39, with the unit changed to seconds.
//! Attributes are the conventions' low-cardinality ones (method, route, status, destination,
//! `error.type`); never an id. Histograms use the conventions' recommended boundaries plus 0.5,
//! 1, 2.5 and 7.5 ms, where this pipeline's calls land.
//!
//! Each instrument keeps bound handles (the SDK's `experimental_metrics_bound_instruments`) for
//! the first [`MAX_BOUND`] attribute sets it records: a measurement finds its set by comparing
//! a handful of attributes instead of the SDK hashing every key and value with SipHash on each
//! call (3,000-6,000 instructions per order per service, measured with callgrind). Sets past
//! those are recorded unbound, as before.
//!
//! The Rust SDK (0.33) records no exemplars, so a histogram bucket cannot name a trace; the
//! span metrics of the `monitoring` compose profile can (see the README).

use std::sync::{Arc, RwLock};

use opentelemetry::metrics::{BoundCounter, BoundHistogram, Counter, Histogram, Meter};
use opentelemetry::{KeyValue, Value};

/// Seconds: 0.5 ms to 10 s. The conventions' recommendation starts at 5 ms, then 10 ms, which
/// would put nearly every call of this pipeline in one bucket; 0.5, 1, 2.5 and 7.5 ms are added.
pub const DURATION_BOUNDARIES: [f64; 18] =
    [0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0];

/// Attribute sets an instrument keeps bound handles for. A service records a few per
/// instrument (one per route and status, destination and outcome); the bound is for a caller
/// that records something unbounded by mistake.
pub(crate) const MAX_BOUND: usize = 32;

/// Bound handles by attribute set, found by comparing attributes (in the order the caller
/// gives them), first set first.
#[derive(Debug)]
struct BoundSets<B> {
    sets: RwLock<Vec<(Box<[KeyValue]>, B)>>,
}

impl<B> Default for BoundSets<B> {
    fn default() -> Self {
        Self { sets: RwLock::new(Vec::new()) }
    }
}

impl<B> BoundSets<B> {
    /// Calls `record` with the handle bound to `attributes`, binding it on first sight.
    /// Returns `false`, without calling `record`, when the set is not bound and no more can be.
    fn record(&self, attributes: &[KeyValue], bind: impl FnOnce(&[KeyValue]) -> B, record: impl Fn(&B)) -> bool {
        let find = |sets: &[(Box<[KeyValue]>, B)]| sets.iter().position(|(set, _)| same_set(set, attributes));
        {
            let sets = self.sets.read().unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(index) = find(&sets) {
                record(&sets[index].1);
                return true;
            }
            if sets.len() >= MAX_BOUND {
                return false;
            }
        }
        let mut sets = self.sets.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        let index = match find(&sets) {
            Some(index) => index,
            None if sets.len() < MAX_BOUND => {
                sets.push((attributes.into(), bind(attributes)));
                sets.len() - 1
            }
            None => return false,
        };
        record(&sets[index].1);
        true
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.sets.read().map_or(0, |sets| sets.len())
    }
}

/// `a == b`, without comparing the bytes of strings that are the same string: a bound set
/// holds clones of the caller's attributes, and keys are `&'static str` constants and values
/// shared `Arc<str>`s, so most strings compare by address and length alone. `KeyValue` is
/// `#[non_exhaustive]`: should opentelemetry give it a third field, this must compare it too.
fn same_set(a: &[KeyValue], b: &[KeyValue]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(a, b)| {
            same_str(a.key.as_str(), b.key.as_str())
                && match (&a.value, &b.value) {
                    (Value::String(a), Value::String(b)) => same_str(a.as_str(), b.as_str()),
                    (a, b) => a == b,
                }
        })
}

fn same_str(a: &str, b: &str) -> bool {
    (std::ptr::eq(a.as_ptr(), b.as_ptr()) && a.len() == b.len()) || a == b
}

/// An instrument with bound handles (`H`) for the attribute sets it sees.
#[derive(Debug, Clone)]
pub(crate) struct WithBound<I, H> {
    instrument: I,
    bound: Arc<BoundSets<H>>,
}

impl<I, H> WithBound<I, H> {
    fn new(instrument: I) -> Self {
        Self { instrument, bound: Arc::default() }
    }
}

/// A duration histogram.
pub(crate) type Durations = WithBound<Histogram<f64>, BoundHistogram<f64>>;

impl Durations {
    /// Records `seconds` with `attributes`.
    pub(crate) fn record(&self, seconds: f64, attributes: &[KeyValue]) {
        if !self.bound.record(attributes, |set| self.instrument.bind(set), |bound| bound.record(seconds)) {
            self.instrument.record(seconds, attributes);
        }
    }
}

/// A message counter.
pub(crate) type Messages = WithBound<Counter<u64>, BoundCounter<u64>>;

impl Messages {
    /// Adds `count` with `attributes`.
    pub(crate) fn add(&self, count: u64, attributes: &[KeyValue]) {
        if !self.bound.record(attributes, |set| self.instrument.bind(set), |bound| bound.add(count)) {
            self.instrument.add(count, attributes);
        }
    }
}

/// The instruments the layers and messaging helpers record into, created once per service
/// that exports metrics (none otherwise, so callers build no attributes nobody aggregates).
#[derive(Debug, Clone)]
pub(crate) struct Instruments {
    pub(crate) http_server_duration: Durations,
    pub(crate) rpc_server_duration: Durations,
    pub(crate) rpc_client_duration: Durations,
    pub(crate) messaging_operation_duration: Durations,
    pub(crate) messaging_sent: Messages,
    pub(crate) messaging_consumed: Messages,
    pub(crate) messaging_process_duration: Durations,
}

impl Instruments {
    pub(crate) fn new(meter: &Meter) -> Self {
        let seconds = |name: &'static str, description: &'static str| {
            Durations::new(
                meter
                    .f64_histogram(name)
                    .with_unit("s")
                    .with_description(description)
                    .with_boundaries(DURATION_BOUNDARIES.to_vec())
                    .build(),
            )
        };
        let messages = |name: &'static str, description: &'static str| {
            Messages::new(meter.u64_counter(name).with_unit("{message}").with_description(description).build())
        };
        Self {
            http_server_duration: seconds("http.server.request.duration", "Duration of HTTP server requests."),
            rpc_server_duration: seconds("rpc.server.call.duration", "Duration of incoming RPCs."),
            rpc_client_duration: seconds("rpc.client.call.duration", "Duration of outgoing RPCs."),
            messaging_operation_duration: seconds(
                "messaging.client.operation.duration",
                "Duration of messaging operations (publish, ack, nack).",
            ),
            messaging_sent: messages("messaging.client.sent.messages", "Messages the producer attempted to send."),
            messaging_consumed: messages(
                "messaging.client.consumed.messages",
                "Messages delivered to the application.",
            ),
            messaging_process_duration: seconds(
                "messaging.process.duration",
                "Duration of processing a delivered message.",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    fn set(route: &str, status: i64) -> Vec<KeyValue> {
        vec![KeyValue::new("http.route", route.to_owned()), KeyValue::new("http.response.status_code", status)]
    }

    #[test]
    fn each_attribute_set_is_bound_once_and_recorded_through_its_own_handle() {
        let sets = BoundSets::<usize>::default();
        let binds = Cell::new(0);
        let recorded = Cell::new(Vec::new());
        let record = |attributes: &[KeyValue]| {
            sets.record(
                attributes,
                |_| {
                    binds.set(binds.get() + 1);
                    binds.get()
                },
                |handle| {
                    let mut seen = recorded.take();
                    seen.push(*handle);
                    recorded.set(seen);
                },
            )
        };
        assert!(record(&set("/a", 200)));
        assert!(record(&set("/b", 200)));
        assert!(record(&set("/a", 200)));
        assert!(record(&set("/a", 500)));
        assert_eq!(binds.get(), 3);
        assert_eq!(recorded.take(), vec![1, 2, 1, 3], "the same set, the same handle");
    }

    #[test]
    fn sets_compare_by_content_whether_or_not_they_share_their_strings() {
        let shared = KeyValue::new(
            "messaging.destination.name",
            opentelemetry::StringValue::from(std::sync::Arc::<str>::from("checkout:x")),
        );
        let bound = vec![shared.clone(), KeyValue::new("server.port", 5672)];
        assert!(same_set(&bound, &[shared.clone(), KeyValue::new("server.port", 5672)]), "shared strings");
        assert!(
            same_set(
                &bound,
                &[
                    KeyValue::new("messaging.destination.name", "checkout:x".to_owned()),
                    KeyValue::new("server.port", 5672)
                ]
            ),
            "equal copies"
        );
        let text = "checkout:xy";
        assert!(!same_set(&bound[..1], &[KeyValue::new("messaging.destination.name", text)]), "different value");
        let prefix = &text[..10];
        assert!(!same_set(&[KeyValue::new("k", text)], &[KeyValue::new("k", prefix)]), "same address, shorter");
        assert!(!same_set(&bound, &bound[..1]), "fewer attributes");
        assert!(!same_set(&bound, &[shared, KeyValue::new("server.port", 5671)]), "different port");
    }

    #[test]
    fn sets_past_the_bound_are_not_bound() {
        let sets = BoundSets::<()>::default();
        for status in 0..MAX_BOUND as i64 {
            assert!(sets.record(&set("/a", status), |_| (), |_| ()));
        }
        let recorded = Cell::new(false);
        assert!(!sets.record(&set("/a", -1), |_| (), |_| recorded.set(true)), "one too many is recorded unbound");
        assert!(!recorded.get());
        assert!(sets.record(&set("/a", 0), |_| (), |_| recorded.set(true)), "bound sets still are");
        assert!(recorded.get());
        assert_eq!(sets.len(), MAX_BOUND);
    }
}
