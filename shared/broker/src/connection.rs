//! One AMQP connection per service, to a single broker or any node of a cluster, kept alive by
//! a supervisor that replaces it when it is lost.
//!
//! `AMQP_ADDR` is one URI or a comma-separated list of a cluster's nodes. Our connect function
//! walks the node list: the first node that answers wins, and when that node goes away the
//! replacement lands on another one without a restart. A node that accepts TCP but does not
//! finish the AMQP handshake within five times its `connection_timeout` is cut off and passed
//! over.
//! Credentials and vhost come from the first URI; the nodes of one cluster share them.
//!
//! lapin's own auto-recovery is off: in lapin 4.12 it deadlocks its I/O thread when the
//! connection dies while a channel is being opened (or a consumer started) with that
//! operation's frame not yet sent. Recovery then drops the operation's pending reply, holding
//! the channel's last handle, under the channel's status lock, and the handle's drop asks for
//! the same lock. The connection then hangs for good. Instead, each connection has a
//! generation; the supervisor opens the next one, and publishers and consumers open their
//! channels, topology and consumers again on it.

use std::os::fd::AsFd as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use backon::ExponentialBuilder;
use lapin::tcp::{AMQPUriTcpExt, AsyncTcpStream};
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::watch;
use tracehop_telemetry::messaging::BrokerPeer;

/// Heartbeat asked for when the URI sets none: a dead peer is noticed within ~2x this.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 10;
/// TCP connect timeout per node when the URI sets none, so a node that drops packets does not
/// stall the walk to the next one; the AMQP handshake that follows gets five times as long.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 2000;

/// How long a close at shutdown waits for the broker's confirm: the connection's
/// ([`Broker::close`]), and the channels' before it, which a service bounds with a deadline this
/// far ahead ([`Broker::close_channels`]).
pub const CLOSE_WITHIN: Duration = Duration::from_millis(500);

/// The broker nodes from `AMQP_ADDR`.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerNodes {
    uris: Vec<AMQPUri>,
    /// `server.address` / `server.port` of each node, shared by every span.
    peers: Vec<BrokerPeer>,
}

impl std::fmt::Debug for BrokerNodes {
    // URIs carry passwords: print where, never who.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.uris.iter().map(|u| format!("{}:{}", u.authority.host, u.authority.port))).finish()
    }
}

impl BrokerNodes {
    /// Parses one AMQP URI or a comma-separated list of them.
    pub fn parse(value: &str) -> Result<Self, String> {
        let uris = value
            .split(',')
            .map(str::trim)
            .filter(|uri| !uri.is_empty())
            .map(|uri| {
                let mut parsed: AMQPUri = uri.parse().map_err(|e| format!("{}: {e}", redact(uri)))?;
                parsed.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_SECS);
                parsed.query.connection_timeout.get_or_insert(DEFAULT_CONNECT_TIMEOUT_MS);
                Ok(parsed)
            })
            .collect::<Result<Vec<_>, String>>()?;
        if uris.is_empty() {
            return Err("no AMQP URI given".to_owned());
        }
        let peers = uris.iter().map(BrokerPeer::from).collect();
        Ok(Self { uris, peers })
    }

    /// How many nodes were given.
    pub fn len(&self) -> usize {
        self.uris.len()
    }

    /// Whether no node was given (never true for a parsed value).
    pub fn is_empty(&self) -> bool {
        self.uris.is_empty()
    }

    fn peer(&self, index: usize) -> BrokerPeer {
        self.peers[index % self.peers.len()].clone()
    }
}

fn redact(uri: &str) -> String {
    match (uri.find("://"), uri.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://***{}", &uri[..scheme], &uri[at..]),
        _ => uri.to_owned(),
    }
}

/// Whether the broker can be used right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerHealth {
    /// Connected.
    Up,
    /// Disconnected; being replaced.
    Recovering,
    /// Down longer than allowed: the process should exit non-zero so its supervisor restarts it.
    Lost,
}

