//! `conveyor-producer`: publishes jobs, waits for their results, and benchmarks the system.
//!
//! Publishes to the jobs subject/exchange with broker confirms (pipelined), optionally waits on a
//! private reply address for every result (printed as JSON lines; the exit code says whether all
//! succeeded), and runs `bench` against the raw broker in the same run. Ctrl-C stops it; jobs
//! already confirmed stay in the broker.

mod bench_cmd;
mod publish;

use clap::{Parser, Subcommand};
use conveyor::BrokerUrl;

#[derive(Debug, Parser)]
#[command(
    name = "conveyor-producer",
    version,
    about = "Publishes Conveyor jobs and waits for results"
)]
struct Args {
    /// Broker URL: nats://host:4222 or amqp://user:pass@host:5672/vhost.
    #[arg(
        long,
        env = "CONVEYOR_BROKER",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    broker: BrokerUrl,
    /// Namespace of subjects, exchanges and queues.
    #[arg(
        long,
        env = "CONVEYOR_NAMESPACE",
        default_value = "conveyor",
        global = true
    )]
    namespace: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish jobs of one kind (and optionally wait for their results).
    Publish(publish::PublishArgs),
    /// Measure end-to-end throughput and latency next to the raw broker.
    Bench(bench_cmd::BenchArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let outcome = match args.command {
        Command::Publish(p) => publish::run(&args.broker, &args.namespace, p).await,
        Command::Bench(b) => bench_cmd::run(&args.broker, &args.namespace, b).await,
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
