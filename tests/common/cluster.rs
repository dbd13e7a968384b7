//! A cluster of real processes on one namespace: workers, an aggregator, producer runs.

use super::{free_port, http_get, unique_ns, wait_listening, Broker, Proc};
use conveyor::{Client, JobSpec};
use serde_json::json;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The longest any wait of these tests takes.
pub const WAIT: Duration = Duration::from_secs(60);

pub struct Cluster {
    pub broker: Broker,
    pub url: String,
    pub ns: String,
    pub dir: tempfile::TempDir,
    pub http: SocketAddr,
}

impl Cluster {
    pub fn new(broker: Broker) -> Cluster {
        let url = broker.url().expose().to_string();
        Cluster {
            broker,
            url,
            ns: unique_ns("p"),
            dir: tempfile::tempdir().expect("tempdir"),
            http: format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
        }
    }

    pub fn logs(&self) -> &Path {
        self.dir.path()
    }

    pub fn worker(&self, name: &str, extra: &[&str]) -> Proc {
        self.worker_env(name, extra, &[])
    }

    /// A worker with extra environment variables (a fault point: `CONVEYOR_FAULT`).
    pub fn worker_env(&self, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut args = vec![
            "--broker",
            &self.url,
            "--namespace",
            &self.ns,
            "--lease",
            "2s",
            "--retry-base",
            "20ms",
            "--drain-timeout",
            "10s",
        ];
        args.extend_from_slice(extra);
        Proc::spawn_env(name, "conveyor-worker", &args, env, self.logs())
    }

    pub async fn aggregator(&self, name: &str) -> Proc {
        self.aggregator_env(name, &[]).await
    }

    /// An aggregator with extra environment variables (a fault point: `CONVEYOR_FAULT`).
    pub async fn aggregator_env(&self, name: &str, env: &[(&str, &str)]) -> Proc {
        self.aggregator_at(name, &self.url, env).await
    }

    /// An aggregator reaching the broker at `url` (through a fault proxy).
    pub async fn aggregator_at(&self, name: &str, url: &str, env: &[(&str, &str)]) -> Proc {
        let store = self.dir.path().join("store");
        let http = self.http.to_string();
        let p = Proc::spawn_env(
            name,
            "conveyor-aggregator",
            &[
                "--broker",
                url,
                "--namespace",
                &self.ns,
                "--store",
                store.to_str().expect("utf-8 path"),
                "--http",
                &http,
            ],
            env,
            self.logs(),
        );
        wait_listening(&http, Duration::from_secs(20)).await;
        p
    }

    /// Waits until the aggregator counts `n` live workers.
    pub async fn wait_workers(&self, n: u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (_, stats) = http_get(self.http, "/stats").await;
            if stats["workers"].as_u64() == Some(n) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{n} live workers: {stats}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn client(&self) -> Client {
        let url = conveyor::BrokerUrl::parse(&self.url).expect("url");
        Client::connect(&url, &self.ns).await.expect("client")
    }

    /// `conveyor-supervisor` running `workers` workers of this cluster with `worker_args`,
    /// restarting them quickly and without giving up.
    pub fn supervisor(&self, workers: &str, worker_args: &[&str]) -> Proc {
        let worker = super::bin("conveyor-worker");
        let worker = worker.to_str().expect("utf-8 path");
        let mut args = vec![
            "--workers",
            workers,
            "--restart-backoff",
            "50ms..1s",
            "--max-restarts",
            "1000",
            "--within",
            "60s",
            "--drain-timeout",
            "10s",
            "--",
            worker,
            "--broker",
            &self.url,
            "--namespace",
            &self.ns,
        ];
        args.extend_from_slice(worker_args);
        Proc::spawn("supervisor", "conveyor-supervisor", &args, self.logs())
    }

    pub fn producer(&self, args: &[&str], stdin: Option<&str>) -> std::process::Output {
        use std::io::Write;
        let mut cmd = Command::new(super::bin("conveyor-producer"));
        cmd.args(["--broker", &self.url, "--namespace", &self.ns])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .stdin(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("spawn producer");
        if let Some(mut input) = child.stdin.take() {
            if let Some(text) = stdin {
                input.write_all(text.as_bytes()).expect("stdin");
            }
        }
        super::output_within(child, Duration::from_secs(300), "conveyor-producer")
    }
}

pub fn builtin_kinds() -> Vec<String> {
    conveyor::worker::builtin::registry().kinds()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        super::delete_namespace(self.broker, &self.ns, &builtin_kinds());
    }
}

pub async fn publish_all(client: &Client, specs: Vec<JobSpec>) -> Vec<String> {
    client
        .publish_many(specs, 128, |_| {})
        .await
        .into_iter()
        .map(|r| r.expect("publish confirmed"))
        .collect()
}

/// Waits until every id in `ids` is recorded with `status` (other jobs may be recorded too).
pub async fn assert_all_recorded(http: SocketAddr, ids: &[String], status: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    for id in ids {
        loop {
            let (code, rec) = http_get(http, &format!("/jobs/{id}")).await;
            if code == 200 {
                assert_eq!(rec["status"], json!(status), "job {id}: {rec}");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {id} not recorded in time"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
