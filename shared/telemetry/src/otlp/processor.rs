//! The batch span processor of OTLP/gRPC export: each span is encoded when it ends, on the
//! thread that ends it, into the batch being filled; a thread of its own sends the full batches.
//!
//! The SDK's `BatchSpanProcessor` moves every `SpanData` (about 300 bytes, and its attributes
//! behind it) through a channel to its thread, copies the batch once more (`split_off`), and
//! frees it all there, on another thread than the one that allocated it. Encoded at `end`, a
//! span is freed where it was built, while its allocations are still in that thread's cache,
//! and waits as its 250-700 encoded bytes; the export thread's work per batch is one request
//! and its send. The queue bound, batch size and delay are those of `OTEL_BSP_*`, with the
//! SDK's defaults; as there, a span that finds the queue full is dropped, and counted.

use std::collections::VecDeque;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanProcessor};
use prost::bytes::Bytes;

use super::{EncodedBatch, GrpcSpanExporter, LostSpans, encode_resource};
use crate::setup::BatchLimits;

/// The OTLP/gRPC batch span processor; see the module documentation.
#[derive(Debug)]
pub struct EncodingSpanProcessor {
    shared: Arc<Shared>,
    /// The export thread, joined on shutdown (after its last export, or at the deadline).
    worker: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the export thread: a batch is full, or a flush or the shutdown is asked for.
    wake: Condvar,
    limits: BatchLimits,
}

#[derive(Debug, Default)]
struct Queue {
    /// The batch spans are encoded into as they end.
    filling: EncodedBatch,
    /// Full batches, oldest first, waiting for the export thread.
    full: VecDeque<EncodedBatch>,
    /// An emptied batch the export thread handed back, so the next one reuses its buffer.
    spare: Option<EncodedBatch>,
    /// Spans encoded and not yet sent or given up: what `max_queue` bounds.
    held: usize,
    /// Spans dropped at a full queue since the export thread last logged it.
    dropped: u64,
    /// The resource, encoded (set by the provider before the first span).
    resource: Bytes,
    /// Callers of `force_flush` waiting for the spans ended before their call to go out.
    flushes: Vec<SyncSender<OTelSdkResult>>,
    /// Set once shutdown is asked for: spans ending after it are not exported.
    shutdown: Option<SyncSender<OTelSdkResult>>,
    closed: bool,
}

impl EncodingSpanProcessor {
    /// A processor sending through `exporter`, with its export thread started. `lost` counts
    /// the spans lost on the way (a full queue, failed exports, spans a backend rejects).
    pub(crate) fn new(exporter: GrpcSpanExporter, limits: BatchLimits, lost: LostSpans) -> std::io::Result<Self> {
        let limits = BatchLimits { max_batch: limits.max_batch.clamp(1, limits.max_queue.max(1)), ..limits };
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                resource: encode_resource(&Resource::builder_empty().build()),
                ..Queue::default()
            }),
            wake: Condvar::new(),
            limits,
        });
        let exporter = exporter.counting_lost_spans_in(lost.clone());
        let worker = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("otlp-batch".into())
                .spawn(move || export_loop(&shared, &exporter, &lost))?
        };
        Ok(Self { shared, worker: Mutex::new(Some(worker)) })
    }

    /// Asks the export thread for something (a flush or the shutdown) and waits up to
    /// `timeout` for its answer.
    fn ask(&self, timeout: Duration, ask: impl FnOnce(&mut Queue, SyncSender<OTelSdkResult>)) -> OTelSdkResult {
        let (answer, outcome) = sync_channel(1);
        ask(&mut self.shared.lock(), answer);
        self.shared.wake.notify_one();
        outcome.recv_timeout(timeout).unwrap_or(Err(OTelSdkError::Timeout(timeout)))
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while the lock was held leaves counts at worst; spans keep flowing.
        self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl SpanProcessor for EncodingSpanProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        let limits = &self.shared.limits;
        let mut queue = self.shared.lock();
        if queue.closed {
            return;
        }
        if queue.held >= limits.max_queue {
            queue.dropped += 1;
            return;
        }
        queue.filling.push(&span);
        queue.held += 1;
        if queue.filling.len() >= limits.max_batch {
            let next = queue.spare.take().unwrap_or_default();
            let full = std::mem::replace(&mut queue.filling, next);
            queue.full.push_back(full);
            drop(queue);
            self.shared.wake.notify_one();
        }
        // `span` is freed here, on the thread that built it, after the lock is released.
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.ask(Duration::from_secs(5), |queue, answer| queue.flushes.push(answer))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        {
            let mut queue = self.shared.lock();
            if queue.closed {
                return Err(OTelSdkError::AlreadyShutdown);
            }
            queue.closed = true;
        }
        let result = self.ask(timeout, |queue, answer| queue.shutdown = Some(answer));
        if result.is_ok()
            && let Some(worker) = self.worker.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take()
        {
            let _ = worker.join();
        }
        result
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.shared.lock().resource = encode_resource(resource);
    }
}

