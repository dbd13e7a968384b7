//! Library errors. Each says whether trying again may help ([`Error::is_transient`]).

use std::time::Duration;

/// Result alias for the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the library can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A URL, flag or config value is wrong; the message names it.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The broker could not be reached or refused an operation.
    /// (The cause is part of the message and deliberately not a `source()`: broker clients'
    /// errors repeat their own causes in their messages, and reports would print them twice.)
    #[error("broker error during {op}: {cause}")]
    Broker {
        /// What was being done.
        op: &'static str,
        /// The broker client's error.
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The broker refused the credentials, or refused this user an operation (permissions).
    /// Not transient: trying again with the same credentials cannot help.
    #[error("broker refused {op}: {reason}")]
    Denied {
        /// What was being done.
        op: &'static str,
        /// The broker's words.
        reason: String,
    },
    /// A publish was not confirmed (negative confirm, returned message, or no answer).
    #[error("publish to {target} not confirmed: {reason}")]
    NotConfirmed {
        /// Subject or exchange/routing key.
        target: String,
        /// Why the broker did not confirm it.
        reason: String,
    },
    /// The store a message goes to is full (its `max_bytes` bound): the broker refused it and
    /// keeps what it has. Transient: it takes messages again once its readers catch up. (On
    /// RabbitMQ a negative confirm is reported so; a queue without a leader sends one too.)
    #[error("publish to {target} refused: the store is full ({reason}); it takes messages again as its readers catch up, or raise max_bytes in the broker URL")]
    Full {
        /// Subject or exchange/routing key.
        target: String,
        /// The broker's words.
        reason: String,
    },
    /// A message is larger than the broker takes (NATS `max_payload`). Not transient.
    #[error(
        "message of {size} bytes for {target} is larger than the broker's limit of {max} bytes"
    )]
    TooLarge {
        /// Subject or exchange/routing key.
        target: String,
        /// The message's size (body and headers).
        size: usize,
        /// The broker's limit.
        max: usize,
    },
    /// Waiting for the broker took longer than allowed.
    #[error("timed out after {0:?} during {1}")]
    Timeout(Duration, &'static str),
    /// A body could not be encoded or decoded.
    #[error("codec: {0}")]
    Codec(String),
    /// The aggregator's store failed.
    #[error("store: {0}")]
    Store(String),
    /// Input/output error (files, sockets).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A job of a workflow (a MapReduce stage, say) did not succeed.
    #[error("workflow failed: {0}")]
    Workflow(String),
    /// A compare-and-set change of state kept in the broker (the schedules) lost to other changes
    /// every time it was tried.
    #[error("conflict: {0}")]
    Conflict(String),
    /// What the operation names does not exist (a schedule, say).
    #[error("not found: {0}")]
    NotFound(String),
    /// The operation stopped because shutdown was requested.
    #[error("shutting down")]
    Shutdown,
}

impl Error {
    /// Wraps a broker client's error.
    pub fn broker(
        op: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Broker {
            op,
            cause: Box::new(source),
        }
    }

    /// True when the same operation may succeed if tried again later (outages, time-outs,
    /// unconfirmed publishes); false for configuration and input errors.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Broker { .. }
                | Error::NotConfirmed { .. }
                | Error::Full { .. }
                | Error::Timeout(..)
                | Error::Io(_)
        )
    }
}
