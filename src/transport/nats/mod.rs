//! NATS JetStream adapter.
//!
//! Streams (names follow the namespace): `<NS>_JOBS` on `<ns>.jobs.>` with work-queue retention (a
//! job leaves the stream when acked), `<NS>_RESULTS` on `<ns>.results.>` and `<NS>_DEAD` on
//! `<ns>.dead.>` with limits retention. Each job kind has one durable pull consumer,
//! `workers=<kind>`, that all worker replicas share; its filter is exactly that kind's subject, so
//! consumers never overlap on the work-queue stream.

use super::{
    Acker, ConsumeOptions, Delivery, DeliveryStream, MessageStream, Route, Source, Transport,
};
use crate::broker_url::BrokerUrl;
use crate::error::{Error, Result};
use crate::message::{Headers, Message};
use crate::protocol::{consumer_name_for_kind, header, Names};
use async_nats::jetstream::{self, consumer::pull, stream, AckKind};
use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

mod held;
mod poison;

/// How long a publish may wait for its PubAck.
const PUBLISH_ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// JetStream de-duplication window: a publish retried within it is stored once. 150 s: the
/// default 30 s lease times the default 5 attempts; workers with a longer lease widen the jobs
/// stream's ([`Transport::keep_job_ids`]).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(150);
/// The widest de-duplication window asked for: the server keeps every id of the window.
const MAX_DUPLICATE_WINDOW: Duration = Duration::from_secs(86_400);
/// The most bytes the control stream (cancel requests) keeps.
const CONTROL_MAX_BYTES: i64 = 64 * 1024 * 1024;
/// The largest cancel request the control stream takes.
const CONTROL_MAX_MESSAGE: i32 = 256 * 1024;
/// How long an ephemeral reader's consumer outlives its last pull.
const EPHEMERAL_IDLE: Duration = Duration::from_secs(60);
/// How often the catch-all worker looks for job subjects that no consumer serves.
const DISCOVERY_INTERVAL: Duration = Duration::from_millis(500);

/// A NATS connection with the namespace's streams declared. Cheap to clone.
#[derive(Clone)]
pub struct NatsTransport {
    client: async_nats::Client,
    js: jetstream::Context,
    names: Names,
    /// Counts the connection's (re)connects: job consumers look for unreadable jobs after each.
    connects: watch::Receiver<u64>,
    /// Where a job's reply may go: subjects that begin with this (the inbox prefix).
    reply_prefix: String,
    /// The largest message the server takes (its `max_payload`), read when connecting.
    max_payload: usize,
    /// The rate tokens' stream, once declared (pacers count tokens every round).
    tokens: Arc<tokio::sync::OnceCell<stream::Stream>>,
}

/// NATS headers from ours, leaving out `skip` (a job's id travels as `Nats-Msg-Id` instead).
fn to_nats_headers(h: &Headers, skip: Option<&str>) -> async_nats::HeaderMap {
    let mut map = async_nats::HeaderMap::new();
    for (k, v) in h.iter() {
        if skip.is_some_and(|s| k.eq_ignore_ascii_case(s)) {
            continue;
        }
        map.insert(k, v);
    }
    map
}

fn from_nats_headers(h: Option<&async_nats::HeaderMap>) -> Headers {
    let mut out = Headers::new();
    if let Some(h) = h {
        for (k, values) in h.iter() {
            if let Some(v) = values.first() {
                out.insert(k.to_string(), v.as_str());
            }
        }
    }
    out
}

/// Connects to the NATS server of `url`. Credentials in the URL are handed over as connect
/// options, not inside the address: async-nats logs its server addresses, and they must not
/// carry a password.
pub(crate) async fn connect_client(url: &BrokerUrl, name: String) -> Result<async_nats::Client> {
    connect_counting(url, name, Arc::new(watch::channel(0).0)).await
}

