//! The aggregator's durable store (redb): one record per job id, plus counters. A batch of
//! results is one transaction, committed (fsync) before any of them is acked.

use super::groups::{
    self, ChordState, Counter, GroupActions, GroupRecord, GroupView, DUE_CANCELS, DUE_CHORDS,
    GROUPS, MEMBERS,
};
use crate::error::{Error, Result};
use crate::result::JobResult;
use crate::workflow::Membership;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const DUPLICATES: &str = "duplicates";
const STATUS_PREFIX: &str = "status:";
/// The page cache of [`Store::open`]: 64 MiB.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// Counts for `GET /stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Distinct job ids recorded.
    pub results: u64,
    /// Results dropped because their job id was already recorded.
    pub duplicates: u64,
    /// Distinct jobs by final status.
    pub by_status: BTreeMap<String, u64>,
}

/// What one batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Newly recorded job ids.
    pub recorded: u64,
    /// Results whose job id was already there.
    pub duplicates: u64,
    /// Results not recorded: a chord callback's id taken before its chord was complete.
    pub refused: u64,
    /// What the group members of the batch ask for.
    pub groups: GroupActions,
}

/// The store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
}

pub(super) fn store_err(e: impl std::fmt::Display) -> Error {
    Error::Store(e.to_string())
}

impl Store {
    /// Opens (or creates) the store in directory `dir`, with the default page cache.
    pub fn open(dir: &Path) -> Result<Store> {
        Store::open_with(dir, DEFAULT_CACHE_BYTES)
    }

    /// Opens (or creates) the store in directory `dir`; redb keeps at most `cache_bytes` of its
    /// pages in memory (its own default is 1 GiB, which a large store fills).
    pub fn open_with(dir: &Path, cache_bytes: usize) -> Result<Store> {
        std::fs::create_dir_all(dir)?;
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(dir.join("results.redb"))
            .map_err(store_err)?;
        let txn = db.begin_write().map_err(store_err)?;
        {
            txn.open_table(JOBS).map_err(store_err)?;
            txn.open_table(COUNTERS).map_err(store_err)?;
            txn.open_table(GROUPS).map_err(store_err)?;
            txn.open_table(MEMBERS).map_err(store_err)?;
            txn.open_table(DUE_CHORDS).map_err(store_err)?;
            txn.open_table(DUE_CANCELS).map_err(store_err)?;
        }
        txn.commit().map_err(store_err)?;
        Ok(Store { db: Arc::new(db) })
    }

    /// Records each result whose job id is new; counts the others as duplicates. Durable when it
    /// returns. Blocking: call from a blocking thread.
    pub fn record_batch(&self, results: &[JobResult]) -> Result<BatchOutcome> {
        let plain: Vec<(JobResult, Option<Membership>)> =
            results.iter().map(|r| (r.clone(), None)).collect();
        self.record(&plain)
    }

    /// [`Store::record_batch`] for results that may be group members: each new member is
    /// counted in its group in the same transaction.
    pub fn record(&self, results: &[(JobResult, Option<Membership>)]) -> Result<BatchOutcome> {
        let mut outcome = BatchOutcome::default();
        let txn = self.db.begin_write().map_err(store_err)?;
        {
            let mut jobs = txn.open_table(JOBS).map_err(store_err)?;
            let mut counters = txn.open_table(COUNTERS).map_err(store_err)?;
            let mut groups = txn.open_table(GROUPS).map_err(store_err)?;
            let mut members = txn.open_table(MEMBERS).map_err(store_err)?;
            let mut due = txn.open_table(DUE_CHORDS).map_err(store_err)?;
            let mut cancels = txn.open_table(DUE_CANCELS).map_err(store_err)?;
            let mut counter = Counter::new(&mut groups, &mut members, &mut due, &mut cancels);
            let mut bump = |key: &str, by: u64| -> Result<()> {
                let now = counters
                    .get(key)
                    .map_err(store_err)?
                    .map(|v| v.value())
                    .unwrap_or(0);
                counters.insert(key, now + by).map_err(store_err)?;
                Ok(())
            };
            for (r, membership) in results {
                if jobs.get(r.id.as_str()).map_err(store_err)?.is_some() {
                    outcome.duplicates += 1;
                    continue;
                }
                if counter.callback_not_due(&r.id)? {
                    // A job that took a chord's callback id before the chord was complete:
                    // recording it would pre-empt the real callback's result.
                    tracing::warn!(job = %r.id, "a result for a chord callback that is not due yet; not recorded");
                    outcome.refused += 1;
                    continue;
                }
                if let Some(m) = membership {
                    counter.count(r, m)?;
                }
                let bytes = serde_json::to_vec(r).map_err(store_err)?;
                jobs.insert(r.id.as_str(), bytes.as_slice())
                    .map_err(store_err)?;
                bump(&format!("{STATUS_PREFIX}{}", r.status), 1)?;
                outcome.recorded += 1;
            }
            if outcome.duplicates > 0 {
                bump(DUPLICATES, outcome.duplicates)?;
            }
            outcome.groups = counter.finish()?;
        }
        txn.commit().map_err(store_err)?;
        Ok(outcome)
    }

