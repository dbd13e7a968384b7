//! The worker runtime: consumes jobs of the registered kinds, runs at most `concurrency` at once,
//! and settles each delivery exactly once (see [`process`]).
//!
//! Shutdown: when `shutdown` fires the worker stops taking jobs, lets running ones finish until
//! `drain_timeout` (or `force`), hands the rest back to the broker, and closes the connection.

pub mod backoff;
pub mod breaker;
pub mod builtin;
pub mod cancel;
pub mod controls;
pub mod flight;
pub mod follow;
pub mod heartbeat;
pub mod limits;
pub mod pacer;
#[cfg(feature = "postgres")]
pub mod pg;
pub mod process;
pub mod rated;
pub mod registry;
pub mod resources;
mod stacks;
pub mod timeout;
mod waiting;

use crate::error::{Error, Result};
use crate::message::Message;
use crate::transport::retry::resubscribing;
use crate::transport::{ConsumeOptions, Delivery, DeliveryStream, Route, Source, Transport};
use backoff::Backoff;
use futures::{FutureExt, StreamExt};
pub use registry::{handler_fn, Handler, Job, JobContext, Registry};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Worker settings (the `conveyor-worker` flags).
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Kinds to take; `None` takes every kind of the namespace (unknown ones are dead-lettered).
    pub kinds: Option<Vec<String>>,
    /// Jobs run at once; also the broker prefetch per kind.
    pub concurrency: usize,
    /// Jobs that may wait for a singleflight run of their key in this worker without a slot;
    /// past it, a waiting job holds a slot.
    pub max_followers: usize,
    /// Bodies larger than this are dead-lettered unread.
    pub max_body_bytes: usize,
    /// How long running jobs may take to finish after shutdown is requested.
    pub drain_timeout: Duration,
    /// Lease of a delivered job before the broker redelivers it (JetStream AckWait).
    pub lease: Duration,
    /// How long a timed-out handler gets to stop.
    pub timeout_grace: Duration,
    /// Deadline of each attempt per kind, for jobs without `Conveyor-Timeout-Ms`.
    pub kind_timeouts: HashMap<String, Duration>,
    /// Concurrency and rate limits per kind.
    pub kind_limits: HashMap<String, limits::KindLimits>,
    /// Per kind, the job header whose every value gets the kind's global rate (`--rate-key`).
    pub rate_keys: HashMap<String, String>,
    /// Circuit breakers per kind.
    pub breakers: HashMap<String, breaker::BreakerConfig>,
    /// Retry delays.
    pub backoff: Backoff,
    /// Name on results (`Conveyor-Worker`) and heartbeats.
    pub worker_id: String,
    /// How often the worker broadcasts a heartbeat.
    pub heartbeat: Duration,
    /// Broadcast job lifecycle events (`started`, `retrying`, final states).
    pub events: bool,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            kinds: None,
            concurrency: default_concurrency(),
            max_followers: follow::DEFAULT_MAX_FOLLOWERS,
            max_body_bytes: 1024 * 1024,
            drain_timeout: Duration::from_secs(30),
            lease: Duration::from_secs(30),
            timeout_grace: timeout::DEFAULT_GRACE,
            kind_timeouts: HashMap::new(),
            kind_limits: HashMap::new(),
            rate_keys: HashMap::new(),
            breakers: HashMap::new(),
            backoff: Backoff::default(),
            worker_id: default_worker_id(),
            heartbeat: Duration::from_secs(5),
            events: true,
        }
    }
}

/// Number of CPUs × 4.
pub fn default_concurrency() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        * 4
}

/// This machine's host name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// `<host>-<pid>`.
pub fn default_worker_id() -> String {
    format!("{}-{}", hostname(), std::process::id())
}

/// Counters of what a worker did.
#[derive(Debug, Default)]
pub struct Counters {
    /// Jobs that succeeded.
    pub succeeded: AtomicU64,
    /// Attempts scheduled for retry.
    pub retried: AtomicU64,
    /// Jobs dead-lettered.
    pub dead: AtomicU64,
    /// Jobs ended otherwise (cancelled).
    pub ended: AtomicU64,
    /// Deliveries handed back.
    pub handed_back: AtomicU64,
    /// Second copies of a scheduler's tick, acked without running.
    pub duplicates: AtomicU64,
}

