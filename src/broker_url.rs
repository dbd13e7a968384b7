//! Broker URLs: which backend, and a form that never shows the password.

use crate::error::{Error, Result};
use std::fmt;
use std::path::{Path, PathBuf};

/// The broker family a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// NATS with JetStream (`nats://`, `tls://`).
    Nats,
    /// RabbitMQ over AMQP 0-9-1 (`amqp://`, `amqps://`).
    Amqp,
}

/// A parsed broker URL. `Debug` and `Display` redact the password.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    kind: BrokerKind,
    raw: String,
    parsed: url::Url,
    ca_file: Option<PathBuf>,
    credentials_file: Option<PathBuf>,
    max_bytes: Option<u64>,
    ping_interval: Option<std::time::Duration>,
}

/// How many bytes each of a namespace's RabbitMQ jobs, results and dead-letter queues may hold
/// unless the URL says otherwise (`?max_bytes=`): 4 GiB. (NATS streams are bounded only when the
/// URL names a bound: JetStream reserves a bounded stream's bytes on the server.)
pub const DEFAULT_MAX_BYTES: u64 = 4 << 30;

/// Reads a byte count: digits, optionally followed by `K`, `M`, `G` or `T` (powers of 1024;
/// `KiB`, `MB` and the like are read the same way).
fn parse_bytes(v: &str) -> Option<u64> {
    let v = v.trim();
    let digits = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let n: u64 = v[..digits].parse().ok()?;
    let unit = v[digits..].trim().to_ascii_uppercase();
    let shift = match unit.trim_end_matches('B').trim_end_matches('I') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

impl BrokerUrl {
    /// Parses `nats://`, `tls://`, `amqp://` or `amqps://` URLs; anything else is a
    /// [`Error::Config`] naming the scheme.
    pub fn parse(s: &str) -> Result<Self> {
        let parsed = url::Url::parse(s).map_err(|e| {
            Error::Config(format!(
                "broker URL {:?} is not a URL ({e}); expected nats://host:4222 or amqp://user:pass@host:5672/vhost",
                redact_str(s)
            ))
        })?;
        let kind = match parsed.scheme() {
            "nats" | "tls" => BrokerKind::Nats,
            "amqp" | "amqps" => BrokerKind::Amqp,
            other => {
                return Err(Error::Config(format!(
                    "unsupported broker URL scheme {other:?} in {}: use nats://, tls://, amqp:// or amqps://",
                    redact_url(&parsed)
                )))
            }
        };
        if parsed.host_str().unwrap_or("").is_empty() {
            return Err(Error::Config(format!(
                "broker URL {} has no host",
                redact_url(&parsed)
            )));
        }
        let max_bytes = match parsed.query_pairs().find(|(k, _)| k == "max_bytes") {
            None => None,
            Some((_, v)) => Some(parse_bytes(&v).filter(|n| *n > 0).ok_or_else(|| {
                Error::Config(format!(
                    "max_bytes={v:?} in broker URL {}: expected a byte count above 0, such as \
                     1073741824 or 1G",
                    redact_url(&parsed)
                ))
            })?),
        };
        let ping_interval = match parsed.query_pairs().find(|(k, _)| k == "ping_interval") {
            None => None,
            Some((_, v)) => Some(
                humantime::parse_duration(&v)
                    .ok()
                    .filter(|d| *d >= std::time::Duration::from_secs(1))
                    .ok_or_else(|| {
                        Error::Config(format!(
                            "ping_interval={v:?} in broker URL {}: expected a duration of 1s or \
                             more, such as 10s",
                            redact_url(&parsed)
                        ))
                    })?,
            ),
        };
        Ok(BrokerUrl {
            kind,
            raw: s.to_string(),
            parsed,
            ca_file: None,
            credentials_file: None,
            max_bytes,
            ping_interval,
        })
    }

    /// Trusts the PEM certificates in `path` (besides the system's) for `tls://` and `amqps://`.
    pub fn with_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Authenticates to NATS with a credentials file (user JWT and NKey seed); RabbitMQ has no
    /// such file, so it is refused there when connecting.
    pub fn with_credentials_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.credentials_file = Some(path.into());
        self
    }

    /// The extra CA certificates file, if any.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }

    /// The NATS credentials file, if any.
    pub fn credentials_file(&self) -> Option<&Path> {
        self.credentials_file.as_deref()
    }

    /// The NATS inbox prefix: reply addresses begin with it and a dot, and a job's reply address
    /// must too. `_INBOX` unless the URL says `?inbox_prefix=...` (for accounts whose users may
    /// only subscribe below a prefix of their own).
    pub fn inbox_prefix(&self) -> String {
        self.parsed
            .query_pairs()
            .find(|(k, _)| k == "inbox_prefix")
            .map(|(_, v)| v.trim_end_matches('.').to_string())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "_INBOX".to_string())
    }

    /// The most bytes each of the namespace's jobs, results and dead-letter stores (streams on
    /// NATS, queues on RabbitMQ) may hold, from `?max_bytes=`: `None` when the URL does not say
    /// (a RabbitMQ queue is then created with [`DEFAULT_MAX_BYTES`], a NATS stream unbounded, and
    /// an existing one keeps its bound).
    pub fn max_bytes(&self) -> Option<u64> {
        self.max_bytes
    }

    /// How often a NATS client pings the server (`?ping_interval=10s`): a server that answers
    /// two pings in a row no more is taken as gone, and the client reconnects. `None`: the
    /// client's default (a minute). (RabbitMQ: `?heartbeat=N` seconds, read by the AMQP client.)
    pub fn ping_interval(&self) -> Option<std::time::Duration> {
        self.ping_interval
    }

    /// True for `tls://` and `amqps://`.
    pub fn is_tls(&self) -> bool {
        matches!(self.parsed.scheme(), "tls" | "amqps")
    }

    /// Which backend this URL selects.
    pub fn kind(&self) -> BrokerKind {
        self.kind
    }

    /// The full URL including credentials: only for handing to the broker client.
    pub fn expose(&self) -> &str {
        &self.raw
    }

    /// The parsed URL (with credentials).
    pub fn url(&self) -> &url::Url {
        &self.parsed
    }
}

