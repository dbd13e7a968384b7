//! Delayed jobs (`Conveyor-Not-Before`, `Conveyor-Delay-Ms`), on both real brokers: a job
//! starts no earlier than its time and within a second after, while it waits a worker of one
//! slot runs other jobs, a cancel before its time means it never runs, the times an outside
//! client sends are read (or dead-lettered with the reason), and a waiting job survives its
//! worker killed with -9 and the broker killed with -9 and restarted.

mod common;

use common::checker::History;
use common::own_broker::OwnBroker;
use common::own_nats::OwnNats;
use common::own_rabbit::OwnRabbit;
use common::{python, recorded, test_worker_config, wait_listening, Broker, Proc, Stack};
use conveyor::events::JobEvent;
use conveyor::protocol::header;
use conveyor::worker::cancel::CancelRequest;
use conveyor::worker::WorkerConfig;
use conveyor::{BrokerUrl, Client, JobSpec};
use futures::StreamExt;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

both_brokers!(
    a_delayed_job_starts_at_its_time_and_holds_no_slot,
    a_delayed_job_cancelled_before_its_time_never_runs,
    times_from_an_outside_client_are_read_or_dead_lettered,
    a_delayed_job_survives_its_worker_and_the_broker_killed,
);

const WAIT: Duration = Duration::from_secs(60);

fn one_slot() -> WorkerConfig {
    WorkerConfig {
        concurrency: 1,
        ..test_worker_config()
    }
}

/// The `Conveyor-Not-Before` a spec carries, in epoch milliseconds.
fn due_of(spec: &JobSpec) -> u64 {
    spec.headers
        .get(header::NOT_BEFORE)
        .and_then(|v| v.parse().ok())
        .expect("a delayed spec has its time")
}

/// Reads events until `until` says stop, bounded by [`WAIT`]: every event by job id and state.
async fn events_until(
    events: &mut futures::stream::BoxStream<'static, JobEvent>,
    mut until: impl FnMut(&HashMap<(String, String), JobEvent>) -> bool,
) -> HashMap<(String, String), JobEvent> {
    let mut seen = HashMap::new();
    while !until(&seen) {
        let ev = tokio::time::timeout(WAIT, events.next())
            .await
            .expect("events within a minute")
            .expect("event stream");
        seen.insert((ev.id.clone(), ev.state.clone()), ev);
    }
    seen
}

/// A job delayed 3 s on a worker of one slot: 20 short jobs published after it all finish
/// before its time (it holds no slot while it waits), and it starts no earlier than its time
/// and within a second after, on its first attempt.
async fn a_delayed_job_starts_at_its_time_and_holds_no_slot(broker: Broker) {
    let stack = Stack::start(broker, one_slot()).await;
    let mut events = conveyor::events::watch(stack.client.transport().as_ref(), None)
        .await
        .expect("watch");
    let id = format!("{}-later", stack.ns);
    let spec = JobSpec::new("echo", json!({"later": true}))
        .id(&id)
        .delay(Duration::from_secs(3));
    let due = due_of(&spec);
    stack.client.publish(&spec).await.expect("publish");
    let others: Vec<JobSpec> = (0..20)
        .map(|i| JobSpec::new("sleep", json!({"ms": 50})).id(format!("{}-now-{i}", stack.ns)))
        .collect();
    let ids: Vec<String> = others.iter().filter_map(|s| s.id.clone()).collect();
    for r in stack.client.publish_many(others, 8, |_| {}).await {
        r.expect("publish");
    }
    let key = |id: &str, state: &str| (id.to_string(), state.to_string());
    let seen = events_until(&mut events, |seen| {
        seen.contains_key(&key(&id, "succeeded"))
            && ids.iter().all(|i| seen.contains_key(&key(i, "succeeded")))
    })
    .await;
    let started = seen[&key(&id, "started")].at_ms;
    let last_other = ids
        .iter()
        .map(|i| seen[&key(i, "succeeded")].at_ms)
        .max()
        .unwrap_or(0);
    eprintln!(
        "{broker:?}: due at {due}, started {} ms after; the 20 others ended {} ms before it was due",
        started as i64 - due as i64,
        due as i64 - last_other as i64
    );
    assert!(started >= due, "started before its time: {started} < {due}");
    assert!(
        started <= due + 1_000,
        "started within a second of its time: {} ms late",
        started - due
    );
    assert!(
        last_other < due,
        "the others ran while it waited, not after it: the last ended at {last_other}, due {due}"
    );
    let rec = recorded(stack.http, &id, WAIT).await;
    assert_eq!(rec["status"], "succeeded", "{rec}");
    assert_eq!(rec["attempt"], 1, "waiting spent no attempt: {rec}");
    stack.stop().await;
}

