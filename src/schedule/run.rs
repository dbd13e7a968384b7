//! The scheduler: every scheduler contends for the broker claim `scheduler`; the one that holds
//! it publishes each schedule's due ticks, then records the last tick of each in the `ticks`
//! register (a compare-and-set, so a scheduler that lost its claim cannot write over the one
//! that took it). A scheduler that dies frees the claim (RabbitMQ at once, with its connection;
//! JetStream once it is not refreshed for [`FLIGHT_TTL`](crate::transport::FLIGHT_TTL)), and
//! another one goes on from the recorded ticks, applying each schedule's missed-tick policy.
//! One that dies between publishing and recording leaves its last round to the next, which
//! publishes it again: JetStream drops the copies by id, and on RabbitMQ workers run only the
//! first copy of each tick ([`super::runs`]).

use super::table::{self, Versioned, TICKS};
use super::{tick_id, Missed, Overlap, Schedule, MAX_CATCH_UP};
use crate::client::Client;
use crate::error::{Error, Result};
use crate::job::{now_ms, JobSpec};
use crate::protocol::header;
use crate::transport::{FlightClaim, Transport};
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The claim whose holder publishes.
const CLAIM: &str = "scheduler";
/// How often the leading scheduler looks at the clock.
const ROUND: Duration = Duration::from_millis(100);
/// How often it reads the schedules again.
const RELOAD: Duration = Duration::from_secs(1);
/// How often it refreshes its claim when it has nothing to publish.
const REFRESH: Duration = Duration::from_secs(1);
/// How often a scheduler that does not lead tries to.
const CONTEND: Duration = Duration::from_secs(1);
/// A tick older than this when it comes up is missed: the schedule's missed-tick policy says
/// whether it is published.
pub const LATE: Duration = Duration::from_secs(2);
/// With overlap `skip`, how long a job without a result still counts as running.
pub const OVERLAP_WAIT_MAX: Duration = Duration::from_secs(3600);

/// What a scheduler did until it stopped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerReport {
    /// Tick jobs published.
    pub published: u64,
    /// Ticks not published: missed (policy `skip`), paused, or overlapping a running job.
    pub skipped: u64,
    /// Times this scheduler took the lead.
    pub led: u64,
}

