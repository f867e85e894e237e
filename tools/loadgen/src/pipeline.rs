//! Orders through the gateway, each followed until stock reserved it.
//!
//! The POST latency is the gateway's answer; the end-to-end latency runs from the moment the
//! order was sent to the moment stock committed its reservation (`recorded_at_us` from stock's
//! admin API; the same machine's clock). Reservations are looked up after the load, so the
//! lookups do not compete with it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::Load;
use crate::driver::drive;
use crate::report::{Percentiles, Report, Second, Timeline, histogram};

/// `time` in µs since the epoch: the unit of stock's `recorded_at_us`.
fn epoch_us(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// Runs the pipeline load and, given stock's admin API, follows every accepted order.
pub async fn run(gateway: &str, stock: Option<&str>, load: &Load) -> anyhow::Result<Report> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).pool_max_idle_per_host(1024).build()?;
    let url = format!("{}/api/checkout", gateway.trim_end_matches('/'));
    let driven = {
        let (http, url) = (http.clone(), url.clone());
        drive(load, move |i| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let body = json!({"customer_id": format!("load-{i}"), "items": [{"sku": "SKU-001", "quantity": 1}]});
                let sent_at = epoch_us(SystemTime::now());
                let response = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await
                    .map_err(|e| if e.is_timeout() { "timeout".to_owned() } else { "connection".to_owned() })?;
                let status = response.status().as_u16();
                if status != 202 {
                    return Err(status.to_string());
                }
                let body: Value = response.json().await.map_err(|_| "bad body".to_owned())?;
                let order_id = body["order_id"].as_str().ok_or("no order id")?.to_owned();
                Ok((order_id, sent_at))
            }
        })
        .await
    };
    let (end_to_end, end_to_end_timeline, not_reserved) = match stock {
        Some(stock) => {
            let followed = follow(&http, stock, &driven.successes, epoch_us(driven.window_start)).await;
            (Some(Percentiles::of(&followed.latency)), followed.timeline, followed.not_reserved)
        }
        None => (None, Vec::new(), 0),
    };
    Ok(Report {
        mode: "pipeline",
        label: load.label.clone(),
        load: describe(load),
        seconds: driven.seconds,
        sent: driven.sent,
        succeeded: driven.successes.len() as u64,
        failures: driven.failures,
        throughput: driven.successes.len() as f64 / driven.seconds.max(f64::EPSILON),
        latency: Percentiles::of(&driven.latency),
        timeline: driven.timeline,
        end_to_end,
        end_to_end_timeline,
        not_reserved,
    })
}

/// `concurrency N` or `rate R/s`.
pub fn describe(load: &Load) -> String {
    match load.rate {
        Some(rate) => format!("rate {rate:.0}/s"),
        None => format!("concurrency {}", load.concurrency),
    }
}

/// What following the accepted orders found.
struct Followed {
    /// POST to reserved, µs.
    latency: hdrhistogram::Histogram<u64>,
    /// The same, by the second of the measured window in which each order was sent (the POST
    /// timeline's seconds).
    timeline: Vec<Second>,
    /// Orders stock had not reserved by the deadline.
    not_reserved: u64,
}

/// Looks up when each accepted order was reserved, 64 lookups at a time (waiting up to a minute
/// for the last ones). `origin`: the measured window's start, µs since the epoch.
async fn follow(http: &reqwest::Client, stock: &str, accepted: &[(String, i64)], origin: i64) -> Followed {
    let mut histogram = histogram();
    let mut timeline = Timeline::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let base = format!("{}/api/orders", stock.trim_end_matches('/'));
    let mut missing = 0;
    for chunk in accepted.chunks(64) {
        let lookups = chunk.iter().map(|(order_id, sent_at)| {
            let (http, url) = (http.clone(), format!("{base}/{order_id}"));
            async move {
                loop {
                    if let Ok(response) = http.get(&url).send().await
                        && response.status().is_success()
                        && let Ok(body) = response.json::<Value>().await
                        && let Some(recorded) = body["recorded_at_us"].as_i64()
                    {
                        return Some((recorded - sent_at).max(1) as u64);
                    }
                    if tokio::time::Instant::now() > deadline {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        for (latency, (_, sent_at)) in futures_util::future::join_all(lookups).await.into_iter().zip(chunk) {
            match latency {
                Some(us) => {
                    let _ = histogram.record(us);
                    timeline.record(((sent_at - origin).max(0) / 1_000_000) as usize, us);
                }
                None => missing += 1,
            }
        }
    }
    Followed { latency: histogram, timeline: timeline.seconds(), not_reserved: missing }
}
