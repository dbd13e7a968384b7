//! The test database: PostgreSQL on 127.0.0.1:5432, database `test`, trust authentication.

/// Its URL, naming the client `app` (as `pg_stat_activity` shows it).
pub fn pg_url(app: &str) -> String {
    std::env::var("CONVEYOR_TEST_PG").unwrap_or_else(|_| {
        format!("postgres://postgres@127.0.0.1:5432/test?application_name={app}")
    })
}

/// A connection of the test's own, to look at what the workers wrote.
pub async fn pg_client() -> tokio_postgres::Client {
    let url = pg_url("conveyor_test_observer");
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!("PostgreSQL is not reachable at 127.0.0.1:5432 ({e}); run scripts/ensure-brokers.sh, which starts it")
        });
    tokio::spawn(conn);
    client
}