/// What the worker shares with its job tasks.
pub struct Shared {
    /// The broker.
    pub transport: Arc<dyn Transport>,
    /// Kinds and handlers.
    pub registry: Registry,
    /// Settings.
    pub config: WorkerConfig,
    /// Counters.
    pub counters: Counters,
    /// Lifecycle events.
    pub events: crate::events::Emitter,
    /// Cancel requests heard, and the running jobs they can reach.
    pub cancels: Arc<cancel::Cancels>,
    /// What handlers can borrow.
    pub resources: Arc<resources::Resources>,
    /// Each kind's controls, for jobs that come through the catch-all consumer.
    pub stacks: HashMap<String, controls::Stack>,
    /// The singleflight keys in flight in this worker.
    pub flights: Arc<flight::Flights>,
    /// The buckets of the kinds with a rate key.
    pub keyed_rates: HashMap<String, Arc<pacer::KeyedTokens>>,
}

impl Shared {
    /// Publishes with the broker's confirm, retrying transient failures (same message, so the
    /// same id) for up to about 30 s.
    pub async fn publish_retrying(&self, route: Route, msg: Message) -> Result<()> {
        crate::transport::publish_retrying(
            self.transport.as_ref(),
            route,
            msg,
            Duration::from_secs(30),
        )
        .await
    }
}

/// A running worker's final counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerReport {
    /// Jobs that succeeded.
    pub succeeded: u64,
    /// Attempts scheduled for retry.
    pub retried: u64,
    /// Jobs dead-lettered.
    pub dead: u64,
    /// Deliveries handed back to the broker.
    pub handed_back: u64,
    /// Second copies of a scheduler's tick, acked without running.
    pub duplicates: u64,
}

