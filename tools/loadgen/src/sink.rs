//! An OTLP receiver (gRPC and HTTP, spans and metrics) that answers every export and keeps
//! nothing: the "tracing on" backend of the benchmarks. It does not parse (it counts bytes): a real
//! backend runs on another machine, and parsing here would only take CPU from the services
//! being measured.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// OTLP/gRPC on `listener`, without parsing: each export request's body is read and answered
/// with an empty `ExportTraceServiceResponse` and `grpc-status: 0`. Counts bytes. (A backend
/// on another machine would parse; here the parsing would only compete with the services for
/// the benchmark machine's two cores.) With `dump`, each span export's body is also appended
/// to it as it came (gRPC framing included) behind its length, a little-endian `u32`: the
/// input of `loadgen breakdown`. The two writes happen under the file's lock, so concurrent
/// exports never interleave.
pub fn spawn(listener: tokio::net::TcpListener, dump: Option<std::fs::File>) -> Arc<AtomicU64> {
    use axum::body::Body;
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    let bytes = Arc::new(AtomicU64::new(0));
    let counter = bytes.clone();
    let dump = dump.map(|file| Arc::new(std::sync::Mutex::new(file)));
    let export = axum::routing::post(move |uri: axum::http::Uri, body: axum::body::Bytes| {
        let (counter, dump) = (counter.clone(), dump.clone());
        async move {
            counter.fetch_add(body.len() as u64, Ordering::Relaxed);
            if let Some(dump) = dump.filter(|_| uri.path().ends_with("TraceService/Export")) {
                use std::io::Write as _;
                let mut file = dump.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let written = file.write_all(&(body.len() as u32).to_le_bytes()).and_then(|()| file.write_all(&body));
                if let Err(error) = written {
                    eprintln!("sink: cannot write the span dump: {error}");
                }
            }
            let mut trailers = axum::http::HeaderMap::new();
            trailers.insert("grpc-status", axum::http::HeaderValue::from_static("0"));
            // One gRPC message: not compressed, zero bytes (an empty response).
            let frames = futures_util::stream::iter([
                Ok::<_, std::convert::Infallible>(Frame::data(axum::body::Bytes::from_static(&[0, 0, 0, 0, 0]))),
                Ok(Frame::trailers(trailers)),
            ]);
            axum::http::Response::builder()
                .header(axum::http::header::CONTENT_TYPE, "application/grpc")
                .body(Body::new(StreamBody::new(frames)))
                .unwrap_or_default()
        }
    });
    // Spans and metrics alike: both answers are an empty message.
    let app = axum::Router::new()
        .route("/opentelemetry.proto.collector.trace.v1.TraceService/Export", export.clone())
        .route("/opentelemetry.proto.collector.metrics.v1.MetricsService/Export", export);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    bytes
}

/// [`spawn`] on a thread and runtime of its own (`otlp-sink`), for the benchmark: the receiver
/// then never waits behind the load generator's tasks, nor they behind it, much as a backend
/// in a process of its own would not. Runs until the process exits.
pub fn spawn_on_own_thread(
    listener: std::net::TcpListener,
    dump: Option<std::fs::File>,
) -> anyhow::Result<Arc<AtomicU64>> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (counter_tx, counter_rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new().name("otlp-sink".to_owned()).spawn(move || {
        runtime.block_on(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => {
                    let _ = counter_tx.send(Ok(spawn(listener, dump)));
                    std::future::pending::<()>().await;
                }
                Err(error) => {
                    let _ = counter_tx.send(Err(error));
                }
            }
        });
    })?;
    Ok(counter_rx.recv()??)
}

/// OTLP/HTTP (protobuf) on `listener`: reads each export request and answers an empty
/// `ExportTraceServiceResponse`, counting bytes, not parsing spans (a backend on another machine
/// would do the parsing; this one stands in for the network, cheaply).
pub fn spawn_http(listener: tokio::net::TcpListener) -> Arc<AtomicU64> {
    let bytes = Arc::new(AtomicU64::new(0));
    let counter = bytes.clone();
    let export = axum::routing::post(move |body: axum::body::Bytes| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(body.len() as u64, Ordering::Relaxed);
            ([(axum::http::header::CONTENT_TYPE, "application/x-protobuf")], Vec::<u8>::new())
        }
    });
    let app = axum::Router::new().route("/v1/traces", export.clone()).route("/v1/metrics", export);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    bytes
}

/// Serves until killed: OTLP/gRPC on `listen`, OTLP/HTTP on the next port, both counting
/// bytes; prints the counts every five seconds.
pub async fn run(listen: SocketAddr) -> anyhow::Result<()> {
    let grpc = spawn(tokio::net::TcpListener::bind(listen).await?, None);
    let http = spawn_http(tokio::net::TcpListener::bind((listen.ip(), listen.port() + 1)).await?);
    eprintln!("sink: OTLP/gRPC on {listen}, OTLP/HTTP on port {}", listen.port() + 1);
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        eprintln!("sink: {} bytes over gRPC, {} over HTTP", grpc.load(Ordering::Relaxed), http.load(Ordering::Relaxed));
    }
}
