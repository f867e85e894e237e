//! The HTTP layer's SERVER spans for methods inside and outside the conventions' list, through
//! the real exporter: a method a client invents names no span and no `http.request.method`
//! value of its own.

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
