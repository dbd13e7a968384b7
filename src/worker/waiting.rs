//! Delayed jobs (`Conveyor-Not-Before`, `Conveyor-Delay-Ms`): a job taken before its time
//! waits in the broker, not in the worker. The pump hands it back as a copy published with
//! [`Route::Waiting`] (then acks it), before it takes an admission or a slot, so it holds
//! neither and spends no attempt. RabbitMQ brings the copy back to the kind's queue from a
//! delay queue, at most [`PARK_HOP_MAX`] later and never after its time; a copy still early
//! waits again. On JetStream the copy waits in the delayed stream, whose messages [`release`]
//! delivers again with a delayed nak (of at most [`PARK_HOP_MAX`]) until they are due, then
//! publishes to their kind ([`Route::Due`]) and acks.
//!
//! A waiting job comes up at least every [`PARK_HOP_MAX`], shorter than cancels are remembered:
//! one cancelled meanwhile goes on to its kind at once, where it ends `cancelled` without
//! running.

use super::cancel::JobKeys;
use super::Shared;
use crate::job::{now_ms, JobMeta};
use crate::message::Message;
use crate::protocol::{header, PARK_HOP_MAX};
use crate::transport::{ConsumeOptions, Delivery, DeliveryStream, Route, Source};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long a failed move waits before the job is handed back, so that a broker outage does
/// not turn into a loop of redeliveries.
const BACK_OFF: Duration = Duration::from_secs(1);

/// When `delivery` is a job not due yet and not cancelled: its time, in milliseconds since the
/// epoch. A job whose headers cannot be read is not waiting: it goes on, to be dead-lettered.
pub(crate) fn later(shared: &Shared, delivery: &Delivery) -> Option<(JobMeta, u64)> {
    let h = &delivery.message.headers;
    if h.get(header::NOT_BEFORE).is_none() && h.get(header::DELAY_MS).is_none() {
        return None;
    }
    // Released at its time by a worker whose clock said so: it runs, even where this clock is
    // a little behind (waiting again, it would meet its own earlier copies' ids).
    if h.get(header::RELEASED).is_some() {
        return None;
    }
    // An oversized body is dead-lettered unread, now rather than at its time.
    if delivery.message.body.len() > shared.config.max_body_bytes {
        return None;
    }
    let meta = JobMeta::from_message(
        &delivery.kind,
        &delivery.message,
        delivery.delivery_count,
        || delivery.broker_id.clone(),
    )
    .ok()?;
    let due = meta.due_later()?;
    if shared.cancels.cancelled(JobKeys::of(&meta)).is_some() {
        return None;
    }
    Some((meta, due))
}

/// The job as it waits: its id and time in its headers, `Conveyor-Delay-Ms` turned into
/// `Conveyor-Not-Before` (so it counts once).
fn waiting_copy(meta: &JobMeta, message: &Message, due: u64) -> Message {
    let mut next = without_broker_controls(message);
    next.headers.remove(header::DELAY_MS);
    next.headers.remove(header::RETRY_DELAY_MS);
    next.headers.insert(header::NOT_BEFORE, due.to_string());
    next.headers.insert(header::ID, meta.id.clone());
    next
}

/// `message` without the headers a broker acts on (`Nats-Expected-Stream`, `Nats-Rollup`, a
/// message id, ...): the client that sent them meant its own publish, not the copies.
fn without_broker_controls(message: &Message) -> Message {
    let mut headers = crate::message::Headers::new();
    for (k, v) in message.headers.iter() {
        if !k.to_ascii_lowercase().starts_with("nats-") {
            headers.insert(k, v);
        }
    }
    Message::new(headers, message.body.clone())
}

/// Hands a job that is not due back to the broker until `due` ([`Route::Waiting`]), then acks
/// it. If the copy cannot be stored, the job is handed back as it is, after a pause.
pub(crate) async fn park(shared: Arc<Shared>, delivery: Delivery, meta: JobMeta, due: u64) {
    let next = waiting_copy(&meta, &delivery.message, due);
    let route = Route::Waiting {
        kind: delivery.kind.clone(),
        until_ms: due,
    };
    match shared.transport.publish(route, next).await {
        Ok(()) => {
            if let Err(e) = delivery.ack().await {
                // It comes again and waits again; JetStream keeps one copy per id.
                tracing::warn!(job = %meta.id, error = %e, "a waiting job's ack failed");
            }
        }
        Err(e) if e.is_transient() => {
            tracing::warn!(job = %meta.id, error = %e, "a job not due yet could not be put back to wait");
            tokio::time::sleep(BACK_OFF).await;
            let _ = delivery.nack().await;
        }
        // Refused for good (too large with the headers added, not permitted): it never could.
        Err(e) => {
            let reason = format!("could not be put back to wait for its time: {e}");
            super::process::dead(&shared, delivery, &meta, &reason).await;
        }
    }
}

/// Moves the waiting jobs of the namespace to their kinds as they come due (JetStream), until
/// `shutdown`.
pub(crate) async fn release(shared: Arc<Shared>, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        release_from_one_consumer(&shared, &shutdown).await;
        if !shutdown.is_cancelled() {
            // The consumer ended (deleted, its stream made again): read it anew.
            tracing::warn!("the waiting jobs' consumer ended: reading it again");
            let _ = shutdown
                .run_until_cancelled(tokio::time::sleep(BACK_OFF))
                .await;
        }
    }
}

