//! Confirm-mode channels, each lent to one publish at a time: checkout's events and stock's
//! retry and dead-letter copies.
//!
//! With several publishes in flight on one channel, RabbitMQ acknowledges them together and
//! lapin hands a returned (unroutable) message to whichever of their confirms completes first:
//! about 1% of returns land on another publish, which then fails while the unroutable one
//! reports success (a `mandatory` copy to a queue that is gone, taken for delivered). One
//! outstanding publish per channel makes every return and every nack unambiguous: a channel is
//! lent for one [`Lease::publish`] at a time, and a lease dropped before its confirm came (a
//! deadline, a caller that gave up) closes its channel instead of pooling it with a confirm
//! still to come.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::connection::Broker;
use crate::topology;

/// AMQP `reply-success`: the code of a channel closed on purpose.
const REPLY_SUCCESS: u16 = 200;

/// Why no channel was lent.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// [`ConfirmChannels::close`] was called (shutting down), or this lease's channel was given
    /// up: a publish on it was abandoned before its confirm.
    #[error("the channels are closed")]
    Closed,
    /// The connection the caller's work belongs to was replaced: a channel on the new one is not
    /// for it (stock's copy of a delivery whose ack would go to the old connection's channel).
    #[error("the broker connection was replaced")]
    Replaced,
    /// No channel could be opened (or put in confirm mode, or the topology declared on it).
    #[error("cannot open a confirm-mode channel")]
    Broker(#[from] lapin::Error),
}

/// A pool of confirm-mode channels on one [`Broker`]'s current connection.
#[derive(Debug)]
pub struct ConfirmChannels {
    broker: Broker,
    idle: Mutex<Vec<Pooled>>,
    /// One permit per channel: a publish holds one while it owns a channel (backpressure past
    /// the pool's size).
    permits: Semaphore,
    /// Whether the first channel of each connection declares the topology (checkout's: the
    /// connection may be to a broker that lost it). Stock's consuming channel declares it for
    /// stock, and its copies must not recreate a queue deleted by hand.
    declares_topology: bool,
    /// 1 + the connection generation the topology was last declared on (0: never).
    declared: AtomicU64,
}

/// A channel and the connection generation it belongs to.
#[derive(Debug)]
struct Pooled {
    channel: Channel,
    generation: u64,
}

impl ConfirmChannels {
    /// At most `size` channels, opened as publishes need them.
    pub fn new(broker: Broker, size: usize) -> Self {
        Self {
            broker,
            idle: Mutex::new(Vec::with_capacity(size)),
            permits: Semaphore::new(size),
            declares_topology: false,
            declared: AtomicU64::new(0),
        }
    }

    /// The first channel of each connection declares the shared topology.
    pub fn declaring_topology(self) -> Self {
        Self { declares_topology: true, ..self }
    }

    /// A channel of connection `current` (an idle one, else a fresh one); waits for a free one
    /// when all are lent. [`LeaseError::Replaced`] when the broker's connection is no longer
    /// `current`.
    pub async fn lease(&self, current: u64) -> Result<Lease<'_>, LeaseError> {
        let permit = self.permits.acquire().await.map_err(|_| LeaseError::Closed)?;
        let idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let pooled = match idle {
            // A channel the broker closed (a protocol error), or one of a lost connection, is
            // replaced.
            Some(p) if p.generation == current && p.channel.status().connected() => p,
            _ => self.fresh().await?,
        };
        if pooled.generation != current {
            // A channel of the new connection: the next lease's.
            self.idle.lock().unwrap_or_else(PoisonError::into_inner).push(pooled);
            return Err(LeaseError::Replaced);
        }
        Ok(Lease { pool: self, pooled: Some(pooled), awaiting_confirm: false, _permit: permit })
    }

    /// Refuses later leases ([`LeaseError::Closed`]) and hands over the idle channels, for the
    /// caller to close before the connection ([`Broker::close_channels`]). A lease still out
    /// keeps its channel until it ends.
    pub fn close(&self) -> Vec<Channel> {
        self.permits.close();
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(PoisonError::into_inner));
        idle.into_iter().map(|pooled| pooled.channel).collect()
    }

    /// The idle channels (tests).
    pub fn idle(&self) -> Vec<Channel> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner).iter().map(|p| p.channel.clone()).collect()
    }

    /// A new confirm-mode channel on the current connection.
    async fn fresh(&self) -> Result<Pooled, LeaseError> {
        let (channel, generation) = self.broker.channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        if self.declares_topology && self.declared.load(Ordering::Acquire) != generation + 1 {
            topology::declare(&channel).await?;
            self.declared.store(generation + 1, Ordering::Release);
        }
        Ok(Pooled { channel, generation })
    }
}

/// A channel lent to one publish at a time; back to the pool on drop, unless a confirm is still
/// to come on it.
#[derive(Debug)]
pub struct Lease<'a> {
    pool: &'a ConfirmChannels,
    pooled: Option<Pooled>,
    /// Set while [`Self::publish`] waits for the broker: dropped then, the channel is closed.
    awaiting_confirm: bool,
    _permit: SemaphorePermit<'a>,
}

impl Lease<'_> {
    /// The connection generation of the channel (`u64::MAX` once it was given up).
    pub fn generation(&self) -> u64 {
        self.pooled.as_ref().map_or(u64::MAX, |p| p.generation)
    }

    /// Publishes and waits for the broker's confirm. After a nack the channel is discarded: the
    /// next lease opens a fresh one. RabbitMQ 3.10 leaves a channel that first published to a
    /// quorum queue during a leader election nacking every later publish (its queue client stays
    /// in `reject_publish`; seen in checkout's cluster test: 30 s of nacks on a healthy queue),
    /// and a new channel registers with the new leader.
    pub async fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        options: BasicPublishOptions,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<Confirmation, LeaseError> {
        if self.awaiting_confirm {
            // The last publish was abandoned before its confirm: a second one on the channel could
            // take its return. The channel goes, and this lease with it.
            self.discard("abandoned before its confirm");
            self.awaiting_confirm = false;
        }
        let channel = &self.pooled.as_ref().ok_or(LeaseError::Closed)?.channel;
        self.awaiting_confirm = true;
        let confirmed = async {
            channel.basic_publish(exchange.into(), routing_key.into(), options, body, properties).await?.await
        }
        .await;
        self.awaiting_confirm = false;
        if matches!(confirmed, Ok(Confirmation::Nack(_) | Confirmation::NotRequested)) {
            self.discard("replaced after a nack");
        }
        Ok(confirmed?)
    }

    /// Lets go of the channel of a lost connection: it is not pooled again (there is nothing
    /// left to close).
    pub fn forget(&mut self) {
        self.pooled = None;
    }

    /// Closes the channel instead of returning it to the pool, so the next lease opens a fresh
    /// one.
    fn discard(&mut self, why: &'static str) {
        let Some(pooled) = self.pooled.take() else { return };
        // Outside a runtime (a runtime shutting down drops its tasks' futures) the channel is
        // only dropped; its connection is going too.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                // A channel already closed by the broker has nothing left to close.
                let _ = pooled.channel.close(REPLY_SUCCESS, why.into()).await;
            });
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if self.awaiting_confirm {
            // Pooled, its confirm (or return) would land on the next publish's.
            self.discard("abandoned before its confirm");
        } else if self.pool.permits.is_closed() {
            // After `close`, nothing would close a channel put back.
            self.discard("the pool is closed");
        } else if let Some(pooled) = self.pooled.take() {
            self.pool.idle.lock().unwrap_or_else(PoisonError::into_inner).push(pooled);
        }
    }
}
