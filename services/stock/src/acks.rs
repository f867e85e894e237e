//! Acks of one channel's deliveries, sent together where they can be: one `multiple` ack for
//! every handled delivery below the first one still unsettled, one ack each for the others.
//!
//! Each ack is a command in a quorum queue's Raft log, about 70 µs of the broker's CPU apiece
//! (`scripts/bench-acks`: 0.100 against 0.028 s per 1,000 messages acked one by one or by 16),
//! a fifth of its work per order when stock acked every delivery by itself. A `multiple` ack
//! settles every delivery of the channel up to its tag that is not settled yet, so it may only go
//! out once every earlier delivery is settled on the wire or being acked with it: a delivery
//! being handled, forwarded or nacked stays in [`Acks`]'s open set until its own settle was
//! sent, and a tag acked twice would close the channel (`PRECONDITION_FAILED`).
//!
//! No timer: the first ack of a turn leads, lets the tasks already woken with it (a store group
//! commits many orders at once) add theirs, and sends them all; the others wait for its answer.
//! Acks that came in while it sent go in a task of their own, so that a leader's delivery is
//! done with its own round under a load that never pauses.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use lapin::Channel;
use lapin::options::BasicAckOptions;
use tokio::sync::oneshot;

/// How an ack went, as its waiters see it.
#[derive(Debug, Clone)]
pub(crate) enum Acked {
    /// Written to the connection.
    Sent,
    /// Not sent: the channel was closed or lost (the broker redelivers).
    ChannelLost,
    /// lapin could not send it.
    Failed(lapin::Error),
    /// Not written within the bound (a connection that hangs).
    TimedOut,
}

/// The acks of one channel's deliveries; see the module documentation. Clones share them.
#[derive(Clone)]
pub(crate) struct Acks(Arc<Inner>);

struct Inner {
    channel: Channel,
    /// How long sending the acks may take.
    bound: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Delivery tags received and not yet settled on the wire (nor taken by a batch being sent).
    open: BTreeSet<u64>,
    /// Handled deliveries whose ack waits to be sent, with their waiters.
    ready: BTreeMap<u64, oneshot::Sender<Acked>>,
    /// An ack is leading: it sends what is ready, again until nothing is.
    leading: bool,
    /// Ack frames sent (a `multiple` one counts once), for the tests.
    frames: u64,
}

impl Acks {
    /// Acks for the deliveries of `channel`, each send bounded by `bound`.
    pub(crate) fn new(channel: Channel, bound: Duration) -> Self {
        Self(Arc::new(Inner { channel, bound, state: Mutex::new(State::default()) }))
    }

