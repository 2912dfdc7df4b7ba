//! The fleetscan store: verdicts, recorded accesses and hosts, in Postgres (fleets) or SQLite
//! (one host, embedded).
//!
//! This is the only crate that speaks SQL; everything above it sees domain types. Both
//! backends hold the same schema with the same meaning (`migrations/sqlite`,
//! `migrations/postgres`, embedded in the binary and applied by [`Store::connect`]). Stored
//! enumerations go through fleetscan-core's `as_str`/`parse`, and an unparseable stored value
//! is an error, never a default. Unsigned numbers are converted to the signed 64-bit columns
//! with checked conversions only.
//!
//! The store never retries and never queues: it reports [`StoreError::is_unavailable`] and the
//! broker decides what to do (write-behind, fail mode).

mod error;
mod migrations;
mod rows;
#[cfg(feature = "testing")]
pub mod testing;

use std::borrow::Cow;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use fleetscan_core::{AccessRecord, Action, DEFAULT_TENANT, ScannerIdentity, Sha256, Verdict};
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection};

pub use error::StoreError;
pub use fleet::{
    Claim, FLEET_CHANNEL, FleetState, Listener, Notice, PoolIdentity, VERDICT_CHANNEL,
};
use rows::{AccessRow, HostRow, VerdictRow, to_i64};

/// Which database a [`Store`] talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A filter over recorded accesses, newest (highest id) first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessFilter {
    pub tenant: String,
    pub node: Option<String>,
    pub action: Option<Action>,
    pub sha256: Option<Sha256>,
    /// Only accesses with a smaller id: the cursor for the next page.
    pub before_id: Option<i64>,
    /// Clamped to `1..=1000`.
    pub limit: u32,
}

impl Default for AccessFilter {
    /// The default tenant's 100 newest accesses.
    fn default() -> Self {
        AccessFilter {
            tenant: DEFAULT_TENANT.to_owned(),
            node: None,
            action: None,
            sha256: None,
            before_id: None,
            limit: 100,
        }
    }
}

/// The largest page [`Store::list_accesses`] returns.
pub const MAX_LIST_LIMIT: u32 = 1000;

/// An agent's host as the brokers have seen it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub tenant: String,
    pub node: String,
    pub cluster: String,
    pub agent_version: String,
    pub first_seen_unix_ms: i64,
    pub last_seen_unix_ms: i64,
    pub allowed_count: u64,
    pub denied_count: u64,
}

/// Row counts, for stats and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StoredCounts {
    pub verdicts: u64,
    pub accesses: u64,
}

/// A handle on the store: a connection pool inside, cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

#[derive(Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend())
            .finish_non_exhaustive()
    }
}

/// Runs the same code on whichever pool the store holds. Each arm is type-checked on its own,
/// so one body serves both backends wherever the SQL text is the same.
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.pool {
            Pool::Sqlite($pool) => $body,
            Pool::Postgres($pool) => $body,
        }
    };
}

// After `on_pool!`, which it uses (macros are visible only below their definition).
mod fleet;
mod tenant_verdicts;

/// How long a call waits for a pooled connection before reporting the store unavailable.
/// Short, because the broker answers agents under deadlines of a few seconds and would rather
/// fall back than wait.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long SQLite waits on another writer's lock before giving up (then: unavailable).
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
const POSTGRES_MAX_CONNECTIONS: u32 = 16;
/// Page cache of each SQLite connection, at most (SQLite's default is 2 MiB). Verdicts are keyed
/// by random digests, so a batch of them touches pages all over the table: with a larger cache
/// the writer rereads fewer of them (a batch of 10,000 verdicts into a table of 500,000: ~40%
/// more verdicts a second than with the default). Grown only as pages are used.
const SQLITE_CACHE_KIB: u32 = 32 * 1024;
/// SQLite serialises writers anyway; a few connections let readers run beside a writer (WAL).
const SQLITE_MAX_CONNECTIONS: u32 = 4;

const VERDICT_COLUMNS: &str = "sha256, scanner, engine, engine_version, ruleset_version, \
     result, threat_name, detail, scanned_at_unix_ms, scan_micros";

