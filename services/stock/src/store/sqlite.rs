//! The SQLite backend: one file, one writer thread that owns the connection, WAL journal.
//!
//! Every statement runs on that thread, so a group of reservations costs one hand-over each
//! way instead of one per statement. The writer never checkpoints: a checkpoint (copying the
//! WAL into the database, with two fsyncs) would hold every reservation queued behind it. A
//! checkpointer thread with a connection of its own does it instead, every
//! [`CHECKPOINT_EVERY`], without blocking the writer (SQLite's `PASSIVE` mode); the writer
//! reuses the WAL from its start once a checkpoint has caught up.

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
    // The checkpointer's job (module doc).
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
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
        // The checkpointer stops when the writer does: the writer holds the sender.
        let (writer_alive, writer_gone) = std::sync::mpsc::channel::<()>();
        let writer_path = path.clone();
        std::thread::Builder::new()
            .name("stock-sqlite".into())
            .spawn(move || {
                let _alive = writer_alive;
                match connect(&writer_path, &catalog, units) {
                    Ok(mut conn) => {
                        let _ = opened.send(Ok(()));
                        serve(&mut conn, queue);
                    }
                    Err(error) => {
                        let _ = opened.send(Err(error));
                    }
                }
            })
            .map_err(|e| StoreError::Database(Box::new(e)))?;
        ready.await.map_err(|_| StoreError::Closed)??;
        let checkpoints = Connection::open(&path)?;
        std::thread::Builder::new()
            .name("stock-checkpoint".into())
            .spawn(move || checkpoint(&checkpoints, &writer_gone))
            .map_err(|e| StoreError::Database(Box::new(e)))?;
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
/// everything else as it comes. Returns when asked to close or when every sender is gone.
fn serve(conn: &mut Connection, mut queue: mpsc::Receiver<Request>) {
    while let Some(request) = queue.blocking_recv() {
        let first = match request {
            Request::Reserve(job) => job,
            Request::Close(done) => {
                let _ = done.send(());
                return;
            }
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
                let _ = done.send(());
                return;
            }
            answer_query(conn, request);
        }
    }
}

/// The checkpointer thread: a `PASSIVE` checkpoint every [`CHECKPOINT_EVERY`] (it copies what
/// it can and never waits for the writer) until the writer has stopped, then a last one.
fn checkpoint(conn: &Connection, writer_gone: &std::sync::mpsc::Receiver<()>) {
    loop {
        let stop =
            !matches!(writer_gone.recv_timeout(CHECKPOINT_EVERY), Err(std::sync::mpsc::RecvTimeoutError::Timeout));
        if let Err(error) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(%error, "WAL checkpoint failed; the next one will try again");
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
