//! The PostgreSQL backend: a pool shared with the admin API, reservations in groups, one
//! transaction per group. Several replicas may commit groups at once: each group first locks
//! the stock rows it will touch in SKU order, so two groups can wait for each other but never
//! deadlock.

use std::time::Duration;

use sqlx::Connection as _;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Executor, Postgres, Transaction};
use tokio::sync::mpsc;

use super::{
    AVAILABLE, COUNTS, FORGET, Job, LEVEL, MARK_REJECTED, MAX_BATCH, ORDER, OUTCOME, OrderRecord, OrderStatus, Outcome,
    RECORD, SCHEMA, SEED, StockLevel, StoreError, TAKE, answer, group,
};

/// Locks a group's stock rows, in a fixed order.
const LOCK: &str = "SELECT sku FROM stock WHERE sku = ANY($1) ORDER BY sku FOR UPDATE";

/// How long the pool waits for a connection, at startup and per transaction.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub(super) struct PostgresStore {
    pool: PgPool,
    jobs: mpsc::Sender<Job>,
}

impl PostgresStore {
    pub(super) async fn open(url: &str, catalog: &[&str], units: u32) -> Result<Self, StoreError> {
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await;
        let pool = match pool {
            // The pool retried until its timeout, and says only that: one connection of our own
            // says why (refused, unknown host, authentication).
            // (Bounded as the pool was: a host that drops packets would hold it for the kernel's
            // TCP timeout.)
            Err(sqlx::Error::PoolTimedOut) => {
                match tokio::time::timeout(ACQUIRE_TIMEOUT, PgConnection::connect_with(&options)).await {
                    Ok(Err(cause)) => return Err(cause.into()),
                    Ok(Ok(_)) | Err(_) => return Err(sqlx::Error::PoolTimedOut.into()),
                }
            }
            pool => pool?,
        };
        let mut tx = pool.begin().await?;
        // Concurrent CREATE TABLE IF NOT EXISTS races on PostgreSQL's catalog (a unique
        // violation on pg_type); replicas starting together take turns instead.
        tx.execute("SELECT pg_advisory_xact_lock(7243018)").await?;
        for statement in SCHEMA {
            tx.execute(statement).await?;
        }
        for sku in catalog {
            sqlx::query(SEED).bind(*sku).bind(i64::from(units)).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        let (jobs, mut queue) = mpsc::channel::<Job>(4 * MAX_BATCH);
        let batcher = pool.clone();
        tokio::spawn(async move {
            while let Some(first) = queue.recv().await {
                let group = group(first, &mut queue);
                let outcomes = match commit(&batcher, &group).await {
                    // One order's values failed the whole transaction: each again on its own,
                    // so only that order fails (and, refused for good, goes to the DLQ).
                    Err(error) if refused(&error).is_some() => Ok(one_by_one(&batcher, &group).await),
                    outcomes => outcomes,
                };
                answer(group, outcomes);
            }
        });
        Ok(Self { pool, jobs })
    }

    pub(super) async fn submit(&self, job: Job) -> Result<(), StoreError> {
        self.jobs.send(job).await.map_err(|_| StoreError::Closed)
    }

    pub(super) async fn level(&self, sku: &str) -> Result<Option<StockLevel>, StoreError> {
        let row: Option<(String, i64, i64)> = sqlx::query_as(LEVEL).bind(sku).fetch_optional(&self.pool).await?;
        Ok(row.map(|(sku, available, reserved)| StockLevel { sku, available, reserved }))
    }

    pub(super) async fn order(&self, order_id: &str) -> Result<Option<OrderRecord>, StoreError> {
        let row: Option<(String, String, i64)> =
            sqlx::query_as(ORDER).bind(order_id).fetch_optional(&self.pool).await?;
        row.map(|(order_id, outcome, recorded_at_us)| {
            Ok(OrderRecord { order_id, status: OrderStatus::parse(&outcome)?, recorded_at_us })
        })
        .transpose()
    }

    pub(super) async fn counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(sqlx::query_as(COUNTS).fetch_all(&self.pool).await?)
    }

