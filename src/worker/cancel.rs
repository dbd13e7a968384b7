//! Cancel requests as a worker sees them: `{"id": "<job id>"}`, `{"ids": [...]}`,
//! `{"group": "<group id>"}` or `{"chain": "<chain id>"}` on the control subject/exchange. A running job's token is cancelled;
//! an id or group that is not running yet is remembered (bounded in count and time), so its jobs
//! end `cancelled` without running when they come up.

use super::controls::{Control, Next};
use super::registry::Job;
use crate::job::{JobError, JobMeta};
use crate::message::{Headers, Message};
use crate::protocol::header;
use crate::transport::retry::resubscribing;
use crate::transport::{MessageStream, Transport};
use futures::future::BoxFuture;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// A cancel request (the control message body).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelRequest {
    /// One job id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Several job ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<String>,
    /// Every member of a group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Every step of a chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<String>,
    /// Why (shown in the `cancelled` result).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl CancelRequest {
    /// Cancels one job.
    pub fn job(id: impl Into<String>) -> Self {
        CancelRequest {
            id: Some(id.into()),
            ..Default::default()
        }
    }

    /// Cancels a group's members that have not finished.
    pub fn group(id: impl Into<String>, reason: impl Into<String>) -> Self {
        CancelRequest {
            group: Some(id.into()),
            reason: Some(reason.into()),
            ..Default::default()
        }
    }

    /// Cancels the steps of a chain that have not finished.
    pub fn chain(id: impl Into<String>) -> Self {
        CancelRequest {
            chain: Some(id.into()),
            ..Default::default()
        }
    }

    /// Cancels jobs.
    pub fn jobs(ids: impl IntoIterator<Item = impl Into<String>>) -> Self {
        CancelRequest {
            ids: ids.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }

    /// Encodes the request.
    pub fn to_message(&self) -> Message {
        let h = Headers::new().with(header::CONTENT_TYPE, "application/json");
        Message::new(h, serde_json::to_vec(self).unwrap_or_default())
    }

    fn job_ids(&self) -> impl Iterator<Item = &String> {
        self.id.iter().chain(self.ids.iter())
    }
}

/// How long a cancelled id or group is remembered, and how many at most.
const REMEMBER_FOR: Duration = crate::protocol::CONTROL_RETENTION;
const REMEMBER_AT_MOST: usize = 100_000;
/// The most bytes of ids and reasons remembered: requests are chosen by whoever sends them.
const REMEMBER_BYTES: usize = 16 * 1024 * 1024;
/// Longer ids name no job (ids are at most 256 bytes) and are not remembered.
const LONGEST_ID: usize = 256;
/// Reasons are cut to this many bytes.
const LONGEST_REASON: usize = 1024;

/// Ids remembered for a bounded time, oldest forgotten first, bounded in count and bytes.
#[derive(Default)]
struct Remembered {
    order: VecDeque<(Instant, String)>,
    reasons: HashMap<String, String>,
    bytes: usize,
}

impl Remembered {
    fn insert(&mut self, id: &str, reason: &str) {
        self.expire();
        if id.len() > LONGEST_ID {
            return;
        }
        let mut cut = reason.len().min(LONGEST_REASON);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let reason = &reason[..cut];
        match self.reasons.insert(id.to_string(), reason.to_string()) {
            None => {
                self.order.push_back((Instant::now(), id.to_string()));
                self.bytes += id.len() + reason.len();
            }
            Some(old) => self.bytes = self.bytes.saturating_sub(old.len()) + reason.len(),
        }
        while self.order.len() > REMEMBER_AT_MOST || self.bytes > REMEMBER_BYTES {
            if !self.forget_oldest() {
                break;
            }
        }
    }

    fn forget_oldest(&mut self) -> bool {
        let Some((_, old)) = self.order.pop_front() else {
            return false;
        };
        if let Some(reason) = self.reasons.remove(&old) {
            self.bytes = self.bytes.saturating_sub(old.len() + reason.len());
        }
        true
    }

    fn expire(&mut self) {
        while let Some((at, _)) = self.order.front() {
            if at.elapsed() < REMEMBER_FOR {
                break;
            }
            self.forget_oldest();
        }
    }

    fn get(&self, id: &str) -> Option<&String> {
        self.reasons.get(id)
    }
}

struct Running {
    id: String,
    group: Option<String>,
    chain: Option<String>,
    token: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
}

#[derive(Default)]
struct State {
    next: u64,
    running: HashMap<u64, Running>,
    ids: Remembered,
    groups: Remembered,
    chains: Remembered,
}

impl State {
    fn earlier(&self, job: &JobKeys<'_>) -> Option<String> {
        self.ids
            .get(job.id)
            .or_else(|| job.group.and_then(|g| self.groups.get(g)))
            .or_else(|| job.chain.and_then(|c| self.chains.get(c)))
            .cloned()
    }
}

/// What a cancel request can name a job by.
#[derive(Debug, Clone, Copy)]
pub struct JobKeys<'a> {
    /// Job id.
    pub id: &'a str,
    /// Its group.
    pub group: Option<&'a str>,
    /// Its chain.
    pub chain: Option<&'a str>,
}

