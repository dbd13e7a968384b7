//! Resource pools on both real brokers: 200 `pg.insert` jobs through a worker whose PostgreSQL
//! pool has 4 connections never open more than 4 (seen in `pg_stat_activity`) and insert exactly
//! 200 rows.

mod common;

use common::cluster::{Cluster, WAIT};
use common::pg::{pg_client, pg_url};
use common::{http_get, Broker};
use conveyor::JobSpec;
use serde_json::json;
use std::time::Duration;

both_brokers!(pg_insert_uses_at_most_its_pool_and_inserts_each_job_once);

async fn pg_insert_uses_at_most_its_pool_and_inserts_each_job_once(broker: Broker) {
    let cluster = Cluster::new(broker);
    let app = format!("conveyor_{}", cluster.ns);
    let table = format!("rows_{}", cluster.ns);
    let observer = pg_client().await;
    let _aggregator = cluster.aggregator("aggregator").await;
    let url = pg_url(&app);
    let _worker = cluster.worker(
        "worker",
        &[
            "--kinds",
            "pg.insert",
            "--concurrency",
            "32",
            "--pg-url",
            &url,
            "--pg-pool-size",
            "4",
            "--pg-table",
            &table,
        ],
    );
    // Its queue exists once it beats (RabbitMQ would route earlier jobs to the unrouted queue).
    cluster.wait_workers(1).await;
    let client = cluster.client().await;
    let specs = (0..200)
        .map(|i| JobSpec::new("pg.insert", json!({"n": i, "note": "row"})))
        .collect();
    let publishing = common::cluster::publish_all(&client, specs);
    let watching = async {
        // The most connections the worker had open at once, sampled until all are recorded.
        let mut most = 0i64;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let row = observer
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                    &[&app],
                )
                .await
                .expect("pg_stat_activity");
            most = most.max(row.get::<_, i64>(0));
            let (_, stats) = http_get(cluster.http, "/stats").await;
            if stats["results"].as_u64() >= Some(200) {
                return (most, stats);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "200 results in time: {stats}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (_, (most, stats)) = tokio::join!(publishing, watching);
    eprintln!("pg.insert: at most {most} connections open at once (pool of 4)");
    let rows: i64 = observer
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count rows")
        .get(0);
    let distinct: i64 = observer
        .query_one(
            &format!("SELECT count(DISTINCT (doc->>'n')) FROM {table}"),
            &[],
        )
        .await
        .expect("count distinct")
        .get(0);
    let _ = observer
        .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await;
    assert_eq!(stats["by_status"]["succeeded"], json!(200), "{stats}");
    assert!(
        (1..=4).contains(&most),
        "the pool of 4 opened {most} connections at once"
    );
    assert_eq!((rows, distinct), (200, 200));
}
