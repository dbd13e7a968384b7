//! Each kind's control stack, built from the worker's settings in [`controls::ORDER`].

use super::{breaker, cancel, controls, flight, limits, process, timeout, Handler, WorkerConfig};
use crate::error::Result;
use crate::events::Emitter;
use crate::transport::{ConsumeOptions, Transport};
use std::sync::Arc;

/// The controls every kind's stack has.
pub(crate) struct EveryKind {
    cancel: Arc<cancel::CancelControl>,
    flight: Arc<flight::FlightControl>,
    timeout: Arc<timeout::TimeoutControl>,
    /// Fires when the worker has stopped: ends the controls' background tasks.
    pub(crate) stopped: tokio_util::sync::CancellationToken,
}

impl EveryKind {
    /// The cancel, singleflight and timeout controls of a worker.
    pub(crate) fn new(
        config: &WorkerConfig,
        transport: &Arc<dyn Transport>,
        events: &Emitter,
        cancels: &Arc<cancel::Cancels>,
        flights: &Arc<flight::Flights>,
    ) -> EveryKind {
        EveryKind {
            cancel: Arc::new(cancel::CancelControl::new(
                cancels.clone(),
                config.timeout_grace,
                announce_start(events.clone(), config.worker_id.clone()),
            )),
            flight: Arc::new(flight::FlightControl::new(
                transport.clone(),
                flights.clone(),
            )),
            timeout: Arc::new(timeout::TimeoutControl::new(config.timeout_grace)),
            stopped: tokio_util::sync::CancellationToken::new(),
        }
    }
}

/// A kind's control stack, and what the worker keeps of it.
pub(crate) struct KindControls {
    pub(crate) stack: controls::Stack,
    pub(crate) prefetch: u16,
    pub(crate) rate: Option<Arc<limits::RateControl>>,
    pub(crate) breaker: Option<Arc<breaker::Breaker>>,
    /// The kind's buckets per value of its rate key.
    pub(crate) keyed: Option<Arc<super::pacer::KeyedTokens>>,
}

/// Builds `kind`'s control stack around `handler`, in [`controls::ORDER`].
pub(crate) async fn kind_controls(
    kind: &str,
    handler: Handler,
    config: &WorkerConfig,
    transport: &Arc<dyn Transport>,
    opts: ConsumeOptions,
    every_kind: &EveryKind,
) -> Result<KindControls> {
    let l = config.kind_limits.get(kind).copied().unwrap_or_default();
    let breaker = config
        .breakers
        .get(kind)
        .map(|cfg| breaker::Breaker::new(kind, *cfg));
    let header = config.rate_keys.get(kind);
    let (tokens, keyed) = match (l.rate, header) {
        (Some(r), Some(header)) => {
            let keyed = super::pacer::KeyedTokens::new(transport.clone(), kind, header, r, opts);
            (None, Some(keyed))
        }
        (Some(r), None) => {
            let tokens = super::pacer::Tokens::start(transport.clone(), kind, r, opts).await?;
            (Some(tokens), None)
        }
        (None, Some(header)) => {
            return Err(crate::Error::Config(format!(
                "--rate-key {kind}={header} needs a global rate for the kind (--rate {kind}=N/s)"
            )))
        }
        (None, None) => (None, None),
    };
    let rate = limits::RateControl::new(&l, tokens, keyed.is_some())?.map(Arc::new);
    let mut concurrency = limits::ConcurrencyControl::new(&l)?;
    let mut prefetch = opts.prefetch;
    if let Some(c) = &mut concurrency {
        prefetch = c.prefetch(prefetch);
        if let Some(n) = l.cluster_max_concurrent {
            let held = l
                .max_concurrent
                .unwrap_or(config.concurrency)
                .min(n as usize);
            let permits_opts = ConsumeOptions {
                prefetch: u16::try_from(held).unwrap_or(u16::MAX),
                ..opts
            };
            c.set_cluster_permits(
                transport.permits(kind, n, permits_opts).await?,
                config.lease,
            );
        }
    }
    let mut stack = controls::Stack::new(handler);
    if let Some(b) = &breaker {
        let announce = breaker::announce(
            transport.clone(),
            config.worker_id.clone(),
            every_kind.stopped.clone(),
        );
        stack = stack.with(Arc::new(breaker::BreakerControl::new(b.clone(), announce)))?;
    }
    if let Some(r) = &rate {
        stack = stack.with(r.clone())?;
    }
    if let Some(c) = concurrency {
        stack = stack.with(Arc::new(c))?;
    }
    let stack = stack
        .with(every_kind.cancel.clone())?
        .with(every_kind.flight.clone())?
        .with(every_kind.timeout.clone())?;
    Ok(KindControls {
        stack,
        prefetch,
        rate,
        breaker,
        keyed,
    })
}

