//! The broker boundary. The rest of the library sees only [`Transport`], [`Delivery`] and
//! [`Message`]; `async_nats` and `lapin` types stay inside their adapter modules.

use crate::broker_url::{BrokerKind, BrokerUrl};
use crate::error::{Error, Result};
use crate::message::Message;
use crate::protocol::Names;
use async_trait::async_trait;
use futures::stream::BoxStream;
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "amqp")]
pub mod amqp;
pub(crate) mod lanes;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(test)]
pub(crate) mod offline;
pub mod retry;

/// Where a published message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A job of this kind (durable, confirmed).
    Job(String),
    /// A final result of a job of this kind (durable, confirmed).
    Result(String),
    /// A dead letter of a job of this kind (durable, confirmed).
    Dead(String),
    /// A reply address a waiting client gave (best effort: the waiter may be gone).
    Reply(String),
    /// A job of this kind that is not due until `until_ms` (milliseconds since the epoch), into
    /// the broker's waiting place (durable, confirmed). It comes back to the kind's consumers by
    /// itself (RabbitMQ: from a delay queue, maybe before its time, and waits again), or from
    /// [`Source::Waiting`] (JetStream).
    Waiting {
        /// Job kind.
        kind: String,
        /// When it is due.
        until_ms: u64,
    },
    /// A waiting job whose time has come, back to its kind's consumers (durable, confirmed).
    /// JetStream de-duplicates it per id and time, not per id: the job's own publish is within
    /// the window.
    Due(String),
}

/// What to consume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// One kind's jobs, shared with every worker that takes the kind: its priority lanes,
    /// read in turns (see [`crate::priority`]).
    Kind(String),
    /// One priority lane of a kind's jobs only.
    Lane {
        /// Job kind.
        kind: String,
        /// The lane.
        priority: crate::priority::Priority,
    },
    /// Jobs whose kind no worker has declared yet: the catch-all worker's share. The kinds
    /// listed are consumed separately by the caller.
    Unrouted(Vec<String>),
    /// All results, for the named reader (the aggregator is `aggregator`).
    Results(String),
    /// All dead letters, for the named reader.
    Dead(String),
    /// Jobs waiting for their time (JetStream; see [`Transport::releases_waiting`]): each is
    /// delivered again and again (with [`Delivery::retry`]'s delay) until it is published with
    /// [`Route::Due`] and acked.
    Waiting,
    /// A copy of every job of `kind` published from the moment the tee exists, for the tee
    /// `name` (audit, shadow traffic). Workers are unaffected: the copies wait in a backlog of
    /// their own, of at most `backlog` messages, where the oldest copy is dropped for a new one.
    /// Kept while nobody reads it unless [`ConsumeOptions::ephemeral`]. Settling a copy never
    /// touches the job itself.
    Tee {
        /// Job kind.
        kind: String,
        /// The tee's name (letters, digits, `-`, `_`).
        name: String,
        /// Most copies waiting.
        backlog: u64,
    },
}

/// Settles one delivery with the broker. Implemented by each adapter.
#[async_trait]
pub trait Acker: Send + Sync {
    /// Done: remove the message.
    async fn ack(self: Box<Self>) -> Result<()>;
    /// Hand the message back for redelivery now (shutdown, drain).
    async fn nack(self: Box<Self>) -> Result<()>;
    /// Redeliver after `delay`; `next` is the message as the next attempt should see it.
    async fn retry(self: Box<Self>, next: Message, delay: Duration) -> Result<()>;
    /// Still working: extend the lease (no-op where the broker has no lease).
    async fn progress(&self) -> Result<()>;
    /// True when [`Acker::ack`] also acknowledges every earlier delivery of the same consumer.
    fn cumulative(&self) -> bool {
        false
    }
    /// See [`Delivery::set_aside`]. By default nothing: the broker sends on demand.
    fn set_aside(&self) -> Option<Aside> {
        None
    }
}

/// A delivery set aside ([`Delivery::set_aside`]): the room made for another goes when it drops.
pub type Aside = Box<dyn std::any::Any + Send + Sync>;

/// One message delivered from a durable source. It must be settled once, by value:
/// [`Delivery::ack`], [`Delivery::nack`] or [`Delivery::retry`]. One dropped unsettled is
/// handed back by its adapter (RabbitMQ at once; JetStream once its lease runs out).
#[must_use = "a delivery must be settled: ack, nack or retry"]
pub struct Delivery {
    /// Kind, from the subject or routing key (`""` for results and dead letters without one).
    pub kind: String,
    /// The message, headers normalized (AMQP properties appear as Conveyor headers).
    pub message: Message,
    /// How many times the broker has delivered this message, from 1.
    pub delivery_count: u32,
    /// An id derived from the broker's own message identity, for jobs published without one.
    pub broker_id: String,
    acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("kind", &self.kind)
            .field("delivery_count", &self.delivery_count)
            .field("broker_id", &self.broker_id)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// Builds a delivery (for adapters).
    pub fn new(
        kind: String,
        message: Message,
        delivery_count: u32,
        broker_id: String,
        acker: Box<dyn Acker>,
    ) -> Self {
        Delivery {
            kind,
            message,
            delivery_count: delivery_count.max(1),
            broker_id,
            acker,
        }
    }

