//! A kind's global rate (`--rate KIND=N/s@B`), kept on the broker. Time is cut in ticks of the
//! rate (tick `i` of `20/s` is the 50 ms from `i × 50` ms after the epoch), each worth one token
//! in the kind's bucket, never more than the burst `B` waiting ([`Transport::put_tokens`]).
//! Every worker takes one token per job ([`Tokens::take`]).
//!
//! On JetStream every worker of the kind puts in each tick's token, under an id of its tick, and
//! the stream keeps one per id: no worker is special, and one that dies costs nothing. On
//! RabbitMQ, which keeps every copy, one worker is the kind's pacer ([`Transport::pace_kind`]):
//! the one a single-active-consumer queue hands its baton to. When it dies its connection
//! closes and the broker hands the baton to the next worker at once (for a lost host, once the
//! connection's heartbeat runs out).
//!
//! The limit so holds from the first second and does not depend on workers knowing how many they
//! are: tokens come only as fast as the ticks, whoever takes them. Workers that disagree on the
//! rate get the elected pacer's (RabbitMQ) or the sum of their ticks' distinct ids (JetStream):
//! give every worker of a kind the same rate.

use super::limits::Rate;
use crate::error::Result;
use crate::transport::{ConsumeOptions, DeliveryStream, FlightClaim, Transport};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::{CancellationToken, DropGuard};

/// How long a worker waits before it contends again after losing or failing to get the pacing.
const CONTEND_EVERY: Duration = Duration::from_secs(1);

/// A worker's access to a kind's tokens; its pacer task stops when this is dropped.
pub struct Tokens {
    stream: tokio::sync::Mutex<DeliveryStream>,
    _pacer: DropGuard,
}

impl Tokens {
    /// Reads `kind`'s tokens, and contends to be its pacer at `rate`.
    pub async fn start(
        transport: Arc<dyn Transport>,
        kind: &str,
        rate: Rate,
        opts: ConsumeOptions,
    ) -> Result<Tokens> {
        let stream = transport.tokens(kind, opts).await?;
        let stop = CancellationToken::new();
        if transport.tokens_need_a_pacer() {
            tokio::spawn(contend(transport, kind.to_string(), rate, stop.clone()));
        } else {
            let (kind, stop) = (kind.to_string(), stop.clone());
            tracing::info!(%kind, ?rate, "pacing the kind's global rate (each tick's token once, with every other worker)");
            tokio::spawn(async move {
                while let Err(e) = pace(transport.as_ref(), &kind, rate, None, &stop).await {
                    tracing::warn!(%kind, error = %e, "cannot put rate tokens yet; trying again");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(CONTEND_EVERY) => {}
                    }
                }
            });
        }
        Ok(Tokens {
            stream: tokio::sync::Mutex::new(stream),
            _pacer: stop.drop_guard(),
        })
    }

    /// Waits for a token of the kind and takes it.
    pub async fn take(&self) {
        let mut stream = self.stream.lock().await;
        loop {
            match stream.next().await {
                Some(Ok(token)) => {
                    if let Err(e) = token.ack().await {
                        // Not taken: the broker gives it to someone again. Wait for another.
                        tracing::warn!(error = %e, "could not take a rate token");
                        continue;
                    }
                    return;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "rate token consumer error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                None => {
                    // Never ends by itself (the consumers re-subscribe); run unpaced rather
                    // than stall the kind if it does.
                    tracing::error!(
                        "the rate token consumer ended; the global rate no longer holds here"
                    );
                    return;
                }
            }
        }
    }
}

/// How long the bucket of a rate key's value stays open in a worker after its last job.
const KEY_IDLE: Duration = Duration::from_secs(60);

/// The tokens of each value of a kind's rate key (`--rate-key KIND=HEADER`): every value of the
/// header has a bucket of its own at the kind's rate ([`crate::protocol::rate_bucket`]), read and
/// paced (as a kind's is) by the workers that have a job with that value, from its first job to
/// a minute after its last. Jobs without the header share the bucket of the empty value.
pub struct KeyedTokens {
    transport: Arc<dyn Transport>,
    kind: String,
    header: String,
    rate: Rate,
    opts: ConsumeOptions,
    buckets: std::sync::Mutex<HashMap<String, Bucket>>,
}

