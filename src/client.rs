//! The producer side: publish jobs (confirmed, pipelined, retried with the same id) and wait for
//! their results through a private reply address (future/promise across processes).

use crate::broker_url::BrokerUrl;
use crate::error::{Error, Result};
use crate::events::{Emitter, JobEvent, JobState};
use crate::job::JobSpec;
use crate::protocol::header;
use crate::result::JobResult;
use crate::transport::{self, publish_retrying, MessageStream, Route, Transport};
pub use crate::worker::cancel::CancelRequest;
use crate::workflow::{Handle, Submission};
use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// How long a publish keeps retrying an unconfirmed message before it is reported failed.
pub const PUBLISH_PATIENCE: Duration = Duration::from_secs(30);

/// A cheap, clonable handle for publishing jobs.
#[derive(Clone)]
pub struct Client {
    transport: Arc<dyn Transport>,
    events: Emitter,
}

impl Client {
    /// Connects to the broker of `url` for `namespace`.
    pub async fn connect(url: &BrokerUrl, namespace: &str) -> Result<Client> {
        Ok(Client::from_transport(
            transport::connect(url, namespace).await?,
        ))
    }

    /// Wraps an existing transport. The client emits a `published` event per confirmed job.
    pub fn from_transport(transport: Arc<dyn Transport>) -> Client {
        Client {
            events: Emitter::spawn(transport.clone()),
            transport,
        }
    }

    /// The same client without `published` events (for benchmarks of the raw job path).
    pub fn without_events(mut self) -> Client {
        self.events = Emitter::disabled();
        self
    }

    /// The transport underneath.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    /// Publishes one job and returns its id once the broker confirmed it. An unconfirmed publish
    /// is retried with the same id (JetStream de-duplicates it; the aggregator records it once).
    pub async fn publish(&self, spec: &JobSpec) -> Result<String> {
        self.publish_within(spec, PUBLISH_PATIENCE).await
    }

    /// [`Client::publish`], retrying for up to `patience` (`ZERO`: one try; an error may then
    /// leave a copy stored, as for any unconfirmed publish).
    pub async fn publish_within(&self, spec: &JobSpec, patience: Duration) -> Result<String> {
        let (id, msg) = spec.to_message()?;
        publish_retrying(
            self.transport.as_ref(),
            Route::Job(spec.kind.clone()),
            msg,
            patience,
        )
        .await?;
        let mut event = JobEvent::new(&id, &spec.kind, JobState::Published, 0);
        event.group = spec.headers.get(header::GROUP).map(str::to_string);
        self.events.emit(event);
        Ok(id)
    }

    /// Publishes many jobs with up to `in_flight` unconfirmed at once. Calls `on_each` as each
    /// is confirmed (or failed); returns the results in input order.
    pub async fn publish_many(
        &self,
        specs: Vec<JobSpec>,
        in_flight: usize,
        mut on_each: impl FnMut(&Result<String>),
    ) -> Vec<Result<String>> {
        let mut out: Vec<Option<Result<String>>> = (0..specs.len()).map(|_| None).collect();
        let mut stream = futures::stream::iter(specs.into_iter().enumerate())
            .map(|(i, spec)| async move { (i, self.publish(&spec).await) })
            .buffer_unordered(in_flight.max(1));
        while let Some((i, r)) = stream.next().await {
            on_each(&r);
            out[i] = Some(r);
        }
        out.into_iter()
            .map(|r| r.unwrap_or(Err(Error::Shutdown)))
            .collect()
    }

    /// Opens a reply address; jobs published with it as `reply_to` report back to the waiter.
    pub async fn waiter(&self) -> Result<Waiter> {
        let (address, stream) = self.transport.reply_inbox().await?;
        Ok(Waiter {
            address,
            stream,
            early: HashMap::new(),
        })
    }

    /// Publishes a job, chain, group or chord and returns a handle whose
    /// [`Handle::result`] waits for its outcome (future/promise across processes).
    pub async fn submit(&self, what: impl Into<Submission>) -> Result<Handle> {
        crate::workflow::handle::submit(self, what.into()).await
    }

