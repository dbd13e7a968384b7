//! `conveyor-aggregator`: records every job result once and serves them over HTTP.
//!
//! Consumes all results of the namespace, writes each job id once to a durable store in
//! `--store` (synced before the result is acked, so it survives kill -9), counts duplicates, and
//! answers `GET /jobs/{id}`, `GET /stats` and `GET /health` on `--http`. On SIGTERM/SIGINT it
//! finishes the batch in hand and exits 0.

use anyhow::Context;
use clap::Parser;
use conveyor::aggregator::{self, AggregatorConfig};
use conveyor::BrokerUrl;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "conveyor-aggregator",
    version,
    about = "Records Conveyor job results once, durably"
)]
struct Args {
    /// Broker URL: nats://host:4222 or amqp://user:pass@host:5672/vhost.
    #[arg(long, env = "CONVEYOR_BROKER", default_value = "nats://127.0.0.1:4222")]
    broker: BrokerUrl,
    /// Namespace of subjects, exchanges and queues.
    #[arg(long, env = "CONVEYOR_NAMESPACE", default_value = "conveyor")]
    namespace: String,
    /// Directory of the durable result store.
    #[arg(long, env = "CONVEYOR_STORE", default_value = "./conveyor-store")]
    store: PathBuf,
    /// HTTP listen address.
    #[arg(long, env = "CONVEYOR_HTTP", default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// How long to keep trying to reach the broker at start-up.
    #[arg(long, env = "CONVEYOR_CONNECT_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let (shutdown, _force) = conveyor::shutdown::on_signals();
    let transport = conveyor::transport::connect_with_retry(
        &args.broker,
        &args.namespace,
        args.connect_timeout,
    )
    .await
    .with_context(|| format!("connecting to {}", args.broker))?;
    let config = AggregatorConfig {
        store_dir: args.store,
        http: args.http,
    };
    aggregator::run(transport, config, shutdown, None).await?;
    Ok(())
}
