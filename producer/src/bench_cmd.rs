//! `conveyor-producer bench`.

use anyhow::Context;
use clap::Args;
use conveyor::bench::{self, BenchConfig, FlowFigures};
use conveyor::{BrokerUrl, Client};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Jobs in the full-load run (each flow).
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    /// Jobs in the light-load run, one at a time.
    #[arg(long, default_value_t = 300)]
    light_jobs: usize,
    /// Unconfirmed publishes at once at full load.
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
    /// Concurrency of the raw flow's consumer; match the workers' --concurrency.
    #[arg(long, default_value_t = conveyor::worker::default_concurrency())]
    raw_concurrency: usize,
    /// Longest wait for one run's results.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Rounds of both flows, alternating; each figure is the median over the rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Print the report as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

fn row(name: &str, f: &FlowFigures) -> String {
    format!(
        "{name:<12} {:>10.0} {:>10.2} {:>10.2} {:>10.3} {:>10.3}",
        f.jobs_per_sec, f.full_p50_ms, f.full_p99_ms, f.light_p50_ms, f.light_p99_ms
    )
}

pub async fn run(broker: &BrokerUrl, namespace: &str, args: BenchArgs) -> anyhow::Result<ExitCode> {
    let client = Client::connect(broker, namespace)
        .await
        .with_context(|| format!("connecting to {broker}"))?;
    let cfg = BenchConfig {
        jobs: args.jobs.max(1),
        light_jobs: args.light_jobs,
        in_flight: args.in_flight,
        raw_concurrency: args.raw_concurrency.max(1),
        timeout: args.timeout,
    };
    let report = bench::run(broker, &client, &cfg, args.rounds).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "broker {broker}  namespace {namespace}  jobs {}  light {}  in-flight {}  rounds {} (medians)",
            cfg.jobs, cfg.light_jobs, cfg.in_flight, args.rounds
        );
        println!(
            "{:<12} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "flow", "jobs/s", "p50 ms", "p99 ms", "light p50", "light p99"
        );
        println!("{}", row("conveyor", &report.conveyor));
        println!("{}", row("raw broker", &report.raw));
        println!("ratio conveyor/raw: {:.2}", report.ratio);
    }
    client.close().await?;
    Ok(ExitCode::SUCCESS)
}
