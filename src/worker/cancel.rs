//! Cancel requests as a worker sees them: `{"id": "<job id>"}`, `{"ids": [...]}` or
//! `{"group": "<group id>"}` on the control subject/exchange. A running job's token is cancelled;
//! an id or group that is not running yet is remembered (bounded in count and time), so its jobs
//! end `cancelled` without running when they come up.

use crate::message::{Headers, Message};
use crate::protocol::header;
use crate::transport::Transport;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

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
const REMEMBER_FOR: Duration = Duration::from_secs(3600);
const REMEMBER_AT_MOST: usize = 100_000;

/// Ids remembered for a bounded time, oldest forgotten first.
#[derive(Default)]
struct Remembered {
    order: VecDeque<(Instant, String)>,
    reasons: HashMap<String, String>,
}

impl Remembered {
    fn insert(&mut self, id: &str, reason: &str) {
        self.expire();
        if self
            .reasons
            .insert(id.to_string(), reason.to_string())
            .is_none()
        {
            self.order.push_back((Instant::now(), id.to_string()));
        }
        while self.order.len() > REMEMBER_AT_MOST {
            if let Some((_, old)) = self.order.pop_front() {
                self.reasons.remove(&old);
            }
        }
    }

    fn expire(&mut self) {
        while let Some((at, _)) = self.order.front() {
            if at.elapsed() < REMEMBER_FOR {
                break;
            }
            if let Some((_, old)) = self.order.pop_front() {
                self.reasons.remove(&old);
            }
        }
    }

    fn get(&self, id: &str) -> Option<&String> {
        self.reasons.get(id)
    }
}

struct Running {
    id: String,
    group: Option<String>,
    token: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
}

#[derive(Default)]
struct State {
    next: u64,
    running: HashMap<u64, Running>,
    ids: Remembered,
    groups: Remembered,
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
        let mut cancelled = 0;
        for r in s.running.values() {
            let named = req.job_ids().any(|id| *id == r.id)
                || (req.group.is_some() && r.group == req.group);
            if named && !r.token.is_cancelled() {
                *r.reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
                r.token.cancel();
                cancelled += 1;
            }
        }
        cancelled
    }

    /// Why job `id` (of `group`) is cancelled, if it is.
    pub fn cancelled(&self, id: &str, group: Option<&str>) -> Option<String> {
        let s = self.lock();
        s.ids
            .get(id)
            .or_else(|| group.and_then(|g| s.groups.get(g)))
            .cloned()
    }

    /// Registers a job that is about to run. Its token is already cancelled when a request named
    /// it before.
    pub fn track(self: &Arc<Self>, id: &str, group: Option<&str>) -> Tracked {
        let token = CancellationToken::new();
        let reason = Arc::new(Mutex::new(None));
        let mut s = self.lock();
        let earlier = s
            .ids
            .get(id)
            .or_else(|| group.and_then(|g| s.groups.get(g)))
            .cloned();
        if let Some(why) = earlier {
            *reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
            token.cancel();
        }
        s.next += 1;
        let key = s.next;
        s.running.insert(
            key,
            Running {
                id: id.to_string(),
                group: group.map(str::to_string),
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
}

/// Listens to cancel requests until `stop`, listening again when the subscription ends.
pub async fn listen(transport: Arc<dyn Transport>, cancels: Arc<Cancels>, stop: CancellationToken) {
    loop {
        match transport.listen_control().await {
            Ok(mut requests) => loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => return,
                    m = requests.next() => m,
                };
                let Some(msg) = msg else { break };
                match serde_json::from_slice::<CancelRequest>(&msg.body) {
                    Ok(req) => {
                        let n = cancels.apply(&req);
                        tracing::info!(?req, running_cancelled = n, "cancel request");
                    }
                    Err(e) => tracing::warn!(error = %e, "unreadable control message"),
                }
            },
            Err(e) => tracing::warn!(error = %e, "cannot listen to cancel requests yet"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_jobs_are_cancelled_and_later_ones_remembered() {
        let c = Arc::new(Cancels::default());
        let a = c.track("a", Some("g"));
        let b = c.track("b", None);
        assert_eq!(c.apply(&CancelRequest::group("g", "member 2 failed")), 1);
        assert!(a.token.is_cancelled());
        assert_eq!(a.reason(), "member 2 failed");
        assert!(!b.token.is_cancelled());
        // A member that comes up later is cancelled before it runs.
        let late = c.track("c", Some("g"));
        assert!(late.token.is_cancelled());
        assert_eq!(
            c.cancelled("zzz", Some("g")).as_deref(),
            Some("member 2 failed")
        );
        assert_eq!(c.apply(&CancelRequest::job("b")), 1);
        assert!(b.token.is_cancelled());
        drop((a, b, late));
        assert!(c.lock().running.is_empty());
        assert_eq!(
            c.cancelled("b", None).as_deref(),
            Some("cancelled on request")
        );
        assert_eq!(c.cancelled("other", None), None);
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
