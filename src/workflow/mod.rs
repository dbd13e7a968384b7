//! Workflows across workers: chains (pipelines), groups (fan-out/fan-in) and chords (a group plus
//! a callback on the ordered results: barrier, MapReduce).
//!
//! Everything travels as headers on ordinary jobs, so any client can start a workflow:
//! - **chain** `k1 → k2 → … → kn`: the first step carries `Conveyor-Chain` (the chain id),
//!   `Conveyor-Chain-Step: 0`, `Conveyor-Chain-Length: n` and `Conveyor-Chain-Rest: k2,…,kn`.
//!   A worker that finishes a step publishes the next one (id `<chain>.<step>`, input = the
//!   output) before acking. A step that fails for good ends the chain; its result says which step.
//! - **group**: members carry `Conveyor-Group`, `Conveyor-Group-Size`, `Conveyor-Group-Index` and
//!   optionally `Conveyor-Group-Policy: fail-fast`. The aggregator counts them (`GET /groups/{id}`);
//!   under fail-fast the first failure cancels the members that have not finished.
//! - **chord**: a group whose members also carry `Conveyor-Chord-Kind`: when every member is done
//!   the aggregator publishes the callback job (id `<group>.callback`) exactly once, with the
//!   members' outputs in member order as its input.

pub mod handle;
pub mod mapreduce;

use crate::codec::Codec;
use crate::error::{Error, Result};
use crate::job::{new_id, JobSpec};
use crate::message::Headers;
use crate::protocol::{header, validate_kind};
use serde_json::Value;

pub use handle::{Handle, Submission};

/// What a group does when a member fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Every member runs whatever the others do.
    #[default]
    Continue,
    /// The first failure cancels the members that have not finished (errgroup).
    FailFast,
}

impl Policy {
    /// Wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Continue => "continue",
            Policy::FailFast => "fail-fast",
        }
    }

    /// Parses the wire spelling; the error names the header.
    pub fn parse(s: &str) -> std::result::Result<Policy, String> {
        match s.trim() {
            "continue" => Ok(Policy::Continue),
            "fail-fast" => Ok(Policy::FailFast),
            other => Err(format!(
                "bad header {}: {other:?} is not continue or fail-fast",
                header::GROUP_POLICY
            )),
        }
    }
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Policy::parse(s)
    }
}

/// The id of step `step` (from 0) of chain `chain`.
pub fn chain_step_id(chain: &str, step: u32) -> String {
    format!("{chain}.{step}")
}

/// The id of member `index` of group `group`.
pub fn member_id(group: &str, index: u32) -> String {
    format!("{group}.{index}")
}

/// The id of the callback job of the chord over group `group`.
pub fn callback_id(group: &str) -> String {
    format!("{group}.callback")
}

/// Most members a group may have.
pub const MAX_GROUP_SIZE: usize = 1_000_000;

/// A pipeline: each step's output is the next step's input.
#[derive(Debug, Clone)]
pub struct Chain {
    /// Chain id (made when `None`).
    pub id: Option<String>,
    /// Step kinds in order.
    pub steps: Vec<String>,
    /// The first step's input.
    pub input: Value,
    /// Attempts each step gets.
    pub max_attempts: Option<u32>,
    /// Body encoding of every step.
    pub codec: Codec,
}

impl Chain {
    /// A chain of `steps` starting from `input`.
    pub fn new<S: Into<String>>(steps: impl IntoIterator<Item = S>, input: Value) -> Self {
        Chain {
            id: None,
            steps: steps.into_iter().map(Into::into).collect(),
            input,
            max_attempts: None,
            codec: Codec::Json,
        }
    }

    /// Sets the chain id.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// The chain id and its first step, ready to publish.
    pub fn first_step(&self) -> Result<(String, JobSpec)> {
        let Some(first) = self.steps.first() else {
            return Err(Error::Config("a chain needs at least one step".into()));
        };
        for k in &self.steps {
            validate_kind(k)?;
        }
        let id = self.id.clone().unwrap_or_else(new_id);
        let mut spec = JobSpec::new(first.clone(), self.input.clone())
            .id(chain_step_id(&id, 0))
            .codec(self.codec);
        spec.max_attempts = self.max_attempts;
        spec.headers = Headers::new()
            .with(header::CHAIN, id.clone())
            .with(header::CHAIN_STEP, "0")
            .with(header::CHAIN_LENGTH, self.steps.len().to_string());
        if self.steps.len() > 1 {
            spec.headers
                .insert(header::CHAIN_REST, self.steps[1..].join(","));
        }
        Ok((id, spec))
    }
}

/// Jobs published together and tracked as one (fan-out / fan-in).
#[derive(Debug, Clone)]
pub struct Group {
    /// Group id (made when `None`).
    pub id: Option<String>,
    /// The members, in order.
    pub members: Vec<JobSpec>,
    /// What a member's failure does to the others.
    pub policy: Policy,
}

impl Group {
    /// A group of the given jobs.
    pub fn new(members: Vec<JobSpec>) -> Self {
        Group {
            id: None,
            members,
            policy: Policy::Continue,
        }
    }

    /// A group of jobs of one kind, one per input.
    pub fn of(kind: &str, inputs: impl IntoIterator<Item = Value>) -> Self {
        Group::new(inputs.into_iter().map(|i| JobSpec::new(kind, i)).collect())
    }

