//! The real binaries as separate processes: kill -9 of workers and of the aggregator, `crash`
//! jobs, graceful drain on SIGTERM, and the producer's command line.

mod common;

use common::cluster::{assert_all_recorded, publish_all, Cluster, WAIT};
use common::{http_get, wait_for_results, wait_listening, Broker, Proc};
use conveyor::JobSpec;
use serde_json::json;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

both_brokers!(
    killed_worker_loses_no_job,
    crash_job_is_dead_lettered_after_its_attempts,
    killed_aggregator_records_every_job_once,
    sigterm_drains_and_hands_back,
    producer_cli_publishes_and_waits,
    supervised_workers_survive_crash_jobs,
    supervisor_up_runs_a_local_stack,
    heartbeats_report_live_and_gone_workers,
);

async fn killed_worker_loses_no_job(broker: Broker) {
    let c = Cluster::new(broker);
    let _agg = c.aggregator("aggregator").await;
    let mut first = c.worker("worker-a", &["--concurrency", "4"]);
    let client = c.client().await;
    let specs = (0..40)
        .map(|_| JobSpec::new("sleep", json!({"ms": 300})))
        .collect();
    let ids = publish_all(&client, specs).await;
    // Let the first worker take jobs, then kill it while it holds some.
    let stats = wait_for_results(c.http, 4, WAIT).await;
    assert!(
        stats["results"].as_u64().unwrap_or(0) >= 4,
        "first worker made progress: {stats}"
    );
    first.kill9();
    let done_before = common::stats(c.http).await["results"].as_u64().unwrap_or(0);
    assert!(
        done_before < 40,
        "the kill happened while jobs were left ({done_before} done)"
    );
    let _second = c.worker("worker-b", &["--concurrency", "8"]);
    assert_all_recorded(c.http, &ids, "succeeded").await;
    let stats = wait_for_results(c.http, 40, WAIT).await;
    assert_eq!(stats["results"], json!(40), "{stats}");
    println!("{broker:?}: worker killed after {done_before} of 40 jobs; all 40 recorded once");
}

async fn crash_job_is_dead_lettered_after_its_attempts(broker: Broker) {
    let c = Cluster::new(broker);
    let _agg = c.aggregator("aggregator").await;
    let client = c.client().await;
    let crash = publish_all(
        &client,
        vec![JobSpec::new("crash", json!({})).max_attempts(2)],
    )
    .await;
    let echoes = publish_all(
        &client,
        (0..20)
            .map(|i| JobSpec::new("echo", json!({"i": i})))
            .collect(),
    )
    .await;
    // Each worker that takes the crash job aborts; the job's attempts run out on the third delivery.
    for round in 0..2 {
        let mut w = c.worker(&format!("crashing-{round}"), &["--concurrency", "1"]);
        let code = w.wait_exit(WAIT).await;
        assert_eq!(
            code,
            None,
            "worker {round} was aborted by the crash job:\n{}",
            w.log_text()
        );
    }
    let _survivor = c.worker("survivor", &["--concurrency", "2"]);
    assert_all_recorded(c.http, &crash, "dead").await;
    let (_, rec) = http_get(c.http, &format!("/jobs/{}", crash[0])).await;
    assert!(
        rec["error"]
            .as_str()
            .unwrap_or_default()
            .contains("gave up after 2 attempts"),
        "{rec}"
    );
    let all: Vec<String> = crash.iter().chain(&echoes).cloned().collect();
    let stats = wait_for_results(c.http, all.len() as u64, WAIT).await;
    assert_eq!(
        stats["by_status"],
        json!({"dead": 1, "succeeded": 20}),
        "{stats}"
    );
}

async fn killed_aggregator_records_every_job_once(broker: Broker) {
    let c = Cluster::new(broker);
    let mut agg = c.aggregator("aggregator-1").await;
    let _w = c.worker("worker", &["--concurrency", "8"]);
    let client = c.client().await;
    let n = 3000;
    let specs: Vec<JobSpec> = (0..n)
        .map(|i| JobSpec::new("echo", json!({"i": i})))
        .collect();
    let publisher = {
        let client = client.clone();
        tokio::spawn(async move { publish_all(&client, specs).await })
    };
    let stats = wait_for_results(c.http, 300, WAIT).await;
    assert!(stats["results"].as_u64().unwrap_or(0) >= 300, "{stats}");
    agg.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut agg = c.aggregator("aggregator-2").await;
    let stats = wait_for_results(c.http, 1500, WAIT).await;
    assert!(stats["results"].as_u64().unwrap_or(0) >= 1500, "{stats}");
    agg.kill9();
    let _agg = c.aggregator("aggregator-3").await;
    let ids = publisher.await.expect("publisher");
    assert_all_recorded(c.http, &ids, "succeeded").await;
    let stats = wait_for_results(c.http, n as u64, WAIT).await;
    println!("{broker:?}: aggregator killed twice; {stats}");
    assert_eq!(stats["by_status"], json!({"succeeded": n}));
}

