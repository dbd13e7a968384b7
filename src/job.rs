//! Jobs: what a producer publishes ([`JobSpec`]), what a worker reads from a delivery
//! ([`JobMeta`]), and how a handler fails ([`JobError`]).

use crate::codec::Codec;
use crate::error::{Error, Result};
use crate::message::{header_safe, Headers, Message};
use crate::protocol::{header, validate_kind};
use serde_json::Value;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Attempts a job gets when it does not say (`Conveyor-Max-Attempts`).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// The most attempts a job may ask for.
pub const MAX_MAX_ATTEMPTS: u32 = 1000;
/// The most steps a chain may have: `Conveyor-Chain-Step` and `-Length` above it are refused.
pub const MAX_CHAIN_STEPS: u32 = 100_000;

/// A new job id: a UUID v7 (time-ordered, unique across processes).
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A job to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    /// Kind, e.g. `echo`.
    pub kind: String,
    /// Input (encoded with `codec`).
    pub input: Value,
    /// Job id; a new one is made when `None`.
    pub id: Option<String>,
    /// Body encoding.
    pub codec: Codec,
    /// Attempts before dead-lettering.
    pub max_attempts: Option<u32>,
    /// Deadline per attempt.
    pub timeout_ms: Option<u64>,
    /// Where the final result is also sent.
    pub reply_to: Option<String>,
    /// Echoed on the reply.
    pub correlation_id: Option<String>,
    /// Extra headers (group, dedup key, ...).
    pub headers: Headers,
}

impl JobSpec {
    /// A job of `kind` with `input`, JSON-encoded, default attempts.
    pub fn new(kind: impl Into<String>, input: Value) -> Self {
        JobSpec {
            kind: kind.into(),
            input,
            id: None,
            codec: Codec::Json,
            max_attempts: None,
            timeout_ms: None,
            reply_to: None,
            correlation_id: None,
            headers: Headers::new(),
        }
    }

    /// Sets the job id.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets the codec.
    pub fn codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// Sets max attempts.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }

    /// Sets the per-attempt deadline.
    pub fn timeout_ms(mut self, ms: u64) -> Self {
        self.timeout_ms = Some(ms);
        self
    }

    /// Sets `Conveyor-Dedup-Key`: jobs with one key in flight at the same time run once across
    /// the cluster, each ending with that outcome (singleflight).
    pub fn dedup_key(mut self, key: impl Into<String>) -> Self {
        self.headers
            .insert(crate::protocol::header::DEDUP_KEY, key.into());
        self
    }

    /// Not to start for `delay` from now: sets `Conveyor-Not-Before`. The job waits in the
    /// broker, holding no worker slot and spending no attempt.
    pub fn delay(self, delay: Duration) -> Self {
        // Past what a clock holds: a time no worker accepts (dead-lettered as too far ahead).
        let at = std::time::SystemTime::now()
            .checked_add(delay)
            .unwrap_or(std::time::UNIX_EPOCH + Duration::from_millis(u64::MAX));
        self.not_before(at)
    }

    /// Not to start before `at`: sets `Conveyor-Not-Before` (epoch milliseconds).
    pub fn not_before(mut self, at: std::time::SystemTime) -> Self {
        let ms = at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.headers.insert(header::NOT_BEFORE, ms.to_string());
        self
    }

    /// Sets `Conveyor-Priority`: the lane of its kind the job waits in (see [`crate::priority`]).
    /// A worker takes `high` jobs before `normal` and `low` ones, in a weighted share. A `normal`
    /// job carries no header, as one delivered from the normal lane does.
    pub fn priority(mut self, priority: crate::priority::Priority) -> Self {
        match priority {
            crate::priority::Priority::Normal => self.headers.remove(header::PRIORITY),
            p => self.headers.insert(header::PRIORITY, p.as_str()),
        }
        self
    }

    /// Sets the reply address (from [`crate::Client::reply_inbox`]).
    pub fn reply_to(mut self, to: impl Into<String>) -> Self {
        self.reply_to = Some(to.into());
        self
    }

