//! The any-client wire contract: names of subjects, exchanges, queues, streams and headers.
//!
//! Everything a client in another language needs is here; the README documents the same.

use crate::error::{Error, Result};
use std::fmt;

/// Header names Conveyor reads and writes.
pub mod header {
    /// Job id (also AMQP `message_id`, NATS `Nats-Msg-Id`).
    pub const ID: &str = "Conveyor-Id";
    /// Job kind (set on results and dead letters).
    pub const KIND: &str = "Conveyor-Kind";
    /// How many attempts a job gets before it is dead-lettered.
    pub const MAX_ATTEMPTS: &str = "Conveyor-Max-Attempts";
    /// Per-job deadline in milliseconds.
    pub const TIMEOUT_MS: &str = "Conveyor-Timeout-Ms";
    /// Where the final result is also sent (also AMQP `reply_to`).
    pub const REPLY_TO: &str = "Conveyor-Reply-To";
    /// Correlation id echoed on replies (also AMQP `correlation_id`).
    pub const CORRELATION_ID: &str = "Conveyor-Correlation-Id";
    /// Group id.
    pub const GROUP: &str = "Conveyor-Group";
    /// Number of jobs in the group.
    pub const GROUP_SIZE: &str = "Conveyor-Group-Size";
    /// Position in the group.
    pub const GROUP_INDEX: &str = "Conveyor-Group-Index";
    /// Group failure policy: `continue` (default) or `fail-fast`.
    pub const GROUP_POLICY: &str = "Conveyor-Group-Policy";
    /// On group members: the kind of the chord callback the aggregator publishes once every
    /// member is done.
    pub const CHORD_KIND: &str = "Conveyor-Chord-Kind";
    /// On group members: where the chord callback's result is also sent.
    pub const CHORD_REPLY_TO: &str = "Conveyor-Chord-Reply-To";
    /// Chain id.
    pub const CHAIN: &str = "Conveyor-Chain";
    /// Position of this step in its chain, from 0.
    pub const CHAIN_STEP: &str = "Conveyor-Chain-Step";
    /// Number of steps in the chain.
    pub const CHAIN_LENGTH: &str = "Conveyor-Chain-Length";
    /// On chain steps: the kinds of the steps still to come, comma-separated.
    pub const CHAIN_REST: &str = "Conveyor-Chain-Rest";
    /// Singleflight key.
    pub const DEDUP_KEY: &str = "Conveyor-Dedup-Key";
    /// Result status.
    pub const STATUS: &str = "Conveyor-Status";
    /// Error text of a result that did not succeed.
    pub const ERROR: &str = "Conveyor-Error";
    /// On a result: the attempt that produced it. On a job: the attempt its first delivery is.
    pub const ATTEMPT: &str = "Conveyor-Attempt";
    /// Worker that produced a result.
    pub const WORKER: &str = "Conveyor-Worker";
    /// Body encoding.
    pub const CONTENT_TYPE: &str = "Content-Type";
    /// AMQP: the delay a retry waits, in milliseconds; the `<ns>.retry` headers exchange routes
    /// on it to the delay queue of that length.
    pub const RETRY_DELAY_MS: &str = "Conveyor-Retry-Delay-Ms";
    /// NATS JetStream de-duplication id.
    pub const NATS_MSG_ID: &str = "Nats-Msg-Id";
    /// Not to start before this time: RFC 3339 (`2026-12-01T10:00:00Z`) or milliseconds since
    /// the Unix epoch. Until then the job waits in the broker.
    pub const NOT_BEFORE: &str = "Conveyor-Not-Before";
    /// Not to start for this many milliseconds, counted from when a worker first takes the job
    /// (a client that knows the time sends `Conveyor-Not-Before` instead, as Conveyor's does).
    pub const DELAY_MS: &str = "Conveyor-Delay-Ms";
    /// Set on a delayed job when it is moved back to its kind at its time (JetStream): it runs
    /// now, whatever the clock of the worker that takes it says.
    pub const RELEASED: &str = "Conveyor-Released";
    /// On a job a scheduler published: the schedule's name.
    pub const SCHEDULE: &str = "Conveyor-Schedule";
    /// On a job a scheduler published: its tick's time, in milliseconds since the Unix epoch.
    pub const TICK: &str = "Conveyor-Tick";
    /// On a job a scheduler published: which copy of the tick it is (the publishing leader's
    /// token). Where the broker keeps no publish ids (RabbitMQ), a worker runs only the copy
    /// that claims the tick first (see [`crate::schedule::runs`]).
    pub const TICK_COPY: &str = "Conveyor-Tick-Copy";
    /// `high`, `normal` (the default) or `low`: the lane of its kind a job waits in (see
    /// [`crate::priority`]). Conveyor's publishers route by it; on a delivered job it says the
    /// lane the job came from.
    pub const PRIORITY: &str = "Conveyor-Priority";
}

