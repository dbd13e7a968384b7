//! The supervisor: runs child processes and restarts them when they exit, like an OTP supervisor
//! with a one-for-one strategy.
//!
//! Each child that exits (or is killed) is started again after an exponential backoff. When more
//! than `max_restarts` restarts happen within `within`, the supervisor gives up: it stops every
//! child and returns [`SupervisorError::GaveUp`]. On `shutdown` it forwards SIGTERM to every child,
//! waits for them to drain up to `drain_timeout`, then kills what is left. Children's output is
//! passed through line by line with a `[name] ` prefix.

mod child;
pub mod events;
mod intensity;

use child::{Child, Exit};
pub use events::{EventSender, SupervisorEvent};
pub use intensity::Intensity;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One child to keep running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildSpec {
    /// Name used in the output prefix and the logs.
    pub name: String,
    /// Program to run.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Extra environment (secrets go here rather than into arguments, which `ps` shows).
    pub env: Vec<(String, String)>,
}

/// Supervisor settings.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// The children.
    pub children: Vec<ChildSpec>,
    /// First restart delay; doubles for a child that keeps failing, up to `backoff_max`.
    pub backoff_min: Duration,
    /// Largest restart delay.
    pub backoff_max: Duration,
    /// Restarts allowed within `within` before giving up.
    pub max_restarts: u32,
    /// The restart-intensity window.
    pub within: Duration,
    /// How long children get to exit after SIGTERM before they are killed.
    pub drain_timeout: Duration,
    /// Where to send lifecycle events besides the log (see [`events::publish`]).
    pub events: Option<EventSender>,
}

/// Why the supervisor stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// Too many restarts in the window.
    #[error("gave up: {restarts} restarts within {within:?} (limit {limit}); last exit: {last}")]
    GaveUp {
        /// Restarts counted in the window.
        restarts: u32,
        /// The window.
        within: Duration,
        /// The limit.
        limit: u32,
        /// How the last child ended.
        last: String,
    },
    /// A child could not be started at all.
    #[error("cannot start {name} ({program}): {source}")]
    Spawn {
        /// Child name.
        name: String,
        /// Program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Bad settings.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// What a clean stop looked like.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SupervisorReport {
    /// Restarts made in total.
    pub restarts: u64,
}

enum Event {
    Exited(usize, Exit),
    Restart(usize),
}

/// Runs the children until `shutdown` (then stops them gracefully) or until it gives up.
pub async fn run(
    config: SupervisorConfig,
    shutdown: CancellationToken,
    force: CancellationToken,
) -> Result<SupervisorReport, SupervisorError> {
    if config.children.is_empty() {
        return Err(SupervisorError::Config("no children to supervise".into()));
    }
    if config.backoff_min > config.backoff_max {
        return Err(SupervisorError::Config(format!(
            "restart backoff {:?}..{:?}: the first delay is above the largest",
            config.backoff_min, config.backoff_max
        )));
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let mut running: HashMap<usize, Child> = HashMap::new();
    let mut failures: Vec<u32> = vec![0; config.children.len()];
    let mut intensity = Intensity::new(config.max_restarts, config.within);
    let mut report = SupervisorReport::default();
    let emit = |event: SupervisorEvent| {
        if let Some(events) = &config.events {
            let _ = events.send(event);
        }
    };
    for (i, spec) in config.children.iter().enumerate() {
        let child = start(spec, i, &tx)?;
        emit(SupervisorEvent::new("child-started").child(&spec.name, child.pid()));
        running.insert(i, child);
    }
    let outcome = loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            e = rx.recv() => e,
        };
        match event {
            Some(Event::Exited(i, exit)) => {
                let Some(child) = running.remove(&i) else {
                    continue;
                };
                let name = &config.children[i].name;
                tracing::warn!(child = %name, pid = child.pid(), exit = %exit, ran = ?child.uptime(), "child exited");
                emit(
                    SupervisorEvent::new("child-exited")
                        .child(name, child.pid())
                        .detail(&exit),
                );
                if child.uptime() >= config.backoff_max {
                    failures[i] = 0;
                }
                if let Err(restarts) = intensity.record() {
                    break Err(SupervisorError::GaveUp {
                        restarts,
                        within: config.within,
                        limit: config.max_restarts,
                        last: format!("{name} {exit}"),
                    });
                }
                let delay = backoff(config.backoff_min, config.backoff_max, failures[i]);
                failures[i] = failures[i].saturating_add(1);
                tracing::info!(child = %name, "restarting in {delay:?}");
                let tx = tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = tx.send(Event::Restart(i));
                });
            }
            Some(Event::Restart(i)) => {
                let spec = &config.children[i];
                match start(spec, i, &tx) {
                    Ok(child) => {
                        report.restarts += 1;
                        tracing::info!(child = %spec.name, pid = child.pid(), "child restarted");
                        emit(
                            SupervisorEvent::new("child-restarted").child(&spec.name, child.pid()),
                        );
                        running.insert(i, child);
                    }
                    Err(e) => break Err(e),
                }
            }
            None => break Ok(()),
        }
    };
    match &outcome {
        Err(e) => emit(SupervisorEvent::new("gave-up").detail(e)),
        Ok(()) => {
            emit(SupervisorEvent::new("stopped").detail(format!("{} restarts", report.restarts)))
        }
    }
    stop_all(running, config.drain_timeout, &force).await;
    outcome.map(|()| report)
}

fn start(
    spec: &ChildSpec,
    index: usize,
    tx: &mpsc::UnboundedSender<Event>,
) -> Result<Child, SupervisorError> {
    let tx = tx.clone();
    let child = Child::spawn(spec, move |exit| {
        let _ = tx.send(Event::Exited(index, exit));
    })
    .map_err(|source| SupervisorError::Spawn {
        name: spec.name.clone(),
        program: spec.program.clone(),
        source,
    })?;
    tracing::info!(child = %spec.name, pid = child.pid(), "child started");
    Ok(child)
}

/// SIGTERM to every child, then SIGKILL to those still running after `drain`; when `force`
/// fires first (a second SIGTERM or SIGINT), a second SIGTERM and SIGKILL soon after.
async fn stop_all(running: HashMap<usize, Child>, drain: Duration, force: &CancellationToken) {
    let children: Vec<Child> = running.into_values().collect();
    for c in &children {
        c.terminate();
    }
    let deadline = tokio::time::Instant::now() + drain;
    futures::future::join_all(
        children
            .into_iter()
            .map(|c| c.wait_or_force(deadline, force)),
    )
    .await;
}

/// `min * 2^failures`, capped at `max`.
pub fn backoff(min: Duration, max: Duration, failures: u32) -> Duration {
    min.saturating_mul(1u32 << failures.min(31)).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let (a, b) = (Duration::from_millis(100), Duration::from_secs(10));
        assert_eq!(backoff(a, b, 0), Duration::from_millis(100));
        assert_eq!(backoff(a, b, 3), Duration::from_millis(800));
        assert_eq!(backoff(a, b, 40), Duration::from_secs(10));
    }
}
