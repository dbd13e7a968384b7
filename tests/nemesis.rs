//! The nemesis: a steady mixed workload (echo and sleep jobs, chains, groups, chords, cancels)
//! on a broker of the test's own, while a random schedule of faults hits it: a worker killed
//! with -9 (its supervisor restarts it), the aggregator or the supervisor killed with -9 and
//! started again (the killed supervisor's workers drain and exit), a worker, the aggregator,
//! the supervisor or the broker stopped with SIGSTOP, the broker killed -9 and started again,
//! the workers, the producer or the aggregator cut off from the broker (a fault proxy of each
//! stops forwarding), a third of the producer's confirms removed. The producer is the test
//! itself, so it is partitioned rather than stopped. Then everything is healed, the run drains, and
//! the checker's verdict is asserted: nothing confirmed lost, nothing unexpected, no record
//! replaced by a later copy, every chain's last step and chord's callback recorded, and no
//! record other than `succeeded` or `cancelled`.
//!
//! Faults go on for `CONVEYOR_NEMESIS_SECS` seconds (60 by default, which CI runs); a long run:
//! `CONVEYOR_NEMESIS_SECS=1800 cargo test --test nemesis -- --nocapture`. The schedule's seed is
//! printed; `CONVEYOR_NEMESIS_SEED` replays one.

mod common;

