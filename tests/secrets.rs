//! Passwords in broker URLs never reach the output of any binary, even at `RUST_LOG=trace`, and
//! a wrong password fails fast with a clear error. NATS: a second nats-server with a user and
//! password on a spare loopback port. RabbitMQ: a user of its own on the local broker.

mod common;

use common::{free_port, unique_ns, wait_listening, Broker};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const PASSWORD: &str = "Pw-s3cret%XyZ";
const PASSWORD_IN_URL: &str = "Pw-s3cret%25XyZ";

fn run(bin: &str, args: &[&str], timeout_s: u32) -> Output {
    common::run_bin(bin, args, timeout_s, "trace")
}

use common::output_text as text;

/// Runs a worker, an aggregator and a waiting producer against `url`, then a producer with a
/// wrong password; checks the round trip and that the password shows nowhere.
fn round_trip_without_leaks(url: &str, wrong_url: &str, ns: &str, dir: &Path) {
    let port = free_port().to_string();
    let http = format!("127.0.0.1:{port}");
    let store = dir.join("store");
    // Long-running processes write to files: an unread pipe fills up at trace level.
    let log = |name: &str| std::fs::File::create(dir.join(name)).expect("log file");
    let mut worker = Command::new(common::bin("conveyor-worker"))
        .args(["--broker", url, "--namespace", ns])
        .env("RUST_LOG", "trace")
        .stdout(log("worker.out"))
        .stderr(log("worker.err"))
        .spawn()
        .expect("worker");
    let mut aggregator = Command::new(common::bin("conveyor-aggregator"))
        .args(["--broker", url, "--namespace", ns, "--http", &http])
        .arg("--store")
        .arg(&store)
        .env("RUST_LOG", "trace")
        .stdout(log("aggregator.out"))
        .stderr(log("aggregator.err"))
        .spawn()
        .expect("aggregator");
    let producer = run(
        "conveyor-producer",
        &[
            "--broker",
            url,
            "--namespace",
            ns,
            "publish",
            "echo",
            "--payload",
            r#"{"s":1}"#,
            "--wait",
            "--wait-timeout",
            "20s",
        ],
        40,
    );
    let bench = run(
        "conveyor-producer",
        &[
            "--broker",
            url,
            "--namespace",
            ns,
            "bench",
            "--jobs",
            "200",
            "--light-jobs",
            "5",
            "--rounds",
            "1",
        ],
        60,
    );
    let wrong = run(
        "conveyor-producer",
        &[
            "--broker",
            wrong_url,
            "--namespace",
            ns,
            "--connect-timeout",
            "1s",
            "publish",
            "echo",
            "--payload",
            "{}",
        ],
        30,
    );
    // The supervisor, both ways: a local stack (the URL passed on to children in their
    // environment), and a worker command line that carries the URL.
    let up_http = format!("127.0.0.1:{}", free_port());
    let up_store = dir.join("up-store").to_string_lossy().into_owned();
    let up = run(
        "conveyor-supervisor",
        &[
            "up",
            "--broker",
            url,
            "--namespace",
            ns,
            "--workers",
            "1",
            "--store",
            &up_store,
            "--http",
            &up_http,
        ],
        8,
    );
    let worker_bin = common::bin("conveyor-worker")
        .to_string_lossy()
        .into_owned();
    let supervised = run(
        "conveyor-supervisor",
        &[
            "--workers",
            "1",
            "--",
            &worker_bin,
            "--broker",
            url,
            "--namespace",
            ns,
        ],
        6,
    );
    for child in [&mut worker, &mut aggregator] {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        common::wait_within(child, Duration::from_secs(30), "a service after SIGTERM");
    }
    // Delete after the services stopped: a connected client would re-declare what it uses.
    let deleted = run(
        "conveyor-producer",
        &[
            "--broker",
            url,
            "--namespace",
            ns,
            "delete-namespace",
            "--yes",
        ],
        30,
    );
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let services = [
        read("worker.out") + &read("worker.err"),
        read("aggregator.out") + &read("aggregator.err"),
    ];

    assert!(
        producer.status.success(),
        "round trip with a password:\n{}",
        text(&producer)
    );
    assert!(text(&producer).contains("\"status\":\"succeeded\""));
    assert!(
        bench.status.success(),
        "bench with a password:\n{}",
        text(&bench)
    );
    assert_eq!(
        wrong.status.code(),
        Some(2),
        "wrong password fails:\n{}",
        text(&wrong)
    );
    let wrong_text = text(&wrong).to_lowercase();
    // Each broker's own words for refused credentials.
    let why = if url.starts_with("nats") {
        "authorization violation"
    } else {
        "access_refused"
    };
    assert!(
        wrong_text.contains(why),
        "the error says why ({why}): {wrong_text}"
    );
    assert!(deleted.status.success(), "{}", text(&deleted));
    for (out, children) in [
        (&up, &["[aggregator]", "[worker-0]"][..]),
        (&supervised, &["[worker-0]"][..]),
    ] {
        for child in children {
            assert!(
                text(out).contains(child),
                "the supervisor relayed {child}:\n{}",
                text(out)
            );
        }
    }
    let all: Vec<String> = [&producer, &bench, &wrong, &deleted, &up, &supervised]
        .iter()
        .map(|o| text(o))
        .chain(services)
        .collect();
    let lines: usize = all.iter().map(|t| t.lines().count()).sum();
    assert!(lines > 100, "trace logging was on ({lines} lines)");
    for t in &all {
        assert!(!t.contains(PASSWORD), "password printed:\n{t}");
        assert!(!t.contains(PASSWORD_IN_URL), "password printed:\n{t}");
        assert!(!t.contains("wrong-pass"), "wrong password printed:\n{t}");
    }
}

