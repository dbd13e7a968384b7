//! Batons: one message in a durable queue with a single active consumer. Every contender
//! consumes the queue (prefetch 1); the broker delivers the baton to the active consumer, which
//! holds it unacked for as long as it has the role, and when that consumer's channel or
//! connection goes, makes the next consumer active and hands it the baton at once. Nobody polls,
//! so no contender is refused anything. A contender that finds no baton waiting puts one: a
//! second is harmless, as only the active consumer is delivered any, one at a time.
//!
//! The broker closes a channel that holds a delivery unacked past its consumer timeout (30 min
//! by default): so the holder hands the baton to itself every [`RENEW`] when it refreshes it,
//! putting a new one and acking the old, which the broker then delivers to it, the active
//! consumer, again.

use super::{bounded, durable, pool::amqp_error, round_trip, still_held, CloseOnDrop, Inner};
use crate::error::{Error, Result};
use crate::message::Message;
use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long a baton is held before its holder hands it to itself again: well within RabbitMQ's
/// default consumer timeout (30 min).
pub(super) const RENEW: Duration = Duration::from_secs(600);

/// How a contender puts a baton when none waits.
#[derive(Clone, Copy)]
pub(super) enum Put {
    /// Through the default exchange (users that may write it: workers).
    Default,
    /// Through the registers exchange, bound to the queue (users that may write registers).
    Registers,
}

/// A held baton. Closing its channel hands it on.
pub(super) struct Held {
    inner: Arc<Inner>,
    ch: lapin::Channel,
    queue: String,
    put: Put,
    what: &'static str,
    /// Whether a refresh makes a round trip to the broker (a lead, checked before it acts), or
    /// only looks at the channel (a pacer, refreshed every round).
    round_trip: bool,
    renew_after: Duration,
    holding: tokio::sync::Mutex<Holding>,
}

struct Holding {
    /// Kept: dropping it would cancel it, and make the next contender active.
    consumer: lapin::Consumer,
    baton: lapin::Acker,
    since: Instant,
}

/// Puts one baton in `queue`, through the exchange `put` says.
async fn put_one(inner: &Inner, ch: &lapin::Channel, queue: &str, put: Put) -> Result<()> {
    match put {
        Put::Default => {
            inner
                .put_empty_confirmed(queue, 1, "put a baton", "baton confirm")
                .await
        }
        Put::Registers => {
            let exchange = super::registers::route_to(ch, &inner.names, queue).await?;
            inner
                .publish_raw(&exchange, queue, true, &Message::default())
                .await
        }
    }
}

/// Waits until the broker hands this process the baton of `queue`, declared durable with
/// `args` and a single active consumer; `what` names it in errors; `round_trip`: see
/// [`Held`]. Abandoned by dropping the future: the waiting consumer goes with its channel, so
/// that it is never handed a baton nobody holds.
pub(super) async fn take(
    inner: &Arc<Inner>,
    queue: &str,
    mut args: FieldTable,
    put: Put,
    what: &'static str,
    round_trip: bool,
) -> Result<Held> {
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    let ch = inner.channel().await?;
    let mut abandoned = CloseOnDrop(Some(ch.clone()));
    let q = ch
        .queue_declare(queue.into(), durable(), args)
        .await
        .map_err(|e| amqp_error(what, e))?;
    if q.message_count() == 0 {
        // None waiting: the active consumer holds it, or there is none yet.
        put_one(inner, &ch, queue, put).await?;
    }
    ch.basic_qos(1, BasicQosOptions::default())
        .await
        .map_err(|e| amqp_error("basic.qos", e))?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_error("basic.consume", e))?;
    let baton = next_baton(&mut consumer, what).await?;
    abandoned.0 = None;
    Ok(Held {
        inner: inner.clone(),
        ch,
        queue: queue.to_string(),
        put,
        what,
        round_trip,
        renew_after: RENEW,
        holding: tokio::sync::Mutex::new(Holding {
            consumer,
            baton,
            since: Instant::now(),
        }),
    })
}

