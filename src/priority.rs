//! Job priorities: three lanes per kind that a worker reads in a weighted order.
//!
//! Neither broker orders a durable queue by priority (RabbitMQ's quorum queues of 3.x keep one
//! order; JetStream streams keep publication order), so each kind has a lane per level, and the
//! priority of a job is the lane it is published to:
//!
//! | level | NATS subject | RabbitMQ routing key and queue |
//! | --- | --- | --- |
//! | `high` | `<ns>.jobs.<kind>~high` | `<kind>~high`, queue `<ns>.jobs.<kind>~high` |
//! | `normal` (default) | `<ns>.jobs.<kind>` | `<kind>`, queue `<ns>.jobs.<kind>` |
//! | `low` | `<ns>.jobs.<kind>~low` | `<kind>~low`, queue `<ns>.jobs.<kind>~low` |
//!
//! `~` appears in no kind, so no kind's address is another kind's lane. Conveyor's publishers
//! choose the lane from the job's `Conveyor-Priority` header; a job delivered from a lane carries
//! that lane's level in the header, so a retry, a delayed job's return and a chain's next step
//! keep it. A worker takes from its kind's lanes in the order [`Turns`] gives: mostly `high`, and
//! `normal` and `low` in proportion, so that no lane waits forever.

use crate::message::Headers;
use crate::protocol::header;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A job's priority: the lane of its kind it waits in.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Taken first: about 6 of every 10 takes when every lane has jobs, and the turns of empty
    /// lanes.
    High,
    /// Jobs without a priority.
    #[default]
    Normal,
    /// Taken last, but at least 1 of every 10 takes while it has jobs.
    Low,
}

impl Priority {
    /// Every level, highest first.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    /// The wire spelling (`Conveyor-Priority`).
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    /// Reads the wire spelling (case-insensitive, surrounding blanks ignored).
    pub fn parse(s: &str) -> std::result::Result<Priority, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "high" => Ok(Priority::High),
            "normal" => Ok(Priority::Normal),
            "low" => Ok(Priority::Low),
            _ => Err(format!(
                "bad header {}: {s:?} is not high, normal or low",
                header::PRIORITY
            )),
        }
    }

    /// The share of takes this lane gets first pick of (see [`Turns`]).
    fn weight(self) -> i64 {
        match self {
            Priority::High => 6,
            Priority::Normal => 3,
            Priority::Low => 1,
        }
    }

    fn index(self) -> usize {
        match self {
            Priority::High => 0,
            Priority::Normal => 1,
            Priority::Low => 2,
        }
    }

    /// The lane's suffix on a kind (`""` for `normal`).
    fn suffix(self) -> &'static str {
        match self {
            Priority::High => "~high",
            Priority::Normal => "",
            Priority::Low => "~low",
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Priority::parse(s)
    }
}

/// The priority a job's headers ask for: `normal` without `Conveyor-Priority`, an error naming
/// the header for a value that is no level.
pub fn of(headers: &Headers) -> std::result::Result<Priority, String> {
    headers
        .get(header::PRIORITY)
        .map_or(Ok(Priority::Normal), Priority::parse)
}

/// The lane of `kind` at `priority`: what follows `<ns>.jobs.` on NATS, the routing key on
/// RabbitMQ (`echo`, `echo~high`, `echo~low`).
pub fn lane(kind: &str, priority: Priority) -> String {
    format!("{kind}{}", priority.suffix())
}

/// The lane a job publish goes to: its kind's lane at the priority its headers ask for (an
/// unreadable one is `normal`: publishers check it before, workers dead-letter it after).
pub fn lane_of(kind: &str, headers: &Headers) -> String {
    lane(kind, of(headers).unwrap_or_default())
}

/// Splits a lane into its kind and priority. A name without a lane suffix is a `normal` lane.
pub fn split(lane: &str) -> (&str, Priority) {
    for p in [Priority::High, Priority::Low] {
        if let Some(kind) = lane.strip_suffix(p.suffix()) {
            return (kind, p);
        }
    }
    (lane, Priority::Normal)
}

/// A job arrived from `lane`: its kind, and its headers say the lane's priority from now on
/// (`normal`: no header), so that whatever publishes it again keeps it in its lane. A value that
/// is no level stays for the worker to dead-letter with the reason.
pub fn arrived(lane: &str, headers: &mut Headers) -> String {
    let (kind, priority) = split(lane);
    if of(headers).is_ok() {
        match priority {
            Priority::Normal => headers.remove(header::PRIORITY),
            p => headers.insert(header::PRIORITY, p.as_str()),
        }
    }
    kind.to_string()
}

