//! Jobs that wait for a singleflight run in this worker without taking a slot.
//!
//! When the worker takes a job whose `Conveyor-Dedup-Key` another job of this worker leads
//! ([`super::flight::Flights::enter`]), the job does not wait for a slot or its kind's admissions:
//! it waits for the leader's outcome, and ends with it, in one of `--max-followers` places. Its
//! delivery is held meanwhile (its lease kept alive, as for any job), and set aside
//! ([`crate::transport::Delivery::set_aside`]) so that it does not count against what the broker
//! sends the worker. A cancel request ends it at once. When the run ends without an outcome to
//! share (the leader was cancelled), the job takes its kind's admissions and a slot, and goes
//! through its kind's whole stack as any job.

use super::cancel::JobKeys;
use super::controls::{self, Next};
use super::flight::{follow_local, Entered};
use super::registry::Job;
use super::Shared;
use crate::job::JobError;
use crate::transport::Aside;
use serde_json::Value;
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;
use tower::{Service, ServiceExt};

/// How many jobs may wait for a run in one worker, by default.
pub const DEFAULT_MAX_FOLLOWERS: usize = 256;

/// The service a waiting job runs through in place of its kind's stack (see the module docs).
pub(crate) fn service(
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    key: String,
    aside: Option<Aside>,
) -> Next {
    let aside = Arc::new(Mutex::new(aside));
    let svc = tower::service_fn(move |job: Job| {
        let aside = aside.lock().unwrap_or_else(|p| p.into_inner()).take();
        follow(shared.clone(), slots.clone(), key.clone(), aside, job)
    });
    Next::new(svc)
}

async fn follow(
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    key: String,
    aside: Option<Aside>,
    job: Job,
) -> Result<Value, JobError> {
    let tracked = shared.cancels.track(JobKeys::of(&job.meta));
    if tracked.token.is_cancelled() {
        return Err(JobError::CancelRequested(format!(
            "cancelled before it ran: {}",
            tracked.reason()
        )));
    }
    let lead = loop {
        match shared.flights.enter(&key) {
            Entered::Lead(lead) => break lead,
            Entered::Follow(outcome) => {
                tokio::select! {
                    shared_outcome = follow_local(outcome, &job.cancel) => {
                        if let Some(outcome) = shared_outcome {
                            return outcome;
                        }
                    }
                    _ = tracked.token.cancelled() => {
                        return Err(JobError::CancelRequested(tracked.reason()));
                    }
                }
            }
        }
    };
    // The run ended with nothing to share: this job runs as any other, leading the key here.
    drop((tracked, aside));
    let Some(mut svc) = shared.stacks.get(&job.meta.kind).map(|s| s.service()) else {
        return Err(JobError::permanent(format!(
            "unknown job kind {:?}",
            job.meta.kind
        )));
    };
    svc.ready().await?;
    let slot = slots
        .acquire_owned()
        .await
        .map_err(|_| JobError::retry("the worker is stopping"))?;
    controls::hold_until_settled(Box::new(slot));
    lead.run(svc.call(job)).await
}