/// [`release`] through one subscription of the waiting jobs' consumer, until it ends.
async fn release_from_one_consumer(shared: &Arc<Shared>, shutdown: &CancellationToken) {
    let opts = ConsumeOptions {
        prefetch: 64,
        lease: Duration::from_secs(30),
        ..ConsumeOptions::default()
    };
    let mut stream: DeliveryStream = loop {
        match shared.transport.consume(Source::Waiting, opts).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the waiting jobs yet");
                if shutdown
                    .run_until_cancelled(tokio::time::sleep(BACK_OFF * 5))
                    .await
                    .is_none()
                {
                    return;
                }
            }
        }
    };
    while let Some(Some(item)) = shutdown.run_until_cancelled(stream.next()).await {
        let delivery = match item {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "waiting jobs' consumer error");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        settle_waiting(shared, delivery).await;
    }
    // Hand back what the consumer had already buffered, for the other workers.
    while let Some(Some(Ok(d))) = futures::FutureExt::now_or_never(stream.next()) {
        let _ = d.nack().await;
    }
}

/// One delivery of a waiting job: delivered again later while it is early (and not cancelled),
/// else published to its kind and acked.
async fn settle_waiting(shared: &Shared, delivery: Delivery) {
    if let Some((_, due)) = later(shared, &delivery) {
        let left = Duration::from_millis(due.saturating_sub(now_ms())).min(PARK_HOP_MAX);
        let message = delivery.message.clone();
        if let Err(e) = delivery.retry(message, left).await {
            tracing::warn!(error = %e, "a waiting job's delayed nak failed");
        }
        return;
    }
    let kind = delivery.kind.clone();
    let mut message = without_broker_controls(&delivery.message);
    message
        .headers
        .insert(header::RELEASED, now_ms().to_string());
    // A job without a time of its own (its headers unreadable): the time it was released.
    if message.headers.get(header::NOT_BEFORE).is_none() {
        message
            .headers
            .insert(header::NOT_BEFORE, now_ms().to_string());
    }
    match shared.transport.publish(Route::Due(kind), message).await {
        Ok(()) => {
            if let Err(e) = delivery.ack().await {
                tracing::warn!(error = %e, "a released job's ack failed: it is released again, de-duplicated");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "a due job could not be released yet");
            tokio::time::sleep(BACK_OFF).await;
            let _ = delivery.nack().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Headers;

    fn meta(h: &Headers) -> JobMeta {
        JobMeta::from_message("echo", &Message::new(h.clone(), Vec::new()), 1, || {
            "fallback".into()
        })
        .expect("meta")
    }

    #[test]
    fn a_waiting_copy_carries_its_id_and_time_and_no_relative_delay() {
        let mut h = Headers::new();
        h.insert(header::NATS_MSG_ID, "job-1");
        h.insert(header::DELAY_MS, "5000");
        h.insert(header::RETRY_DELAY_MS, "4096");
        let m = meta(&h);
        let due = m.due_later().expect("not due for 5 s");
        assert!(due > now_ms() + 4_000 && due <= now_ms() + 5_000, "{due}");
        let copy = waiting_copy(&m, &Message::new(h, Vec::new()), due);
        assert_eq!(copy.headers.get(header::ID), Some("job-1"));
        assert_eq!(
            copy.headers.get(header::NOT_BEFORE),
            Some(due.to_string().as_str())
        );
        assert_eq!(copy.headers.get(header::DELAY_MS), None);
        assert_eq!(copy.headers.get(header::RETRY_DELAY_MS), None);
        // Read again, the copy is due at the same time, not 5 s after.
        assert_eq!(meta(&copy.headers).not_before, Some(due));
    }

    #[test]
    fn a_waiting_copy_drops_the_headers_a_broker_acts_on() {
        let h = Headers::new()
            .with(header::NOT_BEFORE, (now_ms() + 60_000).to_string())
            .with("Nats-Expected-Stream", "OTHER_JOBS")
            .with("Nats-Rollup", "sub")
            .with("X-Mine", "kept");
        let m = meta(&h);
        let copy = waiting_copy(&m, &Message::new(h, Vec::new()), now_ms() + 60_000);
        assert_eq!(copy.headers.get("Nats-Expected-Stream"), None);
        assert_eq!(copy.headers.get("Nats-Rollup"), None);
        assert_eq!(copy.headers.get("X-Mine"), Some("kept"));
    }

    #[test]
    fn a_job_due_or_without_a_time_is_not_waiting() {
        let mut h = Headers::new();
        assert_eq!(meta(&h).due_later(), None);
        h.insert(header::NOT_BEFORE, (now_ms() - 1).to_string());
        assert_eq!(meta(&h).due_later(), None);
        h.insert(header::NOT_BEFORE, "2023-11-14T22:13:20Z");
        assert_eq!(meta(&h).due_later(), None);
    }

    #[test]
    fn bad_or_far_times_are_reasons_to_dead_letter() {
        for (name, value) in [
            (header::NOT_BEFORE, "tomorrow"),
            (header::NOT_BEFORE, "99999999999999"),
            (header::DELAY_MS, "-1"),
            (header::DELAY_MS, "40000000000"),
        ] {
            let h = Headers::new().with(name, value);
            let err = JobMeta::from_message("echo", &Message::new(h, Vec::new()), 1, || "x".into())
                .expect_err(value);
            assert!(err.contains(name), "{err}");
        }
    }
}
