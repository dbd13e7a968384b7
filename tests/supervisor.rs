//! `conveyor-supervisor` as a process: restarts, restart intensity, signal forwarding.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn supervisor(args: &[&str], log: &std::path::Path) -> std::process::Child {
    let file = std::fs::File::create(log).expect("log");
    Command::new(common::bin("conveyor-supervisor"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .expect("supervisor starts")
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for `child` to exit, failing with `what` after `timeout`.
fn wait_exit(
    child: &mut std::process::Child,
    timeout: Duration,
    what: &str,
) -> std::process::ExitStatus {
    let mut status = None;
    wait_until(what, timeout, || {
        status = child.try_wait().expect("wait");
        status.is_some()
    });
    status.expect("exited")
}

use common::children_of;

#[test]
fn gives_up_after_too_many_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("sup.log");
    let mut sup = supervisor(
        &[
            "--workers",
            "2",
            "--restart-backoff",
            "10ms..40ms",
            "--max-restarts",
            "5",
            "--within",
            "30s",
            "--",
            "sh",
            "-c",
            "echo started; exit 3",
        ],
        &log,
    );
    let status = wait_exit(
        &mut sup,
        Duration::from_secs(20),
        "the supervisor gives up in time",
    );
    let text = std::fs::read_to_string(&log).expect("log");
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(
        text.contains("gave up: 6 restarts within 30s (limit 5)"),
        "{text}"
    );
    assert!(text.contains("exit code 3"), "{text}");
    // The sixth exit makes it give up; the fifth restart may or may not have run by then.
    let restarts = text.matches("child restarted").count();
    assert!(
        (4..=5).contains(&restarts),
        "{restarts} restarts before giving up:\n{text}"
    );
    let started = text.lines().filter(|l| l.ends_with("] started")).count();
    // A child restarted just before the end may be stopped before it printed.
    assert!(
        (1 + restarts..=2 + restarts).contains(&started),
        "the children's output came through ({started} starts):\n{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("[worker-1] started")),
        "output is prefixed"
    );
}

#[test]
fn restarts_killed_children_and_forwards_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("sup.log");
    let script = "echo started; trap 'echo stopping; exit 0' TERM; while :; do sleep 0.05; done";
    let mut sup = supervisor(
        &[
            "--workers",
            "2",
            "--restart-backoff",
            "10ms..1s",
            "--drain-timeout",
            "5s",
            "--",
            "sh",
            "-c",
            script,
        ],
        &log,
    );
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let started = || read().lines().filter(|l| l.ends_with("] started")).count();
    wait_until("two children", Duration::from_secs(10), || {
        started() == 2 && children_of(sup.id()).len() == 2
    });
    let victim = children_of(sup.id())[0];
    let killed = Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    wait_until("a restart", Duration::from_secs(10), || started() == 3);
    wait_until("two children again", Duration::from_secs(10), || {
        children_of(sup.id()).len() == 2
    });
    assert!(read().contains("killed by SIGKILL"), "{}", read());
    let term = Command::new("kill")
        .args(["-TERM", &sup.id().to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    let status = wait_exit(
        &mut sup,
        Duration::from_secs(10),
        "the supervisor stops in time",
    );
    let text = read();
    assert_eq!(status.code(), Some(0), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.ends_with("] stopping")).count(),
        2,
        "both children got SIGTERM:\n{text}"
    );
}

/// A second SIGTERM forces the stop: children that do not drain get a second SIGTERM and are
/// killed a few seconds later, well before the drain timeout.
#[test]
fn a_second_sigterm_forces_the_stop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("sup.log");
    // A child that takes note of SIGTERM and carries on, as a worker still draining would.
    let script = "echo started; trap 'echo term' TERM; while :; do sleep 0.05; done";
    let mut sup = supervisor(
        &[
            "--workers",
            "2",
            "--drain-timeout",
            "120s",
            "--",
            "sh",
            "-c",
            script,
        ],
        &log,
    );
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until("two children", Duration::from_secs(10), || {
        read().lines().filter(|l| l.ends_with("] started")).count() == 2
    });
    let term = |pid: u32| {
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(sent.success());
    };
    term(sup.id());
    wait_until(
        "the first SIGTERM forwarded",
        Duration::from_secs(10),
        || read().lines().filter(|l| l.ends_with("] term")).count() == 2,
    );
    let forced_at = Instant::now();
    term(sup.id());
    let status = wait_exit(
        &mut sup,
        Duration::from_secs(20),
        "the supervisor stops well before its 120 s drain timeout",
    );
    let took = forced_at.elapsed();
    let text = read();
    eprintln!("stopped {took:?} after the second SIGTERM");
    assert_eq!(status.code(), Some(0), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.ends_with("] term")).count(),
        4,
        "each child got a second SIGTERM:\n{text}"
    );
    assert!(text.contains("killing it"), "{text}");
}

#[test]
fn refuses_a_bad_backoff() {
    let out = Command::new(common::bin("conveyor-supervisor"))
        .args(["--restart-backoff", "10s..1s", "--", "true"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--restart-backoff"));
}

mod events {
    use super::common::{self, unique_ns, Broker};
    use futures::StreamExt;
    use std::time::Duration;

    crate::both_brokers!(supervisor_events_reach_the_broker);

    /// With `--broker`, child starts, exits and restarts, and the final give-up, are published
    /// as events of kind `supervisor`, which any listener receives.
    async fn supervisor_events_reach_the_broker(broker: Broker) {
        let url = broker.url();
        let ns = unique_ns("sev");
        let listener = conveyor::transport::connect(&url, &ns)
            .await
            .expect("listener connects");
        let mut events = listener
            .listen_events("supervisor.>")
            .await
            .expect("listen");
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("sup.log");
        let mut sup = super::supervisor(
            &[
                "--broker",
                url.expose(),
                "--namespace",
                &ns,
                "--workers",
                "1",
                "--restart-backoff",
                "50ms..100ms",
                "--max-restarts",
                "2",
                "--within",
                "30s",
                "--",
                "sh",
                "-c",
                "sleep 0.3; exit 3",
            ],
            &log,
        );
        let mut seen: Vec<serde_json::Value> = Vec::new();
        let collected = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(msg) = events.next().await {
                let v: serde_json::Value = serde_json::from_slice(&msg.body).expect("json event");
                let last = v["event"] == "gave-up";
                seen.push(v);
                if last {
                    break;
                }
            }
        })
        .await;
        let status = tokio::task::spawn_blocking(move || {
            super::wait_exit(&mut sup, Duration::from_secs(20), "supervisor to give up")
        })
        .await
        .expect("wait");
        let names: Vec<&str> = seen.iter().filter_map(|v| v["event"].as_str()).collect();
        assert!(
            collected.is_ok(),
            "{broker:?}: no gave-up event; got {names:?}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert_eq!(status.code(), Some(1));
        let count = |e: &str| names.iter().filter(|n| **n == e).count();
        assert_eq!(count("child-started"), 1, "{names:?}");
        assert_eq!(count("child-exited"), 3, "{names:?}");
        assert_eq!(count("child-restarted"), 2, "{names:?}");
        let exited = seen
            .iter()
            .find(|v| v["event"] == "child-exited")
            .expect("an exit");
        assert_eq!(exited["child"], "worker-0");
        assert!(exited["pid"].as_u64().unwrap_or(0) > 0);
        assert!(
            exited["detail"].as_str().unwrap_or("").contains('3'),
            "{exited}"
        );
        println!("{broker:?}: supervisor events {names:?}");
        drop(events);
        let _ = listener.close().await;
        common::delete_namespace(broker, &ns, &[]);
    }
}
