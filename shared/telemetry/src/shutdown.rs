//! The one shutdown signal every service drains on: SIGINT (Ctrl-C) or SIGTERM (docker stop,
//! Kubernetes). Feed it to [`serve_http`], tonic's `serve_with_incoming_shutdown` and the
//! consumer's `select!`; [`serve_draining`] bounds how long a server may take to finish.

use std::io::ErrorKind;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// Completes on the first SIGINT or SIGTERM.
pub async fn signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("SIGINT received, shutting down"),
        () = terminate => tracing::info!("SIGTERM received, shutting down"),
    }
}

/// The shutdown signal [`serve_draining`] hands its server.
pub type Signal = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs the server `serve` builds around its graceful-shutdown signal, which completes with
/// `shutdown`; from then on waits at most `drain` for the server to finish, so a client that
/// never finishes its request or never reads its answer (servers wait for both without a
/// deadline) cannot keep the process from flushing its telemetry and exiting. `None` when the
/// deadline came first: the connections still open end with the process.
///
/// ```no_run
/// # async fn example(listener: tokio::net::TcpListener, app: axum::Router) {
/// use std::time::Duration;
/// use tracehop_telemetry::shutdown::{serve_draining, serve_http, signal};
/// let header_timeout = Duration::from_secs(10);
/// serve_draining(signal(), Duration::from_secs(5), |shutdown| serve_http(listener, app, header_timeout, shutdown))
///     .await;
/// # }
/// ```
pub async fn serve_draining<F: Future>(
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
    serve: impl FnOnce(Signal) -> F,
) -> Option<F::Output> {
    let (signalled, draining) = tokio::sync::oneshot::channel();
    let served = serve(Box::pin(async move {
        shutdown.await;
        let _ = signalled.send(());
    }));
    let deadline = async move {
        // Unsent only when the server dropped its signal: it has ended, and this never completes.
        match draining.await {
            Ok(()) => tokio::time::sleep(drain).await,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        served = served => Some(served),
        () = deadline => {
            tracing::warn!(?drain, "requests still in progress at the drain deadline; no longer waiting for them");
            None
        }
    }
}

/// Serves `app` on `listener` until `shutdown`, then finishes the requests in progress. As
/// `axum::serve`, with one difference: a deadline for a request's headers. hyper has one
/// (`header_read_timeout`), but axum runs hyper without a timer, which leaves it off: a client
/// that sent part of its headers and then nothing kept its connection, socket and task for good,
/// and enough such clients exhaust the process's file descriptors. The deadline also closes a
/// connection idle that long between requests.
pub async fn serve_http(listener: TcpListener, app: axum::Router, header_timeout: Duration, mut shutdown: Signal) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(header_timeout);
    let connections = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // A client that gave up before its connection was accepted.
                Err(error) if matches!(
                    error.kind(),
                    ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
                ) => continue,
                Err(error) => {
                    // Out of file descriptors, say: wait for some to close, as axum does.
                    tracing::error!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(app.clone());
        let connection = connections.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "HTTP connection ended");
            }
        });
    }
    drop(listener);
    connections.shutdown().await;
}
