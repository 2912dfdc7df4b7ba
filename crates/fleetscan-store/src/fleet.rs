//! What the brokers of one fleet share besides verdicts: the fleet's verdict generation, each
//! pool's current scanner identity, claims on scans in progress, and (Postgres only) the
//! notifications that tell brokers a verdict was stored or the fleet state changed.
//!
//! Time that decides between brokers (claim expiry) is read from the database's clock, never
//! from the caller's, so brokers' clocks need not agree. Nothing here retries or waits: the
//! broker decides what to do with an unavailable store.

use std::time::Duration;

use fleetscan_core::{ScannerIdentity, Sha256};
use sqlx::postgres::PgListener;

use crate::{Pool, Store, StoreError};

/// The Postgres channel on which a stored verdict is announced; the payload is the content's
/// SHA-256 in hex.
pub const VERDICT_CHANNEL: &str = "fleetscan_verdict";
/// The Postgres channel on which a change of the fleet state (generation, a pool's identity)
/// is announced; the payload is empty.
pub const FLEET_CHANNEL: &str = "fleetscan_fleet";

/// One pool's current scanner identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolIdentity {
    pub tenant: String,
    pub pool: String,
    pub identity: ScannerIdentity,
}

/// The fleet's shared state: the verdict generation and every pool's current identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetState {
    pub generation: u64,
    pub pools: Vec<PoolIdentity>,
    /// Every identity any pool ever had (current or not): a broker deciding alone while the
    /// store is away must not take one of these for new.
    pub known: Vec<PoolIdentity>,
}

impl FleetState {
    /// The current identity of one pool.
    pub fn current(&self, tenant: &str, pool: &str) -> Option<&ScannerIdentity> {
        self.pools
            .iter()
            .find(|p| p.tenant == tenant && p.pool == pool)
            .map(|p| &p.identity)
    }
}

/// The outcome of [`Store::claim_scan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The caller holds the claim (it was free, expired, or already the caller's).
    Won,
    /// Another owner holds it until the given time (database clock).
    Held {
        owner: String,
        expires_at_unix_ms: i64,
    },
}

/// A notification from another broker (or this one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// A verdict on this content was stored.
    Verdict(Sha256),
    /// The fleet state changed: read it again.
    Fleet,
    /// The listening connection was lost and is being re-established: notifications may have
    /// been missed, so everything a notification would have said must be read again.
    Lost,
}

/// Listens for [`Notice`]s (Postgres only).
pub struct Listener {
    inner: PgListener,
}

impl Listener {
    /// The next notice. After [`Notice::Lost`] the next call reconnects; an error means the
    /// reconnection failed (the store is unavailable) and the caller should wait and call again.
    pub async fn recv(&mut self) -> Result<Notice, StoreError> {
        match self.inner.try_recv().await.map_err(StoreError::from_sqlx)? {
            None => Ok(Notice::Lost),
            Some(n) if n.channel() == VERDICT_CHANNEL => match n.payload().parse::<Sha256>() {
                Ok(sha) => Ok(Notice::Verdict(sha)),
                // Not ours to judge: someone else notified on the channel. Treat as "look again".
                Err(_) => Ok(Notice::Lost),
            },
            Some(_) => Ok(Notice::Fleet),
        }
    }
}

/// "Now" in milliseconds on the database's clock.
const NOW_MS_POSTGRES: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::BIGINT";
const NOW_MS_SQLITE: &str = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)";

/// tenant, pool, scanner, engine, engine_version, ruleset_version.
type PoolRow = (String, String, String, String, String, String);