/// Which lane a worker looks at first for each job it takes: smooth weighted round-robin over
/// the weights 6 (`high`), 3 (`normal`) and 1 (`low`), so that in every 10 takes `high` comes
/// first 6 times, `normal` 3 times and `low` once, spread out. A take falls through to the
/// other lanes, highest first, when the first has nothing: with only `high` and `low` waiting,
/// `low` gets 1 take in 10 and `high` the rest.
#[derive(Debug, Default, Clone)]
pub struct Turns {
    credit: [i64; 3],
}

impl Turns {
    /// The lanes in the order the next take tries them. Call [`Turns::took`] after a take.
    pub fn order(&self) -> [Priority; 3] {
        let first = self.first();
        let mut order = [first; 3];
        let mut rest = Priority::ALL.into_iter().filter(|p| *p != first);
        for slot in order.iter_mut().skip(1) {
            *slot = rest.next().unwrap_or(first);
        }
        order
    }

    /// Moves the turn on after a take (whichever lane it came from).
    pub fn took(&mut self) {
        let first = self.first();
        let total: i64 = Priority::ALL.iter().map(|p| p.weight()).sum();
        for p in Priority::ALL {
            self.credit[p.index()] += p.weight();
        }
        self.credit[first.index()] -= total;
    }

    /// The lane with the most credit once this turn's weights are added (the higher on a tie).
    fn first(&self) -> Priority {
        let mut best = Priority::High;
        for p in Priority::ALL {
            let c = self.credit[p.index()] + p.weight();
            if c > self.credit[best.index()] + best.weight() {
                best = p;
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_name_kinds_one_to_one() {
        for kind in ["echo", "wordcount.map", "a-b_c"] {
            for p in Priority::ALL {
                let l = lane(kind, p);
                assert_eq!(split(&l), (kind, p), "{l}");
                assert_eq!(p.as_str().parse::<Priority>(), Ok(p));
            }
        }
        assert_eq!(lane("echo", Priority::Normal), "echo");
        assert_eq!(lane("echo", Priority::High), "echo~high");
        for bad in lane("echo", Priority::High).split('~').skip(1) {
            assert!(crate::protocol::validate_kind(&format!("echo~{bad}")).is_err());
        }
    }

    #[test]
    fn a_level_is_read_or_refused_with_the_header_named() {
        let h = |v: &str| Headers::new().with(header::PRIORITY, v);
        assert_eq!(of(&Headers::new()), Ok(Priority::Normal));
        assert_eq!(of(&h(" HIGH ")), Ok(Priority::High));
        assert_eq!(of(&h("low")), Ok(Priority::Low));
        let err = of(&h("urgent")).expect_err("no such level");
        assert!(
            err.contains(header::PRIORITY) && err.contains("urgent"),
            "{err}"
        );
        assert_eq!(lane_of("echo", &h("urgent")), "echo");
        assert_eq!(lane_of("echo", &h("high")), "echo~high");
    }

    #[test]
    fn an_arrival_says_its_lane_and_leaves_a_bad_value_for_the_worker() {
        let mut h = Headers::new().with(header::PRIORITY, "low");
        assert_eq!(arrived("echo~high", &mut h), "echo");
        assert_eq!(h.get(header::PRIORITY), Some("high"));
        assert_eq!(arrived("echo", &mut h), "echo");
        assert_eq!(h.get(header::PRIORITY), None);
        let mut bad = Headers::new().with(header::PRIORITY, "urgent");
        assert_eq!(arrived("a.b~low", &mut bad), "a.b");
        assert_eq!(bad.get(header::PRIORITY), Some("urgent"));
    }

    #[test]
    fn turns_give_each_lane_its_weight_spread_out() {
        let mut turns = Turns::default();
        let mut firsts = Vec::new();
        for _ in 0..100 {
            let order = turns.order();
            let mut sorted = order;
            sorted.sort();
            assert_eq!(sorted, Priority::ALL, "every lane once: {order:?}");
            // After the first, the others highest first.
            assert!(order[1] < order[2], "{order:?}");
            firsts.push(order[0]);
            turns.took();
        }
        let count = |p| firsts.iter().filter(|f| **f == p).count();
        assert_eq!(
            (
                count(Priority::High),
                count(Priority::Normal),
                count(Priority::Low)
            ),
            (60, 30, 10)
        );
        // Spread: `high` never waits more than two takes for its turn.
        let longest_gap = firsts
            .split(|p| *p == Priority::High)
            .map(<[Priority]>::len)
            .max();
        assert!(longest_gap <= Some(2), "{firsts:?}");
    }
}
