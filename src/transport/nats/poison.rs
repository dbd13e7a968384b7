//! Jobs that async-nats cannot read.
//!
//! async-nats parses a message's header block inside its connection reader: a header name that
//! is not ASCII, a line without a colon or a block that is not UTF-8 makes it drop the whole
//! connection. A job carrying such headers would be redelivered after every lease and cost a
//! reconnect (and the acks of every job in flight) each time. So after every (re)connect, each
//! job consumer looks at the jobs delivered and not yet acked, reading them as raw bytes through
//! the stream's `STREAM.MSG.GET` API, and moves each one its client could not read to the dead
//! letters, with the reason and what could be read of it, then deletes it from the jobs stream.
//! The delivery that revealed it is the only one that costs a reconnect.

use super::NatsTransport;
use crate::error::{Error, Result};
use crate::message::{header_safe, Headers, Message};
use crate::protocol::{header, Status};
use crate::transport::{Route, Transport};
use async_nats::jetstream::consumer::PullConsumer;
use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;
use std::str::FromStr;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The most delivered-and-unacked jobs one sweep reads.
const MOST_PER_SWEEP: usize = 20_000;
/// How long one `STREAM.MSG.GET` may take.
const GET_TIMEOUT: Duration = Duration::from_secs(5);
/// The name a dead letter made here carries as its worker.
const SWEEPER: &str = "conveyor-nats-reader";

/// Why async-nats' connection reader would refuse this header block (the same checks, in the
/// same order), or `None` when it reads it.
pub(crate) fn unreadable(block: &[u8]) -> Option<String> {
    if block.is_empty() {
        // No header block at all (a plain `PUB`): nothing to parse.
        return None;
    }
    let Ok(text) = std::str::from_utf8(block) else {
        return Some("the header block is not valid UTF-8".into());
    };
    let mut lines = text.lines();
    let Some(version) = lines.next() else {
        return Some("the header block has no version line".into());
    };
    let Some(suffix) = version.strip_prefix("NATS/1.0").map(str::trim) else {
        return Some("the header block does not begin with NATS/1.0".into());
    };
    let status = suffix.split_once(' ').map_or(suffix, |(s, _)| s.trim());
    if !status.is_empty() && async_nats::StatusCode::from_str(status).is_err() {
        return Some(format!(
            "the header block's status {status:?} is not a number"
        ));
    }
    // As async-nats reads them: a line that begins with white space continues the value of the
    // header line before it; anywhere else it is a header line of its own.
    let mut lines = lines.peekable();
    while let Some(line) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let Some((name, _)) = line.split_once(':') else {
            return Some(format!("header line {:?} has no colon", header_safe(line)));
        };
        if async_nats::HeaderName::from_str(name).is_err() {
            return Some(format!(
                "header name {:?} is not a valid NATS header name (ASCII letters, digits and punctuation only)",
                header_safe(name)
            ));
        }
        while lines
            .next_if(|l| l.starts_with(char::is_whitespace))
            .is_some()
        {}
    }
    None
}

/// The headers of a block that can be read, leaving out every line that cannot.
fn readable_headers(block: &[u8]) -> Headers {
    let text = String::from_utf8_lossy(block);
    let mut out = Headers::new();
    for line in text.lines().skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.is_empty() || async_nats::HeaderName::from_str(name).is_err() {
            continue;
        }
        if value.chars().all(|c| !c.is_control()) {
            out.insert(name.to_string(), value.to_string());
        }
    }
    out
}

#[derive(Deserialize)]
struct GetResponse {
    message: Option<RawMessage>,
    error: Option<ApiError>,
}

#[derive(Deserialize)]
struct ApiError {
    code: u16,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
struct RawMessage {
    subject: String,
    seq: u64,
    #[serde(default)]
    hdrs: Option<String>,
    #[serde(default)]
    data: String,
}

impl NatsTransport {
    /// The first message at or after `seq` on `subject`, raw; `None` past the end.
    async fn raw_next(&self, stream: &str, seq: u64, subject: &str) -> Result<Option<RawMessage>> {
        let body = serde_json::json!({ "seq": seq, "next_by_subj": subject }).to_string();
        let api = format!("$JS.API.STREAM.MSG.GET.{stream}");
        let reply = tokio::time::timeout(GET_TIMEOUT, self.client.request(api, body.into()))
            .await
            .map_err(|_| Error::Broker {
                op: "get message",
                cause: "timed out".into(),
            })?
            .map_err(|e| Error::broker("get message", e))?;
        let got: GetResponse =
            serde_json::from_slice(&reply.payload).map_err(|e| Error::broker("get message", e))?;
        match (got.message, got.error) {
            (Some(m), _) => Ok(Some(m)),
            (None, Some(e)) if e.code == 404 => Ok(None),
            (None, Some(e)) => Err(Error::Broker {
                op: "get message",
                cause: e.description.into(),
            }),
            (None, None) => Ok(None),
        }
    }

