//! One delivery, from broker to settled: validate, run, then publish the result (confirmed)
//! before acking, retry with backoff, or dead-letter with the reason.

use super::controls::Next;
use super::registry::Job;
use super::{lease_ticker, Shared};
use crate::codec::Codec;
use crate::error::Result;
use crate::events::{JobEvent, JobState};
use crate::job::{JobError, JobMeta};
use crate::message::{header_safe, Headers, Message};
use crate::protocol::{header, Status};
use crate::transport::{Delivery, Route};
use futures::FutureExt;
use serde_json::Value;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tower::Service;

/// How a delivery ended, for counters and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Result published, job acked.
    Succeeded,
    /// Scheduled for another attempt.
    Retried,
    /// Dead-lettered.
    Dead,
    /// Ended with a final status other than succeeded (cancelled).
    Ended,
    /// Handed back to the broker (shutdown) or left unsettled after a broker error.
    HandedBack,
    /// A second copy of a scheduler's tick, acked without running (see
    /// [`crate::schedule::runs`]).
    Duplicate,
}

/// Runs one delivery to its end through `svc`, its kind's control stack, already admitted
/// (`None` when this worker has no such kind). Never panics on input; broker errors leave the
/// delivery to be redelivered.
pub async fn process(
    shared: Arc<Shared>,
    delivery: Delivery,
    abandon: CancellationToken,
    svc: Option<Next>,
) -> Outcome {
    let kind = delivery.kind.clone();
    let body_len = delivery.message.body.len();
    if body_len > shared.config.max_body_bytes {
        let reason = format!(
            "body of {body_len} bytes exceeds the limit of {} bytes",
            shared.config.max_body_bytes
        );
        let meta = fallback_meta(&delivery, &kind);
        return dead(&shared, delivery, &meta, &reason).await;
    }
    let meta =
        match JobMeta::from_message(&kind, &delivery.message, delivery.delivery_count, || {
            delivery.broker_id.clone()
        }) {
            Ok(m) => m,
            Err(reason) => {
                let meta = fallback_meta(&delivery, &kind);
                return dead(&shared, delivery, &meta, &reason).await;
            }
        };
    if let Some(why) = meta
        .reply_to
        .as_deref()
        .and_then(|to| shared.transport.check_reply_to(to).err())
    {
        let mut meta = meta;
        meta.reply_to = None;
        let reason = format!("bad header {}: {why}", header::REPLY_TO);
        return dead(&shared, delivery, &meta, &reason).await;
    }
    let Some(svc) = svc else {
        let reason = format!(
            "unknown job kind {kind:?}: this worker runs {}",
            shared.registry.kinds().join(", ")
        );
        return dead(&shared, delivery, &meta, &reason).await;
    };
    if meta.attempt > meta.max_attempts {
        let reason = format!(
            "gave up after {} attempts: the last ones ended without a result (worker crashed or lease expired)",
            meta.max_attempts
        );
        return dead(&shared, delivery, &meta, &reason).await;
    }
    let input = match meta.codec.decode(&delivery.message.body) {
        Ok(v) => v,
        Err(e) => return dead(&shared, delivery, &meta, &e.to_string()).await,
    };
    if !shared.transport.drops_republished_ids() {
        match first_copy(&shared, &delivery, &meta).await {
            Copy::Run => {}
            Copy::Duplicate => {
                if let Err(e) = delivery.ack().await {
                    tracing::warn!(job = %meta.id, error = %e, "ack of a duplicate tick failed");
                }
                return Outcome::Duplicate;
            }
        }
    }
    let mut meta = meta;
    if meta.timeout.is_none() {
        meta.timeout = shared.config.kind_timeouts.get(&meta.kind).copied();
    }
    let meta = Arc::new(meta);
    let job = Job {
        meta: meta.clone(),
        input,
        cancel: abandon.child_token(),
        resources: shared.resources.clone(),
    };
    let Some(outcome) = run_stack(&shared, svc, job, &delivery, &abandon).await else {
        return hand_back(delivery).await;
    };
    match outcome {
        Ok(output) => succeed(&shared, delivery, &meta, output).await,
        Err(JobError::Cancelled) => {
            finish(&shared, delivery, &meta, Status::Cancelled, "cancelled").await
        }
        Err(JobError::CancelRequested(why)) => {
            finish(&shared, delivery, &meta, Status::Cancelled, &why).await
        }
        Err(e) if e.is_retryable() && meta.attempt < meta.max_attempts => {
            retry(&shared, delivery, &meta, &e).await
        }
        Err(e) if e.is_retryable() => {
            let reason = format!("failed after {} attempts: {e}", meta.attempt);
            // A job whose last attempt ran out of time ends `timed-out` (and in the dead letters).
            let status = match e {
                JobError::Timeout(_) => Status::TimedOut,
                _ => Status::Dead,
            };
            dead_as(&shared, delivery, &meta, &reason, status).await
        }
        Err(e) => dead(&shared, delivery, &meta, &e.to_string()).await,
    }
}

