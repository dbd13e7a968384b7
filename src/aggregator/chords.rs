//! Publishing chord callbacks, and sending fail-fast cancels, once a batch is committed.
//!
//! A fail-fast cancel is recorded as due in the transaction that counts the group's first
//! failure, sent after the commit, then marked sent; the sweep sends again what was not marked.
//!
//! A due callback is published (confirmed) with the id `<group>.callback`, then marked published.
//! If the aggregator dies between the two, the restarted one first reads the results that came
//! in meanwhile (the sweep waits until none is ready): a callback whose result is recorded ran,
//! and is only marked. One still waiting to run is published again with the same id; JetStream
//! drops that copy within its de-duplication window, RabbitMQ runs it twice, and on both its
//! result is recorded once.
//! A chord with a member that did not succeed gets no callback run: its callback id gets a
//! `failed` result naming the first failed member.

use super::groups::{GroupActions, GroupView};
use super::store::Store;
use crate::error::{Error, Result};
use crate::job::JobSpec;
use crate::message::{header_safe, Headers, Message};
use crate::protocol::{header, Status};
use crate::transport::{publish_retrying, Route, Transport};
use crate::worker::cancel::CancelRequest;
use serde_json::Value;
use std::time::Duration;

/// How long a publish keeps retrying before it is left for the next sweep. Short: the results
/// loop waits for it.
const PATIENCE: Duration = Duration::from_secs(2);

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Store(e.to_string()))?
}

/// Acts on what a committed batch asked for.
pub async fn act(transport: &dyn Transport, store: &Store, actions: GroupActions) {
    for (group, why) in actions.cancel {
        tracing::info!(%group, %why, "fail-fast group: cancelling the members not finished");
        cancel(transport, store, &group, &why).await;
    }
    for group in actions.chords_due {
        complete(transport, store, &group).await;
    }
}

/// Sends the fail-fast cancel of `group` (confirmed) and marks it sent; left due for the next
/// sweep when it cannot be sent. Sending twice is harmless: a cancel names the group.
async fn cancel(transport: &dyn Transport, store: &Store, group: &str, why: &str) {
    let msg = CancelRequest::group(group, why.to_string()).to_message();
    let sent = crate::transport::retry::retrying(
        "sending a fail-fast cancel",
        crate::transport::PUBLISH_BACKOFF,
        PATIENCE,
        || transport.send_control(msg.clone()),
    )
    .await;
    match sent {
        Ok(()) => {
            let (s, g) = (store.clone(), group.to_string());
            if let Err(e) = blocking(move || s.cancel_sent(&g)).await {
                tracing::warn!(%group, error = %e, "cannot mark the fail-fast cancel sent");
            }
        }
        Err(e) => {
            tracing::warn!(%group, error = %e, "fail-fast cancel not sent yet; will try again")
        }
    }
}

