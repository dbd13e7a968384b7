//! Workflows across workers, on both real brokers: chains, groups with both failure policies,
//! chords through an aggregator killed -9 mid-way, and lifecycle events seen by two watchers.

mod common;

use common::cluster::{Cluster, WAIT};
use common::{http_get, test_worker_config, Broker, Proc, Stack};
use conveyor::events::JobEvent;
use conveyor::worker::{handler_fn, JobContext, Registry, WorkerConfig};
use conveyor::workflow::{Chain, Chord, Group, Policy};
use conveyor::{JobError, JobSpec};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::BufRead;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

both_brokers!(
    chain_passes_outputs_along_and_stops_at_a_failed_step,
    group_of_500_over_two_worker_processes_continues_past_failures,
    fail_fast_group_cancels_the_members_not_finished,
    chord_callback_runs_once_through_an_aggregator_kill,
    two_watchers_see_every_event_of_a_run,
    a_tee_copies_jobs_without_taking_or_stalling_work,
    a_restarted_aggregator_republishes_no_callback_that_already_ran,
);

const SHA_ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

async fn chain_passes_outputs_along_and_stops_at_a_failed_step(broker: Broker) {
    let stack = Stack::start(broker, test_worker_config()).await;
    // echo → hash → echo: the hash step gets the echo's output as its input.
    let chain = Chain::new(
        ["echo", "hash", "echo"],
        json!({"data": "abc", "rounds": 1}),
    );
    let mut handle = stack.client.submit(chain).await.expect("submitted");
    let r = handle.result(WAIT).await.expect("chain result");
    assert!(r.succeeded(), "{r:?}");
    assert_eq!(r.output, json!({"sha256": SHA_ABC}));
    assert_eq!((r.step, r.steps), (Some(2), Some(3)));
    assert_eq!(r.id, format!("{}.2", handle.id()));

    // echo → fail (always, 2 attempts) → echo: the chain stops at step 2, step 3 never runs.
    let mut chain = Chain::new(["echo", "fail", "echo"], json!({"times": -1}));
    chain.max_attempts = Some(2);
    let mut handle = stack.client.submit(chain).await.expect("submitted");
    let r = handle.result(WAIT).await.expect("chain result");
    assert_eq!(r.status, "dead", "{r:?}");
    assert_eq!(r.attempt, 2, "the failing step had its retries: {r:?}");
    let error = r.error.clone().unwrap_or_default();
    assert!(
        error.contains("stopped at step 2 of 3 (fail)") && error.contains("fails as asked"),
        "{error}"
    );
    let chain_id = handle.id().to_string();
    common::wait_for_results(stack.http, 3 + 2, WAIT).await;
    let (code, _) = http_get(stack.http, &format!("/jobs/{chain_id}.1")).await;
    assert_eq!(code, 200, "the failed step is recorded");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, _) = http_get(stack.http, &format!("/jobs/{chain_id}.2")).await;
    assert_eq!(code, 404, "the step after the failed one never ran");
    stack.stop().await;
}

/// Two worker processes and an aggregator process of one cluster.
async fn two_workers(broker: Broker, extra: &[&str]) -> (Cluster, Vec<Proc>) {
    let cluster = Cluster::new(broker);
    let mut procs = vec![cluster.aggregator("aggregator").await];
    for n in 0..2 {
        procs.push(cluster.worker(&format!("worker-{n}"), extra));
    }
    (cluster, procs)
}

async fn group_of_500_over_two_worker_processes_continues_past_failures(broker: Broker) {
    let (cluster, _procs) = two_workers(broker, &["--concurrency", "16"]).await;
    let client = cluster.client().await;
    // Every 50th member always fails (one attempt); the others succeed.
    let members: Vec<JobSpec> = (0..500)
        .map(|i| {
            let times = if i % 50 == 7 { -1 } else { 0 };
            JobSpec::new("fail", json!({ "times": times })).max_attempts(1)
        })
        .collect();
    let mut handle = client
        .submit(Group::new(members).id(conveyor::job::new_id()))
        .await
        .expect("submitted");
    let r = handle.result(WAIT).await.expect("group result");
    assert_eq!(r.status, "failed", "{:?}", r.error);
    let members = handle.members();
    assert_eq!(members.len(), 500);
    for (i, m) in members.iter().enumerate() {
        assert_eq!(m.index, Some(i as u32));
        assert_eq!(m.succeeded(), i % 50 != 7, "member {i}: {m:?}");
    }
    let workers: BTreeSet<_> = members.iter().filter_map(|m| m.worker.clone()).collect();
    assert_eq!(
        workers.len(),
        2,
        "both worker processes took members: {workers:?}"
    );

    // The aggregator's view, once it has recorded all of them.
    let path = format!("/groups/{}", handle.id());
    let view = poll_group(&cluster, &path, |v| v["done"] == json!(true)).await;
    assert_eq!(view["size"], json!(500));
    assert_eq!(view["succeeded"], json!(490));
    assert_eq!(view["failed"], json!(10));
    let results = view["results"].as_array().cloned().unwrap_or_default();
    assert_eq!(results.len(), 500);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(
            r["id"],
            json!(format!("{}.{i}", handle.id())),
            "member order"
        );
    }
    let (code, _) = http_get(cluster.http, "/groups/no-such-group").await;
    assert_eq!(code, 404);
}

