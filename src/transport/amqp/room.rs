//! Room for deliveries set aside ([`crate::transport::Delivery::set_aside`]) on RabbitMQ.
//!
//! A quorum queue sends a consumer at most its prefetch of unsettled deliveries, and the prefetch
//! of a consumer cannot change once it consumes. So while deliveries of a job consumer are set
//! aside, the consumer opens extra consumers on the same queue, on a channel of their own, whose
//! prefetches add up to the number set aside; when none is set aside any more it cancels them
//! (what they hold stays on their channel, to be settled as any delivery). The extra capacity
//! is taken in steps of [`STEP`].

use super::{amqp_error, Inner};
use crate::error::Result;
use futures::stream::SelectAll;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;

/// The least prefetch of an extra consumer.
const STEP: usize = 8;

/// How many deliveries of one consumer are set aside.
#[derive(Default)]
pub(super) struct Room {
    aside: AtomicUsize,
    changed: Notify,
}

impl Room {
    /// Counts one delivery set aside until the guard drops.
    pub(super) fn set_aside(self: &Arc<Self>) -> SetAside {
        self.aside.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_one();
        SetAside(self.clone())
    }

    /// Deliveries set aside now.
    fn aside(&self) -> usize {
        self.aside.load(Ordering::SeqCst)
    }

    /// Resolves when the count changed since the last call.
    pub(super) async fn changed(&self) {
        self.changed.notified().await;
    }
}

/// One delivery set aside.
pub(super) struct SetAside(Arc<Room>);

impl Drop for SetAside {
    fn drop(&mut self) {
        self.0.aside.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_one();
    }
}

/// The extra consumers of one job consumer.
pub(super) struct Extras {
    queue: String,
    ch: Option<lapin::Channel>,
    /// Tags of the extra consumers not cancelled yet, and the sum of their prefetches.
    live: Vec<ShortString>,
    capacity: usize,
    /// Every extra consumer not yet ended (cancelled ones end once they have handed over what
    /// they buffered).
    pub(super) consumers: SelectAll<lapin::Consumer>,
}

impl Extras {
    pub(super) fn new(queue: String) -> Extras {
        Extras {
            queue,
            ch: None,
            live: Vec::new(),
            capacity: 0,
            consumers: SelectAll::new(),
        }
    }

    /// Opens or cancels extra consumers so that their capacity covers what `room` has set aside.
    pub(super) async fn fit(&mut self, inner: &Inner, room: &Room) -> Result<()> {
        let aside = room.aside();
        if aside == 0 {
            if let Some(ch) = &self.ch {
                for tag in self.live.drain(..) {
                    let _ = ch.basic_cancel(tag, BasicCancelOptions::default()).await;
                }
            }
            self.capacity = 0;
            return Ok(());
        }
        if aside <= self.capacity {
            return Ok(());
        }
        let ch = match &self.ch {
            Some(ch) if ch.status().connected() => ch.clone(),
            _ => {
                // A lost channel took its consumers and their deliveries with it.
                self.live.clear();
                self.capacity = 0;
                self.consumers = SelectAll::new();
                let ch = inner.channel().await?;
                inner.keep_consumer_channel(&ch, 1);
                self.ch = Some(ch.clone());
                ch
            }
        };
        let more = (aside - self.capacity).next_multiple_of(STEP);
        let prefetch = u16::try_from(more).unwrap_or(u16::MAX);
        ch.basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| amqp_error("basic.qos", e))?;
        let consumer = ch
            .basic_consume(
                self.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| amqp_error("basic.consume", e))?;
        tracing::debug!(queue = %self.queue, aside, prefetch, "room made for jobs set aside");
        self.live.push(consumer.tag());
        self.capacity += usize::from(prefetch);
        self.consumers.push(consumer);
        Ok(())
    }
}
