//! End to end through the real brokers: producer client → worker → results → aggregator.
//! Worker and aggregator run in this process here; `processes.rs` runs the real binaries.

mod common;

use common::{http_get, read_dead_letters, test_worker_config, wait_for_results, Broker, Stack};
use conveyor::protocol::header;
use conveyor::transport::Route;
use conveyor::{Codec, Headers, JobSpec, Message};
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// Publishes `spec` and waits for its final result.
async fn run_job(stack: &Stack, spec: JobSpec) -> conveyor::JobResult {
    stack
        .client
        .call(spec, WAIT)
        .await
        .expect("a result in time")
}

both_brokers!(
    every_builtin_kind_in_both_codecs,
    fail_retries_then_succeeds_or_dead_letters,
    bad_input_goes_straight_to_the_dead_letters,
    many_jobs_are_recorded_once,
    a_workers_events_arrive_in_the_order_it_sent_them,
    long_job_keeps_its_lease,
    panicking_handler_fails_only_its_job,
    deadline_fails_the_attempt,
    kind_timeout_applies_and_frees_the_slot,
);

async fn every_builtin_kind_in_both_codecs(broker: Broker) {
    let stack = Stack::start(broker, test_worker_config()).await;
    let cases: Vec<(&str, Value, Value)> = vec![
        (
            "echo",
            json!({"a": [1, 2.5, "x", null], "b": {"c": true}}),
            json!({"a": [1, 2.5, "x", null], "b": {"c": true}}),
        ),
        ("sleep", json!({"ms": 30}), json!({"slept_ms": 30})),
        (
            "hash",
            json!({"data": "abc", "rounds": 1}),
            json!({"sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}),
        ),
        (
            "hash",
            json!({"data": "abc", "rounds": 2}),
            json!({"sha256": "4f8b42c22dd3729b519ba6f68d2da7cc5b2d606d05daed5ad5128cc03e6c6358"}),
        ),
        ("fail", json!({"times": 0}), json!({"attempts": 1})),
        (
            "wordcount.map",
            json!("Hello, hello WORLD"),
            json!({"hello": 2, "world": 1}),
        ),
        (
            "wordcount.reduce",
            json!([{"a": 1}, {"a": 2, "b": 1}]),
            json!({"a": 3, "b": 1}),
        ),
    ];
    let mut ids = Vec::new();
    for codec in [Codec::Json, Codec::Bincode] {
        for (kind, input, want) in &cases {
            let spec = JobSpec::new(*kind, input.clone()).codec(codec);
            let r = stack
                .client
                .call(spec, WAIT)
                .await
                .unwrap_or_else(|e| panic!("{kind} {codec:?}: {e}"));
            assert_eq!(r.status, "succeeded", "{kind} {codec:?}: {r:?}");
            assert_eq!(&r.output, want, "{kind} {codec:?}");
            assert_eq!(r.kind, *kind);
            ids.push((r.id, *kind, want.clone()));
        }
    }
    let stats = wait_for_results(stack.http, ids.len() as u64, WAIT).await;
    assert_eq!(stats["results"], json!(ids.len()), "{stats}");
    assert_eq!(stats["by_status"]["succeeded"], json!(ids.len()));
    for (id, kind, want) in &ids {
        let (status, rec) = http_get(stack.http, &format!("/jobs/{id}")).await;
        assert_eq!(status, 200);
        assert_eq!(rec["id"], json!(id));
        assert_eq!(rec["kind"], json!(kind));
        assert_eq!(rec["status"], json!("succeeded"));
        assert_eq!(&rec["output"], want);
    }
    let (status, _) = http_get(stack.http, "/jobs/no-such-job").await;
    assert_eq!(status, 404);
    let (status, health) = http_get(stack.http, "/health").await;
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    stack.stop().await;
}

async fn fail_retries_then_succeeds_or_dead_letters(broker: Broker) {
    let stack = Stack::start(broker, test_worker_config()).await;
    let r = run_job(&stack, JobSpec::new("fail", json!({"times": 2}))).await;
    assert_eq!((r.status.as_str(), r.attempt), ("succeeded", 3), "{r:?}");
    assert_eq!(r.output, json!({"attempts": 3}));

    let r = run_job(
        &stack,
        JobSpec::new("fail", json!({"times": -1})).max_attempts(3),
    )
    .await;
    assert_eq!((r.status.as_str(), r.attempt), ("dead", 3), "{r:?}");
    let error = r.error.clone().unwrap_or_default();
    assert!(error.contains("failed after 3 attempts"), "{error}");
    assert!(error.contains("attempt 3 fails as asked"), "{error}");

    let letters = read_dead_letters(broker, &stack.ns, 1, WAIT).await;
    assert_eq!(letters.len(), 1);
    let h = &letters[0].headers;
    assert_eq!(h.get(header::ID), Some(r.id.as_str()));
    assert_eq!(h.get(header::ATTEMPT), Some("3"));
    assert_eq!(h.get(header::KIND), Some("fail"));
    assert!(h
        .get(header::ERROR)
        .unwrap_or_default()
        .contains("failed after 3 attempts"));
    assert_eq!(
        Codec::Json.decode(&letters[0].body).expect("body"),
        json!({"times": -1})
    );
    let stats = wait_for_results(stack.http, 2, WAIT).await;
    assert_eq!(
        stats["by_status"],
        json!({"dead": 1, "succeeded": 1}),
        "{stats}"
    );
    let report = stack.stop().await;
    assert_eq!(
        report.retried, 4,
        "2 retries of the first job, 2 of the second"
    );
}

async fn bad_input_goes_straight_to_the_dead_letters(broker: Broker) {
    let config = conveyor::worker::WorkerConfig {
        max_body_bytes: 1024,
        ..test_worker_config()
    };
    let stack = Stack::start(broker, config).await;
    let mut waiter = stack.client.waiter().await.expect("waiter");
    let reply = waiter.address().to_string();
    let base = |id: &str| {
        Headers::new()
            .with(header::ID, id)
            .with(header::REPLY_TO, reply.clone())
    };
    let huge = serde_json::to_vec(&"x".repeat(4096)).expect("json");
    let cases: Vec<(&str, &str, Headers, Vec<u8>, &str)> = vec![
        (
            "malformed",
            "echo",
            base("malformed"),
            b"{nope".to_vec(),
            "malformed JSON",
        ),
        (
            "unknown",
            "no-such.kind",
            base("unknown"),
            b"{}".to_vec(),
            "unknown job kind \"no-such.kind\"",
        ),
        (
            "oversize",
            "echo",
            base("oversize"),
            huge,
            "exceeds the limit of 1024 bytes",
        ),
        (
            "bad-header",
            "echo",
            base("bad-header").with(header::MAX_ATTEMPTS, "lots"),
            b"{}".to_vec(),
            "bad header Conveyor-Max-Attempts",
        ),
        (
            "bad-codec",
            "echo",
            base("bad-codec").with(header::CONTENT_TYPE, "text/xml"),
            b"<a/>".to_vec(),
            "unsupported Content-Type",
        ),
        (
            "wrong-input",
            "hash",
            base("wrong-input"),
            br#"{"data": 1}"#.to_vec(),
            "invalid input for kind hash",
        ),
    ];
    for (_, kind, headers, body, _) in &cases {
        stack
            .client
            .transport()
            .publish(
                Route::Job(kind.to_string()),
                Message::new(headers.clone(), body.clone()),
            )
            .await
            .expect("publish");
    }
    let ids: Vec<String> = cases.iter().map(|c| c.0.to_string()).collect();
    let results = waiter.wait_for(&ids, WAIT, |_| {}).await;
    assert_eq!(
        results.len(),
        cases.len(),
        "every bad job got a result: {results:?}"
    );
    let letters = read_dead_letters(broker, &stack.ns, cases.len(), WAIT).await;
    assert_eq!(letters.len(), cases.len());
    for (id, _, _, body, reason) in &cases {
        let r = results.iter().find(|r| r.id == *id).expect("result");
        assert_eq!(r.status, "dead", "{r:?}");
        assert_eq!(r.attempt, 1, "no retries for a permanent error: {r:?}");
        assert!(
            r.error.as_deref().unwrap_or_default().contains(reason),
            "{id}: {:?}",
            r.error
        );
        let letter = letters
            .iter()
            .find(|m| m.headers.get(header::ID) == Some(id))
            .unwrap_or_else(|| panic!("dead letter for {id}"));
        assert!(letter
            .headers
            .get(header::ERROR)
            .unwrap_or_default()
            .contains(reason));
        assert_eq!(&letter.body[..], &body[..], "the original body is kept");
    }
    let stats = wait_for_results(stack.http, cases.len() as u64, WAIT).await;
    assert_eq!(stats["by_status"], json!({"dead": cases.len()}), "{stats}");
    let report = stack.stop().await;
    assert_eq!((report.dead, report.retried), (cases.len() as u64, 0));
}

async fn many_jobs_are_recorded_once(broker: Broker) {
    let stack = Stack::start(broker, test_worker_config()).await;
    let n = 1000;
    let mut waiter = stack.client.waiter().await.expect("waiter");
    let specs: Vec<JobSpec> = (0..n)
        .map(|i| JobSpec::new("echo", json!({"i": i})).reply_to(waiter.address().to_string()))
        .collect();
    let ids: Vec<String> = stack
        .client
        .publish_many(specs, 128, |_| {})
        .await
        .into_iter()
        .map(|r| r.expect("confirmed"))
        .collect();
    let results = waiter.wait_for(&ids, WAIT, |_| {}).await;
    assert_eq!(results.len(), n);
    assert!(results.iter().all(|r| r.succeeded()));
    let stats = wait_for_results(stack.http, n as u64, WAIT).await;
    assert_eq!(stats["results"], json!(n), "{stats}");
    assert_eq!(stats["by_status"]["succeeded"], json!(n));
    stack.stop().await;
}

/// 1,000 echo jobs on a worker of 8 slots: each job's `started` event reaches a watcher before
/// its `succeeded` one (an echo ends a moment after it starts, so events sent over channels or
/// connections that race each other would arrive swapped).
async fn a_workers_events_arrive_in_the_order_it_sent_them(broker: Broker) {
    use futures::StreamExt;
    let stack = Stack::start(broker, test_worker_config()).await;
    let mut events = conveyor::events::watch(stack.client.transport().as_ref(), Some("echo"))
        .await
        .expect("watch");
    let n = 1000;
    let specs: Vec<JobSpec> = (0..n)
        .map(|i| JobSpec::new("echo", json!({"i": i})))
        .collect();
    for r in stack.client.publish_many(specs, 32, |_| {}).await {
        r.expect("confirmed");
    }
    let mut started = std::collections::HashSet::new();
    let (mut ended, mut swapped) = (0, Vec::new());
    while ended < n {
        let ev = tokio::time::timeout(WAIT, events.next())
            .await
            .expect("events within the wait")
            .expect("event stream");
        match ev.state.as_str() {
            "started" => {
                started.insert(ev.id);
            }
            "succeeded" => {
                ended += 1;
                if !started.contains(&ev.id) {
                    swapped.push(ev.id);
                }
            }
            _ => {}
        }
    }
    eprintln!(
        "{broker:?}: {n} jobs, {} ended before they started",
        swapped.len()
    );
    assert!(swapped.is_empty(), "succeeded before started: {swapped:?}");
    stack.stop().await;
}

async fn long_job_keeps_its_lease(broker: Broker) {
    // The stack's lease is 3 s; the job runs 7 s and must not be redelivered meanwhile.
    let stack = Stack::start(broker, test_worker_config()).await;
    let r = run_job(&stack, JobSpec::new("sleep", json!({"ms": 7000}))).await;
    assert_eq!((r.status.as_str(), r.attempt), ("succeeded", 1), "{r:?}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let stats = wait_for_results(stack.http, 1, WAIT).await;
    assert_eq!(
        stats["duplicates"],
        json!(0),
        "no second run of the job: {stats}"
    );
    let report = stack.stop().await;
    assert_eq!((report.succeeded, report.handed_back), (1, 0));
}

async fn panicking_handler_fails_only_its_job(broker: Broker) {
    use conveyor::worker::{builtin, handler_fn, JobContext};
    let mut registry = builtin::registry();
    registry.register(
        "panic",
        handler_fn(|input: Value, _: JobContext| async move {
            if input == json!("boom") {
                panic!("boom asked for");
            }
            Ok::<_, conveyor::JobError>(input)
        }),
    );
    let stack = Stack::start_with(broker, test_worker_config(), registry).await;
    let r = run_job(&stack, JobSpec::new("panic", json!("boom")).max_attempts(2)).await;
    assert_eq!((r.status.as_str(), r.attempt), ("dead", 2), "{r:?}");
    assert!(r
        .error
        .unwrap_or_default()
        .contains("handler panicked: boom asked for"));
    let r = stack
        .client
        .call(JobSpec::new("panic", json!("calm")), WAIT)
        .await
        .expect("the worker lives on");
    assert_eq!(r.output, json!("calm"));
    stack.stop().await;
}

async fn deadline_fails_the_attempt(broker: Broker) {
    let stack = Stack::start(broker, test_worker_config()).await;
    let started = std::time::Instant::now();
    let r = run_job(
        &stack,
        JobSpec::new("sleep", json!({"ms": 20_000}))
            .timeout_ms(300)
            .max_attempts(2),
    )
    .await;
    assert_eq!((r.status.as_str(), r.attempt), ("timed-out", 2), "{r:?}");
    assert!(r
        .error
        .unwrap_or_default()
        .contains("deadline of 300 ms passed"));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the sleeps were cut short"
    );
    stack.stop().await;
}

/// `--timeout sleep=300ms`: a `sleep` job without its own deadline is cut at 300 ms on each
/// attempt and ends `timed-out`; with one slot, the next job runs once the slot is freed; a job
/// with its own `Conveyor-Timeout-Ms` keeps it.
async fn kind_timeout_applies_and_frees_the_slot(broker: Broker) {
    let mut config = test_worker_config();
    config.concurrency = 1;
    config.timeout_grace = Duration::from_millis(200);
    config
        .kind_timeouts
        .insert("sleep".into(), Duration::from_millis(300));
    let stack = Stack::start(broker, config).await;
    let started = std::time::Instant::now();
    let slow = run_job(
        &stack,
        JobSpec::new("sleep", json!({"ms": 20_000})).max_attempts(2),
    )
    .await;
    assert_eq!(
        (slow.status.as_str(), slow.attempt),
        ("timed-out", 2),
        "{slow:?}"
    );
    let next = run_job(&stack, JobSpec::new("echo", json!({"after": "timeout"}))).await;
    assert_eq!(next.status.as_str(), "succeeded", "{next:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the slot was freed after each cut attempt"
    );
    let own = run_job(
        &stack,
        JobSpec::new("sleep", json!({"ms": 600})).timeout_ms(5_000),
    )
    .await;
    assert_eq!(
        own.status.as_str(),
        "succeeded",
        "its own deadline wins: {own:?}"
    );
    stack.stop().await;
}
