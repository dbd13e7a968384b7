//! Jobs from outside clients that try to make a worker do what it must not: publish into the
//! namespace or the JetStream API, drop its connection, or lose the lease of jobs it holds. The
//! hostile jobs come from Python (nats-py) and raw NATS protocol frames, never our own client.

mod common;

use common::cluster::Cluster;
use common::{http_get, python, recorded, test_worker_config, Broker, Stack};
use conveyor::protocol::Names;
use conveyor::JobSpec;
use serde_json::{json, Value};
use std::time::Duration;

const REPLY_PROBE: &str = r#"
import asyncio, json, sys
import nats

async def main():
    url, ns, dead_stream = sys.argv[1], sys.argv[2], sys.argv[3]
    nc = await nats.connect(url)
    js = nc.jetstream()
    forged = []
    async def on_forged(msg):
        forged.append(msg.subject)
    await nc.subscribe(f"{ns}.heartbeats.forged", cb=on_forged)
    await nc.subscribe(f"{ns}.permits.>", cb=on_forged)
    inbox = await nc.subscribe("_INBOX.hostile.ok")
    jobs = [
        ("to-js-api", f"$JS.API.STREAM.DELETE.{dead_stream}"),
        ("to-heartbeats", f"{ns}.heartbeats.forged"),
        ("to-permits", f"{ns}.permits.sleep.9"),
        ("to-wildcard", "_INBOX.>"),
        ("to-inbox", "_INBOX.hostile.ok"),
    ]
    for job_id, to in jobs:
        await nc.publish(f"{ns}.jobs.echo", b'{"hostile":true}',
                         headers={"Conveyor-Id": job_id, "Conveyor-Reply-To": to})
    await nc.flush()
    reply = await inbox.next_msg(timeout=30)
    await asyncio.sleep(2)
    try:
        await js.stream_info(dead_stream)
        dead_stream_exists = True
    except Exception:
        dead_stream_exists = False
    print(json.dumps({"reply_id": reply.headers.get("Conveyor-Id"),
                      "forged": forged, "dead_stream_exists": dead_stream_exists}))
    await nc.close()

asyncio.run(main())
"#;

/// A job's reply address must stay in the inbox space: one that names the JetStream API or a
/// subject of the namespace is dead-lettered with the reason, and nothing is published there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_reply_addresses_outside_the_inbox_space_are_refused() {
    let stack = Stack::start(Broker::Nats, test_worker_config()).await;
    let names = Names::new(&stack.ns).expect("namespace");
    let out = python(
        REPLY_PROBE,
        vec![
            Broker::Nats.url_str(),
            stack.ns.clone(),
            names.stream("dead"),
        ],
    )
    .await;
    eprintln!("probe: {out}");
    let seen: Value = serde_json::from_str(out.trim()).expect("probe prints JSON");
    assert_eq!(seen["reply_id"], "to-inbox", "the honest reply arrives");
    assert_eq!(
        seen["forged"],
        json!([]),
        "nothing published into the namespace"
    );
    assert_eq!(
        seen["dead_stream_exists"], true,
        "the dead-letter stream survives"
    );
    for id in ["to-js-api", "to-heartbeats", "to-permits", "to-wildcard"] {
        let r = recorded(stack.http, id, Duration::from_secs(20)).await;
        assert_eq!(r["status"], "dead", "{id}: {r}");
        let error = r["error"].as_str().unwrap_or_default();
        assert!(error.contains("Conveyor-Reply-To"), "{id}: {error}");
    }
    let ok = recorded(stack.http, "to-inbox", Duration::from_secs(20)).await;
    assert_eq!(ok["status"], "succeeded");
    let letters =
        common::read_dead_letters(Broker::Nats, &stack.ns, 4, Duration::from_secs(10)).await;
    assert_eq!(letters.len(), 4, "each refused job is a dead letter");
    stack.stop().await;
}

