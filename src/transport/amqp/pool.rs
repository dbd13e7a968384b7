//! deadpool managers: RabbitMQ connections (with the URL's TLS settings) and confirm-mode
//! channels on them.

use super::confirm_channel;
use crate::broker_url::BrokerUrl;
use crate::error::{Error, Result};
use deadpool::managed;
use lapin::tcp::OwnedTLSConfig;

/// Broker answers that mean "not with these credentials / not for this user".
const ACCESS_REFUSED: u16 = 403;
const NOT_ALLOWED: u16 = 530;

/// A lapin error as ours: refusals (bad login, missing permission) become [`Error::Denied`],
/// which is not retried; everything else stays a transient broker error.
pub(crate) fn amqp_error(op: &'static str, e: lapin::Error) -> Error {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p)
            if [ACCESS_REFUSED, NOT_ALLOWED].contains(&p.get_id()) =>
        {
            Error::Denied {
                op,
                reason: p.get_message().to_string(),
            }
        }
        _ => Error::broker(op, e),
    }
}

/// The TLS settings of `url`: its extra CA certificates, if any.
pub(crate) fn tls_config(url: &BrokerUrl) -> Result<OwnedTLSConfig> {
    let cert_chain = match url.ca_file() {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| Error::Config(format!("TLS CA file {}: {e}", path.display())))?,
        ),
        None => None,
    };
    Ok(OwnedTLSConfig {
        identity: None,
        cert_chain,
    })
}

/// Opens connections to one broker URL.
pub(crate) struct ConnectionManager {
    url: BrokerUrl,
    tls: OwnedTLSConfig,
}

impl ConnectionManager {
    pub(crate) fn new(url: &BrokerUrl) -> Result<Self> {
        if let Some(creds) = url.credentials_file() {
            return Err(Error::Config(format!(
                "a NATS credentials file ({}) was given for a RabbitMQ broker: put the user and password in the amqp:// URL",
                creds.display()
            )));
        }
        Ok(ConnectionManager {
            url: url.clone(),
            tls: tls_config(url)?,
        })
    }
}

impl managed::Manager for ConnectionManager {
    type Type = lapin::Connection;
    type Error = Error;

    async fn create(&self) -> Result<lapin::Connection> {
        let runtime = lapin::runtime::default_runtime().map_err(|e| Error::broker("runtime", e))?;
        lapin::Connection::connect_with_config(
            self.url.expose(),
            lapin::ConnectionProperties::default(),
            self.tls.clone(),
            runtime,
        )
        .await
        .map_err(|e| amqp_error("connect", e))
    }

    async fn recycle(
        &self,
        conn: &mut lapin::Connection,
        _: &managed::Metrics,
    ) -> managed::RecycleResult<Error> {
        if conn.status().connected() {
            Ok(())
        } else {
            Err(managed::RecycleError::message("connection closed"))
        }
    }
}

/// A pool's error as ours: the manager's own error as it was, the rest as broker errors.
pub(crate) fn pool_error(op: &'static str, e: managed::PoolError<Error>) -> Error {
    match e {
        managed::PoolError::Backend(e) => e,
        other => Error::broker(op, PoolError(other.to_string())),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct PoolError(pub(crate) String);

/// Makes confirm-mode channels on pooled connections.
pub(crate) struct ChannelManager {
    pub(crate) connections: managed::Pool<ConnectionManager>,
}

impl managed::Manager for ChannelManager {
    type Type = lapin::Channel;
    type Error = Error;

    async fn create(&self) -> Result<lapin::Channel> {
        let conn = self
            .connections
            .get()
            .await
            .map_err(|e| pool_error("connect", e))?;
        confirm_channel(&conn).await
    }

    async fn recycle(
        &self,
        ch: &mut lapin::Channel,
        _: &managed::Metrics,
    ) -> managed::RecycleResult<Error> {
        if ch.status().connected() {
            Ok(())
        } else {
            Err(managed::RecycleError::message("channel closed"))
        }
    }
}
