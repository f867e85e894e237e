//! Drives an operation under load: closed loop (a fixed number in flight) or open loop (a fixed
//! rate, latency counted from the intended start), for a count or a duration, after a warm-up.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::Load;
use crate::report::{Percentiles, Report, Second, Timeline, histogram, progress, unix_ms};

/// The index warm-up operations get.
pub const WARMUP: u64 = u64::MAX;

/// What the measured window saw.
pub struct Driven<T> {
    /// Length of the measured window.
    pub seconds: f64,
    /// Operations started in the window.
    pub sent: u64,
    /// What the successful ones returned.
    pub successes: Vec<T>,
    /// Failures by kind.
    pub failures: BTreeMap<String, u64>,
    /// Latency of the successful ones, µs.
    pub latency: Histogram<u64>,
    /// Their latency second by second, by intended start.
    pub timeline: Vec<Second>,
    /// Open loop: how late each measured operation started after its intended start, µs (the
    /// timer's tick and the wait for the load generator's thread; counted in `latency`).
    pub send_lag: Option<Histogram<u64>>,
    /// Open loop: the successful ones' latency from when they actually started, µs (`latency`
    /// less `send_lag`, one by one).
    pub from_send: Option<Histogram<u64>>,
    /// When the measured window began, by the wall clock: second 0 of `timeline`, for timelines
    /// of the same operations kept elsewhere (the pipeline's POST -> reserved).
    pub window_start: SystemTime,
}

impl<T> Driven<T> {
    /// The run's report as `mode` (`pipeline` or `raw`), without a POST -> reserved (the
    /// pipeline's to add).
    pub fn report(&self, mode: &'static str, load: &Load) -> Report {
        let succeeded = self.successes.len() as u64;
        Report {
            mode,
            label: load.label.clone(),
            load: load.describe(),
            window_start_unix_ms: unix_ms(self.window_start),
            seconds: self.seconds,
            sent: self.sent,
            succeeded,
            failures: self.failures.clone(),
            throughput: succeeded as f64 / self.seconds.max(f64::EPSILON),
            latency: Percentiles::of(&self.latency),
            send_lag: self.send_lag.as_ref().map(Percentiles::of),
            from_send: self.from_send.as_ref().map(Percentiles::of),
            timeline: self.timeline.clone(),
            end_to_end: None,
            end_to_end_timeline: Vec::new(),
            not_reserved: 0,
        }
    }
}

struct State<T> {
    successes: Vec<T>,
    failures: BTreeMap<String, u64>,
    latency: Histogram<u64>,
    send_lag: Histogram<u64>,
    from_send: Histogram<u64>,
    timeline: Timeline,
    sent: u64,
}

impl<T> State<T> {
    fn new() -> Self {
        Self {
            successes: Vec::new(),
            failures: BTreeMap::new(),
            latency: histogram(),
            send_lag: histogram(),
            from_send: histogram(),
            timeline: Timeline::default(),
            sent: 0,
        }
    }
}

