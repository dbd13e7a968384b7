//! Publish-and-wait for every workflow: [`crate::Client::submit`] publishes a job, chain, group or
//! chord with a private reply address and returns a [`Handle`]; [`Handle::result`] waits for the
//! outcome.

use super::{callback_id, Chain, Chord, Group};
use crate::client::{Client, Waiter};
use crate::error::{Error, Result};
use crate::job::JobSpec;
use crate::protocol::Status;
use crate::result::JobResult;
use serde_json::Value;
use std::time::Duration;

/// What [`Client::submit`] publishes.
#[derive(Debug, Clone)]
pub enum Submission {
    /// One job.
    Job(JobSpec),
    /// A pipeline.
    Chain(Chain),
    /// A group.
    Group(Group),
    /// A group with a callback.
    Chord(Chord),
}

impl From<JobSpec> for Submission {
    fn from(j: JobSpec) -> Self {
        Submission::Job(j)
    }
}
impl From<Chain> for Submission {
    fn from(c: Chain) -> Self {
        Submission::Chain(c)
    }
}
impl From<Group> for Submission {
    fn from(g: Group) -> Self {
        Submission::Group(g)
    }
}
impl From<Chord> for Submission {
    fn from(c: Chord) -> Self {
        Submission::Chord(c)
    }
}

#[derive(Debug, Clone)]
enum Target {
    Job(String),
    Chain { id: String },
    Group { id: String, ids: Vec<String> },
    Chord { callback: String },
}

/// A submitted job or workflow whose outcome can be awaited.
pub struct Handle {
    id: String,
    target: Target,
    waiter: Waiter,
    members: Vec<JobResult>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("id", &self.id)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

async fn publish_all(client: &Client, specs: Vec<JobSpec>) -> Result<Vec<String>> {
    let mut ids = Vec::with_capacity(specs.len());
    let mut failed = None;
    for r in client.publish_many(specs, 256, |_| {}).await {
        match r {
            Ok(id) => ids.push(id),
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    match failed {
        None => Ok(ids),
        Some(e) => Err(e),
    }
}

pub(crate) async fn submit(client: &Client, what: Submission) -> Result<Handle> {
    let waiter = client.waiter().await?;
    let reply = waiter.address().to_string();
    let (id, target) = match what {
        Submission::Job(spec) => {
            let id = client.publish(&spec.reply_to(reply)).await?;
            (id.clone(), Target::Job(id))
        }
        Submission::Chain(chain) => {
            let (id, first) = chain.first_step()?;
            client.publish(&first.reply_to(reply)).await?;
            (id.clone(), Target::Chain { id })
        }
        Submission::Group(group) => {
            let (id, specs) = group.specs(Some(&reply))?;
            let ids = publish_all(client, specs).await?;
            (id.clone(), Target::Group { id, ids })
        }
        Submission::Chord(chord) => {
            let (id, specs) = chord.specs(Some(&reply))?;
            publish_all(client, specs).await?;
            let callback = callback_id(&id);
            (id, Target::Chord { callback })
        }
    };
    Ok(Handle {
        id,
        target,
        waiter,
        members: Vec::new(),
    })
}

impl Handle {
    /// The job id, chain id or group id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Waits for the outcome:
    /// - a job: its result;
    /// - a chain: the last step's result, or the result of the step that failed, whose error
    ///   names the step;
    /// - a group: one result with the members' outputs in member order (`null` for a member that
    ///   did not succeed); it succeeded when every member did. [`Handle::members`] has each one;
    /// - a chord: the callback's result.
    ///
    /// `Error::Timeout` when it does not come within `timeout`.
    pub async fn result(&mut self, timeout: Duration) -> Result<JobResult> {
        self.result_with_progress(timeout, |_| {}).await
    }

    /// [`Handle::result`], calling `on_member` as each group member finishes.
    pub async fn result_with_progress(
        &mut self,
        timeout: Duration,
        on_member: impl FnMut(&JobResult),
    ) -> Result<JobResult> {
        let late = Error::Timeout(timeout, "workflow result");
        match self.target.clone() {
            Target::Job(id) => self
                .waiter
                .wait_match(timeout, |r| r.id == id)
                .await
                .ok_or(late),
            Target::Chain { id } => {
                let mut r = self
                    .waiter
                    .wait_match(timeout, |r| {
                        r.chain.as_deref() == Some(id.as_str())
                            && (!r.succeeded() || r.ends_chain())
                    })
                    .await
                    .ok_or(late)?;
                if !r.succeeded() {
                    r.error = Some(format!(
                        "chain {id} stopped at step {} of {} ({}): {}",
                        r.step.unwrap_or(0) + 1,
                        r.steps.unwrap_or(0),
                        r.kind,
                        r.error.as_deref().unwrap_or(&r.status)
                    ));
                }
                Ok(r)
            }
            Target::Group { id, ids } => {
                let mut done = self.waiter.wait_for(&ids, timeout, on_member).await;
                if done.len() < ids.len() {
                    return Err(Error::Timeout(timeout, "group members"));
                }
                done.sort_by_key(|r| r.index.unwrap_or(u32::MAX));
                let summary = summarize(&id, &done);
                self.members = done;
                Ok(summary)
            }
            Target::Chord { callback } => self
                .waiter
                .wait_match(timeout, |r| r.id == callback)
                .await
                .ok_or(late),
        }
    }

    /// A group's member results in member order, once [`Handle::result`] returned.
    pub fn members(&self) -> &[JobResult] {
        &self.members
    }
}

/// One result for a whole group: outputs in order; failed when any member did not succeed, with
/// the first such member's error.
pub fn summarize(group: &str, members: &[JobResult]) -> JobResult {
    let first_failure = members.iter().find(|r| !r.succeeded());
    JobResult {
        id: group.to_string(),
        kind: "group".into(),
        status: match first_failure {
            None => Status::Succeeded.as_str().into(),
            Some(_) => Status::Failed.as_str().into(),
        },
        attempt: 1,
        output: Value::Array(
            members
                .iter()
                .map(|r| {
                    if r.succeeded() {
                        r.output.clone()
                    } else {
                        Value::Null
                    }
                })
                .collect(),
        ),
        error: first_failure.map(|r| {
            format!(
                "member {} ({}) {}: {}",
                r.index.map(|i| i.to_string()).unwrap_or_else(|| "?".into()),
                r.id,
                r.status,
                r.error.as_deref().unwrap_or("")
            )
        }),
        worker: None,
        group: Some(group.to_string()),
        index: None,
        chain: None,
        step: None,
        steps: None,
    }
}