/// generation, then a pool's current identity (all NULL when no pool has one).
type CurrentRow = (
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

fn pool_identity(row: PoolRow) -> PoolIdentity {
    let (tenant, pool, scanner, engine, engine_version, ruleset_version) = row;
    PoolIdentity {
        tenant,
        pool,
        identity: ScannerIdentity {
            scanner,
            engine,
            engine_version,
            ruleset_version,
        },
    }
}

const IDENTITY_COLUMNS: &str = "scanner, engine, engine_version, ruleset_version";

impl Store {
    /// The fleet generation, every pool's current identity, and every identity any pool ever
    /// had. The generation and the current identities are read by one statement, so they are
    /// one consistent snapshot (a registration committing meanwhile is wholly in or out).
    pub async fn fleet_state(&self) -> Result<FleetState, StoreError> {
        let sql_current = "SELECT f.generation, p.tenant, p.pool, p.scanner, p.engine, \
             p.engine_version, p.ruleset_version FROM fleet_state f \
             LEFT JOIN pool_current p ON 1 = 1 WHERE f.id = 1 ORDER BY p.tenant, p.pool";
        let sql_known = format!(
            "SELECT tenant, pool, {IDENTITY_COLUMNS} FROM pool_identities \
             ORDER BY tenant, pool, first_seen_unix_ms, {IDENTITY_COLUMNS}"
        );
        let (rows, known): (Vec<CurrentRow>, Vec<PoolRow>) = on_pool!(self, pool => {
            let rows = sqlx::query_as(sql_current).fetch_all(pool).await?;
            let known = sqlx::query_as(&sql_known).fetch_all(pool).await?;
            (rows, known)
        });
        let Some(generation) = rows.first().map(|r| r.0) else {
            return Err(StoreError::Corrupt {
                table: "fleet_state",
                column: "generation",
                value: "no row".to_owned(),
            });
        };
        let pools = rows
            .into_iter()
            .filter_map(
                |(_, tenant, pool, scanner, engine, engine_version, ruleset_version)| {
                    Some((
                        tenant?,
                        pool?,
                        scanner?,
                        engine?,
                        engine_version?,
                        ruleset_version?,
                    ))
                },
            )
            .map(pool_identity)
            .collect();
        Ok(FleetState {
            generation: generation_from(generation)?,
            pools,
            known: known.into_iter().map(pool_identity).collect(),
        })
    }

    /// A worker registered `identity` in the pool. An identity the pool never had before
    /// becomes its current one, and the fleet generation moves on; one it had before changes
    /// nothing (an old worker reconnecting must not turn the pool back), unless the pool has no
    /// current identity at all. Returns the fleet state after the call. On Postgres, a change
    /// is announced on [`FLEET_CHANNEL`] when the transaction commits.
    pub async fn register_identity(
        &self,
        tenant: &str,
        pool_name: &str,
        identity: &ScannerIdentity,
        at_unix_ms: i64,
    ) -> Result<FleetState, StoreError> {
        let insert_seen = format!(
            "INSERT INTO pool_identities (tenant, pool, {IDENTITY_COLUMNS}, first_seen_unix_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING"
        );
        let select_current =
            format!("SELECT {IDENTITY_COLUMNS} FROM pool_current WHERE tenant = $1 AND pool = $2");
        let upsert_current = format!(
            "INSERT INTO pool_current (tenant, pool, {IDENTITY_COLUMNS}, generation) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (tenant, pool) DO UPDATE SET \
             scanner = excluded.scanner, engine = excluded.engine, \
             engine_version = excluded.engine_version, \
             ruleset_version = excluded.ruleset_version, generation = excluded.generation"
        );
        let is_postgres = matches!(self.pool, Pool::Postgres(_));
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            // A write first: it takes the fleet's one row lock (Postgres) or the database's
            // write lock (SQLite), so concurrent registrations are decided one at a time.
            let (generation,): (i64,) = sqlx::query_as(
                "UPDATE fleet_state SET generation = generation WHERE id = 1 RETURNING generation",
            )
            .fetch_one(&mut *tx)
            .await?;
            let new = sqlx::query(&insert_seen)
                .bind(tenant)
                .bind(pool_name)
                .bind(&identity.scanner)
                .bind(&identity.engine)
                .bind(&identity.engine_version)
                .bind(&identity.ruleset_version)
                .bind(at_unix_ms)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                == 1;
            let current: Option<(String, String, String, String)> = sqlx::query_as(&select_current)
                .bind(tenant)
                .bind(pool_name)
                .fetch_optional(&mut *tx)
                .await?;
            let is_current = current.as_ref().is_some_and(|(s, e, ev, rv)| {
                *s == identity.scanner
                    && *e == identity.engine
                    && *ev == identity.engine_version
                    && *rv == identity.ruleset_version
            });
            if !is_current && (new || current.is_none()) {
                let next = generation.checked_add(1).ok_or(StoreError::OutOfRange {
                    what: "fleet generation",
                    value: u64::MAX,
                })?;
                sqlx::query("UPDATE fleet_state SET generation = $1 WHERE id = 1")
                    .bind(next)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(&upsert_current)
                    .bind(tenant)
                    .bind(pool_name)
                    .bind(&identity.scanner)
                    .bind(&identity.engine)
                    .bind(&identity.engine_version)
                    .bind(&identity.ruleset_version)
                    .bind(next)
                    .execute(&mut *tx)
                    .await?;
                if is_postgres {
                    sqlx::query("SELECT pg_notify($1, '')")
                        .bind(FLEET_CHANNEL)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            tx.commit().await?;
        });
        self.fleet_state().await
    }

    /// Claims the scan of `sha256` under `identity` for `owner` until `ttl` from now (database
    /// clock). A claim that expired, or that `owner` already holds, is taken (and extended).
    pub async fn claim_scan(
        &self,
        sha256: &Sha256,
        identity: &ScannerIdentity,
        owner: &str,
        ttl: Duration,
    ) -> Result<Claim, StoreError> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
        let now = match self.pool {
            Pool::Sqlite(_) => NOW_MS_SQLITE,
            Pool::Postgres(_) => NOW_MS_POSTGRES,
        };
        let claim = format!(
            "INSERT INTO scan_claims (sha256, {IDENTITY_COLUMNS}, owner, expires_at_unix_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, {now} + $7) \
             ON CONFLICT (sha256, {IDENTITY_COLUMNS}) DO UPDATE SET \
             owner = excluded.owner, expires_at_unix_ms = excluded.expires_at_unix_ms \
             WHERE scan_claims.expires_at_unix_ms < {now} OR scan_claims.owner = excluded.owner \
             RETURNING owner"
        );
        let holder = "SELECT owner, expires_at_unix_ms FROM scan_claims WHERE sha256 = $1 \
             AND scanner = $2 AND engine = $3 AND engine_version = $4 AND ruleset_version = $5";
        on_pool!(self, pool => {
            let won: Option<(String,)> = sqlx::query_as(&claim)
                .bind(&sha256.0[..])
                .bind(&identity.scanner)
                .bind(&identity.engine)
                .bind(&identity.engine_version)
                .bind(&identity.ruleset_version)
                .bind(owner)
                .bind(ttl_ms)
                .fetch_optional(pool)
                .await?;
            if won.is_some() {
                return Ok(Claim::Won);
            }
            let held: Option<(String, i64)> = sqlx::query_as(holder)
                .bind(&sha256.0[..])
                .bind(&identity.scanner)
                .bind(&identity.engine)
                .bind(&identity.engine_version)
                .bind(&identity.ruleset_version)
                .fetch_optional(pool)
                .await?;
            match held {
                Some((owner, expires_at_unix_ms)) => Ok(Claim::Held { owner, expires_at_unix_ms }),
                // Released between the two statements: free for whoever asks next.
                None => Box::pin(self.claim_scan(sha256, identity, owner, ttl)).await,
            }
        })
    }

    /// Gives up `owner`'s claim (if it still holds it) and, on Postgres, announces on
    /// [`VERDICT_CHANNEL`] that the content's verdict may now be read — in one statement, so a
    /// waiter woken by the notice never finds the claim still held.
    pub async fn release_claim(
        &self,
        sha256: &Sha256,
        identity: &ScannerIdentity,
        owner: &str,
    ) -> Result<(), StoreError> {
        let delete = "DELETE FROM scan_claims WHERE sha256 = $1 AND scanner = $2 AND engine = $3 \
                      AND engine_version = $4 AND ruleset_version = $5 AND owner = $6";
        match &self.pool {
            Pool::Sqlite(pool) => {
                sqlx::query(delete)
                    .bind(&sha256.0[..])
                    .bind(&identity.scanner)
                    .bind(&identity.engine)
                    .bind(&identity.engine_version)
                    .bind(&identity.ruleset_version)
                    .bind(owner)
                    .execute(pool)
                    .await?;
            }
            Pool::Postgres(pool) => {
                let sql = format!(
                    "WITH released AS ({delete} RETURNING 1) SELECT pg_notify($7, $8) \
                     FROM (SELECT count(*) FROM released) AS done"
                );
                sqlx::query(&sql)
                    .bind(&sha256.0[..])
                    .bind(&identity.scanner)
                    .bind(&identity.engine)
                    .bind(&identity.engine_version)
                    .bind(&identity.ruleset_version)
                    .bind(owner)
                    .bind(VERDICT_CHANNEL)
                    .bind(sha256.to_string())
                    .execute(pool)
                    .await?;
            }
        }
        Ok(())
    }

    /// A listener for other brokers' notices, on Postgres; `None` on SQLite, whose brokers
    /// (one per database file) have nobody to hear from.
    pub async fn listen(&self) -> Result<Option<Listener>, StoreError> {
        let Pool::Postgres(pool) = &self.pool else {
            return Ok(None);
        };
        let mut inner = PgListener::connect_with(pool)
            .await
            .map_err(StoreError::from_sqlx)?;
        inner
            .listen_all([VERDICT_CHANNEL, FLEET_CHANNEL])
            .await
            .map_err(StoreError::from_sqlx)?;
        Ok(Some(Listener { inner }))
    }

    /// One round trip to the database: whether it answers now.
    pub async fn ping(&self) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            sqlx::query("SELECT 1").execute(pool).await?;
        });
        Ok(())
    }
}

fn generation_from(stored: i64) -> Result<u64, StoreError> {
    u64::try_from(stored)
        .ok()
        .filter(|g| *g > 0)
        .ok_or_else(|| StoreError::Corrupt {
            table: "fleet_state",
            column: "generation",
            value: stored.to_string(),
        })
}
