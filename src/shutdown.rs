//! Shutdown signals: a [`CancellationToken`] that SIGTERM/SIGINT cancel.
//!
//! Shutdown is always a parameter: library code takes a token and never installs handlers itself,
//! so tests can stop a worker or aggregator in-process.

use tokio_util::sync::CancellationToken;

/// Returns a token cancelled on the first SIGTERM or SIGINT, and a second token cancelled on
/// the second one (force: stop draining at once).
pub fn on_signals() -> (CancellationToken, CancellationToken) {
    let graceful = CancellationToken::new();
    let force = CancellationToken::new();
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