/// [`connect_client`], counting every (re)connect in `connects`.
async fn connect_counting(
    url: &BrokerUrl,
    name: String,
    connects: Arc<watch::Sender<u64>>,
) -> Result<async_nats::Client> {
    let mut address = url.url().clone();
    let decode = |s: &str| {
        url::form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    let user = decode(address.username());
    let password = address.password().map(decode);
    let _ = address.set_username("");
    let _ = address.set_password(None);
    address.set_query(None);
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .custom_inbox_prefix(url.inbox_prefix())
        .event_callback(move |event| {
            let connects = connects.clone();
            async move {
                match event {
                    // A permissions violation only comes back this way: the refused message or
                    // request is dropped by the server, and the caller sees a time-out.
                    async_nats::Event::ServerError(e) => {
                        tracing::warn!(error = %e, "the NATS server refused an operation")
                    }
                    async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                    async_nats::Event::Connected => {
                        tracing::info!("connected to NATS");
                        connects.send_modify(|n| *n += 1);
                    }
                    other => tracing::debug!(event = %other, "NATS connection event"),
                }
            }
        });
    match (user.is_empty(), password) {
        (false, Some(password)) => options = options.user_and_password(user, password),
        (false, None) => options = options.token(user),
        _ => {}
    }
    if let Some(ca) = url.ca_file() {
        options = options.add_root_certificates(ca.to_path_buf());
    }
    if let Some(every) = url.ping_interval() {
        options = options.ping_interval(every);
    }
    if url.is_tls() {
        options = options.require_tls(true);
    }
    if let Some(creds) = url.credentials_file() {
        options = options.credentials_file(creds).await.map_err(|e| {
            Error::Config(format!("NATS credentials file {}: {e}", creds.display()))
        })?;
    }
    options.connect(address.as_str()).await.map_err(|e| {
        use async_nats::ConnectErrorKind as K;
        match e.kind() {
            K::AuthorizationViolation | K::Authentication => Error::Denied {
                op: "connect",
                reason: e.to_string(),
            },
            _ => Error::broker("connect", e),
        }
    })
}

impl NatsTransport {
    /// Connects and declares the streams.
    pub async fn connect(url: &BrokerUrl, names: Names) -> Result<Self> {
        let (counter, connects) = watch::channel(0);
        let name = format!("conveyor-{}", names.namespace());
        let client = connect_counting(url, name, Arc::new(counter)).await?;
        let js = jetstream::ContextBuilder::new()
            .ack_timeout(PUBLISH_ACK_TIMEOUT)
            .build(client.clone());
        let max_payload = client.server_info().max_payload;
        let t = NatsTransport {
            client,
            js,
            names,
            connects,
            reply_prefix: format!("{}.", url.inbox_prefix()),
            max_payload,
            tokens: Arc::default(),
        };
        t.declare(url.max_bytes()).await?;
        Ok(t)
    }

    /// Declares the namespace's streams. With `max_bytes` (the URL's), the jobs, results and
    /// dead-letter streams are bounded in bytes: the jobs stream refuses what would pass it
    /// (discard `new`: its publishers wait, nothing stored is lost), the others drop their
    /// oldest; an existing stream is changed to it.
    async fn declare(&self, max_bytes: Option<u64>) -> Result<()> {
        let n = &self.names;
        let ns = n.namespace();
        let streams = [
            (
                n.stream("jobs"),
                format!("{ns}.jobs.>"),
                stream::RetentionPolicy::WorkQueue,
                Duration::ZERO,
            ),
            (
                n.stream("results"),
                format!("{ns}.results.>"),
                stream::RetentionPolicy::Limits,
                Duration::from_secs(7 * 86_400),
            ),
            (
                n.stream("dead"),
                format!("{ns}.dead.>"),
                stream::RetentionPolicy::Limits,
                Duration::from_secs(30 * 86_400),
            ),
            // Cancel requests, kept for workers that start after them.
            (
                n.stream("control"),
                format!("{ns}.control.>"),
                stream::RetentionPolicy::Limits,
                crate::protocol::CONTROL_RETENTION,
            ),
        ];
        let jobs = n.stream("jobs");
        let control = n.stream("control");
        for (name, subject, retention, max_age) in streams {
            // The jobs stream republishes every stored job for tees (a stream's republish can
            // only be set when it is created); with no tee, nothing listens and nothing is kept.
            let republish = (name == jobs).then(|| self.tee_republish());
            // Cancel requests are small and anyone who may cancel may send them: the control
            // stream is bounded in bytes and per message, the oldest requests dropped first.
            let bounded = name != control;
            // The jobs stream refuses what would pass its bound: its publishers wait, nothing
            // stored is lost. Results and dead letters are acked, not removed, by their reader
            // (they are kept for others to read, up to their age): at the bound the oldest go.
            let wanted_discard = if name == jobs {
                stream::DiscardPolicy::New
            } else {
                stream::DiscardPolicy::Old
            };
            // JetStream reserves a bounded stream's bytes on the server when it is created, so
            // a bound is only set when the URL names one: a default would reserve it for every
            // namespace, and a server of a few namespaces would refuse the next.
            let (bytes, max_message_size, discard) = if bounded {
                let bytes = max_bytes.map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX));
                (bytes, -1, wanted_discard)
            } else {
                (
                    CONTROL_MAX_BYTES,
                    CONTROL_MAX_MESSAGE,
                    stream::DiscardPolicy::Old,
                )
            };
            let config = stream::Config {
                name,
                subjects: vec![subject],
                retention,
                max_age,
                storage: stream::StorageType::File,
                duplicate_window: DUPLICATE_WINDOW,
                republish,
                max_bytes: bytes,
                max_message_size,
                discard,
                ..Default::default()
            };
            let mut stream = self
                .js
                .get_or_create_stream(config.clone())
                .await
                .map_err(|e| Error::broker("declare stream", e))?;
            if bounded && max_bytes.is_some() {
                let info = stream
                    .info()
                    .await
                    .map_err(|e| Error::broker("stream info", e))?;
                let current = info.config.clone();
                if current.max_bytes != bytes || current.discard != wanted_discard {
                    tracing::info!(
                        stream = %current.name,
                        from = current.max_bytes,
                        to = bytes,
                        "changing the stream's byte bound (max_bytes in the broker URL)"
                    );
                    let updated = stream::Config {
                        max_bytes: bytes,
                        discard: wanted_discard,
                        ..current
                    };
                    self.js.update_stream(updated).await.map_err(|e| {
                        Error::Config(format!(
                            "the broker URL asks for max_bytes={} on stream {}, which has {}, \
                             and the stream could not be changed ({e}); drop max_bytes from \
                             the URL or let this user update the stream",
                            bytes, config.name, info.config.max_bytes
                        ))
                    })?;
                }
            }
        }
        Ok(())
    }

    /// A reader of `kind`'s messages on `filter` in stream `class` (permits, tokens), through the
    /// kind's durable consumer there. Pulled only when a job waits for one: a permit or token
    /// never waits in a worker that does not need it while another does. Pull requests are
    /// short, so that after a reconnect they come back within seconds.
    async fn one_at_a_time(
        &self,
        class: &str,
        kind: &str,
        filter: String,
        opts: ConsumeOptions,
    ) -> Result<DeliveryStream> {
        let n = &self.names;
        let opts = ConsumeOptions {
            ephemeral: false,
            one_at_a_time: true,
            ..opts
        };
        let consumer = self
            .consumer(
                &n.stream(class),
                &format!("{class}={}", kind.replace('.', "=")),
                filter,
                opts,
            )
            .await?;
        let (stream, _closed) = held::job_stream(consumer, opts, n.namespace().len() + 1);
        Ok(stream)
    }

    /// The stream of every kind's rate tokens: a work queue (a token acked is gone), on disk so
    /// that it and its consumers outlive a server restart, kept at most an hour. It remembers a
    /// token's id (`<kind>:<tick>`) for 10 minutes: workers' clocks must agree far better.
    async fn tokens_stream(&self) -> Result<stream::Stream> {
        let n = &self.names;
        let stream = self
            .tokens
            .get_or_try_init(|| async {
                self.js
                    .get_or_create_stream(stream::Config {
                        name: n.stream("tokens"),
                        subjects: vec![format!("{}.tokens.>", n.namespace())],
                        retention: stream::RetentionPolicy::WorkQueue,
                        storage: stream::StorageType::File,
                        max_age: Duration::from_secs(3600),
                        duplicate_window: Duration::from_secs(600),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| Error::broker("declare stream", e))
            })
            .await?;
        Ok(stream.clone())
    }

    /// Where the jobs stream republishes each stored job: `<ns>.jobs.<kind>` → `<ns>.tee.<kind>`.
    fn tee_republish(&self) -> stream::Republish {
        let ns = self.names.namespace();
        stream::Republish {
            source: format!("{ns}.jobs.>"),
            destination: format!("{ns}.tee.>"),
            headers_only: false,
        }
    }

    /// Declares `<NS>_TEE` on the subjects the jobs stream republishes to, with interest
    /// retention (a copy stays until every tee of its kind has it, and none is kept for a kind
    /// without a tee) and at most `backlog` copies per kind, the oldest dropped first. JetStream
    /// bounds a stream, not a consumer: the tees of a namespace share the bound, and the tee
    /// opened last sets it.
    async fn declare_tee(&self, backlog: u64) -> Result<()> {
        let n = &self.names;
        let ns = n.namespace();
        let mut jobs = self
            .js
            .get_stream(n.stream("jobs"))
            .await
            .map_err(|e| Error::broker("get stream", e))?;
        let config = jobs
            .info()
            .await
            .map_err(|e| Error::broker("stream info", e))?
            .config
            .clone();
        if config.republish.as_ref() != Some(&self.tee_republish()) {
            return Err(Error::Config(format!(
                "stream {} was created without republishing jobs for tees, and NATS cannot add                  that to an existing stream: recreate the namespace (conveyor-producer                  delete-namespace) to use tees",
                config.name
            )));
        }
        let max_per_kind = i64::try_from(backlog.max(1)).unwrap_or(i64::MAX);
        let tee_config = stream::Config {
            name: n.stream("tee"),
            subjects: vec![format!("{ns}.tee.>")],
            retention: stream::RetentionPolicy::Interest,
            max_messages_per_subject: max_per_kind,
            discard: stream::DiscardPolicy::Old,
            storage: stream::StorageType::File,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        };
        // The tee stream first, so that no republished job finds no stream.
        let mut tee = self
            .js
            .get_or_create_stream(tee_config.clone())
            .await
            .map_err(|e| Error::broker("declare stream", e))?;
        let current = tee
            .info()
            .await
            .map_err(|e| Error::broker("stream info", e))?
            .config
            .max_messages_per_subject;
        if current != max_per_kind {
            self.js
                .update_stream(tee_config)
                .await
                .map_err(|e| Error::broker("update stream", e))?;
        }
        Ok(())
    }

    /// The durable pull consumer `durable` of `stream_name`, created when missing, and updated
    /// when its lease (AckWait) is not `opts.lease`: a changed `--lease` takes effect.
    async fn consumer(
        &self,
        stream_name: &str,
        durable: &str,
        filter: String,
        opts: ConsumeOptions,
    ) -> Result<jetstream::consumer::PullConsumer> {
        let stream = self
            .js
            .get_stream(stream_name)
            .await
            .map_err(|e| Error::broker("get stream", e))?;
        let config = pull::Config {
            durable_name: Some(durable.to_string()),
            filter_subject: filter,
            // Explicit acks only: `AckPolicy::All` is consumer-wide, so after a reader
            // restarts, its acks would also cover what the old process was sent and never
            // recorded. `ConsumeOptions::cumulative` is therefore ignored on JetStream.
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: opts.lease,
            max_deliver: -1,
            max_ack_pending: 10_000,
            deliver_policy: if opts.ephemeral {
                jetstream::consumer::DeliverPolicy::New
            } else {
                jetstream::consumer::DeliverPolicy::All
            },
            inactive_threshold: if opts.ephemeral {
                EPHEMERAL_IDLE
            } else if crate::protocol::is_keyed_bucket(durable) {
                super::KEYED_BUCKET_IDLE
            } else {
                Duration::ZERO
            },
            ..Default::default()
        };
        let mut consumer: jetstream::consumer::PullConsumer = stream
            .get_or_create_consumer(durable, config.clone())
            .await
            .map_err(|e| Error::broker("create consumer", e))?;
        // The config the server holds came back with the consumer: no second round trip.
        let stored = consumer.cached_info().config.ack_wait;
        if stored != opts.lease {
            tracing::info!(consumer = %durable, from = ?stored, to = ?opts.lease, "changing the consumer's lease");
            // Create-or-update: also what a 2.9 server does with a changed durable's config.
            consumer = stream
                .create_consumer(config)
                .await
                .map_err(|e| Error::broker("update consumer", e))?;
        }
        Ok(consumer)
    }

    async fn pull(
        &self,
        stream_name: String,
        durable: String,
        filter: String,
        opts: ConsumeOptions,
    ) -> Result<DeliveryStream> {
        let consumer = self.consumer(&stream_name, &durable, filter, opts).await?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(if opts.one_at_a_time {
                1
            } else {
                usize::from(opts.prefetch.max(1))
            })
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|e| Error::broker("pull", e))?;
        let prefix_len = self.names.namespace().len() + 1;
        Ok(messages
            .map(move |item| {
                let msg = item.map_err(|e| Error::broker("pull", e))?;
                Ok(to_delivery(msg, prefix_len))
            })
            .boxed())
    }

    /// One kind's jobs: held jobs keep their leases ([`held`]), and jobs no NATS client can
    /// read are dead-lettered after each reconnect ([`poison`]).
    async fn pull_jobs(&self, kind: &str, opts: ConsumeOptions) -> Result<DeliveryStream> {
        let n = &self.names;
        let consumer = self
            .consumer(
                &n.stream("jobs"),
                &consumer_name_for_kind(kind),
                n.job_subject(kind),
                opts,
            )
            .await?;
        let prefix_len = n.namespace().len() + 1;
        let (stream, closed) = held::job_stream(consumer.clone(), opts, prefix_len);
        tokio::spawn(poison::sweep_after_connects(
            self.clone(),
            kind.to_string(),
            consumer,
            self.connects.clone(),
            closed,
        ));
        Ok(stream)
    }

    /// Consumes, for the catch-all worker, every job subject that has messages and no consumer
    /// of its own yet (other than `skip`), by creating that kind's shared consumer.
    fn discover(&self, skip: Vec<String>, opts: ConsumeOptions) -> DeliveryStream {
        let (tx, rx) =
            futures::channel::mpsc::channel::<Result<Delivery>>(usize::from(opts.prefetch.max(1)));
        let this = self.clone();
        tokio::spawn(async move {
            let mut served: HashSet<String> = skip.into_iter().collect();
            let prefix = format!("{}.jobs.", this.names.namespace());
            loop {
                if tx.is_closed() {
                    return;
                }
                let subjects = match this.js.get_stream(this.names.stream("jobs")).await {
                    Ok(s) => match s.info_with_subjects(format!("{prefix}>")).await {
                        Ok(info) => info.try_collect::<Vec<_>>().await.unwrap_or_default(),
                        Err(_) => Vec::new(),
                    },
                    Err(_) => Vec::new(),
                };
                for (subject, _count) in subjects {
                    let Some(kind) = subject.strip_prefix(&prefix).map(str::to_string) else {
                        continue;
                    };
                    if served.contains(&kind) {
                        continue;
                    }
                    match this.consume(Source::Kind(kind.clone()), opts).await {
                        Ok(mut stream) => {
                            tracing::info!(%kind, "serving jobs of a kind no other consumer takes");
                            served.insert(kind);
                            let mut tx = tx.clone();
                            tokio::spawn(async move {
                                use futures::SinkExt;
                                while let Some(d) = stream.next().await {
                                    if tx.send(d).await.is_err() {
                                        return;
                                    }
                                }
                            });
                        }
                        Err(e) => {
                            tracing::warn!(%kind, error = %e, "could not consume unrouted kind")
                        }
                    }
                }
                tokio::time::sleep(DISCOVERY_INTERVAL).await;
            }
        });
        rx.boxed()
    }
}