    pub(super) async fn close(&self) {
        self.pool.close().await;
    }
}

/// The database's refusal of the values themselves, if that is what `error` is: SQLSTATE class
/// 22 (data exception: a NUL in a text value, say) or 54 (a program limit: an index row too
/// large). Retrying cannot help such an order, and it must not fail the rest of its group.
fn refused(error: &StoreError) -> Option<String> {
    let StoreError::Database(error) = error else { return None };
    let database = error.downcast_ref::<sqlx::Error>()?.as_database_error()?;
    let code = database.code()?;
    (code.starts_with("22") || code.starts_with("54")).then(|| format!("{} ({code})", database.message()))
}

/// Each order of a group in a transaction of its own, a refused one answered as such.
async fn one_by_one(pool: &PgPool, group: &[Job]) -> Vec<Result<Outcome, StoreError>> {
    let mut outcomes = Vec::with_capacity(group.len());
    for job in group {
        outcomes.push(match commit(pool, std::slice::from_ref(job)).await {
            Ok(mut outcome) => outcome.pop().unwrap_or(Err(StoreError::Closed)),
            Err(error) => Err(refused(&error).map_or(error, StoreError::Refused)),
        });
    }
    outcomes
}

/// One transaction for the whole group; an error in it fails the group (every order retries),
/// unless it is a refusal of one order's values (see [`refused`]).
async fn commit(pool: &PgPool, group: &[Job]) -> Result<Vec<Result<Outcome, StoreError>>, StoreError> {
    let mut tx = pool.begin().await?;
    let mut skus: Vec<&str> = group.iter().flat_map(|job| job.wanted.iter().map(|(sku, _)| sku.as_str())).collect();
    skus.sort_unstable();
    skus.dedup();
    sqlx::query(LOCK).bind(&skus).execute(&mut *tx).await?;
    let mut outcomes = Vec::with_capacity(group.len());
    for job in group {
        outcomes.push(reserve(&mut tx, job).await?);
    }
    tx.commit().await?;
    Ok(outcomes)
}

/// One reservation (steps in the module above); the outer `Err` is a database failure (the
/// group fails), the inner one an unknown SKU (this order alone).
async fn reserve(
    tx: &mut Transaction<'static, Postgres>,
    job: &Job,
) -> Result<Result<Outcome, StoreError>, StoreError> {
    let recorded = sqlx::query(RECORD)
        .bind(&job.order_id)
        .bind(OrderStatus::Reserved.as_str())
        .bind(job.now_us)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    if recorded == 0 {
        let outcome: String = sqlx::query_scalar(OUTCOME).bind(&job.order_id).fetch_one(&mut **tx).await?;
        return Ok(OrderStatus::parse(&outcome).map(Outcome::AlreadyProcessed));
    }
    let several = job.wanted.len() > 1;
    if several {
        tx.execute("SAVEPOINT order_lines").await?;
    }
    for (sku, units) in &job.wanted {
        let taken = sqlx::query(TAKE).bind(units).bind(sku).execute(&mut **tx).await?.rows_affected();
        if taken == 0 {
            let available: Option<i64> = sqlx::query_scalar(AVAILABLE).bind(sku).fetch_optional(&mut **tx).await?;
            if several {
                tx.execute("ROLLBACK TO SAVEPOINT order_lines").await?;
                tx.execute("RELEASE SAVEPOINT order_lines").await?;
            }
            return Ok(match available {
                None => {
                    sqlx::query(FORGET).bind(&job.order_id).execute(&mut **tx).await?;
                    Err(StoreError::UnknownSku(sku.clone()))
                }
                Some(available) => {
                    sqlx::query(MARK_REJECTED).bind(&job.order_id).execute(&mut **tx).await?;
                    Ok(Outcome::Rejected { sku: sku.clone(), requested: units.unsigned_abs(), available })
                }
            });
        }
    }
    if several {
        tx.execute("RELEASE SAVEPOINT order_lines").await?;
    }
    Ok(Ok(Outcome::Reserved))
}
