//! The SQLite backend: one file, one writer thread that owns the connection, WAL journal.
//!
//! Every statement runs on that thread, so a group of reservations costs one hand-over each
//! way instead of one per statement. A checkpoint (copying the WAL into the database, with two
//! fsyncs) on that thread would hold every reservation queued behind it, so a checkpointer
//! thread with a connection of its own does it, every [`CHECKPOINT_EVERY`], without blocking
//! the writer (SQLite's `PASSIVE` mode). SQLite reuses the WAL from its start only when a
//! write begins after a checkpoint copied everything, so a writer busy without a pause could
//! outrun it: the writer still checkpoints by itself past [`WRITER_CHECKPOINT_PAGES`], four
//! times SQLite's default, and the WAL file is cut back to [`WAL_SIZE_LIMIT`] when it restarts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot};

use super::{
    AVAILABLE, COUNTS, FORGET, Job, LEVEL, MARK_REJECTED, MAX_BATCH, ORDER, OUTCOME, OrderRecord, OrderStatus, Outcome,
    RECORD, SCHEMA, SEED, StockLevel, StoreError, TAKE, answer,
};

/// How often the checkpointer copies the WAL into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);

/// The WAL's length, in pages, past which the writer checkpoints by itself (the checkpointer
/// has not caught up with it).
const WRITER_CHECKPOINT_PAGES: u32 = 4000;

/// The WAL file's size (bytes) kept after it restarts.
const WAL_SIZE_LIMIT: u32 = 16 << 20;

/// What the writer thread is asked to do.
enum Request {
    Reserve(Job),
    Level(String, oneshot::Sender<Result<Option<StockLevel>, StoreError>>),
    Order(String, oneshot::Sender<Result<Option<OrderRecord>, StoreError>>),
    Counts(oneshot::Sender<Result<Vec<(String, i64)>, StoreError>>),
    Close(oneshot::Sender<()>),
}

#[derive(Debug, Clone)]
pub(super) struct SqliteStore {
    /// The writer thread's queue.
    requests: mpsc::Sender<Request>,
}

fn connect(path: &Path, catalog: &[String], units: u32) -> Result<Connection, StoreError> {
    let mut conn = Connection::open(path)?;
    // WAL + NORMAL: a commit survives a process crash (what broker redelivery relies on); only
    // an OS crash can lose the last commits.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // The checkpointer's job, the writer's only as a fallback (module doc).
    conn.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_PAGES)?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for statement in SCHEMA {
        tx.execute(statement, [])?;
    }
    for sku in catalog {
        tx.execute(SEED, params![sku, i64::from(units)])?;
    }
    tx.commit()?;
    Ok(conn)
}

impl SqliteStore {
    pub(super) async fn open(path: &Path, catalog: &[&str], units: u32) -> Result<Self, StoreError> {
        let (requests, queue) = mpsc::channel::<Request>(4 * MAX_BATCH);
        let (opened, ready) = oneshot::channel();
        let path: PathBuf = path.to_owned();
        let catalog: Vec<String> = catalog.iter().map(|s| s.to_string()).collect();
        std::thread::Builder::new()
            .name("stock-sqlite".into())
            .spawn(move || {
                let (mut conn, checkpointer) = match connect(&path, &catalog, units).and_then(|conn| {
                    let checkpointer = Checkpointer::start(&path)?;
                    Ok((conn, checkpointer))
                }) {
                    Ok(started) => started,
                    Err(error) => {
                        let _ = opened.send(Err(error));
                        return;
                    }
                };
                let _ = opened.send(Ok(()));
                let closed = serve(&mut conn, queue);
                drop(conn);
                // The last checkpoint before `close` returns: the WAL is then in the database.
                checkpointer.stop();
                if let Some(done) = closed {
                    let _ = done.send(());
                }
            })
            .map_err(|e| StoreError::Database(Box::new(e)))?;
        ready.await.map_err(|_| StoreError::Closed)??;
        Ok(Self { requests })
    }

