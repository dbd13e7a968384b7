//! RabbitMQ adapter (lapin, with deadpool pools of connections and of confirm channels).
//!
//! Topology of namespace `<ns>`: durable topic exchanges `<ns>.jobs`, `<ns>.results`, `<ns>.dead`
//! and `<ns>.events`, and the fanout `<ns>.control`. Each job kind has a quorum queue
//! `<ns>.jobs.<kind>` bound with routing key `<kind>`, declared by the workers that take it. Jobs of
//! a kind without a queue go through the alternate exchange into `<ns>.jobs-unrouted`, which the
//! catch-all worker consumes, so no job is dropped. Retries go through the headers exchange
//! `<ns>.retry` into one delay queue per delay (`<ns>.retry.<ms>ms`), whose messages dead-letter
//! back into `<ns>.jobs` under their kind when their TTL ends. Replies go through the direct
//! exchange `<ns>.replies`, keyed by the reply queue's name. Nothing is published to the default
//! exchange, so role users need no write permission on it (see `broker-config/`). Consumers whose
//! connection is lost re-subscribe by themselves (see `Resubscribing`).

use super::{
    Acker, ConsumeOptions, Delivery, DeliveryStream, MessageStream, Route, Source, Transport,
};
use crate::broker_url::BrokerUrl;
use crate::error::{Error, Result};
use crate::message::{Headers, Message};
use crate::protocol::{header, Names};
use async_trait::async_trait;
use deadpool::managed;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, ExchangeKind};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The longest a broker operation may take. lapin futures on a connection that died mid-way
/// may never resolve, so every operation that a process waits on is bounded.
/// How long opening a pooled connection or channel may take.
const POOL_CREATE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a caller may wait for a pooled connection or channel.
const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long checking a pooled connection or channel may take.
const POOL_RECYCLE_TIMEOUT: Duration = Duration::from_secs(5);
const OP_TIMEOUT: Duration = Duration::from_secs(15);

/// `fut`, failing with [`Error::Timeout`] after [`OP_TIMEOUT`].
async fn bounded<T>(
    op: &'static str,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(OP_TIMEOUT, fut)
        .await
        .unwrap_or(Err(Error::Timeout(OP_TIMEOUT, op)))
}

/// Connections kept open to the broker.
const CONNECTIONS: usize = 4;
/// Channels kept for publishing.
const PUBLISH_CHANNELS: usize = 8;
/// How long a publish may wait for its confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a channel in publisher-confirm mode.
pub(crate) async fn confirm_channel(conn: &lapin::Connection) -> Result<lapin::Channel> {
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| amqp_error("open channel", e))?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| amqp_error("confirm.select", e))?;
    Ok(ch)
}

/// A RabbitMQ connection pool with the namespace's topology declared. Cheap to clone.
#[derive(Clone)]
pub struct AmqpTransport {
    inner: Arc<Inner>,
}

struct Inner {
    connections: managed::Pool<ConnectionManager>,
    channels: managed::Pool<ChannelManager>,
    names: Names,
    retry_queues: Arc<Mutex<HashSet<String>>>,
    /// Channels with consumers on them, closed with a round trip first by `close`.
    consumer_channels: Mutex<Vec<(lapin::Channel, u16)>>,
    /// The one channel events and heartbeats go out on, so that they reach the broker, and a
    /// watcher, in the order this process sent them (pooled channels race each other). Opened
    /// on first use and again once closed.
    broadcasts: tokio::sync::Mutex<Option<lapin::Channel>>,
    /// Held while this process reads or writes a register (see `registers`).
    register_turn: tokio::sync::Mutex<()>,
    /// The byte bound of the jobs, results and dead-letter queues, and whether the URL named it.
    max_bytes: u64,
    max_bytes_named: bool,
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// The queue argument that bounds a queue in bytes.
const MAX_LENGTH_BYTES: &str = "x-max-length-bytes";

/// The argument named when a declare failed because the queue exists with another byte bound
/// or overflow behaviour (PRECONDITION_FAILED, "inequivalent arg").
fn inequivalent_bound(e: &lapin::Error) -> Option<&'static str> {
    const PRECONDITION_FAILED: u16 = 406;
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) if p.get_id() == PRECONDITION_FAILED => {
            let text = p.get_message().as_str();
            [MAX_LENGTH_BYTES, "x-overflow"]
                .into_iter()
                .find(|arg| text.contains(&format!("'{arg}'")))
        }
        _ => None,
    }
}

fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long("quorum"));
    args
}

/// How a private queue is bound.
enum Bind {
    /// To the exchange with this routing key.
    Key(String, String),
    /// To the exchange with the queue's own (server-given) name as key: reply queues.
    OwnName(String),
}

/// A queue, the exchange it is bound to, and how.
struct Binding {
    queue: String,
    exchange: String,
    key: String,
    args: FieldTable,
    bind_args: FieldTable,
    options: QueueDeclareOptions,
}

impl Binding {
    /// A quorum queue bound with `key`.
    fn new(queue: String, exchange: String, key: &str) -> Self {
        Binding {
            queue,
            exchange,
            key: key.to_string(),
            args: quorum_args(),
            bind_args: FieldTable::default(),
            options: durable(),
        }
    }

    /// A temporary classic queue (quorum queues cannot be auto-deleted): it goes away when its
    /// consumer does, or after a minute unused.
    fn ephemeral(queue: String, exchange: String, key: &str) -> Self {
        let mut args = FieldTable::default();
        args.insert("x-expires".into(), AMQPValue::LongLongInt(60_000));
        Binding {
            args,
            options: QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            ..Binding::new(queue, exchange, key)
        }
    }
}

/// Checks that `name` exists without declaring it (needs no permission).
async fn passive_exchange(ch: &lapin::Channel, name: &str, refused: &str) -> Result<()> {
    ch.exchange_declare(
        name.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map(|_| ())
    .map_err(|e| missing("exchange", name, refused, e))
}

/// Checks that queue `name` exists without declaring it (needs no permission).
async fn passive_queue(ch: &lapin::Channel, name: &str, refused: &str) -> Result<()> {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map(|_| ())
    .map_err(|e| missing("queue", name, refused, e))
}

/// The error of a passive check: a missing object is named, with why it was not declared.
fn missing(what: &str, name: &str, refused: &str, e: lapin::Error) -> Error {
    const NOT_FOUND: u16 = 404;
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) if p.get_id() == NOT_FOUND => Error::Denied {
            op: "declare",
            reason: format!(
                "{what} {name} does not exist and this user may not declare it ({refused}); load broker-config/definitions.json or connect once as an administrator"
            ),
        },
        _ => amqp_error("check", e),
    }
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn value_to_string(v: &AMQPValue) -> Option<String> {
    Some(match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        AMQPValue::Float(f) => f.to_string(),
        AMQPValue::Double(f) => f.to_string(),
        _ => return None,
    })
}