/// Publishes an empty message on `subject` only if the last one there has sequence `expected`
/// (0: none). `Some(new sequence)`, or `None` when another publisher got there first.
async fn publish_expecting(
    js: &jetstream::Context,
    subject: &str,
    expected: u64,
) -> Result<Option<u64>> {
    let mut h = async_nats::HeaderMap::new();
    h.insert(
        "Nats-Expected-Last-Subject-Sequence",
        expected.to_string().as_str(),
    );
    let ack = js
        .publish_with_headers(subject.to_string(), h, bytes::Bytes::new())
        .await
        .map_err(|e| Error::broker("claim", e))?;
    match ack.await {
        Ok(a) => Ok(Some(a.sequence)),
        Err(e) if e.to_string().contains("wrong last sequence") => Ok(None),
        Err(e) => Err(Error::broker("claim", e)),
    }
}

/// A held JetStream singleflight claim.
struct NatsFlight {
    js: jetstream::Context,
    stream: String,
    subject: String,
    seq: std::sync::Mutex<u64>,
}

#[async_trait]
impl super::FlightClaim for NatsFlight {
    async fn refresh(&self) -> Result<()> {
        let seq = *self.seq.lock().unwrap_or_else(|p| p.into_inner());
        match publish_expecting(&self.js, &self.subject, seq).await? {
            Some(next) => {
                *self.seq.lock().unwrap_or_else(|p| p.into_inner()) = next;
                Ok(())
            }
            // The claim expired and was taken (or renewed) by another process.
            None => Err(Error::broker(
                "refresh claim",
                std::io::Error::other("the claim expired and another process holds it"),
            )),
        }
    }
    async fn release(self: Box<Self>) -> Result<()> {
        let seq = *self.seq.lock().unwrap_or_else(|p| p.into_inner());
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| Error::broker("get stream", e))?;
        stream
            .delete_message(seq)
            .await
            .map_err(|e| Error::broker("release claim", e))?;
        Ok(())
    }
}

