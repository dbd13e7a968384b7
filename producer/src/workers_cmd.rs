//! `conveyor-producer workers`: lists the workers heard on the broker.

use anyhow::Context;
use clap::Args;
use conveyor::worker::heartbeat::{Heartbeat, PATTERN};
use conveyor::BrokerUrl;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct WorkersArgs {
    /// How long to listen for heartbeats (longer than the workers' --heartbeat).
    #[arg(long, default_value = "6s", value_parser = humantime::parse_duration)]
    listen: Duration,
}

pub async fn run(
    broker: &BrokerUrl,
    namespace: &str,
    args: WorkersArgs,
) -> anyhow::Result<ExitCode> {
    let transport = conveyor::transport::connect(broker, namespace)
        .await
        .with_context(|| format!("connecting to {broker}"))?;
    let mut beats = transport.listen(PATTERN).await?;
    let mut latest: BTreeMap<String, Heartbeat> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + args.listen;
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, beats.next()).await {
        if let Some(hb) = Heartbeat::from_message(&msg) {
            latest.insert(hb.id.clone(), hb);
        }
    }
    for hb in latest.values() {
        let mut line = serde_json::to_value(hb)?;
        line["alive"] = serde_json::Value::Bool(!hb.stopping);
        println!("{line}");
    }
    let alive = latest.values().filter(|h| !h.stopping).count();
    eprintln!("{alive} live worker(s) heard within {:?}", args.listen);
    transport.close().await?;
    Ok(ExitCode::SUCCESS)
}
