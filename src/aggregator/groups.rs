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

/// The index `i` of a member id `<group>.<i>` (`i` in plain decimal).
pub(super) fn member_index(group: &str, id: &str) -> Option<u32> {
    let i = id.strip_prefix(group)?.strip_prefix('.')?;
    if i.is_empty() || !i.bytes().all(|b| b.is_ascii_digit()) || (i.len() > 1 && i.starts_with('0'))
    {
        return None;
    }
    i.parse().ok()
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
        // A result that is no member by its own headers neither counts nor declares the group.
        if member_index(&m.group, &result.id).is_none_or(|i| i >= m.size) {
            tracing::warn!(group = %m.group, job = %result.id, size = m.size, "not a member id of the group it names (<group>.<index below its size>); not counted");
            return Ok(());
        }
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
        // Only `<group>.<i>` with `i` below the size the group was first declared with counts:
        // a job that merely names the group (or a size of its own) cannot complete it early.
        let Some(index) = member_index(&m.group, &result.id).filter(|i| *i < g.size) else {
            tracing::warn!(group = %m.group, job = %result.id, size = g.size, "not a member id of the group (<group>.<index below its size>); not counted");
            return Ok(());
        };
        if m.index.is_some_and(|given| given != index) {
            tracing::warn!(group = %m.group, job = %result.id, "the member's index header disagrees with its id; not counted");
            return Ok(());
        }
        if g.done() {
            tracing::warn!(group = %m.group, job = %result.id, "a result beyond the group's size; not counted");
            return Ok(());
        }
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

    /// True when `id` is a chord callback's id (`<group>.callback`, reserved for callbacks) and
    /// that chord is not complete: the group is unknown, is no chord, or has members running. No
    /// result may be recorded under it then.
    pub(super) fn callback_not_due(&mut self, id: &str) -> Result<bool> {
        let Some(group) = id.strip_suffix(".callback") else {
            return Ok(false);
        };
        let record = match self.touched.get(group) {
            Some(g) => g.clone(),
            None => match self.groups.get(group).map_err(store_err)? {
                Some(v) => serde_json::from_slice::<GroupRecord>(v.value()).map_err(store_err)?,
                None => return Ok(true),
            },
        };
        Ok(!record
            .chord
            .is_some_and(|c| c.state != ChordState::Waiting && c.id == id))
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
    /// Index of the first member in `results` (a page of a large group).
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: u32,
    /// Member results in member order from `offset`; `null` for a member without a result yet.
    pub results: Vec<Option<JobResult>>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Reads group `id` and the results of members `offset..offset + limit` within a read
/// transaction. The page is sized by the members recorded in it, not by the group's declared
/// size: a member that declares a million members costs nothing until results arrive.
pub(super) fn view(
    groups: &impl ReadableTable<&'static str, &'static [u8]>,
    members: &impl ReadableTable<&'static str, &'static str>,
    jobs: &impl ReadableTable<&'static str, &'static [u8]>,
    id: &str,
    offset: u32,
    limit: u32,
) -> Result<Option<GroupView>> {
    let Some(raw) = groups.get(id).map_err(store_err)? else {
        return Ok(None);
    };
    let record: GroupRecord = serde_json::from_slice(raw.value()).map_err(store_err)?;
    let end = offset.saturating_add(limit).min(record.size);
    let mut results: Vec<Option<JobResult>> = Vec::new();
    let (from, to) = (
        member_key(id, offset),
        member_key(id, end.saturating_sub(1)),
    );
    if offset >= end {
        return Ok(Some(page(id, record, offset, results)));
    }
    for item in members
        .range(from.as_str()..=to.as_str())
        .map_err(store_err)?
    {
        let (key, job) = item.map_err(store_err)?;
        let index: u32 = key
            .value()
            .rsplit('\u{0}')
            .next()
            .and_then(|i| i.parse().ok())
            .unwrap_or(u32::MAX);
        if index < offset || index >= end {
            continue;
        }
        if let Some(raw) = jobs.get(job.value()).map_err(store_err)? {
            let at = (index - offset) as usize;
            if results.len() <= at {
                results.resize(at + 1, None);
            }
            results[at] = Some(serde_json::from_slice(raw.value()).map_err(store_err)?);
        }
    }
    // Members past the last result in the page, as nulls: only once the page's memory is
    // bounded by its window.
    if record.size <= MAX_NULLS || (end - offset) <= MAX_NULLS {
        results.resize((end - offset) as usize, None);
    }
    Ok(Some(page(id, record, offset, results)))
}

/// The most `null`s a page is padded with: a page of a larger window ends at its last result.
const MAX_NULLS: u32 = 10_000;

fn page(id: &str, record: GroupRecord, offset: u32, results: Vec<Option<JobResult>>) -> GroupView {
    GroupView {
        id: id.to_string(),
        size: record.size,
        succeeded: record.succeeded,
        failed: record.failed,
        done: record.done(),
        policy: record.policy,
        first_failure: record.first_failure,
        callback: record.chord,
        offset,
        results,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_member_ids_have_an_index() {
        assert_eq!(member_index("g", "g.0"), Some(0));
        assert_eq!(member_index("g", "g.17"), Some(17));
        assert_eq!(member_index("g.x", "g.x.3"), Some(3));
        for not in [
            "g",
            "g.",
            "g.callback",
            "g.01",
            "g.-1",
            "h.1",
            "g.1.2",
            "gg.1",
            "g.99999999999",
        ] {
            assert_eq!(member_index("g", not), None, "{not}");
        }
    }
}
