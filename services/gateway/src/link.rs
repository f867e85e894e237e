//! The gateway's connections to checkout, counted, so that "checkout unreachable" can be told
//! from "checkout slow".
//!
//! tonic's channel connects for one request at a time: while checkout's host drops packets
//! (down, firewalled), each waiting request takes its turn at a connect that ends only at the
//! connect timeout, and a request far back in that line would wait past `CHECKOUT_TIMEOUT_MS`
//! and answer 504. With no connection open, a request waits at most [`UNREACHABLE_WITHIN`] and
//! answers 503, as the contract asks of an unreachable checkout.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long a request waits for checkout while no connection to it is open.
pub const UNREACHABLE_WITHIN: Duration = Duration::from_millis(700);

/// The connections to checkout open now. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Links(Arc<AtomicUsize>);

impl Links {
    /// Whether a connection to checkout is open.
    pub fn connected(&self) -> bool {
        self.0.load(Ordering::Relaxed) > 0
    }

    /// A connector for tonic's channel: hyper-util's, as tonic's own (each address of the name
    /// tried in turn, IPv4 300 ms after IPv6; no Nagle's delay), each connection counted while
    /// it lives.
    pub fn connector(
        &self,
    ) -> impl tower::Service<Uri, Response = Counted, Error: std::error::Error + Send + Sync + 'static, Future: Send>
    + Clone
    + Send
    + 'static {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let links = self.clone();
        tower::ServiceBuilder::new().map_response(move |io| Counted::new(io, links.clone())).service(http)
    }
}

/// A connection to checkout, counted in its [`Links`] until dropped.
#[derive(Debug)]
pub struct Counted {
    /// The connection.
    io: TokioIo<TcpStream>,
    /// Where it is counted.
    links: Links,
}

impl Counted {
    fn new(io: TokioIo<TcpStream>, links: Links) -> Self {
        links.0.fetch_add(1, Ordering::Relaxed);
        Self { io, links }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.links.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl hyper::rt::Read for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Counted {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}
