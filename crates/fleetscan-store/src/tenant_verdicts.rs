//! Verdicts of a tenant's own scanner pools (`tenant_verdicts`, schema 3): the same rows as the
//! fleet's `verdicts`, keyed by the tenant as well, so that a verdict of one tenant's private
//! rules is never reused for, nor shown to, another tenant. Every query here filters on the
//! tenant; none reads another tenant's rows.

use fleetscan_core::{ScannerIdentity, Sha256, Verdict};

use crate::rows::{self, VerdictRow, to_i64};
use crate::{Pool, Store, StoreError, VERDICT_COLUMNS};

impl Store {
    /// Stores a verdict of `tenant`'s own scanner (an empty tenant is refused by the schema).
    /// Idempotent: the key is (tenant, sha256,
    /// scanner, engine, engine_version, ruleset_version); a second put replaces the row.
    pub async fn put_tenant_verdict(&self, tenant: &str, v: &Verdict) -> Result<(), StoreError> {
        let scan_micros = to_i64("scan_micros", v.scan_micros)?;
        let sql = format!(
            "INSERT INTO tenant_verdicts (tenant, {VERDICT_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (tenant, sha256, scanner, engine, engine_version, ruleset_version) \
             DO UPDATE SET result = excluded.result, threat_name = excluded.threat_name, \
             detail = excluded.detail, scanned_at_unix_ms = excluded.scanned_at_unix_ms, \
             scan_micros = excluded.scan_micros"
        );
        on_pool!(self, pool => {
            sqlx::query(&sql)
                .bind(tenant)
                .bind(&v.sha256.0[..])
                .bind(&v.scanner.scanner)
                .bind(&v.scanner.engine)
                .bind(&v.scanner.engine_version)
                .bind(&v.scanner.ruleset_version)
                .bind(v.kind.as_str())
                .bind(&v.threat_name)
                .bind(&v.detail)
                .bind(v.scanned_at_unix_ms)
                .bind(scan_micros)
                .execute(pool)
                .await
                .map(drop)?
        });
        Ok(())
    }

    /// `tenant`'s verdict of exactly this scanner identity for the content.
    pub async fn find_tenant_verdict(
        &self,
        tenant: &str,
        sha256: &Sha256,
        scanner: &ScannerIdentity,
    ) -> Result<Option<Verdict>, StoreError> {
        let sql = format!(
            "SELECT {VERDICT_COLUMNS} FROM tenant_verdicts WHERE tenant = $1 AND sha256 = $2 \
             AND scanner = $3 AND engine = $4 AND engine_version = $5 AND ruleset_version = $6"
        );
        let row: Option<VerdictRow> = on_pool!(self, pool => {
            sqlx::query_as(&sql)
                .bind(tenant)
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

    /// Every verdict of `tenant`'s own scanners for the content, newest first.
    pub async fn tenant_verdicts_for(
        &self,
        tenant: &str,
        sha256: &Sha256,
    ) -> Result<Vec<Verdict>, StoreError> {
        let sql = format!(
            "SELECT {VERDICT_COLUMNS} FROM tenant_verdicts WHERE tenant = $1 AND sha256 = $2 \
             ORDER BY scanned_at_unix_ms DESC, scanner, engine, engine_version, ruleset_version"
        );
        let rows: Vec<VerdictRow> = on_pool!(self, pool => {
            sqlx::query_as(&sql)
                .bind(tenant)
                .bind(&sha256.0[..])
                .fetch_all(pool)
                .await?
        });
        rows.into_iter().map(rows::verdict).collect()
    }
}
