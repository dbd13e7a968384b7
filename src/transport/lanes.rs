//! A kind's jobs as one stream: its priority lanes read in [`Turns`] order.
//!
//! Each lane is a consumer of its own (a JetStream consumer, a RabbitMQ queue), so a job
//! published to `high` reaches the worker while `normal` and `low` have thousands waiting. Which
//! lane the next job comes from is chosen when the worker asks for it; nothing is taken from a
//! lane and kept aside, so what the worker has not asked for stays with its lane's consumer
//! (whose leases are kept there).

use super::{Delivery, DeliveryStream};
use crate::error::Result;
use crate::priority::{Priority, Turns};
use futures::{Stream, StreamExt};
use std::pin::Pin;
use std::task::{Context, Poll};

/// Opens a stream for each lane (`open` gets the lane's priority) and merges them ([`merge`]).
pub async fn open_each<F, Fut>(mut open: F) -> Result<DeliveryStream>
where
    F: FnMut(Priority) -> Fut,
    Fut: std::future::Future<Output = Result<DeliveryStream>>,
{
    let mut lanes = Vec::new();
    for p in Priority::ALL {
        lanes.push((p, open(p).await?));
    }
    Ok(merge(lanes))
}

/// The lanes of one kind merged, highest first in [`Turns`] order. It ends when any lane ends
/// (a consumer the broker cancelled for good): the worker then stops rather than serve some of
/// a kind's lanes.
pub fn merge(lanes: Vec<(Priority, DeliveryStream)>) -> DeliveryStream {
    Merged {
        lanes,
        turns: Turns::default(),
    }
    .boxed()
}

struct Merged {
    lanes: Vec<(Priority, DeliveryStream)>,
    turns: Turns,
}

impl Stream for Merged {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        for p in this.turns.order() {
            let Some((_, lane)) = this.lanes.iter_mut().find(|(q, _)| *q == p) else {
                continue;
            };
            match lane.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(d))) => {
                    this.turns.took();
                    return Poll::Ready(Some(Ok(d)));
                }
                // The turn moves on, so that a lane that keeps failing hides no other.
                Poll::Ready(Some(Err(e))) => {
                    this.turns.took();
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {}
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use crate::transport::Acker;
    use async_trait::async_trait;
    use std::time::Duration;

    struct Nothing;

    #[async_trait]
    impl Acker for Nothing {
        async fn ack(self: Box<Self>) -> Result<()> {
            Ok(())
        }
        async fn nack(self: Box<Self>) -> Result<()> {
            Ok(())
        }
        async fn retry(self: Box<Self>, _: Message, _: Duration) -> Result<()> {
            Ok(())
        }
        async fn progress(&self) -> Result<()> {
            Ok(())
        }
    }

    fn lane(p: Priority, n: usize) -> (Priority, DeliveryStream) {
        let items = (0..n).map(move |i| {
            Ok(Delivery::new(
                p.as_str().to_string(),
                Message::default(),
                1,
                format!("{p}-{i}"),
                Box::new(Nothing),
            ))
        });
        // Never ends: a consumer waits for more.
        (
            p,
            futures::stream::iter(items)
                .chain(futures::stream::pending())
                .boxed(),
        )
    }

    async fn take(stream: &mut DeliveryStream, n: usize) -> Vec<String> {
        let mut kinds = Vec::new();
        for _ in 0..n {
            let d = stream.next().await.expect("open").expect("delivery");
            kinds.push(d.kind.clone());
        }
        kinds
    }

    #[tokio::test]
    async fn high_comes_first_and_low_still_gets_a_tenth() {
        let mut merged = merge(vec![lane(Priority::Low, 1000), lane(Priority::High, 1000)]);
        let kinds = take(&mut merged, 100).await;
        let low = kinds.iter().filter(|k| *k == "low").count();
        assert_eq!(low, 10, "{kinds:?}");
        assert_eq!(kinds[0], "high");
    }

    #[tokio::test]
    async fn an_empty_lane_gives_its_turns_to_the_others() {
        let mut merged = merge(vec![
            lane(Priority::High, 3),
            lane(Priority::Normal, 100),
            lane(Priority::Low, 100),
        ]);
        let kinds = take(&mut merged, 20).await;
        assert_eq!(kinds.iter().filter(|k| *k == "high").count(), 3);
        assert!(
            kinds[..4].iter().filter(|k| *k == "high").count() >= 2,
            "{kinds:?}"
        );
        let low = kinds.iter().filter(|k| *k == "low").count();
        assert_eq!(low, 2, "{kinds:?}");
    }

    #[tokio::test]
    async fn one_lane_ending_ends_the_kind() {
        let ended = (Priority::Low, futures::stream::empty().boxed());
        let mut merged = merge(vec![lane(Priority::High, 1), ended]);
        assert!(merged.next().await.is_some());
        assert!(merged.next().await.is_none());
    }
}