/// Final state of a job, as carried in `Conveyor-Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    /// The handler returned an output.
    Succeeded,
    /// The handler failed and the job will not be retried (reported, not dead-lettered).
    Failed,
    /// The job was dead-lettered (permanent error or attempts exhausted).
    Dead,
    /// The job was cancelled.
    Cancelled,
    /// The job's deadline passed.
    TimedOut,
}

impl Status {
    /// Wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Dead => "dead",
            Status::Cancelled => "cancelled",
            Status::TimedOut => "timed-out",
        }
    }

    /// Parses the wire spelling.
    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "succeeded" => Status::Succeeded,
            "failed" => Status::Failed,
            "dead" => Status::Dead,
            "cancelled" => Status::Cancelled,
            "timed-out" => Status::TimedOut,
            _ => return None,
        })
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Checks a job kind: words of letters, digits, `-` and `_`, separated by single dots.
pub fn validate_kind(kind: &str) -> Result<()> {
    let ok = !kind.is_empty()
        && kind.len() <= 128
        && kind.split('.').all(|w| {
            !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "invalid job kind {kind:?}: use letters, digits, '-' and '_', with dots between words"
        )))
    }
}

/// The token bucket of a kind's global rate, or of one value of its rate key (`--rate-key`):
/// `<kind>` or `<kind>~<hash of the value>` (`~` appears in no kind).
pub fn rate_bucket(kind: &str, key: Option<&str>) -> String {
    use sha2::{Digest, Sha256};
    match key {
        None => kind.to_string(),
        Some(key) => format!(
            "{kind}~{}",
            hex::encode(&Sha256::digest(key.as_bytes())[..16])
        ),
    }
}

/// True for the bucket of one value of a rate key (a name that ends in `~` and 32 hex digits;
/// a priority lane's `~high` or `~low` is not one): the broker removes its queues and consumers
/// once they go unused for a while.
pub fn is_keyed_bucket(bucket: &str) -> bool {
    bucket
        .rsplit_once('~')
        .is_some_and(|(_, hash)| is_bucket_hash(hash))
}

