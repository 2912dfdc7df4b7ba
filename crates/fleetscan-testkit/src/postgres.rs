//! Counts read from a Postgres store itself, not through a broker.
//!
//! It must never write: tests check what brokers wrote.

use std::time::Duration;

/// Runs `sql`, a query returning one integer (such as `SELECT count(*) FROM verdicts`), on the
/// Postgres database at `url`: counts read from the store itself, not through the broker.
pub async fn pg_count(url: &str, sql: &str) -> i64 {
    use sqlx::Connection as _;
    let limit = Duration::from_secs(20);
    let work = async {
        let mut conn = sqlx::postgres::PgConnection::connect(url).await?;
        let n: i64 = sqlx::query_scalar(sql).fetch_one(&mut conn).await?;
        conn.close().await?;
        Ok::<_, sqlx::Error>(n)
    };
    match tokio::time::timeout(limit, work).await {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => panic!("`{sql}` on postgres failed: {e}"),
        Err(_) => panic!("`{sql}` on postgres took more than {limit:?}"),
    }
}
