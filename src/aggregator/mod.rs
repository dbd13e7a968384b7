//! The aggregator: consumes every result of the namespace, records each job id once in a durable
//! store (committed before the result is acked), and serves them over HTTP.
//!
//! Shutdown: when `shutdown` fires it stops consuming, finishes the batch in hand, and closes.

pub mod chords;
pub mod groups;
pub mod http;
pub mod schedules;
pub mod store;
pub mod workers;

use crate::error::{Error, Result};
use crate::result::JobResult;
use crate::transport::{ConsumeOptions, Delivery, Source, Transport};
use crate::workflow::Membership;
use futures::{FutureExt, StreamExt};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
pub use store::{Stats, Store};
use tokio_util::sync::CancellationToken;

/// Most results written in one transaction.
const MAX_BATCH: usize = 512;
/// How often due chord callbacks that could not be published are tried again.
const CHORD_SWEEP: Duration = Duration::from_secs(5);

/// Aggregator settings (the `conveyor-aggregator` flags).
#[derive(Debug, Clone)]
pub struct AggregatorConfig {
    /// Directory of the durable store.
    pub store_dir: PathBuf,
    /// HTTP listen address.
    pub http: SocketAddr,
    /// The most bytes of the store's pages kept in memory.
    pub store_cache_bytes: usize,
}

/// Runs the aggregator until `shutdown`. `ready` receives the bound HTTP address.
pub async fn run(
    transport: Arc<dyn Transport>,
    config: AggregatorConfig,
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<()> {
    crate::fault::check()?;
    let dir = config.store_dir.clone();
    let cache = config.store_cache_bytes;
    let store = tokio::task::spawn_blocking(move || Store::open_with(&dir, cache))
        .await
        .map_err(|e| Error::Store(e.to_string()))??;
    let listener = tokio::net::TcpListener::bind(config.http)
        .await
        .map_err(|e| Error::Config(format!("cannot listen on --http {}: {e}", config.http)))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, store = %config.store_dir.display(), "aggregator started");
    if let Some(tx) = ready {
        let _ = tx.send(addr);
    }
    let liveness = Arc::new(workers::Liveness::default());
    let first = transport.listen(crate::worker::heartbeat::PATTERN).await?;
    let heard = liveness.clone();
    let listen_on = transport.clone();
    let subscribe = move || {
        let transport = listen_on.clone();
        async move { transport.listen(crate::worker::heartbeat::PATTERN).await }
    };
    let mut beats = crate::transport::retry::resubscribing(
        "heartbeats",
        Some(first),
        subscribe,
        shutdown.clone(),
    );
    let listening = tokio::spawn(async move {
        while let Some(msg) = beats.next().await {
            if let Some(hb) = crate::worker::heartbeat::Heartbeat::from_message(&msg) {
                heard.beat(hb);
            }
        }
    });
    let server_stop = shutdown.clone();
    let http_store = store.clone();
    let routes = http::router(http_store, liveness).merge(schedules::router(transport.clone()));
    let server = tokio::spawn(async move {
        axum::serve(listener, routes)
            .with_graceful_shutdown(async move { server_stop.cancelled().await })
            .await
    });
    let opts = ConsumeOptions {
        prefetch: MAX_BATCH as u16,
        lease: Duration::from_secs(30),
        ephemeral: false,
        cumulative: true,
        one_at_a_time: false,
    };
    let mut results = transport
        .consume(Source::Results("aggregator".into()), opts)
        .await?;
    // Fail-fast cancels left due by an earlier run go out at once (twice is harmless). Due
    // callbacks wait until no result is ready: after a restart the results that came in
    // meanwhile are read first, so that a callback which ran while the aggregator was down is
    // not published again. From then on both are swept every few seconds, busy or not.
    chords::sweep_cancels(transport.as_ref(), &store).await;
    let mut sweeps =
        tokio::time::interval_at(tokio::time::Instant::now() + CHORD_SWEEP, CHORD_SWEEP);
    let mut caught_up = false;
    let mut last_sweep = tokio::time::Instant::now();
    let mut ended = false;
    loop {
        if caught_up && last_sweep.elapsed() >= CHORD_SWEEP {
            chords::sweep(transport.as_ref(), &store).await;
            last_sweep = tokio::time::Instant::now();
        }
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            d = results.next() => d,
            _ = sweeps.tick() => {
                caught_up = true;
                chords::sweep(transport.as_ref(), &store).await;
                last_sweep = tokio::time::Instant::now();
                continue;
            }
        };
        let mut batch = match first {
            Some(Ok(d)) => vec![d],
            Some(Err(e)) => {
                tracing::warn!(error = %e, "results consumer error");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            None => {
                tracing::error!("results consumer ended; stopping");
                ended = true;
                break;
            }
        };
        while batch.len() < MAX_BATCH {
            match results.next().now_or_never() {
                Some(Some(Ok(d))) => batch.push(d),
                Some(Some(Err(e))) => tracing::warn!(error = %e, "results consumer error"),
                _ => break,
            }
        }
        if let Some(actions) = record(&store, batch).await {
            chords::act(transport.as_ref(), &store, actions).await;
        }
    }
    drop(results);
    listening.abort();
    if ended {
        // Stop serving too, so the process exits and can be restarted.
        shutdown.cancel();
    }
    let _ = server.await;
    transport.close().await?;
    tracing::info!("aggregator stopped");
    if ended {
        return Err(Error::Broker {
            op: "consume results",
            cause: "the results consumer ended".into(),
        });
    }
    Ok(())
}

/// Writes one batch durably, then acks it. If the write fails nothing is acked, and the broker
/// redelivers the batch. Returns what the batch's group members ask for.
async fn record(store: &Store, batch: Vec<Delivery>) -> Option<groups::GroupActions> {
    let mut parsed = Vec::with_capacity(batch.len());
    for d in &batch {
        match JobResult::from_message(&d.message, &d.kind) {
            Ok(r) => parsed.push((r, Membership::from_headers(&d.message.headers))),
            Err(e) => tracing::warn!(error = %e, "dropping unreadable result"),
        }
    }
    let s = store.clone();
    let written = tokio::task::spawn_blocking(move || s.record(&parsed)).await;
    match written {
        Ok(Ok(outcome)) => {
            if outcome.duplicates > 0 {
                tracing::debug!(duplicates = outcome.duplicates, "dropped duplicate results");
            }
            crate::fault::point("aggregator.before-ack");
            // The batch is in delivery order and all of it is durable now: where one ack covers
            // every earlier delivery, ack only the last one.
            let cumulative = batch.last().is_some_and(|d| d.acks_cumulatively());
            let to_ack: Vec<Delivery> = if cumulative {
                batch.into_iter().last().into_iter().collect()
            } else {
                batch
            };
            let acks = to_ack.into_iter().map(|d| d.ack());
            for r in futures::future::join_all(acks).await {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "ack of a recorded result failed; it will come again as a duplicate");
                }
            }
            Some(outcome.groups)
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "store write failed; results will be redelivered");
            for d in batch {
                let _ = d.nack().await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "store task failed");
            None
        }
    }
}
