//! A TCP proxy between a service and the broker that can tell the service the broker blocks it
//! (`connection.blocked`, as RabbitMQ does under a resource alarm: lapin then writes nothing
//! more) and cut the connection, for the states a real broker reaches only by chance.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::rabbit::TestVhost;

/// The proxy's latest connection.
#[derive(Default)]
struct Latest {
    /// Frames to send the client, as if from the broker.
    inject: Option<mpsc::UnboundedSender<Vec<u8>>>,
    /// Cuts both directions.
    cut: Option<oneshot::Sender<()>>,
}

/// Forwards every connection to the broker of `AMQP_ADDR`; acts on the latest one.
#[derive(Clone)]
pub struct AmqpProxy {
    port: u16,
    latest: Arc<Mutex<Latest>>,
    /// Stops the accept loop (the port then refuses connections).
    stop: Arc<tokio::sync::Notify>,
}

impl AmqpProxy {
    /// Listens on a free loopback port.
    pub async fn start() -> Self {
        let upstream = crate::rabbit::broker_address();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let port = listener.local_addr().expect("the proxy's address").port();
        let latest = Arc::new(Mutex::new(Latest::default()));
        let proxied = latest.clone();
        let stop = Arc::new(tokio::sync::Notify::new());
        let stopped = stop.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = stopped.notified() => return,
                };
                let Ok((client, _)) = accepted else { return };
                let Ok(server) = TcpStream::connect(&upstream).await else { continue };
                let (inject, injected) = mpsc::unbounded_channel();
                let (cut, cut_off) = oneshot::channel();
                *proxied.lock().unwrap_or_else(PoisonError::into_inner) =
                    Latest { inject: Some(inject), cut: Some(cut) };
                tokio::spawn(async move {
                    tokio::select! {
                        () = relay(client, server, injected) => {}
                        _ = cut_off => {}
                    }
                });
            }
        });
        Self { port, latest, stop }
    }

    /// The AMQP URI of `vhost` through the proxy.
    pub fn url(&self, vhost: &TestVhost) -> String {
        url_at(vhost, self.port)
    }

    /// Sends the latest connection's client `connection.blocked`. (The broker's frames arrive
    /// whole in practice, so this one does not split another.)
    pub fn block(&self) {
        let reason = b"test";
        let mut payload = vec![0, 10, 0, 60, u8::try_from(reason.len()).expect("short")];
        payload.extend_from_slice(reason);
        let mut frame = vec![1u8, 0, 0];
        frame.extend_from_slice(&u32::try_from(payload.len()).expect("short").to_be_bytes());
        frame.extend_from_slice(&payload);
        frame.push(0xCE);
        let latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        latest.inject.as_ref().expect("a connection through the proxy").send(frame).expect("relay running");
    }

    /// Stops listening, as a node that is gone: connections to its port are refused. The
    /// connections it has relay on until [`AmqpProxy::cut`].
    pub fn stop(&self) {
        self.stop.notify_one();
    }

    /// Cuts the latest connection.
    pub fn cut(&self) {
        let cut = self.latest.lock().unwrap_or_else(PoisonError::into_inner).cut.take();
        let _ = cut.expect("a connection through the proxy").send(());
    }
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

/// The AMQP URI of `vhost` on a loopback `port`.
pub fn url_at(vhost: &TestVhost, port: u16) -> String {
    let url = vhost.url();
    let authority = url.find("://").map_or(0, |i| i + 3);
    let host_end = authority + url[authority..].find('/').unwrap_or(url.len() - authority);
    let host_start = url[..host_end].rfind('@').map_or(authority, |at| at + 1);
    format!("{}127.0.0.1:{}{}", &url[..host_start], port, &url[host_end..])
}

/// A node that accepts TCP connections and never says a word: a frozen broker, whose kernel
/// still completes TCP handshakes. The kernel queues the connections; [`FrozenNode::connections`]
/// takes them from its queue and keeps them open, unanswered.
pub struct FrozenNode {
    listener: std::net::TcpListener,
    accepted: Mutex<Vec<std::net::TcpStream>>,
}

impl FrozenNode {
    /// Listens on a free loopback port.
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the frozen node");
        listener.set_nonblocking(true).expect("a non-blocking listener");
        Self { listener, accepted: Mutex::default() }
    }

    /// How many connections clients have opened to it so far.
    pub fn connections(&self) -> usize {
        let mut accepted = self.accepted.lock().unwrap_or_else(PoisonError::into_inner);
        while let Ok((stream, _)) = self.listener.accept() {
            accepted.push(stream);
        }
        accepted.len()
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.listener.local_addr().expect("the frozen node's address").port()
    }

    /// How many of those connections the client has not closed (read without blocking: end of
    /// stream is closed).
    pub fn open_connections(&self) -> usize {
        self.connections();
        let accepted = self.accepted.lock().unwrap_or_else(PoisonError::into_inner);
        accepted
            .iter()
            .filter(|stream| {
                let _ = stream.set_nonblocking(true);
                let mut byte = [0u8; 64];
                loop {
                    match std::io::Read::read(&mut &**stream, &mut byte) {
                        Ok(0) => return false,
                        // The client's protocol header: read on.
                        Ok(_) => {}
                        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return true,
                        Err(_) => return false,
                    }
                }
            })
            .count()
    }

    /// The AMQP URI of `vhost` on this node.
    pub fn url(&self, vhost: &TestVhost) -> String {
        url_at(vhost, self.port())
    }
}
