//! One run per tick where the broker keeps no publish ids (RabbitMQ).
//!
//! A scheduler that dies between publishing a round of ticks and recording it leaves the round
//! to the next leader, which publishes it again under the same ids. JetStream drops the second
//! copy (its de-duplication window); RabbitMQ keeps both. So every tick job carries the copy it
//! is (`Conveyor-Tick-Copy`: the publishing leader's token), and before running one a worker on
//! such a broker claims the tick for its copy in the schedule's register `runs.<schedule>`, a
//! compare-and-set: the first copy to claim it runs (again, if its worker dies and it is
//! delivered again); any other copy is acked without running, as the duplicate it is. The
//! register keeps the claims of the last [`KEEP`] ticks of the schedule.

use crate::error::{Error, Result};
use crate::message::Headers;
use crate::protocol::header;
use crate::transport::Transport;
use std::collections::BTreeMap;

/// Ticks whose claims a schedule's register keeps: the copies of a tick arrive within seconds
/// of each other, a takeover apart.
pub const KEEP: usize = 1_024;
/// Times a claim is tried again after another write came first.
const TRIES: usize = 20;

/// The register of `schedule`'s claims.
pub fn register(schedule: &str) -> String {
    format!("runs.{schedule}")
}

/// The tick a job's headers say it is, with its copy: `(schedule, tick, copy)`, for a job a
/// scheduler published (all three headers present and readable).
pub fn tick_of(headers: &Headers) -> Option<(&str, u64, &str)> {
    let schedule = headers.get(header::SCHEDULE)?;
    let tick = headers.get(header::TICK)?.trim().parse().ok()?;
    let copy = headers.get(header::TICK_COPY)?;
    crate::schedule::validate_name(schedule).ok()?;
    Some((schedule, tick, copy))
}

/// Whether copy `copy` of `schedule`'s tick `tick` is the one to run: `true` once it holds the
/// tick (claimed now, or earlier by this same copy); `false` when another copy holds it.
pub async fn claim(
    transport: &dyn Transport,
    schedule: &str,
    tick: u64,
    copy: &str,
) -> Result<bool> {
    let name = register(schedule);
    for _ in 0..TRIES {
        let mut held: super::table::Versioned<BTreeMap<u64, String>> =
            super::table::read(transport, &name).await?;
        if let Some(holder) = held.value.get(&tick) {
            return Ok(holder == copy);
        }
        held.value.insert(tick, copy.to_string());
        while held.value.len() > KEEP {
            held.value.pop_first();
        }
        if super::table::write(transport, &name, held.revision, &held.value)
            .await?
            .is_some()
        {
            return Ok(true);
        }
    }
    Err(Error::Conflict(format!(
        "the runs of schedule {schedule:?} changed {TRIES} times while tick {tick} was claimed"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tick_job_says_its_schedule_tick_and_copy() {
        let h = Headers::new()
            .with(header::SCHEDULE, "beat")
            .with(header::TICK, "1700000000000")
            .with(header::TICK_COPY, "c1");
        assert_eq!(tick_of(&h), Some(("beat", 1_700_000_000_000, "c1")));
        let mut no_copy = h.clone();
        no_copy.remove(header::TICK_COPY);
        assert_eq!(tick_of(&no_copy), None, "not a scheduler's");
        let bad = h.clone().with(header::TICK, "soon");
        assert_eq!(tick_of(&bad), None);
        let bad = h.with(header::SCHEDULE, "a.b");
        assert_eq!(tick_of(&bad), None);
        assert_eq!(register("beat"), "runs.beat");
    }
}
