//! What a run measured: HDR histograms in microseconds, printed as a table, written as JSON
//! and plotted as latency-by-percentile curves (SVG).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::Load;

/// A latency histogram: 1 µs to 60 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Percentiles of one histogram, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
    /// (percentile, ms) along the curve, for the plot.
    pub curve: Vec<(f64, f64)>,
}

impl Percentiles {
    /// Reads `histogram`.
    pub fn of(histogram: &Histogram<u64>) -> Self {
        let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
        let curve = [0.0, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 1.0]
            .iter()
            .map(|&q| (q * 100.0, ms(q)))
            .collect();
        Self {
            count: histogram.len(),
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: histogram.max() as f64 / 1000.0,
            curve,
        }
    }
}

/// One second of a run, by when its operations were sent: a stall shows here even when it is
/// too short to move the run's percentiles much.
#[derive(Debug, Clone, Serialize)]
pub struct Second {
    /// Seconds since the measured window began.
    pub second: usize,
    /// Operations sent in this second that succeeded.
    pub count: u64,
    /// Their 99th percentile.
    pub p99_ms: f64,
    /// Their slowest.
    pub max_ms: f64,
}

/// Latencies bucketed by the second in which each operation was sent.
#[derive(Default)]
pub struct Timeline(Vec<Histogram<u64>>);

impl Timeline {
    /// Records `us` for an operation sent `second` seconds into the measured window.
    pub fn record(&mut self, second: usize, us: u64) {
        if self.0.len() <= second {
            // Two significant digits: a second's percentile needs no more, at a tenth of the size.
            self.0.resize_with(second + 1, || {
                Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid histogram bounds")
            });
        }
        let _ = self.0[second].record(us.max(1));
    }

    /// Each second's count, p99 and maximum.
    pub fn seconds(&self) -> Vec<Second> {
        self.0
            .iter()
            .enumerate()
            .map(|(second, h)| Second {
                second,
                count: h.len(),
                p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
                max_ms: h.max() as f64 / 1000.0,
            })
            .collect()
    }
}

/// The second with the highest p99, as "p99 X ms in second N".
pub fn worst_second(seconds: &[Second]) -> String {
    match seconds.iter().max_by(|a, b| a.p99_ms.total_cmp(&b.p99_ms)) {
        Some(worst) => format!("p99 {:.2} ms in second {} ({} orders)", worst.p99_ms, worst.second, worst.count),
        None => "none".to_owned(),
    }
}

/// `HH:MM:SS` (UTC) of a time given in ms since the Unix epoch, as logs print it.
pub fn utc_time_of_day(unix_ms: u64) -> String {
    let seconds = unix_ms / 1000 % 86_400;
    format!("{:02}:{:02}:{:02}", seconds / 3600, seconds / 60 % 60, seconds % 60)
}

/// `time` in µs since the Unix epoch (0 before it): the unit of stock's `recorded_at_us`.
pub fn epoch_us(time: std::time::SystemTime) -> i64 {
    time.duration_since(std::time::UNIX_EPOCH).map_or(0, |since| since.as_micros() as i64)
}

/// `time` in ms since the Unix epoch (0 before it).
pub fn unix_ms(time: std::time::SystemTime) -> u64 {
    epoch_us(time).unsigned_abs() / 1000
}