fn to_delivery(msg: jetstream::Message, prefix_len: usize) -> Delivery {
    let (count, broker_id) = match msg.info() {
        Ok(info) => (
            u32::try_from(info.delivered).unwrap_or(1),
            format!("{}-{}", info.stream, info.stream_sequence),
        ),
        Err(_) => (1, crate::job::new_id()),
    };
    let (msg, acker) = msg.split();
    // Subject is "<ns>.<class>.<kind>": strip "<ns>." and the class word.
    let kind = msg
        .subject
        .get(prefix_len..)
        .and_then(|rest| rest.split_once('.'))
        .map(|(_, kind)| kind.to_string())
        .unwrap_or_default();
    let message = Message::new(from_nats_headers(msg.headers.as_ref()), msg.payload);
    Delivery::new(
        kind,
        message,
        count,
        broker_id,
        Box::new(NatsAcker { acker }),
    )
}

struct NatsAcker {
    acker: jetstream::message::Acker,
}

#[async_trait]
impl Acker for NatsAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.acker.ack().await.map_err(|e| Error::Broker {
            op: "ack",
            cause: e,
        })
    }
    async fn nack(self: Box<Self>) -> Result<()> {
        self.acker
            .ack_with(AckKind::Nak(None))
            .await
            .map_err(|e| Error::Broker {
                op: "nak",
                cause: e,
            })
    }
    async fn retry(self: Box<Self>, _next: Message, delay: Duration) -> Result<()> {
        // The redelivery count carries the attempt number on JetStream.
        self.acker
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(|e| Error::Broker {
                op: "delayed nak",
                cause: e,
            })
    }
    async fn progress(&self) -> Result<()> {
        self.acker
            .ack_with(AckKind::Progress)
            .await
            .map_err(|e| Error::Broker {
                op: "progress",
                cause: e,
            })
    }
}