    /// Encodes the job as a broker message. Returns its id (made here when missing) too.
    pub fn to_message(&self) -> Result<(String, Message)> {
        validate_kind(&self.kind)?;
        let id = self.id.clone().unwrap_or_else(new_id);
        if id.is_empty() || id.len() > 256 {
            return Err(Error::Config(format!(
                "job id must be 1 to 256 characters, got {}",
                id.len()
            )));
        }
        crate::priority::of(&self.headers).map_err(Error::Config)?;
        let body = self.codec.encode(&self.input)?;
        let mut h = self.headers.clone();
        h.insert(header::ID, header_safe(&id));
        if self.codec != Codec::Json {
            h.insert(header::CONTENT_TYPE, self.codec.content_type());
        }
        if let Some(n) = self.max_attempts {
            h.insert(header::MAX_ATTEMPTS, n.to_string());
        }
        if let Some(ms) = self.timeout_ms {
            h.insert(header::TIMEOUT_MS, ms.to_string());
        }
        if let Some(r) = &self.reply_to {
            h.insert(header::REPLY_TO, r.clone());
        }
        if let Some(c) = &self.correlation_id {
            h.insert(header::CORRELATION_ID, c.clone());
        }
        Ok((id, Message::new(h, body)))
    }
}

/// The job id a message carries: `Conveyor-Id`, else `Nats-Msg-Id`, made safe for headers.
pub fn id_of(h: &Headers) -> Option<String> {
    h.get(header::ID)
        .or_else(|| h.get(header::NATS_MSG_ID))
        .map(header_safe)
        .filter(|s| !s.is_empty())
}

/// When a job may start, from `Conveyor-Not-Before` or else `Conveyor-Delay-Ms` (counted from
/// now), in milliseconds since the epoch; an error names the header. At most
/// [`crate::protocol::MAX_DELAY`] ahead.
pub fn not_before_of(h: &Headers) -> std::result::Result<Option<u64>, String> {
    let max = u64::try_from(crate::protocol::MAX_DELAY.as_millis()).unwrap_or(u64::MAX);
    let (name, at) = match (
        h.get(header::NOT_BEFORE),
        num_header::<u64>(h, header::DELAY_MS)?,
    ) {
        (Some(v), _) => (
            header::NOT_BEFORE,
            crate::protocol::parse_not_before(v)
                .map_err(|e| format!("bad header {}: {e}", header::NOT_BEFORE))?,
        ),
        (None, Some(ms)) if ms > max => {
            return Err(format!(
                "bad header {}: {ms} ms is more than {max} ms (366 days) ahead",
                header::DELAY_MS
            ))
        }
        (None, Some(ms)) => (header::DELAY_MS, now_ms().saturating_add(ms)),
        (None, None) => return Ok(None),
    };
    if at > now_ms().saturating_add(max) {
        return Err(format!("bad header {name}: more than 366 days ahead"));
    }
    Ok(Some(at))
}

/// What a worker knows about a delivered job, read from its headers.
#[derive(Debug, Clone, PartialEq)]
pub struct JobMeta {
    /// Job id (made from the broker's message id when the publisher set none).
    pub id: String,
    /// Kind, from the subject or routing key.
    pub kind: String,
    /// Which attempt this delivery is, from 1.
    pub attempt: u32,
    /// Attempts before dead-lettering.
    pub max_attempts: u32,
    /// Deadline per attempt.
    pub timeout: Option<Duration>,
    /// Reply address.
    pub reply_to: Option<String>,
    /// Correlation id to echo.
    pub correlation_id: Option<String>,
    /// Body codec.
    pub codec: Codec,
    /// Workflow headers (group, chord, chain) to copy onto the result.
    pub group: Vec<(String, String)>,
    /// Kinds of the chain steps after this one.
    pub chain_rest: Vec<String>,
    /// `Conveyor-Dedup-Key`: jobs with the same key in flight together run once.
    pub dedup_key: Option<String>,
    /// Not to start before this time (milliseconds since the epoch): `Conveyor-Not-Before`, or
    /// `Conveyor-Delay-Ms` counted from now.
    pub not_before: Option<u64>,
}

/// Headers a worker copies from a job onto its result, so that the aggregator and waiters can
/// place it in its group, chord or chain.
pub const WORKFLOW_HEADERS: [&str; 9] = [
    header::GROUP,
    header::GROUP_SIZE,
    header::GROUP_INDEX,
    header::GROUP_POLICY,
    header::CHORD_KIND,
    header::CHORD_REPLY_TO,
    header::CHAIN,
    header::CHAIN_STEP,
    header::CHAIN_LENGTH,
];

/// Reads a number header; a bad value is an error that names the header.
fn num_header<T: std::str::FromStr>(
    h: &Headers,
    name: &str,
) -> std::result::Result<Option<T>, String> {
    match h.get(name) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse::<T>()
            .map(Some)
            .map_err(|_| format!("bad header {name}: {v:?} is not a valid number")),
    }
}

