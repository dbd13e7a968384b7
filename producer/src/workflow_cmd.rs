//! `conveyor-producer chain` and `conveyor-producer group`: workflows from the command line.

use crate::publish::progress;
use anyhow::{bail, Context};
use clap::Args;
use conveyor::workflow::{Chain, Chord, Group, Policy, Submission};
use conveyor::{BrokerUrl, Client, JobResult, JobSpec};
use serde_json::Value;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct ChainArgs {
    /// Step kinds in order, comma-separated (`hash,echo`).
    #[arg(value_delimiter = ',', required = true)]
    steps: Vec<String>,
    /// The first step's input as JSON.
    #[arg(long, default_value = "null")]
    payload: String,
    #[command(flatten)]
    common: WorkflowOpts,
}

/// What chains and groups share.
#[derive(Debug, Args)]
pub struct WorkflowOpts {
    /// Workflow id (chain steps get `<id>.<step>`, group members `<id>.<index>`).
    #[arg(long)]
    id: Option<String>,
    /// Attempts each step or member gets.
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Wait for the outcome and print it; exit 1 unless it succeeded (a group: every member; a
    /// chord: its callback). A group shows a progress bar.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits [default: 60s for a chain, 5m for a group].
    #[arg(long, value_parser = humantime::parse_duration)]
    wait_timeout: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct GroupArgs {
    /// Kind of every member.
    kind: String,
    /// Member inputs: a JSON array, or one JSON document per line; `-` reads stdin.
    #[arg(long)]
    payloads_file: PathBuf,
    /// What a member's failure does: continue, or fail-fast (cancel the members not finished).
    #[arg(long, default_value = "continue")]
    policy: Policy,
    /// Make it a chord: run a job of this kind once every member is done, on their outputs.
    #[arg(long)]
    callback: Option<String>,
    #[command(flatten)]
    common: WorkflowOpts,
}

/// Reads member inputs: a JSON array, or JSON lines.
fn read_inputs(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = if path.as_os_str() == "-" {
        let mut s = String::new();
        for line in std::io::stdin().lock().lines() {
            s.push_str(&line.context("reading stdin")?);
            s.push('\n');
        }
        s
    } else {
        std::fs::read_to_string(path)
            .with_context(|| format!("reading --payloads-file {}", path.display()))?
    };
    if text.trim_start().starts_with('[') {
        return serde_json::from_str(&text)
            .with_context(|| format!("--payloads-file {} is not a JSON array", path.display()));
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| {
            serde_json::from_str(l).with_context(|| {
                format!(
                    "--payloads-file {} line {} is not valid JSON",
                    path.display(),
                    n + 1
                )
            })
        })
        .collect()
}

fn exit_for(r: &JobResult) -> ExitCode {
    if r.succeeded() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

pub async fn chain(
    broker: &BrokerUrl,
    namespace: &str,
    args: ChainArgs,
) -> anyhow::Result<ExitCode> {
    let input: Value =
        serde_json::from_str(&args.payload).context("--payload is not valid JSON")?;
    let mut chain = Chain::new(args.steps.clone(), input);
    chain.id = args.common.id.clone();
    chain.max_attempts = args.common.max_attempts;
    // Checked before connecting, so a bad step fails fast.
    chain.first_step()?;
    let client = Client::connect(broker, namespace)
        .await
        .with_context(|| format!("connecting to {broker}"))?;
    let code = if args.common.wait {
        let mut handle = client.submit(chain).await?;
        let wait = args.common.wait_timeout.unwrap_or(Duration::from_secs(60));
        let r = handle.result(wait).await?;
        println!("{}", serde_json::to_string(&r)?);
        exit_for(&r)
    } else {
        let (id, first) = chain.first_step()?;
        client.publish(&first).await?;
        println!("{id}");
        eprintln!("published chain {id} ({})", args.steps.join(" → "));
        ExitCode::SUCCESS
    };
    client.close().await?;
    Ok(code)
}

pub async fn group(
    broker: &BrokerUrl,
    namespace: &str,
    args: GroupArgs,
) -> anyhow::Result<ExitCode> {
    conveyor::protocol::validate_kind(&args.kind)?;
    let inputs = read_inputs(&args.payloads_file)?;
    if inputs.is_empty() {
        bail!(
            "--payloads-file {} has no inputs",
            args.payloads_file.display()
        );
    }
    let members: Vec<JobSpec> = inputs
        .into_iter()
        .map(|i| {
            let mut spec = JobSpec::new(args.kind.clone(), i);
            spec.max_attempts = args.common.max_attempts;
            spec
        })
        .collect();
    let size = members.len();
    let mut group = Group::new(members).policy(args.policy);
    group.id = args.common.id.clone();
    let what: Submission = match &args.callback {
        Some(cb) => {
            conveyor::protocol::validate_kind(cb)?;
            Chord::new(group, cb.clone()).into()
        }
        None => group.into(),
    };
    let client = Client::connect(broker, namespace)
        .await
        .with_context(|| format!("connecting to {broker}"))?;
    let code = if args.common.wait {
        let wait = args.common.wait_timeout.unwrap_or(Duration::from_secs(300));
        let mut handle = client.submit(what).await?;
        eprintln!("published group {} of {size} job(s)", handle.id());
        let r = if args.callback.is_some() {
            handle.result(wait).await?
        } else {
            let bar = progress(size, "done");
            let r = handle.result_with_progress(wait, |_| bar.inc(1)).await;
            bar.finish_and_clear();
            let r = r?;
            for m in handle.members() {
                println!("{}", serde_json::to_string(m)?);
            }
            r
        };
        let summary = serde_json::json!({
            "id": r.id, "status": r.status, "error": r.error,
        });
        if args.callback.is_some() {
            println!("{}", serde_json::to_string(&r)?);
        }
        eprintln!("{summary}");
        exit_for(&r)
    } else {
        let (id, specs) = match what {
            Submission::Chord(c) => c.specs(None)?,
            Submission::Group(g) => g.specs(None)?,
            _ => bail!("not a group"),
        };
        let bar = progress(size, "published");
        let failed = client
            .publish_many(specs, 256, |_| bar.inc(1))
            .await
            .into_iter()
            .filter(|r| r.is_err())
            .count();
        bar.finish_and_clear();
        println!("{id}");
        if failed > 0 {
            bail!("{failed} of {size} member(s) of group {id} were not published");
        }
        eprintln!("published group {id} of {size} job(s)");
        ExitCode::SUCCESS
    };
    client.close().await?;
    Ok(code)
}