fn is_bucket_hash(hash: &str) -> bool {
    hash.len() == 32 && hash.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Checks a token bucket's name (see [`rate_bucket`]).
pub fn validate_bucket(bucket: &str) -> Result<()> {
    match bucket.split_once('~') {
        None => validate_kind(bucket),
        Some((kind, hash)) => {
            validate_kind(kind)?;
            if is_bucket_hash(hash) {
                Ok(())
            } else {
                Err(Error::Config(format!("invalid rate bucket {bucket:?}")))
            }
        }
    }
}

/// Checks that a job's NATS reply address `to` is a reply address: a plain subject (no
/// wildcard, no white space or control character, at most 255 bytes) that begins with
/// `reply_prefix` (the clients' inbox prefix, `_INBOX.` by default) and is neither the
/// namespace's own (`<namespace>.>`) nor a system subject (anything that begins with `$`:
/// `$JS.>`, `$SYS.>`, `$KV.>`, `$O.>`). A worker publishes a result there with its own
/// credentials, so anything else would let whoever publishes a job speak for the worker.
pub fn check_nats_reply(
    namespace: &str,
    reply_prefix: &str,
    to: &str,
) -> std::result::Result<(), String> {
    if to.len() > 255 {
        return Err(format!("reply address of {} bytes is too long", to.len()));
    }
    if to.is_empty()
        || !to.bytes().all(|b| b.is_ascii_graphic())
        || to.split('.').any(|t| t.is_empty() || t == "*" || t == ">")
    {
        return Err(format!("reply address {to:?} is not a plain NATS subject"));
    }
    if to.starts_with('$') {
        return Err(format!("reply address {to:?} is a system subject"));
    }
    if to == namespace || to.starts_with(&format!("{namespace}.")) {
        return Err(format!(
            "reply address {to:?} is inside the namespace {namespace:?}"
        ));
    }
    if !to.starts_with(reply_prefix) {
        return Err(format!(
            "reply address {to:?} does not begin with the reply prefix {reply_prefix:?}"
        ));
    }
    Ok(())
}

/// How long the broker keeps cancel requests for workers that start later (and how long a
/// worker remembers one).
pub const CONTROL_RETENTION: std::time::Duration = std::time::Duration::from_secs(3600);

/// Checks a tee name: one word of letters, digits, `-` and `_`.
pub fn validate_tee_name(name: &str) -> Result<()> {
    validate_namespace(name).map_err(|_| {
        Error::Config(format!(
            "invalid tee name {name:?}: use letters, digits, '-' and '_'"
        ))
    })
}

/// The JetStream consumer of tee `name` of `kind`.
pub fn tee_consumer_name(name: &str, kind: &str) -> String {
    format!("tee={name}={}", kind.replace('.', "="))
}

/// One word of 1 to 64 letters, digits, `-` and `_` (a namespace, a schedule's name).
pub(crate) fn is_word(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Checks a namespace: one word of letters, digits, `-` and `_`.
pub fn validate_namespace(ns: &str) -> Result<()> {
    if is_word(ns) {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "invalid namespace {ns:?}: use letters, digits, '-' and '_'"
        )))
    }
}

/// The names one namespace uses on both brokers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    ns: String,
}

impl Names {
    /// Names for namespace `ns` (validated).
    pub fn new(ns: &str) -> Result<Self> {
        validate_namespace(ns)?;
        Ok(Names { ns: ns.to_string() })
    }

