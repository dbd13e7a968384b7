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
//!
//! A job taken from the broker while a job of this worker leads its key waits for that outcome
//! without a slot ([`super::follow`]). Any other job with a key gets a slot first, then enters the
//! key ([`Flights::enter`]): the first holds its lead in this worker ([`LocalLead`]). So every
//! leader holds a slot, and jobs waiting in slots never wait for one that waits for a slot.

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
use std::sync::atomic::{AtomicU64, Ordering};
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
    local: Mutex<HashMap<String, Local>>,
    tickets: AtomicU64,
    /// Told when a job takes the lead of a key here.
    led: tokio::sync::Notify,
}

/// A key in flight in this worker: the ticket of the job that leads it, and its outcome to be.
struct Local {
    ticket: u64,
    outcome: Arc<watch::Sender<Option<Outcome>>>,
}

tokio::task_local! {
    /// The ticket of the key a job task leads, set by [`LocalLead::run`].
    static LEADS: u64;
}

/// What [`Flights::enter`] found.
pub enum Entered {
    /// No job of the key was in flight here: this one leads it.
    Lead(LocalLead),
    /// One is: its outcome will come here.
    Follow(watch::Receiver<Option<Outcome>>),
}

/// The lead of a key in this worker, taken before the leading job runs. The key stays in flight
/// until it drops.
pub struct LocalLead {
    flights: Arc<Flights>,
    hash: String,
    ticket: u64,
}

impl LocalLead {
    /// Runs `job_task` (the leading job, up to its settling) as the key's leader.
    pub async fn run<F: Future>(self, job_task: F) -> F::Output {
        let out = LEADS.scope(self.ticket, job_task).await;
        drop(self);
        out
    }
}

impl Drop for LocalLead {
    fn drop(&mut self) {
        self.flights.leave(&self.hash, self.ticket);
    }
}

impl Flights {
    /// Enters a job with `key`: it leads the key in this worker, or follows the job that does.
    pub fn enter(self: &Arc<Self>, key: &str) -> Entered {
        let h = hash(key);
        let mut local = self.lock();
        match local.get(&h) {
            Some(l) => Entered::Follow(l.outcome.subscribe()),
            None => {
                let (ticket, _) = self.open(&mut local, &h);
                Entered::Lead(LocalLead {
                    flights: self.clone(),
                    hash: h,
                    ticket,
                })
            }
        }
    }

    /// The outcome to be of `key`'s run in this worker, if a job leads it here.
    pub fn following(&self, key: &str) -> Option<watch::Receiver<Option<Outcome>>> {
        self.lock().get(&hash(key)).map(|l| l.outcome.subscribe())
    }

    /// Resolves once a job takes the lead of a key here after `led` was called (enable it, then
    /// look with [`Flights::following`], then await it).
    pub fn led(&self) -> tokio::sync::futures::Notified<'_> {
        self.led.notified()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Local>> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts the key `h` in flight here under a new ticket, telling whoever waits for a lead;
    /// returns the ticket and the sender of its outcome.
    fn open(
        &self,
        local: &mut HashMap<String, Local>,
        h: &str,
    ) -> (u64, Arc<watch::Sender<Option<Outcome>>>) {
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed) + 1;
        let outcome = Arc::new(watch::channel(None).0);
        let entry = Local {
            ticket,
            outcome: outcome.clone(),
        };
        local.insert(h.to_string(), entry);
        self.led.notify_waiters();
        (ticket, outcome)
    }

    /// Ends the lead `ticket` of the key `h` (a later lead of the key stays).
    fn leave(&self, h: &str, ticket: u64) {
        let mut local = self.lock();
        if local.get(h).is_some_and(|l| l.ticket == ticket) {
            local.remove(h);
        }
    }
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

/// Ends a leader's entry when its run ends, however it ends.
struct Leading<'a> {
    flights: &'a Flights,
    hash: String,
    ticket: u64,
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        self.flights.leave(&self.hash, self.ticket);
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
/// for that one's outcome. A job that holds the key's [`LocalLead`] leads. When the job leading in
/// this worker ends without an outcome to share (cancelled, or dropped), a waiting job leads in
/// its place. `stop` fires when this job should give up waiting (it ends `cancelled`).
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
    let mine = LEADS.try_with(|t| *t).ok();
    let (tx, _leading) = loop {
        let entered = {
            let mut local = flights.lock();
            match local.get(&h) {
                Some(l) if Some(l.ticket) == mine => Ok((l.ticket, l.outcome.clone())),
                Some(l) => Err(l.outcome.subscribe()),
                None => Ok(flights.open(&mut local, &h)),
            }
        };
        match entered {
            // The key's run ends with this job's: a job delivered after it runs again.
            Ok((ticket, tx)) => {
                let hash = h.clone();
                break (
                    tx,
                    Leading {
                        flights,
                        hash,
                        ticket,
                    },
                );
            }
            // Another job of this worker leads: its outcome is ours.
            Err(follow) => {
                if let Some(outcome) = follow_local(follow, stop).await {
                    return outcome;
                }
                if stop.is_cancelled() {
                    return Err(JobError::Cancelled);
                }
            }
        }
    };
    let outcome = across_cluster(transport, key, &h, stop, run).await;
    if shared_outcome(&outcome) {
        // Kept for the jobs that enter the key until its entry goes.
        tx.send_replace(Some(outcome.clone()));
    }
    outcome
}

/// Waits for the local leader's outcome: `None` when it ended without one to share.
pub(crate) async fn follow_local(
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
