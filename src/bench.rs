//! The benchmark behind `conveyor-producer bench`: the same flow through Conveyor and through the
//! raw broker by hand, measured the same way in one run.
//!
//! A flow is "publish job `seq` (confirmed)" plus a stream of the `seq`s whose results came back.
//! Full load publishes `jobs` jobs with `in_flight` unconfirmed at once; light load publishes one
//! job at a time and waits for its result before the next.

use crate::broker_url::{BrokerKind, BrokerUrl};
use crate::client::Client;
use crate::error::{Error, Result};
use crate::job::JobSpec;
use crate::transport::{ConsumeOptions, Source};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;
use serde::Serialize;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// One flow under test.
pub struct Flow {
    /// Publishes job `seq` and resolves once the broker confirmed it.
    pub publish: Arc<dyn Fn(u64) -> BoxFuture<'static, Result<()>> + Send + Sync>,
    /// The `seq` of every result that comes back.
    pub done: BoxStream<'static, u64>,
    /// Removes what the flow declared.
    pub cleanup: BoxFuture<'static, ()>,
}

/// Bench settings.
#[derive(Debug, Clone, Copy)]
pub struct BenchConfig {
    /// Jobs in the full-load run.
    pub jobs: usize,
    /// Jobs in the light-load run (one at a time).
    pub light_jobs: usize,
    /// Unconfirmed publishes at once at full load.
    pub in_flight: usize,
    /// Concurrency (and prefetch) of the raw flow's consumer: match the workers'.
    pub raw_concurrency: usize,
    /// Longest wait for all results of one run.
    pub timeout: Duration,
}

/// Figures of one flow.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct FlowFigures {
    /// Jobs per second at full load, first publish to last result.
    pub jobs_per_sec: f64,
    /// Publish-to-result latency at full load, median, ms.
    pub full_p50_ms: f64,
    /// ... 99th percentile, ms.
    pub full_p99_ms: f64,
    /// Publish-to-result latency one job at a time, median, ms.
    pub light_p50_ms: f64,
    /// ... 99th percentile, ms.
    pub light_p99_ms: f64,
}

/// Both flows and their ratio.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BenchReport {
    /// Through Conveyor (producer → worker process → result).
    pub conveyor: FlowFigures,
    /// The raw broker by hand.
    pub raw: FlowFigures,
    /// `conveyor.jobs_per_sec / raw.jobs_per_sec`.
    pub ratio: f64,
}

/// The `p`-th percentile (0..=100) of sorted samples, in ms.
pub fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

/// Measures one flow.
pub async fn measure(flow: Flow, cfg: &BenchConfig) -> Result<FlowFigures> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(u64, Instant)>();
    let mut done = flow.done;
    let collector = tokio::spawn(async move {
        while let Some(seq) = done.next().await {
            if tx.send((seq, Instant::now())).is_err() {
                return;
            }
        }
    });
    let outcome = run_loads(&flow.publish, &mut rx, cfg).await;
    collector.abort();
    flow.cleanup.await;
    outcome
}

async fn run_loads(
    publish: &Arc<dyn Fn(u64) -> BoxFuture<'static, Result<()>> + Send + Sync>,
    rx: &mut mpsc::UnboundedReceiver<(u64, Instant)>,
    cfg: &BenchConfig,
) -> Result<FlowFigures> {
    let n = cfg.jobs;
    // Full load.
    let mut started = vec![None; n];
    let mut finished = vec![None; n];
    let t0 = Instant::now();
    let mut pending = n;
    let mut publishes = futures::stream::iter(0..n as u64)
        .map(|seq| {
            let p = publish.clone();
            async move { (seq, Instant::now(), p(seq).await) }
        })
        .buffer_unordered(cfg.in_flight.max(1));
    let deadline = tokio::time::Instant::now() + cfg.timeout;
    let mut publishing = true;
    while pending > 0 {
        tokio::select! {
            p = publishes.next(), if publishing => match p {
                Some((seq, at, Ok(()))) => started[seq as usize] = Some(at),
                Some((_, _, Err(e))) => return Err(e),
                None => publishing = false,
            },
            d = rx.recv() => match d {
                Some((seq, at)) if (seq as usize) < n && finished[seq as usize].is_none() => {
                    finished[seq as usize] = Some(at);
                    pending -= 1;
                }
                Some(_) => {}
                None => return Err(Error::Config("result stream ended".into())),
            },
            _ = tokio::time::sleep_until(deadline) => {
                return Err(Error::Timeout(cfg.timeout, "bench results (are workers running?)"));
            }
        }
    }
    drop(publishes);
    let elapsed = t0.elapsed();
    let mut full: Vec<Duration> = started
        .iter()
        .zip(&finished)
        .filter_map(|(s, f)| Some(f.as_ref()?.saturating_duration_since(*s.as_ref()?)))
        .collect();
    full.sort();
    // Light load: one job at a time.
    let mut light = Vec::with_capacity(cfg.light_jobs);
    for i in 0..cfg.light_jobs as u64 {
        let seq = n as u64 + i;
        let at = Instant::now();
        publish(seq).await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
                Ok(Some((s, end))) if s == seq => {
                    light.push(end.saturating_duration_since(at));
                    break;
                }
                Ok(Some(_)) => continue,
                _ => return Err(Error::Timeout(Duration::from_secs(10), "light-load result")),
            }
        }
    }
    light.sort();
    Ok(FlowFigures {
        jobs_per_sec: n as f64 / elapsed.as_secs_f64(),
        full_p50_ms: percentile_ms(&full, 50.0),
        full_p99_ms: percentile_ms(&full, 99.0),
        light_p50_ms: percentile_ms(&light, 50.0),
        light_p99_ms: percentile_ms(&light, 99.0),
    })
}

