//! Periodic jobs: schedules kept by the broker, and the scheduler that publishes their ticks.
//!
//! A [`Schedule`] says which job to publish (kind and payload) and when: every fixed interval
//! (ticks at the multiples of it since the epoch) or at the times of a cron expression in a
//! named time zone. The schedules live in a broker register ([`table`]); any number of
//! schedulers may run ([`run`]), and the one holding the broker claim publishes. Each tick's job
//! has the id `<schedule>@<tick ms>`, the same whichever scheduler publishes it, so that the
//! broker (JetStream's duplicate window) and the aggregator (one record per id) see a tick once.

pub mod request;
pub mod run;
pub mod runs;
pub mod table;

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::str::FromStr;

/// The shortest interval of a schedule.
pub const MIN_EVERY_MS: u64 = 1_000;
/// The longest interval of a schedule: 366 days.
pub const MAX_EVERY_MS: u64 = 366 * 24 * 3_600 * 1_000;
/// Most missed ticks of one schedule published when a scheduler catches up; older ones are
/// skipped (and logged).
pub const MAX_CATCH_UP: usize = 1_000;

/// What a scheduler does with ticks whose time passed while no scheduler ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Missed {
    /// They are not published; the schedule goes on from its next tick.
    #[default]
    Skip,
    /// Each is published, oldest first (at most [`MAX_CATCH_UP`] of them).
    CatchUp,
}

/// What a scheduler does with a tick while the schedule's previous job has no result yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overlap {
    /// The tick is published anyway.
    #[default]
    Allow,
    /// The tick is skipped.
    Skip,
}

impl FromStr for Missed {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "skip" => Ok(Missed::Skip),
            "catch-up" => Ok(Missed::CatchUp),
            _ => Err(Error::Config(format!(
                "missed-tick policy {s:?}: use skip or catch-up"
            ))),
        }
    }
}

impl FromStr for Overlap {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "allow" => Ok(Overlap::Allow),
            "skip" => Ok(Overlap::Skip),
            _ => Err(Error::Config(format!(
                "overlap policy {s:?}: use allow or skip"
            ))),
        }
    }
}

/// A periodic job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Letters, digits, '-' and '_', at most 64.
    pub name: String,
    /// The kind of the jobs it publishes.
    pub kind: String,
    /// The body of every job it publishes (JSON).
    #[serde(default)]
    pub payload: Value,
    /// A tick at every multiple of this many milliseconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_ms: Option<u64>,
    /// Or a tick at every time of this cron expression (five fields, or six with seconds first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// The time zone the cron expression is read in (an IANA name; UTC when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tz: Option<String>,
    /// The missed-tick policy.
    #[serde(default)]
    pub missed: Missed,
    /// The overlap policy.
    #[serde(default)]
    pub overlap: Overlap,
    /// The priority of the jobs it publishes (see [`crate::priority`]).
    #[serde(default)]
    pub priority: crate::priority::Priority,
    /// A paused schedule publishes nothing; its ticks while paused are skipped.
    #[serde(default)]
    pub paused: bool,
    /// When it was first added (epoch ms).
    #[serde(default)]
    pub created_ms: u64,
    /// When it was last added, replaced or resumed (epoch ms): its ticks are those strictly
    /// after this (and after `created_ms`); none before is caught up.
    #[serde(default)]
    pub since_ms: u64,
}

impl Schedule {
    /// A schedule of `kind` jobs with an empty payload, ticking every `every_ms`.
    pub fn every(name: &str, kind: &str, every_ms: u64) -> Schedule {
        Schedule {
            name: name.into(),
            kind: kind.into(),
            payload: Value::Object(Default::default()),
            every_ms: Some(every_ms),
            cron: None,
            tz: None,
            missed: Missed::default(),
            overlap: Overlap::default(),
            priority: crate::priority::Priority::default(),
            paused: false,
            created_ms: crate::job::now_ms(),
            since_ms: crate::job::now_ms(),
        }
    }

