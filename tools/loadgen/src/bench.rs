//! The benchmark: telemetry off and on, alternately, in pairs (every other pair "on" first, so
//! an even number of pairs balances the order), beside the raw broker ceiling, then the latency
//! at half the maximum throughput (off, on, on, off at the same rate); CPU seconds per 1,000
//! orders and peak RSS of each service. Everything runs in one invocation, so the figures
//! compare.
//! `--compare spans` pairs telemetry off against spans alone (metrics off): tracing by itself.
//! `--compare metrics` instead pairs spans alone against spans and metrics: the cost of the
//! metrics by themselves. `--compare same` pairs telemetry off with itself: the measure's zero.
//!
//! Each run gets fresh service processes (the release binaries beside this one), a fresh
//! RabbitMQ vhost and a fresh SQLite store. "On" exports every span (and the metrics, every
//! second, far more often than the 60 s default, so their export cost shows) over OTLP/gRPC to
//! a receiver in this process that answers without parsing (see [`crate::sink`]).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;

use crate::Load;
use crate::report::{Report, utc_time_of_day, worst_second};

/// The benchmark's settings.
#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// Off/on pairs.
    #[arg(long, default_value_t = 3)]
    pairs: usize,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 15.0)]
    duration: f64,
    /// Warm-up seconds per run.
    #[arg(long, default_value_t = 3.0)]
    warmup: f64,
    /// Requests in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// The broker, without a vhost (each run creates its own with rabbitmqctl).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672")]
    amqp: String,
    /// Write all results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the latency plot of the half-load run here.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// What the pairs compare.
    #[arg(long, value_enum, default_value_t = Compare::Tracing)]
    compare: Compare,
    /// Run the half-load latency runs at this rate (orders/s) instead of half the pairs' median
    /// "on" rate; with `--pairs 0`, the latency runs alone.
    #[arg(long)]
    half_load_rate: Option<f64>,
    /// Write every span the receiver gets to this file, warm-ups included, for `loadgen
    /// breakdown` (about 2 KB an order; only with `--pairs 0`).
    #[arg(long)]
    dump_spans: Option<PathBuf>,
}

/// What the off/on pairs compare.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compare {
    /// `OTEL_SDK_DISABLED=true` against spans and metrics exported (with the raw ceiling and
    /// the half-load latency run).
    Tracing,
    /// `OTEL_SDK_DISABLED=true` against spans alone (`OTEL_METRICS_EXPORTER=none`): tracing
    /// by itself, as the target words it (with the raw ceiling and the half-load runs).
    Spans,
    /// Spans alone against spans and metrics: what the metrics cost.
    Metrics,
    /// Telemetry off on both sides: the measure's own zero and spread (an A/A comparison), to
    /// see how far apart two sides that do the same work come out.
    Same,
    /// Telemetry off on both sides, the "on" side's orders sent with a trace context (a
    /// `traceparent` of a sampled trace of their own, as from a traced client), which the
    /// services carry untouched through HTTP, gRPC, RabbitMQ's message headers and the
    /// consumer: what carrying the context costs without a span recorded, the broker's share
    /// included.
    Propagation,
}

impl Compare {
    /// The telemetry of a pair's "off" run and of its "on" run.
    pub(crate) fn sides(self) -> (Telemetry, Telemetry) {
        match self {
            Self::Tracing => (Telemetry::Off, Telemetry::SpansAndMetrics),
            Self::Spans => (Telemetry::Off, Telemetry::Spans),
            Self::Metrics => (Telemetry::Spans, Telemetry::SpansAndMetrics),
            Self::Same => (Telemetry::Off, Telemetry::Off),
            Self::Propagation => (Telemetry::Off, Telemetry::Carried),
        }
    }
}

/// The telemetry of one run's services.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub(crate) enum Telemetry {
    /// `OTEL_SDK_DISABLED=true`.
    Off,
    /// Spans exported, `OTEL_METRICS_EXPORTER=none`.
    Spans,
    /// Spans and metrics exported.
    SpansAndMetrics,
    /// `OTEL_SDK_DISABLED=true`, each order sent with a trace context for the services to carry.
    Carried,
}

impl Telemetry {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Off => "telemetry off",
            Self::Spans => "spans only",
            Self::SpansAndMetrics => "spans + metrics",
            Self::Carried => "context carried",
        }
    }

    /// Whether the load generator sends each order with a trace context of its own.
    pub(crate) fn client_context(self) -> bool {
        self == Self::Carried
    }
}

/// One service's resource use during a run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Usage {
    pub(crate) service: String,
    pub(crate) cpu_seconds: f64,
    pub(crate) peak_rss_kib: u64,
}

#[derive(Debug, Clone, Serialize)]
struct Run {
    telemetry: Telemetry,
    report: Report,
    usage: Vec<Usage>,
    bystanders: Bystanders,
    otlp_bytes: u64,
}

