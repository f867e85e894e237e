//! One AMQP connection per service, to a single broker or any node of a cluster, kept alive by
//! lapin's auto-recovery.
//!
//! `AMQP_ADDR` is one URI or a comma-separated list of a cluster's nodes. lapin re-runs our
//! connect function on every (re)connection, so the function walks the node list: the first
//! node that answers wins, and when that node goes away recovery lands on another one without
//! a restart. lapin then replays channels, exchanges, queues, bindings, consumers, QoS and
//! confirm mode on the new connection. Credentials and vhost come from the first URI; the
//! nodes of one cluster share them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use backon::ExponentialBuilder;
use lapin::tcp::AMQPUriTcpExt;
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::watch;
use tracehop_telemetry::messaging::BrokerPeer;

/// Heartbeat asked for when the URI sets none: a dead peer is noticed within ~2x this.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 10;
/// TCP connect timeout per node when the URI sets none, so a node that drops packets does not
/// stall the walk to the next one.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 2000;

/// The broker nodes from `AMQP_ADDR`.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerNodes {
    uris: Vec<AMQPUri>,
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
        Ok(Self { uris })
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
        let uri = &self.uris[index % self.uris.len()];
        BrokerPeer { address: uri.authority.host.clone(), port: uri.authority.port }
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
    /// Disconnected; lapin is recovering.
    Recovering,
    /// Recovery gave up, or took longer than allowed: the process should exit non-zero so its
    /// supervisor restarts it.
    Lost,
}

/// A recovering connection to the broker (or to whichever cluster node answers).
#[derive(Clone)]
pub struct Broker {
    connection: Arc<Connection>,
    nodes: Arc<BrokerNodes>,
    /// Index of the node the current TCP connection goes to; the connect function moves it.
    current: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("nodes", &self.nodes).field("peer", &self.peer()).finish()
    }
}

impl Broker {
    /// Connects to the first node that answers, retrying with backoff while none does.
    pub async fn connect(nodes: BrokerNodes, connection_name: &str) -> lapin::Result<Self> {
        let nodes = Arc::new(nodes);
        let current = Arc::new(AtomicUsize::new(0));
        let properties = ConnectionProperties::default()
            .with_connection_name(connection_name.into())
            .enable_auto_recover()
            // Short steps, many of them: a restarted broker is back in seconds, and the default
            // (exponential up to a minute) would leave requests failing long after it is.
            .with_backoff(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(1))
                    .with_max_times(30)
                    .with_jitter(),
            );
        let connect_nodes = nodes.clone();
        let connect_current = current.clone();
        let runtime = lapin::runtime::default_runtime()?;
        let connection = Connection::connector(
            nodes.uris[0].clone(),
            runtime,
            async move |_uri, runtime| {
                let count = connect_nodes.uris.len();
                let start = connect_current.load(Ordering::Relaxed);
                let mut last_error = None;
                // Start with the node that worked last; then the others, in order.
                for step in 0..count {
                    let index = (start + step) % count;
                    // lapin ignores the URI's connection_timeout on this path: bound it here, so
                    // a node that drops packets does not stall the walk to the next one.
                    let timeout = Duration::from_millis(
                        connect_nodes.uris[index].query.connection_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT_MS),
                    );
                    match tokio::time::timeout(timeout, connect_nodes.uris[index].connect_async(&runtime)).await {
                        Ok(Ok(stream)) => {
                            connect_current.store(index, Ordering::Relaxed);
                            return Ok(stream);
                        }
                        Ok(Err(error)) => last_error = Some(error),
                        Err(_) => last_error = Some(std::io::ErrorKind::TimedOut.into()),
                    }
                }
                Err(lapin::Error::from(last_error.unwrap_or_else(|| std::io::ErrorKind::NotConnected.into())))
            },
            properties,
        )
        .await?;
        Ok(Self { connection: Arc::new(connection), nodes, current })
    }

    /// The node currently connected to (`server.address` / `server.port` of spans).
    pub fn peer(&self) -> BrokerPeer {
        self.nodes.peer(self.current.load(Ordering::Relaxed))
    }

    /// Whether the connection is up right now.
    pub fn is_connected(&self) -> bool {
        self.connection.status().connected()
    }

    /// Opens a channel.
    pub async fn channel(&self) -> lapin::Result<Channel> {
        self.connection.create_channel().await
    }

    /// Watches the connection: `Up`, `Recovering`, or `Lost` once it has been down longer than
    /// `give_up_after` (whether lapin is still trying or has given up). Checked every 200 ms.
    pub fn health(&self, give_up_after: Duration) -> watch::Receiver<BrokerHealth> {
        let (sender, receiver) = watch::channel(BrokerHealth::Up);
        let broker = self.clone();
        tokio::spawn(async move {
            let mut down_since: Option<tokio::time::Instant> = None;
            let mut ticks = tokio::time::interval(Duration::from_millis(200));
            loop {
                ticks.tick().await;
                let status = broker.connection.status();
                let health = if status.connected() {
                    down_since = None;
                    BrokerHealth::Up
                } else {
                    let since = *down_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() > give_up_after { BrokerHealth::Lost } else { BrokerHealth::Recovering }
                };
                sender.send_if_modified(|previous| std::mem::replace(previous, health) != health);
                if health == BrokerHealth::Lost || sender.is_closed() {
                    return;
                }
            }
        });
        receiver
    }

    /// Closes the connection (normal shutdown).
    pub async fn close(&self) {
        if let Err(error) = self.connection.close(200, "shutting down".into()).await {
            tracing::debug!(%error, "closing the broker connection");
        }
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
