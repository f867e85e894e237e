//! The shared topology on the real broker: declarable twice, and its retry and dead-letter
//! paths route where the consumer expects.

use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tracehop_broker::topology;
use tracehop_testkit::rabbit::TestVhost;

async fn channel(vhost: &TestVhost) -> (Connection, Channel) {
    let connection = Connection::connect(vhost.url(), ConnectionProperties::default()).await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirms");
    (connection, channel)
}

async fn publish(channel: &Channel, exchange: &str, routing_key: &str, body: &[u8]) {
    channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
}

async fn get_within(channel: &Channel, queue: &str, timeout: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(message) = channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.expect("get") {
            return Some(message.delivery.data);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test]
async fn both_services_can_declare_the_same_topology() {
    let vhost = TestVhost::create();
    let (_a, first) = channel(&vhost).await;
    let (_b, second) = channel(&vhost).await;
    topology::declare(&first).await.expect("first declaration");
    topology::declare(&second).await.expect("an identical redeclaration is accepted");
}

#[tokio::test]
async fn events_reach_the_stock_queue() {
    let vhost = TestVhost::create();
    let (_connection, channel) = channel(&vhost).await;
    topology::declare(&channel).await.expect("declare");
    publish(&channel, topology::EXCHANGE, topology::ROUTING_KEY, b"event").await;
    assert_eq!(get_within(&channel, topology::QUEUE, Duration::from_secs(2)).await.as_deref(), Some(&b"event"[..]));
}

#[tokio::test]
async fn a_retried_message_comes_back_after_the_delay() {
    let vhost = TestVhost::create();
    let (_connection, channel) = channel(&vhost).await;
    topology::declare(&channel).await.expect("declare");
    let sent = Instant::now();
    publish(&channel, "", topology::RETRY_QUEUE, b"again").await;
    assert_eq!(
        channel
            .basic_get(topology::QUEUE.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .map(|m| m.delivery.data),
        None,
        "not before the delay"
    );
    let back = get_within(&channel, topology::QUEUE, topology::RETRY_DELAY * 5).await;
    assert_eq!(back.as_deref(), Some(&b"again"[..]));
    assert!(sent.elapsed() >= topology::RETRY_DELAY, "came back after {:?}", sent.elapsed());
}

#[tokio::test]
async fn the_dead_letter_exchange_feeds_the_dlq() {
    let vhost = TestVhost::create();
    let (_connection, channel) = channel(&vhost).await;
    topology::declare(&channel).await.expect("declare");
    publish(&channel, topology::DEAD_LETTER_EXCHANGE, "anything", b"poison").await;
    let dead = get_within(&channel, topology::DEAD_LETTER_QUEUE, Duration::from_secs(2)).await;
    assert_eq!(dead.as_deref(), Some(&b"poison"[..]));
}

#[tokio::test]
async fn a_message_returned_too_often_is_dead_lettered_by_the_broker() {
    use lapin::options::BasicNackOptions;
    // What ends a crash loop: every consumer crash returns the message to the queue.
    let vhost = TestVhost::create();
    let (_connection, channel) = channel(&vhost).await;
    topology::declare(&channel).await.expect("declare");
    publish(&channel, topology::EXCHANGE, topology::ROUTING_KEY, b"crashes its consumer").await;
    let mut deliveries = 0;
    loop {
        let Some(message) =
            channel.basic_get(topology::QUEUE.into(), BasicGetOptions { no_ack: false }).await.expect("get")
        else {
            if let Some(dead) = get_within(&channel, topology::DEAD_LETTER_QUEUE, Duration::from_millis(200)).await {
                assert_eq!(dead, b"crashes its consumer");
                break;
            }
            continue;
        };
        deliveries += 1;
        assert!(deliveries <= topology::DELIVERY_LIMIT + 1, "the message was never dead-lettered");
        message
            .delivery
            .acker
            .nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() })
            .await
            .expect("nack");
    }
    assert_eq!(deliveries, topology::DELIVERY_LIMIT + 1, "delivered once plus DELIVERY_LIMIT redeliveries");
}
