//! A schedule as a client sends it (the body of the aggregator's `PUT /schedules/{name}`): the
//! interval as a duration (`"every": "30s"`) or in milliseconds (`"every_ms"`), policies by
//! their names, and unknown fields refused by name.

use super::{Missed, Overlap, Schedule};
use crate::error::{Error, Result};
use serde::Deserialize;
use serde_json::Value;

/// The fields a client may send; [`ScheduleRequest::into_schedule`] checks them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRequest {
    /// The kind of the jobs it publishes.
    pub kind: String,
    /// The jobs' input (JSON; `{}` when absent).
    #[serde(default)]
    pub payload: Option<Value>,
    /// A tick every this long (`"30s"`, `"5m"`, `"1h 30m"`).
    #[serde(default)]
    pub every: Option<String>,
    /// Or every this many milliseconds.
    #[serde(default)]
    pub every_ms: Option<u64>,
    /// Or a cron expression (five fields, or six with seconds first).
    #[serde(default)]
    pub cron: Option<String>,
    /// The time zone of the cron expression (an IANA name; UTC when absent).
    #[serde(default)]
    pub tz: Option<String>,
    /// `skip` (the default) or `catch-up`.
    #[serde(default)]
    pub missed: Missed,
    /// `allow` (the default) or `skip`.
    #[serde(default)]
    pub overlap: Overlap,
    /// `high`, `normal` (the default) or `low`: the priority of its jobs.
    #[serde(default)]
    pub priority: crate::priority::Priority,
    /// Store it paused.
    #[serde(default)]
    pub paused: bool,
}

impl ScheduleRequest {
    /// Reads a JSON body; an error names the field that is wrong or unknown.
    pub fn from_json(body: &[u8]) -> Result<Self> {
        serde_json::from_slice(body).map_err(|e| Error::Config(format!("schedule: {e}")))
    }

    /// The schedule `name` this request describes, validated.
    pub fn into_schedule(self, name: &str) -> Result<Schedule> {
        let every_ms = match (self.every, self.every_ms) {
            (Some(_), Some(_)) => {
                return Err(Error::Config(format!(
                    "schedule {name}: give every or every_ms, not both"
                )))
            }
            (Some(every), None) => {
                let d = humantime::parse_duration(&every)
                    .map_err(|e| Error::Config(format!("schedule {name}: every {every:?}: {e}")))?;
                Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            }
            (None, ms) => ms,
        };
        if self.tz.is_some() && self.cron.is_none() {
            return Err(Error::Config(format!(
                "schedule {name}: tz goes with a cron expression (an interval counts from the epoch)"
            )));
        }
        let now = crate::job::now_ms();
        let s = Schedule {
            name: name.to_string(),
            kind: self.kind,
            payload: self
                .payload
                .unwrap_or_else(|| Value::Object(Default::default())),
            every_ms,
            cron: self.cron,
            tz: self.tz,
            missed: self.missed,
            overlap: self.overlap,
            priority: self.priority,
            paused: self.paused,
            created_ms: now,
            since_ms: now,
        };
        s.validate()?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(name: &str, body: &str) -> Result<Schedule> {
        ScheduleRequest::from_json(body.as_bytes())?.into_schedule(name)
    }

    #[test]
    fn a_body_becomes_a_schedule() {
        let s = schedule(
            "beat",
            r#"{"kind":"echo","every":"1m 30s","missed":"catch-up","payload":{"a":1},"priority":"high"}"#,
        )
        .expect("valid");
        assert_eq!(s.every_ms, Some(90_000));
        assert_eq!(s.priority, crate::priority::Priority::High);
        assert_eq!(s.missed, Missed::CatchUp);
        assert_eq!(s.payload["a"], 1);
        let c = schedule(
            "nightly",
            r#"{"kind":"report","cron":"0 2 * * *","tz":"Europe/Paris","overlap":"skip"}"#,
        )
        .expect("valid");
        assert_eq!(
            (c.overlap, c.tz.as_deref()),
            (Overlap::Skip, Some("Europe/Paris"))
        );
        assert_eq!(c.payload, serde_json::json!({}));
    }

    #[test]
    fn a_bad_body_is_refused_naming_the_field() {
        for (body, named) in [
            (r#"{"kind":"echo","evry":"1s"}"#, "evry"),
            (r#"{"kind":"echo","every":"soon"}"#, "every"),
            (
                r#"{"kind":"echo","every":"1s","every_ms":1000}"#,
                "every_ms",
            ),
            (r#"{"kind":"echo","every_ms":10}"#, "10 ms"),
            (
                r#"{"kind":"echo","every":"1s","priority":"urgent"}"#,
                "urgent",
            ),
            (r#"{"kind":"echo","every":"1s","missed":"later"}"#, "later"),
            (r#"{"kind":"echo","every":"1s","tz":"Europe/Paris"}"#, "tz"),
            (r#"{"kind":"echo","cron":"61 * * * *"}"#, "cron expression"),
            (r#"{"kind":"echo"}"#, "interval or a cron"),
            (r#"{"every":"1s"}"#, "kind"),
            (r#"["kind"]"#, "schedule"),
            ("", "schedule"),
        ] {
            let e = schedule("s", body).expect_err(body).to_string();
            assert!(e.contains(named), "{body}: {e}");
        }
        let e = schedule("bad name", r#"{"kind":"echo","every":"1s"}"#).expect_err("name");
        assert!(e.to_string().contains("schedule name"), "{e}");
    }
}