/// One raw-ceiling run.
#[derive(Debug, Clone, Serialize)]
struct RawRun {
    report: Report,
    bystanders: Bystanders,
}

/// One off/on pair, and which of its runs went first.
#[derive(Debug, Clone, Serialize)]
struct Pair {
    off: Run,
    on: Run,
    on_first: bool,
}

#[derive(Debug, Serialize)]
struct Results {
    pairs: Vec<Pair>,
    raw: Vec<RawRun>,
    /// At half the maximum: off, on, on, off, in the order they ran.
    half_load: Vec<Run>,
}

fn rabbitmqctl(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("rabbitmqctl").arg("-q").args(args).status()?;
    anyhow::ensure!(status.success(), "rabbitmqctl {args:?} failed");
    Ok(())
}

/// A vhost of the run's own, deleted on drop.
pub(crate) struct Vhost(pub(crate) String);

impl Vhost {
    pub(crate) fn create() -> anyhow::Result<Self> {
        let name = format!("tracehop-bench-{}", uuid::Uuid::new_v4().simple());
        rabbitmqctl(&["add_vhost", &name])?;
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"])?;
        Ok(Self(name))
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["delete_vhost", &self.0]);
    }
}

/// How long the services keep a client's idle connection (`GATEWAY_HEADER_TIMEOUT_MS`,
/// `STOCK_HEADER_TIMEOUT_MS`): an hour. The interleaved comparison keeps each stack's connections
/// while the other stack runs its warm-up or its slice, which the 10 s default could outlast.
const IDLE_MS: &str = "3600000";

/// The three services of one run.
pub(crate) struct Services {
    children: Vec<(String, Child)>,
    pub(crate) gateway: String,
    pub(crate) stock: String,
    _dir: PathBuf,
}

