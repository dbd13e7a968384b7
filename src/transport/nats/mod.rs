//! NATS JetStream adapter.
//!
//! Streams (names follow the namespace): `<NS>_JOBS` on `<ns>.jobs.>` with work-queue retention (a
//! job leaves the stream when acked), `<NS>_RESULTS` on `<ns>.results.>` and `<NS>_DEAD` on
//! `<ns>.dead.>` with limits retention. Each job kind has one durable pull consumer,
//! `workers=<kind>`, that all worker replicas share; its filter is exactly that kind's subject, so
//! consumers never overlap on the work-queue stream.

use super::{ConsumeOptions, DeliveryStream, MessageStream, Route, Source, Transport};
use crate::broker_url::BrokerUrl;
use crate::error::{Error, Result};
use crate::message::{Headers, Message};
use crate::protocol::{header, Names};
use async_nats::jetstream::{self, consumer::pull, stream};
use async_trait::async_trait;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

mod consumers;
mod delivery;
mod held;
mod poison;
mod registers;
mod streams;

use delivery::{publish_expecting, to_delivery, NatsFlight};

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

/// The durable consumer of the jobs waiting for their time, shared by every worker.
const WAITING_CONSUMER: &str = "waiting";

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
}

#[async_trait]
impl Transport for NatsTransport {
    fn names(&self) -> &Names {
        &self.names
    }

    fn releases_waiting(&self) -> bool {
        true
    }

    fn drops_republished_ids(&self) -> bool {
        true
    }

    fn check_reply_to(&self, to: &str) -> std::result::Result<(), String> {
        crate::protocol::check_nats_reply(self.names.namespace(), &self.reply_prefix, to)
    }

    async fn publish(&self, route: Route, mut msg: Message) -> Result<()> {
        let id = crate::job::id_of(&msg.headers).unwrap_or_default();
        let (subject, dedup) = match &route {
            Route::Job(kind) => (
                self.names
                    .job_subject(&crate::priority::lane_of(kind, &msg.headers)),
                id,
            ),
            Route::Waiting { kind, .. } => {
                msg.headers.remove(header::NATS_MSG_ID);
                (self.names.delayed_subject(kind), id)
            }
            // The job's own publish is within the window: its time makes this one new.
            Route::Due(kind) => {
                msg.headers.remove(header::NATS_MSG_ID);
                msg.headers.insert(header::ID, id.clone());
                let at = msg.headers.get(header::NOT_BEFORE).unwrap_or_default();
                let dedup = format!("{id}@{at}");
                let lane = crate::priority::lane_of(kind, &msg.headers);
                (self.names.job_subject(&lane), dedup)
            }
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
        // A waiting job keeps its id header too: it is published again from there.
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
            Source::Kind(kind) => {
                let kind = &kind;
                crate::transport::lanes::open_each(|p| async move {
                    self.pull_jobs(&crate::priority::lane(kind, p), opts).await
                })
                .await
            }
            Source::Lane { kind, priority } => {
                self.pull_jobs(&crate::priority::lane(&kind, priority), opts)
                    .await
            }
            Source::Waiting => {
                let n = &self.names;
                let filter = format!("{}.delayed.>", n.namespace());
                self.pull(n.stream("delayed"), WAITING_CONSUMER.into(), filter, opts)
                    .await
            }
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
                // The copies of every lane (each its own subject, so its own consumer).
                let (kind, name) = (&kind, &name);
                crate::transport::lanes::open_each(|p| async move {
                    let lane = crate::priority::lane(kind, p);
                    let consumer = crate::protocol::tee_consumer_name(name, &lane);
                    self.pull(n.stream("tee"), consumer, n.tee_subject(&lane), opts)
                        .await
                })
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

    async fn read_register(&self, name: &str) -> Result<Option<(u64, bytes::Bytes)>> {
        registers::read(&self.js, &self.names, name).await
    }

    async fn write_register(
        &self,
        name: &str,
        expected: u64,
        value: bytes::Bytes,
    ) -> Result<Option<u64>> {
        registers::write(&self.js, &self.names, name, expected, value).await
    }

    async fn tee_backlog(&self, kind: &str, name: &str) -> Result<u64> {
        let stream = self
            .js
            .get_stream(self.names.stream("tee"))
            .await
            .map_err(|e| Error::broker("get stream", e))?;
        // The copies of every lane of the kind, each with its consumer (a tee made before the
        // lanes has the normal one only): an error only when the tee has none.
        let (mut backlog, mut found, mut first_error) = (0, false, None);
        for p in crate::priority::Priority::ALL {
            let lane = crate::priority::lane(kind, p);
            let consumer: std::result::Result<jetstream::consumer::PullConsumer, _> = stream
                .get_consumer(&crate::protocol::tee_consumer_name(name, &lane))
                .await;
            let mut consumer = match consumer {
                Ok(c) => c,
                Err(cause) => {
                    first_error.get_or_insert(Error::Broker {
                        op: "get consumer",
                        cause,
                    });
                    continue;
                }
            };
            let info = consumer
                .info()
                .await
                .map_err(|e| Error::broker("consumer info", e))?;
            backlog += info.num_pending + info.num_ack_pending as u64;
            found = true;
        }
        match first_error {
            Some(e) if !found => Err(e),
            _ => Ok(backlog),
        }
    }

    async fn delete_tee(&self, kind: &str, name: &str) -> Result<()> {
        let stream = self
            .js
            .get_stream(self.names.stream("tee"))
            .await
            .map_err(|e| Error::broker("get stream", e))?;
        // Every lane's consumer (a tee made before the lanes has the normal one only): an error
        // only when the tee had none.
        let (mut deleted, mut first_error) = (false, None);
        for p in crate::priority::Priority::ALL {
            let lane = crate::priority::lane(kind, p);
            match stream
                .delete_consumer(&crate::protocol::tee_consumer_name(name, &lane))
                .await
            {
                Ok(_) => deleted = true,
                Err(e) => {
                    first_error.get_or_insert(Error::broker("delete consumer", e));
                }
            }
        }
        match first_error {
            Some(e) if !deleted => Err(e),
            _ => Ok(()),
        }
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
            "jobs",
            "delayed",
            "results",
            "dead",
            "control",
            "tee",
            "permits",
            "flights",
            "tokens",
            "registers",
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
