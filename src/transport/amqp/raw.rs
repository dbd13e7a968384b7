//! The raw RabbitMQ flow for the benchmark: publish a job with a confirm, consume and ack it,
//! publish a result with a confirm, consume and ack that. lapin only, no Conveyor logic.

use super::confirm_channel;
use crate::bench::{seq_of, Flow};
use crate::broker_url::BrokerUrl;
use crate::error::{Error, Result};
use futures::future::BoxFuture;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::sync::Arc;

async fn publish_confirmed(ch: &Channel, queue: &str, body: &[u8]) -> Result<()> {
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .map_err(|e| Error::broker("publish", e))?
        .await
        .map_err(|e| Error::broker("confirm", e))?;
    if confirm.is_ack() && confirm.take_message().is_none() {
        Ok(())
    } else {
        Err(Error::NotConfirmed {
            target: queue.to_string(),
            reason: "nack or returned".into(),
        })
    }
}

/// Declares two throwaway quorum queues and starts the by-hand worker.
pub async fn flow(url: &BrokerUrl, concurrency: usize) -> Result<Flow> {
    let conn = Connection::connect(url.expose(), ConnectionProperties::default())
        .await
        .map_err(|e| Error::broker("connect", e))?;
    let tag = format!("{:x}", rand::random::<u32>());
    let (jobs_q, results_q) = (
        format!("rawbench.{tag}.jobs"),
        format!("rawbench.{tag}.results"),
    );
    let admin = conn
        .create_channel()
        .await
        .map_err(|e| Error::broker("open channel", e))?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from(b"quorum".to_vec())),
    );
    for q in [&jobs_q, &results_q] {
        admin
            .queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args.clone(),
            )
            .await
            .map_err(|e| Error::broker("declare queue", e))?;
    }
    let consume = |ch: Channel, queue: String, prefetch: u16| async move {
        ch.basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| Error::broker("qos", e))?;
        ch.basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| Error::broker("consume", e))
    };
    let worker_in = conn
        .create_channel()
        .await
        .map_err(|e| Error::broker("open channel", e))?;
    let jobs = consume(
        worker_in.clone(),
        jobs_q.clone(),
        u16::try_from(concurrency).unwrap_or(u16::MAX),
    )
    .await?;
    let reader_ch = conn
        .create_channel()
        .await
        .map_err(|e| Error::broker("open channel", e))?;
    let results = consume(reader_ch.clone(), results_q.clone(), 1000).await?;
    let worker_out = confirm_channel(&conn).await?;
    let rq = results_q.clone();
    let worker = tokio::spawn(jobs.for_each_concurrent(concurrency, move |d| {
        let ch = worker_out.clone();
        let queue = rq.clone();
        async move {
            let Ok(d) = d else { return };
            if publish_confirmed(&ch, &queue, &d.data).await.is_ok() {
                let _ = d.ack(BasicAckOptions::default()).await;
            }
        }
    }));
    let done = results
        .filter_map(|d| async move {
            let d = d.ok()?;
            let _ = d.ack(BasicAckOptions::default()).await;
            seq_of(&d.data)
        })
        .boxed();
    let producer = confirm_channel(&conn).await?;
    let jq = jobs_q.clone();
    let publish = Arc::new(move |seq: u64| -> BoxFuture<'static, Result<()>> {
        let ch = producer.clone();
        let queue = jq.clone();
        Box::pin(async move {
            publish_confirmed(&ch, &queue, format!("{{\"seq\":{seq}}}").as_bytes()).await
        })
    });
    let cleanup = Box::pin(async move {
        worker.abort();
        // Close the consuming channels before deleting their queues, so that no consumer is
        // cancelled by the broker and by the client at once.
        let _ = worker_in.close(200, "bench done".into()).await;
        let _ = reader_ch.close(200, "bench done".into()).await;
        for q in [jobs_q, results_q] {
            let _ = admin
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = conn.close(200, "bench done".into()).await;
    });
    Ok(Flow {
        publish,
        done,
        cleanup,
    })
}
