//! `conveyor-worker`: runs the built-in job kinds.
//!
//! Consumes jobs of its kinds (every kind of the namespace when `--kinds` is not given) from the
//! broker, runs at most `--concurrency` at once, and publishes one final result per job to the
//! results subject/exchange (dead letters for jobs that cannot succeed). On SIGTERM/SIGINT it
//! stops taking jobs, lets running ones finish within `--drain-timeout`, hands the rest back to
//! the broker and exits 0; a second signal forces that at once.

use anyhow::Context;
use clap::Parser;
use conveyor::cli::BrokerArgs;
use conveyor::worker::breaker::BreakerConfig;
use conveyor::worker::limits::{self, KindLimits, Rate};
use conveyor::worker::{self, backoff::Backoff, builtin, WorkerConfig};
use std::collections::HashMap;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "conveyor-worker",
    version,
    about = "Runs Conveyor jobs from NATS JetStream or RabbitMQ"
)]
struct Args {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Jobs run at once (and broker prefetch per kind). Default: number of CPUs × 4.
    #[arg(long, env = "CONVEYOR_CONCURRENCY")]
    concurrency: Option<usize>,
    /// Jobs that may wait in this worker for a singleflight run of their Conveyor-Dedup-Key
    /// without taking a slot (past it, a waiting job holds a slot).
    #[arg(long, env = "CONVEYOR_MAX_FOLLOWERS", default_value_t = conveyor::worker::follow::DEFAULT_MAX_FOLLOWERS)]
    max_followers: usize,
    /// Kinds to take, comma-separated. Default: every kind of the namespace (unknown kinds are
    /// dead-lettered).
    #[arg(long, env = "CONVEYOR_KINDS", value_delimiter = ',')]
    kinds: Option<Vec<String>>,
    /// Bodies larger than this many bytes are dead-lettered unread.
    #[arg(long, env = "CONVEYOR_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    max_body_bytes: usize,
    /// How long running jobs may take to finish after SIGTERM.
    #[arg(long, env = "CONVEYOR_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Default deadline of each attempt for a kind, as KIND=DURATION (`--timeout hash=5s`;
    /// repeat the flag or separate with commas). A job's own Conveyor-Timeout-Ms wins.
    #[arg(long = "timeout", env = "CONVEYOR_TIMEOUT", value_delimiter = ',', value_parser = parse_kind_timeout, value_name = "KIND=DURATION")]
    timeouts: Vec<(String, Duration)>,
    /// Lease of a delivered job before the broker redelivers it (JetStream AckWait; long jobs
    /// extend it while they run).
    #[arg(long, env = "CONVEYOR_LEASE", default_value = "30s", value_parser = humantime::parse_duration)]
    lease: Duration,
    /// How often to broadcast a heartbeat (a worker silent for three is reported gone).
    #[arg(long, env = "CONVEYOR_HEARTBEAT", default_value = "5s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// Delay before the first retry; doubles each attempt, with jitter.
    #[arg(long, env = "CONVEYOR_RETRY_BASE", default_value = "200ms", value_parser = humantime::parse_duration)]
    retry_base: Duration,
    /// Longest delay between retries.
    #[arg(long, env = "CONVEYOR_RETRY_MAX", default_value = "60s", value_parser = humantime::parse_duration)]
    retry_max: Duration,
    /// Most jobs of a kind running at once in this worker, as KIND=N (repeat or comma-separate).
    #[arg(long = "max-concurrent", env = "CONVEYOR_MAX_CONCURRENT", value_delimiter = ',', value_parser = parse_max_concurrent, value_name = "KIND=N")]
    max_concurrent: Vec<(String, usize)>,
    /// Most jobs of a kind running at once across all the namespace's workers, as KIND=N (held
    /// as N permits on the broker; a worker that dies gives its permits back).
    #[arg(long = "cluster-max-concurrent", env = "CONVEYOR_CLUSTER_MAX_CONCURRENT", value_delimiter = ',', value_parser = parse_max_concurrent, value_name = "KIND=N")]
    cluster_max_concurrent: Vec<(String, usize)>,
    /// Most jobs of a kind started per second by this worker alone, as KIND=N/s (or N/m, N/h;
    /// `@B` allows bursts of B).
    #[arg(long = "worker-rate", env = "CONVEYOR_WORKER_RATE", value_delimiter = ',', value_parser = parse_rate, value_name = "KIND=N/s")]
    worker_rates: Vec<(String, Rate)>,
    /// Most jobs of a kind started per second by all the namespace's workers together, as
    /// KIND=N/s: a token per job from the kind's bucket on the broker.
    #[arg(long = "rate", env = "CONVEYOR_RATE", value_delimiter = ',', value_parser = parse_rate, value_name = "KIND=N/s")]
    rates: Vec<(String, Rate)>,
    /// Apply a kind's --rate to each value of a job header, as KIND=HEADER (`--rate-key
    /// fetch=X-Customer`: every customer gets the rate; jobs without the header share one).
    #[arg(long = "rate-key", env = "CONVEYOR_RATE_KEY", value_delimiter = ',', value_parser = parse_rate_key, value_name = "KIND=HEADER")]
    rate_keys: Vec<(String, String)>,
    /// Circuit breaker for a kind, as KIND=F/T[/P]: after F failed attempts in a row (or with
    /// R%@N in place of F, when R % of the last N attempts failed), take no job of the kind for
    /// T, then let P probes through (`--breaker hash=5/30s`, `--breaker hash=50%@20/30s`).
    #[arg(long = "breaker", env = "CONVEYOR_BREAKER", value_delimiter = ',', value_parser = parse_breaker, value_name = "KIND=F/T")]
    breakers: Vec<(String, BreakerConfig)>,
    /// PostgreSQL for the `pg.insert` kind (postgres://user:pass@host:5432/db); without it the
    /// kind is not offered.
    #[arg(long, env = "CONVEYOR_PG_URL", hide_env_values = true)]
    pg_url: Option<String>,
    /// Connections in the PostgreSQL pool at most.
    #[arg(long, env = "CONVEYOR_PG_POOL_SIZE", default_value_t = 4)]
    pg_pool_size: usize,
    /// How long a `pg.insert` job waits for a free connection before it fails (retryable).
    #[arg(long, env = "CONVEYOR_PG_WAIT_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pg_wait_timeout: Duration,
    /// Table `pg.insert` writes to (created if missing).
    #[arg(long, env = "CONVEYOR_PG_TABLE", default_value = "conveyor_rows")]
    pg_table: String,
    /// Do not broadcast job lifecycle events (started, retrying, succeeded, ...).
    #[arg(long, env = "CONVEYOR_NO_EVENTS")]
    no_events: bool,
}

