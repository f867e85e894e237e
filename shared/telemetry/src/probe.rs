//! Container health probes that need nothing from the runtime image: the service binary probes
//! itself (`<service> healthcheck`), so a slim image without curl still has a real healthcheck.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The address to probe for a listen address: `0.0.0.0` / `::` become loopback.
pub fn local(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() { SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port()) } else { addr }
}

/// Whether `GET path` on `addr` answers 200 within `timeout`.
pub async fn http_ok(addr: SocketAddr, path: &str, timeout: Duration) -> bool {
    let probe = async {
        let mut stream = TcpStream::connect(local(addr)).await.ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        // "HTTP/1.1 200" or "HTTP/1.0 200"
        Some(head.starts_with(b"HTTP/1.") && &head[8..12] == b" 200")
    };
    matches!(tokio::time::timeout(timeout, probe).await, Ok(Some(true)))
}
