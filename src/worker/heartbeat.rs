//! Worker heartbeats: every `interval` a worker broadcasts who it is and how busy it is on
//! `heartbeats.<worker>` (at most once), and a last one marked `stopping` when it shuts down.
//! A worker not heard from for three intervals is gone.

use crate::job::now_ms;
use crate::message::{Headers, Message};
use crate::protocol::header;
use crate::transport::Transport;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Topic words that match every heartbeat.
pub const PATTERN: &str = "heartbeats.>";

/// What a heartbeat says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Worker id (`<host>-<pid>` by default).
    pub id: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Kinds it takes (empty: every kind).
    pub kinds: Vec<String>,
    /// Jobs running now.
    pub in_flight: usize,
    /// Jobs it runs at once at most.
    pub concurrency: usize,
    /// Conveyor version.
    pub version: String,
    /// When this beat was sent, ms since the Unix epoch.
    pub at_ms: u64,
    /// How often it beats, in ms.
    pub interval_ms: u64,
    /// The worker is shutting down: gone as of this beat.
    #[serde(default)]
    pub stopping: bool,
}

impl Heartbeat {
    /// The topic this worker beats on (dots and wildcards in the id become `_`).
    pub fn topic(&self) -> String {
        let id: String = self
            .id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!("heartbeats.{id}")
    }

    /// Reads one from a message body.
    pub fn from_message(msg: &Message) -> Option<Heartbeat> {
        serde_json::from_slice(&msg.body).ok()
    }

    /// Encodes the heartbeat.
    pub fn to_message(&self) -> Message {
        let body = serde_json::to_vec(self).unwrap_or_default();
        Message::new(
            Headers::new().with(header::CONTENT_TYPE, crate::codec::JSON),
            body,
        )
    }
}

/// Beats until `stop`, then sends the `stopping` beat.
pub(crate) async fn run(
    transport: Arc<dyn Transport>,
    mut beat: Heartbeat,
    permits: Arc<Semaphore>,
    interval: Duration,
    stop: CancellationToken,
) {
    let topic = beat.topic();
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => break,
        }
        beat.in_flight = beat.concurrency.saturating_sub(permits.available_permits());
        beat.at_ms = now_ms();
        if let Err(e) = transport.broadcast(&topic, beat.to_message()).await {
            tracing::debug!(error = %e, "heartbeat not sent");
        }
    }
    beat.stopping = true;
    beat.in_flight = beat.concurrency.saturating_sub(permits.available_permits());
    beat.at_ms = now_ms();
    let _ = transport.broadcast(&topic, beat.to_message()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_single_words_and_beats_round_trip() {
        let hb = Heartbeat {
            id: "host.example.com-12".into(),
            host: "host.example.com".into(),
            pid: 12,
            kinds: vec!["echo".into()],
            in_flight: 1,
            concurrency: 8,
            version: "0.1.0".into(),
            at_ms: 5,
            interval_ms: 1000,
            stopping: false,
        };
        assert_eq!(hb.topic(), "heartbeats.host_example_com-12");
        assert_eq!(Heartbeat::from_message(&hb.to_message()), Some(hb));
        assert_eq!(Heartbeat::from_message(&Message::default()), None);
    }
}
