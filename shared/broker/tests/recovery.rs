//! A connection lost while a channel is being opened, or a consumer started, is replaced and
//! leaves nothing hanging; a connection the broker blocks closes at once; a node that accepts
//! TCP but never answers AMQP is passed over, when connecting and when replacing.
//!
//! A proxy between the broker and the service holds the service's frames back (it tells the
//! client the broker is blocked, as RabbitMQ does under a resource alarm, so lapin queues what
//! it would send), then cuts the connection: the state of a service whose node died just as it
//! asked for a channel. With lapin 4.12's auto-recovery, this left its I/O thread deadlocked
//! for good (the first two tests fail with it turned back on).
//!
//! The tests count lapin's I/O threads in the whole process: they need a process each, as
//! `cargo nextest` (`scripts/test`) runs them.

use std::time::Duration;

use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use tracehop_broker::connection::{Broker, BrokerNodes};
use tracehop_testkit::amqp_proxy::{AmqpProxy, FrozenNode, url_at};
use tracehop_testkit::rabbit::TestVhost;

/// lapin's I/O threads in this process: one per live connection.
fn io_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "lapin-io-loop")
        .count()
}

async fn connect_through_proxy(vhost: &TestVhost) -> (Broker, AmqpProxy) {
    let proxy = AmqpProxy::start().await;
    let nodes = BrokerNodes::parse(&proxy.url(vhost)).expect("nodes");
    let broker = Broker::connect(nodes, "recovery-test", Duration::from_secs(30)).await.expect("connect");
    (broker, proxy)
}

