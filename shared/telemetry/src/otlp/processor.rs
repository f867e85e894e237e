//! The batch span processor of OTLP/gRPC export: each span is encoded when it ends, on the
//! thread that ends it, and waits in the batch being filled; a thread of its own sends the
//! batches.
//!
//! The SDK's `BatchSpanProcessor` moves every `SpanData` (about 300 bytes, and its attributes
//! behind it) through a channel to its thread, copies the batch once more (`split_off`), and frees
//! it all there, on another thread than the one that allocated it. Encoded at `end`, a span is
//! freed where it was built, while its allocations are still in that thread's cache, and waits as
//! its 250-700 encoded bytes; the export thread's work per batch is one request, written from the
//! batch straight into the call's buffer on the export runtime, and its send. The limits are those
//! of `OTEL_BSP_*`, with the SDK's meaning: at most `max_queue` spans wait (the batch being sent is
//! not counted, as in the SDK's channel), a batch goes as soon as it is full or `delay` after the
//! last export. As there, a span that finds the queue full is dropped; here it is also counted and
//! logged.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::mpsc::{RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanProcessor};
use prost::bytes::Bytes;

use super::{EncodedBatch, ExportRequest, GrpcSpanExporter, LostSpans, encode_resource, encode_span_entry};
use crate::setup::BatchLimits;

/// How long `force_flush` waits (the SDK's processor waits as long).
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the processor could not be started.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// A zero delay would keep the export thread spinning; a zero queue or batch would send
    /// nothing.
    #[error("the batch span processor's delay, queue size and batch size must each be above zero: {0:?}")]
    Limits(BatchLimits),
    /// The export thread could not be started.
    #[error("cannot start the span export thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// The OTLP/gRPC batch span processor; see the module documentation.
pub struct EncodingSpanProcessor {
    shared: Arc<Shared>,
    /// The export thread: joined at shutdown once it has answered. When shutdown gives up at its
    /// deadline, the thread is left to finish on its own: each batch it holds (at most
    /// `max_queue / max_batch + 1`) ends within the exporter's timeout and a second.
    worker: Mutex<Option<JoinHandle<()>>>,
}

/// What the threads ending spans and the export thread share.
#[derive(Debug)]
struct Shared {
    /// The queue's state, behind one lock: a span's turn under it is a copy of its bytes.
    queue: Mutex<Queue>,
    /// Wakes the export thread: a batch is full, or a flush or the shutdown is asked for.
    wake: Condvar,
    /// The limits, the batch cut to the queue size.
    limits: BatchLimits,
    /// Spans lost on the way: a full queue, failed exports, spans a backend rejects.
    lost: LostSpans,
}

/// The spans waiting, what the export thread is asked for, and the counts.
#[derive(Debug, Default)]
struct Queue {
    /// The batch spans go into as they end.
    filling: EncodedBatch,
    /// Full batches, oldest first, waiting for the export thread.
    full: VecDeque<EncodedBatch>,
    /// An emptied batch the export thread handed back, so the next one reuses its buffer.
    spare: Option<EncodedBatch>,
    /// Whether a span that ended after the shutdown was said in the log (each is counted lost).
    said_after_close: bool,
    /// Spans in `filling` and `full`: what `max_queue` bounds.
    waiting: usize,
    /// Spans the export thread took and has not finished sending.
    sending: usize,
    /// Spans dropped at a full queue since the export thread last logged it.
    dropped: u64,
    /// The resource, encoded (set by the provider before the first span).
    resource: Bytes,
    /// Callers of `force_flush` waiting for the spans ended before their call to go out.
    flushes: Vec<SyncSender<OTelSdkResult>>,
    /// The caller of shutdown, waiting for the last export.
    shutdown: Option<SyncSender<OTelSdkResult>>,
    /// Set once shutdown is asked for (or the export thread is gone): from then on spans are
    /// not taken and flushes are refused, since no export would follow.
    closed: bool,
}

thread_local! {
    /// Where a span is encoded before the lock is taken, reused span after span.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1024));
}

/// Where the export thread sends each batch's encoded request, waiting for the outcome.
pub(crate) trait SendBatch: Send + 'static {
    /// Sends one `ExportTraceServiceRequest` and says how it went; hands the batch back when
    /// it can, for its buffers to take the next spans.
    fn send_batch(&self, request: ExportRequest) -> (OTelSdkResult, Option<EncodedBatch>);
}