#[async_trait]
impl Transport for NatsTransport {
    fn names(&self) -> &Names {
        &self.names
    }

    fn check_reply_to(&self, to: &str) -> std::result::Result<(), String> {
        crate::protocol::check_nats_reply(self.names.namespace(), &self.reply_prefix, to)
    }

    async fn publish(&self, route: Route, msg: Message) -> Result<()> {
        let id = msg.headers.get(header::ID).unwrap_or_default().to_string();
        let (subject, dedup) = match &route {
            Route::Job(kind) => (self.names.job_subject(kind), id),
            // Results carry no de-duplication id: the aggregator records each job id once anyway,
            // and the server then keeps no per-result state.
            Route::Result(kind) => (self.names.result_subject(kind), String::new()),
            Route::Dead(kind) => (self.names.dead_subject(kind), format!("dead:{id}")),
            Route::Reply(to) => {
                self.check_reply_to(to).map_err(|reason| Error::Denied {
                    op: "reply",
                    reason,
                })?;
                return self
                    .client
                    .publish_with_headers(to.clone(), to_nats_headers(&msg.headers, None), msg.body)
                    .await
                    .map_err(|e| Error::broker("reply", e));
            }
        };
        // Body and header lines, and room for the id header added below.
        let size = msg.body.len()
            + msg
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + 4)
                .sum::<usize>()
            + 128;
        let max = self.max_payload;
        if max > 0 && size > max {
            return Err(Error::TooLarge {
                target: subject,
                size,
                max,
            });
        }
        let skip = matches!(route, Route::Job(_)).then_some(header::ID);
        let mut publish = jetstream::message::PublishMessage::build()
            .payload(msg.body)
            .headers(to_nats_headers(&msg.headers, skip));
        if !dedup.is_empty() {
            publish = publish.message_id(dedup);
        }
        let ack = self
            .js
            .send_publish(subject.clone(), publish)
            .await
            .map_err(|e| Error::NotConfirmed {
                target: subject.clone(),
                reason: e.to_string(),
            })?;
        ack.await.map_err(|e| {
            let reason = e.to_string();
            // The jobs stream (discard `new`) at its max_bytes.
            if reason.contains("maximum bytes exceeded") {
                Error::Full {
                    target: subject,
                    reason,
                }
            } else {
                Error::NotConfirmed {
                    target: subject,
                    reason,
                }
            }
        })?;
        Ok(())
    }

    async fn keep_job_ids(&self, window: Duration) -> Result<()> {
        let window = window.min(MAX_DUPLICATE_WINDOW);
        let name = self.names.stream("jobs");
        let mut stream = self
            .js
            .get_stream(&name)
            .await
            .map_err(|e| Error::broker("get stream", e))?;
        let current = stream
            .info()
            .await
            .map_err(|e| Error::broker("stream info", e))?
            .config
            .clone();
        if current.duplicate_window >= window {
            return Ok(());
        }
        tracing::info!(
            stream = %name,
            from = ?current.duplicate_window,
            to = ?window,
            "widening the de-duplication window to cover the lease times the attempts"
        );
        let was = current.duplicate_window;
        self.js
            .update_stream(stream::Config {
                duplicate_window: window,
                ..current
            })
            .await
            .map_err(|e| {
                Error::Config(format!(
                    "stream {name} drops re-published job ids for {was:?}, shorter than the \
                     {window:?} this worker's --lease needs, and it could not be widened ({e}): \
                     let this user update the stream, or shorten --lease"
                ))
            })?;
        Ok(())
    }

    async fn consume(&self, source: Source, opts: ConsumeOptions) -> Result<DeliveryStream> {
        let n = &self.names;
        let ns = n.namespace();
        match source {
            Source::Kind(kind) => self.pull_jobs(&kind, opts).await,
            Source::Unrouted(skip) => Ok(self.discover(skip, opts)),
            Source::Results(group) => {
                self.pull(n.stream("results"), group, format!("{ns}.results.>"), opts)
                    .await
            }
            Source::Dead(group) => {
                self.pull(n.stream("dead"), group, format!("{ns}.dead.>"), opts)
                    .await
            }
            Source::Tee {
                kind,
                name,
                backlog,
            } => {
                crate::protocol::validate_kind(&kind)?;
                crate::protocol::validate_tee_name(&name)?;
                self.declare_tee(backlog).await?;
                self.pull(
                    n.stream("tee"),
                    crate::protocol::tee_consumer_name(&name, &kind),
                    n.tee_subject(&kind),
                    opts,
                )
                .await
            }
        }
    }

    async fn permits(
        &self,
        kind: &str,
        count: u32,
        opts: ConsumeOptions,
    ) -> Result<DeliveryStream> {
        crate::protocol::validate_kind(kind)?;
        let n = &self.names;
        let ns = n.namespace();
        // One message per permit, on a subject of its own holding at most one message; a permit
        // is published only where none is (expected last subject sequence 0), so racing workers
        // create each permit once.
        self.js
            .get_or_create_stream(stream::Config {
                name: n.stream("permits"),
                subjects: vec![format!("{ns}.permits.>")],
                retention: stream::RetentionPolicy::Limits,
                max_messages_per_subject: 1,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::broker("declare stream", e))?;
        for i in 0..count {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Expected-Last-Subject-Sequence", "0");
            match self
                .js
                .publish_with_headers(n.permit_subject(kind, i), h, bytes::Bytes::new())
                .await
            {
                Ok(ack) => {
                    // Refused when the permit exists already: that is the point.
                    let _ = ack.await;
                }
                Err(e) => return Err(Error::broker("create permit", e)),
            }
        }
        self.one_at_a_time("permits", kind, format!("{ns}.permits.{kind}.*"), opts)
            .await
    }

    async fn tokens(&self, kind: &str, opts: ConsumeOptions) -> Result<DeliveryStream> {
        crate::protocol::validate_bucket(kind)?;
        self.tokens_stream().await?;
        let subject = self.names.token_subject(kind);
        self.one_at_a_time("tokens", kind, subject, opts).await
    }

    async fn waiting_tokens(&self, kind: &str) -> Result<u64> {
        use futures::TryStreamExt;
        let stream = self.tokens_stream().await?;
        // A work queue drops a token when it is acked: what it holds is what waits or is held.
        stream
            .info_with_subjects(self.names.token_subject(kind))
            .await
            .map_err(|e| Error::broker("token count", e))?
            .try_fold(
                0u64,
                |sum, (_, count)| async move { Ok(sum + count as u64) },
            )
            .await
            .map_err(|e| Error::broker("token count", e))
    }

    async fn put_tokens(&self, kind: &str, ticks: &[u64]) -> Result<u32> {
        let subject = self.names.token_subject(kind);
        let mut acks = Vec::with_capacity(ticks.len());
        for tick in ticks {
            // One token per tick whoever publishes it: JetStream keeps the first of an id.
            let publish = jetstream::message::PublishMessage::build()
                .payload(bytes::Bytes::new())
                .message_id(format!("{kind}:{tick}"));
            let ack = self
                .js
                .send_publish(subject.clone(), publish)
                .await
                .map_err(|e| Error::broker("add token", e))?;
            acks.push(ack);
        }
        let mut put = 0;
        for ack in acks {
            let ack = ack.await.map_err(|e| Error::broker("add token", e))?;
            if !ack.duplicate {
                put += 1;
            }
        }
        Ok(put)
    }

    fn tokens_need_a_pacer(&self) -> bool {
        false
    }

    async fn claim_flight(&self, key: &str) -> Result<Option<Box<dyn super::FlightClaim>>> {
        let n = &self.names;
        let ns = n.namespace();
        // A claim is the one message of its subject, published only where none is; it expires
        // with the stream's max age unless refreshed.
        self.js
            .get_or_create_stream(stream::Config {
                name: n.stream("flights"),
                subjects: vec![format!("{ns}.flights.>")],
                retention: stream::RetentionPolicy::Limits,
                max_messages_per_subject: 1,
                max_age: super::FLIGHT_TTL,
                storage: stream::StorageType::Memory,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::broker("declare stream", e))?;
        let subject = format!("{ns}.flights.{key}");
        match publish_expecting(&self.js, &subject, 0).await? {
            Some(seq) => Ok(Some(Box::new(NatsFlight {
                js: self.js.clone(),
                stream: n.stream("flights"),
                subject,
                seq: std::sync::Mutex::new(seq),
            }))),
            None => Ok(None),
        }
    }

    async fn tee_backlog(&self, kind: &str, name: &str) -> Result<u64> {
        let stream = self
            .js
            .get_stream(self.names.stream("tee"))
            .await
            .map_err(|e| Error::broker("get stream", e))?;
        let mut consumer: jetstream::consumer::PullConsumer = stream
            .get_consumer(&crate::protocol::tee_consumer_name(name, kind))
            .await
            .map_err(|cause| Error::Broker {
                op: "get consumer",
                cause,
            })?;
        let info = consumer
            .info()
            .await
            .map_err(|e| Error::broker("consumer info", e))?;
        Ok(info.num_pending + info.num_ack_pending as u64)
    }

    async fn delete_tee(&self, kind: &str, name: &str) -> Result<()> {
        let stream = self
            .js
            .get_stream(self.names.stream("tee"))
            .await
            .map_err(|e| Error::broker("get stream", e))?;
        stream
            .delete_consumer(&crate::protocol::tee_consumer_name(name, kind))
            .await
            .map_err(|e| Error::broker("delete consumer", e))?;
        Ok(())
    }

    async fn reply_inbox(&self) -> Result<(String, MessageStream)> {
        let inbox = self.client.new_inbox();
        let sub = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| Error::broker("subscribe", e))?;
        let stream = sub
            .map(|m| Message::new(from_nats_headers(m.headers.as_ref()), m.payload))
            .boxed();
        Ok((inbox, stream))
    }

    async fn broadcast(&self, topic: &str, msg: Message) -> Result<()> {
        let subject = format!("{}.{topic}", self.names.namespace());
        self.client
            .publish_with_headers(subject, to_nats_headers(&msg.headers, None), msg.body)
            .await
            .map_err(|e| Error::broker("broadcast", e))
    }

    async fn listen(&self, pattern: &str) -> Result<MessageStream> {
        let sub = self
            .client
            .subscribe(format!("{}.{pattern}", self.names.namespace()))
            .await
            .map_err(|e| Error::broker("subscribe", e))?;
        Ok(sub
            .map(|m| Message::new(from_nats_headers(m.headers.as_ref()), m.payload))
            .boxed())
    }

    async fn emit_event(&self, kind: &str, state: &str, msg: Message) -> Result<()> {
        self.broadcast(&format!("events.{kind}.{state}"), msg).await
    }

    async fn listen_events(&self, pattern: &str) -> Result<MessageStream> {
        self.listen(&format!("events.{pattern}")).await
    }

    async fn send_control(&self, msg: Message) -> Result<()> {
        // Stored in the control stream (confirmed), so that workers starting later replay it.
        self.js
            .publish_with_headers(
                self.names.cancel_subject(),
                to_nats_headers(&msg.headers, None),
                msg.body,
            )
            .await
            .map_err(|e| Error::broker("send control", e))?
            .await
            .map_err(|e| Error::broker("send control", e))?;
        Ok(())
    }

    async fn listen_control(&self) -> Result<(u64, MessageStream)> {
        // An ordered consumer from the start of the control stream: the last hour's requests,
        // then new ones as they come.
        let mut stream = self
            .js
            .get_stream(self.names.stream("control"))
            .await
            .map_err(|e| Error::broker("get stream", e))?;
        let kept = stream
            .info()
            .await
            .map_err(|e| Error::broker("stream info", e))?
            .state
            .messages;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: self.names.cancel_subject(),
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::broker("create consumer", e))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| Error::broker("pull", e))?;
        let messages = messages
            .filter_map(|m| async move {
                let m = m.ok()?;
                Some(Message::new(
                    from_nats_headers(m.headers.as_ref()),
                    m.payload.clone(),
                ))
            })
            .boxed();
        Ok((kept, messages))
    }

    async fn delete_namespace(&self, _kinds: &[String]) -> Result<()> {
        for class in [
            "jobs", "results", "dead", "control", "tee", "permits", "flights", "tokens",
        ] {
            let name = self.names.stream(class);
            match self.js.delete_stream(&name).await {
                Ok(_) => {}
                Err(e) if e.to_string().contains("not found") => {}
                Err(e) => return Err(Error::broker("delete stream", e)),
            }
        }
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.client
            .flush()
            .await
            .map_err(|e| Error::broker("flush", e))
    }
}
pub mod raw;
