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
    /// The held jobs, and whether the reader waits for one.
    state: Mutex<State>,
    /// The filler pushed a job.
    arrived: Notify,
    /// The reader took a job, or found none.
    taken: Notify,
    /// Set when the reader is dropped: the filler stops.
    closed: CancellationToken,
}

#[derive(Default)]
struct State {
    /// Delivered jobs nobody took yet, with when their lease was last extended.
    queue: VecDeque<(Instant, jetstream::Message)>,
    /// The reader is waiting in `next()` (it found the queue empty and has not taken one since).
    waiting: bool,
}

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Clears the reader's `waiting` when its `next()` is dropped while it waits (a cancelled
/// admission, a shutdown), so that nothing is pulled for a reader that went away.
struct Waiting<'a>(&'a Held);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.lock().waiting = false;
    }
}

/// The reading end; dropping it hands back what it still holds.
struct Reader {
    held: Arc<Held>,
    prefix_len: usize,
}

impl Drop for Reader {
    fn drop(&mut self) {
        // Closed first, then drained under the lock: the filler pushes only under the lock and
        // after checking `closed`, so every job is either drained here or handed back there.
        self.held.closed.cancel();
        let left: Vec<_> = self.held.lock().queue.drain(..).map(|(_, m)| m).collect();
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
        state: Mutex::new(State::default()),
        arrived: Notify::new(),
        taken: Notify::new(),
        closed: CancellationToken::new(),
    });
    let closed = held.closed.clone();
    tokio::spawn(fill(consumer, held.clone(), opts));
    tokio::spawn(keep_alive(held.clone(), opts.lease));
    let reader = Reader { held, prefix_len };
    let stream = futures::stream::unfold(reader, |reader| async move {
        let held = reader.held.clone();
        let mut waiting = None;
        loop {
            let next = {
                let mut st = held.lock();
                let next = st.queue.pop_front();
                st.waiting = next.is_none();
                next
            };
            held.taken.notify_one();
            if let Some((_, m)) = next {
                drop(waiting);
                let delivery = to_delivery(m, reader.prefix_len);
                return Some((Ok(delivery), reader));
            }
            waiting.get_or_insert(Waiting(&held));
            held.arrived.notified().await;
        }
    })
    .boxed();
    (stream, closed)
}

/// How many jobs to ask for now: `None` while the reader does not need more.
fn wanted(held: &Held, cap: usize, one_at_a_time: bool) -> Option<usize> {
    let st = held.lock();
    let len = st.queue.len();
    let want = cap.saturating_sub(len);
    let needed = if one_at_a_time {
        len == 0 && st.waiting
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
    let pause = |failures: u32| Duration::from_millis(100u64 << failures.min(5));
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
                let pause = pause(failures);
                tracing::warn!(error = %Error::broker("pull", e), "cannot pull jobs; trying again in {pause:?}");
                tokio::select! {
                    _ = held.closed.cancelled() => return,
                    _ = tokio::time::sleep(pause) => continue,
                }
            }
        };
        let mut failed = false;
        loop {
            let item = tokio::select! {
                _ = held.closed.cancelled() => None,
                item = batch.next() => item,
            };
            match item {
                Some(Ok(m)) => {
                    failures = 0;
                    let pushed = {
                        let mut st = held.lock();
                        let open = !held.closed.is_cancelled();
                        if open {
                            st.queue.push_back((Instant::now(), m.clone()));
                        }
                        open
                    };
                    if !pushed {
                        let _ = m.ack_with(AckKind::Nak(None)).await;
                        return;
                    }
                    held.arrived.notify_one();
                }
                Some(Err(e)) => {
                    // The server ended the pull with an error (no responders, a deleted
                    // consumer, too many waiting pulls, a leader change): back off before the
                    // next, as for a pull that could not be made.
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %e, "pull request failed; trying again in {:?}", pause(failures));
                    failed = true;
                    break;
                }
                None => break,
            }
        }
        if failed {
            tokio::select! {
                _ = held.closed.cancelled() => return,
                _ = tokio::time::sleep(pause(failures)) => {}
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
            .queue
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
