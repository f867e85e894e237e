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
//! the first `MAX_BOUND` attribute sets it records: a measurement finds its set by comparing
//! the parts the set is made of (`AttributeSet`: a method, a route, a status, shared strings
//! by address) instead of the SDK hashing every key and value with SipHash on each call
//! (3,000-6,000 instructions per order per service, measured with callgrind), and builds its
//! attributes only to bind a new set. Sets past those are recorded unbound, as before.
//!
//! The Rust SDK (0.33) records no exemplars, so a histogram bucket cannot name a trace; the
//! span metrics of the `monitoring` compose profile can (see the README).

use std::sync::{Arc, RwLock};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{BoundCounter, BoundHistogram, Counter, Histogram, Meter};

use crate::grpc::RpcKey;
use crate::http::HttpKey;
use crate::messaging::MessagingKey;

/// Seconds: 0.5 ms to 10 s. The conventions' recommendation starts at 5 ms, then 10 ms, which
/// would put nearly every call of this pipeline in one bucket; 0.5, 1, 2.5 and 7.5 ms are added.
pub const DURATION_BOUNDARIES: [f64; 18] =
    [0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0];

/// Attribute sets an instrument keeps bound handles for. A service records a few per
/// instrument (one per route and status, destination and outcome); the bound is for a caller
/// that records something unbounded by mistake.
pub(crate) const MAX_BOUND: usize = 32;

/// An attribute set as a caller has it: a slice of attributes, or the parts a helper builds
/// them from, which it can compare with a bound set without building anything.
pub(crate) trait AttributeSet {
    /// What a bound set keeps to be found again.
    type Key;
    /// Whether `key` is this set.
    fn matches(&self, key: &Self::Key) -> bool;
    /// The key of this set, to bind it under.
    fn key(&self) -> Self::Key;
    /// The attributes themselves: to bind the set, or to record it unbound.
    fn attributes(&self) -> Vec<KeyValue>;
}

/// Plain attribute slices, compared attribute by attribute: the bound sets' tests use them.
#[cfg(test)]
impl AttributeSet for [KeyValue] {
    type Key = Box<[KeyValue]>;

    fn matches(&self, key: &Self::Key) -> bool {
        **key == *self
    }

    fn key(&self) -> Self::Key {
        self.into()
    }

    fn attributes(&self) -> Vec<KeyValue> {
        self.to_vec()
    }
}

/// Bound handles by attribute set, found by comparing sets (attributes in the order the caller
/// gives them), first set first.
#[derive(Debug)]
struct BoundSets<K, B> {
    sets: RwLock<Vec<(K, B)>>,
}

impl<K, B> Default for BoundSets<K, B> {
    fn default() -> Self {
        Self { sets: RwLock::new(Vec::new()) }
    }
}