/// One run's results.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `pipeline` or `raw`.
    pub mode: &'static str,
    /// The run's name.
    pub label: String,
    /// `concurrency N` or `rate R/s`.
    pub load: String,
    /// When the measured window began, ms since the Unix epoch: to place the run beside other
    /// logs (RabbitMQ's, say) when it needs explaining.
    pub window_start_unix_ms: u64,
    /// Measured seconds (after the warm-up).
    pub seconds: f64,
    /// Requests sent in the measured window.
    pub sent: u64,
    /// Requests that succeeded (202, or a confirmed publish).
    pub succeeded: u64,
    /// Failures by kind (`503`, `timeout`...).
    pub failures: BTreeMap<String, u64>,
    /// Successes per second.
    pub throughput: f64,
    /// POST (or publish-to-confirm) latency.
    pub latency: Percentiles,
    /// Open loop: how late the load generator started each operation after its intended start
    /// (counted in `latency`).
    pub send_lag: Option<Percentiles>,
    /// Open loop: the same latency from when the operation actually started (without the load
    /// generator's own lag).
    pub from_send: Option<Percentiles>,
    /// The POST (or publish-to-confirm) latency second by second.
    pub timeline: Vec<Second>,
    /// POST-to-reserved latency (pipeline only).
    pub end_to_end: Option<Percentiles>,
    /// The POST-to-reserved latency second by second (pipeline only).
    pub end_to_end_timeline: Vec<Second>,
    /// Accepted orders stock never reserved within the follow-up window.
    pub not_reserved: u64,
}

impl Report {
    /// Prints the table, writes the JSON and the SVG the command line asked for.
    pub fn finish(&self, load: &Load) -> anyhow::Result<()> {
        println!("{}", self.table());
        if let Some(path) = &load.json {
            std::fs::write(path, serde_json::to_string_pretty(self)?)?;
        }
        if let Some(path) = &load.svg {
            std::fs::write(path, self.plot())?;
        }
        Ok(())
    }

    fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{} [{}] {} for {:.1} s", self.mode, self.label, self.load, self.seconds);
        let _ = writeln!(
            out,
            "  sent {}  succeeded {}  failures {:?}  throughput {:.0}/s",
            self.sent, self.succeeded, self.failures, self.throughput
        );
        let _ = writeln!(
            out,
            "  {:<22} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "latency (ms)", "p50", "p90", "p99", "p99.9", "max"
        );
        let row = |name: &str, p: &Percentiles| {
            format!(
                "  {:<22} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                name, p.p50_ms, p.p90_ms, p.p99_ms, p.p999_ms, p.max_ms
            )
        };
        let first = if self.mode == "raw" { "publish -> confirm" } else { "POST -> 202" };
        let _ = writeln!(out, "{}", row(first, &self.latency));
        if let Some(from_send) = &self.from_send {
            let _ = writeln!(out, "{}", row("  from the actual send", from_send));
        }
        if let Some(lag) = &self.send_lag {
            let _ = writeln!(out, "{}", row("sent late by", lag));
        }
        if let Some(e2e) = &self.end_to_end {
            let _ = writeln!(out, "{}", row("POST -> reserved", e2e));
            let _ = writeln!(out, "  not reserved: {}", self.not_reserved);
        }
        let _ = writeln!(out, "  worst second, {first}: {}", worst_second(&self.timeline));
        if self.end_to_end.is_some() {
            let _ = writeln!(out, "  worst second, POST -> reserved: {}", worst_second(&self.end_to_end_timeline));
        }
        out
    }

    /// Latency by percentile as an SVG, log-scaled toward the tail (x = 1/(1-p)).
    pub fn plot(&self) -> String {
        let (width, height, margin) = (640.0, 360.0, 50.0);
        let mut series = vec![("POST -> 202", &self.latency, "#1f77b4")];
        if let Some(e2e) = &self.end_to_end {
            series.push(("POST -> reserved", e2e, "#d62728"));
        }
        let max_ms = series.iter().flat_map(|(_, p, _)| p.curve.iter().map(|c| c.1)).fold(1.0_f64, f64::max);
        let x_of = |percentile: f64| {
            let tail = (1.0 / (1.0 - (percentile / 100.0).min(0.9999))).log10() / 4.0;
            margin + tail * (width - 2.0 * margin)
        };
        let y_of = |ms: f64| height - margin - ms / max_ms * (height - 2.0 * margin);
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{margin}\" y=\"20\">{} [{}], {}: latency by percentile</text>\n",
            self.mode, self.label, self.load
        );
        for (label, percentile) in [("0", 0.0), ("90", 90.0), ("99", 99.0), ("99.9", 99.9), ("99.99", 99.99)] {
            let x = x_of(percentile);
            let _ = writeln!(
                svg,
                "<line x1=\"{x:.1}\" y1=\"{margin}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">p{label}</text>",
                height - margin,
                height - margin + 16.0
            );
        }
        for step in 0..=4 {
            let ms = max_ms * f64::from(step) / 4.0;
            let y = y_of(ms);
            let _ = writeln!(svg, "<text x=\"{:.1}\" y=\"{y:.1}\" text-anchor=\"end\">{ms:.1} ms</text>", margin - 4.0);
        }
        for (index, (label, percentiles, color)) in series.iter().enumerate() {
            let points: Vec<String> =
                percentiles.curve.iter().map(|(p, ms)| format!("{:.1},{:.1}", x_of(*p), y_of(*ms))).collect();
            let _ = writeln!(
                svg,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
                points.join(" ")
            );
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{color}\">{label}</text>",
                margin + 10.0,
                margin + 16.0 * (index as f64 + 1.0)
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

/// A live progress line on stderr once a second.
pub fn progress(quiet: bool, elapsed: Duration, done: u64, last_second: u64, failures: u64, p99_ms: f64) {
    if !quiet {
        eprint!(
            "\r{:>6.1} s  {:>9} done  {:>7}/s  failures {:>6}  p99 {:>7.2} ms   ",
            elapsed.as_secs_f64(),
            done,
            last_second,
            failures,
            p99_ms
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_second_stands_out_of_the_timeline() {
        let mut timeline = Timeline::default();
        for _ in 0..1000 {
            timeline.record(0, 2_000);
            timeline.record(2, 2_000);
        }
        // Twenty orders of second 2 held for a quarter of a second: 2% of that second.
        for _ in 0..20 {
            timeline.record(2, 250_000);
        }
        let seconds = timeline.seconds();
        let counts: Vec<u64> = seconds.iter().map(|s| s.count).collect();
        assert_eq!(counts, [1000, 0, 1020]);
        assert!((seconds[0].p99_ms - 2.0).abs() < 0.05, "{seconds:?}");
        assert!((seconds[2].p99_ms - 250.0).abs() < 2.5, "{seconds:?}");
        assert!((seconds[2].max_ms - 250.0).abs() < 2.5, "{seconds:?}");
        assert!(worst_second(&seconds).ends_with("in second 2 (1020 orders)"), "{}", worst_second(&seconds));
        assert_eq!(worst_second(&[]), "none");
    }

    /// An open-loop run's table gives the latency from the actual send and how late the load
    /// generator sent, under the latency they qualify; a closed loop's has neither row.
    #[test]
    fn an_open_loop_table_shows_its_own_lateness() {
        let histogram_of = |values: &[u64]| {
            let mut histogram = histogram();
            values.iter().for_each(|&us| histogram.record(us).expect("in range"));
            histogram
        };
        let driven = crate::driver::Driven::<()> {
            seconds: 1.0,
            sent: 2,
            successes: vec![(), ()],
            failures: BTreeMap::new(),
            latency: histogram_of(&[5_000, 5_000]),
            timeline: Vec::new(),
            send_lag: Some(histogram_of(&[1_000, 1_000])),
            from_send: Some(histogram_of(&[4_000, 4_000])),
            window_start: std::time::UNIX_EPOCH,
        };
        let load = |rate| crate::Load { rate, duration: Some(1.0), ..crate::Load::for_test("table") };

        let open = driven.report("pipeline", &load(Some(2.0))).table();
        let rows: Vec<&str> = open.lines().skip(3).take(3).map(str::trim).collect();
        assert!(rows[0].starts_with("POST -> 202") && rows[0].contains("5.00"), "{open}");
        assert!(rows[1].starts_with("from the actual send") && rows[1].contains("4.00"), "{open}");
        assert!(rows[2].starts_with("sent late by") && rows[2].contains("1.00"), "{open}");

        let closed = crate::driver::Driven { send_lag: None, from_send: None, ..driven };
        let table = closed.report("pipeline", &load(None)).table();
        assert!(!table.contains("actual send") && !table.contains("sent late"), "{table}");
    }
}
