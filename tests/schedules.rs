//! Periodic jobs on both real brokers, through the real binaries: schedules added with
//! `conveyor-producer schedule add`, schedulers run with `conveyor-producer schedule run`, a
//! worker and the aggregator. Which ticks must exist is worked out here from the clock and the
//! schedule's creation time, not from the scheduler's own records.

mod common;

use common::checker::History;
use common::cluster::{Cluster, WAIT};
use common::{http_get, http_send, output_text, record_within, recorded, Broker, Proc};
use conveyor::job::now_ms;
use serde_json::Value;
use std::time::Duration;

both_brokers!(
    two_schedulers_publish_each_tick_once_across_the_leader_killed,
    a_leader_killed_between_publishing_and_recording_runs_no_tick_twice,
    missed_ticks_are_skipped_or_caught_up_and_paused_ones_skipped,
    a_bad_schedule_fails_before_the_broker_naming_its_fault,
    the_aggregators_http_api_manages_schedules,
);

const EVERY_MS: u64 = 1_000;

/// `conveyor-producer schedule run` on the cluster's namespace, logging at `info`.
fn scheduler(c: &Cluster, name: &str, extra: &[&str]) -> Proc {
    let mut args = vec!["--broker", &c.url, "--namespace", &c.ns, "schedule", "run"];
    args.extend_from_slice(extra);
    Proc::spawn(name, "conveyor-producer", &args, c.logs())
}

/// Adds a schedule through the CLI; panics with its output unless it succeeds.
fn add(c: &Cluster, args: &[&str]) {
    let mut all = vec!["schedule", "add"];
    all.extend_from_slice(args);
    let out = c.producer(&all, None);
    assert!(out.status.success(), "schedule add: {}", output_text(&out));
}

/// The schedules, as `schedule list` prints them, by name.
fn list(c: &Cluster) -> std::collections::BTreeMap<String, Value> {
    let out = c.producer(&["schedule", "list"], None);
    assert!(out.status.success(), "schedule list: {}", output_text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("a JSON line"))
        .map(|v| (v["name"].as_str().expect("name").to_string(), v))
        .collect()
}

/// The ticks of an every-second schedule created at `created_ms`, strictly after `after_ms`
/// and at most `until_ms`, as job ids.
fn ticks(name: &str, created_ms: u64, after_ms: u64, until_ms: u64) -> Vec<String> {
    let first = after_ms.max(created_ms) / EVERY_MS * EVERY_MS + EVERY_MS;
    (first..=until_ms)
        .step_by(EVERY_MS as usize)
        .map(|ms| format!("{name}@{ms}"))
        .collect()
}

/// Waits until the log of `p` says it leads.
async fn wait_lead(p: &Proc, within: Duration) -> u64 {
    let deadline = tokio::time::Instant::now() + within;
    while !p.log_text().contains("this scheduler leads") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} did not lead within {within:?}; log:\n{}",
            p.name,
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    now_ms()
}