/// How often the supervisor looks at the connection.
const CHECK_EVERY: Duration = Duration::from_millis(200);

/// One connection and its generation; a replacement gets the next generation.
#[derive(Clone)]
pub struct Link {
    /// The connection.
    pub connection: Arc<Connection>,
    /// Starts at 0; each replacement adds one.
    pub generation: u64,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("generation", &self.generation).finish()
    }
}

/// A connection to the broker (or to whichever cluster node answers) that keeps itself up: a
/// supervisor replaces the connection once it is lost and a node is reachable.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    nodes: Arc<BrokerNodes>,
    name: String,
    /// Index of the node the current TCP connection goes to; the connect function moves it.
    current: Arc<AtomicUsize>,
    link: watch::Sender<Link>,
    health: watch::Sender<BrokerHealth>,
    /// Down this long: `Lost`.
    give_up: Duration,
    closing: AtomicBool,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("nodes", &self.inner.nodes).field("peer", &self.peer()).finish()
    }
}

/// Why [`open`] failed.
struct OpenFailed {
    error: lapin::Error,
    /// An I/O error broke off a handshake a node had begun (it reset the connection, say), or
    /// the handshake was cut at its deadline: lapin gives up at once on a handshake broken off
    /// after `connection.start`, where it retries a node that refuses TCP. That node now goes
    /// last (so does one whose handshake failed otherwise: refused credentials, say).
    handshake_broken: bool,
    /// A handshake was cut at its deadline during this attempt (which then took that long).
    cut: bool,
}

/// Opens one connection, walking the node list on each attempt (about half a minute of
/// attempts with backoff). Once this future is dropped (abandoned), further attempts fail.
async fn open(
    nodes: &Arc<BrokerNodes>,
    current: &Arc<AtomicUsize>,
    name: &str,
    generation: u64,
) -> Result<Link, OpenFailed> {
    let properties = ConnectionProperties::default()
        .with_connection_name(format!("{name}#{generation}").into())
        // Short steps: a restarted broker is back in seconds. No auto-recovery (module docs).
        .with_backoff(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(1))
                .with_max_times(30)
                .with_jitter(),
        );
    let (connect_nodes, connect_current) = (nodes.clone(), current.clone());
    let handshake = HandshakeWatch { state: Arc::default(), current: current.clone(), nodes: nodes.clone() };
    let connect_handshake = handshake.state.clone();
    let runtime =
        lapin::runtime::default_runtime().map_err(|error| OpenFailed { error, handshake_broken: false, cut: false })?;
    let connecting = Connection::connector(
        nodes.uris[0].clone(),
        runtime,
        async move |_uri, runtime| {
            let count = connect_nodes.uris.len();
            {
                let mut state = lock(&connect_handshake);
                // The connect was dropped: lapin's I/O thread keeps retrying; those attempts fail.
                if state.closed {
                    return Err(abandoned());
                }
                // lapin connects again when a handshake failed: that node goes last this time.
                if let Some(failed) = state.pending.take() {
                    failed.pass_over(&connect_current, count);
                }
                // A cut counts for the attempt lapin gives up on, not for one it makes again.
                state.cut = false;
            }
            let start = connect_current.load(Ordering::Relaxed);
            let mut last_error = None;
            // Start with the node that worked last; then the others, in order.
            for step in 0..count {
                let index = (start + step) % count;
                // lapin ignores the URI's connection_timeout on this path: bound it here, so a
                // node that drops packets does not stall the walk to the next one.
                let timeout = connect_timeout(&connect_nodes.uris[index]);
                match tokio::time::timeout(timeout, connect_nodes.uris[index].connect_async(&runtime)).await {
                    Ok(Ok(stream)) => {
                        let mut state = lock(&connect_handshake);
                        // The connect was dropped (abandoned) while this one was under way:
                        // nobody would cut this handshake nor use the connection, so it does
                        // not start (the stream closes as it drops), and the node it reached
                        // does not become the one a newer connection is said to be on.
                        if state.closed {
                            return Err(abandoned());
                        }
                        connect_current.store(index, Ordering::Relaxed);
                        let socket = match &stream {
                            AsyncTcpStream::Plain(plain) => plain.get_ref().as_fd().try_clone_to_owned().ok(),
                            _ => None,
                        };
                        let Some(socket) = socket else {
                            tracing::warn!("cannot watch this connection's handshake (no duplicate of its socket)");
                            return Ok(stream);
                        };
                        state.pending = Some(Handshake {
                            socket: socket.into(),
                            node: index,
                            started: tokio::time::Instant::now(),
                            timeout: timeout * HANDSHAKE_TIMEOUTS,
                        });
                        return Ok(stream);
                    }
                    Ok(Err(error)) => last_error = Some(error),
                    Err(_) => last_error = Some(std::io::ErrorKind::TimedOut.into()),
                }
            }
            Err(lapin::Error::from(last_error.unwrap_or_else(|| std::io::ErrorKind::NotConnected.into())))
        },
        properties,
    );
    // lapin has no handshake timeout: a node that accepts TCP but never speaks AMQP (a frozen
    // broker, whose kernel still accepts) would hold the connect, and its I/O thread, for good.
    // Past the deadline the socket is shut down; lapin then connects again, from the next node.
    let mut connecting = std::pin::pin!(connecting);
    let mut check = tokio::time::interval(HANDSHAKE_CHECK_EVERY);
    let connection = loop {
        tokio::select! {
            // A finished handshake first: never cut one that completed as the deadline passed.
            biased;
            connected = &mut connecting => match connected {
                Ok(connection) => break connection,
                Err(error) => {
                    // A handshake still pending is the watch's to end as it drops, on return:
                    // its node passed over, its socket shut down.
                    let state = lock(&handshake.state);
                    let handshake_broken = (state.pending.is_some() && error.is_io_error()) || state.cut;
                    return Err(OpenFailed { error, handshake_broken, cut: state.cut });
                }
            },
            _ = check.tick() => handshake.cut_if_overdue(),
        }
    };
    // Done: the duplicate goes (it would keep the socket open past lapin's close).
    drop(lock(&handshake.state).pending.take());
    Ok(Link { connection: Arc::new(connection), generation })
}

