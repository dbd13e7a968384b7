//! Group and chord bookkeeping inside the aggregator's store. A member is counted in the same
//! transaction that records its result, and that transaction records each job id once, so every
//! member counts once however often its result is delivered. The transaction that counts the
//! last member of a chord also marks its callback due; the callback is published after the
//! commit and marked published only once the broker confirmed it (see [`super::chords`]).

use super::store::store_err;
use crate::error::Result;
use crate::result::JobResult;
use crate::workflow::{callback_id, Membership, Policy};
use redb::{ReadableTable, Table, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

pub(super) const GROUPS: TableDefinition<&str, &[u8]> = TableDefinition::new("groups");
pub(super) const MEMBERS: TableDefinition<&str, &str> = TableDefinition::new("group_members");
pub(super) const DUE_CHORDS: TableDefinition<&str, u64> = TableDefinition::new("due_chords");
/// Fail-fast cancels not yet sent: group → reason.
pub(super) const DUE_CANCELS: TableDefinition<&str, &str> = TableDefinition::new("due_cancels");

/// Where a chord's callback is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChordState {
    /// Members are still running.
    Waiting,
    /// Every member is done; the callback is to be published.
    Due,
    /// The broker confirmed the callback (or, when a member failed, the chord's failed result).
    Published,
}

/// A chord's callback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChordRecord {
    /// The callback job's id.
    pub id: String,
    /// Its kind.
    pub kind: String,
    /// Where its result also goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// Progress.
    pub state: ChordState,
}

/// What the store keeps per group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// Members in the group.
    pub size: u32,
    /// Failure policy.
    pub policy: Policy,
    /// Members that succeeded.
    pub succeeded: u32,
    /// Members that ended otherwise.
    pub failed: u32,
    /// Results counted (also the index of a member whose publisher gave none).
    pub arrived: u32,
    /// The first member that did not succeed, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_failure: Option<String>,
    /// A fail-fast group's cancel was asked for.
    #[serde(default)]
    pub cancel_sent: bool,
    /// The callback, for chords.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chord: Option<ChordRecord>,
}

impl GroupRecord {
    fn new(m: &Membership) -> Self {
        GroupRecord {
            size: m.size,
            policy: m.policy,
            succeeded: 0,
            failed: 0,
            arrived: 0,
            first_failure: None,
            cancel_sent: false,
            chord: m.chord.as_ref().map(|kind| ChordRecord {
                id: callback_id(&m.group),
                kind: kind.clone(),
                reply_to: m.chord_reply_to.clone(),
                state: ChordState::Waiting,
            }),
        }
    }

    /// Every member has a result.
    pub fn done(&self) -> bool {
        self.succeeded + self.failed >= self.size
    }
}

/// What counting a batch's members asks the aggregator to do once the batch is committed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupActions {
    /// Chords whose callback became due.
    pub chords_due: Vec<String>,
    /// Fail-fast groups that just had their first failure, with the reason.
    pub cancel: Vec<(String, String)>,
}

/// The key of member `index` of `group`: sorts members in index order.
fn member_key(group: &str, index: u32) -> String {
    format!("{group}\u{0}{index:010}")
}

/// Counts new members inside the batch's write transaction. Group records are read once and
/// written once per batch.
pub(super) struct Counter<'a, 't> {
    groups: &'a mut Table<'t, &'static str, &'static [u8]>,
    members: &'a mut Table<'t, &'static str, &'static str>,
    due: &'a mut Table<'t, &'static str, u64>,
    cancels: &'a mut Table<'t, &'static str, &'static str>,
    touched: HashMap<String, GroupRecord>,
    actions: GroupActions,
}

impl<'a, 't> Counter<'a, 't> {
    pub(super) fn new(
        groups: &'a mut Table<'t, &'static str, &'static [u8]>,
        members: &'a mut Table<'t, &'static str, &'static str>,
        due: &'a mut Table<'t, &'static str, u64>,
        cancels: &'a mut Table<'t, &'static str, &'static str>,
    ) -> Self {
        Counter {
            groups,
            members,
            due,
            cancels,
            touched: HashMap::new(),
            actions: GroupActions::default(),
        }
    }