/// A job delayed 4 s and cancelled half a second after its publish ends `cancelled` without
/// ever starting.
async fn a_delayed_job_cancelled_before_its_time_never_runs(broker: Broker) {
    let stack = Stack::start(broker, test_worker_config()).await;
    let mut events = conveyor::events::watch(stack.client.transport().as_ref(), Some("echo"))
        .await
        .expect("watch");
    let id = format!("{}-cancelled", stack.ns);
    let spec = JobSpec::new("echo", json!({}))
        .id(&id)
        .delay(Duration::from_secs(4));
    let control = JobSpec::new("echo", json!({}))
        .id(format!("{id}-control"))
        .delay(Duration::from_secs(4));
    stack.client.publish(&spec).await.expect("publish");
    stack.client.publish(&control).await.expect("publish");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack
        .client
        .cancel(&CancelRequest::job(&id))
        .await
        .expect("cancel");
    let rec = recorded(stack.http, &id, WAIT).await;
    let control_rec = recorded(stack.http, &format!("{id}-control"), WAIT).await;
    assert_eq!(rec["status"], "cancelled", "{rec}");
    assert!(
        rec["error"]
            .as_str()
            .is_some_and(|e| e.contains("before it ran")),
        "{rec}"
    );
    assert_eq!(control_rec["status"], "succeeded", "{control_rec}");
    let seen = events_until(&mut events, |seen| {
        seen.contains_key(&(format!("{id}-control"), "succeeded".to_string()))
    })
    .await;
    assert!(
        !seen.contains_key(&(id.clone(), "started".to_string())),
        "the cancelled job never started: {seen:?}"
    );
    stack.stop().await;
}

const NATS_TIMES: &str = r#"
import asyncio, json, sys, time, datetime
import nats

async def main():
    url, ns = sys.argv[1], sys.argv[2]
    nc = await nats.connect(url)
    js = nc.jetstream()
    now = time.time()
    at = datetime.datetime.fromtimestamp(now + 2, datetime.timezone.utc).isoformat()
    jobs = [(f"{ns}-{suffix}", {name: at if value == "AT" else value})
            for suffix, name, value in json.loads(sys.argv[3])]
    for job_id, h in jobs:
        await js.publish(f"{ns}.jobs.echo", b'{"outside":true}', headers=dict(h, **{"Nats-Msg-Id": job_id}))
    print(json.dumps({"published_ms": int(now * 1000), "at": at}))
    await nc.close()

asyncio.run(main())
"#;

const AMQP_TIMES: &str = r#"
import json, sys, time, datetime
import pika

url, ns = sys.argv[1], sys.argv[2]
conn = pika.BlockingConnection(pika.URLParameters(url))
ch = conn.channel()
ch.confirm_delivery()
now = time.time()
at = datetime.datetime.fromtimestamp(now + 2, datetime.timezone.utc).isoformat()
jobs = [(f"{ns}-{suffix}", {name: at if value == "AT" else value})
        for suffix, name, value in json.loads(sys.argv[3])]
for job_id, h in jobs:
    ch.basic_publish(exchange=f"{ns}.jobs", routing_key="echo", body=b'{"outside":true}',
                     properties=pika.BasicProperties(message_id=job_id, headers=h, delivery_mode=2),
                     mandatory=True)
print(json.dumps({"published_ms": int(now * 1000), "at": at}))
conn.close()
"#;