    /// The channel the deliveries came on.
    pub(crate) fn channel(&self) -> &Channel {
        &self.0.channel
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a delivery as received, before anything can settle it.
    pub(crate) fn received(&self, tag: u64) {
        self.state().open.insert(tag);
    }

    /// Records that a delivery was settled otherwise (a nack, an ack through its own `Acker`),
    /// once that settle was sent or failed: a later `multiple` ack may then cover its tag.
    pub(crate) fn settled_otherwise(&self, tag: u64) {
        self.state().open.remove(&tag);
    }

    /// Whether a delivery is still its handler's to settle: received, and neither acked nor
    /// waiting to be (a panic's nack must not follow an ack).
    pub(crate) fn unsettled(&self, tag: u64) -> bool {
        let state = self.state();
        state.open.contains(&tag) && !state.ready.contains_key(&tag)
    }

    /// Acks the delivery `tag`, with others where it can (see the module documentation), and
    /// says how it went.
    pub(crate) async fn ack(&self, tag: u64) -> Acked {
        let (answer, answered) = oneshot::channel();
        let lead = {
            let mut state = self.state();
            state.ready.insert(tag, answer);
            !std::mem::replace(&mut state.leading, true)
        };
        if lead {
            // The tasks woken with this one (a store group's orders) add their acks first.
            tokio::task::yield_now().await;
            if self.send_round().await {
                let acks = self.clone();
                tokio::spawn(async move { while acks.send_round().await {} });
            }
        }
        // The leader answers every ack it took; should it be dropped midway (shutdown), the
        // broker redelivers.
        answered.await.unwrap_or(Acked::ChannelLost)
    }

    /// Sends what is ready; whether more became ready meanwhile (else it stops leading).
    async fn send_round(&self) -> bool {
        let (together, alone) = {
            let mut state = self.state();
            if state.ready.is_empty() {
                state.leading = false;
                return false;
            }
            // The first tag still being handled, forwarded or nacked: a `multiple` ack
            // may cover only what is below it.
            let first_unsettled = state.open.iter().find(|tag| !state.ready.contains_key(tag)).copied();
            let ready = std::mem::take(&mut state.ready);
            let (together, alone): (Vec<_>, Vec<_>) =
                ready.into_iter().partition(|(tag, _)| first_unsettled.is_none_or(|first| *tag < first));
            for (tag, _) in together.iter().chain(&alone) {
                state.open.remove(tag);
            }
            state.frames += u64::from(!together.is_empty()) + alone.len() as u64;
            (together, alone)
        };
        if let Some((last, _)) = together.last() {
            let acked = self.send(*last, together.len() > 1).await;
            for (_, waiter) in together {
                let _ = waiter.send(acked.clone());
            }
        }
        for (tag, waiter) in alone {
            let _ = waiter.send(self.send(tag, false).await);
        }
        let mut state = self.state();
        state.leading = !state.ready.is_empty();
        state.leading
    }

    async fn send(&self, tag: u64, multiple: bool) -> Acked {
        let channel = &self.0.channel;
        if !channel.status().connected() {
            return Acked::ChannelLost;
        }
        match tokio::time::timeout(self.0.bound, channel.basic_ack(tag, BasicAckOptions { multiple })).await {
            Ok(Ok(())) => Acked::Sent,
            Ok(Err(error)) => Acked::Failed(error),
            Err(_) => Acked::TimedOut,
        }
    }

    /// Ack frames sent so far (a `multiple` ack counts once).
    #[cfg(test)]
    pub(crate) fn frames(&self) -> u64 {
        self.state().frames
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    use super::*;

    /// Handled deliveries are acked together below the first one still unsettled, one by one
    /// above it, and every delivery ends settled once: none comes back but the one nacked, and
    /// the channel stays open (an ack of a tag already acked would close it).
    #[tokio::test]
    async fn acks_go_together_below_the_first_unsettled_delivery() {
        let vhost = tracehop_testkit::rabbit::TestVhost::create();
        let connection = Connection::connect(vhost.url(), ConnectionProperties::default()).await.expect("connect");
        let channel = connection.create_channel().await.expect("channel");
        let queue = "acks";
        channel
            .queue_declare(queue.into(), QueueDeclareOptions::default(), FieldTable::default())
            .await
            .expect("declare");
        for n in 1..=6u8 {
            let body = [n];
            let publish = channel.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default(),
            );
            publish.await.expect("publish");
        }
        let mut consumer = channel
            .basic_consume(queue.into(), "stock".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .expect("consume");
        let mut next = async || {
            let next = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await;
            next.expect("no delivery within 5 s").expect("the consumer ended").expect("a delivery")
        };
        let acks = Acks::new(channel.clone(), Duration::from_secs(5));
        let mut deliveries = Vec::new();
        for _ in 0..6 {
            let delivery = next().await;
            acks.received(delivery.delivery_tag);
            deliveries.push(delivery);
        }
        let tag = |n: usize| deliveries[n - 1].delivery_tag;
        // Three handled in one turn: one frame.
        let (a, b, c) = tokio::join!(acks.ack(tag(2)), acks.ack(tag(1)), acks.ack(tag(3)));
        assert!([a, b, c].iter().all(|acked| matches!(acked, Acked::Sent)));
        assert_eq!(acks.frames(), 1, "the first three went one by one");
        // The fourth is being nacked (still open): the fifth and sixth, handled in one turn,
        // cannot wait for it, nor take it along (its nack would then close the channel).
        let (e, f) = tokio::join!(acks.ack(tag(6)), acks.ack(tag(5)));
        assert!([e, f].iter().all(|acked| matches!(acked, Acked::Sent)));
        assert_eq!(acks.frames(), 3, "the fifth and sixth not one by one");
        assert!(acks.unsettled(tag(4)) && !acks.unsettled(tag(5)) && !acks.unsettled(tag(6)));
        deliveries[3].acker.nack(BasicNackOptions { requeue: true, multiple: false }).await.expect("nack");
        acks.settled_otherwise(tag(4));
        let again = next().await;
        assert!(again.redelivered && again.data == [4], "not the nacked delivery: {again:?}");
        acks.received(again.delivery_tag);
        assert!(matches!(acks.ack(again.delivery_tag).await, Acked::Sent));
        let more = tokio::time::timeout(Duration::from_millis(500), next()).await;
        assert!(more.is_err(), "an acked delivery came back: {more:?}");
        assert!(channel.status().connected(), "the channel closed");
    }
}