    /// The namespace itself.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// `<ns>.delayed.<kind>`: NATS subject of a kind's jobs waiting for their time.
    pub fn delayed_subject(&self, kind: &str) -> String {
        format!("{}.delayed.{kind}", self.ns)
    }
    /// `<ns>.jobs.<kind>`: NATS subject of a kind's jobs.
    pub fn job_subject(&self, kind: &str) -> String {
        format!("{}.jobs.{kind}", self.ns)
    }
    /// `<ns>.results.<kind>`.
    pub fn result_subject(&self, kind: &str) -> String {
        format!("{}.results.{kind}", self.ns)
    }
    /// `<ns>.dead.<kind>`.
    pub fn dead_subject(&self, kind: &str) -> String {
        format!("{}.dead.{kind}", self.ns)
    }
    /// `<ns>.events.<kind>.<state>`.
    pub fn event_subject(&self, kind: &str, state: &str) -> String {
        format!("{}.events.{kind}.{state}", self.ns)
    }
    /// `<ns>.control.cancel`.
    pub fn cancel_subject(&self) -> String {
        format!("{}.control.cancel", self.ns)
    }
    /// `<ns>.tee.<kind>`: NATS subject where the jobs stream republishes each stored job once a
    /// tee exists.
    pub fn tee_subject(&self, kind: &str) -> String {
        format!("{}.tee.{kind}", self.ns)
    }
    /// AMQP queue of tee `name` of `kind`: `<ns>.tee.<name>.<kind>`.
    pub fn tee_queue(&self, name: &str, kind: &str) -> String {
        format!("{}.tee.{name}.{kind}", self.ns)
    }
    /// Stream name for a class of subjects: `CONVEYOR_JOBS` for namespace `conveyor`.
    pub fn stream(&self, class: &str) -> String {
        let ns: String = self
            .ns
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        format!("{ns}_{}", class.to_ascii_uppercase())
    }
    /// AMQP exchange for a class (`jobs`, `results`, `dead`, `events`, `control`, `replies`,
    /// `retry`): `<ns>.<class>`.
    pub fn exchange(&self, class: &str) -> String {
        format!("{}.{class}", self.ns)
    }
    /// AMQP queue that holds one kind's jobs.
    pub fn job_queue(&self, kind: &str) -> String {
        format!("{}.jobs.{kind}", self.ns)
    }
    /// AMQP alternate exchange and queue for jobs whose kind has no queue yet.
    pub fn unrouted(&self) -> String {
        format!("{}.jobs-unrouted", self.ns)
    }
    /// AMQP queue the aggregator consumes results from.
    pub fn results_queue(&self) -> String {
        format!("{}.results", self.ns)
    }
    /// NATS subject of permit `i` of `kind`'s cluster-wide concurrency cap.
    pub fn permit_subject(&self, kind: &str, i: u32) -> String {
        format!("{}.permits.{kind}.{i}", self.ns)
    }
    /// NATS subject and AMQP queue of `kind`'s global rate tokens.
    pub fn token_subject(&self, kind: &str) -> String {
        format!("{}.tokens.{kind}", self.ns)
    }
    /// AMQP queue of `kind`'s cluster-wide concurrency permits.
    pub fn permit_queue(&self, kind: &str) -> String {
        format!("{}.permits.{kind}", self.ns)
    }
    /// AMQP stream queue that keeps the cancel requests of the last hour.
    pub fn control_log(&self) -> String {
        format!("{}.control.log", self.ns)
    }
    /// AMQP queue that keeps dead letters.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.ns)
    }
    /// AMQP delay queue for retries after `delay_ms` (shared by all kinds: a waiting job keeps
    /// its kind as routing key, under which it dead-letters back into `<ns>.jobs`).
    pub fn retry_queue(&self, delay_ms: u64) -> String {
        format!("{}.retry.{delay_ms}ms", self.ns)
    }
}

/// The delays, in milliseconds, that AMQP retries wait for: powers of two from 64 ms to about
/// 25 days, one delay queue each (`broker-config/definitions.json` declares them all).
pub fn retry_delays_ms() -> impl Iterator<Item = u64> {
    (6..=31).map(|p| 1u64 << p)
}

/// The retry delay a wait of `delay` is served by: the next power of two within
/// [`retry_delays_ms`].
pub fn retry_delay_ms(delay: std::time::Duration) -> u64 {
    let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
    ms.clamp(1 << 6, 1 << 31).next_power_of_two()
}

/// The furthest ahead a job may be delayed: a later `Conveyor-Not-Before` is a mistake.
pub const MAX_DELAY: std::time::Duration = std::time::Duration::from_secs(366 * 86_400);

/// The longest a waiting job stays in the broker before a worker sees it again (and finds it
/// cancelled, if it was): shorter than [`CONTROL_RETENTION`], for which cancels are remembered.
pub const PARK_HOP_MAX: std::time::Duration = std::time::Duration::from_millis(1 << 20);

