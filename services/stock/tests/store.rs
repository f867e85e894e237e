//! The stock store's SQL on real engines: a SQLite file and a PostgreSQL database per test.

use stock::store::{OrderLine, OrderStatus, Outcome, Store, StoreError, StoreLocation};
use tracehop_testkit::postgres::TestDatabase;

const CATALOG: [&str; 3] = ["SKU-001", "SKU-002", "SKU-003"];

fn line(sku: &str, quantity: u32) -> OrderLine {
    OrderLine { sku: sku.to_owned(), quantity }
}

/// Runs `check` against a fresh SQLite store and a fresh PostgreSQL store.
macro_rules! on_both_backends {
    ($sqlite:ident, $postgres:ident, $check:ident) => {
        #[tokio::test]
        async fn $sqlite() {
            let dir = tempfile::tempdir().expect("temp dir");
            let store = Store::open(&StoreLocation::Sqlite(dir.path().join("stock.db")), &CATALOG, 1000)
                .await
                .expect("open sqlite");
            $check(store).await;
        }

        #[tokio::test]
        async fn $postgres() {
            let db = TestDatabase::create().await;
            let store = Store::open(&StoreLocation::parse(db.url()).expect("url"), &CATALOG, 1000)
                .await
                .expect("open postgres");
            $check(store.clone()).await;
            store.close().await;
        }
    };
}

async fn available(store: &Store, sku: &str) -> i64 {
    store.level(sku).await.expect("level").expect("sku exists").available
}

async fn new_store_is_seeded(store: Store) {
    for sku in CATALOG {
        let level = store.level(sku).await.expect("level").expect("seeded");
        assert_eq!((level.available, level.reserved), (1000, 0), "{sku}");
    }
    assert_eq!(store.level("SKU-404").await.expect("level"), None);
}
on_both_backends!(sqlite_new_store_is_seeded, postgres_new_store_is_seeded, new_store_is_seeded);

async fn reservation_moves_units_and_records_the_order(store: Store) {
    let outcome = store.reserve("order-1", &[line("SKU-001", 2), line("SKU-003", 1), line("SKU-001", 3)]).await;
    assert_eq!(outcome.expect("reserve"), Outcome::Reserved);
    let level = store.level("SKU-001").await.expect("level").expect("sku");
    assert_eq!((level.available, level.reserved), (995, 5), "lines of one SKU add up");
    assert_eq!(available(&store, "SKU-003").await, 999);
    let record = store.order("order-1").await.expect("order").expect("recorded");
    assert_eq!(record.status, OrderStatus::Reserved);
    assert!(record.recorded_at_us > 0);
}
on_both_backends!(
    sqlite_reservation_moves_units_and_records_the_order,
    postgres_reservation_moves_units_and_records_the_order,
    reservation_moves_units_and_records_the_order
);

async fn redelivered_order_reserves_once(store: Store) {
    let lines = [line("SKU-002", 4)];
    assert_eq!(store.reserve("order-1", &lines).await.expect("first"), Outcome::Reserved);
    let again = store.reserve("order-1", &lines).await.expect("second");
    assert_eq!(again, Outcome::AlreadyProcessed(OrderStatus::Reserved));
    assert_eq!(available(&store, "SKU-002").await, 996);
}
on_both_backends!(
    sqlite_redelivered_order_reserves_once,
    postgres_redelivered_order_reserves_once,
    redelivered_order_reserves_once
);

async fn insufficient_stock_reserves_nothing_and_is_recorded(store: Store) {
    let outcome = store.reserve("big", &[line("SKU-001", 1), line("SKU-002", 1001)]).await.expect("reserve");
    assert_eq!(outcome, Outcome::Rejected { sku: "SKU-002".into(), requested: 1001, available: 1000 });
    assert_eq!(available(&store, "SKU-001").await, 1000, "the line that fitted was rolled back");
    assert_eq!(store.order("big").await.expect("order").expect("recorded").status, OrderStatus::Rejected);
    let again = store.reserve("big", &[line("SKU-001", 1)]).await.expect("redelivery");
    assert_eq!(again, Outcome::AlreadyProcessed(OrderStatus::Rejected));
    assert_eq!(available(&store, "SKU-001").await, 1000);
}
on_both_backends!(
    sqlite_insufficient_stock_reserves_nothing_and_is_recorded,
    postgres_insufficient_stock_reserves_nothing_and_is_recorded,
    insufficient_stock_reserves_nothing_and_is_recorded
);

async fn unknown_sku_is_a_permanent_error_that_records_nothing(store: Store) {
    let error = store.reserve("odd", &[line("SKU-001", 1), line("SKU-404", 1)]).await.expect_err("unknown sku");
    assert!(matches!(&error, StoreError::UnknownSku(sku) if sku == "SKU-404"), "{error:?}");
    assert!(error.is_permanent());
    assert_eq!(available(&store, "SKU-001").await, 1000);
    assert_eq!(store.order("odd").await.expect("order"), None);
}
on_both_backends!(
    sqlite_unknown_sku_is_a_permanent_error_that_records_nothing,
    postgres_unknown_sku_is_a_permanent_error_that_records_nothing,
    unknown_sku_is_a_permanent_error_that_records_nothing
);