/// Two schedulers; the leader is killed with -9 after 12 s; the other takes over and runs 10 s
/// more; the schedule catching up, every tick from the first to the last is run, none twice,
/// and nothing else is recorded.
async fn two_schedulers_publish_each_tick_once_across_the_leader_killed(broker: Broker) {
    let c = Cluster::new(broker);
    let _aggregator = c.aggregator("aggregator").await;
    let _worker = c.worker("worker", &["--kinds", "echo"]);
    c.wait_workers(1).await;
    let client = c.client().await;
    let history = History::observe_durably(&client).await;
    add(
        &c,
        &[
            "beat",
            "--kind",
            "echo",
            "--every",
            "1s",
            "--missed",
            "catch-up",
            "--payload",
            r#"{"beat":true}"#,
        ],
    );
    let created = list(&c)["beat"]["created_ms"].as_u64().expect("created_ms");
    let mut first = scheduler(&c, "scheduler-1", &[]);
    let led_at = wait_lead(&first, WAIT).await;
    let second = scheduler(&c, "scheduler-2", &[]);
    let second_started = tokio::time::Instant::now();
    // Changes made while the schedulers run (the register is shared with them): a schedule
    // added, paused 3 s later, resumed 5 s after that. The leader reads the schedules every
    // second: a pause holds from 2.5 s after it was stored.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let extra = [
        "extra", "--kind", "echo", "--every", "1s", "--missed", "catch-up",
    ];
    let added = now_ms();
    add(&c, &extra);
    let (added_done, pause) = (now_ms(), now_ms() + 3_000);
    tokio::time::sleep(Duration::from_millis(pause - now_ms())).await;
    let paused = now_ms();
    let out = c.producer(&["schedule", "pause", "extra"], None);
    assert!(
        out.status.success(),
        "schedule pause: {}",
        output_text(&out)
    );
    let (paused_done, resume) = (now_ms(), now_ms() + 5_000);
    tokio::time::sleep(Duration::from_millis(resume - now_ms())).await;
    let resumed = now_ms();
    let out = c.producer(&["schedule", "resume", "extra"], None);
    assert!(
        out.status.success(),
        "schedule resume: {}",
        output_text(&out)
    );
    let resumed_done = now_ms();
    eprintln!(
        "{broker:?}: add took {} ms, pause {} ms, resume {} ms while a scheduler ran",
        added_done - added,
        paused_done - paused,
        resumed_done - resumed
    );
    tokio::time::sleep((second_started + Duration::from_secs(12)) - tokio::time::Instant::now())
        .await;
    assert!(
        !second.log_text().contains("this scheduler leads"),
        "two schedulers led at once; the second's log:\n{}",
        second.log_text()
    );
    // A scheduler that does not lead waits for the lead without being refused anything.
    assert!(
        !second.log_text().contains("ERROR"),
        "the waiting scheduler logged errors:\n{}",
        second.log_text()
    );
    first.kill9();
    let killed = now_ms();
    let took_over = wait_lead(&second, WAIT).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    second.signal("TERM");
    let stopped = now_ms();
    let mut second = second;
    let code = second.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(code, Some(0), "the scheduler's log:\n{}", second.log_text());
    // Every tick up to a second before the stop must have run; the ones about the stop may.
    let mut must = ticks("beat", created, created, stopped - 1_000);
    let mut may: Vec<String> = ticks("beat", created, stopped - 1_000, stopped + 1_000);
    // extra: every tick after it was added until the pause, none while paused (the leader
    // reads the schedules every second), every tick after it was resumed.
    let beats = must.len();
    must.extend(ticks("extra", added, added_done, paused - 1_000));
    must.extend(ticks("extra", added, resumed_done, stopped - 1_000));
    may.extend(ticks("extra", added, added, added_done));
    may.extend(ticks("extra", added, paused - 1_000, paused_done + 2_500));
    may.extend(ticks("extra", added, resumed - 1, resumed_done));
    may.extend(ticks("extra", added, stopped - 1_000, stopped + 1_000));
    let held: Vec<String> = ticks("extra", added, paused_done + 2_500, resumed - 1);
    assert!(!held.is_empty(), "the pause held no tick");
    let v = history
        .verdict(c.http, &must, &may, Duration::from_secs(60))
        .await;
    eprintln!(
        "{broker:?}: led {} ms after the schedule was made; leader killed {} ms later; the \
         other led {} ms after the kill; {beats} beat ticks due, {} in all, {} recorded, {} \
         ran twice; {} extra ticks paused",
        led_at - created,
        killed - led_at,
        took_over - killed,
        must.len(),
        v.recorded,
        v.ran_again,
        held.len()
    );
    // A paused tick recorded would be unexpected (in neither list): checked here by name too.
    for id in &held {
        let (code, rec) = http_get(c.http, &format!("/jobs/{id}")).await;
        assert_eq!(code, 404, "{id} was ticked while paused: {rec}");
    }
    v.assert_clean("ticks across a scheduler killed");
    v.assert_statuses("ticks", &["succeeded"]);
    assert!(beats >= 18, "too few ticks to tell anything: {beats}");
    let (_, rec) = http_get(c.http, &format!("/jobs/{}", must[beats / 2])).await;
    assert_eq!(
        rec["output"]["beat"], true,
        "a tick runs the payload: {rec}"
    );
    assert_eq!(v.ran_again, 0, "ticks ran twice: {v:?}");
}