/// Runs `operation(i)` under `load`.
pub async fn drive<T, F, Fut>(load: &Load, operation: F) -> Driven<T>
where
    T: Send + 'static,
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T, String>> + Send + 'static,
{
    let operation = Arc::new(operation);
    let state = Arc::new(Mutex::new(State::new()));
    let (limit, duration) = load.stop_after();
    let warmup = Duration::from_secs_f64(load.warmup);
    // Read first, so an operation's wall-clock time never places it a second earlier than its
    // intended start does.
    let window_start_wall = SystemTime::now() + warmup;
    let started = Instant::now();
    let window_start = started + warmup;
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));

    let open_loop = load.rate.is_some();
    // One attempt: measured only when it starts inside the window.
    let attempt = {
        let (state, done, operation) = (state.clone(), done.clone(), operation.clone());
        move |i: u64, intended: Instant| {
            let (state, done, operation) = (state.clone(), done.clone(), operation.clone());
            async move {
                let sent = Instant::now();
                let result = operation(i).await;
                let ended = Instant::now();
                if intended >= window_start {
                    let us = |duration: Duration| (duration.as_micros() as u64).max(1);
                    let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
                    state.sent += 1;
                    if open_loop {
                        let _ = state.send_lag.record(us(sent.saturating_duration_since(intended)));
                    }
                    match result {
                        Ok(value) => {
                            let us_latency = us(ended - intended);
                            let _ = state.latency.record(us_latency);
                            if open_loop {
                                let _ = state.from_send.record(us(ended - sent));
                            }
                            state.timeline.record((intended - window_start).as_secs() as usize, us_latency);
                            state.successes.push(value);
                        }
                        Err(kind) => *state.failures.entry(kind).or_default() += 1,
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    };
    let should_stop = {
        let stop = stop.clone();
        move |i: u64| {
            let over_count = limit.is_some_and(|limit| i >= limit);
            let over_time = duration.is_some_and(|d| Instant::now() >= window_start + d);
            if over_count || over_time {
                stop.store(true, Ordering::Relaxed);
            }
            stop.load(Ordering::Relaxed)
        }
    };

    let reporter = {
        let (state, done, stop, quiet) = (state.clone(), done.clone(), stop.clone(), load.quiet);
        tokio::spawn(async move {
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = done.load(Ordering::Relaxed);
                let (failures, p99) = {
                    let state = state.lock().unwrap_or_else(PoisonError::into_inner);
                    (state.failures.values().sum::<u64>(), state.latency.value_at_quantile(0.99) as f64 / 1000.0)
                };
                progress(quiet, started.elapsed(), now, now - last, failures, p99);
                last = now;
            }
        })
    };

    let mut tasks = tokio::task::JoinSet::new();
    match load.rate {
        None => {
            for _ in 0..load.concurrency.max(1) {
                let (attempt, should_stop, next) = (attempt.clone(), should_stop.clone(), next.clone());
                tasks.spawn(async move {
                    loop {
                        let now = Instant::now();
                        // Warm-up requests count toward nothing, the --orders limit included.
                        if now < window_start {
                            attempt(WARMUP, now).await;
                            continue;
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if should_stop(i) {
                            return;
                        }
                        attempt(i, now).await;
                    }
                });
            }
        }
        Some(rate) => {
            let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
            let mut k: u64 = 0;
            loop {
                // tokio's timer fires on whole milliseconds (a deadline is rounded up to the next
                // tick, and the runtime parks for whole milliseconds), and an attempt then waits
                // for this one thread to get to it, so an operation leaves up to about 2 ms after
                // its time (p99 at a few thousand a second), two or three to a tick: counted in its
                // latency, and reported (`send_lag`). A thread of its own sending each on time
                // cost the services more than it saved (README, "Benchmarks").
                let intended = started + interval.mul_f64(k as f64);
                tokio::time::sleep_until(intended).await;
                let i = if intended < window_start { WARMUP } else { next.fetch_add(1, Ordering::Relaxed) };
                if i != WARMUP && should_stop(i) {
                    break;
                }
                let attempt = attempt.clone();
                tasks.spawn(async move { attempt(i, intended).await });
                k += 1;
                // Reap finished tasks so the set stays small.
                while tasks.try_join_next().is_some() {}
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    stop.store(true, Ordering::Relaxed);
    let _ = reporter.await;
    if !load.quiet {
        eprintln!();
    }
    let seconds = match duration {
        Some(d) => d.as_secs_f64(),
        None => (Instant::now() - window_start).as_secs_f64(),
    };
    let state = std::mem::replace(&mut *state.lock().unwrap_or_else(PoisonError::into_inner), State::new());
    Driven {
        seconds,
        sent: state.sent,
        successes: state.successes,
        failures: state.failures,
        latency: state.latency,
        timeline: state.timeline.seconds(),
        send_lag: open_loop.then_some(state.send_lag),
        from_send: open_loop.then_some(state.from_send),
        window_start: window_start_wall,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An operation's wall-clock send time, placed by `window_start`, falls in the second the
    /// driver's own timeline counts it in: timelines kept elsewhere (POST -> reserved) line up.
    /// The open loop sends nothing before its time.
    #[tokio::test]
    async fn the_window_start_is_second_zero_of_the_timeline_and_nothing_leaves_early() {
        let load = crate::Load {
            // Four a second, 250 ms apart: a late send stays in its second.
            rate: Some(4.0),
            duration: Some(3.0),
            warmup: 0.5,
            ..crate::Load::for_test("timeline")
        };

        let driven = drive(&load, |i| async move { Ok::<_, String>((i, SystemTime::now())) }).await;

        let mut by_send_time = vec![0u64; driven.timeline.len()];
        for &(i, sent) in &driven.successes {
            let since_start = sent.duration_since(driven.window_start).expect("sent in the window");
            by_send_time[since_start.as_secs() as usize] += 1;
            // The window's i-th operation is due i intervals after its start (the warm-up's two
            // end exactly there), and the wall clock's window start was read before the schedule's.
            assert!(since_start >= Duration::from_millis(250) * i as u32, "operation {i} sent early: {since_start:?}");
        }
        let by_intended_start: Vec<u64> = driven.timeline.iter().map(|second| second.count).collect();
        assert_eq!(by_send_time, by_intended_start);
        assert_eq!(by_intended_start, [4, 4, 4]);
    }

    fn load(rate: Option<f64>, duration: f64) -> crate::Load {
        crate::Load { rate, duration: Some(duration), ..crate::Load::for_test("lag") }
    }

    /// The open loop counts how late it sent every operation, failures too, without their run
    /// time, and the successes' latency from the actual send, which is their latency less that
    /// lag; a closed loop, which sends each when the last ends, has neither.
    #[tokio::test]
    async fn the_open_loop_reports_its_own_lag_apart_from_the_operations_time() {
        const RUN: Duration = Duration::from_millis(100);
        let operation = |i: u64| async move {
            tokio::time::sleep(RUN).await;
            if i.is_multiple_of(2) { Ok(()) } else { Err("odd".to_owned()) }
        };

        let open = drive(&load(Some(20.0), 0.5), operation).await;
        let (lag, from_send) = (open.send_lag.expect("open loop"), open.from_send.expect("open loop"));
        assert_eq!((open.sent, lag.len(), from_send.len()), (10, 10, 5));
        let run_us = RUN.as_micros() as u64;
        assert!(from_send.min() >= run_us, "from the send: {} µs", from_send.min());
        assert!(lag.max() < run_us, "the lag holds the run time: {} µs", lag.max());
        assert!(open.latency.min() >= from_send.min() && open.latency.max() >= from_send.max());

        let closed = drive(&load(None, 0.3), operation).await;
        assert!(closed.sent > 0 && closed.send_lag.is_none() && closed.from_send.is_none());
    }
}