/// Runs a scheduler over `client`'s namespace until `stop`.
pub async fn run(client: Client, stop: CancellationToken) -> Result<SchedulerReport> {
    crate::fault::check()?;
    let mut report = SchedulerReport::default();
    while !stop.is_cancelled() {
        let contended = tokio::select! {
            _ = stop.cancelled() => break,
            lead = client.transport().lead(CLAIM, CONTEND) => lead,
        };
        match contended {
            Ok(claim) => {
                report.led += 1;
                tracing::info!("this scheduler leads: it publishes the schedules' ticks");
                let outcome = lead(&client, claim.as_ref(), &stop, &mut report).await;
                // Released in every case: a scheduler that failed must not hold the lead from
                // the others (a claim already taken over is not touched).
                let _ = claim.release().await;
                if stop.is_cancelled() {
                    break;
                }
                if let Err(e) = outcome {
                    tracing::warn!(error = %e, "this scheduler no longer leads");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot contend for the schedules yet"),
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(CONTEND) => {}
        }
    }
    tracing::info!(?report, "scheduler stopped");
    Ok(report)
}

/// Publishes ticks while `claim` holds; returns `Ok` when stopped, an error when the claim or
/// the ticks register was lost.
async fn lead(
    client: &Client,
    claim: &dyn FlightClaim,
    stop: &CancellationToken,
    report: &mut SchedulerReport,
) -> Result<()> {
    let t: &dyn Transport = client.transport().as_ref();
    let (reply_to, mut replies) = t.reply_inbox().await?;
    let mut ticks: Versioned<BTreeMap<String, u64>> = table::read(t, TICKS).await?;
    // Which copy of a tick this leader publishes (see [`super::runs`]).
    let copy = crate::job::new_id();
    let mut running = Running::default();
    let mut schedules = BTreeMap::new();
    let (mut loaded, mut refreshed) = (None::<Instant>, Instant::now());
    // When the schedules in hand were read: a pause is known as of then, not later.
    let mut read_ms = 0;
    let mut round = tokio::time::interval(ROUND);
    round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            reply = replies.next() => {
                match reply {
                    Some(msg) => running.ended(&msg),
                    None => return Err(Error::broker(
                        "scheduler replies",
                        std::io::Error::other("the reply subscription ended"),
                    )),
                }
                continue;
            }
            _ = round.tick() => {}
        }
        if loaded.is_none_or(|at| at.elapsed() >= RELOAD) {
            read_ms = now_ms();
            schedules = table::list(t).await?;
            loaded = Some(Instant::now());
        }
        let plan = plan(&schedules, &mut ticks.value, &running, read_ms, now_ms());
        report.skipped += plan.skipped;
        if plan.changed || refreshed.elapsed() >= REFRESH {
            // A round trip to the broker right before publishing: a scheduler that was frozen
            // past its claim finds out here, not after it published.
            claim.refresh().await?;
            refreshed = Instant::now();
        }
        let mut failed: Vec<&str> = Vec::new();
        for (schedule, tick) in &plan.fire {
            // A long catch-up keeps its claim fresh, so that nobody takes over mid-way.
            if refreshed.elapsed() >= REFRESH {
                claim.refresh().await?;
                refreshed = Instant::now();
            }
            if failed.contains(&schedule.name.as_str()) {
                continue;
            }
            match publish_tick(client, schedule, *tick, &reply_to, &copy).await {
                Ok(id) => {
                    report.published += 1;
                    if schedule.overlap == Overlap::Skip {
                        running.started(&schedule.name, id);
                    }
                }
                // This schedule stops at the tick (its record goes back to just before it, and
                // it is tried again); the others go on.
                Err(e) => {
                    tracing::warn!(schedule = %schedule.name, tick, error = %e, "a tick could not be published: it is tried again");
                    ticks
                        .value
                        .insert(schedule.name.clone(), tick.saturating_sub(1));
                    failed.push(&schedule.name);
                }
            }
        }
        if plan.changed {
            if !plan.fire.is_empty() {
                crate::fault::point("scheduler.before-record");
            }
            match table::write(t, TICKS, ticks.revision, &ticks.value).await? {
                Some(revision) => ticks.revision = revision,
                None => {
                    return Err(Error::Conflict(
                        "another scheduler recorded ticks: it leads now".into(),
                    ))
                }
            }
        }
        if !failed.is_empty() {
            // Tried again after a pause, not at every round.
            if stop
                .run_until_cancelled(tokio::time::sleep(REFRESH))
                .await
                .is_none()
            {
                return Ok(());
            }
        }
    }
}

/// The jobs of schedules with overlap `skip` still without a result.
#[derive(Default)]
struct Running(HashMap<String, (String, Instant)>);

impl Running {
    fn started(&mut self, schedule: &str, id: String) {
        self.0.insert(schedule.to_string(), (id, Instant::now()));
    }
    fn ended(&mut self, reply: &crate::message::Message) {
        if let Some(id) = crate::job::id_of(&reply.headers) {
            self.0.retain(|_, (running, _)| *running != id);
        }
    }
    fn is_running(&self, schedule: &str) -> bool {
        self.0
            .get(schedule)
            .is_some_and(|(_, since)| since.elapsed() < OVERLAP_WAIT_MAX)
    }
}

/// What one round publishes.
struct Plan {
    fire: Vec<(Schedule, u64)>,
    skipped: u64,
    /// Whether `ticks` changed (and must be recorded).
    changed: bool,
}

/// The ticks due at `now` of each schedule, after its policies, advancing `ticks`; schedules
/// gone from `schedules` leave `ticks`. `schedules` were read at `read_ms`: a paused schedule's
/// ticks after that stay undecided (it may have been resumed since), not dropped.
fn plan(
    schedules: &BTreeMap<String, Schedule>,
    ticks: &mut BTreeMap<String, u64>,
    running: &Running,
    read_ms: u64,
    now: u64,
) -> Plan {
    let mut plan = Plan {
        fire: Vec::new(),
        skipped: 0,
        changed: false,
    };
    let before = ticks.len();
    ticks.retain(|name, _| schedules.contains_key(name));
    plan.changed |= ticks.len() != before;
    let late = now.saturating_sub(LATE.as_millis() as u64);
    for s in schedules.values() {
        let from = ticks
            .get(&s.name)
            .copied()
            .unwrap_or(0)
            .max(s.created_ms)
            .max(s.since_ms);
        let until = if s.paused { now.min(read_ms) } else { now };
        let due = s.ticks_between(from, until, MAX_CATCH_UP);
        let Some(&last) = due.last() else { continue };
        ticks.insert(s.name.clone(), last);
        plan.changed = true;
        let mut chosen: Vec<u64> = match (s.paused, s.missed) {
            (true, _) => Vec::new(),
            (false, Missed::CatchUp) => due.clone(),
            (false, Missed::Skip) => due.iter().copied().filter(|&t| t >= late).collect(),
        };
        if s.overlap == Overlap::Skip {
            if running.is_running(&s.name) {
                chosen.clear();
            } else {
                chosen.truncate(1);
            }
        }
        plan.skipped += (due.len() - chosen.len()) as u64;
        if due.len() > chosen.len() {
            tracing::info!(
                schedule = %s.name,
                skipped = due.len() - chosen.len(),
                paused = s.paused,
                "ticks skipped"
            );
        }
        plan.fire
            .extend(chosen.into_iter().map(|tick| (s.clone(), tick)));
    }
    plan
}