    /// Acknowledges: the broker forgets the message.
    pub async fn ack(self) -> Result<()> {
        self.acker.ack().await
    }

    /// Hands the message back for immediate redelivery.
    pub async fn nack(self) -> Result<()> {
        self.acker.nack().await
    }

    /// Schedules redelivery of `next` after `delay`.
    pub async fn retry(self, next: Message, delay: Duration) -> Result<()> {
        self.acker.retry(next, delay).await
    }

    /// True when acking this delivery also acknowledges every earlier delivery of its consumer
    /// (asked for with [`ConsumeOptions::cumulative`]): a reader that settles in delivery order
    /// then acks only the last of a batch.
    pub fn acks_cumulatively(&self) -> bool {
        self.acker.cumulative()
    }

    /// Extends the lease while a long job runs.
    pub async fn progress(&self) -> Result<()> {
        self.acker.progress().await
    }

    /// Says that this delivery will wait in the worker without running (a job waiting for a
    /// singleflight run): where the broker caps the deliveries a consumer holds unsettled
    /// (RabbitMQ's prefetch), the consumer makes room for one more until the returned guard
    /// drops. `None` where the broker sends on demand (JetStream pulls as the worker reads).
    pub fn set_aside(&self) -> Option<Aside> {
        self.acker.set_aside()
    }
}

/// A held singleflight claim: while it is held no other process can claim the same key.
#[async_trait]
pub trait FlightClaim: Send + Sync {
    /// Keeps the claim alive (JetStream claims expire unless refreshed).
    async fn refresh(&self) -> Result<()>;
    /// Gives the claim up.
    async fn release(self: Box<Self>) -> Result<()>;
}

/// A stream of deliveries; an `Err` item is a broker error the consumer may log and survive.
pub type DeliveryStream = BoxStream<'static, Result<Delivery>>;
/// A stream of plain messages (replies).
pub type MessageStream = BoxStream<'static, Message>;

/// Settings of consumers that the broker enforces.
#[derive(Debug, Clone, Copy)]
pub struct ConsumeOptions {
    /// Messages delivered but not yet settled, at most (pull batch / prefetch).
    pub prefetch: u16,
    /// How long a delivered job may go without ack or progress before redelivery
    /// (JetStream AckWait; RabbitMQ redelivers when the connection drops instead).
    pub lease: Duration,
    /// For result and dead-letter readers: start with what arrives from now on, and let the broker
    /// remove the reader's consumer or queue about a minute after it goes away.
    pub ephemeral: bool,
    /// The reader settles in delivery order and wants one ack to cover all earlier deliveries of
    /// its channel (AMQP `multiple`). Only for result and dead-letter readers. JetStream ignores
    /// it: its cumulative ack covers a whole consumer, across reader restarts.
    pub cumulative: bool,
    /// Take one message at a time from the broker, for a kind whose jobs wait on a rate: JetStream
    /// pulls one at a time, so waiting jobs stay in the stream. RabbitMQ ignores it (its prefetch
    /// also caps the jobs running at once).
    pub one_at_a_time: bool,
}

impl Default for ConsumeOptions {
    fn default() -> Self {
        ConsumeOptions {
            prefetch: 32,
            lease: Duration::from_secs(30),
            ephemeral: false,
            cumulative: false,
            one_at_a_time: false,
        }
    }
}

