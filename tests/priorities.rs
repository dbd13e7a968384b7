//! Priorities (`Conveyor-Priority`: lanes a worker reads in turns), on both real brokers: high
//! jobs published behind a backlog of 500 normal and low ones all finish before the 50th of the
//! backlog, and a retried high job comes back to its lane; low jobs still get their share of a
//! backlog of high ones; an outside client (nats-py, pika) chooses the lane by the address it
//! publishes to, and a level that is none is dead-lettered with the header named; a schedule's
//! jobs take its priority; a tee copies every lane, under the kind.

mod common;

use common::{python, recorded, test_worker_config, Broker, Stack};
use conveyor::events::JobEvent;
use conveyor::priority::Priority;
use conveyor::protocol::header;
use conveyor::worker::{builtin, handler_fn, JobContext, Registry, WorkerConfig};
use conveyor::{JobError, JobSpec};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

both_brokers!(
    high_jobs_jump_a_backlog_of_low_ones,
    low_jobs_get_a_share_of_a_backlog_of_high_ones,
    an_outside_client_chooses_the_lane_by_its_address,
    a_schedules_jobs_take_its_priority,
    a_tee_copies_every_lane_under_its_kind,
);

const WAIT: Duration = Duration::from_secs(90);

fn two_slots() -> WorkerConfig {
    WorkerConfig {
        concurrency: 2,
        ..test_worker_config()
    }
}

#[derive(Deserialize)]
struct WorkIn {
    ms: u64,
    #[serde(default)]
    fail_times: u32,
}

/// `work`: sleeps `ms`, and fails (to be retried) its first `fail_times` attempts.
async fn work(input: WorkIn, ctx: JobContext) -> Result<Value, JobError> {
    tokio::time::sleep(Duration::from_millis(input.ms)).await;
    if ctx.meta.attempt <= input.fail_times {
        return Err(JobError::retry("fails as asked"));
    }
    Ok(json!({"attempt": ctx.meta.attempt}))
}

/// Publishes `backlog` and reads events until five of its jobs are done: its ids, and the
/// events seen.
async fn backlog_running(
    stack: &Stack,
    events: &mut Events,
    backlog: Vec<JobSpec>,
) -> (Vec<String>, Seen) {
    let ids: Vec<String> = backlog.iter().filter_map(|s| s.id.clone()).collect();
    for r in stack.client.publish_many(backlog, 64, |_| {}).await {
        r.expect("backlog job published");
    }
    let mut seen = Seen::new();
    events_until(events, &mut seen, |s| done(s, &ids) >= 5).await;
    (ids, seen)
}

/// The built-in kinds and `work`, on a worker of two slots.
async fn start(broker: Broker) -> Stack {
    let mut registry: Registry = builtin::registry();
    registry.register("work", handler_fn(work));
    Stack::start_with(broker, two_slots(), registry).await
}

/// Every job event of a namespace, as it comes.
type Events = futures::stream::BoxStream<'static, JobEvent>;

/// The events of `stack`'s namespace, from now.
async fn watching(stack: &Stack) -> Events {
    conveyor::events::watch(stack.client.transport().as_ref(), None)
        .await
        .expect("watch")
}

/// Every event seen, by job id and state.
type Seen = HashMap<(String, String), JobEvent>;

/// Reads events until `until` says stop, bounded by [`WAIT`].
async fn events_until(events: &mut Events, seen: &mut Seen, mut until: impl FnMut(&Seen) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !until(seen) {
        let ev = tokio::time::timeout_at(deadline, events.next())
            .await
            .unwrap_or_else(|_| panic!("events within {WAIT:?}; {} seen", seen.len()))
            .expect("event stream");
        seen.insert((ev.id.clone(), ev.state.clone()), ev);
    }
}

/// When each of `ids` reached `state`, for those that did.
fn times(seen: &Seen, ids: &[String], state: &str) -> Vec<u64> {
    ids.iter()
        .filter_map(|id| seen.get(&(id.clone(), state.to_string())))
        .map(|e| e.at_ms)
        .collect()
}

fn done(seen: &Seen, ids: &[String]) -> usize {
    times(seen, ids, "succeeded").len()
}

