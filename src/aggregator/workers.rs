//! Which workers are alive, from their heartbeats: a worker is live until it says it is
//! stopping or stays silent for three of its intervals.

use crate::worker::heartbeat::Heartbeat;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Silent intervals after which a worker is gone.
pub const MISSED_BEATS: u32 = 3;

/// A worker as the aggregator last heard of it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerView {
    /// The last heartbeat.
    #[serde(flatten)]
    pub beat: Heartbeat,
    /// Live now.
    pub alive: bool,
    /// Milliseconds since that heartbeat arrived.
    pub last_seen_ms_ago: u64,
}

/// Latest heartbeat per worker.
#[derive(Debug, Default)]
pub struct Liveness {
    seen: Mutex<BTreeMap<String, (Heartbeat, Instant)>>,
}

impl Liveness {
    /// Records a heartbeat.
    pub fn beat(&self, hb: Heartbeat) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.insert(hb.id.clone(), (hb, Instant::now()));
    }

    /// Every worker heard of, live or gone, by id.
    pub fn view(&self) -> Vec<WorkerView> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.values()
            .map(|(hb, at)| {
                let ago = at.elapsed();
                let limit = Duration::from_millis(hb.interval_ms).saturating_mul(MISSED_BEATS);
                WorkerView {
                    alive: !hb.stopping && ago <= limit,
                    last_seen_ms_ago: u64::try_from(ago.as_millis()).unwrap_or(u64::MAX),
                    beat: hb.clone(),
                }
            })
            .collect()
    }

    /// Live workers.
    pub fn live(&self) -> usize {
        self.view().iter().filter(|w| w.alive).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(id: &str, interval_ms: u64, stopping: bool) -> Heartbeat {
        Heartbeat {
            id: id.into(),
            host: "h".into(),
            pid: 1,
            kinds: vec![],
            in_flight: 0,
            concurrency: 1,
            version: "0".into(),
            at_ms: 0,
            interval_ms,
            stopping,
        }
    }

    #[test]
    fn stopping_and_silent_workers_are_gone() {
        let l = Liveness::default();
        l.beat(beat("a", 60_000, false));
        l.beat(beat("b", 60_000, true));
        l.beat(beat("c", 1, false));
        std::thread::sleep(Duration::from_millis(10));
        let v = l.view();
        let alive: Vec<(&str, bool)> = v.iter().map(|w| (w.beat.id.as_str(), w.alive)).collect();
        assert_eq!(alive, vec![("a", true), ("b", false), ("c", false)]);
        assert_eq!(l.live(), 1);
    }
}