/// One value's bucket in a worker: opened by its first job (each value on its own, so that one
/// slow to open holds up no other), and when it was last used.
struct Bucket {
    tokens: Arc<tokio::sync::OnceCell<Tokens>>,
    used: Instant,
}

impl KeyedTokens {
    /// The buckets of `kind`'s values of `header`, at `rate` each.
    pub fn new(
        transport: Arc<dyn Transport>,
        kind: &str,
        header: &str,
        rate: Rate,
        opts: ConsumeOptions,
    ) -> Arc<KeyedTokens> {
        let keyed = Arc::new(KeyedTokens {
            transport,
            kind: kind.to_string(),
            header: header.to_string(),
            rate,
            opts,
            buckets: std::sync::Mutex::default(),
        });
        tokio::spawn(sweep(Arc::downgrade(&keyed)));
        keyed
    }

    /// The header whose value picks the bucket.
    pub fn header(&self) -> &str {
        &self.header
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Bucket>> {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a token of `value`'s bucket and takes it. A bucket that cannot be opened yet
    /// (the broker is down) is tried again every second.
    pub async fn take(&self, value: &str) {
        let name = crate::protocol::rate_bucket(&self.kind, Some(value));
        let cell = {
            let mut buckets = self.lock();
            let b = buckets.entry(name.clone()).or_insert_with(|| Bucket {
                tokens: Arc::default(),
                used: Instant::now(),
            });
            b.used = Instant::now();
            b.tokens.clone()
        };
        let tokens = loop {
            let open = || Tokens::start(self.transport.clone(), &name, self.rate, self.opts);
            match cell.get_or_try_init(open).await {
                Ok(tokens) => break tokens,
                Err(e) => {
                    tracing::warn!(kind = %self.kind, error = %e, "cannot read a rate key's tokens yet");
                    tokio::time::sleep(CONTEND_EVERY).await;
                }
            }
        };
        tokens.take().await;
        if let Some(b) = self.lock().get_mut(&name) {
            b.used = Instant::now();
        }
    }
}

/// Stops the buckets unused for [`KEY_IDLE`], until the [`KeyedTokens`] go.
async fn sweep(keyed: std::sync::Weak<KeyedTokens>) {
    loop {
        tokio::time::sleep(KEY_IDLE / 6).await;
        let Some(keyed) = keyed.upgrade() else {
            return;
        };
        // A bucket a job is opening or waiting on is held by that job too.
        keyed
            .lock()
            .retain(|_, b| b.used.elapsed() < KEY_IDLE || Arc::strong_count(&b.tokens) > 1);
    }
}

/// Waits to become `kind`'s pacer until `stop`; paces while it is.
async fn contend(transport: Arc<dyn Transport>, kind: String, rate: Rate, stop: CancellationToken) {
    loop {
        let claimed = tokio::select! {
            _ = stop.cancelled() => return,
            c = transport.pace_kind(&kind) => c,
        };
        match claimed {
            Ok(claim) => {
                tracing::info!(%kind, ?rate, "pacing the kind's global rate");
                let why = pace(transport.as_ref(), &kind, rate, Some(claim.as_ref()), &stop).await;
                let _ = claim.release().await;
                match why {
                    Ok(()) => return,
                    Err(e) => tracing::warn!(%kind, error = %e, "no longer pacing"),
                }
            }
            Err(e) => tracing::warn!(%kind, error = %e, "cannot contend for pacing yet"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(CONTEND_EVERY) => {}
        }
    }
}

/// How many ticks' tokens a pacer that fell behind may put at once into an empty bucket: half
/// a second's worth (at least one).
fn catch_up(rate: Rate) -> usize {
    let per_ms = rate.per.as_millis().max(1);
    usize::try_from(u128::from(rate.count) * 500 / per_ms)
        .unwrap_or(usize::MAX)
        .max(1)
}

/// How many of the `late` ticks due since the last round get their token, with `waiting` in a
/// bucket of `burst`. A tick that finds the bucket full is lost (a bucket holds at most its
/// burst). A pacer that fell behind (a busy machine) while the bucket was empty, so workers were
/// waiting for the tokens, puts in what it missed, up to `catch_up` ticks: they would have been
/// taken one by one.
fn put_now(waiting: u64, burst: u32, late: usize, catch_up: usize) -> usize {
    let room = usize::try_from(u64::from(burst).saturating_sub(waiting)).unwrap_or(usize::MAX);
    if waiting == 0 {
        late.min(room.max(catch_up))
    } else {
        late.min(room)
    }
}

/// The rate's tick at `ms` milliseconds since the epoch.
fn tick(rate: Rate, ms: u64) -> u64 {
    let per_ms = rate.per.as_millis().max(1);
    let t = u128::from(ms) * u128::from(rate.count) / per_ms;
    u64::try_from(t).unwrap_or(u64::MAX)
}

/// Puts each new tick's token in `kind`'s bucket while `claim` (if any) holds; `Ok` on `stop`,
/// `Err` when the claim or the broker fails (the caller tries again).
async fn pace(
    transport: &dyn Transport,
    kind: &str,
    rate: Rate,
    claim: Option<&dyn FlightClaim>,
    stop: &CancellationToken,
) -> Result<()> {
    let period = rate.per / rate.count.max(1);
    let every = period.clamp(Duration::from_millis(20), Duration::from_millis(500));
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // No tokens for the time before this worker paced: a bucket starts empty.
    let mut done = tick(rate, crate::job::now_ms());
    let catch_up = catch_up(rate);
    let per_round = u32::try_from(every.as_nanos().div_ceil(period.as_nanos().max(1)))
        .unwrap_or(u32::MAX)
        .max(1);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = ticks.tick() => {}
        }
        if let Some(claim) = claim {
            // Every round: a pacer that lost its claim must stop before another's first round.
            claim.refresh().await?;
        }
        let now = tick(rate, crate::job::now_ms());
        if now <= done {
            continue;
        }
        let waiting = transport.waiting_tokens(kind).await?;
        let late = usize::try_from(now - done).unwrap_or(usize::MAX);
        // A round covers `per_round` ticks: a bucket smaller than that would drop the ticks of a
        // round whose previous token was not taken yet, and run under the rate.
        let room = put_now(waiting, rate.burst.max(per_round), late, catch_up);
        let newest: Vec<u64> = (done + 1..now + 1).rev().take(room).collect();
        transport.put_tokens(kind, &newest).await?;
        done = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_holds_its_burst_and_a_late_pacer_catches_up_only_into_an_empty_one() {
        // On time: one tick, room for it.
        assert_eq!(put_now(0, 1, 1, 10), 1);
        // Full: the tick is lost.
        assert_eq!(put_now(1, 1, 1, 10), 0);
        assert_eq!(put_now(3, 5, 4, 10), 2);
        // Behind by 7 ticks while workers waited: all 7, but never more than the catch-up.
        assert_eq!(put_now(0, 1, 7, 10), 7);
        assert_eq!(put_now(0, 1, 40, 10), 10);
        // A burst larger than the catch-up still fills.
        assert_eq!(put_now(0, 50, 40, 10), 40);
        assert_eq!(catch_up(Rate::parse("20/s").expect("rate")), 10);
        assert_eq!(catch_up(Rate::parse("1/m").expect("rate")), 1);
    }

    #[test]
    fn ticks_follow_the_rate() {
        let rate = Rate::parse("20/s").expect("rate");
        assert_eq!(tick(rate, 0), 0);
        assert_eq!(tick(rate, 49), 0);
        assert_eq!(tick(rate, 50), 1);
        assert_eq!(tick(rate, 1_000), 20);
        let slow = Rate::parse("6/m").expect("rate");
        assert_eq!(tick(slow, 9_999), 0);
        assert_eq!(tick(slow, 10_000), 1);
        assert_eq!(tick(slow, u64::MAX), u64::MAX / 10_000);
    }
}