/// The cancel state of one worker. Cheap to share.
#[derive(Default)]
pub struct Cancels {
    state: Mutex<State>,
}

/// A running job's registration; dropping it forgets the job.
pub struct Tracked {
    cancels: Arc<Cancels>,
    key: u64,
    /// Fires when a cancel request names the job or its group.
    pub token: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
}

impl Tracked {
    /// Why the job was cancelled, once it was.
    pub fn reason(&self) -> String {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "cancelled".into())
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.cancels.lock().running.remove(&self.key);
    }
}

fn reason_of(req: &CancelRequest) -> String {
    req.reason
        .clone()
        .unwrap_or_else(|| "cancelled on request".into())
}

impl Cancels {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a request: cancels the running jobs it names and remembers the rest. Returns how
    /// many running jobs it cancelled.
    pub fn apply(&self, req: &CancelRequest) -> usize {
        let reason = reason_of(req);
        let mut s = self.lock();
        for id in req.job_ids() {
            s.ids.insert(id, &reason);
        }
        if let Some(g) = &req.group {
            s.groups.insert(g, &reason);
        }
        if let Some(c) = &req.chain {
            s.chains.insert(c, &reason);
        }
        let mut cancelled = 0;
        for r in s.running.values() {
            let named = req.job_ids().any(|id| *id == r.id)
                || (req.group.is_some() && r.group == req.group)
                || (req.chain.is_some() && r.chain == req.chain);
            if named && !r.token.is_cancelled() {
                *r.reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
                r.token.cancel();
                cancelled += 1;
            }
        }
        cancelled
    }

    /// Why the job is cancelled, if it is.
    pub fn cancelled(&self, job: JobKeys<'_>) -> Option<String> {
        self.lock().earlier(&job)
    }

    /// Registers a job that is about to run. Its token is already cancelled when a request named
    /// it before.
    pub fn track(self: &Arc<Self>, job: JobKeys<'_>) -> Tracked {
        let token = CancellationToken::new();
        let reason = Arc::new(Mutex::new(None));
        let mut s = self.lock();
        let earlier = s.earlier(&job);
        if let Some(why) = earlier {
            *reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
            token.cancel();
        }
        s.next += 1;
        let key = s.next;
        s.running.insert(
            key,
            Running {
                id: job.id.to_string(),
                group: job.group.map(str::to_string),
                chain: job.chain.map(str::to_string),
                token: token.clone(),
                reason: reason.clone(),
            },
        );
        Tracked {
            cancels: self.clone(),
            key,
            token,
            reason,
        }
    }

    /// Registers a job that is about to run, or ends it (`CancelRequested`, "cancelled before it
    /// ran") when a request named it before.
    pub fn track_to_run(self: &Arc<Self>, job: JobKeys<'_>) -> Result<Tracked, JobError> {
        let tracked = self.track(job);
        if tracked.token.is_cancelled() {
            return Err(JobError::CancelRequested(format!(
                "cancelled before it ran: {}",
                tracked.reason()
            )));
        }
        Ok(tracked)
    }
}

impl<'a> JobKeys<'a> {
    /// The keys of the job `meta` describes.
    pub fn of(meta: &'a JobMeta) -> JobKeys<'a> {
        JobKeys {
            id: &meta.id,
            group: meta.workflow(header::GROUP),
            chain: meta.workflow(header::CHAIN),
        }
    }
}

/// Told when a job passes its cancel check and starts.
pub type OnStart = Arc<dyn Fn(&JobMeta) + Send + Sync>;

/// The `cancel` control: a job that a cancel request named before it came up ends `cancelled`
/// without running; one named while it runs has its token fired, gets `grace` to stop, and ends
/// `cancelled` (unless it still succeeded in the grace period).
pub struct CancelControl {
    cancels: Arc<Cancels>,
    grace: Duration,
    on_start: OnStart,
}

impl CancelControl {
    /// The control over `cancels`; `on_start` hears each job that starts.
    pub fn new(cancels: Arc<Cancels>, grace: Duration, on_start: OnStart) -> CancelControl {
        CancelControl {
            cancels,
            grace,
            on_start,
        }
    }
}

impl Control for CancelControl {
    fn name(&self) -> &'static str {
        "cancel"
    }

    fn call(self: Arc<Self>, job: Job, next: Next) -> BoxFuture<'static, Result<Value, JobError>> {
        Box::pin(async move {
            let tracked = self.cancels.track_to_run(JobKeys::of(&job.meta))?;
            (self.on_start)(&job.meta);
            let token = job.cancel.clone();
            let run = next.oneshot(job);
            tokio::pin!(run);
            tokio::select! {
                outcome = &mut run => outcome,
                _ = tracked.token.cancelled() => {
                    token.cancel();
                    match tokio::time::timeout(self.grace, &mut run).await {
                        Ok(Ok(output)) => Ok(output),
                        _ => Err(JobError::CancelRequested(tracked.reason())),
                    }
                }
            }
        })
    }
}