/// Runs a worker until `shutdown`, then drains (see the module docs).
pub async fn run(
    transport: Arc<dyn Transport>,
    mut registry: Registry,
    config: WorkerConfig,
    shutdown: CancellationToken,
    force: CancellationToken,
) -> Result<WorkerReport> {
    if config.concurrency == 0 {
        return Err(Error::Config("--concurrency must be at least 1".into()));
    }
    crate::fault::check()?;
    registry.check()?;
    if let Some(kinds) = &config.kinds {
        registry.retain(kinds)?;
    }
    let prefetch = u16::try_from(config.concurrency).unwrap_or(u16::MAX);
    let opts = ConsumeOptions {
        prefetch,
        lease: config.lease,
        ephemeral: false,
        cumulative: false,
        one_at_a_time: false,
    };
    // A job whose worker dies is delivered again after its lease, once per attempt; a step it
    // re-publishes (a chain's next step) must still find its first copy's id remembered.
    if let Err(e) = transport
        .keep_job_ids(
            config
                .lease
                .saturating_mul(crate::job::DEFAULT_MAX_ATTEMPTS),
        )
        .await
    {
        // Not fatal: the aggregator records each id once whatever the window; a step re-published
        // past it may run twice.
        tracing::warn!(error = %e, "the de-duplication window stays as it is");
    }
    runs_every(&registry, config.kind_limits.keys(), "a limit")?;
    runs_every(&registry, config.breakers.keys(), "--breaker")?;
    runs_every(&registry, config.rate_keys.keys(), "--rate-key")?;
    let events = if config.events {
        crate::events::Emitter::spawn(transport.clone())
    } else {
        crate::events::Emitter::disabled()
    };
    let cancels: Arc<cancel::Cancels> = Arc::default();
    let flights: Arc<flight::Flights> = Arc::default();
    let every_kind = stacks::EveryKind::new(&config, &transport, &events, &cancels, &flights);
    let mut stacks = HashMap::new();
    let mut sources = Vec::new();
    let mut breakers = Vec::new();
    let mut keyed_rates = HashMap::new();
    for kind in registry.kinds() {
        let Some(handler) = registry.get(&kind).cloned() else {
            continue;
        };
        let k =
            stacks::kind_controls(&kind, handler, &config, &transport, opts, &every_kind).await?;
        let source_opts = ConsumeOptions {
            prefetch: k.prefetch,
            // Jobs waiting for a global rate's token stay in the broker.
            one_at_a_time: k.rate.is_some() && k.keyed.is_none(),
            ..opts
        };
        let source = transport
            .consume(Source::Kind(kind.clone()), source_opts)
            .await?;
        breakers.extend(k.breaker);
        if let Some(keyed) = k.keyed {
            keyed_rates.insert(kind.clone(), keyed);
        }
        sources.push((kind.clone(), source, Some(k.stack.clone())));
        stacks.insert(kind, k.stack);
    }
    if config.kinds.is_none() {
        let unrouted = transport
            .consume(Source::Unrouted(registry.kinds()), opts)
            .await?;
        sources.push(("(unrouted)".to_string(), unrouted, None));
    }
    tracing::info!(
        worker = %config.worker_id,
        kinds = ?registry.kinds(),
        catch_all = config.kinds.is_none(),
        concurrency = config.concurrency,
        "worker started"
    );
    let registry_resources = registry.resources().clone();
    let shared = Arc::new(Shared {
        transport: transport.clone(),
        registry,
        config,
        counters: Counters::default(),
        events,
        cancels,
        resources: Arc::new(registry_resources),
        stacks,
        flights,
        keyed_rates,
    });
    let beating = CancellationToken::new();
    let requests = cancel::catch_up(transport.as_ref(), &shared.cancels).await;
    let cancel_listener = tokio::spawn(cancel::listen(
        transport.clone(),
        shared.cancels.clone(),
        requests,
        beating.clone(),
    ));
    let trips: Vec<_> = breakers
        .iter()
        .map(|b| {
            tokio::spawn(follow_breaker(
                transport.clone(),
                b.clone(),
                shared.config.worker_id.clone(),
                beating.clone(),
            ))
        })
        .collect();
    if !trips.is_empty() {
        // An open breaker of another worker is said again every second: hear it before taking
        // a job, rather than run one the cluster is holding back.
        let _ = shutdown
            .run_until_cancelled(tokio::time::sleep(breaker::LEARN_OPEN))
            .await;
    }
    let releaser = transport
        .releases_waiting()
        .then(|| tokio::spawn(waiting::release(shared.clone(), shutdown.clone())));
    let permits = Arc::new(Semaphore::new(shared.config.concurrency));
    let followers = Arc::new(Semaphore::new(shared.config.max_followers));
    let jobs = TaskTracker::new();
    let abandon = CancellationToken::new();
    let pumps = TaskTracker::new();
    for (name, stream, stack) in sources {
        pumps.spawn(pump(
            name,
            stream,
            stack,
            shared.clone(),
            Slots {
                running: permits.clone(),
                following: followers.clone(),
            },
            jobs.clone(),
            shutdown.clone(),
            abandon.clone(),
        ));
    }
    pumps.close();
    let beat = heartbeat::Heartbeat {
        id: shared.config.worker_id.clone(),
        host: hostname(),
        pid: std::process::id(),
        kinds: shared.config.kinds.clone().unwrap_or_default(),
        in_flight: 0,
        concurrency: shared.config.concurrency,
        version: env!("CARGO_PKG_VERSION").to_string(),
        at_ms: 0,
        interval_ms: u64::try_from(shared.config.heartbeat.as_millis()).unwrap_or(u64::MAX),
        stopping: false,
    };
    let heart = tokio::spawn(heartbeat::run(
        transport.clone(),
        beat,
        permits.clone(),
        shared.config.heartbeat.max(Duration::from_millis(100)),
        beating.clone(),
    ));
    let consumers_ended = tokio::select! {
        biased;
        _ = shutdown.cancelled() => false,
        // Pumps also end because of a shutdown: only an end without one counts.
        _ = pumps.wait() => !shutdown.is_cancelled(),
    };
    if consumers_ended {
        // Every consumer is gone (the broker cancelled them or the connection could not
        // recover): stop, so that a supervisor starts a fresh worker.
        tracing::error!("every consumer ended; stopping the worker");
        shutdown.cancel();
    }
    tracing::info!("no longer taking jobs; draining");
    pumps.wait().await;
    if let Some(releaser) = releaser {
        let _ = releaser.await;
    }
    jobs.close();
    let drain = shared.config.drain_timeout;
    tokio::select! {
        _ = jobs.wait() => tracing::info!("all running jobs finished"),
        _ = tokio::time::sleep(drain) => tracing::warn!("drain timeout of {drain:?} reached; handing running jobs back"),
        _ = force.cancelled() => tracing::warn!("forced shutdown; handing running jobs back"),
    }
    abandon.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), jobs.wait()).await;
    beating.cancel();
    every_kind.stopped.cancel();
    let _ = heart.await;
    let _ = cancel_listener.await;
    for t in trips {
        let _ = t.await;
    }
    shared.events.flush(Duration::from_secs(2)).await;
    transport.close().await?;
    let c = &shared.counters;
    let report = WorkerReport {
        succeeded: c.succeeded.load(Ordering::Relaxed),
        retried: c.retried.load(Ordering::Relaxed),
        dead: c.dead.load(Ordering::Relaxed),
        handed_back: c.handed_back.load(Ordering::Relaxed),
        duplicates: c.duplicates.load(Ordering::Relaxed),
    };
    tracing::info!(?report, "worker stopped");
    if consumers_ended {
        return Err(Error::Broker {
            op: "consume",
            cause: "every consumer ended".into(),
        });
    }
    Ok(report)
}

