//! The broker configuration in `broker-config/`, loaded into real brokers: a second nats-server
//! started with `nats-server.conf`, and `definitions.json` imported into a vhost of its own on the
//! local RabbitMQ. With each, the role users do a publish → work → result round trip (a retried
//! job included), and the permissions hold: the worker user cannot publish jobs, the producer
//! user cannot consume them, and a wrong password is refused at once with a clear error.

mod common;

use common::{free_port, http_get, unique_ns, wait_listening, Broker};
use conveyor::protocol::Names;
use conveyor::transport::{self, ConsumeOptions, Route, Source};
use conveyor::{BrokerUrl, Error, Message};
use futures::StreamExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const ROLES: [&str; 4] = ["producer", "worker", "aggregator", "admin"];
const NS: &str = "conveyor";

fn config_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("broker-config")
        .join(name)
}

fn password(role: &str) -> String {
    format!("{role}-Pw-7Qz")
}

/// The URL of one role.
struct Roles {
    url: Box<dyn Fn(&str) -> String + Send + Sync>,
}

impl Roles {
    fn url(&self, role: &str) -> String {
        (self.url)(role)
    }
    fn parsed(&self, role: &str) -> BrokerUrl {
        BrokerUrl::parse(&self.url(role)).expect("role URL parses")
    }
}

fn run(bin: &str, args: &[&str]) -> Output {
    common::run_bin(bin, args, 60, "info")
}

use common::output_text as text;