/// Conveyor headers from AMQP headers and properties (properties fill what headers lack).
fn from_amqp(props: &BasicProperties) -> (Headers, u32) {
    let mut h = Headers::new();
    let mut delivery_count = 0u32;
    if let Some(table) = props.headers() {
        for (k, v) in table.inner() {
            if k.as_str() == "x-delivery-count" {
                delivery_count = value_to_string(v).and_then(|s| s.parse().ok()).unwrap_or(0);
                continue;
            }
            if let Some(s) = value_to_string(v) {
                h.insert(k.as_str(), s);
            }
        }
    }
    let fill = |h: &mut Headers, name: &str, v: &Option<ShortString>| {
        if let Some(v) = v {
            if h.get(name).is_none() && !v.as_str().is_empty() {
                h.insert(name, v.as_str());
            }
        }
    };
    fill(&mut h, header::ID, props.message_id());
    fill(&mut h, header::CONTENT_TYPE, props.content_type());
    fill(&mut h, header::REPLY_TO, props.reply_to());
    fill(&mut h, header::CORRELATION_ID, props.correlation_id());
    (h, delivery_count)
}

fn to_amqp(h: &Headers) -> BasicProperties {
    let mut table = FieldTable::default();
    for (k, v) in h.iter() {
        // These travel as properties (see below); `from_amqp` reads them back from there.
        let is_property = [header::ID, header::CONTENT_TYPE, header::CORRELATION_ID]
            .iter()
            .any(|p| k.eq_ignore_ascii_case(p));
        if !is_property {
            table.insert(k.into(), long(v));
        }
    }
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(table);
    if let Some(id) = h.get(header::ID) {
        props = props.with_message_id(id.into());
    }
    if let Some(ct) = h.get(header::CONTENT_TYPE) {
        props = props.with_content_type(ct.into());
    }
    if let Some(c) = h.get(header::CORRELATION_ID) {
        props = props.with_correlation_id(c.into());
    }
    props
}

impl AmqpTransport {
    /// Connects and declares the namespace's exchanges and shared queues.
    pub async fn connect(url: &BrokerUrl, names: Names) -> Result<Self> {
        let inner = Inner::connect(url, names).await?;
        Ok(AmqpTransport {
            inner: Arc::new(inner),
        })
    }

    /// Declares every retry delay queue now rather than on first use: an administrator's
    /// set-up, for brokers whose workers may not declare queues (what
    /// `broker-config/definitions.json` does too). Fails if one exists with other arguments.
    pub async fn declare_retry_queues(&self) -> Result<()> {
        for ms in crate::protocol::retry_delays_ms() {
            self.inner.retry_queue(ms).await?;
        }
        Ok(())
    }
}

impl Inner {
    async fn connect(url: &BrokerUrl, names: Names) -> Result<Self> {
        // Every wait of the pools is bounded: a connection attempt that hangs (a broker that
        // accepts TCP while it boots) must fail, so that confirmed publishes retry, rather than
        // hold a publisher for ever.
        let connections = managed::Pool::builder(ConnectionManager::new(url)?)
            .max_size(CONNECTIONS)
            .runtime(deadpool::Runtime::Tokio1)
            .create_timeout(Some(POOL_CREATE_TIMEOUT))
            .wait_timeout(Some(POOL_WAIT_TIMEOUT))
            .recycle_timeout(Some(POOL_RECYCLE_TIMEOUT))
            .build()
            .map_err(|e| Error::Config(format!("connection pool: {e}")))?;
        let channels = managed::Pool::builder(ChannelManager {
            connections: connections.clone(),
        })
        .max_size(PUBLISH_CHANNELS)
        .runtime(deadpool::Runtime::Tokio1)
        .create_timeout(Some(POOL_CREATE_TIMEOUT))
        .wait_timeout(Some(POOL_WAIT_TIMEOUT))
        .recycle_timeout(Some(POOL_RECYCLE_TIMEOUT))
        .build()
        .map_err(|e| Error::Config(format!("channel pool: {e}")))?;
        let t = Inner {
            connections,
            channels,
            names,
            retry_queues: Arc::default(),
            consumer_channels: Mutex::default(),
            broadcasts: tokio::sync::Mutex::default(),
            register_turn: tokio::sync::Mutex::default(),
            max_bytes: url
                .max_bytes()
                .unwrap_or(crate::broker_url::DEFAULT_MAX_BYTES),
            max_bytes_named: url.max_bytes().is_some(),
        };
        bounded("declare", t.declare()).await?;
        Ok(t)
    }

    async fn channel(&self) -> Result<lapin::Channel> {
        let conn = self
            .connections
            .get()
            .await
            .map_err(|e| pool_error("connect", e))?;
        conn.create_channel()
            .await
            .map_err(|e| amqp_error("open channel", e))
    }

    /// The namespace's exchanges, and the shared queues with their bindings.
    fn topology(&self) -> (Vec<(String, ExchangeKind, FieldTable)>, Vec<Binding>) {
        let n = &self.names;
        let mut jobs_args = FieldTable::default();
        jobs_args.insert("alternate-exchange".into(), long(&n.unrouted()));
        let plain = FieldTable::default;
        let exchanges = vec![
            (n.unrouted(), ExchangeKind::Fanout, plain()),
            (n.exchange("jobs"), ExchangeKind::Topic, jobs_args),
            (n.exchange("results"), ExchangeKind::Topic, plain()),
            (n.exchange("dead"), ExchangeKind::Topic, plain()),
            (n.exchange("events"), ExchangeKind::Topic, plain()),
            (n.exchange("control"), ExchangeKind::Fanout, plain()),
            (n.exchange("replies"), ExchangeKind::Direct, plain()),
            (n.exchange("retry"), ExchangeKind::Headers, plain()),
        ];
        let queues = vec![
            self.stored(n.unrouted(), n.unrouted(), ""),
            self.stored(n.results_queue(), n.exchange("results"), "#"),
            self.stored(n.dead_queue(), n.exchange("dead"), "#"),
            control_log_binding(n),
        ];
        (exchanges, queues)
    }

    /// A quorum queue of jobs, results or dead letters bound with `key`: bounded in bytes, and
    /// refusing (negative confirm) what would pass the bound rather than dropping what it holds.
    fn stored(&self, queue: String, exchange: String, key: &str) -> Binding {
        let mut b = Binding::new(queue, exchange, key);
        b.args.insert(
            MAX_LENGTH_BYTES.into(),
            AMQPValue::LongLongInt(i64::try_from(self.max_bytes).unwrap_or(i64::MAX)),
        );
        b.args.insert("x-overflow".into(), long("reject-publish"));
        b
    }

    /// Declares the topology. A user without configure permissions (see `broker-config/`,
    /// where an administrator's definitions declare it) gets it checked passively instead.
    async fn declare(&self) -> Result<()> {
        let (exchanges, queues) = self.topology();
        let declared = async {
            let mut ch = self.channel().await?;
            for (name, kind, args) in &exchanges {
                ch.exchange_declare(
                    name.as_str().into(),
                    kind.clone(),
                    ExchangeDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    args.clone(),
                )
                .await
                .map_err(|e| amqp_error("declare exchange", e))?;
            }
            for b in &queues {
                self.queue(&mut ch, b).await?;
            }
            let _ = ch.close(200, "declared".into()).await;
            Ok(())
        }
        .await;
        match declared {
            Err(Error::Denied { reason, .. }) => {
                let ch = self.channel().await?;
                for (name, ..) in &exchanges {
                    passive_exchange(&ch, name, &reason).await?;
                }
                for b in &queues {
                    passive_queue(&ch, &b.queue, &reason).await?;
                }
                let _ = ch.close(200, "checked".into()).await;
                Ok(())
            }
            other => other,
        }
    }

