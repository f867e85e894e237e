//! Orders through the gateway, each followed until stock reserved it.
//!
//! The POST latency is the gateway's answer; the end-to-end latency runs from the moment the
//! order was sent to the moment stock committed its reservation (`recorded_at_us` from stock's
//! admin API; the same machine's clock). Reservations are looked up after the load, so the
//! lookups do not compete with it.

use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::Value;

use crate::Load;
use crate::driver::{Driven, drive};
use crate::report::{Percentiles, Report, Second, Timeline, epoch_us, histogram};

/// The gateway's answer to an accepted order (its other fields are not needed here).
#[derive(Deserialize)]
struct Accepted {
    /// Absent or not a string: the `no order id` failure.
    order_id: Option<String>,
}

/// How long an order's POST may take, its answer's body included, before it counts as a
/// `timeout` failure.
const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long stock may take to reserve the orders being followed, the last of them included.
pub const FOLLOW_WAIT: Duration = Duration::from_secs(60);
/// How long one lookup of an order in stock's admin API may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The gateway's order endpoint and the client of the POSTs: hyper's pooled client over plain
/// TCP (no delay), one connection per order in flight, the URI parsed once. Not reqwest, which
/// parses each request's URL more than once (to build the request, and again in its redirect
/// policy, which runs on every request): that, with the bodies going through
/// `serde_json::Value`, was most of the load generator's work per order, on the two cores the
/// services and the broker share. Kept from one run to the next by whoever runs several against
/// the same services (the interleaved comparison's slices), so that a run does not open its
/// connections afresh.
pub struct Orders {
    /// `/api/checkout` on the gateway.
    uri: Uri,
    /// Its connections pooled, one per order in flight.
    post: Client<HttpConnector, Full<Bytes>>,
    /// Whether each order goes with a trace context of its own ([`traceparent`]).
    traced: bool,
}

impl Orders {
    /// POSTs to `gateway`'s `/api/checkout`; `traced`: each with a `traceparent` of its own, as
    /// from a traced client.
    pub fn new(gateway: &str, traced: bool) -> anyhow::Result<Self> {
        let uri: Uri = format!("{}/api/checkout", gateway.trim_end_matches('/'))
            .parse()
            .map_err(|error| anyhow::anyhow!("the gateway URL {gateway:?} is not a valid URI: {error}"))?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let post = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1024).build(connector);
        Ok(Self { uri, post, traced })
    }

    /// The orders' POSTs, as the load says: each success is the order's id and when it was sent.
    async fn post(&self, load: &Load) -> Driven<(String, i64)> {
        let (post, uri, traced) = (self.post.clone(), self.uri.clone(), self.traced);
        drive(load, move |i| {
            let (post, uri) = (post.clone(), uri.clone());
            async move {
                let mut request = Request::post(uri);
                if traced {
                    request = request.header(&TRACEPARENT, traceparent());
                }
                let request = request
                    .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                    .body(Full::new(order_body(i)))
                    .map_err(|_| "request".to_owned())?;
                let sent_at = epoch_us(SystemTime::now());
                // Within the timeout: the answer's head and its whole body.
                let answer = async {
                    let response = post.request(request).await.map_err(|_| "connection".to_owned())?;
                    let status = response.status();
                    let body = response.into_body().collect().await;
                    if status != StatusCode::ACCEPTED {
                        // The body is read (whatever became of it) so the connection can be reused.
                        return Err(status.as_u16().to_string());
                    }
                    Ok(body.map_err(|_| "connection".to_owned())?.to_bytes())
                };
                let body = tokio::time::timeout(POST_TIMEOUT, answer).await.map_err(|_| "timeout".to_owned())??;
                let accepted: Accepted = serde_json::from_slice(&body).map_err(|_| "bad body".to_owned())?;
                let order_id = accepted.order_id.ok_or_else(|| "no order id".to_owned())?;
                Ok((order_id, sent_at))
            }
        })
        .await
    }
}

/// Stock's admin API and the client of the lookups in it (kept like [`Orders`]).
pub struct Lookups {
    /// Stock's admin API, without a trailing `/`.
    stock: String,
    /// Its connections pooled.
    http: reqwest::Client,
}