/// A round trip with the role users, then the permission checks.
async fn roles_work_and_are_limited(roles: &Roles, dir: &Path) {
    let http_port = free_port();
    let http = format!("127.0.0.1:{http_port}");
    let store = dir.join("store");
    let worker_url = roles.url("worker");
    let _worker = common::Proc::spawn(
        "worker",
        "conveyor-worker",
        &[
            "--broker",
            &worker_url,
            "--namespace",
            NS,
            "--retry-base",
            "50ms",
            // Controls that use the broker: the role's permissions must cover them.
            "--cluster-max-concurrent",
            "sleep=2",
            "--rate",
            "echo=500/s",
            "--breaker",
            "fail=5/1s",
        ],
        dir,
    );
    let aggregator_url = roles.url("aggregator");
    let _aggregator = common::Proc::spawn(
        "aggregator",
        "conveyor-aggregator",
        &[
            "--broker",
            &aggregator_url,
            "--namespace",
            NS,
            "--http",
            &http,
            "--store",
            &store.to_string_lossy(),
        ],
        dir,
    );
    wait_listening(&http, Duration::from_secs(30)).await;
    let producer_url = roles.url("producer");
    let publish_with = |kind: &str, payload: &str, id: &str, extra: &[&str]| {
        let mut args = vec![
            "--broker",
            &producer_url,
            "--namespace",
            NS,
            "publish",
            kind,
            "--payload",
            payload,
            "--id",
            id,
            "--wait",
            "--wait-timeout",
            "30s",
        ];
        args.extend_from_slice(extra);
        run("conveyor-producer", &args)
    };
    let publish = |kind: &str, payload: &str, id: &str| publish_with(kind, payload, id, &[]);
    let echo = publish("echo", r#"{"role":"producer"}"#, "cfg-echo-1");
    let logs = || {
        ["worker", "aggregator"]
            .iter()
            .map(|n| std::fs::read_to_string(dir.join(format!("{n}.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        echo.status.success() && text(&echo).contains("\"status\":\"succeeded\""),
        "echo round trip with the role users:\n{}\n{}",
        text(&echo),
        logs()
    );
    // A job that fails once goes through the retry path (on RabbitMQ: the delay queues).
    let retried = publish("fail", r#"{"times":1}"#, "cfg-fail-1");
    assert!(
        retried.status.success() && text(&retried).contains("\"attempts\":2"),
        "retried job with the role users:\n{}\n{}",
        text(&retried),
        logs()
    );
    // A delayed job waits in the broker (NATS: the delayed stream, moved back by the worker
    // user; RabbitMQ: the delay queues).
    let delayed = publish_with(
        "echo",
        r#"{"later":true}"#,
        "cfg-delayed-1",
        &["--delay", "2s"],
    );
    assert!(
        delayed.status.success() && text(&delayed).contains("\"status\":\"succeeded\""),
        "delayed job with the role users:\n{}\n{}",
        text(&delayed),
        logs()
    );
    let addr = http.parse().expect("address");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = http_get(addr, "/jobs/cfg-fail-1").await;
        if status == 200 {
            assert_eq!(body["status"], "succeeded", "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "aggregator never recorded it");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("round trip with the role users: echo and a retried job succeeded and were recorded");

    // Periodic jobs with the producer user: a schedule added, listed, and a scheduler that
    // leads and publishes its ticks.
    let producer = |args: &[&str]| {
        let mut all = vec!["--broker", &producer_url, "--namespace", NS, "schedule"];
        all.extend_from_slice(args);
        run("conveyor-producer", &all)
    };
    let added = producer(&["add", "cfg-beat", "--kind", "echo", "--every", "1s"]);
    assert!(added.status.success(), "schedule add: {}", text(&added));
    let listed = producer(&["list"]);
    assert!(
        listed.status.success() && text(&listed).contains("\"cfg-beat\""),
        "schedule list: {}",
        text(&listed)
    );
    // What was recorded before the scheduler runs: once it has stopped changing (results of
    // the jobs above may still be arriving).
    let results = || async {
        http_get(addr, "/stats").await.1["results"]
            .as_u64()
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut results_before = results().await;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = results().await;
        if now == results_before {
            break;
        }
        assert!(Instant::now() < deadline, "results kept arriving: {now}");
        results_before = now;
    }
    let ran = producer(&["run", "--for", "4s"]);
    let report = text(&ran);
    assert!(
        ran.status.success() && report.contains("this scheduler leads"),
        "schedule run: {report}"
    );
    // (The producer's refused declarations of the shared topology, which it then checks
    // passively, are expected; refusals of what schedules use are not.)
    let refused: Vec<&str> = report
        .lines()
        .filter(|l| l.contains("ACCESS_REFUSED") || l.contains("Permissions Violation"))
        .filter(|l| {
            ["registers", "REGISTERS", "flights", "FLIGHTS"]
                .iter()
                .any(|r| l.contains(r))
        })
        .collect();
    assert!(
        refused.is_empty(),
        "the scheduler met refusals: {refused:#?}"
    );
    let published: u64 = report
        .split("published ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        published >= 2,
        "the scheduler published {published} ticks: {report}"
    );
    // The worker user runs them, each claimed first where the broker keeps no publish ids.
    let deadline = Instant::now() + Duration::from_secs(20);
    while results().await < results_before + published {
        assert!(
            Instant::now() < deadline,
            "the ticks were not all recorded:\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !logs().contains("cannot claim the tick"),
        "the worker user could not claim ticks:\n{}",
        logs()
    );
    let removed = producer(&["remove", "cfg-beat"]);
    assert!(
        removed.status.success(),
        "schedule remove: {}",
        text(&removed)
    );
    println!("schedules with the producer user: {published} ticks published in 4 s");

    // The schedules' HTTP API with the aggregator user, on the register the producer reads.
    let addr: std::net::SocketAddr = http.parse().expect("addr");
    let body = r#"{"kind":"echo","every":"1m"}"#;
    let (code, put) = common::http_send(addr, "PUT", "/schedules/cfg-http", Some(body)).await;
    assert_eq!(code, 200, "PUT with the aggregator user: {put}");
    let listed = producer(&["list"]);
    assert!(
        text(&listed).contains("\"cfg-http\""),
        "the producer lists what the aggregator stored: {}",
        text(&listed)
    );
    let (code, paused) = common::http_send(addr, "POST", "/schedules/cfg-http/pause", None).await;
    assert_eq!(code, 200, "pause with the aggregator user: {paused}");
    let (code, gone) = common::http_send(addr, "DELETE", "/schedules/cfg-http", None).await;
    assert_eq!(code, 204, "DELETE with the aggregator user: {gone}");
    println!("schedules over HTTP with the aggregator user: stored, paused, removed");

    // Singleflight and the cluster-wide cap with the worker user: three jobs with one key.
    let keyed = publish_with(
        "sleep",
        r#"{"ms":300}"#,
        "cfg-keyed",
        &["--count", "3", "--dedup-key", "cfg-key"],
    );
    assert!(
        keyed.status.success() && text(&keyed).matches("\"status\":\"succeeded\"").count() == 3,
        "keyed sleeps with the role users:\n{}\n{}",
        text(&keyed),
        logs()
    );
    let worker_log = std::fs::read_to_string(dir.join("worker.log")).unwrap_or_default();
    // (RabbitMQ refuses the worker's declarations of the shared topology, which it then checks
    // passively: those refusals are expected.)
    let controls_refused = |line: &&str| {
        line.contains("ACCESS_REFUSED")
            && ["permits", "flights", "conveyor.events"]
                .iter()
                .any(|r| line.contains(r))
    };
    let lacking: Vec<&str> = worker_log
        .lines()
        .filter(|line| {
            controls_refused(line)
                || [
                    "refused an operation",
                    "singleflight claim failed",
                    "singleflight unavailable",
                    "cannot listen",
                    "cannot follow",
                ]
                .iter()
                .any(|m| line.contains(m))
        })
        .collect();
    assert!(
        lacking.is_empty(),
        "the worker user lacks permissions:\n{}",
        lacking.join("\n")
    );
    println!("with the worker user: a cluster cap, a global rate, a breaker and singleflight ran");

    // The producer user cannot pause a kind: a forged `breaker-open` for `fail`, as a lifecycle
    // event (which the producer may emit) and on the workers' breaker topic (which it may not
    // publish to), leaves the worker's breaker closed.
    let as_producer = transport::connect(&roles.parsed("producer"), NS)
        .await
        .expect("producer user connects");
    // Its own `published` events still go out (RabbitMQ: its topic permission lets exactly
    // `<kind>.published` through).
    let as_admin = transport::connect(&roles.parsed("admin"), NS)
        .await
        .expect("admin connects");
    let mut heard = as_admin
        .listen_events("echo.published")
        .await
        .expect("admin listens");
    let published = conveyor::events::JobEvent::new(
        "cfg-published",
        "echo",
        conveyor::events::JobState::Published,
        1,
    );
    // (Sent until heard: the listener's subscription reaches the server on a connection of its
    // own, possibly after a first event.)
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        as_producer
            .emit_event("echo", "published", published.to_message())
            .await
            .expect("the producer emits a published event");
        let got = tokio::time::timeout(Duration::from_millis(300), heard.next()).await;
        if matches!(got, Ok(Some(_))) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the producer's published event never arrived"
        );
    }
    let _ = as_admin.close().await;
    let forged = conveyor::worker::breaker::BreakerEvent {
        kind: "fail".into(),
        state: "breaker-open".into(),
        worker: "forger".into(),
        until_ms: Some(conveyor::job::now_ms() + 600_000),
        at_ms: conveyor::job::now_ms(),
    };
    let event = as_producer
        .emit_event("fail", "breaker-open", forged.to_message())
        .await;
    let topic = conveyor::worker::breaker::topic("fail");
    let broadcast = as_producer.broadcast(&topic, forged.to_message()).await;
    println!("forged breaker-open as the producer: event {event:?}, broadcast {broadcast:?}");
    // Nor speak for a worker: forged heartbeats (on RabbitMQ they share the events exchange)
    // make no worker live in the aggregator.
    let beat = conveyor::worker::heartbeat::Heartbeat {
        id: "forged".into(),
        host: "nowhere".into(),
        pid: 1,
        kinds: vec!["echo".into()],
        in_flight: 0,
        concurrency: 1,
        version: "0".into(),
        at_ms: conveyor::job::now_ms(),
        interval_ms: 60_000,
        stopping: false,
    };
    for topic in ["heartbeats.forged", "heartbeats.forged.published"] {
        let sent = as_producer.broadcast(topic, beat.to_message()).await;
        println!("forged heartbeat on {topic} as the producer: {sent:?}");
    }
    let _ = as_producer.close().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, workers) = http_get(addr, "/workers").await;
    assert!(
        !workers.to_string().contains("\"forged\""),
        "a forged heartbeat made a worker live: {workers}"
    );
    let after = publish("fail", r#"{"times":0}"#, "cfg-after-forgery");
    assert!(
        after.status.success() && text(&after).contains("\"status\":\"succeeded\""),
        "a forged breaker-open paused the kind:\n{}\n{}",
        text(&after),
        logs()
    );

    let as_worker = transport::connect(&roles.parsed("worker"), NS)
        .await
        .expect("worker user connects");
    if worker_url.starts_with("nats") {
        // On NATS the worker user publishes jobs: a chain runs to its last step.
        let chain = run(
            "conveyor-producer",
            &[
                "--broker",
                &producer_url,
                "--namespace",
                NS,
                "chain",
                "echo,echo,echo",
                "--payload",
                r#"{"chain":true}"#,
                "--id",
                "cfg-chain",
                "--wait",
                "--wait-timeout",
                "30s",
            ],
        );
        assert!(
            chain.status.success(),
            "a chain with the role users:\n{}\n{}",
            text(&chain),
            logs()
        );
        // It still cannot read the results.
        let read = tokio::time::timeout(
            Duration::from_secs(20),
            as_worker.consume(Source::Results("forged".into()), ConsumeOptions::default()),
        )
        .await
        .expect("a refused consume answers in bounded time");
        match read {
            Err(e) => println!("worker user reading results: {e}"),
            Ok(mut stream) => {
                let got = tokio::time::timeout(Duration::from_secs(3), stream.next()).await;
                assert!(
                    !matches!(got, Ok(Some(Ok(_)))),
                    "the worker user read a result"
                );
            }
        }
    } else {
        // On RabbitMQ the worker user cannot publish jobs.
        let mut headers = conveyor::Headers::new();
        headers.insert("Conveyor-Id", "cfg-by-worker");
        let job = Message::new(headers, r#"{"from":"worker"}"#.as_bytes().to_vec());
        let refused = tokio::time::timeout(
            Duration::from_secs(20),
            as_worker.publish(Route::Job("echo".into()), job),
        )
        .await
        .expect("a refused publish answers in bounded time");
        assert!(
            refused.is_err(),
            "the worker user published a job: {refused:?}"
        );
        println!(
            "worker user publishing a job: {}",
            refused.err().map(|e| e.to_string()).unwrap_or_default()
        );
        // Had it gone through, the running worker would have done it and the aggregator recorded it.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (status, _) = http_get(addr, "/jobs/cfg-by-worker").await;
        assert_eq!(status, 404, "a job published by the worker user was run");
    }
    let _ = as_worker.close().await;

    // The producer user cannot consume jobs.
    let as_producer = transport::connect(&roles.parsed("producer"), NS)
        .await
        .expect("producer user connects");
    let consumed = tokio::time::timeout(
        Duration::from_secs(20),
        as_producer.consume(Source::Kind("echo".into()), ConsumeOptions::default()),
    )
    .await
    .expect("a refused consume answers in bounded time");
    match consumed {
        Err(e) => println!("producer user consuming jobs: {e}"),
        Ok(mut stream) => {
            // NATS refuses the pull request itself; nothing may arrive on the stream.
            let got = tokio::time::timeout(Duration::from_secs(3), stream.next()).await;
            assert!(
                !matches!(got, Ok(Some(Ok(_)))),
                "the producer user received a job"
            );
        }
    }
    let _ = as_producer.close().await;

    // A wrong password is refused at once, not retried, and said so.
    let wrong = roles
        .url("producer")
        .replace(&password("producer"), "not-the-password");
    let started = Instant::now();
    let refused = transport::connect_with_retry(
        &BrokerUrl::parse(&wrong).expect("url"),
        NS,
        Duration::from_secs(30),
    )
    .await;
    match refused {
        Err(e @ Error::Denied { .. }) => {
            assert!(!e.is_transient());
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "a refused login is not retried"
            );
            println!("wrong password: {e}");
        }
        Err(other) => panic!("a wrong password should be refused as such, got: {other}"),
        Ok(_) => panic!("a wrong password was accepted"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_conf_roles() {
    common::ensure_up(Broker::Nats);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let monitor = free_port();
    let mut server = Command::new("nats-server");
    server
        .arg("-c")
        .arg(config_file("nats-server.conf"))
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .args(["-m", &monitor.to_string()])
        .arg("-sd")
        .arg(dir.path().join("js"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("nats.log")).expect("log"));
    for role in ROLES {
        server.env(
            format!("CONVEYOR_{}_PASSWORD", role.to_uppercase()),
            password(role),
        );
    }
    let mut child = server.spawn().expect("nats-server is installed");
    wait_listening(&format!("127.0.0.1:{port}"), Duration::from_secs(10)).await;
    let roles = Roles {
        url: Box::new(move |role| format!("nats://{role}:{}@127.0.0.1:{port}", password(role))),
    };
    roles_work_and_are_limited(&roles, dir.path()).await;

    // A producer may not even see jobs go by on a core subscription.
    let producer = transport::connect(&roles.parsed("producer"), NS)
        .await
        .expect("producer connects");
    let mut snoop = producer.listen("jobs.>").await.expect("subscribe call");
    let out = run(
        "conveyor-producer",
        &[
            "--broker",
            &roles.url("producer"),
            "--namespace",
            NS,
            "publish",
            "hash",
            "--payload",
            r#"{"data":"x"}"#,
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let got = tokio::time::timeout(Duration::from_secs(2), snoop.next()).await;
    assert!(
        got.is_err(),
        "the producer user saw a job on a subscription"
    );
    let log = std::fs::read_to_string(dir.path().join("nats.log")).unwrap_or_default();
    assert!(
        log.contains("Subscription Violation") || log.contains("Permissions Violation"),
        "the server logged the refused operations:\n{log}"
    );

    // The admin user may delete the namespace.
    let admin = transport::connect(&roles.parsed("admin"), NS)
        .await
        .expect("admin connects");
    admin.delete_namespace(&[]).await.expect("admin deletes");
    let _ = child.kill();
    let _ = child.wait();
}

/// `rabbitmqctl`, failing the test with its output when it fails.
fn ctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl is installed (it comes with the local RabbitMQ)");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Removes the test's vhost and users, also when the test failed.
struct RabbitCleanup {
    vhost: String,
    users: Vec<String>,
}

impl Drop for RabbitCleanup {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.vhost])
            .output();
        for user in &self.users {
            let _ = Command::new("rabbitmqctl")
                .args(["delete_user", user])
                .output();
        }
    }
}

/// `definitions.json` with its vhost and user names made unique to this test.
fn definitions_for(vhost: &str, user: &dyn Fn(&str) -> String) -> serde_json::Value {
    let raw = std::fs::read_to_string(config_file("definitions.json")).expect("definitions.json");
    let mut defs: serde_json::Value = serde_json::from_str(&raw).expect("definitions.json is JSON");
    for section in [
        "queues",
        "exchanges",
        "bindings",
        "permissions",
        "topic_permissions",
        "policies",
    ] {
        for item in defs[section].as_array_mut().expect("section is a list") {
            assert_eq!(
                item["vhost"], "conveyor",
                "{section} item in vhost conveyor"
            );
            item["vhost"] = vhost.into();
        }
    }
    defs["vhosts"] = serde_json::json!([{ "name": vhost }]);
    for section in ["users", "permissions", "topic_permissions"] {
        let key = if section == "users" { "name" } else { "user" };
        for item in defs[section].as_array_mut().expect("section is a list") {
            let name = item[key].as_str().expect("user name").to_string();
            item[key] = user(&name).into();
        }
    }
    defs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_definitions_roles() {
    common::ensure_up(Broker::Amqp);
    let vhost = unique_ns("vh");
    let prefix = vhost.clone();
    let user = move |role: &str| format!("{prefix}-{role}");
    let _cleanup = RabbitCleanup {
        vhost: vhost.clone(),
        users: ROLES.iter().map(|r| user(r)).collect(),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let defs = definitions_for(&vhost, &user);
    let defs_file = dir.path().join("definitions.json");
    std::fs::write(&defs_file, defs.to_string()).expect("write definitions");
    ctl(&["import_definitions", &defs_file.to_string_lossy()]);
    // What broker-config/rabbitmq-entrypoint.sh does with the passwords from the environment.
    for role in ROLES {
        ctl(&["change_password", &user(role), &password(role)]);
    }
    let listed = ctl(&["list_queues", "-p", &vhost, "name"]);
    for queue in ["conveyor.results", "conveyor.dead", "conveyor.retry.64ms"] {
        assert!(listed.contains(queue), "{queue} declared:\n{listed}");
    }

    let u = user.clone();
    let v = vhost.clone();
    let roles = Roles {
        url: Box::new(move |role| {
            format!("amqp://{}:{}@127.0.0.1:5672/{v}", u(role), password(role))
        }),
    };
    // The administrator declares everything exactly as the code does: a definition whose
    // arguments differ from the code's would fail here with PRECONDITION_FAILED.
    let admin = transport::amqp::AmqpTransport::connect(
        &roles.parsed("admin"),
        Names::new(NS).expect("ns"),
    )
    .await
    .expect("admin connects and declares the same topology");
    admin
        .declare_retry_queues()
        .await
        .expect("every retry queue as the code declares it");
    use conveyor::transport::Transport;
    admin.close().await.expect("close");
    drop(admin);
    roles_work_and_are_limited(&roles, dir.path()).await;
}
