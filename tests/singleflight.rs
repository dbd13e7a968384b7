//! Singleflight on both real brokers: 100 jobs with one `Conveyor-Dedup-Key`, in flight at once
//! over three workers (each with its own broker connection), run the handler once and all end
//! with its output; a job with the key published afterwards runs again.

mod common;

use common::{test_worker_config, Broker};
use conveyor::protocol::header;
use conveyor::worker::{handler_fn, JobContext, Registry, WorkerConfig};
use conveyor::{JobError, JobSpec};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

both_brokers!(
    one_key_in_flight_runs_once_across_three_workers,
    another_worker_takes_over_when_the_runner_is_killed,
    cancel_is_outside_singleflight_and_timeout_inside,
    waiting_jobs_take_no_slots_and_all_share_one_run,
    past_its_places_to_wait_a_job_waits_in_a_slot,
    a_cancelled_leader_with_every_place_and_slot_taken_leaves_no_job_stuck,
);

const WAIT: Duration = Duration::from_secs(60);

async fn one_key_in_flight_runs_once_across_three_workers(broker: Broker) {
    let url = broker.url();
    let ns = common::unique_ns("s");
    let runs = Arc::new(AtomicU32::new(0));
    let stop = CancellationToken::new();
    let mut workers = Vec::new();
    for _ in 0..3 {
        let mut registry = Registry::new();
        let counter = runs.clone();
        registry.register(
            "slow-count",
            handler_fn(move |input: Value, _: JobContext| {
                let counter = counter.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(input["ms"].as_u64().unwrap_or(0)))
                        .await;
                    let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                    Ok::<_, JobError>(json!({ "run": n }))
                }
            }),
        );
        let transport = conveyor::transport::connect(&url, &ns)
            .await
            .expect("worker connects");
        let config = WorkerConfig {
            concurrency: 40,
            ..test_worker_config()
        };
        workers.push(tokio::spawn(conveyor::worker::run(
            transport,
            registry,
            config,
            stop.clone(),
            CancellationToken::new(),
        )));
    }
    let client = conveyor::Client::connect(&url, &ns).await.expect("client");
    let mut waiter = client.waiter().await.expect("waiter");
    let reply = waiter.address().to_string();
    let job = |ms: u64| {
        let mut spec = JobSpec::new("slow-count", json!({ "ms": ms })).reply_to(&reply);
        spec.headers.insert(header::DEDUP_KEY, "report-2026-11");
        spec
    };
    // 100 jobs, each running 2 s if it ran: all are in flight together (120 slots).
    let ids = common::cluster::publish_all(&client, (0..100).map(|_| job(2000)).collect()).await;
    let results = waiter.wait_for(&ids, WAIT, |_| {}).await;
    let ran = runs.load(Ordering::SeqCst);
    // After the outcome, the key runs again.
    let again = common::cluster::publish_all(&client, vec![job(0)]).await;
    let later = waiter.wait_for(&again, WAIT, |_| {}).await;
    stop.cancel();
    for w in workers {
        let _ = tokio::time::timeout(WAIT, w).await;
    }
    let _ = client.close().await;
    common::delete_namespace(broker, &ns, &["slow-count".to_string()]);

    assert_eq!(results.len(), 100, "every job got a result");
    assert_eq!(ran, 1, "the handler ran once for 100 jobs with one key");
    for r in &results {
        assert!(r.succeeded(), "{r:?}");
        assert_eq!(r.output, json!({"run": 1}), "{r:?}");
    }
    let ids_seen: std::collections::BTreeSet<_> = results.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids_seen.len(), 100, "each under its own id");
    assert_eq!(later.len(), 1);
    assert_eq!(
        later[0].output,
        json!({"run": 2}),
        "a later job with the key ran again"
    );
}

