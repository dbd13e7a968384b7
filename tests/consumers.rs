//! Consumer settings the broker keeps: a changed `--lease` must change the broker's consumer
//! (JetStream AckWait) of jobs, results and permits, not be ignored because the consumer exists.
//! RabbitMQ has no lease (a delivery is redelivered when its connection drops), so these run on
//! NATS only.

mod common;

use common::{delete_namespace, unique_ns, Broker};
use conveyor::transport::{self, ConsumeOptions, DeliveryStream, Route, Source, Transport};
use conveyor::{Headers, Message};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

fn lease(secs: u64) -> ConsumeOptions {
    ConsumeOptions {
        prefetch: 4,
        lease: Duration::from_secs(secs),
        ..ConsumeOptions::default()
    }
}

/// Takes one delivery and keeps it unsettled; returns how long until the broker delivers it
/// again (bounded by `within`).
async fn redelivered_after(stream: &mut DeliveryStream, within: Duration) -> Option<Duration> {
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a first delivery in time")
        .expect("stream open")
        .expect("delivery");
    let taken = Instant::now();
    let again = tokio::time::timeout(within, async {
        loop {
            match stream.next().await {
                Some(Ok(d)) if d.delivery_count >= 2 => return d,
                Some(Ok(d)) => d.nack().await.expect("nack"),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .ok()?;
    let took = taken.elapsed();
    drop(first);
    again.ack().await.expect("ack");
    Some(took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_a_changed_lease_changes_the_brokers_consumers() {
    let url = Broker::Nats.url();
    let ns = unique_ns("lease");
    let t: Arc<dyn Transport> = transport::connect(&url, &ns).await.expect("connect");
    // Consumers made with a 30 s lease, as by an earlier run.
    drop(
        t.consume(Source::Kind("echo".into()), lease(30))
            .await
            .expect("consume"),
    );
    drop(
        t.consume(Source::Results("agg".into()), lease(30))
            .await
            .expect("consume"),
    );
    drop(t.permits("sleep", 1, lease(30)).await.expect("permits"));

    let job = Message::new(Headers::new().with("Conveyor-Id", "lease-job"), "{}");
    t.publish(Route::Job("echo".into()), job)
        .await
        .expect("publish");
    let result = Message::new(
        Headers::new()
            .with("Conveyor-Id", "lease-result")
            .with("Conveyor-Status", "succeeded"),
        "{}",
    );
    t.publish(Route::Result("echo".into()), result)
        .await
        .expect("publish");

    let within = Duration::from_secs(10);
    let mut jobs = t
        .consume(Source::Kind("echo".into()), lease(1))
        .await
        .expect("consume");
    let mut results = t
        .consume(Source::Results("agg".into()), lease(1))
        .await
        .expect("consume");
    let mut permits = t.permits("sleep", 1, lease(1)).await.expect("permits");
    let (j, r, p) = tokio::join!(
        redelivered_after(&mut jobs, within),
        redelivered_after(&mut results, within),
        redelivered_after(&mut permits, within),
    );
    eprintln!("redelivered after: job {j:?}, result {r:?}, permit {p:?} (lease now 1 s, was 30 s)");
    delete_namespace(Broker::Nats, &ns, &[]);
    assert!(j.is_some(), "the jobs consumer kept its 30 s lease");
    assert!(r.is_some(), "the results consumer kept its 30 s lease");
    assert!(p.is_some(), "the permits consumer kept its 30 s lease");
}

/// A job a worker re-publishes after a lease ran out (a chain's next step, published again by
/// the step's second run) must still be dropped as a copy: a worker widens the jobs stream's
/// de-duplication window to its lease times the attempts. Here the stream is one an older
/// version made with a 1 s window, and the worker's lease is 2 s (so 10 s): a copy published
/// 2.5 s after the first is dropped. RabbitMQ drops no copies at all (the aggregator records
/// each id once on both brokers: `workflows::*::a_restarted_aggregator_*`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_a_worker_widens_the_dedup_window_to_its_lease_times_attempts() {
    use async_nats::jetstream;
    use conveyor::worker::{self, builtin, WorkerConfig};
    use tokio_util::sync::CancellationToken;

    let url = Broker::Nats.url();
    let ns = unique_ns("window");
    let t: Arc<dyn Transport> = transport::connect(&url, &ns).await.expect("connect");
    let name = conveyor::protocol::Names::new(&ns)
        .expect("names")
        .stream("jobs");
    let js = jetstream::new(async_nats::connect("127.0.0.1:4222").await.expect("nats"));
    let info = |js: jetstream::Context, name: String| async move {
        js.get_stream(&name)
            .await
            .expect("jobs stream")
            .info()
            .await
            .expect("info")
            .clone()
    };
    let window = |js: jetstream::Context, name: String| async move {
        info(js, name).await.config.duplicate_window
    };
    // An older stream: 1 s.
    let mut config = info(js.clone(), name.clone()).await.config;
    config.duplicate_window = Duration::from_secs(1);
    js.update_stream(config).await.expect("narrowed");

    let stop = CancellationToken::new();
    let config = WorkerConfig {
        kinds: Some(vec!["echo".into()]),
        lease: Duration::from_secs(2),
        heartbeat: Duration::from_millis(200),
        ..WorkerConfig::default()
    };
    let w = tokio::spawn(worker::run(
        t.clone(),
        builtin::registry(),
        config,
        stop.clone(),
        CancellationToken::new(),
    ));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut now = window(js.clone(), name.clone()).await;
    while now < Duration::from_secs(10) && Instant::now() < deadline && !w.is_finished() {
        tokio::time::sleep(Duration::from_millis(100)).await;
        now = window(js.clone(), name.clone()).await;
    }
    eprintln!("jobs stream de-duplication window with a 2 s lease: {now:?} (was 1 s)");
    // The same job id twice, 2.5 s apart, of a kind no worker takes: one stored copy.
    let job = || Message::new(Headers::new().with("Conveyor-Id", "again"), "{}");
    t.publish(Route::Job("parked".into()), job())
        .await
        .expect("publish");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    t.publish(Route::Job("parked".into()), job())
        .await
        .expect("publish");
    let stored = info(js.clone(), name.clone()).await.state.messages;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), w).await;
    delete_namespace(Broker::Nats, &ns, &[]);
    assert_eq!(
        now,
        Duration::from_secs(10),
        "widened to the lease times 5 attempts"
    );
    assert_eq!(stored, 1, "the copy published 2.5 s later was dropped");
}
