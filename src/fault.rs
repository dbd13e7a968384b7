//! Fault points, for tests that crash a process at an exact step.
//!
//! In a debug build, `CONVEYOR_FAULT=<point>` (or `<point>@<n>`) makes the process abort, as a
//! `kill -9` would stop it, the first (or `n`-th) time it passes the named point. Release builds
//! compile the points out. The points:
//!
//! | point | where |
//! |---|---|
//! | `worker.before-ack` | a job's result (or a dead or cancelled job's final result and dead letter) is confirmed by the broker; its delivery is not acked yet |
//! | `worker.before-retry` | a failed attempt is about to be scheduled again (RabbitMQ: its copy published; NATS: a delayed nak, the settlement itself) |
//! | `worker.after-retry-copy` | RabbitMQ: a failed attempt's copy is in its delay queue; the delivery is not acked yet |
//! | `aggregator.before-ack` | a batch of results is committed to the store; it is not acked yet |
//! | `aggregator.before-chord-callback` | a chord's last member is committed; its callback is not published yet |

/// Aborts the process if `CONVEYOR_FAULT` names `point` and this is the pass it names.
#[cfg(debug_assertions)]
pub fn point(point: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static PASSES: AtomicU64 = AtomicU64::new(0);
    let armed = ARMED.get_or_init(|| {
        let spec = std::env::var("CONVEYOR_FAULT").ok()?;
        match spec.split_once('@') {
            Some((name, n)) => Some((name.to_string(), n.trim().parse().ok()?)),
            None => Some((spec, 1)),
        }
    });
    if let Some((name, n)) = armed {
        if name == point && PASSES.fetch_add(1, Ordering::SeqCst) + 1 == *n {
            eprintln!("fault point {point} (pass {n}): aborting");
            std::process::abort();
        }
    }
}

/// Fault points are compiled out of release builds.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn point(_point: &str) {}