fn redact_url(u: &url::Url) -> String {
    let mut u = u.clone();
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    } else if !u.username().is_empty() {
        // A user name without a password is a NATS token (`nats://TOKEN@host`): a secret.
        let _ = u.set_username("***");
    }
    u.to_string()
}

fn redact_str(s: &str) -> String {
    // Best effort for strings that do not parse: hide anything between "://user:" and "@".
    match (s.find("://"), s.rfind('@')) {
        (Some(start), Some(at)) if at > start => {
            let creds = &s[start + 3..at];
            match creds.find(':') {
                Some(colon) => format!("{}{}:***{}", &s[..start + 3], &creds[..colon], &s[at..]),
                // No colon: the whole of it is a token.
                None => format!("{}***{}", &s[..start + 3], &s[at..]),
            }
        }
        _ => s.to_string(),
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.parsed))
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerUrl({self})")
    }
}

impl std::str::FromStr for BrokerUrl {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_interval_reads_a_duration_and_refuses_nonsense() {
        let at = |q: &str| BrokerUrl::parse(&format!("nats://h:4222/?ping_interval={q}"));
        assert_eq!(
            at("5s").ok().and_then(|u| u.ping_interval()),
            Some(std::time::Duration::from_secs(5))
        );
        assert_eq!(
            BrokerUrl::parse("nats://h:4222")
                .ok()
                .and_then(|u| u.ping_interval()),
            None
        );
        for bad in ["soon", "10ms", ""] {
            let err = at(bad).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("ping_interval"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn max_bytes_reads_units_and_refuses_nonsense() {
        let at = |q: &str| BrokerUrl::parse(&format!("nats://h:4222/?max_bytes={q}"));
        assert_eq!(at("1024").ok().and_then(|u| u.max_bytes()), Some(1024));
        assert_eq!(at("64K").ok().and_then(|u| u.max_bytes()), Some(64 << 10));
        assert_eq!(at("2GiB").ok().and_then(|u| u.max_bytes()), Some(2 << 30));
        assert_eq!(at("3mb").ok().and_then(|u| u.max_bytes()), Some(3 << 20));
        assert_eq!(
            BrokerUrl::parse("amqp://h/%2f")
                .ok()
                .and_then(|u| u.max_bytes()),
            None
        );
        for bad in [
            "",
            "0",
            "lots",
            "5X",
            "-1",
            "99999999999999999999",
            "20000000T",
        ] {
            let err = at(bad).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("max_bytes"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn picks_backend_by_scheme() {
        assert_eq!(
            BrokerUrl::parse("nats://127.0.0.1:4222")
                .map(|u| u.kind())
                .ok(),
            Some(BrokerKind::Nats)
        );
        assert_eq!(
            BrokerUrl::parse("amqps://h/v").map(|u| u.kind()).ok(),
            Some(BrokerKind::Amqp)
        );
        let err = BrokerUrl::parse("redis://127.0.0.1")
            .err()
            .map(|e| e.to_string());
        assert!(err
            .unwrap_or_default()
            .contains("unsupported broker URL scheme \"redis\""));
    }

    #[test]
    fn never_shows_password() {
        let u = BrokerUrl::parse("amqp://guest:s3cret@localhost:5672/%2f").expect("valid url");
        assert!(!format!("{u}").contains("s3cret"));
        assert!(!format!("{u:?}").contains("s3cret"));
        assert!(u.expose().contains("s3cret"));
        let bad = BrokerUrl::parse("foo://user:s3cret@host")
            .err()
            .map(|e| e.to_string());
        assert!(!bad.unwrap_or_default().contains("s3cret"));
        assert!(!redact_str("x://user:s3cret@ho st").contains("s3cret"));
    }

    #[test]
    fn never_shows_a_nats_token() {
        let u = BrokerUrl::parse("nats://s3cretT0ken@127.0.0.1:4222").expect("valid url");
        assert!(!format!("{u}").contains("s3cretT0ken"), "{u}");
        assert!(!format!("{u:?}").contains("s3cretT0ken"));
        assert_eq!(u.to_string(), "nats://***@127.0.0.1:4222");
        assert!(u.expose().contains("s3cretT0ken"));
        assert!(!redact_str("x://s3cretT0ken@ho st").contains("s3cretT0ken"));
    }
}