/// What to do with a delivery that may be a second copy of a scheduler's tick.
enum Copy {
    /// Not a tick, or the copy that holds its tick: run it.
    Run,
    /// Another copy of the tick holds it: ack this one without running it.
    Duplicate,
}

/// How long a worker tries to claim a tick before it runs the tick unclaimed.
const CLAIM_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// Claims a scheduler's tick for this copy before it runs (see [`crate::schedule::runs`]),
/// trying again in place while the broker fails (handing the delivery back would spend one of
/// its attempts). A tick that cannot be claimed within [`CLAIM_PATIENCE`], or by a user
/// without the right to, runs unclaimed: at least once rather than never.
async fn first_copy(shared: &Shared, delivery: &Delivery, meta: &JobMeta) -> Copy {
    let Some((schedule, tick, copy)) = crate::schedule::runs::tick_of(&delivery.message.headers)
    else {
        return Copy::Run;
    };
    let t = shared.transport.as_ref();
    let claim = crate::transport::retry::retrying(
        "claim a tick",
        crate::transport::PUBLISH_BACKOFF,
        CLAIM_PATIENCE,
        || async {
            // Each try extends the lease (where there is one) of the delivery it waits with.
            let _ = delivery.progress().await;
            // Losing the register to other claims again and again (a catch-up burst of one
            // schedule) is tried again like a broker failure.
            crate::schedule::runs::claim(t, schedule, tick, copy)
                .await
                .map_err(|e| match e {
                    crate::Error::Conflict(why) => {
                        crate::Error::broker("claim a tick", std::io::Error::other(why))
                    }
                    e => e,
                })
        },
    )
    .await;
    match claim {
        Ok(true) => Copy::Run,
        Ok(false) => {
            tracing::info!(job = %meta.id, %schedule, tick, "another copy of this tick holds it (published again by the scheduler that took over): acked without running");
            Copy::Duplicate
        }
        Err(e) => {
            tracing::warn!(job = %meta.id, error = %e, "cannot claim the tick; running it unclaimed");
            Copy::Run
        }
    }
}

/// Runs `job` through its kind's control stack and handler, polled in place (a panic fails only
/// this job), extending the delivery's lease meanwhile. `None` when the worker abandons it.
async fn run_stack(
    shared: &Shared,
    mut svc: Next,
    job: Job,
    delivery: &Delivery,
    abandon: &CancellationToken,
) -> Option<Result<Value, JobError>> {
    let _stop_handler = job.cancel.clone().drop_guard();
    let run = AssertUnwindSafe(svc.call(job)).catch_unwind();
    tokio::pin!(run);
    let mut ticker = lease_ticker(shared.config.lease);
    loop {
        tokio::select! {
            biased;
            _ = abandon.cancelled() => return None,
            joined = &mut run => {
                return Some(joined.unwrap_or_else(|panic| {
                    Err(JobError::retry(format!("handler panicked: {}", panic_text(&panic))))
                }));
            }
            _ = ticker.tick() => {
                if let Err(e) = delivery.progress().await {
                    tracing::warn!(kind = %delivery.kind, error = %e, "could not extend the lease");
                }
            }
        }
    }
}

