//! `conveyor-supervisor`: keeps worker processes running.
//!
//! `conveyor-supervisor --workers N -- COMMAND ARGS…` runs N copies of COMMAND and restarts any
//! that exits or crashes, with exponential backoff; it gives up (stops the children, prints why,
//! exits 1) when more than `--max-restarts` restarts happen within `--within`.
//! `conveyor-supervisor up` runs a whole local stack the same way: the aggregator and N workers.
//! Children's output is passed through with a `[name] ` prefix. SIGTERM/SIGINT are forwarded to
//! the children as SIGTERM; they get `--drain-timeout` to exit, then they are killed. A second
//! SIGTERM/SIGINT forces the stop: the children get a second SIGTERM (a worker then hands its
//! running jobs back at once) and 3 s more before they are killed.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use conveyor::cli::BrokerArgs;
use conveyor::supervisor::{self, ChildSpec, SupervisorConfig};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "conveyor-supervisor",
    version,
    about = "Runs worker processes and restarts them when they exit",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    up: Option<Up>,
    #[command(flatten)]
    policy: Policy,
    /// Copies of COMMAND to run.
    #[arg(long, env = "CONVEYOR_WORKERS", default_value_t = 1)]
    workers: usize,
    /// Also publish lifecycle events on this broker (kind `supervisor`); without it they are
    /// only logged.
    #[arg(long = "broker", env = "CONVEYOR_BROKER", hide_env_values = true)]
    events_broker: Option<conveyor::BrokerUrl>,
    /// Namespace of the events.
    #[arg(long, env = "CONVEYOR_NAMESPACE", default_value = "conveyor")]
    namespace: String,
    /// Extra CA certificates (PEM) for a tls:// or amqps:// events broker.
    #[arg(long, env = "CONVEYOR_TLS_CA", value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// The command to supervise, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND ARGS")]
    command: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum Up {
    /// Run a local stack: the aggregator and N supervised workers.
    Up(UpArgs),
}

#[derive(Debug, Args)]
struct UpArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    policy: Policy,
    /// Workers to run.
    #[arg(long, env = "CONVEYOR_WORKERS", default_value_t = 2)]
    workers: usize,
    /// The aggregator's store directory.
    #[arg(long, env = "CONVEYOR_STORE", default_value = "./conveyor-store")]
    store: PathBuf,
    /// The aggregator's HTTP address.
    #[arg(long, env = "CONVEYOR_HTTP", default_value = "127.0.0.1:8080")]
    http: String,
    /// Extra arguments for every worker, after `--`.
    #[arg(last = true, value_name = "WORKER ARGS")]
    worker_args: Vec<String>,
}

#[derive(Debug, Clone, Args)]
struct Policy {
    /// Restart delay: first..largest; it doubles while a child keeps failing.
    #[arg(long, env = "CONVEYOR_RESTART_BACKOFF", default_value = "100ms..10s", value_parser = parse_range)]
    restart_backoff: (Duration, Duration),
    /// Give up after more than this many restarts within --within.
    #[arg(long, env = "CONVEYOR_MAX_RESTARTS", default_value_t = 10)]
    max_restarts: u32,
    /// The restart-intensity window.
    #[arg(long, env = "CONVEYOR_WITHIN", default_value = "60s", value_parser = humantime::parse_duration)]
    within: Duration,
    /// How long children get to exit after SIGTERM (keep it above the workers' drain timeout).
    #[arg(long, env = "CONVEYOR_DRAIN_TIMEOUT", default_value = "35s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
}

fn parse_range(s: &str) -> Result<(Duration, Duration), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("{s:?} is not MIN..MAX, e.g. 100ms..10s"))?;
    let a = humantime::parse_duration(a).map_err(|e| format!("{a:?}: {e}"))?;
    let b = humantime::parse_duration(b).map_err(|e| format!("{b:?}: {e}"))?;
    if a.is_zero() || a > b {
        return Err(format!("{s:?}: need 0 < MIN <= MAX"));
    }
    Ok((a, b))
}

