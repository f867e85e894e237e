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

/// Bounds a server's graceful shutdown: returns `shutdown` to hand to the server, and a deadline
/// that completes `drain` after it. Race the server against the deadline, so a client that never
/// finishes its request (servers read one without a deadline) cannot keep the process from
/// flushing its telemetry and exiting:
///
/// ```no_run
/// # async fn serve(shutdown: impl std::future::Future<Output = ()>) {}
/// # async fn example() {
/// use std::time::Duration;
/// let (shutdown, deadline) =
///     tracehop_telemetry::shutdown::with_drain_deadline(tracehop_telemetry::shutdown::signal(), Duration::from_secs(5));
/// tokio::select! {
///     () = serve(shutdown) => {}
///     () = deadline => tracing::warn!("requests still in progress at the drain deadline"),
/// }
/// # }
/// ```
pub fn with_drain_deadline(
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: std::time::Duration,
) -> (impl Future<Output = ()> + Send + 'static, impl Future<Output = ()> + Send + 'static) {
    let (signalled, draining) = tokio::sync::oneshot::channel();
    let shutdown = async move {
        shutdown.await;
        let _ = signalled.send(());
    };
    let deadline = async move {
        // Unsent only when the server dropped `shutdown`: it has ended, and this never completes.
        match draining.await {
            Ok(()) => tokio::time::sleep(drain).await,
            Err(_) => std::future::pending().await,
        }
    };
    (shutdown, deadline)
}
