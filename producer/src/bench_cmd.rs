//! `conveyor-producer bench`.

use clap::Args;
use conveyor::BrokerUrl;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Jobs for the full-load run.
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
}

pub async fn run(
    _broker: &BrokerUrl,
    _namespace: &str,
    _args: BenchArgs,
) -> anyhow::Result<ExitCode> {
    anyhow::bail!("bench is not built yet")
}