/// After the cut: a new connection replaces the lost one, channels open on it, and the lost
/// connection's I/O thread has ended (one thread left, the new connection's).
async fn assert_replaced_and_nothing_left_hanging(broker: &Broker) {
    let opened = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let Ok(Ok((channel, generation))) = tokio::time::timeout(Duration::from_secs(2), broker.channel()).await
            {
                return (channel, generation);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let (channel, generation) = opened.expect("no channel could be opened within 15 s of the cut");
    assert!(generation > 0, "the channel opened on the lost connection");
    channel
        .queue_declare("after-the-cut".into(), QueueDeclareOptions::default(), FieldTable::default())
        .await
        .expect("the new connection's channel works");
    let mut threads = io_threads();
    for _ in 0..50 {
        if threads == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        threads = io_threads();
    }
    assert_eq!(threads, 1, "the lost connection's I/O thread is still there 5 s after its replacement");
}

/// Tells the broker's client it is blocked, and waits until lapin has taken it in.
async fn block(proxy: &AmqpProxy, broker: &Broker) {
    proxy.block();
    for _ in 0..250 {
        if broker.link().connection.status().blocked() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("lapin did not take the connection as blocked within 5 s");
}

/// Holds the service's frames back, starts `operation` (its frame then stays queued), cuts the
/// connection, and checks that the operation failed, as it must, within 10 s.
async fn cut_during<T: Send + 'static>(
    proxy: &AmqpProxy,
    broker: &Broker,
    what: &str,
    operation: impl std::future::Future<Output = lapin::Result<T>> + Send + 'static,
) {
    block(proxy, broker).await;
    let running = tokio::spawn(operation);
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.cut();
    match tokio::time::timeout(Duration::from_secs(10), running).await {
        Ok(Ok(Err(_))) => {}
        Ok(Ok(Ok(_))) => panic!("{what} as the connection died succeeded"),
        other => panic!("{what} as the connection died: {:?}", other.map(|joined| joined.map(|_| ()))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_while_a_channel_is_being_opened_is_replaced_and_leaves_nothing_hanging() {
    let vhost = TestVhost::create();
    let (broker, proxy) = connect_through_proxy(&vhost).await;
    let (_kept, _) = broker.channel().await.expect("a first channel");
    assert_eq!(io_threads(), 1);
    let opening = {
        let broker = broker.clone();
        async move { broker.channel().await }
    };
    cut_during(&proxy, &broker, "the channel asked for", opening).await;
    assert_replaced_and_nothing_left_hanging(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_while_a_consumer_starts_is_replaced_and_leaves_nothing_hanging() {
    let vhost = TestVhost::create();
    let (broker, proxy) = connect_through_proxy(&vhost).await;
    let (channel, _) = broker.channel().await.expect("a channel");
    channel
        .queue_declare("orders".into(), QueueDeclareOptions::default(), FieldTable::default())
        .await
        .expect("declare");
    // As stock's consumer does: the channel is dropped when the consumer cannot start.
    let consuming = async move {
        channel
            .basic_consume("orders".into(), "stock".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
    };
    cut_during(&proxy, &broker, "the consumer started", consuming).await;
    assert_replaced_and_nothing_left_hanging(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_connection_the_broker_blocks_does_not_wait_for_it() {
    let vhost = TestVhost::create();
    let (broker, proxy) = connect_through_proxy(&vhost).await;
    block(&proxy, &broker).await;
    // lapin writes nothing while blocked: the close's frame would wait for the alarm to clear.
    // A connection that is not blocked gets half a second to confirm; a blocked one none.
    let started = std::time::Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), broker.close()).await;
    assert!(closed.is_ok(), "closing a blocked connection waited 5 s");
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "closing a blocked connection waited {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_accepts_tcp_but_never_answers_amqp_is_passed_over() {
    let vhost = TestVhost::create();
    let frozen = FrozenNode::start();
    let list = format!("{}?connection_timeout=300, {}", frozen.url(&vhost), vhost.url());
    let nodes = BrokerNodes::parse(&list).expect("nodes");
    let connecting = Broker::connect(nodes, "frozen-test", Duration::from_secs(30));
    let broker = tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .expect("the connect still waits on the frozen node after 10 s")
        .expect("connect");
    assert_passed_over(&broker, &frozen);
    broker.channel().await.expect("a channel on the node that answers");
    assert_eq!(io_threads(), 1, "an I/O thread besides the connection's");
}

/// A broker connected through a proxy whose node then goes away (stopped, its connection cut):
/// the next node in the list is frozen (`frozen_query` on its URL), the last one answers.
async fn cut_before_a_frozen_node(
    vhost: &TestVhost,
    frozen_query: &str,
    give_up: Duration,
) -> (Broker, FrozenNode, AmqpProxy) {
    let proxy = AmqpProxy::start().await;
    let frozen = FrozenNode::start();
    let list = format!("{}, {}{frozen_query}, {}", proxy.url(vhost), frozen.url(vhost), vhost.url());
    let nodes = BrokerNodes::parse(&list).expect("nodes");
    let broker = Broker::connect(nodes, "frozen-test", give_up).await.expect("connect");
    proxy.stop();
    proxy.cut();
    (broker, frozen, proxy)
}

/// The connection is not the frozen node's, and the frozen node was tried.
fn assert_passed_over(broker: &Broker, frozen: &FrozenNode) {
    assert_ne!(broker.peer().port, frozen.port(), "connected to the frozen node");
    // (Its connections also count the supervisor's TCP probes of the nodes.)
    assert!(frozen.connections() > 0, "the frozen node was never tried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_passes_over_a_node_that_accepts_tcp_but_never_answers_amqp() {
    let vhost = TestVhost::create();
    let (broker, frozen, _proxy) =
        cut_before_a_frozen_node(&vhost, "?connection_timeout=300", Duration::from_secs(30)).await;
    assert_replaced_and_nothing_left_hanging(&broker).await;
    assert_passed_over(&broker, &frozen);
}

/// As above with the node's default `connection_timeout` (2 s): a replacement gives up after 5 s,
/// before the handshake's deadline (10 s), and the next one must not start from that node again
/// (each would, and the connection would never be replaced).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_given_up_on_a_frozen_node_starts_the_next_one_from_the_node_after_it() {
    let vhost = TestVhost::create();
    // The frozen node's URL keeps the default timeout: the point of this test.
    let (broker, frozen, _proxy) = cut_before_a_frozen_node(&vhost, "", Duration::from_secs(60)).await;
    // Not `assert_replaced_and_nothing_left_hanging`: the abandoned attempt's I/O thread
    // outlives it, lapin calling the connector again with backoff (each call fails at once).
    let replaced = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let Ok(Ok((_, generation))) = tokio::time::timeout(Duration::from_secs(2), broker.channel()).await
                && generation > 0
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    replaced.await.expect("not replaced within 15 s of the cut");
    assert_passed_over(&broker, &frozen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_dropped_mid_walk_leaves_no_handshake_open() {
    let vhost = TestVhost::create();
    let hanging = tracehop_testkit::hanging_port().await;
    let frozen = FrozenNode::start();
    let list = format!(
        "{}?connection_timeout=1000, {}?connection_timeout=300",
        url_at(&vhost, hanging.addr.port()),
        frozen.url(&vhost)
    );
    let nodes = BrokerNodes::parse(&list).expect("nodes");
    // Dropped while its walk waits on the hanging port; the walk then reaches the frozen node.
    let connecting = Broker::connect(nodes, "frozen-test", Duration::from_secs(30));
    assert!(tokio::time::timeout(Duration::from_millis(500), connecting).await.is_err(), "connected");
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Reached once: the connection that attempt opened is closed at once, and lapin's later
    // attempts, the connect being dropped, fail before they connect anywhere.
    let opened = frozen.connections();
    assert_eq!(opened, 1, "the frozen node's connections");
    // Each connection the frozen node got was shut down by the client: it reads end of stream.
    assert_eq!(frozen.open_connections(), 0, "a handshake nobody watches is still open ({opened} opened)");
}

/// How a node in [`passed_over`] ends each connection before the AMQP handshake.
#[derive(Clone, Copy, Debug)]
enum BreakOff {
    /// Reads the protocol header, then closes (FIN): lapin connects again by itself.
    Close,
    /// Resets the connection (RST; what a close with the header unread sends too): lapin's
    /// connect fails at once, and the next attempt starts from the next node.
    Reset,
}

/// A node on a port of its own that hands each connection it accepts to `serve`, on a task of
/// its own: its port, and how many connections it accepted.
async fn scripted_node<F, Fut>(serve: F) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::spawn(serve(stream));
        }
    });
    (port, accepted)
}

/// A node that ends each connection before the handshake, listed first, is passed over for the
/// next one.
async fn passed_over(break_off: BreakOff) {
    let vhost = TestVhost::create();
    let (breaking_port, accepted) = scripted_node(move |mut stream| async move {
        match break_off {
            BreakOff::Close => {
                use tokio::io::AsyncReadExt as _;
                let mut header = [0u8; 8];
                let _ = stream.read_exact(&mut header).await;
            }
            BreakOff::Reset => stream.set_zero_linger().expect("SO_LINGER 0"),
        }
        drop(stream);
    })
    .await;
    let nodes = BrokerNodes::parse(&format!("{}, {}", url_at(&vhost, breaking_port), vhost.url())).expect("nodes");
    // Without the pass-over, lapin would try the breaking node again, 30 times with backoff, or
    // (a reset) the connect would fail.
    let connecting = Broker::connect(nodes, "frozen-test", Duration::from_secs(30));
    let broker = tokio::time::timeout(Duration::from_secs(5), connecting)
        .await
        .unwrap_or_else(|_| panic!("{break_off:?}: still trying the breaking node after 5 s"))
        .unwrap_or_else(|error| panic!("{break_off:?}: connect: {error}"));
    assert_ne!(broker.peer().port, breaking_port, "{break_off:?}: connected to the breaking node");
    assert!(
        accepted.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "{break_off:?}: the breaking node was never tried"
    );
}

/// The `connection.start` frame the tests' RabbitMQ (`AMQP_ADDR`) sends a new client, as it sent it.
async fn connection_start_frame() -> Vec<u8> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let address = tracehop_testkit::rabbit::broker_address();
    let mut broker =
        tokio::net::TcpStream::connect(&address).await.unwrap_or_else(|error| panic!("{address}: {error}"));
    broker.write_all(b"AMQP\x00\x00\x09\x01").await.expect("protocol header");
    // A frame: type, channel (2 bytes), payload size (4 bytes), the payload, the frame end.
    let mut head = [0u8; 7];
    broker.read_exact(&mut head).await.expect("frame header");
    let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
    let mut frame = head.to_vec();
    frame.resize(7 + size + 1, 0);
    broker.read_exact(&mut frame[7..]).await.expect("frame");
    assert_eq!((frame[0], frame[7 + size]), (1, 0xce), "not a method frame: {frame:?}");
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stalls_after_connection_start_is_passed_over() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let vhost = TestVhost::create();
    let start = connection_start_frame().await;
    // Answers the protocol header with a real `connection.start`, then says nothing more.
    let (stalling_port, accepted) = scripted_node(move |mut stream| {
        let start = start.clone();
        async move {
            let mut header = [0u8; 8];
            if stream.read_exact(&mut header).await.is_ok() && stream.write_all(&start).await.is_ok() {
                // Held until the client lets go.
                let mut rest = Vec::new();
                let _ = stream.read_to_end(&mut rest).await;
            }
        }
    })
    .await;
    // Its handshake is cut after five connection timeouts: 1 s.
    let list = format!("{}?connection_timeout=200, {}", url_at(&vhost, stalling_port), vhost.url());
    let nodes = BrokerNodes::parse(&list).expect("nodes");
    let connecting = Broker::connect(nodes, "frozen-test", Duration::from_secs(30));
    let broker = tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .expect("still waiting on the stalling node after 10 s")
        .expect("connect");
    assert_ne!(broker.peer().port, stalling_port, "connected to the stalling node");
    assert!(accepted.load(std::sync::atomic::Ordering::Relaxed) > 0, "the stalling node was never tried");
    broker.channel().await.expect("a channel on the node that answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_closes_each_connection_at_once_is_passed_over() {
    passed_over(BreakOff::Close).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_resets_each_connection_is_passed_over() {
    passed_over(BreakOff::Reset).await;
}