fn parse_breaker(s: &str) -> Result<(String, BreakerConfig), String> {
    limits::parse_kind_value(s, BreakerConfig::parse)
}

fn parse_rate(s: &str) -> Result<(String, Rate), String> {
    limits::parse_kind_value(s, Rate::parse)
}

fn parse_rate_key(s: &str) -> Result<(String, String), String> {
    limits::parse_kind_value(s, |v| {
        let ok = !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic());
        ok.then(|| v.to_string())
            .ok_or_else(|| format!("{s:?}: HEADER must be a header name (no spaces)"))
    })
}

fn parse_max_concurrent(s: &str) -> Result<(String, usize), String> {
    limits::parse_kind_value(s, |v| {
        v.trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{s:?}: N must be a whole number above 0"))
    })
}

/// The limits of every kind the flags name.
fn kind_limits(args: &Args) -> HashMap<String, KindLimits> {
    let mut out: HashMap<String, KindLimits> = HashMap::new();
    for (k, n) in &args.max_concurrent {
        out.entry(k.clone()).or_default().max_concurrent = Some(*n);
    }
    for (k, n) in &args.cluster_max_concurrent {
        out.entry(k.clone()).or_default().cluster_max_concurrent =
            Some(u32::try_from(*n).unwrap_or(u32::MAX));
    }
    for (k, r) in &args.worker_rates {
        out.entry(k.clone()).or_default().worker_rate = Some(*r);
    }
    for (k, r) in &args.rates {
        out.entry(k.clone()).or_default().rate = Some(*r);
    }
    out
}