fn apply(cancels: &Cancels, msg: &Message) {
    match serde_json::from_slice::<CancelRequest>(&msg.body) {
        Ok(req) => {
            let n = cancels.apply(&req);
            tracing::debug!(?req, running_cancelled = n, "cancel request");
        }
        Err(e) => tracing::warn!(error = %e, "unreadable control message"),
    }
}

/// How long a starting worker reads the kept cancel requests before it takes jobs anyway.
const CATCH_UP: Duration = Duration::from_secs(10);

/// Subscribes to cancel requests and applies the ones the broker kept, before the worker takes
/// its first job (so that a job cancelled before this worker started does not run). Returns the
/// subscription, which goes on with new requests.
pub async fn catch_up(transport: &dyn Transport, cancels: &Cancels) -> Option<MessageStream> {
    let (kept, mut requests) = match transport.listen_control().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read cancel requests yet");
            return None;
        }
    };
    let read = async {
        for _ in 0..kept {
            match requests.next().await {
                Some(msg) => apply(cancels, &msg),
                None => break,
            }
        }
    };
    if tokio::time::timeout(CATCH_UP, read).await.is_err() {
        tracing::warn!(
            kept,
            "reading the kept cancel requests took over {CATCH_UP:?}; going on"
        );
    }
    Some(requests)
}

/// Follows cancel requests (starting with `first`, from [`catch_up`]) until `stop`, listening
/// again (and replaying what is kept) when the subscription ends.
pub async fn listen(
    transport: Arc<dyn Transport>,
    cancels: Arc<Cancels>,
    first: Option<MessageStream>,
    stop: CancellationToken,
) {
    let subscribe = move || {
        let transport = transport.clone();
        async move { transport.listen_control().await.map(|(_, s)| s) }
    };
    let mut requests = resubscribing("cancel requests", first, subscribe, stop);
    while let Some(msg) = requests.next().await {
        apply(&cancels, &msg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_requests_are_bounded_in_bytes() {
        let mut r = Remembered::default();
        let long_reason = "r".repeat(1024 * 1024);
        for i in 0..50_000 {
            r.insert(&format!("job-{i:0>200}"), &long_reason);
        }
        assert!(r.bytes <= REMEMBER_BYTES, "{} bytes remembered", r.bytes);
        let kept: usize = r.reasons.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert_eq!(kept, r.bytes, "the count of bytes is exact");
        assert!(
            r.get(&format!("job-{:0>200}", 49_999)).is_some(),
            "the newest is kept"
        );
        assert!(
            r.get(&format!("job-{:0>200}", 0)).is_none(),
            "the oldest went first"
        );
        r.insert(&"x".repeat(LONGEST_ID + 1), "too long an id");
        assert!(r.get(&"x".repeat(LONGEST_ID + 1)).is_none());
    }

    #[test]
    fn running_jobs_are_cancelled_and_later_ones_remembered() {
        let c = Arc::new(Cancels::default());
        let keys = |id, group| JobKeys {
            id,
            group,
            chain: None,
        };
        let a = c.track(keys("a", Some("g")));
        let b = c.track(keys("b", None));
        assert_eq!(c.apply(&CancelRequest::group("g", "member 2 failed")), 1);
        assert!(a.token.is_cancelled());
        assert_eq!(a.reason(), "member 2 failed");
        assert!(!b.token.is_cancelled());
        // A member that comes up later is cancelled before it runs.
        let late = c.track(keys("c", Some("g")));
        assert!(late.token.is_cancelled());
        assert_eq!(
            c.cancelled(keys("zzz", Some("g"))).as_deref(),
            Some("member 2 failed")
        );
        assert_eq!(c.apply(&CancelRequest::job("b")), 1);
        assert!(b.token.is_cancelled());
        drop((a, b, late));
        assert!(c.lock().running.is_empty());
        assert_eq!(
            c.cancelled(keys("b", None)).as_deref(),
            Some("cancelled on request")
        );
        assert_eq!(c.cancelled(keys("other", None)), None);
    }

    #[test]
    fn a_chain_cancel_reaches_its_later_steps() {
        let c = Arc::new(Cancels::default());
        c.apply(&CancelRequest::chain("c1"));
        let step = c.track(JobKeys {
            id: "c1.2",
            group: None,
            chain: Some("c1"),
        });
        assert!(step.token.is_cancelled());
        let other = c.track(JobKeys {
            id: "c2.0",
            group: None,
            chain: Some("c2"),
        });
        assert!(!other.token.is_cancelled());
    }

    #[test]
    fn requests_parse_from_any_client() {
        let r: CancelRequest = serde_json::from_str(r#"{"id":"j1"}"#).expect("json");
        assert_eq!(r, CancelRequest::job("j1"));
        let m = CancelRequest::group("g", "why").to_message();
        let back: CancelRequest = serde_json::from_slice(&m.body).expect("json");
        assert_eq!(back.group.as_deref(), Some("g"));
    }
}
