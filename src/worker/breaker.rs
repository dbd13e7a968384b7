//! Circuit breakers per kind (`--breaker KIND=F/T[/P]`): after F consecutive failed attempts
//! (the handler's retryable errors and time-outs), or with `R%@N/T[/P]` when R % of the last N
//! attempts failed, the breaker opens for T. While it is open the
//! worker takes no job of the kind from the broker, so waiting jobs are neither failed nor spend
//! attempts. Then it is half-open: P probe jobs at a time go through; a probe that succeeds closes
//! it, one that fails opens it again.
//!
//! Every opening and closing is an event (`<kind>.breaker-open`, `<kind>.breaker-closed`), for
//! watchers. It is also broadcast on `breakers.<kind>`, which only workers may publish (see
//! `broker-config/`), and a worker with a breaker for the kind that hears another worker's
//! `breaker-open` there opens its own until the same time: the cluster stops calling the failing
//! dependency together. (Lifecycle events are not followed: whoever publishes jobs may emit
//! `published` events, so events could be forged.)

use super::controls::{Control, Held, Next};
use super::registry::Job;
use crate::job::JobError;
use crate::message::{Headers, Message};
use crate::protocol::header;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tower::ServiceExt;

/// When a closed breaker opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trip {
    /// After this many failed attempts in a row.
    Consecutive(u32),
    /// When at least `percent` % of the last `window` attempts failed (once `window` were seen).
    Ratio {
        /// Failed attempts, in percent of the window.
        percent: u32,
        /// Attempts counted, the last ones (1 to 128).
        window: u32,
    },
}

/// The longest ratio window.
pub const MAX_WINDOW: u32 = 128;

/// `TRIP/T[/P]`: when it opens (`F` failures in a row, or `R%@N`: R % of the last N attempts),
/// how long it stays open, probes at once when half-open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// When it opens.
    pub trip: Trip,
    /// How long it stays open.
    pub open_for: Duration,
    /// Probe jobs at once while half-open.
    pub probes: u32,
}

impl Trip {
    fn parse(s: &str, whole: &str) -> std::result::Result<Trip, String> {
        let number = |n: &str, what: &str| {
            n.trim()
                .parse::<u32>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{whole:?}: {what} must be a whole number above 0"))
        };
        match s.split_once('@') {
            None => Ok(Trip::Consecutive(number(s, "FAILURES")?)),
            Some((ratio, window)) => {
                let percent = ratio
                    .trim()
                    .strip_suffix('%')
                    .ok_or_else(|| format!("{whole:?}: a ratio is written R%@N, e.g. 50%@20"))?;
                let percent = number(percent, "the percentage")?;
                let window = number(window, "the window")?;
                if percent > 100 || window > MAX_WINDOW {
                    return Err(format!(
                        "{whole:?}: the percentage is at most 100 and the window at most {MAX_WINDOW}"
                    ));
                }
                Ok(Trip::Ratio { percent, window })
            }
        }
    }
}

impl BreakerConfig {
    /// Parses `5/30s`, `5/30s/2`, or with a ratio `50%@20/30s[/2]`.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let mut parts = s.split('/');
        let (Some(f), Some(t)) = (parts.next(), parts.next()) else {
            return Err(format!(
                "{s:?}: expected FAILURES/OPEN_FOR[/PROBES] or R%@N/OPEN_FOR[/PROBES], e.g. 5/30s"
            ));
        };
        let trip = Trip::parse(f, s)?;
        let open_for = humantime_like(t.trim())
            .ok_or_else(|| format!("{s:?}: OPEN_FOR must be a duration such as 30s or 500ms"))?;
        let probes = match parts.next() {
            None => 1,
            Some(p) => p
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{s:?}: PROBES must be a whole number above 0"))?,
        };
        if parts.next().is_some() {
            return Err(format!("{s:?}: expected FAILURES/OPEN_FOR[/PROBES]"));
        }
        Ok(BreakerConfig {
            trip,
            open_for,
            probes,
        })
    }
}