impl Lookups {
    /// Looks orders up at `stock`'s `/api/orders/{id}`.
    pub fn new(stock: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder().timeout(LOOKUP_TIMEOUT).pool_max_idle_per_host(1024).build()?;
        Ok(Self { stock: stock.trim_end_matches('/').to_owned(), http })
    }
}

/// The W3C trace context header, its name made once.
static TRACEPARENT: hyper::header::HeaderName = hyper::header::HeaderName::from_static("traceparent");

/// A W3C `traceparent` of a new sampled trace: random trace and parent ids, never all zeros.
fn traceparent() -> String {
    let (trace, parent) = (uuid::Uuid::new_v4().as_u128(), uuid::Uuid::new_v4().as_u64_pair().0);
    // A version 4 UUID has its version bits set, so neither id is zero.
    format!("00-{trace:032x}-{parent:016x}-01")
}

/// An order's JSON body: one unit of SKU-001 for customer `load-{i}`.
fn order_body(i: u64) -> Bytes {
    Bytes::from(format!(r#"{{"customer_id":"load-{i}","items":[{{"sku":"SKU-001","quantity":1}}]}}"#))
}

/// Runs the pipeline load and, given stock's admin API, follows every accepted order.
pub async fn run(orders: &Orders, stock: Option<&str>, load: &Load) -> anyhow::Result<Report> {
    let driven = orders.post(load).await;
    let (end_to_end, end_to_end_timeline, not_reserved) = match stock {
        Some(stock) => {
            let origin = epoch_us(driven.window_start);
            let followed = follow(&Lookups::new(stock)?, &driven.successes, origin, FOLLOW_WAIT).await;
            (Some(Percentiles::of(&followed.latency)), followed.timeline, followed.not_reserved)
        }
        None => (None, Vec::new(), 0),
    };
    Ok(Report { end_to_end, end_to_end_timeline, not_reserved, ..driven.report("pipeline", load) })
}

/// Runs the pipeline load, then waits until stock has reserved the `last` orders accepted last
/// (at a fixed concurrency, those still on their way when the load stopped), so that the stack's
/// backlog is behind it before anything else is measured on the machine. An order among them
/// that stock never reserves fails the run: an order was lost. The report has no end-to-end
/// latency (only those few were followed). `wait`: how long stock may take (a minute, as for
/// every order in [`run`], outside the tests).
pub async fn run_drained(
    orders: &Orders,
    lookups: &Lookups,
    load: &Load,
    last: usize,
    wait: Duration,
) -> anyhow::Result<Report> {
    let driven = orders.post(load).await;
    let tail = &driven.successes[driven.successes.len().saturating_sub(last)..];
    let followed = follow(lookups, tail, epoch_us(driven.window_start), wait).await;
    anyhow::ensure!(
        followed.not_reserved == 0,
        "{}: {} of the last {} accepted orders were not reserved within {wait:?}",
        load.label,
        followed.not_reserved,
        tail.len()
    );
    Ok(driven.report("pipeline", load))
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

/// Looks up when each accepted order was reserved, 64 lookups at a time (waiting up to `wait`
/// for the last ones). `origin`: the measured window's start, µs since the epoch.
async fn follow(lookups: &Lookups, accepted: &[(String, i64)], origin: i64, wait: Duration) -> Followed {
    let mut histogram = histogram();
    let mut timeline = Timeline::default();
    let deadline = tokio::time::Instant::now() + wait;
    let (http, base) = (&lookups.http, format!("{}/api/orders", lookups.stock));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves `app` on a loopback port of its own; its base URL (`http://127.0.0.1:port`).
    async fn serve(app: axum::Router) -> anyhow::Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        tokio::spawn(axum::serve(listener, app).into_future());
        Ok(base)
    }

    /// Over real HTTP on loopback: each POST reaches the gateway as a JSON order, and every
    /// answer but an accepted order with its id is counted as the failure it is.
    #[tokio::test]
    async fn each_answer_is_counted_as_what_it_is() -> anyhow::Result<()> {
        use axum::Json;
        use axum::http::StatusCode as Status;
        use axum::response::IntoResponse as _;

        let gateway = axum::routing::post(|Json(order): Json<Value>| async move {
            let customer = order["customer_id"].as_str().unwrap_or_default().to_owned();
            let n: u64 = customer.trim_start_matches("load-").parse().unwrap_or(u64::MAX);
            match n % 4 {
                0 => (Status::ACCEPTED, Json(serde_json::json!({"order_id": format!("o-{n}")}))).into_response(),
                1 => (Status::ACCEPTED, Json(serde_json::json!({"status": "accepted"}))).into_response(),
                2 => (Status::ACCEPTED, "not json").into_response(),
                _ => (Status::SERVICE_UNAVAILABLE, "broker down").into_response(),
            }
        });
        let base = serve(axum::Router::new().route("/api/checkout", gateway)).await?;
        let load = Load { concurrency: 4, orders: Some(8), ..Load::for_test("answers") };

        let report = run(&Orders::new(&format!("{base}/"), false)?, None, &load).await?;

        assert_eq!(report.succeeded, 2, "{report:?}");
        let failures: Vec<(&str, u64)> = report.failures.iter().map(|(kind, count)| (kind.as_str(), *count)).collect();
        assert_eq!(failures, [("503", 2), ("bad body", 2), ("no order id", 2)]);
        Ok(())
    }

    /// Over real HTTP on loopback: a drained run looks up only its last accepted orders, and fails
    /// when stock does not reserve them.
    #[tokio::test]
    async fn a_drained_run_follows_its_last_orders_and_fails_when_one_is_not_reserved() -> anyhow::Result<()> {
        use std::sync::{Arc, Mutex};

        use axum::Json;
        use axum::extract::{Path, State};
        use axum::http::StatusCode as Status;
        use axum::response::IntoResponse as _;

        /// What stock saw, and whether it has lost every order.
        #[derive(Default)]
        struct Stock {
            lost: bool,
            looked_up: Vec<String>,
        }
        type Shared = Arc<Mutex<Stock>>;
        let gateway = axum::routing::post(|Json(order): Json<Value>| async move {
            let customer = order["customer_id"].as_str().unwrap_or_default().to_owned();
            (Status::ACCEPTED, Json(serde_json::json!({"order_id": customer})))
        });
        // Stock reserves every order looked up, unless told it lost them all.
        let stock: Shared = Arc::default();
        let lookup = axum::routing::get(|State(stock): State<Shared>, Path(id): Path<String>| async move {
            let mut stock = stock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            stock.looked_up.push(id);
            if stock.lost {
                Status::NOT_FOUND.into_response()
            } else {
                Json(serde_json::json!({"recorded_at_us": epoch_us(SystemTime::now())})).into_response()
            }
        });
        let app = axum::Router::new()
            .route("/api/checkout", gateway)
            .route("/api/orders/{id}", lookup)
            .with_state(stock.clone());
        let base = serve(app).await?;
        let load = Load { concurrency: 1, orders: Some(10), ..Load::for_test("drained") };
        let (orders, lookups) = (Orders::new(&base, false)?, Lookups::new(&base)?);

        let report = run_drained(&orders, &lookups, &load, 3, Duration::from_secs(5)).await?;
        assert_eq!(report.succeeded, 10);
        assert!(report.end_to_end.is_none());
        // One order at a time: the last three accepted are the last three sent.
        let looked_up = std::mem::take(&mut stock.lock().unwrap_or_else(std::sync::PoisonError::into_inner).looked_up);
        assert_eq!(looked_up, ["load-7", "load-8", "load-9"]);

        stock.lock().unwrap_or_else(std::sync::PoisonError::into_inner).lost = true;
        let lost = run_drained(&orders, &lookups, &load, 3, Duration::from_millis(300)).await;
        let error = lost.expect_err("orders stock never reserved").to_string();
        assert!(error.contains("3 of the last 3 accepted orders were not reserved"), "{error}");
        Ok(())
    }

    /// Over real HTTP on loopback: traced orders each carry a `traceparent` of a sampled trace of
    /// their own, which the gateway's W3C parsing would take; untraced orders carry none.
    #[tokio::test]
    async fn traced_orders_each_send_a_trace_context_of_their_own() -> anyhow::Result<()> {
        use std::sync::{Arc, Mutex};

        use axum::Json;
        use axum::extract::State;
        use axum::http::{HeaderMap, StatusCode as Status};

        // The gateway notes each POST's `traceparent`, or its absence.
        type Seen = Arc<Mutex<Vec<Option<String>>>>;
        let gateway = axum::routing::post(|State(seen): State<Seen>, headers: HeaderMap| async move {
            let traceparent = headers.get("traceparent").map(|v| v.to_str().unwrap_or("not ASCII").to_owned());
            seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(traceparent);
            (Status::ACCEPTED, Json(serde_json::json!({"order_id": "o"})))
        });
        let seen: Seen = Arc::default();
        let app = axum::Router::new().route("/api/checkout", gateway).with_state(seen.clone());
        let base = serve(app).await?;
        let load = Load { concurrency: 2, orders: Some(20), ..Load::for_test("traced") };
        let take = || std::mem::take(&mut *seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner));

        assert_eq!(Orders::new(&base, true)?.post(&load).await.successes.len(), 20);
        let traced: Vec<String> = take().into_iter().collect::<Option<_>>().expect("every order has a traceparent");
        let mut traces = std::collections::BTreeSet::new();
        for traceparent in &traced {
            let parts: Vec<&str> = traceparent.split('-').collect();
            let hex = |part: &str, len: usize| {
                part.len() == len && part.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            };
            assert!(
                parts.len() == 4
                    && parts[0] == "00"
                    && hex(parts[1], 32)
                    && hex(parts[2], 16)
                    && parts[3] == "01"
                    && parts[1].bytes().any(|b| b != b'0')
                    && parts[2].bytes().any(|b| b != b'0'),
                "not a sampled W3C traceparent: {traceparent}"
            );
            traces.insert(parts[1].to_owned());
        }
        assert_eq!(traces.len(), 20, "orders shared a trace: {traced:?}");

        assert_eq!(Orders::new(&base, false)?.post(&load).await.successes.len(), 20);
        assert_eq!(take(), vec![None; 20]);
        Ok(())
    }

    /// Over real HTTP on loopback: a second run with the same [`Orders`] sends its POSTs over the
    /// connections the first opened (the interleaved comparison's slices), not new ones.
    #[tokio::test]
    async fn runs_with_the_same_clients_reuse_their_connections() -> anyhow::Result<()> {
        use std::collections::BTreeSet;
        use std::net::SocketAddr;
        use std::sync::{Arc, Mutex};

        use axum::Json;
        use axum::extract::{ConnectInfo, State};
        use axum::http::StatusCode as Status;

        // The gateway notes each POST's connection, by its client's address.
        type Clients = Arc<Mutex<BTreeSet<SocketAddr>>>;
        let gateway = axum::routing::post(
            |State(clients): State<Clients>, ConnectInfo(client): ConnectInfo<SocketAddr>| async move {
                clients.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(client);
                (Status::ACCEPTED, Json(serde_json::json!({"order_id": "o"})))
            },
        );
        let clients: Clients = Arc::default();
        let app = axum::Router::new().route("/api/checkout", gateway).with_state(clients.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        tokio::spawn(axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).into_future());
        let load = Load { concurrency: 4, orders: Some(40), ..Load::for_test("reused") };
        let orders = Orders::new(&base, false)?;
        let take = || std::mem::take(&mut *clients.lock().unwrap_or_else(std::sync::PoisonError::into_inner));

        assert_eq!(orders.post(&load).await.successes.len(), 40);
        let first = take();
        assert_eq!(orders.post(&load).await.successes.len(), 40);
        let second = take();

        // hyper may open another connection when a request looks for one just before its
        // predecessor's is back in the pool, in either run; a client of its own per run would
        // share none.
        let shared = second.intersection(&first).count();
        assert!(shared > 0, "the second run opened only new connections: {first:?} then {second:?}");
        Ok(())
    }
}