impl JobMeta {
    /// Reads the metadata of a job of `kind` delivered for the `delivery`-th time (from 1).
    /// `fallback_id` names the job when it carries no id. An error is the reason to dead-letter it.
    pub fn from_message(
        kind: &str,
        msg: &Message,
        delivery: u32,
        fallback_id: impl FnOnce() -> String,
    ) -> std::result::Result<JobMeta, String> {
        let h = &msg.headers;
        let id = id_of(h).unwrap_or_else(fallback_id);
        let codec =
            Codec::from_content_type(h.get(header::CONTENT_TYPE)).map_err(|e| e.to_string())?;
        let first: u32 = num_header(h, header::ATTEMPT)?.unwrap_or(1).max(1);
        let max_attempts: u32 =
            num_header(h, header::MAX_ATTEMPTS)?.unwrap_or(DEFAULT_MAX_ATTEMPTS);
        if max_attempts == 0 || max_attempts > MAX_MAX_ATTEMPTS {
            return Err(format!(
                "bad header {}: {max_attempts} is outside 1..={MAX_MAX_ATTEMPTS}",
                header::MAX_ATTEMPTS
            ));
        }
        let timeout = num_header::<u64>(h, header::TIMEOUT_MS)?.map(Duration::from_millis);
        if timeout == Some(Duration::ZERO) {
            return Err(format!(
                "bad header {}: must be above 0",
                header::TIMEOUT_MS
            ));
        }
        let group_size: Option<u32> = num_header(h, header::GROUP_SIZE)?;
        let _: Option<u32> = num_header(h, header::GROUP_INDEX)?;
        if group_size == Some(0) {
            return Err(format!(
                "bad header {}: must be above 0",
                header::GROUP_SIZE
            ));
        }
        for name in [header::CHAIN_STEP, header::CHAIN_LENGTH] {
            if let Some(n) = num_header::<u32>(h, name)?.filter(|n| *n >= MAX_CHAIN_STEPS) {
                return Err(format!(
                    "bad header {name}: {n} is not below {MAX_CHAIN_STEPS}, the most steps a chain may have"
                ));
            }
        }
        if let Some(p) = h.get(header::GROUP_POLICY) {
            crate::workflow::Policy::parse(p)?;
        }
        if let Some(k) = h.get(header::CHORD_KIND) {
            validate_kind(k).map_err(|e| format!("bad header {}: {e}", header::CHORD_KIND))?;
        }
        let chain_rest = match h.get(header::CHAIN_REST).map(str::trim) {
            None | Some("") => Vec::new(),
            Some(rest) => rest
                .split(',')
                .map(|k| {
                    let k = k.trim();
                    validate_kind(k)
                        .map(|()| k.to_string())
                        .map_err(|e| format!("bad header {}: {e}", header::CHAIN_REST))
                })
                .collect::<std::result::Result<Vec<_>, _>>()?,
        };
        let not_before = not_before_of(h)?;
        crate::priority::of(h)?;
        let mut group: Vec<(String, String)> = WORKFLOW_HEADERS
            .iter()
            .filter_map(|n| h.get(n).map(|v| (n.to_string(), v.to_string())))
            .collect();
        if !chain_rest.is_empty() && h.get(header::CHAIN).is_none() {
            // A chain started by a client that named no chain: the first step's id names it.
            group.push((header::CHAIN.to_string(), id.clone()));
        }
        Ok(JobMeta {
            id,
            kind: kind.to_string(),
            attempt: first.saturating_add(delivery.max(1) - 1),
            max_attempts,
            timeout,
            reply_to: h
                .get(header::REPLY_TO)
                .map(str::to_string)
                .filter(|s| !s.is_empty()),
            correlation_id: h.get(header::CORRELATION_ID).map(str::to_string),
            codec,
            group,
            chain_rest,
            dedup_key: dedup_key_of(h).map(str::to_string),
            not_before,
        })
    }

    /// When the job is not due yet: its time, in milliseconds since the epoch.
    pub fn due_later(&self) -> Option<u64> {
        self.not_before.filter(|t| *t > now_ms())
    }

