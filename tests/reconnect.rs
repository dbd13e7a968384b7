//! Broker restarts: worker, aggregator and producer carry on without being restarted, and every
//! confirmed job is recorded once. NATS only for now, on a nats-server of the test's own (on a
//! spare loopback port), so the shared broker other tests use is never disturbed.

mod common;

use common::{free_port, http_get, wait_for_results, wait_listening, Proc};
use conveyor::{BrokerUrl, Client, JobSpec};
use serde_json::json;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn nats_server(port: u16, store: &Path) -> Child {
    let server = Path::new("/usr/sbin/nats-server");
    let server = if server.exists() {
        server.to_path_buf()
    } else {
        "nats-server".into()
    };
    Command::new(server)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js"])
        .arg("-sd")
        .arg(store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server is installed (it runs the local broker too)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarts_twice_during_a_run() {
    common::ensure_up(common::Broker::Nats);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let url = format!("nats://{addr}");
    let store = dir.path().join("js");
    let mut server = nats_server(port, &store);
    wait_listening(&addr, Duration::from_secs(10)).await;
    let http: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let agg_store = dir.path().join("agg");
    let _agg = Proc::spawn(
        "aggregator",
        "conveyor-aggregator",
        &[
            "--broker",
            &url,
            "--namespace",
            "restart",
            "--http",
            &http.to_string(),
            "--store",
            agg_store.to_str().expect("utf-8"),
        ],
        dir.path(),
    );
    let _worker = Proc::spawn(
        "worker",
        "conveyor-worker",
        &["--broker", &url, "--namespace", "restart", "--lease", "2s"],
        dir.path(),
    );
    wait_listening(&http.to_string(), Duration::from_secs(20)).await;
    let client = Client::connect(&BrokerUrl::parse(&url).expect("url"), "restart")
        .await
        .expect("client");
    let n = 3000;
    let publisher = {
        let client = client.clone();
        tokio::spawn(async move {
            let specs = (0..n)
                .map(|i| JobSpec::new("sleep", json!({"ms": i % 3})))
                .collect();
            client.publish_many(specs, 16, |_| {}).await
        })
    };
    for round in 0..2 {
        let before = wait_for_results(http, 400 * (round + 1), Duration::from_secs(60)).await;
        assert!(
            before["results"].as_u64().unwrap_or(0) >= 400 * (round + 1),
            "{before}"
        );
        let _ = server.kill();
        let _ = server.wait();
        tokio::time::sleep(Duration::from_millis(700)).await;
        server = nats_server(port, &store);
        wait_listening(&addr, Duration::from_secs(10)).await;
    }
    let published = publisher.await.expect("publisher");
    let ids: Vec<String> = published.into_iter().filter_map(Result::ok).collect();
    let stats = wait_for_results(http, ids.len() as u64, Duration::from_secs(90)).await;
    println!(
        "NATS restarted twice: {} of {n} publishes confirmed; {stats}",
        ids.len()
    );
    // Every confirmed job is recorded, once (results count distinct ids); a publish that was not
    // confirmed may or may not have been stored, never twice.
    let results = stats["results"].as_u64().unwrap_or(0);
    assert!((ids.len() as u64..=n as u64).contains(&results), "{stats}");
    assert_eq!(stats["by_status"]["succeeded"], json!(results), "{stats}");
    for id in &ids {
        let (code, rec) = http_get(http, &format!("/jobs/{id}")).await;
        assert_eq!(
            (code, rec["status"].clone()),
            (200, json!("succeeded")),
            "{id}"
        );
    }
    let _ = server.kill();
    let _ = server.wait();
}
