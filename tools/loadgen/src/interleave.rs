//! The interleaved comparison: both stacks of a comparison (telemetry off and on, by default)
//! run at once, each with its own processes, vhost and store, and the load switches from one to
//! the other every `--slice` seconds, in pairs of slices (every other pair "on" first).
//!
//! `bench` starts fresh processes for each run and compares runs of 12 s or so, one after the
//! other: on this machine the throughput of two such runs of the same binaries differs by up to
//! a quarter, so a twelve-pair median moves by several points from one invocation to the next,
//! more than the 5% the benchmark is meant to judge. Here nothing restarts between slices and
//! the two sides of a pair are seconds apart, so the machine's drift falls on both alike, and a
//! hundred pairs fit in the time of twelve. The median of the pairs' ratios comes with its 95%
//! interval (order statistics: no assumption about the spread's shape).
//!
//! Each slice ends when its last orders are answered and stock has reserved the last
//! `--concurrency` of them (the stack's backlog is then behind it), so neither stack's orders
//! are still being worked on in the other's slice. What runs on a timer still may be: the "on"
//! stack's last partial span batch of a slice (at most one per service, against some thirty full
//! ones in a slice of 2 s at full speed; sent up to `OTEL_BSP_SCHEDULE_DELAY` later) and its
//! metric exports. The summary says how much of what the receiver got arrived during the "off"
//! slices. CPU per order is each stack's CPU from the first pair to the last (its own slices,
//! their drains, and whatever it did during the other's), over all its orders.
//! The broker's CPU is read around each slice, its drain included: both stacks share the one
//! broker, and while a slice runs, only its stack sends it work.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::Load;
use crate::bench::{
    Compare, Services, Telemetry, Usage, Vhost, a_measurement, broker_cpu_since, broker_pid, cpu_per_thousand_orders,
    median, read_cpu_seconds,
};
use crate::pipeline::{Lookups, Orders};

/// The interleaved comparison's settings.
#[derive(clap::Args, Clone, Debug)]
pub struct InterleaveArgs {
    /// Pairs of slices (one on each stack).
    #[arg(long, default_value_t = 100)]
    pairs: usize,
    /// Seconds per slice.
    #[arg(long, default_value_t = 2.0)]
    slice: f64,
    /// Warm-up seconds on each stack before the first pair.
    #[arg(long, default_value_t = 5.0)]
    warmup: f64,
    /// Requests in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// The broker, without a vhost (each stack gets its own, created with rabbitmqctl).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672")]
    amqp: String,
    /// What the two stacks compare.
    #[arg(long, value_enum, default_value_t = Compare::Tracing)]
    compare: Compare,
    /// Write every slice and each stack's resource use as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One slice's outcome.
#[derive(Debug, Clone, Serialize)]
struct Slice {
    window_start_unix_ms: u64,
    succeeded: u64,
    throughput: f64,
    /// OTLP bytes the receiver got from the slice's start to the end of its drain, from
    /// whichever stack sent them.
    otlp_bytes: u64,
    /// The local RabbitMQ node's CPU seconds over the same time (`None` without one, or when a
    /// reading failed): both stacks share the broker, and between slices its work is the slice's
    /// stack's.
    broker_cpu_seconds: Option<f64>,
}

/// One pair of slices.
#[derive(Debug, Clone, Serialize)]
struct SlicePair {
    on_first: bool,
    off: Slice,
    on: Slice,
}

impl SlicePair {
    /// On / off throughput.
    fn ratio(&self) -> f64 {
        self.on.throughput / self.off.throughput
    }
}

/// A stack's telemetry, and its services' CPU and peak memory over the measured slices.
#[derive(Debug, Serialize)]
struct StackUse {
    telemetry: Telemetry,
    /// Orders its measured slices completed.
    orders: u64,
    usage: Vec<Usage>,
}

#[derive(Debug, Serialize)]
struct Results {
    slice_seconds: f64,
    concurrency: usize,
    pairs: Vec<SlicePair>,
    off: StackUse,
    on: StackUse,
}

/// One side's services and its vhost, dropped in that order (the services stop, then the vhost
/// goes), whichever way the run ends.
struct Stack {
    telemetry: Telemetry,
    /// Its clients, kept from slice to slice: a slice does not open its connections afresh.
    orders: Orders,
    lookups: Lookups,
    services: Services,
    _vhost: Vhost,
}

impl Stack {
    async fn start(args: &InterleaveArgs, sink: &str, telemetry: Telemetry) -> anyhow::Result<Self> {
        let vhost = Vhost::create()?;
        let services = Services::start(&format!("{}/{}", args.amqp, vhost.0), sink, telemetry).await?;
        let (orders, lookups) =
            (Orders::new(&services.gateway, telemetry.client_context())?, Lookups::new(&services.stock)?);
        Ok(Self { telemetry, orders, lookups, services, _vhost: vhost })
    }