async fn another_worker_takes_over_when_the_runner_is_killed(broker: Broker) {
    use conveyor::events::JobEvent;
    use futures::StreamExt;
    let cluster = common::cluster::Cluster::new(broker);
    let _aggregator = cluster.aggregator("aggregator").await;
    let args = ["--kinds", "sleep", "--concurrency", "30"];
    let mut procs: Vec<_> = (0..3)
        .map(|n| cluster.worker(&format!("worker-{n}"), &args))
        .collect();
    cluster.wait_workers(3).await;
    let client = cluster.client().await;
    let mut events = conveyor::events::watch(client.transport().as_ref(), Some("sleep"))
        .await
        .expect("watch");
    let mut waiter = client.waiter().await.expect("waiter");
    let reply = waiter.address().to_string();
    let job = || {
        let mut spec = JobSpec::new("sleep", json!({"ms": 4000})).reply_to(&reply);
        spec.headers.insert(header::DEDUP_KEY, "rebuild-index");
        spec
    };
    let first = client.publish(&job()).await.expect("published");
    // The worker that started the first job runs the flight.
    let runner = loop {
        let ev: JobEvent = tokio::time::timeout(WAIT, events.next())
            .await
            .expect("events")
            .expect("event stream");
        if ev.id == first && ev.state == "started" {
            break ev.worker.unwrap_or_default();
        }
    };
    let mut ids = vec![first];
    ids.extend(common::cluster::publish_all(&client, (0..20).map(|_| job()).collect()).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at = procs
        .iter()
        .position(|p| runner.ends_with(&format!("-{}", p.pid())))
        .expect("the runner is one of the workers");
    procs[at].kill9();
    let killed_at = std::time::Instant::now();
    // Nothing hangs: every job ends, the killed worker's ones redelivered to the others.
    let results = waiter.wait_for(&ids, WAIT, |_| {}).await;
    let took = killed_at.elapsed();
    assert_eq!(results.len(), ids.len(), "every job got a result");
    // A surviving worker took the key over and ran the handler once for all the jobs waiting on
    // it (a redelivered copy that arrives after that run may lead one more).
    let leads: usize = procs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != at)
        .map(|(_, p)| p.log_text().matches("leading a singleflight run").count())
        .sum();
    eprintln!("after the kill: {leads} run(s) on the surviving workers, all results in {took:?}");
    assert!(
        (1..=2).contains(&leads),
        "a surviving worker leads the key once (saw {leads} runs)"
    );
    assert!(
        took >= Duration::from_millis(3500),
        "the results came from a whole new 4 s run after the kill ({took:?})"
    );
    assert!(results.iter().all(|r| r.succeeded()), "{results:?}");
    assert!(
        results
            .iter()
            .all(|r| r.worker.as_deref() != Some(runner.as_str())),
        "the killed runner answered none"
    );
}

/// The layer order, seen through the broker: `cancel` wraps `singleflight`, so a waiting job that
/// is cancelled ends at once while its leader runs on; `singleflight` wraps `timeout`, so the
/// leader's deadline bounds the one run and a waiting job without a deadline shares `timed-out`.
async fn cancel_is_outside_singleflight_and_timeout_inside(broker: Broker) {
    let stack = common::Stack::start(broker, test_worker_config()).await;
    let client = &stack.client;
    let sleep = |id: &str, key: &str, ms: u64| {
        JobSpec::new("sleep", json!({ "ms": ms }))
            .id(id)
            .dedup_key(key)
            .max_attempts(1)
    };
    let started = std::time::Instant::now();
    let mut lead = client
        .submit(sleep("order-lead", "order-1", 3000))
        .await
        .expect("submit");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut follow = client
        .submit(sleep("order-follow", "order-1", 3000))
        .await
        .expect("submit");
    tokio::time::sleep(Duration::from_millis(300)).await;
    client
        .cancel(&conveyor::worker::cancel::CancelRequest::job(
            "order-follow",
        ))
        .await
        .expect("cancel");
    let followed = follow.result(WAIT).await.expect("follower's result");
    let cancelled_after = started.elapsed();
    assert_eq!(followed.status, "cancelled", "{followed:?}");
    assert!(
        cancelled_after < Duration::from_millis(2500),
        "the waiting job ended at once, not with its leader ({cancelled_after:?})"
    );
    let led = lead.result(WAIT).await.expect("leader's result");
    assert_eq!(led.status, "succeeded", "{led:?}");

    let mut lead = client
        .submit({
            let mut spec = sleep("order-lead-2", "order-2", 20_000);
            // Long enough for the follower, sent 200 ms later, to join on a loaded machine.
            spec.timeout_ms = Some(3_000);
            spec
        })
        .await
        .expect("submit");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut follow = client
        .submit(sleep("order-follow-2", "order-2", 20_000))
        .await
        .expect("submit");
    let led = lead.result(WAIT).await.expect("leader's result");
    let followed = follow.result(WAIT).await.expect("follower's result");
    assert_eq!(led.status, "timed-out", "{led:?}");
    assert_eq!(
        followed.status, "timed-out",
        "the waiting job shares the leader's timed-out run: {followed:?}"
    );
    stack.stop().await;
}

