//! The stock store: one interface, two backends chosen by `STOCK_DB`.
//!
//! SQLite (a file path, the default) serves one stock process; PostgreSQL (a `postgres://` URL)
//! lets several replicas compete for the same queue. Both keep the same promise: a reservation
//! and its order-id record commit in one transaction, so a redelivered message, on whichever
//! replica, reserves nothing twice.
//!
//! Both backends run the same SQL through sqlx's `Any` driver (`$N` placeholders and
//! `ON CONFLICT` mean the same thing in both); only how a transaction starts and how the schema
//! creation is serialised differ, in [`Dialect`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::AnyPool;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Executor};

/// Where the store lives, parsed from `STOCK_DB`.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A SQLite database file, created if missing.
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL (`postgres://` or `postgresql://`).
    Postgres(String),
}

impl StoreLocation {
    /// Reads a `STOCK_DB` value: a PostgreSQL URL, or else a SQLite file path.
    pub fn parse(value: &str) -> Result<Self, String> {
        let value = value.trim();
        if value.is_empty() {
            return Err("must be a SQLite file path or a postgres:// URL, got an empty value".into());
        }
        if value.starts_with("postgres://") || value.starts_with("postgresql://") {
            Ok(Self::Postgres(value.to_owned()))
        } else if value.contains("://") {
            Err(format!("unsupported URL scheme in {value:?}: use a SQLite file path or a postgres:// URL"))
        } else {
            Ok(Self::Sqlite(PathBuf::from(value)))
        }
    }
}

// The URL may carry a password: never print it.
impl fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
            Self::Postgres(_) => f.write_str("postgres://<redacted>"),
        }
    }
}

/// One line of an order, as the reservation sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderLine {
    /// Catalog SKU.
    pub sku: String,
    /// Units asked for.
    pub quantity: u32,
}

/// What a reservation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every line was reserved.
    Reserved,
    /// Not enough stock for `sku`: nothing was reserved, the order is recorded as rejected.
    Rejected {
        /// The first SKU that fell short.
        sku: String,
        /// Units the order asked for.
        requested: u64,
        /// Units that were available.
        available: i64,
    },
    /// This order id was already handled (a redelivery): nothing changed.
    AlreadyProcessed(OrderStatus),
}

/// How an order ended, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderStatus {
    /// Stock was reserved.
    Reserved,
    /// Not enough stock.
    Rejected,
}

impl OrderStatus {
    /// The stored and reported spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reserved => "reserved",
            Self::Rejected => "rejected",
        }
    }

    fn parse(value: &str) -> Result<Self, StoreError> {
        match value {
            "reserved" => Ok(Self::Reserved),
            "rejected" => Ok(Self::Rejected),
            other => Err(StoreError::Corrupt(format!("unknown order outcome {other:?}"))),
        }
    }
}

/// An order as the store recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRecord {
    /// The order id.
    pub order_id: String,
    /// How it ended.
    pub status: OrderStatus,
    /// When the outcome committed, in microseconds since the Unix epoch.
    pub recorded_at_us: i64,
}

/// Stock of one SKU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StockLevel {
    /// Catalog SKU.
    pub sku: String,
    /// Units that can still be reserved.
    pub available: i64,
    /// Units reserved by orders so far.
    pub reserved: i64,
}

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The order names a SKU the store does not carry: retrying cannot help.
    #[error("unknown SKU {0:?}")]
    UnknownSku(String),
    /// The database answered with an error or could not be reached: worth a retry.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// A stored value the code does not understand.
    #[error("corrupt store: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether the same request can never succeed (so the message belongs in the DLQ).
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::UnknownSku(_))
    }
}

const SCHEMA: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS stock (
        sku TEXT PRIMARY KEY,
        available BIGINT NOT NULL,
        reserved BIGINT NOT NULL DEFAULT 0
    )",
    "CREATE TABLE IF NOT EXISTS orders (
        order_id TEXT PRIMARY KEY,
        outcome TEXT NOT NULL,
        recorded_at_us BIGINT NOT NULL
    )",
];

const SEED: &str = "INSERT INTO stock (sku, available, reserved) VALUES ($1, $2, 0) ON CONFLICT (sku) DO NOTHING";
const TAKE: &str =
    "UPDATE stock SET available = available - $1, reserved = reserved + $1 WHERE sku = $2 AND available >= $1";
const AVAILABLE: &str = "SELECT available FROM stock WHERE sku = $1";
const RECORD: &str =
    "INSERT INTO orders (order_id, outcome, recorded_at_us) VALUES ($1, $2, $3) ON CONFLICT (order_id) DO NOTHING";
const LEVEL: &str = "SELECT sku, available, reserved FROM stock WHERE sku = $1";
const ORDER: &str = "SELECT order_id, outcome, recorded_at_us FROM orders WHERE order_id = $1";
const COUNTS: &str = "SELECT outcome, COUNT(*) FROM orders GROUP BY outcome";

/// What differs between the two engines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// SQLite: take the write lock up front, so a transaction never fails to upgrade a read lock
    /// half-way (SQLITE_BUSY without waiting). PostgreSQL: row locks taken by the updates.
    fn begin(self) -> &'static str {
        match self {
            Dialect::Sqlite => "BEGIN IMMEDIATE",
            Dialect::Postgres => "BEGIN",
        }
    }
}

/// The stock store, on whichever backend `STOCK_DB` chose.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
}

