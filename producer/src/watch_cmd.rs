//! `conveyor-producer watch`: prints job lifecycle events live, one line each.

use anyhow::Context;
use clap::Args;
use conveyor::events::JobEvent;
use conveyor::BrokerUrl;
use futures::StreamExt;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Only events of this job kind.
    #[arg(long)]
    kind: Option<String>,
    /// Print each event as a JSON object instead of a text line.
    #[arg(long)]
    json: bool,
    /// Stop after this many events.
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this long (default: until Ctrl-C).
    #[arg(long = "for", value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
}

/// One event as a text line: time, state, kind, id, attempt, worker, error.
fn line(ev: &JobEvent) -> String {
    let at =
        humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ev.at_ms));
    let mut out = format!(
        "{at} {:<9} {} {} attempt={}",
        ev.state, ev.kind, ev.id, ev.attempt
    );
    if let Some(g) = &ev.group {
        out.push_str(&format!(" group={g}"));
    }
    if let Some(w) = &ev.worker {
        out.push_str(&format!(" worker={w}"));
    }
    if let Some(e) = &ev.error {
        out.push_str(&format!(" error={e:?}"));
    }
    out
}

pub async fn run(broker: &BrokerUrl, namespace: &str, args: WatchArgs) -> anyhow::Result<ExitCode> {
    let transport = conveyor::transport::connect(broker, namespace)
        .await
        .with_context(|| format!("connecting to {broker}"))?;
    let mut events = conveyor::events::watch(transport.as_ref(), args.kind.as_deref()).await?;
    eprintln!(
        "watching {} events of namespace {namespace}",
        args.kind.as_deref().unwrap_or("all")
    );
    let (stop, _) = conveyor::shutdown::on_signals();
    let deadline = crate::sleep_or_never(args.duration);
    tokio::pin!(deadline);
    let mut seen = 0u64;
    let mut out = std::io::stdout().lock();
    while args.count.is_none_or(|n| seen < n) {
        let ev = tokio::select! {
            ev = events.next() => ev,
            _ = stop.cancelled() => break,
            _ = &mut deadline => break,
        };
        let Some(ev) = ev else {
            eprintln!("the event subscription ended");
            break;
        };
        seen += 1;
        let text = if args.json {
            serde_json::to_string(&ev)?
        } else {
            line(&ev)
        };
        // Line by line, so a pipe sees each event as it comes.
        if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    drop(out);
    transport.close().await?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use conveyor::events::JobState;

    #[test]
    fn text_lines_name_state_kind_id_and_error() {
        let mut ev = JobEvent::new("j1", "hash", JobState::Dead, 3);
        ev.worker = Some("w-1".into());
        ev.error = Some("boom".into());
        let l = line(&ev);
        assert!(l.contains("dead"), "{l}");
        assert!(
            l.contains("hash j1 attempt=3 worker=w-1 error=\"boom\""),
            "{l}"
        );
    }
}