/// The leader is killed (SIGKILL, at the fault point `scheduler.before-record`) right after it
/// published its third round of ticks and before recording it; the other scheduler takes over
/// and publishes that round again. Every tick runs once: JetStream drops the second copy by id;
/// on RabbitMQ the worker runs only the copy that claimed the tick first, and says so of the
/// other (the test fails if it never met one: then nothing was tested).
async fn a_leader_killed_between_publishing_and_recording_runs_no_tick_twice(broker: Broker) {
    let c = Cluster::new(broker);
    let _aggregator = c.aggregator("aggregator").await;
    let worker = c.worker("worker", &["--kinds", "echo"]);
    c.wait_workers(1).await;
    let client = c.client().await;
    let history = History::observe_durably(&client).await;
    add(
        &c,
        &[
            "beat", "--kind", "echo", "--every", "1s", "--missed", "catch-up",
        ],
    );
    let created = list(&c)["beat"]["created_ms"].as_u64().expect("created_ms");
    let args = ["--broker", &c.url, "--namespace", &c.ns, "schedule", "run"];
    let fault = [("CONVEYOR_FAULT", "scheduler.before-record@3")];
    let mut first = Proc::spawn_env("scheduler-1", "conveyor-producer", &args, &fault, c.logs());
    wait_lead(&first, WAIT).await;
    let second = scheduler(&c, "scheduler-2", &[]);
    let code = first.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(
        code,
        None,
        "killed at the fault point:\n{}",
        first.log_text()
    );
    let died = now_ms();
    let took_over = wait_lead(&second, WAIT).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    second.signal("TERM");
    let stopped = now_ms();
    let mut second = second;
    let code = second.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(code, Some(0), "the scheduler's log:\n{}", second.log_text());
    let must = ticks("beat", created, created, stopped - 1_000);
    let may = ticks("beat", created, stopped - 1_000, stopped + 1_000);
    let v = history
        .verdict(c.http, &must, &may, Duration::from_secs(60))
        .await;
    let unrun = worker
        .log_text()
        .matches("another copy of this tick holds it")
        .count();
    eprintln!(
        "{broker:?}: the leader died {} ms after the schedule was made, the other led {} ms \
         later; {} ticks due, {} recorded, {} ran twice; {unrun} copies acked unrun",
        died - created,
        took_over - died,
        must.len(),
        v.recorded,
        v.ran_again
    );
    v.assert_clean("ticks across a leader killed before recording");
    assert_eq!(v.ran_again, 0, "ticks ran twice: {v:?}");
    if broker == Broker::Amqp {
        assert!(
            unrun >= 1,
            "no second copy of a tick reached the worker; its log:\n{}",
            worker.log_text()
        );
    }
}