#[tokio::test]
async fn reopening_a_store_keeps_its_stock() {
    let dir = tempfile::tempdir().expect("temp dir");
    let location = StoreLocation::Sqlite(dir.path().join("stock.db"));
    let store = Store::open(&location, &CATALOG, 1000).await.expect("open");
    store.reserve("o", &[line("SKU-001", 10)]).await.expect("reserve");
    store.close().await;
    let store = Store::open(&location, &CATALOG, 5).await.expect("reopen");
    assert_eq!(available(&store, "SKU-001").await, 990, "seeding only fills SKUs the store lacks");
}

#[tokio::test]
async fn replicas_starting_together_on_an_empty_database_seed_once() {
    let db = TestDatabase::create().await;
    let location = StoreLocation::parse(db.url()).expect("url");
    let opens = (0..3).map(|_| Store::open(&location, &CATALOG, 1000));
    let stores: Vec<Store> = futures_util::future::try_join_all(opens).await.expect("all replicas open");
    let mut seeded = Vec::new();
    for sku in CATALOG {
        seeded.push((sku, available(&stores[0], sku).await));
    }
    println!("3 replicas opened one empty PostgreSQL database at once; units per SKU: {seeded:?}");
    for (sku, units) in seeded {
        assert_eq!(units, 1000, "{sku} seeded once, not three times");
    }
    for store in stores {
        store.close().await;
    }
}

#[tokio::test]
async fn the_same_order_on_two_replicas_at_once_reserves_once() {
    let db = TestDatabase::create().await;
    let location = StoreLocation::parse(db.url()).expect("url");
    let a = Store::open(&location, &CATALOG, 1000).await.expect("replica a");
    let b = Store::open(&location, &CATALOG, 1000).await.expect("replica b");
    for round in 0..20 {
        let order_id = format!("race-{round}");
        let lines = [line("SKU-003", 1), line("SKU-001", 1)];
        let (x, y) = tokio::join!(a.reserve(&order_id, &lines), b.reserve(&order_id, &lines));
        let mut outcomes = [x.expect("a"), y.expect("b")];
        outcomes.sort_by_key(|o| matches!(o, Outcome::AlreadyProcessed(_)));
        assert_eq!(outcomes, [Outcome::Reserved, Outcome::AlreadyProcessed(OrderStatus::Reserved)]);
    }
    assert_eq!(available(&a, "SKU-003").await, 980);
    a.close().await;
    b.close().await;
}

/// The pool alone would say "pool timed out while waiting for an open connection".
#[tokio::test]
async fn an_unreachable_postgres_says_why() {
    // Port 1 (tcpmux): nothing listens there, and no test can take it.
    let location = StoreLocation::Postgres("postgres://postgres@127.0.0.1:1/nothing".to_owned());
    let error = Store::open(&location, &["SKU-001"], 1).await.expect_err("nothing listens");
    let chain = tracehop_telemetry::spans::error_chain(&error);
    assert!(chain.to_lowercase().contains("refused"), "{chain}");
}

#[test]
fn stock_db_values_pick_the_backend() {
    assert!(matches!(StoreLocation::parse("stock.db"), Ok(StoreLocation::Sqlite(_))));
    assert!(matches!(StoreLocation::parse("postgres://u@h/db"), Ok(StoreLocation::Postgres(_))));
    assert!(matches!(StoreLocation::parse("postgresql://u@h/db"), Ok(StoreLocation::Postgres(_))));
    assert!(StoreLocation::parse("mysql://u@h/db").is_err());
    assert!(StoreLocation::parse(" ").is_err());
    let bad_port = StoreLocation::parse("postgres://u:secret@h:notaport/db").expect_err("a bad port");
    assert!(bad_port.contains("port") && !bad_port.contains("secret"), "{bad_port}");
    let debug = format!("{:?}", StoreLocation::parse("postgres://u:secret@h/db").expect("url"));
    assert!(!debug.contains("secret"), "{debug}");
}