/// The batch span processor's limits, passed from the load generator's environment to the
/// services that export (to measure a tuning: `OTEL_BSP_MAX_EXPORT_BATCH_SIZE=2048 loadgen
/// bench ...`); the services' own defaults where unset.
const SPAN_PROCESSOR_LIMITS: [&str; 3] =
    ["OTEL_BSP_SCHEDULE_DELAY", "OTEL_BSP_MAX_QUEUE_SIZE", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"];

/// The telemetry variables of a service run with `telemetry`, exporting to `sink`: with an
/// exporter, those of [`SPAN_PROCESSOR_LIMITS`] that `lookup` (the load generator's
/// environment) finds are added.
fn telemetry_env(
    telemetry: Telemetry,
    sink: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Vec<(&'static str, String)> {
    let exporter = match telemetry {
        Telemetry::Off | Telemetry::Carried => return vec![("OTEL_SDK_DISABLED", "true".to_owned())],
        Telemetry::Spans => ("OTEL_METRICS_EXPORTER", "none".to_owned()),
        Telemetry::SpansAndMetrics => ("OTEL_METRIC_EXPORT_INTERVAL", "1000".to_owned()),
    };
    let limits = SPAN_PROCESSOR_LIMITS.iter().filter_map(|&key| lookup(key).map(|value| (key, value)));
    [("OTEL_EXPORTER_OTLP_ENDPOINT", sink.to_owned()), exporter].into_iter().chain(limits).collect()
}

impl Services {
    pub(crate) async fn start(amqp: &str, sink: &str, telemetry: Telemetry) -> anyhow::Result<Self> {
        let bin = std::env::current_exe()?.parent().map(PathBuf::from).unwrap_or_default();
        let dir = std::env::temp_dir().join(format!("tracehop-bench-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        // Outside the ephemeral range, so no outgoing connection (rabbitmqctl's, the load's)
        // takes one before its service binds it; and picked together, so none repeats (a run
        // once served its load from stock's port).
        let [gateway, checkout, stock] = tracehop_ports::free_ports()?;
        let telemetry = telemetry_env(telemetry, sink, |key| std::env::var(key).ok());
        let environments: [(&str, Vec<(&str, String)>); 3] = [
            (
                "stock",
                vec![
                    ("STOCK_ADDR", format!("127.0.0.1:{stock}")),
                    ("STOCK_DB", dir.join("stock.db").display().to_string()),
                    ("STOCK_SEED_UNITS", "100000000".to_owned()),
                    ("STOCK_HEADER_TIMEOUT_MS", IDLE_MS.to_owned()),
                    ("AMQP_ADDR", amqp.to_owned()),
                ],
            ),
            ("checkout", vec![("CHECKOUT_ADDR", format!("127.0.0.1:{checkout}")), ("AMQP_ADDR", amqp.to_owned())]),
            (
                "gateway",
                vec![
                    ("GATEWAY_ADDR", format!("127.0.0.1:{gateway}")),
                    ("CHECKOUT_URL", format!("http://127.0.0.1:{checkout}")),
                    ("GATEWAY_HEADER_TIMEOUT_MS", IDLE_MS.to_owned()),
                ],
            ),
        ];
        // Stopped on drop: whatever fails below leaves no process behind.
        let mut services = Self {
            children: Vec::new(),
            gateway: format!("http://127.0.0.1:{gateway}"),
            stock: format!("http://127.0.0.1:{stock}"),
            _dir: dir,
        };
        for (name, env) in environments {
            let mut command = Command::new(bin.join(name));
            command.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).env("RUST_LOG", "info");
            for (key, value) in env.iter().chain(&telemetry) {
                command.env(key, value);
            }
            let child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
            services.children.push((name.to_owned(), child));
        }
        let http = reqwest::Client::new();
        for _ in 0..400 {
            let up = |url: String| {
                let http = http.clone();
                async move { http.get(url).send().await.is_ok_and(|r| r.status().is_success()) }
            };
            if up(format!("{}/healthz", services.stock)).await && up(format!("{}/healthz", services.gateway)).await {
                services.all_running()?;
                return Ok(services);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("the services did not become ready")
    }

    /// Fails, naming it, when a service has exited (a port taken by something else, say):
    /// whatever answers then is not the pipeline.
    pub(crate) fn all_running(&mut self) -> anyhow::Result<()> {
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("{name} exited ({status}) while the run was starting");
            }
        }
        Ok(())
    }

    pub(crate) fn usage(&self) -> Vec<Usage> {
        self.children
            .iter()
            .map(|(name, child)| {
                let pid = child.id().to_string();
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let peak = status
                    .lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                Usage { service: name.clone(), cpu_seconds: cpu_seconds(&pid), peak_rss_kib: peak }
            })
            .collect()
    }
}

impl Drop for Services {
    /// Stops the services (TERM, then a wait for each) and removes their directory, however
    /// the run ended, a start that failed half-way included.
    fn drop(&mut self) {
        let children = std::mem::take(&mut self.children);
        for (_, child) in &children {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        }
        for (_, mut child) in children {
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

/// CPU seconds per 1,000 of `orders` that `service` (all of them for `None`) used.
pub(crate) fn cpu_per_thousand_orders(usage: &[Usage], orders: u64, service: Option<&str>) -> f64 {
    let seconds: f64 = usage.iter().filter(|u| service.is_none_or(|s| u.service == s)).map(|u| u.cpu_seconds).sum();
    seconds / (orders as f64 / 1000.0)
}

/// User and system CPU seconds a process (`self`, or a pid) has used so far; 0 if it is gone.
pub(crate) fn cpu_seconds(pid: &str) -> f64 {
    read_cpu_seconds(pid).unwrap_or(0.0)
}

/// User and system CPU seconds a process (`self`, or a pid) has used so far; `None` when its
/// `/proc` entry cannot be read or parsed (the process is gone).
pub(crate) fn read_cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    let ticks: Option<Vec<u64>> = [11, 12].iter().map(|&i| fields.get(i)?.parse::<u64>().ok()).collect();
    Some(ticks?.iter().sum::<u64>() as f64 / 100.0)
}

/// The broker's CPU seconds since `before` (a [`read_cpu_seconds`] of `broker`); `None` when
/// either reading failed or the count went back (the broker restarted under another process, say).
pub(crate) fn broker_cpu_since(broker: Option<&str>, before: Option<f64>) -> Option<f64> {
    let used = read_cpu_seconds(broker?)? - before?;
    (used >= 0.0).then_some(used)
}

/// The local RabbitMQ node's Erlang VM, if the broker runs on this machine.
pub(crate) fn broker_pid() -> Option<String> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid = entry.file_name().into_string().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        // rabbitmqctl runs an Erlang VM too, briefly: the node is the one started with `-s rabbit`.
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let node = args.windows(2).any(|pair| pair == [b"-s".as_slice(), b"rabbit".as_slice()]);
        (comm.trim() == "beam.smp" && node).then_some(pid)
    })
}

/// The CPU the rest of the machine spent during a run: the broker, and this process (the
/// load generator with its OTLP sink).
#[derive(Debug, Clone, Serialize)]
struct Bystanders {
    /// `None` when no local RabbitMQ node was found, or a reading of it failed.
    broker_cpu_seconds: Option<f64>,
    loadgen_cpu_seconds: f64,
}

/// [`Bystanders`] being counted: the broker found once, so both readings are of one process.
struct BystandersSince {
    broker: Option<String>,
    broker_before: Option<f64>,
    loadgen: f64,
}

impl Bystanders {
    /// Counts from now until [`BystandersSince::stop`].
    fn start() -> BystandersSince {
        let broker = broker_pid();
        let broker_before = broker.as_deref().and_then(read_cpu_seconds);
        BystandersSince { broker, broker_before, loadgen: cpu_seconds("self") }
    }

    /// This run's CPU seconds per 1,000 of its `orders`: (broker, load generator).
    fn per_thousand(&self, orders: u64) -> (Option<f64>, f64) {
        let thousands = orders as f64 / 1000.0;
        (self.broker_cpu_seconds.map(|s| s / thousands), self.loadgen_cpu_seconds / thousands)
    }
}

impl BystandersSince {
    fn stop(self) -> Bystanders {
        Bystanders {
            broker_cpu_seconds: broker_cpu_since(self.broker.as_deref(), self.broker_before),
            loadgen_cpu_seconds: cpu_seconds("self") - self.loadgen,
        }
    }
}

/// The medians over `runs` (bystanders, orders) of the broker's and the load generator's CPU
/// seconds per 1,000 orders, formatted; "?" for a broker never found.
fn bystander_medians<'a>(runs: impl Iterator<Item = (&'a Bystanders, u64)>) -> (String, String) {
    let (broker, loadgen): (Vec<Option<f64>>, Vec<f64>) =
        runs.map(|(bystanders, orders)| bystanders.per_thousand(orders)).unzip();
    let broker: Vec<f64> = broker.into_iter().flatten().collect();
    let broker = if broker.is_empty() { "?".to_owned() } else { format!("{:.3}", median(broker)) };
    (broker, format!("{:.3}", median(loadgen)))
}

