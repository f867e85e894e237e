//! loadgen: puts orders through tracehop and says how fast and how long.
//!
//! # Layout
//! - [`pipeline`]: orders through the gateway (closed loop at a fixed concurrency, or open loop
//!   at a fixed rate), each followed until stock reserved it, so the end-to-end time from POST
//!   to reservation is measured, not only the HTTP round trip.
//! - [`raw`]: the ceiling: the same message published with confirms straight to RabbitMQ
//!   through lapin, at the same concurrency.
//! - [`report`]: HDR histograms, the summary table, the JSON file and the SVG plot.
//! - [`sink`]: an OTLP/gRPC receiver that counts spans and keeps none, for benchmarks.
//! - [`bench`](mod@bench): the benchmark: tracing off/on in pairs beside the raw ceiling, CPU and memory
//!   per service, latency at half the maximum throughput.
//! - [`interleave`]: the same comparison with both stacks up at once and the load switched
//!   between them every few seconds: many short pairs, with the median's 95% interval.
//! - [`breakdown`]: where an order's time goes, from the spans a benchmark wrote to a file.

mod bench;
mod breakdown;
mod driver;
mod interleave;
mod pipeline;
mod raw;
mod report;
mod sink;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "loadgen", about = "Load generator for tracehop: pipeline, raw broker ceiling, OTLP sink")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Orders through the gateway, each followed until stock reserved it.
    Pipeline(PipelineArgs),
    /// The broker's ceiling: the same message published with confirms, straight through lapin.
    Raw(RawArgs),
    /// The benchmark: tracing off/on pairs beside the raw ceiling, then half-load latency.
    Bench(bench::BenchArgs),
    /// Off and on side by side: both stacks up at once, the load switched between them every
    /// few seconds; the median of the pairs with its 95% interval.
    Interleave(interleave::InterleaveArgs),
    /// Where an order's time goes, part by part, from the spans `bench --dump-spans` wrote.
    Breakdown {
        /// The file `bench --dump-spans` wrote.
        dump: PathBuf,
    },
    /// An OTLP/gRPC receiver that counts spans and keeps none.
    Sink {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:4317")]
        listen: SocketAddr,
    },
    /// Distinct free ports outside the kernel's ephemeral range, on one line separated by
    /// spaces, for scripts that start servers on them (`scripts/bench-instructions`).
    FreePorts {
        /// How many.
        count: usize,
    },
}

/// How much load, and where the report goes.
#[derive(Args, Clone, Debug)]
pub struct Load {
    /// Requests in flight at once (closed loop).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Requests per second (open loop; latency counted from the intended send time, so a slow
    /// system cannot hide its queueing). Overrides --concurrency.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Stop after this many requests.
    #[arg(long, conflicts_with = "duration")]
    pub orders: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Warm-up seconds before measuring (requests sent, not counted).
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    /// Name of this run in the report.
    #[arg(long, default_value = "run")]
    pub label: String,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a latency plot (SVG) here.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// No live progress line.
    #[arg(long)]
    pub quiet: bool,
}

#[cfg(test)]
impl Load {
    /// A quiet load named `label` for the tests: one at a time, no warm-up, no files; each test
    /// sets what it drives by (`rate`, `orders` or `duration`) with struct update.
    pub(crate) fn for_test(label: &str) -> Self {
        Self {
            concurrency: 1,
            rate: None,
            orders: None,
            duration: None,
            warmup: 0.0,
            label: label.to_owned(),
            json: None,
            svg: None,
            quiet: true,
        }
    }
}

impl Load {
    /// `concurrency N` or `rate R/s`.
    fn describe(&self) -> String {
        match self.rate {
            Some(rate) => format!("rate {rate:.0}/s"),
            None => format!("concurrency {}", self.concurrency),
        }
    }

    fn stop_after(&self) -> (Option<u64>, Option<Duration>) {
        let duration = self.duration.map(Duration::from_secs_f64);
        if self.orders.is_none() && duration.is_none() { (Some(10_000), None) } else { (self.orders, duration) }
    }
}

#[derive(Args, Clone, Debug)]
struct PipelineArgs {
    /// The gateway.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    gateway: String,
    /// Stock's admin API, to learn when each order was reserved.
    #[arg(long, default_value = "http://127.0.0.1:8082")]
    stock: String,
    /// Do not look the orders up afterwards (no end-to-end figures): for a measurement of the
    /// services' work per order that the lookups' traced requests would add to.
    #[arg(long)]
    no_follow: bool,
    /// Send each order with a `traceparent` of its own (a new sampled trace), as a traced
    /// client would: the gateway continues it instead of starting one.
    #[arg(long)]
    trace_context: bool,
    #[command(flatten)]
    load: Load,
}

#[derive(Args, Clone, Debug)]
struct RawArgs {
    /// The broker.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp: String,
    #[command(flatten)]
    load: Load,
}

// One thread, as the services run (README, "What moved"): on the benchmark's two cores a
// multi-threaded runtime's workers wake and sleep around every request, and their context
// switches are CPU the services and the broker do not get. The OTLP sink of `bench` has a
// thread and runtime of its own.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Pipeline(args) => {
            let orders = pipeline::Orders::new(&args.gateway, args.trace_context)?;
            let report = pipeline::run(&orders, (!args.no_follow).then_some(args.stock.as_str()), &args.load).await?;
            report.finish(&args.load)?;
        }
        Command::Raw(args) => {
            let report = raw::run(&args.amqp, &args.load).await?;
            report.finish(&args.load)?;
        }
        Command::Bench(args) => bench::run(args).await?,
        Command::Interleave(args) => interleave::run(args).await?,
        Command::Breakdown { dump } => breakdown::run(&dump)?,
        Command::Sink { listen } => sink::run(listen).await?,
        Command::FreePorts { count } => {
            let ports: Vec<String> = tracehop_ports::free_port_list(count)?.iter().map(u16::to_string).collect();
            println!("{}", ports.join(" "));
        }
    }
    Ok(())
}