async fn concurrent_reservations_keep_their_own_outcomes(store: Store) {
    // Enough at once that the store commits them in groups; every kind of outcome mixed in.
    let mut calls = Vec::new();
    for i in 0..150 {
        let (order_id, lines) = match i % 5 {
            0 => (format!("dup-{}", i % 10), vec![line("SKU-001", 1)]),
            1 => (format!("unknown-{i}"), vec![line("SKU-002", 1), line("SKU-404", 1)]),
            2 => (format!("short-{i}"), vec![line("SKU-002", 1), line("SKU-003", 5000)]),
            _ => (format!("ok-{i}"), vec![line("SKU-001", 1), line("SKU-002", 2)]),
        };
        let store = store.clone();
        calls.push(tokio::spawn(async move { (order_id.clone(), store.reserve(&order_id, &lines).await) }));
    }
    let mut reserved_ok = 0;
    for call in calls {
        let (order_id, outcome) = call.await.expect("task");
        match (order_id.split('-').next().expect("kind"), outcome) {
            ("ok", Ok(Outcome::Reserved)) => reserved_ok += 1,
            ("dup", Ok(Outcome::Reserved | Outcome::AlreadyProcessed(OrderStatus::Reserved))) => {}
            ("unknown", Err(StoreError::UnknownSku(sku))) => assert_eq!(sku, "SKU-404"),
            ("short", Ok(Outcome::Rejected { sku, .. })) => assert_eq!(sku, "SKU-003"),
            (kind, other) => panic!("{order_id} ({kind}): unexpected {other:?}"),
        }
    }
    assert_eq!(reserved_ok, 60);
    // dup-0, dup-5 (i = 0, 5, 10, ... give i % 10 in {0, 5}): two distinct orders.
    assert_eq!(available(&store, "SKU-001").await, 1000 - 60 - 2, "duplicates reserved once");
    assert_eq!(available(&store, "SKU-002").await, 1000 - 120, "unknown and short orders undid their first line");
    assert_eq!(available(&store, "SKU-003").await, 1000);
    assert_eq!(store.order("unknown-1").await.expect("order"), None, "an unknown SKU records nothing");
    assert_eq!(store.order("short-2").await.expect("order").expect("recorded").status, OrderStatus::Rejected);
}
on_both_backends!(
    sqlite_concurrent_reservations_keep_their_own_outcomes,
    postgres_concurrent_reservations_keep_their_own_outcomes,
    concurrent_reservations_keep_their_own_outcomes
);

/// The SQLite writer leaves checkpoints (copying the WAL into the database file, two fsyncs) to a
/// thread of their own, so no reservation waits behind one; the rows still reach the file, and
/// all of them once the store has closed.
#[tokio::test]
async fn sqlite_reservations_reach_the_database_file_through_the_checkpointer() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("stock.db");
    let store = Store::open(&StoreLocation::Sqlite(path.clone()), &CATALOG, 1000).await.expect("open");
    for i in 0..20 {
        store.reserve(&format!("order-{i}"), &[line("SKU-001", 1)]).await.expect("reserve");
    }
    // A copy of the database file alone, without its WAL: what has been checkpointed so far.
    let copy = dir.path().join("copy.db");
    let checkpointed = || -> Option<i64> {
        std::fs::copy(&path, &copy).ok()?;
        let conn = rusqlite::Connection::open(&copy).ok()?;
        conn.query_row("SELECT count(*) FROM orders", [], |r| r.get(0)).ok()
    };
    let mut seen = None;
    for _ in 0..50 {
        seen = checkpointed();
        if seen == Some(20) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(seen, Some(20), "the 20 orders did not reach the database file within 5 s");
    // Closing waits for a last checkpoint: what was reserved just before is in the file at once.
    for i in 20..40 {
        store.reserve(&format!("order-{i}"), &[line("SKU-001", 1)]).await.expect("reserve");
    }
    store.close().await;
    assert_eq!(checkpointed(), Some(40), "orders reserved just before close are not in the database file");
}

#[tokio::test]
async fn postgres_an_order_it_cannot_store_fails_alone_not_its_group() {
    let db = TestDatabase::create().await;
    let store = Store::open(&StoreLocation::parse(db.url()).expect("url"), &CATALOG, 1000).await.expect("open");
    // Sent at once, so the store commits them in one group; PostgreSQL's text cannot hold the
    // NUL, which fails the statement and with it the group's transaction.
    let mut calls = Vec::new();
    for i in 0..21 {
        let (order_id, sku) = if i == 10 { ("bad".to_owned(), "SKU\u{0}-001") } else { (format!("ok-{i}"), "SKU-001") };
        let store = store.clone();
        calls.push(tokio::spawn(async move { (order_id.clone(), store.reserve(&order_id, &[line(sku, 1)]).await) }));
    }
    for call in calls {
        match call.await.expect("task") {
            (order_id, Err(error @ StoreError::Refused(_))) if order_id == "bad" => {
                assert!(error.is_permanent() && error.reason() == "invalid_order", "{error:?}");
                assert!(error.to_string().contains("22021"), "{error}");
            }
            (order_id, Ok(Outcome::Reserved)) if order_id.starts_with("ok-") => {}
            (order_id, other) => panic!("{order_id}: unexpected {other:?}"),
        }
    }
    assert_eq!(available(&store, "SKU-001").await, 1000 - 20);
    assert_eq!(store.order("bad").await.expect("order"), None, "nothing recorded for it");
    store.close().await;
}