    /// Declares `b`'s queue with its options and arguments, and binds it. A queue declared
    /// before queues had byte bounds is kept as it is, unless the URL names a bound: RabbitMQ
    /// cannot change a queue's arguments, so that fails saying so. (The broker closes `ch` on
    /// such a mismatch; `ch` is then a new channel.)
    async fn queue(&self, ch: &mut lapin::Channel, b: &Binding) -> Result<()> {
        let declared = ch
            .queue_declare(b.queue.as_str().into(), b.options, b.args.clone())
            .await;
        if let Err(e) = declared {
            let Some(arg) = inequivalent_bound(&e) else {
                return Err(amqp_error("declare queue", e));
            };
            if self.max_bytes_named {
                return Err(Error::Config(format!(
                    "the broker URL asks for max_bytes={} but queue {} exists with another \
                     {arg}, and RabbitMQ cannot change a queue's arguments: drop max_bytes \
                     from the URL (and bound the queue with a policy), or delete the namespace",
                    self.max_bytes, b.queue
                )));
            }
            tracing::warn!(
                queue = %b.queue,
                "the queue exists without Conveyor's byte bound; kept as it is (bound it with \
                 a max-length-bytes policy)"
            );
            *ch = self.channel().await?;
            passive_queue(ch, &b.queue, "it exists with other arguments").await?;
        }
        ch.queue_bind(
            b.queue.as_str().into(),
            b.exchange.as_str().into(),
            b.key.as_str().into(),
            QueueBindOptions::default(),
            b.bind_args.clone(),
        )
        .await
        .map_err(|e| amqp_error("bind queue", e))
    }

    /// Declares and binds a queue on a channel of its own; a user who may not do that gets
    /// the queue checked passively instead (it must then exist already).
    async fn declare_bound(&self, b: &Binding) -> Result<()> {
        let mut ch = self.channel().await?;
        match self.queue(&mut ch, b).await {
            Ok(()) => {
                let _ = ch.close(200, "declared".into()).await;
                Ok(())
            }
            Err(Error::Denied { reason, .. }) => {
                let ch = self.channel().await?;
                passive_queue(&ch, &b.queue, &reason).await?;
                let _ = ch.close(200, "checked".into()).await;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Declares (once per process) the delay queue of `delay_ms`: messages wait there for the
    /// TTL, then dead-letter into `<ns>.jobs` under their routing key, which is their kind.
    async fn retry_queue(&self, delay_ms: u64) -> Result<()> {
        let name = self.names.retry_queue(delay_ms);
        if self.lock_retry().contains(&name) {
            return Ok(());
        }
        let mut args = quorum_args();
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(delay_ms as i64),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            long(&self.names.exchange("jobs")),
        );
        args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
        args.insert("x-overflow".into(), long("reject-publish"));
        let mut bind_args = FieldTable::default();
        bind_args.insert("x-match".into(), long("all"));
        bind_args.insert(header::RETRY_DELAY_MS.into(), long(&delay_ms.to_string()));
        let binding = Binding {
            args,
            bind_args,
            ..Binding::new(name.clone(), self.names.exchange("retry"), "")
        };
        self.declare_bound(&binding).await?;
        self.lock_retry().insert(name);
        Ok(())
    }
    fn lock_retry(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.retry_queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn publish_raw(
        &self,
        exchange: &str,
        key: &str,
        mandatory: bool,
        msg: &Message,
    ) -> Result<()> {
        let target = format!("{exchange}/{key}");
        let ch = self
            .channels
            .get()
            .await
            .map_err(|e| pool_error("channel pool", e))?;
        let publish = ch.basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions {
                mandatory,
                ..Default::default()
            },
            &msg.body,
            to_amqp(&msg.headers),
        );
        let confirm = tokio::time::timeout(CONFIRM_TIMEOUT, publish)
            .await
            .map_err(|_| Error::Timeout(CONFIRM_TIMEOUT, "publish"))?
            .map_err(|e| Error::NotConfirmed {
                target: target.clone(),
                reason: e.to_string(),
            })?;
        drop(ch);
        let confirmation = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
            .await
            .map_err(|_| Error::Timeout(CONFIRM_TIMEOUT, "publisher confirm"))?
            .map_err(|e| Error::NotConfirmed {
                target: target.clone(),
                reason: e.to_string(),
            })?;
        if confirmation.is_nack() {
            // What a queue at its x-max-length-bytes with reject-publish answers (Conveyor's
            // queues all are); RabbitMQ gives no reason with a negative confirm.
            return Err(Error::Full {
                target,
                reason:
                    "negative confirm: a queue it routes to is at its max_bytes bound, or could \
                         not store it for now"
                        .into(),
            });
        }
        if let Some(returned) = confirmation.take_message() {
            return Err(Error::NotConfirmed {
                target,
                reason: format!("returned as unroutable: {}", returned.reply_text),
            });
        }
        Ok(())
    }

    /// Declares the exclusive queue `name` on a channel of its own: `Some(channel)` when this
    /// connection holds it now, `None` when another connection does (RESOURCE_LOCKED; the broker
    /// closes that channel). The queue goes when its holder deletes it or its connection closes.
    async fn hold_exclusive(&self, name: &str) -> Result<Option<lapin::Channel>> {
        let ch = self.channel().await?;
        let declared = ch
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(_) => Ok(Some(ch)),
            Err(e) if e.to_string().contains("RESOURCE_LOCKED") => Ok(None),
            Err(e) => Err(amqp_error("declare exclusive queue", e)),
        }
    }

    /// A server-named exclusive queue, bound as `bind` says, consumed without acks (replies and
    /// broadcasts are at most once). Returns its name and what arrives.
    async fn private_queue(&self, bind: Bind) -> Result<(String, MessageStream)> {
        let ch = self.channel().await?;
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| amqp_error("declare private queue", e))?;
        let name = q.name().as_str().to_string();
        let (exchange, key) = match bind {
            Bind::Key(exchange, key) => (exchange, key),
            Bind::OwnName(exchange) => (exchange, name.clone()),
        };
        ch.queue_bind(
            name.as_str().into(),
            exchange.as_str().into(),
            key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_error("bind private queue", e))?;
        let consumer = ch
            .basic_consume(
                name.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| amqp_error("basic.consume", e))?;
        let stream = consumer
            .filter_map(move |d| {
                let _keep_channel_open = &ch;
                futures::future::ready(d.ok().map(|d| {
                    let (h, _) = from_amqp(&d.properties);
                    Message::new(h, d.data)
                }))
            })
            .boxed();
        Ok((name, stream))
    }