/// `500ms`, `30s`, `2m`.
fn humantime_like(s: &str) -> Option<Duration> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        _ => return None,
    };
    (!d.is_zero()).then_some(d)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// `failures` in a row; `recent` the last `seen` verdicts, newest in the lowest bit, 1 for a
    /// failure.
    Closed {
        failures: u32,
        recent: u128,
        seen: u32,
    },
    Open {
        until: Instant,
    },
    HalfOpen {
        in_flight: u32,
    },
}

const CLOSED: State = State::Closed {
    failures: 0,
    recent: 0,
    seen: 0,
};

/// What an attempt says about the dependency behind the kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The handler succeeded.
    Success,
    /// The handler failed in a way another attempt may fix (error or time-out).
    Failure,
    /// Nothing about the dependency (bad input, cancelled, shutdown).
    Neutral,
}

/// A state change, to be emitted as an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerEvent {
    /// The kind.
    pub kind: String,
    /// `breaker-open` or `breaker-closed`.
    pub state: String,
    /// The worker whose breaker changed.
    pub worker: String,
    /// For `breaker-open`: until when, ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<u64>,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
}

impl BreakerEvent {
    /// Encodes the event.
    pub fn to_message(&self) -> Message {
        let h = Headers::new().with(header::CONTENT_TYPE, "application/json");
        Message::new(h, serde_json::to_vec(self).unwrap_or_default())
    }
}

/// One kind's breaker in one worker.
pub struct Breaker {
    kind: String,
    cfg: BreakerConfig,
    state: Mutex<State>,
    changed: Notify,
}

/// Permission to run one job; tell it how the attempt went with [`BreakerPermit::finish`].
pub struct BreakerPermit {
    breaker: Arc<Breaker>,
    probe: bool,
    done: bool,
}

impl BreakerPermit {
    /// The breaker this permit is from.
    pub fn breaker(&self) -> Arc<Breaker> {
        self.breaker.clone()
    }

    /// Reports the attempt; returns the state change it caused, if any.
    pub fn finish(mut self, verdict: Verdict) -> Option<&'static str> {
        self.done = true;
        self.breaker.record(verdict, self.probe)
    }
}

impl Drop for BreakerPermit {
    fn drop(&mut self) {
        if !self.done {
            self.breaker.record(Verdict::Neutral, self.probe);
        }
    }
}

impl Breaker {
    /// A closed breaker for `kind`.
    pub fn new(kind: &str, cfg: BreakerConfig) -> Arc<Breaker> {
        Arc::new(Breaker {
            kind: kind.to_string(),
            cfg,
            state: Mutex::new(CLOSED),
            changed: Notify::new(),
        })
    }

