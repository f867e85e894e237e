//! The delivery promise under faults: a 202 means the order is reserved exactly once,
//! whatever crashes. Each test prints its figures (run with --no-capture to see them).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tracehop_e2e::{LoadReport, Options, Pipeline, Processes, StockMode};
use tracehop_testkit::amqp_proxy::AmqpProxy;
use tracehop_testkit::node::ThrowawayNode;
use tracehop_testkit::otlp::OtlpReceiver;
use tracehop_testkit::process::ServiceProcess;
use tracehop_testkit::rabbit::TestVhost;

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
    // Meanwhile checkout tells its health checks it cannot publish.
    let outage_ends = down + outage;
    let mut not_serving = false;
    while !not_serving && tokio::time::Instant::now() < outage_ends {
        not_serving = !checkout::healthcheck(pipeline.checkout_addr).await;
        if !not_serving {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    tokio::time::sleep_until(outage_ends).await;
    assert!(not_serving, "checkout reported SERVING through the whole outage");
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
    let mut serving = false;
    for _ in 0..20 {
        serving = checkout::healthcheck(pipeline.checkout_addr).await;
        if serving {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(serving, "checkout reports SERVING again once it publishes again");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_publish_never_yields_202() {
    let pipeline = Pipeline::start(Options::default()).await;
    let connection =
        lapin::Connection::connect(&pipeline.amqp_url, lapin::ConnectionProperties::default()).await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let (queue, exchange, key) =
        (tracehop_broker::topology::QUEUE, tracehop_broker::topology::EXCHANGE, tracehop_broker::topology::ROUTING_KEY);
    channel
        .queue_unbind(queue.into(), exchange.into(), key.into(), lapin::types::FieldTable::default())
        .await
        .expect("unbind");
    let report = pipeline.load_client().run(64, 16, Arc::new(AtomicUsize::new(0))).await;
    assert!(report.accepted.is_empty(), "an unroutable order got a 202: {:?}", report.statuses);
    assert_eq!(report.statuses.get("503"), Some(&64), "{:?}", report.statuses);
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            lapin::options::QueueBindOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("bind");
    let after = pipeline.load_client().run(8, 4, Arc::new(AtomicUsize::new(0))).await;
    assert_eq!(after.accepted.len(), 8, "202s come back with the binding: {:?}", after.statuses);
    println!(
        "unroutable: 64 concurrent orders while unbound -> {:?}; after rebinding -> {:?}",
        report.statuses, after.statuses
    );
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_the_broker_nacks_never_yields_202() {
    let pipeline = Pipeline::start(Options::default()).await;
    let connection =
        lapin::Connection::connect(&pipeline.amqp_url, lapin::ConnectionProperties::default()).await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let (exchange, key) = (tracehop_broker::topology::EXCHANGE, tracehop_broker::topology::ROUTING_KEY);
    // A second queue on the event's route that refuses every message: the broker then nacks
    // each publish (one of its queues refused it).
    let mut full = lapin::types::FieldTable::default();
    full.insert("x-max-length".into(), lapin::types::AMQPValue::LongLongInt(0));
    full.insert("x-overflow".into(), lapin::types::AMQPValue::LongString("reject-publish".into()));
    let declare = channel.queue_declare("always-full".into(), lapin::options::QueueDeclareOptions::default(), full);
    declare.await.expect("declare");
    let bind = channel.queue_bind(
        "always-full".into(),
        exchange.into(),
        key.into(),
        lapin::options::QueueBindOptions::default(),
        lapin::types::FieldTable::default(),
    );
    bind.await.expect("bind");
    let report = pipeline.load_client().run(64, 16, Arc::new(AtomicUsize::new(0))).await;
    assert!(report.accepted.is_empty(), "a nacked order got a 202: {:?}", report.statuses);
    assert_eq!(report.statuses.get("503"), Some(&64), "{:?}", report.statuses);
    let delete = channel.queue_delete("always-full".into(), lapin::options::QueueDeleteOptions::default());
    delete.await.expect("delete");
    let after = pipeline.load_client().run(8, 4, Arc::new(AtomicUsize::new(0))).await;
    assert_eq!(after.accepted.len(), 8, "202s come back with the queue gone: {:?}", after.statuses);
    println!("nacked: 64 concurrent orders -> {:?}; with the full queue gone -> {:?}", report.statuses, after.statuses);
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_trace_backend_fails_no_request_and_delays_no_shutdown() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let pipeline = Pipeline::start(Options { otlp_endpoint: Some(endpoint), ..Options::default() }).await;
    let report = pipeline.load_client().run(300, 8, Arc::new(AtomicUsize::new(0))).await;
    let stopping = tokio::time::Instant::now();
    pipeline.stop().await;
    let took = stopping.elapsed();
    println!(
        "OTLP refused: {:?}, slowest answer {:?}; shutdown of the three services took {took:?}",
        report.statuses, report.slowest
    );
    assert_eq!(report.accepted.len(), 300, "{:?}", report.statuses);
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_trace_backend_fails_no_request_keeps_memory_flat_and_shutdown_bounded() {
    let vhost = TestVhost::create();
    let data = tempfile::tempdir().expect("dir");
    // A hung trace backend.
    let endpoint = tracehop_testkit::silent_endpoint().await;
    let mut processes = Processes::start(vhost.url(), &endpoint, &data.path().join("stock.db")).await;
    let client = processes.load_client();
    let warmup = client.run(500, 8, Arc::new(AtomicUsize::new(0))).await;
    let before: Vec<(u64, u64)> = processes.services.iter().map(ServiceProcess::memory_kib).collect();
    let report = client.run(4000, 8, Arc::new(AtomicUsize::new(0))).await;
    let after: Vec<(u64, u64)> = processes.services.iter().map(ServiceProcess::memory_kib).collect();
    for service in &processes.services {
        service.terminate();
    }
    let mut exits = Vec::new();
    for service in processes.services.iter_mut() {
        exits.push((service.name().to_owned(), service.wait(Duration::from_secs(15))));
    }
    let dropped_logged = processes.services.iter().map(|s| s.count("dropped")).sum::<usize>();
    println!(
        "OTLP hung: warm-up {:?}, then {:?}, slowest answer {:?}; RSS KiB (now, peak) before {before:?} after {after:?}; \
         exits {exits:?}; {dropped_logged} log lines report dropped spans",
        warmup.statuses, report.statuses, report.slowest
    );
    assert_eq!(warmup.accepted.len() + report.accepted.len(), 4500, "{:?} {:?}", warmup.statuses, report.statuses);
    for (name, exit) in &exits {
        let (status, took) = exit.unwrap_or_else(|| panic!("{name} did not exit within 15 s"));
        assert!(status.success(), "{name} exited with {status}");
        assert!(took < Duration::from_secs(10), "{name} took {took:?} to exit");
    }
    for ((name, (rss_before, _)), (rss_after, _)) in exits.iter().map(|(n, _)| n).zip(&before).zip(&after) {
        // Spans beyond the SDK's queue (2048) are dropped, not kept: a few MiB at most.
        assert!(rss_after.saturating_sub(*rss_before) < 32 * 1024, "{name} grew from {rss_before} to {rss_after} KiB");
    }
    assert!(dropped_logged > 0, "spans dropped for the hung backend are reported in the logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_cleanly_and_loses_nothing() {
    let vhost = TestVhost::create();
    let data = tempfile::tempdir().expect("dir");
    let receiver = OtlpReceiver::start().await;
    let mut processes = Processes::start(vhost.url(), receiver.endpoint(), &data.path().join("stock.db")).await;
    let done = Arc::new(AtomicUsize::new(0));
    let load = tokio::spawn({
        let (client, done) = (processes.load_client(), done.clone());
        async move { client.run(3000, 16, done).await }
    });
    wait_until(&done, 800).await;
    for service in &processes.services {
        service.terminate();
    }
    let mut exits = Vec::new();
    for service in processes.services.iter_mut() {
        exits.push((service.name().to_owned(), service.wait(Duration::from_secs(15))));
    }
    let report = load.await.expect("load");
    // Whatever was accepted and not yet reserved is still in the queue: a new stock takes it.
    let stock = ServiceProcess::start("stock", &processes.stock_env);
    let store = stock::store::Store::open(&stock::store::StoreLocation::Sqlite(data.path().join("stock.db")), &[], 0)
        .await
        .expect("store");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for order_id in &report.accepted {
        while store.order(order_id).await.expect("query").is_none() {
            assert!(tokio::time::Instant::now() < deadline, "accepted order {order_id} was lost");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let (reserved_orders, _) = store.order_counts().await.expect("counts");
    let level = store.level("SKU-001").await.expect("level").expect("sku");
    assert_eq!(level.reserved, reserved_orders, "nothing reserved twice");
    // Spans of the requests that finished were exported before the processes exited.
    let gateway_traces: std::collections::HashSet<String> = receiver
        .spans()
        .into_iter()
        .filter(|s| s.service_name == "gateway" && s.name == "POST /api/checkout")
        .map(|s| s.trace_id)
        .collect();
    let missing = report.traces.iter().filter(|t| !gateway_traces.contains(*t)).count();
    println!(
        "SIGTERM under load: {:?} before the gateway closed; exits {exits:?}; {} accepted orders all reserved once \
         ({} reserved in all); {missing} of {} accepted requests without an exported gateway span",
        report.statuses,
        report.accepted.len(),
        reserved_orders,
        report.traces.len()
    );
    for (name, exit) in &exits {
        let (status, took) = exit.unwrap_or_else(|| panic!("{name} did not exit within 15 s"));
        assert!(status.success(), "{name} exited with {status}");
        assert!(took < Duration::from_secs(10), "{name} took {took:?} to exit");
    }
    // Channels closed before their connection: lapin logs one it had to close itself after the
    // connection's close began as a connection error.
    for service in &processes.services {
        assert_eq!(
            service.count("Connection error"),
            0,
            "{} did not close its broker connection cleanly",
            service.name()
        );
    }
    assert!(report.accepted.len() >= 800, "{:?}", report.statuses);
    assert_eq!(missing, 0, "every finished request's span was exported");
    drop(stock);
}

/// How `service` exited (its status, and when), if it did within `limit`; and the process, for
/// its log.
async fn exit_within(
    mut service: ServiceProcess,
    limit: Duration,
) -> (Option<(std::process::ExitStatus, Duration)>, ServiceProcess) {
    tokio::task::spawn_blocking(move || (service.wait(limit), service)).await.expect("wait")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_whose_broker_never_comes_back_exits_non_zero() {
    let node = tokio::task::spawn_blocking(|| ThrowawayNode::start("giveup")).await.expect("node");
    let data = tempfile::tempdir().expect("dir");
    let stock = stock_on(&node.amqp_url(), &data, &[("BROKER_GIVE_UP_SECS", "3")]);
    let started = tokio::time::Instant::now();
    while stock.count("stock admin API listening") == 0 {
        assert!(started.elapsed() < Duration::from_secs(30), "stock did not start: {:#?}", stock.lines());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let node = tokio::task::spawn_blocking(move || {
        node.stop();
        node
    })
    .await
    .expect("stop");
    let (exit, stock) = exit_within(stock, Duration::from_secs(20)).await;
    let (status, took) = exit.unwrap_or_else(|| panic!("stock kept running without a broker: {:#?}", stock.lines()));
    println!(
        "broker gone for good: stock exited with {status} {took:?} after the broker stopped (BROKER_GIVE_UP_SECS=3)"
    );
    assert!(!status.success(), "a supervisor must see a failure");
    assert!(stock.count("did not recover") > 0, "{:#?}", stock.lines());
    drop(node);
}

/// Stock as a process on the broker at `amqp`, its store in `data`, telemetry off, with `extra`
/// settings.
fn stock_on(amqp: &str, data: &tempfile::TempDir, extra: &[(&str, &str)]) -> ServiceProcess {
    let mut env = vec![
        ("STOCK_ADDR", "127.0.0.1:0".to_owned()),
        ("AMQP_ADDR", amqp.to_owned()),
        ("STOCK_DB", data.path().join("stock.db").display().to_string()),
        ("OTEL_TRACES_EXPORTER", "none".to_owned()),
        ("OTEL_METRICS_EXPORTER", "none".to_owned()),
    ];
    env.extend(extra.iter().map(|(name, value)| (*name, (*value).to_owned())));
    ServiceProcess::start("stock", &env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stocks_admin_api_closes_a_client_that_never_finishes_its_headers() {
    let vhost = TestVhost::create();
    let data = tempfile::tempdir().expect("dir");
    let [port] = tracehop_testkit::free_ports();
    let addr = format!("127.0.0.1:{port}");
    let stock = stock_on(vhost.url(), &data, &[("STOCK_ADDR", &addr), ("STOCK_HEADER_TIMEOUT_MS", "500")]);
    let started = tokio::time::Instant::now();
    while stock.count("stock admin API listening") == 0 {
        assert!(started.elapsed() < Duration::from_secs(30), "stock did not start: {:#?}", stock.lines());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Within 3 s: the default 10 s would also close it within a 10 s wait; this holds stock to
    // the 500 ms it was given. axum::serve kept such a connection for good.
    let closed = tracehop_testkit::half_sent_request_closed_within(&addr, Duration::from_secs(3)).await;
    assert!(closed, "stock kept a connection whose headers never ended for 3 s (STOCK_HEADER_TIMEOUT_MS=500)");
    let answered = reqwest::get(format!("http://{addr}/healthz")).await.expect("stock answers a whole request");
    println!("stock's admin API closed the half-sent request; then /healthz -> {}", answered.status());
    stock.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_exits_non_zero_when_it_cannot_consume() {
    let vhost = TestVhost::create();
    // The user may not declare anything here: the topology, hence the consumer, cannot be set up
    // though the connection opens.
    vhost.set_permissions("^$", ".*", ".*");
    let data = tempfile::tempdir().expect("dir");
    let (exit, stock) = exit_within(stock_on(vhost.url(), &data, &[]), Duration::from_secs(20)).await;
    // Without consuming it would answer 503 on /healthz forever, and no supervisor restarts that.
    let (status, _) = exit.unwrap_or_else(|| panic!("stock kept running without a consumer: {:#?}", stock.lines()));
    assert!(!status.success(), "{status:?}");
    assert!(stock.count("ACCESS_REFUSED") > 0, "{:#?}", stock.lines());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_exits_non_zero_when_the_broker_cancels_its_consumer() {
    let vhost = TestVhost::create();
    let data = tempfile::tempdir().expect("dir");
    let stock = stock_on(vhost.url(), &data, &[]);
    let connection =
        lapin::Connection::connect(vhost.url(), lapin::ConnectionProperties::default()).await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let queue = tracehop_broker::topology::QUEUE;
    let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
    let mut consumers = 0;
    for _ in 0..300 {
        // A passive declare of a queue not declared yet closes the channel: use a fresh one.
        let channel = connection.create_channel().await.expect("channel");
        if let Ok(declared) = channel.queue_declare(queue.into(), passive, lapin::types::FieldTable::default()).await {
            consumers = declared.consumer_count();
        }
        if consumers > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(consumers, 1, "stock never consumed: {:#?}", stock.lines());
    // The queue deleted: the broker cancels stock's consumer.
    channel.queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default()).await.expect("delete");
    let (exit, stock) = exit_within(stock, Duration::from_secs(20)).await;
    let (status, _) = exit.unwrap_or_else(|| panic!("stock kept running without a consumer: {:#?}", stock.lines()));
    assert!(!status.success(), "{status:?}");
    assert!(stock.count("cancelled the consumer") > 0, "{:#?}", stock.lines());
}

/// Starts a gRPC call to checkout by hand over HTTP/2 and never finishes it: the headers, then
/// a message prefix announcing 100 bytes and 3 of them. Returns once the server has answered
/// the connection with its settings, so the call is surely being served.
async fn unfinished_grpc_call(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    fn frame(kind: u8, flags: u8, stream: u8, payload: &[u8]) -> Vec<u8> {
        let length = u32::try_from(payload.len()).expect("small").to_be_bytes();
        let mut frame = vec![length[1], length[2], length[3], kind, flags, 0, 0, 0, stream];
        frame.extend_from_slice(payload);
        frame
    }
    // HPACK: :method POST (static 3), :scheme http (static 6), then literals without indexing.
    let mut headers = vec![0x83, 0x86];
    for (index, value) in [(4u8, "/checkout.v1.CheckoutService/Checkout"), (1, "checkout")] {
        headers.push(index);
        headers.push(u8::try_from(value.len()).expect("short"));
        headers.extend_from_slice(value.as_bytes());
    }
    for (name, value) in [("content-type", "application/grpc"), ("te", "trailers")] {
        headers.push(0);
        headers.push(u8::try_from(name.len()).expect("short"));
        headers.extend_from_slice(name.as_bytes());
        headers.push(u8::try_from(value.len()).expect("short"));
        headers.extend_from_slice(value.as_bytes());
    }
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut request = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    request.extend(frame(4, 0, 0, &[])); // SETTINGS
    request.extend(frame(1, 0x4, 1, &headers)); // HEADERS on stream 1: END_HEADERS, not END_STREAM
    request.extend(frame(0, 0, 1, &[0, 0, 0, 0, 100, 1, 2, 3])); // DATA, not END_STREAM
    stream.write_all(&request).await.expect("write");
    let mut settings = [0u8; 9];
    stream.read_exact(&mut settings).await.expect("the server's settings");
    assert_eq!(settings[3], 4, "checkout answered with frame type {} before its settings", settings[3]);
    stream
}

/// Sends stock's admin API request after request on one connection (pipelined) and reads no
/// answer, until stock stops reading: its write of an answer is then stuck for good. The
/// connection stays open; returns the count of bytes sent.
async fn unread_http_answers(addr: std::net::SocketAddr) -> Arc<AtomicUsize> {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let written = Arc::new(AtomicUsize::new(0));
    tokio::spawn({
        let written = written.clone();
        async move {
            let requests = "GET /healthz HTTP/1.1\r\nhost: stock\r\n\r\n".repeat(1000);
            while stream.write_all(requests.as_bytes()).await.is_ok() {
                written.fetch_add(requests.len(), Ordering::Relaxed);
            }
        }
    });
    let mut last = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = written.load(Ordering::Relaxed);
        if now > 0 && now == last {
            return written;
        }
        last = now;
    }
    panic!("stock kept reading requests without its answers being read ({last} bytes)");
}

/// Checkout and stock in this process, each on its own broker URI, with a drain of 1 s.
struct TwoServices {
    checkout_addr: std::net::SocketAddr,
    stock_addr: std::net::SocketAddr,
    checkout: tokio::task::JoinHandle<Result<(), checkout::RunError>>,
    stock: tokio::task::JoinHandle<Result<(), stock::RunError>>,
    stop: tokio::sync::watch::Sender<bool>,
    _data: tempfile::TempDir,
}

impl TwoServices {
    async fn start(checkout_amqp: &str, stock_amqp: &str) -> Self {
        use tracehop_broker::connection::BrokerNodes;
        use tracehop_telemetry::Telemetry;
        let data = tempfile::tempdir().expect("dir");
        let drain = Duration::from_secs(1);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let until_stopped = || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            }
        };
        let checkout_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let checkout_addr = checkout_listener.local_addr().expect("addr");
        let checkout_config = checkout::Config {
            addr: checkout_addr,
            amqp: BrokerNodes::parse(checkout_amqp).expect("AMQP URL"),
            publish_timeout: Duration::from_millis(1500),
            broker_give_up: Duration::from_secs(60),
            baggage_span_attributes: Vec::new(),
            drain_timeout: drain,
        };
        let checkout = tokio::spawn(checkout::run(
            checkout_listener,
            checkout_config,
            Telemetry::disabled("checkout"),
            until_stopped(),
        ));
        let stock_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let stock_addr = stock_listener.local_addr().expect("addr");
        let stock_config = stock::Config {
            addr: stock_addr,
            amqp: BrokerNodes::parse(stock_amqp).expect("AMQP URL"),
            store: stock::store::StoreLocation::Sqlite(data.path().join("stock.db")),
            seed_units: 10,
            prefetch: 16,
            consumer_context: tracehop_telemetry::messaging::ConsumerContext::Parent,
            baggage_span_attributes: Vec::new(),
            broker_give_up: Duration::from_secs(60),
            drain_timeout: drain,
            header_timeout: Duration::from_secs(60),
        };
        let stock =
            tokio::spawn(stock::run(stock_listener, stock_config, Telemetry::disabled("stock"), until_stopped()));
        Self { checkout_addr, stock_addr, checkout, stock, stop, _data: data }
    }

    /// Waits until checkout answers SERVING and stock consumes.
    async fn wait_until_ready(&self) {
        let http = reqwest::Client::new();
        let started = tokio::time::Instant::now();
        loop {
            let stock_up = http
                .get(format!("http://{}/healthz", self.stock_addr))
                .send()
                .await
                .is_ok_and(|answer| answer.status().is_success());
            if stock_up && checkout::healthcheck(self.checkout_addr).await {
                return;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "checkout and stock not ready within 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Signals shutdown; both must return, with `Ok`, within 10 s.
    async fn stop_within_10_s(self, why: &str) {
        self.stop.send(true).expect("services running");
        let checkout = tokio::time::timeout(Duration::from_secs(10), self.checkout).await;
        assert!(matches!(checkout, Ok(Ok(Ok(())))), "checkout did not return {why}: {checkout:?}");
        let stock = tokio::time::timeout(Duration::from_secs(10), self.stock).await;
        assert!(matches!(stock, Ok(Ok(Ok(())))), "stock did not return {why}: {stock:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_finish_a_call_or_read_their_answers_do_not_hold_up_shutdown() {
    let vhost = TestVhost::create();
    let services = TwoServices::start(vhost.url(), vhost.url()).await;
    services.wait_until_ready().await;
    let _call = unfinished_grpc_call(services.checkout_addr).await;
    let _unread = unread_http_answers(services.stock_addr).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Without the drain deadline (1 s here) each graceful shutdown waits for its client forever
    // (seen with either bound removed).
    services.stop_within_10_s("after its drain deadline").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_blocks_its_clients_does_not_hold_up_shutdown() {
    let vhost = TestVhost::create();
    let (to_checkout, to_stock) = (AmqpProxy::start().await, AmqpProxy::start().await);
    let services = TwoServices::start(&to_checkout.url(&vhost), &to_stock.url(&vhost)).await;
    services.wait_until_ready().await;
    // As under a resource alarm: lapin then writes nothing, so the consumer's cancel and the
    // connections' close would wait for the alarm to clear (seen: both services still running
    // after 10 s without their bounds).
    to_checkout.block();
    to_stock.block();
    tokio::time::sleep(Duration::from_millis(200)).await;
    services.stop_within_10_s("while the broker blocked it").await;
}
