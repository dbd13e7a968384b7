//! The schedules and their last published ticks, kept in two broker registers (see
//! [`Transport::read_register`]): every change is a compare-and-set on the register's revision,
//! so that two clients changing schedules at once, or two schedulers, never overwrite each other.

use super::Schedule;
use crate::error::{Error, Result};
use crate::transport::Transport;
use std::collections::BTreeMap;

/// The register holding every schedule, by name.
pub const SCHEDULES: &str = "schedules";
/// The register holding each schedule's last published (or skipped) tick, by name.
pub const TICKS: &str = "ticks";

/// How many times a change is tried again after another change came first.
const TRIES: usize = 20;

/// A register's value and the revision it was read at (0: never written).
#[derive(Debug, Clone, Default)]
pub struct Versioned<T> {
    /// The revision to pass to the next write.
    pub revision: u64,
    /// The value.
    pub value: T,
}

/// Reads register `name` as JSON (an empty value when never written).
pub async fn read<T: serde::de::DeserializeOwned + Default>(
    transport: &dyn Transport,
    name: &str,
) -> Result<Versioned<T>> {
    match transport.read_register(name).await? {
        None => Ok(Versioned::default()),
        Some((revision, bytes)) => Ok(Versioned {
            revision,
            value: serde_json::from_slice(&bytes)
                .map_err(|e| Error::Codec(format!("register {name} holds unreadable JSON: {e}")))?,
        }),
    }
}

/// Writes `value` to register `name` if it is still at `revision`: the new revision, or `None`
/// when another write came first.
pub async fn write<T: serde::Serialize>(
    transport: &dyn Transport,
    name: &str,
    revision: u64,
    value: &T,
) -> Result<Option<u64>> {
    let body = serde_json::to_vec(value).map_err(|e| Error::Codec(e.to_string()))?;
    transport
        .write_register(name, revision, bytes::Bytes::from(body))
        .await
}

/// Every schedule, by name.
pub async fn list(transport: &dyn Transport) -> Result<BTreeMap<String, Schedule>> {
    Ok(read(transport, SCHEDULES).await?.value)
}

/// Applies `change` to the schedules and stores the result, reading them again when another
/// change came first. `change` returns an error to stop without storing.
pub async fn update(
    transport: &dyn Transport,
    mut change: impl FnMut(&mut BTreeMap<String, Schedule>) -> Result<()>,
) -> Result<BTreeMap<String, Schedule>> {
    for _ in 0..TRIES {
        let mut current: Versioned<BTreeMap<String, Schedule>> = read(transport, SCHEDULES).await?;
        change(&mut current.value)?;
        if write(transport, SCHEDULES, current.revision, &current.value)
            .await?
            .is_some()
        {
            return Ok(current.value);
        }
    }
    Err(Error::Conflict(format!(
        "the schedules changed {TRIES} times while this change was made; try again"
    )))
}

/// Adds `schedule`, or replaces the one of the same name (keeping its creation time), and
/// returns it as stored. Its ticks start after now: a replaced schedule catches up none of the
/// old one's.
pub async fn put(transport: &dyn Transport, mut schedule: Schedule) -> Result<Schedule> {
    schedule.validate()?;
    schedule.since_ms = crate::job::now_ms();
    update(transport, |all| {
        // Made now, or when the schedule it replaces was.
        schedule.created_ms = all
            .get(&schedule.name)
            .map_or(schedule.since_ms, |old| old.created_ms);
        all.insert(schedule.name.clone(), schedule.clone());
        Ok(())
    })
    .await?;
    Ok(schedule)
}

/// Removes schedule `name`; an error when there is none.
pub async fn remove(transport: &dyn Transport, name: &str) -> Result<()> {
    update(transport, |all| {
        all.remove(name)
            .map(|_| ())
            .ok_or_else(|| Error::NotFound(format!("no schedule named {name:?}")))
    })
    .await
    .map(|_| ())
}

/// Pauses (or resumes) schedule `name`; an error when there is none. A resumed schedule goes
/// on from its next tick: the ticks while it was paused are not caught up.
pub async fn set_paused(transport: &dyn Transport, name: &str, paused: bool) -> Result<()> {
    update(transport, |all| match all.get_mut(name) {
        Some(s) => {
            if s.paused && !paused {
                s.since_ms = crate::job::now_ms();
            }
            s.paused = paused;
            Ok(())
        }
        None => Err(Error::NotFound(format!("no schedule named {name:?}"))),
    })
    .await
    .map(|_| ())
}