/// An error naming `what` unless the registry has every one of `kinds`.
fn runs_every<'a>(
    registry: &Registry,
    kinds: impl IntoIterator<Item = &'a String>,
    what: &str,
) -> Result<()> {
    match kinds.into_iter().find(|k| registry.get(k).is_none()) {
        Some(kind) => Err(Error::Config(format!(
            "{what} names kind {kind:?}, which this worker does not run (it runs {})",
            registry.kinds().join(", ")
        ))),
        None => Ok(()),
    }
}

/// The worker's places for jobs: slots to run in, and places to wait for a singleflight run in.
#[derive(Clone)]
struct Slots {
    running: Arc<Semaphore>,
    following: Arc<Semaphore>,
}

/// Moves deliveries from one source into job tasks. For a kind's own source, the kind's controls
/// admit the next job before it is taken from the consumer; a job that comes through the
/// catch-all consumer passes its kind's admissions while the worker holds it. Then the job waits
/// for a worker-wide slot. A job whose singleflight key is in flight in this worker takes neither
/// ([`follow`]): the admission stays for the next job.
#[allow(clippy::too_many_arguments)]
async fn pump(
    name: String,
    mut stream: DeliveryStream,
    stack: Option<controls::Stack>,
    shared: Arc<Shared>,
    slots: Slots,
    jobs: TaskTracker,
    shutdown: CancellationToken,
    abandon: CancellationToken,
) {
    let lease = shared.config.lease;
    let mut admitted: Option<controls::Next> = None;
    // A kind with a rate key takes its admissions after the job's token (see [`rated`]).
    let stack = stack.filter(|_| !shared.keyed_rates.contains_key(&name));
    loop {
        if let (None, Some(stack)) = (&admitted, &stack) {
            let mut svc = stack.service();
            match shutdown.run_until_cancelled(svc.ready()).await {
                None => break,
                Some(Err(e)) => {
                    tracing::warn!(source = %name, error = %e, "controls not ready");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Some(Ok(_)) => admitted = Some(svc),
            }
        }
        let Some(next) = shutdown.run_until_cancelled(stream.next()).await else {
            break;
        };
        let delivery = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                tracing::warn!(source = %name, error = %e, "consumer error");
                // A consumer that keeps failing must not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            None => {
                tracing::warn!(source = %name, "consumer ended");
                break;
            }
        };
        // Taken before its time: it waits in the broker, and the admission stays for the next.
        if let Some((meta, due)) = waiting::later(&shared, &delivery) {
            jobs.spawn(waiting::park(shared.clone(), delivery, meta, due));
            continue;
        }
        let key = flight_key(&shared, &delivery);
        let rate = rate_value(&shared, &delivery);
        let waiting = Waiting {
            shared: &shared,
            slots: &slots,
            jobs: &jobs,
            abandon: &abandon,
            shutdown: &shutdown,
        };
        let Some(delivery) = waiting.aside(delivery, key.as_deref(), rate.as_ref()) else {
            continue;
        };
        // Every place is taken: the job waits here for its value's token, then as any job.
        if let Some((keyed, value)) = &rate {
            if holding(&delivery, &shutdown, lease, keyed.take(value))
                .await
                .is_none()
            {
                let _ = delivery.nack().await;
                break;
            }
        }
        let svc = match (admitted.take(), shared.stacks.get(&delivery.kind)) {
            (Some(svc), _) => Some(svc),
            (None, None) => None,
            (None, Some(stack)) => {
                let mut svc = stack.service();
                match holding(&delivery, &shutdown, lease, svc.ready()).await {
                    Some(Ok(_)) => Some(svc),
                    _ => {
                        let _ = delivery.nack().await;
                        break;
                    }
                }
            }
        };
        let running = slots.running.clone().acquire_owned();
        let Some(permit) = holding(&delivery, &shutdown, lease, running)
            .await
            .and_then(|p| p.ok())
        else {
            let _ = delivery.nack().await;
            break;
        };
        // With its slot, it leads its key here unless a job of this worker does.
        let lead = key.and_then(|k| match shared.flights.enter(&k) {
            flight::Entered::Lead(lead) => Some(lead),
            flight::Entered::Follow(_) => None,
        });
        let job = (delivery, Box::new(permit) as controls::Held, lead);
        spawn_job(&jobs, &shared, job, &abandon, svc);
    }
    // Hand back what the consumer had already buffered.
    while let Some(Some(item)) = stream.next().now_or_never() {
        if let Ok(d) = item {
            let _ = d.nack().await;
        }
    }
}