fn load(args: &BenchArgs, label: &str, rate: Option<f64>) -> Load {
    Load {
        concurrency: args.concurrency,
        rate,
        orders: None,
        duration: Some(args.duration),
        warmup: args.warmup,
        label: label.to_owned(),
        json: None,
        svg: None,
        quiet: true,
    }
}

async fn pipeline_run(
    args: &BenchArgs,
    telemetry: Telemetry,
    rate: Option<f64>,
    sink: &str,
    spans: &std::sync::atomic::AtomicU64,
) -> anyhow::Result<Run> {
    let vhost = Vhost::create()?;
    let amqp = format!("{}/{}", args.amqp, vhost.0);
    let mut services = Services::start(&amqp, sink, telemetry).await?;
    let before = spans.load(Ordering::Relaxed);
    let label = telemetry.label();
    let bystanders = Bystanders::start();
    let orders = crate::pipeline::Orders::new(&services.gateway, telemetry.client_context())?;
    let report = crate::pipeline::run(&orders, Some(&services.stock), &load(args, label, rate)).await?;
    let bystanders = bystanders.stop();
    let usage = services.usage();
    let running = services.all_running();
    drop(services);
    running?;
    a_measurement(label, &report)?;
    let otlp_bytes = spans.load(Ordering::Relaxed) - before;
    eprintln!("{label}: {:.0}/s", report.throughput);
    Ok(Run { telemetry, report, usage, bystanders, otlp_bytes })
}

/// A run where more than 1% of the orders failed measures nothing: the benchmark stops rather
/// than report its rate.
pub(crate) fn a_measurement(label: &str, report: &Report) -> anyhow::Result<()> {
    let failed: u64 = report.failures.values().sum();
    anyhow::ensure!(
        failed * 100 <= report.sent,
        "{label}: {failed} of {} orders failed ({:?}); not a measurement",
        report.sent,
        report.failures
    );
    Ok(())
}

pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Runs the whole benchmark and prints the summary.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.pairs > 0 || args.half_load_rate.is_some(),
        "nothing to run: --pairs 0 needs --half-load-rate"
    );
    anyhow::ensure!(
        args.compare != Compare::Metrics || args.half_load_rate.is_none(),
        "--half-load-rate: --compare metrics has no half-load runs"
    );
    // The dump keeps every span: meant for the latency runs alone, not for full-speed pairs.
    anyhow::ensure!(args.dump_spans.is_none() || args.pairs == 0, "--dump-spans needs --pairs 0");
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let sink = format!("http://{}", listener.local_addr()?);
    let dump = args
        .dump_spans
        .as_ref()
        .map(|path| std::fs::File::create(path).map_err(|e| anyhow::anyhow!("--dump-spans {}: {e}", path.display())))
        .transpose()?;
    let spans = crate::sink::spawn_on_own_thread(listener, dump)?;
    let (off, on) = args.compare.sides();
    let mut pairs = Vec::new();
    let mut raw = Vec::new();
    for pair in 0..args.pairs {
        eprintln!("pair {}/{}", pair + 1, args.pairs);
        // Every other pair runs "on" first: whatever drifts during a run of pairs (the broker's
        // queue files, the previous run's vhost still being deleted) then falls on both sides
        // alike instead of always on the second run.
        let on_first = pair % 2 == 1;
        pairs.push(if on_first {
            let on_run = pipeline_run(&args, on, None, &sink, &spans).await?;
            Pair { off: pipeline_run(&args, off, None, &sink, &spans).await?, on: on_run, on_first }
        } else {
            let off_run = pipeline_run(&args, off, None, &sink, &spans).await?;
            Pair { off: off_run, on: pipeline_run(&args, on, None, &sink, &spans).await?, on_first }
        });
        if args.compare != Compare::Metrics {
            let vhost = Vhost::create()?;
            let bystanders = Bystanders::start();
            let report = crate::raw::run(&format!("{}/{}", args.amqp, vhost.0), &load(&args, "raw", None)).await?;
            let bystanders = bystanders.stop();
            eprintln!("raw: {:.0}/s", report.throughput);
            raw.push(RawRun { report, bystanders });
        }
    }
    // All at the same rate, so the latency tracing adds shows apart from the machine's own; in
    // the order off, on, on, off, so that neither side always runs second.
    let mut half_load = Vec::new();
    if args.compare != Compare::Metrics {
        let rate = args
            .half_load_rate
            .unwrap_or_else(|| median(pairs.iter().map(|pair| pair.on.report.throughput).collect()) / 2.0);
        for telemetry in [off, on, on, off] {
            half_load.push(pipeline_run(&args, telemetry, Some(rate), &sink, &spans).await?);
        }
    }
    let results = Results { pairs, raw, half_load };
    println!("{}", summary(&results, &args));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)?;
    }
    if let (Some(path), Some(half)) = (&args.svg, results.half_load.iter().find(|run| run.telemetry == on)) {
        std::fs::write(path, half.report.plot())?;
    }
    Ok(())
}

