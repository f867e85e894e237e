//! A connection lost while a channel is being opened, or a consumer started, is replaced and
//! leaves nothing hanging.
//!
//! A proxy between the broker and the service holds the service's frames back (it tells the
//! client the broker is blocked, as RabbitMQ does under a resource alarm, so lapin queues what
//! it would send), then cuts the connection: the state of a service whose node died just as it
//! asked for a channel. With lapin 4.12's auto-recovery, this left its I/O thread deadlocked
//! for good (both tests fail with it turned back on).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tracehop_broker::connection::{Broker, BrokerNodes};
use tracehop_testkit::rabbit::TestVhost;

/// What the test can do to the proxy's latest connection.
#[derive(Default)]
struct Latest {
    /// Frames to send the client, as if from the broker.
    inject: Option<mpsc::UnboundedSender<Vec<u8>>>,
    /// Cuts both directions.
    cut: Option<oneshot::Sender<()>>,
}

/// A TCP proxy to the broker at `upstream`; returns its port and its handle on the latest
/// connection.
async fn proxy(upstream: &'static str) -> (u16, Arc<Mutex<Latest>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let latest = Arc::new(Mutex::new(Latest::default()));
    let handle = latest.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(upstream).await else { continue };
            let (inject, injected) = mpsc::unbounded_channel();
            let (cut, cut_off) = oneshot::channel();
            *latest.lock().unwrap_or_else(PoisonError::into_inner) = Latest { inject: Some(inject), cut: Some(cut) };
            tokio::spawn(async move {
                tokio::select! {
                    () = relay(client, server, injected) => {}
                    _ = cut_off => {}
                }
            });
        }
    });
    (port, handle)
}

async fn relay(client: TcpStream, server: TcpStream, mut injected: mpsc::UnboundedReceiver<Vec<u8>>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = async {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
    };
    let downstream = async {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            tokio::select! {
                read = server_read.read(&mut buffer) => match read {
                    Ok(n) if n > 0 => if client_write.write_all(&buffer[..n]).await.is_err() { return },
                    _ => return,
                },
                Some(frame) = injected.recv() => if client_write.write_all(&frame).await.is_err() { return },
            }
        }
    };
    tokio::select! {
        () = upstream => {}
        () = downstream => {}
    }
}

impl Latest {
    /// Sends the client `connection.blocked`: lapin then holds back what it would send.
    /// (The broker's frames arrive whole in practice, so this one does not split another.)
    fn block(handle: &Mutex<Latest>) {
        let reason = b"test";
        let mut payload = vec![0, 10, 0, 60, u8::try_from(reason.len()).expect("short")];
        payload.extend_from_slice(reason);
        let mut frame = vec![1u8, 0, 0];
        frame.extend_from_slice(&u32::try_from(payload.len()).expect("short").to_be_bytes());
        frame.extend_from_slice(&payload);
        frame.push(0xCE);
        let latest = handle.lock().unwrap_or_else(PoisonError::into_inner);
        latest.inject.as_ref().expect("a connection").send(frame).expect("relay running");
    }

    fn cut(handle: &Mutex<Latest>) {
        let cut = handle.lock().unwrap_or_else(PoisonError::into_inner).cut.take();
        let _ = cut.expect("a connection").send(());
    }
}

/// lapin's I/O threads in this process: one per live connection.
fn io_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "lapin-io-loop")
        .count()
}

async fn connect_through_proxy(vhost: &TestVhost) -> (Broker, Arc<Mutex<Latest>>) {
    let (port, latest) = proxy("127.0.0.1:5672").await;
    let nodes = BrokerNodes::parse(&format!("amqp://guest:guest@127.0.0.1:{port}/{}", vhost.name())).expect("nodes");
    let broker = Broker::connect(nodes, "recovery-test", Duration::from_secs(30)).await.expect("connect");
    (broker, latest)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_while_a_channel_is_being_opened_is_replaced_and_leaves_nothing_hanging() {
    let vhost = TestVhost::create();
    let (broker, latest) = connect_through_proxy(&vhost).await;
    let (_kept, _) = broker.channel().await.expect("a first channel");
    assert_eq!(io_threads(), 1);

    Latest::block(&latest);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let opening = tokio::spawn({
        let broker = broker.clone();
        async move { broker.channel().await.map(|_| ()) }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    Latest::cut(&latest);
    let opened = tokio::time::timeout(Duration::from_secs(10), opening).await;
    assert!(matches!(opened, Ok(Ok(Err(_)))), "the channel asked for as the connection died: {opened:?}");

    assert_replaced_and_nothing_left_hanging(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_while_a_consumer_starts_is_replaced_and_leaves_nothing_hanging() {
    let vhost = TestVhost::create();
    let (broker, latest) = connect_through_proxy(&vhost).await;
    let (channel, _) = broker.channel().await.expect("a channel");
    channel
        .queue_declare("orders".into(), QueueDeclareOptions::default(), FieldTable::default())
        .await
        .expect("declare");

    Latest::block(&latest);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let consuming = tokio::spawn(async move {
        // As stock's consumer does: the channel is dropped when the consumer cannot start.
        channel
            .basic_consume("orders".into(), "stock".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map(|_| ())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    Latest::cut(&latest);
    let consumed = tokio::time::timeout(Duration::from_secs(10), consuming).await;
    assert!(matches!(consumed, Ok(Ok(Err(_)))), "the consumer started as the connection died: {consumed:?}");

    assert_replaced_and_nothing_left_hanging(&broker).await;
}
