//! Jobs of a kind with a rate key (`--rate-key KIND=HEADER`) wait for their value's token before
//! their admissions, without a slot.
//!
//! The value is read from the job, so the wait cannot come before the job is taken (as a kind's
//! global rate's does): the job waits for a token of its value's bucket
//! ([`super::pacer::KeyedTokens`]) in one of the `--max-followers` places, set aside
//! ([`crate::transport::Delivery::set_aside`]) and its lease kept alive, so that jobs of values
//! that have tokens go on meanwhile. Then it takes its kind's admissions and a slot as any job.
//! When every place is taken the worker waits for the token before it takes the next job. A job
//! still waiting when the worker shuts down is handed back at once.

use super::cancel::JobKeys;
use super::controls::Next;
use super::follow::{cancellable, kind_stack, run_holding};
use super::pacer::KeyedTokens;
use super::registry::Job;
use super::Shared;
use crate::job::JobError;
use crate::transport::Aside;
use serde_json::Value;
use std::sync::Arc;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// What a job waiting for its value's token holds.
pub(crate) struct Wait {
    /// The kind's buckets.
    pub(crate) keyed: Arc<KeyedTokens>,
    /// The job's value of the key header (empty without it).
    pub(crate) value: String,
    /// The delivery set aside while it waits.
    pub(crate) aside: Option<Aside>,
    /// The job's singleflight key, entered once it holds a slot.
    pub(crate) flight_key: Option<String>,
    /// The worker's shutdown: a job still waiting then is handed back, through `give_up`.
    pub(crate) shutdown: CancellationToken,
    /// Makes the worker hand the job back.
    pub(crate) give_up: CancellationToken,
}

/// The service such a job runs through in place of its kind's stack (see the module docs).
pub(crate) fn service(shared: Arc<Shared>, slots: Arc<Semaphore>, wait: Wait) -> Next {
    super::follow::called_once(wait, move |wait, job| {
        rated(shared.clone(), slots.clone(), wait, job)
    })
}

async fn rated(
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    wait: Option<Wait>,
    job: Job,
) -> Result<Value, JobError> {
    let Some(wait) = wait else {
        return Err(JobError::retry("a rated job was called twice"));
    };
    let stack = kind_stack(&shared, &job)?;
    let tracked = shared.cancels.track_to_run(JobKeys::of(&job.meta))?;
    let admitted = async {
        cancellable(&tracked, wait.keyed.take(&wait.value)).await?;
        drop(wait.aside);
        let mut svc = stack.service();
        cancellable(&tracked, svc.ready()).await??;
        let slot = cancellable(&tracked, slots.acquire_owned())
            .await?
            .map_err(|_| JobError::retry("the worker is stopping"))?;
        Ok::<_, JobError>((svc, slot))
    };
    let (svc, slot) = tokio::select! {
        admitted = admitted => admitted?,
        _ = wait.shutdown.cancelled() => {
            // Not started: back to the broker, for a worker that stays.
            wait.give_up.cancel();
            return std::future::pending().await;
        }
    };
    drop(tracked);
    let entered = wait.flight_key.map(|k| shared.flights.enter(&k));
    run_holding(slot, svc, job, entered).await
}
