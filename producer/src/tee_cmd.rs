//! `conveyor-producer tee`: receives a copy of every job of a kind, without taking jobs from the
//! workers, and prints each as a JSON line.

use anyhow::Context;
use clap::Args;
use conveyor::codec::Codec;
use conveyor::protocol::header;
use conveyor::transport::{ConsumeOptions, Source};
use conveyor::BrokerUrl;
use futures::StreamExt;
use serde_json::{json, Value};
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct TeeArgs {
    /// Job kind to copy.
    kind: String,
    /// The tee's name: copies wait for it under this name while it is away.
    #[arg(long)]
    name: String,
    /// Most copies waiting; past it the oldest copy is dropped (workers are never slowed).
    #[arg(long, default_value_t = 10_000)]
    backlog: u64,
    /// Remove the tee when this reader goes away, instead of keeping copies for the next one.
    #[arg(long)]
    ephemeral: bool,
    /// Stop after this many copies.
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this long (default: until Ctrl-C).
    #[arg(long = "for", value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Delete the tee and its waiting copies, then exit.
    #[arg(long)]
    delete: bool,
}

/// A copy as a JSON line: id, kind, headers and the decoded input.
fn line(kind: &str, msg: &conveyor::Message) -> Value {
    let headers: serde_json::Map<String, Value> = msg
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
        .collect();
    let input = Codec::from_content_type(msg.headers.get(header::CONTENT_TYPE))
        .and_then(|c| c.decode(&msg.body))
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&msg.body).into_owned()));
    json!({
        "id": conveyor::job::id_of(&msg.headers),
        "kind": kind,
        "headers": headers,
        "input": input,
    })
}

pub async fn run(broker: &BrokerUrl, namespace: &str, args: TeeArgs) -> anyhow::Result<ExitCode> {
    conveyor::protocol::validate_kind(&args.kind)?;
    conveyor::protocol::validate_tee_name(&args.name)?;
    if args.backlog == 0 {
        anyhow::bail!("--backlog must be at least 1");
    }
    let transport = conveyor::transport::connect(broker, namespace)
        .await
        .with_context(|| format!("connecting to {broker}"))?;
    if args.delete {
        transport.delete_tee(&args.kind, &args.name).await?;
        eprintln!("deleted tee {} of {}", args.name, args.kind);
        transport.close().await?;
        return Ok(ExitCode::SUCCESS);
    }
    let source = Source::Tee {
        kind: args.kind.clone(),
        name: args.name.clone(),
        backlog: args.backlog,
    };
    let opts = ConsumeOptions {
        prefetch: 64,
        ephemeral: args.ephemeral,
        ..ConsumeOptions::default()
    };
    let mut copies = transport.consume(source, opts).await?;
    eprintln!(
        "tee {} copying {} jobs of namespace {namespace} (backlog {})",
        args.name, args.kind, args.backlog
    );
    let (stop, _) = conveyor::shutdown::on_signals();
    let deadline = crate::sleep_or_never(args.duration);
    tokio::pin!(deadline);
    let mut seen = 0u64;
    while args.count.is_none_or(|n| seen < n) {
        let next = tokio::select! {
            d = copies.next() => d,
            _ = stop.cancelled() => break,
            _ = &mut deadline => break,
        };
        let delivery = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                eprintln!("tee: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            None => break,
        };
        let text = line(&delivery.kind, &delivery.message).to_string();
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
            let _ = delivery.nack().await;
            break;
        }
        drop(out);
        delivery.ack().await?;
        seen += 1;
    }
    drop(copies);
    transport.close().await?;
    Ok(ExitCode::SUCCESS)
}
