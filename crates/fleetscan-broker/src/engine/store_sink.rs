//! The store as the write-behind queue's sink: each call maps the store's error to "retry
//! later" (the store is unreachable) or "refused".

use std::sync::Arc;

use fleetscan_core::{AccessRecord, Verdict};
use fleetscan_store::{Store, StoreError};

use super::writer::{HostSeen, Sink, SinkError};

fn classify(e: StoreError) -> SinkError {
    SinkError {
        retryable: e.is_unavailable(),
        message: e.to_string(),
    }
}

impl Sink for Store {
    async fn host_seen(&self, h: &HostSeen) -> Result<(), SinkError> {
        Store::host_seen(
            self,
            &h.tenant,
            &h.node,
            &h.cluster,
            &h.agent_version,
            h.at_unix_ms,
        )
        .await
        .map_err(classify)
    }

    async fn put_verdicts(&self, verdicts: &[Arc<Verdict>]) -> Result<(), SinkError> {
        Store::put_verdicts(self, verdicts).await.map_err(classify)
    }

    async fn put_tenant_verdicts(
        &self,
        tenant: &str,
        verdicts: &[Arc<Verdict>],
    ) -> Result<(), SinkError> {
        Store::put_tenant_verdicts(self, tenant, verdicts)
            .await
            .map_err(classify)
    }

    async fn record_accesses(&self, records: &[AccessRecord]) -> Result<(), SinkError> {
        Store::record_accesses(self, records)
            .await
            .map(drop)
            .map_err(classify)
    }

    async fn add_host_counts(
        &self,
        tenant: &str,
        node: &str,
        allowed: u64,
        denied: u64,
    ) -> Result<(), SinkError> {
        Store::add_host_counts(self, tenant, node, allowed, denied)
            .await
            .map_err(classify)
    }
}
