//! A run's history and its checker, in the style of Jepsen's total-queue checker.
//!
//! The history has two sides, both kept apart from the aggregator under test: the job ids the
//! producer saw confirmed, and every result published on the namespace, in order, read through
//! an observer's own copy of the results (a results reader group of its own). The verdict
//! compares them with what the aggregator recorded:
//!
//! - **lost**: confirmed, and no record once the run is over;
//! - **unexpected**: recorded and never confirmed (nor among the ids that may be recorded: a
//!   publish whose confirm never came, a chord callback);
//! - **applied twice**: a record that is not the first result published for its id (a later
//!   copy, from a job run again after a crash, replaced the one applied first);
//! - **ran again** (reported, not a fault): ids with more than one result published.

use conveyor::transport::{ConsumeOptions, Source};
use conveyor::{Client, JobResult};
use futures::StreamExt;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The results published on a namespace, as an observer of its own reads them.
pub struct History {
    published: Arc<Mutex<Vec<JobResult>>>,
    task: tokio::task::JoinHandle<()>,
}

impl History {
    /// Starts observing `client`'s namespace's results (from now on), through a reader that
    /// goes with it.
    pub async fn observe(client: &Client) -> History {
        History::start(client, true).await
    }

    /// Like [`History::observe`], through a durable reader of its own, which keeps what comes
    /// while its connection is lost (a broker restart).
    pub async fn observe_durably(client: &Client) -> History {
        History::start(client, false).await
    }

    async fn start(client: &Client, ephemeral: bool) -> History {
        let opts = ConsumeOptions {
            ephemeral,
            ..ConsumeOptions::default()
        };
        let mut results = client
            .transport()
            .consume(Source::Results("checker".into()), opts)
            .await
            .expect("the checker's results reader");
        let published: Arc<Mutex<Vec<JobResult>>> = Arc::default();
        let seen = published.clone();
        let task = tokio::spawn(async move {
            while let Some(item) = results.next().await {
                let Ok(d) = item else { continue };
                if let Ok(r) = JobResult::from_message(&d.message, &d.kind) {
                    seen.lock().expect("history").push(r);
                }
                let _ = d.ack().await;
            }
        });
        History { published, task }
    }

    /// Waits (up to `within`) until the aggregator at `http` has recorded as many results as
    /// there are `confirmed` ids, then checks it against them. `maybe` are ids that may be
    /// recorded or not (a publish whose confirm never came, a chord callback): neither lost nor
    /// unexpected.
    pub async fn verdict(
        self,
        http: SocketAddr,
        confirmed: &[String],
        maybe: &[String],
        within: Duration,
    ) -> Verdict {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            let recorded = super::stats(http).await["results"].as_u64().unwrap_or(0);
            if recorded as usize >= confirmed.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The observer reads at its own pace: wait until it has seen as many results as were
        // recorded, then a little for late copies of a result (from a job run again).
        let recorded = super::stats(http).await["results"].as_u64().unwrap_or(0) as usize;
        while self.published.lock().expect("history").len() < recorded
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.task.abort();
        let published = self.published.lock().expect("history").clone();
        let mut first: BTreeMap<&str, &JobResult> = BTreeMap::new();
        let mut copies: BTreeMap<&str, usize> = BTreeMap::new();
        for r in &published {
            first.entry(r.id.as_str()).or_insert(r);
            *copies.entry(r.id.as_str()).or_default() += 1;
        }
        let mut v = Verdict::default();
        let sure: BTreeSet<&String> = confirmed.iter().collect();
        let wanted: BTreeSet<&String> = confirmed.iter().chain(maybe).collect();
        // The records, fetched 32 at a time.
        let records: Vec<(&String, (u16, Value))> = futures::stream::iter(wanted.iter().copied())
            .map(|id| async move { (id, super::http_get(http, &format!("/jobs/{id}")).await) })
            .buffer_unordered(32)
            .collect()
            .await;
        for (id, (code, rec)) in records {
            if code != 200 {
                if sure.contains(id) {
                    v.lost.push(id.to_string());
                }
                continue;
            }
            v.recorded += 1;
            match first.get(id.as_str()) {
                Some(f) if same(f, &rec) => {}
                Some(f) => v.applied_twice.push(format!(
                    "{id}: recorded attempt {} by {}, first published attempt {} by {:?}",
                    rec["attempt"], rec["worker"], f.attempt, f.worker
                )),
                None => v
                    .applied_twice
                    .push(format!("{id}: recorded, never published")),
            }
        }
        let stats = super::stats(http).await;
        let all = stats["results"].as_u64().unwrap_or(0) as usize;
        v.unexpected = all.saturating_sub(v.recorded);
        v.ran_again = copies.values().filter(|n| **n > 1).count();
        v.duplicates_dropped = stats["duplicates"].as_u64().unwrap_or(0);
        v.published = published.len();
        v
    }
}

/// The record `rec` (as `GET /jobs/{id}` gives it) is the result `r`.
fn same(r: &JobResult, rec: &Value) -> bool {
    rec["attempt"].as_u64() == Some(u64::from(r.attempt))
        && rec["status"].as_str() == Some(r.status.as_str())
        && rec["worker"].as_str() == r.worker.as_deref()
}

/// What the checker found.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Confirmed ids without a record.
    pub lost: Vec<String>,
    /// Records of ids nobody confirmed.
    pub unexpected: usize,
    /// Records that are not the first result published for their id.
    pub applied_twice: Vec<String>,
    /// Ids whose job produced more than one result (run again after a crash).
    pub ran_again: usize,
    /// Results the aggregator dropped as copies of recorded ones.
    pub duplicates_dropped: u64,
    /// Records found.
    pub recorded: usize,
    /// Results published in all.
    pub published: usize,
}

impl Verdict {
    /// Panics with the verdict unless nothing was lost, unexpected or applied twice.
    pub fn assert_clean(&self, what: &str) {
        eprintln!("{what}: checker verdict {self:?}");
        assert!(
            self.lost.is_empty() && self.unexpected == 0 && self.applied_twice.is_empty(),
            "{what}: {self:?}"
        );
    }
}