/// A nats-server of the test's own with `auth` (its user and password, or token, flags) on a
/// spare port; runs [`round_trip_without_leaks`] with the URLs `urls` makes from the port.
async fn nats_round_trip_with(auth: &[&str], urls: impl Fn(u16) -> (String, String)) {
    common::ensure_up(Broker::Nats);
    let server = Path::new("/usr/sbin/nats-server");
    let server = if server.exists() {
        server.to_path_buf()
    } else {
        "nats-server".into()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut nats = Command::new(&server)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js"])
        .args(auth)
        .arg("-sd")
        .arg(dir.path().join("js"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server is installed (it runs the local broker too)");
    wait_listening(&format!("127.0.0.1:{port}"), Duration::from_secs(10)).await;
    let (url, wrong) = urls(port);
    let ns = unique_ns("s");
    let d = dir.path().to_path_buf();
    let outcome =
        tokio::task::spawn_blocking(move || round_trip_without_leaks(&url, &wrong, &ns, &d)).await;
    let _ = nats.kill();
    let _ = nats.wait();
    outcome.expect("round trip");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_passwords_stay_secret() {
    nats_round_trip_with(&["--user", "conv", "--pass", PASSWORD], |port| {
        (
            format!("nats://conv:{PASSWORD_IN_URL}@127.0.0.1:{port}"),
            format!("nats://conv:wrong-pass@127.0.0.1:{port}"),
        )
    })
    .await;
}

/// A NATS token in the URL (`nats://TOKEN@host`) is a secret like a password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_tokens_stay_secret() {
    nats_round_trip_with(&["--auth", PASSWORD], |port| {
        (
            format!("nats://{PASSWORD_IN_URL}@127.0.0.1:{port}"),
            format!("nats://wrong-pass@127.0.0.1:{port}"),
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_passwords_stay_secret() {
    common::ensure_up(Broker::Amqp);
    let user = unique_ns("user");
    let ctl = |args: &[&str]| {
        let out = Command::new("rabbitmqctl")
            .args(args)
            .output()
            .expect("rabbitmqctl is installed");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ctl(&["add_user", &user, PASSWORD]);
    ctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
    let url = format!("amqp://{user}:{PASSWORD_IN_URL}@127.0.0.1:5672/%2f");
    let wrong = format!("amqp://{user}:wrong-pass@127.0.0.1:5672/%2f");
    let ns = unique_ns("s");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_path_buf();
    let outcome =
        tokio::task::spawn_blocking(move || round_trip_without_leaks(&url, &wrong, &ns, &d)).await;
    ctl(&["delete_user", &user]);
    outcome.expect("round trip");
}

/// Runs `openssl` in `dir`, failing the test with its output when it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl is installed");
    assert!(out.status.success(), "openssl {args:?}: {}", text(&out));
}

/// A private CA and a server certificate for 127.0.0.1 signed by it.
fn private_ca(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"]);
    ca.extend(["-subj", "/CN=Conveyor test CA"]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend(["-keyout", "server.key", "-out", "server.csr"]);
    csr.extend(["-subj", "/CN=127.0.0.1"]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("san");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_tls_with_a_private_ca() {
    common::ensure_up(Broker::Nats);
    let dir = tempfile::tempdir().expect("tempdir");
    private_ca(dir.path());
    let port = free_port();
    let mut nats = Command::new("nats-server")
        .current_dir(dir.path())
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js"])
        .args(["--user", "conv", "--pass", PASSWORD])
        .args(["--tls", "--tlscert", "server.pem", "--tlskey", "server.key"])
        .arg("-sd")
        .arg(dir.path().join("js"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server is installed");
    wait_listening(&format!("127.0.0.1:{port}"), Duration::from_secs(10)).await;
    let url = format!("tls://conv:{PASSWORD_IN_URL}@127.0.0.1:{port}");
    let ca = dir.path().join("ca.pem").to_string_lossy().into_owned();
    let ns = unique_ns("tls");
    let d = dir.path().to_path_buf();
    let outcome =
        tokio::task::spawn_blocking(move || tls_round_trip(&url, &ca, &ns, &d, "tls")).await;
    let _ = nats.kill();
    let _ = nats.wait();
    outcome.expect("TLS round trip");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_private_ca() {
    common::ensure_up(Broker::Amqp);
    let dir = tempfile::tempdir().expect("tempdir");
    private_ca(dir.path());
    let mut rabbit = common::own_rabbit::OwnRabbit::with_tls(
        dir.path().join("rabbit"),
        &dir.path().join("server.pem"),
        &dir.path().join("server.key"),
    );
    rabbit.start();
    wait_listening(&rabbit.addr(), Duration::from_secs(90)).await;
    let url = format!("amqps://guest:guest@127.0.0.1:{}/%2f", rabbit.port());
    let ca = dir.path().join("ca.pem").to_string_lossy().into_owned();
    let ns = unique_ns("amqps");
    let d = dir.path().to_path_buf();
    let outcome =
        tokio::task::spawn_blocking(move || tls_round_trip(&url, &ca, &ns, &d, "amqps")).await;
    rabbit.kill9();
    outcome.expect("AMQPS round trip");
}

/// A worker and a waiting producer over TLS with `--tls-ca`, then a producer without it: the
/// first round trip works, the second fails naming the certificate.
fn tls_round_trip(url: &str, ca: &str, ns: &str, dir: &Path, label: &str) {
    let mut worker = Command::new(common::bin("conveyor-worker"))
        .args(["--broker", url, "--namespace", ns, "--tls-ca", ca])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("worker.err")).expect("log"))
        .spawn()
        .expect("worker");
    let publish = |extra: &[&str]| {
        let mut args = vec!["--broker", url, "--namespace", ns];
        args.extend(extra);
        args.extend([
            "--connect-timeout",
            "2s",
            "publish",
            "echo",
            "--payload",
            r#"{"over":"tls"}"#,
            "--wait",
            "--wait-timeout",
            "30s",
        ]);
        run("conveyor-producer", &args, 60)
    };
    let trusted = publish(&["--tls-ca", ca]);
    let untrusted = publish(&[]);
    let _ = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status();
    common::wait_within(
        &mut worker,
        Duration::from_secs(30),
        "the worker after SIGTERM",
    );
    let worker_log = std::fs::read_to_string(dir.join("worker.err")).unwrap_or_default();
    assert!(
        trusted.status.success() && text(&trusted).contains("\"status\":\"succeeded\""),
        "{label} round trip with the private CA:\n{}\nworker:\n{worker_log}",
        text(&trusted)
    );
    assert_eq!(untrusted.status.code(), Some(2), "{}", text(&untrusted));
    let why = text(&untrusted).to_lowercase();
    assert!(
        why.contains("certificate") || why.contains("issuer") || why.contains("tls"),
        "an untrusted server certificate is named as the reason: {why}"
    );
    let error = text(&untrusted)
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default()
        .to_string();
    println!("{label} without the CA: {error}");
}
