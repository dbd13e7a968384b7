//! Chaos, on each broker, with the real binaries: workers killed with `kill -9` every two
//! seconds under the supervisor, a worker frozen with SIGSTOP past its lease, and a supervisor
//! killed with `kill -9`. Each test checks its counts against the aggregator's store, prints
//! them, and ends with the checker's verdict (`tests/common/checker.rs`); every wait is bounded.

mod common;

use common::checker::History;
use common::cluster::{publish_all, Cluster};
use common::{http_get, wait_for_results, Broker, Proc};
use conveyor::JobSpec;
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

both_brokers!(
    kill_storm,
    crash_jobs_one_percent,
    frozen_worker,
    killed_supervisor_takes_its_workers_along,
);

/// Running (a zombie left for a reaper counts as gone).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().chars().next())
        })
        .flatten()
        .is_some_and(|state| state != 'Z' && state != 'X')
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}

/// The longest a checker's verdict waits for the last records.
const WAIT: Duration = Duration::from_secs(60);

async fn stats(c: &Cluster) -> Value {
    common::stats(c.http).await
}

/// 20,000 jobs (half `echo`, half `sleep` of 1–20 ms) over 3 supervised workers, one of them
/// killed with `kill -9` every 2 s until the last result is in.
async fn kill_storm(broker: Broker) {
    const JOBS: u64 = 20_000;
    let c = Cluster::new(broker);
    let _agg = c.aggregator("aggregator").await;
    let mut sup = c.supervisor("3", &["--lease", "3s", "--concurrency", "8"]);
    let started = Instant::now();
    let client = c.client().await;
    let specs: Vec<JobSpec> = (0..JOBS)
        .map(|i| {
            if i % 2 == 0 {
                JobSpec::new("echo", json!({ "i": i }))
            } else {
                JobSpec::new("sleep", json!({ "ms": 1 + (i * 7919) % 20 }))
            }
        })
        .collect();
    let history = History::observe(&client).await;
    let publisher = tokio::spawn(async move { publish_all(&client, specs).await });

    let deadline = Instant::now() + Duration::from_secs(300);
    let mut kills = 0u32;
    let mut recorded = 0;
    while recorded < JOBS {
        assert!(
            Instant::now() < deadline,
            "{broker:?}: only {recorded} of {JOBS} recorded: {}",
            stats(&c).await
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pids = common::children_of(sup.pid());
        if !pids.is_empty() {
            let victim = pids[(kills as usize * 7 + 3) % pids.len()];
            signal(victim, "KILL");
            kills += 1;
        }
        recorded = stats(&c).await["results"].as_u64().unwrap_or(0);
    }
    let ids = publisher.await.expect("publisher");
    assert_eq!(ids.len() as u64, JOBS);
    // The storm is over; redelivered duplicates arrive before the verdict.
    let verdict = history.verdict(c.http, &ids, &[], WAIT).await;
    verdict.assert_clean("kill storm");
    verdict.assert_statuses("kill storm", &["succeeded"]);
    let s = stats(&c).await;
    assert_eq!(s["results"], json!(JOBS), "every job id recorded once: {s}");
    assert_eq!(
        s["by_status"],
        json!({ "succeeded": JOBS }),
        "none lost, none dead: {s}"
    );
    let log = sup.log_text();
    let restarts = log.matches("child restarted").count() as u32;
    assert!(
        kills >= 5 && restarts + 1 >= kills,
        "{kills} kills, {restarts} restarts:\n{}",
        log.lines().rev().take(40).collect::<Vec<_>>().join("\n")
    );
    sup.signal("TERM");
    assert_eq!(sup.wait_exit(Duration::from_secs(30)).await, Some(0));
    println!(
        "{broker:?} kill storm: {JOBS} jobs in {:.1} s, {kills} workers killed, {restarts} restarts, \
         {} recorded once, {} duplicate results dropped, 0 dead",
        started.elapsed().as_secs_f64(),
        s["results"],
        s["duplicates"]
    );
}

/// 2,000 jobs of which 1% are `crash` (each attempt aborts its worker process): the supervisor
/// keeps the pool alive, the crash jobs end dead after their attempts, every other job succeeds.
/// A job in flight on a worker that dies spends an attempt too (the broker counts deliveries),
/// and a crash job takes its neighbours down with it each time, so the other jobs get more
/// attempts than the crash jobs' two.
async fn crash_jobs_one_percent(broker: Broker) {
    const JOBS: u64 = 2_000;
    let c = Cluster::new(broker);
    let _agg = c.aggregator("aggregator").await;
    let mut sup = c.supervisor("3", &["--lease", "3s", "--concurrency", "8"]);
    let client = c.client().await;
    let specs: Vec<JobSpec> = (0..JOBS)
        .map(|i| {
            if i % 100 == 50 {
                JobSpec::new("crash", json!({})).max_attempts(2)
            } else {
                JobSpec::new("sleep", json!({ "ms": 1 + i % 10 })).max_attempts(20)
            }
        })
        .collect();
    let started = Instant::now();
    let history = History::observe(&client).await;
    let ids = publish_all(&client, specs).await;
    let s = wait_for_results(c.http, JOBS, Duration::from_secs(300)).await;
    history
        .verdict(c.http, &ids, &[], WAIT)
        .await
        .assert_clean("crash jobs");
    assert_eq!(s["results"], json!(JOBS), "{s}");
    assert_eq!(
        s["by_status"],
        json!({ "dead": JOBS / 100, "succeeded": JOBS - JOBS / 100 }),
        "{s}"
    );
    let log = sup.log_text();
    // Crash jobs in flight together on one worker share its abort.
    let aborts = log.matches("killed by SIGABRT").count();
    let restarts = log.matches("child restarted").count();
    assert!(
        aborts >= 2 && restarts + 1 >= aborts,
        "crash jobs took workers down ({aborts}) and the supervisor restarted them ({restarts})"
    );
    sup.signal("TERM");
    assert_eq!(sup.wait_exit(Duration::from_secs(30)).await, Some(0));
    println!(
        "{broker:?} crash jobs: {JOBS} jobs in {:.1} s, {} crash jobs dead, {} succeeded, \
         {aborts} worker aborts, {restarts} restarts",
        started.elapsed().as_secs_f64(),
        s["by_status"]["dead"],
        s["by_status"]["succeeded"]
    );
}

/// A worker holding jobs is frozen (SIGSTOP) past its lease; another worker does its jobs; once
/// thawed (SIGCONT), its late results are counted as duplicates, not recorded again.
async fn frozen_worker(broker: Broker) {
    const JOBS: usize = 40;
    let c = Cluster::new(broker);
    let _agg = c.aggregator("aggregator").await;
    let client = c.client().await;
    let history = History::observe(&client).await;
    let ids = publish_all(
        &client,
        (0..JOBS)
            .map(|_| JobSpec::new("sleep", json!({ "ms": 3000 })))
            .collect(),
    )
    .await;
    // On RabbitMQ a delivery goes back when its connection dies: a 1 s heartbeat makes the
    // broker drop the frozen worker's connection within a few seconds.
    let frozen_url = match broker {
        Broker::Amqp => format!("{}?heartbeat=1", c.url),
        Broker::Nats => c.url.clone(),
    };
    let frozen = Proc::spawn(
        "frozen",
        "conveyor-worker",
        &[
            "--broker",
            &frozen_url,
            "--namespace",
            &c.ns,
            "--lease",
            "2s",
            "--concurrency",
            "8",
            "--heartbeat",
            "200ms",
        ],
        c.logs(),
    );
    // Freeze it once its heartbeat says it holds 8 jobs; its id is the one its heartbeats give.
    let deadline = Instant::now() + Duration::from_secs(30);
    let frozen_id = loop {
        let (_, w) = http_get(c.http, "/workers").await;
        let holding =
            w["workers"].as_array().into_iter().flatten().find(|w| {
                w["pid"] == json!(frozen.pid()) && w["in_flight"].as_u64().unwrap_or(0) >= 8
            });
        if let Some(id) = holding.and_then(|w| w["id"].as_str()) {
            break id.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "the worker never held 8 jobs: {w}\n{}",
            frozen.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    signal(frozen.pid(), "STOP");
    let other = c.worker("other", &["--concurrency", "16"]);
    let s = wait_for_results(c.http, JOBS as u64, Duration::from_secs(90)).await;
    assert_eq!(s["results"], json!(JOBS), "the others did every job: {s}");
    let (_, w) = http_get(c.http, "/workers").await;
    let other_id = w["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|w| w["pid"] == json!(other.pid()))
        .and_then(|w| w["id"].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| panic!("the other worker is not in /workers: {w}"));
    assert_ne!(frozen_id, other_id);
    // Everything was done, by the other worker, while the frozen worker was still stopped.
    for id in &ids {
        let (_, rec) = http_get(c.http, &format!("/jobs/{id}")).await;
        assert_eq!(
            rec["worker"].as_str(),
            Some(other_id.as_str()),
            "{id} was recorded from the other worker, not the frozen {frozen_id}: {rec}"
        );
    }
    signal(frozen.pid(), "CONT");
    // Its handlers finish late and report; the aggregator keeps the first result of each job.
    let deadline = Instant::now() + Duration::from_secs(60);
    let late = loop {
        let s = stats(&c).await;
        let duplicates = s["duplicates"].as_u64().unwrap_or(0);
        if duplicates >= 1 {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no late result from the thawed worker: {s}\n{}",
            frozen.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let verdict = history.verdict(c.http, &ids, &[], WAIT).await;
    verdict.assert_clean("frozen worker");
    verdict.assert_statuses("frozen worker", &["succeeded"]);
    let s = stats(&c).await;
    assert_eq!(s["results"], json!(JOBS), "nothing applied twice: {s}");
    assert_eq!(s["by_status"], json!({ "succeeded": JOBS }), "{s}");
    println!(
        "{broker:?} frozen worker: {JOBS} jobs, all done by the other worker; the thawed worker's \
         late results: {} duplicates (at first count {}), {} recorded once",
        s["duplicates"], late["duplicates"], s["results"]
    );
}

/// `kill -9` of the supervisor: its workers notice that their parent is gone, drain and exit
/// rather than run on unsupervised.
async fn killed_supervisor_takes_its_workers_along(broker: Broker) {
    let c = Cluster::new(broker);
    let mut sup = c.supervisor("2", &["--concurrency", "2"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let workers = loop {
        let pids = common::children_of(sup.pid());
        if pids.len() == 2 && sup.log_text().matches("worker started").count() >= 2 {
            break pids;
        }
        assert!(Instant::now() < deadline, "workers never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    sup.kill9();
    let deadline = Instant::now() + Duration::from_secs(15);
    while workers.iter().any(|&pid| alive(pid)) {
        assert!(
            Instant::now() < deadline,
            "{broker:?}: workers {workers:?} outlived their supervisor"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("{broker:?}: supervisor killed with kill -9; its 2 workers exited");
}