impl SendBatch for GrpcSpanExporter {
    fn send_batch(&self, request: ExportRequest) -> (OTelSdkResult, Option<EncodedBatch>) {
        self.export_blocking(request)
    }
}

impl EncodingSpanProcessor {
    /// A processor sending through `exporter`, with its export thread (`otlp-batch`) started.
    pub fn new(exporter: GrpcSpanExporter, limits: BatchLimits) -> Result<Self, BatchError> {
        let lost = LostSpans::default();
        Self::start(exporter.counting_lost_spans_in(lost.clone()), limits, lost)
    }

    /// A processor sending through `sender`, counting its losses in `lost`.
    fn start(sender: impl SendBatch, limits: BatchLimits, lost: LostSpans) -> Result<Self, BatchError> {
        if limits.delay.is_zero() || limits.max_queue == 0 || limits.max_batch == 0 {
            return Err(BatchError::Limits(limits));
        }
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                resource: encode_resource(&Resource::builder_empty().build()),
                ..Queue::default()
            }),
            wake: Condvar::new(),
            limits: BatchLimits { max_batch: limits.max_batch.min(limits.max_queue), ..limits },
            lost,
        });
        let worker = {
            let shared = shared.clone();
            std::thread::Builder::new().name("otlp-batch".into()).spawn(move || {
                let _stopped = ExportThread { shared: &shared };
                export_loop(&shared, &sender);
            })?
        };
        Ok(Self { shared, worker: Mutex::new(Some(worker)) })
    }
}

impl EncodingSpanProcessor {
    /// Adds `span`, encoded as `entry`, to the batch being filled; hands the batch to the
    /// export thread when it is full.
    fn enqueue(&self, span: &SpanData, entry: &[u8]) {
        let limits = &self.shared.limits;
        let mut queue = self.shared.lock();
        if queue.closed {
            // A span that ends after the shutdown (a request still in flight past the drain):
            // lost, and counted as such; said once.
            let first = !std::mem::replace(&mut queue.said_after_close, true);
            drop(queue);
            let total = self.shared.lost.add(1);
            if first {
                tracing::warn!(
                    dropped_spans_total = total,
                    "a span ended after span export shut down: it is dropped, as later ones will be"
                );
            }
            return;
        }
        if queue.waiting >= limits.max_queue {
            queue.dropped += 1;
            return;
        }
        queue.filling.push_encoded(&span.instrumentation_scope, entry);
        queue.waiting += 1;
        if queue.filling.len() >= limits.max_batch {
            let next = queue.spare.take().unwrap_or_default();
            let full = std::mem::replace(&mut queue.filling, next);
            queue.full.push_back(full);
            drop(queue);
            self.shared.wake.notify_one();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // The lock is never held across anything that can panic half-way through a change.
        self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl std::fmt::Debug for EncodingSpanProcessor {
    /// The limits and counts, not the encoded spans.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let queue = self.shared.lock();
        f.debug_struct("EncodingSpanProcessor")
            .field("limits", &self.shared.limits)
            .field("waiting", &queue.waiting)
            .field("sending", &queue.sending)
            .field("closed", &queue.closed)
            .finish()
    }
}

impl SpanProcessor for EncodingSpanProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        let enqueue = |scratch: &mut Vec<u8>| {
            scratch.clear();
            let entry = encode_span_entry(scratch, &span);
            self.enqueue(&span, entry);
        };
        // A span that ends while its thread is being torn down (its thread-locals gone) gets a
        // buffer of its own.
        if SCRATCH.try_with(|scratch| enqueue(&mut scratch.borrow_mut())).is_err() {
            enqueue(&mut Vec::new());
        }
        // `span` is freed here, on the thread that built it.
    }

    fn force_flush(&self) -> OTelSdkResult {
        let (answer, outcome) = sync_channel(1);
        {
            let mut queue = self.shared.lock();
            if queue.closed {
                return Err(OTelSdkError::AlreadyShutdown);
            }
            queue.flushes.push(answer);
        }
        self.shared.wake.notify_one();
        match outcome.recv_timeout(FLUSH_TIMEOUT) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => Err(OTelSdkError::Timeout(FLUSH_TIMEOUT)),
            Err(RecvTimeoutError::Disconnected) => Err(thread_stopped()),
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let (answer, outcome) = sync_channel(1);
        {
            let mut queue = self.shared.lock();
            if queue.closed {
                return Err(OTelSdkError::AlreadyShutdown);
            }
            queue.closed = true;
            queue.shutdown = Some(answer);
        }
        self.shared.wake.notify_one();
        match outcome.recv_timeout(timeout) {
            Ok(result) => {
                if let Some(worker) = self.worker.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take() {
                    let _ = worker.join();
                }
                result
            }
            Err(RecvTimeoutError::Disconnected) => Err(thread_stopped()),
            Err(RecvTimeoutError::Timeout) => {
                let queue = self.shared.lock();
                tracing::warn!(
                    unsent_spans = queue.waiting + queue.sending,
                    ?timeout,
                    "span export shutdown gave up at its deadline; the spans not yet sent may be lost"
                );
                Err(OTelSdkError::Timeout(timeout))
            }
        }
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.shared.lock().resource = encode_resource(resource);
    }
}