    /// Declares what `source` reads from and starts consuming it with `opts`' prefetch.
    async fn open_consumer(
        &self,
        source: &Source,
        opts: ConsumeOptions,
    ) -> Result<(lapin::Channel, lapin::Consumer)> {
        let n = &self.names;
        let queue = match source {
            Source::Kind(_) | Source::Lane { .. } => {
                let lane = lane_of_source(source).unwrap_or_default();
                let queue = n.job_queue(&lane);
                self.declare_bound(&self.stored(queue.clone(), n.exchange("jobs"), &lane))
                    .await?;
                queue
            }
            Source::Unrouted(_) => n.unrouted(),
            Source::Results(group) if group == "aggregator" => n.results_queue(),
            Source::Dead(group) if group == "dead" => n.dead_queue(),
            Source::Results(group) | Source::Dead(group) => {
                let (class, base) = match source {
                    Source::Results(_) => ("results", n.results_queue()),
                    _ => ("dead", n.dead_queue()),
                };
                let q = format!("{base}.{group}");
                let binding = if opts.ephemeral {
                    Binding::ephemeral(q.clone(), n.exchange(class), "#")
                } else {
                    // A reader's own copy: bounded, its oldest dropped at the bound, so that a
                    // reader that went away never refuses (and so stops) every result.
                    let mut b = self.stored(q.clone(), n.exchange(class), "#");
                    b.args.insert("x-overflow".into(), long("drop-head"));
                    b
                };
                self.declare_bound(&binding).await?;
                q
            }
            Source::Waiting => {
                return Err(Error::Config(
                    "RabbitMQ has no waiting jobs' source: waiting jobs come back from their \
                     delay queues by themselves"
                        .into(),
                ))
            }
            Source::Tee {
                kind,
                name,
                backlog,
            } => {
                crate::protocol::validate_kind(kind)?;
                crate::protocol::validate_tee_name(name)?;
                let queue = n.tee_queue(name, kind);
                // Copies of every lane of the kind: one queue, bound with each lane's key.
                for p in crate::priority::Priority::ALL {
                    self.declare_bound(&tee_binding(
                        queue.clone(),
                        n.exchange("jobs"),
                        &crate::priority::lane(kind, p),
                        *backlog,
                        opts.ephemeral,
                    ))
                    .await?;
                }
                queue
            }
        };
        self.consume_queue(queue, opts, false).await
    }

    async fn consume_queue(
        &self,
        queue: String,
        opts: ConsumeOptions,
        no_ack: bool,
    ) -> Result<(lapin::Channel, lapin::Consumer)> {
        let ch = self.channel().await?;
        // A consume abandoned half-way (its caller timed out while the broker was booting) must
        // not leave a consumer behind on a live channel: the broker would deliver to it, and
        // what it holds (permits, jobs) would be held by nobody.
        let mut abandoned = CloseOnDrop(Some(ch.clone()));
        if !no_ack {
            ch.basic_qos(opts.prefetch.max(1), BasicQosOptions::default())
                .await
                .map_err(|e| amqp_error("basic.qos", e))?;
        }
        let consumer = ch
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| amqp_error("basic.consume", e))?;
        self.keep_consumer_channel(&ch, opts.prefetch.max(1));
        abandoned.0 = None;
        Ok((ch, consumer))
    }

    /// Remembers a channel with consumers on it, for [`Transport::close`].
    fn keep_consumer_channel(&self, ch: &lapin::Channel, prefetch: u16) {
        let mut channels = self
            .consumer_channels
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Channels lost to a broker restart are replaced by re-subscribing consumers: forget them.
        channels.retain(|(c, _)| c.status().connected());
        channels.push((ch.clone(), prefetch));
    }

    /// The queue a job source reads, for the consumers that make room for jobs set aside.
    fn job_source_queue(&self, source: &Source) -> Option<String> {
        match source {
            Source::Kind(_) | Source::Lane { .. } => {
                lane_of_source(source).map(|lane| self.names.job_queue(&lane))
            }
            Source::Unrouted(_) => Some(self.names.unrouted()),
            _ => None,
        }
    }
}

/// The lane a kind's job source reads: the kind itself for [`Source::Kind`] (its normal lane,
/// once [`Transport::consume`] has split it), the lane for [`Source::Lane`].
fn lane_of_source(source: &Source) -> Option<String> {
    match source {
        Source::Kind(kind) => Some(kind.clone()),
        Source::Lane { kind, priority } => Some(crate::priority::lane(kind, *priority)),
        _ => None,
    }
}

/// The arguments of a queue of a rate bucket (named in `name`): one of a rate key's values goes
/// once unused for [`super::KEYED_BUCKET_IDLE`].
fn keyed_bucket_args(name: &str) -> FieldTable {
    let mut args = FieldTable::default();
    if crate::protocol::is_keyed_bucket(name) {
        let ms = u64::try_from(super::KEYED_BUCKET_IDLE.as_millis()).unwrap_or(u64::MAX);
        let ms = i64::try_from(ms).unwrap_or(i64::MAX);
        args.insert("x-expires".into(), AMQPValue::LongLongInt(ms));
    }
    args
}

/// Closes its channel when dropped, unless taken out first: for channels whose set-up may be
/// abandoned at an await.
struct CloseOnDrop(Option<lapin::Channel>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if let (Some(ch), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                let _ = ch.close(200, "abandoned".into()).await;
            });
        }
    }
}

/// A round trip on `ch` (a passive declare of `queue`), which holds a claim or a baton: it asks
/// the broker rather than the client's idea of the connection, so that a process frozen past its
/// heartbeat learns here that the broker let its claim go.
async fn round_trip(ch: &lapin::Channel, queue: &str, op: &'static str) -> Result<()> {
    let check = ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    );
    bounded(op, async { check.await.map_err(|e| amqp_error(op, e)) })
        .await
        .map(|_| ())
}

/// `Ok` while `ch`, which holds a claim, is open: a closed channel means the claim went with a
/// lost connection, and another process may hold it now.
fn still_held(ch: &lapin::Channel, op: &'static str) -> Result<()> {
    if ch.status().connected() {
        Ok(())
    } else {
        Err(Error::broker(
            op,
            std::io::Error::other("the claim was lost with its connection"),
        ))
    }
}

/// A held RabbitMQ singleflight claim: an exclusive queue.
struct AmqpFlight {
    ch: lapin::Channel,
    queue: String,
}

#[async_trait]
impl super::FlightClaim for AmqpFlight {
    async fn refresh(&self) -> Result<()> {
        // The exclusive queue lives as long as its connection. A round trip on the claim's own
        // channel asks the broker rather than the client's idea of the connection: a process
        // that was frozen past its heartbeat learns here that the broker dropped its claim.
        still_held(&self.ch, "refresh claim")?;
        round_trip(&self.ch, &self.queue, "refresh claim").await
    }
    async fn release(self: Box<Self>) -> Result<()> {
        let _ = self
            .ch
            .queue_delete(self.queue.as_str().into(), Default::default())
            .await;
        let _ = self.ch.close(200, "released".into()).await;
        Ok(())
    }
}

/// Settles a held permit: `nack` returns it to the queue.
struct PermitAcker(lapin::Acker);

