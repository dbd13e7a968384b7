//! A transport with no broker behind it, for unit tests of logic that holds a transport but
//! must work (or fail over) without one: every call fails with a broker error.

use super::{ConsumeOptions, DeliveryStream, FlightClaim, MessageStream, Route, Source, Transport};
use crate::error::{Error, Result};
use crate::message::Message;
use crate::protocol::Names;
use async_trait::async_trait;

/// See the module docs.
pub struct Offline {
    names: Names,
}

impl Default for Offline {
    /// An offline transport of namespace `test`.
    fn default() -> Offline {
        Offline {
            names: Names::new("test").expect("a valid namespace"),
        }
    }
}

fn offline<T>(op: &'static str) -> Result<T> {
    Err(Error::Broker {
        op,
        cause: "no broker (offline transport)".into(),
    })
}

#[async_trait]
impl Transport for Offline {
    fn names(&self) -> &Names {
        &self.names
    }
    async fn publish(&self, _: Route, _: Message) -> Result<()> {
        offline("publish")
    }
    async fn consume(&self, _: Source, _: ConsumeOptions) -> Result<DeliveryStream> {
        offline("consume")
    }
    async fn reply_inbox(&self) -> Result<(String, MessageStream)> {
        offline("reply inbox")
    }
    async fn broadcast(&self, _: &str, _: Message) -> Result<()> {
        offline("broadcast")
    }
    async fn listen(&self, _: &str) -> Result<MessageStream> {
        offline("listen")
    }
    async fn emit_event(&self, _: &str, _: &str, _: Message) -> Result<()> {
        offline("emit event")
    }
    async fn listen_events(&self, _: &str) -> Result<MessageStream> {
        offline("listen events")
    }
    async fn send_control(&self, _: Message) -> Result<()> {
        offline("send control")
    }
    async fn listen_control(&self) -> Result<(u64, MessageStream)> {
        offline("listen control")
    }
    async fn permits(&self, _: &str, _: u32, _: ConsumeOptions) -> Result<DeliveryStream> {
        offline("permits")
    }
    async fn tokens(&self, _: &str, _: ConsumeOptions) -> Result<DeliveryStream> {
        offline("tokens")
    }
    async fn waiting_tokens(&self, _: &str) -> Result<u64> {
        offline("count tokens")
    }
    async fn put_tokens(&self, _: &str, _: &[u64]) -> Result<u32> {
        offline("add tokens")
    }
    async fn claim_flight(&self, _: &str) -> Result<Option<Box<dyn FlightClaim>>> {
        offline("claim flight")
    }
    async fn read_register(&self, _: &str) -> Result<Option<(u64, bytes::Bytes)>> {
        offline("read register")
    }
    async fn write_register(&self, _: &str, _: u64, _: bytes::Bytes) -> Result<Option<u64>> {
        offline("write register")
    }
    async fn tee_backlog(&self, _: &str, _: &str) -> Result<u64> {
        offline("tee backlog")
    }
    async fn delete_tee(&self, _: &str, _: &str) -> Result<()> {
        offline("delete tee")
    }
    async fn close(&self) -> Result<()> {
        Ok(())
    }
    async fn delete_namespace(&self, _: &[String]) -> Result<()> {
        offline("delete namespace")
    }
}
