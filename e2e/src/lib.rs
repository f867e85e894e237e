//! The whole pipeline in one test process: gateway, checkout and stock on loopback ports, each
//! with its own service name and the real OTLP exporter, a RabbitMQ vhost of its own and a
//! SQLite file of its own, so tests run in parallel.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use serde_json::Value;
use stock::store::{Store, StoreLocation};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracehop_broker::connection::BrokerNodes;
use tracehop_telemetry::http::InboundContext;
use tracehop_telemetry::messaging::ConsumerContext;
use tracehop_telemetry::propagators::PropagatorKind;
use tracehop_telemetry::setup::{BatchLimits, Export, SamplerChoice};
use tracehop_telemetry::{Telemetry, TelemetryConfig};
use tracehop_testkit::otlp::{OtlpReceiver, ReceivedSpan};
use tracehop_testkit::process::ServiceProcess;
use tracehop_testkit::rabbit::TestVhost;

/// How stock runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StockMode {
    /// In the test process, like the other two.
    InProcess,
    /// As a child process of the `stock` binary, so it can be SIGKILLed and restarted.
    Process,
}

/// What a test may vary.
#[derive(Debug, Clone)]
pub struct Options {
    /// The broker (`None`: a vhost of the test's own on the machine's broker).
    pub amqp_url: Option<String>,
    /// Where spans go (`None`: the in-test receiver). A refused or silent endpoint shows what
    /// a dead trace backend does to requests.
    pub otlp_endpoint: Option<String>,
    /// Stock's store (`None`: a SQLite file in a temporary directory).
    pub store: Option<StoreLocation>,
    /// How stock runs.
    pub stock_mode: StockMode,
    /// `STOCK_SEED_UNITS`.
    pub seed_units: u32,
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
    /// Every service's `BAGGAGE_SPAN_ATTRIBUTES`.
    pub baggage_span_attributes: Vec<String>,
    /// Metrics exported beside the spans (`false`: `OTEL_METRICS_EXPORTER=none`).
    pub metrics: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            amqp_url: None,
            otlp_endpoint: None,
            store: None,
            stock_mode: StockMode::InProcess,
            seed_units: 1000,
            inbound_context: InboundContext::Continue,
            consumer_context: ConsumerContext::Parent,
            propagators: tracehop_telemetry::propagators::DEFAULT_PROPAGATORS.to_vec(),
            sampler: SamplerChoice::ParentBasedAlwaysOn,
            cors_origins: vec!["*".to_owned()],
            baggage_span_attributes: vec!["customer.id".to_owned()],
            metrics: true,
        }
    }
}