    /// Moves every delivered, unacked job of a kind's `lane` that async-nats cannot read to the
    /// dead letters (with a `dead` result), then deletes it from the jobs stream. Returns how many.
    pub(super) async fn sweep_unreadable(
        &self,
        lane: &str,
        consumer: &mut PullConsumer,
    ) -> Result<usize> {
        let info = consumer
            .info()
            .await
            .map_err(|e| Error::broker("consumer info", e))?;
        let (floor, last) = (
            info.ack_floor.stream_sequence,
            info.delivered.stream_sequence,
        );
        let stream = self.names.stream("jobs");
        let subject = self.names.job_subject(lane);
        let kind = crate::priority::split(lane).0;
        let mut seq = floor.saturating_add(1);
        let mut moved = 0;
        for _ in 0..MOST_PER_SWEEP {
            if seq > last {
                break;
            }
            let Some(raw) = self.raw_next(&stream, seq, &subject).await? else {
                break;
            };
            if raw.seq > last {
                break;
            }
            seq = raw.seq.saturating_add(1);
            let b64 = base64::engine::general_purpose::STANDARD;
            let block = raw
                .hdrs
                .as_deref()
                .map(|h| b64.decode(h))
                .transpose()
                .map_err(|e| Error::broker("get message", e))?
                .unwrap_or_default();
            let Some(why) = unreadable(&block) else {
                continue;
            };
            let body = b64
                .decode(&raw.data)
                .map_err(|e| Error::broker("get message", e))?;
            self.dead_letter_raw(kind, &stream, &raw, &block, Bytes::from(body), &why)
                .await?;
            moved += 1;
        }
        Ok(moved)
    }

    /// Dead-letters one unreadable job (confirmed), records it `dead`, then deletes it.
    async fn dead_letter_raw(
        &self,
        kind: &str,
        stream: &str,
        raw: &RawMessage,
        block: &[u8],
        body: Bytes,
        why: &str,
    ) -> Result<()> {
        let readable = readable_headers(block);
        let id = crate::job::id_of(&readable).unwrap_or_else(|| format!("{stream}-{}", raw.seq));
        let reason = format!(
            "the job's headers cannot be read by a NATS client ({why}); it was delivered on {}",
            raw.subject
        );
        tracing::warn!(job = %id, %kind, %reason, "dead-lettering a job no NATS client can read");
        let mut letter = readable.clone();
        letter.remove(header::REPLY_TO);
        let stamp = |mut h: Headers| {
            h.insert(header::ID, header_safe(&id));
            h.insert(header::KIND, kind.to_string());
            h.insert(header::ERROR, header_safe(&reason));
            h.insert(header::ATTEMPT, "1");
            h.insert(header::WORKER, SWEEPER);
            h
        };
        self.publish(
            Route::Dead(kind.to_string()),
            Message::new(stamp(letter), body),
        )
        .await?;
        let result = stamp(Headers::new()).with(header::STATUS, Status::Dead.as_str());
        self.publish(
            Route::Result(kind.to_string()),
            Message::new(result, Bytes::new()),
        )
        .await?;
        let jobs = self
            .js
            .get_stream(stream)
            .await
            .map_err(|e| Error::broker("get stream", e))?;
        match jobs.delete_message(raw.seq).await {
            Ok(_) => Ok(()),
            // Another worker's sweep got there first.
            Err(e) if e.to_string().contains("not found") => Ok(()),
            Err(e) => Err(Error::broker("delete message", e)),
        }
    }
}

/// Sweeps the unreadable jobs of a kind's lane (`kind`: its name) after every (re)connect of
/// `transport`, until `stop`.
pub(super) async fn sweep_after_connects(
    transport: NatsTransport,
    kind: String,
    mut consumer: PullConsumer,
    mut connects: watch::Receiver<u64>,
    stop: CancellationToken,
) {
    loop {
        match transport.sweep_unreadable(&kind, &mut consumer).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::warn!(%kind, jobs = n, "moved jobs no NATS client can read to the dead letters")
            }
            Err(e) => tracing::warn!(%kind, error = %e, "could not look for unreadable jobs"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = connects.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_async_nats_reads() {
        assert_eq!(unreadable(b"NATS/1.0\r\nConveyor-Id: a\r\n\r\n"), None);
        assert_eq!(unreadable(b"NATS/1.0\r\n\r\n"), None);
        assert_eq!(unreadable(b"NATS/1.0 408 Request Timeout\r\n\r\n"), None);
        assert_eq!(unreadable(b"NATS/1.0\r\nX: a\r\n  continued\r\n\r\n"), None);
        assert_eq!(unreadable(b""), None, "a job without headers");
    }

    #[test]
    fn names_what_async_nats_refuses() {
        let non_ascii = "NATS/1.0\r\n\u{dc}n\u{ef}code: 1\r\n\r\n";
        let why = unreadable(non_ascii.as_bytes()).unwrap_or_default();
        assert!(why.contains("not a valid NATS header name"), "{why}");
        let why = unreadable(b"NATS/1.0\r\nX-Bad: \xff\xfe\r\n\r\n").unwrap_or_default();
        assert!(why.contains("UTF-8"), "{why}");
        let why = unreadable(b"NATS/1.0\r\nno colon here\r\n\r\n").unwrap_or_default();
        assert!(why.contains("no colon"), "{why}");
        assert!(unreadable(b"HTTP/1.1\r\n\r\n").is_some());
        assert!(unreadable(b"NATS/1.0\r\n X: y\r\n\r\n").is_some());
    }

    #[test]
    fn keeps_the_readable_headers() {
        let block = "NATS/1.0\r\nConveyor-Id: j1\r\n\u{dc}n\u{ef}code: 1\r\nX: y\r\n\r\n";
        let h = readable_headers(block.as_bytes());
        assert_eq!(h.get("Conveyor-Id"), Some("j1"));
        assert_eq!(h.get("X"), Some("y"));
        assert_eq!(h.iter().count(), 2);
    }
}