    /// A schedule of `kind` jobs with an empty payload, ticking at the times of `cron` in `tz`.
    pub fn cron(name: &str, kind: &str, cron: &str, tz: Option<&str>) -> Schedule {
        Schedule {
            every_ms: None,
            cron: Some(cron.into()),
            tz: tz.map(Into::into),
            ..Schedule::every(name, kind, MIN_EVERY_MS)
        }
    }

    /// Checks every field; the error names the one that is wrong.
    pub fn validate(&self) -> Result<()> {
        validate_name(&self.name)?;
        crate::protocol::validate_kind(&self.kind)?;
        match (self.every_ms, &self.cron) {
            (Some(ms), None) if (MIN_EVERY_MS..=MAX_EVERY_MS).contains(&ms) => Ok(()),
            (Some(ms), None) => Err(Error::Config(format!(
                "schedule {}: an interval of {ms} ms; use 1 s to 366 days",
                self.name
            ))),
            (None, Some(_)) => self.timing().map(|_| ()),
            _ => Err(Error::Config(format!(
                "schedule {}: give either an interval or a cron expression",
                self.name
            ))),
        }
    }

    fn timing(&self) -> Result<Timing> {
        if let Some(ms) = self.every_ms {
            return Ok(Timing::Every(ms.max(MIN_EVERY_MS)));
        }
        let expr = self.cron.as_deref().unwrap_or_default();
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .build()
            .parse(expr)
            .map_err(|e| {
                Error::Config(format!(
                    "schedule {}: cron expression {expr:?}: {e}",
                    self.name
                ))
            })?;
        let tz = match self.tz.as_deref() {
            None => chrono_tz::UTC,
            Some(name) => name.parse::<chrono_tz::Tz>().map_err(|_| {
                Error::Config(format!(
                    "schedule {}: unknown time zone {name:?} (use an IANA name such as Europe/Paris)",
                    self.name
                ))
            })?,
        };
        Ok(Timing::Cron(Box::new(cron), tz))
    }

    /// The first tick strictly after `after_ms` (epoch ms), if the schedule has one.
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        self.timing().ok()?.next_after(after_ms)
    }

    /// The ticks in `(after_ms, until_ms]`, oldest first, at most `limit` of them (the newest
    /// ones when there are more). The work is bounded by `limit`, not by the span: the walk
    /// starts at most `limit` ticks before `until_ms`.
    pub fn ticks_between(&self, after_ms: u64, until_ms: u64, limit: usize) -> Vec<u64> {
        let Ok(timing) = self.timing() else {
            return Vec::new();
        };
        if limit == 0 || until_ms <= after_ms {
            return Vec::new();
        }
        let mut ticks = std::collections::VecDeque::new();
        let mut at = timing.start_of_last(after_ms, until_ms, limit);
        // A walk of about `limit` steps; the bound only guards against a pattern that would
        // repeat a time.
        for _ in 0..limit.saturating_mul(4).saturating_add(8) {
            let Some(t) = timing.next_after(at).filter(|t| *t > at) else {
                break;
            };
            if t > until_ms {
                break;
            }
            ticks.push_back(t);
            if ticks.len() > limit {
                ticks.pop_front();
            }
            at = t;
        }
        ticks.into()
    }
}

enum Timing {
    Every(u64),
    Cron(Box<croner::Cron>, chrono_tz::Tz),
}

impl Timing {
    fn next_after(&self, after_ms: u64) -> Option<u64> {
        match self {
            Timing::Every(ms) => Some((after_ms / ms + 1) * ms),
            Timing::Cron(cron, tz) => {
                let at = at_ms(tz, after_ms)?;
                let next = cron.find_next_occurrence(&at, false).ok()?;
                u64::try_from(next.timestamp_millis()).ok()
            }
        }
    }