/// A running pipeline; [`Pipeline::stop`] shuts it down in order.
pub struct Pipeline {
    /// `http://127.0.0.1:<port>` of the gateway.
    pub gateway_url: String,
    /// `http://127.0.0.1:<port>` of stock's admin API.
    pub stock_url: String,
    /// checkout's gRPC address.
    pub checkout_addr: std::net::SocketAddr,
    /// The spans every service exported.
    pub receiver: OtlpReceiver,
    /// The vhost the services use, when the test did not bring its own broker.
    pub vhost: Option<TestVhost>,
    /// The AMQP URI the services use.
    pub amqp_url: String,
    /// Stock's store.
    pub store: StoreLocation,
    /// Stock, when it runs as a child process.
    pub stock_process: Option<ServiceProcess>,
    stock_env: Vec<(&'static str, String)>,
    /// Stock processes killed so far, kept for their logs.
    retired_stock: Vec<ServiceProcess>,
    /// Extra stock replicas: (`service.instance.id`, process).
    replicas: Vec<(String, ServiceProcess)>,
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

fn telemetry(name: &str, endpoint: &str, options: &Options) -> Telemetry {
    let config = TelemetryConfig {
        propagators: options.propagators.clone(),
        sampler: options.sampler,
        batch: BatchLimits { delay: Duration::from_millis(100), ..BatchLimits::default() },
        ..TelemetryConfig::otlp_grpc(name, endpoint)
    };
    let config = if options.metrics { config } else { TelemetryConfig { metrics: Export::None, ..config } };
    Telemetry::new(&config).expect("telemetry")
}

impl Pipeline {
    /// Starts stock, checkout and the gateway (in that order, though any order works).
    pub async fn start(options: Options) -> Self {
        // Service logs, shown by the test runner when a test fails (RUST_LOG filters them).
        let filter = tracehop_telemetry::logging::LogFilter::from_lookup(&tracehop_telemetry::Env::process());
        let _ = tracehop_telemetry::logging::init_logging(
            tracehop_telemetry::logging::LogFormat::Text,
            filter.expect("the tests' RUST_LOG"),
        );
        let vhost = options.amqp_url.is_none().then(TestVhost::create);
        let amqp_url =
            options.amqp_url.clone().unwrap_or_else(|| vhost.as_ref().map(|v| v.url().to_owned()).unwrap_or_default());
        let receiver = OtlpReceiver::start().await;
        let endpoint = options.otlp_endpoint.clone().unwrap_or_else(|| receiver.endpoint().to_owned());
        let data = tempfile::tempdir().expect("temp dir");
        let store = options.store.clone().unwrap_or_else(|| StoreLocation::Sqlite(data.path().join("stock.db")));
        let (stop, stopped) = watch::channel(false);
        let until_stopped = move || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            }
        };
        let nodes = BrokerNodes::parse(&amqp_url).expect("AMQP URL");
        let mut tasks = Vec::new();
        let mut telemetries = Vec::new();

        let stock_listener = listener().await;
        let stock_addr = stock_listener.local_addr().expect("addr");
        let stock_url = format!("http://{stock_addr}");
        let mut stock_env = Vec::new();
        let mut stock_process = None;
        match options.stock_mode {
            StockMode::InProcess => {
                let stock_config = stock::Config {
                    addr: stock_addr,
                    amqp: nodes.clone(),
                    store: store.clone(),
                    seed_units: options.seed_units,
                    prefetch: 16,
                    consumer_context: options.consumer_context,
                    baggage_span_attributes: options.baggage_span_attributes.clone(),
                    broker_give_up: Duration::from_secs(60),
                    drain_timeout: Duration::from_secs(5),
                    header_timeout: Duration::from_secs(10),
                };
                let stock_telemetry = telemetry("stock", &endpoint, &options);
                telemetries.push(stock_telemetry.clone());
                let stock = stock::run(stock_listener, stock_config, stock_telemetry, until_stopped());
                tasks.push(("stock", tokio::spawn(async move { stock.await.map_err(|e| format!("{e:?}")) })));
            }
            StockMode::Process => {
                drop(stock_listener);
                let store_value = match &store {
                    StoreLocation::Sqlite(path) => path.display().to_string(),
                    StoreLocation::Postgres(url) => url.clone(),
                };
                stock_env = vec![
                    ("STOCK_ADDR", stock_addr.to_string()),
                    ("AMQP_ADDR", amqp_url.clone()),
                    ("STOCK_DB", store_value),
                    ("STOCK_SEED_UNITS", options.seed_units.to_string()),
                    ("STOCK_PREFETCH", "16".to_owned()),
                    ("CONSUMER_CONTEXT", "parent".to_owned()),
                    ("OTEL_SERVICE_NAME", "stock".to_owned()),
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()),
                    ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
                    ("OTEL_RESOURCE_ATTRIBUTES", "service.instance.id=stock-0".to_owned()),
                    ("OTEL_METRICS_EXPORTER", if options.metrics { "otlp" } else { "none" }.to_owned()),
                    // Per-order lines are debug: the tests count them per replica.
                    ("RUST_LOG", "info,stock::consumer=debug".to_owned()),
                ];
                stock_process = Some(ServiceProcess::start("stock", &stock_env));
            }
        }

