//! Shared test harness: real brokers, unique namespaces, in-process stacks and real processes.
#![allow(dead_code)]

pub mod checker;
pub mod cluster;
pub mod own_broker;
pub mod own_nats;
pub mod own_rabbit;
pub mod pg;
pub mod proxy;

use conveyor::aggregator::{self, AggregatorConfig};
use conveyor::transport::{self, ConsumeOptions, Source, Transport};
use conveyor::worker::{self, backoff::Backoff, builtin, WorkerConfig};
use conveyor::{BrokerUrl, Client, Message};
use futures::StreamExt;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The two brokers every integration test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    Nats,
    Amqp,
}

impl Broker {
    pub fn url_str(self) -> String {
        match self {
            Broker::Nats => std::env::var("CONVEYOR_TEST_NATS")
                .unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
            Broker::Amqp => std::env::var("CONVEYOR_TEST_AMQP")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
        }
    }

    pub fn url(self) -> BrokerUrl {
        ensure_up(self);
        BrokerUrl::parse(&self.url_str()).expect("test broker URL parses")
    }
}

/// Fails with instructions when a broker is not reachable: tests never skip silently.
pub fn ensure_up(broker: Broker) {
    let (addr, how) = match broker {
        Broker::Nats => (
            "127.0.0.1:4222",
            "start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server",
        ),
        Broker::Amqp => ("127.0.0.1:5672", "rabbitmq-server -detached"),
    };
    let parsed: SocketAddr = addr.parse().expect("address");
    if std::net::TcpStream::connect_timeout(&parsed, Duration::from_secs(2)).is_err() {
        panic!("{broker:?} is not reachable on {addr}. Start it with `{how}` (or run scripts/test.sh, which does).");
    }
}

/// A namespace no other test uses.
pub fn unique_ns(prefix: &str) -> String {
    let id = conveyor::job::new_id().replace('-', "");
    format!("t{prefix}{}", &id[id.len() - 12..])
}

/// Deletes a test namespace from the broker (on a thread of its own, so `Drop` can call it,
/// also when a test failed): tests must not leave queues and streams behind.
pub fn delete_namespace(broker: Broker, ns: &str, kinds: &[String]) {
    let ns = ns.to_string();
    let kinds = kinds.to_vec();
    let joined = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let url = BrokerUrl::parse(&broker.url_str()).expect("url");
            let t =
                tokio::time::timeout(Duration::from_secs(10), transport::connect(&url, &ns)).await;
            if let Ok(Ok(t)) = t {
                if let Err(e) = t.delete_namespace(&kinds).await {
                    eprintln!("could not delete test namespace {ns}: {e}");
                }
                let _ = t.close().await;
            }
        })
    })
    .join();
    if joined.is_err() {
        eprintln!("namespace clean-up panicked");
    }
}

/// Worker settings for tests: quick retries, short lease.
pub fn test_worker_config() -> WorkerConfig {
    WorkerConfig {
        concurrency: 8,
        lease: Duration::from_secs(3),
        // Often, so that a test's stack sees its worker soon after it starts.
        heartbeat: Duration::from_millis(500),
        drain_timeout: Duration::from_secs(5),
        backoff: Backoff {
            base: Duration::from_millis(20),
            max: Duration::from_millis(200),
        },
        ..WorkerConfig::default()
    }
}

/// Worker and aggregator in this process, on one namespace, plus a client.
pub struct Stack {
    pub broker: Broker,
    pub ns: String,
    pub kinds: Vec<String>,
    pub client: Client,
    pub http: SocketAddr,
    pub store: tempfile::TempDir,
    stop: CancellationToken,
    worker: JoinHandle<conveyor::Result<worker::WorkerReport>>,
    aggregator: JoinHandle<conveyor::Result<()>>,
}

/// An aggregator of namespace `ns` in this process, with its store in `store`, until `stop`;
/// returns its task and HTTP address once it listens.
pub async fn spawn_aggregator(
    url: &BrokerUrl,
    ns: &str,
    store: &Path,
    stop: CancellationToken,
) -> (JoinHandle<conveyor::Result<()>>, SocketAddr) {
    let at = transport::connect(url, ns)
        .await
        .expect("aggregator connects");
    let (tx, rx) = tokio::sync::oneshot::channel();
    let aggregator = tokio::spawn(aggregator::run(
        at,
        AggregatorConfig {
            store_dir: store.to_path_buf(),
            http: "127.0.0.1:0".parse().expect("addr"),
            store_cache_bytes: aggregator::store::DEFAULT_CACHE_BYTES,
        },
        stop,
        Some(tx),
    ));
    let http = tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("aggregator ready in time")
        .expect("aggregator reports its address");
    (aggregator, http)
}

impl Stack {
    pub async fn start(broker: Broker, config: WorkerConfig) -> Stack {
        Self::start_with(broker, config, builtin::registry()).await
    }

