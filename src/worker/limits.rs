//! Per-kind limits of a worker: the `rate` and `concurrency` controls, whose admissions the
//! worker awaits before it takes the kind's next job from the consumer.
//! A kind's prefetch is its concurrency limit, so jobs waiting for a slot stay in the broker;
//! jobs waiting for a rate token are at most the kind's prefetch per worker:
//!
//! - `--max-concurrent KIND=N`: at most N jobs of the kind at once in this worker (a semaphore);
//! - `--worker-rate KIND=N/s`: at most N jobs a second started by this worker (governor);
//! - `--rate KIND=N/s`: at most N a second across every worker of the namespace that serves the
//!   kind: a token of the kind's bucket on the broker per job, filled one token per tick of the
//!   rate (see [`super::pacer`]); with `--rate-key KIND=HEADER`, at most N a second for each
//!   value of the job header HEADER, taken before the job's admissions ([`super::rated`]).
//!
//! Rates are `N/s`, `N/m` or `N/h`, optionally with a burst: `50/s@10` (default burst 1: evenly
//! spaced).

use super::controls::{Control, Held};
use crate::error::{Error, Result};
use crate::transport::{Delivery, DeliveryStream};
use futures::future::BoxFuture;
use futures::StreamExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A rate: `count` jobs per `per`, with bursts of up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Jobs per period.
    pub count: u32,
    /// The period.
    pub per: Duration,
    /// Jobs that may start back to back after a quiet spell.
    pub burst: u32,
}

impl Rate {
    /// Parses `N/s`, `N/m`, `N/h`, optionally `@BURST`.
    pub fn parse(s: &str) -> std::result::Result<Rate, String> {
        let (rate, burst) = match s.split_once('@') {
            Some((r, b)) => (
                r,
                b.trim()
                    .parse::<u32>()
                    .ok()
                    .filter(|b| *b > 0)
                    .ok_or_else(|| {
                        format!("{s:?}: the burst after @ must be a whole number above 0")
                    })?,
            ),
            None => (s, 1),
        };
        let (count, unit) = rate
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected N/s, N/m or N/h (e.g. 50/s)"))?;
        let count: u32 = count
            .trim()
            .parse()
            .ok()
            .filter(|c| *c > 0)
            .ok_or_else(|| format!("{s:?}: the count must be a whole number above 0"))?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            other => return Err(format!("{s:?}: unknown unit {other:?}, use s, m or h")),
        };
        Ok(Rate { count, per, burst })
    }

    /// This worker's limiter for this rate.
    fn limiter(&self) -> Option<DefaultDirectRateLimiter> {
        let period = self.per / self.count;
        let quota = Quota::with_period(period.max(Duration::from_micros(1)))?
            .allow_burst(NonZeroU32::new(self.burst.max(1))?);
        Some(RateLimiter::direct(quota))
    }
}

/// The limits of one kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindLimits {
    /// Jobs of the kind at once in this worker.
    pub max_concurrent: Option<usize>,
    /// Jobs a second in this worker.
    pub worker_rate: Option<Rate>,
    /// Jobs a second across the cluster.
    pub rate: Option<Rate>,
    /// Jobs of the kind at once across the cluster.
    pub cluster_max_concurrent: Option<u32>,
}