#[async_trait]
impl Acker for PermitAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        // A permit is never consumed, only returned.
        self.nack().await
    }
    async fn nack(self: Box<Self>) -> Result<()> {
        requeue("return permit", self.0).await
    }
    async fn retry(self: Box<Self>, _next: Message, _delay: Duration) -> Result<()> {
        self.nack().await
    }
    async fn progress(&self) -> Result<()> {
        Ok(())
    }
}

/// The cancel requests of the last hour: a stream queue on the control exchange, which every
/// worker reads from its start (`x-stream-offset: first`) and then follows.
fn control_log_binding(n: &Names) -> Binding {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long("stream"));
    args.insert(
        "x-max-age".into(),
        long(&format!(
            "{}s",
            crate::protocol::CONTROL_RETENTION.as_secs()
        )),
    );
    Binding {
        args,
        ..Binding::new(n.control_log(), n.exchange("control"), "")
    }
}

/// A tee's queue: bound to the jobs exchange with the kind's `lane`, at most `backlog` copies with the
/// oldest dropped first (`drop-head`: publishers are never refused or slowed by it). Classic, as
/// a copy needs no replication; durable unless `ephemeral`, which goes with its reader.
fn tee_binding(
    queue: String,
    exchange: String,
    lane: &str,
    backlog: u64,
    ephemeral: bool,
) -> Binding {
    let mut args = FieldTable::default();
    args.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(i64::try_from(backlog.max(1)).unwrap_or(i64::MAX)),
    );
    args.insert("x-overflow".into(), long("drop-head"));
    args.insert("x-queue-type".into(), long("classic"));
    let options = if ephemeral {
        args.insert("x-expires".into(), AMQPValue::LongLongInt(60_000));
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        }
    } else {
        durable()
    };
    Binding {
        args,
        options,
        ..Binding::new(queue, exchange, lane)
    }
}

/// A consumer that comes back: when its channel or connection is lost (a broker restart), it
/// opens a new one, declares again and re-applies the prefetch, retrying with backoff. Deliveries
/// that were not acked on the lost channel are redelivered by the broker.
struct Resubscribing {
    inner: Arc<Inner>,
    source: Feed,
    opts: ConsumeOptions,
    cumulative: bool,
    current: Option<(lapin::Channel, lapin::Consumer)>,
    /// For a job source: its deliveries set aside, and the consumers that make room for them.
    room: Option<room::Extras>,
}

/// What a [`Resubscribing`] consumer reads.
#[derive(Debug)]
enum Feed {
    /// A durable source of messages.
    Source(Source),
    /// The permits of `kind`'s cluster-wide cap, in `queue`.
    Permits { kind: String, queue: String },
    /// The rate tokens of `kind`, in `queue`.
    Tokens { queue: String },
}

impl Inner {
    async fn open_feed(
        &self,
        feed: &Feed,
        opts: ConsumeOptions,
    ) -> Result<(lapin::Channel, lapin::Consumer)> {
        match feed {
            Feed::Source(source) => self.open_consumer(source, opts).await,
            Feed::Permits { queue, .. } => self.consume_queue(queue.clone(), opts, false).await,
            Feed::Tokens { queue } => {
                self.token_queue(queue).await?;
                self.consume_queue(queue.clone(), opts, false).await
            }
        }
    }
}

impl Inner {
    /// The deliveries of `feed`, re-subscribed after a lost connection.
    async fn feed(self: Arc<Self>, feed: Feed, opts: ConsumeOptions) -> Result<DeliveryStream> {
        let first = bounded("consume", self.open_feed(&feed, opts)).await?;
        Ok(Resubscribing {
            inner: self,
            source: feed,
            opts,
            cumulative: false,
            current: Some(first),
            room: None,
        }
        .stream())
    }

    /// Publishes `count` empty messages straight to `queue` (permits, tokens) on a confirm
    /// channel; returns their confirms.
    async fn put_empty(
        &self,
        queue: &str,
        count: u32,
        op: &'static str,
    ) -> Result<Vec<lapin::PublisherConfirm>> {
        let ch = self
            .channels
            .get()
            .await
            .map_err(|e| pool_error("channel pool", e))?;
        let mut confirms = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let confirm = ch
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    b"",
                    BasicProperties::default(),
                )
                .await
                .map_err(|e| amqp_error(op, e))?;
            confirms.push(confirm);
        }
        Ok(confirms)
    }

    /// [`Inner::put_empty`], then waits for every confirm: an error for one that does not come
    /// within [`CONFIRM_TIMEOUT`] (`waiting` names the wait) or is negative.
    async fn put_empty_confirmed(
        &self,
        queue: &str,
        count: u32,
        op: &'static str,
        waiting: &'static str,
    ) -> Result<()> {
        for confirm in self.put_empty(queue, count, op).await? {
            let c = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
                .await
                .map_err(|_| Error::Timeout(CONFIRM_TIMEOUT, waiting))?
                .map_err(|e| amqp_error(op, e))?;
            if c.is_nack() {
                return Err(Error::NotConfirmed {
                    target: queue.to_string(),
                    reason: format!("negative confirm ({op})"),
                });
            }
        }
        Ok(())
    }

    /// Declares a kind's token queue: classic and durable (tokens lost with the broker are
    /// made again by the pacer), with no bound of its own (the pacer counts what waits).
    /// Returns the tokens ready in it.
    async fn token_queue(&self, queue: &str) -> Result<u32> {
        // On a pooled channel: the pacer counts every tick. (A declare that fails closes the
        // channel, and the pool drops it.)
        let ch = self
            .channels
            .get()
            .await
            .map_err(|e| pool_error("channel pool", e))?;
        let q = ch
            .queue_declare(queue.into(), durable(), keyed_bucket_args(queue))
            .await
            .map_err(|e| amqp_error("declare tokens", e))?;
        Ok(q.message_count())
    }
}

impl Drop for Resubscribing {
    fn drop(&mut self) {
        // The reader of one value of a rate key goes with its value's use: its channel must go
        // too (a dropped channel stays open). A token it held unacked goes back to the queue.
        if let (Feed::Tokens { queue }, Some((ch, _))) = (&self.source, self.current.take()) {
            if crate::protocol::is_keyed_bucket(queue) {
                drop(CloseOnDrop(Some(ch)));
            }
        }
    }
}

impl Resubscribing {
    /// The stream of its deliveries.
    fn stream(self) -> DeliveryStream {
        futures::stream::unfold(self, |mut st| async move {
            let delivery = st.next().await;
            Some((delivery, st))
        })
        .boxed()
    }