/// `KIND=DURATION`, with a valid kind and a non-zero duration.
fn parse_kind_timeout(s: &str) -> Result<(String, Duration), String> {
    let (kind, duration) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected KIND=DURATION, e.g. hash=5s"))?;
    conveyor::protocol::validate_kind(kind).map_err(|e| e.to_string())?;
    let d = humantime::parse_duration(duration).map_err(|e| format!("{duration:?}: {e}"))?;
    if d.is_zero() {
        return Err(format!("{s:?}: the timeout must be above zero"));
    }
    Ok((kind.to_string(), d))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    conveyor::cli::init_tracing("info");
    let args = Args::parse();
    if args.lease < Duration::from_secs(1) {
        anyhow::bail!("--lease must be at least 1s, got {:?}", args.lease);
    }
    let defaults = WorkerConfig::default();
    let limits = kind_limits(&args);
    let config = WorkerConfig {
        kind_limits: limits,
        rate_keys: args.rate_keys.iter().cloned().collect(),
        breakers: args.breakers.iter().cloned().collect(),
        kinds: args.kinds,
        concurrency: args.concurrency.unwrap_or(defaults.concurrency),
        max_followers: args.max_followers,
        max_body_bytes: args.max_body_bytes,
        drain_timeout: args.drain_timeout,
        lease: args.lease,
        kind_timeouts: args.timeouts.into_iter().collect(),
        heartbeat: args.heartbeat,
        events: !args.no_events,
        backoff: Backoff {
            base: args.retry_base,
            max: args.retry_max,
        },
        ..defaults
    };
    let mut registry = builtin::registry();
    if let Some(url) = &args.pg_url {
        let pg = conveyor::worker::pg::PgConfig {
            url: url.clone(),
            pool_size: args.pg_pool_size,
            wait_timeout: args.pg_wait_timeout,
            table: args.pg_table.clone(),
        };
        conveyor::worker::pg::install(&pg, &mut registry).await?;
    }
    let (shutdown, force) = conveyor::shutdown::on_signals();
    let transport = args
        .broker
        .connect()
        .await
        .with_context(|| format!("connecting to {}", args.broker.broker))?;
    worker::run(transport, registry, config, shutdown, force).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_timeouts_parse_and_bad_ones_name_the_problem() {
        assert_eq!(
            parse_kind_timeout("wordcount.map=1m30s"),
            Ok(("wordcount.map".to_string(), Duration::from_secs(90)))
        );
        let err = |s: &str| parse_kind_timeout(s).err().unwrap_or_default();
        assert!(err("hash").contains("expected KIND=DURATION"));
        assert!(err("hash=0s").contains("above zero"));
        assert!(err("hash=soon").contains("\"soon\""));
        assert!(err("ha sh=1s").contains("invalid job kind"));
        let args = Args::try_parse_from(["conveyor-worker", "--timeout", "hash=5s,sleep=1s"])
            .map(|a| a.timeouts);
        assert_eq!(
            args.ok(),
            Some(vec![
                ("hash".to_string(), Duration::from_secs(5)),
                ("sleep".to_string(), Duration::from_secs(1)),
            ])
        );
    }

    #[test]
    fn limit_flags_combine_per_kind() {
        let args = Args::try_parse_from([
            "conveyor-worker",
            "--rate",
            "hash=50/s",
            "--worker-rate",
            "hash=20/s@5",
            "--max-concurrent",
            "hash=2,sleep=1",
        ])
        .expect("flags parse");
        let l = kind_limits(&args);
        assert_eq!(l["hash"].max_concurrent, Some(2));
        assert_eq!(l["hash"].rate.map(|r| r.count), Some(50));
        assert_eq!(l["hash"].worker_rate.map(|r| r.burst), Some(5));
        assert_eq!(l["sleep"].max_concurrent, Some(1));
        let bad = Args::try_parse_from(["conveyor-worker", "--rate", "hash=fast"]);
        assert!(bad
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("expected N/s"));
        let keyed = Args::try_parse_from(["conveyor-worker", "--rate-key", "hash=X-Customer"]);
        assert_eq!(
            keyed.expect("flags parse").rate_keys,
            vec![("hash".to_string(), "X-Customer".to_string())]
        );
        let bad = Args::try_parse_from(["conveyor-worker", "--rate-key", "hash=X Customer"]);
        assert!(bad
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("header name"));
        let bad = Args::try_parse_from(["conveyor-worker", "--max-concurrent", "hash=0"]);
        assert!(bad
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("above 0"));
    }
}