    pub(super) async fn submit(&self, job: Job) -> Result<(), StoreError> {
        self.requests.send(Request::Reserve(job)).await.map_err(|_| StoreError::Closed)
    }

    async fn ask<T>(&self, request: impl FnOnce(oneshot::Sender<T>) -> Request) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.requests.send(request(reply)).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)
    }

    pub(super) async fn level(&self, sku: &str) -> Result<Option<StockLevel>, StoreError> {
        self.ask(|reply| Request::Level(sku.to_owned(), reply)).await?
    }

    pub(super) async fn order(&self, order_id: &str) -> Result<Option<OrderRecord>, StoreError> {
        self.ask(|reply| Request::Order(order_id.to_owned(), reply)).await?
    }

    pub(super) async fn counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.ask(Request::Counts).await?
    }

    pub(super) async fn close(&self) {
        let _ = self.ask(Request::Close).await;
    }
}

/// The writer thread: reservations in groups (whatever is queued, up to [`MAX_BATCH`]),
/// everything else as it comes. Returns when every sender is gone, or when asked to close,
/// with the answer to give once the store has closed.
fn serve(conn: &mut Connection, mut queue: mpsc::Receiver<Request>) -> Option<oneshot::Sender<()>> {
    while let Some(request) = queue.blocking_recv() {
        let first = match request {
            Request::Reserve(job) => job,
            Request::Close(done) => return Some(done),
            other => {
                answer_query(conn, other);
                continue;
            }
        };
        let mut group = vec![first];
        let mut later = Vec::new();
        while group.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(Request::Reserve(job)) => group.push(job),
                Ok(other) => later.push(other),
                Err(_) => break,
            }
        }
        let outcomes = commit(conn, &group);
        answer(group, outcomes);
        for request in later {
            if let Request::Close(done) = request {
                return Some(done);
            }
            answer_query(conn, request);
        }
    }
    None
}

/// The checkpointer thread (module doc).
struct Checkpointer {
    /// Dropped to stop it.
    running: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Checkpointer {
    fn start(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        let (running, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("stock-checkpoint".into())
            .spawn(move || checkpoint(&conn, &stopped))
            .map_err(|e| StoreError::Database(Box::new(e)))?;
        Ok(Self { running, thread })
    }

    /// Stops it after one last checkpoint, and waits for that.
    fn stop(self) {
        drop(self.running);
        let _ = self.thread.join();
    }
}

/// A `PASSIVE` checkpoint every [`CHECKPOINT_EVERY`] (it copies what it can and never waits for
/// the writer) until `stopped`, then a last one. A failure is logged once, not every time.
fn checkpoint(conn: &Connection, stopped: &std::sync::mpsc::Receiver<()>) {
    let mut failing = false;
    loop {
        let stop = !matches!(stopped.recv_timeout(CHECKPOINT_EVERY), Err(std::sync::mpsc::RecvTimeoutError::Timeout));
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("WAL checkpoints work again");
            }
            Ok(()) => {}
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(%error, "WAL checkpoint failed; trying again every {CHECKPOINT_EVERY:?}");
            }
            Err(_) => {}
        }
        if stop {
            return;
        }
    }
}