    /// Counts `result`, a newly recorded member of `m.group`.
    pub(super) fn count(&mut self, result: &JobResult, m: &Membership) -> Result<()> {
        if !self.touched.contains_key(&m.group) {
            let record = match self.groups.get(m.group.as_str()).map_err(store_err)? {
                Some(v) => serde_json::from_slice(v.value()).map_err(store_err)?,
                None => GroupRecord::new(m),
            };
            self.touched.insert(m.group.clone(), record);
        }
        let Some(g) = self.touched.get_mut(&m.group) else {
            return Ok(());
        };
        if g.done() {
            tracing::warn!(group = %m.group, job = %result.id, "a result beyond the group's size; not counted");
            return Ok(());
        }
        let index = m.index.unwrap_or(g.arrived);
        g.arrived += 1;
        self.members
            .insert(member_key(&m.group, index).as_str(), result.id.as_str())
            .map_err(store_err)?;
        if result.succeeded() {
            g.succeeded += 1;
        } else {
            g.failed += 1;
            if g.first_failure.is_none() {
                g.first_failure = Some(format!(
                    "member {index} ({}) {}: {}",
                    result.id,
                    result.status,
                    result.error.as_deref().unwrap_or("")
                ));
            }
            if g.policy == Policy::FailFast && !g.cancel_sent && !g.done() {
                g.cancel_sent = true;
                let why = format!(
                    "group {} failed fast: {}",
                    m.group,
                    g.first_failure.as_deref().unwrap_or("")
                );
                self.cancels
                    .insert(m.group.as_str(), why.as_str())
                    .map_err(store_err)?;
                self.actions.cancel.push((m.group.clone(), why));
            }
        }
        if g.done() {
            if let Some(chord) = g.chord.as_mut().filter(|c| c.state == ChordState::Waiting) {
                chord.state = ChordState::Due;
                self.due.insert(m.group.as_str(), 0).map_err(store_err)?;
                self.actions.chords_due.push(m.group.clone());
            }
        }
        Ok(())
    }

    /// Writes the touched group records; returns what to do after the commit.
    pub(super) fn finish(self) -> Result<GroupActions> {
        for (id, record) in &self.touched {
            let bytes = serde_json::to_vec(record).map_err(store_err)?;
            self.groups
                .insert(id.as_str(), bytes.as_slice())
                .map_err(store_err)?;
        }
        Ok(self.actions)
    }
}

/// A group as `GET /groups/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupView {
    /// Group id.
    pub id: String,
    /// Members in the group.
    pub size: u32,
    /// Members that succeeded.
    pub succeeded: u32,
    /// Members that ended otherwise.
    pub failed: u32,
    /// Every member has a result.
    pub done: bool,
    /// Failure policy.
    pub policy: Policy,
    /// The first member that did not succeed, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_failure: Option<String>,
    /// The callback, for chords.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback: Option<ChordRecord>,
    /// Member results in member order; `null` for a member without a result yet.
    pub results: Vec<Option<JobResult>>,
}

/// Reads group `id` and its members' results within a read transaction.
pub(super) fn view(
    groups: &impl ReadableTable<&'static str, &'static [u8]>,
    members: &impl ReadableTable<&'static str, &'static str>,
    jobs: &impl ReadableTable<&'static str, &'static [u8]>,
    id: &str,
) -> Result<Option<GroupView>> {
    let Some(raw) = groups.get(id).map_err(store_err)? else {
        return Ok(None);
    };
    let record: GroupRecord = serde_json::from_slice(raw.value()).map_err(store_err)?;
    let mut results: Vec<Option<JobResult>> = vec![None; record.size as usize];
    let (from, to) = (member_key(id, 0), member_key(id, u32::MAX));
    for item in members
        .range(from.as_str()..=to.as_str())
        .map_err(store_err)?
    {
        let (key, job) = item.map_err(store_err)?;
        let index: usize = key
            .value()
            .rsplit('\u{0}')
            .next()
            .and_then(|i| i.parse().ok())
            .unwrap_or(usize::MAX);
        if let (Some(slot), Some(raw)) = (
            results.get_mut(index),
            jobs.get(job.value()).map_err(store_err)?,
        ) {
            *slot = Some(serde_json::from_slice(raw.value()).map_err(store_err)?);
        }
    }
    Ok(Some(GroupView {
        id: id.to_string(),
        size: record.size,
        succeeded: record.succeeded,
        failed: record.failed,
        done: record.done(),
        policy: record.policy,
        first_failure: record.first_failure,
        callback: record.chord,
        results,
    }))
}