/// How long a first connect tries the other nodes after one broke off its handshake (about the
/// half minute of lapin's attempts with backoff).
const CONNECT_RETRIES_WITHIN: Duration = Duration::from_secs(30);

/// How often a connect looks at its handshake's deadline.
const HANDSHAKE_CHECK_EVERY: Duration = Duration::from_millis(100);

/// The AMQP handshake's deadline, in the node's `connection_timeout`s (10 s by default, as
/// RabbitMQ's own `handshake_timeout`): long enough for a node that is slow, not frozen.
const HANDSHAKE_TIMEOUTS: u32 = 5;

/// A TCP connection handed to lapin whose AMQP handshake has not finished yet.
struct Handshake {
    /// A duplicate of lapin's socket: shutting it down ends lapin's reads and writes as well.
    socket: std::net::TcpStream,
    /// The node it goes to.
    node: usize,
    /// When the TCP connection was handed to lapin.
    started: tokio::time::Instant,
    /// The handshake's allowance: [`HANDSHAKE_TIMEOUTS`] times the URI's `connection_timeout`.
    timeout: Duration,
}

fn abandoned() -> lapin::Error {
    lapin::Error::from(std::io::Error::other("connection attempt abandoned"))
}

/// The URI's `connection_timeout`, or [`DEFAULT_CONNECT_TIMEOUT_MS`].
fn connect_timeout(uri: &AMQPUri) -> Duration {
    Duration::from_millis(uri.query.connection_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT_MS))
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The handshake of the connection being opened, if one is under way. Dropped with the connect
/// (an attempt abandoned after its time, or failed), it shuts the socket of a handshake still
/// under way, passes its node over, and fails lapin's further attempts, so its I/O thread
/// neither waits on a handshake for good nor connects again, and the next connect does not
/// start from a node that kept the last one waiting (a replacement gives up after 5 s, before
/// the handshake's deadline of 10 s by default).
struct HandshakeWatch {
    state: Arc<std::sync::Mutex<HandshakeState>>,
    /// The connect's node index, which a passed-over node moves on.
    current: Arc<AtomicUsize>,
    /// The connect's nodes.
    nodes: Arc<BrokerNodes>,
}