/// Every-second schedules: `skipper` (missed ticks skipped), `catcher` (caught up), `held`
/// (paused) and `slow` (a 2.5 s job, overlapping ticks skipped). A scheduler runs 4 s, none for 6 s, then another 4 s. `catcher` has every
/// tick; `skipper` none of those more than [`LATE`](conveyor::schedule::run::LATE) old when
/// the second came up; `held` none; `slow` one run at a time.
async fn missed_ticks_are_skipped_or_caught_up_and_paused_ones_skipped(broker: Broker) {
    let c = Cluster::new(broker);
    let aggregator = c.aggregator("aggregator").await;
    let worker = c.worker("worker", &["--kinds", "echo,sleep"]);
    c.wait_workers(1).await;
    add(
        &c,
        &[
            "slow",
            "--kind",
            "sleep",
            "--every",
            "1s",
            "--overlap",
            "skip",
            "--payload",
            r#"{"ms":2500}"#,
        ],
    );
    for (name, policy) in [("skipper", "skip"), ("catcher", "catch-up")] {
        add(
            &c,
            &[name, "--kind", "echo", "--every", "1s", "--missed", policy],
        );
    }
    add(&c, &["held", "--kind", "echo", "--every", "1s", "--paused"]);
    let listed = list(&c);
    assert_eq!(listed["held"]["paused"], true, "{listed:?}");
    assert_eq!(listed["catcher"]["missed"], "catch-up", "{listed:?}");
    let created = |name: &str| listed[name]["created_ms"].as_u64().expect("created_ms");
    let mut one = scheduler(&c, "scheduler-1", &["--for", "4s"]);
    let first_led = wait_lead(&one, WAIT).await;
    assert_eq!(one.wait_exit(WAIT).await, Some(0), "{}", one.log_text());
    let first_ended = now_ms();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let second_started = now_ms();
    let mut two = scheduler(&c, "scheduler-2", &["--for", "4s"]);
    let second_led = wait_lead(&two, WAIT).await;
    assert_eq!(two.wait_exit(WAIT).await, Some(0), "{}", two.log_text());
    let second_ended = now_ms();
    let late = conveyor::schedule::run::LATE.as_millis() as u64;

    // catcher: every tick, the gap's too.
    let all = ticks(
        "catcher",
        created("catcher"),
        created("catcher"),
        second_ended - 1_500,
    );
    let timeline = format!(
        "first led {first_led}, ended {first_ended}; second started {second_started}, led \
         {second_led}, ended {second_ended}\nscheduler-1:\n{}\nscheduler-2:\n{}\nworker:\n{}\naggregator:\n{}",
        one.log_text(),
        two.log_text(),
        worker.log_text(),
        aggregator.log_text(),
    );
    for id in &all {
        let rec = record_within(c.http, id, WAIT)
            .await
            .unwrap_or_else(|_| panic!("{id} was not recorded; {timeline}"));
        assert_eq!(rec["status"], "succeeded", "{rec}");
    }
    // skipper: none of the gap's ticks older than LATE when the second scheduler came up.
    let gap = ticks(
        "skipper",
        created("skipper"),
        first_ended,
        second_started - late,
    );
    assert!(gap.len() >= 3, "the gap holds {} ticks", gap.len());
    for id in &gap {
        let (code, rec) = http_get(c.http, &format!("/jobs/{id}")).await;
        assert_eq!(code, 404, "{id} was missed and should be skipped: {rec}");
    }
    // ... but it runs while a scheduler does: from a second before each took the lead (a tick
    // less than LATE old is not missed) to a moment before it stopped.
    let before = ticks(
        "skipper",
        created("skipper"),
        first_led - 1_000,
        first_ended - 1_500,
    );
    let after = ticks(
        "skipper",
        created("skipper"),
        second_led - 1_000,
        second_ended - 1_500,
    );
    assert!(!before.is_empty() && !after.is_empty());
    for id in before.iter().chain(&after) {
        let rec = record_within(c.http, id, WAIT)
            .await
            .unwrap_or_else(|_| panic!("{id} was not recorded; {timeline}"));
        assert_eq!(rec["status"], "succeeded", "{rec}");
    }
    // held: nothing, from creation to the end.
    for id in ticks("held", created("held"), created("held"), second_ended) {
        let (code, rec) = http_get(c.http, &format!("/jobs/{id}")).await;
        assert_eq!(code, 404, "{id} belongs to a paused schedule: {rec}");
    }
    // slow: a tick while its job runs (2.5 s) is skipped, so runs are 3 s apart or more.
    let mut runs = Vec::new();
    for (from, to) in [(first_led, first_ended), (second_led, second_ended)] {
        for id in ticks("slow", created("slow"), from - late, to) {
            let (code, rec) = http_get(c.http, &format!("/jobs/{id}")).await;
            if code == 200 {
                assert_eq!(rec["status"], "succeeded", "{rec}");
                let ms: u64 = id["slow@".len()..].parse().expect("tick time");
                runs.push(ms);
            }
        }
    }
    assert!(runs.len() >= 2, "slow ran {} times", runs.len());
    let closest = runs.windows(2).map(|w| w[1] - w[0]).min().unwrap_or(0);
    assert!(
        closest >= 3_000,
        "two runs of slow overlapped: ticks {runs:?} ({closest} ms apart)"
    );
    let report = |p: &Proc| {
        p.log_text()
            .lines()
            .find(|l| l.starts_with("scheduler stopped"))
            .unwrap_or_default()
            .to_string()
    };
    eprintln!(
        "{broker:?}: catcher {} ticks; skipper {} skipped in the gap, {} run before it and {} \
         after; slow ran at {runs:?}; first scheduler: {}; second: {}",
        all.len(),
        gap.len(),
        before.len(),
        after.len(),
        report(&one),
        report(&two)
    );
}