use common::checker::History;
use common::own_broker::OwnBroker;
use common::own_nats::OwnNats;
use common::own_rabbit::OwnRabbit;
use common::proxy::{Drop, Proxy};
use common::{free_port, wait_listening, Proc};
use conveyor::workflow::{callback_id, chain_step_id, Chain, Chord, Group};
use conveyor::{BrokerUrl, Client, JobSpec};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn seconds() -> u64 {
    std::env::var("CONVEYOR_NEMESIS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_nemesis() {
    common::ensure_up(common::Broker::Nats);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nats = OwnNats::new(dir.path().join("js"));
    // Short pings: a stopped broker is noticed within seconds.
    let url = format!("{}?ping_interval=5s", nats.url());
    let confirms = Drop::NatsPubAcks { every: 3 };
    nemesis(
        &mut nats,
        &url,
        confirms,
        dir.path(),
        Duration::from_secs(10),
    )
    .await;
    nats.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_nemesis() {
    common::ensure_up(common::Broker::Amqp);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rabbit = OwnRabbit::new(dir.path().join("rabbit"));
    // Short heartbeats: a stopped broker is noticed within seconds.
    let url = format!("{}?heartbeat=5", OwnBroker::url(&rabbit));
    let confirms = Drop::AmqpConfirms { every: 3 };
    nemesis(
        &mut rabbit,
        &url,
        confirms,
        dir.path(),
        Duration::from_secs(90),
    )
    .await;
    rabbit.kill9();
}

/// `url` with its port replaced by `port`'s.
fn through(url: &str, port: u16) -> String {
    let mut u = url::Url::parse(url).expect("url");
    u.set_port(Some(port)).expect("port");
    u.to_string()
}

/// What the workload published.
#[derive(Default)]
struct Published {
    /// When each id was published, in seconds since the faults began.
    at: std::collections::HashMap<String, f64>,
    /// Ids confirmed by the broker.
    confirmed: Vec<String>,
    /// Ids that may be recorded or not: a publish not confirmed, a chain's later steps, a
    /// chord's callback.
    maybe: Vec<String>,
    /// Ids that must be recorded besides the confirmed ones: the last step of each chain whose
    /// first step was confirmed, and each confirmed chord's callback.
    ends: Vec<String>,
    /// Cancel requests sent.
    cancels: u32,
}

/// The nemesis on `own`, which clients reach at `url`; `confirms` names the confirms of its
/// protocol that the producer's proxy removes.
async fn nemesis(own: &mut dyn OwnBroker, url: &str, confirms: Drop, dir: &Path, boot: Duration) {
    let secs = seconds();
    let seed: u64 = std::env::var("CONVEYOR_NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    own.start();
    wait_listening(&own.addr(), boot).await;
    let url = url.to_string();
    let workers_proxy = Proxy::start(&own.addr(), Drop::Nothing).await;
    let aggregator_proxy = Proxy::start(&own.addr(), Drop::Nothing).await;
    let producer_proxy = Proxy::start(&own.addr(), confirms).await;
    producer_proxy.set_dropping(false);
    let worker_url = through(&url, workers_proxy.addr.port());
    let aggregator_url = through(&url, aggregator_proxy.addr.port());
    let producer_url = through(&url, producer_proxy.addr.port());
    let ns = "nemesis";
    let http: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let store = dir.join("agg");
    let aggregator = |name: &str| {
        Proc::spawn(
            name,
            "conveyor-aggregator",
            &[
                "--broker",
                &aggregator_url,
                "--namespace",
                ns,
                "--http",
                &http.to_string(),
                "--store",
                store.to_str().expect("utf-8"),
            ],
            dir,
        )
    };
    let mut agg = aggregator("aggregator-0");
    let worker_bin = common::bin("conveyor-worker");
    let supervisor = |name: &str| {
        Proc::spawn(
            name,
            "conveyor-supervisor",
            &[
                "--workers",
                "3",
                "--restart-backoff",
                "50ms..1s",
                "--max-restarts",
                "100000",
                "--within",
                "60s",
                "--drain-timeout",
                "10s",
                "--",
                worker_bin.to_str().expect("utf-8"),
                "--broker",
                &worker_url,
                "--namespace",
                ns,
                "--lease",
                "3s",
                "--concurrency",
                "8",
                "--kinds",
                "echo,sleep",
            ],
            dir,
        )
    };
    let mut sup = supervisor("supervisor-0");
    wait_listening(&http.to_string(), Duration::from_secs(30)).await;
    let observer = Client::connect(&BrokerUrl::parse(&url).expect("url"), ns)
        .await
        .expect("observer");
    let history = History::observe_durably(&observer).await;
    let producer = Client::connect(&BrokerUrl::parse(&producer_url).expect("url"), ns)
        .await
        .expect("producer");
    let published = Arc::new(Mutex::new(Published::default()));
    let stop = CancellationToken::new();
    let started = Instant::now();
    let workload = tokio::spawn(workload(
        producer.clone(),
        published.clone(),
        stop.clone(),
        seed,
        started,
    ));
    println!("nemesis on {url}: {secs} s of faults, seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut faults: Vec<(f64, String)> = Vec::new();
    let mut restarts = 0;
    let mut sup_restarts = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(4_000..10_000))).await;
        let at = started.elapsed().as_secs_f64();
        let fault = rng.random_range(0..12);
        let what = match fault {
            0 => {
                let pids = common::children_of(sup.pid());
                match pids.get(rng.random_range(0..pids.len().max(1))) {
                    Some(pid) => {
                        signal(*pid, "KILL");
                        format!("kill -9 worker {pid}")
                    }
                    None => "no worker to kill".into(),
                }
            }
            1 => {
                agg.kill9();
                tokio::time::sleep(Duration::from_millis(1000)).await;
                restarts += 1;
                agg = aggregator(&format!("aggregator-{restarts}"));
                wait_listening(&http.to_string(), Duration::from_secs(30)).await;
                "kill -9 aggregator, started again after 1 s".into()
            }
            2 => {
                let pids = common::children_of(sup.pid());
                match pids.first() {
                    Some(pid) => {
                        signal(*pid, "STOP");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        signal(*pid, "CONT");
                        format!("SIGSTOP worker {pid} for 5 s")
                    }
                    None => "no worker to stop".into(),
                }
            }
            3 => {
                own.kill9();
                tokio::time::sleep(Duration::from_millis(700)).await;
                own.start();
                wait_listening(&own.addr(), boot).await;
                "kill -9 broker, started again".into()
            }
            4 => {
                workers_proxy.stall(true);
                tokio::time::sleep(Duration::from_secs(8)).await;
                workers_proxy.stall(false);
                "workers cut off from the broker for 8 s".into()
            }
            5 => {
                producer_proxy.set_dropping(true);
                tokio::time::sleep(Duration::from_secs(10)).await;
                producer_proxy.set_dropping(false);
                "a third of the producer's confirms removed for 10 s".into()
            }
            6 => {
                signal(agg.pid(), "STOP");
                tokio::time::sleep(Duration::from_secs(5)).await;
                signal(agg.pid(), "CONT");
                "SIGSTOP aggregator for 5 s".into()
            }
            7 => {
                own.pause(true);
                tokio::time::sleep(Duration::from_secs(6)).await;
                own.pause(false);
                "SIGSTOP broker for 6 s".into()
            }
            8 => {
                sup.kill9();
                tokio::time::sleep(Duration::from_millis(500)).await;
                sup_restarts += 1;
                sup = supervisor(&format!("supervisor-{sup_restarts}"));
                "kill -9 supervisor, started again after 0.5 s".into()
            }
            9 => {
                signal(sup.pid(), "STOP");
                tokio::time::sleep(Duration::from_secs(5)).await;
                signal(sup.pid(), "CONT");
                "SIGSTOP supervisor for 5 s".into()
            }
            10 => {
                producer_proxy.stall(true);
                tokio::time::sleep(Duration::from_secs(8)).await;
                producer_proxy.stall(false);
                "producer cut off from the broker for 8 s".into()
            }
            _ => {
                aggregator_proxy.stall(true);
                tokio::time::sleep(Duration::from_secs(8)).await;
                aggregator_proxy.stall(false);
                "aggregator cut off from the broker for 8 s".into()
            }
        };
        println!("  {at:6.1} s: {what}");
        faults.push((at, what));
    }
    // Heal: every process runs, every link forwards, every confirm passes; stop publishing.
    workers_proxy.stall(false);
    aggregator_proxy.stall(false);
    producer_proxy.stall(false);
    producer_proxy.set_dropping(false);
    stop.cancel();
    let _ = workload.await;
    let p = std::mem::take(&mut *published.lock().expect("published"));
    // Each chain's last step and chord's callback must be recorded as much as a confirmed job.
    let mut must = p.confirmed.clone();
    must.extend(p.ends.iter().cloned());
    let v = history
        .verdict(http, &must, &p.maybe, Duration::from_secs(300))
        .await;
    println!(
        "nemesis on {url}, seed {seed}: {} faults in {secs} s; {} ids confirmed, {} maybe, {} \
         chain ends and chord callbacks, {} cancels; verdict {v:?}",
        faults.len(),
        p.confirmed.len(),
        p.maybe.len(),
        p.ends.len(),
        p.cancels
    );
    explain_lost(&v.lost, &p.at, &faults, dir);
    v.assert_clean("nemesis");
    // Cancelled jobs end `cancelled`, or `succeeded` if the request came too late; nothing fails.
    v.assert_statuses("nemesis", &["succeeded", "cancelled"]);
    assert!(!faults.is_empty() && !p.confirmed.is_empty());
    drop(sup);
}

/// For each lost id (the first 10): when it was published, the faults around then, and the log
/// lines of every process that name it.
fn explain_lost(
    lost: &[String],
    at: &std::collections::HashMap<String, f64>,
    faults: &[(f64, String)],
    dir: &Path,
) {
    if lost.is_empty() {
        return;
    }
    let logs: Vec<(String, String)> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                .map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    (name, std::fs::read_to_string(e.path()).unwrap_or_default())
                })
                .collect()
        })
        .unwrap_or_default();
    for id in lost.iter().take(10) {
        let when = at.get(id).copied().unwrap_or(f64::NAN);
        println!("lost {id}, published at {when:.1} s; faults within 20 s of it:");
        for (t, what) in faults.iter().filter(|(t, _)| (t - when).abs() <= 20.0) {
            println!("    {t:6.1} s: {what}");
        }
        for (name, text) in &logs {
            for line in text.lines().filter(|l| l.contains(id.as_str())) {
                println!("    {name}: {line}");
            }
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}

/// Publishes a random mix every 50 ms until `stop`, noting what the broker confirmed.
async fn workload(
    client: Client,
    published: Arc<Mutex<Published>>,
    stop: CancellationToken,
    seed: u64,
    started: Instant,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut n = 0u64;
    while !stop.is_cancelled() {
        n += 1;
        let pick = rng.random_range(0..100);
        let id = format!("n{seed:x}-{n}");
        let (specs, ends, later): (Vec<JobSpec>, Vec<String>, Vec<String>) = match pick {
            0..50 => (
                vec![JobSpec::new("echo", json!({"n": n})).id(&id)],
                vec![],
                vec![],
            ),
            50..70 => {
                let ms = rng.random_range(10..300);
                let spec = JobSpec::new("sleep", json!({"ms": ms})).id(&id);
                (vec![spec], vec![], vec![])
            }
            70..80 => {
                let chain = Chain::new(["echo", "echo", "echo"], json!({"n": n})).id(&id);
                let (_, first) = chain.first_step().expect("chain");
                let steps = vec![chain_step_id(&id, 1), chain_step_id(&id, 2)];
                (vec![first], vec![chain_step_id(&id, 2)], steps)
            }
            80..90 => {
                let mut group = Group::of("echo", (0..5).map(|i| json!(i)));
                group.id = Some(id.clone());
                let (_, specs) = group.specs(None).expect("group");
                (specs, vec![], vec![])
            }
            90..95 => {
                let mut group = Group::of("echo", (0..5).map(|i| json!(i)));
                group.id = Some(id.clone());
                let (g, specs) = Chord::new(group, "echo").specs(None).expect("chord");
                (specs, vec![callback_id(&g)], vec![])
            }
            _ => {
                let spec = JobSpec::new("sleep", json!({"ms": 3000})).id(&id);
                (vec![spec], vec![], vec![])
            }
        };
        let ids: Vec<String> = specs.iter().filter_map(|s| s.id.clone()).collect();
        let when = started.elapsed().as_secs_f64();
        let results = client.publish_many(specs, 8, |_| {}).await;
        let all_confirmed = results.iter().all(Result::is_ok);
        {
            let mut p = published.lock().expect("published");
            for (id, r) in ids.iter().zip(&results) {
                p.at.insert(id.clone(), when);
                match r {
                    Ok(_) => p.confirmed.push(id.clone()),
                    Err(_) => p.maybe.push(id.clone()),
                }
            }
            for id in later.iter().chain(&ends) {
                p.at.insert(id.clone(), when);
            }
            p.maybe.extend(later);
            if all_confirmed {
                p.ends.extend(ends);
            } else {
                p.maybe.extend(ends);
            }
        }
        if pick >= 95 && all_confirmed {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let req = conveyor::worker::cancel::CancelRequest::job(&id);
            if client.cancel(&req).await.is_ok() {
                published.lock().expect("published").cancels += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