/// The Conveyor flow: `echo` jobs through running workers; results read back by a reader of
/// the results subject/exchange of its own (acked, like the aggregator reads them).
pub async fn conveyor_flow(client: &Client) -> Result<Flow> {
    let reader = format!("bench-{:x}", rand::random::<u32>());
    let opts = ConsumeOptions {
        prefetch: 1000,
        lease: Duration::from_secs(30),
        ephemeral: true,
        cumulative: false,
        one_at_a_time: false,
    };
    let results = client
        .transport()
        .consume(Source::Results(reader), opts)
        .await?;
    let c = client.clone();
    let publish = Arc::new(move |seq: u64| -> BoxFuture<'static, Result<()>> {
        let c = c.clone();
        let spec = JobSpec::new("echo", json!({ "seq": seq }));
        Box::pin(async move { c.publish(&spec).await.map(drop) })
    });
    let done = results
        .filter_map(|d| async move {
            let d = d.ok()?;
            let seq = seq_of(&d.message.body);
            let _ = d.ack().await;
            seq
        })
        .boxed();
    Ok(Flow {
        publish,
        done,
        cleanup: Box::pin(async {}),
    })
}

/// The raw-broker flow for `url`, with the broker's own client crate and no Conveyor logic.
pub async fn raw_flow(url: &BrokerUrl, concurrency: usize) -> Result<Flow> {
    match url.kind() {
        #[cfg(feature = "nats")]
        BrokerKind::Nats => crate::transport::nats::raw::flow(url, concurrency).await,
        #[cfg(feature = "amqp")]
        BrokerKind::Amqp => crate::transport::amqp::raw::flow(url, concurrency).await,
        #[allow(unreachable_patterns)]
        other => Err(Error::Config(format!("no {other:?} support in this build"))),
    }
}

/// Reads `seq` from a `{"seq": N}` body.
pub fn seq_of(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()?
        .get("seq")?
        .as_u64()
}

/// The median of each figure over several rounds.
fn median(rounds: &[FlowFigures]) -> FlowFigures {
    let pick = |f: fn(&FlowFigures) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    FlowFigures {
        jobs_per_sec: pick(|f| f.jobs_per_sec),
        full_p50_ms: pick(|f| f.full_p50_ms),
        full_p99_ms: pick(|f| f.full_p99_ms),
        light_p50_ms: pick(|f| f.light_p50_ms),
        light_p99_ms: pick(|f| f.light_p99_ms),
    }
}

/// Runs both flows `rounds` times, alternating (Conveyor, raw, Conveyor, raw, ...) so that
/// neither gains from going first, after a warm-up job; reports the median of each figure.
pub async fn run(
    url: &BrokerUrl,
    client: &Client,
    cfg: &BenchConfig,
    rounds: usize,
) -> Result<BenchReport> {
    client
        .call(
            JobSpec::new("echo", json!({"warmup": true})),
            Duration::from_secs(15),
        )
        .await
        .map_err(|_| {
            Error::Config(format!(
                "no echo result within 15s: start workers on namespace {:?} first",
                client.transport().names().namespace()
            ))
        })?;
    let mut conveyor = Vec::new();
    let mut raw = Vec::new();
    for _ in 0..rounds.max(1) {
        conveyor.push(measure(conveyor_flow(client).await?, cfg).await?);
        raw.push(measure(raw_flow(url, cfg.raw_concurrency).await?, cfg).await?);
    }
    let (conveyor, raw) = (median(&conveyor), median(&raw));
    Ok(BenchReport {
        conveyor,
        raw,
        ratio: conveyor.jobs_per_sec / raw.jobs_per_sec.max(f64::MIN_POSITIVE),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&v, 50.0), 51.0);
        assert_eq!(percentile_ms(&v, 99.0), 99.0);
        assert_eq!(percentile_ms(&[], 50.0), 0.0);
        assert_eq!(seq_of(br#"{"seq":7}"#), Some(7));
        assert_eq!(seq_of(b"nope"), None);
    }
}