/// Metadata for a job whose headers could not be read: enough to dead-letter it.
fn fallback_meta(delivery: &Delivery, kind: &str) -> JobMeta {
    let h = &delivery.message.headers;
    JobMeta {
        id: crate::job::id_of(h).unwrap_or_else(|| delivery.broker_id.clone()),
        kind: kind.to_string(),
        attempt: delivery.delivery_count,
        max_attempts: 1,
        timeout: None,
        reply_to: h.get(header::REPLY_TO).map(str::to_string),
        correlation_id: h.get(header::CORRELATION_ID).map(str::to_string),
        codec: Codec::Json,
        group: Vec::new(),
        chain_rest: Vec::new(),
        dedup_key: None,
        not_before: None,
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic".to_string()
    }
}

fn result_headers(shared: &Shared, meta: &JobMeta, status: Status, error: Option<&str>) -> Headers {
    let mut h = Headers::new()
        .with(header::ID, meta.id.clone())
        .with(header::KIND, meta.kind.clone())
        .with(header::STATUS, status.as_str())
        .with(header::ATTEMPT, meta.attempt.to_string())
        .with(header::WORKER, shared.config.worker_id.clone());
    if meta.codec != Codec::Json {
        h.insert(header::CONTENT_TYPE, meta.codec.content_type());
    }
    if let Some(e) = error {
        h.insert(header::ERROR, header_safe(e));
    }
    if let Some(c) = &meta.correlation_id {
        h.insert(header::CORRELATION_ID, c.clone());
    }
    for (k, v) in &meta.group {
        h.insert(k.clone(), v.clone());
    }
    h
}

/// Publishes the final result (and the reply, when asked), each confirmed, with retries.
async fn publish_final(shared: &Shared, meta: &JobMeta, result: Message) -> Result<()> {
    publish_result(shared, meta, result, true).await
}

/// Publishes a result; the reply too when `reply` (a chain step that handed on does not reply).
async fn publish_result(
    shared: &Shared,
    meta: &JobMeta,
    result: Message,
    reply: bool,
) -> Result<()> {
    let reply = async {
        if let Some(to) = meta.reply_to.as_ref().filter(|_| reply) {
            if let Err(e) = shared
                .transport
                .publish(Route::Reply(to.clone()), result.clone())
                .await
            {
                tracing::debug!(job = %meta.id, error = %e, "reply not delivered (the waiter may be gone)");
            }
        }
    };
    let record = shared.publish_retrying(Route::Result(meta.kind.clone()), result.clone());
    let (recorded, ()) = tokio::join!(record, reply);
    recorded
}

async fn succeed(shared: &Shared, delivery: Delivery, meta: &JobMeta, output: Value) -> Outcome {
    let body = match meta.codec.encode(&output) {
        Ok(b) => b,
        Err(e) => {
            let reason = format!("output could not be encoded: {e}");
            return dead(shared, delivery, meta, &reason).await;
        }
    };
    let body = bytes::Bytes::from(body);
    let hands_on = !meta.chain_rest.is_empty();
    if hands_on {
        let (kind, next) = next_chain_step(&delivery.message, meta, body.clone());
        if let Err(e) = shared.publish_retrying(Route::Job(kind), next).await {
            tracing::error!(job = %meta.id, error = %e, "next chain step not confirmed; handing the job back");
            return hand_back(delivery).await;
        }
    }
    let msg = Message::new(result_headers(shared, meta, Status::Succeeded, None), body);
    let published = publish_result(shared, meta, msg, !hands_on).await;
    if published.is_ok() {
        emit(shared, meta, JobState::Succeeded, None);
    }
    settle(delivery, meta, published, Outcome::Succeeded).await
}