fn config(policy: &Policy, children: Vec<ChildSpec>) -> SupervisorConfig {
    SupervisorConfig {
        children,
        backoff_min: policy.restart_backoff.0,
        backoff_max: policy.restart_backoff.1,
        max_restarts: policy.max_restarts,
        within: policy.within,
        drain_timeout: policy.drain_timeout,
        events: None,
    }
}

/// A binary that sits next to this one (`conveyor-worker`, `conveyor-aggregator`).
fn sibling(name: &str) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("locating conveyor-supervisor")?;
    let path = exe.with_file_name(name);
    anyhow::ensure!(
        path.exists(),
        "{} not found next to conveyor-supervisor",
        path.display()
    );
    Ok(path.to_string_lossy().into_owned())
}

fn up_children(up: &UpArgs) -> anyhow::Result<Vec<ChildSpec>> {
    // The broker URL travels in the environment: arguments are visible to `ps`.
    let mut env = vec![
        (
            "CONVEYOR_BROKER".to_string(),
            up.broker.broker.expose().to_string(),
        ),
        (
            "CONVEYOR_NAMESPACE".to_string(),
            up.broker.namespace.clone(),
        ),
    ];
    let files = [
        ("CONVEYOR_TLS_CA", &up.broker.tls_ca),
        ("CONVEYOR_NATS_CREDS", &up.broker.nats_creds),
    ];
    for (var, path) in files {
        if let Some(path) = path {
            env.push((var.to_string(), path.to_string_lossy().into_owned()));
        }
    }
    let mut children = vec![ChildSpec {
        name: "aggregator".into(),
        program: sibling("conveyor-aggregator")?,
        args: vec![
            "--store".into(),
            up.store.to_string_lossy().into_owned(),
            "--http".into(),
            up.http.clone(),
        ],
        env: env.clone(),
    }];
    let worker = sibling("conveyor-worker")?;
    for i in 0..up.workers {
        children.push(ChildSpec {
            name: format!("worker-{i}"),
            program: worker.clone(),
            args: up.worker_args.clone(),
            env: env.clone(),
        });
    }
    Ok(children)
}

#[tokio::main]
async fn main() -> ExitCode {
    conveyor::cli::init_tracing("info");
    let cli = Cli::parse();
    let built = match &cli.up {
        Some(Up::Up(up)) => up_children(up).map(|c| config(&up.policy, c)),
        None => {
            let Some((program, args)) = cli.command.split_first() else {
                eprintln!("error: give the command to supervise after --");
                return ExitCode::from(2);
            };
            Ok(config(
                &cli.policy,
                (0..cli.workers.max(1))
                    .map(|i| ChildSpec {
                        name: format!("worker-{i}"),
                        program: program.clone(),
                        args: args.to_vec(),
                        env: Vec::new(),
                    })
                    .collect(),
            ))
        }
    };
    let mut config = match built {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let events_to = match &cli.up {
        Some(Up::Up(up)) => Some((up.broker.url(), up.broker.namespace.clone())),
        None => cli.events_broker.clone().map(|url| {
            let url = match &cli.tls_ca {
                Some(ca) => url.with_ca_file(ca),
                None => url,
            };
            (url, cli.namespace.clone())
        }),
    };
    let publisher = events_to.map(|(url, namespace)| {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        config.events = Some(tx);
        tokio::spawn(supervisor::events::publish(url, namespace, rx))
    });
    let (shutdown, force) = conveyor::shutdown::on_signals();
    let outcome = supervisor::run(config, shutdown, force).await;
    // The last events (stopped, gave-up) go out before the process ends, if the broker is there.
    if let Some(publisher) = publisher {
        let _ = tokio::time::timeout(Duration::from_secs(2), publisher).await;
    }
    match outcome {
        Ok(report) => {
            tracing::info!(restarts = report.restarts, "supervisor stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "supervisor stopped");
            eprintln!("conveyor-supervisor: {e}");
            ExitCode::from(1)
        }
    }
}