    async fn next(&mut self) -> Result<Delivery> {
        let mut wait = Duration::from_millis(100);
        loop {
            let Some((_, consumer)) = self.current.as_mut() else {
                let opened = bounded("consume", self.inner.open_feed(&self.source, self.opts));
                match opened.await {
                    Ok(c) => {
                        tracing::info!(source = ?self.source, "consuming again");
                        self.current = Some(c);
                    }
                    Err(e) => {
                        tracing::warn!(source = ?self.source, error = %e, "cannot consume yet, retrying in {wait:?}");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(5));
                    }
                }
                continue;
            };
            let next = match &mut self.room {
                None => consumer.next().await,
                Some(extras) => {
                    if let Err(e) = extras.fit(&self.inner).await {
                        tracing::warn!(source = ?self.source, error = %e, "cannot make room for jobs set aside");
                    }
                    let room = extras.room.clone();
                    let extra = async {
                        match extras.consumers.next().await {
                            Some(d) => d,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        main = consumer.next() => main,
                        d = extra => match d {
                            Ok(d) => return Ok(self.delivery(d)),
                            Err(e) => {
                                // Its channel is gone; the next fit opens another.
                                tracing::warn!(source = ?self.source, error = %e, "extra consumer lost");
                                room.lost();
                                continue;
                            }
                        },
                        _ = room.changed() => continue,
                    }
                }
            };
            match next {
                Some(Ok(d)) => return Ok(self.delivery(d)),
                Some(Err(e)) => {
                    tracing::warn!(source = ?self.source, error = %e, "consumer lost; re-subscribing");
                }
                None => tracing::warn!(source = ?self.source, "consumer ended; re-subscribing"),
            }
            self.current = None;
        }
    }

    fn delivery(&self, d: lapin::message::Delivery) -> Delivery {
        if let Feed::Permits { kind, .. } = &self.source {
            return Delivery::new(
                kind.clone(),
                Message::default(),
                1,
                String::new(),
                Box::new(PermitAcker(d.acker)),
            );
        }
        let (mut headers, redeliveries) = from_amqp(&d.properties);
        let kind = match &self.source {
            Feed::Source(
                Source::Kind(_) | Source::Lane { .. } | Source::Unrouted(_) | Source::Tee { .. },
            ) => crate::priority::arrived(d.routing_key.as_str(), &mut headers),
            _ => kind_of(&d),
        };
        let broker_id = format!("amqp-{}", crate::job::new_id());
        Delivery::new(
            kind.clone(),
            Message::new(headers, d.data),
            redeliveries + 1,
            broker_id,
            Box::new(AmqpAcker {
                acker: Some(d.acker),
                cumulative: self.cumulative,
                kind,
                transport: self.inner.clone(),
                room: self.room.as_ref().map(|extras| extras.room.clone()),
            }),
        )
    }
}

/// Kind of a delivered result or dead letter: its routing key, without a lane's suffix (a job
/// the broker dead-letters keeps its lane as routing key). A job's routing key is its lane,
/// which jobs from delay queues keep: see [`crate::priority::arrived`].
fn kind_of(d: &lapin::message::Delivery) -> String {
    crate::priority::split(d.routing_key.as_str()).0.to_string()
}

/// Settles one AMQP delivery. An acker dropped without being settled (a retry whose copy could
/// not be published, a task that ended early) hands its delivery back: lapin's own acker does
/// nothing when dropped, so the delivery would hold a prefetch slot until the channel closes.
#[must_use = "a delivery must be settled: ack, nack or retry"]
struct AmqpAcker {
    acker: Option<lapin::Acker>,
    cumulative: bool,
    kind: String,
    transport: Arc<Inner>,
    room: Option<Arc<room::Room>>,
}

impl AmqpAcker {
    fn take(&mut self) -> Result<lapin::Acker> {
        self.acker.take().ok_or_else(|| Error::Broker {
            op: "settle",
            cause: "the delivery was settled already".into(),
        })
    }
}

/// Hands one delivery back to its queue for redelivery (`op` names it in errors).
async fn requeue(op: &'static str, acker: lapin::Acker) -> Result<()> {
    let options = BasicNackOptions {
        requeue: true,
        multiple: false,
    };
    bounded(op, async {
        acker
            .nack(options)
            .await
            .map(drop)
            .map_err(|e| Error::broker(op, e))
    })
    .await
}

impl Drop for AmqpAcker {
    fn drop(&mut self) {
        let Some(acker) = self.acker.take() else {
            return;
        };
        if self.cumulative {
            // A cumulative reader acks only the last of a batch, which covers this one; handing
            // it back would requeue a settled delivery (and a late nack of a tag the broker
            // already forgot closes the channel).
            return;
        }
        tracing::debug!(kind = %self.kind, "handing back a delivery that was not settled");
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = requeue("nack", acker).await {
                    tracing::warn!(error = %e, "could not hand back an unsettled delivery");
                }
            });
        }
    }
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        let options = BasicAckOptions {
            multiple: self.cumulative,
        };
        let acker = self.take()?;
        bounded("ack", async {
            acker
                .ack(options)
                .await
                .map(drop)
                .map_err(|e| Error::broker("ack", e))
        })
        .await
    }
    async fn nack(mut self: Box<Self>) -> Result<()> {
        let acker = self.take()?;
        requeue("nack", acker).await
    }
    async fn retry(self: Box<Self>, mut next: Message, delay: Duration) -> Result<()> {
        // Rounded up to a power of two of milliseconds: a handful of delay queues serve all waits.
        let ms = crate::protocol::retry_delay_ms(delay);
        next.headers.insert(header::RETRY_DELAY_MS, ms.to_string());
        let t = self.transport.clone();
        let copied = async {
            t.retry_queue(ms).await?;
            let lane = crate::priority::lane_of(&self.kind, &next.headers);
            t.publish_raw(&t.names.exchange("retry"), &lane, true, &next)
                .await
        }
        .await;
        match copied {
            Ok(()) => {
                crate::fault::point("worker.after-retry-copy");
                self.ack().await
            }
            Err(e) => {
                // The original goes back instead: its redelivery is the next attempt.
                let _ = self.nack().await;
                Err(e)
            }
        }
    }
    async fn progress(&self) -> Result<()> {
        Ok(())
    }
    fn cumulative(&self) -> bool {
        self.cumulative
    }
    fn set_aside(&self) -> Option<super::Aside> {
        let room = self.room.as_ref()?;
        Some(Box::new(room.set_aside()))
    }
}

#[async_trait]
impl Transport for AmqpTransport {
    fn names(&self) -> &Names {
        &self.inner.names
    }

    async fn publish(&self, route: Route, msg: Message) -> Result<()> {
        let t = &self.inner;
        let n = &t.names;
        match &route {
            Route::Job(kind) | Route::Due(kind) => {
                let lane = crate::priority::lane_of(kind, &msg.headers);
                t.publish_raw(&n.exchange("jobs"), &lane, true, &msg).await
            }
            Route::Result(kind) => {
                t.publish_raw(&n.exchange("results"), kind, true, &msg)
                    .await
            }
            Route::Dead(kind) => t.publish_raw(&n.exchange("dead"), kind, true, &msg).await,
            Route::Reply(to) => t.publish_raw(&n.exchange("replies"), to, false, &msg).await,
            Route::Waiting { kind, until_ms } => {
                // A hop through the delay queue that does not pass the job's time; it comes
                // back to the kind's queue and waits again if it is still early.
                let left = until_ms.saturating_sub(crate::job::now_ms());
                let ms = crate::protocol::park_hop_ms(left);
                let mut msg = msg;
                msg.headers.insert(header::RETRY_DELAY_MS, ms.to_string());
                t.retry_queue(ms).await?;
                let lane = crate::priority::lane_of(kind, &msg.headers);
                t.publish_raw(&n.exchange("retry"), &lane, true, &msg).await
            }
        }
    }