async fn finish(
    shared: &Shared,
    delivery: Delivery,
    meta: &JobMeta,
    status: Status,
    why: &str,
) -> Outcome {
    let msg = Message::new(result_headers(shared, meta, status, Some(why)), Vec::new());
    let published = publish_final(shared, meta, msg).await;
    if published.is_ok() {
        emit(shared, meta, JobState::of_status(status), Some(why));
    }
    settle(delivery, meta, published, Outcome::Ended).await
}

async fn retry(shared: &Shared, delivery: Delivery, meta: &JobMeta, err: &JobError) -> Outcome {
    let after = match err {
        JobError::Retry { after: Some(d), .. } => *d,
        _ => shared.config.backoff.delay(meta.attempt),
    };
    tracing::info!(job = %meta.id, kind = %meta.kind, attempt = meta.attempt, error = %err, "retrying in {after:?}");
    let mut next = delivery.message.clone();
    next.headers
        .insert(header::ATTEMPT, (meta.attempt + 1).to_string());
    next.headers.insert(header::ID, meta.id.clone());
    next.headers
        .insert(header::ERROR, header_safe(&err.to_string()));
    crate::fault::point("worker.before-retry");
    match delivery.retry(next, after).await {
        Ok(()) => {
            emit(shared, meta, JobState::Retrying, Some(&err.to_string()));
            Outcome::Retried
        }
        Err(e) => {
            tracing::warn!(job = %meta.id, error = %e, "could not schedule the retry; the broker will redeliver");
            Outcome::HandedBack
        }
    }
}

/// Dead-letters a job: the original message plus the reason to the dead letters, a `dead` result,
/// then the ack. Publishes are confirmed before the ack; if they fail the job is redelivered.
pub(crate) async fn dead(
    shared: &Shared,
    delivery: Delivery,
    meta: &JobMeta,
    reason: &str,
) -> Outcome {
    dead_as(shared, delivery, meta, reason, Status::Dead).await
}

/// [`dead`], with the result's status given.
async fn dead_as(
    shared: &Shared,
    delivery: Delivery,
    meta: &JobMeta,
    reason: &str,
    status: Status,
) -> Outcome {
    tracing::warn!(job = %meta.id, kind = %meta.kind, attempt = meta.attempt, %reason, "dead-lettering job");
    let mut letter = delivery.message.clone();
    letter.headers.insert(header::ID, meta.id.clone());
    letter.headers.insert(header::KIND, meta.kind.clone());
    letter.headers.insert(header::ERROR, header_safe(reason));
    letter
        .headers
        .insert(header::ATTEMPT, meta.attempt.to_string());
    letter
        .headers
        .insert(header::WORKER, shared.config.worker_id.clone());
    let dead_route = Route::Dead(meta.kind.clone());
    let result = Message::new(
        result_headers(shared, meta, status, Some(reason)),
        Vec::new(),
    );
    let (lettered, recorded) = tokio::join!(
        shared.publish_retrying(dead_route, letter),
        publish_final(shared, meta, result)
    );
    let published = lettered.and(recorded);
    if published.is_ok() {
        emit(shared, meta, JobState::of_status(status), Some(reason));
    }
    settle(delivery, meta, published, Outcome::Dead).await
}