/// A broker connection with the Conveyor topology of one namespace.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// The namespace's names.
    fn names(&self) -> &Names;

    /// Publishes and waits for the broker's confirm. An unroutable or refused message is an error.
    async fn publish(&self, route: Route, msg: Message) -> Result<()>;

    /// Consumes a durable source.
    async fn consume(&self, source: Source, opts: ConsumeOptions) -> Result<DeliveryStream>;

    /// True when jobs published with [`Route::Waiting`] wait in [`Source::Waiting`], from which a
    /// worker moves each to its kind when due (JetStream); false when they come back by
    /// themselves (RabbitMQ's delay queues).
    fn releases_waiting(&self) -> bool {
        false
    }

    /// True when the broker itself drops a second publish of a job id (JetStream's
    /// de-duplication window); false when each publish is a job (RabbitMQ), so that a worker
    /// claims a scheduler's tick before running it ([`crate::schedule::runs`]).
    fn drops_republished_ids(&self) -> bool {
        false
    }

    /// Checks that a job's reply address `to` is one a reply may go to, before anything is
    /// published there (an error says why not; the job is then dead-lettered). NATS replies must
    /// stay in the inbox space ([`crate::protocol::check_nats_reply`]); RabbitMQ replies can only
    /// reach the reply queues bound to the namespace's replies exchange, so any name is safe.
    fn check_reply_to(&self, to: &str) -> std::result::Result<(), String> {
        let _ = to;
        Ok(())
    }

    /// Opens a private reply address and the stream of what arrives there.
    async fn reply_inbox(&self) -> Result<(String, MessageStream)>;

    /// Publishes at most once to every current listener of `topic` (dot-separated words, e.g.
    /// `heartbeats.<worker>`): NATS subject `<ns>.<topic>`, RabbitMQ exchange `<ns>.events` with
    /// routing key `<topic>`. Not confirmed, not stored.
    async fn broadcast(&self, topic: &str, msg: Message) -> Result<()>;

    /// Receives what is broadcast on topics matching `pattern` from now on (`*` one word, `>`
    /// the rest, as in NATS subjects).
    async fn listen(&self, pattern: &str) -> Result<MessageStream>;

    /// Publishes a lifecycle event at most once (DESIGN: NATS subject
    /// `<ns>.events.<kind>.<state>`, RabbitMQ exchange `<ns>.events` with routing key
    /// `<kind>.<state>`). Not confirmed, not stored.
    async fn emit_event(&self, kind: &str, state: &str, msg: Message) -> Result<()>;

    /// Receives the events whose `<kind>.<state>` matches `pattern` (`supervisor.>`, `*.dead`)
    /// from now on.
    async fn listen_events(&self, pattern: &str) -> Result<MessageStream>;

    /// Sends a control message (a cancel request) to every process listening now: NATS subject
    /// `<ns>.control.cancel`, RabbitMQ fanout exchange `<ns>.control` (confirmed). Not stored.
    async fn send_control(&self, msg: Message) -> Result<()>;

    /// Receives the control messages the broker keeps (the last hour's), then those sent from
    /// now on. Also returns how many were kept when it subscribed: the stream's first messages.
    async fn listen_control(&self) -> Result<(u64, MessageStream)>;

    /// The `count` permits of `kind`'s cluster-wide concurrency cap, created once for the
    /// namespace (never more than `count`), delivered to whoever holds one: a delivery is a held
    /// permit, [`Delivery::nack`] returns it, and the broker returns the permits of a holder that
    /// dies (RabbitMQ when its connection drops, JetStream after the lease unless
    /// [`Delivery::progress`] extends it). `opts.prefetch` is how many this process may hold.
    async fn permits(&self, kind: &str, count: u32, opts: ConsumeOptions)
        -> Result<DeliveryStream>;

    /// A reader of `kind`'s rate tokens, which [`Transport::put_tokens`] puts in: each delivery
    /// is one token, to be acked when taken. Pulled one at a time, so a token waits in a worker
    /// only while a job of it waits for one.
    async fn tokens(&self, kind: &str, opts: ConsumeOptions) -> Result<DeliveryStream>;

    /// How many of `kind`'s tokens wait in its bucket (on JetStream, taken-but-unacked ones
    /// included; RabbitMQ counts only those not yet delivered).
    async fn waiting_tokens(&self, kind: &str) -> Result<u64>;

    /// Puts one token per tick of `ticks` (the rate's time slots since the epoch) in `kind`'s
    /// bucket; returns how many it stored. Where [`Transport::tokens_need_a_pacer`] is false,
    /// every worker of the kind may put the same ticks and each tick's token is stored once;
    /// otherwise only the kind's elected pacer calls it.
    async fn put_tokens(&self, kind: &str, ticks: &[u64]) -> Result<u32>;

    /// Waits until this process is `kind`'s rate pacer, and returns its claim (refresh fails
    /// once it is lost). Only where [`Transport::tokens_need_a_pacer`] is true; the default
    /// contends with [`Transport::claim_flight`] every second.
    async fn pace_kind(&self, kind: &str) -> Result<Box<dyn FlightClaim>> {
        use sha2::{Digest, Sha256};
        let key = format!(
            "pacer{}",
            hex::encode(&Sha256::digest(kind.as_bytes())[..16])
        );
        loop {
            match self.claim_flight(&key).await {
                Ok(Some(claim)) => return Ok(claim),
                Ok(None) => {}
                Err(e) => tracing::warn!(%kind, error = %e, "cannot contend for pacing yet"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// True when [`Transport::put_tokens`] must have one caller at a time (a pacer elected with
    /// a claim); false when the broker keeps one token per tick itself.
    fn tokens_need_a_pacer(&self) -> bool {
        true
    }

    /// Claims singleflight key `key` (letters and digits) for this process: `None` when another
    /// process holds it. A claim of a process that dies is freed by the broker (RabbitMQ when its
    /// connection closes, JetStream when it is not refreshed for [`FLIGHT_TTL`]).
    async fn claim_flight(&self, key: &str) -> Result<Option<Box<dyn FlightClaim>>>;

    /// Waits until this process leads `name` (one process of the namespace at a time), and
    /// returns the lead, held until released or the process dies; abandoned by dropping the
    /// future. By default, [`Transport::claim_flight`] tried every `every`. RabbitMQ: the first
    /// consumer of a single-active-consumer queue, handed the lead at once when the leader's
    /// connection goes, with no attempt refused meanwhile.
    async fn lead(&self, name: &str, every: Duration) -> Result<Box<dyn FlightClaim>> {
        loop {
            if let Some(claim) = self.claim_flight(name).await? {
                return Ok(claim);
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Reads register `name` (letters, digits, '-' and '_'): a small value the broker keeps
    /// durably, with its revision; `None` when it was never written.
    async fn read_register(&self, name: &str) -> Result<Option<(u64, bytes::Bytes)>>;

    /// Writes register `name` if its revision is still `expected` (0: never written): the new
    /// revision, or `None` when another write came first.
    async fn write_register(
        &self,
        name: &str,
        expected: u64,
        value: bytes::Bytes,
    ) -> Result<Option<u64>>;

    /// Copies waiting in tee `name` of `kind` (delivered and unsettled ones included where the
    /// broker counts them).
    async fn tee_backlog(&self, kind: &str, name: &str) -> Result<u64>;

    /// Removes tee `name` of `kind` and the copies in it.
    async fn delete_tee(&self, kind: &str, name: &str) -> Result<()>;

    /// Makes the broker drop a job re-published with the same id for at least `window` after
    /// the first (JetStream's de-duplication window, widened when shorter; never narrowed).
    /// RabbitMQ drops no copies, so there it does nothing: the aggregator records each id once
    /// on both brokers whatever the window.
    async fn keep_job_ids(&self, window: Duration) -> Result<()> {
        let _ = window;
        Ok(())
    }

    /// Settles everything in flight and closes the connection cleanly.
    async fn close(&self) -> Result<()>;

    /// Deletes what the namespace declared on the broker: its streams (NATS), or its exchanges
    /// and queues, including the job and retry queues of `kinds` (RabbitMQ, which cannot list
    /// queues). Every job, result and dead letter in them is lost: for tests and decommissioning.
    async fn delete_namespace(&self, kinds: &[String]) -> Result<()>;
}

/// How long the broker keeps the token queue, pacer queue and consumers of one value of a rate
/// key (see [`crate::protocol::rate_bucket`]) once nobody uses them.
pub const KEYED_BUCKET_IDLE: Duration = Duration::from_secs(600);

/// How long a JetStream singleflight claim lives without a refresh.
pub const FLIGHT_TTL: Duration = Duration::from_secs(6);

/// Connects to the broker the URL names and declares the namespace's topology.
pub async fn connect(url: &BrokerUrl, namespace: &str) -> Result<Arc<dyn Transport>> {
    let names = Names::new(namespace)?;
    match url.kind() {
        #[cfg(feature = "nats")]
        BrokerKind::Nats => Ok(Arc::new(nats::NatsTransport::connect(url, names).await?)),
        #[cfg(feature = "amqp")]
        BrokerKind::Amqp => Ok(Arc::new(amqp::AmqpTransport::connect(url, names).await?)),
        #[allow(unreachable_patterns)]
        other => Err(Error::Config(format!(
            "this build has no {other:?} support: enable the cargo feature"
        ))),
    }
}

/// Connects, retrying transient failures with backoff until `patience` runs out.
pub async fn connect_with_retry(
    url: &BrokerUrl,
    namespace: &str,
    patience: Duration,
) -> Result<Arc<dyn Transport>> {
    let backoff = crate::worker::backoff::Backoff {
        base: Duration::from_millis(100),
        max: Duration::from_secs(5),
    };
    let what = format!("connecting to {url}");
    retry::retrying(&what, backoff, patience, || connect(url, namespace)).await
}

/// The backoff of confirmed publishes: from 50 ms up to 2 s.
pub const PUBLISH_BACKOFF: crate::worker::backoff::Backoff = crate::worker::backoff::Backoff {
    base: Duration::from_millis(50),
    max: Duration::from_secs(2),
};

/// Publishes with confirms, retrying transient failures with backoff until `patience` runs out.
pub async fn publish_retrying(
    transport: &dyn Transport,
    route: Route,
    msg: Message,
    patience: Duration,
) -> Result<()> {
    let what = format!("publish to {route:?}");
    retry::retrying(&what, PUBLISH_BACKOFF, patience, || {
        transport.publish(route.clone(), msg.clone())
    })
    .await
}