fn summary(results: &Results, args: &BenchArgs) -> String {
    let mut out = String::new();
    let (off_label, on_label) = match results.pairs.first() {
        Some(pair) => (pair.off.telemetry.label(), pair.on.telemetry.label()),
        None => return half_load_summary(&results.half_load),
    };
    let _ = writeln!(
        out,
        "\n## {} pairs, {} s each after {} s warm-up, {} in flight\n",
        args.pairs, args.duration, args.warmup, args.concurrency
    );
    let with_raw = !results.raw.is_empty();
    let _ = write!(out, "| pair | first | {off_label} | {on_label} | on / off |");
    let _ = writeln!(out, "{}", if with_raw { " raw publish (confirms) | on / raw |" } else { "" });
    let _ = writeln!(out, "|---|---|---|---|---|{}", if with_raw { "---|---|" } else { "" });
    let mut ratios = Vec::new();
    let mut of_raw = Vec::new();
    let mut off_of_raw = Vec::new();
    let mut by_order: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for (i, Pair { off, on, on_first }) in results.pairs.iter().enumerate() {
        let ratio = on.report.throughput / off.report.throughput;
        ratios.push(ratio);
        by_order[usize::from(*on_first)].push(ratio);
        let _ = write!(
            out,
            "| {} | {} | {:.0}/s | {:.0}/s | {:.3} |",
            i + 1,
            if *on_first { "on" } else { "off" },
            off.report.throughput,
            on.report.throughput,
            ratio
        );
        if let Some(RawRun { report: raw, .. }) = results.raw.get(i) {
            let share = on.report.throughput / raw.throughput;
            of_raw.push(share);
            off_of_raw.push(off.report.throughput / raw.throughput);
            let _ = write!(out, " {:.0}/s | {:.1}% |", raw.throughput, share * 100.0);
        }
        let _ = writeln!(out);
    }
    let _ = write!(
        out,
        "| **median** | | {:.0}/s | {:.0}/s | **{:.3}** (costs {:.1}%) |",
        median(results.pairs.iter().map(|pair| pair.off.report.throughput).collect()),
        median(results.pairs.iter().map(|pair| pair.on.report.throughput).collect()),
        median(ratios.clone()),
        (1.0 - median(ratios)) * 100.0,
    );
    if with_raw {
        let _ = write!(
            out,
            " {:.0}/s | **{:.1}%** |",
            median(results.raw.iter().map(|r| r.report.throughput).collect()),
            median(of_raw) * 100.0
        );
    }
    let _ = writeln!(out);
    // The order matters on a machine whose speed drifts: say what each order gave.
    let _ = writeln!(
        out,
        "\non / off, median of the pairs run off first: {:.3} ({} pairs); run on first: {:.3} ({} pairs)",
        median(by_order[0].clone()),
        by_order[0].len(),
        median(by_order[1].clone()),
        by_order[1].len()
    );
    if with_raw {
        let _ = writeln!(out, "off / raw, median of the pairs: {:.1}%", median(off_of_raw) * 100.0);
    }
    let _ = writeln!(
        out,
        "\n| service | CPU s / 1,000 orders ({off_label}) | CPU s / 1,000 orders ({on_label}) | peak RSS ({on_label}) |"
    );
    let _ = writeln!(out, "|---|---|---|---|");
    let cpu_per_thousand =
        |run: &Run, service: Option<&str>| cpu_per_thousand_orders(&run.usage, run.report.succeeded, service);
    for service in ["gateway", "checkout", "stock"] {
        let per_thousand = |on: bool| {
            median(
                results
                    .pairs
                    .iter()
                    .map(|pair| cpu_per_thousand(if on { &pair.on } else { &pair.off }, Some(service)))
                    .collect(),
            )
        };
        let peak = results
            .pairs
            .iter()
            .map(|pair| &pair.on)
            .filter_map(|run| run.usage.iter().find(|u| u.service == service).map(|u| u.peak_rss_kib))
            .max()
            .unwrap_or(0);
        let _ = writeln!(
            out,
            "| {service} | {:.3} | {:.3} | {:.1} MiB |",
            per_thousand(false),
            per_thousand(true),
            peak as f64 / 1024.0
        );
    }
    // The cost of an order: all three services' CPU, per pair, on over off.
    let cost_ratios: Vec<f64> =
        results.pairs.iter().map(|pair| cpu_per_thousand(&pair.on, None) / cpu_per_thousand(&pair.off, None)).collect();
    let _ = writeln!(
        out,
        "\nCPU per order, three services together, on / off per pair: {}; median {:.3} (+{:.1}%)",
        cost_ratios.iter().map(|r| format!("{r:.3}")).collect::<Vec<_>>().join(", "),
        median(cost_ratios.clone()),
        (median(cost_ratios) - 1.0) * 100.0
    );
    // The rest of the machine's two cores: where the CPU an order costs goes besides the services.
    let medians = |on: bool| {
        bystander_medians(results.pairs.iter().map(|pair| {
            let run = if on { &pair.on } else { &pair.off };
            (&run.bystanders, run.report.succeeded)
        }))
    };
    let ((broker_off, loadgen_off), (broker_on, loadgen_on)) = (medians(false), medians(true));
    let _ = writeln!(
        out,
        "\nCPU s / 1,000 orders besides the services (medians): broker {broker_off} ({off_label}), \
         {broker_on} ({on_label}); load generator with its sink {loadgen_off} ({off_label}), {loadgen_on} ({on_label})"
    );
    if with_raw {
        let (broker, loadgen) =
            bystander_medians(results.raw.iter().map(|raw| (&raw.bystanders, raw.report.succeeded)));
        let _ = writeln!(out, "Raw, CPU s / 1,000 messages (medians): broker {broker}, load generator {loadgen}");
    }
    out.push_str(&half_load_summary(&results.half_load));
    out
}