/// What a pump needs to start jobs that wait without a slot.
struct Waiting<'a> {
    shared: &'a Arc<Shared>,
    slots: &'a Slots,
    jobs: &'a TaskTracker,
    abandon: &'a CancellationToken,
    shutdown: &'a CancellationToken,
}

impl Waiting<'_> {
    /// Starts a job that waits without a slot, in one of the `--max-followers` places: one whose
    /// singleflight `key` a job of this worker leads ([`follow`]), or one of a kind with a rate key
    /// (`rate`: its value's token, [`rated`]). The delivery comes back when it is neither, or when
    /// every place is taken.
    fn aside(
        &self,
        delivery: Delivery,
        key: Option<&str>,
        rate: Option<&(Arc<pacer::KeyedTokens>, String)>,
    ) -> Option<Delivery> {
        let run = key.and_then(|k| Some((k, self.shared.flights.following(k)?)));
        if run.is_none() && rate.is_none() {
            return Some(delivery);
        }
        let Ok(place) = self.slots.following.clone().try_acquire_owned() else {
            return Some(delivery);
        };
        let aside = delivery.set_aside();
        let (shared, running) = (self.shared.clone(), self.slots.running.clone());
        let give_up = self.abandon.child_token();
        let svc = match (run, rate.cloned()) {
            (Some((key, run)), rate) => {
                follow::service(shared, running, key.to_string(), run, aside, rate)
            }
            (None, Some((keyed, value))) => {
                let wait = rated::Wait {
                    keyed,
                    value,
                    aside,
                    flight_key: key.map(str::to_string),
                    shutdown: self.shutdown.clone(),
                    give_up: give_up.clone(),
                };
                rated::service(shared, running, wait)
            }
            (None, None) => return Some(delivery),
        };
        let job = (delivery, Box::new(place) as controls::Held, None);
        spawn_job(self.jobs, self.shared, job, &give_up, Some(svc));
        None
    }
}

/// The delivery's kind's rate key buckets and its value of the key, for a kind with a rate key.
fn rate_value(shared: &Shared, delivery: &Delivery) -> Option<(Arc<pacer::KeyedTokens>, String)> {
    let keyed = shared.keyed_rates.get(&delivery.kind)?;
    let value = delivery.message.headers.get(keyed.header());
    Some((keyed.clone(), value.unwrap_or_default().to_string()))
}

