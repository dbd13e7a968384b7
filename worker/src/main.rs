//! `conveyor-worker`: runs the built-in job kinds.
//!
//! Consumes jobs of its kinds (every kind of the namespace when `--kinds` is not given) from the
//! broker, runs at most `--concurrency` at once, and publishes one final result per job to the
//! results subject/exchange (dead letters for jobs that cannot succeed). On SIGTERM/SIGINT it
//! stops taking jobs, lets running ones finish within `--drain-timeout`, hands the rest back to
//! the broker and exits 0; a second signal forces that at once.

use anyhow::Context;
use clap::Parser;
use conveyor::cli::BrokerArgs;
use conveyor::worker::{self, backoff::Backoff, builtin, WorkerConfig};
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "conveyor-worker",
    version,
    about = "Runs Conveyor jobs from NATS JetStream or RabbitMQ"
)]
struct Args {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Jobs run at once (and broker prefetch per kind). Default: number of CPUs × 4.
    #[arg(long, env = "CONVEYOR_CONCURRENCY")]
    concurrency: Option<usize>,
    /// Kinds to take, comma-separated. Default: every kind of the namespace (unknown kinds are
    /// dead-lettered).
    #[arg(long, env = "CONVEYOR_KINDS", value_delimiter = ',')]
    kinds: Option<Vec<String>>,
    /// Bodies larger than this many bytes are dead-lettered unread.
    #[arg(long, env = "CONVEYOR_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    max_body_bytes: usize,
    /// How long running jobs may take to finish after SIGTERM.
    #[arg(long, env = "CONVEYOR_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Lease of a delivered job before the broker redelivers it (JetStream AckWait; long jobs
    /// extend it while they run).
    #[arg(long, env = "CONVEYOR_LEASE", default_value = "30s", value_parser = humantime::parse_duration)]
    lease: Duration,
    /// How often to broadcast a heartbeat (a worker silent for three is reported gone).
    #[arg(long, env = "CONVEYOR_HEARTBEAT", default_value = "5s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// Delay before the first retry; doubles each attempt, with jitter.
    #[arg(long, env = "CONVEYOR_RETRY_BASE", default_value = "200ms", value_parser = humantime::parse_duration)]
    retry_base: Duration,
    /// Longest delay between retries.
    #[arg(long, env = "CONVEYOR_RETRY_MAX", default_value = "60s", value_parser = humantime::parse_duration)]
    retry_max: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    conveyor::cli::init_tracing("info");
    let args = Args::parse();
    if args.lease < Duration::from_secs(1) {
        anyhow::bail!("--lease must be at least 1s, got {:?}", args.lease);
    }
    let defaults = WorkerConfig::default();
    let config = WorkerConfig {
        kinds: args.kinds,
        concurrency: args.concurrency.unwrap_or(defaults.concurrency),
        max_body_bytes: args.max_body_bytes,
        drain_timeout: args.drain_timeout,
        lease: args.lease,
        heartbeat: args.heartbeat,
        backoff: Backoff {
            base: args.retry_base,
            max: args.retry_max,
        },
        ..defaults
    };
    let (shutdown, force) = conveyor::shutdown::on_signals();
    let transport = args
        .broker
        .connect()
        .await
        .with_context(|| format!("connecting to {}", args.broker.broker))?;
    worker::run(transport, builtin::registry(), config, shutdown, force).await?;
    Ok(())
}
