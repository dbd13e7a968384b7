//! Room for deliveries set aside ([`crate::transport::Delivery::set_aside`]) on RabbitMQ.
//!
//! A quorum queue sends a consumer at most its prefetch of unsettled deliveries, and the prefetch
//! of a consumer cannot change once it consumes. So while deliveries of a job consumer are set
//! aside, the consumer opens extra consumers on the same queue, on a channel of their own, whose
//! prefetches (in steps of [`STEP`]) cover the number set aside. When none is set aside any more
//! they are cancelled at once, whether or not the consumer is being read (what they hold stays on
//! their channel, to be settled as any delivery; what they had buffered is still read).

use super::{amqp_error, bounded, Inner};
use crate::error::Result;
use futures::stream::SelectAll;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// The least prefetch of an extra consumer.
const STEP: usize = 8;

/// The deliveries of one consumer set aside, and the extra consumers that make room for them.
#[derive(Default)]
pub(super) struct Room {
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Default)]
struct State {
    aside: usize,
    /// The channel of the extra consumers, the tags of those not cancelled, and the sum of
    /// their prefetches.
    ch: Option<lapin::Channel>,
    live: Vec<ShortString>,
    capacity: usize,
}

impl State {
    /// Forgets the extra consumers' channel: it was lost, with its consumers and their
    /// deliveries.
    fn forget_channel(&mut self) {
        self.ch = None;
        self.live.clear();
        self.capacity = 0;
    }

    /// Cancels the live extra consumers (in the background: this runs where no await can).
    fn cancel_all(&mut self) {
        self.capacity = 0;
        let tags = std::mem::take(&mut self.live);
        let (Some(ch), false) = (self.ch.clone(), tags.is_empty()) else {
            return;
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                for tag in tags {
                    let _ = ch.basic_cancel(tag, BasicCancelOptions::default()).await;
                }
            });
        }
    }
}

impl Room {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one delivery set aside until the guard drops.
    pub(super) fn set_aside(self: &Arc<Self>) -> SetAside {
        self.lock().aside += 1;
        self.changed.notify_one();
        SetAside(self.clone())
    }

    /// Resolves when more deliveries may have been set aside since the last call.
    pub(super) async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Forgets the extra consumers: their channel was lost.
    pub(super) fn lost(&self) {
        self.lock().forget_channel();
    }

    /// Opens one more extra consumer on `queue` if what is set aside exceeds their capacity.
    pub(super) async fn fit(
        &self,
        inner: &Inner,
        queue: &str,
        consumers: &mut SelectAll<lapin::Consumer>,
    ) -> Result<()> {
        let (more, ch) = {
            let mut s = self.lock();
            if s.ch.as_ref().is_some_and(|ch| !ch.status().connected()) {
                s.forget_channel();
            }
            if s.aside <= s.capacity {
                return Ok(());
            }
            (s.aside - s.capacity, s.ch.clone())
        };
        let ch = match ch {
            Some(ch) => ch,
            None => {
                let ch = bounded("open channel", inner.channel()).await?;
                inner.keep_consumer_channel(&ch, 1);
                self.lock().ch = Some(ch.clone());
                ch
            }
        };
        let prefetch = u16::try_from(more.next_multiple_of(STEP)).unwrap_or(u16::MAX);
        let consume = async {
            ch.basic_qos(prefetch, BasicQosOptions::default())
                .await
                .map_err(|e| amqp_error("basic.qos", e))?;
            ch.basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| amqp_error("basic.consume", e))
        };
        let consumer = bounded("consume", consume).await?;
        tracing::debug!(%queue, more, prefetch, "room made for jobs set aside");
        let mut s = self.lock();
        s.live.push(consumer.tag());
        s.capacity += usize::from(prefetch);
        if s.aside == 0 {
            // All went while it opened.
            s.cancel_all();
        }
        drop(s);
        consumers.push(consumer);
        Ok(())
    }
}

/// One delivery set aside.
pub(super) struct SetAside(Arc<Room>);

impl Drop for SetAside {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.aside = s.aside.saturating_sub(1);
        if s.aside == 0 {
            s.cancel_all();
        }
    }
}

/// A job consumer's room, and the extra consumers it opened that have not ended yet (cancelled
/// ones end once they have handed over what they buffered).
pub(super) struct Extras {
    pub(super) room: Arc<Room>,
    queue: String,
    pub(super) consumers: SelectAll<lapin::Consumer>,
}

impl Extras {
    pub(super) fn new(queue: String) -> Extras {
        Extras {
            room: Arc::default(),
            queue,
            consumers: SelectAll::new(),
        }
    }

    /// Opens an extra consumer if what is set aside exceeds the room made.
    pub(super) async fn fit(&mut self, inner: &Inner) -> Result<()> {
        self.room.fit(inner, &self.queue, &mut self.consumers).await
    }
}