/// Bad schedules are refused before the broker is reached (with a broker URL nothing listens
/// on, the error is the schedule's, not the connection's), naming what is wrong; none is stored.
async fn a_bad_schedule_fails_before_the_broker_naming_its_fault(broker: Broker) {
    let c = Cluster::new(broker);
    let cases: &[(&[&str], &str)] = &[
        (&["x", "--kind", "echo", "--cron", "61 * * * *"], "cron"),
        (
            &[
                "x",
                "--kind",
                "echo",
                "--cron",
                "0 9 * * *",
                "--tz",
                "Mars/Base",
            ],
            "time zone",
        ),
        (&["x", "--kind", "echo", "--every", "10ms"], "interval"),
        (&["bad name", "--kind", "echo", "--every", "1s"], "name"),
        (
            &["x", "--kind", "echo", "--every", "1s", "--payload", "{"],
            "--payload",
        ),
        (
            &["x", "--kind", "echo", "--every", "1s", "--missed", "later"],
            "--missed",
        ),
        (&["x", "--kind", "echo"], "--every"),
    ];
    let dead = format!(
        "{}://127.0.0.1:{}",
        match broker {
            Broker::Nats => "nats",
            Broker::Amqp => "amqp",
        },
        common::free_port()
    );
    for (args, names) in cases {
        let started = std::time::Instant::now();
        let mut cmd = std::process::Command::new(common::bin("conveyor-producer"));
        cmd.args(["--broker", &dead, "--namespace", &c.ns, "schedule", "add"])
            .args(*args);
        let out = common::output_within(
            cmd.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn"),
            Duration::from_secs(30),
            "schedule add",
        );
        let text = output_text(&out);
        assert!(!out.status.success(), "{args:?} was taken: {text}");
        assert!(
            text.contains(names),
            "{args:?}: the error should name {names:?}: {text}"
        );
        assert!(
            !text.contains("connecting"),
            "{args:?}: failed on the broker, not the schedule: {text}"
        );
        eprintln!(
            "{args:?} refused in {:?}: {}",
            started.elapsed(),
            text.lines().last().unwrap_or_default()
        );
    }
    add(&c, &["good", "--kind", "echo", "--every", "1s"]);
    let listed = list(&c);
    assert_eq!(
        listed.keys().collect::<Vec<_>>(),
        ["good"],
        "only the good schedule is stored"
    );
}