    /// A time at or after `after_ms` from which at most about `limit` ticks come before
    /// `until_ms` (found backwards from `until_ms`, in `limit` steps at most).
    fn start_of_last(&self, after_ms: u64, until_ms: u64, limit: usize) -> u64 {
        match self {
            Timing::Every(ms) => {
                let first = (until_ms / ms).saturating_sub(limit as u64) * ms;
                first.max(after_ms)
            }
            Timing::Cron(cron, tz) => {
                let Some(mut at) = at_ms(tz, until_ms) else {
                    return after_ms;
                };
                let mut inclusive = true;
                for _ in 0..limit {
                    match cron.find_previous_occurrence(&at, inclusive) {
                        Ok(prev) if prev.timestamp_millis() > after_ms as i64 => at = prev,
                        _ => return after_ms,
                    }
                    inclusive = false;
                }
                u64::try_from(at.timestamp_millis() - 1)
                    .unwrap_or(after_ms)
                    .max(after_ms)
            }
        }
    }
}

fn at_ms(tz: &chrono_tz::Tz, ms: u64) -> Option<chrono::DateTime<chrono_tz::Tz>> {
    use chrono::TimeZone;
    tz.timestamp_millis_opt(i64::try_from(ms).ok()?).single()
}

/// Checks a schedule's name: letters, digits, '-' and '_', 1 to 64 of them.
pub fn validate_name(name: &str) -> Result<()> {
    if crate::protocol::is_word(name) {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "invalid schedule name {name:?}: use 1 to 64 letters, digits, '-' and '_'"
        )))
    }
}

/// Checks a register's name: one or two words (see [`validate_name`]) joined by a dot
/// (`schedules`, `ticks`, `runs.<schedule>`).
pub fn validate_register(name: &str) -> Result<()> {
    let words: Vec<&str> = name.split('.').collect();
    if words.len() <= 2 && words.iter().all(|w| crate::protocol::is_word(w)) {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "invalid register name {name:?}: one or two words of letters, digits, '-' and '_', \
             joined by a dot"
        )))
    }
}