    /// The record of job `id`.
    pub fn get(&self, id: &str) -> Result<Option<JobResult>> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let jobs = txn.open_table(JOBS).map_err(store_err)?;
        match jobs.get(id).map_err(store_err)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(v.value())
                .map(Some)
                .map_err(store_err),
        }
    }

    /// Group `id` with all its members' results, in member order (for a chord's callback,
    /// once every member has one).
    pub fn group(&self, id: &str) -> Result<Option<GroupView>> {
        self.group_page(id, 0, u32::MAX)
    }

    /// Group `id` with the results of members `offset..offset + limit`, in member order. What it
    /// allocates follows the window and the results recorded, never the size a member declared.
    pub fn group_page(&self, id: &str, offset: u32, limit: u32) -> Result<Option<GroupView>> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let groups = txn.open_table(GROUPS).map_err(store_err)?;
        let members = txn.open_table(MEMBERS).map_err(store_err)?;
        let jobs = txn.open_table(JOBS).map_err(store_err)?;
        groups::view(&groups, &members, &jobs, id, offset, limit)
    }

    /// Chords whose callback is due but not yet confirmed published.
    pub fn due_chords(&self) -> Result<Vec<String>> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let due = txn.open_table(DUE_CHORDS).map_err(store_err)?;
        let mut out = Vec::new();
        for item in due.iter().map_err(store_err)? {
            out.push(item.map_err(store_err)?.0.value().to_string());
        }
        Ok(out)
    }

    /// Fail-fast cancels recorded but not yet confirmed sent: (group, reason).
    pub fn due_cancels(&self) -> Result<Vec<(String, String)>> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let due = txn.open_table(DUE_CANCELS).map_err(store_err)?;
        let mut out = Vec::new();
        for item in due.iter().map_err(store_err)? {
            let (group, why) = item.map_err(store_err)?;
            out.push((group.value().to_string(), why.value().to_string()));
        }
        Ok(out)
    }

    /// Marks the fail-fast cancel of `group` sent. Durable when it returns.
    pub fn cancel_sent(&self, group: &str) -> Result<()> {
        let txn = self.db.begin_write().map_err(store_err)?;
        {
            let mut due = txn.open_table(DUE_CANCELS).map_err(store_err)?;
            due.remove(group).map_err(store_err)?;
        }
        txn.commit().map_err(store_err)?;
        Ok(())
    }

    /// Marks the callback of chord `group` published. Durable when it returns.
    pub fn chord_published(&self, group: &str) -> Result<()> {
        let txn = self.db.begin_write().map_err(store_err)?;
        {
            let mut groups = txn.open_table(GROUPS).map_err(store_err)?;
            let mut due = txn.open_table(DUE_CHORDS).map_err(store_err)?;
            due.remove(group).map_err(store_err)?;
            let record = match groups.get(group).map_err(store_err)? {
                Some(raw) => {
                    Some(serde_json::from_slice::<GroupRecord>(raw.value()).map_err(store_err)?)
                }
                None => None,
            };
            if let Some(mut record) = record {
                if let Some(chord) = record.chord.as_mut() {
                    chord.state = ChordState::Published;
                }
                let bytes = serde_json::to_vec(&record).map_err(store_err)?;
                groups.insert(group, bytes.as_slice()).map_err(store_err)?;
            }
        }
        txn.commit().map_err(store_err)?;
        Ok(())
    }

    /// Current counts.
    pub fn stats(&self) -> Result<Stats> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let counters = txn.open_table(COUNTERS).map_err(store_err)?;
        let mut stats = Stats::default();
        for item in counters.iter().map_err(store_err)? {
            let (k, v) = item.map_err(store_err)?;
            let (k, v) = (k.value().to_string(), v.value());
            if k == DUPLICATES {
                stats.duplicates = v;
            } else if let Some(status) = k.strip_prefix(STATUS_PREFIX) {
                stats.results += v;
                stats.by_status.insert(status.to_string(), v);
            }
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn result(id: &str, status: &str) -> JobResult {
        JobResult {
            id: id.into(),
            kind: "echo".into(),
            status: status.into(),
            attempt: 1,
            output: json!({"id": id}),
            error: None,
            worker: None,
            group: None,
            index: None,
            chain: None,
            step: None,
            steps: None,
        }
    }

    fn member(group: &str, size: u32, index: u32, status: &str) -> (JobResult, Option<Membership>) {
        let mut r = result(&crate::workflow::member_id(group, index), status);
        r.output = json!(index);
        r.index = Some(index);
        let m = Membership {
            group: group.into(),
            size,
            index: Some(index),
            policy: crate::workflow::Policy::FailFast,
            chord: Some("echo".into()),
            chord_reply_to: None,
        };
        (r, Some(m))
    }

    #[test]
    fn a_chord_is_due_once_whatever_the_duplicates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let first = store
            .record(&[
                member("g", 3, 2, "succeeded"),
                member("g", 3, 0, "succeeded"),
            ])
            .expect("batch");
        assert!(first.groups.chords_due.is_empty());
        // The last member, delivered twice in one batch and once more later.
        let last = store
            .record(&[
                member("g", 3, 1, "succeeded"),
                member("g", 3, 1, "succeeded"),
            ])
            .expect("batch");
        assert_eq!(last.groups.chords_due, vec!["g".to_string()]);
        assert_eq!(last.duplicates, 1);
        let again = store
            .record(&[member("g", 3, 1, "succeeded")])
            .expect("batch");
        assert!(again.groups.chords_due.is_empty());
        assert_eq!(store.due_chords().expect("due"), vec!["g".to_string()]);
        let view = store.group("g").expect("read").expect("group");
        assert!(view.done);
        assert_eq!((view.succeeded, view.failed), (3, 0));
        let outputs: Vec<_> = view
            .results
            .iter()
            .map(|r| r.as_ref().map(|r| r.output.clone()))
            .collect();
        assert_eq!(
            outputs,
            vec![Some(json!(0)), Some(json!(1)), Some(json!(2))]
        );
        store.chord_published("g").expect("mark");
        assert!(store.due_chords().expect("due").is_empty());
        let view = store.group("g").expect("read").expect("group");
        assert_eq!(view.callback.map(|c| c.state), Some(ChordState::Published));
    }

    #[test]
    fn only_member_ids_below_the_first_size_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        store
            .record(&[member("g", 2, 0, "succeeded")])
            .expect("batch");
        // A job that names the group with an id of its own, an index past the size, an id that
        // is no `<group>.<i>`, and a member whose own declared size its index is not below.
        let (mut foreign, m) = member("g", 2, 1, "succeeded");
        foreign.id = "not-a-member".into();
        let (past, _) = member("g", 2, 5, "succeeded");
        let past_m = Some(Membership {
            index: None,
            ..m.clone().expect("membership")
        });
        let (small, small_m) = member("g", 1, 1, "failed");
        let (mut liar, _) = member("g", 2, 1, "succeeded");
        liar.id = "g.0x".into();
        let out = store
            .record(&[
                (foreign, m.clone()),
                (past, past_m),
                (liar, m),
                (small, small_m),
            ])
            .expect("batch");
        // None counted: `g.1` declared a size of 1, which its own index is not below.
        let view = store.group("g").expect("read").expect("group");
        assert_eq!((view.succeeded, view.failed), (1, 0));
        assert!(out.groups.chords_due.is_empty());
        // A member that declares a larger size counts, under the size first declared.
        store
            .record(&[member("h", 2, 0, "succeeded")])
            .expect("batch");
        let done = store.record(&[member("h", 9, 1, "failed")]).expect("batch");
        let view = store.group("h").expect("read").expect("group");
        assert_eq!(view.size, 2, "the first declared size holds");
        assert_eq!((view.succeeded, view.failed), (1, 1));
        assert_eq!(done.groups.chords_due, vec!["h".to_string()]);
        assert_eq!(view.results.len(), 2);
    }

    #[test]
    fn a_huge_declared_size_costs_only_what_was_recorded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        store
            .record(&[member("big", 1_000_000, 3, "succeeded")])
            .expect("batch");
        let all = store.group("big").expect("read").expect("group");
        assert_eq!(all.size, 1_000_000);
        assert_eq!(all.results.len(), 4, "up to the last result only");
        assert!(all.results[3].is_some());
        let page = store
            .group_page("big", 0, 10_000)
            .expect("read")
            .expect("group");
        assert_eq!(page.results.len(), 10_000);
        let later = store.group_page("big", 2, 5).expect("read").expect("group");
        assert_eq!((later.offset, later.results.len()), (2, 5));
        assert!(later.results[1].is_some() && later.results[0].is_none());
        let past = store
            .group_page("big", 2_000_000, 5)
            .expect("read")
            .expect("group");
        assert!(past.results.is_empty());
    }

    #[test]
    fn a_foreign_job_cannot_declare_a_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        // First to arrive: a job that names group `g` with size 1 and an id of its own.
        let (mut foreign, m) = member("g", 1, 0, "succeeded");
        foreign.id = "intruder".into();
        store.record(&[(foreign, m)]).expect("batch");
        assert_eq!(store.group("g").expect("read"), None);
        let first = store
            .record(&[member("g", 3, 0, "succeeded")])
            .expect("batch");
        assert!(first.groups.chords_due.is_empty(), "not complete at 1 of 3");
        assert_eq!(store.group("g").expect("read").map(|g| g.size), Some(3));
    }

    #[test]
    fn a_callback_id_is_not_recorded_before_its_chord_is_complete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let early = store
            .record(&[
                (result("g.callback", "succeeded"), None),
                member("g", 2, 0, "succeeded"),
                (result("g.callback", "succeeded"), None),
            ])
            .expect("batch");
        assert_eq!((early.recorded, early.refused), (1, 2));
        assert!(store.get("g.callback").expect("read").is_none());
        store
            .record(&[member("g", 2, 1, "succeeded")])
            .expect("batch");
        let real = store
            .record(&[(result("g.callback", "succeeded"), None)])
            .expect("batch");
        assert_eq!((real.recorded, real.refused), (1, 0));
        assert!(store.get("g.callback").expect("read").is_some());
    }

    #[test]
    fn a_fail_fast_group_asks_for_one_cancel() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let out = store
            .record(&[member("f", 4, 0, "dead"), member("f", 4, 1, "failed")])
            .expect("batch");
        assert_eq!(out.groups.cancel.len(), 1);
        assert!(out.groups.cancel[0].1.contains("member 0"));
        let view = store.group("f").expect("read").expect("group");
        assert_eq!((view.failed, view.done), (2, false));
        assert_eq!(view.results.iter().filter(|r| r.is_none()).count(), 2);
        assert_eq!(store.group("nope").expect("read"), None);
    }

    #[test]
    fn a_fail_fast_cancel_stays_due_across_a_restart_until_it_is_marked_sent() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            store.record(&[member("ff", 3, 1, "dead")]).expect("batch");
            // The aggregator dies here, before the cancel is sent.
        }
        let store = Store::open(dir.path()).expect("reopen");
        let due = store.due_cancels().expect("due");
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].0, "ff");
        assert!(due[0].1.contains("member 1"), "{}", due[0].1);
        // A later failure of the group asks for no second cancel.
        let out = store.record(&[member("ff", 3, 2, "dead")]).expect("batch");
        assert!(out.groups.cancel.is_empty());
        store.cancel_sent("ff").expect("mark");
        assert!(store.due_cancels().expect("due").is_empty());
    }

    #[test]
    fn records_each_id_once_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            let out = store
                .record_batch(&[
                    result("a", "succeeded"),
                    result("b", "dead"),
                    result("a", "succeeded"),
                ])
                .expect("batch");
            assert_eq!((out.recorded, out.duplicates), (2, 1));
        }
        let store = Store::open(dir.path()).expect("reopen");
        let out = store
            .record_batch(&[result("b", "succeeded")])
            .expect("batch");
        assert_eq!((out.recorded, out.duplicates), (0, 1));
        let stats = store.stats().expect("stats");
        assert_eq!(stats.results, 2);
        assert_eq!(stats.duplicates, 2);
        assert_eq!(stats.by_status.get("dead"), Some(&1));
        assert_eq!(
            store.get("b").expect("get").map(|r| r.status),
            Some("dead".into())
        );
        assert_eq!(store.get("zzz").expect("get"), None);
    }
}
