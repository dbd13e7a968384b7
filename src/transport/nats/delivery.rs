//! Settling a JetStream delivery, and a singleflight claim held as the last message of its
//! subject.

use super::from_nats_headers;
use crate::error::{Error, Result};
use crate::message::Message;
use crate::transport::{Acker, Delivery, FlightClaim};
use async_nats::jetstream::{self, AckKind};
use async_trait::async_trait;
use std::time::Duration;

/// Publishes an empty message on `subject` only if the last one there has sequence `expected`
/// (0: none). `Some(new sequence)`, or `None` when another publisher got there first.
pub(super) async fn publish_expecting(
    js: &jetstream::Context,
    subject: &str,
    expected: u64,
) -> Result<Option<u64>> {
    publish_expecting_with(js, subject, expected, bytes::Bytes::new()).await
}

/// Publishes `payload` to `subject` only if the subject's last message is still at stream
/// sequence `expected` (0: none): the new sequence, or `None` when another came first.
pub(super) async fn publish_expecting_with(
    js: &jetstream::Context,
    subject: &str,
    expected: u64,
    payload: bytes::Bytes,
) -> Result<Option<u64>> {
    let mut h = async_nats::HeaderMap::new();
    h.insert(
        "Nats-Expected-Last-Subject-Sequence",
        expected.to_string().as_str(),
    );
    let ack = js
        .publish_with_headers(subject.to_string(), h, payload)
        .await
        .map_err(|e| Error::broker("claim", e))?;
    match ack.await {
        Ok(a) => Ok(Some(a.sequence)),
        Err(e) if e.to_string().contains("wrong last sequence") => Ok(None),
        Err(e) => Err(Error::broker("claim", e)),
    }
}

/// A held JetStream singleflight claim.
pub(super) struct NatsFlight {
    pub(super) js: jetstream::Context,
    pub(super) stream: String,
    pub(super) subject: String,
    pub(super) seq: std::sync::Mutex<u64>,
}

#[async_trait]
impl FlightClaim for NatsFlight {
    async fn refresh(&self) -> Result<()> {
        let seq = *self.seq.lock().unwrap_or_else(|p| p.into_inner());
        match publish_expecting(&self.js, &self.subject, seq).await? {
            Some(next) => {
                *self.seq.lock().unwrap_or_else(|p| p.into_inner()) = next;
                Ok(())
            }
            // The claim expired and was taken (or renewed) by another process.
            None => Err(Error::broker(
                "refresh claim",
                std::io::Error::other("the claim expired and another process holds it"),
            )),
        }
    }
    async fn release(self: Box<Self>) -> Result<()> {
        let seq = *self.seq.lock().unwrap_or_else(|p| p.into_inner());
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| Error::broker("get stream", e))?;
        stream
            .delete_message(seq)
            .await
            .map_err(|e| Error::broker("release claim", e))?;
        Ok(())
    }
}

pub(super) fn to_delivery(msg: jetstream::Message, prefix_len: usize) -> Delivery {
    let (count, broker_id) = match msg.info() {
        Ok(info) => (
            u32::try_from(info.delivered).unwrap_or(1),
            format!("{}-{}", info.stream, info.stream_sequence),
        ),
        Err(_) => (1, crate::job::new_id()),
    };
    let (msg, acker) = msg.split();
    let mut headers = from_nats_headers(msg.headers.as_ref());
    // Subject is "<ns>.<class>.<kind>": strip "<ns>." and the class word. A job's is its lane.
    let kind = match msg
        .subject
        .get(prefix_len..)
        .and_then(|rest| rest.split_once('.'))
    {
        Some(("jobs" | "tee", lane)) => crate::priority::arrived(lane, &mut headers),
        Some((_, kind)) => kind.to_string(),
        None => String::new(),
    };
    let message = Message::new(headers, msg.payload);
    Delivery::new(
        kind,
        message,
        count,
        broker_id,
        Box::new(NatsAcker { acker }),
    )
}

pub(super) struct NatsAcker {
    acker: jetstream::message::Acker,
}

#[async_trait]
impl Acker for NatsAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.acker.ack().await.map_err(|e| Error::Broker {
            op: "ack",
            cause: e,
        })
    }
    async fn nack(self: Box<Self>) -> Result<()> {
        self.acker
            .ack_with(AckKind::Nak(None))
            .await
            .map_err(|e| Error::Broker {
                op: "nak",
                cause: e,
            })
    }
    async fn retry(self: Box<Self>, _next: Message, delay: Duration) -> Result<()> {
        // The redelivery count carries the attempt number on JetStream.
        self.acker
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(|e| Error::Broker {
                op: "delayed nak",
                cause: e,
            })
    }
    async fn progress(&self) -> Result<()> {
        self.acker
            .ack_with(AckKind::Progress)
            .await
            .map_err(|e| Error::Broker {
                op: "progress",
                cause: e,
            })
    }
}
