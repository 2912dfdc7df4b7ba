//! `[broker]` and `[broker.policy]`: the broker's configuration under the keys users write.
//! Every default is `BrokerConfig::default()`'s (see [`super::defaults`]); only the address,
//! the data directory and the empty-means-derived keys (`store`, `broker_id`) are the CLI's.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fleetscan_broker::BrokerConfig;
use fleetscan_core::tenancy::{TenancyConfig, TenantConfig};
use fleetscan_core::{Action, FailMode, Policy};
use serde::{Deserialize, Serialize};

use super::{defaults, millis};

/// The policy every new access is decided by (the default tenant's).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicySection {
    /// `open` (allow) or `closed` (deny) when no verdict comes in time.
    pub fail_mode: FailMode,
    /// How long an access may wait for a decision; at most 5000.
    pub decision_deadline_ms: u64,
    /// Larger content is not scanned; `oversize_action` decides it.
    pub max_file_size: u64,
    pub oversize_action: Action,
    /// Record what would be denied, but allow it.
    pub audit_only: bool,
}

impl Default for PolicySection {
    fn default() -> Self {
        PolicySection::from_policy(&BrokerConfig::default().policy)
    }
}

impl PolicySection {
    fn from_policy(p: &Policy) -> Self {
        PolicySection {
            fail_mode: p.fail_mode,
            decision_deadline_ms: millis(p.decision_deadline),
            max_file_size: p.max_file_size,
            oversize_action: p.oversize_action,
            audit_only: p.audit_only,
        }
    }

    /// The policy, at `version`.
    pub fn to_policy(&self, version: u64) -> Policy {
        Policy {
            version,
            fail_mode: self.fail_mode,
            decision_deadline: Duration::from_millis(self.decision_deadline_ms),
            max_file_size: self.max_file_size,
            oversize_action: self.oversize_action,
            audit_only: self.audit_only,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerSection {
    /// gRPC address (agents, workers, admin and scan clients).
    pub listen: SocketAddr,
    /// `sqlite://PATH` or `postgres://…`; empty means `sqlite://<data_dir>/fleetscan.db`.
    pub store: String,
    pub data_dir: PathBuf,
    /// Names this replica in logs and to peers; empty means `<hostname>-<pid>`.
    pub broker_id: String,
    pub policy: PolicySection,
    /// Deadline of one voluntary scan (ScanService).
    pub scan_deadline_ms: u64,
    /// Deadline of one worker's try at a job.
    pub job_deadline_ms: u64,
    pub max_tries: u32,
    /// Records (verdicts, denials) waiting to be written, at most; more are dropped and counted.
    pub write_queue: usize,
    pub verdict_cache_capacity: usize,
    /// How long a replica's claim on scanning new content holds without renewal (Postgres):
    /// the longest other replicas wait for a claimer that died before scanning it themselves.
    pub claim_ttl_ms: u64,
    /// Version of the policies (`policy` and every tenant's): raise it on every change, so
    /// that agents take the new set and ignore older ones.
    pub policy_version: u64,
    /// The namespace label that names a namespace's tenant (agents read it).
    pub namespace_label: String,
    /// Pools of the fleet that tenants may opt into (`shared_pools` of a tenant).
    pub shared_pools: Vec<String>,
    /// Tenants by name: `namespaces` (theirs whatever their labels say), `pools` (their own),
    /// `shared_pools` (opted into), `policy` (over `[broker.policy]`: fail_mode,
    /// decision_deadline_ms, max_file_size, oversize_action, audit_only, exec_only,
    /// exclusions = { paths, images, namespaces }, pools = the required ones) and
    /// `namespace_policies.<namespace>` (the same, over the tenant's). Without tenants every
    /// access is the fleet operator's (`default`), decided by `policy` and the `default` pool.
    pub tenants: BTreeMap<String, TenantConfig>,
}

impl Default for BrokerSection {
    fn default() -> Self {
        let b = BrokerConfig::default();
        BrokerSection {
            listen: defaults::DEFAULT_BROKER_ADDR
                .parse()
                .expect("valid default address"),
            // Derived when the broker starts: see `store_url` and `to_broker_config`.
            store: String::new(),
            data_dir: PathBuf::from(defaults::DEFAULT_DATA_DIR),
            broker_id: String::new(),
            policy: PolicySection::from_policy(&b.policy),
            scan_deadline_ms: millis(b.scan_deadline),
            job_deadline_ms: millis(b.job_deadline),
            max_tries: b.max_tries,
            write_queue: b.write_queue,
            verdict_cache_capacity: b.verdict_cache_capacity,
            claim_ttl_ms: millis(b.claim_ttl),
            policy_version: b.tenancy.version,
            namespace_label: b.tenancy.namespace_label,
            shared_pools: b.tenancy.shared_pools,
            tenants: b.tenancy.tenants,
        }
    }
}

impl BrokerSection {
    pub fn store_url(&self) -> String {
        if self.store.is_empty() {
            defaults::sqlite_store_in(&self.data_dir)
        } else {
            self.store.clone()
        }
    }

    pub fn to_broker_config(&self) -> BrokerConfig {
        let broker_id = if self.broker_id.is_empty() {
            BrokerConfig::default().broker_id
        } else {
            self.broker_id.clone()
        };
        BrokerConfig {
            broker_id,
            store_url: self.store_url(),
            policy: self.policy.to_policy(self.policy_version),
            tenancy: TenancyConfig {
                version: self.policy_version,
                namespace_label: self.namespace_label.clone(),
                shared_pools: self.shared_pools.clone(),
                tenants: self.tenants.clone(),
            },
            scan_deadline: Duration::from_millis(self.scan_deadline_ms),
            job_deadline: Duration::from_millis(self.job_deadline_ms),
            max_tries: self.max_tries,
            write_queue: self.write_queue,
            verdict_cache_capacity: self.verdict_cache_capacity,
            claim_ttl: Duration::from_millis(self.claim_ttl_ms),
        }
    }
}