    /// Sets the group id.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets the failure policy.
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// The group id and its members with their group headers (ids `<group>.<index>`), each
    /// reporting to `reply_to` when given.
    pub fn specs(&self, reply_to: Option<&str>) -> Result<(String, Vec<JobSpec>)> {
        if self.members.is_empty() || self.members.len() > MAX_GROUP_SIZE {
            return Err(Error::Config(format!(
                "a group needs 1 to {MAX_GROUP_SIZE} members, got {}",
                self.members.len()
            )));
        }
        let id = self.id.clone().unwrap_or_else(new_id);
        let size = self.members.len().to_string();
        let specs = self
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let index = u32::try_from(i).unwrap_or(u32::MAX);
                let mut spec = m.clone();
                spec.id = Some(member_id(&id, index));
                spec.headers.insert(header::GROUP, id.clone());
                spec.headers.insert(header::GROUP_SIZE, size.clone());
                spec.headers.insert(header::GROUP_INDEX, index.to_string());
                if self.policy != Policy::Continue {
                    spec.headers
                        .insert(header::GROUP_POLICY, self.policy.as_str());
                }
                if let Some(r) = reply_to {
                    spec.reply_to = Some(r.to_string());
                }
                spec
            })
            .collect();
        Ok((id, specs))
    }
}

/// A group plus a callback job run once on the members' ordered outputs (barrier, MapReduce).
#[derive(Debug, Clone)]
pub struct Chord {
    /// The members.
    pub group: Group,
    /// The callback's kind.
    pub callback: String,
}

impl Chord {
    /// A chord of `group` and a callback of kind `callback`.
    pub fn new(group: Group, callback: impl Into<String>) -> Self {
        Chord {
            group,
            callback: callback.into(),
        }
    }

    /// The group id and the members, which also name the callback (and where its result goes).
    pub fn specs(&self, reply_to: Option<&str>) -> Result<(String, Vec<JobSpec>)> {
        validate_kind(&self.callback)?;
        let (id, mut specs) = self.group.specs(reply_to)?;
        for spec in &mut specs {
            spec.headers
                .insert(header::CHORD_KIND, self.callback.clone());
            if let Some(r) = reply_to {
                spec.headers.insert(header::CHORD_REPLY_TO, r.to_string());
            }
        }
        Ok((id, specs))
    }
}

/// What a result says about its group, read from the workflow headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// Group id.
    pub group: String,
    /// Members in the group.
    pub size: u32,
    /// This member's position, when the publisher gave one.
    pub index: Option<u32>,
    /// Failure policy.
    pub policy: Policy,
    /// The chord callback's kind, for chords.
    pub chord: Option<String>,
    /// Where the chord callback's result also goes.
    pub chord_reply_to: Option<String>,
}

impl Membership {
    /// Reads the group headers; `None` when there is no usable group (no id, or no valid size).
    pub fn from_headers(h: &Headers) -> Option<Membership> {
        let group = h.get(header::GROUP)?.to_string();
        let size: u32 = h.get(header::GROUP_SIZE)?.trim().parse().ok()?;
        if group.is_empty() || size == 0 || size as usize > MAX_GROUP_SIZE {
            return None;
        }
        Some(Membership {
            group,
            size,
            index: h
                .get(header::GROUP_INDEX)
                .and_then(|i| i.trim().parse().ok())
                .filter(|i| *i < size),
            policy: h
                .get(header::GROUP_POLICY)
                .and_then(|p| Policy::parse(p).ok())
                .unwrap_or_default(),
            chord: h
                .get(header::CHORD_KIND)
                .filter(|k| validate_kind(k).is_ok())
                .map(str::to_string),
            chord_reply_to: h
                .get(header::CHORD_REPLY_TO)
                .filter(|r| !r.is_empty())
                .map(str::to_string),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chain_first_step_names_the_rest() {
        let (id, spec) = Chain::new(["hash", "echo", "echo"], json!({"data": "x"}))
            .id("c1")
            .first_step()
            .expect("chain");
        assert_eq!(id, "c1");
        assert_eq!(spec.kind, "hash");
        assert_eq!(spec.id.as_deref(), Some("c1.0"));
        assert_eq!(spec.headers.get(header::CHAIN_REST), Some("echo,echo"));
        assert_eq!(spec.headers.get(header::CHAIN_LENGTH), Some("3"));
        assert!(Chain::new(Vec::<String>::new(), json!(1))
            .first_step()
            .is_err());
        assert!(Chain::new(["ok", "not ok"], json!(1)).first_step().is_err());
    }

    #[test]
    fn group_members_carry_their_place_and_the_chord() {
        let chord = Chord::new(
            Group::of("echo", [json!(1), json!(2)])
                .id("g")
                .policy(Policy::FailFast),
            "echo",
        );
        let (id, specs) = chord.specs(Some("inbox")).expect("specs");
        assert_eq!(id, "g");
        let (_, msg) = specs[1].to_message().expect("message");
        let m = Membership::from_headers(&msg.headers).expect("member");
        assert_eq!(
            m,
            Membership {
                group: "g".into(),
                size: 2,
                index: Some(1),
                policy: Policy::FailFast,
                chord: Some("echo".into()),
                chord_reply_to: Some("inbox".into()),
            }
        );
        assert_eq!(specs[1].id.as_deref(), Some("g.1"));
        assert!(Group::new(Vec::new()).specs(None).is_err());
    }

    #[test]
    fn bad_group_headers_are_no_membership() {
        let h = Headers::new()
            .with(header::GROUP, "g")
            .with(header::GROUP_SIZE, "0");
        assert_eq!(Membership::from_headers(&h), None);
        let h = Headers::new()
            .with(header::GROUP, "g")
            .with(header::GROUP_SIZE, "3")
            .with(header::GROUP_INDEX, "7");
        assert_eq!(Membership::from_headers(&h).and_then(|m| m.index), None);
        assert!(Policy::parse("sometimes")
            .err()
            .unwrap_or_default()
            .contains("Conveyor-Group-Policy"));
    }
}
