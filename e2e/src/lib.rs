//! The whole pipeline in one test process: gateway, checkout and stock on loopback ports, each
//! with its own service name and the real OTLP exporter, a RabbitMQ vhost of its own and a
//! SQLite file of its own, so tests run in parallel.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracehop_broker::connection::BrokerNodes;
use tracehop_telemetry::http::InboundContext;
use tracehop_telemetry::messaging::ConsumerContext;
use tracehop_telemetry::propagators::PropagatorKind;
use tracehop_telemetry::setup::SamplerChoice;
use tracehop_telemetry::{Telemetry, TelemetryConfig};
use tracehop_testkit::otlp::{OtlpReceiver, ReceivedSpan};
use tracehop_testkit::rabbit::TestVhost;

/// What a test may vary.
#[derive(Debug, Clone)]
pub struct Options {
    /// The gateway's inbound policy.
    pub inbound_context: InboundContext,
    /// Stock's consumer relation.
    pub consumer_context: ConsumerContext,
    /// Every service's propagators.
    pub propagators: Vec<PropagatorKind>,
    /// Every service's sampler.
    pub sampler: SamplerChoice,
    /// Gateway CORS origins.
    pub cors_origins: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            inbound_context: InboundContext::Continue,
            consumer_context: ConsumerContext::Parent,
            propagators: tracehop_telemetry::propagators::DEFAULT_PROPAGATORS.to_vec(),
            sampler: SamplerChoice::ParentBasedAlwaysOn,
            cors_origins: vec!["*".to_owned()],
        }
    }
}

/// A running pipeline; [`Pipeline::stop`] shuts it down in order.
pub struct Pipeline {
    /// `http://127.0.0.1:<port>` of the gateway.
    pub gateway_url: String,
    /// `http://127.0.0.1:<port>` of stock's admin API.
    pub stock_url: String,
    /// The spans every service exported.
    pub receiver: OtlpReceiver,
    /// The vhost the services use.
    pub vhost: TestVhost,
    /// A client for the HTTP APIs.
    pub http: reqwest::Client,
    stop: watch::Sender<bool>,
    tasks: Vec<(&'static str, JoinHandle<Result<(), String>>)>,
    telemetry: Vec<Telemetry>,
    _data: tempfile::TempDir,
}

async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port")
}

fn telemetry(name: &str, receiver: &OtlpReceiver, options: &Options) -> Telemetry {
    let config = TelemetryConfig {
        propagators: options.propagators.clone(),
        sampler: options.sampler,
        batch_delay: Some(Duration::from_millis(100)),
        ..TelemetryConfig::otlp_grpc(name, receiver.endpoint())
    };
    Telemetry::new(&config).expect("telemetry")
}