impl Drop for EncodingSpanProcessor {
    /// A provider shuts its processors down before dropping them; a processor never given to
    /// one would leave its thread waiting forever: tell it to send what it has and stop.
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

/// Held by the export thread: should it panic, the processor is closed and whoever waits on it
/// is answered, instead of spans piling up unsent and flushes waiting out their timeouts.
struct ExportThread<'a> {
    shared: &'a Shared,
}

fn thread_stopped() -> OTelSdkError {
    OTelSdkError::InternalFailure("the span export thread stopped".into())
}

impl Drop for ExportThread<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            // Ended as asked, having answered the shutdown.
            return;
        }
        let mut queue = self.shared.lock();
        queue.closed = true;
        for flush in queue.flushes.drain(..) {
            let _ = flush.send(Err(thread_stopped()));
        }
        if let Some(shutdown) = queue.shutdown.take() {
            let _ = shutdown.send(Err(thread_stopped()));
        }
        tracing::error!(unsent_spans = queue.waiting, "the span export thread stopped: no more spans are exported");
    }
}

/// What the export thread takes from the queue in one round.
struct Round {
    /// The full batches, and the one being filled when the delay is up or a flush or the
    /// shutdown asks for everything.
    batches: Vec<EncodedBatch>,
    /// The resource, as it stood when the batches were taken.
    resource: Bytes,
    /// Spans dropped at a full queue since the last round.
    dropped: u64,
    /// Flushes to answer once the batches are sent (they cover every span ended before them).
    flushes: Vec<SyncSender<OTelSdkResult>>,
    /// The shutdown to answer last, after which the thread ends.
    shutdown: Option<SyncSender<OTelSdkResult>>,
}

impl Shared {
    /// Waits until something is due (a full batch, the delay since `last_export`, a flush, the
    /// shutdown), then takes it.
    fn next_round(&self, last_export: Instant) -> Round {
        let delay = self.limits.delay;
        let mut queue = self.lock();
        while queue.full.is_empty() && queue.flushes.is_empty() && queue.shutdown.is_none() {
            let Some(left) = delay.checked_sub(last_export.elapsed()).filter(|left| !left.is_zero()) else {
                break;
            };
            queue = self.wake.wait_timeout(queue, left).unwrap_or_else(|poisoned| poisoned.into_inner()).0;
        }
        let mut batches: Vec<EncodedBatch> = queue.full.drain(..).collect();
        let everything = !queue.flushes.is_empty() || queue.shutdown.is_some();
        if (everything || last_export.elapsed() >= delay) && !queue.filling.is_empty() {
            let next = queue.spare.take().unwrap_or_default();
            batches.push(std::mem::replace(&mut queue.filling, next));
        }
        let taken: usize = batches.iter().map(EncodedBatch::len).sum();
        queue.waiting -= taken;
        queue.sending += taken;
        Round {
            batches,
            resource: queue.resource.clone(),
            dropped: std::mem::take(&mut queue.dropped),
            flushes: std::mem::take(&mut queue.flushes),
            shutdown: queue.shutdown.take(),
        }
    }
}