    /// The kind.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until a job could be let through (closed, open time over, or a probe slot free),
    /// without taking anything: the worker takes the next job from the broker only then.
    pub async fn ready(&self) {
        loop {
            let notified = self.changed.notified();
            let wait = match *self.lock() {
                State::Closed { .. } => return,
                State::Open { until } if Instant::now() >= until => return,
                State::Open { until } => until - Instant::now(),
                State::HalfOpen { in_flight } if in_flight < self.cfg.probes => return,
                State::HalfOpen { .. } => Duration::from_millis(200),
            };
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Waits until a job may run: at once when closed, after the open time, and while
    /// half-open for one of the probe slots.
    pub async fn admit(self: &Arc<Self>) -> BreakerPermit {
        loop {
            let notified = self.changed.notified();
            let wait = {
                let mut s = self.lock();
                match *s {
                    State::Closed { .. } => {
                        return BreakerPermit {
                            breaker: self.clone(),
                            probe: false,
                            done: false,
                        }
                    }
                    State::Open { until } if Instant::now() >= until => {
                        *s = State::HalfOpen { in_flight: 1 };
                        tracing::info!(kind = %self.kind, "circuit half-open: letting a probe through");
                        return BreakerPermit {
                            breaker: self.clone(),
                            probe: true,
                            done: false,
                        };
                    }
                    State::Open { until } => until - Instant::now(),
                    State::HalfOpen { in_flight } if in_flight < self.cfg.probes => {
                        *s = State::HalfOpen {
                            in_flight: in_flight + 1,
                        };
                        return BreakerPermit {
                            breaker: self.clone(),
                            probe: true,
                            done: false,
                        };
                    }
                    State::HalfOpen { .. } => Duration::from_millis(200),
                }
            };
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn record(&self, verdict: Verdict, probe: bool) -> Option<&'static str> {
        let mut s = self.lock();
        let before = *s;
        let open = State::Open {
            until: Instant::now() + self.cfg.open_for,
        };
        *s = match (before, verdict) {
            (
                State::Closed {
                    failures,
                    recent,
                    seen,
                },
                Verdict::Success | Verdict::Failure,
            ) => {
                let failed = verdict == Verdict::Failure;
                let failures = if failed { failures + 1 } else { 0 };
                let recent = (recent << 1) | u128::from(failed);
                let seen = seen.saturating_add(1);
                if self.trips(failures, recent, seen) {
                    open
                } else {
                    State::Closed {
                        failures,
                        recent,
                        seen,
                    }
                }
            }
            (State::HalfOpen { .. }, Verdict::Success) if probe => CLOSED,
            (State::HalfOpen { .. }, Verdict::Failure) if probe => open,
            (State::HalfOpen { in_flight }, _) if probe => State::HalfOpen {
                in_flight: in_flight.saturating_sub(1),
            },
            (other, _) => other,
        };
        let change = match (before, *s) {
            (State::Open { .. }, _) => None,
            (_, State::Open { .. }) => Some("breaker-open"),
            (State::HalfOpen { .. }, State::Closed { .. }) => Some("breaker-closed"),
            _ => None,
        };
        drop(s);
        if let Some(c) = change {
            tracing::warn!(kind = %self.kind, "circuit {c}");
        }
        self.changed.notify_waiters();
        change
    }

    /// True when a closed breaker with this record opens.
    fn trips(&self, failures: u32, recent: u128, seen: u32) -> bool {
        match self.cfg.trip {
            Trip::Consecutive(n) => failures >= n,
            Trip::Ratio { percent, window } => {
                let mask = if window >= 128 {
                    u128::MAX
                } else {
                    (1u128 << window) - 1
                };
                seen >= window && (recent & mask).count_ones() * 100 >= percent * window
            }
        }
    }

    /// Opens until `until` (another worker's breaker opened), unless it is open already. True
    /// when it opened.
    pub fn trip_until(&self, until: Instant) -> bool {
        let mut s = self.lock();
        if matches!(*s, State::Closed { .. }) && until > Instant::now() {
            *s = State::Open { until };
            tracing::warn!(kind = %self.kind, "circuit open: another worker's breaker opened");
            return true;
        }
        false
    }

    /// How long it stays open from now (zero when not open).
    pub fn open_for(&self) -> Duration {
        match *self.lock() {
            State::Open { until } => until.saturating_duration_since(Instant::now()),
            _ => Duration::ZERO,
        }
    }
}

/// Told of each state change of a breaker (`breaker-open`, `breaker-closed`).
pub type OnChange = Arc<dyn Fn(&Breaker, &'static str) + Send + Sync>;

/// The `breaker` control of a kind: its admission waits while the circuit is open (so the worker
/// takes no job of the kind); its call waits for a probe slot when half-open, then counts the
/// job's outcome.
pub struct BreakerControl {
    breaker: Arc<Breaker>,
    on_change: OnChange,
}

impl BreakerControl {
    /// The control of `breaker`; `on_change` hears its state changes.
    pub fn new(breaker: Arc<Breaker>, on_change: OnChange) -> BreakerControl {
        BreakerControl { breaker, on_change }
    }
}

/// What an outcome says about the dependency behind the kind.
pub fn verdict(outcome: &Result<serde_json::Value, JobError>) -> Verdict {
    match outcome {
        Ok(_) => Verdict::Success,
        Err(JobError::Retry { .. } | JobError::Timeout(_)) => Verdict::Failure,
        Err(_) => Verdict::Neutral,
    }
}

impl Control for BreakerControl {
    fn name(&self) -> &'static str {
        "breaker"
    }

    fn admit(self: Arc<Self>) -> BoxFuture<'static, Held> {
        Box::pin(async move {
            self.breaker.ready().await;
            Box::new(()) as Held
        })
    }

    fn call(
        self: Arc<Self>,
        job: Job,
        next: Next,
    ) -> BoxFuture<'static, Result<serde_json::Value, JobError>> {
        Box::pin(async move {
            // A job taken just before the breaker opened waits here (its lease extended).
            let permit = self.breaker.admit().await;
            let outcome = next.oneshot(job).await;
            if let Some(change) = permit.finish(verdict(&outcome)) {
                (self.on_change)(&self.breaker, change);
            }
            outcome
        })
    }
}

/// The broadcast topic on which workers tell each other of `kind`'s breaker.
pub fn topic(kind: &str) -> String {
    format!("breakers.{kind}")
}

/// How often an open breaker's state is broadcast again until it ends.
const REPEAT_OPEN: Duration = Duration::from_secs(1);
/// How long a worker with breakers listens for open ones before it takes jobs.
pub const LEARN_OPEN: Duration = Duration::from_millis(1500);

/// An [`OnChange`] that publishes each change of `worker`'s breakers, in the background: as a
/// lifecycle event, and on the worker-only broadcast [`topic`] (an open one every second until
/// it ends, for workers that start meanwhile).
pub fn announce(
    transport: Arc<dyn crate::transport::Transport>,
    worker: String,
    stopped: tokio_util::sync::CancellationToken,
) -> OnChange {
    Arc::new(move |b: &Breaker, state: &'static str| {
        let event = BreakerEvent {
            kind: b.kind().to_string(),
            state: state.to_string(),
            worker: worker.clone(),
            until_ms: (state == "breaker-open").then(|| {
                crate::job::now_ms() + u64::try_from(b.open_for().as_millis()).unwrap_or(0)
            }),
            at_ms: crate::job::now_ms(),
        };
        let (transport, stopped) = (transport.clone(), stopped.clone());
        tokio::spawn(async move {
            let msg = event.to_message();
            if let Err(e) = transport
                .emit_event(&event.kind, &event.state, msg.clone())
                .await
            {
                tracing::debug!(error = %e, "breaker event not sent");
            }
            say_while_open(transport.as_ref(), &event, &stopped).await;
        });
    })
}

