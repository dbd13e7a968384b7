//! `conveyor-producer`: publishes jobs, waits for their results, and benchmarks the system.
//!
//! Publishes to the jobs subject/exchange with broker confirms (pipelined), optionally waits on a
//! private reply address for every result (printed as JSON lines; the exit code says whether all
//! succeeded), and runs `bench` against the raw broker in the same run. Ctrl-C stops it; jobs
//! already confirmed stay in the broker.

mod bench_cmd;
mod cancel_cmd;
mod mapreduce_cmd;
mod publish;
mod schedule_cmd;
mod tee_cmd;
mod watch_cmd;
mod workers_cmd;
mod workflow_cmd;

use clap::{Parser, Subcommand};
use conveyor::cli::BrokerArgs;
use conveyor::BrokerUrl;

#[derive(Debug, Parser)]
#[command(
    name = "conveyor-producer",
    version,
    about = "Publishes Conveyor jobs and waits for results"
)]
struct Args {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish jobs of one kind (and optionally wait for their results).
    Publish(publish::PublishArgs),
    /// Measure end-to-end throughput and latency next to the raw broker.
    Bench(bench_cmd::BenchArgs),
    /// Cancel jobs, a group's members or a chain's steps, on every worker.
    Cancel(cancel_cmd::CancelArgs),
    /// Publish a chain: each step's output is the next step's input.
    Chain(workflow_cmd::ChainArgs),
    /// Publish a group of jobs of one kind (a chord with --callback), tracked as one.
    Group(workflow_cmd::GroupArgs),
    /// Receive a copy of every job of a kind (audit, shadow traffic) without taking any from the
    /// workers.
    Tee(tee_cmd::TeeArgs),
    /// Run a MapReduce job (wordcount) over the workers, or benchmark it with --bench.
    Mapreduce(mapreduce_cmd::MapReduceArgs),
    /// Print job lifecycle events live, one line each.
    Watch(watch_cmd::WatchArgs),
    /// List the live workers, from their heartbeats.
    Workers(workers_cmd::WorkersArgs),
    /// Periodic jobs: add, list, remove, pause and resume schedules, or run a scheduler.
    Schedule(schedule_cmd::ScheduleArgs),
    /// Delete the namespace's streams, or exchanges and queues, with every job and result in them.
    DeleteNamespace(DeleteArgs),
}

#[derive(Debug, clap::Args)]
struct DeleteArgs {
    /// Kinds whose RabbitMQ job and retry queues to delete too (default: the built-in kinds).
    #[arg(long, value_delimiter = ',')]
    kinds: Option<Vec<String>>,
    /// Confirms that everything in the namespace may be lost.
    #[arg(long)]
    yes: bool,
}

async fn delete_namespace(
    broker: &BrokerUrl,
    namespace: &str,
    args: DeleteArgs,
) -> anyhow::Result<std::process::ExitCode> {
    if !args.yes {
        anyhow::bail!(
            "delete-namespace loses every job and result in {namespace:?}: add --yes to confirm"
        );
    }
    let kinds = args
        .kinds
        .unwrap_or_else(|| conveyor::worker::builtin::registry().kinds());
    let transport = conveyor::transport::connect(broker, namespace).await?;
    transport.delete_namespace(&kinds).await?;
    transport.close().await?;
    eprintln!("deleted namespace {namespace} on {broker}");
    Ok(std::process::ExitCode::SUCCESS)
}

/// Sleeps for `d`, or forever when there is none (a `--for` that was not given).
pub(crate) async fn sleep_or_never(d: Option<std::time::Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => futures::future::pending().await,
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    // A scheduler says when it takes or loses the lead.
    conveyor::cli::init_tracing(match &args.command {
        Command::Schedule(schedule_cmd::ScheduleArgs {
            command: schedule_cmd::ScheduleCommand::Run { .. },
        }) => "warn,conveyor::schedule=info",
        _ => "warn",
    });
    let url = args.broker.url();
    let ns = &args.broker.namespace;
    let outcome = match args.command {
        Command::Publish(p) => publish::run(&url, ns, p).await,
        Command::Bench(b) => bench_cmd::run(&url, ns, b).await,
        Command::Cancel(c) => cancel_cmd::run(&url, ns, c).await,
        Command::Chain(c) => workflow_cmd::chain(&url, ns, c).await,
        Command::Group(g) => workflow_cmd::group(&url, ns, g).await,
        Command::Tee(t) => tee_cmd::run(&url, ns, t).await,
        Command::Mapreduce(m) => mapreduce_cmd::run(&url, ns, m).await,
        Command::Watch(w) => watch_cmd::run(&url, ns, w).await,
        Command::Workers(w) => workers_cmd::run(&url, ns, w).await,
        Command::Schedule(s) => schedule_cmd::run(&url, ns, s).await,
        Command::DeleteNamespace(d) => delete_namespace(&url, ns, d).await,
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