async fn sigterm_drains_and_hands_back(broker: Broker) {
    let c = Cluster::new(broker);
    let _agg = c.aggregator("aggregator").await;
    let mut w = c.worker("draining", &["--concurrency", "2"]);
    c.wait_workers(1).await;
    let client = c.client().await;
    let specs = (0..10)
        .map(|_| JobSpec::new("sleep", json!({"ms": 800})))
        .collect();
    let ids = publish_all(&client, specs).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    w.signal("TERM");
    let code = w.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(code, Some(0), "graceful exit:\n{}", w.log_text());
    let log = w.log_text();
    assert!(log.contains("no longer taking jobs"), "{log}");
    // The drained jobs' results may reach the aggregator after the worker exits.
    let finished = match common::results_within(c.http, 2, WAIT).await {
        Ok(stats) | Err(stats) => stats["results"].as_u64().unwrap_or(0),
    };
    assert!(
        (2..10).contains(&finished),
        "the running jobs finished, the rest were left: {finished}"
    );
    let _next = c.worker("next", &["--concurrency", "8"]);
    assert_all_recorded(c.http, &ids, "succeeded").await;
    let stats = wait_for_results(c.http, 10, WAIT).await;
    assert_eq!(stats["results"], json!(10), "{stats}");
}

async fn producer_cli_publishes_and_waits(broker: Broker) {
    let c = Cluster::new(broker);
    let _w = c.worker("worker", &[]);
    let out = c.producer(
        &[
            "publish",
            "echo",
            "--payload",
            r#"{"x":1}"#,
            "--id",
            "cli-1",
            "--wait",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(line["id"], json!("cli-1"));
    assert_eq!(line["output"], json!({"x": 1}));

    let out = c.producer(
        &[
            "publish",
            "hash",
            "--payload-file",
            "-",
            "--wait",
            "--codec",
            "bincode",
        ],
        Some("{\"data\":\"abc\",\"rounds\":1}\n\n{\"data\":\"abc\",\"rounds\":2}\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    assert!(stdout.contains("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));
    assert!(stdout.contains("4f8b42c22dd3729b519ba6f68d2da7cc5b2d606d05daed5ad5128cc03e6c6358"));

    let out = c.producer(
        &[
            "publish",
            "fail",
            "--payload",
            r#"{"times":-1}"#,
            "--max-attempts",
            "2",
            "--wait",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1), "a dead job makes --wait fail");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"status\":\"dead\""));

    let out = c.producer(
        &["publish", "echo", "--count", "50", "--payload", "{}"],
        None,
    );
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        50,
        "one id per line"
    );

    let out = c.producer(&["publish", "echo", "--payload", "{not json"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--payload is not valid JSON"));

    let out = Command::new(common::bin("conveyor-producer"))
        .args(["--broker", "redis://127.0.0.1:6379", "publish", "echo"])
        .output()
        .expect("producer");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unsupported broker URL scheme \"redis\"")
    );

    let out = Command::new(common::bin("conveyor-worker"))
        .args([
            "--broker",
            &c.url,
            "--namespace",
            &c.ns,
            "--kinds",
            "echo,nope",
        ])
        .output()
        .expect("worker");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown kind \"nope\" in --kinds"));
}