/// The next step of the chain `meta` is a step of: its kind, and the job with `output` as its
/// input and id `<chain>.<step>`. Its id is the same however often this step runs, so a repeated
/// publish is one job to JetStream's de-duplication and to the aggregator.
fn next_chain_step(job: &Message, meta: &JobMeta, output: bytes::Bytes) -> (String, Message) {
    let chain = meta.workflow(header::CHAIN).unwrap_or(&meta.id).to_string();
    // JobMeta keeps steps below MAX_CHAIN_STEPS; saturating all the same, as this runs outside
    // the handler's panic guard.
    let step: u32 = meta
        .workflow(header::CHAIN_STEP)
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(0)
        .saturating_add(1);
    let length = meta
        .workflow(header::CHAIN_LENGTH)
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| {
            step.saturating_add(u32::try_from(meta.chain_rest.len()).unwrap_or(u32::MAX))
        });
    let mut h = job.headers.clone();
    for stale in [
        header::NATS_MSG_ID,
        header::ATTEMPT,
        header::ERROR,
        header::RETRY_DELAY_MS,
        header::KIND,
        header::WORKER,
    ] {
        h.remove(stale);
    }
    let id = crate::workflow::chain_step_id(&chain, step);
    h.insert(header::ID, header_safe(&id));
    h.insert(header::CHAIN, chain);
    h.insert(header::CHAIN_STEP, step.to_string());
    h.insert(header::CHAIN_LENGTH, length.to_string());
    match meta.chain_rest.get(1..) {
        Some(rest) if !rest.is_empty() => h.insert(header::CHAIN_REST, rest.join(",")),
        _ => h.remove(header::CHAIN_REST),
    }
    let kind = meta.chain_rest.first().cloned().unwrap_or_default();
    (kind, Message::new(h, output))
}

/// Queues a lifecycle event of this job (never waits).
fn emit(shared: &Shared, meta: &JobMeta, state: JobState, error: Option<&str>) {
    shared
        .events
        .emit(job_event(meta, &shared.config.worker_id, state, error));
}

/// A lifecycle event of the job `meta` describes, as `worker` saw it.
pub fn job_event(meta: &JobMeta, worker: &str, state: JobState, error: Option<&str>) -> JobEvent {
    let mut ev = JobEvent::new(&meta.id, &meta.kind, state, meta.attempt);
    ev.worker = Some(worker.to_string());
    ev.error = error.map(header_safe);
    ev.group = meta
        .group
        .iter()
        .find(|(k, _)| k == header::GROUP)
        .map(|(_, v)| v.clone());
    ev
}

async fn settle(
    delivery: Delivery,
    meta: &JobMeta,
    published: Result<()>,
    outcome: Outcome,
) -> Outcome {
    match published {
        Ok(()) => {
            crate::fault::point("worker.before-ack");
            if let Err(e) = delivery.ack().await {
                tracing::warn!(job = %meta.id, error = %e, "ack failed; the job may be redelivered (its result is recorded once)");
            }
            outcome
        }
        Err(e) => {
            tracing::error!(job = %meta.id, error = %e, "result not confirmed; handing the job back");
            hand_back(delivery).await
        }
    }
}

async fn hand_back(delivery: Delivery) -> Outcome {
    if let Err(e) = delivery.nack().await {
        tracing::warn!(error = %e, "nack failed; the broker redelivers after the lease");
    }
    Outcome::HandedBack
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_possible_chain_step_does_not_overflow() {
        let h = Headers::new()
            .with(header::CHAIN_STEP, u32::MAX.to_string())
            .with(header::CHAIN_REST, "echo");
        let job = Message::new(h, "{}");
        let mut meta =
            JobMeta::from_message("echo", &Message::new(Headers::new(), "{}"), 1, || {
                "c".into()
            })
            .expect("parses");
        // As if the bound of JobMeta had been passed by: the step arithmetic alone must hold.
        meta.group = vec![(header::CHAIN_STEP.to_string(), u32::MAX.to_string())];
        meta.chain_rest = vec!["echo".into()];
        let (kind, next) = next_chain_step(&job, &meta, bytes::Bytes::from_static(b"1"));
        assert_eq!(kind, "echo");
        assert_eq!(
            next.headers.get(header::CHAIN_STEP),
            Some(u32::MAX.to_string().as_str())
        );
    }
}
