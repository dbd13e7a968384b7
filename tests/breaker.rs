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

both_brokers!(breaker_opens_holds_jobs_and_closes_after_recovery);

const WAIT: Duration = Duration::from_secs(30);

async fn breaker_opens_holds_jobs_and_closes_after_recovery(broker: Broker) {
    let down = Arc::new(AtomicBool::new(true));
    let calls = Arc::new(AtomicU32::new(0));
    let mut registry = builtin::registry();
    let (d, c) = (down.clone(), calls.clone());
    registry.register(
        "flaky",
        handler_fn(move |_: Value, _: JobContext| {
            let (down, calls) = (d.clone(), c.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                if down.load(Ordering::SeqCst) {
                    Err(JobError::retry("the dependency is down"))
                } else {
                    Ok(json!({"ok": true}))
                }
            }
        }),
    );
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