async fn next_baton(consumer: &mut lapin::Consumer, what: &'static str) -> Result<lapin::Acker> {
    match consumer.next().await {
        Some(Ok(d)) => Ok(d.acker),
        Some(Err(e)) => Err(amqp_error(what, e)),
        None => Err(Error::broker(
            what,
            std::io::Error::other("the baton queue's consumer ended"),
        )),
    }
}

impl Held {
    /// Hands the baton to itself: a new one put (confirmed), the held one acked, the new one
    /// taken (this consumer is still the active one, so the broker delivers it here). A put that
    /// fails leaves the held baton held, to be renewed at the next refresh: there is time before
    /// the broker's timeout.
    async fn renew(&self, h: &mut Holding) -> Result<()> {
        let put = put_one(&self.inner, &self.ch, &self.queue, self.put);
        if let Err(e) = bounded(self.what, put).await {
            tracing::warn!(baton = %self.queue, error = %e, "could not renew the baton; trying again at the next refresh");
            return Ok(());
        }
        let acked = h
            .baton
            .ack(BasicAckOptions::default())
            .await
            .map_err(|e| amqp_error(self.what, e))?;
        if !acked {
            return Err(Error::broker(
                self.what,
                std::io::Error::other("the baton's channel closed before it was renewed"),
            ));
        }
        h.baton = bounded(self.what, next_baton(&mut h.consumer, self.what)).await?;
        h.since = Instant::now();
        Ok(())
    }
}

#[async_trait]
impl crate::transport::FlightClaim for Held {
    async fn refresh(&self) -> Result<()> {
        still_held(&self.ch, self.what)?;
        if self.round_trip {
            round_trip(&self.ch, &self.queue, self.what).await?;
        }
        let mut h = self.holding.lock().await;
        if h.since.elapsed() >= self.renew_after {
            self.renew(&mut h).await?;
        }
        Ok(())
    }

    async fn release(self: Box<Self>) -> Result<()> {
        let _ = self.ch.close(200, "baton released".into()).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Against the RabbitMQ of the machine (127.0.0.1:5672, guest): the renewal has to be seen
    //! on a real broker, and shortening it needs this module's insides.
    use super::*;
    use crate::transport::FlightClaim;

    #[tokio::test]
    async fn a_renewed_baton_stays_with_its_holder_and_goes_on_when_released() {
        let url = std::env::var("CONVEYOR_TEST_AMQP")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        let url = crate::BrokerUrl::parse(&url).expect("url");
        let ns = format!("baton{}", std::process::id());
        let names = crate::protocol::Names::new(&ns).expect("names");
        let connect = || super::super::AmqpTransport::connect(&url, names.clone());
        let (a, b) = (connect().await.expect("a"), connect().await.expect("b"));
        let queue = format!("{ns}.flights.test");
        let args = FieldTable::default();
        let first = take(&a.inner, &queue, args.clone(), Put::Registers, "test", true);
        let mut first = tokio::time::timeout(Duration::from_secs(10), first)
            .await
            .expect("within 10 s")
            .expect("the first contender takes the baton");
        first.renew_after = Duration::ZERO;
        let (bi, q) = (b.inner.clone(), queue.clone());
        let second = tokio::spawn(async move {
            take(&bi, &q, FieldTable::default(), Put::Registers, "test", true).await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        for round in 0..3 {
            first.refresh().await.expect("renewed");
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(
                !second.is_finished(),
                "the baton went on at renewal {round}"
            );
        }
        Box::new(first).release().await.expect("released");
        let taken = tokio::time::timeout(Duration::from_secs(10), second)
            .await
            .expect("the second contender takes it within 10 s")
            .expect("task")
            .expect("baton");
        Box::new(taken).release().await.expect("released");
        let ch = a.inner.channel().await.expect("channel");
        let _ = ch
            .queue_delete(queue.as_str().into(), Default::default())
            .await;
        let exchange = a.inner.names.exchange("registers");
        let _ = ch
            .exchange_delete(exchange.as_str().into(), Default::default())
            .await;
    }
}