/// A [`cancel::OnStart`] that emits the `started` event.
fn announce_start(events: Emitter, worker: String) -> cancel::OnStart {
    Arc::new(move |meta| {
        events.emit(process::job_event(
            meta,
            &worker,
            crate::events::JobState::Started,
            None,
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobError;
    use crate::worker::breaker::BreakerConfig;
    use crate::worker::cancel::CancelRequest;
    use crate::worker::limits::{KindLimits, Rate};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;
    use tower::{Service, ServiceExt};

    /// Sleeps for the job's `{"ms": N}`, counting its runs; stops when its token fires.
    fn sleeper(runs: Arc<AtomicU32>) -> Handler {
        tower::util::BoxCloneSyncService::new(tower::service_fn(move |job: crate::worker::Job| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                let ms = job.input["ms"].as_u64().unwrap_or(0);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(ms)) => Ok(serde_json::json!("slept")),
                    _ = job.cancel.cancelled() => Err(JobError::Cancelled),
                }
            }
        }))
    }

    fn job(id: &str, ms: u64, timeout_ms: Option<u64>) -> crate::worker::Job {
        let mut h = crate::message::Headers::new();
        h.insert(crate::protocol::header::ID, id.to_string());
        if let Some(t) = timeout_ms {
            h.insert(crate::protocol::header::TIMEOUT_MS, t.to_string());
        }
        let msg = crate::message::Message::new(h, "{}");
        let meta = crate::job::JobMeta::from_message("sleep", &msg, 1, || id.into()).expect("meta");
        crate::worker::Job {
            meta: Arc::new(meta),
            input: serde_json::json!({ "ms": ms }),
            cancel: tokio_util::sync::CancellationToken::new(),
            resources: Arc::default(),
        }
    }

    fn keyed(id: &str, key: &str, ms: u64) -> crate::worker::Job {
        let mut j = job(id, ms, None);
        let mut meta = (*j.meta).clone();
        meta.dedup_key = Some(key.to_string());
        j.meta = Arc::new(meta);
        j
    }

    /// A worker's settings with every control set for `sleep`, except the cluster-wide cap
    /// (which needs a broker).
    fn config() -> WorkerConfig {
        let mut config = WorkerConfig::default();
        config.kind_limits.insert(
            "sleep".into(),
            KindLimits {
                max_concurrent: Some(2),
                worker_rate: Rate::parse("1000/s@10").ok(),
                // The global rate needs a broker's token bucket: its own tests run on both.
                rate: None,
                cluster_max_concurrent: None,
            },
        );
        let breaker = BreakerConfig::parse("1/10s").expect("breaker");
        config.breakers.insert("sleep".into(), breaker);
        config.timeout_grace = Duration::from_millis(100);
        config
    }

    async fn built(runs: Arc<AtomicU32>) -> (KindControls, Arc<cancel::Cancels>) {
        let config = config();
        let transport: Arc<dyn Transport> = Arc::new(crate::transport::offline::Offline::default());
        let cancels: Arc<cancel::Cancels> = Arc::default();
        let every = EveryKind::new(
            &config,
            &transport,
            &Emitter::disabled(),
            &cancels,
            &Arc::default(),
        );
        let opts = ConsumeOptions::default();
        let k = kind_controls("sleep", sleeper(runs), &config, &transport, opts, &every)
            .await
            .expect("controls");
        (k, cancels)
    }

    #[tokio::test]
    async fn a_kind_with_every_control_has_them_in_the_documented_order() {
        let (k, _) = built(Arc::default()).await;
        assert_eq!(k.stack.names(), controls::ORDER);
        assert_eq!(
            k.prefetch, 2,
            "the kind's prefetch is its concurrency limit"
        );
        let readme = include_str!("../../docs/controls.md");
        let order = controls::ORDER.join(" → ");
        assert!(
            readme.contains(&order),
            "docs/controls.md gives the order as {order:?}"
        );
    }

    #[tokio::test]
    async fn a_rate_key_without_a_global_rate_is_refused_naming_the_flag() {
        let mut config = config();
        config.rate_keys.insert("sleep".into(), "X-Customer".into());
        let transport: Arc<dyn Transport> = Arc::new(crate::transport::offline::Offline::default());
        let every = EveryKind::new(
            &config,
            &transport,
            &Emitter::disabled(),
            &Arc::default(),
            &Arc::default(),
        );
        let handler = sleeper(Arc::default());
        let opts = ConsumeOptions::default();
        let built = kind_controls("sleep", handler, &config, &transport, opts, &every).await;
        let err = built.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("--rate-key sleep=X-Customer needs"), "{err}");
    }

    #[tokio::test]
    async fn the_breaker_outside_the_timeout_counts_a_timed_out_job_and_then_admits_none() {
        let runs = Arc::new(AtomicU32::new(0));
        let (k, _) = built(runs.clone()).await;
        let mut svc = k.stack.service();
        let out = svc
            .ready()
            .await
            .expect("ready")
            .call(job("a", 5_000, Some(50)))
            .await;
        assert!(matches!(out, Err(JobError::Timeout(_))), "{out:?}");
        let mut next = k.stack.service();
        let admitted = tokio::time::timeout(Duration::from_millis(200), next.ready()).await;
        assert!(admitted.is_err(), "the open breaker admits no job");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_cancel_check_inside_the_admissions_ends_a_named_job_without_running_it() {
        let runs = Arc::new(AtomicU32::new(0));
        let (k, cancels) = built(runs.clone()).await;
        cancels.apply(&CancelRequest::job("b"));
        let out = k.stack.service().oneshot(job("b", 10, None)).await;
        match out {
            Err(JobError::CancelRequested(why)) => assert!(why.contains("before it ran"), "{why}"),
            other => panic!("expected a cancel, got {other:?}"),
        }
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        // Cancelled jobs say nothing of the dependency: the breaker still admits.
        let mut next = k.stack.service();
        let admitted = tokio::time::timeout(Duration::from_millis(200), next.ready()).await;
        assert!(admitted.is_ok());
    }

    #[tokio::test]
    async fn a_cancel_while_running_fires_the_token_and_frees_the_kind_slot() {
        let runs = Arc::new(AtomicU32::new(0));
        let (k, cancels) = built(runs.clone()).await;
        let mut first = k.stack.service();
        first.ready().await.expect("ready");
        let mut second = k.stack.service();
        second.ready().await.expect("ready");
        let mut third = k.stack.service();
        let held = tokio::time::timeout(Duration::from_millis(100), third.ready()).await;
        assert!(held.is_err(), "two slots, both held");
        let running = tokio::spawn(first.call(job("c", 60_000, None)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        cancels.apply(&CancelRequest::job("c"));
        let out = tokio::time::timeout(Duration::from_secs(5), running)
            .await
            .expect("ends")
            .expect("task");
        assert!(matches!(out, Err(JobError::CancelRequested(_))), "{out:?}");
        let freed = tokio::time::timeout(Duration::from_secs(1), third.ready()).await;
        assert!(freed.is_ok(), "its slot is free again");
        drop(second);
    }

    #[tokio::test]
    async fn a_cancelled_follower_ends_at_once_and_a_cancelled_leader_hands_its_key_on() {
        let runs = Arc::new(AtomicU32::new(0));
        let (k, cancels) = built(runs.clone()).await;
        let lead = tokio::spawn(k.stack.service().oneshot(keyed("l", "k1", 600)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let follow = tokio::spawn(k.stack.service().oneshot(keyed("f", "k1", 600)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        cancels.apply(&CancelRequest::job("f"));
        let out = tokio::time::timeout(Duration::from_millis(300), follow)
            .await
            .expect("the follower ends before the leader")
            .expect("task");
        assert!(matches!(out, Err(JobError::CancelRequested(_))), "{out:?}");
        assert_eq!(lead.await.expect("task"), Ok(serde_json::json!("slept")));
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the follower never ran");

        let lead = tokio::spawn(k.stack.service().oneshot(keyed("l2", "k2", 600)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let follow = tokio::spawn(k.stack.service().oneshot(keyed("f2", "k2", 300)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        cancels.apply(&CancelRequest::job("l2"));
        let out = lead.await.expect("task");
        assert!(matches!(out, Err(JobError::CancelRequested(_))), "{out:?}");
        // The leader's cancel is not the follower's outcome: it runs the handler itself.
        assert_eq!(follow.await.expect("task"), Ok(serde_json::json!("slept")));
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }
}
