//! What every Conveyor binary shares on its command line: the broker flags and log set-up.

use crate::broker_url::BrokerUrl;
use crate::error::Result;
use crate::transport::{self, Transport};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// `--broker`, `--namespace` and `--connect-timeout`, each also from the environment.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// Broker URL: nats://host:4222 or amqp://user:pass@host:5672/vhost.
    #[arg(
        long,
        env = "CONVEYOR_BROKER",
        default_value = "nats://127.0.0.1:4222",
        global = true,
        hide_env_values = true
    )]
    pub broker: BrokerUrl,
    /// Namespace of subjects, exchanges and queues.
    #[arg(
        long,
        env = "CONVEYOR_NAMESPACE",
        default_value = "conveyor",
        global = true
    )]
    pub namespace: String,
    /// How long to keep trying to reach the broker at start-up.
    #[arg(long, env = "CONVEYOR_CONNECT_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration, global = true)]
    pub connect_timeout: Duration,
    /// Extra CA certificates (PEM) to trust for tls:// and amqps:// brokers.
    #[arg(long, env = "CONVEYOR_TLS_CA", global = true, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// NATS credentials file (user JWT and NKey seed), instead of a user and password.
    #[arg(long, env = "CONVEYOR_NATS_CREDS", global = true, value_name = "FILE")]
    pub nats_creds: Option<PathBuf>,
}

impl BrokerArgs {
    /// Connects, retrying until `--connect-timeout` runs out.
    pub async fn connect(&self) -> Result<Arc<dyn Transport>> {
        transport::connect_with_retry(&self.url(), &self.namespace, self.connect_timeout).await
    }

    /// The broker URL with the TLS and credentials files attached.
    pub fn url(&self) -> BrokerUrl {
        let mut url = self.broker.clone();
        if let Some(ca) = &self.tls_ca {
            url = url.with_ca_file(ca);
        }
        if let Some(creds) = &self.nats_creds {
            url = url.with_credentials_file(creds);
        }
        url
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `default_filter`).
pub fn init_tracing(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(|| Stderr)
        .init();
}

/// Standard error that drops what cannot be written when the reader is gone (a supervisor
/// killed with `kill -9` leaves its children a broken pipe): logging must not take the process
/// down while it shuts down.
struct Stderr;

impl std::io::Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match std::io::stderr().write(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(buf.len()),
            other => other,
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match std::io::stderr().flush() {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => other,
        }
    }
}
