//! Cancellation across the cluster, on both real brokers: a running job, a queued one, a group's
//! members, a chain's later steps, a worker that starts after the cancel was sent, and the CLI's
//! answers for finished and unknown ids.

mod common;

use common::{output_text, test_worker_config, Broker, Stack};
use conveyor::client::CancelRequest;
use conveyor::worker::{builtin, WorkerConfig};
use conveyor::workflow::{Chain, Group};
use conveyor::JobSpec;
use serde_json::json;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

both_brokers!(
    running_and_queued_jobs_end_cancelled,
    group_and_chain_cancels_reach_their_members,
    a_worker_started_after_the_cancel_skips_the_job,
    the_cli_says_which_ids_had_finished,
);

const WAIT: Duration = Duration::from_secs(30);

fn one_at_a_time() -> WorkerConfig {
    WorkerConfig {
        concurrency: 1,
        ..test_worker_config()
    }
}

async fn running_and_queued_jobs_end_cancelled(broker: Broker) {
    let stack = Stack::start(broker, one_at_a_time()).await;
    let mut waiter = stack.client.waiter().await.expect("waiter");
    let reply = waiter.address().to_string();
    // One slot: the long sleep runs, the echo waits behind it.
    let running = JobSpec::new("sleep", json!({"ms": 20_000})).reply_to(&reply);
    let queued = JobSpec::new("echo", json!({"x": 1})).reply_to(&reply);
    let running = stack.client.publish(&running).await.expect("published");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let queued = stack.client.publish(&queued).await.expect("published");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = tokio::time::Instant::now();
    stack
        .client
        .cancel(&CancelRequest::job(&queued))
        .await
        .expect("cancel sent");
    stack
        .client
        .cancel(&CancelRequest::job(&running))
        .await
        .expect("cancel sent");
    let results = waiter
        .wait_for(&[running.clone(), queued.clone()], WAIT, |_| {})
        .await;
    assert_eq!(results.len(), 2, "{results:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the 20 s sleep was stopped, not waited for"
    );
    for r in &results {
        assert_eq!(r.status, "cancelled", "{r:?}");
        let e = r.error.as_deref().unwrap_or("");
        if r.id == queued {
            assert!(e.contains("before it ran"), "{e}");
        } else {
            assert!(!e.contains("before it ran"), "{e}");
        }
    }
    // The slot is free again.
    let after = stack
        .client
        .call(JobSpec::new("echo", json!(7)), WAIT)
        .await
        .expect("result");
    assert_eq!(after.output, json!(7));
    stack.stop().await;
}

async fn group_and_chain_cancels_reach_their_members(broker: Broker) {
    let stack = Stack::start(
        broker,
        WorkerConfig {
            concurrency: 4,
            ..test_worker_config()
        },
    )
    .await;
    // 12 members of 10 s: 4 run, 8 wait. All end cancelled in far less than 30 s.
    let members = (0..12).map(|_| json!({"ms": 10_000}));
    let mut group = stack
        .client
        .submit(Group::of("sleep", members))
        .await
        .expect("group");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack
        .client
        .cancel(&CancelRequest {
            group: Some(group.id().to_string()),
            reason: Some("not needed any more".into()),
            ..CancelRequest::default()
        })
        .await
        .expect("cancel sent");
    let summary = group.result(WAIT).await.expect("group result");
    assert_eq!(summary.status, "failed");
    assert_eq!(group.members().len(), 12);
    for m in group.members() {
        assert_eq!(m.status, "cancelled", "{m:?}");
        assert!(m
            .error
            .as_deref()
            .unwrap_or("")
            .contains("not needed any more"));
    }
    // A chain whose first step is running: the chain ends there, cancelled.
    let chain = Chain::new(["sleep", "echo", "echo"], json!({"ms": 10_000}));
    let mut handle = stack.client.submit(chain).await.expect("chain");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack
        .client
        .cancel(&CancelRequest::chain(handle.id()))
        .await
        .expect("cancel sent");
    let r = handle.result(WAIT).await.expect("chain result");
    assert_eq!(r.status, "cancelled");
    assert!(
        r.error
            .as_deref()
            .unwrap_or("")
            .contains("stopped at step 1 of 3 (sleep)"),
        "{r:?}"
    );
    stack.stop().await;
}

async fn a_worker_started_after_the_cancel_skips_the_job(broker: Broker) {
    let url = broker.url();
    let ns = common::unique_ns("c");
    let kinds = builtin::registry().kinds();
    let client = conveyor::Client::connect(&url, &ns).await.expect("client");
    let mut waiter = client.waiter().await.expect("waiter");
    let reply = waiter.address().to_string();
    // No worker yet: the job waits in the broker, and the cancel is sent before any worker runs.
    let id = client
        .publish(&JobSpec::new("echo", json!("never")).reply_to(&reply))
        .await
        .expect("published");
    client
        .cancel(&CancelRequest::job(&id))
        .await
        .expect("cancel sent");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let transport = conveyor::transport::connect(&url, &ns)
        .await
        .expect("worker connects");
    let stop = CancellationToken::new();
    let worker = tokio::spawn(conveyor::worker::run(
        transport,
        builtin::registry(),
        test_worker_config(),
        stop.clone(),
        CancellationToken::new(),
    ));
    let got = waiter
        .wait_for(std::slice::from_ref(&id), WAIT, |_| {})
        .await;
    stop.cancel();
    let _ = tokio::time::timeout(WAIT, worker).await;
    let _ = client.close().await;
    common::delete_namespace(broker, &ns, &kinds);
    assert_eq!(got.len(), 1, "a result for the job");
    assert_eq!(got[0].status, "cancelled");
    assert!(
        got[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("before it ran"),
        "{:?}",
        got[0]
    );
}

async fn the_cli_says_which_ids_had_finished(broker: Broker) {
    let stack = Stack::start(broker, test_worker_config()).await;
    let done = stack
        .client
        .call(JobSpec::new("echo", json!(1)), WAIT)
        .await
        .expect("result");
    common::wait_for_results(stack.http, 1, WAIT).await;
    let url = broker.url().expose().to_string();
    let aggregator = format!("http://{}", stack.http);
    let out = tokio::task::block_in_place(|| {
        common::run_bin(
            "conveyor-producer",
            &[
                "--broker",
                &url,
                "--namespace",
                &stack.ns,
                "cancel",
                &done.id,
                "no-such-job",
                "--aggregator",
                &aggregator,
            ],
            60,
            "warn",
        )
    });
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("{}: already finished (succeeded)", done.id)),
        "{text}"
    );
    assert!(
        text.contains("no-such-job: cancel sent; no result recorded"),
        "{text}"
    );
    stack.stop().await;
}