const ACCESS_COLUMNS: &str = "at_unix_ms, tenant, node, path, kind, action, reason, sha256, \
     threat_name, pid, uid, exe, decided_by, context";

const HOST_COLUMNS: &str = "tenant, node, cluster, agent_version, first_seen_unix_ms, \
     last_seen_unix_ms, allowed_count, denied_count";

/// Rows per SQLite insert statement: 14 parameters a row stays well under SQLite's limit of
/// 32766 bind parameters.
const SQLITE_INSERT_CHUNK: usize = 500;

/// `INSERT INTO accesses (...) VALUES (?, ...), ... RETURNING id` for `rows` rows.
fn sqlite_insert_accesses(rows: usize) -> String {
    const ROW: &str = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
    let mut sql = format!("INSERT INTO accesses ({ACCESS_COLUMNS}) VALUES ");
    sql.reserve(rows * (ROW.len() + 2) + 16);
    for i in 0..rows {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(ROW);
    }
    sql.push_str(" RETURNING id");
    sql
}

fn sqlite_insert_accesses_full_chunk() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| sqlite_insert_accesses(SQLITE_INSERT_CHUNK))
}

/// Takes one id per row from the table's sequence. Sequences hand out increasing values, so the
/// sorted ids keep the batch's order.
const ALLOCATE_ACCESS_IDS_POSTGRES: &str =
    "SELECT nextval(pg_get_serial_sequence('accesses', 'id')) FROM generate_series(1, $1)";

/// One statement for the whole batch, whatever its size: columns travel as arrays (no limit on
/// bind parameters, one prepared statement for every batch size).
const INSERT_ACCESSES_POSTGRES: &str = "INSERT INTO accesses (id, at_unix_ms, tenant, node, path, \
     kind, action, reason, sha256, threat_name, pid, uid, exe, decided_by, context) \
     SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[], \
     $6::text[], $7::text[], $8::text[], $9::bytea[], $10::text[], $11::bigint[], $12::bigint[], \
     $13::text[], $14::text[], $15::text[])";

/// The latest hello wins for cluster, version and last_seen; first_seen is the earliest time
/// ever given (a row created by `add_host_counts` carries the time of that call).
const HOST_SEEN_SQLITE: &str = "INSERT INTO hosts (tenant, node, cluster, agent_version, \
     first_seen_unix_ms, last_seen_unix_ms, allowed_count, denied_count) \
     VALUES ($1, $2, $3, $4, $5, $5, 0, 0) \
     ON CONFLICT (tenant, node) DO UPDATE SET cluster = excluded.cluster, \
     agent_version = excluded.agent_version, \
     first_seen_unix_ms = min(hosts.first_seen_unix_ms, excluded.first_seen_unix_ms), \
     last_seen_unix_ms = excluded.last_seen_unix_ms";

const HOST_SEEN_POSTGRES: &str = "INSERT INTO hosts (tenant, node, cluster, agent_version, \
     first_seen_unix_ms, last_seen_unix_ms, allowed_count, denied_count) \
     VALUES ($1, $2, $3, $4, $5, $5, 0, 0) \
     ON CONFLICT (tenant, node) DO UPDATE SET cluster = excluded.cluster, \
     agent_version = excluded.agent_version, \
     first_seen_unix_ms = LEAST(hosts.first_seen_unix_ms, excluded.first_seen_unix_ms), \
     last_seen_unix_ms = excluded.last_seen_unix_ms";

/// A host first known by its counters (before any hello was stored) gets empty cluster and
/// version and "now" as both times; a later `host_seen` fills them in.
const ADD_HOST_COUNTS: &str = "INSERT INTO hosts (tenant, node, cluster, agent_version, \
     first_seen_unix_ms, last_seen_unix_ms, allowed_count, denied_count) \
     VALUES ($1, $2, '', '', $3, $3, $4, $5) \
     ON CONFLICT (tenant, node) DO UPDATE SET \
     allowed_count = hosts.allowed_count + excluded.allowed_count, \
     denied_count = hosts.denied_count + excluded.denied_count";