/// The aggregator's HTTP API adds, shows, pauses, resumes and removes a schedule; what it did is
/// read back through the CLI (`schedule list`), and a scheduler runs what it added. Bad bodies
/// and names are refused with 400 naming the field and store nothing; unknown names are 404.
async fn the_aggregators_http_api_manages_schedules(broker: Broker) {
    let c = Cluster::new(broker);
    let _aggregator = c.aggregator("aggregator").await;
    let _worker = c.worker("worker", &["--kinds", "echo"]);
    c.wait_workers(1).await;
    let body = r#"{"kind":"echo","every":"1s","missed":"catch-up","payload":{"via":"http"}}"#;
    let started = tokio::time::Instant::now();
    let (code, put) = http_send(c.http, "PUT", "/schedules/api-beat", Some(body)).await;
    let put_ms = started.elapsed().as_millis();
    assert_eq!(code, 200, "PUT: {put}");
    assert_eq!(
        (put["every_ms"].as_u64(), put["kind"].as_str()),
        (Some(1_000), Some("echo"))
    );
    assert!(put["next_ms"].as_u64().is_some(), "{put}");
    let listed = list(&c);
    let stored = &listed["api-beat"];
    assert_eq!(
        (
            &stored["every_ms"],
            &stored["missed"],
            &stored["payload"]["via"]
        ),
        (
            &Value::from(1_000),
            &Value::from("catch-up"),
            &Value::from("http")
        ),
        "{listed:?}"
    );
    let (code, all) = http_get(c.http, "/schedules").await;
    assert_eq!(code, 200, "{all}");
    assert_eq!(all.as_array().map(Vec::len), Some(1), "{all}");

    // A scheduler runs what the API added.
    let created = stored["created_ms"].as_u64().expect("created_ms");
    let mut run = scheduler(&c, "scheduler", &["--for", "3s"]);
    let led = wait_lead(&run, WAIT).await;
    assert_eq!(run.wait_exit(WAIT).await, Some(0), "{}", run.log_text());
    let ran = ticks("api-beat", created, created, led + 1_000);
    assert!(!ran.is_empty());
    for id in &ran {
        let rec = recorded(c.http, id, WAIT).await;
        assert_eq!(rec["output"]["via"], "http", "{id}: {rec}");
    }

    // Pause and resume, read back by the CLI.
    for (path, paused) in [("pause", true), ("resume", false)] {
        let (code, answer) =
            http_send(c.http, "POST", &format!("/schedules/api-beat/{path}"), None).await;
        assert_eq!(code, 200, "{path}: {answer}");
        assert_eq!(list(&c)["api-beat"]["paused"], paused, "after {path}");
        let (_, one) = http_get(c.http, "/schedules/api-beat").await;
        assert_eq!(one["paused"], paused, "{one}");
    }

    // Refused: named, and nothing stored.
    for (path, body, named) in [
        ("/schedules/other", r#"{"kind":"echo","evry":"1s"}"#, "evry"),
        (
            "/schedules/other",
            r#"{"kind":"echo","every":"1s","missed":"later"}"#,
            "later",
        ),
        (
            "/schedules/other",
            r#"{"kind":"echo","cron":"61 * * * *"}"#,
            "cron expression",
        ),
        ("/schedules/other", "not json", "schedule"),
        (
            "/schedules/bad.name",
            r#"{"kind":"echo","every":"1s"}"#,
            "schedule name",
        ),
    ] {
        let (code, answer) = http_send(c.http, "PUT", path, Some(body)).await;
        assert_eq!(code, 400, "{body}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(named),
            "{body}: the error names {named}: {error}"
        );
    }
    assert_eq!(list(&c).len(), 1, "a refused schedule was stored");
    for (method, path) in [
        ("GET", "/schedules/nope"),
        ("DELETE", "/schedules/nope"),
        ("POST", "/schedules/nope/pause"),
    ] {
        let (code, answer) = http_send(c.http, method, path, None).await;
        assert_eq!(code, 404, "{method} {path}: {answer}");
    }

    let (code, answer) = http_send(c.http, "DELETE", "/schedules/api-beat", None).await;
    assert_eq!(code, 204, "DELETE: {answer}");
    assert!(list(&c).is_empty(), "the schedule is still listed");
    let (_, all) = http_get(c.http, "/schedules").await;
    assert_eq!(all, serde_json::json!([]));
    eprintln!(
        "{broker:?}: PUT answered in {put_ms} ms; the scheduler ran {} ticks of it",
        ran.len()
    );
}