/// Sends every due fail-fast cancel and publishes every due callback (after a restart, or after
/// a failed send).
pub async fn sweep(transport: &dyn Transport, store: &Store) {
    sweep_cancels(transport, store).await;
    let s = store.clone();
    match blocking(move || s.due_chords()).await {
        Ok(due) => {
            for group in due {
                complete(transport, store, &group).await;
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the due chords"),
    }
}

/// Sends every due fail-fast cancel (sending one twice is harmless).
pub async fn sweep_cancels(transport: &dyn Transport, store: &Store) {
    let s = store.clone();
    match blocking(move || s.due_cancels()).await {
        Ok(due) => {
            for (group, why) in due {
                cancel(transport, store, &group, &why).await;
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the due fail-fast cancels"),
    }
}

/// Publishes the callback of chord `group` (or its failed result) and marks it published.
pub async fn complete(transport: &dyn Transport, store: &Store, group: &str) {
    if let Err(e) = try_complete(transport, store, group).await {
        tracing::warn!(%group, error = %e, "chord callback not published yet; will try again");
    }
}

async fn try_complete(transport: &dyn Transport, store: &Store, group: &str) -> Result<()> {
    let (s, g) = (store.clone(), group.to_string());
    let Some(view) = blocking(move || s.group(&g)).await? else {
        return Ok(());
    };
    let Some(chord) = view.callback.clone() else {
        return Ok(());
    };
    let (s, id) = (store.clone(), chord.id.clone());
    if blocking(move || s.get(&id)).await?.is_some() {
        // Published by an earlier run that died before marking it, and run since: the result
        // is in. Publishing it again would run it again (JetStream drops a copy only within its
        // de-duplication window; RabbitMQ never does).
        let (s, g) = (store.clone(), group.to_string());
        blocking(move || s.chord_published(&g)).await?;
        tracing::info!(%group, callback = %chord.id, "chord callback already ran; not published again");
        return Ok(());
    }
    let why_not = if view.failed == 0 {
        // The callback job, unless it cannot be made or published at all (an id too long, an
        // input larger than the broker takes): then its failed result, with the reason. Only an
        // outage is worth another try.
        crate::fault::point("aggregator.before-chord-callback");
        let sent = match callback_job(&view) {
            Ok(msg) => {
                publish_retrying(transport, Route::Job(chord.kind.clone()), msg, PATIENCE).await
            }
            Err(e) => Err(e),
        };
        match sent {
            Ok(()) => None,
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => Some(format!(
                "chord {group}: the callback could not be published: {e}"
            )),
        }
    } else {
        Some(format!(
            "chord {}: {} of {} members did not succeed; the callback did not run (first: {})",
            view.id,
            view.failed,
            view.size,
            view.first_failure.as_deref().unwrap_or("?")
        ))
    };
    let failed = why_not.is_some();
    if let Some(why) = why_not {
        let msg = failed_result(&chord.id, &chord.kind, &why);
        publish_retrying(
            transport,
            Route::Result(chord.kind.clone()),
            msg.clone(),
            PATIENCE,
        )
        .await?;
        let mut event = crate::events::JobEvent::new(
            &chord.id,
            &chord.kind,
            crate::events::JobState::Failed,
            0,
        );
        event.worker = Some("aggregator".into());
        event.error = Some(why);
        event.group = Some(group.to_string());
        if let Err(e) = transport
            .emit_event(&chord.kind, "failed", event.to_message())
            .await
        {
            tracing::debug!(%group, error = %e, "chord failure event not sent");
        }
        if let Some(to) = &chord.reply_to {
            if let Err(e) = transport.publish(Route::Reply(to.clone()), msg).await {
                tracing::debug!(%group, error = %e, "chord reply not delivered (the waiter may be gone)");
            }
        }
    }
    let (s, g) = (store.clone(), group.to_string());
    blocking(move || s.chord_published(&g)).await?;
    tracing::info!(%group, callback = %chord.id, kind = %chord.kind, failed, "chord complete");
    Ok(())
}

/// The callback job: the members' outputs in member order.
fn callback_job(view: &GroupView) -> Result<Message> {
    let Some(chord) = &view.callback else {
        return Err(Error::Config("not a chord".into()));
    };
    let input = Value::Array(
        view.results
            .iter()
            .map(|r| r.as_ref().map(|r| r.output.clone()).unwrap_or(Value::Null))
            .collect(),
    );
    let mut spec = JobSpec::new(chord.kind.clone(), input).id(chord.id.clone());
    spec.reply_to = chord.reply_to.clone();
    Ok(spec.to_message()?.1)
}

/// The failed result of a chord's callback `id` of `kind`, saying `why`.
fn failed_result(id: &str, kind: &str, why: &str) -> Message {
    let h = Headers::new()
        .with(header::ID, header_safe(id))
        .with(header::KIND, kind.to_string())
        .with(header::STATUS, Status::Failed.as_str())
        .with(header::ATTEMPT, "0")
        .with(header::WORKER, "aggregator")
        .with(header::ERROR, header_safe(why));
    Message::new(h, "null")
}