    /// Full load for `seconds`, until stock has reserved the slice's last orders; `otlp` counts
    /// the bytes the receiver gets, `broker` is the local RabbitMQ node's pid.
    async fn slice(
        &mut self,
        args: &InterleaveArgs,
        seconds: f64,
        otlp: &AtomicU64,
        broker: Option<&str>,
    ) -> anyhow::Result<Slice> {
        let received = otlp.load(Ordering::Relaxed);
        let broker_before = broker.and_then(read_cpu_seconds);
        let load = Load {
            concurrency: args.concurrency,
            rate: None,
            orders: None,
            duration: Some(seconds),
            warmup: 0.0,
            label: self.telemetry.label().to_owned(),
            json: None,
            svg: None,
            quiet: true,
        };
        let report = crate::pipeline::run_drained(
            &self.orders,
            &self.lookups,
            &load,
            args.concurrency,
            crate::pipeline::FOLLOW_WAIT,
        )
        .await?;
        self.services.all_running()?;
        a_measurement(&load.label, &report)?;
        Ok(Slice {
            window_start_unix_ms: report.window_start_unix_ms,
            succeeded: report.succeeded,
            throughput: report.throughput,
            otlp_bytes: otlp.load(Ordering::Relaxed) - received,
            broker_cpu_seconds: broker_cpu_since(broker, broker_before),
        })
    }

    /// What the services used since `before`, for the `orders` they completed meanwhile (peak
    /// RSS as it stands).
    fn used_since(&self, before: &[Usage], orders: u64) -> StackUse {
        let usage = self
            .services
            .usage()
            .into_iter()
            .map(|after| {
                let start = before.iter().find(|u| u.service == after.service).map_or(0.0, |u| u.cpu_seconds);
                Usage { cpu_seconds: after.cpu_seconds - start, ..after }
            })
            .collect();
        StackUse { telemetry: self.telemetry, orders, usage }
    }
}

/// Whether pair `index` runs its "on" slice first: every other pair, so that whatever the
/// order favours falls on both sides alike.
fn on_first(index: usize) -> bool {
    index % 2 == 1
}

/// Runs the comparison and prints its summary.
pub async fn run(args: InterleaveArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.pairs > 0, "--pairs must be at least 1");
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    anyhow::ensure!(
        args.slice.is_finite() && args.slice >= 0.5,
        "--slice must be at least 0.5 s: a slice's start and drain would weigh on it"
    );
    anyhow::ensure!(args.warmup.is_finite() && args.warmup >= 0.0, "--warmup must be 0 s or more");
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let sink = format!("http://{}", listener.local_addr()?);
    let otlp = crate::sink::spawn_on_own_thread(listener, None)?;
    let (off, on) = args.compare.sides();
    let mut stacks = [Stack::start(&args, &sink, off).await?, Stack::start(&args, &sink, on).await?];
    let broker = broker_pid();
    let broker = broker.as_deref();
    for stack in &mut stacks {
        stack.slice(&args, args.warmup, &otlp, broker).await?;
    }
    let [off_stack, on_stack] = &mut stacks;
    let before = (off_stack.services.usage(), on_stack.services.usage());
    let mut pairs = Vec::with_capacity(args.pairs);
    for index in 0..args.pairs {
        let on_first = on_first(index);
        let (off, on) = if on_first {
            let on = on_stack.slice(&args, args.slice, &otlp, broker).await?;
            (off_stack.slice(&args, args.slice, &otlp, broker).await?, on)
        } else {
            let off = off_stack.slice(&args, args.slice, &otlp, broker).await?;
            (off, on_stack.slice(&args, args.slice, &otlp, broker).await?)
        };
        let pair = SlicePair { on_first, off, on };
        if (index + 1) % 10 == 0 {
            eprintln!("pair {}/{}: {:.3}", index + 1, args.pairs, pair.ratio());
        }
        pairs.push(pair);
    }
    let results = Results {
        slice_seconds: args.slice,
        concurrency: args.concurrency,
        off: off_stack.used_since(&before.0, pairs.iter().map(|pair| pair.off.succeeded).sum()),
        on: on_stack.used_since(&before.1, pairs.iter().map(|pair| pair.on.succeeded).sum()),
        pairs,
    };
    drop(stacks);
    println!("{}", summary(&results));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)?;
    }
    Ok(())
}