/// 48 jobs with one key over two worker processes of 8 slots each: the jobs waiting for the run
/// take no slot (and on RabbitMQ no prefetch place), so all 48 end with one run of the handler,
/// in about its time, and 6 jobs without a key published behind them run meanwhile in the slots
/// left free. The handler is `pg.insert` into a table whose trigger sleeps 4 s: PostgreSQL counts
/// the runs. The workers' 2 s lease is shorter than the run, so the waiting jobs' leases must be
/// kept alive: a redelivered one would lead a second run.
async fn waiting_jobs_take_no_slots_and_all_share_one_run(broker: Broker) {
    use common::cluster::Cluster;
    use common::pg::{pg_client, pg_url};
    const RUN: Duration = Duration::from_secs(4);
    let cluster = Cluster::new(broker);
    let table = format!("flight_{}", cluster.ns);
    let observer = pg_client().await;
    observer
        .batch_execute(&format!(
            "CREATE TABLE {table} (job_id text PRIMARY KEY, doc jsonb NOT NULL, \
             inserted_at timestamptz NOT NULL DEFAULT now());
             CREATE FUNCTION {table}_slow() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN PERFORM pg_sleep({}); RETURN NEW; END $$;
             CREATE TRIGGER {table}_slow BEFORE INSERT ON {table}
               FOR EACH ROW EXECUTE FUNCTION {table}_slow();",
            RUN.as_secs()
        ))
        .await
        .expect("slow table");
    let _aggregator = cluster.aggregator("aggregator").await;
    let url = pg_url(&format!("conveyor_{}", cluster.ns));
    let args = [
        "--kinds",
        "pg.insert",
        "--concurrency",
        "8",
        "--pg-url",
        &url,
        "--pg-pool-size",
        "8",
        "--pg-table",
        &table,
    ];
    let _workers: Vec<_> = (0..2)
        .map(|n| cluster.worker(&format!("worker-{n}"), &args))
        .collect();
    cluster.wait_workers(2).await;
    let client = cluster.client().await;
    let mut waiter = client.waiter().await.expect("waiter");
    let reply = waiter.address().to_string();
    let keyed = (0..48)
        .map(|i| {
            JobSpec::new("pg.insert", json!({ "n": i }))
                .dedup_key("monthly-report")
                .reply_to(&reply)
        })
        .collect();
    let unkeyed = (0..6)
        .map(|i| JobSpec::new("pg.insert", json!({ "free": i })).reply_to(&reply))
        .collect();
    let started = std::time::Instant::now();
    let keyed = common::cluster::publish_all(&client, keyed).await;
    let unkeyed = common::cluster::publish_all(&client, unkeyed).await;
    let ids: Vec<String> = keyed.iter().chain(&unkeyed).cloned().collect();
    let results = waiter.wait_for(&ids, WAIT, |_| {}).await;
    let took = started.elapsed();
    let runs: i64 = observer
        .query_one(
            &format!("SELECT count(*) FROM {table} WHERE doc ? 'n'"),
            &[],
        )
        .await
        .expect("count runs")
        .get(0);
    let free: i64 = observer
        .query_one(
            &format!("SELECT count(*) FROM {table} WHERE doc ? 'free'"),
            &[],
        )
        .await
        .expect("count free")
        .get(0);
    let _ = observer
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {table}; DROP FUNCTION IF EXISTS {table}_slow();"
        ))
        .await;
    let _ = client.close().await;
    if broker == Broker::Amqp {
        // The consumers that made room for the waiting jobs are gone with them: one consumer per
        // worker is left on the queue.
        let queue = format!("{}.jobs.pg.insert", cluster.ns);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let consumers = loop {
            let n = amqp_consumers(&queue).await;
            if n == 2 || std::time::Instant::now() > deadline {
                break n;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(consumers, 2, "the extra consumers were cancelled");
    }
    eprintln!(
        "singleflight on {broker:?}: 48 keyed + 6 free jobs over 2 workers x 8 slots in {took:?} \
         (one run is {RUN:?}); the keyed handler ran {runs} time(s), the free ones {free}"
    );
    assert_eq!(results.len(), ids.len(), "every job got a result");
    assert!(results.iter().all(|r| r.succeeded()), "{results:?}");
    assert_eq!(runs, 1, "the handler ran once for the 48 jobs with one key");
    assert_eq!(free, 6, "each job without a key ran");
    assert!(
        took < RUN + RUN * 3 / 4,
        "all ended in about one run's time, not in waves ({took:?} for runs of {RUN:?})"
    );
}

/// The consumers on a RabbitMQ queue, as the broker counts them (pika, a passive declare).
async fn amqp_consumers(queue: &str) -> u64 {
    let script = format!(
        "import pika\n\
         c = pika.BlockingConnection(pika.ConnectionParameters('127.0.0.1'))\n\
         print(c.channel().queue_declare({queue:?}, passive=True).method.consumer_count)\n\
         c.close()\n"
    );
    let out = tokio::process::Command::new("timeout")
        .args(["20", "python3", "-c", &script])
        .output()
        .await
        .expect("python3 runs");
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim().parse().unwrap_or_else(|_| {
        panic!(
            "python3 with pika counts consumers: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// One in-process worker of 2 slots and 1 place to wait on a namespace of its own, running
/// `slow-count` (1.5 s, counting its runs, stopping when its token fires), and a client.
struct OnePlace {
    broker: Broker,
    ns: String,
    runs: Arc<AtomicU32>,
    stop: CancellationToken,
    worker: tokio::task::JoinHandle<conveyor::Result<conveyor::worker::WorkerReport>>,
    client: conveyor::Client,
}

impl OnePlace {
    async fn start(broker: Broker) -> OnePlace {
        let url = broker.url();
        let ns = common::unique_ns("s");
        let runs = Arc::new(AtomicU32::new(0));
        let stop = CancellationToken::new();
        let mut registry = Registry::new();
        let counter = runs.clone();
        registry.register(
            "slow-count",
            handler_fn(move |_: Value, ctx: JobContext| {
                let counter = counter.clone();
                async move {
                    let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(1500)) => {}
                        _ = ctx.cancel.cancelled() => return Err(JobError::Cancelled),
                    }
                    Ok::<_, JobError>(json!({ "run": n }))
                }
            }),
        );
        let transport = conveyor::transport::connect(&url, &ns)
            .await
            .expect("worker connects");
        let config = WorkerConfig {
            concurrency: 2,
            max_followers: 1,
            ..test_worker_config()
        };
        let worker = tokio::spawn(conveyor::worker::run(
            transport,
            registry,
            config,
            stop.clone(),
            CancellationToken::new(),
        ));
        let client = conveyor::Client::connect(&url, &ns).await.expect("client");
        OnePlace {
            broker,
            ns,
            runs,
            stop,
            worker,
            client,
        }
    }

    /// Stops the worker and deletes the namespace; returns the handler's runs.
    async fn stop(self) -> u32 {
        self.stop.cancel();
        let _ = tokio::time::timeout(WAIT, self.worker).await;
        let _ = self.client.close().await;
        common::delete_namespace(self.broker, &self.ns, &["slow-count".to_string()]);
        self.runs.load(Ordering::SeqCst)
    }
}

/// `--max-followers` bounds the jobs waiting without a slot: with one place and two slots, the
/// third job with the key waits in the second slot and the fourth cannot be taken until a slot
/// frees, which is after the run: it (and the fifth) run the handler again.
async fn past_its_places_to_wait_a_job_waits_in_a_slot(broker: Broker) {
    let one = OnePlace::start(broker).await;
    let mut waiter = one.client.waiter().await.expect("waiter");
    let reply = waiter.address().to_string();
    let specs = (0..5)
        .map(|_| {
            JobSpec::new("slow-count", json!({}))
                .dedup_key("one-place")
                .reply_to(&reply)
        })
        .collect();
    let ids = common::cluster::publish_all(&one.client, specs).await;
    let results = waiter.wait_for(&ids, WAIT, |_| {}).await;
    let runs = one.stop().await;
    let mut outputs: Vec<u64> = results
        .iter()
        .map(|r| r.output["run"].as_u64().unwrap_or(0))
        .collect();
    outputs.sort_unstable();
    eprintln!("one place to wait, two slots: runs seen by the five jobs {outputs:?}");
    assert_eq!(results.len(), 5, "every job got a result");
    assert_eq!(
        runs, 2,
        "the jobs taken after the first run ran the handler again"
    );
    assert_eq!(outputs, vec![1, 1, 1, 2, 2], "three shared the first run");
}

/// One place to wait and two slots, four jobs with one key: the leader runs in a slot, the second
/// waits in the place, the third waits in the other slot and the fourth in the broker. The leader
/// is cancelled: one job waiting takes the run over (a new leader needs a slot before it leads,
/// so no job waits in a slot for one that waits for a slot), the others wait for that run, and
/// all end.
async fn a_cancelled_leader_with_every_place_and_slot_taken_leaves_no_job_stuck(broker: Broker) {
    let one = OnePlace::start(broker).await;
    let client = &one.client;
    let mut waiter = client.waiter().await.expect("waiter");
    let reply = waiter.address().to_string();
    let spec = |id: &str| {
        JobSpec::new("slow-count", json!({}))
            .id(id)
            .dedup_key("cancelled-lead")
            .max_attempts(1)
            .reply_to(&reply)
    };
    let mut ids = common::cluster::publish_all(client, vec![spec("lead")]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ids.extend(
        common::cluster::publish_all(client, vec![spec("w1"), spec("w2"), spec("w3")]).await,
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    client
        .cancel(&conveyor::worker::cancel::CancelRequest::job("lead"))
        .await
        .expect("cancel");
    let results = waiter.wait_for(&ids, Duration::from_secs(20), |_| {}).await;
    let runs = one.stop().await;
    let statuses: std::collections::BTreeMap<_, _> = results
        .iter()
        .map(|r| (r.id.clone(), r.status.clone()))
        .collect();
    eprintln!("cancelled leader: {statuses:?}, {runs} run(s)");
    assert_eq!(results.len(), 4, "every job ended: {statuses:?}");
    assert_eq!(statuses["lead"], "cancelled");
    assert_eq!(
        runs, 2,
        "the three jobs waiting shared one run after the cancelled one"
    );
    for id in ["w1", "w2", "w3"] {
        assert_eq!(statuses[id], "succeeded", "{statuses:?}");
    }
}