#[derive(Default)]
struct HandshakeState {
    pending: Option<Handshake>,
    /// The connect is gone: lapin's further attempts fail, and a handshake that would start now
    /// is cut at once.
    closed: bool,
    /// The last handshake lapin began was cut at its deadline (the node passed over).
    cut: bool,
}

impl HandshakeWatch {
    /// Shuts the handshake's socket down once its deadline has passed, and points the next
    /// attempt at the node after it (lapin connects again at once).
    fn cut_if_overdue(&self) {
        let mut state = lock(&self.state);
        let Some(overdue) = state.pending.take_if(|pending| pending.started.elapsed() >= pending.timeout) else {
            return;
        };
        overdue.pass_over(&self.current, self.nodes.len());
        state.cut = true;
        drop(state);
        let peer = self.nodes.peer(overdue.node);
        tracing::warn!(
            node = %format_args!("{}:{}", peer.address, peer.port),
            timeout_ms = overdue.timeout.as_millis() as u64,
            "the node accepted the TCP connection but did not complete the AMQP handshake in time; connecting again (from the next node)"
        );
        overdue.cut();
    }
}

impl Drop for HandshakeWatch {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        state.closed = true;
        if let Some(pending) = state.pending.take() {
            pending.pass_over(&self.current, self.nodes.len());
            pending.cut();
        }
    }
}

