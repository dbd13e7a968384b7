//! Job consumers that keep alive every job they hold.
//!
//! async-nats' pull stream asks for the next batch whenever half of the last one has arrived,
//! whether or not anyone takes the messages, and keeps them in a buffer that nobody can reach: a
//! job waiting there gets no progress acks, so once the running jobs outlast the lease (AckWait)
//! the broker hands it to another worker while the stale copy still waits here. This consumer
//! instead asks for at most `prefetch` jobs beyond those taken (a rate-limited kind: one, and only
//! when the worker is waiting for it), and extends the lease of every job it holds every third of
//! the lease until the worker takes it. Jobs still held when the stream is dropped are handed
//! back at once.

use super::to_delivery;
use crate::error::Error;
use crate::transport::{ConsumeOptions, DeliveryStream};
use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use futures::StreamExt;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long one pull request waits for jobs before the server ends it (then another is made).
/// Also bounds how long a pull request lost with a dropped connection stalls the consumer.
const PULL_EXPIRES: Duration = Duration::from_secs(3);

/// What the filling task and the reading stream share.
struct Held {
    /// Delivered jobs nobody took yet, with when their lease was last extended.
    queue: Mutex<VecDeque<(Instant, jetstream::Message)>>,
    /// The filler pushed a job.
    arrived: Notify,
    /// The reader took a job, or found none.
    taken: Notify,
    /// The reader is waiting for a job (it found the queue empty).
    waiting: AtomicBool,
    /// Set when the reader is dropped: the filler stops.
    closed: CancellationToken,
}

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Instant, jetstream::Message)>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The reading end; dropping it hands back what it still holds.
struct Reader {
    held: Arc<Held>,
    prefix_len: usize,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.held.closed.cancel();
        let left: Vec<_> = self.held.lock().drain(..).map(|(_, m)| m).collect();
        if left.is_empty() {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                for m in left {
                    let _ = m.ack_with(AckKind::Nak(None)).await;
                }
            });
        }
    }
}

/// A stream of `consumer`'s jobs that holds at most `opts.prefetch` of them (one for
/// `opts.one_at_a_time`, pulled only when the reader waits) and keeps their leases alive.
/// `closed` fires when the stream is dropped (for tasks tied to it).
pub(super) fn job_stream(
    consumer: PullConsumer,
    opts: ConsumeOptions,
    prefix_len: usize,
) -> (DeliveryStream, CancellationToken) {
    let held = Arc::new(Held {
        queue: Mutex::new(VecDeque::new()),
        arrived: Notify::new(),
        taken: Notify::new(),
        waiting: AtomicBool::new(false),
        closed: CancellationToken::new(),
    });
    let closed = held.closed.clone();
    tokio::spawn(fill(consumer, held.clone(), opts));
    tokio::spawn(keep_alive(held.clone(), opts.lease));
    let reader = Reader { held, prefix_len };
    let stream = futures::stream::unfold(reader, |reader| async move {
        loop {
            let next = reader.held.lock().pop_front();
            if let Some((_, m)) = next {
                reader.held.waiting.store(false, Ordering::SeqCst);
                reader.held.taken.notify_one();
                let delivery = to_delivery(m, reader.prefix_len);
                return Some((Ok(delivery), reader));
            }
            reader.held.waiting.store(true, Ordering::SeqCst);
            reader.held.taken.notify_one();
            reader.held.arrived.notified().await;
        }
    })
    .boxed();
    (stream, closed)
}

/// How many jobs to ask for now: `None` while the reader does not need more.
fn wanted(held: &Held, cap: usize, one_at_a_time: bool) -> Option<usize> {
    let len = held.lock().len();
    let want = cap.saturating_sub(len);
    let needed = if one_at_a_time {
        len == 0 && held.waiting.load(Ordering::SeqCst)
    } else {
        // Refill once half the held jobs were taken, so that pulls come in batches.
        want >= cap.div_ceil(2)
    };
    (want > 0 && needed).then_some(want)
}

/// Pulls jobs into `held` as the reader takes them.
async fn fill(consumer: PullConsumer, held: Arc<Held>, opts: ConsumeOptions) {
    let one = opts.one_at_a_time;
    let cap = if one {
        1
    } else {
        usize::from(opts.prefetch.max(1))
    };
    let mut failures = 0u32;
    loop {
        let want = loop {
            if let Some(want) = wanted(&held, cap, one) {
                break want;
            }
            tokio::select! {
                _ = held.closed.cancelled() => return,
                _ = held.taken.notified() => {}
            }
        };
        let request = consumer
            .batch()
            .max_messages(want)
            .expires(PULL_EXPIRES)
            .messages();
        let mut batch = match held.closed.run_until_cancelled(request).await {
            None => return,
            Some(Ok(batch)) => batch,
            Some(Err(e)) => {
                failures = failures.saturating_add(1);
                let pause = Duration::from_millis(100u64 << failures.min(5));
                tracing::warn!(error = %Error::broker("pull", e), "cannot pull jobs; trying again in {pause:?}");
                tokio::select! {
                    _ = held.closed.cancelled() => return,
                    _ = tokio::time::sleep(pause) => continue,
                }
            }
        };
        failures = 0;
        loop {
            let item = tokio::select! {
                _ = held.closed.cancelled() => None,
                item = batch.next() => item,
            };
            match item {
                Some(Ok(m)) => {
                    if held.closed.is_cancelled() {
                        let _ = m.ack_with(AckKind::Nak(None)).await;
                        return;
                    }
                    held.lock().push_back((Instant::now(), m));
                    held.arrived.notify_one();
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "pull request ended");
                    break;
                }
                None => break,
            }
        }
        if held.closed.is_cancelled() {
            return;
        }
    }
}

/// Every third of `lease`, extends the lease of each held job whose lease was last extended
/// (or that arrived) that long ago.
async fn keep_alive(held: Arc<Held>, lease: Duration) {
    let period = (lease / 3).max(Duration::from_millis(100));
    let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
    loop {
        tokio::select! {
            _ = held.closed.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = Instant::now();
        let due: Vec<jetstream::Message> = held
            .lock()
            .iter_mut()
            .filter(|(at, _)| now.duration_since(*at) >= period)
            .map(|(at, m)| {
                *at = now;
                m.clone()
            })
            .collect();
        for m in due {
            if let Err(e) = m.ack_with(AckKind::Progress).await {
                tracing::debug!(error = %e, "could not extend a held job's lease");
            }
        }
    }
}