impl Drop for EncodingSpanProcessor {
    /// Without a shutdown (a provider dropped without one still calls it; this is for a
    /// processor never given to a provider), the thread would wait forever: tell it to stop.
    fn drop(&mut self) {
        let mut queue = self.shared.lock();
        if !queue.closed {
            queue.closed = true;
            let (answer, _) = sync_channel(1);
            queue.shutdown = Some(answer);
            drop(queue);
            self.shared.wake.notify_one();
        }
    }
}

/// What the export thread takes from the queue in one round.
struct Round {
    batches: Vec<EncodedBatch>,
    resource: Bytes,
    dropped: u64,
    flushes: Vec<SyncSender<OTelSdkResult>>,
    shutdown: Option<SyncSender<OTelSdkResult>>,
}

/// The export thread: waits for a full batch, the delay, a flush or the shutdown; sends what
/// is due, one request per batch; answers the flushes; ends after answering the shutdown.
fn export_loop(shared: &Shared, exporter: &GrpcSpanExporter, lost: &LostSpans) {
    let delay = shared.limits.delay;
    let mut last_export = Instant::now();
    loop {
        let round = {
            let mut queue = shared.lock();
            while queue.full.is_empty() && queue.flushes.is_empty() && queue.shutdown.is_none() {
                let Some(left) = delay.checked_sub(last_export.elapsed()).filter(|left| !left.is_zero()) else {
                    break;
                };
                queue = shared.wake.wait_timeout(queue, left).unwrap_or_else(|poisoned| poisoned.into_inner()).0;
            }
            let mut batches: Vec<EncodedBatch> = queue.full.drain(..).collect();
            let everything = !queue.flushes.is_empty() || queue.shutdown.is_some();
            if (everything || last_export.elapsed() >= delay) && queue.filling.len() > 0 {
                let next = queue.spare.take().unwrap_or_default();
                batches.push(std::mem::replace(&mut queue.filling, next));
            }
            Round {
                batches,
                resource: queue.resource.clone(),
                dropped: std::mem::take(&mut queue.dropped),
                flushes: std::mem::take(&mut queue.flushes),
                shutdown: queue.shutdown.take(),
            }
        };
        last_export = Instant::now();
        if round.dropped > 0 {
            let total = lost.add(round.dropped);
            tracing::warn!(
                dropped_spans = round.dropped,
                dropped_spans_total = total,
                "the span queue was full: spans dropped (the trace backend takes them slower than they come)"
            );
        }
        let mut result = Ok(());
        for mut batch in round.batches {
            let spans = batch.len();
            let sent = exporter.export_blocking(batch.request(&round.resource));
            if let Err(error) = &sent {
                let total = lost.add(spans as u64);
                tracing::warn!(%error, dropped_spans = spans, dropped_spans_total = total, "span export failed");
            }
            batch.clear();
            let mut queue = shared.lock();
            queue.held -= spans;
            queue.spare = Some(batch);
            drop(queue);
            // The first failure is the answer to a flush or the shutdown, as in the SDK.
            result = result.and(sent);
        }
        for flush in round.flushes {
            let _ = flush.send(clone_result(&result));
        }
        if let Some(shutdown) = round.shutdown {
            let _ = shutdown.send(result);
            return;
        }
    }
}

/// `OTelSdkError` is not `Clone`; several flushes may wait on one round.
fn clone_result(result: &OTelSdkResult) -> OTelSdkResult {
    match result {
        Ok(()) => Ok(()),
        Err(OTelSdkError::AlreadyShutdown) => Err(OTelSdkError::AlreadyShutdown),
        Err(OTelSdkError::Timeout(timeout)) => Err(OTelSdkError::Timeout(*timeout)),
        Err(other) => Err(OTelSdkError::InternalFailure(other.to_string())),
    }
}
