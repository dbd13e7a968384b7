//! Broker restarts: worker, aggregator and producer carry on without being restarted, and every
//! confirmed job is recorded once. Each broker is one of the test's own (a nats-server, a
//! RabbitMQ node, on spare loopback ports), killed with `kill -9` and started again twice during
//! a 10,000-job run, so the shared brokers other tests use are never disturbed.

mod common;

use common::own_broker::OwnBroker;
use common::own_nats::OwnNats;
use common::own_rabbit::OwnRabbit;
use common::{free_port, http_get, results_within, wait_for_results, wait_listening, Proc};
use conveyor::{BrokerUrl, Client, JobSpec};
use serde_json::json;
use std::path::Path;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarts_twice_during_a_run() {
    common::ensure_up(common::Broker::Nats);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nats = OwnNats::new(dir.path().join("js"));
    restarts_twice_during_a_run(&mut nats, dir.path(), Duration::from_secs(10)).await;
    nats.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_restarts_twice_during_a_run() {
    common::ensure_up(common::Broker::Amqp);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rabbit = OwnRabbit::new(dir.path().join("rabbit"));
    restarts_twice_during_a_run(&mut rabbit, dir.path(), Duration::from_secs(90)).await;
    rabbit.kill9();
}

/// The aggregator of namespace `ns` on `url`, serving `http`, its store in `store`, its log in
/// `dir`.
fn aggregator(url: &str, ns: &str, http: std::net::SocketAddr, store: &Path, dir: &Path) -> Proc {
    Proc::spawn(
        "aggregator",
        "conveyor-aggregator",
        &[
            "--broker",
            url,
            "--namespace",
            ns,
            "--http",
            &http.to_string(),
            "--store",
            store.to_str().expect("utf-8"),
        ],
        dir,
    )
}

async fn restarts_twice_during_a_run(broker: &mut dyn OwnBroker, dir: &Path, boot: Duration) {
    let addr = broker.addr();
    let url = broker.url();
    broker.start();
    wait_listening(&addr, boot).await;
    let http: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let agg_store = dir.join("agg");
    let _agg = aggregator(&url, "restart", http, &agg_store, dir);
    let _worker = Proc::spawn(
        "worker",
        "conveyor-worker",
        &["--broker", &url, "--namespace", "restart", "--lease", "2s"],
        dir,
    );
    wait_listening(&http.to_string(), Duration::from_secs(20)).await;
    let client = Client::connect(&BrokerUrl::parse(&url).expect("url"), "restart")
        .await
        .expect("client");
    let n = 10_000u64;
    let publisher = {
        let client = client.clone();
        tokio::spawn(async move {
            let specs = (0..n)
                .map(|i| JobSpec::new("sleep", json!({"ms": i % 3})))
                .collect();
            client.publish_many(specs, 16, |_| {}).await
        })
    };
    let started = std::time::Instant::now();
    for threshold in [1_500, 4_000] {
        if let Err(before) = results_within(http, threshold, Duration::from_secs(120)).await {
            panic!(
                "{before}\n{}",
                std::fs::read_to_string(dir.join("worker.log")).unwrap_or_default()
            );
        }
        broker.kill9();
        tokio::time::sleep(Duration::from_millis(700)).await;
        broker.start();
        wait_listening(&addr, boot).await;
    }
    let published = publisher.await.expect("publisher");
    let ids: Vec<String> = published.into_iter().filter_map(Result::ok).collect();
    let stats = results_within(http, ids.len() as u64, Duration::from_secs(180))
        .await
        .unwrap_or_else(|last| last);
    println!(
        "{url}: restarted twice (kill -9) in {:.1} s; {} of {n} publishes confirmed; {stats}",
        started.elapsed().as_secs_f64(),
        ids.len()
    );
    // Every confirmed job is recorded, once (results count distinct ids); a publish that was not
    // confirmed may or may not have been stored, never twice.
    let results = stats["results"].as_u64().unwrap_or(0);
    let log_tail = |name: &str| {
        let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };
    assert!(
        (ids.len() as u64..=n).contains(&results),
        "{stats}\nworker log, last lines:\n{}\naggregator log, last lines:\n{}",
        log_tail("worker"),
        log_tail("aggregator")
    );
    assert_eq!(stats["by_status"]["succeeded"], json!(results), "{stats}");
    // The aggregator hears the worker's heartbeats again after the restarts.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, s) = http_get(http, "/stats").await;
        if s["workers"] == json!(1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the worker is not live in /stats after the restarts: {s}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for id in &ids {
        let (code, rec) = http_get(http, &format!("/jobs/{id}")).await;
        assert_eq!(
            (code, rec["status"].clone()),
            (200, json!("succeeded")),
            "{id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_stopped_for_two_ping_intervals() {
    common::ensure_up(common::Broker::Nats);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nats = OwnNats::new(dir.path().join("js"));
    let url = format!("{}?ping_interval=5s", nats.url());
    zombie(&mut nats, &url, dir.path(), Duration::from_secs(10)).await;
    nats.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_stopped_for_two_heartbeats() {
    common::ensure_up(common::Broker::Amqp);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rabbit = OwnRabbit::new(dir.path().join("rabbit"));
    let url = format!("{}?heartbeat=5", OwnBroker::url(&rabbit));
    zombie(&mut rabbit, &url, dir.path(), Duration::from_secs(90)).await;
    rabbit.kill9();
}

/// A zombie broker: stopped with SIGSTOP for twice its clients' ping (NATS) or heartbeat
/// (RabbitMQ) interval of 5 s, while a worker, the aggregator and a producer use it, then
/// resumed. The worker notices within the stop (a result's confirm times out after 5 s and the
/// publish is retried, with the same id), every client recovers
/// without a restart, and every job confirmed before, during (a publish waits and retries) and
/// after the stop is recorded once.
async fn zombie(broker: &mut dyn OwnBroker, url: &str, dir: &Path, boot: Duration) {
    use common::checker::History;
    let addr = broker.addr();
    broker.start();
    wait_listening(&addr, boot).await;
    let http: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let store = dir.join("agg");
    let _agg = aggregator(url, "zombie", http, &store, dir);
    let worker = Proc::spawn(
        "worker",
        "conveyor-worker",
        &[
            "--broker",
            url,
            "--namespace",
            "zombie",
            "--kinds",
            "sleep",
            "--lease",
            "3s",
        ],
        dir,
    );
    wait_listening(&http.to_string(), Duration::from_secs(20)).await;
    let client = Client::connect(&BrokerUrl::parse(url).expect("url"), "zombie")
        .await
        .expect("client");
    // A durable reader: an auto-deleted one could miss what comes while its client reconnects.
    let history = History::observe_durably(&client).await;
    let job = || JobSpec::new("sleep", json!({"ms": 20}));
    let mut ids: Vec<String> = client
        .publish_many((0..200).map(|_| job()).collect(), 16, |_| {})
        .await
        .into_iter()
        .map(|r| r.expect("confirmed before the stop"))
        .collect();
    if let Err(before) = results_within(http, 20, Duration::from_secs(60)).await {
        panic!("{before}");
    }
    let stop = Duration::from_secs(10);
    broker.pause(true);
    let stopped_at = std::time::Instant::now();
    // Published while the broker is stopped: each waits for its confirm and retries.
    let during_ids: Vec<String> = (0..20).map(|i| format!("during-{i}")).collect();
    let during = {
        let client = client.clone();
        let specs = during_ids.iter().map(|id| job().id(id)).collect();
        tokio::spawn(async move { client.publish_many(specs, 4, |_| {}).await })
    };
    tokio::time::sleep(stop).await;
    let noticed_in_stop = worker.log_text().contains("failed, retrying");
    broker.pause(false);
    let resumed_at = stopped_at.elapsed();
    let (mut confirmed, mut maybe) = (0, Vec::new());
    for (id, r) in during_ids.iter().zip(during.await.expect("publisher")) {
        match r {
            Ok(_) => {
                confirmed += 1;
                ids.push(id.clone());
            }
            Err(_) => maybe.push(id.clone()),
        }
    }
    ids.extend(
        client
            .publish_many((0..200).map(|_| job()).collect(), 16, |_| {})
            .await
            .into_iter()
            .map(|r| r.expect("confirmed after the stop")),
    );
    let v = history
        .verdict(http, &ids, &maybe, Duration::from_secs(120))
        .await;
    println!(
        "{url}: stopped for {resumed_at:?}; the worker noticed during it: {noticed_in_stop}; \
         {confirmed} of 20 publishes made during it confirmed ({} not: {maybe:?})",
        maybe.len()
    );
    v.assert_clean("a zombie broker");
    v.assert_statuses("a zombie broker", &["succeeded"]);
    assert!(
        noticed_in_stop,
        "the worker noticed the stopped broker within {stop:?} (a publish timed out and is \
         retried):\n{}",
        worker.log_text()
    );
    assert!(
        maybe.is_empty(),
        "publishes made during the stop were confirmed after it"
    );
    assert_eq!(v.recorded, 420);
}

/// RabbitMQ restarted (kill -9) under a backlog of 3,000 jobs: after it, while the worker
/// re-subscribes and the broker redelivers, no channel ever holds more unacknowledged deliveries
/// than its prefetch, nor holds any without one (sampled with `rabbitmqctl list_channels` every
/// 300 ms for 10 s), so the
/// recovery is no redelivery storm; every job is recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_unacked_stays_within_prefetch_after_a_restart() {
    common::ensure_up(common::Broker::Amqp);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rabbit = OwnRabbit::new(dir.path().join("rabbit"));
    let boot = Duration::from_secs(90);
    let addr = OwnBroker::addr(&rabbit);
    let url = OwnBroker::url(&rabbit);
    OwnBroker::start(&mut rabbit);
    wait_listening(&addr, boot).await;
    let http: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let store = dir.path().join("agg");
    let _agg = aggregator(&url, "storm", http, &store, dir.path());
    let _worker = Proc::spawn(
        "worker",
        "conveyor-worker",
        &[
            "--broker",
            &url,
            "--namespace",
            "storm",
            "--kinds",
            "sleep",
            "--concurrency",
            "4",
        ],
        dir.path(),
    );
    wait_listening(&http.to_string(), Duration::from_secs(20)).await;
    let client = Client::connect(&BrokerUrl::parse(&url).expect("url"), "storm")
        .await
        .expect("client");
    let n = 3_000u64;
    let specs = (0..n)
        .map(|_| JobSpec::new("sleep", json!({"ms": 5})))
        .collect();
    let ids: Vec<String> = client
        .publish_many(specs, 64, |_| {})
        .await
        .into_iter()
        .filter_map(Result::ok)
        .collect();
    assert_eq!(
        ids.len() as u64,
        n,
        "every publish confirmed before the restart"
    );
    if let Err(before) = results_within(http, 300, Duration::from_secs(60)).await {
        panic!("{before}");
    }
    OwnBroker::kill9(&mut rabbit);
    tokio::time::sleep(Duration::from_millis(700)).await;
    OwnBroker::start(&mut rabbit);
    wait_listening(&addr, boot).await;
    // Samples of (channel, prefetch, unacked) while the clients come back.
    let mut worst: Vec<String> = Vec::new();
    let mut samples = 0;
    let mut most = 0u64;
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < until {
        if let Some(out) = rabbit.ctl(&[
            "list_channels",
            "name",
            "prefetch_count",
            "messages_unacknowledged",
        ]) {
            samples += 1;
            for line in out.lines() {
                let cols: Vec<&str> = line.split('\t').collect();
                let [.., prefetch, unacked] = cols[..] else {
                    continue;
                };
                let (Ok(prefetch), Ok(unacked)) = (prefetch.parse::<u64>(), unacked.parse::<u64>())
                else {
                    continue;
                };
                most = most.max(unacked);
                // A consuming channel without a prefetch (0: unlimited) is a storm waiting.
                if unacked > prefetch || (prefetch == 0 && unacked > 0) {
                    worst.push(line.to_string());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let stats = results_within(http, n, Duration::from_secs(120))
        .await
        .unwrap_or_else(|last| last);
    println!(
        "{url}: {samples} samples after the restart, at most {most} unacked on a channel; {stats}"
    );
    assert!(samples >= 2, "rabbitmqctl answered during the recovery");
    assert!(
        most > 0,
        "the worker consumed again within the sampled 10 s (else nothing was checked)"
    );
    assert!(worst.is_empty(), "channels over their prefetch: {worst:?}");
    assert_eq!(stats["results"], json!(n), "{stats}");
    OwnBroker::kill9(&mut rabbit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_cluster_cap_holds_across_a_broker_restart() {
    common::ensure_up(common::Broker::Nats);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nats = OwnNats::new(dir.path().join("js"));
    cluster_cap_holds_across_a_restart(&mut nats, dir.path(), Duration::from_secs(10)).await;
    nats.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_cluster_cap_holds_across_a_broker_restart() {
    common::ensure_up(common::Broker::Amqp);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rabbit = OwnRabbit::new(dir.path().join("rabbit"));
    cluster_cap_holds_across_a_restart(&mut rabbit, dir.path(), Duration::from_secs(90)).await;
    rabbit.kill9();
}

/// `--cluster-max-concurrent sleep=2` over two workers that could run 8 at once: after a
/// `kill -9` and restart of the broker, the cap neither stalls the kind nor lets every job
/// through. Eight 2 s jobs take about 8 s under the cap, about 2 s without it. The same workers'
/// `--rate hash=10/s` holds too: 30 jobs take about 3 s, neither stalled nor at once.
async fn cluster_cap_holds_across_a_restart(
    broker: &mut dyn OwnBroker,
    dir: &Path,
    boot: Duration,
) {
    let addr = broker.addr();
    let url = broker.url();
    broker.start();
    wait_listening(&addr, boot).await;
    let http: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let agg_store = dir.join("agg");
    let _agg = aggregator(&url, "cap", http, &agg_store, dir);
    let worker_args = [
        "--broker",
        &url,
        "--namespace",
        "cap",
        "--lease",
        "2s",
        "--kinds",
        "sleep,hash",
        "--concurrency",
        "4",
        "--cluster-max-concurrent",
        "sleep=2",
        "--rate",
        "hash=10/s",
    ];
    let _workers: Vec<Proc> = (0..2)
        .map(|i| Proc::spawn(&format!("worker-{i}"), "conveyor-worker", &worker_args, dir))
        .collect();
    wait_listening(&http.to_string(), Duration::from_secs(20)).await;
    let live = |want: u64| async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (_, s) = http_get(http, "/stats").await;
            if s["workers"].as_u64() == Some(want) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{want} workers not live: {s}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    live(2).await;
    let client = Client::connect(&BrokerUrl::parse(&url).expect("url"), "cap")
        .await
        .expect("client");
    let batch = || {
        (0..8)
            .map(|_| JobSpec::new("sleep", json!({"ms": 2000})))
            .collect::<Vec<_>>()
    };
    let first = client.publish_many(batch(), 8, |_| {}).await;
    assert!(first.iter().all(Result::is_ok), "{first:?}");
    let got = wait_for_results(http, 2, Duration::from_secs(60)).await;
    assert!(got["results"].as_u64().unwrap_or(0) >= 2, "{got}");
    broker.kill9();
    tokio::time::sleep(Duration::from_millis(700)).await;
    broker.start();
    wait_listening(&addr, boot).await;
    // Everything from before the restart recorded, and the workers back, before the timed batch.
    if let Err(stats) = results_within(http, 8, Duration::from_secs(120)).await {
        let log = std::fs::read_to_string(dir.join("worker-0.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        panic!(
            "the jobs from before the restart were not all recorded: {stats}\nworker-0, last lines:\n{}",
            lines[lines.len().saturating_sub(40)..].join("\n")
        );
    }
    live(2).await;
    let started = std::time::Instant::now();
    let second = client.publish_many(batch(), 8, |_| {}).await;
    assert!(second.iter().all(Result::is_ok), "{second:?}");
    let done = results_within(http, 16, Duration::from_secs(90))
        .await
        .unwrap_or_else(|last| last);
    let took = started.elapsed();
    println!("{url}: eight 2 s jobs under a cap of 2 after a broker restart took {took:?}; {done}");
    assert!(
        done["results"].as_u64().unwrap_or(0) >= 16,
        "the capped kind stalled after the restart: {done}\n{}",
        std::fs::read_to_string(dir.join("worker-0.log")).unwrap_or_default()
    );
    assert!(
        took >= Duration::from_secs(5),
        "eight 2 s jobs done in {took:?}: more than 2 ran at once after the restart"
    );
    // The global rate's tokens came through the restart too: 30 jobs at 10/s neither stall nor
    // run at once.
    let started = std::time::Instant::now();
    let hashes = (0..30)
        .map(|i| JobSpec::new("hash", json!({"data": format!("{i}"), "rounds": 1})))
        .collect::<Vec<_>>();
    let third = client.publish_many(hashes, 8, |_| {}).await;
    assert!(third.iter().all(Result::is_ok), "{third:?}");
    let done = results_within(http, 46, Duration::from_secs(60))
        .await
        .unwrap_or_else(|last| last);
    let took = started.elapsed();
    println!("{url}: 30 jobs at --rate hash=10/s after the restart took {took:?}; {done}");
    assert!(
        done["results"].as_u64().unwrap_or(0) >= 46,
        "the rate-limited kind stalled after the restart: {done}\n{}",
        std::fs::read_to_string(dir.join("worker-0.log")).unwrap_or_default()
    );
    assert!(
        took >= Duration::from_secs(2),
        "30 jobs at 10/s done in {took:?}: the rate did not hold after the restart"
    );
}