        let checkout_listener = listener().await;
        let checkout_addr = checkout_listener.local_addr().expect("addr");
        let checkout_config = checkout::Config {
            addr: checkout_addr,
            amqp: nodes,
            publish_timeout: Duration::from_millis(1500),
            broker_give_up: Duration::from_secs(60),
            baggage_span_attributes: options.baggage_span_attributes.clone(),
            drain_timeout: Duration::from_secs(5),
        };
        let checkout_telemetry = telemetry("checkout", &endpoint, &options);
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
            baggage_span_attributes: options.baggage_span_attributes.clone(),
            drain_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(10),
        };
        let gateway_telemetry = telemetry("gateway", &endpoint, &options);
        telemetries.push(gateway_telemetry.clone());
        let gateway = gateway::run(gateway_listener, gateway_config, gateway_telemetry, until_stopped());
        tasks.push(("gateway", tokio::spawn(async move { gateway.await.map_err(|e| format!("{e:?}")) })));

        let pipeline = Self {
            gateway_url,
            stock_url,
            checkout_addr,
            receiver,
            vhost,
            amqp_url,
            store,
            stock_process,
            stock_env,
            retired_stock: Vec::new(),
            replicas: Vec::new(),
            http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client"),
            stop,
            tasks,
            telemetry: telemetries,
            _data: data,
        };
        pipeline.wait_until_ready().await;
        pipeline
    }

    /// SIGKILLs the stock process.
    pub fn kill_stock(&mut self) {
        if let Some(mut process) = self.stock_process.take() {
            process.kill();
            self.retired_stock.push(process);
        }
    }

    /// Starts another stock process on the same broker and store (a competing consumer) with
    /// `service.instance.id` = `instance`; waits until it consumes. Returns its admin URL.
    pub async fn add_stock_replica(&mut self, instance: &str) -> String {
        let [port] = tracehop_testkit::free_ports();
        let mut env: Vec<(&'static str, String)> = self
            .stock_env
            .iter()
            .filter(|(key, _)| *key != "STOCK_ADDR" && *key != "OTEL_RESOURCE_ATTRIBUTES")
            .cloned()
            .collect();
        env.push(("STOCK_ADDR", format!("127.0.0.1:{port}")));
        env.push(("OTEL_RESOURCE_ATTRIBUTES", format!("service.instance.id={instance}")));
        let url = format!("http://127.0.0.1:{port}");
        self.replicas.push((instance.to_owned(), ServiceProcess::start("stock", &env)));
        for _ in 0..200 {
            if let Some((200, _)) = self.get_json(&format!("{url}/healthz")).await {
                return url;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("stock replica {instance} did not become ready");
    }

    /// SIGKILLs the replica `instance`.
    pub fn kill_replica(&mut self, instance: &str) {
        if let Some((_, process)) = self.replicas.iter_mut().find(|(name, _)| name == instance) {
            process.kill();
        }
    }

    /// How many log lines of each stock process contain `needle`: (`service.instance.id`, n).
    pub fn stock_log_counts(&self, needle: &str) -> Vec<(String, usize)> {
        let first = self.retired_stock.iter().chain(&self.stock_process).map(|p| p.count(needle)).sum();
        let mut counts = vec![("stock-0".to_owned(), first)];
        counts.extend(self.replicas.iter().map(|(name, process)| (name.clone(), process.count(needle))));
        counts
    }

    /// How many log lines of every stock process so far (killed ones included) contain `needle`.
    pub fn stock_log_count(&self, needle: &str) -> usize {
        self.stock_log_counts(needle).iter().map(|(_, n)| n).sum()
    }

    /// A client that places orders, to run beside faults.
    pub fn load_client(&self) -> LoadClient {
        LoadClient { gateway_url: self.gateway_url.clone(), http: self.http.clone() }
    }

    /// Waits until stock recorded every `accepted` order, then checks each was reserved exactly
    /// once (every order is one unit of SKU-001): units reserved == orders recorded as reserved.
    /// Returns (reserved orders, reserved units).
    pub async fn assert_reserved_exactly_once(&self, accepted: &[String], timeout: Duration) -> (i64, i64) {
        let store = self.open_store().await;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut missing: Vec<&String> = accepted.iter().collect();
        while !missing.is_empty() {
            let mut still = Vec::new();
            for order_id in missing {
                if store.order(order_id).await.expect("query").is_none() {
                    still.push(order_id);
                }
            }
            missing = still;
            if missing.is_empty() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} accepted orders were never reserved, e.g. {:?}",
                missing.len(),
                &missing[..missing.len().min(5)]
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let (reserved_orders, _) = store.order_counts().await.expect("counts");
        let level = store.level("SKU-001").await.expect("level").expect("SKU-001");
        assert_eq!(level.reserved, reserved_orders, "units reserved must equal orders reserved: nothing twice");
        assert!(reserved_orders >= accepted.len() as i64);
        store.close().await;
        (reserved_orders, level.reserved)
    }

    /// Starts the stock process again (after [`kill_stock`](Self::kill_stock)) and waits until
    /// it is healthy.
    pub async fn restart_stock(&mut self) {
        self.stock_process = Some(ServiceProcess::start("stock", &self.stock_env));
        self.wait_until_ready().await;
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

    /// Exports every span the in-process services ended so far (after a moment, for spans
    /// ending right now, such as the consumer's after its ack).
    pub async fn flush(&self) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        futures_util::future::join_all(self.telemetry.iter().map(Telemetry::flush)).await;
    }

    /// Opens stock's store directly, for checks the API does not offer.
    pub async fn open_store(&self) -> Store {
        Store::open(&self.store, &[], 0).await.expect("open the stock store")
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
        // Concurrently, as three processes would: each flush is bounded by its own timeout.
        let flushes = self.telemetry.iter().map(|telemetry| telemetry.shutdown());
        futures_util::future::join_all(flushes).await;
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

/// What a load run saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Order ids of the 202 answers.
    pub accepted: Vec<String>,
    /// Trace ids of the 202 answers, in the order of `accepted`.
    pub traces: Vec<String>,
    /// Answers by status (`"202"`, `"503"`, `"error"` for no answer).
    pub statuses: std::collections::BTreeMap<String, usize>,
    /// The slowest answer.
    pub slowest: Duration,
}

/// Places orders through the gateway.
#[derive(Debug, Clone)]
pub struct LoadClient {
    gateway_url: String,
    http: reqwest::Client,
}

impl LoadClient {
    /// Places `orders` orders of one unit of SKU-001, `concurrency` at a time; `done` counts
    /// answers as they come, so a test can inject faults at chosen points.
    pub async fn run(
        &self,
        orders: usize,
        concurrency: usize,
        done: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) -> LoadReport {
        use std::sync::atomic::Ordering;
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let (client, next, done) = (self.clone(), next.clone(), done.clone());
            workers.spawn(async move {
                let mut report = LoadReport::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= orders {
                        return report;
                    }
                    let body = serde_json::json!({"customer_id": format!("load-{i}"), "items": [{"sku": "SKU-001", "quantity": 1}]});
                    let started = tokio::time::Instant::now();
                    let answer = client
                        .http
                        .post(format!("{}/api/checkout", client.gateway_url))
                        .header("content-type", "application/json")
                        .body(body.to_string())
                        .send()
                        .await;
                    report.slowest = report.slowest.max(started.elapsed());
                    let key = match answer {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            if status == 202 {
                                let body: Value = response.json().await.unwrap_or(Value::Null);
                                if let Some(id) = body["order_id"].as_str() {
                                    report.accepted.push(id.to_owned());
                                    report.traces.push(body["trace_id"].as_str().unwrap_or_default().to_owned());
                                }
                            }
                            status.to_string()
                        }
                        Err(_) => "error".to_owned(),
                    };
                    *report.statuses.entry(key).or_default() += 1;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let mut total = LoadReport::default();
        while let Some(report) = workers.join_next().await {
            let report = report.expect("load worker");
            total.accepted.extend(report.accepted);
            total.traces.extend(report.traces);
            for (status, n) in report.statuses {
                *total.statuses.entry(status).or_default() += n;
            }
            total.slowest = total.slowest.max(report.slowest);
        }
        total
    }
}

/// The three services as child processes of their binaries, configured only through the
/// environment, as in production: for SIGTERM, exit codes and resident memory.
pub struct Processes {
    /// gateway, checkout, stock.
    pub services: Vec<ServiceProcess>,
    /// `http://127.0.0.1:<port>` of the gateway.
    pub gateway_url: String,
    /// `http://127.0.0.1:<port>` of stock's admin API.
    pub stock_url: String,
    /// Stock's environment, to start it again.
    pub stock_env: Vec<(&'static str, String)>,
}

impl Processes {
    /// Starts stock, checkout and the gateway against `amqp_url`, exporting spans to
    /// `otlp_endpoint`, stock on a SQLite file at `db`.
    pub async fn start(amqp_url: &str, otlp_endpoint: &str, db: &std::path::Path) -> Self {
        let [gateway, checkout, stock] = tracehop_testkit::free_ports();
        let common = |name: &str| {
            vec![
                ("OTEL_SERVICE_NAME", name.to_owned()),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_endpoint.to_owned()),
                ("OTEL_BSP_SCHEDULE_DELAY", "200".to_owned()),
                ("RUST_LOG", "info,opentelemetry_sdk=warn".to_owned()),
            ]
        };
        let mut stock_env = common("stock");
        stock_env.extend([
            ("STOCK_ADDR", format!("127.0.0.1:{stock}")),
            ("AMQP_ADDR", amqp_url.to_owned()),
            ("STOCK_DB", db.display().to_string()),
            ("STOCK_SEED_UNITS", "100000".to_owned()),
        ]);
        let mut checkout_env = common("checkout");
        checkout_env.extend([("CHECKOUT_ADDR", format!("127.0.0.1:{checkout}")), ("AMQP_ADDR", amqp_url.to_owned())]);
        let mut gateway_env = common("gateway");
        gateway_env.extend([
            ("GATEWAY_ADDR", format!("127.0.0.1:{gateway}")),
            ("CHECKOUT_URL", format!("http://127.0.0.1:{checkout}")),
        ]);
        let services = vec![
            ServiceProcess::start("gateway", &gateway_env),
            ServiceProcess::start("checkout", &checkout_env),
            ServiceProcess::start("stock", &stock_env),
        ];
        let processes = Self {
            services,
            gateway_url: format!("http://127.0.0.1:{gateway}"),
            stock_url: format!("http://127.0.0.1:{stock}"),
            stock_env,
        };
        let http = reqwest::Client::new();
        for _ in 0..300 {
            let ready = |url: String| {
                let http = http.clone();
                async move { http.get(url).send().await.map(|r| r.status().is_success()).unwrap_or(false) }
            };
            let checkout_up = checkout::healthcheck(format!("127.0.0.1:{checkout}").parse().expect("addr")).await;
            if checkout_up
                && ready(format!("{}/healthz", processes.stock_url)).await
                && ready(format!("{}/healthz", processes.gateway_url)).await
            {
                return processes;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for service in &processes.services {
            eprintln!("{} output: {:#?}", service.name(), service.lines());
        }
        panic!("the service processes did not become ready");
    }

    /// A client that places orders through the gateway.
    pub fn load_client(&self) -> LoadClient {
        LoadClient {
            gateway_url: self.gateway_url.clone(),
            http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client"),
        }
    }
}