    async fn consume(&self, source: Source, opts: ConsumeOptions) -> Result<DeliveryStream> {
        if let Source::Kind(kind) = &source {
            return super::lanes::open_each(|priority| {
                let kind = kind.clone();
                self.consume(Source::Lane { kind, priority }, opts)
            })
            .await;
        }
        let cumulative = opts.cumulative
            && !matches!(
                source,
                Source::Kind(_) | Source::Lane { .. } | Source::Unrouted(_)
            );
        // The first attempt's error is the caller's (a missing permission, say); once consuming,
        // a lost connection is re-opened, re-declared and re-subscribed with the same prefetch.
        let first = bounded("consume", self.inner.open_consumer(&source, opts)).await?;
        let room = self.inner.job_source_queue(&source).map(room::Extras::new);
        Ok(Resubscribing {
            inner: self.inner.clone(),
            source: Feed::Source(source),
            opts,
            cumulative,
            current: Some(first),
            room,
        }
        .stream())
    }

    async fn reply_inbox(&self) -> Result<(String, MessageStream)> {
        let replies = self.inner.names.exchange("replies");
        bounded(
            "reply queue",
            self.inner.private_queue(Bind::OwnName(replies)),
        )
        .await
    }

    async fn broadcast(&self, topic: &str, msg: Message) -> Result<()> {
        // At most once, in order: one channel, not in confirm mode (events and heartbeats are
        // frequent, and nothing is stored for them anyway).
        let t = &self.inner;
        let send = async {
            let mut slot = t.broadcasts.lock().await;
            let ch = match slot.as_ref() {
                Some(ch) if ch.status().connected() => ch.clone(),
                _ => {
                    let ch = t.channel().await?;
                    *slot = Some(ch.clone());
                    ch
                }
            };
            ch.basic_publish(
                t.names.exchange("events").as_str().into(),
                topic.into(),
                BasicPublishOptions::default(),
                &msg.body,
                to_amqp(&msg.headers),
            )
            .await
            .map_err(|e| amqp_error("broadcast", e))
        };
        tokio::time::timeout(CONFIRM_TIMEOUT, send)
            .await
            .map_err(|_| Error::Timeout(CONFIRM_TIMEOUT, "broadcast"))??;
        Ok(())
    }

    async fn listen(&self, pattern: &str) -> Result<MessageStream> {
        // NATS wildcards to AMQP ones: `>` (the rest) is `#`; `*` is the same.
        let bind = Bind::Key(
            self.inner.names.exchange("events"),
            pattern.replace('>', "#"),
        );
        Ok(bounded("listen", self.inner.private_queue(bind)).await?.1)
    }

    async fn emit_event(&self, kind: &str, state: &str, msg: Message) -> Result<()> {
        self.broadcast(&format!("{kind}.{state}"), msg).await
    }

    async fn listen_events(&self, pattern: &str) -> Result<MessageStream> {
        self.listen(pattern).await
    }