/// Reads `Conveyor-Not-Before`: RFC 3339, or milliseconds since the Unix epoch. Returns
/// milliseconds since the epoch.
pub fn parse_not_before(value: &str) -> std::result::Result<u64, String> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return v
            .parse::<u64>()
            .map_err(|_| format!("{v:?} is too large a number of milliseconds"));
    }
    let bad = |why: String| format!("{v:?} is neither RFC 3339 nor epoch milliseconds ({why})");
    // humantime reads UTC times; an offset (`+02:00`) is applied here.
    let split = |i: usize| Some((v.get(..i)?, v.get(i..)?));
    let (utc, offset_s) = match v.len().checked_sub(6).and_then(split) {
        Some((time, off))
            if (off.starts_with('+') || off.starts_with('-')) && off.get(3..4) == Some(":") =>
        {
            let num = |s: Option<&str>| {
                s.and_then(|s| s.parse::<u8>().ok())
                    .map(i64::from)
                    .ok_or_else(|| bad(format!("bad offset {off:?}")))
            };
            let secs = num(off.get(1..3))? * 3600 + num(off.get(4..6))? * 60;
            (time, if off.starts_with('-') { -secs } else { secs })
        }
        _ => (v, 0),
    };
    let t = humantime::parse_rfc3339_weak(utc).map_err(|e| bad(e.to_string()))?;
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .map_err(|_| format!("{v:?} is before 1970"))?;
    u64::try_from(ms.saturating_sub(offset_s * 1000)).map_err(|_| format!("{v:?} is before 1970"))
}

/// AMQP: the delay queue a job due in `remaining_ms` waits in next: the longest of
/// [`retry_delays_ms`] that does not pass its time, at most [`PARK_HOP_MAX`] (at least the
/// shortest). A job comes back from each hop and waits again until it is due.
pub fn park_hop_ms(remaining_ms: u64) -> u64 {
    let max = PARK_HOP_MAX.as_millis() as u64;
    let ms = remaining_ms.clamp(1 << 6, max);
    1u64 << (63 - ms.leading_zeros())
}

/// A JetStream consumer name for a kind's shared worker consumer (no dots allowed there).
pub fn consumer_name_for_kind(kind: &str) -> String {
    // '.' is not allowed in consumer names; '=' is not allowed in kinds, so this is one-to-one.
    format!("workers={}", kind.replace('.', "="))
}

