//! Results as read back from the broker (the aggregator's input and a waiting client's answer).

use crate::codec::Codec;
use crate::error::{Error, Result};
use crate::message::Message;
use crate::protocol::{header, Status};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A job's final result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    /// Job id.
    pub id: String,
    /// Job kind.
    pub kind: String,
    /// Final status.
    pub status: String,
    /// The attempt that produced it.
    pub attempt: u32,
    /// The output (`null` unless succeeded), decoded to JSON whatever the codec.
    pub output: Value,
    /// Why it did not succeed.
    pub error: Option<String>,
    /// Worker that produced it.
    #[serde(default)]
    pub worker: Option<String>,
    /// Group id, when the job was part of one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Position in the group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    /// Chain id, when the job was a chain step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<String>,
    /// Position of the step in its chain, from 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
    /// Steps in the chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
}

impl JobResult {
    /// Reads a result message. `kind` is used when the message does not name one.
    pub fn from_message(msg: &Message, kind: &str) -> Result<JobResult> {
        let h = &msg.headers;
        let id = h
            .get(header::ID)
            .ok_or_else(|| Error::Codec("result without Conveyor-Id".into()))?
            .to_string();
        let status = h.get(header::STATUS).unwrap_or("succeeded");
        if Status::parse(status).is_none() {
            return Err(Error::Codec(format!(
                "result {id} has unknown status {status:?}"
            )));
        }
        let codec = Codec::from_content_type(h.get(header::CONTENT_TYPE))?;
        let output = codec.decode(&msg.body)?;
        let num = |name: &str| h.get(name).and_then(|v| v.trim().parse::<u32>().ok());
        Ok(JobResult {
            id,
            kind: h.get(header::KIND).unwrap_or(kind).to_string(),
            status: status.to_string(),
            attempt: h
                .get(header::ATTEMPT)
                .and_then(|a| a.parse().ok())
                .unwrap_or(1),
            output,
            error: h.get(header::ERROR).map(str::to_string),
            worker: h.get(header::WORKER).map(str::to_string),
            group: h.get(header::GROUP).map(str::to_string),
            index: num(header::GROUP_INDEX),
            chain: h.get(header::CHAIN).map(str::to_string),
            step: num(header::CHAIN_STEP),
            steps: num(header::CHAIN_LENGTH),
        })
    }

    /// True for the last step of a chain, or a job that is no chain step.
    pub fn ends_chain(&self) -> bool {
        match (self.step, self.steps) {
            (Some(step), Some(steps)) => step.saturating_add(1) >= steps,
            _ => true,
        }
    }

    /// True when the job succeeded.
    pub fn succeeded(&self) -> bool {
        self.status == Status::Succeeded.as_str()
    }
}
