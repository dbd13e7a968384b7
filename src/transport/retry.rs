//! Riding out broker outages: retrying a transient failure with backoff, and a subscription
//! that subscribes again when it fails or ends.

use super::MessageStream;
use crate::error::Result;
use crate::message::Message;
use crate::worker::backoff::Backoff;
use futures::{Stream, StreamExt};
use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Runs `op` until it succeeds, fails for good (an error that is not transient), or `patience`
/// would run out during the next wait; each transient failure is logged as `what`. The waits
/// are `backoff`'s ceilings (no jitter): from its base, doubling up to its max.
pub async fn retrying<T, F, Fut>(
    what: &str,
    backoff: Backoff,
    patience: Duration,
    mut op: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    let mut failed = 0u32;
    loop {
        failed = failed.saturating_add(1);
        let wait = backoff.ceiling(failed);
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && tokio::time::Instant::now() + wait < deadline => {
                tracing::warn!(error = %e, "{what} failed, retrying in {wait:?}");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// How long a failed or ended subscription waits before subscribing again.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);

/// One stream of what `subscribe` delivers, that ends only at `stop`: when a subscription fails
/// or ends (a RabbitMQ restart removes private queues), it subscribes again a second later.
/// `first` is a subscription already made, used before `subscribe` is called.
pub fn resubscribing<F, Fut>(
    what: &'static str,
    first: Option<MessageStream>,
    subscribe: F,
    stop: CancellationToken,
) -> impl Stream<Item = Message> + Send + Unpin
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = Result<MessageStream>> + Send + 'static,
{
    struct State<F> {
        current: Option<MessageStream>,
        subscribe: F,
        stop: CancellationToken,
        ended: bool,
    }
    let state = State {
        current: first,
        subscribe,
        stop,
        ended: false,
    };
    futures::stream::unfold(state, move |mut st| async move {
        loop {
            if let Some(s) = st.current.as_mut() {
                let next = tokio::select! {
                    _ = st.stop.cancelled() => return None,
                    m = s.next() => m,
                };
                match next {
                    Some(m) => return Some((m, st)),
                    None => {
                        st.current = None;
                        st.ended = true;
                        tracing::warn!("the subscription to {what} ended; subscribing again");
                    }
                }
            }
            if st.ended {
                tokio::select! {
                    _ = st.stop.cancelled() => return None,
                    _ = tokio::time::sleep(RESUBSCRIBE_AFTER) => {}
                }
            }
            match (st.subscribe)().await {
                Ok(s) => {
                    if st.ended {
                        tracing::info!("listening to {what} again");
                    }
                    st.current = Some(s);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen to {what} yet");
                    st.ended = true;
                }
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    fn msg(body: &str) -> Message {
        Message::new(crate::message::Headers::new(), body.as_bytes().to_vec())
    }

    #[tokio::test(start_paused = true)]
    async fn a_subscription_that_fails_or_ends_is_made_again() {
        let calls = Arc::new(AtomicU32::new(0));
        let counted = calls.clone();
        let stop = CancellationToken::new();
        let mut s = resubscribing(
            "test messages",
            None,
            move || {
                let n = counted.fetch_add(1, Ordering::SeqCst);
                async move {
                    match n {
                        0 => Err(Error::Broker {
                            op: "listen",
                            cause: "down".into(),
                        }),
                        n => Ok(futures::stream::iter(vec![msg(&format!("sub {n}"))]).boxed()),
                    }
                }
            },
            stop.clone(),
        );
        let first = s.next().await.expect("a message");
        assert_eq!(&first.body[..], b"sub 1");
        let second = s.next().await.expect("a message");
        assert_eq!(&second.body[..], b"sub 2");
        stop.cancel();
        assert!(s.next().await.is_none(), "ends at stop");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_and_others_are_not() {
        let tries = AtomicU32::new(0);
        let backoff = Backoff {
            base: Duration::from_millis(10),
            max: Duration::from_millis(40),
        };
        let out = retrying("test", backoff, Duration::from_secs(5), || {
            let n = tries.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 3 {
                    Err(Error::Broker {
                        op: "publish",
                        cause: "down".into(),
                    })
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(out.ok(), Some(3));
        let refused = retrying("test", backoff, Duration::from_secs(5), || async {
            Err::<(), _>(Error::Config("bad".into()))
        })
        .await;
        assert!(refused.is_err());
    }
}