    async fn permits(
        &self,
        kind: &str,
        count: u32,
        opts: ConsumeOptions,
    ) -> Result<DeliveryStream> {
        crate::protocol::validate_kind(kind)?;
        let queue = self.inner.names.permit_queue(kind);
        let create = async {
            // Check-and-create under a lock: an exclusive queue only one connection can hold.
            let lock_name = format!("{queue}.lock");
            let lock = loop {
                match self.inner.hold_exclusive(&lock_name).await? {
                    Some(ch) => break ch,
                    // Another worker is creating the permits: try again.
                    None => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            };
            let ch = self.inner.channel().await?;
            let mut args = quorum_args();
            args.insert(
                "x-max-length".into(),
                AMQPValue::LongLongInt(i64::from(count.max(1))),
            );
            args.insert("x-overflow".into(), long("reject-publish"));
            let q = ch
                .queue_declare(queue.as_str().into(), durable(), args)
                .await
                .map_err(|e| amqp_error("declare permits", e))?;
            // A new queue gets its permits: one with none ready and none held (no consumer). A
            // worker that created them released the lock only after the broker confirmed them,
            // so a later check sees them ready, or held by a consumer.
            if q.message_count() == 0 && q.consumer_count() == 0 {
                for confirm in self.inner.put_empty(&queue, count, "create permit").await? {
                    let _ = confirm.await;
                }
            }
            let _ = ch.close(200, "declared".into()).await;
            let _ = lock
                .queue_delete(lock_name.as_str().into(), Default::default())
                .await;
            let _ = lock.close(200, "unlocked".into()).await;
            Ok::<_, Error>(())
        };
        bounded("permits", create).await?;
        // Like every other consumer, the permits' comes back after a lost connection (a broker
        // restart); the permits held on the lost connection return to the queue.
        let feed = Feed::Permits {
            kind: kind.to_string(),
            queue: queue.clone(),
        };
        self.inner.clone().feed(feed, opts).await
    }

    async fn tokens(&self, kind: &str, opts: ConsumeOptions) -> Result<DeliveryStream> {
        crate::protocol::validate_bucket(kind)?;
        let feed = Feed::Tokens {
            queue: self.inner.names.token_subject(kind),
        };
        // One at a time: a token waits in a worker only while a job there waits for it.
        let opts = ConsumeOptions {
            prefetch: 1,
            ..opts
        };
        self.inner.clone().feed(feed, opts).await
    }

    async fn waiting_tokens(&self, kind: &str) -> Result<u64> {
        let queue = self.inner.names.token_subject(kind);
        // Ready tokens; the few taken by waiting workers and not yet acked (one per worker at
        // most) are not counted.
        let ready = bounded("count tokens", self.inner.token_queue(&queue)).await?;
        Ok(u64::from(ready))
    }

    async fn put_tokens(&self, kind: &str, ticks: &[u64]) -> Result<u32> {
        let queue = self.inner.names.token_subject(kind);
        let n = u32::try_from(ticks.len()).unwrap_or(u32::MAX);
        self.inner
            .put_empty_confirmed(&queue, n, "add token", "token confirm")
            .await?;
        Ok(n)
    }

    async fn pace_kind(&self, kind: &str) -> Result<Box<dyn super::FlightClaim>> {
        // The pacer holds the kind's baton ([`baton`]) while it paces; it refreshes it every
        // round, so a look at the channel is its check.
        let queue = format!("{}.pacers.{kind}", self.inner.names.namespace());
        let args = keyed_bucket_args(kind);
        let put = baton::Put::Default;
        let held = baton::take(&self.inner, &queue, args, put, "pacer baton", false).await?;
        Ok(Box::new(held))
    }

    async fn lead(&self, name: &str, _every: Duration) -> Result<Box<dyn super::FlightClaim>> {
        // The leader holds the lead's baton ([`baton`]): the waiting contenders are refused
        // nothing, and the next is handed the lead the moment the leader's connection goes.
        let queue = format!("{}.flights.{name}", self.inner.names.namespace());
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), long("classic"));
        let put = baton::Put::Registers;
        let held = baton::take(&self.inner, &queue, args, put, "lead", true).await?;
        Ok(Box::new(held))
    }

    async fn claim_flight(&self, key: &str) -> Result<Option<Box<dyn super::FlightClaim>>> {
        // An exclusive queue: one connection can hold it; it goes when that connection does.
        let queue = format!("{}.flights.{key}", self.inner.names.namespace());
        Ok(self
            .inner
            .hold_exclusive(&queue)
            .await?
            .map(|ch| Box::new(AmqpFlight { ch, queue }) as Box<dyn super::FlightClaim>))
    }

    async fn read_register(&self, name: &str) -> Result<Option<(u64, bytes::Bytes)>> {
        bounded("read register", registers::read(&self.inner, name)).await
    }

    async fn write_register(
        &self,
        name: &str,
        expected: u64,
        value: bytes::Bytes,
    ) -> Result<Option<u64>> {
        bounded(
            "write register",
            registers::write(&self.inner, name, expected, value),
        )
        .await
    }

    async fn tee_backlog(&self, kind: &str, name: &str) -> Result<u64> {
        let queue = self.inner.names.tee_queue(name, kind);
        let ch = self.inner.channel().await?;
        let q = ch
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| amqp_error("tee backlog", e))?;
        let _ = ch.close(200, "checked".into()).await;
        Ok(u64::from(q.message_count()))
    }

    async fn delete_tee(&self, kind: &str, name: &str) -> Result<()> {
        use lapin::options::QueueDeleteOptions;
        let queue = self.inner.names.tee_queue(name, kind);
        let ch = self.inner.channel().await?;
        ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .map_err(|e| amqp_error("delete tee", e))?;
        let _ = ch.close(200, "deleted".into()).await;
        Ok(())
    }

    async fn send_control(&self, msg: Message) -> Result<()> {
        let t = &self.inner;
        t.publish_raw(&t.names.exchange("control"), "", false, &msg)
            .await
    }

    async fn listen_control(&self) -> Result<(u64, MessageStream)> {
        // The log from its first entry, then what comes. A stream queue wants a prefetch and
        // acks (they only move the consumer's window; nothing is removed).
        let open = async {
            let ch = self.inner.channel().await?;
            ch.basic_qos(100, BasicQosOptions::default())
                .await
                .map_err(|e| amqp_error("basic.qos", e))?;
            let mut args = FieldTable::default();
            args.insert("x-stream-offset".into(), long("first"));
            let consumer = ch
                .basic_consume(
                    self.inner.names.control_log().as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    args,
                )
                .await
                .map_err(|e| amqp_error("basic.consume", e))?;
            Ok::<_, Error>((ch, consumer))
        };
        let (ch, consumer) = bounded("listen control", open).await?;
        let mut messages = consumer
            .filter_map(move |d| {
                let _keep_channel_open = &ch;
                async move {
                    let d = d.ok()?;
                    let _ = d.ack(lapin::options::BasicAckOptions::default()).await;
                    let (h, _) = from_amqp(&d.properties);
                    Some(Message::new(h, d.data))
                }
            })
            .boxed();
        // The stream queue's message count lags behind its log, so the end of what is kept is
        // found with a marker of this reader's own: everything before it in the log is kept.
        let marker = format!("{{\"sync\":\"{}\"}}", crate::job::new_id());
        let t = &self.inner;
        t.publish_raw(
            &t.names.exchange("control"),
            "",
            false,
            &Message::new(Headers::new(), marker.clone()),
        )
        .await?;
        let mut kept = Vec::new();
        let read = async {
            while let Some(m) = messages.next().await {
                if m.body == marker.as_bytes() {
                    return true;
                }
                kept.push(m);
            }
            false
        };
        if !matches!(tokio::time::timeout(OP_TIMEOUT, read).await, Ok(true)) {
            return Err(Error::Timeout(OP_TIMEOUT, "reading the control log"));
        }
        let n = kept.len() as u64;
        Ok((n, futures::stream::iter(kept).chain(messages).boxed()))
    }

    async fn delete_namespace(&self, kinds: &[String]) -> Result<()> {
        use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
        let n = &self.inner.names;
        let ch = self.inner.channel().await?;
        let mut queues = vec![
            n.unrouted(),
            n.results_queue(),
            n.dead_queue(),
            n.control_log(),
        ];
        queues.extend(kinds.iter().flat_map(|kind| {
            crate::priority::Priority::ALL.map(|p| n.job_queue(&crate::priority::lane(kind, p)))
        }));
        queues.extend(kinds.iter().map(|kind| n.permit_queue(kind)));
        queues.extend(kinds.iter().map(|kind| n.token_subject(kind)));
        queues.extend(
            kinds
                .iter()
                .map(|kind| format!("{}.pacers.{kind}", n.namespace())),
        );
        // Every delay a retry can have been rounded to (see `AmqpAcker::retry`).
        queues.extend(crate::protocol::retry_delays_ms().map(|ms| n.retry_queue(ms)));
        // The scheduler's lead, and the claims of the ticks of the schedules there are.
        queues.push(format!("{}.flights.scheduler", n.namespace()));
        let schedules = crate::schedule::table::list(self).await.unwrap_or_default();
        let runs = schedules.keys().map(|s| crate::schedule::runs::register(s));
        // With the schedules and their ticks.
        let registers = [
            crate::schedule::table::SCHEDULES.to_string(),
            crate::schedule::table::TICKS.to_string(),
        ];
        for r in runs.chain(registers) {
            queues.push(registers::queue(&self.inner, &r)?);
        }
        for q in queues {
            ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(|e| amqp_error("delete queue", e))?;
        }
        for class in [
            "jobs",
            "results",
            "dead",
            "events",
            "control",
            "replies",
            "retry",
            "registers",
        ] {
            ch.exchange_delete(
                n.exchange(class).as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await
            .map_err(|e| amqp_error("delete exchange", e))?;
        }
        ch.exchange_delete(
            n.unrouted().as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .map_err(|e| amqp_error("delete exchange", e))?;
        self.inner.lock_retry().clear();
        let _ = ch.close(200, "namespace deleted".into()).await;
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        // Quorum queues apply acks asynchronously: a synchronous round trip on each consuming
        // channel (basic.qos waits for qos-ok, after the acks sent before it) lets them settle
        // before the channel closes, so a clean shutdown does not redeliver finished jobs.
        let channels: Vec<(lapin::Channel, u16)> = std::mem::take(
            &mut *self
                .inner
                .consumer_channels
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for (ch, prefetch) in channels {
            if ch.status().connected() {
                let round_trip = async {
                    let _ = ch.basic_qos(prefetch, BasicQosOptions::default()).await;
                    let _ = ch.close(200, "closing".into()).await;
                    Ok(())
                };
                let _ = bounded("close", round_trip).await;
            }
        }
        self.inner.channels.close();
        Ok(())
    }
}
mod baton;
mod pool;
pub mod raw;
mod registers;
mod room;

use pool::{amqp_error, pool_error, ChannelManager, ConnectionManager};
