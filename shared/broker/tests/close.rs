//! A service's shutdown closes its channels, then its connection: the broker sees a clean close.

use std::time::{Duration, Instant};

use tracehop_broker::connection::{Broker, BrokerNodes};
use tracehop_testkit::rabbit::TestVhost;

async fn connect(vhost: &TestVhost) -> Broker {
    let nodes = BrokerNodes::parse(vhost.url()).expect("nodes");
    Broker::connect(nodes, "close-test", Duration::from_secs(30)).await.expect("connect")
}

/// Dropped rather than closed, the channels would be closed by lapin's I/O thread after the
/// connection's close began: lapin 4.12 then fails them and ends the connection in error.
#[tokio::test]
async fn channels_closed_before_their_connection_leave_it_closed_cleanly() {
    let vhost = TestVhost::create();
    let broker = connect(&vhost).await;
    let channels = [broker.channel().await.expect("channel").0, broker.channel().await.expect("channel").0];

    broker.close_channels(channels, Instant::now() + Duration::from_millis(500)).await;
    broker.close().await;

    let link = broker.link();
    let status = link.connection.status();
    assert!(status.closed(), "the connection did not close cleanly: {status:?}");
}
