//! The HTTP layer's SERVER spans for methods inside and outside the conventions' list, through
//! the real exporter: a method a client invents names no span and no `http.request.method`
//! value of its own. And the trace it hands back in the response.

use axum::Router;
use axum::body::Body;
use axum::routing::any;
use tower::ServiceExt as _;
use tracehop_telemetry::http::HttpServerLayer;
use tracehop_telemetry::{Telemetry, TelemetryConfig};
use tracehop_testkit::otlp::OtlpReceiver;

#[tokio::test]
async fn a_method_outside_the_conventions_list_is_other_with_the_original_kept()
-> Result<(), Box<dyn std::error::Error>> {
    let receiver = OtlpReceiver::start().await;
    let telemetry = Telemetry::new(&TelemetryConfig::otlp_grpc("http-methods", receiver.endpoint()))?;
    let app =
        Router::new().route("/api/orders", any(|| async { "ok" })).route_layer(HttpServerLayer::new(telemetry.clone()));
    for method in ["POST", "BREW", "QUERY"] {
        let request = http::Request::builder().method(method).uri("/api/orders").body(Body::empty())?;
        assert_eq!(app.clone().oneshot(request).await?.status(), 200, "{method}");
    }
    telemetry.shutdown().await;

    let spans = receiver.spans();
    let names: Vec<&str> = spans.iter().map(|span| span.name.as_str()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    for (name, method, original) in [
        ("POST /api/orders", "POST", None),
        ("HTTP /api/orders", "_OTHER", Some("BREW")),
        ("QUERY /api/orders", "QUERY", None),
    ] {
        let span = spans.iter().find(|span| span.name == name).unwrap_or_else(|| panic!("{name} in {names:?}"));
        assert_eq!(span.str_attr("http.request.method"), Some(method), "{name}");
        assert_eq!(span.str_attr("http.request.method_original"), original, "{name}");
        assert_eq!(span.str_attr("http.route"), Some("/api/orders"), "{name}");
        assert_eq!(span.str_attr("url.path"), Some("/api/orders"), "{name}");
    }
    Ok(())
}

/// `server-timing` and `traceresponse` carry the SERVER span's context, and are marked for
/// HTTP/2 to send never indexed (they differ from response to response).
#[tokio::test]
async fn the_trace_handed_back_is_the_spans_and_never_indexed() -> Result<(), Box<dyn std::error::Error>> {
    let receiver = OtlpReceiver::start().await;
    let telemetry = Telemetry::new(&TelemetryConfig::otlp_grpc("http-methods", receiver.endpoint()))?;
    let app = Router::new()
        .route("/api/orders", any(|| async { "ok" }))
        .route_layer(HttpServerLayer::new(telemetry.clone()).trace_response_headers(true));
    let request = http::Request::builder().method("POST").uri("/api/orders").body(Body::empty())?;
    let response = app.oneshot(request).await?;
    telemetry.shutdown().await;

    let span = receiver.spans().into_iter().next().ok_or("no span")?;
    let traceparent = format!("00-{}-{}-01", span.trace_id, span.span_id);
    let headers = response.headers();
    assert_eq!(headers["traceresponse"], traceparent.as_str());
    assert_eq!(headers["server-timing"], format!("trace;desc={traceparent}").as_str());
    assert!(headers["traceresponse"].is_sensitive() && headers["server-timing"].is_sensitive());
    Ok(())
}
