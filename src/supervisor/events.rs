//! Supervisor lifecycle events (a child started, exited, was restarted; the supervisor gave up
//! or stopped), logged and, when a broker is given, published as events of kind `supervisor`.

use crate::broker_url::BrokerUrl;
use crate::message::{Headers, Message};
use serde::Serialize;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// One thing that happened to the supervisor or a child.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SupervisorEvent {
    /// `child-started`, `child-exited`, `child-restarted`, `gave-up` or `stopped`.
    pub event: &'static str,
    /// The supervisor: `<host>-<pid>`.
    pub supervisor: String,
    /// The child's name, for child events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub child: Option<String>,
    /// The child's process id, for child events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// How the child ended (`exit status 3`, `killed by SIGKILL`), or why the supervisor gave up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
}

impl SupervisorEvent {
    /// An event of this supervisor, now.
    pub fn new(event: &'static str) -> Self {
        SupervisorEvent {
            event,
            supervisor: format!("{}-{}", crate::worker::hostname(), std::process::id()),
            child: None,
            pid: None,
            detail: None,
            at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0),
        }
    }

    /// About child `name` with process id `pid`.
    pub fn child(mut self, name: &str, pid: u32) -> Self {
        self.child = Some(name.to_string());
        self.pid = Some(pid);
        self
    }

    /// With how it ended, or why.
    pub fn detail(mut self, detail: impl ToString) -> Self {
        self.detail = Some(detail.to_string());
        self
    }

    fn to_message(&self) -> Message {
        let mut headers = Headers::new();
        headers.insert(crate::protocol::header::CONTENT_TYPE, "application/json");
        Message::new(headers, serde_json::to_vec(self).unwrap_or_default())
    }
}

/// Where a supervisor sends its events (none: they are only logged).
pub type EventSender = mpsc::UnboundedSender<SupervisorEvent>;

/// Publishes the events from `rx` on the broker of `url`, connecting in the background so that
/// supervision never waits for the broker; events are kept while it connects. Ends when `rx`
/// closes. Events are at most once: one that cannot be sent is logged and dropped.
pub async fn publish(
    url: BrokerUrl,
    namespace: String,
    mut rx: mpsc::UnboundedReceiver<SupervisorEvent>,
) {
    let transport =
        match crate::transport::connect_with_retry(&url, &namespace, Duration::from_secs(86_400))
            .await
        {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(broker = %url, error = %e, "supervisor events are logged only");
                while rx.recv().await.is_some() {}
                return;
            }
        };
    while let Some(event) = rx.recv().await {
        if let Err(e) = transport
            .emit_event("supervisor", event.event, event.to_message())
            .await
        {
            tracing::debug!(error = %e, event = event.event, "supervisor event not published");
        }
    }
    let _ = transport.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialise_without_empty_fields() {
        let e = SupervisorEvent::new("child-exited")
            .child("worker-0", 42)
            .detail("exit status 3");
        let v: serde_json::Value = serde_json::from_slice(&e.to_message().body).expect("json");
        assert_eq!(v["event"], "child-exited");
        assert_eq!(v["child"], "worker-0");
        assert_eq!(v["pid"], 42);
        assert_eq!(v["detail"], "exit status 3");
        let bare: serde_json::Value =
            serde_json::from_slice(&SupervisorEvent::new("stopped").to_message().body)
                .expect("json");
        assert!(bare.get("child").is_none());
        assert!(bare["supervisor"].as_str().unwrap_or("").contains('-'));
    }
}
