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

use super::Shared;
use crate::job::JobError;
use crate::message::{Headers, Message};
use crate::protocol::header;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// An outcome as it is broadcast.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Broadcast {
    key: String,
    output: Option<Value>,
    error: Option<String>,
    permanent: bool,
}

type Outcome = Option<Result<Value, JobError>>;

/// The keys this worker has in flight, and how its waiting jobs hear the outcome.
#[derive(Default)]
pub struct Flights {
    local: Mutex<HashMap<String, watch::Receiver<Option<Outcome>>>>,
}

/// The hash that names `key` on the broker.
fn hash(key: &str) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..16])
}

fn to_message(key: &str, r: &Result<Value, JobError>) -> Message {
    let s = Broadcast {
        key: key.to_string(),
        output: r.as_ref().ok().cloned(),
        error: r.as_ref().err().map(|e| e.to_string()),
        permanent: matches!(r, Err(JobError::Permanent(_))),
    };
    let h = Headers::new().with(header::CONTENT_TYPE, "application/json");
    Message::new(h, serde_json::to_vec(&s).unwrap_or_default())
}

fn from_message(key: &str, msg: &Message) -> Option<Result<Value, JobError>> {
    let s: Broadcast = serde_json::from_slice(&msg.body).ok()?;
    if s.key != key {
        return None;
    }
    Some(match (s.output, s.error) {
        (Some(v), None) => Ok(v),
        (_, e) if s.permanent => Err(JobError::permanent(e.unwrap_or_default())),
        (_, e) => Err(JobError::retry(e.unwrap_or_default())),
    })
}

/// Runs `run` for this job unless a job with the same key is in flight, in which case it waits
/// for that one's outcome. `None` when the worker abandons the job.
pub async fn once<F, Fut>(
    shared: &Shared,
    key: &str,
    abandon: &CancellationToken,
    run: F,
) -> Outcome
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Outcome>,
{
    let h = hash(key);
    let leader = {
        let mut local = shared
            .flights
            .local
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match local.get(&h) {
            Some(rx) => Err(rx.clone()),
            None => {
                let (tx, rx) = watch::channel(None);
                local.insert(h.clone(), rx);
                Ok(tx)
            }
        }
    };
    let tx = match leader {
        Ok(tx) => tx,
        Err(mut rx) => {
            // Another job of this worker leads: its outcome is ours.
            loop {
                if let Some(outcome) = rx.borrow().clone() {
                    return outcome;
                }
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { return None },
                    _ = abandon.cancelled() => return None,
                }
            }
        }
    };
    let outcome = across_cluster(shared, key, &h, abandon, run).await;
    let _ = tx.send(Some(outcome.clone()));
    shared
        .flights
        .local
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&h);
    outcome
}

async fn across_cluster<F, Fut>(
    shared: &Shared,
    key: &str,
    h: &str,
    abandon: &CancellationToken,
    run: F,
) -> Outcome
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Outcome>,
{
    let topic = format!("flight-results.{h}");
    let t = &shared.transport;
    let mut outcomes = match t.listen(&topic).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "singleflight unavailable; running the job");
            return run().await;
        }
    };
    let mut run = Some(run);
    loop {
        match t.claim_flight(h).await {
            Ok(Some(claim)) => {
                // An outcome broadcast just before its runner let the claim go wins.
                if let Ok(Some(msg)) =
                    tokio::time::timeout(Duration::from_millis(200), outcomes.next()).await
                {
                    if let Some(r) = from_message(key, &msg) {
                        let _ = claim.release().await;
                        return Some(r);
                    }
                }
                let run = run.take()?;
                let refresh = CancellationToken::new();
                let claim = std::sync::Arc::new(claim);
                let keeper = {
                    let (claim, refresh) = (claim.clone(), refresh.clone());
                    tokio::spawn(async move {
                        let every = crate::transport::FLIGHT_TTL / 3;
                        loop {
                            tokio::select! {
                                _ = refresh.cancelled() => return,
                                _ = tokio::time::sleep(every) => {
                                    if let Err(e) = claim.refresh().await {
                                        tracing::warn!(error = %e, "could not refresh a singleflight claim");
                                    }
                                }
                            }
                        }
                    })
                };
                let outcome = run().await;
                if let Some(r) = &outcome {
                    if let Err(e) = t.broadcast(&topic, to_message(key, r)).await {
                        tracing::warn!(error = %e, "singleflight outcome not broadcast");
                    }
                }
                refresh.cancel();
                let _ = keeper.await;
                if let Ok(claim) = std::sync::Arc::try_unwrap(claim) {
                    if let Err(e) = claim.release().await {
                        tracing::warn!(error = %e, "could not release a singleflight claim");
                    }
                }
                return outcome;
            }
            Ok(None) => {
                // Another worker runs it: wait for its outcome, trying the claim again now and
                // then in case that worker died.
                let waited = tokio::select! {
                    msg = outcomes.next() => msg,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    _ = abandon.cancelled() => return None,
                };
                match waited {
                    Some(msg) => {
                        if let Some(r) = from_message(key, &msg) {
                            return Some(r);
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
                return run.take()?().await;
            }
        }
    }
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