/// The export thread: sends what each round took, one request per batch; answers the
/// flushes; ends after answering the shutdown.
fn export_loop(shared: &Shared, sender: &impl SendBatch) {
    let mut last_export = Instant::now();
    loop {
        let round = shared.next_round(last_export);
        last_export = Instant::now();
        if round.dropped > 0 {
            let total = shared.lost.add(round.dropped);
            tracing::warn!(
                dropped_spans = round.dropped,
                dropped_spans_total = total,
                "the span queue was full: spans dropped (the trace backend takes them slower than they come)"
            );
        }
        // What a flush or the shutdown is answered: the last failure of the round, if any.
        let mut result = Ok(());
        for batch in round.batches {
            let spans = batch.len();
            let (sent, returned) = sender.send_batch(ExportRequest { batch, resource: round.resource.clone() });
            if let Err(error) = &sent {
                let total = shared.lost.add(spans as u64);
                tracing::warn!(%error, dropped_spans = spans, dropped_spans_total = total, "span export failed");
            }
            let mut queue = shared.lock();
            queue.sending -= spans;
            if let Some(mut batch) = returned {
                batch.clear();
                queue.spare = Some(batch);
            }
            drop(queue);
            if sent.is_err() {
                result = sent;
            }
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

#[cfg(test)]
mod tests {
    use std::sync::mpsc::Receiver;

    use opentelemetry::InstrumentationScope;
    use opentelemetry::trace::SpanKind;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message as _;

    use super::*;
    use crate::otlp::tests::span;
    use crate::setup::SpanTransport;

    /// A processor whose exporter points at a closed port (nothing here exports).
    fn processor(limits: BatchLimits) -> Result<EncodingSpanProcessor, BatchError> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let exporter =
            GrpcSpanExporter::new("http://127.0.0.1:9", &SpanTransport::default(), runtime.handle()).expect("exporter");
        EncodingSpanProcessor::new(exporter, limits)
    }

    /// A backend in the test's hands: each request, decoded, goes to the test's channel; a send
    /// takes `pause`, and waits while the test holds `gate`.
    struct Backend {
        requests: std::sync::mpsc::Sender<ExportTraceServiceRequest>,
        pause: Duration,
        gate: Arc<Mutex<()>>,
        /// Whether a sent batch comes back for reuse, as when the gRPC send has let go of it;
        /// false plays a send that timed out while tonic still held the request.
        hands_back: bool,
    }

    impl SendBatch for Backend {
        fn send_batch(&self, request: ExportRequest) -> (OTelSdkResult, Option<EncodedBatch>) {
            drop(self.gate.lock());
            std::thread::sleep(self.pause);
            let _ = self.requests.send(ExportTraceServiceRequest::decode(request.bytes().as_slice()).expect("decodes"));
            (Ok(()), self.hands_back.then_some(request.batch))
        }
    }

    fn with_backend(
        limits: BatchLimits,
        pause: Duration,
    ) -> (EncodingSpanProcessor, Receiver<ExportTraceServiceRequest>, Arc<Mutex<()>>, LostSpans) {
        with_backend_handing_back(limits, pause, true)
    }

    fn with_backend_handing_back(
        limits: BatchLimits,
        pause: Duration,
        hands_back: bool,
    ) -> (EncodingSpanProcessor, Receiver<ExportTraceServiceRequest>, Arc<Mutex<()>>, LostSpans) {
        let (requests, received) = std::sync::mpsc::channel();
        let (gate, lost) = (Arc::new(Mutex::new(())), LostSpans::default());
        let backend = Backend { requests, pause, gate: gate.clone(), hands_back };
        let processor = EncodingSpanProcessor::start(backend, limits, lost.clone()).expect("processor");
        (processor, received, gate, lost)
    }

    fn span_names(request: &ExportTraceServiceRequest) -> Vec<String> {
        let spans = request.resource_spans.iter().flat_map(|r| &r.scope_spans).flat_map(|s| &s.spans);
        spans.map(|span| span.name.clone()).collect()
    }

    fn span_count(request: &ExportTraceServiceRequest) -> usize {
        request.resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum()
    }

    #[test]
    fn limits_that_would_spin_or_send_nothing_are_refused() {
        let defaults = BatchLimits::default();
        for limits in [
            BatchLimits { delay: Duration::ZERO, ..defaults },
            BatchLimits { max_queue: 0, ..defaults },
            BatchLimits { max_batch: 0, ..defaults },
        ] {
            assert!(matches!(processor(limits), Err(BatchError::Limits(refused)) if refused == limits));
        }
    }

    #[test]
    fn a_span_that_ends_after_shutdown_is_counted_lost() {
        let (processor, received, _gate, lost) = with_backend(BatchLimits::default(), Duration::ZERO);
        processor.shutdown_with_timeout(Duration::from_secs(5)).expect("nothing to send");
        let scope = InstrumentationScope::builder("late").build();
        (0..2).for_each(|_| processor.on_end(span("late", SpanKind::Internal, &scope)));
        assert_eq!(lost.total(), 2);
        assert!(received.try_iter().all(|request| span_count(&request) == 0), "nothing sent after shutdown");
    }

    #[test]
    fn after_shutdown_flushes_and_another_shutdown_are_refused_at_once() {
        let processor = processor(BatchLimits::default()).expect("processor");
        processor.shutdown_with_timeout(Duration::from_secs(5)).expect("nothing to send");
        assert!(matches!(processor.force_flush(), Err(OTelSdkError::AlreadyShutdown)));
        assert!(matches!(processor.shutdown_with_timeout(Duration::from_secs(5)), Err(OTelSdkError::AlreadyShutdown)));
        assert!(processor.worker.lock().expect("lock").is_none(), "the thread was joined");
    }

    #[test]
    fn every_span_ended_on_many_threads_is_sent_or_counted_lost_once() {
        // A slow backend and a small queue: many spans find it full.
        let limits = BatchLimits { delay: Duration::from_millis(1), max_queue: 64, max_batch: 16 };
        let (processor, received, _gate, lost) = with_backend(limits, Duration::from_millis(5));
        let scope = InstrumentationScope::builder("threads").build();
        std::thread::scope(|threads| {
            for _ in 0..4 {
                threads.spawn(|| (0..2_000).for_each(|_| processor.on_end(span("s", SpanKind::Internal, &scope))));
            }
        });
        processor.shutdown_with_timeout(Duration::from_secs(30)).expect("shutdown");
        let sent: usize = received.try_iter().map(|request| span_count(&request)).sum();
        assert!(lost.total() > 0, "the queue was never full: the test proves nothing");
        assert_eq!(sent as u64 + lost.total(), 8_000, "{sent} sent, {} counted lost", lost.total());
        let queue = processor.shared.lock();
        assert_eq!((queue.waiting, queue.sending), (0, 0));
    }

    #[test]
    fn batches_reused_or_kept_by_the_send_carry_each_span_once_in_order() {
        // Batches of 4, each sent and settled before the next fills: every batch after the first
        // starts from the spare the send handed back (to be cleared), or, when the send kept its
        // batch, from a new one.
        for hands_back in [true, false] {
            let limits = BatchLimits { delay: Duration::from_secs(3600), max_queue: 64, max_batch: 4 };
            let (processor, received, _gate, lost) = with_backend_handing_back(limits, Duration::ZERO, hands_back);
            let scope = InstrumentationScope::builder("reuse").build();
            let names = ["s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9"];
            let mut sent = Vec::new();
            for chunk in names.chunks(4) {
                chunk.iter().for_each(|name| processor.on_end(span(name, SpanKind::Internal, &scope)));
                if chunk.len() < 4 {
                    processor.shutdown_with_timeout(Duration::from_secs(10)).expect("shutdown");
                }
                sent.push(span_names(&received.recv_timeout(Duration::from_secs(10)).expect("a batch")));
                while processor.shared.lock().sending > 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
                let spare = processor.shared.lock().spare.is_some();
                assert_eq!(spare, hands_back, "the batch sent is the next one's spare only when handed back");
            }
            assert_eq!(sent, [&names[..4], &names[4..8], &names[8..]], "hands back: {hands_back}");
            assert_eq!(lost.total(), 0);
        }
    }

    #[test]
    fn a_processor_dropped_without_shutdown_still_sends_what_it_holds() {
        let limits = BatchLimits { delay: Duration::from_secs(3600), ..BatchLimits::default() };
        let (processor, received, _gate, _lost) = with_backend(limits, Duration::ZERO);
        let scope = InstrumentationScope::builder("dropped").build();
        (0..3).for_each(|_| processor.on_end(span("held", SpanKind::Internal, &scope)));
        drop(processor);
        let request = received.recv_timeout(Duration::from_secs(10)).expect("the held spans are sent");
        assert_eq!(span_count(&request), 3);
    }

    #[test]
    fn shutdown_gives_up_at_its_deadline_when_a_send_hangs() {
        let limits = BatchLimits { delay: Duration::from_secs(3600), ..BatchLimits::default() };
        let (processor, received, gate, _lost) = with_backend(limits, Duration::ZERO);
        let held = gate.lock().expect("gate");
        processor.on_end(span("stuck", SpanKind::Internal, &InstrumentationScope::builder("hung").build()));
        let result = processor.shutdown_with_timeout(Duration::from_millis(100));
        assert!(matches!(result, Err(OTelSdkError::Timeout(_))), "{result:?}");
        drop(held);
        // Once the backend answers, the span still goes out.
        let request = received.recv_timeout(Duration::from_secs(10)).expect("sent after all");
        assert_eq!(span_count(&request), 1);
    }
}