/// `ms` as `1.23 ms`, or `n/a` for a figure the run did not measure.
fn ms_or_na(ms: Option<f64>) -> String {
    ms.map_or_else(|| "n/a".to_owned(), |ms| format!("{ms:.2} ms"))
}

/// One line per half-load run.
fn half_load_summary(runs: &[Run]) -> String {
    let mut out = String::new();
    for half_load in runs {
        let half = &half_load.report;
        let e2e = half.end_to_end.as_ref();
        let _ = writeln!(
            out,
            "\nAt half the maximum ({}, open loop {}, from {} UTC): {:.0}/s, p99 POST {:.2} ms, p99 POST -> \
             reserved {} (p50 {:.2} / {}); the load generator sent its POSTs up to {} late (p99), which \
             the p99 POST counts: from the actual send, p99 POST {}; {} bytes of telemetry exported; worst second: \
             POST {}, POST -> reserved {}",
            half_load.telemetry.label(),
            half.load,
            utc_time_of_day(half.window_start_unix_ms),
            half.throughput,
            half.latency.p99_ms,
            ms_or_na(e2e.map(|p| p.p99_ms)),
            half.latency.p50_ms,
            ms_or_na(e2e.map(|p| p.p50_ms)),
            ms_or_na(half.send_lag.as_ref().map(|p| p.p99_ms)),
            ms_or_na(half.from_send.as_ref().map(|p| p.p99_ms)),
            half_load.otlp_bytes,
            worst_second(&half.timeline),
            worst_second(&half.end_to_end_timeline),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Percentiles, histogram};

    fn report(throughput: f64) -> Report {
        Report {
            mode: "pipeline",
            label: String::new(),
            load: String::new(),
            window_start_unix_ms: 0,
            seconds: 1.0,
            sent: throughput as u64,
            succeeded: throughput as u64,
            failures: Default::default(),
            throughput,
            latency: Percentiles::of(&histogram()),
            send_lag: None,
            from_send: None,
            timeline: Vec::new(),
            end_to_end: None,
            end_to_end_timeline: Vec::new(),
            not_reserved: 0,
        }
    }

    /// `pairs` pairs of one-second runs, nothing else set.
    fn args(pairs: usize) -> BenchArgs {
        BenchArgs {
            pairs,
            duration: 1.0,
            warmup: 0.0,
            concurrency: 1,
            amqp: String::new(),
            json: None,
            svg: None,
            compare: Compare::Tracing,
            half_load_rate: None,
            dump_spans: None,
        }
    }

    fn run(telemetry: Telemetry, throughput: f64) -> Run {
        let usage = ["gateway", "checkout", "stock"]
            .map(|service| Usage { service: service.to_owned(), cpu_seconds: 1.0, peak_rss_kib: 1024 })
            .to_vec();
        let bystanders = Bystanders { broker_cpu_seconds: Some(throughput / 10_000.0), loadgen_cpu_seconds: 0.05 };
        Run { telemetry, report: report(throughput), usage, bystanders, otlp_bytes: 0 }
    }

    #[test]
    fn a_run_with_more_than_one_percent_failed_is_not_a_measurement() {
        let mut report = report(1000.0);
        report.failures.insert("503".to_owned(), 10);
        assert!(a_measurement("telemetry off", &report).is_ok());
        report.failures.insert("timeout".to_owned(), 1);
        let error = a_measurement("telemetry off", &report).expect_err("11 of 1000 failed");
        assert!(error.to_string().starts_with("telemetry off: 11 of 1000 orders failed"), "{error}");
    }

    #[test]
    fn a_service_that_exited_is_named_and_dropped_services_are_stopped() -> anyhow::Result<()> {
        let running = Command::new("sleep").arg("30").spawn()?;
        let exited = Command::new("sh").args(["-c", "exit 3"]).spawn()?;
        let mut services = Services {
            children: vec![("gateway".to_owned(), running), ("stock".to_owned(), exited)],
            gateway: String::new(),
            stock: String::new(),
            _dir: std::env::temp_dir().join(format!("tracehop-bench-test-{}", uuid::Uuid::new_v4().simple())),
        };
        // Wait for the short one to exit (the status is kept once seen).
        for _ in 0..100 {
            if services.children[1].1.try_wait()?.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let error = services.all_running().expect_err("stock exited");
        assert!(error.to_string().starts_with("stock exited (exit status: 3)"), "{error}");
        // Dropped, the services are stopped and reaped: the one still running is gone.
        let pid = services.children[0].1.id();
        drop(services);
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "sleep {pid} still there");
        Ok(())
    }

    #[tokio::test]
    async fn settings_that_run_nothing_or_too_much_are_refused_before_anything_starts() {
        let args = args(0);
        let error = super::run(args.clone()).await.expect_err("nothing to run");
        assert!(error.to_string().contains("--pairs 0 needs --half-load-rate"), "{error}");
        let metrics = BenchArgs { compare: Compare::Metrics, half_load_rate: Some(100.0), ..args.clone() };
        let error = super::run(metrics).await.expect_err("no half load with --compare metrics");
        assert!(error.to_string().contains("--compare metrics has no half-load runs"), "{error}");
        let dump = BenchArgs { pairs: 1, dump_spans: Some("spans.dump".into()), ..args };
        let error = super::run(dump).await.expect_err("a dump of full-speed pairs");
        assert!(error.to_string().contains("--dump-spans needs --pairs 0"), "{error}");
    }

    #[test]
    fn a_broker_reading_that_failed_or_went_back_is_no_reading() {
        let this = std::process::id().to_string();
        let now = read_cpu_seconds(&this).expect("this process's own CPU");
        assert!(broker_cpu_since(Some(&this), Some(now)).is_some_and(|used| used >= 0.0));
        // No broker, no first reading, a process gone, a count that went back.
        assert_eq!(broker_cpu_since(None, Some(now)), None);
        assert_eq!(broker_cpu_since(Some(&this), None), None);
        assert_eq!(broker_cpu_since(Some("0"), Some(0.0)), None);
        assert_eq!(broker_cpu_since(Some(&this), Some(now + 1e6)), None);
    }

    #[test]
    fn each_comparison_pairs_its_two_telemetries() {
        assert_eq!(Compare::Tracing.sides(), (Telemetry::Off, Telemetry::SpansAndMetrics));
        assert_eq!(Compare::Spans.sides(), (Telemetry::Off, Telemetry::Spans));
        assert_eq!(Compare::Metrics.sides(), (Telemetry::Spans, Telemetry::SpansAndMetrics));
        assert_eq!(Compare::Same.sides(), (Telemetry::Off, Telemetry::Off));
        assert_eq!(Compare::Propagation.sides(), (Telemetry::Off, Telemetry::Carried));
        // Only the side that carries a client's context gets one from the load generator.
        let carried = [Telemetry::Off, Telemetry::Spans, Telemetry::SpansAndMetrics, Telemetry::Carried]
            .map(Telemetry::client_context);
        assert_eq!(carried, [false, false, false, true]);
    }

    #[test]
    fn the_span_processor_limits_set_are_passed_on_and_nothing_else() {
        let lookup = |key: &str| match key {
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE" => Some("2048".to_owned()),
            "OTEL_BSP_MAX_QUEUE_SIZE" => Some("8192".to_owned()),
            "OTEL_SDK_DISABLED" => Some("true".to_owned()),
            _ => None,
        };
        let passed = |telemetry| -> Vec<(&str, String)> {
            telemetry_env(telemetry, "http://127.0.0.1:4317", lookup)
                .into_iter()
                .filter(|(key, _)| key.starts_with("OTEL_BSP_"))
                .collect()
        };
        assert_eq!(
            passed(Telemetry::Spans),
            vec![("OTEL_BSP_MAX_QUEUE_SIZE", "8192".to_owned()), ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2048".to_owned())]
        );
        assert_eq!(passed(Telemetry::SpansAndMetrics), passed(Telemetry::Spans));
        // Nothing exports with telemetry off: the limits would only make the two sides differ.
        assert_eq!(passed(Telemetry::Off), Vec::new());
        assert_eq!(
            telemetry_env(Telemetry::Off, "http://127.0.0.1:4317", lookup),
            vec![("OTEL_SDK_DISABLED", "true".to_owned())]
        );
        // Carrying a client's context is telemetry off to the services.
        assert_eq!(
            telemetry_env(Telemetry::Carried, "http://127.0.0.1:4317", lookup),
            telemetry_env(Telemetry::Off, "http://127.0.0.1:4317", lookup)
        );
    }

    #[test]
    fn the_summary_reports_each_order_apart_and_its_table_lines_up() {
        let args = args(2);
        // 99 POSTs sent 40 µs after their time, one 3 ms after.
        let mut lag = histogram();
        lag.record_n(40, 99).expect("in range");
        lag.record(3000).expect("in range");
        let mut from_send = histogram();
        from_send.record_n(6000, 100).expect("in range");
        let pair = |off: f64, on: f64, on_first| Pair {
            off: run(Telemetry::Off, off),
            on: run(Telemetry::SpansAndMetrics, on),
            on_first,
        };
        let results = Results {
            pairs: vec![pair(1000.0, 900.0, false), pair(1000.0, 800.0, true)],
            raw: [4000.0, 5000.0]
                .map(|throughput| RawRun {
                    report: report(throughput),
                    bystanders: Bystanders { broker_cpu_seconds: None, loadgen_cpu_seconds: 1.0 },
                })
                .to_vec(),
            // 2026-12-06 17:25:41.5 UTC.
            half_load: vec![Run {
                report: Report {
                    window_start_unix_ms: 1_796_577_941_500,
                    send_lag: Some(Percentiles::of(&lag)),
                    from_send: Some(Percentiles::of(&from_send)),
                    ..report(2500.0)
                },
                ..run(Telemetry::Off, 2500.0)
            }],
        };
        let summary = summary(&results, &args);
        let table: Vec<&str> = summary.lines().filter(|line| line.starts_with("| ")).take(4).collect();
        let cells = |line: &str| line.matches('|').count();
        assert!(table.iter().all(|line| cells(line) == cells(table[0])), "{summary}");
        assert!(table[1].contains("| 1 | off |") && table[2].contains("| 2 | on |"), "{summary}");
        assert!(summary.contains("run off first: 0.900 (1 pairs); run on first: 0.800 (1 pairs)"), "{summary}");
        assert!(summary.contains("off / raw, median of the pairs: 22.5%"), "{summary}");
        assert!(table[3].contains("**0.850**"), "{summary}");
        // 0.1 s of broker CPU for 1,000 orders off, 0.09 s for 900 and 0.08 s for 800 on.
        assert!(summary.contains("broker 0.100 (telemetry off), 0.100 (spans + metrics)"), "{summary}");
        assert!(
            summary.contains("load generator with its sink 0.050 (telemetry off), 0.059 (spans + metrics)"),
            "{summary}"
        );
        assert!(summary.contains("Raw, CPU s / 1,000 messages (medians): broker ?, load generator 0.225"), "{summary}");
        // A half-load run says when it began, so a stall in it can be found in the broker's log.
        assert!(
            summary.contains("At half the maximum (telemetry off, open loop , from 17:25:41 UTC): 2500/s"),
            "{summary}"
        );
        // And how late the load generator itself sent, which its POST latency counts.
        assert!(
            summary.contains(
                "the load generator sent its POSTs up to 0.04 ms late (p99), which the p99 POST counts: from the \
                 actual send, p99 POST 6.00 ms;"
            ),
            "{summary}"
        );
        // A run that did not measure them says so rather than 0.
        let unmeasured = Run { report: report(2500.0), ..run(Telemetry::Off, 2500.0) };
        let line = half_load_summary(&[unmeasured]);
        assert!(
            line.contains("up to n/a late (p99), which the p99 POST counts: from the actual send, p99 POST n/a;"),
            "{line}"
        );
        // POST -> reserved, unmeasured without stock's admin API, too.
        assert!(line.contains("p99 POST -> reserved n/a (p50 ") && line.contains(" / n/a);"), "{line}");
    }
}