impl<K, B> BoundSets<K, B> {
    /// Calls `record` with the handle bound to `set`, binding it on first sight.
    /// Returns `false`, without calling `record`, when the set is not bound and no more can be.
    fn record<S: AttributeSet<Key = K> + ?Sized>(
        &self,
        set: &S,
        bind: impl FnOnce(&[KeyValue]) -> B,
        record: impl Fn(&B),
    ) -> bool {
        let find = |sets: &[(K, B)]| sets.iter().position(|(key, _)| set.matches(key));
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
                sets.push((set.key(), bind(&set.attributes())));
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

/// `a == b`, without comparing the bytes of strings that are the same string (a bound set
/// holds clones of the caller's shared `Arc<str>`s and `&'static str` constants, so most
/// strings compare by address and length alone).
pub(crate) fn same_str(a: &str, b: &str) -> bool {
    (std::ptr::eq(a.as_ptr(), b.as_ptr()) && a.len() == b.len()) || a == b
}

/// An instrument with bound handles (`H`) for the attribute sets it sees, kept under keys `K`.
#[derive(Debug)]
pub(crate) struct WithBound<I, H, K> {
    instrument: I,
    bound: Arc<BoundSets<K, H>>,
}

impl<I: Clone, H, K> Clone for WithBound<I, H, K> {
    fn clone(&self) -> Self {
        Self { instrument: self.instrument.clone(), bound: self.bound.clone() }
    }
}

impl<I, H, K> WithBound<I, H, K> {
    fn new(instrument: I) -> Self {
        Self { instrument, bound: Arc::default() }
    }

    /// The keys bound so far.
    #[cfg(test)]
    pub(crate) fn keys(&self) -> Vec<K>
    where
        K: Clone,
    {
        self.bound.sets.read().map_or(Vec::new(), |sets| sets.iter().map(|(key, _)| key.clone()).collect())
    }
}

/// A duration histogram, its bound sets kept under keys `K` (an [`AttributeSet`]'s key).
pub(crate) type Durations<K> = WithBound<Histogram<f64>, BoundHistogram<f64>, K>;

impl<K> Durations<K> {
    /// Records `seconds` with the attributes of `set`.
    pub(crate) fn record<S: AttributeSet<Key = K> + ?Sized>(&self, seconds: f64, set: &S) {
        if !self.bound.record(set, |attributes| self.instrument.bind(attributes), |bound| bound.record(seconds)) {
            self.instrument.record(seconds, &set.attributes());
        }
    }
}

/// A message counter, its bound sets kept under keys `K`.
pub(crate) type Messages<K> = WithBound<Counter<u64>, BoundCounter<u64>, K>;

impl<K> Messages<K> {
    /// Adds `count` with the attributes of `set`.
    pub(crate) fn add<S: AttributeSet<Key = K> + ?Sized>(&self, count: u64, set: &S) {
        if !self.bound.record(set, |attributes| self.instrument.bind(attributes), |bound| bound.add(count)) {
            self.instrument.add(count, &set.attributes());
        }
    }
}

/// The instruments the layers and messaging helpers record into, created once per service
/// that exports metrics (none otherwise, so callers build no attributes nobody aggregates).
#[derive(Debug, Clone)]
pub(crate) struct Instruments {
    pub(crate) http_server_duration: Durations<HttpKey>,
    pub(crate) rpc_server_duration: Durations<RpcKey>,
    pub(crate) rpc_client_duration: Durations<RpcKey>,
    pub(crate) messaging_operation_duration: Durations<MessagingKey>,
    pub(crate) messaging_sent: Messages<MessagingKey>,
    pub(crate) messaging_consumed: Messages<MessagingKey>,
    pub(crate) messaging_process_duration: Durations<MessagingKey>,
}

impl Instruments {
    pub(crate) fn new(meter: &Meter) -> Self {
        let seconds = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(DURATION_BOUNDARIES.to_vec())
                .build()
        };
        let messages = |name: &'static str, description: &'static str| {
            meter.u64_counter(name).with_unit("{message}").with_description(description).build()
        };
        Self {
            http_server_duration: WithBound::new(seconds(
                "http.server.request.duration",
                "Duration of HTTP server requests.",
            )),
            rpc_server_duration: WithBound::new(seconds("rpc.server.call.duration", "Duration of incoming RPCs.")),
            rpc_client_duration: WithBound::new(seconds("rpc.client.call.duration", "Duration of outgoing RPCs.")),
            messaging_operation_duration: WithBound::new(seconds(
                "messaging.client.operation.duration",
                "Duration of messaging operations (publish, ack, nack).",
            )),
            messaging_sent: WithBound::new(messages(
                "messaging.client.sent.messages",
                "Messages the producer attempted to send.",
            )),
            messaging_consumed: WithBound::new(messages(
                "messaging.client.consumed.messages",
                "Messages delivered to the application.",
            )),
            messaging_process_duration: WithBound::new(seconds(
                "messaging.process.duration",
                "Duration of processing a delivered message.",
            )),
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
        let sets = BoundSets::<Box<[KeyValue]>, usize>::default();
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
    fn strings_compare_by_address_first_and_by_content_otherwise() {
        let shared: std::sync::Arc<str> = "checkout:x".into();
        assert!(same_str(&shared, &shared.clone()), "the same string");
        assert!(same_str(&shared, &String::from("checkout:x")), "an equal copy");
        let text = "checkout:xy";
        assert!(!same_str(text, "checkout:xz"), "a different string");
        assert!(!same_str(text, &text[..10]), "the same address, shorter");
    }

    #[test]
    fn sets_past_the_bound_are_not_bound() {
        let sets = BoundSets::<Box<[KeyValue]>, ()>::default();
        for status in 0..MAX_BOUND as i64 {
            assert!(sets.record(set("/a", status).as_slice(), |_| (), |_| ()));
        }
        let recorded = Cell::new(false);
        assert!(
            !sets.record(set("/a", -1).as_slice(), |_| (), |_| recorded.set(true)),
            "one too many is recorded unbound"
        );
        assert!(!recorded.get());
        assert!(sets.record(set("/a", 0).as_slice(), |_| (), |_| recorded.set(true)), "bound sets still are");
        assert!(recorded.get());
        assert_eq!(sets.len(), MAX_BOUND);
    }
}
