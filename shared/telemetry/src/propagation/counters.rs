//! Counts of trace context the carriers refused or shortened, with warnings that cannot flood.
//!
//! A hostile or broken client can send a bad header on every request. Each refusal is counted;
//! a warning is logged the 1st, 2nd, 4th, 8th... time, so the log shows the problem and its
//! size without costing a log line per message.

use std::sync::atomic::{AtomicU64, Ordering};

/// What was refused or shortened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A `traceparent` that fails the strict W3C check: the trace restarts.
    InvalidTraceparent,
    /// A `tracestate` over 32 members, or nothing left after trimming: dropped.
    TracestateDropped,
    /// A `tracestate` over 512 characters: trimmed by whole members.
    TracestateTrimmed,
    /// A `baggage` whose first member alone is over the limit: dropped.
    BaggageDropped,
    /// A `baggage` over 64 members or 8192 bytes: trimmed by whole members.
    BaggageTrimmed,
    /// A header that is not a string, or not UTF-8: ignored.
    UnreadableHeader,
}

const KINDS: usize = 6;

impl Refusal {
    fn index(self) -> usize {
        self as usize
    }

    fn describe(self) -> &'static str {
        match self {
            Refusal::InvalidTraceparent => "invalid traceparent ignored; the trace restarts here",
            Refusal::TracestateDropped => "tracestate over the W3C limits dropped",
            Refusal::TracestateTrimmed => "tracestate over 512 characters trimmed",
            Refusal::BaggageDropped => "baggage over the W3C limits dropped",
            Refusal::BaggageTrimmed => "baggage over 64 members or 8192 bytes trimmed",
            Refusal::UnreadableHeader => "trace header that is not a UTF-8 string ignored",
        }
    }
}

static COUNTS: [AtomicU64; KINDS] = [const { AtomicU64::new(0) }; KINDS];

/// Records one refusal, logging a warning on powers of two.
pub(crate) fn record(refusal: Refusal, header: &str) {
    let count = COUNTS[refusal.index()].fetch_add(1, Ordering::Relaxed) + 1;
    if count.is_power_of_two() {
        tracing::warn!(header, count, "{}", refusal.describe());
    }
}

/// How many times `refusal` happened in this process.
pub fn count(refusal: Refusal) -> u64 {
    COUNTS[refusal.index()].load(Ordering::Relaxed)
}
