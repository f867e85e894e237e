//! Fixtures for tracehop's tests, all on real parts (see the README, "Testing").
//!
//! # Layout
//! - [`rabbit`]: a RabbitMQ vhost of its own per test, on the machine's broker.
//! - [`amqp_proxy`]: a proxy to it that blocks or cuts a service's connection on cue.
//! - [`postgres`]: a PostgreSQL database of its own per test.
//! - [`node`]: throw-away RabbitMQ nodes to stop, kill and restart.
//! - [`process`]: the services as child processes (SIGKILL, SIGTERM, memory).
//! - [`otlp`]: an OTLP/gRPC trace receiver, so tests see what the real exporter sends.
//!
//! Where the infrastructure is missing, fixtures panic with what to start: a test that quietly
//! skips because its broker is absent would pass while proving nothing.

pub mod amqp_proxy;
pub mod node;
pub mod otlp;
pub mod postgres;
pub mod process;
pub mod rabbit;

/// `N` distinct free ports, outside the kernel's ephemeral range, for servers a test starts as
/// other processes (services, throw-away RabbitMQ nodes) and tells which port to bind; see
/// [`tracehop_ports`] for why not `bind(":0")`.
pub fn free_ports<const N: usize>() -> [u16; N] {
    match tracehop_ports::free_ports() {
        Ok(ports) => ports,
        Err(error) => {
            let cause = std::error::Error::source(&error).map(|cause| format!(": {cause}")).unwrap_or_default();
            panic!("no ports for the test's servers: {error}{cause}")
        }
    }
}

/// `http://` and the address of a TCP listener that accepts connections and never says a word:
/// a hung backend or peer. It lives as long as the test's runtime.
pub async fn silent_endpoint() -> String {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", silent.local_addr().expect("addr"));
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    endpoint
}

/// A name no other test in any process is using.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Sends `addr` the start of a request's headers and never the rest (no blank line); whether the
/// server closed the connection within `limit`. (hyper counts a header deadline from the accept.)
pub async fn half_sent_request_closed_within(addr: &str, limit: std::time::Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: test\r\n").await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(limit, slow.read_to_end(&mut answer)).await.is_ok()
}

/// A listening port whose accept queue is full: Linux drops further SYNs, so a TCP connect to
/// it hangs until the client gives up, as to a host that is down or behind a firewall that drops
/// packets. The port hangs for as long as this lives.
pub struct HangingPort {
    /// Where to connect.
    pub addr: std::net::SocketAddr,
    _listener: tokio::net::TcpListener,
    _queued: Vec<tokio::net::TcpStream>,
}

/// A [`HangingPort`] on 127.0.0.1, its queue filled until a connect no longer gets through.
pub async fn hanging_port() -> HangingPort {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.1:0".parse().expect("address")).expect("bind");
    let listener = socket.listen(1).expect("listen");
    let addr = listener.local_addr().expect("address");
    let mut queued = Vec::new();
    let connect = || tokio::time::timeout(std::time::Duration::from_millis(300), tokio::net::TcpStream::connect(addr));
    while let Ok(Ok(stream)) = connect().await {
        queued.push(stream);
        assert!(queued.len() < 16, "the accept queue never filled");
    }
    HangingPort { addr, _listener: listener, _queued: queued }
}
