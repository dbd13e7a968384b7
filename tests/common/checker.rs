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
//!   copy, from a job run again after a crash, replaced the one applied first). The aggregator
//!   and the observer read their own copies of the results, and copies published by two
//!   processes at once may reach the two in different orders (RabbitMQ): a record matching a copy
//!   the observer read within a second of the first is counted as **reordered**, not a fault;
//! - **unobserved**: a record whose result the observer never saw (the check could not be made);
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
    /// Every result read, with when the observer read it.
    published: Arc<Mutex<Vec<(JobResult, std::time::Instant)>>>,
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
        let published: Arc<Mutex<Vec<(JobResult, std::time::Instant)>>> = Arc::default();
        let seen = published.clone();
        let task = tokio::spawn(async move {
            while let Some(item) = results.next().await {
                let Ok(d) = item else { continue };
                match JobResult::from_message(&d.message, &d.kind) {
                    Ok(r) => seen
                        .lock()
                        .expect("history")
                        .push((r, std::time::Instant::now())),
                    Err(e) => eprintln!("checker: an unreadable result: {e}"),
                }
                let _ = d.ack().await;
            }
        });
        History { published, task }
    }

    /// Checks the aggregator at `http` against `confirmed` (ids that must be recorded) and
    /// `maybe` (ids that may be recorded or not: a publish whose confirm never came, a chain's
    /// later step): neither lost nor unexpected. Waits, up to `within`, until every confirmed id
    /// is recorded and the observer has seen a result for every recorded id.
    pub async fn verdict(
        self,
        http: SocketAddr,
        confirmed: &[String],
        maybe: &[String],
        within: Duration,
    ) -> Verdict {
        let deadline = tokio::time::Instant::now() + within;
        let sure: BTreeSet<&String> = confirmed.iter().collect();
        let mut pending: BTreeSet<&String> = confirmed.iter().chain(maybe).collect();
        let mut records: BTreeMap<&String, Value> = BTreeMap::new();
        loop {
            // The records not fetched yet, 32 at a time.
            let fetched: Vec<(&String, (u16, Value))> = futures::stream::iter(
                pending.iter().copied(),
            )
            .map(|id| async move { (id, super::http_get(http, &format!("/jobs/{id}")).await) })
            .buffer_unordered(32)
            .collect()
            .await;
            for (id, (code, rec)) in fetched {
                if code == 200 {
                    pending.remove(id);
                    records.insert(id, rec);
                }
            }
            let unrecorded = pending.iter().any(|id| sure.contains(id));
            let unobserved = {
                let published = self.published.lock().expect("history");
                let seen: BTreeSet<&str> = published.iter().map(|(r, _)| r.id.as_str()).collect();
                records.keys().any(|id| !seen.contains(id.as_str()))
            };
            if (!unrecorded && !unobserved) || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // A little longer for late copies of a result (from a job run again).
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.task.abort();
        let published = self.published.lock().expect("history").clone();
        let mut first: BTreeMap<&str, &(JobResult, std::time::Instant)> = BTreeMap::new();
        let mut copies: BTreeMap<&str, Vec<&(JobResult, std::time::Instant)>> = BTreeMap::new();
        for p in &published {
            first.entry(p.0.id.as_str()).or_insert(p);
            copies.entry(p.0.id.as_str()).or_default().push(p);
        }
        let mut v = Verdict {
            lost: pending
                .iter()
                .filter(|id| sure.contains(*id))
                .map(|id| id.to_string())
                .collect(),
            ..Verdict::default()
        };
        v.lost_but_published = v
            .lost
            .iter()
            .filter(|id| first.contains_key(id.as_str()))
            .cloned()
            .collect();
        for (id, rec) in &records {
            v.recorded += 1;
            let status = rec["status"].as_str().unwrap_or("?").to_string();
            *v.by_status.entry(status).or_default() += 1;
            let Some((f, first_at)) = first.get(id.as_str()).copied() else {
                v.unobserved.push(id.to_string());
                continue;
            };
            if same(f, rec) {
                continue;
            }
            // Copies published at the same moment by two processes may reach the aggregator and
            // the observer in different orders: a record matching a copy read within a second
            // of the first is that, not a second application.
            let reordered = copies[id.as_str()]
                .iter()
                .any(|(r, at)| same(r, rec) && at.duration_since(*first_at) < REORDER);
            if reordered {
                v.reordered += 1;
            } else {
                v.applied_twice.push(format!(
                    "{id}: recorded attempt {} by {}, first published attempt {} by {:?}",
                    rec["attempt"], rec["worker"], f.attempt, f.worker
                ));
            }
        }
        let stats = super::stats(http).await;
        let all = stats["results"].as_u64().unwrap_or(0) as usize;
        v.unexpected = all.saturating_sub(v.recorded);
        v.ran_again = copies.values().filter(|c| c.len() > 1).count();
        v.duplicates_dropped = stats["duplicates"].as_u64().unwrap_or(0);
        v.published = published.len();
        v
    }
}

/// How close two copies of a result must be read for their order to be taken as ambiguous.
const REORDER: Duration = Duration::from_secs(1);

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
    /// Those of the lost ids whose result the observer read: a worker ran them and published
    /// the result, and the aggregator did not record it.
    pub lost_but_published: Vec<String>,
    /// Records of ids nobody confirmed.
    pub unexpected: usize,
    /// Records that are not the first result published for their id.
    pub applied_twice: Vec<String>,
    /// Records matching not the first copy of their result but one read within a second of it
    /// (copies published at once, reordered between the aggregator's reader and the observer's).
    pub reordered: usize,
    /// Records whose result the observer never saw (its reader missed it: the check of those
    /// could not be made).
    pub unobserved: Vec<String>,
    /// The records by status.
    pub by_status: BTreeMap<String, usize>,
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
            self.lost.is_empty()
                && self.unexpected == 0
                && self.applied_twice.is_empty()
                && self.unobserved.is_empty(),
            "{what}: {self:?}"
        );
    }

    /// Panics unless every record has one of `statuses`.
    pub fn assert_statuses(&self, what: &str, statuses: &[&str]) {
        let other: Vec<_> = self
            .by_status
            .iter()
            .filter(|(s, _)| !statuses.contains(&s.as_str()))
            .collect();
        assert!(
            other.is_empty(),
            "{what}: records with other statuses {other:?}"
        );
    }
}