/// Reads events until every one of `high` succeeded and 100 of `backlog` did (so that every
/// completion before the last high one has been heard): how many of `backlog` had finished
/// by the time the last of `high` did.
async fn backlog_before_the_high_ones(
    events: &mut Events,
    seen: &mut Seen,
    high: &[String],
    backlog: &[String],
) -> usize {
    events_until(events, seen, |s| {
        done(s, high) == high.len() && done(s, backlog) >= 100
    })
    .await;
    let last_high = times(seen, high, "succeeded")
        .into_iter()
        .max()
        .expect("high jobs done");
    times(seen, backlog, "succeeded")
        .into_iter()
        .filter(|t| *t <= last_high)
        .count()
}

/// 500 jobs of 50 ms, every other one `normal` and `low`, on a worker of two slots; once five
/// have finished, ten high jobs of the same kind (two of which fail their first attempt and are
/// retried) are published behind them. All ten finish, the retried ones on their second attempt,
/// before the 50th job of the backlog does. (A retry that lost its lane would wait behind the
/// normal ones.)
async fn high_jobs_jump_a_backlog_of_low_ones(broker: Broker) {
    let stack = start(broker).await;
    let mut events = watching(&stack).await;
    let ns = stack.ns.clone();
    let backlog: Vec<JobSpec> = (0..500)
        .map(|i| {
            let spec = JobSpec::new("work", json!({"ms": 50})).id(format!("{ns}-backlog-{i}"));
            if i % 2 == 0 {
                spec
            } else {
                spec.priority(Priority::Low)
            }
        })
        .collect();
    let (backlog_ids, mut seen) = backlog_running(&stack, &mut events, backlog).await;
    let high: Vec<JobSpec> = (0..10)
        .map(|i| {
            let fail_times = u32::from(i < 2);
            JobSpec::new("work", json!({"ms": 50, "fail_times": fail_times}))
                .id(format!("{ns}-high-{i}"))
                .priority(Priority::High)
        })
        .collect();
    let high_ids: Vec<String> = high.iter().filter_map(|s| s.id.clone()).collect();
    for r in stack.client.publish_many(high, 16, |_| {}).await {
        r.expect("high job published");
    }
    let before =
        backlog_before_the_high_ones(&mut events, &mut seen, &high_ids, &backlog_ids).await;
    eprintln!(
        "{broker:?}: all 10 high jobs done after {before} of the 500 backlog jobs had finished"
    );
    assert!(
        before < 50,
        "the last high job finished after {before} backlog jobs"
    );
    for id in &high_ids[..2] {
        let ev = &seen[&(id.clone(), "succeeded".to_string())];
        assert_eq!(ev.attempt, 2, "{id} succeeded on its retry");
    }
    stack.stop().await;
}

/// 300 high jobs of 20 ms, then 30 low ones, on a worker of two slots: low jobs run while
/// high ones still wait (at least a hundred high ones finish after the third low one), rather
/// than after the whole high backlog.
async fn low_jobs_get_a_share_of_a_backlog_of_high_ones(broker: Broker) {
    let stack = Stack::start(broker, two_slots()).await;
    let mut events = watching(&stack).await;
    let ns = stack.ns.clone();
    let spec = |lane: &str, i: usize, p: Priority| {
        JobSpec::new("sleep", json!({"ms": 20}))
            .id(format!("{ns}-{lane}-{i}"))
            .priority(p)
    };
    let high: Vec<JobSpec> = (0..300).map(|i| spec("high", i, Priority::High)).collect();
    let low: Vec<JobSpec> = (0..30).map(|i| spec("low", i, Priority::Low)).collect();
    let high_ids: Vec<String> = high.iter().filter_map(|s| s.id.clone()).collect();
    let low_ids: Vec<String> = low.iter().filter_map(|s| s.id.clone()).collect();
    for r in stack.client.publish_many(high, 64, |_| {}).await {
        r.expect("high job published");
    }
    for r in stack.client.publish_many(low, 64, |_| {}).await {
        r.expect("low job published");
    }
    let mut seen = Seen::new();
    events_until(&mut events, &mut seen, |s| {
        done(s, &high_ids) == high_ids.len() && done(s, &low_ids) >= 3
    })
    .await;
    let mut low_done = times(&seen, &low_ids, "succeeded");
    low_done.sort_unstable();
    let third_low = low_done[2];
    let high_after = times(&seen, &high_ids, "succeeded")
        .into_iter()
        .filter(|t| *t > third_low)
        .count();
    eprintln!(
        "{broker:?}: {high_after} of the 300 high jobs finished after the third low one ({} low \
         ones done by the last high one)",
        low_done.len()
    );
    assert!(
        high_after >= 100,
        "low jobs waited for the high backlog: only {high_after} high jobs were left after the \
         third low one"
    );
    stack.stop().await;
}

