//! The one shutdown signal every service drains on: SIGINT (Ctrl-C) or SIGTERM (docker stop,
//! Kubernetes). Feed it to `axum::serve(..).with_graceful_shutdown`, tonic's
//! `serve_with_incoming_shutdown` and the consumer's `select!`.

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
/// # async fn example(listener: tokio::net::TcpListener, app: axum::Router) -> std::io::Result<()> {
/// use std::future::IntoFuture;
/// use std::time::Duration;
/// use tracehop_telemetry::shutdown::{serve_draining, signal};
/// serve_draining(signal(), Duration::from_secs(5), |shutdown| {
///     axum::serve(listener, app).with_graceful_shutdown(shutdown).into_future()
/// })
/// .await
/// .transpose()?;
/// # Ok(())
/// # }
/// ```
pub async fn serve_draining<F: Future>(
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: std::time::Duration,
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