/// The delivery's singleflight key, if it has one and this worker runs its kind.
fn flight_key(shared: &Shared, delivery: &Delivery) -> Option<String> {
    let key = crate::job::dedup_key_of(&delivery.message.headers)?;
    shared
        .stacks
        .contains_key(&delivery.kind)
        .then(|| key.to_string())
}

/// Runs a delivery as a job task, holding `place` (a slot, or a place to wait in) until it is
/// settled, and leading its key in this worker if it holds the lead.
fn spawn_job(
    jobs: &TaskTracker,
    shared: &Arc<Shared>,
    (delivery, place, lead): (Delivery, controls::Held, Option<flight::LocalLead>),
    abandon: &CancellationToken,
    svc: Option<controls::Next>,
) {
    let shared = shared.clone();
    let abandon = abandon.clone();
    jobs.spawn(async move {
        let run = controls::until_settled(process::process(shared.clone(), delivery, abandon, svc));
        let outcome = match lead {
            Some(lead) => lead.run(run).await,
            None => run.await,
        };
        drop(place);
        let c = &shared.counters;
        let counter = match outcome {
            process::Outcome::Succeeded => &c.succeeded,
            process::Outcome::Retried => &c.retried,
            process::Outcome::Dead => &c.dead,
            process::Outcome::Ended => &c.ended,
            process::Outcome::HandedBack => &c.handed_back,
            process::Outcome::Duplicate => &c.duplicates,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    });
}

/// Opens `breaker` when another worker's breaker for its kind opens, until the same time, as
/// broadcast on the worker-only [`breaker::topic`].
async fn follow_breaker(
    transport: Arc<dyn Transport>,
    breaker: Arc<breaker::Breaker>,
    me: String,
    stop: CancellationToken,
) {
    let pattern = breaker::topic(breaker.kind());
    let (say, stopped) = (transport.clone(), stop.clone());
    let subscribe = move || {
        let (transport, pattern) = (transport.clone(), pattern.clone());
        async move { transport.listen(&pattern).await }
    };
    let mut events = resubscribing("other workers' breakers", None, subscribe, stop);
    while let Some(msg) = events.next().await {
        let Ok(ev) = serde_json::from_slice::<breaker::BreakerEvent>(&msg.body) else {
            continue;
        };
        if ev.worker != me && ev.state == "breaker-open" {
            let left = ev
                .until_ms
                .unwrap_or(0)
                .saturating_sub(crate::job::now_ms());
            if breaker.trip_until(std::time::Instant::now() + Duration::from_millis(left)) {
                // Said on by this worker too (as its own, which the opener, restarted under the
                // same name, would not ignore), for workers that start after the opener has gone.
                let (say, stopped) = (say.clone(), stopped.clone());
                let ev = breaker::BreakerEvent {
                    worker: me.clone(),
                    at_ms: crate::job::now_ms(),
                    ..ev
                };
                tokio::spawn(async move {
                    breaker::say_while_open(say.as_ref(), &ev, &stopped).await;
                });
            }
        }
    }
}

/// Ticks every third of the lease, first after one period. (Waiting for an interval's immediate
/// first tick still costs a turn of the 1 ms timer wheel, per job.)
pub(crate) fn lease_ticker(lease: Duration) -> tokio::time::Interval {
    let period = (lease / 3).max(Duration::from_millis(100));
    tokio::time::interval_at(tokio::time::Instant::now() + period, period)
}

/// Awaits `fut` while holding `delivery`, extending its lease meanwhile. `None` on shutdown.
async fn holding<T>(
    delivery: &Delivery,
    shutdown: &CancellationToken,
    lease: Duration,
    fut: impl std::future::Future<Output = T>,
) -> Option<T> {
    let mut ticker = lease_ticker(lease);
    tokio::pin!(fut);
    loop {
        tokio::select! {
            v = &mut fut => return Some(v),
            _ = shutdown.cancelled() => return None,
            _ = ticker.tick() => { let _ = delivery.progress().await; }
        }
    }
}
