//! The circuit breaker on both real brokers: it opens after 3 failed attempts in a row, holds the
//! kind's jobs in the broker without spending their attempts, and closes after a probe succeeds
//! once the dependency recovers; both changes are events.

mod common;

use common::{test_worker_config, Broker, Stack};
use conveyor::worker::breaker::{BreakerConfig, BreakerEvent};
use conveyor::worker::{builtin, handler_fn, JobContext, WorkerConfig};
use conveyor::{JobError, JobSpec};
use futures::StreamExt;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

both_brokers!(
    breaker_opens_holds_jobs_and_closes_after_recovery,
    a_worker_started_while_a_breaker_is_open_learns_it,
    a_worker_started_after_the_opener_is_gone_learns_it_from_another,
);

const WAIT: Duration = Duration::from_secs(30);

/// A handler that counts its calls in `calls` and fails (retryably) while `down` is set.
fn flaky(calls: Arc<AtomicU32>, down: Arc<AtomicBool>) -> conveyor::worker::Handler {
    handler_fn(move |_: Value, _: JobContext| {
        let (calls, down) = (calls.clone(), down.clone());
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            if down.load(Ordering::SeqCst) {
                Err(JobError::retry("the dependency is down"))
            } else {
                Ok(json!({"ok": true}))
            }
        }
    })
}

/// When `calls` first rose above zero (ms since the epoch), if that was more than 300 ms before
/// `until_ms`; `None` when nothing was called until then.
async fn first_call_before(calls: &AtomicU32, until_ms: u64) -> Option<u64> {
    let first_call = async {
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        conveyor::job::now_ms()
    };
    let left = until_ms.saturating_sub(conveyor::job::now_ms());
    tokio::time::timeout(Duration::from_millis(left.saturating_sub(300)), first_call)
        .await
        .ok()
}

/// Asserts that no job of the open kind ran before the breaker's end (`early` is when the first
/// did, if it was before), then that all of `ids` succeed.
async fn no_early_call(
    what: &str,
    early: Option<u64>,
    until_ms: u64,
    waiter: &mut conveyor::client::Waiter,
    ids: &[String],
) {
    eprintln!(
        "{what}: breaker open until {until_ms}; first call {early:?} ({} ms before the end)",
        early.map(|at| until_ms.saturating_sub(at)).unwrap_or(0)
    );
    assert!(early.is_none(), "{what} ran a job of the open kind");
    let results = waiter.wait_for(ids, WAIT, |_| {}).await;
    assert_eq!(results.len(), ids.len());
    assert!(results.iter().all(|r| r.succeeded()), "{results:?}");
}

async fn breaker_opens_holds_jobs_and_closes_after_recovery(broker: Broker) {
    let down = Arc::new(AtomicBool::new(true));
    let calls = Arc::new(AtomicU32::new(0));
    let mut registry = builtin::registry();
    registry.register("flaky", flaky(calls.clone(), down.clone()));
    let mut breakers = HashMap::new();
    breakers.insert(
        "flaky".to_string(),
        BreakerConfig::parse("3/2s/1").expect("config"),
    );
    let config = WorkerConfig {
        concurrency: 1,
        breakers,
        ..test_worker_config()
    };
    let stack = Stack::start_with(broker, config, registry).await;
    let mut events = stack
        .client
        .transport()
        .listen_events("flaky.*")
        .await
        .expect("listen");
    let mut waiter = stack.client.waiter().await.expect("waiter");
    let reply = waiter.address().to_string();
    let specs: Vec<JobSpec> = (0..10)
        .map(|i| {
            JobSpec::new("flaky", json!(i))
                .max_attempts(5)
                .reply_to(&reply)
        })
        .collect();
    let ids = common::cluster::publish_all(&stack.client, specs).await;

    // Three failed attempts open it...
    let deadline = tokio::time::Instant::now() + WAIT;
    while calls.load(Ordering::SeqCst) < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "three attempts in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...and while it is open no job of the kind runs.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3, "jobs held while open");
    down.store(false, Ordering::SeqCst);

    let results = waiter.wait_for(&ids, WAIT, |_| {}).await;
    assert_eq!(results.len(), 10);
    assert!(results.iter().all(|r| r.succeeded()), "{results:?}");
    // Holding spent no attempts: only the three failed attempts count.
    let extra: u32 = results.iter().map(|r| r.attempt - 1).sum();
    assert_eq!(extra, 3, "{results:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 13);

    let mut states = Vec::new();
    while states.len() < 2 {
        match tokio::time::timeout(WAIT, events.next()).await {
            Ok(Some(msg)) => {
                // Job events of the kind come on the same pattern.
                if let Ok(ev) = serde_json::from_slice::<BreakerEvent>(&msg.body) {
                    if ev.state.starts_with("breaker-") {
                        states.push(ev.state);
                    }
                }
            }
            _ => break,
        }
    }
    assert_eq!(states, ["breaker-open", "breaker-closed"]);
    stack.stop().await;
}

/// A worker that starts while another's breaker for its kind is open learns it within about a
/// second (the opener repeats its `breaker-open` until it ends) and takes no job of the kind
/// before the breaker's end.
async fn a_worker_started_while_a_breaker_is_open_learns_it(broker: Broker) {
    use conveyor::transport;
    use conveyor::worker;
    use tokio_util::sync::CancellationToken;

    let down = Arc::new(AtomicBool::new(true));
    let (a_calls, b_calls) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let mut breakers = HashMap::new();
    breakers.insert(
        "flaky".to_string(),
        BreakerConfig::parse("3/8s/1").expect("config"),
    );
    let config = WorkerConfig {
        concurrency: 1,
        breakers,
        ..test_worker_config()
    };
    let mut registry = builtin::registry();
    registry.register("flaky", flaky(a_calls.clone(), down.clone()));
    let stack = Stack::start_with(broker, config.clone(), registry).await;
    let mut events = stack
        .client
        .transport()
        .listen_events("flaky.*")
        .await
        .expect("listen");
    let mut waiter = stack.client.waiter().await.expect("waiter");
    let reply = waiter.address().to_string();
    let spec = |i: u32| {
        JobSpec::new("flaky", json!(i))
            .max_attempts(20)
            .reply_to(&reply)
    };
    let mut ids = common::cluster::publish_all(&stack.client, (0..3).map(spec).collect()).await;
    // The first worker's breaker opens...
    let until_ms = loop {
        let msg = tokio::time::timeout(WAIT, events.next())
            .await
            .expect("breaker-open in time")
            .expect("events open");
        if let Ok(ev) = serde_json::from_slice::<BreakerEvent>(&msg.body) {
            if ev.state == "breaker-open" {
                break ev.until_ms.expect("an open breaker says until when");
            }
        }
    };
    // ...then a second worker of the kind starts, whose handler would succeed at once.
    let stop = CancellationToken::new();
    let mut registry = builtin::registry();
    registry.register(
        "flaky",
        flaky(b_calls.clone(), Arc::new(AtomicBool::new(false))),
    );
    let t = transport::connect(&broker.url(), &stack.ns)
        .await
        .expect("connects");
    let second = tokio::spawn(worker::run(
        t,
        registry,
        WorkerConfig {
            concurrency: 4,
            worker_id: "second".into(),
            ..config
        },
        stop.clone(),
        CancellationToken::new(),
    ));
    tokio::time::sleep(Duration::from_millis(2000)).await;
    ids.extend(common::cluster::publish_all(&stack.client, (3..11).map(spec).collect()).await);
    // No job of the kind runs on it before the breaker's end.
    let early = first_call_before(&b_calls, until_ms).await;
    down.store(false, Ordering::SeqCst);
    let what = format!("{broker:?}: the second worker");
    no_early_call(&what, early, until_ms, &mut waiter, &ids).await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), second).await;
    stack.stop().await;
}

