//! The `pg.insert` kind: writes its JSON input into a PostgreSQL table through a deadpool pool.
//!
//! The table is `(job_id text primary key, doc jsonb, inserted_at timestamptz)`, created when the
//! worker starts. A job inserts one row under its id, once: a job delivered again after its row
//! was written (the worker died before acking) inserts nothing. When every connection of the pool
//! is busy a job waits for one, up to the pool's wait timeout, then fails with a retryable error.

use super::registry::{handler_fn, JobContext, Registry};
use crate::error::{Error, Result};
use crate::job::JobError;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Timeouts};
use serde_json::{json, Value};
use std::time::Duration;

/// Settings of the PostgreSQL pool (`--pg-url`, `--pg-pool-size`, `--pg-wait-timeout`,
/// `--pg-table`).
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// `postgres://user:pass@host:5432/db` (or a key=value connection string).
    pub url: String,
    /// Connections at most.
    pub pool_size: usize,
    /// How long a job waits for a free connection.
    pub wait_timeout: Duration,
    /// Table the rows go to.
    pub table: String,
}

/// The pool and table, as a handler resource.
pub struct PgInsert {
    pool: Pool,
    table: String,
    wait: Duration,
}

fn valid_table(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

/// Builds the pool, checks the database is reachable, creates the table, and registers the
/// pool as a resource and the kind `pg.insert` in `registry`.
pub async fn install(cfg: &PgConfig, registry: &mut Registry) -> Result<()> {
    if !valid_table(&cfg.table) {
        return Err(Error::Config(format!(
            "--pg-table {:?}: use lower-case letters, digits and '_'",
            cfg.table
        )));
    }
    if cfg.pool_size == 0 {
        return Err(Error::Config("--pg-pool-size must be at least 1".into()));
    }
    let pg_config: tokio_postgres::Config = cfg
        .url
        .parse()
        .map_err(|e| Error::Config(format!("--pg-url is not a PostgreSQL URL: {e}")))?;
    let manager = Manager::from_config(
        pg_config,
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(cfg.pool_size)
        .timeouts(Timeouts {
            wait: Some(cfg.wait_timeout),
            create: Some(Duration::from_secs(10)),
            recycle: Some(Duration::from_secs(5)),
        })
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| Error::Config(format!("PostgreSQL pool: {e}")))?;
    let client = pool
        .get()
        .await
        .map_err(|e| Error::Config(format!("cannot reach PostgreSQL at --pg-url: {e}")))?;
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {} (job_id text PRIMARY KEY, doc jsonb NOT NULL, \
             inserted_at timestamptz NOT NULL DEFAULT now())",
            cfg.table
        ))
        .await
        .map_err(|e| Error::Config(format!("creating table {}: {e}", cfg.table)))?;
    drop(client);
    registry.resources_mut().insert(PgInsert {
        pool,
        table: cfg.table.clone(),
        wait: cfg.wait_timeout,
    });
    registry.register("pg.insert", handler_fn(pg_insert));
    Ok(())
}

async fn pg_insert(input: Value, ctx: JobContext) -> std::result::Result<Value, JobError> {
    let Some(pg) = ctx.resources.get::<PgInsert>() else {
        return Err(JobError::permanent(
            "this worker has no PostgreSQL pool (--pg-url)",
        ));
    };
    let client = pg.pool.get().await.map_err(|e| match e {
        PoolError::Timeout(_) => JobError::retry(format!(
            "no PostgreSQL connection came free within {:?}",
            pg.wait
        )),
        other => JobError::retry(format!("PostgreSQL connection: {other}")),
    })?;
    let sql = format!(
        "INSERT INTO {} (job_id, doc) VALUES ($1, $2) ON CONFLICT (job_id) DO NOTHING",
        pg.table
    );
    let doc = tokio_postgres::types::Json(&input);
    let inserted = client
        .execute(sql.as_str(), &[&ctx.meta.id, &doc])
        .await
        .map_err(|e| JobError::retry(format!("PostgreSQL insert: {e}")))?;
    Ok(json!({ "inserted": inserted }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers() {
        assert!(valid_table("conveyor_rows"));
        assert!(valid_table("_t1"));
        assert!(!valid_table("rows; drop table x"));
        assert!(!valid_table("Rows"));
        assert!(!valid_table("1rows"));
        assert!(!valid_table(""));
    }
}
