//! `conveyor-aggregator`: records every job result once and serves them over HTTP.
//!
//! Consumes all results of the namespace, writes each job id once to a durable store in
//! `--store` (synced before the result is acked, so it survives kill -9), counts duplicates, and
//! answers `GET /jobs/{id}`, `GET /stats` and `GET /health` on `--http`. On SIGTERM/SIGINT it
//! finishes the batch in hand and exits 0.

use anyhow::Context;
use clap::Parser;
use conveyor::aggregator::{self, AggregatorConfig};
use conveyor::cli::BrokerArgs;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "conveyor-aggregator",
    version,
    about = "Records Conveyor job results once, durably"
)]
struct Args {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Directory of the durable result store.
    #[arg(long, env = "CONVEYOR_STORE", default_value = "./conveyor-store")]
    store: PathBuf,
    /// Memory for the store's page cache, in MiB: the aggregator's memory stays near this plus
    /// its batches however many results the store holds.
    #[arg(long, env = "CONVEYOR_STORE_CACHE_MIB", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..))]
    store_cache_mib: u16,
    /// HTTP listen address.
    #[arg(long, env = "CONVEYOR_HTTP", default_value = "127.0.0.1:8080")]
    http: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    conveyor::cli::init_tracing("info");
    let args = Args::parse();
    let (shutdown, _force) = conveyor::shutdown::on_signals();
    let transport = args
        .broker
        .connect()
        .await
        .with_context(|| format!("connecting to {}", args.broker.broker))?;
    let config = AggregatorConfig {
        store_dir: args.store,
        http: args.http,
        store_cache_bytes: usize::from(args.store_cache_mib) << 20,
    };
    aggregator::run(transport, config, shutdown, None).await?;
    Ok(())
}
