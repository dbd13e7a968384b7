//! The namespace's streams: declared at connect, bounded by the URL's `max_bytes`, and the tee
//! and token streams made on first use.

use super::{held, NatsTransport, CONTROL_MAX_BYTES, CONTROL_MAX_MESSAGE, DUPLICATE_WINDOW};
use crate::error::{Error, Result};
use crate::transport::{ConsumeOptions, DeliveryStream};
use async_nats::jetstream::stream;
use std::time::Duration;

impl NatsTransport {
    /// Declares the namespace's streams. With `max_bytes` (the URL's), the jobs, results and
    /// dead-letter streams are bounded in bytes: the jobs stream refuses what would pass it
    /// (discard `new`: its publishers wait, nothing stored is lost), the others drop their
    /// oldest; an existing stream is changed to it.
    pub(super) async fn declare(&self, max_bytes: Option<u64>) -> Result<()> {
        let n = &self.names;
        let ns = n.namespace();
        let streams = [
            (
                n.stream("jobs"),
                format!("{ns}.jobs.>"),
                stream::RetentionPolicy::WorkQueue,
                Duration::ZERO,
            ),
            // Jobs waiting for their time, until a worker moves each to its kind's subject.
            (
                n.stream("delayed"),
                format!("{ns}.delayed.>"),
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
        let delayed = n.stream("delayed");
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
            // Waiting jobs are not bounded by the URL's max_bytes (its bound is reserved for each
            // stream it applies to, three per namespace): a full stream would refuse a job that
            // was already stored and acked elsewhere.
            let max_bytes = if name == delayed { None } else { max_bytes };
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
    pub(super) async fn one_at_a_time(
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
    pub(super) async fn tokens_stream(&self) -> Result<stream::Stream> {
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
    pub(super) fn tee_republish(&self) -> stream::Republish {
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
    pub(super) async fn declare_tee(&self, backlog: u64) -> Result<()> {
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
}