    pub async fn start_with(
        broker: Broker,
        config: WorkerConfig,
        registry: worker::Registry,
    ) -> Stack {
        let url = broker.url();
        let ns = unique_ns(match broker {
            Broker::Nats => "n",
            Broker::Amqp => "a",
        });
        let stop = CancellationToken::new();
        let kinds = registry.kinds();
        let wt = transport::connect(&url, &ns)
            .await
            .expect("worker connects");
        let worker = tokio::spawn(worker::run(
            wt,
            registry,
            config,
            stop.clone(),
            CancellationToken::new(),
        ));
        let store = tempfile::tempdir().expect("tempdir");
        let (aggregator, http) = spawn_aggregator(&url, &ns, store.path(), stop.clone()).await;
        let client = Client::connect(&url, &ns).await.expect("client connects");
        // A worker beats once its queues are declared: until then, on RabbitMQ, a job of its
        // kinds would go to the unrouted queue, which only a catch-all worker reads.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (_, stats) = http_get(http, "/stats").await;
            if stats["workers"].as_u64().unwrap_or(0) >= 1 {
                break;
            }
            assert!(
                !worker.is_finished(),
                "the test worker stopped before it beat"
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "the test worker did not beat within 30 s: {stats}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Stack {
            broker,
            ns,
            kinds,
            client,
            http,
            store,
            stop,
            worker,
            aggregator,
        }
    }

    pub async fn stop(mut self) -> worker::WorkerReport {
        self.stop.cancel();
        let report = tokio::time::timeout(Duration::from_secs(20), &mut self.worker)
            .await
            .expect("worker stops in time")
            .expect("worker task")
            .expect("worker ran");
        tokio::time::timeout(Duration::from_secs(20), &mut self.aggregator)
            .await
            .expect("aggregator stops in time")
            .expect("aggregator task")
            .expect("aggregator ran");
        report
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop.cancel();
        delete_namespace(self.broker, &self.ns, &self.kinds);
    }
}

/// GET `path` from an HTTP server: (status, JSON body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, Value) {
    http_send(addr, "GET", path, None).await
}

/// `method` (GET, PUT, POST or DELETE) on the aggregator's `path`, with `body` as JSON: the
/// status and the JSON answer (null when there is none).
pub async fn http_send(
    addr: SocketAddr,
    method: &'static str,
    path: &str,
    body: Option<&str>,
) -> (u16, Value) {
    let url = format!("http://{addr}{path}");
    let body = body.unwrap_or_default().to_string();
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(15)))
            .build()
            .into();
        let json = "application/json";
        let sent = match method {
            "GET" => agent.get(&url).call(),
            "DELETE" => agent.delete(&url).call(),
            "PUT" => agent.put(&url).content_type(json).send(body.as_bytes()),
            "POST" => agent.post(&url).content_type(json).send(body.as_bytes()),
            other => panic!("http_send: no method {other}"),
        };
        let mut resp = sent.expect("HTTP request");
        let status = resp.status().as_u16();
        let body = resp.body_mut().read_to_string().expect("HTTP body");
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    })
    .await
    .expect("http task")
}

/// The aggregator's `/stats` now.
pub async fn stats(http: SocketAddr) -> Value {
    http_get(http, "/stats").await.1
}

/// Polls `/stats` until `results` reaches `n`: `Ok(stats)`, or `Err(last stats)` once `timeout`
/// passed (for callers that show more, such as logs, before they fail).
pub async fn results_within(http: SocketAddr, n: u64, timeout: Duration) -> Result<Value, Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let stats = stats(http).await;
        if stats["results"].as_u64().unwrap_or(0) >= n {
            return Ok(stats);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(stats);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `/stats` until `results` reaches `n`; fails the test, with the last stats, when
/// `timeout` passes first.
pub async fn wait_for_results(http: SocketAddr, n: u64, timeout: Duration) -> Value {
    match results_within(http, n, timeout).await {
        Ok(stats) => stats,
        Err(stats) => panic!("{n} results not recorded within {timeout:?}: {stats}"),
    }
}

/// Reads dead letters of namespace `ns` until `n` arrived or `timeout` passed.
pub async fn read_dead_letters(
    broker: Broker,
    ns: &str,
    n: usize,
    timeout: Duration,
) -> Vec<Message> {
    let t: Arc<dyn Transport> = transport::connect(&broker.url(), ns)
        .await
        .expect("connect");
    let mut stream = t
        .consume(Source::Dead("dead".into()), ConsumeOptions::default())
        .await
        .expect("consume dead letters");
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while out.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, stream.next()).await {
            Ok(Some(Ok(d))) => {
                out.push(d.message.clone());
                d.ack().await.expect("ack dead letter");
            }
            Ok(Some(Err(_))) => continue,
            _ => break,
        }
    }
    out
}