    /// Asks every worker to cancel what `request` names (jobs, a group's members, a chain's
    /// steps): running ones get their cancellation token fired, queued ones end `cancelled` when
    /// they come up, also on workers that start within the hour. Returns once the broker has it.
    pub async fn cancel(&self, request: &CancelRequest) -> Result<()> {
        publish_control(self.transport.as_ref(), request).await
    }

    /// Publishes a job and waits for its final result (publish-and-wait).
    pub async fn call(&self, spec: JobSpec, timeout: Duration) -> Result<JobResult> {
        let mut waiter = self.waiter().await?;
        let spec = spec.reply_to(waiter.address().to_string());
        let id = self.publish(&spec).await?;
        waiter
            .wait_for(&[id], timeout, |_| {})
            .await
            .into_iter()
            .next()
            .ok_or(Error::Timeout(timeout, "job result"))
    }

    /// Closes the connection cleanly (after sending the events queued so far).
    pub async fn close(&self) -> Result<()> {
        self.events.flush(Duration::from_secs(2)).await;
        self.transport.close().await
    }
}

/// Sends a cancel request, retrying transient failures.
async fn publish_control(transport: &dyn Transport, request: &CancelRequest) -> Result<()> {
    let msg = request.to_message();
    crate::transport::retry::retrying(
        "sending a cancel request",
        crate::transport::PUBLISH_BACKOFF,
        PUBLISH_PATIENCE,
        || transport.send_control(msg.clone()),
    )
    .await
}

/// A private reply address and the results that arrive there.
pub struct Waiter {
    address: String,
    stream: MessageStream,
    early: HashMap<String, JobResult>,
}

impl Waiter {
    /// The address to put in `reply_to`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The next result, or `None` when `timeout` passes first.
    pub async fn next(&mut self, timeout: Duration) -> Option<JobResult> {
        if let Some(key) = self.early.keys().next().cloned() {
            return self.early.remove(&key);
        }
        let msg = tokio::time::timeout(timeout, self.stream.next())
            .await
            .ok()??;
        match JobResult::from_message(&msg, "") {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "unreadable reply");
                None
            }
        }
    }

    /// Waits for the first result that `wanted` accepts, or `None` when `timeout` passes first.
    /// Results it does not accept are kept for later calls.
    pub async fn wait_match(
        &mut self,
        timeout: Duration,
        wanted: impl Fn(&JobResult) -> bool,
    ) -> Option<JobResult> {
        if let Some(key) = self
            .early
            .iter()
            .find(|(_, r)| wanted(r))
            .map(|(k, _)| k.clone())
        {
            return self.early.remove(&key);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.stream.next())
                .await
                .ok()??;
            let Ok(r) = JobResult::from_message(&msg, "") else {
                continue;
            };
            if wanted(&r) {
                return Some(r);
            }
            self.early.insert(r.id.clone(), r);
        }
    }

    /// Waits until every id in `ids` has a result or `timeout` passes; calls `on_each` per new
    /// result. Duplicates (a job delivered twice) are returned once.
    pub async fn wait_for(
        &mut self,
        ids: &[String],
        timeout: Duration,
        mut on_each: impl FnMut(&JobResult),
    ) -> Vec<JobResult> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pending: HashSet<&str> = ids.iter().map(String::as_str).collect();
        let mut done = Vec::with_capacity(ids.len());
        let early: Vec<String> = self.early.keys().cloned().collect();
        for id in early {
            if pending.remove(id.as_str()) {
                if let Some(r) = self.early.remove(&id) {
                    on_each(&r);
                    done.push(r);
                }
            }
        }
        while !pending.is_empty() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Ok(Some(msg)) = tokio::time::timeout(left, self.stream.next()).await else {
                break;
            };
            let Ok(r) = JobResult::from_message(&msg, "") else {
                continue;
            };
            if pending.remove(r.id.as_str()) {
                on_each(&r);
                done.push(r);
            } else if !ids.contains(&r.id) {
                self.early.insert(r.id.clone(), r);
            }
        }
        done
    }
}
