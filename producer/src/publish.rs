//! `conveyor-producer publish`.

use anyhow::{bail, Context};
use clap::Args;
use conveyor::{BrokerUrl, Client, Codec, JobSpec};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Job kind, e.g. echo.
    kind: String,
    /// The job's input as JSON.
    #[arg(long, conflicts_with = "payload_file")]
    payload: Option<String>,
    /// Read the input from a file; `-` reads one JSON document per line of stdin, a job each.
    #[arg(long)]
    payload_file: Option<PathBuf>,
    /// Publish this many copies of the payload.
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Job id (with several jobs, `<id>-<n>`).
    #[arg(long)]
    id: Option<String>,
    /// Attempts before the job is dead-lettered.
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Deadline per attempt, in milliseconds.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Singleflight key (`Conveyor-Dedup-Key`): jobs with one key in flight at the same time
    /// run once across the cluster and all end with that outcome.
    #[arg(long)]
    dedup_key: Option<String>,
    /// Do not start the job for this long (`10s`, `10m`, `2h`): it waits in the broker.
    #[arg(long, value_parser = parse_delay, conflicts_with = "at")]
    delay: Option<Duration>,
    /// Do not start the job before this time: RFC 3339 (`2026-12-01T10:00:00Z`) or
    /// milliseconds since the Unix epoch.
    #[arg(long, value_parser = parse_at)]
    at: Option<u64>,
    /// Priority: high, normal or low (`Conveyor-Priority`). A worker takes a kind's high jobs
    /// first, and its normal and low ones in a weighted share.
    #[arg(long, default_value = "normal")]
    priority: conveyor::Priority,
    /// Body encoding: json or bincode.
    #[arg(long, default_value = "json")]
    codec: Codec,
    /// Wait for every result; print each as a JSON line; exit 1 if any did not succeed.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits for all results.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    wait_timeout: Duration,
    /// Publishes awaiting their confirm at once.
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
}

fn parse_at(s: &str) -> Result<u64, String> {
    let at = conveyor::protocol::parse_not_before(s)?;
    let max = conveyor::job::now_ms().saturating_add(
        u64::try_from(conveyor::protocol::MAX_DELAY.as_millis()).unwrap_or(u64::MAX),
    );
    if at > max {
        return Err(format!("{s:?} is more than 366 days ahead"));
    }
    Ok(at)
}

fn parse_delay(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d > conveyor::protocol::MAX_DELAY {
        return Err(format!("{s:?} is more than 366 days"));
    }
    Ok(d)
}

fn read_payloads(args: &PublishArgs) -> anyhow::Result<Vec<Value>> {
    let parse = |s: &str, what: &str| -> anyhow::Result<Value> {
        serde_json::from_str(s).with_context(|| format!("{what} is not valid JSON"))
    };
    let one = match (&args.payload, &args.payload_file) {
        (Some(p), _) => parse(p, "--payload")?,
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut out = Vec::new();
            for (n, line) in std::io::stdin().lock().lines().enumerate() {
                let line = line.context("reading stdin")?;
                if line.trim().is_empty() {
                    continue;
                }
                out.push(parse(&line, &format!("stdin line {}", n + 1))?);
            }
            return Ok(out);
        }
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --payload-file {}", path.display()))?;
            parse(&text, &format!("--payload-file {}", path.display()))?
        }
        (None, None) => Value::Null,
    };
    Ok(vec![one; args.count])
}

pub fn progress(len: usize, what: &'static str) -> ProgressBar {
    if len > 1 && std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(len as u64);
        bar.set_style(
            ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(what);
        bar
    } else {
        ProgressBar::hidden()
    }
}

pub async fn run(
    broker: &BrokerUrl,
    namespace: &str,
    args: PublishArgs,
) -> anyhow::Result<ExitCode> {
    conveyor::protocol::validate_kind(&args.kind)?;
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    let payloads = read_payloads(&args)?;
    let client = Client::connect(broker, namespace)
        .await
        .with_context(|| format!("connecting to {broker}"))?;
    let mut waiter = if args.wait {
        Some(client.waiter().await?)
    } else {
        None
    };
    let many = payloads.len() > 1;
    let specs: Vec<JobSpec> = payloads
        .into_iter()
        .enumerate()
        .map(|(n, input)| {
            let mut spec = JobSpec::new(args.kind.clone(), input).codec(args.codec);
            spec.id = args.id.as_ref().map(|id| {
                if many {
                    format!("{id}-{n}")
                } else {
                    id.clone()
                }
            });
            spec.max_attempts = args.max_attempts;
            spec.timeout_ms = args.timeout_ms;
            if let Some(key) = &args.dedup_key {
                spec = spec.dedup_key(key.clone());
            }
            if let Some(d) = args.delay {
                spec = spec.delay(d);
            }
            spec = spec.priority(args.priority);
            if let Some(ms) = args.at {
                spec = spec.not_before(std::time::UNIX_EPOCH + Duration::from_millis(ms));
            }
            if let Some(w) = &waiter {
                spec.reply_to = Some(w.address().to_string());
            }
            spec
        })
        .collect();
    let total = specs.len();
    let bar = progress(total, "published");
    let results = client
        .publish_many(specs, args.in_flight, |_| bar.inc(1))
        .await;
    bar.finish_and_clear();
    let mut ids = Vec::with_capacity(total);
    let mut failed_publishes = 0;
    for r in results {
        match r {
            Ok(id) => ids.push(id),
            Err(e) => {
                failed_publishes += 1;
                eprintln!("publish failed: {e}");
            }
        }
    }
    let Some(waiter) = waiter.as_mut() else {
        for id in &ids {
            println!("{id}");
        }
        eprintln!("published {} job(s) of kind {}", ids.len(), args.kind);
        client.close().await?;
        return Ok(if failed_publishes == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    };
    let bar = progress(ids.len(), "done");
    let mut all_ok = failed_publishes == 0;
    // A delayed job's wait starts at its time.
    let until = args.at.map(|ms| {
        let at = std::time::UNIX_EPOCH + Duration::from_millis(ms);
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
    });
    let patience = args.wait_timeout + args.delay.or(until).unwrap_or_default();
    let done = waiter
        .wait_for(&ids, patience, |r| {
            bar.inc(1);
            let line = serde_json::to_string(r).unwrap_or_default();
            bar.suspend(|| println!("{line}"));
        })
        .await;
    bar.finish_and_clear();
    if done.iter().any(|r| !r.succeeded()) {
        all_ok = false;
    }
    if done.len() < ids.len() {
        all_ok = false;
        eprintln!(
            "{} of {} job(s) had no result within {:?}",
            ids.len() - done.len(),
            ids.len(),
            patience
        );
    }
    client.close().await?;
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