const NATS_LANES: &str = r#"
import asyncio, json, sys
import nats

async def main():
    url, ns, jobs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    nc = await nats.connect(url)
    js = nc.jetstream()
    for job_id, lane, body, headers in jobs:
        await js.publish(f"{ns}.jobs.{lane}", body.encode(), headers=dict(headers, **{"Nats-Msg-Id": job_id}))
    await nc.close()

asyncio.run(main())
"#;

const AMQP_LANES: &str = r#"
import json, sys
import pika

url, ns, jobs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
conn = pika.BlockingConnection(pika.URLParameters(url))
ch = conn.channel()
ch.confirm_delivery()
for job_id, lane, body, headers in jobs:
    ch.basic_publish(exchange=f"{ns}.jobs", routing_key=lane, body=body.encode(),
                     properties=pika.BasicProperties(message_id=job_id, headers=headers, delivery_mode=2),
                     mandatory=True)
conn.close()
"#;

/// An outside client publishes 300 jobs to `work` (the normal lane), then two to `work~high`
/// without a `Conveyor-Priority` header, one of which fails its first attempt, and one job to
/// `echo` that says `Conveyor-Priority: urgent`. The high ones finish before the 50th normal
/// one (the retried one's second attempt came back to the high lane, which only the address
/// named), and the urgent one is dead-lettered with the header named.
async fn an_outside_client_chooses_the_lane_by_its_address(broker: Broker) {
    let stack = start(broker).await;
    let mut events = watching(&stack).await;
    let ns = stack.ns.clone();
    let mut jobs: Vec<Value> = (0..300)
        .map(|i| json!([format!("{ns}-normal-{i}"), "work", r#"{"ms":50}"#, {}]))
        .collect();
    let normal_ids: Vec<String> = (0..300).map(|i| format!("{ns}-normal-{i}")).collect();
    let high_ids = vec![format!("{ns}-high"), format!("{ns}-high-retried")];
    jobs.push(json!([high_ids[0], "work~high", r#"{"ms":50}"#, {}]));
    jobs.push(json!([
        high_ids[1],
        "work~high",
        r#"{"ms":50,"fail_times":1}"#,
        {}
    ]));
    let urgent = format!("{ns}-urgent");
    jobs.push(json!([urgent, "echo", "{}", {header::PRIORITY: "urgent"}]));
    let program = match broker {
        Broker::Nats => NATS_LANES,
        Broker::Amqp => AMQP_LANES,
    };
    python(
        program,
        vec![broker.url_str(), ns.clone(), Value::from(jobs).to_string()],
    )
    .await;
    let mut seen = Seen::new();
    let before = backlog_before_the_high_ones(&mut events, &mut seen, &high_ids, &normal_ids).await;
    eprintln!("{broker:?}: the outside client's high jobs done after {before} normal ones");
    assert!(
        before < 50,
        "the last high job finished after {before} normal jobs"
    );
    let retried = &seen[&(high_ids[1].clone(), "succeeded".to_string())];
    assert_eq!(retried.attempt, 2, "the failing job succeeded on its retry");
    let rec = recorded(stack.http, &urgent, WAIT).await;
    assert_eq!(rec["status"], "dead", "{rec}");
    let error = rec["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(header::PRIORITY) && error.contains("urgent"),
        "the reason names the header: {error}"
    );
    stack.stop().await;
}

/// A backlog of 300 normal jobs of 50 ms on a worker of two slots; a schedule of `high` jobs
/// every second, run by a scheduler in this process: its first two ticks each finish within a
/// second and a half of their time, while the backlog still waits (in line, they would wait
/// for the rest of it, seconds).
async fn a_schedules_jobs_take_its_priority(broker: Broker) {
    use conveyor::schedule::{run, table, Schedule};
    let stack = start(broker).await;
    let mut events = watching(&stack).await;
    let ns = stack.ns.clone();
    let backlog: Vec<JobSpec> = (0..300)
        .map(|i| JobSpec::new("work", json!({"ms": 50})).id(format!("{ns}-backlog-{i}")))
        .collect();
    let (backlog_ids, mut seen) = backlog_running(&stack, &mut events, backlog).await;
    let mut schedule = Schedule::every("urgent", "work", 1_000);
    schedule.payload = json!({"ms": 50});
    schedule.priority = Priority::High;
    table::put(stack.client.transport().as_ref(), schedule)
        .await
        .expect("schedule stored");
    let stop = tokio_util::sync::CancellationToken::new();
    let scheduler = tokio::spawn(run::run(stack.client.clone(), stop.clone()));
    let ticks_done = |s: &Seen| -> Vec<(u64, u64)> {
        s.values()
            .filter(|e| e.state == "succeeded")
            .filter_map(|e| Some((e.id.strip_prefix("urgent@")?.parse().ok()?, e.at_ms)))
            .collect()
    };
    events_until(&mut events, &mut seen, |s| ticks_done(s).len() >= 2).await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(20), scheduler)
        .await
        .expect("scheduler stops")
        .expect("scheduler task")
        .expect("scheduler ran");
    let backlog_done = done(&seen, &backlog_ids);
    let mut ticks = ticks_done(&seen);
    ticks.sort_unstable();
    let late: Vec<u64> = ticks
        .iter()
        .map(|(tick, at)| at.saturating_sub(*tick))
        .collect();
    eprintln!(
        "{broker:?}: two high ticks finished {late:?} ms after their time, with {backlog_done} \
         of 300 backlog jobs done"
    );
    assert!(
        late.iter().all(|ms| *ms < 1_500),
        "a tick waited behind the backlog: {late:?} ms"
    );
    assert!(
        backlog_done < 250,
        "the backlog was nearly through ({backlog_done}): nothing was jumped"
    );
    stack.stop().await;
}

/// Two tees of `echo` opened (one closed at once, unread), then a high, a normal and a low job
/// published: the reading tee has a copy of each, every one under the kind `echo` with its lane
/// in `Conveyor-Priority`; the unread one's backlog counts the copies of every lane; deleting
/// the tees removes every lane's part.
async fn a_tee_copies_every_lane_under_its_kind(broker: Broker) {
    use conveyor::transport::{ConsumeOptions, Source};
    let stack = start(broker).await;
    let t = conveyor::transport::connect(&broker.url(), &stack.ns)
        .await
        .expect("connect");
    let tee = |name: &str| Source::Tee {
        kind: "echo".into(),
        name: name.into(),
        backlog: 100,
    };
    let idle = t
        .consume(tee("idle"), ConsumeOptions::default())
        .await
        .expect("tee opens");
    drop(idle);
    let mut copies = t
        .consume(tee("audit"), ConsumeOptions::default())
        .await
        .expect("tee opens");
    let ns = stack.ns.clone();
    for p in [Priority::High, Priority::Normal, Priority::Low] {
        let spec = JobSpec::new("echo", json!({})).id(format!("{ns}-{p}"));
        stack
            .client
            .publish(&spec.priority(p))
            .await
            .expect("published");
    }
    let mut seen = HashMap::new();
    while seen.len() < 3 {
        let d = tokio::time::timeout(WAIT, copies.next())
            .await
            .expect("a copy within the wait")
            .expect("tee stream")
            .expect("a copy");
        let id = conveyor::job::id_of(&d.message.headers).unwrap_or_default();
        let lane = d.message.headers.get(header::PRIORITY).map(str::to_string);
        assert_eq!(d.kind, "echo", "{id}: the copy's kind is the kind");
        d.ack().await.expect("ack copy");
        seen.insert(id, lane);
    }
    drop(copies);
    eprintln!("{broker:?}: tee copies by id and lane: {seen:?}");
    assert_eq!(seen[&format!("{ns}-high")].as_deref(), Some("high"));
    assert_eq!(seen[&format!("{ns}-normal")], None);
    assert_eq!(seen[&format!("{ns}-low")].as_deref(), Some("low"));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let backlog = t.tee_backlog("echo", "idle").await.expect("backlog");
        if backlog == 3 {
            break;
        }
        assert!(
            backlog < 3 && tokio::time::Instant::now() < deadline,
            "the unread tee's backlog is {backlog}, not a copy of each lane"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for name in ["idle", "audit"] {
        t.delete_tee("echo", name).await.expect("delete tee");
    }
    assert!(
        t.tee_backlog("echo", "idle").await.is_err(),
        "a deleted tee has no backlog left in any lane"
    );
    let _ = t.close().await;
    stack.stop().await;
}