async fn supervised_workers_survive_crash_jobs(broker: Broker) {
    let c = Cluster::new(broker);
    let _agg = c.aggregator("aggregator").await;
    let client = c.client().await;
    let crashes = publish_all(
        &client,
        (0..2)
            .map(|_| JobSpec::new("crash", json!({})).max_attempts(2))
            .collect(),
    )
    .await;
    let echoes = publish_all(
        &client,
        (0..100)
            .map(|i| JobSpec::new("echo", json!({"i": i})))
            .collect(),
    )
    .await;
    let mut sup = c.supervisor("2", &["--lease", "2s", "--concurrency", "4"]);
    assert_all_recorded(c.http, &crashes, "dead").await;
    assert_all_recorded(c.http, &echoes, "succeeded").await;
    let stats = wait_for_results(c.http, 102, WAIT).await;
    assert_eq!(
        stats["by_status"],
        json!({"dead": 2, "succeeded": 100}),
        "{stats}"
    );
    sup.signal("TERM");
    assert_eq!(sup.wait_exit(Duration::from_secs(20)).await, Some(0));
    let log = sup.log_text();
    let restarts = log.matches("child restarted").count();
    assert!(
        restarts >= 2,
        "each crash job took down a worker that came back ({restarts}):\n{log}"
    );
    assert!(log.contains("killed by SIGABRT"), "{log}");
    println!("{broker:?}: 2 crash jobs dead, 100 echo jobs done, {restarts} restarts");
}

async fn supervisor_up_runs_a_local_stack(broker: Broker) {
    let c = Cluster::new(broker);
    let store = c.dir.path().join("up-store");
    let http = c.http.to_string();
    let mut up = Proc::spawn_env(
        "up",
        "conveyor-supervisor",
        &[
            "up",
            "--workers",
            "2",
            "--namespace",
            &c.ns,
            "--http",
            &http,
            "--store",
            store.to_str().expect("utf-8 path"),
            "--",
            "--concurrency",
            "4",
        ],
        &[("CONVEYOR_BROKER", c.url.as_str())],
        c.logs(),
    );
    wait_listening(&http, Duration::from_secs(20)).await;
    let client = c.client().await;
    let ids = publish_all(
        &client,
        (0..300)
            .map(|i| JobSpec::new("echo", json!({"i": i})))
            .collect(),
    )
    .await;
    assert_all_recorded(c.http, &ids, "succeeded").await;
    up.signal("TERM");
    assert_eq!(
        up.wait_exit(Duration::from_secs(30)).await,
        Some(0),
        "{}",
        up.log_text()
    );
    let log = up.log_text();
    for name in ["[aggregator]", "[worker-0]", "[worker-1]"] {
        assert!(
            log.contains(name),
            "{name} ran under the supervisor:\n{log}"
        );
    }
    assert!(
        !log.contains("guest:guest") || broker == Broker::Nats,
        "no password in the output"
    );
}

async fn live_workers(http: SocketAddr, want: u64) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (_, stats) = http_get(http, "/stats").await;
        if stats["workers"].as_u64() == Some(want) {
            return stats;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "expected {want} live workers: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn heartbeats_report_live_and_gone_workers(broker: Broker) {
    let c = Cluster::new(broker);
    let _agg = c.aggregator("aggregator").await;
    let mut a = c.worker(
        "worker-a",
        &["--heartbeat", "300ms", "--kinds", "echo,sleep"],
    );
    let mut b = c.worker("worker-b", &["--heartbeat", "300ms"]);
    live_workers(c.http, 2).await;
    let out = c.producer(&["workers", "--listen", "1s"], None);
    assert!(out.status.success());
    let listed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(listed.lines().count(), 2, "{listed}");
    for (p, kinds) in [(&a, json!(["echo", "sleep"])), (&b, json!([]))] {
        let line = listed
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line"))
            .find(|v| v["pid"] == json!(p.pid()))
            .unwrap_or_else(|| panic!("worker {} listed: {listed}", p.pid()));
        assert_eq!(line["kinds"], kinds);
        assert_eq!(line["alive"], json!(true));
        assert_eq!(
            line["concurrency"],
            json!(conveyor::worker::default_concurrency())
        );
    }
    a.kill9();
    live_workers(c.http, 1).await;
    let (_, workers) = http_get(c.http, "/workers").await;
    let gone = workers["workers"]
        .as_array()
        .expect("list")
        .iter()
        .find(|w| w["pid"] == json!(a.pid()))
        .cloned()
        .expect("the killed worker is still listed");
    assert_eq!(gone["alive"], json!(false), "{workers}");
    b.signal("TERM");
    assert_eq!(b.wait_exit(Duration::from_secs(20)).await, Some(0));
    live_workers(c.http, 0).await;
}