const RAW_FRAMES: &str = r#"
import socket, sys
host, port, subject = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
s = socket.create_connection((host, port), timeout=10)
f = s.makefile("rb")
assert f.readline().startswith(b"INFO")
s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"protocol":1}\r\nPING\r\n')
assert f.readline().startswith(b"PONG")
blocks = [
    "NATS/1.0\r\nConveyor-Id: poison-name\r\n\u00dcn\u00efcode: 1\r\n\r\n".encode(),
    b"NATS/1.0\r\nConveyor-Id: poison-utf8\r\nX-Bad: \xff\xfe\r\n\r\n",
]
body = b'{"x":1}'
for hdr in blocks:
    s.sendall(b"HPUB %s %d %d\r\n" % (subject, len(hdr), len(hdr) + len(body)) + hdr + body + b"\r\n")
s.sendall(b"PING\r\n")
assert f.readline().startswith(b"PONG")
print("published", len(blocks))
"#;

/// A job whose header block async-nats cannot parse drops the connection of the worker it is
/// delivered to. It must end in the dead letters with the reason, costing no reconnect after the
/// first, while other jobs keep flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_unreadable_headers_end_dead_and_cost_no_reconnect_loop() {
    let cluster = Cluster::new(Broker::Nats);
    let _agg = cluster.aggregator("aggregator").await;
    let worker = cluster.worker("worker", &["--kinds", "echo", "--concurrency", "4"]);
    cluster.wait_workers(1).await;
    let subject = Names::new(&cluster.ns)
        .expect("namespace")
        .job_subject("echo");
    let out = python(
        RAW_FRAMES,
        vec!["127.0.0.1".into(), "4222".into(), subject.clone()],
    )
    .await;
    assert!(out.contains("published 2"), "{out}");
    let client = cluster.client().await;
    let mut honest = Vec::new();
    for i in 0..5 {
        let id = client
            .publish(&JobSpec::new("echo", json!({ "i": i })))
            .await
            .expect("publish");
        honest.push(id);
    }
    for id in ["poison-name", "poison-utf8"] {
        let r = recorded(cluster.http, id, Duration::from_secs(30)).await;
        assert_eq!(r["status"], "dead", "{id}: {r}");
        let error = r["error"].as_str().unwrap_or_default();
        assert!(error.contains("cannot be read"), "{id}: {error}");
    }
    for id in &honest {
        let r = recorded(cluster.http, id, Duration::from_secs(30)).await;
        assert_eq!(r["status"], "succeeded", "{id}: {r}");
    }
    // Five leases (2 s) more: a job left in the stream would be redelivered and drop the
    // connection again at each.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let log = worker.log_text();
    let disconnects = log.matches("disconnected from NATS").count();
    eprintln!("worker disconnects: {disconnects}");
    assert!(
        disconnects <= 2,
        "at most one reconnect per unreadable job, saw {disconnects}:\n{log}"
    );
    let letters =
        common::read_dead_letters(Broker::Nats, &cluster.ns, 2, Duration::from_secs(10)).await;
    let reasons: Vec<_> = letters
        .iter()
        .map(|m| {
            m.headers
                .get("Conveyor-Error")
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(letters.len(), 2, "{reasons:?}");
    assert!(
        reasons.iter().all(|r| r.contains("cannot be read")),
        "{reasons:?}"
    );
    let (_, stats) = http_get(cluster.http, "/stats").await;
    assert_eq!(stats["results"], 7, "{stats}");
}

both_brokers!(jobs_held_behind_busy_slots_keep_their_lease);

/// With every slot busy for longer than the lease, the jobs a worker already holds must not be
/// redelivered: each of them runs once, as its only attempt, and succeeds.
async fn jobs_held_behind_busy_slots_keep_their_lease(broker: Broker) {
    let config = conveyor::worker::WorkerConfig {
        concurrency: 2,
        lease: Duration::from_secs(2),
        ..test_worker_config()
    };
    let stack = Stack::start(broker, config).await;
    let mut ids = Vec::new();
    for _ in 0..6 {
        let spec = JobSpec::new("sleep", json!({"ms": 3000})).max_attempts(1);
        let id = stack.client.publish(&spec).await.expect("publish");
        ids.push(id);
    }
    for id in &ids {
        let r = recorded(stack.http, id, Duration::from_secs(40)).await;
        assert_eq!(r["status"], "succeeded", "{id}: {r}");
        assert_eq!(r["attempt"], 1, "{id}: {r}");
    }
    // Redelivered copies would arrive as duplicates (or dead) after the originals.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, stats) = http_get(stack.http, "/stats").await;
    eprintln!("stats: {stats}");
    assert_eq!(stats["duplicates"], 0, "{stats}");
    assert_eq!(stats["results"], 6, "{stats}");
    let report = stack.stop().await;
    assert_eq!(report.dead, 0, "{report:?}");
    assert_eq!(report.succeeded, 6, "{report:?}");
}

const DELETE_EXCHANGE: &str = r#"
import sys, pika
params = pika.URLParameters(sys.argv[1])
conn = pika.BlockingConnection(params)
ch = conn.channel()
ch.exchange_delete(sys.argv[2])
conn.close()
print("deleted", sys.argv[2])
"#;

/// RabbitMQ: when the copy of a retried job cannot be published, the delivery must go back to
/// the queue rather than be dropped unsettled, which would hold the kind's prefetch slot (and so
/// stall the kind) until the channel closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_a_retry_that_cannot_be_copied_hands_the_job_back() {
    let config = conveyor::worker::WorkerConfig {
        concurrency: 1,
        kinds: Some(vec!["fail".into()]),
        ..test_worker_config()
    };
    let stack = Stack::start(Broker::Amqp, config).await;
    let retry = Names::new(&stack.ns).expect("namespace").exchange("retry");
    let out = python(DELETE_EXCHANGE, vec![Broker::Amqp.url_str(), retry]).await;
    assert!(out.contains("deleted"), "{out}");
    let once = JobSpec::new("fail", json!({"times": 1})).max_attempts(3);
    let a = stack.client.publish(&once).await.expect("publish");
    let then = JobSpec::new("fail", json!({"times": 0}));
    let b = stack.client.publish(&then).await.expect("publish");
    let rb = recorded(stack.http, &b, Duration::from_secs(30)).await;
    assert_eq!(rb["status"], "succeeded", "{rb}");
    let ra = recorded(stack.http, &a, Duration::from_secs(30)).await;
    assert_eq!(ra["status"], "succeeded", "{ra}");
    assert_eq!(
        ra["attempt"], 2,
        "the redelivery is the second attempt: {ra}"
    );
    stack.stop().await;
}

