//! Scale-out on real engines: competing stock replicas on PostgreSQL, and a three-node RabbitMQ
//! cluster losing the node that leads the queue. The same promise (a 202 is reserved exactly
//! once) and the same trace shape (each CONSUMER span a child of its PRODUCER span).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use stock::store::StoreLocation;
use tracehop_e2e::{LoadReport, Options, Pipeline, StockMode};
use tracehop_testkit::node::ThrowawayCluster;
use tracehop_testkit::postgres::TestDatabase;

async fn wait_until(done: &AtomicUsize, count: usize) {
    while done.load(Ordering::Relaxed) < count {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What the CONSUMER spans received show.
struct ConsumerSpans {
    /// CONSUMER spans checked against their PRODUCER span.
    children: usize,
    /// Accepted orders without a CONSUMER span (exported by nobody: the spans a SIGKILLed
    /// replica still held in memory).
    unexported: usize,
    /// CONSUMER spans per `service.instance.id`: what Jaeger shows as the replica.
    per_instance: std::collections::BTreeMap<String, usize>,
}

/// Every CONSUMER span received is the child of its trace's PRODUCER span.
async fn assert_consumers_are_children_of_producers(pipeline: &Pipeline, traces: &[String]) -> ConsumerSpans {
    pipeline.flush().await;
    // The replicas export every 100 ms; give the last batches time to land.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spans = pipeline.receiver.spans();
    let consumed: std::collections::HashSet<&str> =
        spans.iter().filter(|s| s.kind == SpanKind::Consumer).map(|s| s.trace_id.as_str()).collect();
    let without = traces.iter().filter(|t| !consumed.contains(t.as_str())).count();
    let producers: HashMap<&str, &str> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Producer)
        .map(|s| (s.trace_id.as_str(), s.span_id.as_str()))
        .collect();
    let mut consumers = 0;
    let mut per_instance = std::collections::BTreeMap::new();
    for span in spans.iter().filter(|s| s.kind == SpanKind::Consumer) {
        let instance = span.resource.get("service.instance.id").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
        *per_instance.entry(instance).or_insert(0) += 1;
        let producer = producers
            .get(span.trace_id.as_str())
            .unwrap_or_else(|| panic!("trace {} has a CONSUMER span but no PRODUCER span", span.trace_id));
        assert_eq!(
            span.parent_span_id, *producer,
            "a CONSUMER span of trace {} is not the PRODUCER's child",
            span.trace_id
        );
        consumers += 1;
    }
    ConsumerSpans { children: consumers, unexported: without, per_instance }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_stock_replicas_on_postgres_reserve_each_order_once_through_a_kill() {
    let db = TestDatabase::create().await;
    let mut pipeline = Pipeline::start(Options {
        stock_mode: StockMode::Process,
        store: Some(StoreLocation::Postgres(db.url().to_owned())),
        seed_units: 10_000,
        ..Options::default()
    })
    .await;
    pipeline.add_stock_replica("stock-1").await;
    pipeline.add_stock_replica("stock-2").await;
    let done = Arc::new(AtomicUsize::new(0));
    let load = tokio::spawn({
        let (client, done) = (pipeline.load_client(), done.clone());
        async move { client.run(3000, 16, done).await }
    });
    wait_until(&done, 1200).await;
    pipeline.kill_replica("stock-1");
    let report: LoadReport = load.await.expect("load");
    let (reserved_orders, units) =
        pipeline.assert_reserved_exactly_once(&report.accepted, Duration::from_secs(60)).await;
    let handled = pipeline.stock_log_counts("stock reserved");
    let duplicates = pipeline.stock_log_count("redelivered order already handled");
    let spans = assert_consumers_are_children_of_producers(&pipeline, &report.traces).await;
    let (consumers, without) = (spans.children, spans.unexported);
    println!(
        "3 replicas on PostgreSQL, stock-1 SIGKILLed after 1,200 answers: {} orders accepted of 3,000 ({:?}); \
         {reserved_orders} reserved, {units} units; handled per replica {handled:?}; {duplicates} duplicate deliveries \
         recognised; {consumers} CONSUMER spans, each the child of its PRODUCER span ({without} orders' spans died \
         unexported with the killed replica); CONSUMER spans per service.instance.id {:?}",
        report.accepted.len(),
        report.statuses,
        spans.per_instance,
    );
    assert_eq!(report.accepted.len(), 3000, "{:?}", report.statuses);
    assert!(handled.iter().filter(|(_, n)| *n > 0).count() >= 2, "the replicas shared the work: {handled:?}");
    assert!(consumers >= report.accepted.len() / 2, "most orders' CONSUMER spans arrived: {consumers}");
    assert!(spans.per_instance.len() >= 2, "the spans name the replica that processed: {:?}", spans.per_instance);
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_survive_the_queue_leader_node_being_killed() {
    let cluster =
        Arc::new(tokio::task::spawn_blocking(|| ThrowawayCluster::start("cluster", 3)).await.expect("cluster"));
    let pipeline =
        Pipeline::start(Options { amqp_url: Some(cluster.amqp_addr()), seed_units: 10_000, ..Options::default() })
            .await;
    let done = Arc::new(AtomicUsize::new(0));
    let client = pipeline.load_client();
    let load = tokio::spawn({
        let (client, done) = (client.clone(), done.clone());
        async move { client.run(1500, 8, done).await }
    });
    wait_until(&done, 300).await;
    let leader = {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || cluster.leader_of("stock.checkout-processed").map(|n| n.name().to_owned()))
            .await
            .expect("leader")
            .expect("the queue has a leader")
    };
    let before = {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || cluster.describe_queue("stock.checkout-processed")).await.expect("describe")
    };
    println!("before the kill: {before}");
    let killed = tokio::time::Instant::now();
    {
        let cluster = cluster.clone();
        let leader = leader.clone();
        tokio::task::spawn_blocking(move || cluster.nodes.iter().find(|n| n.name() == leader).expect("node").kill())
            .await
            .expect("kill");
    }
    // The first 202 after the kill, with single probe orders beside the load.
    let mut probe = LoadReport::default();
    while probe.accepted.is_empty() {
        if killed.elapsed() > Duration::from_secs(30) {
            let queue = tokio::task::spawn_blocking({
                let cluster = cluster.clone();
                move || cluster.describe_queue("stock.checkout-processed")
            });
            panic!("no 202 within 30 s of losing the leader; the queue: {}", queue.await.expect("describe"));
        }
        probe = client.run(1, 1, Arc::new(AtomicUsize::new(0))).await;
        if probe.accepted.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let resumed = killed.elapsed();
    let mut report = load.await.expect("load");
    report.accepted.extend(probe.accepted);
    let (reserved_orders, units) =
        pipeline.assert_reserved_exactly_once(&report.accepted, Duration::from_secs(90)).await;
    println!(
        "3-node cluster, queue leader {leader} SIGKILLed after 300 answers: {} accepted, statuses {:?}, slowest answer {:?}; \
         first 202 {resumed:?} after the kill; {reserved_orders} reserved, {units} units: 0 lost, 0 twice",
        report.accepted.len(),
        report.statuses,
        report.slowest
    );
    assert_eq!(report.statuses.get("error"), None, "every request got an answer: {:?}", report.statuses);
    // Recovered on the surviving nodes, not restarted: stock's health is up again there.
    let health = pipeline.get_json(&format!("{}/healthz", pipeline.stock_url)).await.map(|(status, _)| status);
    assert_eq!(health, Some(200), "stock is healthy on the remaining nodes");
    pipeline.stop().await;
}