/// Parses `KIND=VALUE` with `value` parsing VALUE; the error names the flag's input.
pub fn parse_kind_value<T>(
    s: &str,
    value: impl Fn(&str) -> std::result::Result<T, String>,
) -> std::result::Result<(String, T), String> {
    let (kind, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected KIND=VALUE"))?;
    crate::protocol::validate_kind(kind).map_err(|e| e.to_string())?;
    Ok((kind.to_string(), value(v)?))
}

/// The `rate` control of a kind: a token of this worker's rate, then one of the cluster's
/// (from the kind's bucket on the broker), before the next job is taken.
pub struct RateControl {
    worker: Option<DefaultDirectRateLimiter>,
    global: Option<super::pacer::Tokens>,
}

impl RateControl {
    /// The rate control for `limits`, with `global` the kind's tokens when it has a global
    /// rate, unless the rate is `keyed` (`--rate-key`: its tokens are taken before the job's
    /// admissions, see [`super::rated`]); `None` when it sets no rate here.
    pub fn new(
        limits: &KindLimits,
        global: Option<super::pacer::Tokens>,
        keyed: bool,
    ) -> Result<Option<RateControl>> {
        let bad = |what: &str| Error::Config(format!("invalid {what}"));
        let worker = match &limits.worker_rate {
            Some(r) => Some(r.limiter().ok_or_else(|| bad("--worker-rate"))?),
            None => None,
        };
        if (limits.rate.is_some() && !keyed) != global.is_some() {
            return Err(Error::Config(
                "a global rate needs the kind's tokens (and tokens a global rate)".into(),
            ));
        }
        Ok((worker.is_some() || global.is_some()).then_some(RateControl { worker, global }))
    }

    /// Waits for a token of each rate.
    pub async fn wait(&self) {
        if let Some(l) = &self.worker {
            l.until_ready().await;
        }
        if let Some(g) = &self.global {
            g.take().await;
        }
    }
}

impl Control for RateControl {
    fn name(&self) -> &'static str {
        "rate"
    }

    fn admit(self: Arc<Self>) -> BoxFuture<'static, Held> {
        Box::pin(async move {
            self.wait().await;
            Box::new(()) as Held
        })
    }
}

/// The `concurrency` control of a kind: a slot of the kind in this worker, then a permit of the
/// cluster-wide cap, both held until the job ends.
pub struct ConcurrencyControl {
    slots: Option<Arc<Semaphore>>,
    cluster: Option<tokio::sync::Mutex<DeliveryStream>>,
    lease: Duration,
}

/// What passing the concurrency control holds until the job is done: a slot of the kind in this
/// worker and a permit of the cluster-wide cap, each returned when dropped.
#[derive(Default)]
pub struct Admission {
    _slot: Option<OwnedSemaphorePermit>,
    _cluster: Option<ClusterPermit>,
}

/// A held permit of a cluster-wide cap: a task keeps its lease while it is held and returns it
/// to the broker when this is dropped.
pub struct ClusterPermit {
    release: Option<tokio::sync::oneshot::Sender<()>>,
}

impl ClusterPermit {
    fn hold(permit: Delivery, lease: Duration) -> Self {
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut ticker = super::lease_ticker(lease);
            tokio::pin!(released);
            loop {
                tokio::select! {
                    _ = &mut released => break,
                    _ = ticker.tick() => { let _ = permit.progress().await; }
                }
            }
            if let Err(e) = permit.nack().await {
                tracing::warn!(error = %e, "could not return a cluster permit; the broker will");
            }
        });
        ClusterPermit {
            release: Some(release),
        }
    }
}

impl Drop for ClusterPermit {
    fn drop(&mut self) {
        if let Some(r) = self.release.take() {
            let _ = r.send(());
        }
    }
}

impl ConcurrencyControl {
    /// The concurrency control for `limits`; `None` when it sets no concurrency limit. The
    /// cluster-wide cap's permits are given with [`ConcurrencyControl::set_cluster_permits`].
    pub fn new(limits: &KindLimits) -> Result<Option<ConcurrencyControl>> {
        if limits.max_concurrent == Some(0) {
            return Err(Error::Config("--max-concurrent must be at least 1".into()));
        }
        if limits.cluster_max_concurrent == Some(0) {
            return Err(Error::Config(
                "--cluster-max-concurrent must be at least 1".into(),
            ));
        }
        let limited = limits.max_concurrent.is_some() || limits.cluster_max_concurrent.is_some();
        Ok(limited.then(|| ConcurrencyControl {
            slots: limits.max_concurrent.map(|n| Arc::new(Semaphore::new(n))),
            cluster: None,
            lease: Duration::from_secs(30),
        }))
    }

    /// The broker prefetch for the kind: its concurrency limit when lower than `default`. (Not
    /// lower under a rate alone: on RabbitMQ the prefetch also caps the jobs running at once.)
    pub fn prefetch(&self, default: u16) -> u16 {
        let mut p = default;
        if let Some(s) = &self.slots {
            p = p.min(u16::try_from(s.available_permits()).unwrap_or(u16::MAX));
        }
        p.max(1)
    }

