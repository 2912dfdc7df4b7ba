//! The defaults `fleetscan` gives each component are the component's own `Default`
//! (`BrokerConfig::default()`, `AgentConfig::default()`, `WorkerConfig::default()`), which the
//! sections convert to their keys. linkerd2-proxy's `app/src/env.rs` is the model: one block
//! of defaults, read once into each component's configuration.
//!
//! Must never: hold a default for a field a component has; a default that should change
//! changes in its component.
//!
//! The constants here are the CLI's own: keys no component has.

use std::path::Path;

/// The broker's default gRPC address, used by every client subcommand too.
pub const DEFAULT_BROKER_ADDR: &str = "127.0.0.1:7700";

/// Where `fleetscan broker` and `fleetscan up` keep their state (the SQLite store).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/fleetscan";

/// clamd's socket on Debian, for `fleetscan worker --engine clamav`.
pub const DEFAULT_CLAMD_SOCKET: &str = "/var/run/clamav/clamd.ctl";

/// The SQLite store of a data directory.
pub fn sqlite_store_in(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("fleetscan.db").display())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetscan_agent::AgentConfig;
    use fleetscan_broker::BrokerConfig;
    use fleetscan_worker::WorkerConfig;

    use crate::config::{AgentSection, BrokerSection, Config, PolicySection, WorkerSection};

    /// Every field a section shares with its component has the component's default: the
    /// section's default, read into the component's configuration, is the component's default
    /// whole (so a field added to both is covered without a change here).
    #[test]
    fn every_section_default_is_its_components() {
        assert_eq!(
            BrokerSection::default().to_broker_config(),
            BrokerConfig::default()
        );
        let b = BrokerConfig::default();
        assert_eq!(
            PolicySection::default().to_policy(b.policy.version),
            b.policy
        );
        assert_eq!(
            AgentSection::default().to_agent_config().unwrap(),
            AgentConfig::default()
        );
        assert_eq!(
            WorkerSection::default().to_worker_config(),
            WorkerConfig::default()
        );
    }

    /// What `fleetscan config` printed before the sections took their defaults from the
    /// components: users' defaults must not move.
    const PRINTED_DEFAULTS: &str = r#"[broker]
listen = "127.0.0.1:7700"
store = ""
data_dir = "/var/lib/fleetscan"
broker_id = ""
scan_deadline_ms = 30000
job_deadline_ms = 10000
max_tries = 3
write_queue = 100000
verdict_cache_capacity = 1000000
claim_ttl_ms = 5000
policy_version = 1
namespace_label = "fleetscan.io/tenant"
shared_pools = []

[broker.policy]
fail_mode = "open"
decision_deadline_ms = 5000
max_file_size = 67108864
oversize_action = "allow"
audit_only = false

[broker.tenants]

[agent]
brokers = ["http://127.0.0.1:7700"]
protect = []
node = ""
cluster = "default"
fail_mode = "open"
decision_deadline_ms = 5000
max_file_size = 67108864
ignore_marks = true
cache_capacity = 1000000
pods = "none"
pod_retention_s = 300

[worker]
brokers = ["http://127.0.0.1:7700"]
engine = "reference"
clamd = "/var/run/clamav/clamd.ctl"
name = ""
pool = "default"
tenants = []
credits = 4
max_file_size = 0
"#;

    #[test]
    fn users_get_the_defaults_they_always_had() {
        let printed = toml::to_string_pretty(&Config::default()).unwrap();
        assert_eq!(printed, PRINTED_DEFAULTS);
        // And what the empty keys stand for.
        let host = fleetscan_core::host_name();
        let pid = std::process::id();
        let b = BrokerSection::default().to_broker_config();
        assert_eq!(b.store_url, "sqlite:///var/lib/fleetscan/fleetscan.db");
        assert_eq!(b.broker_id, format!("{host}-{pid}"));
        let a = AgentSection::default().to_agent_config().unwrap();
        assert_eq!(a.node, host);
        let w = WorkerSection::default().to_worker_config();
        assert_eq!(w.worker_name, format!("{host}-{pid}"));
    }

    /// Clients find a broker that runs on its defaults.
    #[test]
    fn agents_and_workers_default_to_the_brokers_address() {
        let url = format!("http://{DEFAULT_BROKER_ADDR}");
        assert_eq!(AgentConfig::default().brokers, vec![url.clone()]);
        assert_eq!(WorkerConfig::default().brokers, vec![url]);
    }
}
