//! The delivery promise under faults: a 202 means the order is reserved exactly once,
//! whatever crashes. Each test prints its figures (run with --no-capture to see them).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tracehop_e2e::{LoadReport, Options, Pipeline, StockMode};
use tracehop_testkit::node::ThrowawayNode;

async fn wait_until(done: &AtomicUsize, count: usize) {
    while done.load(Ordering::Relaxed) < count {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_survive_stock_being_killed_twice() {
    let mut pipeline =
        Pipeline::start(Options { stock_mode: StockMode::Process, seed_units: 10_000, ..Options::default() }).await;
    let done = Arc::new(AtomicUsize::new(0));
    let load = tokio::spawn({
        let (client, done) = (pipeline.load_client(), done.clone());
        async move { client.run(3000, 16, done).await }
    });
    for at in [800, 1900] {
        wait_until(&done, at).await;
        pipeline.kill_stock();
        tokio::time::sleep(Duration::from_millis(500)).await;
        pipeline.restart_stock().await;
    }
    let report = load.await.expect("load");
    let (reserved_orders, reserved_units) =
        pipeline.assert_reserved_exactly_once(&report.accepted, Duration::from_secs(60)).await;
    let duplicates = pipeline.stock_log_count("redelivered order already handled");
    println!(
        "stock SIGKILLed twice: {} orders sent, {} accepted (202), statuses {:?}; {} orders reserved, {} units; \
         {} duplicate deliveries recognised and not reserved again",
        3000,
        report.accepted.len(),
        report.statuses,
        reserved_orders,
        reserved_units,
        duplicates
    );
    assert_eq!(report.accepted.len(), 3000, "stock being down never fails a checkout: {:?}", report.statuses);
    pipeline.stop().await;
}

/// Runs `orders` through a pipeline on a throw-away node, applying `fault` to the node once
/// `at` answers came back and restarting it after `outage`. Returns the load report, how long
/// after the restart the first 202 came, and the figures of the check.
async fn through_a_broker_outage(fault: &'static str, orders: usize, at: usize, outage: Duration) {
    let node = Arc::new(tokio::task::spawn_blocking(|| ThrowawayNode::start("outage")).await.expect("node"));
    let pipeline =
        Pipeline::start(Options { amqp_url: Some(node.amqp_url()), seed_units: 10_000, ..Options::default() }).await;
    let done = Arc::new(AtomicUsize::new(0));
    let client = pipeline.load_client();
    let load = tokio::spawn({
        let (client, done) = (client.clone(), done.clone());
        async move { client.run(orders, 8, done).await }
    });
    wait_until(&done, at).await;
    let down = tokio::time::Instant::now();
    let faulty = node.clone();
    tokio::task::spawn_blocking(move || if fault == "kill" { faulty.kill() } else { faulty.stop() })
        .await
        .expect("fault");
    tokio::time::sleep(outage).await;
    let restarting = node.clone();
    tokio::task::spawn_blocking(move || restarting.restart()).await.expect("restart");
    let back = tokio::time::Instant::now();
    let answered_before_restart = done.load(Ordering::Relaxed);
    // The first 202 after the broker is back: probe with single orders beside the load.
    let mut probe = LoadReport::default();
    while probe.accepted.is_empty() {
        assert!(back.elapsed() < Duration::from_secs(30), "no 202 within 30 s of the broker coming back");
        probe = client.run(1, 1, Arc::new(AtomicUsize::new(0))).await;
        if probe.accepted.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let resumed_after = back.elapsed();
    let mut report = load.await.expect("load");
    report.accepted.extend(probe.accepted);
    let (reserved_orders, reserved_units) =
        pipeline.assert_reserved_exactly_once(&report.accepted, Duration::from_secs(60)).await;
    println!(
        "broker {fault} for {:?} (down at answer {at}, {} answers by the restart): {} orders, {} accepted, statuses {:?}, \
         slowest answer {:?}; first 202 {:?} after the broker was back; {} orders reserved, {} units: 0 lost, 0 twice",
        down.elapsed() - resumed_after,
        answered_before_restart,
        orders + 1,
        report.accepted.len(),
        report.statuses,
        report.slowest,
        resumed_after,
        reserved_orders,
        reserved_units,
    );
    assert_eq!(report.statuses.get("error"), None, "every request got an answer: {:?}", report.statuses);
    let failures: usize = report.statuses.iter().filter(|(s, _)| *s != "202").map(|(_, n)| n).sum();
    assert!(
        failures == 0 || report.statuses.keys().all(|s| ["202", "503", "504"].contains(&s.as_str())),
        "{:?}",
        report.statuses
    );
    assert!(report.slowest < Duration::from_secs(3), "an answer took {:?}: longer than the deadline", report.slowest);
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_survive_a_clean_broker_restart() {
    through_a_broker_outage("stop", 1500, 300, Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_survive_the_broker_being_killed() {
    through_a_broker_outage("kill", 1500, 300, Duration::from_secs(3)).await;
}