fn answer_query(conn: &Connection, request: Request) {
    match request {
        Request::Level(sku, reply) => {
            let level = conn
                .prepare_cached(LEVEL)
                .and_then(|mut s| {
                    s.query_row(params![sku], |r| {
                        Ok(StockLevel { sku: r.get(0)?, available: r.get(1)?, reserved: r.get(2)? })
                    })
                    .optional()
                })
                .map_err(StoreError::from);
            let _ = reply.send(level);
        }
        Request::Order(order_id, reply) => {
            let row = conn
                .prepare_cached(ORDER)
                .and_then(|mut s| {
                    s.query_row(params![order_id], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?))
                    })
                    .optional()
                })
                .map_err(StoreError::from);
            let record = row.and_then(|row| {
                row.map(|(order_id, outcome, recorded_at_us)| {
                    Ok(OrderRecord { order_id, status: OrderStatus::parse(&outcome)?, recorded_at_us })
                })
                .transpose()
            });
            let _ = reply.send(record);
        }
        Request::Counts(reply) => {
            let counts = conn
                .prepare_cached(COUNTS)
                .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<Vec<_>, _>>())
                .map_err(StoreError::from);
            let _ = reply.send(counts);
        }
        Request::Reserve(_) | Request::Close(_) => {}
    }
}

/// One transaction for the whole group; an error in it fails the group (every order retries).
fn commit(conn: &mut Connection, group: &[Job]) -> Result<Vec<Result<Outcome, StoreError>>, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut outcomes = Vec::with_capacity(group.len());
    for job in group {
        outcomes.push(reserve(&tx, job)?);
    }
    tx.commit()?;
    Ok(outcomes)
}

/// One reservation (steps in the module above); the outer `Err` is a database failure (the
/// group fails), the inner one an unknown SKU (this order alone).
fn reserve(tx: &rusqlite::Transaction<'_>, job: &Job) -> Result<Result<Outcome, StoreError>, StoreError> {
    let recorded =
        tx.prepare_cached(RECORD)?.execute(params![job.order_id, OrderStatus::Reserved.as_str(), job.now_us])?;
    if recorded == 0 {
        let outcome: String = tx.prepare_cached(OUTCOME)?.query_row(params![job.order_id], |r| r.get(0))?;
        return Ok(OrderStatus::parse(&outcome).map(Outcome::AlreadyProcessed));
    }
    let several = job.wanted.len() > 1;
    if several {
        tx.execute_batch("SAVEPOINT order_lines")?;
    }
    for (sku, units) in &job.wanted {
        let taken = tx.prepare_cached(TAKE)?.execute(params![units, sku])?;
        if taken == 0 {
            let available: Option<i64> =
                tx.prepare_cached(AVAILABLE)?.query_row(params![sku], |r| r.get(0)).optional()?;
            if several {
                tx.execute_batch("ROLLBACK TO SAVEPOINT order_lines; RELEASE SAVEPOINT order_lines")?;
            }
            return Ok(match available {
                None => {
                    tx.prepare_cached(FORGET)?.execute(params![job.order_id])?;
                    Err(StoreError::UnknownSku(sku.clone()))
                }
                Some(available) => {
                    tx.prepare_cached(MARK_REJECTED)?.execute(params![job.order_id])?;
                    Ok(Outcome::Rejected { sku: sku.clone(), requested: units.unsigned_abs(), available })
                }
            });
        }
    }
    if several {
        tx.execute_batch("RELEASE SAVEPOINT order_lines")?;
    }
    Ok(Ok(Outcome::Reserved))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The writer's fallback (module doc): should the checkpointer fall behind, the writer
    /// checkpoints by itself past 4,000 pages, and the WAL file is cut back to 16 MiB after it
    /// restarts. (Watching it happen takes over 16 MB of writes with the checkpointer stalled;
    /// the README's benchmark section has that measurement.)
    #[test]
    fn the_writer_is_set_to_checkpoint_past_4000_pages_and_cut_the_wal_back_to_16_mib() {
        let dir = tempfile::tempdir().expect("temp dir");
        let conn = connect(&dir.path().join("stock.db"), &["SKU-001".to_owned()], 10).expect("connect");
        let pragma = |name: &str| -> i64 { conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get(0)).expect(name) };

        assert_eq!(pragma("wal_autocheckpoint"), 4000);
        assert_eq!(pragma("journal_size_limit"), 16 << 20);
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).expect("journal_mode");
        assert_eq!(mode, "wal");
    }
}
