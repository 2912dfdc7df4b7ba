//! Verdicts of a tenant's own scanner pools (`tenant_verdicts`, schema 3): the same rows as the
//! fleet's `verdicts`, keyed by the tenant as well, so that a verdict of one tenant's private
//! rules is never reused for, nor shown to, another tenant. Every query here filters on the
//! tenant; none reads another tenant's rows.

use fleetscan_core::{ScannerIdentity, Sha256, Verdict};

use crate::rows::{self, VerdictRow};
use crate::{Pool, Store, StoreError, VERDICT_COLUMNS};

impl Store {
    /// Stores a verdict of `tenant`'s own scanner (an empty tenant is refused by the schema).
    /// Idempotent: the key is (tenant, sha256,
    /// scanner, engine, engine_version, ruleset_version); a second put replaces the row.
    pub async fn put_tenant_verdict(&self, tenant: &str, v: &Verdict) -> Result<(), StoreError> {
        self.put_tenant_verdicts(tenant, std::slice::from_ref(v))
            .await
    }

    /// Stores many verdicts of `tenant`'s own scanners in one transaction, with
    /// [`Store::put_verdicts`]'s meaning within the tenant's scope (the same statement, on
    /// `tenant_verdicts`): all or nothing, of two verdicts of one key the later wins.
    pub async fn put_tenant_verdicts<V>(
        &self,
        tenant: &str,
        verdicts: &[V],
    ) -> Result<(), StoreError>
    where
        V: std::borrow::Borrow<Verdict> + Sync,
    {
        self.upsert_verdicts(Some(tenant), verdicts).await
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
}
