//! Singleflight (`Conveyor-Dedup-Key`): jobs with the same key that are in flight at the same
//! time run the handler once across the cluster, and each ends with that one outcome under its
//! own id. After it, a job with the key runs again (this is not a cache).
//!
//! In a worker, the first job with a key leads and the others wait for it. Across workers the
//! leader claims the key on the broker ([`crate::transport::Transport::claim_flight`]); a worker
//! that cannot claim it listens for the outcome on `flight-results.<key hash>` and tries the
//! claim again every half second, so when the runner dies (its claim freed by the broker) another
//! takes over. The outcome is broadcast before the claim is released, and a worker that gets the
//! claim first waits briefly for an outcome already on its way.

use super::controls::{Control, Next};
use super::registry::Job;
use crate::job::JobError;
use crate::message::{Headers, Message};
use crate::protocol::header;
use crate::transport::Transport;
use futures::future::BoxFuture;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// An outcome as it is broadcast.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Broadcast {
    key: String,
    output: Option<Value>,
    error: Option<String>,
    permanent: bool,
    #[serde(default)]
    timed_out: bool,
}

type Outcome = Result<Value, JobError>;

/// True for an outcome the jobs waiting on the key take as theirs. A cancelled leader's is not:
/// the next job with the key runs the handler instead.
fn shared_outcome(r: &Outcome) -> bool {
    !matches!(r, Err(JobError::Cancelled | JobError::CancelRequested(_)))
}

/// The keys this worker has in flight, and how its waiting jobs hear the outcome.
#[derive(Default)]
pub struct Flights {
    local: Mutex<HashMap<String, watch::Receiver<Option<Outcome>>>>,
}

/// The hash that names `key` on the broker.
pub(crate) fn hash(key: &str) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..16])
}

fn to_message(key: &str, r: &Outcome) -> Message {
    let s = Broadcast {
        key: key.to_string(),
        output: r.as_ref().ok().cloned(),
        error: r.as_ref().err().map(|e| match e {
            JobError::Timeout(why) => why.clone(),
            e => e.to_string(),
        }),
        permanent: matches!(r, Err(JobError::Permanent(_))),
        timed_out: matches!(r, Err(JobError::Timeout(_))),
    };
    let h = Headers::new().with(header::CONTENT_TYPE, "application/json");
    Message::new(h, serde_json::to_vec(&s).unwrap_or_default())
}

fn from_message(key: &str, msg: &Message) -> Option<Outcome> {
    let s: Broadcast = serde_json::from_slice(&msg.body).ok()?;
    if s.key != key {
        return None;
    }
    Some(match (s.output, s.error) {
        (Some(v), None) => Ok(v),
        (_, e) if s.permanent => Err(JobError::permanent(e.unwrap_or_default())),
        (_, e) if s.timed_out => Err(JobError::Timeout(e.unwrap_or_default())),
        (_, e) => Err(JobError::retry(e.unwrap_or_default())),
    })
}

/// Removes a leader's entry when it ends, however it ends.
struct Leading<'a> {
    flights: &'a Flights,
    hash: String,
    rx: watch::Receiver<Option<Outcome>>,
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        let mut local = self.flights.local.lock().unwrap_or_else(|p| p.into_inner());
        if local
            .get(&self.hash)
            .is_some_and(|rx| rx.same_channel(&self.rx))
        {
            local.remove(&self.hash);
        }
    }
}

/// The `singleflight` control (see the module docs).
pub struct FlightControl {
    transport: Arc<dyn Transport>,
    flights: Arc<Flights>,
}

impl FlightControl {
    /// Singleflight over `transport`, with this worker's keys in flight in `flights`.
    pub fn new(transport: Arc<dyn Transport>, flights: Arc<Flights>) -> FlightControl {
        FlightControl { transport, flights }
    }
}

impl Control for FlightControl {
    fn name(&self) -> &'static str {
        "singleflight"
    }

    fn call(self: Arc<Self>, job: Job, next: Next) -> BoxFuture<'static, Outcome> {
        Box::pin(async move {
            let Some(key) = job.meta.dedup_key.clone() else {
                return next.oneshot(job).await;
            };
            let stop = job.cancel.clone();
            once(
                self.transport.as_ref(),
                &self.flights,
                &key,
                &stop,
                next.oneshot(job),
            )
            .await
        })
    }
}