async fn publish_tick(
    client: &Client,
    schedule: &Schedule,
    tick: u64,
    reply_to: &str,
    copy: &str,
) -> Result<String> {
    // A publish that was not confirmed may still have been stored: each try is a copy of its
    // own, so that a worker runs only one of them (see [`super::runs`]).
    let mut tries = 0u32;
    crate::transport::retry::retrying(
        "publish a tick",
        crate::transport::PUBLISH_BACKOFF,
        crate::client::PUBLISH_PATIENCE,
        || {
            tries += 1;
            let spec = tick_spec(schedule, tick, reply_to, &format!("{copy}.{tries}"));
            async move { client.publish_within(&spec, Duration::ZERO).await }
        },
    )
    .await
}

/// The job of `schedule`'s tick at `tick`, as copy `copy` (see [`super::runs`]).
fn tick_spec(schedule: &Schedule, tick: u64, reply_to: &str, copy: &str) -> JobSpec {
    let mut spec = JobSpec::new(schedule.kind.clone(), schedule.payload.clone())
        .id(tick_id(&schedule.name, tick));
    if schedule.overlap == Overlap::Skip {
        spec = spec.reply_to(reply_to);
    }
    spec = spec.priority(schedule.priority);
    spec.headers.insert(header::SCHEDULE, schedule.name.clone());
    spec.headers.insert(header::TICK, tick.to_string());
    spec.headers.insert(header::TICK_COPY, copy);
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(s: Schedule) -> BTreeMap<String, Schedule> {
        BTreeMap::from([(s.name.clone(), s)])
    }

    #[test]
    fn a_ticks_job_says_its_schedule_tick_copy_and_priority() {
        let mut s = Schedule::every("beat", "echo", 1_000);
        s.priority = crate::priority::Priority::High;
        s.overlap = Overlap::Skip;
        let spec = tick_spec(&s, 5_000, "_INBOX.x", "c1");
        assert_eq!(spec.id.as_deref(), Some("beat@5000"));
        assert_eq!(spec.reply_to.as_deref(), Some("_INBOX.x"));
        let (_, msg) = spec.to_message().expect("a job");
        assert_eq!(
            crate::schedule::runs::tick_of(&msg.headers),
            Some(("beat", 5_000, "c1"))
        );
        assert_eq!(crate::priority::lane_of("echo", &msg.headers), "echo~high");
        s.priority = crate::priority::Priority::Normal;
        let (_, msg) = tick_spec(&s, 5_000, "", "c1").to_message().expect("a job");
        assert_eq!(msg.headers.get(header::PRIORITY), None);
    }

    #[test]
    fn a_due_tick_fires_once_and_is_recorded() {
        let s = Schedule {
            created_ms: 0,
            since_ms: 0,
            ..Schedule::every("s", "echo", 1_000)
        };
        let all = one(s);
        let mut ticks = BTreeMap::from([("s".to_string(), 9_000)]);
        let p = plan(&all, &mut ticks, &Running::default(), 10_500, 10_500);
        assert_eq!(p.fire.iter().map(|f| f.1).collect::<Vec<_>>(), vec![10_000]);
        assert!(p.changed);
        assert_eq!(ticks["s"], 10_000);
        let again = plan(&all, &mut ticks, &Running::default(), 10_900, 10_900);
        assert!(again.fire.is_empty() && !again.changed);
    }

    #[test]
    fn missed_ticks_are_skipped_or_caught_up() {
        let skip = Schedule {
            created_ms: 0,
            since_ms: 0,
            ..Schedule::every("s", "echo", 1_000)
        };
        let catch_up = Schedule {
            missed: Missed::CatchUp,
            ..skip.clone()
        };
        let now = 20_500;
        let mut ticks = BTreeMap::from([("s".to_string(), 10_000)]);
        let p = plan(&one(skip), &mut ticks, &Running::default(), now, now);
        // Ticks 11 s to 20 s are due; only those within LATE of now are published.
        assert_eq!(
            p.fire.iter().map(|f| f.1).collect::<Vec<_>>(),
            vec![19_000, 20_000]
        );
        assert_eq!(p.skipped, 8);
        let mut ticks = BTreeMap::from([("s".to_string(), 10_000)]);
        let p = plan(&one(catch_up), &mut ticks, &Running::default(), now, now);
        assert_eq!(p.fire.len(), 10);
        assert_eq!(p.skipped, 0);
    }

    #[test]
    fn paused_overlapping_and_removed_schedules() {
        let paused = Schedule {
            created_ms: 0,
            since_ms: 0,
            paused: true,
            ..Schedule::every("p", "echo", 1_000)
        };
        let mut ticks = BTreeMap::from([("p".to_string(), 1_000), ("gone".to_string(), 5)]);
        let p = plan(&one(paused), &mut ticks, &Running::default(), 3_000, 3_000);
        assert!(p.fire.is_empty());
        assert_eq!((p.skipped, ticks.get("gone")), (2, None));
        let single = Schedule {
            created_ms: 0,
            since_ms: 0,
            overlap: Overlap::Skip,
            missed: Missed::CatchUp,
            ..Schedule::every("o", "echo", 1_000)
        };
        let mut running = Running::default();
        let mut ticks = BTreeMap::from([("o".to_string(), 1_000)]);
        let p = plan(&one(single.clone()), &mut ticks, &running, 4_000, 4_000);
        assert_eq!(p.fire.len(), 1, "one at a time");
        running.started("o", "o@4000".into());
        let p = plan(&one(single), &mut ticks, &running, 5_000, 5_000);
        assert!(p.fire.is_empty());
        assert_eq!(p.skipped, 1);
    }

    #[test]
    fn a_pause_read_earlier_drops_no_tick_after_the_read() {
        let paused = Schedule {
            created_ms: 0,
            since_ms: 0,
            paused: true,
            missed: Missed::CatchUp,
            ..Schedule::every("p", "echo", 1_000)
        };
        let mut ticks = BTreeMap::from([("p".to_string(), 1_000)]);
        // Read (paused) at 2_500, planned at 3_400: 2_000 is dropped, 3_000 is not decided.
        let p = plan(
            &one(paused.clone()),
            &mut ticks,
            &Running::default(),
            2_500,
            3_400,
        );
        assert!(p.fire.is_empty());
        assert_eq!((p.skipped, ticks.get("p")), (1, Some(&2_000)));
        // Resumed at 2_900 (before the tick at 3_000), read again at 3_500.
        let resumed = Schedule {
            paused: false,
            since_ms: 2_900,
            ..paused
        };
        let p = plan(&one(resumed), &mut ticks, &Running::default(), 3_500, 3_500);
        assert_eq!(p.fire.iter().map(|f| f.1).collect::<Vec<_>>(), vec![3_000]);
    }

    #[test]
    fn a_resumed_or_replaced_schedule_catches_up_nothing_from_before() {
        let s = Schedule {
            created_ms: 0,
            since_ms: 5_500,
            missed: Missed::CatchUp,
            ..Schedule::every("r", "echo", 1_000)
        };
        let mut ticks = BTreeMap::from([("r".to_string(), 1_000)]);
        let p = plan(&one(s), &mut ticks, &Running::default(), 7_100, 7_100);
        assert_eq!(
            p.fire.iter().map(|f| f.1).collect::<Vec<_>>(),
            vec![6_000, 7_000]
        );
    }

    #[test]
    fn a_new_schedule_has_no_tick_before_it_was_added() {
        let s = Schedule {
            created_ms: 10_000,
            since_ms: 10_000,
            missed: Missed::CatchUp,
            ..Schedule::every("n", "echo", 1_000)
        };
        let mut ticks = BTreeMap::new();
        let p = plan(&one(s), &mut ticks, &Running::default(), 12_100, 12_100);
        assert_eq!(
            p.fire.iter().map(|f| f.1).collect::<Vec<_>>(),
            vec![11_000, 12_000]
        );
    }
}
