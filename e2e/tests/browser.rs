//! The demo page in a real headless Chromium (Debian's, driven by chromedriver over the
//! WebDriver protocol): it loads, places an order, starts the trace itself and shows the trace
//! id the services recorded; and a page on another origin may call the API with trace headers
//! (CORS preflight) and read the trace back from the exposed response headers.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use axum::response::Html;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use serde_json::{Value, json};
use tracehop_e2e::{Options, Pipeline};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// chromedriver on a free port with a Chromium session; both end on drop.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Self {
        for binary in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
            assert!(
                std::path::Path::new(binary).exists(),
                "{binary} is missing: install Debian's chromium and chromium-driver (scripts/test does)"
            );
        }
        let [port] = tracehop_testkit::free_ports();
        // Its own process group: on drop the whole group goes, Chromium included.
        let driver = Command::new("/usr/bin/chromedriver")
            .process_group(0)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        for _ in 0..100 {
            if http.get(format!("{base}/status")).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile = tempfile::tempdir().expect("profile dir");
        // The flags keep a sandboxed CI machine quiet: no background or update traffic.
        let args = vec![
            "--headless=new".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args}
        }}});
        let session: Value = http
            .post(format!("{base}/session"))
            .json(&capabilities)
            .send()
            .await
            .expect("new session")
            .json()
            .await
            .expect("json");
        let session =
            session["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {session}")).to_owned();
        Self { driver, base, session, http, _profile: profile }
    }

    async fn command(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut request = self.http.request(method, url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer: Value = request.send().await.expect("webdriver").json().await.expect("json");
        answer["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", Some(json!({"url": url}))).await;
    }

    /// The element matching `css`, waiting up to 10 s for it to appear.
    async fn element(&self, css: &str) -> String {
        for _ in 0..200 {
            let found = self
                .command(reqwest::Method::POST, "/element", Some(json!({"using": "css selector", "value": css})))
                .await;
            if let Some(id) = found[ELEMENT].as_str() {
                return id.to_owned();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no element {css}");
    }

    async fn text(&self, css: &str) -> String {
        let id = self.element(css).await;
        self.command(reqwest::Method::GET, &format!("/element/{id}/text"), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.command(reqwest::Method::POST, &format!("/element/{id}/click"), Some(json!({}))).await;
    }

    async fn attribute(&self, css: &str, name: &str) -> String {
        let id = self.element(css).await;
        self.command(reqwest::Method::GET, &format!("/element/{id}/attribute/{name}"), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

impl Browser {
    /// Ends the session (Chromium exits).
    async fn close(&self) {
        self.command(reqwest::Method::DELETE, "", None).await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let group = format!("-{}", self.driver.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.driver.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_places_an_order_in_a_trace_the_browser_started() {
    let pipeline = Pipeline::start(Options::default()).await;
    let browser = Browser::start().await;
    browser.open(&format!("{}/", pipeline.gateway_url)).await;
    assert_eq!(browser.text("h1").await, "tracehop checkout");
    browser.click("#place").await;
    let trace_id = browser.text("#trace-id").await;
    assert_eq!(browser.text("#status").await, "202");
    let sent = browser.text("#sent-traceparent").await;
    let (browser_trace, browser_span) = (&sent[3..35], &sent[36..52]);
    assert_eq!(trace_id, browser_trace, "the trace the browser started");
    assert_eq!(browser.attribute("#jaeger-link", "href").await, format!("http://localhost:16686/trace/{trace_id}"));
    let spans = pipeline
        .receiver
        .wait_for(Duration::from_secs(10), |spans| {
            spans.iter().any(|s| s.trace_id == trace_id && s.kind == SpanKind::Consumer)
                && spans
                    .iter()
                    .any(|s| s.trace_id == trace_id && s.service_name == "gateway" && s.kind == SpanKind::Server)
        })
        .await;
    let server = spans
        .iter()
        .find(|s| s.trace_id == trace_id && s.kind == SpanKind::Server && s.service_name == "gateway")
        .expect("span");
    assert_eq!(server.parent_span_id, browser_span, "the gateway continued the browser's span");
    browser.close().await;
    pipeline.stop().await;
}

/// A page served from another origin that calls the API with a traceparent.
const OTHER_ORIGIN_PAGE: &str = r#"<!doctype html><html><body><pre id="out">waiting</pre><script>
const gateway = new URLSearchParams(location.search).get("gateway");
fetch(gateway + "/api/checkout", {
  method: "POST",
  headers: { "content-type": "application/json",
             "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
             "baggage": "customer.id=c-cors" },
  body: JSON.stringify({ customer_id: "c-cors", items: [{ sku: "SKU-003", quantity: 1 }] }),
}).then(async r => {
  document.getElementById("out").textContent =
    JSON.stringify({ status: r.status, serverTiming: r.headers.get("server-timing"), traceresponse: r.headers.get("traceresponse"), body: await r.json() });
}).catch(e => { document.getElementById("out").textContent = "failed: " + e; });
</script></body></html>"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_origin_may_send_trace_headers_and_read_the_trace_back() {
    let pipeline = Pipeline::start(Options::default()).await;
    let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let other_url = format!("http://{}", other.local_addr().expect("addr"));
    tokio::spawn(async move {
        let app = axum::Router::new().route("/", axum::routing::get(|| async { Html(OTHER_ORIGIN_PAGE) }));
        let _ = axum::serve(other, app).await;
    });
    let browser = Browser::start().await;
    browser.open(&format!("{other_url}/?gateway={}", pipeline.gateway_url)).await;
    let mut out = String::new();
    for _ in 0..100 {
        out = browser.text("#out").await;
        if out != "waiting" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let result: Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("the cross-origin call failed: {out}"));
    assert_eq!(result["status"], 202, "{result}");
    assert_eq!(result["body"]["trace_id"], "0af7651916cd43dd8448eb211c80319c");
    let timing = result["serverTiming"].as_str().expect("server-timing is exposed to the page");
    assert!(timing.starts_with("trace;desc=00-0af7651916cd43dd8448eb211c80319c-"), "{timing}");
    assert!(result["traceresponse"].as_str().is_some(), "traceresponse is exposed: {result}");
    browser.close().await;
    pipeline.stop().await;
}