impl Handshake {
    /// Points the next attempt at the node after this one (unless another attempt moved it).
    fn pass_over(&self, current: &AtomicUsize, count: usize) {
        let _ = current.compare_exchange(self.node, (self.node + 1) % count, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn cut(&self) {
        if let Err(error) = self.socket.shutdown(std::net::Shutdown::Both) {
            tracing::debug!(%error, "shutting down an unfinished handshake's socket");
        }
    }
}

/// Whether any node accepts a TCP connection right now.
async fn reachable(nodes: &BrokerNodes) -> bool {
    for uri in &nodes.uris {
        let address = (uri.authority.host.as_str(), uri.authority.port);
        if let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect(address)).await
        {
            return true;
        }
    }
    false
}

impl Broker {
    /// Connects to the first node that answers (retrying for about half a minute while none
    /// does; a node that breaks off or stalls in its handshake is passed over, and the others
    /// are tried, each once) and starts the supervisor. `give_up`: how long the broker may stay
    /// unreachable before [`BrokerHealth::Lost`].
    pub async fn connect(nodes: BrokerNodes, connection_name: &str, give_up: Duration) -> lapin::Result<Self> {
        let nodes = Arc::new(nodes);
        let current = Arc::new(AtomicUsize::new(0));
        // A node that breaks off its handshake, or stalls in it past `connection.start`, fails
        // lapin's connect: the others are tried, each once at most, from the next node. A try
        // starts within the half minute of the first, or right after a handshake cut at its
        // deadline (five connection timeouts: 10 s by default).
        let (mut tries, started) = (nodes.len(), tokio::time::Instant::now());
        let link = loop {
            match open(&nodes, &current, connection_name, 0).await {
                Ok(link) => break link,
                Err(failed)
                    if failed.handshake_broken
                        && tries > 1
                        && (failed.cut || started.elapsed() < CONNECT_RETRIES_WITHIN) =>
                {
                    tries -= 1;
                    tracing::warn!(error = %failed.error, "a broker node broke off the AMQP handshake; trying the next one");
                }
                Err(failed) => return Err(failed.error),
            }
        };
        let inner = Arc::new(Inner {
            nodes,
            name: connection_name.to_owned(),
            current,
            link: watch::channel(link).0,
            health: watch::channel(BrokerHealth::Up).0,
            give_up,
            closing: AtomicBool::new(false),
        });
        tokio::spawn(supervise(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }

    /// The node currently connected to (`server.address` / `server.port` of spans).
    pub fn peer(&self) -> BrokerPeer {
        self.inner.nodes.peer(self.inner.current.load(Ordering::Relaxed))
    }

    /// The current connection.
    pub fn link(&self) -> Link {
        self.inner.link.borrow().clone()
    }

    /// The current connection's generation (what [`Broker::link`] says, without cloning it).
    pub fn generation(&self) -> u64 {
        self.inner.link.borrow().generation
    }

    /// Changes when the connection is replaced: open channels (and consumers) again then.
    pub fn links(&self) -> watch::Receiver<Link> {
        self.inner.link.subscribe()
    }

    /// Completes once the connection of `generation` has been replaced.
    pub async fn replaced(&self, generation: u64) {
        let mut links = self.links();
        // The guard `wait_for` returns is dropped here, never held across the caller's awaits.
        let _ = links.wait_for(|link| link.generation != generation).await.map(|_| ());
    }

    /// `Up`, `Recovering`, or `Lost` once the broker has been down longer than `give_up`.
    pub fn health(&self) -> watch::Receiver<BrokerHealth> {
        self.inner.health.subscribe()
    }

    /// Opens a channel on the current connection; also returns the connection's generation.
    pub async fn channel(&self) -> lapin::Result<(Channel, u64)> {
        let link = self.link();
        Ok((link.connection.create_channel().await?, link.generation))
    }

    /// Whether the connection of `generation` is gone: replaced, or lost and waiting for its
    /// replacement ([`Broker::replaced`]). Ask after one of its channels failed: `false` means
    /// the connection is still up and the failure concerns that channel alone. lapin marks the
    /// connection lost from a task of its own, a moment after it may already have failed a
    /// publish in flight, so this waits up to half a second for that before answering `false`.
    pub async fn lost(&self, generation: u64) -> bool {
        let gone = || {
            let link = self.inner.link.borrow();
            link.generation != generation || !link.connection.status().connected()
        };
        for _ in 0..100 {
            if gone() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        gone()
    }

    /// Closes `channels` at shutdown, before the connection: every close is sent at once (a
    /// channel being closed is one lapin's I/O thread leaves alone), and their confirms are
    /// awaited until `deadline`, not at all when it has passed, nor while the broker blocks its
    /// clients (lapin would write nothing). A channel only dropped is closed by lapin's I/O
    /// thread a moment later; should the connection's close have begun by then, that close
    /// fails, lapin 4.12 logs it as a connection error ("invalid channel state: Closing") and
    /// the connection ends in error, its own close unconfirmed (RabbitMQ logs a client that
    /// "unexpectedly closed" it).
    pub async fn close_channels(&self, channels: impl IntoIterator<Item = Channel>, deadline: std::time::Instant) {
        if self.link().connection.status().blocked() {
            return;
        }
        let closes = channels
            .into_iter()
            .filter(|channel| channel.status().connected())
            .map(|channel| async move { channel.close(200, "shutting down".into()).await });
        let waiting = deadline > std::time::Instant::now();
        // A timeout polls what it bounds once even past its deadline: every close is sent.
        match tokio::time::timeout_at(deadline.into(), futures_util::future::join_all(closes)).await {
            Ok(closed) => {
                for error in closed.into_iter().filter_map(Result::err) {
                    tracing::debug!(%error, "closing a channel");
                }
            }
            Err(_) if waiting => tracing::warn!("the broker did not confirm closing the channels in time"),
            Err(_) => tracing::debug!("channels closed without waiting for the broker: no time left"),
        }
    }

    /// Closes the connection (normal shutdown) and stops the supervisor.
    pub async fn close(&self) {
        self.inner.closing.store(true, Ordering::SeqCst);
        close_within(&self.link().connection).await;
    }
}

/// Watches the connection every 200 ms: reports health, and replaces a lost connection as soon
/// as a node accepts TCP connections.
async fn supervise(inner: std::sync::Weak<Inner>) {
    let mut down_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.closing.load(Ordering::SeqCst) {
            return;
        }
        let link = inner.link.borrow().clone();
        let health = if link.connection.status().connected() {
            down_since = None;
            BrokerHealth::Up
        } else {
            let since = *down_since.get_or_insert_with(tokio::time::Instant::now);
            if reachable(&inner.nodes).await {
                replace(&inner, &link).await;
            }
            if inner.link.borrow().connection.status().connected() {
                down_since = None;
                BrokerHealth::Up
            } else if since.elapsed() > inner.give_up {
                BrokerHealth::Lost
            } else {
                BrokerHealth::Recovering
            }
        };
        inner.health.send_if_modified(|previous| std::mem::replace(previous, health) != health);
    }
}

/// Closes `connection`, waiting at most half a second for the broker to confirm, and not at all
/// while it blocks its clients (a resource alarm: lapin then writes nothing); the broker sees
/// the socket close with the process either way.
async fn close_within(connection: &Connection) {
    if connection.status().blocked() {
        tracing::warn!("the broker blocks this connection; not waiting to close it");
        return;
    }
    match tokio::time::timeout(CLOSE_WITHIN, connection.close(200, "shutting down".into())).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::debug!(%error, "closing the broker connection"),
        Err(_) => tracing::warn!("the broker did not confirm closing the connection in time"),
    }
}

/// Opens the next connection and publishes it in place of the lost one.
async fn replace(inner: &Inner, lost: &Link) {
    // Past its time the attempt is dropped, which makes its I/O thread's further attempts fail.
    let attempt = open(&inner.nodes, &inner.current, &inner.name, lost.generation + 1);
    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
        Ok(Ok(fresh)) => {
            tracing::warn!(generation = fresh.generation, "broker connection lost; replaced it");
            let connection = fresh.connection.clone();
            inner.link.send_replace(fresh);
            // `close` sets `closing`, then closes the current link: if it began before the
            // link changed, this sees it and closes the new one itself.
            if inner.closing.load(Ordering::SeqCst) {
                close_within(&connection).await;
            }
        }
        // A node that broke off the handshake goes last for the next attempt (`open`).
        Ok(Err(failed)) => tracing::debug!(error = %failed.error, "replacing the broker connection failed"),
        Err(_) => tracing::debug!("replacing the broker connection timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_cluster_list_and_fills_in_heartbeat_and_timeout() {
        let nodes = BrokerNodes::parse("amqp://u:p@rabbit-1:5672/%2f, amqp://u:p@rabbit-2:5673/%2f?heartbeat=5")
            .expect("valid");
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes.uris[0].query.heartbeat, Some(DEFAULT_HEARTBEAT_SECS));
        assert_eq!(nodes.uris[1].query.heartbeat, Some(5));
        assert_eq!(nodes.uris[0].query.connection_timeout, Some(DEFAULT_CONNECT_TIMEOUT_MS));
        assert_eq!(nodes.peer(1), BrokerPeer { address: "rabbit-2".into(), port: 5673 });
        assert_eq!(nodes.peer(2), nodes.peer(0), "indexes wrap around the list");
    }

    #[test]
    fn rejects_garbage_without_echoing_the_password() {
        let error = BrokerNodes::parse("amqp://user:hunter2@host:notaport/").expect_err("bad port");
        assert!(!error.contains("hunter2"), "{error}");
        assert!(BrokerNodes::parse(" , ").is_err());
        let debug = format!("{:?}", BrokerNodes::parse("amqp://user:hunter2@host:5672/%2f").expect("valid"));
        assert!(!debug.contains("hunter2"), "{debug}");
    }
}
