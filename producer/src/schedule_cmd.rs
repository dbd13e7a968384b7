//! `conveyor-producer schedule`: adds, lists, removes, pauses and resumes periodic jobs (kept
//! by the broker), and runs a scheduler.

use anyhow::Context;
use clap::{Args, Subcommand};
use conveyor::schedule::{run::SchedulerReport, table, Missed, Overlap, Schedule};
use conveyor::{BrokerUrl, Client};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct ScheduleArgs {
    #[command(subcommand)]
    pub command: ScheduleCommand,
}

#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Add a schedule, or replace the one of the same name.
    Add(AddArgs),
    /// List the schedules, one JSON object a line.
    List,
    /// Remove a schedule (its jobs already published still run).
    Remove {
        /// The schedule's name.
        name: String,
    },
    /// Pause a schedule: its ticks are skipped until it is resumed.
    Pause {
        /// The schedule's name.
        name: String,
    },
    /// Resume a paused schedule, from its next tick.
    Resume {
        /// The schedule's name.
        name: String,
    },
    /// Run a scheduler until SIGTERM or Ctrl-C: of all the schedulers running, the one holding
    /// the broker's claim publishes the ticks.
    Run {
        /// Stop after this long (for tests and demos).
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        run_for: Option<Duration>,
    },
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// The schedule's name (letters, digits, '-' and '_').
    name: String,
    /// The kind of the jobs it publishes.
    #[arg(long)]
    kind: String,
    /// A tick every this long (e.g. 30s, 5m, 1h), at its multiples since the epoch.
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "cron", required_unless_present = "cron")]
    every: Option<Duration>,
    /// Or a cron expression: five fields, or six with seconds first (`*/10 * * * * *`).
    #[arg(long)]
    cron: Option<String>,
    /// The time zone the cron expression is read in (IANA name; default UTC).
    #[arg(long, requires = "cron")]
    tz: Option<String>,
    /// The jobs' input (JSON).
    #[arg(long, default_value = "{}")]
    payload: String,
    /// Ticks missed while no scheduler ran: skip or catch-up.
    #[arg(long, default_value = "skip")]
    missed: Missed,
    /// A tick while the previous job has no result: allow or skip.
    #[arg(long, default_value = "allow")]
    overlap: Overlap,
    /// The priority of its jobs: high, normal or low.
    #[arg(long, default_value = "normal")]
    priority: conveyor::Priority,
    /// Add it paused.
    #[arg(long)]
    paused: bool,
}

pub async fn run(
    broker: &BrokerUrl,
    namespace: &str,
    args: ScheduleArgs,
) -> anyhow::Result<ExitCode> {
    // A bad schedule fails before the broker is reached, naming what is wrong.
    let added = match &args.command {
        ScheduleCommand::Add(a) => Some(schedule_of(a)?),
        _ => None,
    };
    let client = Client::connect(broker, namespace)
        .await
        .with_context(|| format!("connecting to {broker}"))?;
    let t = client.transport().as_ref();
    match args.command {
        ScheduleCommand::Add(_) => {
            let s = added.context("the schedule")?;
            let (name, next) = (s.name.clone(), s.next_after(conveyor::job::now_ms()));
            table::put(t, s).await?;
            eprintln!("schedule {name} stored; next tick at {next:?} ms");
        }
        ScheduleCommand::List => {
            for s in table::list(t).await?.values() {
                let mut line = serde_json::to_value(s)?;
                line["next_ms"] = serde_json::json!(s.next_after(conveyor::job::now_ms()));
                println!("{line}");
            }
        }
        ScheduleCommand::Remove { name } => table::remove(t, &name).await?,
        ScheduleCommand::Pause { name } => table::set_paused(t, &name, true).await?,
        ScheduleCommand::Resume { name } => table::set_paused(t, &name, false).await?,
        ScheduleCommand::Run { run_for } => {
            let (stop, _) = conveyor::shutdown::on_signals();
            if let Some(d) = run_for {
                let stop = stop.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    stop.cancel();
                });
            }
            let SchedulerReport {
                published,
                skipped,
                led,
            } = conveyor::schedule::run::run(client.clone(), stop).await?;
            eprintln!(
                "scheduler stopped: published {published}, skipped {skipped}, led {led} time(s)"
            );
        }
    }
    client.transport().close().await?;
    Ok(ExitCode::SUCCESS)
}

/// The schedule `a` describes, validated.
fn schedule_of(a: &AddArgs) -> anyhow::Result<Schedule> {
    let payload = serde_json::from_str(&a.payload)
        .with_context(|| format!("--payload is not JSON: {}", a.payload))?;
    let mut s = match (a.every, &a.cron) {
        (Some(every), _) => {
            let ms = u64::try_from(every.as_millis()).context("--every is too long")?;
            Schedule::every(&a.name, &a.kind, ms)
        }
        (None, Some(cron)) => Schedule::cron(&a.name, &a.kind, cron, a.tz.as_deref()),
        (None, None) => anyhow::bail!("give --every or --cron"),
    };
    s.payload = payload;
    s.missed = a.missed;
    s.overlap = a.overlap;
    s.priority = a.priority;
    s.paused = a.paused;
    s.validate()?;
    Ok(s)
}