/// An outside client (nats-py, pika) sends a relative delay and an RFC 3339 time with an offset:
/// both jobs start no earlier than 2 s after the publish. A time that cannot be read and a
/// negative delay are dead-lettered with the header named.
async fn times_from_an_outside_client_are_read_or_dead_lettered(broker: Broker) {
    let stack = Stack::start(broker, test_worker_config()).await;
    let mut events = conveyor::events::watch(stack.client.transport().as_ref(), Some("echo"))
        .await
        .expect("watch");
    let program = match broker {
        Broker::Nats => NATS_TIMES,
        Broker::Amqp => AMQP_TIMES,
    };
    // Each job: id suffix, header, value ("AT": an RFC 3339 time 2 s ahead, with an offset).
    let jobs = json!([
        ["delay-ms", header::DELAY_MS, "2000"],
        ["rfc3339", header::NOT_BEFORE, "AT"],
        ["garbage", header::NOT_BEFORE, "next tuesday"],
        ["negative", header::DELAY_MS, "-5"],
    ]);
    let args = vec![broker.url_str(), stack.ns.clone(), jobs.to_string()];
    let out = python(program, args).await;
    let sent: Value = serde_json::from_str(out.trim()).expect("the client prints JSON");
    let published = sent["published_ms"].as_u64().expect("published_ms");
    let ns = &stack.ns;
    for (suffix, name) in [
        ("garbage", header::NOT_BEFORE),
        ("negative", header::DELAY_MS),
    ] {
        let rec = recorded(stack.http, &format!("{ns}-{suffix}"), WAIT).await;
        assert_eq!(rec["status"], "dead", "{suffix}: {rec}");
        let error = rec["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(name),
            "{suffix}: the reason names {name}: {error}"
        );
    }
    let waited = [format!("{ns}-delay-ms"), format!("{ns}-rfc3339")];
    let seen = events_until(&mut events, |seen| {
        waited
            .iter()
            .all(|id| seen.contains_key(&(id.clone(), "succeeded".to_string())))
    })
    .await;
    for id in &waited {
        let started = seen[&(id.clone(), "started".to_string())].at_ms;
        eprintln!(
            "{broker:?}: {id} started {} ms after its publish (sent {})",
            started as i64 - published as i64,
            sent["at"]
        );
        // The RFC 3339 time has microseconds; the relative delay counts from a worker's first
        // sight, after the publish.
        assert!(
            started + 1 >= published + 2_000,
            "{id} started before its time: {} ms after the publish",
            started as i64 - published as i64
        );
        // Late by hops through the delay queues (each a round trip through a worker), not by
        // a whole hop of the longest kind: a wide margin for a loaded machine.
        assert!(
            started <= published + 2_000 + 5_000,
            "{id} started late: {} ms after the publish",
            started - published
        );
    }
    stack.stop().await;
}