#[cfg(test)]
mod tests {
    #[test]
    fn not_before_reads_rfc3339_and_epoch_milliseconds() {
        assert_eq!(
            super::parse_not_before("1700000000000"),
            Ok(1_700_000_000_000)
        );
        assert_eq!(
            super::parse_not_before("2023-11-14T22:13:20Z"),
            Ok(1_700_000_000_000)
        );
        assert_eq!(
            super::parse_not_before("2023-11-14T22:13:20.5Z"),
            Ok(1_700_000_000_500)
        );
        assert_eq!(
            super::parse_not_before("2023-11-15T00:13:20+02:00"),
            Ok(1_700_000_000_000)
        );
        assert_eq!(
            super::parse_not_before("2023-11-14T21:13:20-01:00"),
            Ok(1_700_000_000_000)
        );
        for bad in [
            "",
            "soon",
            "-5",
            "2023-13-40T00:00:00Z",
            "99999999999999999999999",
            "2023-11-14T22:13:20+0x:00",
            "2023-11-14T22:13:20+é:00",
            "2023-11-14T22:13:2é:00",
            "+é:0é",
        ] {
            assert!(super::parse_not_before(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_park_hop_never_passes_the_due_time_and_is_bounded() {
        assert_eq!(super::park_hop_ms(10), 64);
        assert_eq!(super::park_hop_ms(64), 64);
        assert_eq!(super::park_hop_ms(1000), 512);
        assert_eq!(super::park_hop_ms(1024), 1024);
        assert_eq!(super::park_hop_ms(30 * 86_400_000), 1 << 20);
        for ms in [65u64, 999, 5_000, 123_456, 1_048_575] {
            let hop = super::park_hop_ms(ms);
            assert!(hop <= ms && hop * 2 > ms, "{ms}: {hop}");
            assert!(
                super::retry_delays_ms().any(|d| d == hop),
                "{hop} has a queue"
            );
        }
    }

    #[test]
    fn a_rate_keys_value_has_a_bucket_no_kind_can_name() {
        let b = rate_bucket("fetch", Some("acme"));
        assert!(
            b.starts_with("fetch~") && b.len() == "fetch~".len() + 32,
            "{b}"
        );
        assert_eq!(b, rate_bucket("fetch", Some("acme")));
        assert_ne!(b, rate_bucket("fetch", Some("globex")));
        assert_eq!(rate_bucket("fetch", None), "fetch");
        assert!(is_keyed_bucket(&b) && !is_keyed_bucket("fetch"));
        assert!(!is_keyed_bucket("workers=fetch~high") && !is_keyed_bucket("c.jobs.fetch~low"));
        assert!(validate_bucket(&b).is_ok() && validate_bucket("fetch").is_ok());
        assert!(validate_kind(&b).is_err(), "no kind is a keyed bucket");
        assert!(validate_bucket("fetch~nothex").is_err());
        assert!(validate_bucket("bad kind~00").is_err());
    }

    use super::*;

    #[test]
    fn replies_go_only_to_the_reply_space() {
        let ok = |to: &str| check_nats_reply("conveyor", "_INBOX.", to);
        assert!(ok("_INBOX.abc.1").is_ok());
        for bad in [
            "$JS.API.STREAM.DELETE.CONVEYOR_DEAD",
            "$SYS.REQ.SERVER.PING",
            "$KV.x.y",
            "conveyor.permits.sleep.9",
            "conveyor.flights.k",
            "conveyor.heartbeats.w",
            "conveyor",
            "_INBOX.*",
            "_INBOX.>",
            "_INBOX..a",
            "_INBOX.a b",
            "elsewhere.inbox",
            "",
        ] {
            assert!(ok(bad).is_err(), "{bad:?} was let through");
        }
        assert!(ok(&format!("_INBOX.{}", "a".repeat(300))).is_err());
        assert!(check_nats_reply("conveyor", "_INBOX_conveyor.", "_INBOX_conveyor.x").is_ok());
        assert!(check_nats_reply("conveyor", "_INBOX_conveyor.", "_INBOX.x").is_err());
    }

    #[test]
    fn retry_delays_round_up_within_range() {
        use std::time::Duration;
        assert_eq!(retry_delay_ms(Duration::ZERO), 64);
        assert_eq!(retry_delay_ms(Duration::from_millis(200)), 256);
        assert_eq!(retry_delay_ms(Duration::from_millis(256)), 256);
        assert_eq!(retry_delay_ms(Duration::from_secs(86_400 * 365)), 1 << 31);
        let all: Vec<u64> = retry_delays_ms().collect();
        assert_eq!(all.len(), 26);
        assert!(all.contains(&retry_delay_ms(Duration::from_millis(5_000))));
    }

    #[test]
    fn kinds() {
        for ok in ["echo", "wordcount.map", "a-b_c.d1"] {
            assert!(validate_kind(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a..b", ".a", "a.", "a b", "a*", "a>", "ä"] {
            assert!(validate_kind(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_follow_namespace() {
        let n = Names::new("conveyor").expect("valid");
        assert_eq!(n.stream("jobs"), "CONVEYOR_JOBS");
        assert_eq!(n.job_subject("echo"), "conveyor.jobs.echo");
        assert_eq!(n.exchange("results"), "conveyor.results");
        assert_eq!(Names::new("t-1").expect("valid").stream("dead"), "T_1_DEAD");
        assert!(Names::new("a.b").is_err());
        assert_eq!(
            consumer_name_for_kind("wordcount.map"),
            "workers=wordcount=map"
        );
    }

    #[test]
    fn statuses_round_trip() {
        for s in [
            Status::Succeeded,
            Status::Failed,
            Status::Dead,
            Status::Cancelled,
            Status::TimedOut,
        ] {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        assert_eq!(Status::parse("nope"), None);
    }
}