/// Broadcasts `event` on the worker-only [`topic`], and again every second while the breaker it
/// opened is open (until its `until_ms`, or `stopped`): broadcasts are not kept, so a worker that
/// starts meanwhile learns it from these. Every worker whose breaker is open says it, the one
/// that opened it and those that followed, so it is heard after the opener has gone.
pub async fn say_while_open(
    transport: &dyn crate::transport::Transport,
    event: &BreakerEvent,
    stopped: &tokio_util::sync::CancellationToken,
) {
    let msg = event.to_message();
    loop {
        if let Err(e) = transport.broadcast(&topic(&event.kind), msg.clone()).await {
            tracing::debug!(error = %e, "breaker state not broadcast");
        }
        let left = event
            .until_ms
            .unwrap_or(0)
            .saturating_sub(crate::job::now_ms());
        if left <= REPEAT_OPEN.as_millis() as u64 {
            break;
        }
        tokio::select! {
            _ = stopped.cancelled() => break,
            _ = tokio::time::sleep(REPEAT_OPEN) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_parse_and_bad_ones_name_the_problem() {
        assert_eq!(
            BreakerConfig::parse("5/30s"),
            Ok(BreakerConfig {
                trip: Trip::Consecutive(5),
                open_for: Duration::from_secs(30),
                probes: 1
            })
        );
        assert_eq!(BreakerConfig::parse("3/500ms/2").map(|c| c.probes), Ok(2));
        let err = |s: &str| BreakerConfig::parse(s).err().unwrap_or_default();
        assert!(err("5").contains("expected"));
        assert!(err("0/1s").contains("FAILURES"));
        assert!(err("5/soon").contains("OPEN_FOR"));
        assert!(err("5/1s/0").contains("PROBES"));
        assert_eq!(
            BreakerConfig::parse("50%@20/30s").map(|c| c.trip),
            Ok(Trip::Ratio {
                percent: 50,
                window: 20
            })
        );
        assert!(err("50@20/1s").contains("R%@N"));
        assert!(err("150%@20/1s").contains("at most 100"));
        assert!(err("50%@200/1s").contains("at most 128"));
        assert!(err("50%@0/1s").contains("window"));
    }

    #[tokio::test]
    async fn a_ratio_breaker_opens_on_the_share_of_failures_in_its_window() {
        let b = Breaker::new("x", BreakerConfig::parse("50%@4/10s").expect("config"));
        // A quarter failed: closed.
        for v in [
            Verdict::Failure,
            Verdict::Success,
            Verdict::Success,
            Verdict::Success,
        ] {
            assert_eq!(b.admit().await.finish(v), None);
        }
        // Neutral outcomes do not count.
        assert_eq!(b.admit().await.finish(Verdict::Neutral), None);
        // Last four S, S, S, F: a quarter again; then S, S, F, F: half failed, so it opens.
        assert_eq!(b.admit().await.finish(Verdict::Failure), None);
        assert_eq!(
            b.admit().await.finish(Verdict::Failure),
            Some("breaker-open")
        );
        assert!(b.open_for() > Duration::ZERO);
    }

    #[tokio::test]
    async fn opens_after_failures_then_probes_and_closes() {
        let b = Breaker::new(
            "x",
            BreakerConfig {
                trip: Trip::Consecutive(2),
                open_for: Duration::from_millis(100),
                probes: 1,
            },
        );
        assert_eq!(b.admit().await.finish(Verdict::Failure), None);
        assert_eq!(
            b.admit().await.finish(Verdict::Failure),
            Some("breaker-open")
        );
        assert!(b.open_for() > Duration::ZERO);
        // Open: no job is let through until the open time has passed.
        assert!(tokio::time::timeout(Duration::from_millis(30), b.admit())
            .await
            .is_err());
        let probe = b.admit().await;
        // Half-open: one probe at a time.
        assert!(tokio::time::timeout(Duration::from_millis(30), b.admit())
            .await
            .is_err());
        assert_eq!(probe.finish(Verdict::Success), Some("breaker-closed"));
        let p = b.admit().await;
        drop(p);
        // A neutral outcome changes nothing.
        assert_eq!(b.open_for(), Duration::ZERO);
    }

    #[tokio::test]
    async fn a_failed_probe_opens_it_again_and_remote_trips_open_it() {
        let b = Breaker::new(
            "x",
            BreakerConfig {
                trip: Trip::Consecutive(1),
                open_for: Duration::from_millis(50),
                probes: 1,
            },
        );
        assert_eq!(
            b.admit().await.finish(Verdict::Failure),
            Some("breaker-open")
        );
        assert_eq!(
            b.admit().await.finish(Verdict::Failure),
            Some("breaker-open")
        );
        assert_eq!(
            b.admit().await.finish(Verdict::Success),
            Some("breaker-closed")
        );
        b.trip_until(Instant::now() + Duration::from_secs(5));
        assert!(b.open_for() > Duration::from_secs(4));
    }
}
