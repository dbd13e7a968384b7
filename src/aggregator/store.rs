//! The aggregator's durable store (redb): one record per job id, plus counters. A batch of
//! results is one transaction, committed (fsync) before any of them is acked.

use crate::error::{Error, Result};
use crate::result::JobResult;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const DUPLICATES: &str = "duplicates";
const STATUS_PREFIX: &str = "status:";

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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Newly recorded job ids.
    pub recorded: u64,
    /// Results whose job id was already there.
    pub duplicates: u64,
}

/// The store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
}

fn store_err(e: impl std::fmt::Display) -> Error {
    Error::Store(e.to_string())
}

impl Store {
    /// Opens (or creates) the store in directory `dir`.
    pub fn open(dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(dir)?;
        let db = Database::create(dir.join("results.redb")).map_err(store_err)?;
        let txn = db.begin_write().map_err(store_err)?;
        {
            txn.open_table(JOBS).map_err(store_err)?;
            txn.open_table(COUNTERS).map_err(store_err)?;
        }
        txn.commit().map_err(store_err)?;
        Ok(Store { db: Arc::new(db) })
    }

    /// Records each result whose job id is new; counts the others as duplicates. Durable when it
    /// returns. Blocking: call from a blocking thread.
    pub fn record_batch(&self, results: &[JobResult]) -> Result<BatchOutcome> {
        let mut outcome = BatchOutcome::default();
        let txn = self.db.begin_write().map_err(store_err)?;
        {
            let mut jobs = txn.open_table(JOBS).map_err(store_err)?;
            let mut counters = txn.open_table(COUNTERS).map_err(store_err)?;
            let mut bump = |key: &str, by: u64| -> Result<()> {
                let now = counters
                    .get(key)
                    .map_err(store_err)?
                    .map(|v| v.value())
                    .unwrap_or(0);
                counters.insert(key, now + by).map_err(store_err)?;
                Ok(())
            };
            for r in results {
                if jobs.get(r.id.as_str()).map_err(store_err)?.is_some() {
                    outcome.duplicates += 1;
                    continue;
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
        }
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
            assert_eq!(
                out,
                BatchOutcome {
                    recorded: 2,
                    duplicates: 1
                }
            );
        }
        let store = Store::open(dir.path()).expect("reopen");
        let out = store
            .record_batch(&[result("b", "succeeded")])
            .expect("batch");
        assert_eq!(
            out,
            BatchOutcome {
                recorded: 0,
                duplicates: 1
            }
        );
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