/// Ten jobs delayed 30 s; their worker is killed with -9 after 2 s and the broker killed with
/// -9 and restarted after 4 s; a new worker starts. None is recorded 2 s before its time; every
/// job is recorded once, on its first attempt.
async fn a_delayed_job_survives_its_worker_and_the_broker_killed(broker: Broker) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut own, boot): (Box<dyn OwnBroker>, Duration) = match broker {
        Broker::Nats => (
            Box::new(OwnNats::new(dir.path().join("js"))),
            Duration::from_secs(10),
        ),
        Broker::Amqp => (
            Box::new(OwnRabbit::new(dir.path().join("rabbit"))),
            Duration::from_secs(90),
        ),
    };
    own.start();
    wait_listening(&own.addr(), boot).await;
    let url = own.url();
    let ns = "delayed";
    let http = format!("127.0.0.1:{}", common::free_port());
    let store = dir.path().join("agg");
    let _aggregator = Proc::spawn(
        "aggregator",
        "conveyor-aggregator",
        &[
            "--broker",
            &url,
            "--namespace",
            ns,
            "--http",
            &http,
            "--store",
            store.to_str().expect("utf-8"),
        ],
        dir.path(),
    );
    wait_listening(&http, Duration::from_secs(30)).await;
    let worker_args = [
        "--broker",
        &url,
        "--namespace",
        ns,
        "--kinds",
        "echo",
        "--lease",
        "3s",
    ];
    let mut first = Proc::spawn("worker-1", "conveyor-worker", &worker_args, dir.path());
    let http: std::net::SocketAddr = http.parse().expect("addr");
    let deadline = tokio::time::Instant::now() + WAIT;
    while common::stats(http).await["workers"].as_u64() != Some(1) {
        assert!(tokio::time::Instant::now() < deadline, "the worker beats");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let client = Client::connect(&BrokerUrl::parse(&url).expect("url"), ns)
        .await
        .expect("client");
    let history = History::observe_durably(&client).await;
    let specs: Vec<JobSpec> = (0..10)
        .map(|i| {
            JobSpec::new("echo", json!({ "i": i }))
                .id(format!("waits-{i}"))
                // Long enough for a loaded machine to restart its own broker before it is due.
                .delay(Duration::from_secs(45))
        })
        .collect();
    let due = specs.iter().map(due_of).min().unwrap_or(0);
    let ids = common::cluster::publish_all(&client, specs).await;
    drop(client);
    tokio::time::sleep(Duration::from_secs(2)).await;
    first.kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    own.kill9();
    tokio::time::sleep(Duration::from_millis(700)).await;
    own.start();
    wait_listening(&own.addr(), boot).await;
    let second = Proc::spawn("worker-2", "conveyor-worker", &worker_args, dir.path());
    let early = Duration::from_millis(due.saturating_sub(conveyor::job::now_ms() + 2_000));
    assert!(
        early > Duration::from_secs(5),
        "the faults took too long to check for early runs: {early:?} left"
    );
    tokio::time::sleep(early).await;
    for id in &ids {
        let (code, rec) = common::http_get(http, &format!("/jobs/{id}")).await;
        assert_eq!(code, 404, "{id} ran 2 s before its time: {rec}");
    }
    let v = history
        .verdict(http, &ids, &[], Duration::from_secs(120))
        .await;
    v.assert_clean("delayed jobs across a worker and a broker killed");
    v.assert_statuses("echo", &["succeeded"]);
    assert_eq!(v.recorded, 10);
    // Waiting spends no attempt. A run whose result the broker refused (a queue still
    // recovering from the restart, say) is handed back and is an attempt: the worker says so,
    // naming the job, and only then may the record show a later one.
    let second_log = second.log_text();
    let mut refused = 0;
    for id in &ids {
        let rec = recorded(http, id, WAIT).await;
        let handed_back = second_log
            .lines()
            .filter(|l| l.contains("result not confirmed") && l.contains(&format!("job={id} ")))
            .count();
        refused += handed_back;
        assert_eq!(
            rec["attempt"].as_u64(),
            Some(1 + handed_back as u64),
            "waiting spent no attempt ({handed_back} results refused): {rec}\nworker-1:\n{}\nworker-2:\n{second_log}",
            first.log_text(),
        );
    }
    eprintln!("{broker:?}: {refused} results refused after the restart and run again");
    eprintln!(
        "{broker:?}: all 10 recorded {} ms after the first was due; verdict {v:?}",
        conveyor::job::now_ms() as i64 - due as i64
    );
    own.kill9();
}

const DELETE_CONSUMER: &str = r#"
import asyncio, sys
import nats

async def main():
    url, stream = sys.argv[1], sys.argv[2]
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.delete_consumer(stream, "waiting")
    print("deleted")
    await nc.close()

asyncio.run(main())
"#;

/// NATS: the waiting jobs' consumer deleted under a running worker (by an operator, or with its
/// stream) is made again, and delayed jobs published after still run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_the_waiting_consumer_deleted_is_made_again() {
    let stack = Stack::start(Broker::Nats, test_worker_config()).await;
    let names = conveyor::protocol::Names::new(&stack.ns).expect("namespace");
    let first = JobSpec::new("echo", json!({}))
        .id(format!("{}-before", stack.ns))
        .delay(Duration::from_secs(1));
    stack.client.publish(&first).await.expect("publish");
    recorded(stack.http, &format!("{}-before", stack.ns), WAIT).await;
    let out = python(
        DELETE_CONSUMER,
        vec![Broker::Nats.url_str(), names.stream("delayed")],
    )
    .await;
    assert!(out.contains("deleted"), "{out}");
    let after = JobSpec::new("echo", json!({}))
        .id(format!("{}-after", stack.ns))
        .delay(Duration::from_secs(1));
    stack.client.publish(&after).await.expect("publish");
    let rec = recorded(stack.http, &format!("{}-after", stack.ns), WAIT).await;
    assert_eq!(rec["status"], "succeeded", "{rec}");
    stack.stop().await;
}
