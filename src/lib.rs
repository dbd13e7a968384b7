//! Conveyor: a distributed job system over NATS JetStream or RabbitMQ.
//!
//! Producers publish jobs, a pool of worker processes runs them, and an aggregator records every
//! result once. Processes talk only through the broker, chosen by URL (`nats://` or `amqp://`).
//! The wire contract (subjects, exchanges, headers) lives in [`protocol`], so that any client in any
//! language can publish jobs and read results.

pub mod aggregator;
pub mod bench;
pub mod broker_url;
#[cfg(feature = "cli")]
pub mod cli;
pub mod client;
pub mod codec;
pub mod error;
pub mod events;
pub mod fault;
pub mod job;
pub mod message;
pub mod priority;
pub mod protocol;
pub mod result;
pub mod schedule;
pub mod shutdown;
pub mod supervisor;
pub mod transport;
pub mod worker;
pub mod workflow;

pub use broker_url::BrokerUrl;

pub use client::Client;
pub use codec::Codec;
pub use error::{Error, Result};
pub use job::{JobError, JobSpec};
pub use message::{Headers, Message};
pub use priority::Priority;
pub use result::JobResult;