/// The worker whose breaker opened stops while the breaker is open; a worker that starts after
/// that learns the open breaker from one that had followed it, and runs nothing before its end.
async fn a_worker_started_after_the_opener_is_gone_learns_it_from_another(broker: Broker) {
    use conveyor::transport;
    use conveyor::worker;
    use tokio_util::sync::CancellationToken;

    let mut breakers = HashMap::new();
    breakers.insert(
        "flaky".to_string(),
        BreakerConfig::parse("3/8s/1").expect("config"),
    );
    let config = WorkerConfig {
        concurrency: 2,
        breakers,
        ..test_worker_config()
    };
    // The stack's own worker takes only `echo`: the kind's workers are the three below.
    let stack = Stack::start(
        broker,
        WorkerConfig {
            kinds: Some(vec!["echo".into()]),
            ..test_worker_config()
        },
    )
    .await;
    let start = |id: &str, calls: Arc<AtomicU32>, down: bool| {
        let (config, ns) = (config.clone(), stack.ns.clone());
        let id = id.to_string();
        async move {
            let mut registry = builtin::registry();
            registry.register("flaky", flaky(calls, Arc::new(AtomicBool::new(down))));
            let t = transport::connect(&broker.url(), &ns)
                .await
                .expect("connects");
            let stop = CancellationToken::new();
            let config = WorkerConfig {
                worker_id: id,
                kinds: Some(vec!["flaky".into()]),
                ..config
            };
            let task = tokio::spawn(worker::run(t, registry, config, stop.clone(), stop.clone()));
            (task, stop)
        }
    };
    let mut events = stack
        .client
        .transport()
        .listen_events("flaky.*")
        .await
        .expect("listen");
    let mut waiter = stack.client.waiter().await.expect("waiter");
    let reply = waiter.address().to_string();
    let spec = |i: u32| {
        JobSpec::new("flaky", json!(i))
            .max_attempts(20)
            .reply_to(&reply)
    };
    let opener_calls = Arc::new(AtomicU32::new(0));
    let (opener, stop_opener) = start("opener", opener_calls, true).await;
    // Its queue exists once it beats (RabbitMQ would route earlier jobs to the unrouted queue).
    let deadline = tokio::time::Instant::now() + WAIT;
    while common::http_get(stack.http, "/stats").await.1["workers"].as_u64() != Some(2) {
        assert!(tokio::time::Instant::now() < deadline, "the opener beats");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut ids = common::cluster::publish_all(&stack.client, (0..3).map(spec).collect()).await;
    let until_ms = loop {
        let msg = tokio::time::timeout(WAIT, events.next())
            .await
            .expect("breaker-open in time")
            .expect("events open");
        if let Ok(ev) = serde_json::from_slice::<BreakerEvent>(&msg.body) {
            if ev.state == "breaker-open" {
                break ev.until_ms.expect("an open breaker says until when");
            }
        }
    };
    // A second worker hears the opener, then the opener stops.
    let calls = Arc::new(AtomicU32::new(0));
    let (second, stop_second) = start("second", calls.clone(), false).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stop_opener.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), opener)
        .await
        .expect("the opener stops");
    // A third starts with only the second to hear.
    let (third, stop_third) = start("third", calls.clone(), false).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    ids.extend(common::cluster::publish_all(&stack.client, (3..11).map(spec).collect()).await);
    let early = first_call_before(&calls, until_ms).await;
    let what = format!("{broker:?}: after the opener had gone, a worker");
    no_early_call(&what, early, until_ms, &mut waiter, &ids).await;
    stop_second.cancel();
    stop_third.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), second).await;
    let _ = tokio::time::timeout(Duration::from_secs(15), third).await;
    stack.stop().await;
}
