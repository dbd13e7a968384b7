//! Job lifecycle events (pub/sub): every state change of a job is broadcast on
//! `<ns>.events.<kind>.<state>` (NATS) or the `<ns>.events` exchange with routing key
//! `<kind>.<state>` (RabbitMQ). At most once: nothing is stored, and an event that cannot be sent
//! is dropped rather than slowing the job down.

use crate::error::Result;
use crate::message::{Headers, Message};
use crate::protocol::header;
use crate::transport::{MessageStream, Transport};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// A state a job passes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    /// The broker confirmed the job (emitted by the publishing client).
    Published,
    /// A worker began an attempt.
    Started,
    /// An attempt failed and another one is scheduled.
    Retrying,
    /// The job produced its output.
    Succeeded,
    /// The job failed and will not be retried.
    Failed,
    /// The job went to the dead letters.
    Dead,
    /// The job was cancelled.
    Cancelled,
    /// The job's last attempt ran out of time.
    TimedOut,
}

impl JobState {
    /// Every state, in lifecycle order.
    pub const ALL: [JobState; 8] = [
        JobState::Published,
        JobState::Started,
        JobState::Retrying,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Dead,
        JobState::Cancelled,
        JobState::TimedOut,
    ];

    /// Wire spelling (the last word of the subject or routing key).
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Published => "published",
            JobState::Started => "started",
            JobState::Retrying => "retrying",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Dead => "dead",
            JobState::Cancelled => "cancelled",
            JobState::TimedOut => "timed-out",
        }
    }

    /// The state of a final result status.
    pub fn of_status(status: crate::protocol::Status) -> JobState {
        use crate::protocol::Status;
        match status {
            Status::Succeeded => JobState::Succeeded,
            Status::Failed => JobState::Failed,
            Status::Dead => JobState::Dead,
            Status::Cancelled => JobState::Cancelled,
            Status::TimedOut => JobState::TimedOut,
        }
    }
}

/// One event, as JSON on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEvent {
    /// Job id.
    pub id: String,
    /// Job kind.
    pub kind: String,
    /// `published`, `started`, `retrying`, `succeeded`, `failed`, `dead`, `cancelled`, `timed-out`.
    pub state: String,
    /// The attempt (0 for `published`).
    pub attempt: u32,
    /// The worker, for states a worker reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Why, for `retrying` and the final states other than `succeeded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The job's group, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl JobEvent {
    /// An event of job `id` of `kind`, now.
    pub fn new(id: &str, kind: &str, state: JobState, attempt: u32) -> Self {
        JobEvent {
            id: id.to_string(),
            kind: kind.to_string(),
            state: state.as_str().to_string(),
            attempt,
            worker: None,
            at_ms: crate::job::now_ms(),
            error: None,
            group: None,
        }
    }

    /// Encodes the event.
    pub fn to_message(&self) -> Message {
        let headers = Headers::new().with(header::CONTENT_TYPE, "application/json");
        Message::new(headers, serde_json::to_vec(self).unwrap_or_default())
    }

    /// Decodes an event; `None` for anything else (supervisor events share the exchange).
    pub fn from_message(msg: &Message) -> Option<JobEvent> {
        serde_json::from_slice(&msg.body).ok()
    }
}

/// Subscribes to the job events of `kind` (every kind when `None`) from now on. Each subscriber
/// gets every event; supervisor events are left out.
pub async fn watch(
    transport: &dyn Transport,
    kind: Option<&str>,
) -> Result<futures::stream::BoxStream<'static, JobEvent>> {
    let pattern = match kind {
        Some(k) => {
            crate::protocol::validate_kind(k)?;
            format!("{k}.*")
        }
        None => ">".to_string(),
    };
    let stream: MessageStream = transport.listen_events(&pattern).await?;
    Ok(stream
        .filter_map(|m| async move { JobEvent::from_message(&m) })
        .boxed())
}

enum Command {
    Event(JobEvent),
    Flush(oneshot::Sender<()>),
}

/// Most events waiting to be sent; past it new ones are dropped (and counted).
const QUEUE: usize = 8192;

/// Sends events from a background task, so that a job never waits on one. Cheap to clone.
#[derive(Clone)]
pub struct Emitter {
    tx: Option<mpsc::Sender<Command>>,
    dropped: Arc<AtomicU64>,
}

impl Emitter {
    /// An emitter that sends nothing.
    pub fn disabled() -> Self {
        Emitter {
            tx: None,
            dropped: Arc::default(),
        }
    }

    /// Starts the background task that publishes on `transport`.
    pub fn spawn(transport: Arc<dyn Transport>) -> Self {
        let (tx, mut rx) = mpsc::channel::<Command>(QUEUE);
        tokio::spawn(async move {
            while let Some(cmd) = rx.recv().await {
                match cmd {
                    Command::Event(ev) => {
                        let state = ev.state.clone();
                        if let Err(e) = transport
                            .emit_event(&ev.kind, &state, ev.to_message())
                            .await
                        {
                            tracing::debug!(job = %ev.id, %state, error = %e, "event not sent");
                        }
                    }
                    Command::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        Emitter {
            tx: Some(tx),
            dropped: Arc::default(),
        }
    }

    /// Queues `event`; drops it when the queue is full.
    pub fn emit(&self, event: JobEvent) {
        if let Some(tx) = &self.tx {
            if tx.try_send(Command::Event(event)).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Events dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits (up to `timeout`) until every event queued so far was handed to the broker client.
    pub async fn flush(&self, timeout: Duration) {
        if let Some(tx) = &self.tx {
            let (done, wait) = oneshot::channel();
            if tx.send(Command::Flush(done)).await.is_ok() {
                let _ = tokio::time::timeout(timeout, wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_skip_empty_fields() {
        let mut ev = JobEvent::new("j1", "echo", JobState::Retrying, 2);
        ev.error = Some("boom".into());
        let msg = ev.to_message();
        let v: serde_json::Value = serde_json::from_slice(&msg.body).expect("json");
        assert_eq!(v["state"], "retrying");
        assert!(v.get("worker").is_none());
        assert_eq!(JobEvent::from_message(&msg), Some(ev));
        let other = Message::new(Headers::new(), r#"{"event":"child-started"}"#);
        assert_eq!(JobEvent::from_message(&other), None);
    }

    #[test]
    fn final_statuses_map_to_states() {
        use crate::protocol::Status;
        assert_eq!(JobState::of_status(Status::TimedOut).as_str(), "timed-out");
        assert_eq!(JobState::of_status(Status::Dead), JobState::Dead);
        assert_eq!(JobState::ALL.len(), 8);
    }
}