    /// Takes the kind's cluster-wide permits from `permits` (see [`crate::transport::Transport::permits`]);
    /// each is held while a job runs, its lease extended every third of `lease`.
    pub fn set_cluster_permits(&mut self, permits: DeliveryStream, lease: Duration) {
        self.cluster = Some(tokio::sync::Mutex::new(permits));
        self.lease = lease;
    }

    /// Waits until a job of the kind may start here; the admission holds its slots.
    pub async fn admit(&self) -> Admission {
        let slot = match &self.slots {
            Some(s) => s.clone().acquire_owned().await.ok(),
            None => None,
        };
        let cluster = match &self.cluster {
            Some(permits) => {
                let mut permits = permits.lock().await;
                loop {
                    match permits.next().await {
                        Some(Ok(p)) => break Some(ClusterPermit::hold(p, self.lease)),
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "cluster permit consumer error");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        // The permit consumer ended: run without the cap rather than stop.
                        None => {
                            tracing::error!(
                                "the cluster permit consumer ended; the cap no longer holds here"
                            );
                            break None;
                        }
                    }
                }
            }
            None => None,
        };
        Admission {
            _slot: slot,
            _cluster: cluster,
        }
    }
}

impl Control for ConcurrencyControl {
    fn name(&self) -> &'static str {
        "concurrency"
    }

    fn admit(self: Arc<Self>) -> BoxFuture<'static, Held> {
        Box::pin(async move { Box::new(ConcurrencyControl::admit(&self).await) as Held })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_bad_ones_name_the_problem() {
        assert_eq!(
            Rate::parse("50/s"),
            Ok(Rate {
                count: 50,
                per: Duration::from_secs(1),
                burst: 1
            })
        );
        assert_eq!(
            Rate::parse("600/m@20").map(|r| (r.count, r.burst)),
            Ok((600, 20))
        );
        let err = |s: &str| Rate::parse(s).err().unwrap_or_default();
        assert!(err("50").contains("expected N/s"));
        assert!(err("0/s").contains("above 0"));
        assert!(err("5/d").contains("unknown unit"));
        assert!(err("5/s@0").contains("burst"));
        assert_eq!(
            parse_kind_value("hash=5/s", Rate::parse).map(|(k, r)| (k, r.count)),
            Ok(("hash".to_string(), 5))
        );
        assert!(parse_kind_value("hash", Rate::parse).is_err());
        let none = KindLimits::default();
        assert!(matches!(RateControl::new(&none, None, false), Ok(None)));
        // A global rate without the kind's tokens is a wiring mistake, named.
        let global = KindLimits {
            rate: Rate::parse("5/s").ok(),
            ..KindLimits::default()
        };
        assert!(matches!(
            RateControl::new(&global, None, false),
            Err(Error::Config(_))
        ));
        // A keyed global rate takes its tokens before the admissions: none here.
        assert!(matches!(RateControl::new(&global, None, true), Ok(None)));
        assert!(matches!(ConcurrencyControl::new(&none), Ok(None)));
    }

    #[tokio::test]
    async fn a_worker_rate_spaces_jobs() {
        let gate = RateControl::new(
            &KindLimits {
                worker_rate: Rate::parse("100/s").ok(),
                ..KindLimits::default()
            },
            None,
            false,
        )
        .expect("valid")
        .expect("a rate");
        let start = tokio::time::Instant::now();
        for _ in 0..11 {
            gate.wait().await;
        }
        // 10 intervals of 10 ms (the first is free).
        assert!(
            start.elapsed() >= Duration::from_millis(90),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn concurrency_slots_are_held_by_the_permit() {
        let gate = ConcurrencyControl::new(&KindLimits {
            max_concurrent: Some(2),
            ..KindLimits::default()
        })
        .expect("valid")
        .expect("a limit");
        assert_eq!(gate.prefetch(32), 2);
        let a = gate.admit().await;
        let _b = gate.admit().await;
        assert!(
            tokio::time::timeout(Duration::from_millis(50), gate.admit())
                .await
                .is_err(),
            "a third waits"
        );
        drop(a);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), gate.admit())
                .await
                .is_ok()
        );
    }
}
