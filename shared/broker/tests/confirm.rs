//! Confirm-mode channels lent one publish at a time: a channel goes back to the pool only with
//! no confirm still to come on it.

use std::time::Duration;

use futures_util::FutureExt as _;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation};
use tracehop_broker::confirm::{ConfirmChannels, LeaseError};
use tracehop_broker::connection::{Broker, BrokerNodes};
use tracehop_testkit::rabbit::TestVhost;

const QUEUE: &str = "confirm-test";

async fn connect(vhost: &TestVhost) -> Broker {
    let nodes = BrokerNodes::parse(vhost.url()).expect("nodes");
    let broker = Broker::connect(nodes, "confirm-test", Duration::from_secs(30)).await.expect("connect");
    let (channel, _) = broker.channel().await.expect("channel");
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    channel.queue_declare(QUEUE.into(), durable, FieldTable::default()).await.expect("queue");
    broker
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

fn mandatory() -> BasicPublishOptions {
    BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() }
}

/// A pool of `size` channels on a connection to a vhost of its own (kept for the test's life).
async fn pool_of(size: usize) -> (TestVhost, Broker, ConfirmChannels) {
    let vhost = TestVhost::create();
    let broker = connect(&vhost).await;
    let pool = ConfirmChannels::new(broker.clone(), size);
    (vhost, broker, pool)
}

/// Closes `channels`, then the connection, as a service's shutdown does.
async fn shut_down(broker: &Broker, channels: Vec<lapin::Channel>) {
    broker.close_channels(channels, std::time::Instant::now() + Duration::from_secs(1)).await;
    broker.close().await;
}

#[tokio::test]
async fn a_lease_given_up_before_its_confirm_closes_its_channel_instead_of_pooling_it() {
    let (_vhost, broker, pool) = pool_of(2).await;
    let options = mandatory();

    let mut lease = pool.lease(broker.generation()).await.expect("lease");
    let confirmed = lease.publish("", QUEUE, options, b"one", persistent()).await.expect("publish");
    assert!(matches!(confirmed, Confirmation::Ack(None)), "{confirmed:?}");
    drop(lease);
    let pooled = pool.idle();
    assert_eq!(pooled.len(), 1, "a confirmed publish gives its channel back");

    // The same channel, lent again; the caller gives up before the broker's confirm (the
    // publish polled once, then dropped, as a deadline drops it).
    let mut lease = pool.lease(broker.generation()).await.expect("lease");
    assert!(pool.idle().is_empty(), "the idle channel was lent");
    let given_up = lease.publish("", QUEUE, options, b"two", persistent()).now_or_never();
    assert!(given_up.is_none(), "the confirm came within one poll");
    drop(lease);
    assert!(pool.idle().is_empty(), "a channel with a confirm still to come went back to the pool");
    let closed = async {
        while pooled[0].status().connected() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), closed).await.expect("the abandoned channel is closed");

    // The next publish gets a channel of its own, and its confirm.
    let mut lease = pool.lease(broker.generation()).await.expect("lease");
    let confirmed = lease.publish("", QUEUE, options, b"three", persistent()).await.expect("publish");
    assert!(matches!(confirmed, Confirmation::Ack(None)), "{confirmed:?}");
    drop(lease);
    assert_eq!(pool.idle().len(), 1);
    assert_ne!(pool.idle()[0].id(), pooled[0].id(), "a new channel");
    shut_down(&broker, pool.close()).await;
}

#[tokio::test]
async fn an_unroutable_publish_is_returned_to_its_own_lease_and_a_closed_pool_lends_nothing() {
    let (_vhost, broker, pool) = pool_of(1).await;
    let options = mandatory();
    let mut lease = pool.lease(broker.generation()).await.expect("lease");
    let returned = lease.publish("", "no-such-queue", options, b"lost?", persistent()).await.expect("publish");
    assert!(matches!(returned, Confirmation::Ack(Some(_))), "{returned:?}");
    drop(lease);
    assert_eq!(pool.idle().len(), 1, "a returned message settles the channel: it is pooled again");

    let idle = pool.close();
    assert_eq!(idle.len(), 1);
    assert!(matches!(pool.lease(broker.generation()).await, Err(LeaseError::Closed)));
    shut_down(&broker, idle).await;
}

#[tokio::test]
async fn work_of_a_replaced_connection_gets_no_channel_of_the_new_one() {
    let (_vhost, broker, pool) = pool_of(2).await;
    // A delivery that came on another connection than the current one (stock's, after a
    // replacement): its copy must not be confirmed here while its ack goes there.
    let stale = broker.generation().wrapping_sub(1);
    assert!(matches!(pool.lease(stale).await, Err(LeaseError::Replaced)));
    assert_eq!(pool.idle().len(), 1, "the channel opened meanwhile is kept for the current connection's work");
    let lease = pool.lease(broker.generation()).await.expect("the current connection's lease");
    drop(lease);
    shut_down(&broker, pool.close()).await;
}

#[tokio::test]
async fn an_abandoned_lease_publishes_no_more_and_a_lease_ended_after_close_is_not_pooled() {
    let (_vhost, broker, pool) = pool_of(2).await;
    let options = mandatory();

    // Kept after its publish was given up: a second publish on that channel could take the
    // first one's return.
    let mut lease = pool.lease(broker.generation()).await.expect("lease");
    assert!(lease.publish("", QUEUE, options, b"one", persistent()).now_or_never().is_none());
    let again = lease.publish("", QUEUE, options, b"two", persistent()).await;
    assert!(matches!(again, Err(LeaseError::Closed)), "{again:?}");
    drop(lease);
    assert!(pool.idle().is_empty());

    // Out when the pool closes (a publish still under way at shutdown): closed when it ends.
    let mut lease = pool.lease(broker.generation()).await.expect("lease");
    lease.publish("", QUEUE, options, b"three", persistent()).await.expect("confirmed");
    let idle = pool.close();
    assert!(idle.is_empty());
    drop(lease);
    assert!(pool.idle().is_empty(), "a channel went back to a closed pool, where nothing closes it");
    broker.close().await;
}
