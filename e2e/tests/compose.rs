//! docker-compose.yml cannot drift from the code: it validates against the Compose
//! specification, and each service's `environment:` is exactly what that service reads, with
//! values its `Config` accepts.

use std::collections::{BTreeSet, HashMap};

use serde_json::Value as Json;
use serde_norway::Value as Yaml;
use tracehop_telemetry::logging::LogFormat;
use tracehop_telemetry::{Env, TelemetryConfig};

fn workspace_file(name: &str) -> String {
    let path = format!("{}/../{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// The compose file with anchors and `<<` merges applied, as Compose itself reads it.
fn compose() -> Yaml {
    let mut yaml: Yaml = serde_norway::from_str(&workspace_file("docker-compose.yml")).expect("valid YAML");
    yaml.apply_merge().expect("merge keys");
    yaml
}

/// `${NAME:-default}` becomes `default`, as Compose does when NAME is unset.
fn interpolate(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').map(|e| start + e).expect("closed ${...}");
        let expression = &rest[start + 2..end];
        let (_, default) = expression.split_once(":-").unwrap_or_else(|| panic!("${{{expression}}} has no default"));
        out.push_str(default);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn environment(compose: &Yaml, service: &str) -> HashMap<String, String> {
    let environment = &compose["services"][service]["environment"];
    let mapping = environment.as_mapping().unwrap_or_else(|| panic!("{service}: environment must be a mapping"));
    mapping
        .iter()
        .map(|(key, value)| {
            let key = key.as_str().expect("string key").to_owned();
            let value = match value {
                Yaml::String(s) => s.clone(),
                Yaml::Number(n) => n.to_string(),
                Yaml::Bool(b) => b.to_string(),
                other => panic!("{service}.{key}: unexpected value {other:?}"),
            };
            (key, interpolate(&value))
        })
        .collect()
}

fn known(service_variables: &[&str]) -> BTreeSet<String> {
    service_variables
        .iter()
        .chain(TelemetryConfig::VARIABLES)
        .chain(&["LOG_FORMAT", "RUST_LOG"])
        .map(|v| v.to_string())
        .collect()
}

/// Every variable in the file is one the service reads, and every variable the service reads
/// is in the file.
fn check_names(service: &str, env: &HashMap<String, String>, service_variables: &[&str]) {
    let names: BTreeSet<String> = env.keys().cloned().collect();
    let known = known(service_variables);
    let unknown: Vec<&String> = names.difference(&known).collect();
    assert!(unknown.is_empty(), "{service}: compose sets variables the service does not read: {unknown:?}");
    let missing: Vec<&&str> = service_variables.iter().filter(|v| !names.contains(**v)).collect();
    assert!(missing.is_empty(), "{service}: compose leaves {missing:?} implicit");
    for required in ["OTEL_SERVICE_NAME", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_PROPAGATORS", "OTEL_TRACES_SAMPLER"] {
        assert!(names.contains(required), "{service}: {required} is not set");
    }
}

fn check_telemetry(service: &str, env: &HashMap<String, String>) {
    let lookup = Env::from_map(env);
    let telemetry = TelemetryConfig::from_lookup(service, &lookup).unwrap_or_else(|e| panic!("{service}: {e}"));
    assert_eq!(telemetry.service_name, service);
    LogFormat::from_lookup(&lookup).unwrap_or_else(|e| panic!("{service}: {e}"));
}

#[test]
fn the_compose_file_validates_against_the_compose_specification() {
    let schema: Json = serde_json::from_str(&workspace_file("e2e/compose-spec.json")).expect("schema");
    let instance: Json = serde_json::to_value(compose()).expect("YAML as JSON");
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    let errors: Vec<String> =
        validator.iter_errors(&instance).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    assert!(errors.is_empty(), "{errors:#?}");
}

/// Checks the three services of one stack (`suffix`: "" for the demo, "-scale" for the scale
/// profile).
fn check_stack(compose: &Yaml, suffix: &str) -> (gateway::Config, checkout::Config, stock::Config) {
    let name = |service: &str| format!("{service}{suffix}");
    let env = environment(compose, &name("gateway"));
    check_names("gateway", &env, gateway::Config::VARIABLES);
    check_telemetry("gateway", &env);
    let gateway = gateway::Config::from_lookup(&Env::from_map(&env)).expect("gateway config");

    let env = environment(compose, &name("checkout"));
    check_names("checkout", &env, checkout::Config::VARIABLES);
    check_telemetry("checkout", &env);
    let checkout = checkout::Config::from_lookup(&Env::from_map(&env)).expect("checkout config");

    let env = environment(compose, &name("stock"));
    check_names("stock", &env, stock::Config::VARIABLES);
    check_telemetry("stock", &env);
    let stock = stock::Config::from_lookup(&Env::from_map(&env)).expect("stock config");
    (gateway, checkout, stock)
}

#[test]
fn each_service_accepts_its_compose_environment() {
    let compose = compose();
    let (gateway, checkout, stock) = check_stack(&compose, "");
    assert_eq!(gateway.addr.port(), 8080);
    assert_eq!(gateway.checkout_url.to_string(), "http://checkout:50051/");
    assert_eq!(checkout.addr.port(), 50051);
    assert_eq!(stock.addr.port(), 8082);
    assert_eq!(stock.store, stock::store::StoreLocation::Sqlite("/data/stock.db".into()));
}

#[test]
fn the_scale_profile_runs_the_same_services_on_a_cluster_and_postgresql() {
    let compose = compose();
    let (gateway, checkout, stock) = check_stack(&compose, "-scale");
    assert_eq!(gateway.checkout_url.to_string(), "http://checkout-scale:50051/");
    assert_eq!(checkout.amqp.len(), 3, "checkout knows every cluster node");
    assert_eq!(stock.amqp.len(), 3, "stock knows every cluster node");
    assert!(matches!(stock.store, stock::store::StoreLocation::Postgres(_)), "replicas share PostgreSQL");
    let services = &compose["services"];
    assert_eq!(services["stock-scale"]["deploy"]["replicas"].as_u64(), Some(3));
    for node in ["rabbitmq-1", "rabbitmq-2", "rabbitmq-3"] {
        let env = &services[node]["environment"];
        let cookie = env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"].as_str().expect("cookie");
        assert!(cookie.contains("${RABBITMQ_ERLANG_COOKIE"), "{node}: the cookie comes from the environment");
        assert_eq!(services[node]["hostname"].as_str(), Some(node));
    }
    for service in ["gateway-scale", "checkout-scale", "stock-scale"] {
        let endpoint = services[service]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"].as_str();
        assert_eq!(endpoint, Some("http://otel-collector:4317"), "{service} exports through the collector");
    }
    let collector = workspace_file("deploy/otel-collector/config.yaml");
    for policy in ["type: status_code", "type: latency", "type: probabilistic", "endpoint: jaeger-store:4317"] {
        assert!(collector.contains(policy), "collector config lacks {policy}");
    }
    assert!(workspace_file("deploy/jaeger/config-badger.yaml").contains("badger:"), "Jaeger on a persistent store");
    let cluster = workspace_file("deploy/rabbitmq/cluster.conf");
    for node in ["rabbit@rabbitmq-1", "rabbit@rabbitmq-2", "rabbit@rabbitmq-3"] {
        assert!(cluster.contains(node), "peer discovery lists {node}");
    }
    assert!(cluster.contains("quorum_queue.initial_cluster_size = 3"), "the quorum queue has a member on every node");
}

#[test]
fn the_monitoring_profile_wires_metrics_from_every_service_to_prometheus_and_jaeger() {
    let compose = compose();
    let services = &compose["services"];
    let prometheus = &services["prometheus"];
    assert_eq!(prometheus["profiles"][0].as_str(), Some("monitoring"));
    let flags: Vec<&str> =
        prometheus["command"].as_sequence().expect("command").iter().filter_map(Yaml::as_str).collect();
    for flag in ["--web.enable-otlp-receiver", "--enable-feature=exemplar-storage"] {
        assert!(flags.contains(&flag), "prometheus runs with {flag}: {flags:?}");
    }
    // Every service exports metrics where its spans go; Jaeger and the collector serve them.
    for service in ["gateway", "checkout", "stock", "gateway-scale", "checkout-scale", "stock-scale"] {
        let env = environment(&compose, service);
        assert_eq!(env.get("OTEL_METRICS_EXPORTER").map(String::as_str), Some("otlp"), "{service}");
        assert!(env.contains_key("OTEL_METRIC_EXPORT_INTERVAL"), "{service} sets its export interval");
    }
    let jaeger = workspace_file("deploy/jaeger/config.yaml");
    let jaeger: Yaml = serde_norway::from_str(&jaeger).expect("jaeger config is YAML");
    let pipelines = &jaeger["service"]["pipelines"];
    let names = |list: &Yaml| -> Vec<String> {
        list.as_sequence().expect("list").iter().filter_map(Yaml::as_str).map(str::to_owned).collect::<Vec<_>>()
    };
    assert!(names(&pipelines["traces"]["exporters"]).contains(&"spanmetrics".to_owned()), "span metrics from traces");
    assert_eq!(names(&pipelines["metrics"]["receivers"]), ["otlp", "spanmetrics"]);
    assert_eq!(names(&pipelines["metrics"]["exporters"]), ["prometheus"]);
    assert_eq!(jaeger["exporters"]["prometheus"]["endpoint"].as_str(), Some("0.0.0.0:8889"));
    assert_eq!(jaeger["extensions"]["jaeger_query"]["storage"]["metrics"].as_str(), Some("prometheus_store"));
    let backend = &jaeger["extensions"]["jaeger_storage"]["metric_backends"]["prometheus_store"]["prometheus"];
    assert_eq!(backend["endpoint"].as_str(), Some("http://prometheus:9090"), "the Monitor tab reads Prometheus");
    assert_eq!(jaeger["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].as_str(), Some("0.0.0.0:4317"));
    let collector: Yaml =
        serde_norway::from_str(&workspace_file("deploy/otel-collector/config.yaml")).expect("collector config is YAML");
    assert_eq!(names(&collector["service"]["pipelines"]["metrics"]["exporters"]), ["prometheus"]);
    let scrape: Yaml =
        serde_norway::from_str(&workspace_file("deploy/prometheus/prometheus.yml")).expect("prometheus config is YAML");
    let targets: Vec<String> = scrape["scrape_configs"]
        .as_sequence()
        .expect("scrape configs")
        .iter()
        .flat_map(|job| job["static_configs"].as_sequence().cloned().unwrap_or_default())
        .flat_map(|c| names(&c["targets"]))
        .collect();
    assert_eq!(targets, ["jaeger:8889", "otel-collector:8889"]);
}

#[test]
fn the_demo_wiring_holds_together() {
    let compose = compose();
    let services = &compose["services"];
    // Published ports: the API, Jaeger's UI, RabbitMQ's UI; the scale stack its own three;
    // monitoring Prometheus.
    let published = |profile: Option<&str>| -> BTreeSet<String> {
        services
            .as_mapping()
            .expect("services")
            .values()
            .filter(|s| s["profiles"][0].as_str() == profile)
            .filter_map(|s| s["ports"].as_sequence())
            .flatten()
            .map(|p| p.as_str().expect("port string").to_owned())
            .collect()
    };
    assert_eq!(published(None), BTreeSet::from(["8080:8080".into(), "16686:16686".into(), "15672:15672".into()]));
    assert_eq!(
        published(Some("scale")),
        BTreeSet::from(["8081:8080".into(), "16687:16686".into(), "15673:15672".into()])
    );
    assert_eq!(published(Some("monitoring")), BTreeSet::from(["9090:9090".into()]));
    // Images not built here are pinned to releases.
    for (service, definition) in services.as_mapping().expect("services") {
        if definition["build"].is_mapping() {
            continue;
        }
        let image = definition["image"].as_str().expect("image");
        let tag = image.rsplit_once(':').map(|(_, tag)| tag.trim_start_matches('v')).unwrap_or("");
        assert!(tag.chars().next().is_some_and(|c| c.is_ascii_digit()), "{service:?} image {image} is not pinned");
    }
    assert!(services["rabbitmq"]["image"].as_str().expect("image").starts_with("rabbitmq:4."));
    assert!(services["jaeger"]["image"].as_str().expect("image").contains("jaegertracing/jaeger:2."));
    assert_ne!(services["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_USER"].as_str(), Some("guest"));
    for service in ["checkout", "stock", "gateway", "checkout-scale", "stock-scale", "gateway-scale"] {
        let definition = &services[service];
        let binary = service.trim_end_matches("-scale");
        assert_eq!(definition["build"]["args"]["SERVICE"].as_str(), Some(binary), "{service} builds itself");
        let test = definition["healthcheck"]["test"].as_sequence().expect("healthcheck");
        assert_eq!(test.last().and_then(Yaml::as_str), Some("healthcheck"), "{service} probes itself");
        assert_eq!(definition["restart"].as_str(), Some("unless-stopped"));
        for (dependency, condition) in definition["depends_on"].as_mapping().expect("depends_on") {
            let condition = condition["condition"].as_str().expect("condition");
            let dependency = dependency.as_str().expect("name");
            let expected =
                if ["jaeger", "otel-collector"].contains(&dependency) { "service_started" } else { "service_healthy" };
            assert_eq!(condition, expected, "{service} -> {dependency}");
        }
    }
    assert_eq!(services["stock"]["volumes"][0].as_str(), Some("stock-data:/data"));
}
