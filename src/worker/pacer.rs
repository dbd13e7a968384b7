//! A kind's global rate (`--rate KIND=N/s@B`), kept on the broker. One worker of the namespace,
//! elected by a broker claim ([`Transport::claim_flight`]), is the kind's pacer: it puts tokens
//! in the kind's bucket at the rate, never more than the burst `B` waiting
//! ([`Transport::add_tokens`]). Every worker takes one token per job ([`Tokens::take`]).
//!
//! The limit so holds from the first second and does not depend on workers knowing how many they
//! are: tokens come only as fast as the rate, whoever takes them. A pacer that dies loses its
//! claim (RabbitMQ when its connection closes, JetStream within [`crate::transport::FLIGHT_TTL`])
//! and another worker of the kind takes over; until then no token comes, so the rate dips and
//! never overshoots. Workers that disagree on the rate get the elected pacer's.

use super::limits::Rate;
use crate::error::Result;
use crate::transport::{ConsumeOptions, DeliveryStream, FlightClaim, Transport};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

/// How often a worker that is not the pacer tries to become it.
const CONTEND_EVERY: Duration = Duration::from_secs(1);
/// How often the pacer renews its claim.
const RENEW_EVERY: Duration = Duration::from_secs(2);

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
        tokio::spawn(contend(transport, kind.to_string(), rate, stop.clone()));
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
                    // than stop if it does.
                    tracing::error!(
                        "the rate token consumer ended; the global rate no longer holds here"
                    );
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

/// The claim key of `kind`'s pacer: letters and digits.
fn pacer_key(kind: &str) -> String {
    format!("pacer{}", super::flight::hash(kind))
}

/// Tries to become `kind`'s pacer until `stop`; paces while it is.
async fn contend(transport: Arc<dyn Transport>, kind: String, rate: Rate, stop: CancellationToken) {
    let key = pacer_key(&kind);
    loop {
        let claimed = tokio::select! {
            _ = stop.cancelled() => return,
            c = transport.claim_flight(&key) => c,
        };
        match claimed {
            Ok(Some(claim)) => {
                tracing::info!(%kind, ?rate, "pacing the kind's global rate");
                let why = pace(transport.as_ref(), &kind, rate, claim.as_ref(), &stop).await;
                let _ = claim.release().await;
                match why {
                    Ok(()) => return,
                    Err(e) => tracing::warn!(%kind, error = %e, "no longer pacing"),
                }
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(%kind, error = %e, "cannot contend for pacing yet"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(CONTEND_EVERY) => {}
        }
    }
}

/// Puts tokens in `kind`'s bucket at `rate` while `claim` holds; `Ok` on `stop`, `Err` when the
/// claim or the broker fails (the caller contends again).
async fn pace(
    transport: &dyn Transport,
    kind: &str,
    rate: Rate,
    claim: &dyn FlightClaim,
    stop: &CancellationToken,
) -> Result<()> {
    let period = rate.per / rate.count.max(1);
    let tick = period.clamp(Duration::from_millis(20), Duration::from_millis(500));
    let mut ticks = tokio::time::interval(tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut renewed = Instant::now();
    let mut last = Instant::now();
    let mut owed = 0f64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = ticks.tick() => {}
        }
        if renewed.elapsed() >= RENEW_EVERY {
            claim.refresh().await?;
            renewed = Instant::now();
        }
        let now = Instant::now();
        owed += now.duration_since(last).as_secs_f64() / period.as_secs_f64();
        last = now;
        let due = owed.floor();
        if due < 1.0 {
            continue;
        }
        let want = due.min(f64::from(u32::MAX)) as u32;
        let put = transport.add_tokens(kind, want, rate.burst.max(1)).await?;
        // Tokens that found the bucket full are not kept: a bucket holds at most its burst.
        let _ = put;
        owed -= due;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pacer_key_is_letters_and_digits_and_differs_by_kind() {
        let a = pacer_key("hash");
        let b = pacer_key("hash.v2");
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()), "{a}");
        assert!(b.chars().all(|c| c.is_ascii_alphanumeric()), "{b}");
        assert_ne!(a, b);
    }
}
