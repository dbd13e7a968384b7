//! Fault points, for tests that crash a process at an exact step.
//!
//! In a debug build, `CONVEYOR_FAULT=<point>` (or `<point>@<n>`) makes the process kill itself
//! with SIGKILL, as `kill -9` would, the first (or `n`-th) time it passes the named point.
//! Release builds compile the points out. The points:
//!
//! | point | where |
//! |---|---|
//! | `worker.before-ack` | a job's result (or a dead or cancelled job's final result and dead letter) is confirmed by the broker; its delivery is not acked yet |
//! | `worker.before-retry` | a failed attempt is about to be scheduled again (RabbitMQ: its copy published; NATS: a delayed nak, the settlement itself) |
//! | `worker.after-retry-copy` | RabbitMQ: a failed attempt's copy is in its delay queue; the delivery is not acked yet |
//! | `aggregator.before-ack` | a batch of results is committed to the store; it is not acked yet |
//! | `aggregator.before-chord-callback` | a chord's last member is committed; its callback is not published yet |
//! | `scheduler.before-record` | the leading scheduler published a round of ticks (confirmed); it has not recorded them yet |

/// The fault points there are.
pub const POINTS: [&str; 6] = [
    "worker.before-ack",
    "worker.before-retry",
    "worker.after-retry-copy",
    "aggregator.before-ack",
    "aggregator.before-chord-callback",
    "scheduler.before-record",
];

/// What `CONVEYOR_FAULT` asks for: a point of [`POINTS`] and the pass, from 1. A spec naming no
/// point, or a pass that is not a number above 0, is an error naming it.
pub fn parse(spec: &str) -> Result<(String, u64), String> {
    let (name, pass) = match spec.split_once('@') {
        Some((name, n)) => (
            name,
            n.trim()
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    format!("CONVEYOR_FAULT={spec:?}: the pass after @ must be 1 or more")
                })?,
        ),
        None => (spec, 1),
    };
    if POINTS.contains(&name) {
        Ok((name.to_string(), pass))
    } else {
        Err(format!(
            "CONVEYOR_FAULT={spec:?}: no such fault point (there are {})",
            POINTS.join(", ")
        ))
    }
}

#[cfg(debug_assertions)]
static ARMED: std::sync::OnceLock<Option<(String, u64)>> = std::sync::OnceLock::new();

/// The point and pass `CONVEYOR_FAULT` names, read once; a spec that names no fault point is
/// an error naming it.
#[cfg(debug_assertions)]
fn armed() -> Result<&'static Option<(String, u64)>, String> {
    if let Some(a) = ARMED.get() {
        return Ok(a);
    }
    let a = match std::env::var("CONVEYOR_FAULT") {
        Ok(spec) => Some(parse(&spec)?),
        Err(_) => None,
    };
    Ok(ARMED.get_or_init(|| a))
}

/// Checks `CONVEYOR_FAULT` when a process starts: `Err` naming the problem when it names no
/// fault point. (Release builds ignore it.)
pub fn check() -> crate::Result<()> {
    #[cfg(debug_assertions)]
    armed().map_err(crate::Error::Config)?;
    Ok(())
}

/// Kills the process (SIGKILL, as `kill -9` would: no unwinding, no core) if `CONVEYOR_FAULT`
/// names `point` and this is the pass it names.
#[cfg(debug_assertions)]
pub fn point(point: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static PASSES: AtomicU64 = AtomicU64::new(0);
    if let Ok(Some((name, n))) = armed() {
        if name == point && PASSES.fetch_add(1, Ordering::SeqCst) + 1 == *n {
            eprintln!("fault point {point} (pass {n}): killing the process");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
            std::process::abort();
        }
    }
}

/// Fault points are compiled out of release builds.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn point(_point: &str) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_names_a_point_and_a_pass_or_is_refused_naming_it() {
        assert_eq!(
            parse("worker.before-ack"),
            Ok(("worker.before-ack".into(), 1))
        );
        assert_eq!(
            parse("aggregator.before-ack@3"),
            Ok(("aggregator.before-ack".into(), 3))
        );
        assert!(parse("worker.before-akc").is_err_and(|e| e.contains("no such fault point")));
        assert!(parse("worker.before-ack@0").is_err_and(|e| e.contains("1 or more")));
        assert!(parse("worker.before-ack@x").is_err_and(|e| e.contains("1 or more")));
    }
}