/// A chord whose callback cannot be published (its input, the members' outputs, is larger than
/// NATS takes) ends `failed` with the reason, and the aggregator's results loop carries on: it
/// is not retried forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_a_chord_callback_too_large_to_publish_ends_failed() {
    use conveyor::workflow::{Chord, Group};
    let stack = Stack::start(Broker::Nats, test_worker_config()).await;
    let big = "x".repeat(450_000);
    let inputs: Vec<Value> = (0..3).map(|i| json!({ "i": i, "pad": big })).collect();
    let chord = Chord::new(Group::of("echo", inputs), "echo");
    let (group, specs) = chord.specs(None).expect("specs");
    for spec in &specs {
        stack.client.publish(spec).await.expect("publish member");
    }
    let callback = conveyor::workflow::callback_id(&group);
    let r = recorded(stack.http, &callback, Duration::from_secs(30)).await;
    assert_eq!(r["status"], "failed", "{r}");
    let error = r["error"].as_str().unwrap_or_default();
    assert!(error.contains("larger than the broker's limit"), "{error}");
    // The results loop is free: a plain job is recorded at once.
    let started = std::time::Instant::now();
    let id = stack
        .client
        .publish(&JobSpec::new("echo", json!(1)))
        .await
        .expect("publish");
    recorded(stack.http, &id, Duration::from_secs(10)).await;
    eprintln!(
        "a plain job after the failed chord recorded in {:?}",
        started.elapsed()
    );
    stack.stop().await;
}