    /// The value of a workflow header this job carries.
    pub fn workflow(&self, name: &str) -> Option<&str> {
        self.group
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// How a handler failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobError {
    /// Worth another attempt (after `after`, or the worker's backoff).
    #[error("{message}")]
    Retry {
        /// What went wrong.
        message: String,
        /// Wait at least this long before the next attempt.
        after: Option<Duration>,
    },
    /// Will fail the same way every time: dead-letter at once.
    #[error("{0}")]
    Permanent(String),
    /// The job's deadline passed.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The job was cancelled (what a handler returns when its token fires).
    #[error("cancelled")]
    Cancelled,
    /// A cancel request named the job (its id, group or chain), before it ran or while it ran;
    /// the text says which, and why.
    #[error("{0}")]
    CancelRequested(String),
}

impl JobError {
    /// A retryable error.
    pub fn retry(message: impl Into<String>) -> Self {
        JobError::Retry {
            message: message.into(),
            after: None,
        }
    }

    /// A permanent error.
    pub fn permanent(message: impl Into<String>) -> Self {
        JobError::Permanent(message.into())
    }

    /// True for errors another attempt may fix.
    pub fn is_retryable(&self) -> bool {
        matches!(self, JobError::Retry { .. } | JobError::Timeout(_))
    }
}

/// The singleflight key a job's headers carry (`Conveyor-Dedup-Key`; an empty one is none).
pub fn dedup_key_of(h: &Headers) -> Option<&str> {
    h.get(header::DEDUP_KEY).filter(|k| !k.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn meta(h: Headers, delivery: u32) -> std::result::Result<JobMeta, String> {
        JobMeta::from_message("echo", &Message::new(h, "{}"), delivery, || "gen".into())
    }

    #[test]
    fn spec_round_trips_through_headers() {
        let spec = JobSpec::new("echo", json!({"x": 1}))
            .id("j1")
            .max_attempts(3)
            .timeout_ms(250)
            .codec(Codec::Bincode)
            .reply_to("inbox.1");
        let (id, msg) = spec.to_message().expect("encodes");
        assert_eq!(id, "j1");
        let m = JobMeta::from_message("echo", &msg, 2, || "x".into()).expect("parses");
        assert_eq!(m.id, "j1");
        assert_eq!(m.attempt, 2);
        assert_eq!(m.max_attempts, 3);
        assert_eq!(m.timeout, Some(Duration::from_millis(250)));
        assert_eq!(m.codec, Codec::Bincode);
        assert_eq!(m.reply_to.as_deref(), Some("inbox.1"));
        assert_eq!(
            Codec::Bincode.decode(&msg.body).expect("body"),
            json!({"x": 1})
        );
    }

    #[test]
    fn defaults_for_bare_jobs() {
        let m = meta(Headers::new(), 1).expect("parses");
        assert_eq!((m.id.as_str(), m.attempt, m.max_attempts), ("gen", 1, 5));
        assert_eq!(m.codec, Codec::Json);
    }

    #[test]
    fn attempt_adds_the_republished_base() {
        let m = meta(Headers::new().with(header::ATTEMPT, "3"), 2).expect("parses");
        assert_eq!(m.attempt, 4);
    }

    #[test]
    fn bad_headers_name_themselves() {
        let e = meta(Headers::new().with(header::MAX_ATTEMPTS, "lots"), 1).err();
        assert!(e.unwrap_or_default().contains("Conveyor-Max-Attempts"));
        let e = meta(Headers::new().with(header::TIMEOUT_MS, "-4"), 1).err();
        assert!(e.unwrap_or_default().contains("Conveyor-Timeout-Ms"));
        let e = meta(Headers::new().with(header::CONTENT_TYPE, "text/xml"), 1).err();
        assert!(e.unwrap_or_default().contains("Content-Type"));
        assert!(meta(Headers::new().with(header::MAX_ATTEMPTS, "0"), 1).is_err());
    }

    #[test]
    fn chain_steps_past_the_bound_are_refused() {
        for (name, v) in [
            (header::CHAIN_STEP, "4294967295"),
            (header::CHAIN_LENGTH, "4294967295"),
            (header::CHAIN_STEP, "100000"),
        ] {
            let h = Headers::new()
                .with(name, v)
                .with(header::CHAIN_REST, "echo");
            let e = meta(h, 1).err().unwrap_or_default();
            assert!(e.contains(name) && e.contains("most steps"), "{e}");
        }
        let h = Headers::new()
            .with(header::CHAIN_STEP, "99998")
            .with(header::CHAIN_REST, "echo");
        assert!(meta(h, 1).is_ok());
    }

    #[test]
    fn bad_kind_is_refused_before_publishing() {
        assert!(JobSpec::new("no spaces", json!(1)).to_message().is_err());
    }
}
