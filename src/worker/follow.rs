//! Jobs that wait for a singleflight run in this worker without taking a slot.
//!
//! When the worker takes a job whose `Conveyor-Dedup-Key` another job of this worker leads
//! ([`super::flight::Flights::following`]), the job does not wait for a slot or its kind's
//! admissions: it waits for the leader's outcome, and ends with it, in one of `--max-followers`
//! places. Its delivery is held meanwhile (its lease kept alive, as for any job), and set aside
//! ([`crate::transport::Delivery::set_aside`]) so that it does not count against what the broker
//! sends the worker. A cancel request ends it at once. When the run ends without an outcome to
//! share (the leader was cancelled), the job takes its kind's admissions and a slot as any job
//! (and first, for a kind with a rate key, its value's token);
//! then, unless another job has taken the key's lead meanwhile (it waits for that one instead),
//! it leads the key and goes through its kind's whole stack.

use super::cancel::{JobKeys, Tracked};
use super::controls::{self, Next};
use super::flight::{follow_local, Entered};
use super::pacer::KeyedTokens;
use super::registry::Job;
use super::{process, Shared};
use crate::events::JobState;
use crate::job::JobError;
use crate::transport::Aside;
use serde_json::Value;
use std::sync::{Arc, Mutex};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tower::{Service, ServiceExt};

/// How many jobs may wait for a run in one worker, by default.
pub const DEFAULT_MAX_FOLLOWERS: usize = 256;

/// The outcome to be of the run a job waits for.
pub(crate) type Run = watch::Receiver<Option<Result<Value, JobError>>>;

/// What a waiting job holds until it is called.
struct Waiting {
    key: String,
    run: Run,
    aside: Option<Aside>,
    /// For a kind with a rate key: its buckets and the job's value, whose token a job that runs
    /// after all takes first.
    rate: Option<(Arc<KeyedTokens>, String)>,
}

/// The service a waiting job runs through in place of its kind's stack (see the module docs).
pub(crate) fn service(
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    key: String,
    run: Run,
    aside: Option<Aside>,
    rate: Option<(Arc<KeyedTokens>, String)>,
) -> Next {
    let waiting = Waiting {
        key,
        run,
        aside,
        rate,
    };
    called_once(waiting, move |waiting, job| {
        follow(shared.clone(), slots.clone(), waiting, job)
    })
}

/// A service for one job that hands `state` to `call` (`None` if it were called again).
pub(crate) fn called_once<S, F, Fut>(state: S, call: F) -> Next
where
    S: Send + 'static,
    F: Fn(Option<S>, Job) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Value, JobError>> + Send + 'static,
{
    let state = Arc::new(Mutex::new(Some(state)));
    Next::new(tower::service_fn(move |job: Job| {
        let state = state.lock().unwrap_or_else(|p| p.into_inner()).take();
        call(state, job)
    }))
}

async fn follow(
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    waiting: Option<Waiting>,
    job: Job,
) -> Result<Value, JobError> {
    let Some(Waiting {
        key,
        run,
        aside,
        rate,
    }) = waiting
    else {
        return Err(JobError::retry("a waiting job was called twice"));
    };
    let stack = kind_stack(&shared, &job)?;
    let tracked = shared.cancels.track_to_run(JobKeys::of(&job.meta))?;
    shared.events.emit(process::job_event(
        &job.meta,
        &shared.config.worker_id,
        JobState::Started,
        None,
    ));
    let mut run = Some(run);
    let (svc, slot) = loop {
        if let Some(run) = run.take() {
            let shared_outcome = cancellable(&tracked, follow_local(run, &job.cancel)).await?;
            if let Some(outcome) = shared_outcome {
                return outcome;
            }
        }
        // The run ended with nothing to share: this job takes admissions and a slot as any job,
        // unless a job of this worker takes the key's lead meanwhile (it waits for that one).
        let led = shared.flights.led();
        tokio::pin!(led);
        led.as_mut().enable();
        if let Some(again) = shared.flights.following(&key) {
            run = Some(again);
            continue;
        }
        let admitted = async {
            if let Some((keyed, value)) = &rate {
                keyed.take(value).await;
            }
            let mut svc = stack.service();
            svc.ready().await?;
            let slot = slots.clone().acquire_owned().await;
            let slot = slot.map_err(|_| JobError::retry("the worker is stopping"))?;
            Ok::<_, JobError>((svc, slot))
        };
        let admitted = tokio::select! {
            admitted = cancellable(&tracked, admitted) => admitted??,
            _ = led => {
                run = shared.flights.following(&key);
                continue;
            }
        };
        match shared.flights.following(&key) {
            // Another job took the lead meanwhile: wait for it, giving the slot back.
            Some(again) => run = Some(again),
            None => break admitted,
        }
    };
    drop((tracked, aside));
    run_holding(slot, svc, job, Some(shared.flights.enter(&key))).await
}

/// The control stack of the job's kind.
pub(crate) fn kind_stack<'a>(
    shared: &'a Shared,
    job: &Job,
) -> Result<&'a controls::Stack, JobError> {
    shared
        .stacks
        .get(&job.meta.kind)
        .ok_or_else(|| JobError::permanent(format!("unknown job kind {:?}", job.meta.kind)))
}

/// Runs `job` through its kind's stack `svc`, admitted, holding `slot` until it is settled, as
/// the leader of its singleflight key here if `entered` says it leads.
pub(crate) async fn run_holding(
    slot: OwnedSemaphorePermit,
    mut svc: Next,
    job: Job,
    entered: Option<Entered>,
) -> Result<Value, JobError> {
    controls::hold_until_settled(Box::new(slot));
    match entered {
        Some(Entered::Lead(lead)) => lead.run(svc.call(job)).await,
        // No key, or one taken just now (the singleflight control waits for it in this slot).
        _ => svc.call(job).await,
    }
}

/// Awaits `fut` unless a cancel request names the job first.
pub(crate) async fn cancellable<T>(
    tracked: &Tracked,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, JobError> {
    tokio::select! {
        v = fut => Ok(v),
        _ = tracked.token.cancelled() => Err(JobError::CancelRequested(tracked.reason())),
    }
}
