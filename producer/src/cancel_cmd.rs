//! `conveyor-producer cancel`: cancels jobs, a group's members or a chain's steps, and says for
//! each job whether the aggregator had already recorded it as finished.

use anyhow::{bail, Context};
use clap::Args;
use conveyor::client::CancelRequest;
use conveyor::{BrokerUrl, Client};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct CancelArgs {
    /// Job ids to cancel.
    ids: Vec<String>,
    /// Cancel every member of this group that has not finished.
    #[arg(long)]
    group: Option<String>,
    /// Cancel every step of this chain that has not finished.
    #[arg(long)]
    chain: Option<String>,
    /// Why (shown in the cancelled results).
    #[arg(long)]
    reason: Option<String>,
    /// The aggregator's HTTP address, asked whether each job already finished.
    #[arg(
        long,
        env = "CONVEYOR_AGGREGATOR",
        default_value = "http://127.0.0.1:8080"
    )]
    aggregator: String,
}

/// What the aggregator knows of job `id`: its final status, `None` when it has no result for
/// it, or an error when it cannot be asked.
fn recorded_status(aggregator: &str, id: &str) -> anyhow::Result<Option<String>> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let url = format!("{}/jobs/{id}", aggregator.trim_end_matches('/'));
    let mut resp = agent
        .get(&url)
        .call()
        .with_context(|| format!("asking {url}"))?;
    match resp.status().as_u16() {
        404 => Ok(None),
        200 => {
            let body: serde_json::Value = serde_json::from_str(
                &resp
                    .body_mut()
                    .read_to_string()
                    .context("reading the answer")?,
            )
            .context("the aggregator's answer is not JSON")?;
            Ok(Some(
                body["status"].as_str().unwrap_or("finished").to_string(),
            ))
        }
        other => bail!("{url} answered {other}"),
    }
}

pub async fn run(
    broker: &BrokerUrl,
    namespace: &str,
    args: CancelArgs,
) -> anyhow::Result<ExitCode> {
    if args.ids.is_empty() && args.group.is_none() && args.chain.is_none() {
        bail!("name what to cancel: job ids, --group ID or --chain ID");
    }
    let request = CancelRequest {
        ids: args.ids.clone(),
        group: args.group.clone(),
        chain: args.chain.clone(),
        reason: args.reason.clone(),
        ..CancelRequest::default()
    };
    let client = Client::connect(broker, namespace)
        .await
        .with_context(|| format!("connecting to {broker}"))?;
    client.cancel(&request).await?;
    client.close().await?;
    for id in &args.ids {
        let (aggregator, id2) = (args.aggregator.clone(), id.clone());
        let known = tokio::task::spawn_blocking(move || recorded_status(&aggregator, &id2))
            .await
            .context("asking the aggregator")?;
        match known {
            Ok(Some(status)) => println!("{id}: already finished ({status}); nothing to cancel"),
            Ok(None) => println!(
                "{id}: cancel sent; no result recorded for it, so it ends cancelled if it is queued or running (an id no job has is remembered for an hour and then forgotten)"
            ),
            Err(e) => println!("{id}: cancel sent; could not ask the aggregator whether it finished: {e:#}"),
        }
    }
    if let Some(g) = &args.group {
        println!("group {g}: cancel sent for its members not finished");
    }
    if let Some(c) = &args.chain {
        println!("chain {c}: cancel sent for its steps not finished");
    }
    Ok(ExitCode::SUCCESS)
}
