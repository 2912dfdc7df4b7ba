//! The broker's configuration, with every default written down.

use std::time::Duration;

use fleetscan_core::{Policy, TenancyConfig};
use serde::{Deserialize, Serialize};

/// How a broker runs. `Default` gives a single-host broker on the SQLite file
/// `/var/lib/fleetscan/fleetscan.db`, named `HOSTNAME-PID`; these are the defaults every
/// `fleetscan` command starts from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Names this broker in `SessionAccepted` and `Registered`, for operators.
    pub broker_id: String,
    /// `sqlite://PATH`, `sqlite::memory:` or `postgres://…`.
    pub store_url: String,
    /// The fleet's policy: the fleet operator's tenant's, and what every other tenant inherits
    /// where it sets nothing of its own.
    pub policy: Policy,
    /// Tenants, their namespaces, pools and policies (default: the fleet operator's tenant
    /// alone, scanned by its `default` pool under `policy`).
    pub tenancy: TenancyConfig,
    /// How long a `ScanService` call may take in all (default 30 s).
    #[serde(with = "humantime_serde")]
    pub scan_deadline: Duration,
    /// How long one worker try of a job may take (default 10 s).
    #[serde(with = "humantime_serde")]
    pub job_deadline: Duration,
    /// Tries of a job in all, over any workers (default 3).
    pub max_tries: u32,
    /// Capacity of the write-behind queue, in records (default 100 000).
    pub write_queue: usize,
    /// Verdicts held in memory (default 1 000 000).
    pub verdict_cache_capacity: usize,
    /// How long a claim on a scan holds without renewal (default 5 s): brokers sharing a
    /// Postgres store wait this long at most for a claimer that died before taking over.
    #[serde(with = "humantime_serde")]
    pub claim_ttl: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            broker_id: format!("{}-{}", fleetscan_core::host_name(), std::process::id()),
            store_url: "sqlite:///var/lib/fleetscan/fleetscan.db".into(),
            policy: Policy::default(),
            tenancy: TenancyConfig::default(),
            scan_deadline: Duration::from_secs(30),
            job_deadline: Duration::from_secs(10),
            max_tries: 3,
            write_queue: 100_000,
            verdict_cache_capacity: 1_000_000,
            claim_ttl: Duration::from_secs(5),
        }
    }
}