impl Pipeline {
    /// Starts stock, checkout and the gateway (in that order, though any order works).
    pub async fn start(options: Options) -> Self {
        let vhost = TestVhost::create();
        let receiver = OtlpReceiver::start().await;
        let data = tempfile::tempdir().expect("temp dir");
        let (stop, stopped) = watch::channel(false);
        let until_stopped = move || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            }
        };
        let nodes = BrokerNodes::parse(vhost.url()).expect("vhost url");
        let mut tasks = Vec::new();
        let mut telemetries = Vec::new();

        let stock_listener = listener().await;
        let stock_url = format!("http://{}", stock_listener.local_addr().expect("addr"));
        let stock_config = stock::Config {
            addr: stock_listener.local_addr().expect("addr"),
            amqp: nodes.clone(),
            store: stock::store::StoreLocation::Sqlite(data.path().join("stock.db")),
            seed_units: 1000,
            prefetch: 16,
            consumer_context: options.consumer_context,
            baggage_span_attributes: vec!["customer.id".to_owned()],
            broker_give_up: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(5),
        };
        let stock_telemetry = telemetry("stock", &receiver, &options);
        telemetries.push(stock_telemetry.clone());
        let stock = stock::run(stock_listener, stock_config, stock_telemetry, until_stopped());
        tasks.push(("stock", tokio::spawn(async move { stock.await.map_err(|e| format!("{e:?}")) })));

        let checkout_listener = listener().await;
        let checkout_addr = checkout_listener.local_addr().expect("addr");
        let checkout_config = checkout::Config {
            addr: checkout_addr,
            amqp: nodes,
            publish_timeout: Duration::from_millis(1500),
            broker_give_up: Duration::from_secs(60),
        };
        let checkout_telemetry = telemetry("checkout", &receiver, &options);
        telemetries.push(checkout_telemetry.clone());
        let checkout = checkout::run(checkout_listener, checkout_config, checkout_telemetry, until_stopped());
        tasks.push(("checkout", tokio::spawn(async move { checkout.await.map_err(|e| format!("{e:?}")) })));

        let gateway_listener = listener().await;
        let gateway_url = format!("http://{}", gateway_listener.local_addr().expect("addr"));
        let gateway_config = gateway::Config {
            addr: gateway_listener.local_addr().expect("addr"),
            checkout_url: format!("http://{checkout_addr}").parse().expect("uri"),
            body_limit: 64 * 1024,
            checkout_timeout: Duration::from_secs(2),
            jaeger_ui_url: "http://localhost:16686".to_owned(),
            inbound_context: options.inbound_context,
            cors_origins: options.cors_origins.clone(),
            baggage_span_attributes: vec!["customer.id".to_owned()],
        };
        let gateway_telemetry = telemetry("gateway", &receiver, &options);
        telemetries.push(gateway_telemetry.clone());
        let gateway = gateway::run(gateway_listener, gateway_config, gateway_telemetry, until_stopped());
        tasks.push(("gateway", tokio::spawn(async move { gateway.await.map_err(|e| format!("{e:?}")) })));

        let pipeline = Self {
            gateway_url,
            stock_url,
            receiver,
            vhost,
            http: reqwest::Client::new(),
            stop,
            tasks,
            telemetry: telemetries,
            _data: data,
        };
        pipeline.wait_until_ready().await;
        pipeline
    }

    async fn wait_until_ready(&self) {
        for _ in 0..200 {
            let stock_up = self.get_json(&format!("{}/healthz", self.stock_url)).await.map(|(status, _)| status == 200);
            let gateway_up =
                self.get_json(&format!("{}/healthz", self.gateway_url)).await.map(|(status, _)| status == 200);
            if stock_up == Some(true) && gateway_up == Some(true) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the pipeline did not become ready");
    }

    /// GETs `url`; `None` when nothing answers.
    pub async fn get_json(&self, url: &str) -> Option<(u16, Value)> {
        let response = self.http.get(url).send().await.ok()?;
        let status = response.status().as_u16();
        let body = response.bytes().await.ok()?;
        Some((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
    }

    /// POSTs `body` to `/api/checkout` with extra `headers`.
    pub async fn checkout(&self, body: &Value, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut request = self
            .http
            .post(format!("{}/api/checkout", self.gateway_url))
            .header("content-type", "application/json")
            .body(body.to_string());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.expect("the gateway answers")
    }

    /// Stock level of `sku` as `(available, reserved)`.
    pub async fn stock(&self, sku: &str) -> (i64, i64) {
        let (status, body) =
            self.get_json(&format!("{}/api/stock/{sku}", self.stock_url)).await.expect("stock answers");
        assert_eq!(status, 200, "{body}");
        (body["available"].as_i64().expect("available"), body["reserved"].as_i64().expect("reserved"))
    }

    /// Waits until stock has recorded `order_id`; returns its status.
    pub async fn wait_for_order(&self, order_id: &str) -> String {
        for _ in 0..200 {
            if let Some((200, body)) = self.get_json(&format!("{}/api/orders/{order_id}", self.stock_url)).await {
                return body["status"].as_str().unwrap_or_default().to_owned();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("order {order_id} was never recorded by stock");
    }

    /// Stops every service (drain, then flush telemetry) and fails if any stopped with an error.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for (name, task) in self.tasks {
            let outcome = tokio::time::timeout(Duration::from_secs(15), task).await;
            match outcome {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(error))) => panic!("{name} stopped with an error: {error}"),
                Ok(Err(join)) => panic!("{name} panicked: {join}"),
                Err(_) => panic!("{name} did not stop within 15 s"),
            }
        }
        for telemetry in self.telemetry {
            telemetry.shutdown().await;
        }
    }
}

/// The service-to-service edges Jaeger draws: one per span whose parent is a span of another
/// service (self-loops ignored, as Jaeger's in-memory store wrongly shows them).
pub fn dependency_edges(spans: &[ReceivedSpan]) -> BTreeSet<(String, String)> {
    let by_id: HashMap<&str, &ReceivedSpan> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    spans
        .iter()
        .filter_map(|child| {
            let parent = by_id.get(child.parent_span_id.as_str())?;
            (parent.service_name != child.service_name)
                .then(|| (parent.service_name.clone(), child.service_name.clone()))
        })
        .collect()
}