/// Runs `run` for this job unless a job with the same key is in flight, in which case it waits
/// for that one's outcome. When the job leading in this worker ends without an outcome to share
/// (cancelled, or dropped), a waiting job leads in its place. `stop` fires when this job should
/// give up waiting (it ends `cancelled`).
pub async fn once<Fut>(
    transport: &dyn Transport,
    flights: &Flights,
    key: &str,
    stop: &CancellationToken,
    run: Fut,
) -> Outcome
where
    Fut: Future<Output = Outcome>,
{
    let h = hash(key);
    let (tx, rx) = loop {
        let follow = {
            let mut local = flights.local.lock().unwrap_or_else(|p| p.into_inner());
            match local.get(&h) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    local.insert(h.clone(), rx.clone());
                    break (tx, rx);
                }
            }
        };
        // Another job of this worker leads: its outcome is ours.
        if let Some(outcome) = follow_local(follow, stop).await {
            return outcome;
        }
        if stop.is_cancelled() {
            return Err(JobError::Cancelled);
        }
    };
    let _leading = Leading {
        flights,
        hash: h.clone(),
        rx,
    };
    let outcome = across_cluster(transport, key, &h, stop, run).await;
    if shared_outcome(&outcome) {
        let _ = tx.send(Some(outcome.clone()));
    }
    outcome
}

/// Waits for the local leader's outcome: `None` when it ended without one to share.
async fn follow_local(
    mut rx: watch::Receiver<Option<Outcome>>,
    stop: &CancellationToken,
) -> Option<Outcome> {
    loop {
        if let Some(outcome) = rx.borrow_and_update().clone() {
            return Some(outcome);
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() {
                return rx.borrow().clone();
            },
            _ = stop.cancelled() => return Some(Err(JobError::Cancelled)),
        }
    }
}

async fn across_cluster<Fut>(
    t: &dyn Transport,
    key: &str,
    h: &str,
    stop: &CancellationToken,
    run: Fut,
) -> Outcome
where
    Fut: Future<Output = Outcome>,
{
    let topic = format!("flight-results.{h}");
    let mut outcomes = match t.listen(&topic).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "singleflight unavailable; running the job");
            return run.await;
        }
    };
    loop {
        match t.claim_flight(h).await {
            Ok(Some(claim)) => {
                // An outcome broadcast just before its runner let the claim go wins.
                if let Ok(Some(msg)) =
                    tokio::time::timeout(Duration::from_millis(200), outcomes.next()).await
                {
                    if let Some(r) = from_message(key, &msg) {
                        let _ = claim.release().await;
                        return r;
                    }
                }
                return lead(t, key, &topic, claim, run).await;
            }
            Ok(None) => {
                // Another worker runs it: wait for its outcome, trying the claim again now and
                // then in case that worker died.
                let waited = tokio::select! {
                    msg = outcomes.next() => msg,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    _ = stop.cancelled() => return Err(JobError::Cancelled),
                };
                match waited {
                    Some(msg) => {
                        if let Some(r) = from_message(key, &msg) {
                            return r;
                        }
                    }
                    None => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        match t.listen(&topic).await {
                            Ok(s) => outcomes = s,
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot listen for singleflight outcomes")
                            }
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "singleflight claim failed; running the job");
                return run.await;
            }
        }
    }
}

/// Runs the job holding the key's claim (refreshed meanwhile), broadcasts a shared outcome, then
/// lets the claim go.
async fn lead<Fut>(
    t: &dyn Transport,
    key: &str,
    topic: &str,
    claim: Box<dyn crate::transport::FlightClaim>,
    run: Fut,
) -> Outcome
where
    Fut: Future<Output = Outcome>,
{
    tracing::info!(%key, "leading a singleflight run");
    let refresh = async {
        let every = crate::transport::FLIGHT_TTL / 3;
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = claim.refresh().await {
                tracing::warn!(error = %e, "could not refresh a singleflight claim");
            }
        }
    };
    let outcome = tokio::select! {
        outcome = run => outcome,
        never = refresh => never,
    };
    if shared_outcome(&outcome) {
        if let Err(e) = t.broadcast(topic, to_message(key, &outcome)).await {
            tracing::warn!(error = %e, "singleflight outcome not broadcast");
        }
    }
    if let Err(e) = claim.release().await {
        tracing::warn!(error = %e, "could not release a singleflight claim");
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn outcomes_round_trip_for_their_key_only() {
        let m = to_message("k", &Ok(json!({"x": 1})));
        assert_eq!(
            from_message("k", &m).and_then(|r| r.ok()),
            Some(json!({"x": 1}))
        );
        assert!(from_message("other", &m).is_none());
        let m = to_message("k", &Err(JobError::permanent("bad")));
        assert_eq!(from_message("k", &m), Some(Err(JobError::permanent("bad"))));
        assert_eq!(hash("k").len(), 32);
    }
}
