//! The ceiling the pipeline is measured against: the same `checkout.processed` message, with
//! the same headers and properties, published straight to RabbitMQ with confirms, one
//! outstanding publish per channel (as checkout does), into a durable quorum queue of its own.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Mutex;

use crate::Load;
use crate::driver::drive;
use crate::report::Report;

const EXCHANGE: &str = "bench.raw";
const QUEUE: &str = "bench.raw";

/// Publishes under `load` and reports the confirmed rate.
pub async fn run(amqp: &str, load: &Load) -> anyhow::Result<Report> {
    let connection = Connection::connect(amqp, ConnectionProperties::default()).await?;
    let setup = connection.create_channel().await?;
    setup
        .exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("quorum")));
    setup.queue_declare(QUEUE.into(), QueueDeclareOptions { durable: true, ..Default::default() }, arguments).await?;
    setup
        .queue_bind(
            QUEUE.into(),
            EXCHANGE.into(),
            "checkout.processed".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    setup.queue_purge(QUEUE.into(), Default::default()).await?;

    let in_flight = load.concurrency.max(1);
    let mut channels = Vec::with_capacity(in_flight);
    for _ in 0..in_flight {
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        channels.push(channel);
    }
    let pool: Arc<Mutex<Vec<Channel>>> = Arc::new(Mutex::new(channels));
    let driven = drive(load, move |i| {
        let pool = pool.clone();
        async move {
            let channel = pool.lock().await.pop().ok_or("no channel")?;
            let outcome = publish(&channel, i).await;
            pool.lock().await.push(channel);
            outcome
        }
    })
    .await;
    // Leave nothing behind on the broker.
    let _ = setup.queue_delete(QUEUE.into(), QueueDeleteOptions::default()).await;
    let _ = connection.close(200, "done".into()).await;
    Ok(driven.report("raw", load))
}

async fn publish(channel: &Channel, i: u64) -> Result<(), String> {
    let order_id = uuid::Uuid::now_v7().to_string();
    let body = serde_json::json!({
        "order_id": order_id,
        "customer_id": format!("load-{i}"),
        "items": [{"sku": "SKU-001", "quantity": 1}],
        "total_cents": 2450,
    });
    let mut headers = FieldTable::default();
    let traceparent =
        format!("00-{}-{}-01", uuid::Uuid::new_v4().simple(), &uuid::Uuid::new_v4().simple().to_string()[..16]);
    headers.insert("traceparent".into(), AMQPValue::LongString(LongString::from(traceparent)));
    headers.insert("baggage".into(), AMQPValue::LongString(LongString::from(format!("customer.id=load-{i}"))));
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_type("checkout.processed".into())
        .with_message_id(order_id.as_str().into())
        .with_delivery_mode(2)
        .with_headers(headers);
    let options = BasicPublishOptions { mandatory: true, ..Default::default() };
    let confirm = channel
        .basic_publish(EXCHANGE.into(), "checkout.processed".into(), options, body.to_string().as_bytes(), properties)
        .await
        .map_err(|_| "publish".to_owned())?;
    match tokio::time::timeout(Duration::from_secs(10), confirm).await {
        Ok(Ok(Confirmation::Ack(None))) => Ok(()),
        Ok(Ok(_)) => Err("not confirmed".to_owned()),
        Ok(Err(_)) => Err("broker".to_owned()),
        Err(_) => Err("timeout".to_owned()),
    }
}
