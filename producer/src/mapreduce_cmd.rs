//! `conveyor-producer mapreduce wordcount`: word count over the cluster's workers, and its bench.

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use conveyor::workflow::mapreduce::{self, Config, Counts};
use conveyor::{BrokerUrl, Client};
use futures::StreamExt;
use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Job {
    /// Count words (DESIGN §4 word rules).
    Wordcount,
}

#[derive(Debug, Args)]
pub struct MapReduceArgs {
    /// The MapReduce job.
    job: Job,
    /// Input text files (UTF-8; invalid bytes count as separators).
    #[arg(long, num_args = 1.., required = true)]
    input: Vec<PathBuf>,
    /// Bytes of text per map job.
    #[arg(long, default_value_t = 256 * 1024)]
    chunk_bytes: usize,
    /// Reduce partitions: the intermediate counts are shuffled by word into this many.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Where to write the full table (one JSON object, word → count).
    #[arg(long)]
    output: Option<PathBuf>,
    /// How many of the most frequent words to print.
    #[arg(long, default_value_t = 20)]
    top: usize,
    /// How long each stage (map, each reduce round) may take.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    stage_timeout: Duration,
    /// Benchmark instead: MB/s with 1, 2 and 4 worker processes of its own (on a namespace of
    /// its own), next to a single-process count, each checked against the others.
    #[arg(long)]
    bench: bool,
    /// Worker process counts the bench runs.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    bench_workers: Vec<usize>,
    /// The conveyor-worker binary the bench starts (default: next to this one).
    #[arg(long)]
    worker_bin: Option<PathBuf>,
}

fn read_inputs(paths: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    paths
        .iter()
        .map(|p| {
            std::fs::read(p)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .with_context(|| format!("reading --input {}", p.display()))
        })
        .collect()
}

fn print_top(counts: &Counts, n: usize) {
    for (word, count) in mapreduce::top(counts, n) {
        println!("{count:>12} {word}");
    }
}

pub async fn run(
    broker: &BrokerUrl,
    namespace: &str,
    args: MapReduceArgs,
) -> anyhow::Result<ExitCode> {
    let Job::Wordcount = args.job;
    let texts = read_inputs(&args.input)?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let cfg = Config {
        chunk_bytes: args.chunk_bytes,
        partitions: args.partitions,
        stage_timeout: args.stage_timeout,
        ..Config::default()
    };
    if args.bench {
        return bench(broker, namespace, &args, &refs, &cfg).await;
    }
    let client = Client::connect(broker, namespace)
        .await
        .with_context(|| format!("connecting to {broker}"))?;
    let started = Instant::now();
    let outcome = mapreduce::wordcount(&client, &refs, &cfg).await;
    client.close().await?;
    let outcome = outcome?;
    let secs = started.elapsed().as_secs_f64();
    if let Some(path) = &args.output {
        let file = std::fs::File::create(path)
            .with_context(|| format!("creating --output {}", path.display()))?;
        serde_json::to_writer(std::io::BufWriter::new(file), &outcome.counts)
            .with_context(|| format!("writing --output {}", path.display()))?;
    }
    print_top(&outcome.counts, args.top);
    eprintln!(
        "{} words, {} distinct, {:.1} MB in {secs:.2}s ({:.1} MB/s): {} map jobs, {} reduce jobs in {} round(s)",
        outcome.counts.values().sum::<u64>(),
        outcome.counts.len(),
        outcome.bytes as f64 / 1e6,
        outcome.bytes as f64 / 1e6 / secs.max(1e-9),
        outcome.map_jobs,
        outcome.reduce_jobs,
        outcome.reduce_rounds
    );
    Ok(ExitCode::SUCCESS)
}

/// Worker processes of the bench, killed when dropped.
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn worker_bin(args: &MapReduceArgs) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.worker_bin {
        return Ok(p.clone());
    }
    let me = std::env::current_exe().context("finding this executable")?;
    Ok(me.with_file_name("conveyor-worker"))
}

/// Starts `n` workers of the map and reduce kinds and waits until each has sent a heartbeat.
async fn start_workers(
    bin: &PathBuf,
    broker: &BrokerUrl,
    namespace: &str,
    n: usize,
) -> anyhow::Result<Workers> {
    let transport = conveyor::transport::connect(broker, namespace).await?;
    let mut beats = transport
        .listen(conveyor::worker::heartbeat::PATTERN)
        .await?;
    let mut workers = Workers(Vec::new());
    for _ in 0..n {
        let child = Command::new(bin)
            .args([
                "--namespace",
                namespace,
                "--kinds",
                "wordcount.map,wordcount.reduce",
            ])
            .args(["--heartbeat", "1s"])
            // The URL (and its password) by environment, not on a command line.
            .env("CONVEYOR_BROKER", broker.expose())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        workers.0.push(child);
    }
    let mut live = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while live.len() < n {
        match tokio::time::timeout_at(deadline, beats.next()).await {
            Ok(Some(msg)) => {
                if let Some(hb) = conveyor::worker::heartbeat::Heartbeat::from_message(&msg) {
                    if !hb.stopping {
                        live.insert(hb.id);
                    }
                }
            }
            _ => bail!(
                "only {} of {n} bench workers came up within 30s",
                live.len()
            ),
        }
    }
    transport.close().await?;
    Ok(workers)
}

async fn bench(
    broker: &BrokerUrl,
    namespace: &str,
    args: &MapReduceArgs,
    texts: &[&str],
    cfg: &Config,
) -> anyhow::Result<ExitCode> {
    let bin = worker_bin(args)?;
    let mb = texts.iter().map(|t| t.len()).sum::<usize>() as f64 / 1e6;
    let started = Instant::now();
    let baseline = mapreduce::wordcount_local(texts);
    let local_secs = started.elapsed().as_secs_f64();
    println!(
        "mapreduce wordcount bench: {mb:.1} MB, chunks of {} bytes, {} partitions, broker {broker}",
        cfg.chunk_bytes, cfg.partitions
    );
    println!(
        "{:<22} {:>9} {:>9} {:>7}",
        "setup", "seconds", "MB/s", "equal"
    );
    println!(
        "{:<22} {:>9.2} {:>9.1} {:>7}",
        "single process",
        local_secs,
        mb / local_secs.max(1e-9),
        "-"
    );
    let bench_ns = format!("{namespace}-mrbench-{}", std::process::id());
    let client = Client::connect(broker, &bench_ns).await?.without_events();
    let mut all_equal = true;
    for &n in &args.bench_workers {
        if n == 0 {
            continue;
        }
        let workers = start_workers(&bin, broker, &bench_ns, n).await?;
        let t = Instant::now();
        let outcome = mapreduce::wordcount(&client, texts, cfg).await;
        let secs = t.elapsed().as_secs_f64();
        drop(workers);
        let outcome = outcome?;
        let equal = outcome.counts == baseline;
        all_equal &= equal;
        let label = format!("{n} worker process{}", if n == 1 { "" } else { "es" });
        println!(
            "{label:<22} {secs:>9.2} {:>9.1} {:>7}",
            mb / secs.max(1e-9),
            if equal { "yes" } else { "NO" }
        );
    }
    let kinds = vec!["wordcount.map".to_string(), "wordcount.reduce".to_string()];
    client.transport().delete_namespace(&kinds).await?;
    client.close().await?;
    Ok(if all_equal {
        ExitCode::SUCCESS
    } else {
        eprintln!("the cluster's counts differ from the single-process count");
        ExitCode::from(1)
    })
}