impl Store {
    /// "sqlite://PATH" (file created if missing), "sqlite::memory:", "postgres://…".
    /// Applies the migrations of the backend before returning.
    ///
    /// Nothing is retried: a database that cannot be reached is reported at once, as an error
    /// for which [`StoreError::is_unavailable`] is true.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        let store = if url.starts_with("sqlite:") {
            Store::connect_sqlite(url).await?
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Store::connect_postgres(url).await?
        } else {
            return Err(StoreError::BadUrl(format!(
                "{url:?}: expected sqlite://PATH, sqlite::memory: or postgres://..."
            )));
        };
        tracing::debug!(backend = ?store.backend(), "store connected and migrated");
        Ok(store)
    }

    async fn connect_sqlite(url: &str) -> Result<Store, StoreError> {
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let mut options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::BadUrl(format!("{url:?}: {e}")))?
            .create_if_missing(true)
            .foreign_keys(true)
            .busy_timeout(SQLITE_BUSY_TIMEOUT);
        if !in_memory {
            // WAL lets readers proceed beside the writer; NORMAL is durable across application
            // crashes, and loses at most the last transactions on power loss.
            options = options
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .pragma("cache_size", format!("-{SQLITE_CACHE_KIB}"));
        }
        let options = options.disable_statement_logging();

        // Migrate on one connection made by hand, so that an unopenable file is reported once
        // and at once rather than through the pool's retries.
        let mut conn = SqliteConnection::connect_with(&options).await?;
        migrations::migrator(migrations::SQLITE)
            .run(&mut conn)
            .await
            .map_err(StoreError::from_migrate)?;

        let pool_options = if in_memory {
            // Every connection to ":memory:" would be a database of its own (sqlx shares one
            // per options through a shared cache, which lives only while a connection does):
            // keep exactly one connection, forever.
            SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
        } else {
            SqlitePoolOptions::new().max_connections(SQLITE_MAX_CONNECTIONS)
        };
        let pool = pool_options
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        // Closed only now so that an in-memory database outlives the hand-made connection.
        conn.close().await?;
        Ok(Store {
            pool: Pool::Sqlite(pool),
        })
    }

    async fn connect_postgres(url: &str) -> Result<Store, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::BadUrl(format!("{}: {e}", redact(url))))?
            .disable_statement_logging();

        // A pool's connect retries refused connections until its acquire timeout; one
        // connection made by hand does not, so an unreachable server is reported at once.
        let mut conn = PgConnection::connect_with(&options).await?;
        migrations::migrator(migrations::POSTGRES)
            .run(&mut conn)
            .await
            .map_err(StoreError::from_migrate)?;
        conn.close().await?;

        let pool = PgPoolOptions::new()
            .max_connections(POSTGRES_MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options);
        Ok(Store {
            pool: Pool::Postgres(pool),
        })
    }

    pub fn backend(&self) -> Backend {
        match self.pool {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    /// Idempotent: the key is (sha256, scanner, engine, engine_version, ruleset_version);
    /// a second put of the same key replaces the row.
    pub async fn put_verdict(&self, v: &Verdict) -> Result<(), StoreError> {
        self.put_verdicts(std::slice::from_ref(v)).await
    }

    /// Stores many verdicts in one transaction, with [`Store::put_verdict`]'s meaning: keyed by
    /// (sha256, scanner, engine, engine_version, ruleset_version), a put of a stored key
    /// replaces the row, and of two verdicts of one key in `verdicts` the later wins. All or
    /// nothing: a verdict out of range fails the call before anything is written.
    ///
    /// Takes `&[Verdict]`, `&[Arc<Verdict>]` or `&[&Verdict]`, so a caller holding shared
    /// verdicts need not copy them.
    pub async fn put_verdicts<V>(&self, verdicts: &[V]) -> Result<(), StoreError>
    where
        V: std::borrow::Borrow<Verdict> + Sync,
    {
        self.upsert_verdicts(None, verdicts).await
    }

    /// Writes verdicts into the fleet's `verdicts` (`tenant` `None`) or into `tenant`'s own
    /// scope in `tenant_verdicts`, whose rows are the same with the tenant as the key's first
    /// column: one statement text for both, so that the two tables cannot drift apart.
    pub(crate) async fn upsert_verdicts<V>(
        &self,
        tenant: Option<&str>,
        verdicts: &[V],
    ) -> Result<(), StoreError>
    where
        V: std::borrow::Borrow<Verdict> + Sync,
    {
        /// Rows in one of SQLite's multi-row inserts; 11 × 500 rows stays well under SQLite's
        /// limit of 32766 bind parameters.
        const SQLITE_ROWS: usize = 500;
        let (table, key) = match tenant {
            None => ("verdicts", ""),
            Some(_) => ("tenant_verdicts", "tenant, "),
        };
        let upsert = format!(
            " ON CONFLICT ({key}sha256, scanner, engine, engine_version, ruleset_version) \
             DO UPDATE SET result = excluded.result, threat_name = excluded.threat_name, \
             detail = excluded.detail, scanned_at_unix_ms = excluded.scanned_at_unix_ms, \
             scan_micros = excluded.scan_micros"
        );
        // Postgres refuses an upsert that touches one row twice in a statement, and SQLite's
        // multi-row insert would apply both in order anyway: keep each key's last verdict only,
        // in the order of first appearance.
        let mut index: std::collections::HashMap<(&Sha256, &ScannerIdentity), usize> =
            std::collections::HashMap::with_capacity(verdicts.len());
        let mut rows: Vec<(&Verdict, i64)> = Vec::with_capacity(verdicts.len());
        for v in verdicts {
            let v = v.borrow();
            let row = (v, to_i64("scan_micros", v.scan_micros)?);
            match index.entry((&v.sha256, &v.scanner)) {
                std::collections::hash_map::Entry::Occupied(at) => rows[*at.get()] = row,
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(rows.len());
                    rows.push(row);
                }
            }
        }
        if rows.is_empty() {
            return Ok(());
        }
        match &self.pool {
            Pool::Sqlite(pool) => {
                let row = match tenant {
                    None => "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    Some(_) => "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                };
                let statement = |n: usize| {
                    let mut sql = format!("INSERT INTO {table} ({key}{VERDICT_COLUMNS}) VALUES ");
                    for i in 0..n {
                        if i > 0 {
                            sql.push_str(", ");
                        }
                        sql.push_str(row);
                    }
                    sql.push_str(&upsert);
                    sql
                };
                static FULL: OnceLock<String> = OnceLock::new();
                static FULL_TENANT: OnceLock<String> = OnceLock::new();
                let full_statement = match tenant {
                    None => &FULL,
                    Some(_) => &FULL_TENANT,
                };
                let mut tx = pool.begin().await?;
                for chunk in rows.chunks(SQLITE_ROWS) {
                    let full = chunk.len() == SQLITE_ROWS;
                    let sql = if full {
                        Cow::Borrowed(
                            full_statement
                                .get_or_init(|| statement(SQLITE_ROWS))
                                .as_str(),
                        )
                    } else {
                        Cow::Owned(statement(chunk.len()))
                    };
                    // Keep the prepared statement only for the size that recurs.
                    let mut query = sqlx::query(&sql).persistent(full);
                    for (v, scan_micros) in chunk {
                        if let Some(tenant) = tenant {
                            query = query.bind(tenant);
                        }
                        query = query
                            .bind(&v.sha256.0[..])
                            .bind(&v.scanner.scanner)
                            .bind(&v.scanner.engine)
                            .bind(&v.scanner.engine_version)
                            .bind(&v.scanner.ruleset_version)
                            .bind(v.kind.as_str())
                            .bind(&v.threat_name)
                            .bind(&v.detail)
                            .bind(v.scanned_at_unix_ms)
                            .bind(*scan_micros);
                    }
                    query.execute(&mut *tx).await?;
                }
                tx.commit().await?;
            }
            Pool::Postgres(pool) => {
                // One statement whatever the batch size (a transaction of its own): the columns
                // travel as arrays, one prepared statement serves every batch.
                // The tenant, if any, is one more (scalar) parameter, the last.
                let tenant_column = if tenant.is_some() { "$11::text, " } else { "" };
                let sql = format!(
                    "INSERT INTO {table} ({key}{VERDICT_COLUMNS}) SELECT {tenant_column}* \
                     FROM UNNEST($1::bytea[], $2::text[], $3::text[], $4::text[], $5::text[], \
                     $6::text[], $7::text[], $8::text[], $9::bigint[], $10::bigint[]){upsert}"
                );
                let column = |f: fn(&Verdict) -> &str| -> Vec<&str> {
                    rows.iter().map(|&(v, _)| f(v)).collect()
                };
                let query = sqlx::query(&sql)
                    .bind(
                        rows.iter()
                            .map(|(v, _)| &v.sha256.0[..])
                            .collect::<Vec<&[u8]>>(),
                    )
                    .bind(column(|v| &v.scanner.scanner))
                    .bind(column(|v| &v.scanner.engine))
                    .bind(column(|v| &v.scanner.engine_version))
                    .bind(column(|v| &v.scanner.ruleset_version))
                    .bind(column(|v| v.kind.as_str()))
                    .bind(
                        rows.iter()
                            .map(|(v, _)| v.threat_name.as_deref())
                            .collect::<Vec<Option<&str>>>(),
                    )
                    .bind(
                        rows.iter()
                            .map(|(v, _)| v.detail.as_deref())
                            .collect::<Vec<Option<&str>>>(),
                    )
                    .bind(
                        rows.iter()
                            .map(|(v, _)| v.scanned_at_unix_ms)
                            .collect::<Vec<i64>>(),
                    )
                    .bind(rows.iter().map(|(_, m)| *m).collect::<Vec<i64>>());
                let query = match tenant {
                    Some(tenant) => query.bind(tenant),
                    None => query,
                };
                query.execute(pool).await?;
            }
        }
        Ok(())
    }

    /// The contents the fleet-wide verdicts table holds a verdict of, in digest order: at most
    /// `limit` of them, each greater than `after`. Pages through the table without a long read
    /// transaction (a broker that owns its store reads them all at start).
    pub async fn verdict_contents_after(
        &self,
        after: Option<&Sha256>,
        limit: u32,
    ) -> Result<Vec<Sha256>, StoreError> {
        // The primary key starts with sha256: an index range scan.
        const SQL: &str =
            "SELECT DISTINCT sha256 FROM verdicts WHERE sha256 > $1 ORDER BY sha256 LIMIT $2";
        let after: &[u8] = after.map_or(&[], |s| &s.0[..]);
        let rows: Vec<Vec<u8>> = on_pool!(self, pool => {
            sqlx::query_scalar(SQL)
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?
        });
        rows.iter().map(|d| rows::sha256("verdicts", d)).collect()
    }

    /// The verdict of exactly this scanner identity (all four fields) for the content.
    pub async fn find_verdict(
        &self,
        sha256: &Sha256,
        scanner: &ScannerIdentity,
    ) -> Result<Option<Verdict>, StoreError> {
        let sql = format!(
            "SELECT {VERDICT_COLUMNS} FROM verdicts WHERE sha256 = $1 AND scanner = $2 \
             AND engine = $3 AND engine_version = $4 AND ruleset_version = $5"
        );
        let row: Option<VerdictRow> = on_pool!(self, pool => {
            sqlx::query_as(&sql)
                .bind(&sha256.0[..])
                .bind(&scanner.scanner)
                .bind(&scanner.engine)
                .bind(&scanner.engine_version)
                .bind(&scanner.ruleset_version)
                .fetch_optional(pool)
                .await?
        });
        row.map(rows::verdict).transpose()
    }

    /// Every stored verdict for the content, newest first (ties broken by scanner identity, so
    /// the order is stable).
    pub async fn verdicts_for(&self, sha256: &Sha256) -> Result<Vec<Verdict>, StoreError> {
        let sql = format!(
            "SELECT {VERDICT_COLUMNS} FROM verdicts WHERE sha256 = $1 \
             ORDER BY scanned_at_unix_ms DESC, scanner, engine, engine_version, ruleset_version"
        );
        let rows: Vec<VerdictRow> = on_pool!(self, pool => {
            sqlx::query_as(&sql).bind(&sha256.0[..]).fetch_all(pool).await?
        });
        rows.into_iter().map(rows::verdict).collect()
    }

    /// Inserts in one transaction; returns the ids given, in order.
    pub async fn record_accesses(&self, records: &[AccessRecord]) -> Result<Vec<i64>, StoreError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        match &self.pool {
            Pool::Sqlite(pool) => {
                // Multi-row inserts, as few statements as SQLite's limit on bind parameters
                // allows. RETURNING yields rows in no promised order, but AUTOINCREMENT gives
                // each row an id larger than any before it, rows are inserted in VALUES order
                // and the transaction holds the only write lock: sorted, the ids are the rows'.
                let mut tx = pool.begin().await?;
                let mut ids = Vec::with_capacity(records.len());
                for chunk in records.chunks(SQLITE_INSERT_CHUNK) {
                    let full = chunk.len() == SQLITE_INSERT_CHUNK;
                    let sql = if full {
                        Cow::Borrowed(sqlite_insert_accesses_full_chunk())
                    } else {
                        Cow::Owned(sqlite_insert_accesses(chunk.len()))
                    };
                    let mut query = sqlx::query_scalar::<_, i64>(&sql)
                        // Keep the prepared statement only for the size that recurs.
                        .persistent(full);
                    for r in chunk {
                        query = query
                            .bind(r.at_unix_ms)
                            .bind(&r.tenant)
                            .bind(&r.node)
                            .bind(&r.path)
                            .bind(r.kind.as_str())
                            .bind(r.action.as_str())
                            .bind(&r.reason)
                            .bind(r.sha256.as_ref().map(|s| &s.0[..]))
                            .bind(&r.threat_name)
                            .bind(i64::from(r.pid))
                            .bind(i64::from(r.uid))
                            .bind(&r.exe)
                            .bind(r.decided_by.as_str())
                            .bind(rows::context_json(&r.context));
                    }
                    let mut chunk_ids = query.fetch_all(&mut *tx).await?;
                    chunk_ids.sort_unstable();
                    ids.extend(chunk_ids);
                }
                tx.commit().await?;
                Ok(ids)
            }
            Pool::Postgres(pool) => {
                let count = i64::try_from(records.len()).map_err(|_| StoreError::OutOfRange {
                    what: "batch size",
                    value: u64::try_from(records.len()).unwrap_or(u64::MAX),
                })?;
                let mut ids: Vec<i64> = sqlx::query_scalar(ALLOCATE_ACCESS_IDS_POSTGRES)
                    .bind(count)
                    .fetch_all(pool)
                    .await?;
                ids.sort_unstable();
                let columns = rows::AccessColumns::new(records);
                // A single statement is a transaction of its own: all rows or none.
                sqlx::query(INSERT_ACCESSES_POSTGRES)
                    .bind(&ids)
                    .bind(columns.at_unix_ms)
                    .bind(columns.tenant)
                    .bind(columns.node)
                    .bind(columns.path)
                    .bind(columns.kind)
                    .bind(columns.action)
                    .bind(columns.reason)
                    .bind(columns.sha256)
                    .bind(columns.threat_name)
                    .bind(columns.pid)
                    .bind(columns.uid)
                    .bind(columns.exe)
                    .bind(columns.decided_by)
                    .bind(columns.context)
                    .execute(pool)
                    .await?;
                Ok(ids)
            }
        }
    }

    /// The tenant's accesses matching the filter, newest (highest id) first, at most
    /// `limit` (clamped to `1..=1000`).
    pub async fn list_accesses(
        &self,
        filter: &AccessFilter,
    ) -> Result<Vec<(i64, AccessRecord)>, StoreError> {
        let limit = i64::from(filter.limit.clamp(1, MAX_LIST_LIMIT));
        // Only the filters present become conditions, so each combination gets a plan that
        // uses its index ((tenant, id), (tenant, node, id) or (sha256, id)).
        let mut sql = format!("SELECT id, {ACCESS_COLUMNS} FROM accesses WHERE tenant = $1");
        let mut n = 1;
        let mut condition = |sql: &mut String, column: &str, op: &str| {
            n += 1;
            sql.push_str(&format!(" AND {column} {op} ${n}"));
        };
        if filter.node.is_some() {
            condition(&mut sql, "node", "=");
        }
        if filter.action.is_some() {
            condition(&mut sql, "action", "=");
        }
        if filter.sha256.is_some() {
            condition(&mut sql, "sha256", "=");
        }
        if filter.before_id.is_some() {
            condition(&mut sql, "id", "<");
        }
        sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", n + 1));

        let rows: Vec<AccessRow> = on_pool!(self, pool => {
            let mut query = sqlx::query_as(&sql).bind(&filter.tenant);
            if let Some(node) = &filter.node {
                query = query.bind(node);
            }
            if let Some(action) = filter.action {
                query = query.bind(action.as_str());
            }
            if let Some(sha256) = &filter.sha256 {
                query = query.bind(&sha256.0[..]);
            }
            if let Some(before_id) = filter.before_id {
                query = query.bind(before_id);
            }
            query.bind(limit).fetch_all(pool).await?
        });
        rows.into_iter().map(rows::access).collect()
    }

    /// Creates or updates the host row (first_seen kept, last_seen set).
    ///
    /// Precisely: cluster, agent version and last_seen are this call's; first_seen is the
    /// earliest time ever given for the host.
    pub async fn host_seen(
        &self,
        tenant: &str,
        node: &str,
        cluster: &str,
        agent_version: &str,
        at_unix_ms: i64,
    ) -> Result<(), StoreError> {
        let sql = match self.backend() {
            Backend::Sqlite => HOST_SEEN_SQLITE,
            Backend::Postgres => HOST_SEEN_POSTGRES,
        };
        on_pool!(self, pool => {
            sqlx::query(sql)
                .bind(tenant)
                .bind(node)
                .bind(cluster)
                .bind(agent_version)
                .bind(at_unix_ms)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Adds to the host's allowed/denied counters (creating the host row if needed).
    pub async fn add_host_counts(
        &self,
        tenant: &str,
        node: &str,
        allowed: u64,
        denied: u64,
    ) -> Result<(), StoreError> {
        let allowed = to_i64("allowed count", allowed)?;
        let denied = to_i64("denied count", denied)?;
        let now = fleetscan_core::now_unix_ms();
        on_pool!(self, pool => {
            sqlx::query(ADD_HOST_COUNTS)
                .bind(tenant)
                .bind(node)
                .bind(now)
                .bind(allowed)
                .bind(denied)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// The tenant's hosts, by node name.
    pub async fn list_hosts(&self, tenant: &str) -> Result<Vec<HostRecord>, StoreError> {
        let sql = format!("SELECT {HOST_COLUMNS} FROM hosts WHERE tenant = $1 ORDER BY node");
        let rows: Vec<HostRow> = on_pool!(self, pool => {
            sqlx::query_as(&sql).bind(tenant).fetch_all(pool).await?
        });
        rows.into_iter().map(rows::host).collect()
    }

    pub async fn counts(&self) -> Result<StoredCounts, StoreError> {
        const SQL: &str = "SELECT (SELECT COUNT(*) FROM verdicts), (SELECT COUNT(*) FROM accesses)";
        let (verdicts, accesses): (i64, i64) = on_pool!(self, pool => {
            sqlx::query_as(SQL).fetch_one(pool).await?
        });
        Ok(StoredCounts {
            verdicts: rows::to_u64("verdicts", "count", verdicts)?,
            accesses: rows::to_u64("accesses", "count", accesses)?,
        })
    }
}

/// The URL without its password, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _password)) => {
                    format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..])
                }
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
    }
}