impl Store {
    /// Opens the store, creates the schema if absent and seeds `units` of each catalog SKU the
    /// store does not carry yet. Safe when several replicas open the same database at once.
    pub async fn open(location: &StoreLocation, catalog: &[&str], units: u32) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let (pool, dialect) = match location {
            StoreLocation::Sqlite(path) => {
                let url = SqliteConnectOptions::new().filename(path).create_if_missing(true).to_url_lossy();
                let options: AnyConnectOptions = url.as_str().parse()?;
                // One writer at a time is all SQLite has: one connection queues transactions in
                // the pool instead of in busy retries. WAL + NORMAL: a commit survives a process
                // crash (what broker redelivery relies on); an OS crash may lose the last ones.
                let pool = AnyPoolOptions::new()
                    .max_connections(1)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            conn.execute("PRAGMA journal_mode = WAL").await?;
                            conn.execute("PRAGMA synchronous = NORMAL").await?;
                            conn.execute("PRAGMA busy_timeout = 5000").await?;
                            Ok(())
                        })
                    })
                    .connect_with(options)
                    .await?;
                (pool, Dialect::Sqlite)
            }
            StoreLocation::Postgres(url) => {
                let options: AnyConnectOptions = url.parse()?;
                let pool = AnyPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect_with(options)
                    .await?;
                (pool, Dialect::Postgres)
            }
        };
        let store = Self { pool, dialect };
        store.create_schema(catalog, units).await?;
        Ok(store)
    }

    async fn create_schema(&self, catalog: &[&str], units: u32) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with(self.dialect.begin()).await?;
        if self.dialect == Dialect::Postgres {
            // Concurrent CREATE TABLE IF NOT EXISTS races on PostgreSQL's catalog (a unique
            // violation on pg_type); replicas starting together take turns instead.
            tx.execute("SELECT pg_advisory_xact_lock(7243018)").await?;
        }
        for statement in SCHEMA {
            tx.execute(statement).await?;
        }
        for sku in catalog {
            sqlx::query(SEED).bind(*sku).bind(i64::from(units)).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// `db.system.name` for spans, per OpenTelemetry semantic conventions.
    pub fn db_system(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "sqlite",
            Dialect::Postgres => "postgresql",
        }
    }

    /// Reserves every line of `order_id` in one transaction, or none of them.
    ///
    /// Lines naming the same SKU are added up; SKUs are updated in sorted order so concurrent
    /// replicas cannot deadlock. The order-id record commits with the reservation: a redelivery
    /// (here or on another replica) conflicts on it and rolls its updates back.
    pub async fn reserve(&self, order_id: &str, lines: &[OrderLine]) -> Result<Outcome, StoreError> {
        let mut wanted: BTreeMap<&str, u64> = BTreeMap::new();
        for line in lines {
            *wanted.entry(line.sku.as_str()).or_default() += u64::from(line.quantity);
        }
        let now = now_us();
        let mut tx = self.pool.begin_with(self.dialect.begin()).await?;
        for (sku, units) in wanted {
            let units = i64::try_from(units).unwrap_or(i64::MAX);
            let taken = sqlx::query(TAKE).bind(units).bind(sku).execute(&mut *tx).await?.rows_affected();
            if taken == 0 {
                let available: Option<i64> = sqlx::query_scalar(AVAILABLE).bind(sku).fetch_optional(&mut *tx).await?;
                tx.rollback().await?;
                let Some(available) = available else {
                    return Err(StoreError::UnknownSku(sku.to_owned()));
                };
                let rejected = Outcome::Rejected { sku: sku.to_owned(), requested: units.unsigned_abs(), available };
                return self.record_rejection(order_id, rejected, now).await;
            }
        }
        let recorded = sqlx::query(RECORD)
            .bind(order_id)
            .bind(OrderStatus::Reserved.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if recorded == 0 {
            tx.rollback().await?;
            return self.already_processed(order_id).await;
        }
        tx.commit().await?;
        Ok(Outcome::Reserved)
    }

    async fn record_rejection(&self, order_id: &str, rejected: Outcome, now: i64) -> Result<Outcome, StoreError> {
        let recorded = sqlx::query(RECORD)
            .bind(order_id)
            .bind(OrderStatus::Rejected.as_str())
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected();
        if recorded == 0 { self.already_processed(order_id).await } else { Ok(rejected) }
    }

    async fn already_processed(&self, order_id: &str) -> Result<Outcome, StoreError> {
        let record =
            self.order(order_id).await?.ok_or_else(|| StoreError::Corrupt(format!("order {order_id} vanished")))?;
        Ok(Outcome::AlreadyProcessed(record.status))
    }

    /// The stock of `sku`, if the store carries it.
    pub async fn level(&self, sku: &str) -> Result<Option<StockLevel>, StoreError> {
        let row: Option<(String, i64, i64)> = sqlx::query_as(LEVEL).bind(sku).fetch_optional(&self.pool).await?;
        Ok(row.map(|(sku, available, reserved)| StockLevel { sku, available, reserved }))
    }

    /// How `order_id` ended, if the store has seen it.
    pub async fn order(&self, order_id: &str) -> Result<Option<OrderRecord>, StoreError> {
        let row: Option<(String, String, i64)> =
            sqlx::query_as(ORDER).bind(order_id).fetch_optional(&self.pool).await?;
        row.map(|(order_id, outcome, recorded_at_us)| {
            Ok(OrderRecord { order_id, status: OrderStatus::parse(&outcome)?, recorded_at_us })
        })
        .transpose()
    }

    /// How many orders ended in each outcome: (reserved, rejected).
    pub async fn order_counts(&self) -> Result<(i64, i64), StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(COUNTS).fetch_all(&self.pool).await?;
        let count = |status: OrderStatus| rows.iter().find(|(s, _)| s == status.as_str()).map_or(0, |(_, n)| *n);
        Ok((count(OrderStatus::Reserved), count(OrderStatus::Rejected)))
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}
