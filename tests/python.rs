//! The Python examples of docs/protocol.md, run for real against both brokers with a worker running.

mod common;

use common::{test_worker_config, Broker, Stack};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

both_brokers!(python_example_round_trip);

async fn python_example_round_trip(broker: Broker) {
    let (file, env_url) = match broker {
        Broker::Nats => ("nats_echo.py", "CONVEYOR_NATS"),
        Broker::Amqp => ("rabbitmq_echo.py", "CONVEYOR_AMQP"),
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("examples/python").join(file);
    let source = std::fs::read_to_string(&script).expect("example exists");
    let readme =
        std::fs::read_to_string(root.join("docs/protocol.md")).expect("docs/protocol.md exists");
    assert!(
        readme.contains(source.trim()),
        "docs/protocol.md must show {file} verbatim"
    );
    let module = if broker == Broker::Nats {
        "nats"
    } else {
        "pika"
    };
    let probe = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output();
    assert!(
        probe.map(|o| o.status.success()).unwrap_or(false),
        "python3 with {module} is needed: python3 -m pip install nats-py pika (scripts/test.sh does)"
    );

    let stack = Stack::start(broker, test_worker_config()).await;
    let ns = stack.ns.clone();
    let url = broker.url_str();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .args(["60", "python3"])
            .arg(&script)
            .env("CONVEYOR_NAMESPACE", ns)
            .env(env_url, url)
            .output()
    })
    .await
    .expect("task")
    .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{file} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert!(!lines.is_empty());
    for line in &lines {
        assert_eq!(line["status"], "succeeded", "{line}");
    }
    assert_eq!(
        lines[0]["output"],
        serde_json::json!({"hello": "from python"})
    );
    if broker == Broker::Amqp {
        assert_eq!(
            lines[0]["correlation_id"], lines[0]["id"],
            "correlation_id is echoed"
        );
    } else {
        assert_eq!(
            lines.len(),
            2,
            "both the confirmed and the bare core publish came back"
        );
    }
    let stats =
        common::wait_for_results(stack.http, lines.len() as u64, Duration::from_secs(20)).await;
    assert_eq!(
        stats["results"].as_u64(),
        Some(lines.len() as u64),
        "{stats}"
    );
    stack.stop().await;
}