/// Polls `path` on the cluster's aggregator until `done` says so.
async fn poll_group(cluster: &Cluster, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (code, v) = http_get(cluster.http, path).await;
        if code == 200 && done(&v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} not done in time: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn fail_fast_group_cancels_the_members_not_finished(broker: Broker) {
    let (cluster, _procs) = two_workers(broker, &["--concurrency", "8"]).await;
    let client = cluster.client().await;
    // 499 sleeps of 300 ms would take about 10 s on 16 slots; member 20 fails at once.
    let members: Vec<JobSpec> = (0..500)
        .map(|i| {
            if i == 20 {
                JobSpec::new("fail", json!({"times": -1})).max_attempts(1)
            } else {
                JobSpec::new("sleep", json!({"ms": 300}))
            }
        })
        .collect();
    let started = tokio::time::Instant::now();
    let mut handle = client
        .submit(Group::new(members).policy(Policy::FailFast))
        .await
        .expect("submitted");
    let r = handle.result(WAIT).await.expect("group result");
    let took = started.elapsed();
    assert_eq!(r.status, "failed");
    let members = handle.members();
    assert_eq!(members[20].status, "dead");
    let cancelled: Vec<_> = members.iter().filter(|m| m.status == "cancelled").collect();
    let succeeded = members.iter().filter(|m| m.succeeded()).count();
    assert_eq!(cancelled.len() + succeeded + 1, 500);
    assert!(
        cancelled.len() >= 400,
        "most members were cancelled, not run: {} cancelled, {succeeded} succeeded in {took:?}",
        cancelled.len()
    );
    for m in &cancelled {
        let e = m.error.as_deref().unwrap_or("");
        assert!(e.contains("failed fast") && e.contains("member 20"), "{e}");
    }
    // Members that were running when the failure came were cancelled mid-sleep too: each
    // cancelled member either never ran ("before it ran") or was stopped while running.
    let mid_run = cancelled
        .iter()
        .filter(|m| !m.error.as_deref().unwrap_or("").contains("before it ran"))
        .count();
    eprintln!(
        "fail-fast: {} cancelled ({mid_run} while running), {succeeded} succeeded, {took:?}",
        cancelled.len()
    );
    // 16 slots were running sleeps when member 20 failed: the cancel reaches running members.
    assert!(
        mid_run >= 1,
        "no member was cancelled while running ({} cancelled before they ran)",
        cancelled.len()
    );
    let path = format!("/groups/{}", handle.id());
    let view = poll_group(&cluster, &path, |v| v["done"] == json!(true)).await;
    assert_eq!(view["policy"], json!("fail-fast"));
    assert!(view["first_failure"]
        .as_str()
        .unwrap_or("")
        .contains("member 20"));
}

/// A worker in this process running only kind `tally`, which records every input it runs on.
async fn tally_worker(
    cluster: &Cluster,
    runs: Arc<Mutex<Vec<Value>>>,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let url = conveyor::BrokerUrl::parse(&cluster.url).expect("url");
    let transport = conveyor::transport::connect(&url, &cluster.ns)
        .await
        .expect("connect");
    let mut registry = Registry::new();
    registry.register(
        "tally",
        handler_fn(move |input: Value, _: JobContext| {
            let runs = runs.clone();
            async move {
                runs.lock()
                    .map_err(|_| JobError::retry("poisoned"))?
                    .push(input);
                Ok::<_, JobError>(json!({"tallied": true}))
            }
        }),
    );
    let stop = CancellationToken::new();
    let config = WorkerConfig {
        kinds: Some(vec!["tally".into()]),
        ..test_worker_config()
    };
    let s = stop.clone();
    let task = tokio::spawn(async move {
        let _ =
            conveyor::worker::run(transport, registry, config, s, CancellationToken::new()).await;
    });
    (stop, task)
}

async fn chord_callback_runs_once_through_an_aggregator_kill(broker: Broker) {
    let (cluster, mut procs) =
        two_workers(broker, &["--concurrency", "4", "--kinds", "sleep"]).await;
    // Their queue exists once they beat (RabbitMQ would route earlier jobs to the unrouted queue).
    cluster.wait_workers(2).await;
    let runs = Arc::new(Mutex::new(Vec::new()));
    let (stop_tally, tally) = tally_worker(&cluster, runs.clone()).await;
    let client = cluster.client().await;
    let n = 400;
    let inputs = (0..n).map(|i| json!({"ms": 40 + i % 7}));
    let chord = Chord::new(Group::of("sleep", inputs), "tally");
    let mut waiter = client.waiter().await.expect("waiter");
    let (group, mut specs) = chord.specs(Some(waiter.address())).expect("specs");
    // The last member twice, published at once: two deliveries of it (RabbitMQ; JetStream
    // drops the copy by its id).
    specs.push(specs[n - 1].clone());
    let publishing = common::cluster::publish_all(&client, specs);
    let path = format!("/groups/{group}");
    let killing = async {
        // Killed once some members are recorded, long before all are.
        let view = poll_group(&cluster, &path, |v| v["succeeded"].as_u64() >= Some(40)).await;
        procs[0].kill9();
        tokio::time::sleep(Duration::from_millis(500)).await;
        (view, cluster.aggregator("aggregator-2").await)
    };
    let (_, (at_kill, restarted)) = tokio::join!(publishing, killing);
    procs.push(restarted);
    assert!(
        at_kill["succeeded"].as_u64() < Some(n as u64 / 2),
        "killed mid-way: {}",
        at_kill["succeeded"]
    );
    let callback = conveyor::workflow::callback_id(&group);
    let r = waiter
        .wait_match(WAIT, |r| r.id == callback)
        .await
        .expect("the callback's result");
    assert!(r.succeeded(), "{r:?}");
    assert_eq!(r.output, json!({"tallied": true}));
    // Time for a second run to show up, if there were one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let runs = runs.lock().expect("runs").clone();
    assert_eq!(runs.len(), 1, "the callback ran once");
    let expected: Vec<Value> = (0..n).map(|i| json!({"slept_ms": 40 + i % 7})).collect();
    assert_eq!(runs[0], Value::Array(expected), "ordered member outputs");
    let view = poll_group(&cluster, &path, |v| {
        v["callback"]["state"] == json!("published")
    })
    .await;
    assert_eq!(view["succeeded"], json!(n));
    let (code, rec) = http_get(cluster.http, &format!("/jobs/{callback}")).await;
    assert_eq!((code, rec["status"].clone()), (200, json!("succeeded")));
    stop_tally.cancel();
    let _ = tally.await;
}

/// Runs `conveyor-producer watch --json` until it printed `count` events; returns them.
fn spawn_watcher(cluster_url: &str, ns: &str, count: usize) -> std::process::Child {
    let mut child = std::process::Command::new(common::bin("conveyor-producer"))
        .args([
            "--broker",
            cluster_url,
            "--namespace",
            ns,
            "watch",
            "--json",
        ])
        .args(["--count", &count.to_string(), "--for", "60s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn watch");
    // Subscribed once it says so.
    let stderr = child.stderr.take().expect("stderr");
    let mut line = String::new();
    std::io::BufReader::new(stderr)
        .read_line(&mut line)
        .expect("watch says it is watching");
    assert!(line.contains("watching"), "{line}");
    child
}

async fn two_watchers_see_every_event_of_a_run(broker: Broker) {
    let stack = Stack::start(broker, test_worker_config()).await;
    let url = broker.url().expose().to_string();
    // 20 echo jobs: published, started, succeeded. One fail job that succeeds on its second
    // attempt: published, started, retrying, started, succeeded. One dead: published, started, dead.
    let expected = 20 * 3 + 5 + 3;
    let watchers: Vec<_> = (0..2)
        .map(|_| spawn_watcher(&url, &stack.ns, expected))
        .collect();
    let mut specs: Vec<JobSpec> = (0..20).map(|i| JobSpec::new("echo", json!(i))).collect();
    specs.push(JobSpec::new("fail", json!({"times": 1})).max_attempts(3));
    specs.push(JobSpec::new("fail", json!({"times": -1})).max_attempts(1));
    let ids = common::cluster::publish_all(&stack.client, specs).await;
    let outputs: Vec<_> = tokio::task::spawn_blocking(move || {
        watchers
            .into_iter()
            .map(|w| common::output_within(w, Duration::from_secs(120), "conveyor-producer watch"))
            .collect()
    })
    .await
    .expect("watchers");
    let mut seen_by = Vec::new();
    for out in &outputs {
        let events: Vec<JobEvent> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("an event per line"))
            .collect();
        let set: BTreeSet<(String, String, u32)> = events
            .iter()
            .map(|e| (e.id.clone(), e.state.clone(), e.attempt))
            .collect();
        assert_eq!(events.len(), expected, "{}", common::output_text(out));
        assert_eq!(set.len(), expected, "no event twice");
        seen_by.push(set);
    }
    assert_eq!(seen_by[0], seen_by[1], "both watchers saw the same events");
    let states_of = |id: &str| -> Vec<String> {
        let mut s: Vec<_> = seen_by[0]
            .iter()
            .filter(|(i, _, _)| i == id)
            .map(|(_, s, a)| format!("{s}@{a}"))
            .collect();
        s.sort();
        s
    };
    assert_eq!(
        states_of(&ids[0]),
        ["published@0", "started@1", "succeeded@1"]
    );
    assert_eq!(
        states_of(&ids[20]),
        [
            "published@0",
            "retrying@1",
            "started@1",
            "started@2",
            "succeeded@2"
        ]
    );
    assert_eq!(states_of(&ids[21]), ["dead@1", "published@0", "started@1"]);
    stack.stop().await;
}

async fn a_tee_copies_jobs_without_taking_or_stalling_work(broker: Broker) {
    use conveyor::transport::{ConsumeOptions, Source};
    let stack = Stack::start(broker, test_worker_config()).await;
    let url = broker.url();
    let t = conveyor::transport::connect(&url, &stack.ns)
        .await
        .expect("connect");
    // A tee that never reads: opened, never polled. Its backlog is bounded at 100.
    let bound = 100;
    let idle = t
        .consume(
            Source::Tee {
                kind: "echo".into(),
                name: "idle".into(),
                backlog: bound,
            },
            ConsumeOptions {
                prefetch: 10,
                ..ConsumeOptions::default()
            },
        )
        .await
        .expect("tee opens");
    // A tee that reads: the CLI, for 300 copies.
    let expose = url.expose().to_string();
    let mut reader = std::process::Command::new(common::bin("conveyor-producer"))
        .args(["--broker", &expose, "--namespace", &stack.ns])
        .args(["tee", "echo", "--name", "audit", "--backlog", "100"])
        .args(["--count", "300", "--for", "30s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn tee");
    let mut said = String::new();
    std::io::BufReader::new(reader.stderr.take().expect("stderr"))
        .read_line(&mut said)
        .expect("tee says it is copying");
    assert!(said.contains("copying"), "{said}");

    let specs: Vec<JobSpec> = (0..1000)
        .map(|i| JobSpec::new("echo", json!({"n": i})))
        .collect();
    let ids = common::cluster::publish_all(&stack.client, specs).await;
    // Every job ran: the tees took none and the idle one stalled nothing.
    let stats = common::wait_for_results(stack.http, 1000, WAIT).await;
    let out = tokio::task::spawn_blocking(move || {
        common::output_within(reader, Duration::from_secs(120), "conveyor-producer tee")
    })
    .await
    .expect("join");
    let backlog = t.tee_backlog("echo", "idle").await.expect("backlog");
    drop(idle);
    for name in ["idle", "audit"] {
        t.delete_tee("echo", name).await.expect("delete tee");
    }
    let _ = t.close().await;

    assert_eq!(stats["results"], json!(1000), "{stats}");
    assert_eq!(stats["by_status"]["succeeded"], json!(1000), "{stats}");
    let copies: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a copy per line"))
        .collect();
    // Up to 300; fewer when the reader fell more than its backlog of 100 behind the publisher
    // and the oldest copies were dropped (as a bounded tee does), but never fewer than the
    // backlog that waited for it at the end.
    assert!(
        (100..=300).contains(&copies.len()),
        "copies read: {}",
        copies.len()
    );
    let published: BTreeSet<&String> = ids.iter().collect();
    for c in &copies {
        let id = c["id"].as_str().unwrap_or("").to_string();
        assert!(published.contains(&id), "a copy of a published job: {c}");
        assert_eq!(c["kind"], json!("echo"));
        assert!(c["input"]["n"].is_u64(), "{c}");
    }
    assert!(
        backlog > 0 && backlog <= bound + 10,
        "the idle tee holds copies, within its bound (+ prefetch): {backlog}"
    );
}

/// An aggregator that died after publishing a chord's callback and before marking it published
/// finds the chord still due when it restarts. If the callback has run meanwhile (its result is
/// waiting in the results), it is not published again: recording it once must not depend on
/// the broker dropping a copy (RabbitMQ drops none; JetStream only within its window). A due
/// chord whose callback has no result yet is published, as before.
async fn a_restarted_aggregator_republishes_no_callback_that_already_ran(broker: Broker) {
    use conveyor::aggregator::Store;
    use conveyor::message::{Headers, Message};
    use conveyor::protocol::header;
    use conveyor::result::JobResult;
    use conveyor::transport::{self, ConsumeOptions, Route, Source};
    use conveyor::workflow::Membership;
    use futures::StreamExt;

    let url = broker.url();
    let ns = common::unique_ns("cbr");
    let dir = tempfile::tempdir().expect("tempdir");
    let member = |group: &str, index: u32| {
        let result = JobResult {
            id: conveyor::workflow::member_id(group, index),
            kind: "echo".into(),
            status: "succeeded".into(),
            attempt: 1,
            output: json!(index),
            error: None,
            worker: None,
            group: Some(group.into()),
            index: Some(index),
            chain: None,
            step: None,
            steps: None,
        };
        let membership = Membership {
            group: group.into(),
            size: 2,
            index: Some(index),
            policy: Policy::FailFast,
            chord: Some("cbkind".into()),
            chord_reply_to: None,
        };
        (result, Some(membership))
    };
    {
        let store = Store::open(dir.path()).expect("open");
        let g1 = format!("{ns}-ran");
        let g2 = format!("{ns}-due");
        store
            .record(&[
                member(&g1, 0),
                member(&g1, 1),
                member(&g2, 0),
                member(&g2, 1),
            ])
            .expect("members recorded");
        let mut due = store.due_chords().expect("due");
        due.sort();
        assert_eq!(due, vec![g2.clone(), g1.clone()], "both chords due");
    }
    let t = transport::connect(&url, &ns).await.expect("connects");
    // The callback queue exists (and is read) before the aggregator starts.
    let mut jobs = t
        .consume(
            Source::Kind("cbkind".into()),
            ConsumeOptions {
                prefetch: 10,
                lease: Duration::from_secs(30),
                ephemeral: false,
                cumulative: false,
                one_at_a_time: false,
            },
        )
        .await
        .expect("consumes the callback kind");
    // The first chord's callback ran while the aggregator was down: its result waits.
    let ran = format!("{ns}-ran.callback");
    let h = Headers::new()
        .with(header::ID, ran.clone())
        .with(header::KIND, "cbkind")
        .with(header::STATUS, "succeeded")
        .with(header::ATTEMPT, "1")
        .with(header::WORKER, "elsewhere");
    t.publish(Route::Result("cbkind".into()), Message::new(h, "[0,1]"))
        .await
        .expect("callback result published");

    let stop = CancellationToken::new();
    let (agg, http) = common::spawn_aggregator(&url, &ns, dir.path(), stop.clone()).await;
    // The due chord's callback comes (this proves the callbacks are read here)...
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let due = format!("{ns}-due.callback");
    while !seen.contains(&due) {
        let next = tokio::time::timeout_at(deadline, jobs.next())
            .await
            .unwrap_or_else(|_| panic!("no callback for the due chord within 30 s: {seen:?}"))
            .expect("consumer open")
            .expect("delivery");
        seen.push(conveyor::job::id_of(&next.message.headers).unwrap_or_default());
        next.ack().await.expect("ack");
    }
    // ... and nothing more: the callback that already ran is not published again.
    let quiet = tokio::time::sleep(Duration::from_secs(6));
    tokio::pin!(quiet);
    loop {
        tokio::select! {
            _ = &mut quiet => break,
            d = jobs.next() => {
                let d = d.expect("consumer open").expect("delivery");
                seen.push(conveyor::job::id_of(&d.message.headers).unwrap_or_default());
                d.ack().await.expect("ack");
            }
        }
    }
    println!("callbacks published after the restart: {seen:?}");
    assert_eq!(
        seen,
        vec![due],
        "only the due chord's callback is published"
    );
    let (_, record) = http_get(http, &format!("/jobs/{ran}")).await;
    assert_eq!(
        record["worker"], "elsewhere",
        "the ran callback recorded once: {record}"
    );
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), agg).await;
    drop(jobs);
    t.delete_namespace(&["cbkind".to_string()])
        .await
        .expect("namespace deleted");
}