/// Path of a workspace binary (built by `cargo build --workspace` before the tests).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile> directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first with `cargo build --workspace` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A child process whose output goes to a log file; killed (SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, bin_name: &str, args: &[&str], logs: &Path) -> Proc {
        Self::spawn_env(name, bin_name, args, &[], logs)
    }

    /// Like [`Proc::spawn`], with extra environment variables.
    pub fn spawn_env(
        name: &str,
        bin_name: &str,
        args: &[&str],
        env: &[(&str, &str)],
        logs: &Path,
    ) -> Proc {
        let log = logs.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let err = file.try_clone().expect("log file clone");
        let child = Command::new(bin(bin_name))
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .expect("spawn process");
        Proc {
            child,
            log,
            name: name.to_string(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still running.
    pub fn try_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (e.g. "TERM") with the `kill` command.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill command");
        assert!(status.success(), "kill -{signal} {}", self.pid());
    }

    /// Waits for exit up to `timeout`; returns the exit code (None if killed by a signal).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} did not exit within {timeout:?}; log:\n{}",
                self.name,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits until `addr` accepts TCP connections.
pub async fn wait_listening(addr: &str, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{addr} not listening after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Generates one test per broker from `async fn body(broker: Broker)`.
#[macro_export]
macro_rules! both_brokers {
    ($($name:ident),* $(,)?) => {
        mod nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Broker::Nats).await
                }
            )*
        }
        mod amqp {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Broker::Amqp).await
                }
            )*
        }
    };
}

/// Runs binary `name` with `args` to its end, killed with SIGTERM after `timeout_s` seconds,
/// with `RUST_LOG` set to `log`.
pub fn run_bin(name: &str, args: &[&str], timeout_s: u32, log: &str) -> std::process::Output {
    Command::new("timeout")
        .args(["-s", "TERM", &timeout_s.to_string()])
        .arg(bin(name))
        .args(args)
        .env("RUST_LOG", log)
        .stdin(Stdio::null())
        .output()
        .expect("run binary")
}

/// A finished process's stdout and stderr, as text.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The children of process `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-P", &pid.to_string()])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Bounds a blocking wait on a child process: after `timeout` the child is killed (SIGKILL), so
/// the wait returns, and [`Watchdog::check`] then fails the test saying what did not end.
pub struct Watchdog {
    done: Arc<std::sync::atomic::AtomicBool>,
    fired: Arc<std::sync::atomic::AtomicBool>,
    what: String,
    timeout: Duration,
}

impl Watchdog {
    pub fn new(pid: u32, timeout: Duration, what: &str) -> Watchdog {
        use std::sync::atomic::{AtomicBool, Ordering};
        let done = Arc::new(AtomicBool::new(false));
        let fired = Arc::new(AtomicBool::new(false));
        let (d, f) = (done.clone(), fired.clone());
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + timeout;
            while std::time::Instant::now() < deadline {
                if d.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if !d.load(Ordering::SeqCst) {
                f.store(true, Ordering::SeqCst);
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        });
        Watchdog {
            done,
            fired,
            what: what.to_string(),
            timeout,
        }
    }

    /// Call once the wait returned: fails the test when the watchdog had to kill the child.
    pub fn check(self) {
        use std::sync::atomic::Ordering;
        self.done.store(true, Ordering::SeqCst);
        assert!(
            !self.fired.load(Ordering::SeqCst),
            "{} did not end within {:?}; killed",
            self.what,
            self.timeout
        );
    }
}

/// `child.wait_with_output()`, bounded by `timeout` (see [`Watchdog`]).
pub fn output_within(child: Child, timeout: Duration, what: &str) -> std::process::Output {
    let dog = Watchdog::new(child.id(), timeout, what);
    let out = child.wait_with_output().expect("child output");
    dog.check();
    out
}

/// `child.wait()`, bounded by `timeout` (see [`Watchdog`]).
pub fn wait_within(child: &mut Child, timeout: Duration, what: &str) -> std::process::ExitStatus {
    let dog = Watchdog::new(child.id(), timeout, what);
    let status = child.wait().expect("wait for child");
    dog.check();
    status
}

/// Runs a Python program with `args`, bounded by 60 s; its stdout.
pub async fn python(program: &str, args: Vec<String>) -> String {
    let program = program.to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("timeout")
            .args(["60", "python3", "-c", &program])
            .args(args)
            .output()
    })
    .await
    .expect("task")
    .expect("python3 runs");
    assert!(
        out.status.success(),
        "python failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `/jobs/{id}` until the job has a result; panics with the last answer after `within`.
pub async fn recorded(http: std::net::SocketAddr, id: &str, within: Duration) -> Value {
    match record_within(http, id, within).await {
        Ok(record) => record,
        Err(last) => panic!("job {id} not recorded within {within:?}: {last}"),
    }
}

/// Polls `/jobs/{id}` until the job has a result: `Ok(record)`, or `Err(last answer)` once
/// `within` passed (for callers that show more, such as logs, before they fail).
pub async fn record_within(
    http: std::net::SocketAddr,
    id: &str,
    within: Duration,
) -> Result<Value, Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (status, body) = http_get(http, &format!("/jobs/{id}")).await;
        if status == 200 {
            return Ok(body);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
