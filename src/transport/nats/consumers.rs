//! Durable pull consumers: a kind's jobs (with held leases and the poison sweep), the catch-all
//! worker's discovery of kinds without a consumer, and the readers of other streams.

use super::{
    delivery::to_delivery, held, poison, NatsTransport, DISCOVERY_INTERVAL, EPHEMERAL_IDLE,
    WAITING_CONSUMER,
};
use crate::error::{Error, Result};
use crate::protocol::consumer_name_for_kind;
use crate::transport::{
    ConsumeOptions, Delivery, DeliveryStream, Source, Transport, KEYED_BUCKET_IDLE,
};
use async_nats::jetstream::{self, consumer::pull};
use futures::{StreamExt, TryStreamExt};
use std::collections::HashSet;
use std::time::Duration;

impl NatsTransport {
    /// The durable pull consumer `durable` of `stream_name`, created when missing, and updated
    /// when its lease (AckWait) is not `opts.lease`: a changed `--lease` takes effect.
    pub(super) async fn consumer(
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
            // Waiting jobs stay pending until due (a delayed nak keeps them so): unbounded, or
            // a job due soon would wait behind ten thousand due later.
            max_ack_pending: if durable == WAITING_CONSUMER {
                -1
            } else {
                10_000
            },
            deliver_policy: if opts.ephemeral {
                jetstream::consumer::DeliverPolicy::New
            } else {
                jetstream::consumer::DeliverPolicy::All
            },
            inactive_threshold: if opts.ephemeral {
                EPHEMERAL_IDLE
            } else if crate::protocol::is_keyed_bucket(durable) {
                KEYED_BUCKET_IDLE
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

    pub(super) async fn pull(
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

    /// One lane of a kind's jobs (see [`crate::priority::lane`]): held jobs keep their leases
    /// ([`held`]), and jobs no NATS client can read are dead-lettered after each reconnect
    /// ([`poison`]).
    pub(super) async fn pull_jobs(
        &self,
        lane: &str,
        opts: ConsumeOptions,
    ) -> Result<DeliveryStream> {
        let n = &self.names;
        let consumer = self
            .consumer(
                &n.stream("jobs"),
                &consumer_name_for_kind(lane),
                n.job_subject(lane),
                opts,
            )
            .await?;
        let prefix_len = n.namespace().len() + 1;
        let (stream, closed) = held::job_stream(consumer.clone(), opts, prefix_len);
        tokio::spawn(poison::sweep_after_connects(
            self.clone(),
            lane.to_string(),
            consumer,
            self.connects.clone(),
            closed,
        ));
        Ok(stream)
    }

    /// Consumes, for the catch-all worker, every job subject that has messages and no consumer
    /// of its own yet (other than `skip`), by creating that kind's shared consumer.
    pub(super) fn discover(&self, skip: Vec<String>, opts: ConsumeOptions) -> DeliveryStream {
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
                    let Some(lane) = subject.strip_prefix(&prefix) else {
                        continue;
                    };
                    let kind = crate::priority::split(lane).0.to_string();
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