/// The 1-based ranks, in sorted order, of the 95% interval of the median of `n` values: `k` and
/// `n + 1 - k` for the largest `k` with P(B <= k - 1) <= 2.5%, B binomial (n, 1/2); `None` for
/// fewer than six values, where no such interval exists.
fn median_interval_ranks(n: usize) -> Option<(usize, usize)> {
    let mut ln_choose = 0.0; // ln C(n, i)
    let mut below = 0.0; // P(B <= i - 1)
    let mut k = None;
    for i in 0..n {
        let p = (ln_choose - n as f64 * std::f64::consts::LN_2).exp();
        if below + p > 0.025 {
            break;
        }
        below += p;
        k = Some(i + 1);
        ln_choose += ((n - i) as f64).ln() - ((i + 1) as f64).ln();
    }
    k.map(|k| (k, n + 1 - k))
}

fn summary(results: &Results) -> String {
    let mut out = String::new();
    if results.pairs.is_empty() {
        return "\nno pairs ran\n".to_owned();
    }
    let (off_label, on_label) = (results.off.telemetry.label(), results.on.telemetry.label());
    let mut ratios: Vec<f64> = results.pairs.iter().map(SlicePair::ratio).collect();
    let by_order = |first: bool| -> Vec<f64> {
        results.pairs.iter().filter(|pair| pair.on_first == first).map(SlicePair::ratio).collect()
    };
    let (off_first, on_first) = (by_order(false), by_order(true));
    let _ = writeln!(
        out,
        "\n## Interleaved: {} pairs of {} s slices, {} in flight: {off_label} against {on_label}\n",
        results.pairs.len(),
        results.slice_seconds,
        results.concurrency
    );
    let middle = median(ratios.clone());
    let _ = write!(out, "on / off, median of the pairs: **{middle:.3}** (costs {:.1}%)", (1.0 - middle) * 100.0);
    ratios.sort_by(f64::total_cmp);
    match median_interval_ranks(ratios.len()) {
        Some((low, high)) => {
            let _ = writeln!(
                out,
                "; 95% interval of the median {:.3} to {:.3} (costs {:.1}% to {:.1}%; pairs {low} and {high} of {} in order)",
                ratios[low - 1],
                ratios[high - 1],
                (1.0 - ratios[high - 1]) * 100.0,
                (1.0 - ratios[low - 1]) * 100.0,
                ratios.len()
            );
        }
        None => {
            let _ = writeln!(out, "; too few pairs for a 95% interval (six at least)");
        }
    }
    let quartile = |q: f64| ratios[((ratios.len() - 1) as f64 * q).round() as usize];
    let _ = writeln!(
        out,
        "pairs: lowest {:.3}, quartiles {:.3} / {:.3}, highest {:.3}; run off first {:.3} ({} pairs), on first {:.3} ({} pairs)",
        quartile(0.0),
        quartile(0.25),
        quartile(0.75),
        quartile(1.0),
        median(off_first.clone()),
        off_first.len(),
        median(on_first.clone()),
        on_first.len()
    );
    let _ = writeln!(
        out,
        "slices' throughput, medians: {off_label} {:.0}/s, {on_label} {:.0}/s",
        median(results.pairs.iter().map(|pair| pair.off.throughput).collect()),
        median(results.pairs.iter().map(|pair| pair.on.throughput).collect())
    );
    let _ = writeln!(
        out,
        "\n| service | CPU s / 1,000 orders ({off_label}) | ({on_label}) | on / off | peak RSS ({off_label}) | ({on_label}) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    let per_thousand =
        |stack: &StackUse, service: Option<&str>| cpu_per_thousand_orders(&stack.usage, stack.orders, service);
    let peak = |stack: &StackUse, service: &str| {
        stack.usage.iter().find(|u| u.service == service).map_or(0.0, |u| u.peak_rss_kib as f64 / 1024.0)
    };
    for service in ["gateway", "checkout", "stock"] {
        let (off, on) = (per_thousand(&results.off, Some(service)), per_thousand(&results.on, Some(service)));
        let _ = writeln!(
            out,
            "| {service} | {off:.3} | {on:.3} | {:.3} | {:.1} MiB | {:.1} MiB |",
            on / off,
            peak(&results.off, service),
            peak(&results.on, service)
        );
    }
    let (off, on) = (per_thousand(&results.off, None), per_thousand(&results.on, None));
    let _ = writeln!(
        out,
        "\nCPU per order, three services together, on / off: {:.3} ({:+.1}%)",
        on / off,
        (on / off - 1.0) * 100.0
    );
    // The broker's CPU per order, each side's slices with their drains: the same broker, seconds apart.
    let broker = |off: bool| -> Option<f64> {
        let (mut seconds, mut orders) = (0.0, 0);
        for pair in &results.pairs {
            let slice = if off { &pair.off } else { &pair.on };
            seconds += slice.broker_cpu_seconds?;
            orders += slice.succeeded;
        }
        Some(seconds / (orders as f64 / 1000.0))
    };
    if let (Some(off), Some(on)) = (broker(true), broker(false)) {
        let _ = writeln!(
            out,
            "broker (RabbitMQ) CPU s / 1,000 orders in each side's slices: {off_label} {off:.3}, {on_label} {on:.3}; \
             on / off {:.3} ({:+.1}%)",
            on / off,
            (on / off - 1.0) * 100.0
        );
    }
    // What the stacks' timers sent while the other side was measured: their exports' cost fell there.
    let bytes = |off: bool| -> u64 {
        results.pairs.iter().map(|pair| if off { pair.off.otlp_bytes } else { pair.on.otlp_bytes }).sum()
    };
    let (during_off, during_on) = (bytes(true), bytes(false));
    if during_off + during_on > 0 {
        let _ = writeln!(
            out,
            "OTLP received during the {off_label} slices: {:.1}% of {:.1} MB",
            during_off as f64 * 100.0 / (during_off + during_on) as f64,
            (during_off + during_on) as f64 / 1e6
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_interval_takes_the_ranks_the_binomial_tails_allow() {
        // The textbook's ranks for a hundred values, and the edges: six values are the fewest
        // with an interval (their extremes; 1/64 per tail), five have none.
        assert_eq!(median_interval_ranks(100), Some((40, 61)));
        assert_eq!(median_interval_ranks(6), Some((1, 6)));
        assert_eq!(median_interval_ranks(5), None);
        assert_eq!(median_interval_ranks(20), Some((6, 15)));
    }

    #[tokio::test]
    async fn settings_that_measure_nothing_are_refused_before_anything_starts() {
        let args = InterleaveArgs {
            pairs: 1,
            slice: 2.0,
            warmup: 0.0,
            concurrency: 1,
            amqp: String::new(),
            compare: Compare::Same,
            json: None,
        };
        let refused = [
            (InterleaveArgs { pairs: 0, ..args.clone() }, "--pairs"),
            (InterleaveArgs { concurrency: 0, ..args.clone() }, "--concurrency"),
            (InterleaveArgs { slice: 0.1, ..args.clone() }, "--slice"),
            (InterleaveArgs { slice: f64::NAN, ..args.clone() }, "--slice"),
            (InterleaveArgs { warmup: -1.0, ..args.clone() }, "--warmup"),
        ];
        for (settings, named) in refused {
            let error = run(settings).await.expect_err(named).to_string();
            assert!(error.starts_with(named), "{error}");
        }
    }

    #[test]
    fn every_other_pair_runs_on_first() {
        let firsts: Vec<bool> = (0..4).map(on_first).collect();
        assert_eq!(firsts, [false, true, false, true]);
    }

    #[test]
    fn the_summary_gives_the_median_its_interval_and_each_stacks_cost() {
        let slice = |throughput: f64, otlp_bytes: u64| Slice {
            window_start_unix_ms: 0,
            succeeded: (throughput * 2.0) as u64,
            throughput,
            otlp_bytes,
            // 0.1 s of the broker's CPU per slice of either side.
            broker_cpu_seconds: Some(0.1),
        };
        // Ratios 0.90, 0.91, ..., 0.99 and 1.00, 1.01: median 0.955.
        let pairs: Vec<SlicePair> = (0..12)
            .map(|i| SlicePair {
                on_first: on_first(i),
                off: slice(1000.0, 250_000),
                on: slice(900.0 + 10.0 * i as f64, 750_000),
            })
            .collect();
        let usage = |cpu: f64| {
            ["gateway", "checkout", "stock"]
                .map(|service| Usage { service: service.to_owned(), cpu_seconds: cpu, peak_rss_kib: 20 * 1024 })
                .to_vec()
        };
        let results = Results {
            slice_seconds: 2.0,
            concurrency: 64,
            off: StackUse { telemetry: Telemetry::Off, orders: 24_000, usage: usage(1.2) },
            on: StackUse { telemetry: Telemetry::SpansAndMetrics, orders: 22_000, usage: usage(1.21) },
            pairs,
        };
        let text = summary(&results);
        assert!(text.contains("median of the pairs: **0.955** (costs 4.5%)"), "{text}");
        // Twelve pairs: ranks 3 and 10 (P(B <= 2) = 79/4096, under 2.5%).
        assert!(
            text.contains("95% interval of the median 0.920 to 0.990 (costs 1.0% to 8.0%; pairs 3 and 10 of 12"),
            "{text}"
        );
        assert!(text.contains("run off first 0.950 (6 pairs), on first 0.960 (6 pairs)"), "{text}");
        // 1.2 s over 24,000 orders against 1.21 s over 22,000.
        assert!(text.contains("| gateway | 0.050 | 0.055 | 1.100 | 20.0 MiB | 20.0 MiB |"), "{text}");
        assert!(text.contains("on / off: 1.100 (+10.0%)"), "{text}");
        // A quarter of the 12 MB came while the "off" side was measured.
        assert!(text.contains("OTLP received during the telemetry off slices: 25.0% of 12.0 MB"), "{text}");
        // 1.2 s over 24,000 orders off; on, 1.2 s over 2 * (900 + 910 + ... + 1010) = 22,920.
        assert!(
            text.contains("CPU s / 1,000 orders in each side's slices: telemetry off 0.050, spans + metrics 0.052; on / off 1.047 (+4.7%)"),
            "{text}"
        );
        // A slice without a broker reading leaves the line out rather than count it as idle.
        let mut unread = Results { pairs: results.pairs.clone(), ..results };
        unread.pairs[3].on.broker_cpu_seconds = None;
        assert!(!summary(&unread).contains("broker (RabbitMQ)"), "{}", summary(&unread));
        let none = Results { pairs: Vec::new(), ..unread };
        assert_eq!(summary(&none), "\nno pairs ran\n");
    }
}
