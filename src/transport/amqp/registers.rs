//! Registers on RabbitMQ: each is a durable classic queue `<ns>.registers.<name>` whose messages
//! carry their revision (`Conveyor-Revision`); the newest one is the value. A reader takes every
//! message unacked and gives them back by closing its channel: a classic queue, unlike a quorum
//! queue, counts no deliveries, so no delivery limit ever drops a value read often. Processes
//! take turns through an exclusive lock queue `<ns>.registers.<name>.lock`, deleted after each
//! turn (and gone with its connection if the process dies); the tasks of one process, through a
//! mutex. Values are published through the direct exchange `<ns>.registers`. A write publishes
//! the new value (confirmed) before it acks the old ones, so a writer that dies in between leaves
//! both, and readers take the newest.

use super::{amqp_error, long, Inner};
use crate::error::{Error, Result};
use crate::message::{Headers, Message};
use crate::protocol::Names;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use std::time::Duration;

/// The header holding a register value's revision.
const REVISION: &str = "Conveyor-Revision";
/// How long a reader or writer waits for its turn.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// The queue of register `name` (checked).
pub(super) fn queue(inner: &Inner, name: &str) -> Result<String> {
    crate::schedule::validate_register(name)?;
    Ok(format!("{}.registers.{name}", inner.names.namespace()))
}

/// The name of the exclusive queue whose holder may read and write `queue`.
fn lock_name(queue: &str) -> String {
    format!("{queue}.lock")
}

/// Holds the register's lock (the lock queue, declared on the returned channel) until
/// [`unlock`].
async fn lock(inner: &Inner, queue: &str) -> Result<lapin::Channel> {
    let name = lock_name(queue);
    let deadline = tokio::time::Instant::now() + LOCK_WAIT;
    loop {
        if let Some(ch) = inner.hold_exclusive(&name).await? {
            return Ok(ch);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout(LOCK_WAIT, "register lock"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every value in the register, taken unacked on `ch`: the newest (revision, body) and the
/// delivery tag of the last one taken.
async fn take_all(
    ch: &lapin::Channel,
    queue: &str,
) -> Result<(Option<(u64, bytes::Bytes)>, Option<u64>)> {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        classic_args(),
    )
    .await
    .map_err(|e| amqp_error("declare register", e))?;
    let (mut newest, mut last_tag) = (None::<(u64, bytes::Bytes)>, None);
    while let Some(got) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await
        .map_err(|e| amqp_error("read register", e))?
    {
        let d = got.delivery;
        last_tag = Some(d.delivery_tag);
        let (headers, _) = super::from_amqp(&d.properties);
        let revision = headers
            .get(REVISION)
            .and_then(|r| r.parse::<u64>().ok())
            .unwrap_or(0);
        if newest.as_ref().is_none_or(|(r, _)| revision > *r) {
            newest = Some((revision, bytes::Bytes::from(d.data)));
        }
    }
    Ok((newest, last_tag))
}

fn classic_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long("classic"));
    args
}

async fn unlock(lock: lapin::Channel, queue: &str, ch: lapin::Channel) {
    // Closing the reading channel puts back what it left unacked.
    let _ = ch.close(200, "register read".into()).await;
    // An exclusive queue lives as long as its connection, not its channel: deleted, it frees
    // the register for other processes.
    let _ = lock
        .queue_delete(lock_name(queue).as_str().into(), Default::default())
        .await;
    let _ = lock.close(200, "register unlocked".into()).await;
}

/// Declares the registers exchange `<ns>.registers` and binds `queue` to it under its own name;
/// returns the exchange. Registers (and batons put by users that may write registers) are
/// published through an exchange of their own, not the default one, which reaches every queue:
/// the right to write registers is only that.
pub(super) async fn route_to(ch: &lapin::Channel, names: &Names, queue: &str) -> Result<String> {
    let exchange = names.exchange("registers");
    ch.exchange_declare(
        exchange.as_str().into(),
        lapin::ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(|e| amqp_error("declare registers exchange", e))?;
    ch.queue_bind(
        queue.into(),
        exchange.as_str().into(),
        queue.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| amqp_error("bind to the registers exchange", e))?;
    Ok(exchange)
}

pub(super) async fn read(inner: &Inner, name: &str) -> Result<Option<(u64, bytes::Bytes)>> {
    let queue = queue(inner, name)?;
    let _turn = inner.register_turn.lock().await;
    let held = lock(inner, &queue).await?;
    let ch = inner.channel().await?;
    let taken = take_all(&ch, &queue).await;
    unlock(held, &queue, ch).await;
    Ok(taken?.0)
}

pub(super) async fn write(
    inner: &Inner,
    name: &str,
    expected: u64,
    value: bytes::Bytes,
) -> Result<Option<u64>> {
    let queue = queue(inner, name)?;
    let _turn = inner.register_turn.lock().await;
    let held = lock(inner, &queue).await?;
    let ch = inner.channel().await?;
    let outcome = async {
        let (newest, last_tag) = take_all(&ch, &queue).await?;
        let current = newest.map_or(0, |(r, _)| r);
        if current != expected {
            return Ok(None);
        }
        let next = current + 1;
        let mut headers = Headers::new();
        headers.insert(REVISION, next.to_string());
        let exchange = route_to(&ch, &inner.names, &queue).await?;
        inner
            .publish_raw(&exchange, &queue, true, &Message::new(headers, value))
            .await?;
        if let Some(tag) = last_tag {
            ch.basic_ack(tag, BasicAckOptions { multiple: true })
                .await
                .map_err(|e| amqp_error("ack register", e))?;
        }
        Ok(Some(next))
    }
    .await;
    unlock(held, &queue, ch).await;
    outcome
}
