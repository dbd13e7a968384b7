//! The raw JetStream flow for the benchmark: publish a job with PubAck, consume and ack it,
//! publish a result with PubAck, consume and ack that. async-nats only, no Conveyor logic.

use crate::bench::{seq_of, Flow};
use crate::broker_url::BrokerUrl;
use crate::error::{Error, Result};
use async_nats::jetstream::{self, consumer::pull, stream};
use futures::future::BoxFuture;
use futures::StreamExt;
use std::sync::Arc;

/// Declares two throwaway streams and starts the by-hand worker.
pub async fn flow(url: &BrokerUrl, concurrency: usize) -> Result<Flow> {
    let client = super::connect_client(url, "conveyor-raw-bench".into()).await?;
    let js = jetstream::new(client);
    let tag = format!("{:x}", rand::random::<u32>());
    let (jobs_subject, results_subject) = (
        format!("rawbench.{tag}.jobs"),
        format!("rawbench.{tag}.results"),
    );
    let (jobs_stream, results_stream) = (
        format!("RAWBENCH_{tag}_JOBS"),
        format!("RAWBENCH_{tag}_RESULTS"),
    );
    let mk = |name: &str, subject: &str, retention| stream::Config {
        name: name.to_string(),
        subjects: vec![subject.to_string()],
        retention,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    let jobs = js
        .create_stream(mk(
            &jobs_stream,
            &jobs_subject,
            stream::RetentionPolicy::WorkQueue,
        ))
        .await
        .map_err(|e| Error::broker("create stream", e))?;
    let results = js
        .create_stream(mk(
            &results_stream,
            &results_subject,
            stream::RetentionPolicy::Limits,
        ))
        .await
        .map_err(|e| Error::broker("create stream", e))?;
    let consumer = |durable: &str| pull::Config {
        durable_name: Some(durable.to_string()),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ..Default::default()
    };
    let worker_messages = jobs
        .create_consumer(consumer("worker"))
        .await
        .map_err(|e| Error::broker("create consumer", e))?
        .stream()
        .max_messages_per_batch(concurrency)
        .messages()
        .await
        .map_err(|e| Error::broker("pull", e))?;
    let result_messages = results
        .create_consumer(consumer("reader"))
        .await
        .map_err(|e| Error::broker("create consumer", e))?
        .stream()
        .max_messages_per_batch(1000)
        .messages()
        .await
        .map_err(|e| Error::broker("pull", e))?;

    let worker_js = js.clone();
    let rs = results_subject.clone();
    let worker = tokio::spawn(worker_messages.for_each_concurrent(concurrency, move |m| {
        let js = worker_js.clone();
        let subject = rs.clone();
        async move {
            let Ok(m) = m else { return };
            if let Ok(ack) = js.publish(subject, m.payload.clone()).await {
                if ack.await.is_ok() {
                    let _ = m.ack().await;
                }
            }
        }
    }));
    let done = result_messages
        .filter_map(|m| async move {
            let m = m.ok()?;
            let _ = m.ack().await;
            seq_of(&m.payload)
        })
        .boxed();
    let pjs = js.clone();
    let publish = Arc::new(move |seq: u64| -> BoxFuture<'static, Result<()>> {
        let js = pjs.clone();
        let subject = jobs_subject.clone();
        Box::pin(async move {
            let body = format!("{{\"seq\":{seq}}}");
            js.publish(subject.clone(), body.into())
                .await
                .map_err(|e| Error::NotConfirmed {
                    target: subject.clone(),
                    reason: e.to_string(),
                })?
                .await
                .map_err(|e| Error::NotConfirmed {
                    target: subject,
                    reason: e.to_string(),
                })?;
            Ok(())
        })
    });
    let cleanup = Box::pin(async move {
        worker.abort();
        let _ = js.delete_stream(&jobs_stream).await;
        let _ = js.delete_stream(&results_stream).await;
    });
    Ok(Flow {
        publish,
        done,
        cleanup,
    })
}
