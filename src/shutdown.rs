//! Shutdown signals: a [`CancellationToken`] that SIGTERM/SIGINT cancel.
//!
//! Shutdown is always a parameter: library code takes a token and never installs handlers itself,
//! so tests can stop a worker or aggregator in-process.

use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Set by `conveyor-supervisor` for its children: its own process id. A child whose parent is
/// no longer that process (the supervisor was killed, even with `kill -9`) shuts down
/// gracefully instead of running on unsupervised.
pub const SUPERVISOR_PID_ENV: &str = "CONVEYOR_SUPERVISOR_PID";

/// How often a supervised process checks that its supervisor is still there.
const PARENT_CHECK: Duration = Duration::from_millis(500);

/// Returns a token cancelled on the first SIGTERM or SIGINT (or when the supervisor named by
/// [`SUPERVISOR_PID_ENV`] is gone), and a second token cancelled on the second signal (force:
/// stop draining at once).
pub fn on_signals() -> (CancellationToken, CancellationToken) {
    let graceful = CancellationToken::new();
    let force = CancellationToken::new();
    if let Some(supervisor) = std::env::var(SUPERVISOR_PID_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    {
        tokio::spawn(watch_parent(supervisor, graceful.clone()));
    }
    let (g, f) = (graceful.clone(), force.clone());
    tokio::spawn(async move {
        let mut count = 0;
        loop {
            wait_signal().await;
            count += 1;
            if count == 1 {
                tracing::info!("shutdown requested: draining (signal again to force)");
                g.cancel();
            } else {
                tracing::warn!("second signal: forcing shutdown");
                f.cancel();
                return;
            }
        }
    });
    (graceful, force)
}

/// Cancels `graceful` once this process's parent is no longer `supervisor` (an orphan is
/// re-parented to init or a subreaper).
async fn watch_parent(supervisor: i32, graceful: CancellationToken) {
    loop {
        if nix::unistd::getppid().as_raw() != supervisor {
            graceful.cancel();
            tracing::warn!(
                supervisor,
                "the supervisor is gone: shutting down (draining)"
            );
            return;
        }
        tokio::select! {
            _ = graceful.cancelled() => return,
            _ = tokio::time::sleep(PARENT_CHECK) => {}
        }
    }
}

#[cfg(unix)]
async fn wait_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