/// The id of `schedule`'s job for the tick at `tick_ms`: the same from every scheduler.
pub fn tick_id(schedule: &str, tick_ms: u64) -> String {
    format!("{schedule}@{tick_ms}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_tick_at_their_multiples() {
        let s = Schedule::every("s", "echo", 2_000);
        assert_eq!(s.next_after(0), Some(2_000));
        assert_eq!(s.next_after(2_000), Some(4_000));
        assert_eq!(s.next_after(3_999), Some(4_000));
        assert_eq!(
            s.ticks_between(1_000, 9_000, 10),
            vec![2_000, 4_000, 6_000, 8_000]
        );
        assert_eq!(s.ticks_between(1_000, 9_000, 2), vec![6_000, 8_000]);
        assert_eq!(s.ticks_between(9_000, 9_500, 10), Vec::<u64>::new());
    }

    #[test]
    fn cron_reads_seconds_and_time_zones() {
        // 2026-03-29 00:30 UTC: Paris goes from +1 to +2 at 01:00 UTC that night.
        let t0 = 1_774_744_200_000;
        let daily = Schedule::cron("d", "echo", "0 0 3 * * *", Some("Europe/Paris"));
        daily.validate().expect("valid");
        // 03:00 in Paris that day is 01:00 UTC (already summer time).
        assert_eq!(daily.next_after(t0), Some(t0 + 30 * 60 * 1000));
        let every_5s = Schedule::cron("f", "echo", "*/5 * * * * *", None);
        assert_eq!(every_5s.next_after(1_000), Some(5_000));
        let minutely = Schedule::cron("m", "echo", "* * * * *", None);
        assert_eq!(minutely.next_after(1_000), Some(60_000));
    }

    #[test]
    fn a_long_outage_costs_as_many_steps_as_the_limit() {
        // Every second since 1970: walked tick by tick, this would not end.
        let now = 1_796_000_000_123;
        let cron = Schedule::cron("c", "echo", "* * * * * *", None);
        let got = cron.ticks_between(0, now, MAX_CATCH_UP);
        assert_eq!(got.len(), MAX_CATCH_UP);
        assert_eq!(got.last(), Some(&1_796_000_000_000));
        assert_eq!(got[0], 1_796_000_000_000 - 999_000);
        let every = Schedule::every("e", "echo", 1_000);
        assert_eq!(every.ticks_between(0, now, MAX_CATCH_UP), got);
        // Fewer than the limit since `after`: all of them.
        assert_eq!(
            cron.ticks_between(now - 3_500, now, MAX_CATCH_UP),
            vec![
                1_795_999_997_000,
                1_795_999_998_000,
                1_795_999_999_000,
                1_796_000_000_000
            ]
        );
    }

    #[test]
    fn a_time_repeated_when_clocks_go_back_ticks_once() {
        // Paris, 2026-10-25: 02:30 comes twice (+2, then +1). 2026-10-24 00:00 UTC to
        // 2026-10-27 00:00 UTC holds three days of 02:30.
        let daily = Schedule::cron("d", "echo", "30 2 * * *", Some("Europe/Paris"));
        let (from, until) = (1_792_800_000_000, 1_793_059_200_000);
        let got = daily.ticks_between(from, until, MAX_CATCH_UP);
        assert_eq!(got.len(), 3, "{got:?}");
        // The first 02:30 (+2, 00:30 UTC), not the second (01:30 UTC).
        assert!(got.contains(&1_792_888_200_000), "{got:?}");
        assert!(!got.contains(&1_792_891_800_000), "{got:?}");
        assert_eq!(daily.ticks_between(from, until, 2).len(), 2);
    }

    #[test]
    fn a_time_skipped_when_clocks_go_forward_ticks_at_the_next_valid_time() {
        // Paris, 2026-03-29: 02:00 (+1) becomes 03:00 (+2), so 02:30 does not exist that night.
        let daily = Schedule::cron("d", "echo", "30 2 * * *", Some("Europe/Paris"));
        let (from, until) = (1_774_656_000_000, 1_774_915_200_000);
        let got = daily.ticks_between(from, until, MAX_CATCH_UP);
        eprintln!("ticks: {got:?}");
        assert_eq!(got.len(), 3, "{got:?}");
        // 03:00 +2, 01:00 UTC: the first time after the gap.
        assert!(got.contains(&1_774_746_000_000), "{got:?}");
    }

    #[test]
    fn a_bad_field_is_named() {
        let mut s = Schedule::every("bad name", "echo", 1_000);
        assert!(s
            .validate()
            .expect_err("refused")
            .to_string()
            .contains("schedule name"));
        s.name = "ok".into();
        s.every_ms = Some(10);
        assert!(s
            .validate()
            .expect_err("refused")
            .to_string()
            .contains("10 ms"));
        let c = Schedule::cron("c", "echo", "61 * * * *", None);
        assert!(c
            .validate()
            .expect_err("refused")
            .to_string()
            .contains("cron expression"));
        let z = Schedule::cron("z", "echo", "* * * * *", Some("Mars/Olympus"));
        assert!(z
            .validate()
            .expect_err("refused")
            .to_string()
            .contains("time zone"));
        let both = Schedule {
            cron: Some("* * * * *".into()),
            ..Schedule::every("b", "echo", 1_000)
        };
        assert!(both
            .validate()
            .expect_err("refused")
            .to_string()
            .contains("either"));
        assert!("later".parse::<Missed>().is_err());
        assert_eq!("catch-up".parse::<Missed>().ok(), Some(Missed::CatchUp));
    }

    #[test]
    fn tick_ids_are_the_same_everywhere() {
        assert_eq!(tick_id("nightly", 1_000), "nightly@1000");
    }
}
